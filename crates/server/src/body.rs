//! Request bodies: read with a size limit and parsed as JSON with errors that name the field.
//! One object or an array of objects is accepted wherever the vendors accept both; array items are
//! parsed one by one so that one bad item is reported without failing its neighbours.

use std::cell::Cell;
use std::fmt;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use roster_core::{ErrorCode, FieldError};
use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
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

/// Splits a body into at most `max_items` items without parsing their contents yet.
pub fn split_items(bytes: &[u8], max_items: usize) -> Result<Items<'_>, ApiError> {
    check_item_count(bytes, ItemsAt::Body, max_items)?;
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

/// Parses a body that must be a JSON array of at most `max_items` `T`s.
pub fn parse_array<T: DeserializeOwned>(bytes: &[u8], max_items: usize) -> Result<Vec<T>, ApiError> {
    check_item_count(bytes, ItemsAt::Body, max_items)?;
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

/// Where the items of a batch body are.
#[derive(Debug, Clone, Copy)]
pub enum ItemsAt {
    /// The body itself is the array (the native endpoints, Flagsmith's bulk traits).
    Body,
    /// One field of the body object holds the array (`batch`, `data`).
    Field(&'static str),
}

/// Refuses a body with more than `max_items` items before any item is parsed: items are skipped
/// without being built, and counting stops at the first one over the limit, so a body of a million
/// items costs what `max_items + 1` of them cost. A body that is not valid JSON, or has no array
/// where the items should be, passes: the parser that follows reports it in its own words.
pub fn check_item_count(bytes: &[u8], items_at: ItemsAt, max_items: usize) -> Result<(), ApiError> {
    let exceeded = Cell::new(false);
    let counter = ItemCounter { max_items, exceeded: &exceeded };
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    // Only the flag matters: any other error is the real parser's to report.
    let _ = match items_at {
        ItemsAt::Body => counter.deserialize(&mut deserializer),
        ItemsAt::Field(field) => FieldItemCounter { field, counter }.deserialize(&mut deserializer),
    };
    if !exceeded.get() {
        return Ok(());
    }
    let location = match items_at {
        ItemsAt::Body => "the request body".to_owned(),
        ItemsAt::Field(field) => format!("`{field}`"),
    };
    Err(too_many_items(&location, max_items))
}

/// The answer to a batch over the item limit.
pub fn too_many_items(location: &str, max_items: usize) -> ApiError {
    ApiError::new(
        ErrorCode::TooManyItems,
        format!("{location} holds more than the limit of {max_items} items per request; send smaller batches"),
    )
}

/// Counts the items of an array (skipping each), failing as soon as there is one too many.
#[derive(Clone, Copy)]
struct ItemCounter<'flag> {
    max_items: usize,
    exceeded: &'flag Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for ItemCounter<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemCounter<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an array of items")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let mut count = 0usize;
        while items.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
            if count > self.max_items {
                self.exceeded.set(true);
                return Err(serde::de::Error::custom("too many items"));
            }
        }
        Ok(())
    }
}

/// Counts the items of the array in one field of the body object; other fields are skipped.
struct FieldItemCounter<'flag> {
    field: &'static str,
    counter: ItemCounter<'flag>,
}

impl<'de> DeserializeSeed<'de> for FieldItemCounter<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldItemCounter<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut fields: A) -> Result<(), A::Error> {
        // Owned keys: an escaped key (`"b\u0061tch"`) is still the field the real parser sees.
        while let Some(key) = fields.next_key::<String>()? {
            if key == self.field {
                fields.next_value_seed(self.counter)?;
            } else {
                fields.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}
