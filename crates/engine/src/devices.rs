//! Devices named by messages rather than by the device API: a track's `context.device.token`,
//! and the device events of Customer.io's Data Pipelines SDKs (`Device Created or Updated`,
//! `Device Deleted`), which its mobile and web SDKs send with the public key. A client key may
//! touch only the devices of the person its message names.

use roster_core::{DeviceUpdate, FieldError, IdentifierKind};
use roster_store::EnvironmentId;
use serde_json::{Map, Value};

use crate::{Engine, EngineResult, IdentifyInput, Principal, TrackOutcome};

impl Engine {
    /// Marks the devices that tracked events came from as used (and patches their context
    /// attributes), on each event's profile.
    pub(crate) async fn refresh_devices_of_events(
        &self,
        environment_id: EnvironmentId,
        results: &[Result<TrackOutcome, FieldError>],
        devices: Vec<Option<DeviceUpdate>>,
    ) -> EngineResult<()> {
        for (result, device) in results.iter().zip(devices) {
            let (Ok(outcome), Some(device)) = (result, device) else { continue };
            if outcome.suppressed || outcome.duplicate {
                continue;
            }
            self.store.upsert_device(environment_id, &outcome.profile_id, device).await?;
        }
        Ok(())
    }

    /// `Device Created or Updated`: the device in `input.context` (its token required) is
    /// registered to the person the message names, as an identify with that context does, and
    /// `attributes` (the event's properties: custom device attributes, nested JSON allowed) are
    /// patched onto it.
    pub async fn register_device_from_event(
        &self,
        principal: &Principal,
        input: IdentifyInput,
        attributes: Map<String, Value>,
    ) -> EngineResult<Result<String, FieldError>> {
        let environment = principal.require_environment()?;
        let has_token = input
            .context
            .as_ref()
            .and_then(|context| context.get("device"))
            .and_then(|device| device.get("token"))
            .is_some();
        if !has_token {
            return Ok(Err(FieldError::new(
                roster_core::ErrorCode::MissingIdentifier,
                "context.device.token",
                "a device event needs the device's token in `context.device.token`",
            )));
        }
        let token = input.context.as_ref().and_then(|context| context["device"]["token"].as_str().map(str::to_owned));
        let outcome = match self.identify(principal, vec![Ok(input)]).await?.remove(0) {
            Ok(outcome) => outcome,
            Err(rejection) => return Ok(Err(rejection)),
        };
        if outcome.suppressed {
            return Ok(Ok(outcome.profile_id));
        }
        if let (Some(token), false) = (token, attributes.is_empty()) {
            let device = match DeviceUpdate::new(token, None, attributes, None, &self.config.limits, "properties") {
                Ok(device) => device,
                Err(rejection) => return Ok(Err(rejection)),
            };
            self.store.upsert_device(environment.id, &outcome.profile_id, device).await?;
        }
        Ok(Ok(outcome.profile_id))
    }

    /// `Device Deleted`: removes the device `token` if it belongs to the person named by
    /// `user_id` (or else `anonymous_id`); a device of anyone else, or none, is left alone and
    /// the call still succeeds (SDKs send it on logout, whatever the server holds).
    pub async fn delete_device_of_person(
        &self,
        principal: &Principal,
        user_id: Option<&str>,
        anonymous_id: Option<&str>,
        token: &str,
    ) -> EngineResult<()> {
        let environment = principal.require_environment()?;
        let named = match (user_id, anonymous_id) {
            (Some(user_id), _) => Some((IdentifierKind::UserId, user_id)),
            (None, Some(anonymous_id)) => Some((IdentifierKind::AnonymousId, anonymous_id)),
            (None, None) => None,
        };
        let Some((kind, value)) = named else { return Ok(()) };
        let Some(profile) = self.store.profile_by_identifier(environment.id, kind, value).await? else {
            return Ok(());
        };
        self.store.delete_device(environment.id, &profile.profile_id, token).await?;
        Ok(())
    }
}
