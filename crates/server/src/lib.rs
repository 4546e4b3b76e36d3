//! Roster's HTTP server (axum): authentication, limits, the native API, the read and admin APIs.
//! Handlers are thin: they translate HTTP into engine calls and engine results into HTTP.

mod admin;
mod admission;
mod auth;
mod body;
mod cors;
mod customerio;
pub mod error;
mod flags;
mod flagsmith;
mod graph;
mod native;
mod operations;
mod profiles;
mod query;
mod rejections;
mod sdk;
mod segment;

pub use native::{parse_alias_item, parse_identify_item, parse_track_item};
pub use operations::{install_metrics_recorder, serve_metrics};
pub use query::to_csv as csv;

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use roster_core::ErrorCode;
use roster_engine::Engine;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body accepted, in bytes; larger bodies get 413 before being parsed.
    pub max_body_bytes: usize,
    /// Most items (messages, operations, identities) in one batch request, in every dialect;
    /// more get one `too_many_items` answer before any item is parsed.
    pub max_batch_items: usize,
    /// Most requests served at once; past it, `503 overloaded` with `Retry-After`.
    pub max_requests_in_flight: usize,
    /// Most request-body bytes held in memory at once (never less than `max_body_bytes`); past
    /// it, `503 overloaded` with `Retry-After`.
    pub max_body_bytes_in_flight: usize,
    /// Longest a client may take to send a whole request body.
    pub body_read_timeout: Duration,
    /// Longest a client may take to send a request's headers, and longest an idle keep-alive
    /// connection stays open.
    pub header_read_timeout: Duration,
    /// Most open connections; further ones wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Serve `GET /metrics` on this listener (off when it has a listener of its own, or none).
    pub serve_metrics: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 5 * 1024 * 1024,
            max_batch_items: 1000,
            max_requests_in_flight: 512,
            max_body_bytes_in_flight: 64 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            serve_metrics: true,
        }
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub config: Arc<ServerConfig>,
}

/// All routes, with the layers every request goes through.
pub fn router(engine: Arc<Engine>, config: ServerConfig) -> Router {
    let max_body_bytes = config.max_body_bytes;
    let serve_metrics = config.serve_metrics;
    if serve_metrics {
        install_metrics_recorder();
    }
    let admission = Arc::new(admission::Admission::new(&config));
    let state = AppState { engine, config: Arc::new(config) };
    let routes = Router::new()
        .merge(client_routes(state.clone(), Arc::clone(&admission)))
        .merge(server_routes(admission))
        .fallback(|| async { ApiError::not_found("no such endpoint; see docs/api.md") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorCode::MethodNotAllowed, "this endpoint does not accept that HTTP method")
        })
        // Outside the admission layers of the route groups, so health, readiness and metrics are
        // answered however busy the server is (and without a key).
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(operations::readiness));
    let routes = if serve_metrics { routes.route("/metrics", get(operations::render_metrics)) } else { routes };
    routes
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        // Outside the panic catcher, so a panic's 500 is counted too.
        .layer(axum::middleware::from_fn(operations::record_request))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Endpoints a client key may call, from browsers on other origins too: they answer CORS
/// preflights and carry CORS headers for the origins the environment allows.
fn client_routes(state: AppState, admission: Arc<admission::Admission>) -> Router<AppState> {
    let routes: Vec<(&str, MethodRouter<AppState>)> = vec![
        ("/identify", post(native::identify)),
        ("/track", post(native::track)),
        ("/alias", post(native::alias)),
        ("/v1/flags", get(flags::default_flags).post(flags::identify_and_evaluate)),
        // Segment's tracking API, and the short paths analytics.js and Customer.io's browser
        // SDK post to.
        ("/v1/identify", post(segment::identify)),
        ("/v1/i", post(segment::identify)),
        ("/v1/track", post(segment::track)),
        ("/v1/t", post(segment::track)),
        ("/v1/alias", post(segment::alias)),
        ("/v1/a", post(segment::alias)),
        ("/v1/page", post(segment::page)),
        ("/v1/p", post(segment::page)),
        ("/v1/screen", post(segment::screen)),
        ("/v1/s", post(segment::screen)),
        ("/v1/group", post(segment::group)),
        ("/v1/g", post(segment::group)),
        ("/v1/batch", post(segment::batch)),
        ("/v1/b", post(segment::batch)),
        ("/api/v1/flags/", get(flagsmith::flags)),
        ("/api/v1/identities/", get(flagsmith::get_identity).post(flagsmith::post_identity)),
        ("/api/v1/traits/", post(flagsmith::post_trait)),
        ("/api/v1/traits/bulk/", axum::routing::put(flagsmith::bulk_traits)),
        ("/api/v1/traits/increment-value/", post(flagsmith::increment_trait)),
    ];
    routes
        .into_iter()
        // `OPTIONS` routed too, so the CORS layer sees preflights (it answers them itself).
        .fold(Router::new(), |router, (path, methods)| router.route(path, methods.options(cors::preflight)))
        .route_layer(axum::middleware::from_fn_with_state(admission, admission::admit))
        // Outermost, so refusals under load (503 with `Retry-After`) are readable by browsers too.
        .route_layer(axum::middleware::from_fn_with_state(state, cors::cors))
}

