//! Size and shape limits on what one write may store. Defaults follow Flagsmith's 2000-byte trait
//! values; all are configurable. A violation is always a field error naming the path and the limit,
//! never a truncation.

use serde_json::{Map, Value};

use crate::error::{ErrorCode, FieldError, join_path};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest string value anywhere inside a trait, in UTF-8 bytes.
    pub max_string_bytes: usize,
    /// Longest trait key (top-level or nested object key), in UTF-8 bytes.
    pub max_key_bytes: usize,
    /// Deepest nesting of objects/arrays inside one trait value (a scalar trait has depth 1).
    pub max_depth: usize,
    /// Most live traits one profile may hold.
    pub max_traits_per_profile: usize,
    /// Largest serialized size of one profile's live traits, in bytes.
    pub max_profile_bytes: usize,
    /// Longest identifier (user id, anonymous id, message id), in UTF-8 bytes.
    pub max_identifier_bytes: usize,
    /// Largest serialized `properties` of one event, in bytes (Segment's 32 KB message limit).
    pub max_event_bytes: usize,
    /// Most identifiers (user id, anonymous ids, email) one profile may hold.
    pub max_identifiers_per_profile: usize,
    /// Most profiles that may be merged into one profile over its life.
    pub max_merges_per_profile: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_string_bytes: 2000,
            max_key_bytes: 256,
            max_depth: 8,
            max_traits_per_profile: 500,
            max_profile_bytes: 256 * 1024,
            max_identifier_bytes: 256,
            max_event_bytes: 32 * 1024,
            max_identifiers_per_profile: 100,
            max_merges_per_profile: 100,
        }
    }
}

impl Limits {
    /// Validates a trait patch (the `traits` object of one identify) against the per-value limits.
    /// `path` is the patch's own path (normally `traits`).
    pub fn validate_trait_patch(&self, patch: &Map<String, Value>, path: &str) -> Result<(), FieldError> {
        for (key, value) in patch {
            let key_path = join_path(path, key);
            self.validate_key(key, &key_path)?;
            self.validate_value(value, &key_path, 1)?;
        }
        Ok(())
    }

    /// Validates an identifier value (user id, anonymous id).
    pub fn validate_identifier(&self, value: &str, path: &str) -> Result<(), FieldError> {
        if value.trim().is_empty() {
            return Err(FieldError::new(ErrorCode::InvalidIdentifier, path, "must be a non-empty string"));
        }
        reject_nul(value, path)?;
        if value.len() > self.max_identifier_bytes {
            return Err(FieldError::new(
                ErrorCode::InvalidIdentifier,
                path,
                format!("is {} bytes; the limit is {} bytes", value.len(), self.max_identifier_bytes),
            ));
        }
        Ok(())
    }

    /// Validates an event's properties: keys and nesting as for traits, and the serialized size
    /// (`serialized_bytes`) against `max_event_bytes`. Single strings are not limited beyond that:
    /// events carry URLs and user agents that traits do not.
    pub fn validate_properties(
        &self,
        properties: &Map<String, Value>,
        serialized_bytes: usize,
        path: &str,
    ) -> Result<(), FieldError> {
        if serialized_bytes > self.max_event_bytes {
            return Err(FieldError::new(
                ErrorCode::EventTooLarge,
                path,
                format!("properties take {serialized_bytes} bytes; the limit is {} bytes", self.max_event_bytes),
            ));
        }
        let unlimited_strings = Limits { max_string_bytes: usize::MAX, ..self.clone() };
        unlimited_strings.validate_trait_patch(properties, path)
    }

    /// Checks the whole profile after a patch was merged in.
    pub fn validate_profile(&self, live_trait_count: usize, serialized_bytes: usize) -> Result<(), FieldError> {
        if live_trait_count > self.max_traits_per_profile {
            return Err(FieldError::new(
                ErrorCode::TooManyTraits,
                "traits",
                format!(
                    "the profile would hold {live_trait_count} traits; the limit is {} per profile",
                    self.max_traits_per_profile
                ),
            ));
        }
        if serialized_bytes > self.max_profile_bytes {
            return Err(FieldError::new(
                ErrorCode::ProfileTooLarge,
                "traits",
                format!(
                    "the profile's traits would take {serialized_bytes} bytes; the limit is {} bytes",
                    self.max_profile_bytes
                ),
            ));
        }
        Ok(())
    }

    fn validate_key(&self, key: &str, path: &str) -> Result<(), FieldError> {
        if key.is_empty() {
            return Err(FieldError::new(ErrorCode::TraitKeyEmpty, path, "trait keys must not be empty"));
        }
        reject_nul(key, path)?;
        if key.len() > self.max_key_bytes {
            return Err(FieldError::new(
                ErrorCode::TraitKeyTooLong,
                path,
                format!("key is {} bytes; the limit is {} bytes", key.len(), self.max_key_bytes),
            ));
        }
        Ok(())
    }

    fn validate_value(&self, value: &Value, path: &str, depth: usize) -> Result<(), FieldError> {
        match value {
            Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
            Value::String(text) if text.len() > self.max_string_bytes => Err(FieldError::new(
                ErrorCode::TraitStringTooLong,
                path,
                format!("string is {} bytes; the limit is {} bytes", text.len(), self.max_string_bytes),
            )),
            Value::String(text) => reject_nul(text, path),
            Value::Array(items) => {
                self.check_depth(path, depth + 1)?;
                for (index, item) in items.iter().enumerate() {
                    self.validate_value(item, &format!("{path}[{index}]"), depth + 1)?;
                }
                Ok(())
            }
            Value::Object(fields) => {
                self.check_depth(path, depth + 1)?;
                for (key, item) in fields {
                    let item_path = join_path(path, key);
                    self.validate_key(key, &item_path)?;
                    self.validate_value(item, &item_path, depth + 1)?;
                }
                Ok(())
            }
        }
    }

