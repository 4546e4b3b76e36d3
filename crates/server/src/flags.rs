//! Segments, features, identity overrides (server key), flag evaluation (client or server key)
//! and the environment document. Thin: parse, call the engine, render.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use roster_core::flags::{FeatureDefinition, IdentityOverride, SegmentDefinition};
use roster_core::{ErrorCode, FieldError};
use roster_engine::{AnswerSurface, FeatureView, FlagsAnswer, SegmentView};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::AppState;
use crate::auth::Caller;
use crate::body::{Body, parse_document, parse_item};
use crate::error::ApiError;
use crate::native::NativeIdentify;
use crate::profiles::{DEFAULT_PAGE_SIZE, invalid_parameter, parse_limit};

fn parse_id(text: &str, name: &str) -> Result<i64, ApiError> {
    text.parse::<i64>().map_err(|_| {
        ApiError::from(FieldError::new(ErrorCode::InvalidType, name, format!("`{text}` is not a numeric {name}")))
    })
}

#[derive(Debug, Serialize)]
pub struct SegmentList {
    segments: Vec<SegmentView>,
}

/// `GET /v1/segments`.
pub async fn list_segments(
    State(state): State<AppState>,
    Caller(principal): Caller,
) -> Result<Json<SegmentList>, ApiError> {
    Ok(Json(SegmentList { segments: state.engine.list_segments(&principal).await? }))
}

