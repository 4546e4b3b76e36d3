//! Customer.io's Track API (`/api/v1/customers/…`, `/api/v1/events`, `/api/v1/merge_customers`):
//! a thin adapter onto identify, track, erase, devices, suppression and merge. HTTP Basic
//! `site_id:api_key` where the api key is the environment's server key (Customer.io's Track
//! keys are secret too); the site id is not checked.
//!
//! A customer identifier is a user id, an email (when it contains `@`: the profile holding that
//! email, else a new one whose user id is the email), or `cio_<profile id>`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use roster_core::{ErrorCode, FieldError, IdentifierKind, Timestamp};
use roster_engine::{IdentifyInput, Principal, ProfileSelector, TrackInput};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::auth::basic_credentials;
use crate::body::{Body, ItemsAt, check_item_count, parse_document};
use crate::error::ApiError;

fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let (_site_id, api_key) = basic_credentials(headers).ok_or_else(|| {
        ApiError::new(ErrorCode::MissingApiKey, "send HTTP Basic `site_id:api_key` with the environment's server key")
    })?;
    let principal = state
        .engine
        .authenticate(&api_key)
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey, "the API key is not valid for any environment"))?;
    // Customer.io's Track API keys are secret: only the server key speaks this API.
    if !matches!(principal, Principal::Server(_)) {
        return Err(ApiError::new(ErrorCode::Forbidden, "Customer.io's Track API takes the environment's server key"));
    }
    Ok(principal)
}

/// The profile a customer identifier names, as a selector.
fn selector(identifier: &str) -> ProfileSelector {
    if let Some(profile_id) = identifier.strip_prefix("cio_") {
        return ProfileSelector::ProfileId(profile_id.to_owned());
    }
    if identifier.contains('@') {
        return ProfileSelector::Identifier(IdentifierKind::Email, identifier.to_owned());
    }
    ProfileSelector::Identifier(IdentifierKind::UserId, identifier.to_owned())
}

/// The user id to write under for a customer identifier: the id itself, the user id of the
/// profile holding an email or profile id, or (an email nobody holds yet) the email.
async fn user_id_for(state: &AppState, principal: &Principal, identifier: &str) -> Result<String, ApiError> {
    let profile = match selector(identifier) {
        ProfileSelector::Identifier(IdentifierKind::UserId, user_id) => return Ok(user_id),
        ProfileSelector::ProfileId(profile_id) => Some(state.engine.profile(principal, &profile_id).await?),
        ProfileSelector::Identifier(kind, value) => state.engine.profile_by_identifier(principal, kind, &value).await?,
    };
    match profile {
        Some(profile) => profile.user_id.ok_or_else(|| {
            ApiError::from(FieldError::new(
                ErrorCode::NotFound,
                "identifier",
                format!("`{identifier}` names a profile without a user id; identify it by id first"),
            ))
        }),
        None if identifier.starts_with("cio_") => Err(ApiError::not_found(format!("no customer `{identifier}`"))),
        None => Ok(identifier.to_owned()),
    }
}

fn ok() -> Json<Value> {
    Json(json!({}))
}

/// `PUT /api/v1/customers/{identifier}`: the body's attributes become traits; `anonymous_id`
/// links that anonymous activity to the customer.
pub async fn put_customer(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(identifier): Path<String>,
    Body(bytes): Body,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(&state, &headers)?;
    let attributes: Map<String, Value> = parse_document(&bytes)?;
    identify_customer(&state, &principal, &identifier, attributes).await?;
    Ok(ok())
}

