//! Identity-graph management (server key): explicit merges, identifier changes, erasure,
//! suppression, devices. Thin: parse, call the engine, render.

use axum::Json;
use axum::extract::{Path, State};
use roster_core::{ErrorCode, FieldError, IdentifierKind};
use roster_engine::ProfileSelector;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::AppState;
use crate::auth::Caller;
use crate::body::{Body, parse_document};
use crate::error::ApiError;
use crate::profiles::{ProfileResponse, environment_slug};

/// Names one profile: exactly one of `profile_id`, `user_id`, `email`, `anonymous_id`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorBody {
    profile_id: Option<String>,
    user_id: Option<String>,
    email: Option<String>,
    anonymous_id: Option<String>,
}

impl SelectorBody {
    fn into_selector(self, path: &str) -> Result<ProfileSelector, FieldError> {
        let named: Vec<ProfileSelector> = [
            self.profile_id.map(ProfileSelector::ProfileId),
            self.user_id.map(|value| ProfileSelector::Identifier(IdentifierKind::UserId, value)),
            self.email.map(|value| ProfileSelector::Identifier(IdentifierKind::Email, value)),
            self.anonymous_id.map(|value| ProfileSelector::Identifier(IdentifierKind::AnonymousId, value)),
        ]
        .into_iter()
        .flatten()
        .collect();
        match <[ProfileSelector; 1]>::try_from(named) {
            Ok([selector]) => Ok(selector),
            Err(_) => Err(FieldError::new(
                ErrorCode::InvalidType,
                path,
                "name the profile with exactly one of `profile_id`, `user_id`, `email`, `anonymous_id`",
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeRequest {
    primary: SelectorBody,
    secondary: SelectorBody,
}

#[derive(Debug, Serialize)]
pub struct IdentifierResponse {
    pub kind: &'static str,
    pub value: String,
}

#[derive(Debug, Serialize)]
pub struct MergeResponse {
    pub profile_id: String,
    pub merged_profile_id: String,
    pub moved_identifiers: Vec<IdentifierResponse>,
    pub changed_traits: Vec<String>,
}

/// `POST /v1/profiles/merge` `{"primary": {…}, "secondary": {…}}`.
pub async fn merge(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<Json<MergeResponse>, ApiError> {
    let request: MergeRequest = parse_document(&bytes)?;
    let primary = request.primary.into_selector("primary")?;
    let secondary = request.secondary.into_selector("secondary")?;
    let outcome = state.engine.merge(&principal, primary, secondary).await?;
    Ok(Json(MergeResponse {
        profile_id: outcome.profile_id,
        merged_profile_id: outcome.merged_profile_id,
        moved_identifiers: outcome
            .moved_identifiers
            .into_iter()
            .map(|(kind, value)| IdentifierResponse { kind: kind.as_str(), value })
            .collect(),
        changed_traits: outcome.changed_traits,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentifierChange {
    user_id: Option<String>,
    email: Option<String>,
}

/// `PATCH /v1/profiles/{profile_id}/identifiers` `{"user_id": …, "email": …}`.
pub async fn change_identifiers(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(profile_id): Path<String>,
    Body(bytes): Body,
) -> Result<Json<ProfileResponse>, ApiError> {
    let change: IdentifierChange = parse_document(&bytes)?;
    let profile = state.engine.change_identifiers(&principal, &profile_id, change.user_id, change.email).await?;
    Ok(Json(ProfileResponse::new(profile, &environment_slug(&principal))))
}

#[derive(Debug, Serialize)]
pub struct ErasedResponse {
    pub erased_profile_id: String,
}

/// `DELETE /v1/profiles/{profile_id}`.
pub async fn erase_by_id(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(profile_id): Path<String>,
) -> Result<Json<ErasedResponse>, ApiError> {
    let erased = state.engine.erase(&principal, ProfileSelector::ProfileId(profile_id)).await?;
    Ok(Json(ErasedResponse { erased_profile_id: erased }))
}

/// `POST /v1/profiles/erase` with a selector body (`user_id`, `email`, `anonymous_id` or `profile_id`).
pub async fn erase(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<Json<ErasedResponse>, ApiError> {
    let selector = parse_document::<SelectorBody>(&bytes)?.into_selector("")?;
    let erased = state.engine.erase(&principal, selector).await?;
    Ok(Json(ErasedResponse { erased_profile_id: erased }))
}

#[derive(Debug, Serialize)]
pub struct SuppressionResponse {
    pub user_id: String,
    pub suppressed: bool,
}

/// `PUT /v1/suppressions/{user_id}`.
pub async fn suppress(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(user_id): Path<String>,
) -> Result<Json<SuppressionResponse>, ApiError> {
    state.engine.set_suppressed(&principal, &user_id, true).await?;
    Ok(Json(SuppressionResponse { user_id, suppressed: true }))
}

/// `DELETE /v1/suppressions/{user_id}`.
pub async fn unsuppress(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(user_id): Path<String>,
) -> Result<Json<SuppressionResponse>, ApiError> {
    state.engine.set_suppressed(&principal, &user_id, false).await?;
    Ok(Json(SuppressionResponse { user_id, suppressed: false }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceBody {
    platform: Option<String>,
    attributes: Option<Map<String, Value>>,
    last_status: Option<String>,
}

/// `PUT /v1/profiles/{profile_id}/devices/{token}` `{"platform", "attributes", "last_status"}`:
/// registers the token to this profile (moving it from another) and patches its attributes.
pub async fn put_device(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((profile_id, token)): Path<(String, String)>,
    Body(bytes): Body,
) -> Result<Json<ProfileResponse>, ApiError> {
    let device: DeviceBody =
        if bytes.iter().all(u8::is_ascii_whitespace) { DeviceBody::default() } else { parse_document(&bytes)? };
    let profile = state
        .engine
        .put_device(
            &principal,
            &profile_id,
            &token,
            device.platform,
            device.attributes.unwrap_or_default(),
            device.last_status,
        )
        .await?;
    Ok(Json(ProfileResponse::new(profile, &environment_slug(&principal))))
}

/// `DELETE /v1/profiles/{profile_id}/devices/{token}`.
pub async fn delete_device(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((profile_id, token)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    state.engine.delete_device(&principal, &profile_id, &token).await?;
    Ok(Json(serde_json::json!({ "deleted": token })))
}
