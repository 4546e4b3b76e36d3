//! The write path carried out inside a backend's transaction: identity resolution for identify
//! and track, message-id deduplication, trait history. Written once for every backend: a backend
//! implements [`IdentityTx`] (lookups and writes on its own tables) and calls [`apply_identify`]
//! or [`apply_track`] for each command, inside one transaction per batch.

use roster_core::{
    FieldError, IdentifierKind, IdentifyCommand, LinkInput, LinkTarget, ProfileRef, Timestamp, TrackCommand,
    TraitChange, TraitSet, plan_link,
};

use crate::StoreError;
use crate::model::{EnvironmentId, IdentifyOutcome, TrackOutcome, WritePolicy};

/// A profile row as the write path sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredProfile {
    pub profile_id: String,
    pub user_id: Option<String>,
    pub identified: bool,
    pub traits: TraitSet,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl StoredProfile {
    fn reference(&self) -> ProfileRef {
        ProfileRef { profile_id: self.profile_id.clone(), user_id: self.user_id.clone(), identified: self.identified }
    }

    fn new(profile_id: String, received_at: Timestamp) -> Self {
        StoredProfile {
            profile_id,
            user_id: None,
            identified: false,
            traits: TraitSet::new(),
            created_at: received_at,
            updated_at: received_at,
        }
    }
}

/// A profile row ready to be written: traits already serialized, so the size limit is checked on
/// exactly the bytes that will be stored.
pub struct ProfileWrite<'a> {
    pub profile: &'a StoredProfile,
    pub traits_json: String,
    pub trait_timestamps_json: String,
}

/// An event row ready to be written.
pub struct EventWrite<'a> {
    pub event_id: &'a str,
    pub profile_id: &'a str,
    /// The profile's user id if it has one, else the id the event was sent with.
    pub distinct_id: Option<&'a str>,
    pub anonymous_id: Option<&'a str>,
    pub command: &'a TrackCommand,
    pub received_at: Timestamp,
    /// The profile's live traits when the event was recorded.
    pub identity_traits_json: &'a str,
}

/// A message id already applied: when, and what it produced.
pub struct SeenMessage {
    pub received_at: Timestamp,
    pub profile_id: String,
    pub event_id: Option<String>,
}

/// The lookups and writes the write path needs, implemented by each backend on its open transaction.
pub trait IdentityTx {
    /// The profile an identifier points at.
    fn find_by_identifier(
        &mut self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
    ) -> Result<Option<StoredProfile>, StoreError>;

    fn load_profile(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
    ) -> Result<Option<StoredProfile>, StoreError>;

