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
use axum::http::{HeaderMap, StatusCode, Uri, header};
use roster_core::{ErrorCode, FieldError, Timestamp};
use roster_engine::{AliasInput, IdentifyInput, Principal, RefusedMessage, TrackInput};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::body::{ItemsAt, check_item_count};
use crate::error::{ApiError, MAX_LISTED_REJECTIONS, PublicError};

/// The dialect's name in the rejections log.
const DIALECT: &str = "segment";

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
    let principal = state
        .engine
        .authenticate(&key)
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey, "the write key is not valid for any environment"))?;
    crate::auth::check_origin(&principal, headers)?;
    Ok(principal)
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
    /// A semantic event of Customer.io's Data Pipelines SDKs, acting on Roster's model.
    Semantic(SemanticEvent),
}

/// Customer.io Data Pipelines' semantic track events (its SDKs speak Segment's format).
enum SemanticEvent {
    /// `Device Created or Updated`: `context.device.token`/`type` and flattened context as with
    /// any identify, custom attributes from `properties`.
    DeviceUpserted { identify: IdentifyInput, attributes: Map<String, Value> },
    /// `Device Deleted`.
    DeviceDeleted { user_id: Option<String>, anonymous_id: Option<String>, token: String },
    /// `User Deleted`: the person is erased (server key).
    UserDeleted { user_id: String },
    /// `User Suppressed` / `User Unsuppressed` (server key).
    UserSuppressed { user_id: String, suppressed: bool },
}

/// The device token of a message's context, if it names one.
fn context_device_token(context: Option<&Map<String, Value>>) -> Option<String> {
    context?.get("device")?.get("token")?.as_str().map(str::to_owned)
}