    fn check_depth(&self, path: &str, depth: usize) -> Result<(), FieldError> {
        if depth > self.max_depth {
            return Err(FieldError::new(
                ErrorCode::TraitNestingTooDeep,
                path,
                format!("value nests deeper than the limit of {} levels", self.max_depth),
            ));
        }
        Ok(())
    }
}

/// Refuses text holding U+0000: no SQL text type stores it (PostgreSQL refuses it outright), so
/// it is refused for every backend alike.
pub fn reject_nul(text: &str, path: &str) -> Result<(), FieldError> {
    if text.contains('\0') {
        return Err(FieldError::new(ErrorCode::NulCharacter, path, "must not contain the NUL character (U+0000)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn patch(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn string_at_the_limit_passes_and_one_byte_more_fails_with_its_path() {
        let limits = Limits::default();
        let at_limit = "x".repeat(2000);
        assert!(limits.validate_trait_patch(&patch(json!({ "bio": at_limit })), "traits").is_ok());
        let over = "x".repeat(2001);
        let error =
            limits.validate_trait_patch(&patch(json!({ "address": { "street": over } })), "traits").unwrap_err();
        assert_eq!(error.code, ErrorCode::TraitStringTooLong);
        assert_eq!(error.path, "traits.address.street");
        assert!(error.message.contains("2000"));
    }

    #[test]
    fn multibyte_strings_are_measured_in_bytes() {
        let limits = Limits { max_string_bytes: 4, ..Limits::default() };
        assert!(limits.validate_trait_patch(&patch(json!({ "e": "éé" })), "traits").is_ok());
        assert!(limits.validate_trait_patch(&patch(json!({ "e": "ééé" })), "traits").is_err());
    }

    #[test]
    fn keys_are_limited_at_every_level() {
        let limits = Limits::default();
        let long_key = "k".repeat(257);
        let error = limits.validate_trait_patch(&patch(json!({ long_key.clone(): 1 })), "traits").unwrap_err();
        assert_eq!(error.code, ErrorCode::TraitKeyTooLong);
        let error = limits.validate_trait_patch(&patch(json!({ "company": { long_key: 1 } })), "traits").unwrap_err();
        assert!(error.path.starts_with("traits.company."));
        let error = limits.validate_trait_patch(&patch(json!({ "": 1 })), "traits").unwrap_err();
        assert_eq!(error.code, ErrorCode::TraitKeyEmpty);
    }

    #[test]
    fn nesting_depth_is_limited_and_array_paths_are_indexed() {
        let limits = Limits { max_depth: 3, ..Limits::default() };
        assert!(limits.validate_trait_patch(&patch(json!({ "a": { "b": [1] } })), "traits").is_ok());
        let error = limits.validate_trait_patch(&patch(json!({ "a": { "b": [[1]] } })), "traits").unwrap_err();
        assert_eq!(error.code, ErrorCode::TraitNestingTooDeep);
        assert_eq!(error.path, "traits.a.b[0]");
    }

    #[test]
    fn identifiers_must_be_non_blank_and_bounded() {
        let limits = Limits::default();
        assert!(limits.validate_identifier("u_1", "user_id").is_ok());
        assert_eq!(limits.validate_identifier("  ", "user_id").unwrap_err().code, ErrorCode::InvalidIdentifier);
        assert!(limits.validate_identifier(&"u".repeat(257), "user_id").is_err());
    }

    #[test]
    fn event_properties_are_limited_in_total_size_not_per_string() {
        let limits = Limits { max_event_bytes: 100, ..Limits::default() };
        let long_url = json!({ "url": "u".repeat(3000) });
        let properties = patch(long_url);
        let big = serde_json::to_string(&properties).unwrap().len();
        assert_eq!(
            limits.validate_properties(&properties, big, "properties").unwrap_err().code,
            ErrorCode::EventTooLarge
        );
        let roomy = Limits { max_event_bytes: 10_000, ..Limits::default() };
        assert!(roomy.validate_properties(&properties, big, "properties").is_ok());
        let deep = patch(json!({ "a": [[[[[[[[[1]]]]]]]]] }));
        assert_eq!(
            roomy.validate_properties(&deep, 10, "properties").unwrap_err().code,
            ErrorCode::TraitNestingTooDeep
        );
    }

    #[test]
    fn profile_limits_name_the_limit() {
        let limits = Limits { max_traits_per_profile: 2, max_profile_bytes: 10, ..Limits::default() };
        assert!(limits.validate_profile(2, 10).is_ok());
        assert_eq!(limits.validate_profile(3, 5).unwrap_err().code, ErrorCode::TooManyTraits);
        assert_eq!(limits.validate_profile(1, 11).unwrap_err().code, ErrorCode::ProfileTooLarge);
    }
}

/// The longest prefix of `text` within `max_bytes` that ends on a character boundary: where
/// echoed or logged input is cut (callers mark the cut their own way).
pub fn prefix_within(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod prefix_tests {
    use super::prefix_within;

    #[test]
    fn prefixes_end_on_character_boundaries() {
        assert_eq!(prefix_within("short", 10), "short");
        assert_eq!(prefix_within("ééé", 3), "é");
        assert_eq!(prefix_within("abc", 0), "");
    }
}