    fn insert_profile(&mut self, environment_id: EnvironmentId, write: &ProfileWrite<'_>) -> Result<(), StoreError>;

    fn update_profile(&mut self, environment_id: EnvironmentId, write: &ProfileWrite<'_>) -> Result<(), StoreError>;

    /// Points `(kind, value)` at `profile_id`, whoever held it before.
    fn put_identifier(
        &mut self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
        profile_id: &str,
    ) -> Result<(), StoreError>;

    fn delete_identifier(
        &mut self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
    ) -> Result<(), StoreError>;

    /// Moves every identifier of `from` to `to`.
    fn move_identifiers(&mut self, environment_id: EnvironmentId, from: &str, to: &str) -> Result<(), StoreError>;

    /// Deletes the profile row `from` and records that its id forwards to `to` (re-pointing older
    /// forwards to `from` as well, so forwarding is always one hop).
    fn retire_profile(&mut self, environment_id: EnvironmentId, from: &str, to: &str) -> Result<(), StoreError>;

    /// Moves the events and trait history of `from` to `to`.
    fn move_activity(&mut self, environment_id: EnvironmentId, from: &str, to: &str) -> Result<(), StoreError>;

    /// Shows the profile's events under its (new) user id.
    fn set_events_distinct_id(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
        distinct_id: &str,
    ) -> Result<(), StoreError>;

    fn insert_event(&mut self, environment_id: EnvironmentId, event: &EventWrite<'_>) -> Result<(), StoreError>;

    /// Appends one identify's trait changes (a JSON array) to the profile's history.
    fn record_trait_changes(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
        changes_json: &str,
        recorded_at: Timestamp,
    ) -> Result<(), StoreError>;

    fn find_message(
        &mut self,
        environment_id: EnvironmentId,
        message_id: &str,
    ) -> Result<Option<SeenMessage>, StoreError>;

    fn put_message(
        &mut self,
        environment_id: EnvironmentId,
        message_id: &str,
        seen: &SeenMessage,
    ) -> Result<(), StoreError>;

    /// A new, never reused, time-ordered id (profiles and events).
    fn new_id(&mut self) -> String;
}

/// Applies one identify. A `FieldError` means the item was rejected before anything was written;
/// a `StoreError` means the transaction must be abandoned.
pub fn apply_identify(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    command: &IdentifyCommand,
    policy: &WritePolicy,
    received_at: Timestamp,
) -> Result<Result<IdentifyOutcome, FieldError>, StoreError> {
    let message_key = command.message_id.as_deref().map(|id| message_key(Operation::Identify, id));
    if let Some(seen) = already_seen(tx, environment_id, message_key.as_deref(), policy, received_at)? {
        return Ok(Ok(IdentifyOutcome {
            profile_id: seen.profile_id,
            created: false,
            duplicate: true,
            merged_profile_ids: Vec::new(),
            changed_traits: Vec::new(),
            warnings: Vec::new(),
        }));
    }
    let user_profile = match command.user_id.as_deref() {
        Some(user_id) => tx.find_by_identifier(environment_id, IdentifierKind::UserId, user_id)?,
        None => None,
    };
    let anonymous_profile = match command.anonymous_id.as_deref() {
        Some(anonymous_id) => find_anonymous(tx, environment_id, anonymous_id)?,
        None => None,
    };
    let plan = plan_link(LinkInput {
        user_id: command.user_id.as_deref(),
        anonymous_id: command.anonymous_id.as_deref(),
        user_profile: user_profile.as_ref().map(StoredProfile::reference),
        anonymous_profile: anonymous_profile.as_ref().map(StoredProfile::reference),
    });

    let created = plan.target == LinkTarget::New;
    let mut profile = match &plan.target {
        LinkTarget::New => StoredProfile::new(tx.new_id(), received_at),
        LinkTarget::Existing(profile_id) => take_loaded(profile_id, [user_profile, anonymous_profile])
            .ok_or_else(|| StoreError::Corrupt(format!("identifier points at missing profile {profile_id}")))?,
    };

    let absorbed = match &plan.absorb_profile_id {
        Some(absorbed_id) => Some(
            tx.load_profile(environment_id, absorbed_id)?
                .ok_or_else(|| StoreError::Corrupt(format!("identifier points at missing profile {absorbed_id}")))?,
        ),
        None => None,
    };
    let mut changes: Vec<TraitChange> = Vec::new();
    if let Some(absorbed) = &absorbed {
        changes.extend(profile.traits.merge(&absorbed.traits));
        profile.created_at = profile.created_at.min(absorbed.created_at);
    }
    changes.extend(profile.traits.apply_patch(&command.traits, command.timestamp));
    changes.extend(profile.traits.apply_patch_if_absent(&command.traits_set_once, command.timestamp));

    // A distinct id that was never identified (track-only activity) stays linked as a device id
    // when the profile gets its real user id.
    let demoted_user_id = match &plan.set_user_id {
        Some(new_user_id) if profile.user_id.as_deref() != Some(new_user_id) => profile.user_id.take(),
        _ => None,
    };
    let previous_user_id = profile.user_id.clone().or_else(|| demoted_user_id.clone());
    if let Some(new_user_id) = &plan.set_user_id {
        profile.user_id = Some(new_user_id.clone());
    }
    profile.identified |= plan.mark_identified;
    profile.updated_at = received_at;

    let traits_json = profile.traits.live_values_json();
    let trait_timestamps_json = profile.traits.timestamps_json();
    // Tombstones count towards the stored size, so deletes of made-up keys cannot grow a profile
    // without bound.
    let stored_bytes = traits_json.len() + trait_timestamps_json.len();
    if let Err(violation) = policy.limits.validate_profile(profile.traits.live_count(), stored_bytes) {
        return Ok(Err(violation));
    }

    let write = ProfileWrite { profile: &profile, traits_json, trait_timestamps_json };
    if created {
        tx.insert_profile(environment_id, &write)?;
    } else {
        tx.update_profile(environment_id, &write)?;
    }

    let target_id = profile.profile_id.as_str();
    let mut merged_profile_ids = Vec::new();
    if let Some(absorbed) = &absorbed {
        if let Some(absorbed_user_id) = &absorbed.user_id {
            // The absorbed profile was never identified, so its distinct id is a device id.
            tx.put_identifier(environment_id, IdentifierKind::AnonymousId, absorbed_user_id, target_id)?;
            tx.delete_identifier(environment_id, IdentifierKind::UserId, absorbed_user_id)?;
        }
        tx.move_identifiers(environment_id, &absorbed.profile_id, target_id)?;
        tx.move_activity(environment_id, &absorbed.profile_id, target_id)?;
        tx.retire_profile(environment_id, &absorbed.profile_id, target_id)?;
        merged_profile_ids.push(absorbed.profile_id.clone());
    }
    if let Some(demoted) = &demoted_user_id {
        tx.delete_identifier(environment_id, IdentifierKind::UserId, demoted)?;
        tx.put_identifier(environment_id, IdentifierKind::AnonymousId, demoted, target_id)?;
    }
    if let Some(new_user_id) = &plan.set_user_id {
        tx.put_identifier(environment_id, IdentifierKind::UserId, new_user_id, target_id)?;
    }
    if let Some(anonymous_id) = &plan.link_anonymous_id {
        tx.put_identifier(environment_id, IdentifierKind::AnonymousId, anonymous_id, target_id)?;
    }
    // Pre-login events show under the user's id from now on.
    if let Some(user_id) = &profile.user_id
        && !created
        && (profile.user_id != previous_user_id || absorbed.is_some())
    {
        tx.set_events_distinct_id(environment_id, target_id, user_id)?;
    }
    if !changes.is_empty() {
        tx.record_trait_changes(environment_id, target_id, &changes_json(&changes), received_at)?;
    }
    if let Some(message_key) = &message_key {
        let seen = SeenMessage { received_at, profile_id: profile.profile_id.clone(), event_id: None };
        tx.put_message(environment_id, message_key, &seen)?;
    }

    Ok(Ok(IdentifyOutcome {
        profile_id: profile.profile_id,
        created,
        duplicate: false,
        merged_profile_ids,
        changed_traits: changes.into_iter().map(|change| change.key).collect(),
        warnings: plan.warnings,
    }))
}

/// Records one event on the profile its identifiers name, creating that profile (not identified)
/// when nobody is known by them yet. Track never links or merges: that is identify's job.
pub fn apply_track(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    command: &TrackCommand,
    policy: &WritePolicy,
    received_at: Timestamp,
) -> Result<Result<TrackOutcome, FieldError>, StoreError> {
    let message_key = command.message_id.as_deref().map(|id| message_key(Operation::Track, id));
    if let Some(seen) = already_seen(tx, environment_id, message_key.as_deref(), policy, received_at)? {
        return Ok(Ok(TrackOutcome {
            event_id: seen.event_id.unwrap_or_default(),
            profile_id: seen.profile_id,
            duplicate: true,
        }));
    }
    let found = match (&command.user_id, &command.anonymous_id) {
        // A pre-login distinct id that arrives after login is an anonymous id of the user by now.
        (Some(user_id), _) => match tx.find_by_identifier(environment_id, IdentifierKind::UserId, user_id)? {
            Some(profile) => Some(profile),
            None => tx.find_by_identifier(environment_id, IdentifierKind::AnonymousId, user_id)?,
        },
        (None, Some(anonymous_id)) => find_anonymous(tx, environment_id, anonymous_id)?,
        (None, None) => None,
    };
    let profile = match found {
        Some(profile) => profile,
        None => create_unidentified(tx, environment_id, command, received_at)?,
    };
    let identity_traits_json = profile.traits.live_values_json();
    let event_id = tx.new_id();
    let distinct_id = profile.user_id.as_deref().or(command.user_id.as_deref()).or(command.anonymous_id.as_deref());
    tx.insert_event(
        environment_id,
        &EventWrite {
            event_id: &event_id,
            profile_id: &profile.profile_id,
            distinct_id,
            anonymous_id: command.anonymous_id.as_deref(),
            command,
            received_at,
            identity_traits_json: &identity_traits_json,
        },
    )?;
    if let Some(message_key) = &message_key {
        let seen =
            SeenMessage { received_at, profile_id: profile.profile_id.clone(), event_id: Some(event_id.clone()) };
        tx.put_message(environment_id, message_key, &seen)?;
    }
    Ok(Ok(TrackOutcome { event_id, profile_id: profile.profile_id, duplicate: false }))
}

/// A profile for a track whose identifiers nobody holds yet: its distinct id is kept as a user id
/// that is not identified, so a later identify naming it as `anonymous_id` merges it in.
fn create_unidentified(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    command: &TrackCommand,
    received_at: Timestamp,
) -> Result<StoredProfile, StoreError> {
    let mut profile = StoredProfile::new(tx.new_id(), received_at);
    profile.user_id = command.user_id.clone();
    let write = ProfileWrite { profile: &profile, traits_json: "{}".into(), trait_timestamps_json: "{}".into() };
    tx.insert_profile(environment_id, &write)?;
    match (&command.user_id, &command.anonymous_id) {
        (Some(user_id), _) => {
            tx.put_identifier(environment_id, IdentifierKind::UserId, user_id, &profile.profile_id)?
        }
        (None, Some(anonymous_id)) => {
            tx.put_identifier(environment_id, IdentifierKind::AnonymousId, anonymous_id, &profile.profile_id)?
        }
        (None, None) => {}
    }
    Ok(profile)
}

/// The operations message ids are deduplicated within: an identify and a track that share an id are
/// two messages.
enum Operation {
    Identify,
    Track,
}

fn message_key(operation: Operation, message_id: &str) -> String {
    match operation {
        Operation::Identify => format!("identify:{message_id}"),
        Operation::Track => format!("track:{message_id}"),
    }
}

/// A message id applied within the dedup window, if any.
fn already_seen(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    message_id: Option<&str>,
    policy: &WritePolicy,
    received_at: Timestamp,
) -> Result<Option<SeenMessage>, StoreError> {
    let Some(message_id) = message_id else { return Ok(None) };
    let window_start = received_at.as_micros().saturating_sub(policy.dedup_window_micros);
    Ok(tx.find_message(environment_id, message_id)?.filter(|seen| seen.received_at.as_micros() >= window_start))
}

/// The stored form of one change (serialized straight from the borrowed values).
#[derive(serde::Serialize)]
struct StoredChange<'a> {
    key: &'a str,
    old: &'a Option<serde_json::Value>,
    new: &'a Option<serde_json::Value>,
    at: i64,
}

fn changes_json(changes: &[TraitChange]) -> String {
    let stored: Vec<StoredChange<'_>> = changes
        .iter()
        .map(|change| StoredChange {
            key: &change.key,
            old: &change.old_value,
            new: &change.new_value,
            at: change.updated_at.as_micros(),
        })
        .collect();
    serde_json::to_string(&stored).unwrap_or_else(|_| "[]".to_owned())
}

/// The profile an identify's `anonymous_id` names: one holding it as an anonymous id, or one
/// whose distinct id it is while that profile was never identified (track-only activity).
fn find_anonymous(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    anonymous_id: &str,
) -> Result<Option<StoredProfile>, StoreError> {
    if let Some(profile) = tx.find_by_identifier(environment_id, IdentifierKind::AnonymousId, anonymous_id)? {
        return Ok(Some(profile));
    }
    let by_distinct_id = tx.find_by_identifier(environment_id, IdentifierKind::UserId, anonymous_id)?;
    Ok(by_distinct_id.filter(|profile| !profile.identified))
}

/// Reuses a profile already loaded by a lookup instead of reading it again.
fn take_loaded<const N: usize>(profile_id: &str, loaded: [Option<StoredProfile>; N]) -> Option<StoredProfile> {
    loaded.into_iter().flatten().find(|profile| profile.profile_id == profile_id)
}
