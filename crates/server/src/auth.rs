//! Who is calling: the key comes from `X-API-Key`, `X-Environment-Key` (Flagsmith's SDKs),
//! `Authorization: Bearer …`, or `?apiKey=` (the browser SDK's beacon requests cannot set
//! headers), and the engine says what it may do.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use roster_core::ErrorCode;
use roster_engine::Principal;

use crate::AppState;
use crate::error::ApiError;

/// The authenticated caller of a request.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(presented_key) = presented_key(&parts.headers, parts.uri.query()) else {
            return Err(ApiError::new(
                ErrorCode::MissingApiKey,
                "send an API key in the `X-API-Key` header, as `Authorization: Bearer <key>`, or as `?apiKey=<key>`",
            ));
        };
        let principal = state
            .engine
            .authenticate(&presented_key)
            .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey, "the API key is not valid for any environment"))?;
        check_origin(&principal, &parts.headers)?;
        Ok(Caller(principal))
    }
}

/// Refuses a browser request from an origin the key's environment does not allow (its
/// `allowed_origins` setting), before anything is done. Requests without `Origin` (servers,
/// apps) are not browsers' and pass.
pub(crate) fn check_origin(principal: &Principal, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let (Principal::Client(environment) | Principal::Server(environment)) = principal else { return Ok(()) };
    let origin = origin.to_str().unwrap_or_default();
    if environment.settings.allows_origin(origin) {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::OriginNotAllowed,
        format!(
            "the origin `{origin}` may not call environment `{}`; add it to the environment's `allowed_origins`",
            environment.slug
        ),
    ))
}

fn presented_key(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    for name in ["x-api-key", "x-environment-key"] {
        if let Some(key) = headers.get(name).and_then(|value| value.to_str().ok()) {
            return Some(key.trim().to_owned());
        }
    }
    if let Some(authorization) = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok())
        && let Some(token) = authorization.strip_prefix("Bearer ").or_else(|| authorization.strip_prefix("bearer "))
    {
        return Some(token.trim().to_owned());
    }
    query_parameter(query?, "apiKey")
}

/// One parameter of a query string, percent-decoded.
pub(crate) fn query_parameter(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == name).map(|(_, value)| value.into_owned())
}

/// The user and password of HTTP Basic auth, if the request carries it.
pub(crate) fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine as _;
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = authorization.strip_prefix("Basic ").or_else(|| authorization.strip_prefix("basic "))?;
    let decoded = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':').unwrap_or((decoded.as_str(), ""));
    Some((user.to_owned(), password.to_owned()))
}
