//! Environment management with the admin token: list, create, rotate keys.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use roster_engine::{Environment, EnvironmentKeys};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::auth::Caller;
use crate::body::{Body, parse_document};
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateEnvironment {
    slug: String,
    name: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EnvironmentList {
    pub environments: Vec<Environment>,
}

/// `GET /v1/admin/environments`: slugs, names and client keys (server keys are never shown again).
pub async fn list_environments(
    State(state): State<AppState>,
    Caller(principal): Caller,
) -> Result<Json<EnvironmentList>, ApiError> {
    let environments = state.engine.environments(&principal).await?;
    Ok(Json(EnvironmentList { environments: environments.iter().map(|environment| (**environment).clone()).collect() }))
}

/// `POST /v1/admin/environments` `{"slug": "...", "name": "..."}`: answers the new keys, once.
pub async fn create_environment(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Body(bytes): Body,
) -> Result<(StatusCode, Json<EnvironmentKeys>), ApiError> {
    let request: CreateEnvironment = parse_document(&bytes)?;
    let keys = state.engine.create_environment(&principal, &request.slug, request.name.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(keys)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateEnvironment {
    settings: serde_json::Map<String, serde_json::Value>,
}

/// `PATCH /v1/admin/environments/{slug}` `{"settings": {...}}`: replaces the settings named
/// (`null` restores a default); answers the environment with all its settings.
pub async fn update_environment(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(slug): Path<String>,
    Body(bytes): Body,
) -> Result<Json<Environment>, ApiError> {
    let request: UpdateEnvironment = parse_document(&bytes)?;
    let environment = state.engine.update_environment_settings(&principal, &slug, &request.settings).await?;
    Ok(Json((*environment).clone()))
}

/// `POST /v1/admin/environments/{slug}/rotate-keys`: new client and server keys; the old ones stop
/// working immediately.
pub async fn rotate_keys(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(slug): Path<String>,
) -> Result<Json<EnvironmentKeys>, ApiError> {
    Ok(Json(state.engine.rotate_keys(&principal, &slug).await?))
}
