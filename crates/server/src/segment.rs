//! Segment's HTTP tracking API (also what RudderStack's and Customer.io Data Pipelines' clients
//! send): `/v1/identify`, `/v1/track`, `/v1/alias`, `/v1/page`, `/v1/screen`, `/v1/group`,
//! `/v1/batch`. A thin adapter: each message becomes the engine's identify, track or alias.
//!
//! Auth: HTTP Basic with the write key (our client or server key) as user, `writeKey` in the
//! body, `Authorization: Bearer`, or `X-API-Key`. Bodies may be gzip whatever the headers say.
//! Limits as Segment documents them: 32 KB per message, 500 KB per batch, answered 400.
//! Pages and screens are recorded as events named `page` and `screen` (with `name` and
//! `category` among the properties); a group call as an event `group` with `group_id` and the
//! group's traits.

use std::io::Read;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use roster_core::{ErrorCode, FieldError, Timestamp};
use roster_engine::{AliasInput, IdentifyInput, Principal, TrackInput};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::body::{ItemsAt, check_item_count};
use crate::error::ApiError;

/// Largest single message Segment accepts.
const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Largest batch Segment accepts.
const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Most bytes a gzip body may inflate to (beyond the batch limit is refused anyway).
const MAX_INFLATED_BYTES: u64 = 2 * MAX_BATCH_BYTES as u64;

/// One message as Segment's libraries send it. Unknown fields (`integrations`, ...) are ignored:
/// the SDKs send more than Roster keeps.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Message {
    #[serde(rename = "type")]
    kind: Option<String>,
    user_id: Option<Value>,
    anonymous_id: Option<Value>,
    previous_id: Option<Value>,
    group_id: Option<Value>,
    traits: Option<Map<String, Value>>,
    context: Option<Map<String, Value>>,
    properties: Option<Map<String, Value>>,
    event: Option<String>,
    name: Option<String>,
    category: Option<String>,
    timestamp: Option<String>,
    original_timestamp: Option<String>,
    sent_at: Option<String>,
    message_id: Option<String>,
    write_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Batch {
    batch: Vec<Box<serde_json::value::RawValue>>,
    sent_at: Option<String>,
    context: Option<Map<String, Value>>,
    write_key: Option<String>,
}

fn too_large(message: String) -> ApiError {
    let mut error = ApiError::new(ErrorCode::PayloadTooLarge, message);
    // Segment answers 400, which its libraries treat as "do not retry".
    error.status = StatusCode::BAD_REQUEST;
    error
}

/// The body, inflated when it is gzip (by its magic bytes, whatever the headers claim).
fn inflate(bytes: &Bytes) -> Result<Vec<u8>, ApiError> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes.to_vec());
    }
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .take(MAX_INFLATED_BYTES + 1)
        .read_to_end(&mut inflated)
        .map_err(|error| ApiError::new(ErrorCode::MalformedJson, format!("the gzip body is corrupt: {error}")))?;
    if inflated.len() as u64 > MAX_INFLATED_BYTES {
        return Err(too_large(format!("the body inflates past {MAX_INFLATED_BYTES} bytes")));
    }
    Ok(inflated)
}

/// The write key from the headers (Basic user, Bearer, X-API-Key) or the body.
fn write_key(headers: &HeaderMap, body_key: Option<&str>) -> Option<String> {
    if let Some((user, _)) = crate::auth::basic_credentials(headers) {
        return Some(user);
    }
    if let Some(authorization) = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok())
        && let Some(token) = authorization.strip_prefix("Bearer ").or_else(|| authorization.strip_prefix("bearer "))
    {
        return Some(token.trim().to_owned());
    }
    if let Some(key) =
        headers.get("x-api-key").and_then(|value| value.to_str().ok()).filter(|key| !key.trim().is_empty())
    {
        return Some(key.trim().to_owned());
    }
    body_key.map(str::to_owned)
}

fn authenticate(state: &AppState, headers: &HeaderMap, body_key: Option<&str>) -> Result<Principal, ApiError> {
    let key = write_key(headers, body_key).ok_or_else(|| {
        ApiError::new(
            ErrorCode::MissingApiKey,
            "send the write key as the HTTP Basic user, as a Bearer token, or as `writeKey`",
        )
    })?;
    state
        .engine
        .authenticate(&key)
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey, "the write key is not valid for any environment"))
}

/// An id Segment allows as string or number, as text.
fn id_text(value: Option<Value>, path: &str) -> Result<Option<String>, FieldError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(_) => Err(FieldError::new(ErrorCode::InvalidType, path, "must be a string or a number")),
    }
}

