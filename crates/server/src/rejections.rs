//! The rejections log over HTTP: what every dialect refused, for the server key to read, and the
//! helper the native endpoints use to hand their refusals to it.

use axum::Json;
use axum::extract::{RawQuery, State};
use roster_core::FieldError;
use roster_engine::{Principal, RefusedMessage};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, PublicError};
use crate::profiles::{invalid_parameter, parse_limit};

/// `results` of a request's items whose rejections go to the log, with the item each came from.
pub(crate) async fn log_item_rejections<T>(
    state: &AppState,
    principal: &Principal,
    dialect: &str,
    endpoint: &str,
    results: &[Result<T, FieldError>],
    raw_items: &[&RawValue],
    item_path: impl Fn(usize) -> String,
) {
    let refused: Vec<RefusedMessage> = results
        .iter()
        .enumerate()
        .filter_map(|(index, result)| {
            let rejection = result.as_ref().err()?.clone().prefixed(&item_path(index));
            let raw = raw_items.get(index).map(|raw| raw.get()).unwrap_or_default();
            Some(RefusedMessage {
                path: rejection.path.clone(),
                message_id: message_id_of(raw),
                code: rejection.code.as_str().to_owned(),
                error: PublicError::from_field(&rejection).message,
                payload: raw.to_owned(),
            })
        })
        .collect();
    state.engine.record_rejections(principal, dialect, endpoint, refused).await;
}

/// A native message's `message_id`, when it can be read.
fn message_id_of(raw: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct OnlyId {
        message_id: Option<String>,
    }
    serde_json::from_str::<OnlyId>(raw).ok()?.message_id
}

#[derive(Debug, Serialize)]
pub struct RejectionEntry {
    pub rejection_id: i64,
    pub received_at: String,
    pub dialect: String,
    pub endpoint: String,
    pub path: String,
    pub message_id: Option<String>,
    pub code: String,
    pub error: String,
    pub payload: String,
}

#[derive(Debug, Serialize)]
pub struct RejectionList {
    pub rejections: Vec<RejectionEntry>,
    /// `before` for the next (older) page; `null` on the last one.
    pub next_before: Option<i64>,
}

/// `GET /v1/rejections?limit=&before=` (server key): refused messages, newest first.
pub async fn list_rejections(
    State(state): State<AppState>,
    Caller(principal): Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<RejectionList>, ApiError> {
    let mut limit = 100;
    let mut before = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "apiKey" => {}
            "limit" => limit = parse_limit(&value)?,
            "before" => {
                before = Some(
                    value.parse::<i64>().map_err(|_| invalid_parameter("before", "must be a `next_before` value"))?,
                )
            }
            other => return Err(invalid_parameter(other, "is not a parameter of this listing; use limit or before")),
        }
    }
    let entries = state.engine.rejections(&principal, before, limit + 1).await?;
    let has_more = entries.len() > limit;
    let rejections: Vec<RejectionEntry> = entries
        .into_iter()
        .take(limit)
        .map(|entry| RejectionEntry {
            rejection_id: entry.rejection_id,
            received_at: entry.received_at.to_rfc3339(),
            dialect: entry.dialect,
            endpoint: entry.endpoint,
            path: entry.path,
            message_id: entry.message_id,
            code: entry.code,
            error: entry.error,
            payload: entry.payload,
        })
        .collect();
    let next_before = if has_more { rejections.last().map(|entry| entry.rejection_id) } else { None };
    Ok(Json(RejectionList { rejections, next_before }))
}