/// `POST /v1/segments`: creates a segment; membership of existing profiles is computed in the
/// background (see `membership` in the answer).
pub async fn create_segment(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<(StatusCode, Json<SegmentView>), ApiError> {
    let definition: SegmentDefinition = parse_document(&bytes)?;
    Ok((StatusCode::CREATED, Json(state.engine.save_segment(&principal, None, definition).await?)))
}

/// `GET /v1/segments/{segment_id}`.
pub async fn get_segment(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(segment_id): Path<String>,
) -> Result<Json<SegmentView>, ApiError> {
    Ok(Json(state.engine.segment(&principal, parse_id(&segment_id, "segment_id")?).await?))
}

/// `PUT /v1/segments/{segment_id}`: replaces the segment's name and rules.
pub async fn replace_segment(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(segment_id): Path<String>,
    Body(bytes): Body,
) -> Result<Json<SegmentView>, ApiError> {
    let segment_id = parse_id(&segment_id, "segment_id")?;
    let definition: SegmentDefinition = parse_document(&bytes)?;
    Ok(Json(state.engine.save_segment(&principal, Some(segment_id), definition).await?))
}

#[derive(Debug, Serialize)]
pub struct Deleted {
    deleted: bool,
}

/// `DELETE /v1/segments/{segment_id}`.
pub async fn delete_segment(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(segment_id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    state.engine.delete_segment(&principal, parse_id(&segment_id, "segment_id")?).await?;
    Ok(Json(Deleted { deleted: true }))
}

#[derive(Debug, Serialize)]
pub struct MemberResponse {
    profile_id: String,
    distinct_id: Option<String>,
    entered_at: String,
}

#[derive(Debug, Serialize)]
pub struct MembersResponse {
    total: u64,
    members: Vec<MemberResponse>,
    next_after: Option<String>,
}

/// `GET /v1/segments/{segment_id}/members?limit=&after=`: current members and their count.
pub async fn segment_members(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(segment_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<MembersResponse>, ApiError> {
    let segment_id = parse_id(&segment_id, "segment_id")?;
    let (mut limit, mut after) = (DEFAULT_PAGE_SIZE, None);
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "limit" => limit = parse_limit(&value)?,
            "after" => after = Some(value.into_owned()),
            "apiKey" => {}
            other => return Err(invalid_parameter(other, "is not a parameter here; use limit or after")),
        }
    }
    let page = state.engine.segment_members(&principal, segment_id, after, limit).await?;
    Ok(Json(MembersResponse {
        total: page.total,
        members: page
            .members
            .into_iter()
            .map(|member| MemberResponse {
                profile_id: member.profile_id,
                distinct_id: member.user_id,
                entered_at: member.entered_at.to_rfc3339(),
            })
            .collect(),
        next_after: page.next_after,
    }))
}

#[derive(Debug, Serialize)]
pub struct FeatureList {
    features: Vec<FeatureView>,
}

/// `GET /v1/features`.
pub async fn list_features(
    State(state): State<AppState>,
    Caller(principal): Caller,
) -> Result<Json<FeatureList>, ApiError> {
    Ok(Json(FeatureList { features: state.engine.list_features(&principal).await? }))
}

/// `POST /v1/features`.
pub async fn create_feature(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<(StatusCode, Json<FeatureView>), ApiError> {
    let definition: FeatureDefinition = parse_document(&bytes)?;
    Ok((StatusCode::CREATED, Json(state.engine.save_feature(&principal, None, definition).await?)))
}

/// `GET /v1/features/{feature_id}`.
pub async fn get_feature(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(feature_id): Path<String>,
) -> Result<Json<FeatureView>, ApiError> {
    Ok(Json(state.engine.feature(&principal, parse_id(&feature_id, "feature_id")?).await?))
}

/// `PUT /v1/features/{feature_id}`: replaces the feature (default, variants, segment overrides).
pub async fn replace_feature(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(feature_id): Path<String>,
    Body(bytes): Body,
) -> Result<Json<FeatureView>, ApiError> {
    let feature_id = parse_id(&feature_id, "feature_id")?;
    let definition: FeatureDefinition = parse_document(&bytes)?;
    Ok(Json(state.engine.save_feature(&principal, Some(feature_id), definition).await?))
}

/// `DELETE /v1/features/{feature_id}`.
pub async fn delete_feature(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(feature_id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    state.engine.delete_feature(&principal, parse_id(&feature_id, "feature_id")?).await?;
    Ok(Json(Deleted { deleted: true }))
}

#[derive(Debug, Serialize)]
pub struct OverrideResponse {
    profile_id: String,
    feature_id: i64,
    enabled: bool,
    value: Value,
}

/// `PUT /v1/features/{feature_id}/overrides/{profile_id}` `{"enabled": …, "value": …}`.
pub async fn put_identity_override(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((feature_id, profile_id)): Path<(String, String)>,
    Body(bytes): Body,
) -> Result<Json<OverrideResponse>, ApiError> {
    let feature_id = parse_id(&feature_id, "feature_id")?;
    let state_body: IdentityOverride = parse_document(&bytes)?;
    let landed = state.engine.put_identity_override(&principal, &profile_id, feature_id, state_body.clone()).await?;
    Ok(Json(OverrideResponse { profile_id: landed, feature_id, enabled: state_body.enabled, value: state_body.value }))
}

/// `DELETE /v1/features/{feature_id}/overrides/{profile_id}`.
pub async fn delete_identity_override(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((feature_id, profile_id)): Path<(String, String)>,
) -> Result<Json<Deleted>, ApiError> {
    let feature_id = parse_id(&feature_id, "feature_id")?;
    state.engine.delete_identity_override(&principal, &profile_id, feature_id).await?;
    Ok(Json(Deleted { deleted: true }))
}

/// `POST /v1/flags`: an identify (native shape) plus `transient_traits`; the traits are stored,
/// then every flag is evaluated with the profile's full trait set.
pub async fn identify_and_evaluate(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<Json<FlagsAnswer>, ApiError> {
    let mut document: Map<String, Value> = parse_document(&bytes)?;
    let transient_traits = match document.remove("transient_traits") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(traits)) => traits,
        Some(_) => {
            return Err(
                FieldError::new(ErrorCode::InvalidType, "transient_traits", "must be an object of traits").into()
            );
        }
    };
    let rest = serde_json::value::to_raw_value(&document)
        .map_err(|error| ApiError::from(FieldError::new(ErrorCode::MalformedJson, "", error.to_string())))?;
    let identify: NativeIdentify = parse_item(&rest)?;
    let answer = state
        .engine
        .identify_and_evaluate(&principal, identify.into_input()?, transient_traits, AnswerSurface::Native)
        .await?;
    Ok(Json(answer))
}

/// `GET /v1/flags`: the environment's flags with no identity.
pub async fn default_flags(
    State(state): State<AppState>,
    Caller(principal): Caller,
) -> Result<Json<FlagsAnswer>, ApiError> {
    Ok(Json(state.engine.default_flags(&principal).await?))
}

/// `GET /v1/environment-document`: Flagsmith's environment document (server key).
pub async fn environment_document(
    State(state): State<AppState>,
    Caller(principal): Caller,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.engine.environment_document(&principal).await?))
}
