//! Flagsmith's SDK API (`/api/v1/…`, key in `X-Environment-Key`): a thin adapter onto the
//! engine's identify and flag evaluation. Response bodies have the shapes Flagsmith's SDKs parse.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use roster_core::{ErrorCode, FieldError};
use roster_engine::{AnswerSurface, FlagAnswer, FlagsAnswer, IdentifyInput};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::auth::{Caller, query_parameter};
use crate::body::{Body, ItemsAt, check_item_count, parse_array, parse_document};
use crate::error::ApiError;

/// One trait as Flagsmith sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagsmithTrait {
    trait_key: String,
    #[serde(default)]
    trait_value: Value,
    /// Used for this evaluation only, not stored.
    #[serde(default)]
    transient: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityRequest {
    identifier: String,
    #[serde(default)]
    traits: Vec<FlagsmithTrait>,
    /// The whole identity is not stored: flags come from the traits sent alone.
    #[serde(default)]
    transient: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityRef {
    identifier: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TraitRequest {
    identity: IdentityRef,
    trait_key: String,
    #[serde(default)]
    trait_value: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IncrementRequest {
    trait_key: String,
    increment_by: Value,
    identifier: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkIdentitiesRequest {
    data: Vec<IdentityRequest>,
}

/// A flag in Flagsmith's API shape.
fn flag_json(flag: &FlagAnswer, environment_id: i64) -> Value {
    json!({
        "id": flag.feature_id,
        "feature": {
            "id": flag.feature_id,
            "name": flag.feature,
            "type": "STANDARD",
            "default_enabled": flag.enabled,
            "initial_value": flag.value,
            "description": null,
        },
        "feature_state_value": flag.value,
        "enabled": flag.enabled,
        "environment": environment_id,
        "identity": null,
        "feature_segment": null,
    })
}

fn identity_json(identifier: &str, answer: &FlagsAnswer, environment_id: i64) -> Value {
    let traits: Vec<Value> =
        answer.traits.iter().map(|(key, value)| json!({ "trait_key": key, "trait_value": value })).collect();
    json!({
        "identifier": identifier,
        "flags": answer.flags.iter().map(|flag| flag_json(flag, environment_id)).collect::<Vec<_>>(),
        "traits": traits,
    })
}

/// Traits to store (a `null` value deletes the trait) and traits for one evaluation only.
struct SplitTraits {
    stored: Map<String, Value>,
    transient: Map<String, Value>,
}

/// Stored and transient traits, from Flagsmith's list.
fn split_traits(traits: Vec<FlagsmithTrait>) -> Result<SplitTraits, FieldError> {
    let (mut stored, mut transient) = (Map::new(), Map::new());
    for (index, item) in traits.into_iter().enumerate() {
        if item.trait_key.is_empty() {
            return Err(FieldError::new(
                ErrorCode::TraitKeyEmpty,
                format!("traits[{index}].trait_key"),
                "must not be empty",
            ));
        }
        if item.transient {
            transient.insert(item.trait_key, item.trait_value);
        } else {
            stored.insert(item.trait_key, item.trait_value);
        }
    }
    Ok(SplitTraits { stored, transient })
}

fn environment_id(principal: &roster_engine::Principal) -> Result<i64, ApiError> {
    Ok(principal.require_environment().map_err(ApiError::from)?.id)
}

/// `GET /api/v1/flags/`: the environment's flags.
pub async fn flags(State(state): State<AppState>, Caller(principal): Caller) -> Result<Json<Value>, ApiError> {
    let environment_id = environment_id(&principal)?;
    let answer = state.engine.default_flags(&principal).await?;
    Ok(Json(Value::Array(answer.flags.iter().map(|flag| flag_json(flag, environment_id)).collect())))
}

async fn identify_and_answer(
    state: &AppState,
    principal: &roster_engine::Principal,
    request: IdentityRequest,
) -> Result<Value, ApiError> {
    let environment_id = environment_id(principal)?;
    let SplitTraits { stored, transient } = split_traits(request.traits)?;
    let answer = if request.transient {
        let mut all = stored;
        all.extend(transient);
        state.engine.evaluate_transient(principal, &request.identifier, all).await?
    } else {
        let input =
            IdentifyInput { user_id: Some(request.identifier.clone()), traits: stored, ..IdentifyInput::default() };
        state.engine.identify_and_evaluate(principal, input, transient, AnswerSurface::FlagsmithIdentity).await?
    };
    Ok(identity_json(&request.identifier, &answer, environment_id))
}

/// `POST /api/v1/identities/`: stores the identity's traits and answers its flags and traits.
pub async fn post_identity(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<Json<Value>, ApiError> {
    let request: IdentityRequest = parse_document(&bytes)?;
    Ok(Json(identify_and_answer(&state, &principal, request).await?))
}

/// `GET /api/v1/identities/?identifier=…`.
pub async fn get_identity(
    State(state): State<AppState>,
    Caller(principal): Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let identifier = query.as_deref().and_then(|query| query_parameter(query, "identifier")).ok_or_else(|| {
        ApiError::from(FieldError::new(ErrorCode::MissingIdentifier, "identifier", "send `?identifier=`"))
    })?;
    let request = IdentityRequest { identifier, traits: Vec::new(), transient: false };
    Ok(Json(identify_and_answer(&state, &principal, request).await?))
}

fn trait_input(request: TraitRequest) -> IdentifyInput {
    let mut traits = Map::new();
    traits.insert(request.trait_key, request.trait_value);
    IdentifyInput { user_id: Some(request.identity.identifier), traits, ..IdentifyInput::default() }
}

/// `POST /api/v1/traits/`: sets one trait of an identity (a `null` value deletes it).
pub async fn post_trait(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<Json<Value>, ApiError> {
    let document: Value = parse_document(&bytes)?;
    let request: TraitRequest = parse_document(&bytes)?;
    let mut results = state.engine.identify(&principal, vec![Ok(trait_input(request))]).await?;
    results.remove(0)?;
    Ok(Json(document))
}

/// `PUT /api/v1/traits/bulk/`: several traits, possibly of several identities.
pub async fn bulk_traits(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<Json<Value>, ApiError> {
    let document: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let requests: Vec<TraitRequest> = parse_array(&bytes, state.config.max_batch_items)?;
    let inputs = requests.into_iter().map(|request| Ok(trait_input(request))).collect();
    for (index, result) in state.engine.identify(&principal, inputs).await?.into_iter().enumerate() {
        result.map_err(|error| error.prefixed(&format!("[{index}]")))?;
    }
    Ok(Json(document))
}

/// `POST /api/v1/traits/increment-value/` `{"trait_key", "increment_by", "identifier"}`: adds to
/// a numeric trait atomically (a missing trait counts as 0); answers the new value.
pub async fn increment_trait(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<Json<Value>, ApiError> {
    let request: IncrementRequest = parse_document(&bytes)?;
    let mut increments = Map::new();
    increments.insert(request.trait_key.clone(), request.increment_by);
    let input = IdentifyInput {
        user_id: Some(request.identifier.clone()),
        trait_increments: increments,
        ..IdentifyInput::default()
    };
    let answer = state
        .engine
        .identify_and_evaluate(&principal, input, Map::new(), AnswerSurface::FlagsmithIdentity)
        .await
        .map_err(|error| match error {
            roster_engine::EngineError::Invalid(mut field) => {
                field.path = field.path.replace(&format!("trait_increments.{}", request.trait_key), "increment_by");
                ApiError::from(field)
            }
            other => ApiError::from(other),
        })?;
    let value = answer.traits.get(&request.trait_key).cloned().unwrap_or(Value::Null);
    Ok(Json(json!({ "trait_key": request.trait_key, "trait_value": value, "identifier": request.identifier })))
}

/// `POST /api/v1/bulk-identities/` `{"data": [{"identifier", "traits": [...]}, ...]}`: stores
/// the traits of many identities at once; 202 like Flagsmith.
pub async fn bulk_identities(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_item_count(&bytes, ItemsAt::Field("data"), state.config.max_batch_items)?;
    let request: BulkIdentitiesRequest = parse_document(&bytes)?;
    let mut inputs = Vec::with_capacity(request.data.len());
    for (index, identity) in request.data.into_iter().enumerate() {
        let SplitTraits { stored, .. } =
            split_traits(identity.traits).map_err(|error| error.prefixed(&format!("data[{index}]")))?;
        inputs.push(Ok(IdentifyInput {
            user_id: Some(identity.identifier),
            traits: stored,
            ..IdentifyInput::default()
        }));
    }
    for (index, result) in state.engine.identify(&principal, inputs).await?.into_iter().enumerate() {
        result.map_err(|error| error.prefixed(&format!("data[{index}]")))?;
    }
    Ok((StatusCode::ACCEPTED, Json(json!({}))))
}

/// `GET /api/v1/environment-document/` (server key).
pub async fn environment_document(
    State(state): State<AppState>,
    Caller(principal): Caller,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.engine.environment_document(&principal).await?))
}