/// Endpoints for server keys and the admin token: same-origin only (no CORS).
fn server_routes(admission: Arc<admission::Admission>) -> Router<AppState> {
    let routes = Router::new()
        .route("/openapi.json", get(openapi))
        .route("/sdk/roster.js", get(sdk::script))
        .route("/sdk/roster.mjs", get(sdk::module))
        .route("/v1/query", post(query::query))
        .route("/v1/rejections", get(rejections::list_rejections))
        .route("/v1/profiles", get(profiles::list_profiles))
        .route("/v1/profiles/merge", post(graph::merge))
        .route("/v1/profiles/erase", post(graph::erase))
        .route("/v1/profiles/{profile_id}", get(profiles::get_profile).delete(graph::erase_by_id))
        .route("/v1/profiles/{profile_id}/identifiers", axum::routing::patch(graph::change_identifiers))
        .route(
            "/v1/profiles/{profile_id}/devices/{token}",
            axum::routing::put(graph::put_device).delete(graph::delete_device),
        )
        .route("/v1/suppressions/{user_id}", axum::routing::put(graph::suppress).delete(graph::unsuppress))
        .route("/v1/profiles/{profile_id}/events", get(profiles::list_events))
        .route("/v1/segments", get(flags::list_segments).post(flags::create_segment))
        .route(
            "/v1/segments/{segment_id}",
            get(flags::get_segment).put(flags::replace_segment).delete(flags::delete_segment),
        )
        .route("/v1/segments/{segment_id}/members", get(flags::segment_members))
        .route("/v1/features", get(flags::list_features).post(flags::create_feature))
        .route(
            "/v1/features/{feature_id}",
            get(flags::get_feature).put(flags::replace_feature).delete(flags::delete_feature),
        )
        .route(
            "/v1/features/{feature_id}/overrides/{profile_id}",
            axum::routing::put(flags::put_identity_override).delete(flags::delete_identity_override),
        )
        .route("/v1/environment-document", get(flags::environment_document))
        .route(
            "/api/v1/customers/{identifier}",
            axum::routing::put(customerio::put_customer).delete(customerio::delete_customer),
        )
        .route("/api/v1/customers/{identifier}/events", post(customerio::customer_event))
        .route("/api/v1/customers/{identifier}/devices", axum::routing::put(customerio::put_device))
        .route("/api/v1/customers/{identifier}/devices/{token}", axum::routing::delete(customerio::delete_device))
        .route("/api/v1/customers/{identifier}/suppress", post(customerio::suppress))
        .route("/api/v1/customers/{identifier}/unsuppress", post(customerio::unsuppress))
        .route("/api/v1/events", post(customerio::anonymous_event))
        .route("/api/v1/merge_customers", post(customerio::merge_customers))
        .route("/api/v2/batch", post(customerio::batch))
        .route("/api/v1/bulk-identities/", post(flagsmith::bulk_identities))
        .route("/api/v1/environment-document/", get(flagsmith::environment_document))
        .route("/v1/admin/environments", get(admin::list_environments).post(admin::create_environment))
        .route("/v1/admin/environments/{slug}", axum::routing::patch(admin::update_environment))
        .route("/v1/admin/environments/{slug}/rotate-keys", post(admin::rotate_keys));
    routes.route_layer(axum::middleware::from_fn_with_state(admission, admission::admit))
}

/// The OpenAPI document of the native and management API, listing the vendor wire formats.
const OPENAPI: &str = include_str!("../../../docs/openapi.json");

async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// A panic is a bug; the client still gets the public error shape, and nothing half-done is
/// acknowledged (writes are acknowledged only after their commit).
fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    ApiError::new(ErrorCode::Internal, "internal error; the request was not acknowledged").into_response()
}

/// How long the accept loop waits after a failed accept (out of file descriptors, most likely)
/// before trying again, instead of spinning; connections that end meanwhile free descriptors.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Serves on `listener` until `shutdown` resolves, then stops accepting, lets the requests being
/// served finish (closing idle connections at once) and returns.
///
/// Each connection must send a request's headers within `header_read_timeout` of being opened or
/// of its previous answer, so idle keep-alive connections and clients that dribble headers are
/// closed; at most `max_connections` are open at once (further ones wait in the listen backlog,
/// where they hold no file descriptor).
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(address = ?address, "roster listening");
    let connection_slots = Arc::new(Semaphore::new(config.max_connections.clamp(1, Semaphore::MAX_PERMITS)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(config.header_read_timeout);
    let app = router(engine, config);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = connection_slots.clone().acquire_owned() => slot.expect("the connection semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    tracing::warn!(error = %error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers are small and written whole: no reason to wait for more to send.
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!("roster stopping: finishing the requests in flight");
    graceful.shutdown().await;
    Ok(())
}
