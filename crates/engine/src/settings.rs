//! Per-environment settings: what an operator may switch for one environment (admin token).
//! Stored by the store as a JSON object; unknown or mistyped fields are refused by name.

use roster_core::{ErrorCode, FieldError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An environment's settings, with the defaults a vendor's user would expect.
/// Unknown fields are ignored when read back (a newer node may have written one; falling back to
/// the defaults would loosen what it set) and refused by name when patched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentSettings {
    /// Whether Flagsmith's identities endpoint answers a client key with the identity's stored
    /// traits. Flagsmith does (its client SDKs read traits back from it), so it is on by default;
    /// off, a client key gets back only the traits it sent in that request.
    #[serde(default = "on")]
    pub flagsmith_client_key_reads_traits: bool,
    /// Browser origins (`https://app.example.com`) that may call the environment's client
    /// endpoints cross-origin; `"*"` is any origin (the default, as the vendors do), `[]` none.
    #[serde(default = "any_origin")]
    pub allowed_origins: Vec<String>,
}

fn on() -> bool {
    true
}

fn any_origin() -> Vec<String> {
    vec!["*".to_owned()]
}

impl Default for EnvironmentSettings {
    fn default() -> Self {
        EnvironmentSettings { flagsmith_client_key_reads_traits: true, allowed_origins: any_origin() }
    }
}

/// Whether `origin` is a browser origin as the `Origin` header carries it: a scheme, `://`, a
/// host and maybe a port — no path, query or trailing slash.
fn is_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else { return false };
    let scheme_ok = !scheme.is_empty()
        && scheme.chars().all(|character| character.is_ascii_alphanumeric() || "+-.".contains(character));
    let host_ok = !rest.is_empty()
        && rest.chars().all(|character| character.is_ascii_alphanumeric() || "-.:[]".contains(character));
    scheme_ok && host_ok
}

impl EnvironmentSettings {
    /// The stored settings; a document this version cannot read at all falls back to the
    /// defaults (and says so), so one bad row cannot lock an environment out.
    pub(crate) fn from_stored(slug: &str, stored: &str) -> Self {
        serde_json::from_str(stored).unwrap_or_else(|error| {
            tracing::warn!(slug, %error, "environment settings unreadable; using the defaults");
            EnvironmentSettings::default()
        })
    }

    /// These settings with `patch`'s fields replaced (`null` restores a field's default).
    pub(crate) fn patched(&self, patch: &Map<String, Value>) -> Result<Self, FieldError> {
        const KNOWN: [&str; 2] = ["flagsmith_client_key_reads_traits", "allowed_origins"];
        if let Some(unknown) = patch.keys().find(|key| !KNOWN.contains(&key.as_str())) {
            return Err(FieldError::new(
                ErrorCode::UnknownField,
                format!("settings.{unknown}"),
                format!("unknown field `{unknown}`, expected one of `{}`", KNOWN.join("`, `")),
            ));
        }
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
        let settings: EnvironmentSettings = serde_json::from_value(Value::Object(merged)).map_err(|error| {
            let message = error.to_string();
            let code =
                if message.starts_with("unknown field") { ErrorCode::UnknownField } else { ErrorCode::InvalidType };
            FieldError::new(code, "settings", message)
        })?;
        for (index, origin) in settings.allowed_origins.iter().enumerate() {
            if origin != "*" && !is_origin(origin) {
                return Err(FieldError::new(
                    ErrorCode::InvalidType,
                    format!("settings.allowed_origins[{index}]"),
                    format!(
                        "`{origin}` is not an origin: write `scheme://host[:port]` (no path or trailing `/`), or `*`"
                    ),
                ));
            }
        }
        Ok(settings)
    }

    /// Whether a browser on `origin` may call the environment's client endpoints.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.allowed_origins.iter().any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
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
    fn origins_are_any_by_default_and_checked_when_set() {
        let settings = EnvironmentSettings::default();
        assert!(settings.allows_origin("https://anything.example"));
        let listed = settings
            .patched(
                json!({ "allowed_origins": ["https://app.example.com", "http://localhost:3000"] }).as_object().unwrap(),
            )
            .unwrap();
        assert!(listed.allows_origin("https://app.example.com"));
        assert!(listed.allows_origin("http://localhost:3000"));
        assert!(!listed.allows_origin("https://evil.example"));
        let none = settings.patched(json!({ "allowed_origins": [] }).as_object().unwrap()).unwrap();
        assert!(!none.allows_origin("https://app.example.com"));
        let refused = settings
            .patched(json!({ "allowed_origins": ["https://app.example.com/"] }).as_object().unwrap())
            .unwrap_err();
        assert_eq!(refused.path, "settings.allowed_origins[0]");
    }

    #[test]
    fn settings_written_by_a_newer_version_keep_what_this_one_knows() {
        let stored = r#"{"allowed_origins": ["https://app.example.com"], "flagsmith_client_key_reads_traits": false, "later_setting": 1}"#;
        let settings = EnvironmentSettings::from_stored("production", stored);
        assert_eq!(settings.allowed_origins, ["https://app.example.com"], "not loosened to the defaults");
        assert!(!settings.flagsmith_client_key_reads_traits);
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
