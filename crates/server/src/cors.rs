//! CORS for the endpoints a client key may call, so browser SDKs on other origins reach Roster.
//!
//! A preflight carries no key, so it is answered for any origin that some environment allows;
//! the request itself is then checked against its key's environment (`auth::check_origin`) and
//! refused with 403 `origin_not_allowed` — whose answer carries no CORS headers — when that
//! environment does not allow the origin. Server-key and admin endpoints are not behind this
//! layer: a browser on another origin gets no CORS headers from them at all.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;

/// Request headers a browser SDK may send. `Authorization` must be named: the `*` wildcard does
/// not cover it. The vendors' own headers are listed too.
const ALLOWED_HEADERS: &str = "Authorization, Content-Type, Content-Encoding, X-API-Key, X-Environment-Key, \
     Flagsmith-SDK-User-Agent, X-Requested-With, Accept";

/// Browsers may cache a preflight answer this long (Chromium caps it at two hours).
const PREFLIGHT_MAX_AGE_SECONDS: &str = "7200";

/// `OPTIONS` without CORS headers: a preflight from no allowed origin (the layer answers the
/// others before this runs), or a plain `OPTIONS` request.
pub(crate) async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Marks an answer refused because of its origin, so no CORS header is added to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OriginRefused;

pub(crate) async fn cors(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(origin) = request.headers().get(header::ORIGIN).cloned() else {
        return next.run(request).await;
    };
    let allowed = origin.to_str().is_ok_and(|origin| state.engine.origin_allowed_anywhere(origin));
    let is_preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if is_preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        if allowed {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
            );
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed_headers(request.headers()));
            headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(PREFLIGHT_MAX_AGE_SECONDS));
        }
        return response;
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if allowed && response.extensions().get::<OriginRefused>().is_none() {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Retry-After"));
    }
    response
}

/// The fixed list, plus whatever else the preflight asks for when it is a plain header name
/// (SDKs add their own; refusing an unknown one would only break that SDK).
fn allowed_headers(request_headers: &HeaderMap) -> HeaderValue {
    let requested = request_headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let mut names = ALLOWED_HEADERS.to_owned();
    for name in requested.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        let plain =
            name.len() <= 64 && name.chars().all(|character| character.is_ascii_alphanumeric() || character == '-');
        if plain && !ALLOWED_HEADERS.to_ascii_lowercase().contains(&name.to_ascii_lowercase()) {
            names.push_str(", ");
            names.push_str(name);
        }
    }
    HeaderValue::from_str(&names).unwrap_or_else(|_| HeaderValue::from_static(ALLOWED_HEADERS))
}