/// A semantic event's command, or `None` for an ordinary event.
fn semantic_event(
    event: &str,
    user_id: &Option<String>,
    anonymous_id: &Option<String>,
    message: &mut Message,
    timestamp: Option<Timestamp>,
    message_id: &Option<String>,
) -> Result<Option<SemanticEvent>, FieldError> {
    let needs_user = |what: &str| {
        user_id.clone().ok_or_else(|| {
            FieldError::new(ErrorCode::MissingIdentifier, "userId", format!("`{what}` needs the person's `userId`"))
        })
    };
    Ok(Some(match event {
        "Device Created or Updated" => SemanticEvent::DeviceUpserted {
            identify: IdentifyInput {
                user_id: user_id.clone(),
                anonymous_id: anonymous_id.clone(),
                timestamp,
                message_id: message_id.clone(),
                context: message.context.clone(),
                ..IdentifyInput::default()
            },
            attributes: message.properties.take().unwrap_or_default(),
        },
        "Device Deleted" => SemanticEvent::DeviceDeleted {
            user_id: user_id.clone(),
            anonymous_id: anonymous_id.clone(),
            token: context_device_token(message.context.as_ref())
                .or_else(|| message.properties.as_ref()?.get("token").and_then(Value::as_str).map(str::to_owned))
                .ok_or_else(|| {
                    FieldError::new(
                        ErrorCode::MissingIdentifier,
                        "context.device.token",
                        "`Device Deleted` needs the device's token",
                    )
                })?,
        },
        "User Deleted" => SemanticEvent::UserDeleted { user_id: needs_user(event)? },
        "User Suppressed" => SemanticEvent::UserSuppressed { user_id: needs_user(event)?, suppressed: true },
        "User Unsuppressed" => SemanticEvent::UserSuppressed { user_id: needs_user(event)?, suppressed: false },
        _ => return Ok(None),
    }))
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
        "track" => {
            let event = message.event.clone().unwrap_or_default();
            if let Some(semantic) =
                semantic_event(&event, &user_id, &anonymous_id, &mut message, timestamp, &message_id)?
            {
                return Ok(Command::Semantic(semantic));
            }
            Command::Track(TrackInput {
                user_id,
                anonymous_id,
                event: message.event,
                properties: message.properties.unwrap_or_default(),
                timestamp,
                message_id,
                context: message.context,
                ..TrackInput::default()
            })
        }
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
                context: message.context,
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

/// Applies the commands in order (consecutive identifies, tracks or aliases in one engine call)
/// and answers each one's rejection, if any, in the same order.
async fn apply(
    state: &AppState,
    principal: &Principal,
    commands: Vec<Command>,
) -> Result<Vec<Option<FieldError>>, ApiError> {
    let mut failures = Vec::with_capacity(commands.len());
    let mut commands = commands.into_iter().peekable();
    while let Some(first) = commands.next() {
        match first {
            Command::Identify(input) => {
                let mut inputs = vec![Ok(input)];
                while let Some(Command::Identify(_)) = commands.peek() {
                    if let Some(Command::Identify(input)) = commands.next() {
                        inputs.push(Ok(input));
                    }
                }
                let results = state.engine.identify(principal, inputs).await?;
                failures.extend(results.into_iter().map(Result::err));
            }
            Command::Track(input) => {
                let mut inputs = vec![Ok(input)];
                while let Some(Command::Track(_)) = commands.peek() {
                    if let Some(Command::Track(input)) = commands.next() {
                        inputs.push(Ok(input));
                    }
                }
                let results = state.engine.track(principal, inputs).await?;
                failures.extend(results.into_iter().map(Result::err));
            }
            Command::Alias(input) => {
                let mut inputs = vec![Ok(input)];
                while let Some(Command::Alias(_)) = commands.peek() {
                    if let Some(Command::Alias(input)) = commands.next() {
                        inputs.push(Ok(input));
                    }
                }
                let results = state.engine.alias(principal, inputs).await?;
                failures.extend(results.into_iter().map(Result::err));
            }
            Command::Semantic(event) => failures.push(apply_semantic(state, principal, event).await?),
        }
    }
    Ok(failures)
}

/// One semantic event through the engine function each stands for; its rejection, if any.
async fn apply_semantic(
    state: &AppState,
    principal: &Principal,
    event: SemanticEvent,
) -> Result<Option<FieldError>, ApiError> {
    let engine = &state.engine;
    let outcome = match event {
        SemanticEvent::DeviceUpserted { identify, attributes } => {
            return Ok(engine.register_device_from_event(principal, identify, attributes).await?.err());
        }
        SemanticEvent::DeviceDeleted { user_id, anonymous_id, token } => {
            engine.delete_device_of_person(principal, user_id.as_deref(), anonymous_id.as_deref(), &token).await
        }
        SemanticEvent::UserDeleted { user_id } => {
            let selector = roster_engine::ProfileSelector::Identifier(roster_core::IdentifierKind::UserId, user_id);
            match engine.erase(principal, selector).await {
                // Erasing someone Roster never saw is done already.
                Err(roster_engine::EngineError::NotFound(_)) => Ok(()),
                other => other.map(|_| ()),
            }
        }
        SemanticEvent::UserSuppressed { user_id, suppressed } => {
            engine.set_suppressed(principal, &user_id, suppressed).await
        }
    };
    match outcome {
        Ok(()) => Ok(None),
        // A refusal of this message alone (a client key may not erase or suppress people).
        Err(roster_engine::EngineError::Forbidden(message)) => {
            Ok(Some(FieldError::new(ErrorCode::Forbidden, "", message)))
        }
        Err(roster_engine::EngineError::Invalid(rejection)) => Ok(Some(rejection)),
        Err(other) => Err(other.into()),
    }
}

/// One message, or its rejection (a message over Segment's 32 KB limit is refused alone).
fn parse_message(raw: &str, path: &str) -> Result<Message, FieldError> {
    if raw.len() > MAX_MESSAGE_BYTES {
        return Err(FieldError::new(
            ErrorCode::PayloadTooLarge,
            path,
            format!("is {} bytes; Segment's limit is {MAX_MESSAGE_BYTES} bytes per message", raw.len()),
        ));
    }
    if !raw.trim_start().starts_with('{') {
        return Err(FieldError::new(ErrorCode::InvalidType, path, "each message must be a JSON object"));
    }
    let mut deserializer = serde_json::Deserializer::from_str(raw);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let message = error.inner().to_string();
        let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
        let field = if error.path().to_string() == "." { String::new() } else { error.path().to_string() };
        FieldError::new(ErrorCode::InvalidType, field, message).prefixed(path)
    })
}

/// The `messageId` of a raw message, for the rejections log, when it can be read.
fn raw_message_id(raw: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct OnlyId {
        #[serde(rename = "messageId")]
        message_id: Option<String>,
    }
    serde_json::from_str::<OnlyId>(raw).ok()?.message_id
}

/// A refused message for the answer and the rejections log.
fn refusal(error: &FieldError, raw: &str) -> RefusedMessage {
    RefusedMessage {
        path: error.path.clone(),
        message_id: raw_message_id(raw),
        code: error.code.as_str().to_owned(),
        error: PublicError::from_field(error).message,
        payload: raw.to_owned(),
    }
}

async fn single(
    state: AppState,
    headers: HeaderMap,
    uri: Uri,
    bytes: Bytes,
    kind: &'static str,
) -> Result<Json<Value>, ApiError> {
    let body = inflate(&bytes)?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::new(ErrorCode::MalformedJson, "the body is not UTF-8"))?;
    if serde_json::from_str::<&serde_json::value::RawValue>(text).is_err() {
        return Err(ApiError::new(ErrorCode::MalformedJson, "the body is not valid JSON"));
    }
    let message = match parse_message(text, "") {
        Ok(message) => message,
        // Authenticated from the raw body, so the refusal reaches the right log.
        Err(rejection) => {
            if let Ok(principal) = authenticate(&state, &headers, raw_write_key(text).as_deref()) {
                let refused = vec![refusal(&rejection, text)];
                state.engine.record_rejections(&principal, DIALECT, uri.path(), refused).await;
            }
            return Err(single_refusal(rejection));
        }
    };
    let principal = authenticate(&state, &headers, message.write_key.as_deref())?;
    let outcome = match command(message, kind, None, now()) {
        Ok(command) => apply(&state, &principal, vec![command]).await?.into_iter().flatten().next(),
        Err(rejection) => Some(rejection),
    };
    if let Some(rejection) = outcome {
        state.engine.record_rejections(&principal, DIALECT, uri.path(), vec![refusal(&rejection, text)]).await;
        return Err(single_refusal(rejection));
    }
    Ok(Json(json!({ "success": true })))
}

