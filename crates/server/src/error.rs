//! The one public error shape (after meilisearch): `message`, `code`, `type`, `link`, plus the
//! `path` of the field at fault where there is one. Every failure a client can see goes through
//! here, so they can all be matched the same way.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use roster_core::{ErrorCode, FieldError};
use roster_engine::EngineError;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublicError {
    pub message: String,
    pub code: &'static str,
    #[serde(rename = "type")]
    pub error_type: &'static str,
    pub link: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Longest `message` answered, in bytes: messages quote what the client sent (an unknown key, a
/// string of the wrong type), and an answer must stay small whatever the input.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 512;

/// Most rejected items a batch answer lists one by one (the rest are counted), so an answer's
/// size stays bounded whatever the request; the rejections log keeps the first hundred.
pub const MAX_LISTED_REJECTIONS: usize = 50;
/// Longest `path` answered, in bytes (paths quote trait keys).
pub const MAX_ERROR_PATH_BYTES: usize = 512;

impl PublicError {
    pub fn new(code: ErrorCode, message: impl Into<String>, path: Option<String>) -> Self {
        PublicError {
            message: truncated(message.into(), MAX_ERROR_MESSAGE_BYTES),
            code: code.as_str(),
            error_type: error_type(code),
            link: format!("docs/errors.md#{}", code.as_str()),
            path: path.filter(|path| !path.is_empty()).map(|path| truncated(path, MAX_ERROR_PATH_BYTES)),
        }
    }

    pub fn from_field(error: &FieldError) -> Self {
        let message =
            if error.path.is_empty() { error.message.clone() } else { format!("`{}` {}", error.path, error.message) };
        PublicError::new(error.code, message, Some(error.path.clone()))
    }
}

/// `text` cut to at most `max_bytes` (on a character boundary), marked with `…` when cut.
pub fn truncated(text: String, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text;
    }
    const ELLIPSIS: &str = "…";
    format!("{}{ELLIPSIS}", roster_core::limits::prefix_within(&text, max_bytes.saturating_sub(ELLIPSIS.len())))
}

fn error_type(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::MissingApiKey | ErrorCode::InvalidApiKey | ErrorCode::Forbidden | ErrorCode::OriginNotAllowed => {
            "auth"
        }
        ErrorCode::Overloaded | ErrorCode::QueryUnavailable | ErrorCode::NotReady => "unavailable",
        ErrorCode::Internal => "internal",
        _ => "invalid_request",
    }
}

pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::PayloadTooLarge | ErrorCode::TooManyItems => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorCode::Overloaded | ErrorCode::NotReady => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::MissingApiKey | ErrorCode::InvalidApiKey => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden | ErrorCode::OriginNotAllowed => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::EnvironmentExists
        | ErrorCode::IdentifierTaken
        | ErrorCode::IdentifierSuppressed
        | ErrorCode::NameTaken
        | ErrorCode::SegmentInUse => StatusCode::CONFLICT,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::QueryUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::TooManyQueries => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// An error response: status plus the public error body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: PublicError,
    /// Seconds after which a retry may succeed (`Retry-After`), for refusals under load.
    pub retry_after_seconds: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { status: status_of(code), body: PublicError::new(code, message, None), retry_after_seconds: None }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_seconds = Some(seconds);
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::NotFound, message)
    }
}

impl From<FieldError> for ApiError {
    fn from(error: FieldError) -> Self {
        ApiError { status: status_of(error.code), body: PublicError::from_field(&error), retry_after_seconds: None }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Invalid(field_error) => field_error.into(),
            EngineError::Forbidden(message) => ApiError::new(ErrorCode::Forbidden, message),
            EngineError::NotFound(message) => ApiError::new(ErrorCode::NotFound, message),
            EngineError::Conflict(message) => ApiError::new(ErrorCode::EnvironmentExists, message),
            EngineError::QueryRefused(message) => ApiError::new(ErrorCode::QueryRefused, message),
            EngineError::QueryFailed(message) => ApiError::new(ErrorCode::QueryFailed, message),
            EngineError::QueryTimeout(message) => ApiError::new(ErrorCode::QueryTimeout, message),
            EngineError::QueryUnavailable(message) => ApiError::new(ErrorCode::QueryUnavailable, message),
            EngineError::TooManyQueries(message) => ApiError::new(ErrorCode::TooManyQueries, message).retry_after(1),
            EngineError::Store(store_error) => {
                tracing::error!(error = %store_error, "store operation failed");
                ApiError::new(ErrorCode::Internal, "the server could not complete the request; it was not applied")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let origin_refused = self.body.code == ErrorCode::OriginNotAllowed.as_str();
        let mut response = (self.status, Json(self.body)).into_response();
        if origin_refused {
            response.extensions_mut().insert(crate::cors::OriginRefused);
        }
        if let Some(seconds) = self.retry_after_seconds {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        }
        response
    }
}
