//! The native dialect (the seeds' shape, also what Altertable's SDKs send): `POST /identify` and
//! `POST /track` with one object or an array. A thin adapter: parse, hand to the engine, render
//! the results.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use roster_core::{ErrorCode, FieldError, Timestamp};
use roster_engine::{AliasInput, IdentifyInput, IdentifyOutcome, Principal, TrackInput, TrackOutcome};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::AppState;
use crate::auth::Caller;
use crate::body::{Body, parse_item, split_items};
use crate::error::{ApiError, MAX_LISTED_REJECTIONS, PublicError};
use crate::rejections::log_item_rejections;

/// The dialect's name in the rejections log.
const DIALECT: &str = "native";

/// One identify in the native shape. Unknown fields are refused so that a typo (`trait` for
/// `traits`) is an error, not silently ignored data.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NativeIdentify {
    distinct_id: Option<String>,
    user_id: Option<String>,
    anonymous_id: Option<String>,
    traits: Option<Map<String, Value>>,
    user_traits: Option<Map<String, Value>>,
    traits_set_once: Option<Map<String, Value>>,
    timestamp: Option<String>,
    /// The SDK's context; `context.device.token` registers a device.
    context: Option<Map<String, Value>>,
    /// A resend with the same id inside the dedup window is applied once.
    message_id: Option<String>,
    environment: Option<String>,
    /// Altertable's device id: the anonymous id when none is sent.
    device_id: Option<String>,
    /// Numbers added to numeric traits in the same write (a missing trait counts as 0).
    trait_increments: Option<Map<String, Value>>,
}

impl NativeIdentify {
    pub(crate) fn into_input(self) -> Result<IdentifyInput, FieldError> {
        let user_id = one_of(self.distinct_id, "distinct_id", self.user_id, "user_id")?;
        let traits = one_of(self.traits, "traits", self.user_traits, "user_traits")?.unwrap_or_default();
        let timestamp = match &self.timestamp {
            Some(text) => Some(Timestamp::parse_rfc3339(text, "timestamp")?),
            None => None,
        };
        Ok(IdentifyInput {
            user_id,
            anonymous_id: self.anonymous_id.or(self.device_id),
            traits,
            traits_set_once: self.traits_set_once.unwrap_or_default(),
            timestamp,
            environment: self.environment,
            message_id: self.message_id,
            context: self.context,
            trait_increments: self.trait_increments.unwrap_or_default(),
        })
    }
}

/// One alias in the native shape: `previous_id` now belongs to `distinct_id` (or `user_id`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeAlias {
    previous_id: Option<String>,
    distinct_id: Option<String>,
    user_id: Option<String>,
    /// Altertable's shape: `distinct_id` (the earlier id) now belongs to `new_user_id`.
    new_user_id: Option<String>,
    timestamp: Option<String>,
    message_id: Option<String>,
    environment: Option<String>,
    /// Accepted for compatibility.
    #[allow(dead_code)]
    context: Option<Map<String, Value>>,
}

impl NativeAlias {
    fn into_input(self) -> Result<AliasInput, FieldError> {
        let timestamp = match &self.timestamp {
            Some(text) => Some(Timestamp::parse_rfc3339(text, "timestamp")?),
            None => None,
        };
        if let Some(new_user_id) = self.new_user_id {
            return Ok(AliasInput {
                previous_id: one_of(self.previous_id, "previous_id", self.distinct_id, "distinct_id")?,
                user_id: Some(new_user_id),
                timestamp,
                environment: self.environment,
                message_id: self.message_id,
            });
        }
        Ok(AliasInput {
            previous_id: self.previous_id,
            user_id: one_of(self.distinct_id, "distinct_id", self.user_id, "user_id")?,
            timestamp,
            environment: self.environment,
            message_id: self.message_id,
        })
    }
}

/// One event in the native shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeTrack {
    event: Option<String>,
    distinct_id: Option<String>,
    user_id: Option<String>,
    anonymous_id: Option<String>,
    properties: Option<Map<String, Value>>,
    timestamp: Option<String>,
    /// A `device.token` in it refreshes that device's `last_used`.
    context: Option<Map<String, Value>>,
    message_id: Option<String>,
    environment: Option<String>,
    /// Altertable's device id: the anonymous id when none is sent.
    device_id: Option<String>,
}

impl NativeTrack {
    fn into_input(self) -> Result<TrackInput, FieldError> {
        let timestamp = match &self.timestamp {
            Some(text) => Some(Timestamp::parse_rfc3339(text, "timestamp")?),
            None => None,
        };
        Ok(TrackInput {
            user_id: one_of(self.distinct_id, "distinct_id", self.user_id, "user_id")?,
            anonymous_id: self.anonymous_id.or(self.device_id),
            event: self.event,
            properties: self.properties.unwrap_or_default(),
            timestamp,
            environment: self.environment,
            message_id: self.message_id,
            context: self.context,
        })
    }
}