/// A single message's refusal: 400 whatever the rule (Segment's libraries do not retry a 400).
fn single_refusal(rejection: FieldError) -> ApiError {
    let mut error = ApiError::from(rejection);
    if error.status == StatusCode::PAYLOAD_TOO_LARGE {
        error.status = StatusCode::BAD_REQUEST;
    }
    error
}

/// The `writeKey` of a raw body, when it can be read.
fn raw_write_key(raw: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct OnlyKey {
        #[serde(rename = "writeKey")]
        write_key: Option<String>,
    }
    serde_json::from_str::<OnlyKey>(raw).ok()?.write_key
}

/// `POST /v1/batch` (and analytics.js' `/v1/b`) `{"batch": [...], "sentAt": ...}`. The valid
/// messages are applied and each invalid one refused alone; the answer is 200, which Segment's
/// libraries take as "delivered" (they would drop a 400 anyway and never retry either), and
/// lists the refusals, which also go to the environment's rejections log.
pub async fn batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
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
    let mut refused: Vec<(usize, FieldError)> = Vec::new();
    let mut messages = Vec::with_capacity(batch.batch.len());
    for (index, raw) in batch.batch.iter().enumerate() {
        match parse_message(raw.get(), &format!("batch[{index}]")) {
            Ok(message) => messages.push((index, message)),
            Err(rejection) => refused.push((index, rejection)),
        }
    }
    let body_key =
        batch.write_key.clone().or_else(|| messages.iter().find_map(|(_, message)| message.write_key.clone()));
    let principal = authenticate(&state, &headers, body_key.as_deref())?;
    let mut commands = Vec::with_capacity(messages.len());
    let mut command_indexes = Vec::with_capacity(messages.len());
    for (index, message) in messages {
        let path = format!("batch[{index}]");
        let built = match message.kind.clone() {
            Some(kind) => command(message, &kind, Some(&batch), received_at).map_err(|error| error.prefixed(&path)),
            None => {
                Err(FieldError::new(ErrorCode::InvalidType, format!("{path}.type"), "each batch message needs `type`"))
            }
        };
        match built {
            Ok(command) => {
                commands.push(command);
                command_indexes.push(index);
            }
            Err(rejection) => refused.push((index, rejection)),
        }
    }
    let failures = apply(&state, &principal, commands).await?;
    for (index, failure) in command_indexes.into_iter().zip(failures) {
        if let Some(rejection) = failure {
            refused.push((index, rejection.prefixed(&format!("batch[{index}]"))));
        }
    }
    refused.sort_by_key(|(index, _)| *index);
    let accepted = batch.batch.len() - refused.len();
    if refused.is_empty() {
        return Ok(Json(json!({ "success": true })));
    }
    let listed: Vec<Value> = refused
        .iter()
        .take(MAX_LISTED_REJECTIONS)
        .map(|(index, rejection)| {
            let mut public = serde_json::to_value(PublicError::from_field(rejection)).unwrap_or_default();
            public["index"] = json!(index);
            public
        })
        .collect();
    let log = refused.iter().map(|(index, rejection)| refusal(rejection, batch.batch[*index].get())).collect();
    state.engine.record_rejections(&principal, DIALECT, uri.path(), log).await;
    Ok(Json(json!({
        "success": true,
        "accepted": accepted,
        "rejected": refused.len(),
        "rejections": listed,
    })))
}

/// One handler per single-message path (`/v1/identify`, `/v1/i`, ...), each the same call with
/// its message type.
macro_rules! single_message_handlers {
    ($($name:ident => $kind:literal),* $(,)?) => {$(
        #[doc = concat!("`POST /v1/", $kind, "`: one `", $kind, "` message.")]
        pub async fn $name(
            State(state): State<AppState>,
            headers: HeaderMap,
            uri: Uri,
            bytes: Bytes,
        ) -> Result<Json<Value>, ApiError> {
            single(state, headers, uri, bytes, $kind).await
        }
    )*};
}

single_message_handlers! {
    identify => "identify",
    track => "track",
    alias => "alias",
    page => "page",
    screen => "screen",
    group => "group",
}

fn now() -> Timestamp {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros())
        .unwrap_or_default();
    Timestamp::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}
