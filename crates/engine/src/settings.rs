//! Per-environment settings: what an operator may switch for one environment (admin token).
//! Stored by the store as a JSON object; unknown or mistyped fields are refused by name.

use roster_core::{ErrorCode, FieldError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An environment's settings, with the defaults a vendor's user would expect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSettings {
    /// Whether Flagsmith's identities endpoint answers a client key with the identity's stored
    /// traits. Flagsmith does (its client SDKs read traits back from it), so it is on by default;
    /// off, a client key gets back only the traits it sent in that request.
    #[serde(default = "on")]
    pub flagsmith_client_key_reads_traits: bool,
}

fn on() -> bool {
    true
}

impl Default for EnvironmentSettings {
    fn default() -> Self {
        EnvironmentSettings { flagsmith_client_key_reads_traits: true }
    }
}

impl EnvironmentSettings {
    /// The stored settings; a document this version cannot read falls back to the defaults
    /// (and says so), so one bad row cannot lock an environment out.
    pub(crate) fn from_stored(slug: &str, stored: &str) -> Self {
        serde_json::from_str(stored).unwrap_or_else(|error| {
            tracing::warn!(slug, %error, "environment settings unreadable; using the defaults");
            EnvironmentSettings::default()
        })
    }

    /// These settings with `patch`'s fields replaced (`null` restores a field's default).
    pub(crate) fn patched(&self, patch: &Map<String, Value>) -> Result<Self, FieldError> {
        let mut merged = match serde_json::to_value(self) {
            Ok(Value::Object(fields)) => fields,
            _ => Map::new(),
        };
        for (key, value) in patch {
            if value.is_null() {
                merged.remove(key);
            } else {
                merged.insert(key.clone(), value.clone());
            }
        }
        serde_json::from_value(Value::Object(merged)).map_err(|error| {
            let message = error.to_string();
            let code =
                if message.starts_with("unknown field") { ErrorCode::UnknownField } else { ErrorCode::InvalidType };
            FieldError::new(code, "settings", message)
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn missing_fields_take_their_defaults_and_patches_replace_fields() {
        let settings = EnvironmentSettings::from_stored("development", "{}");
        assert!(settings.flagsmith_client_key_reads_traits);
        let patch = json!({ "flagsmith_client_key_reads_traits": false });
        let hidden = settings.patched(patch.as_object().unwrap()).unwrap();
        assert!(!hidden.flagsmith_client_key_reads_traits);
        let restored = hidden.patched(json!({ "flagsmith_client_key_reads_traits": null }).as_object().unwrap());
        assert!(restored.unwrap().flagsmith_client_key_reads_traits);
    }

    #[test]
    fn unknown_and_mistyped_fields_are_refused_by_name() {
        let settings = EnvironmentSettings::default();
        let unknown = settings.patched(json!({ "flagsmith_traits": true }).as_object().unwrap()).unwrap_err();
        assert_eq!(unknown.code, ErrorCode::UnknownField);
        assert!(unknown.message.contains("flagsmith_traits"));
        let mistyped =
            settings.patched(json!({ "flagsmith_client_key_reads_traits": "no" }).as_object().unwrap()).unwrap_err();
        assert_eq!(mistyped.code, ErrorCode::InvalidType);
    }
}
