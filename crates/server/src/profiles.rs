//! The read side (server key only): a profile by id, by identifier, and a paginated listing with
//! an equality filter on one trait.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use roster_core::{ErrorCode, IdentifierKind};
use roster_engine::{Profile, ProfileFilter};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

pub(crate) const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 1000;

#[derive(Debug, Serialize)]
pub struct ProfileResponse {
    pub profile_id: String,
    pub environment: String,
    pub user_id: Option<String>,
    pub identified: bool,
    pub anonymous_ids: Vec<String>,
    /// The email identifier (the normalised `email` trait) when this profile holds it.
    pub email: Option<String>,
    pub traits: Map<String, Value>,
    /// When each trait was last written (the timestamp of the winning update).
    pub trait_timestamps: BTreeMap<String, String>,
    pub devices: Vec<DeviceResponse>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Serialize)]
pub struct DeviceResponse {
    pub token: String,
    pub platform: Option<String>,
    pub attributes: Map<String, Value>,
    pub last_used: Option<String>,
    pub last_status: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl ProfileResponse {
    pub(crate) fn new(profile: Profile, environment: &str) -> Self {
        ProfileResponse {
            profile_id: profile.profile_id,
            environment: environment.to_owned(),
            user_id: profile.user_id,
            identified: profile.identified,
            anonymous_ids: profile.anonymous_ids,
            email: profile.email,
            traits: profile.traits,
            trait_timestamps: profile.trait_timestamps.into_iter().map(|(key, at)| (key, at.to_rfc3339())).collect(),
            devices: profile
                .devices
                .into_iter()
                .map(|device| DeviceResponse {
                    token: device.token,
                    platform: device.platform,
                    attributes: device.attributes,
                    last_used: device.last_used.map(|at| at.to_rfc3339()),
                    last_status: device.last_status,
                    created_at: device.created_at.to_rfc3339(),
                    updated_at: device.updated_at.to_rfc3339(),
                })
                .collect(),
            created_at: profile.created_at.to_rfc3339(),
            updated_at: profile.updated_at.to_rfc3339(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ProfileListResponse {
    pub profiles: Vec<ProfileResponse>,
    /// Pass as `?after=` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

pub(crate) fn environment_slug(principal: &roster_engine::Principal) -> String {
    principal.environment().map(|environment| environment.slug.clone()).unwrap_or_default()
}

/// `GET /v1/profiles/{profile_id}`.
pub async fn get_profile(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(profile_id): Path<String>,
) -> Result<Json<ProfileResponse>, ApiError> {
    let profile = state.engine.profile(&principal, &profile_id).await?;
    Ok(Json(ProfileResponse::new(profile, &environment_slug(&principal))))
}

/// The listing's query: identifier lookups, one trait filter, pagination.
#[derive(Debug, Default)]
struct ListQuery {
    identifier: Option<(IdentifierKind, String)>,
    filter: ProfileFilter,
    after: Option<String>,
    limit: usize,
}

impl ListQuery {
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut parsed = ListQuery { limit: DEFAULT_PAGE_SIZE, ..ListQuery::default() };
        for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let (name, value) = (name.into_owned(), value.into_owned());
            match name.as_str() {
                "apiKey" => {}
                "user_id" | "distinct_id" => parsed.set_identifier(IdentifierKind::UserId, value)?,
                "anonymous_id" => parsed.set_identifier(IdentifierKind::AnonymousId, value)?,
                "email" => parsed.set_identifier(IdentifierKind::Email, value)?,
                "after" => parsed.after = Some(value),
                "limit" => parsed.limit = parse_limit(&value)?,
                _ => match name.strip_prefix("trait.") {
                    Some(key) => parsed.set_trait_filter(key, &value)?,
                    None => {
                        return Err(invalid_parameter(
                            &name,
                            "is not a listing parameter; use user_id, anonymous_id, email, trait.<key>, limit or after",
                        ));
                    }
                },
            }
        }
        Ok(parsed)
    }

    fn set_identifier(&mut self, kind: IdentifierKind, value: String) -> Result<(), ApiError> {
        if self.identifier.is_some() {
            return Err(invalid_parameter(kind.as_str(), "only one identifier lookup per request"));
        }
        self.identifier = Some((kind, value));
        Ok(())
    }

    fn set_trait_filter(&mut self, key: &str, value: &str) -> Result<(), ApiError> {
        if self.filter.trait_equals.is_some() {
            return Err(invalid_parameter("trait", "only one trait filter per request"));
        }
        if key.is_empty()
            || key.chars().any(|character| character == '"' || character == '\\' || character.is_control())
        {
            return Err(invalid_parameter(
                &format!("trait.{key}"),
                "trait key must be non-empty and contain no `\"`, `\\` or control characters",
            ));
        }
        // A JSON literal (`30`, `true`, `"30"`) matches by type; anything else is a string.
        let wanted = serde_json::from_str::<Value>(value)
            .ok()
            .filter(|parsed| !parsed.is_object() && !parsed.is_array() && !parsed.is_null())
            .unwrap_or_else(|| Value::String(value.to_owned()));
        self.filter.trait_equals = Some((key.to_owned(), wanted));
        Ok(())
    }
}

pub(crate) fn parse_limit(value: &str) -> Result<usize, ApiError> {
    match value.parse::<usize>() {
        Ok(limit) if (1..=MAX_PAGE_SIZE).contains(&limit) => Ok(limit),
        _ => Err(invalid_parameter("limit", &format!("must be a whole number from 1 to {MAX_PAGE_SIZE}"))),
    }
}

pub(crate) fn invalid_parameter(name: &str, rule: &str) -> ApiError {
    let mut error = ApiError::new(ErrorCode::InvalidQueryParameter, format!("query parameter `{name}` {rule}"));
    error.body.path = Some(name.to_owned());
    error
}

/// `GET /v1/profiles?user_id=…|anonymous_id=…|trait.<key>=…&limit=&after=`.
pub async fn list_profiles(
    State(state): State<AppState>,
    Caller(principal): Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<ProfileListResponse>, ApiError> {
    let query = ListQuery::parse(query.as_deref())?;
    let slug = environment_slug(&principal);
    if let Some((kind, value)) = &query.identifier {
        if query.filter.trait_equals.is_some() || query.after.is_some() {
            return Err(invalid_parameter(
                kind.as_str(),
                "is a lookup of one profile; it does not combine with trait filters or paging",
            ));
        }
        let found = state.engine.profile_by_identifier(&principal, *kind, value).await?;
        let profiles = found.into_iter().map(|profile| ProfileResponse::new(profile, &slug)).collect();
        return Ok(Json(ProfileListResponse { profiles, next_after: None }));
    }
    let page = state.engine.list_profiles(&principal, query.filter, query.after, query.limit).await?;
    Ok(Json(ProfileListResponse {
        profiles: page.profiles.into_iter().map(|profile| ProfileResponse::new(profile, &slug)).collect(),
        next_after: page.next_after,
    }))
}

#[derive(Debug, Serialize)]
pub struct EventResponse {
    pub event_id: String,
    pub profile_id: String,
    pub distinct_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub event: String,
    pub properties: Map<String, Value>,
    pub timestamp: String,
    pub received_at: String,
    /// The profile's traits when the event was recorded.
    pub identity_traits: Map<String, Value>,
    /// The SDK's `context` sent with the event, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Map<String, Value>>,
}

#[derive(Debug, Serialize)]
pub struct EventListResponse {
    pub events: Vec<EventResponse>,
    /// Pass as `?before=` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<String>,
}

/// `GET /v1/profiles/{profile_id}/events?limit=&before=`: the profile's events, newest first,
/// pre-login events included once the anonymous activity is linked.
pub async fn list_events(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(profile_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<EventListResponse>, ApiError> {
    let mut limit = DEFAULT_PAGE_SIZE;
    let mut before = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "apiKey" => {}
            "limit" => limit = parse_limit(&value)?,
            "before" if is_event_cursor(&value) => before = Some(value.into_owned()),
            "before" => return Err(invalid_parameter("before", "must be a `next_before` value from an earlier page")),
            other => return Err(invalid_parameter(other, "is not a parameter of this listing; use limit or before")),
        }
    }
    let page = state.engine.profile_events(&principal, &profile_id, before, limit).await?;
    let events = page
        .events
        .into_iter()
        .map(|event| EventResponse {
            event_id: event.event_id,
            profile_id: event.profile_id,
            distinct_id: event.distinct_id,
            anonymous_id: event.anonymous_id,
            event: event.event,
            properties: event.properties,
            timestamp: event.timestamp.to_rfc3339(),
            received_at: event.received_at.to_rfc3339(),
            identity_traits: event.identity_traits,
            context: event.context,
        })
        .collect();
    Ok(Json(EventListResponse { events, next_before: page.next_before }))
}

/// Cursors are `<microseconds>:<event id>`.
fn is_event_cursor(value: &str) -> bool {
    value.split_once(':').is_some_and(|(micros, event_id)| micros.parse::<i64>().is_ok() && !event_id.is_empty())
}