/// Two spellings of one field: either may be sent, both only if equal.
fn one_of<T: PartialEq>(
    first: Option<T>,
    first_name: &str,
    second: Option<T>,
    second_name: &str,
) -> Result<Option<T>, FieldError> {
    match (first, second) {
        (Some(first), Some(second)) if first != second => Err(FieldError::new(
            ErrorCode::InvalidType,
            second_name,
            format!("`{first_name}` and `{second_name}` name the same field; send one of them"),
        )),
        (Some(value), _) | (None, Some(value)) => Ok(Some(value)),
        (None, None) => Ok(None),
    }
}

#[derive(Debug, Serialize)]
pub struct BatchResponse {
    pub accepted: usize,
    pub rejected: usize,
    /// Every accepted item, and the first `MAX_LISTED_REJECTIONS` rejected ones.
    pub results: Vec<ItemResponse>,
    /// Rejected items past the listed ones (absent when all are listed).
    #[serde(skip_serializing_if = "is_zero")]
    pub unlisted_rejections: usize,
    /// With unlisted rejections: every rejection counted by error code.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rejections_by_code: BTreeMap<&'static str, usize>,
    /// On any rejection, the first one, so every 4xx has the same top-level error fields.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub error: Option<PublicError>,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

#[derive(Debug, Serialize)]
pub struct ItemResponse {
    pub index: usize,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
    /// A resend of an already applied message id: nothing was written again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// The user id is suppressed: acknowledged, nothing was written.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub suppressed: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merged_profile_ids: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<WarningResponse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<PublicError>,
}

#[derive(Debug, Serialize)]
pub struct WarningResponse {
    pub code: &'static str,
    pub message: String,
}

/// `POST /identify`. `?sync=true` is accepted: every acknowledged write is already durable and
/// visible when the response is sent, so both modes answer after the commit.
pub async fn identify(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<Response, ApiError> {
    let items = split_items(&bytes, state.config.max_batch_items)?;
    let parsed: Vec<Result<NativeIdentify, FieldError>> = items.raw.iter().map(|raw| parse_item(raw)).collect();
    // Errors about the traits name the spelling the client sent.
    let sent_user_traits: Vec<bool> = parsed
        .iter()
        .map(|item| item.as_ref().is_ok_and(|item| item.traits.is_none() && item.user_traits.is_some()))
        .collect();
    let inputs = parsed.into_iter().map(|item| item.and_then(NativeIdentify::into_input)).collect();
    let mut results = state.engine.identify(&principal, inputs).await?;
    for (result, user_traits) in results.iter_mut().zip(sent_user_traits) {
        if let Err(rejection) = result
            && user_traits
            && let Some(rest) = rejection.path.strip_prefix("traits")
        {
            rejection.path = format!("user_traits{rest}");
            rejection.message = rejection.message.replace("`traits", "`user_traits");
        }
    }
    log_item_rejections(&state, &principal, DIALECT, "/identify", &results, &items.raw, |index| items.item_path(index))
        .await;
    let shown = OutcomeDetail::for_caller(&principal);
    Ok(batch_response(&results, |index| items.item_path(index), |index, outcome| identify_item(index, outcome, shown)))
}

/// `POST /alias`, one or an array: links `previous_id` to the user under identify's rules.
pub async fn alias(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<Response, ApiError> {
    let items = split_items(&bytes, state.config.max_batch_items)?;
    let inputs = items.raw.iter().map(|raw| parse_item::<NativeAlias>(raw).and_then(NativeAlias::into_input)).collect();
    let results = state.engine.alias(&principal, inputs).await?;
    log_item_rejections(&state, &principal, DIALECT, "/alias", &results, &items.raw, |index| items.item_path(index))
        .await;
    let shown = OutcomeDetail::for_caller(&principal);
    Ok(batch_response(&results, |index| items.item_path(index), |index, outcome| identify_item(index, outcome, shown)))
}

/// `POST /track`, one event or an array; same auth, limits and durability as identify.
pub async fn track(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<Response, ApiError> {
    let items = split_items(&bytes, state.config.max_batch_items)?;
    let inputs = items.raw.iter().map(|raw| parse_item::<NativeTrack>(raw).and_then(NativeTrack::into_input)).collect();
    let results = state.engine.track(&principal, inputs).await?;
    log_item_rejections(&state, &principal, DIALECT, "/track", &results, &items.raw, |index| items.item_path(index))
        .await;
    let shown = OutcomeDetail::for_caller(&principal);
    Ok(batch_response(&results, |index| items.item_path(index), |index, outcome| track_item(index, outcome, shown)))
}

/// How much of an identify's outcome the caller hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutcomeDetail {
    /// Server keys: whether the profile was new, what merged into it, whether the user id is
    /// suppressed.
    Full,
    /// Client keys (public): nothing that tells whether a user id is known, merged or suppressed,
    /// or anything about another profile — else a published key would answer "is this user
    /// registered?". Not even the profile id: ids are UUIDv7, which carry their creation time,
    /// and a suppressed person has none.
    Public,
}

impl OutcomeDetail {
    fn for_caller(principal: &Principal) -> Self {
        match principal {
            Principal::Client(_) => OutcomeDetail::Public,
            Principal::Server(_) | Principal::Admin => OutcomeDetail::Full,
        }
    }
}

fn identify_item(index: usize, outcome: &IdentifyOutcome, shown: OutcomeDetail) -> ItemResponse {
    let full = shown == OutcomeDetail::Full;
    if outcome.suppressed {
        return ItemResponse { suppressed: full, ..ItemResponse::accepted(index) };
    }
    ItemResponse {
        profile_id: full.then(|| outcome.profile_id.clone()),
        created: full.then_some(outcome.created),
        duplicate: outcome.duplicate,
        merged_profile_ids: if full { outcome.merged_profile_ids.clone() } else { Vec::new() },
        // The engine already left out what a client key may not hear of other profiles.
        warnings: outcome
            .warnings
            .iter()
            .map(|warning| WarningResponse { code: warning.code(), message: warning.message() })
            .collect(),
        ..ItemResponse::accepted(index)
    }
}

fn track_item(index: usize, outcome: &TrackOutcome, shown: OutcomeDetail) -> ItemResponse {
    let full = shown == OutcomeDetail::Full;
    if outcome.suppressed {
        return ItemResponse { suppressed: full, ..ItemResponse::accepted(index) };
    }
    ItemResponse {
        profile_id: full.then(|| outcome.profile_id.clone()),
        event_id: full.then(|| outcome.event_id.clone()),
        duplicate: outcome.duplicate,
        ..ItemResponse::accepted(index)
    }
}

impl ItemResponse {
    fn accepted(index: usize) -> Self {
        ItemResponse {
            index,
            status: "accepted",
            profile_id: None,
            event_id: None,
            created: None,
            duplicate: false,
            suppressed: false,
            merged_profile_ids: Vec::new(),
            warnings: Vec::new(),
            error: None,
        }
    }
}

/// Renders per-item results: 200 when all were applied, 400 when any was rejected (the applied
/// ones stay applied and are listed as such).
pub fn batch_response<T>(
    results: &[Result<T, FieldError>],
    item_path: impl Fn(usize) -> String,
    render: impl Fn(usize, &T) -> ItemResponse,
) -> Response {
    let mut response = BatchResponse {
        accepted: 0,
        rejected: 0,
        results: Vec::with_capacity(results.len().min(MAX_LISTED_REJECTIONS)),
        unlisted_rejections: 0,
        rejections_by_code: BTreeMap::new(),
        error: None,
    };
    let mut rejections_by_code: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (index, result) in results.iter().enumerate() {
        let item = match result {
            Ok(outcome) => {
                response.accepted += 1;
                render(index, outcome)
            }
            Err(rejection) => {
                response.rejected += 1;
                *rejections_by_code.entry(rejection.code.as_str()).or_default() += 1;
                if response.rejected > MAX_LISTED_REJECTIONS {
                    response.unlisted_rejections += 1;
                    continue;
                }
                let public = PublicError::from_field(&rejection.clone().prefixed(&item_path(index)));
                response.error.get_or_insert_with(|| public.clone());
                ItemResponse { status: "rejected", error: Some(public), ..ItemResponse::accepted(index) }
            }
        };
        response.results.push(item);
    }
    if response.unlisted_rejections > 0 {
        response.rejections_by_code = rejections_by_code;
    }
    let status = if response.rejected == 0 { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    (status, Json(response)).into_response()
}

/// One native identify, track or alias item parsed exactly as the endpoints parse it, for tools
/// that write through the engine without HTTP (`roster import`): same fields, same refusals.
pub fn parse_identify_item(item: &str) -> Result<IdentifyInput, FieldError> {
    parse_raw_item::<NativeIdentify>(item).and_then(NativeIdentify::into_input)
}

/// See [`parse_identify_item`].
pub fn parse_track_item(item: &str) -> Result<TrackInput, FieldError> {
    parse_raw_item::<NativeTrack>(item).and_then(NativeTrack::into_input)
}

/// See [`parse_identify_item`].
pub fn parse_alias_item(item: &str) -> Result<AliasInput, FieldError> {
    parse_raw_item::<NativeAlias>(item).and_then(NativeAlias::into_input)
}

fn parse_raw_item<T: serde::de::DeserializeOwned>(item: &str) -> Result<T, FieldError> {
    let raw: &serde_json::value::RawValue = serde_json::from_str(item)
        .map_err(|error| FieldError::new(ErrorCode::MalformedJson, "", format!("not valid JSON: {error}")))?;
    parse_item(raw)
}