/// The message's time: `timestamp` (or `originalTimestamp`), corrected by the clock skew that
/// `sentAt` reveals (Segment's rule: received − (sentAt − timestamp)); `None` means "now".
fn message_time(
    message: &Message,
    batch_sent_at: Option<&str>,
    received_at: Timestamp,
) -> Result<Option<Timestamp>, FieldError> {
    let (field, text) = match (&message.timestamp, &message.original_timestamp) {
        (Some(text), _) => ("timestamp", text),
        (None, Some(text)) => ("originalTimestamp", text),
        (None, None) => return Ok(None),
    };
    let timestamp = Timestamp::parse_rfc3339(text, field)?;
    let sent_at = match message.sent_at.as_deref().or(batch_sent_at) {
        Some(text) => Timestamp::parse_rfc3339(text, "sentAt")?,
        None => return Ok(Some(timestamp)),
    };
    let skew = sent_at.as_micros().saturating_sub(received_at.as_micros());
    Ok(Some(Timestamp::from_micros(timestamp.as_micros().saturating_sub(skew))))
}

/// What one message asks the engine for.
enum Command {
    Identify(IdentifyInput),
    Track(TrackInput),
    Alias(AliasInput),
}

fn command(
    mut message: Message,
    kind: &str,
    batch: Option<&Batch>,
    received_at: Timestamp,
) -> Result<Command, FieldError> {
    if let (Some(batch_context), None) = (batch.and_then(|batch| batch.context.clone()), &message.context) {
        message.context = Some(batch_context);
    }
    let timestamp = message_time(&message, batch.and_then(|batch| batch.sent_at.as_deref()), received_at)?;
    let user_id = id_text(message.user_id.take(), "userId")?;
    let anonymous_id = id_text(message.anonymous_id.take(), "anonymousId")?;
    let message_id = message.message_id.take();
    Ok(match kind {
        "identify" => {
            let context_traits =
                message.context.as_ref().and_then(|context| context.get("traits")).and_then(Value::as_object).cloned();
            Command::Identify(IdentifyInput {
                user_id,
                anonymous_id,
                traits: message.traits.or(context_traits).unwrap_or_default(),
                timestamp,
                message_id,
                context: message.context,
                ..IdentifyInput::default()
            })
        }
        "track" => Command::Track(TrackInput {
            user_id,
            anonymous_id,
            event: message.event,
            properties: message.properties.unwrap_or_default(),
            timestamp,
            message_id,
            ..TrackInput::default()
        }),
        "page" | "screen" => {
            let mut properties = message.properties.unwrap_or_default();
            if let Some(name) = message.name {
                properties.entry("name").or_insert(Value::String(name));
            }
            if let Some(category) = message.category {
                properties.entry("category").or_insert(Value::String(category));
            }
            Command::Track(TrackInput {
                user_id,
                anonymous_id,
                event: Some(kind.to_owned()),
                properties,
                timestamp,
                message_id,
                ..TrackInput::default()
            })
        }
        "group" => {
            let group_id = id_text(message.group_id.take(), "groupId")?.ok_or_else(|| {
                FieldError::new(ErrorCode::MissingIdentifier, "groupId", "a group call needs `groupId`")
            })?;
            let mut properties = Map::new();
            properties.insert("group_id".into(), Value::String(group_id));
            properties.insert("traits".into(), Value::Object(message.traits.unwrap_or_default()));
            Command::Track(TrackInput {
                user_id,
                anonymous_id,
                event: Some("group".into()),
                properties,
                timestamp,
                message_id,
                ..TrackInput::default()
            })
        }
        "alias" => Command::Alias(AliasInput {
            previous_id: id_text(message.previous_id.take(), "previousId")?,
            user_id,
            timestamp,
            message_id,
            ..AliasInput::default()
        }),
        other => {
            return Err(FieldError::new(
                ErrorCode::InvalidType,
                "type",
                format!("`{other}` is not a message type (identify, track, page, screen, group, alias)"),
            ));
        }
    })
}

/// Applies the messages in order (consecutive ones of one kind in one engine call); the first
/// rejection, with its path, is the answer.
async fn apply(state: &AppState, principal: &Principal, commands: Vec<(String, Command)>) -> Result<(), ApiError> {
    let mut index = 0;
    while index < commands.len() {
        let start = index;
        let same_kind =
            |command: &Command, first: &Command| std::mem::discriminant(command) == std::mem::discriminant(first);
        while index < commands.len() && same_kind(&commands[index].1, &commands[start].1) {
            index += 1;
        }
        let run = &commands[start..index];
        let failures: Vec<Option<FieldError>> = match &run[0].1 {
            Command::Identify(_) => {
                let inputs = run
                    .iter()
                    .filter_map(|(_, command)| match command {
                        Command::Identify(input) => Some(Ok(input.clone())),
                        _ => None,
                    })
                    .collect();
                state.engine.identify(principal, inputs).await?.into_iter().map(Result::err).collect()
            }
            Command::Track(_) => {
                let inputs = run
                    .iter()
                    .filter_map(|(_, command)| match command {
                        Command::Track(input) => Some(Ok(input.clone())),
                        _ => None,
                    })
                    .collect();
                state.engine.track(principal, inputs).await?.into_iter().map(Result::err).collect()
            }
            Command::Alias(_) => {
                let inputs = run
                    .iter()
                    .filter_map(|(_, command)| match command {
                        Command::Alias(input) => Some(Ok(input.clone())),
                        _ => None,
                    })
                    .collect();
                state.engine.alias(principal, inputs).await?.into_iter().map(Result::err).collect()
            }
        };
        if let Some((failure, (path, _))) =
            failures.into_iter().zip(run).find_map(|(failure, item)| failure.map(|failure| (failure, item)))
        {
            return Err(failure.prefixed(path).into());
        }
    }
    Ok(())
}

