//! Request bodies: read with a size limit and parsed as JSON with errors that name the field.
//! One object or an array of objects is accepted wherever the vendors accept both; array items are
//! parsed one by one so that one bad item is reported without failing its neighbours.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use roster_core::{ErrorCode, FieldError};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::AppState;
use crate::error::ApiError;

/// The raw body, with the configured limit applied and every failure in the public error shape.
pub struct Body(pub Bytes);

impl FromRequest<AppState> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(request, state).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(rejection) => Err(body_rejection(rejection, state.config.max_body_bytes)),
        }
    }
}

fn body_rejection(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than the limit of {limit} bytes"),
        );
    }
    ApiError::new(ErrorCode::MalformedJson, format!("the request body could not be read: {}", rejection.body_text()))
}

/// A body that is one JSON object or an array of them.
pub struct Items<'a> {
    /// Whether the body was an array (item paths then start with `[index]`).
    pub is_batch: bool,
    pub raw: Vec<&'a RawValue>,
}

impl Items<'_> {
    /// The path prefix of item `index` in error messages.
    pub fn item_path(&self, index: usize) -> String {
        if self.is_batch { format!("[{index}]") } else { String::new() }
    }
}

/// Splits a body into items without parsing their contents yet.
pub fn split_items(bytes: &[u8]) -> Result<Items<'_>, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::new(ErrorCode::MalformedJson, "the request body is not valid UTF-8"))?;
    let first = text.trim_start().as_bytes().first().copied();
    match first {
        Some(b'[') => {
            let raw: Vec<&RawValue> = serde_json::from_str(text).map_err(malformed)?;
            Ok(Items { is_batch: true, raw })
        }
        Some(b'{') => {
            let raw: &RawValue = serde_json::from_str(text).map_err(malformed)?;
            Ok(Items { is_batch: false, raw: vec![raw] })
        }
        None => Err(ApiError::new(
            ErrorCode::MalformedJson,
            "the request body is empty; send a JSON object or an array of objects",
        )),
        Some(_) => {
            // Valid JSON of the wrong kind is a type error; anything else is malformed.
            serde_json::from_str::<&RawValue>(text).map_err(malformed)?;
            Err(ApiError::new(ErrorCode::InvalidType, "the request body must be a JSON object or an array of objects"))
        }
    }
}

fn malformed(error: serde_json::Error) -> ApiError {
    ApiError::new(ErrorCode::MalformedJson, format!("the request body is not valid JSON: {error}"))
}

/// Parses one item (or any document) into `T`, reporting the failing field's path.
pub fn parse_item<T: DeserializeOwned>(raw: &RawValue) -> Result<T, FieldError> {
    if !raw.get().trim_start().starts_with('{') {
        return Err(FieldError::new(ErrorCode::InvalidType, "", "each item must be a JSON object"));
    }
    parse_with_paths(raw)
}

/// Parses a body that must be a JSON array (of `T`s).
pub fn parse_array<T: DeserializeOwned>(bytes: &[u8]) -> Result<Vec<T>, ApiError> {
    let raw: &RawValue = serde_json::from_slice(bytes).map_err(malformed)?;
    if !raw.get().trim_start().starts_with('[') {
        return Err(FieldError::new(ErrorCode::InvalidType, "", "the body must be a JSON array").into());
    }
    parse_with_paths(raw).map_err(ApiError::from)
}

/// Deserializes with the failing field's path in the error.
fn parse_with_paths<T: DeserializeOwned>(raw: &RawValue) -> Result<T, FieldError> {
    let mut deserializer = serde_json::Deserializer::from_str(raw.get());
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = error.inner().to_string();
        let code = if message.starts_with("unknown field") { ErrorCode::UnknownField } else { ErrorCode::InvalidType };
        // serde appends " at line 1 column 17"; the path already says where.
        let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
        FieldError::new(code, path, message)
    })
}

/// Parses a whole body as one JSON document of type `T`.
pub fn parse_document<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let raw: &RawValue = serde_json::from_slice(bytes).map_err(malformed)?;
    parse_item(raw).map_err(ApiError::from)
}
