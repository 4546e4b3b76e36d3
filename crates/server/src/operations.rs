//! Operations endpoints: `GET /metrics` (Prometheus text format), `GET /readyz`, and the
//! per-request HTTP metrics. The engine and store record through the `metrics` facade; this
//! module installs the one process-wide recorder they record into and renders it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use roster_core::ErrorCode;
use tokio::net::TcpListener;

use crate::AppState;
use crate::error::ApiError;

/// The process's recorder handle. The `metrics` facade takes one global recorder per process,
/// while a process may build several routers (tests run many servers in one binary), so the
/// first installation wins and every later router renders the same registry.
static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Upper bounds of the latency histograms (every histogram named `…_seconds`): from a cached
/// read (sub-millisecond) to a query near its default 10 s timeout.
const LATENCY_BUCKETS_SECONDS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Upper bounds of the jobs-per-group-commit histogram (the writer takes at most 512 at once).
const GROUP_COMMIT_JOBS_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// How often histogram samples are folded into their buckets when nobody scrapes, so a server
/// whose `/metrics` is never read does not accumulate samples.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Longest `/readyz` waits for the store's trivial read before answering 503.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// Installs the process-wide Prometheus recorder, once; later calls answer the same handle.
pub fn install_metrics_recorder() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Full("roster_sqlite_group_commit_jobs".into()),
                    GROUP_COMMIT_JOBS_BUCKETS,
                )
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            // Only possible if something else in the process installed a recorder first; the
            // endpoint then renders an empty registry rather than failing the server.
            tracing::warn!(%error, "metrics recorder not installed; /metrics stays empty");
        }
        let upkeep = handle.clone();
        // A plain thread, not a task: tests start servers on many short-lived runtimes, and the
        // upkeep must outlive whichever one installed the recorder.
        let _ = std::thread::Builder::new().name("roster-metrics-upkeep".into()).spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        });
        handle
    })
}

/// `GET /metrics`: every metric of the process in Prometheus' text exposition format.
pub(crate) async fn render_metrics() -> Response {
    let text = install_metrics_recorder().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// Serves `GET /metrics` alone on `listener` (`--metrics-listen`), so it can be exposed to a
/// scraper on another interface than the API. Runs until the process ends.
pub async fn serve_metrics(listener: TcpListener) -> std::io::Result<()> {
    install_metrics_recorder();
    tracing::info!(address = ?listener.local_addr().ok(), "roster metrics listening");
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(render_metrics))
        .fallback(|| async { ApiError::not_found("this listener serves only /metrics") });
    axum::serve(listener, app).await
}

/// `GET /readyz`: 200 when the store answers a trivial read within `READINESS_TIMEOUT`, 503
/// `not_ready` otherwise. `/healthz` only says the process serves HTTP; this says whether it can
/// do its work, so a load balancer can take a node whose database went away out of rotation.
pub(crate) async fn readiness(State(state): State<AppState>) -> Response {
    let message = match tokio::time::timeout(READINESS_TIMEOUT, state.engine.ping()).await {
        Ok(Ok(())) => return Json(serde_json::json!({ "status": "ready" })).into_response(),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness check failed: the store refused a trivial read");
            "the store cannot serve reads; see the server's log"
        }
        Err(_elapsed) => {
            tracing::warn!(timeout_ms = READINESS_TIMEOUT.as_millis() as u64, "readiness check timed out");
            "the store did not answer a trivial read in time"
        }
    };
    ApiError::new(ErrorCode::NotReady, message).into_response()
}

/// Counts every request by method, route template and status, and times it
/// (`roster_http_requests_total`, `roster_http_request_duration_seconds`). The route is axum's
/// matched template (`/v1/profiles/{profile_id}`), never the concrete path, so ids cannot grow
/// the number of series; paths no route matched share `unmatched`.
pub(crate) async fn record_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = match request.extensions().get::<MatchedPath>() {
        Some(matched) => matched.as_str().to_owned(),
        None => "unmatched".to_owned(),
    };
    let response = roster_engine::within_dialect(dialect_of_route(&route), next.run(request)).await;
    let status = response.status();
    let status_class = status_class_label(status);
    metrics::counter!(
        "roster_http_requests_total",
        "method" => method,
        "route" => route.clone(),
        "status" => status.as_str().to_owned(),
        "status_class" => status_class,
    )
    .increment(1);
    metrics::histogram!(
        "roster_http_request_duration_seconds",
        "method" => method,
        "route" => route,
        "status_class" => status_class,
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// The wire format a route belongs to, for the items counters.
fn dialect_of_route(route: &str) -> &'static str {
    const SEGMENT: [&str; 14] = [
        "/v1/identify",
        "/v1/track",
        "/v1/alias",
        "/v1/page",
        "/v1/screen",
        "/v1/group",
        "/v1/batch",
        "/v1/i",
        "/v1/t",
        "/v1/a",
        "/v1/p",
        "/v1/s",
        "/v1/g",
        "/v1/b",
    ];
    if SEGMENT.contains(&route) {
        return "segment";
    }
    let customerio = ["/api/v1/customers", "/api/v1/events", "/api/v1/merge_customers", "/api/v2/batch"];
    if customerio.iter().any(|prefix| route.starts_with(prefix)) {
        return "customerio";
    }
    if route.starts_with("/api/") {
        return "flagsmith";
    }
    "native"
}

/// The method as a label; methods outside HTTP's usual set share `other`, since a client may
/// send any token as a method.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

fn status_class_label(status: StatusCode) -> &'static str {
    match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}
