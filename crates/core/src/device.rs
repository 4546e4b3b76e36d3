//! Devices: push tokens that belong to one person, with attributes taken from the SDK's context.

use serde_json::{Map, Value};

use crate::error::{ErrorCode, FieldError};
use crate::limits::Limits;

/// A device write: register or update `token` for a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceUpdate {
    pub token: String,
    /// `ios`, `android`, `web`, … as the SDK says.
    pub platform: Option<String>,
    /// A patch of the device's attributes (`null` deletes one).
    pub attributes: Map<String, Value>,
    /// Set by the write path for device updates that come with an identify (`last_used`).
    pub mark_used: bool,
    /// `last_status` (e.g. a delivery status), when given.
    pub last_status: Option<String>,
}

impl DeviceUpdate {
    /// The device's attributes after this update, given what was stored (`None` for a new
    /// device or one changing hands, which starts afresh): the update is a patch, `null` deletes.
    pub fn merged_attributes(&self, stored: Option<Map<String, Value>>) -> Map<String, Value> {
        let mut attributes = stored.unwrap_or_default();
        for (key, value) in &self.attributes {
            if value.is_null() {
                attributes.remove(key);
            } else {
                attributes.insert(key.clone(), value.clone());
            }
        }
        attributes
    }

    /// Validates a device write's token and attributes.
    pub fn new(
        token: String,
        platform: Option<String>,
        attributes: Map<String, Value>,
        last_status: Option<String>,
        limits: &Limits,
        path: &str,
    ) -> Result<Self, FieldError> {
        limits.validate_identifier(&token, &crate::error::join_path(path, "token"))?;
        limits.validate_trait_patch(&attributes, &crate::error::join_path(path, "attributes"))?;
        Ok(DeviceUpdate { token, platform, attributes, mark_used: false, last_status })
    }

    /// The device an identify's `context` describes, if it names a token
    /// (`context.device.token`): its platform from `context.device.type` (or `platform`), and
    /// every other context field flattened into attributes (`context.network.cellular` →
    /// `network_cellular`, `context.device.model` → `device_model`).
    pub fn from_context(context: &Map<String, Value>, limits: &Limits) -> Result<Option<Self>, FieldError> {
        let device = context.get("device").and_then(Value::as_object);
        let Some(token) = device.and_then(|device| device.get("token")) else { return Ok(None) };
        let Some(token) = token.as_str() else {
            return Err(FieldError::new(ErrorCode::InvalidType, "context.device.token", "must be a string"));
        };
        let platform = device
            .and_then(|device| device.get("type").or_else(|| device.get("platform")))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut attributes = Map::new();
        flatten_into(&mut attributes, "", context);
        attributes.remove("device_token");
        let mut update = DeviceUpdate::new(token.to_owned(), platform, attributes, None, limits, "context.device")?;
        update.mark_used = true;
        Ok(Some(update))
    }
}

/// Flattens nested objects into `parent_child` keys; arrays and scalars are kept as values.
fn flatten_into(attributes: &mut Map<String, Value>, prefix: &str, object: &Map<String, Value>) {
    for (key, value) in object {
        let flat_key = if prefix.is_empty() { key.clone() } else { format!("{prefix}_{key}") };
        match value {
            Value::Object(inner) => flatten_into(attributes, &flat_key, inner),
            other => {
                attributes.insert(flat_key, other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn context_is_flattened_into_device_attributes() {
        let context = json!({
            "device": { "token": "tok-1", "type": "ios", "model": "iPhone15,2" },
            "network": { "cellular": true, "wifi": false },
            "app": { "version": "2.1.0" },
            "locale": "fr-FR"
        });
        let device = DeviceUpdate::from_context(context.as_object().unwrap(), &Limits::default()).unwrap().unwrap();
        assert_eq!(device.token, "tok-1");
        assert_eq!(device.platform.as_deref(), Some("ios"));
        assert!(device.mark_used);
        assert_eq!(
            Value::Object(device.attributes),
            json!({ "device_type": "ios", "device_model": "iPhone15,2", "network_cellular": true,
                    "network_wifi": false, "app_version": "2.1.0", "locale": "fr-FR" })
        );
    }

    #[test]
    fn a_context_without_a_token_names_no_device_and_a_bad_token_is_refused() {
        let no_token = json!({ "device": { "model": "Pixel" } });
        assert_eq!(DeviceUpdate::from_context(no_token.as_object().unwrap(), &Limits::default()).unwrap(), None);
        let numeric = json!({ "device": { "token": 5 } });
        let error = DeviceUpdate::from_context(numeric.as_object().unwrap(), &Limits::default()).unwrap_err();
        assert_eq!(error.path, "context.device.token");
    }
}
