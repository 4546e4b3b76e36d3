//! Roster's browser SDK, served by the server itself (see docs/browser.md). One hand-written
//! source (`sdk/roster-core.js`) becomes a classic script and an ES module at compile time.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// `GET /sdk/roster.js`: defines `window.roster`.
const SCRIPT: &str = concat!(
    "(function () {\n",
    include_str!("../sdk/roster-core.js"),
    include_str!("../sdk/roster-script.js"),
    "})();\n"
);

/// `GET /sdk/roster.mjs`: `export default roster` and `export { createRoster }`.
const MODULE: &str = concat!(include_str!("../sdk/roster-core.js"), include_str!("../sdk/roster-module.js"));

pub async fn script(headers: HeaderMap) -> Response {
    javascript(SCRIPT, &headers)
}

pub async fn module(headers: HeaderMap) -> Response {
    javascript(MODULE, &headers)
}

/// The source with a content-derived ETag, cached for an hour (then revalidated cheaply).
fn javascript(source: &'static str, headers: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", fnv1a(source.as_bytes()));
    let cache = [
        (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600")),
        (header::ETAG, HeaderValue::from_str(&etag).expect("hex etag is a valid header value")),
    ];
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|tag| tag.trim() == etag || tag.trim() == "*"));
    if matches {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    let content_type = (header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"));
    // Public code: any page may load it, and a module script from another origin needs CORS.
    let any_origin = (header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    (cache, [content_type, any_origin], source).into_response()
}

/// FNV-1a: a stable hash of the source for the ETag (stable across builds, unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}