/// Stores a customer's attributes as traits; `anonymous_id` among them links that activity.
async fn identify_customer(
    state: &AppState,
    principal: &Principal,
    identifier: &str,
    mut attributes: Map<String, Value>,
) -> Result<(), ApiError> {
    let anonymous_id = match attributes.remove("anonymous_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(anonymous_id)) => Some(anonymous_id),
        Some(_) => return Err(FieldError::new(ErrorCode::InvalidType, "anonymous_id", "must be a string").into()),
    };
    for ignored in ["id", "cio_id", "_update"] {
        attributes.remove(ignored);
    }
    let user_id = user_id_for(state, principal, identifier).await?;
    if identifier.contains('@') && !attributes.contains_key("email") {
        attributes.insert("email".into(), Value::String(identifier.to_owned()));
    }
    let input = IdentifyInput { user_id: Some(user_id), anonymous_id, traits: attributes, ..IdentifyInput::default() };
    state.engine.identify(principal, vec![Ok(input)]).await?.remove(0).map_err(|error| error.prefixed_traits())?;
    Ok(())
}

/// `DELETE /api/v1/customers/{identifier}`: erases the customer.
pub async fn delete_customer(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(identifier): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(&state, &headers)?;
    state.engine.erase(&principal, selector(&identifier)).await?;
    Ok(ok())
}

#[derive(Debug, Deserialize)]
struct EventBody {
    name: Option<String>,
    #[serde(default)]
    data: Map<String, Value>,
    /// Customer.io's event id: deduplicates resends.
    id: Option<String>,
    /// Unix seconds.
    timestamp: Option<i64>,
    anonymous_id: Option<String>,
}

fn event_input(body: EventBody, user_id: Option<String>) -> TrackInput {
    TrackInput {
        user_id,
        anonymous_id: body.anonymous_id,
        event: body.name,
        properties: body.data,
        timestamp: body.timestamp.map(|seconds| Timestamp::from_micros(seconds.saturating_mul(1_000_000))),
        message_id: body.id,
        ..TrackInput::default()
    }
}

async fn track(state: &AppState, principal: &Principal, input: TrackInput) -> Result<Json<Value>, ApiError> {
    state.engine.track(principal, vec![Ok(input)]).await?.remove(0)?;
    Ok(ok())
}

/// `POST /api/v1/customers/{identifier}/events` `{"name", "data", "id", "timestamp"}`.
pub async fn customer_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(identifier): Path<String>,
    Body(bytes): Body,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(&state, &headers)?;
    let body: EventBody = parse_document(&bytes)?;
    let user_id = user_id_for(&state, &principal, &identifier).await?;
    track(&state, &principal, event_input(body, Some(user_id))).await
}

/// `POST /api/v1/events` `{"name", "anonymous_id", "data"}`: an anonymous event.
pub async fn anonymous_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(bytes): Body,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(&state, &headers)?;
    let body: EventBody = parse_document(&bytes)?;
    track(&state, &principal, event_input(body, None)).await
}

#[derive(Debug, Deserialize)]
struct DeviceBody {
    device: Map<String, Value>,
}

/// The profile id a customer identifier names (404 when none).
async fn profile_id_for(state: &AppState, principal: &Principal, identifier: &str) -> Result<String, ApiError> {
    let profile = match selector(identifier) {
        ProfileSelector::ProfileId(profile_id) => Some(state.engine.profile(principal, &profile_id).await?),
        ProfileSelector::Identifier(kind, value) => state.engine.profile_by_identifier(principal, kind, &value).await?,
    };
    profile.map(|profile| profile.profile_id).ok_or_else(|| ApiError::not_found(format!("no customer `{identifier}`")))
}

/// `PUT /api/v1/customers/{identifier}/devices` `{"device": {"id", "platform", "last_used", ...}}`.
pub async fn put_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(identifier): Path<String>,
    Body(bytes): Body,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(&state, &headers)?;
    let DeviceBody { mut device } = parse_document(&bytes)?;
    let token = match device.remove("id") {
        Some(Value::String(token)) if !token.is_empty() => token,
        _ => {
            return Err(
                FieldError::new(ErrorCode::MissingIdentifier, "device.id", "the device token is required").into()
            );
        }
    };
    let platform = match device.remove("platform") {
        Some(Value::String(platform)) => Some(platform),
        None | Some(Value::Null) => None,
        Some(_) => return Err(FieldError::new(ErrorCode::InvalidType, "device.platform", "must be a string").into()),
    };
    device.remove("last_used");
    let mut attributes = match device.remove("attributes") {
        Some(Value::Object(attributes)) => attributes,
        _ => Map::new(),
    };
    attributes.extend(device);
    let profile_id = profile_id_for(&state, &principal, &identifier).await?;
    state.engine.put_device(&principal, &profile_id, &token, platform, attributes, None).await?;
    Ok(ok())
}

