//! Row shapes shared by the backends: a profile row before its JSON is parsed, and the small
//! parsers every backend needs the same way.

use std::collections::BTreeMap;

use roster_core::{IdentifierKind, Timestamp, TraitSet};
use serde_json::{Map, Value};

use crate::model::{Device, Profile};
use crate::resolution::StoredProfile;
use crate::{StoreError, StoreResult};

/// A profile row as it comes out of a backend, before its JSON columns are parsed.
pub(crate) struct StoredProfileRow {
    pub profile_id: String,
    pub user_id: Option<String>,
    pub identified: bool,
    pub traits_json: String,
    pub trait_timestamps_json: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub merge_count: i64,
}

impl StoredProfileRow {
    fn parse_traits(&self) -> StoreResult<(Map<String, Value>, BTreeMap<String, Timestamp>)> {
        let corrupt = |error: serde_json::Error| {
            StoreError::Corrupt(format!("profile {} has unreadable traits: {error}", self.profile_id))
        };
        let values: Map<String, Value> = serde_json::from_str(&self.traits_json).map_err(corrupt)?;
        let timestamps: BTreeMap<String, i64> = serde_json::from_str(&self.trait_timestamps_json).map_err(corrupt)?;
        let timestamps = timestamps.into_iter().map(|(key, micros)| (key, Timestamp::from_micros(micros))).collect();
        Ok((values, timestamps))
    }

    pub fn into_stored(self) -> StoreResult<StoredProfile> {
        let (values, timestamps) = self.parse_traits()?;
        Ok(StoredProfile {
            traits: TraitSet::from_stored(values, timestamps),
            profile_id: self.profile_id,
            user_id: self.user_id,
            identified: self.identified,
            created_at: Timestamp::from_micros(self.created_at),
            updated_at: Timestamp::from_micros(self.updated_at),
            merge_count: self.merge_count,
        })
    }

    /// The profile as read back, with its identifiers and devices (fetched by the backend).
    pub fn into_profile_with(
        self,
        identifiers: Vec<(IdentifierKind, String)>,
        devices: Vec<Device>,
    ) -> StoreResult<Profile> {
        let (traits, all_timestamps) = self.parse_traits()?;
        let trait_timestamps = all_timestamps.into_iter().filter(|(key, _)| traits.contains_key(key)).collect();
        let mut anonymous_ids = Vec::new();
        let mut email = None;
        for (kind, value) in identifiers {
            match kind {
                IdentifierKind::AnonymousId => anonymous_ids.push(value),
                IdentifierKind::Email => email = Some(value),
                IdentifierKind::UserId => {}
            }
        }
        Ok(Profile {
            profile_id: self.profile_id,
            user_id: self.user_id,
            identified: self.identified,
            anonymous_ids,
            email,
            traits,
            trait_timestamps,
            devices,
            created_at: Timestamp::from_micros(self.created_at),
            updated_at: Timestamp::from_micros(self.updated_at),
        })
    }
}

/// `"<micros>:<event_id>"` as handed out in `next_before`; no cursor means "from the newest".
pub(crate) fn parse_event_cursor(cursor: Option<&str>) -> (i64, String) {
    cursor
        .and_then(|cursor| cursor.split_once(':'))
        .and_then(|(micros, event_id)| micros.parse::<i64>().ok().map(|micros| (micros, event_id.to_owned())))
        .unwrap_or((i64::MAX, String::new()))
}

pub(crate) fn parse_object(text: &str, owner: &str) -> StoreResult<Map<String, Value>> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("event {owner} has unreadable JSON: {error}")))
}

/// An identifier kind as stored.
pub(crate) fn identifier_kind(kind: &str) -> StoreResult<IdentifierKind> {
    IdentifierKind::parse(kind).ok_or_else(|| StoreError::Corrupt(format!("unknown identifier kind `{kind}`")))
}
