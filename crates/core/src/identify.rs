//! The identify command: what every dialect's identify call is translated into.

use serde_json::{Map, Value};

use crate::error::{ErrorCode, FieldError};
use crate::limits::Limits;
use crate::timestamp::Timestamp;

/// Kinds of identifier that point at exactly one profile in an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentifierKind {
    /// The application's stable user id (distinct_id / userId / identifier). At most one per profile.
    UserId,
    /// A pre-login device or session id. Many per profile.
    AnonymousId,
    /// The profile's `email` trait, normalised (trimmed, domain lower-cased). At most one per
    /// profile, and one profile per email.
    Email,
}

impl IdentifierKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentifierKind::UserId => "user_id",
            IdentifierKind::AnonymousId => "anonymous_id",
            IdentifierKind::Email => "email",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "user_id" => Some(IdentifierKind::UserId),
            "anonymous_id" => Some(IdentifierKind::AnonymousId),
            "email" => Some(IdentifierKind::Email),
            _ => None,
        }
    }
}

/// One identify, validated: at least one identifier, traits within limits, a timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentifyCommand {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    /// A patch: keys not sent are left alone, `null` deletes.
    pub traits: Map<String, Value>,
    /// Traits written only where the profile has no value yet (PostHog's `$set_once`).
    pub traits_set_once: Map<String, Value>,
    /// When the update happened; orders it against other updates of the same traits.
    pub timestamp: Timestamp,
    /// The client's id of this message: a resend with the same id is applied once.
    pub message_id: Option<String>,
    /// The device the SDK's context names, registered to the profile with this identify.
    pub device: Option<crate::device::DeviceUpdate>,
    /// Numbers added to numeric traits, atomically with the rest of the identify (Flagsmith's
    /// increment-value): a missing trait counts as 0.
    pub trait_increments: Map<String, Value>,
}

impl IdentifyCommand {
    /// Builds a command from already-typed fields, enforcing the identify contract: a user id or an
    /// anonymous id (or both), and traits within `limits`. Paths in errors are relative to the item.
    pub fn new(
        user_id: Option<String>,
        anonymous_id: Option<String>,
        traits: Map<String, Value>,
        traits_set_once: Map<String, Value>,
        timestamp: Timestamp,
        limits: &Limits,
    ) -> Result<Self, FieldError> {
        validate_identifiers(user_id.as_deref(), anonymous_id.as_deref(), "an identify", limits)?;
        limits.validate_trait_patch(&traits, "traits")?;
        limits.validate_trait_patch(&traits_set_once, "traits_set_once")?;
        crate::reserved::validate_reserved_traits(&traits, "traits")?;
        crate::reserved::validate_reserved_traits(&traits_set_once, "traits_set_once")?;
        Ok(IdentifyCommand {
            user_id,
            anonymous_id,
            traits,
            traits_set_once,
            timestamp,
            message_id: None,
            device: None,
            trait_increments: Map::new(),
        })
    }

    /// Adds numbers to numeric traits (each value must be a number).
    pub fn with_increments(mut self, increments: Map<String, Value>, limits: &Limits) -> Result<Self, FieldError> {
        limits.validate_trait_patch(&increments, "trait_increments")?;
        for (key, value) in &increments {
            if !value.is_number() {
                return Err(FieldError::new(
                    ErrorCode::InvalidType,
                    crate::error::join_path("trait_increments", key),
                    "an increment is a number",
                ));
            }
        }
        self.trait_increments = increments;
        Ok(self)
    }

    /// Registers the device the identify's `context` names (see `DeviceUpdate::from_context`).
    pub fn with_context(mut self, context: Option<&Map<String, Value>>, limits: &Limits) -> Result<Self, FieldError> {
        if let Some(context) = context {
            self.device = crate::device::DeviceUpdate::from_context(context, limits)?;
        }
        Ok(self)
    }

    /// Sets the message id used to drop resent copies of this message.
    pub fn with_message_id(mut self, message_id: Option<String>, limits: &Limits) -> Result<Self, FieldError> {
        if let Some(message_id) = &message_id {
            limits.validate_identifier(message_id, "message_id")?;
        }
        self.message_id = message_id;
        Ok(self)
    }
}