/// `DELETE /api/v1/customers/{identifier}/devices/{token}`.
pub async fn delete_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((identifier, token)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(&state, &headers)?;
    let profile_id = profile_id_for(&state, &principal, &identifier).await?;
    state.engine.delete_device(&principal, &profile_id, &token).await?;
    Ok(ok())
}

async fn set_suppressed(
    state: &AppState,
    headers: &HeaderMap,
    identifier: &str,
    suppressed: bool,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(state, headers)?;
    let user_id = user_id_for(state, &principal, identifier).await?;
    state.engine.set_suppressed(&principal, &user_id, suppressed).await?;
    Ok(ok())
}

/// `POST /api/v1/customers/{identifier}/suppress`.
pub async fn suppress(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(identifier): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_suppressed(&state, &headers, &identifier, true).await
}

/// `POST /api/v1/customers/{identifier}/unsuppress`.
pub async fn unsuppress(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(identifier): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_suppressed(&state, &headers, &identifier, false).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomerRef {
    id: Option<String>,
    email: Option<String>,
    cio_id: Option<String>,
}

impl CustomerRef {
    fn into_selector(self, path: &str) -> Result<ProfileSelector, FieldError> {
        match (self.id, self.email, self.cio_id) {
            (Some(id), None, None) => Ok(ProfileSelector::Identifier(IdentifierKind::UserId, id)),
            (None, Some(email), None) => Ok(ProfileSelector::Identifier(IdentifierKind::Email, email)),
            (None, None, Some(cio_id)) => Ok(ProfileSelector::ProfileId(cio_id)),
            _ => Err(FieldError::new(
                ErrorCode::InvalidType,
                path,
                "name the customer with one of `id`, `email`, `cio_id`",
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeBody {
    primary: CustomerRef,
    secondary: CustomerRef,
}

/// `POST /api/v1/merge_customers` `{"primary": {"id"|"email"|"cio_id"}, "secondary": {...}}`.
pub async fn merge_customers(
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(bytes): Body,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(&state, &headers)?;
    let body: MergeBody = parse_document(&bytes)?;
    let primary = body.primary.into_selector("primary")?;
    let secondary = body.secondary.into_selector("secondary")?;
    state.engine.merge(&principal, primary, secondary).await?;
    Ok(ok())
}

trait PrefixTraits {
    /// Customer.io's attributes are the body itself: `traits.plan` is `plan` there.
    fn prefixed_traits(self) -> ApiError;
}

impl PrefixTraits for FieldError {
    fn prefixed_traits(mut self) -> ApiError {
        if let Some(rest) = self.path.strip_prefix("traits.") {
            self.path = rest.to_owned();
        }
        self.into()
    }
}

/// One operation of `/api/v2/batch` (Customer.io's Track v2 shape, `type: "person"`).
#[derive(Debug, Deserialize)]
struct BatchOperation {
    #[serde(rename = "type")]
    kind: String,
    action: String,
    identifiers: Option<CustomerRef>,
    #[serde(default)]
    attributes: Map<String, Value>,
    name: Option<String>,
    id: Option<String>,
    timestamp: Option<i64>,
    device: Option<Map<String, Value>>,
    primary: Option<CustomerRef>,
    secondary: Option<CustomerRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    batch: Vec<BatchOperation>,
}

impl CustomerRef {
    /// The identifier as the v1 paths spell it.
    fn as_path(&self) -> Option<String> {
        match (&self.id, &self.email, &self.cio_id) {
            (Some(id), None, None) => Some(id.clone()),
            (None, Some(email), None) => Some(email.clone()),
            (None, None, Some(cio_id)) => Some(format!("cio_{cio_id}")),
            _ => None,
        }
    }
}

/// `POST /api/v2/batch` `{"batch": [{"type": "person", "action", "identifiers", ...}]}`: person
/// operations applied in order (identify, event, delete, add_device, delete_device, suppress,
/// unsuppress, merge). The first one refused answers 400 naming it; those before it stay applied.
pub async fn batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(bytes): Body,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(&state, &headers)?;
    check_item_count(&bytes, ItemsAt::Field("batch"), state.config.max_batch_items)?;
    let body: BatchBody = parse_document(&bytes)?;
    for (index, operation) in body.batch.into_iter().enumerate() {
        let path = format!("batch[{index}]");
        apply_operation(&state, &principal, operation).await.map_err(|mut error| {
            let inner = error.body.path.take().unwrap_or_default();
            error.body.path = Some(roster_core::error::join_path(&path, &inner));
            error
        })?;
    }
    Ok(ok())
}

async fn apply_operation(state: &AppState, principal: &Principal, operation: BatchOperation) -> Result<(), ApiError> {
    if operation.kind != "person" {
        return Err(FieldError::new(ErrorCode::InvalidType, "type", "only `person` operations are supported").into());
    }
    if operation.action == "merge" {
        let primary = operation.primary.ok_or_else(|| {
            ApiError::from(FieldError::new(ErrorCode::MissingIdentifier, "primary", "a merge needs `primary`"))
        })?;
        let secondary = operation.secondary.ok_or_else(|| {
            ApiError::from(FieldError::new(ErrorCode::MissingIdentifier, "secondary", "a merge needs `secondary`"))
        })?;
        state.engine.merge(principal, primary.into_selector("primary")?, secondary.into_selector("secondary")?).await?;
        return Ok(());
    }
    let identifier = operation.identifiers.as_ref().and_then(CustomerRef::as_path).ok_or_else(|| {
        ApiError::from(FieldError::new(
            ErrorCode::InvalidType,
            "identifiers",
            "name the person with one of `id`, `email`, `cio_id`",
        ))
    })?;
    match operation.action.as_str() {
        "identify" => identify_customer(state, principal, &identifier, operation.attributes).await?,
        "event" => {
            let user_id = user_id_for(state, principal, &identifier).await?;
            let body = EventBody {
                name: operation.name,
                data: operation.attributes,
                id: operation.id,
                timestamp: operation.timestamp,
                anonymous_id: None,
            };
            state.engine.track(principal, vec![Ok(event_input(body, Some(user_id)))]).await?.remove(0)?;
        }
        "delete" => {
            state.engine.erase(principal, selector(&identifier)).await?;
        }
        "add_device" | "delete_device" => {
            let mut device = operation.device.unwrap_or_default();
            let token = match device.remove("token").or_else(|| device.remove("id")) {
                Some(Value::String(token)) if !token.is_empty() => token,
                _ => {
                    return Err(FieldError::new(
                        ErrorCode::MissingIdentifier,
                        "device.token",
                        "the device token is required",
                    )
                    .into());
                }
            };
            let profile_id = profile_id_for(state, principal, &identifier).await?;
            if operation.action == "delete_device" {
                state.engine.delete_device(principal, &profile_id, &token).await?;
            } else {
                let platform = device.remove("platform").and_then(|platform| platform.as_str().map(str::to_owned));
                device.remove("last_used");
                let mut attributes = match device.remove("attributes") {
                    Some(Value::Object(attributes)) => attributes,
                    _ => Map::new(),
                };
                attributes.extend(device);
                state.engine.put_device(principal, &profile_id, &token, platform, attributes, None).await?;
            }
        }
        "suppress" | "unsuppress" => {
            let user_id = user_id_for(state, principal, &identifier).await?;
            state.engine.set_suppressed(principal, &user_id, operation.action == "suppress").await?;
        }
        other => {
            return Err(FieldError::new(
                ErrorCode::InvalidType,
                "action",
                format!("`{other}` is not a supported person action"),
            )
            .into());
        }
    }
    Ok(())
}