fn parse_message(raw: &str, path: &str) -> Result<Message, ApiError> {
    if raw.len() > MAX_MESSAGE_BYTES {
        return Err(too_large(format!(
            "{path} is {} bytes; Segment's limit is {MAX_MESSAGE_BYTES} bytes per message",
            raw.len()
        )));
    }
    let mut deserializer = serde_json::Deserializer::from_str(raw);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let message = error.inner().to_string();
        let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
        FieldError::new(ErrorCode::InvalidType, error.path().to_string(), message).prefixed(path).into()
    })
}

async fn single(
    state: AppState,
    headers: HeaderMap,
    bytes: Bytes,
    kind: &'static str,
) -> Result<Json<Value>, ApiError> {
    let body = inflate(&bytes)?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::new(ErrorCode::MalformedJson, "the body is not UTF-8"))?;
    if serde_json::from_str::<&serde_json::value::RawValue>(text).is_err() {
        return Err(ApiError::new(ErrorCode::MalformedJson, "the body is not valid JSON"));
    }
    let message = parse_message(text, "")?;
    let principal = authenticate(&state, &headers, message.write_key.as_deref())?;
    let command = command(message, kind, None, now())?;
    apply(&state, &principal, vec![(String::new(), command)]).await?;
    Ok(Json(json!({ "success": true })))
}

/// `POST /v1/batch` `{"batch": [...], "sentAt": ...}`.
pub async fn batch(State(state): State<AppState>, headers: HeaderMap, bytes: Bytes) -> Result<Json<Value>, ApiError> {
    let body = inflate(&bytes)?;
    if body.len() > MAX_BATCH_BYTES {
        return Err(too_large(format!(
            "the batch is {} bytes; Segment's limit is {MAX_BATCH_BYTES} bytes",
            body.len()
        )));
    }
    check_item_count(&body, ItemsAt::Field("batch"), state.config.max_batch_items).map_err(|mut error| {
        // As for its size limits, Segment answers 400, which its libraries treat as final.
        error.status = StatusCode::BAD_REQUEST;
        error
    })?;
    let batch: Batch = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(ErrorCode::MalformedJson, format!("the body is not a Segment batch: {error}"))
    })?;
    let received_at = now();
    let mut messages = Vec::with_capacity(batch.batch.len());
    for (index, raw) in batch.batch.iter().enumerate() {
        let path = format!("batch[{index}]");
        let message = parse_message(raw.get(), &path)?;
        messages.push((path, message));
    }
    let body_key =
        batch.write_key.clone().or_else(|| messages.iter().find_map(|(_, message)| message.write_key.clone()));
    let principal = authenticate(&state, &headers, body_key.as_deref())?;
    let mut commands = Vec::with_capacity(messages.len());
    for (path, message) in messages {
        let kind = message.kind.clone().ok_or_else(|| {
            ApiError::from(FieldError::new(
                ErrorCode::InvalidType,
                format!("{path}.type"),
                "each batch message needs `type`",
            ))
        })?;
        commands.push((
            path.clone(),
            command(message, &kind, Some(&batch), received_at).map_err(|error| error.prefixed(&path))?,
        ));
    }
    apply(&state, &principal, commands).await?;
    Ok(Json(json!({ "success": true })))
}

pub async fn identify(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    single(state, headers, bytes, "identify").await
}

pub async fn track(State(state): State<AppState>, headers: HeaderMap, bytes: Bytes) -> Result<Json<Value>, ApiError> {
    single(state, headers, bytes, "track").await
}

pub async fn alias(State(state): State<AppState>, headers: HeaderMap, bytes: Bytes) -> Result<Json<Value>, ApiError> {
    single(state, headers, bytes, "alias").await
}

pub async fn page(State(state): State<AppState>, headers: HeaderMap, bytes: Bytes) -> Result<Json<Value>, ApiError> {
    single(state, headers, bytes, "page").await
}

pub async fn screen(State(state): State<AppState>, headers: HeaderMap, bytes: Bytes) -> Result<Json<Value>, ApiError> {
    single(state, headers, bytes, "screen").await
}

pub async fn group(State(state): State<AppState>, headers: HeaderMap, bytes: Bytes) -> Result<Json<Value>, ApiError> {
    single(state, headers, bytes, "group").await
}

fn now() -> Timestamp {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros())
        .unwrap_or_default();
    Timestamp::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}