/// At least one of the user id and the anonymous id, each within the identifier limit.
fn validate_identifiers(
    user_id: Option<&str>,
    anonymous_id: Option<&str>,
    operation: &str,
    limits: &Limits,
) -> Result<(), FieldError> {
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(FieldError::new(
            ErrorCode::MissingIdentifier,
            "distinct_id",
            format!("{operation} needs `distinct_id` (or `user_id`) or `anonymous_id`"),
        ));
    }
    if let Some(user_id) = user_id {
        limits.validate_identifier(user_id, "distinct_id")?;
    }
    if let Some(anonymous_id) = anonymous_id {
        limits.validate_identifier(anonymous_id, "anonymous_id")?;
    }
    Ok(())
}

/// One tracked event, validated: an event name, properties within limits (kept as the JSON text that
/// will be stored), at least one identifier, a timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackCommand {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub event: String,
    pub properties_json: String,
    pub timestamp: Timestamp,
    pub message_id: Option<String>,
    /// The SDK's `context` (page, user agent, device, library, …) as JSON text, kept with the
    /// event as sent.
    pub context_json: Option<String>,
}

impl TrackCommand {
    /// Keeps the SDK's `context` with the event, within the same size limit as its properties.
    pub fn with_context(mut self, context: Option<&Map<String, Value>>, limits: &Limits) -> Result<Self, FieldError> {
        let Some(context) = context.filter(|context| !context.is_empty()) else { return Ok(self) };
        let context_json = serde_json::to_string(context)
            .map_err(|error| FieldError::new(ErrorCode::InvalidType, "context", error.to_string()))?;
        limits.validate_properties(context, context_json.len(), "context")?;
        self.context_json = Some(context_json);
        Ok(self)
    }

    pub fn new(
        user_id: Option<String>,
        anonymous_id: Option<String>,
        event: Option<String>,
        properties: Map<String, Value>,
        timestamp: Timestamp,
        message_id: Option<String>,
        limits: &Limits,
    ) -> Result<Self, FieldError> {
        validate_identifiers(user_id.as_deref(), anonymous_id.as_deref(), "a track", limits)?;
        let event = event.filter(|name| !name.trim().is_empty()).ok_or_else(|| {
            FieldError::new(ErrorCode::MissingEventName, "event", "a track needs a non-empty `event` name")
        })?;
        crate::limits::reject_nul(&event, "event")?;
        if event.len() > limits.max_key_bytes {
            return Err(FieldError::new(
                ErrorCode::InvalidType,
                "event",
                format!("event name is {} bytes; the limit is {} bytes", event.len(), limits.max_key_bytes),
            ));
        }
        if let Some(message_id) = &message_id {
            limits.validate_identifier(message_id, "message_id")?;
        }
        let properties_json = serde_json::to_string(&properties)
            .map_err(|error| FieldError::new(ErrorCode::InvalidType, "properties", error.to_string()))?;
        limits.validate_properties(&properties, properties_json.len(), "properties")?;
        Ok(TrackCommand { user_id, anonymous_id, event, properties_json, timestamp, message_id, context_json: None })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn needs_a_user_id_or_an_anonymous_id() {
        let error =
            IdentifyCommand::new(None, None, Map::new(), Map::new(), Timestamp::from_micros(0), &Limits::default())
                .unwrap_err();
        assert_eq!(error.code, ErrorCode::MissingIdentifier);
        assert!(
            IdentifyCommand::new(
                None,
                Some("anon".into()),
                Map::new(),
                Map::new(),
                Timestamp::from_micros(0),
                &Limits::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn track_needs_an_event_name_and_an_identifier() {
        let limits = Limits::default();
        let at = Timestamp::from_micros(0);
        let missing_name = TrackCommand::new(Some("u".into()), None, Some(" ".into()), Map::new(), at, None, &limits);
        assert_eq!(missing_name.unwrap_err().code, ErrorCode::MissingEventName);
        let missing_id = TrackCommand::new(None, None, Some("Signed Up".into()), Map::new(), at, None, &limits);
        assert_eq!(missing_id.unwrap_err().code, ErrorCode::MissingIdentifier);
        let properties = json!({ "plan": "pro" }).as_object().unwrap().clone();
        let command =
            TrackCommand::new(None, Some("a".into()), Some("Signed Up".into()), properties, at, None, &limits).unwrap();
        assert_eq!(command.properties_json, r#"{"plan":"pro"}"#);
    }

    #[test]
    fn trait_violations_name_the_trait_path() {
        let traits = json!({ "bio": "x".repeat(2001) }).as_object().unwrap().clone();
        let error = IdentifyCommand::new(
            Some("u".into()),
            None,
            traits,
            Map::new(),
            Timestamp::from_micros(0),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(error.path, "traits.bio");
    }
}
