//! The write path carried out inside a backend's transaction: identity resolution for identify
//! and track, message-id deduplication, trait history. Written once for every backend: a backend
//! implements [`IdentityTx`] (lookups and writes on its own tables) and calls [`apply_identify`]
//! or [`apply_track`] for each command, inside one transaction per batch.

use roster_core::flags::Identity;
use roster_core::reserved::{full_name, normalize_email};
use roster_core::{
    DeviceUpdate, ErrorCode, FieldError, IdentifierKind, IdentifyCommand, Limits, LinkInput, LinkTarget, LinkWarning,
    ProfileRef, Timestamp, TrackCommand, TraitChange, TraitSet, plan_link,
};

use crate::StoreError;
use crate::model::{EnvironmentId, IdentifyOutcome, MergeOutcome, ProfileSelector, TrackOutcome, WritePolicy};

/// A profile row as the write path sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredProfile {
    pub profile_id: String,
    pub user_id: Option<String>,
    pub identified: bool,
    pub traits: TraitSet,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Profiles merged into this one over its life (capped by `max_merges_per_profile`).
    pub merge_count: i64,
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
            merge_count: 0,
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

    /// The survivor a merged-away profile id forwards to, if it was merged away.
    fn forwarded_profile_id(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
    ) -> Result<Option<String>, StoreError>;

    /// Writes a profile row, creating it or replacing the stored one.
    fn save_profile(&mut self, environment_id: EnvironmentId, write: &ProfileWrite<'_>) -> Result<(), StoreError>;

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

    /// Moves the events, trait history and devices of `from` to `to`.
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

    /// Every identifier of a profile.
    fn identifiers_of(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
    ) -> Result<Vec<(IdentifierKind, String)>, StoreError>;

    fn is_suppressed(&mut self, environment_id: EnvironmentId, user_id: &str) -> Result<bool, StoreError>;

    fn set_suppressed(
        &mut self,
        environment_id: EnvironmentId,
        user_id: &str,
        suppressed: bool,
        at: Timestamp,
    ) -> Result<(), StoreError>;

    /// Registers or updates a device token on a profile (taking it from whoever held it),
    /// merging `attributes` as a patch.
    fn upsert_device(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
        device: &DeviceUpdate,
        at: Timestamp,
    ) -> Result<(), StoreError>;

    /// Deletes a device of a profile; whether it existed.
    fn delete_device(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
        token: &str,
    ) -> Result<bool, StoreError>;

    /// Deletes a profile and everything about it: identifiers, devices, events, trait history,
    /// forwards to it, segment memberships, identity overrides.
    fn erase_profile(&mut self, environment_id: EnvironmentId, profile_id: &str) -> Result<(), StoreError>;

    /// The segments the profile is a member of now.
    fn open_memberships(&mut self, environment_id: EnvironmentId, profile_id: &str) -> Result<Vec<i64>, StoreError>;

    /// Records that the profile entered a segment at `at`.
    fn enter_segment(
        &mut self,
        environment_id: EnvironmentId,
        segment_id: i64,
        profile_id: &str,
        at: Timestamp,
    ) -> Result<(), StoreError>;

    /// Records that the profile left a segment at `at`.
    fn exit_segment(
        &mut self,
        environment_id: EnvironmentId,
        segment_id: i64,
        profile_id: &str,
        at: Timestamp,
    ) -> Result<(), StoreError>;

    /// Profile ids after `after`, in id order, at most `limit` (for membership recomputation).
    fn profile_ids_after(
        &mut self,
        environment_id: EnvironmentId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
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
            suppressed: false,
            merged_profile_ids: Vec::new(),
            changed_traits: Vec::new(),
            warnings: Vec::new(),
        }));
    }
    if let Some(user_id) = &command.user_id
        && tx.is_suppressed(environment_id, user_id)?
    {
        return Ok(Ok(IdentifyOutcome::suppressed()));
    }
    let user_profile = match command.user_id.as_deref() {
        // A user id merged away explicitly lives on as an anonymous id of the merged person.
        Some(user_id) => match tx.find_by_identifier(environment_id, IdentifierKind::UserId, user_id)? {
            Some(profile) => Some(profile),
            None => tx
                .find_by_identifier(environment_id, IdentifierKind::AnonymousId, user_id)?
                .filter(|profile| profile.identified),
        },
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
    // The anonymous id is already one of the target's identifiers: linking it adds nothing.
    let anonymous_already_linked = matches!(
        (&plan.target, &anonymous_profile),
        (LinkTarget::Existing(target_id), Some(anonymous)) if *target_id == anonymous.profile_id
    );
    let mut profile = match &plan.target {
        LinkTarget::New => StoredProfile::new(tx.new_id(), received_at),
        LinkTarget::Existing(profile_id) => take_loaded(profile_id, [user_profile, anonymous_profile])
            .ok_or_else(|| StoreError::Corrupt(format!("identifier points at missing profile {profile_id}")))?,
    };
    // Calls naming a suppressed person by another identifier (an anonymous id) are dropped too.
    if owner_is_suppressed(tx, environment_id, &profile, command.user_id.as_deref())? {
        return Ok(Ok(IdentifyOutcome::suppressed()));
    }

    let absorbed = match &plan.absorb_profile_id {
        Some(absorbed_id) => Some(
            tx.load_profile(environment_id, absorbed_id)?
                .ok_or_else(|| StoreError::Corrupt(format!("identifier points at missing profile {absorbed_id}")))?,
        ),
        None => None,
    };
    // What the profile was before this identify: one that changes nothing (a flags read with no
    // traits, a resent identity) is not written, so `updated_at` means "last changed".
    let unchanged_profile = (!created).then(|| profile.clone());
    let mut changes: Vec<TraitChange> = Vec::new();
    if let Some(absorbed) = &absorbed {
        if let Err(violation) = check_merge_cap(&profile, absorbed, &policy.limits, "anonymous_id") {
            return Ok(Err(violation));
        }
        changes.extend(absorb_traits(&mut profile, absorbed));
    }
    let name_follows_parts = name_is_derived(&profile.traits);
    changes.extend(profile.traits.apply_patch(&command.traits, command.timestamp));
    changes.extend(profile.traits.apply_patch_if_absent(&command.traits_set_once, command.timestamp));
    if name_follows_parts {
        changes.extend(fill_name(&mut profile.traits, &command.traits, command.timestamp));
    }
    match increment_traits(&mut profile.traits, &command.trait_increments, command.timestamp) {
        Ok(incremented) => changes.extend(incremented),
        Err(violation) => return Ok(Err(violation)),
    }
    let adds_identifier = plan.link_anonymous_id.is_some() && !anonymous_already_linked;
    if !created
        && (adds_identifier || absorbed.is_some())
        && let Err(violation) = check_identifier_cap(
            tx,
            environment_id,
            &profile.profile_id,
            absorbed.as_ref(),
            &policy.limits,
            "anonymous_id",
        )?
    {
        return Ok(Err(violation));
    }

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
    let profile_changed = unchanged_profile.as_ref() != Some(&profile) || adds_identifier || absorbed.is_some();
    if profile_changed {
        profile.updated_at = received_at;
        if let Err(violation) = write_profile(tx, environment_id, &profile, &policy.limits)? {
            return Ok(Err(violation));
        }
    }

    let target_id = profile.profile_id.as_str();
    let mut merged_profile_ids = Vec::new();
    if let Some(absorbed) = &absorbed {
        move_absorbed(tx, environment_id, target_id, absorbed, received_at)?;
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
    let mut warnings = plan.warnings;
    if absorbed.is_some() || changes.iter().any(|change| change.key == "email") {
        warnings.extend(reconcile_email(tx, environment_id, &profile)?);
    }
    if let Some(device) = &command.device {
        tx.upsert_device(environment_id, target_id, device, received_at)?;
    }
    if created || !changes.is_empty() || absorbed.is_some() || profile.user_id != previous_user_id {
        refresh_membership(tx, environment_id, &profile, policy, received_at)?;
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
        suppressed: false,
        merged_profile_ids,
        changed_traits: changes.into_iter().map(|change| change.key).collect(),
        warnings,
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
            suppressed: false,
        }));
    }
    if let Some(user_id) = &command.user_id
        && tx.is_suppressed(environment_id, user_id)?
    {
        return Ok(Ok(TrackOutcome::suppressed()));
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
    let found = match (found, &command.anonymous_id) {
        (Some(profile), _) => Some(profile),
        (None, Some(anonymous_id)) => find_anonymous(tx, environment_id, anonymous_id)?,
        (None, None) => None,
    };
    let profile = match found {
        Some(profile) => profile,
        None => {
            let profile = create_unidentified(tx, environment_id, command, received_at)?;
            refresh_membership(tx, environment_id, &profile, policy, received_at)?;
            profile
        }
    };
    if owner_is_suppressed(tx, environment_id, &profile, command.user_id.as_deref())? {
        return Ok(Ok(TrackOutcome::suppressed()));
    }
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
    Ok(Ok(TrackOutcome { event_id, profile_id: profile.profile_id, duplicate: false, suppressed: false }))
}

/// Merges two profiles chosen explicitly (the only way two identified users merge): the secondary's
/// traits merge in by timestamp, its identifiers, events, history and devices move to the primary,
/// its user id becomes an anonymous id of the primary, and its profile id forwards there.
pub fn apply_merge(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    primary: &ProfileSelector,
    secondary: &ProfileSelector,
    policy: &WritePolicy,
    received_at: Timestamp,
) -> Result<Result<MergeOutcome, FieldError>, StoreError> {
    let Some(mut profile) = resolve(tx, environment_id, primary)? else {
        return Ok(Err(FieldError::new(ErrorCode::NotFound, "primary", "names no profile")));
    };
    let Some(absorbed) = resolve(tx, environment_id, secondary)? else {
        return Ok(Err(FieldError::new(ErrorCode::NotFound, "secondary", "names no profile")));
    };
    if absorbed.profile_id == profile.profile_id {
        return Ok(Err(FieldError::new(ErrorCode::InvalidType, "secondary", "names the same profile as `primary`")));
    }
    if let Err(violation) = check_merge_cap(&profile, &absorbed, &policy.limits, "secondary") {
        return Ok(Err(violation));
    }
    if let Err(violation) =
        check_identifier_cap(tx, environment_id, &profile.profile_id, Some(&absorbed), &policy.limits, "secondary")?
    {
        return Ok(Err(violation));
    }
    let changes = absorb_traits(&mut profile, &absorbed);
    // A primary known only anonymously takes the secondary's user id instead of demoting it.
    let inherited_user_id = match &profile.user_id {
        None => absorbed.user_id.clone(),
        Some(_) => None,
    };
    if inherited_user_id.is_some() {
        profile.user_id = inherited_user_id.clone();
    }
    profile.identified |= absorbed.identified;
    profile.updated_at = received_at;
    if let Err(violation) = write_profile(tx, environment_id, &profile, &policy.limits)? {
        return Ok(Err(violation));
    }
    let absorbed_identifiers = tx.identifiers_of(environment_id, &absorbed.profile_id)?;
    move_absorbed(tx, environment_id, &profile.profile_id, &absorbed, received_at)?;
    if let Some(user_id) = &inherited_user_id {
        tx.delete_identifier(environment_id, IdentifierKind::AnonymousId, user_id)?;
        tx.put_identifier(environment_id, IdentifierKind::UserId, user_id, &profile.profile_id)?;
    }
    if let Some(user_id) = &profile.user_id {
        tx.set_events_distinct_id(environment_id, &profile.profile_id, user_id)?;
    }
    reconcile_email(tx, environment_id, &profile)?;
    refresh_membership(tx, environment_id, &profile, policy, received_at)?;
    if !changes.is_empty() {
        tx.record_trait_changes(environment_id, &profile.profile_id, &changes_json(&changes), received_at)?;
    }
    // Reported as the survivor holds them now: a demoted user id as an anonymous id, and an email
    // the survivor could not keep (it has an email of its own) not at all.
    let moved_identifiers = tx
        .identifiers_of(environment_id, &profile.profile_id)?
        .into_iter()
        .filter(|(kind, value)| {
            absorbed_identifiers.iter().any(|(absorbed_kind, absorbed_value)| {
                absorbed_value == value
                    && (absorbed_kind == kind
                        || (*absorbed_kind == IdentifierKind::UserId && *kind == IdentifierKind::AnonymousId))
            })
        })
        .collect();
    Ok(Ok(MergeOutcome {
        profile_id: profile.profile_id,
        merged_profile_id: absorbed.profile_id,
        moved_identifiers,
        changed_traits: changes.into_iter().map(|change| change.key).collect(),
    }))
}

/// Changes a profile's user id and/or email (the "update identifiers" case): the profile id,
/// traits, devices and events stay. An identifier held by another profile is refused.
pub fn apply_identifier_change(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    profile_id: &str,
    new_user_id: Option<&str>,
    new_email: Option<&str>,
    policy: &WritePolicy,
    received_at: Timestamp,
) -> Result<Result<String, FieldError>, StoreError> {
    let Some(mut profile) = resolve(tx, environment_id, &ProfileSelector::ProfileId(profile_id.to_owned()))? else {
        return Ok(Err(FieldError::new(ErrorCode::NotFound, "profile_id", format!("no profile `{profile_id}`"))));
    };
    if let Some(new_user_id) = new_user_id {
        if let Err(invalid) = policy.limits.validate_identifier(new_user_id, "user_id") {
            return Ok(Err(invalid));
        }
        // Moving a profile onto a suppressed id would let its data back in by the side door.
        if profile.user_id.as_deref() != Some(new_user_id) && tx.is_suppressed(environment_id, new_user_id)? {
            return Ok(Err(FieldError::new(
                ErrorCode::IdentifierSuppressed,
                "user_id",
                format!("`{new_user_id}` is suppressed; unsuppress it first"),
            )));
        }
        if let Some(owner) = tx.find_by_identifier(environment_id, IdentifierKind::UserId, new_user_id)?
            && owner.profile_id != profile.profile_id
        {
            return Ok(Err(taken("user_id", new_user_id, &owner.profile_id)));
        }
        if let Some(old) = profile.user_id.take().filter(|old| old != new_user_id) {
            tx.delete_identifier(environment_id, IdentifierKind::UserId, &old)?;
        }
        tx.put_identifier(environment_id, IdentifierKind::UserId, new_user_id, &profile.profile_id)?;
        tx.set_events_distinct_id(environment_id, &profile.profile_id, new_user_id)?;
        profile.user_id = Some(new_user_id.to_owned());
        profile.identified = true;
    }
    let mut changes = Vec::new();
    if let Some(new_email) = new_email {
        let Some(normalized) = normalize_email(new_email) else {
            return Ok(Err(FieldError::new(ErrorCode::InvalidType, "email", "is not an email address")));
        };
        if let Some(owner) = tx.find_by_identifier(environment_id, IdentifierKind::Email, &normalized)?
            && owner.profile_id != profile.profile_id
        {
            return Ok(Err(taken("email", &normalized, &owner.profile_id)));
        }
        changes.extend(profile.traits.apply(
            "email",
            Some(serde_json::Value::String(new_email.trim().to_owned())),
            received_at,
        ));
    }
    profile.updated_at = received_at;
    if let Err(violation) = write_profile(tx, environment_id, &profile, &policy.limits)? {
        return Ok(Err(violation));
    }
    reconcile_email(tx, environment_id, &profile)?;
    refresh_membership(tx, environment_id, &profile, policy, received_at)?;
    if !changes.is_empty() {
        tx.record_trait_changes(environment_id, &profile.profile_id, &changes_json(&changes), received_at)?;
    }
    Ok(Ok(profile.profile_id))
}

/// Registers or updates a device on the profile an id names (following a merged-away id to its
/// survivor); `false` when it names no profile.
pub fn apply_device_upsert(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    profile_id: &str,
    device: &DeviceUpdate,
    at: Timestamp,
) -> Result<bool, StoreError> {
    let Some(profile) = resolve(tx, environment_id, &ProfileSelector::ProfileId(profile_id.to_owned()))? else {
        return Ok(false);
    };
    tx.upsert_device(environment_id, &profile.profile_id, device, at)?;
    Ok(true)
}

/// Deletes a device of the profile an id names (following a merged-away id); whether it existed.
pub fn apply_device_delete(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    profile_id: &str,
    token: &str,
) -> Result<bool, StoreError> {
    let Some(profile) = resolve(tx, environment_id, &ProfileSelector::ProfileId(profile_id.to_owned()))? else {
        return Ok(false);
    };
    tx.delete_device(environment_id, &profile.profile_id, token)
}

/// Erases the profile a selector names and everything about it; the erased id, if any.
pub fn apply_erase(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    selector: &ProfileSelector,
) -> Result<Option<String>, StoreError> {
    let Some(profile) = resolve(tx, environment_id, selector)? else { return Ok(None) };
    tx.erase_profile(environment_id, &profile.profile_id)?;
    Ok(Some(profile.profile_id))
}

/// Brings a profile's segment memberships up to date with its traits and identity: entries and
/// exits are recorded at `at`. Does nothing when the environment has no segments.
pub fn refresh_membership(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    profile: &StoredProfile,
    policy: &WritePolicy,
    at: Timestamp,
) -> Result<(), StoreError> {
    let Some(evaluator) = policy.segments.as_deref() else { return Ok(()) };
    // Deleting a segment deletes its memberships, so with no segments there is nothing to close.
    if evaluator.segment_count() == 0 {
        return Ok(());
    }
    let open = tx.open_memberships(environment_id, &profile.profile_id)?;
    let traits = profile.traits.live_values();
    let identity = Identity {
        identifier: membership_identifier(profile),
        profile_id: Some(&profile.profile_id),
        traits: &traits,
        transient_traits: None,
    };
    let wanted = evaluator.segment_ids_of(&identity);
    for segment_id in wanted.iter().filter(|segment_id| !open.contains(segment_id)) {
        tx.enter_segment(environment_id, *segment_id, &profile.profile_id, at)?;
    }
    for segment_id in open.iter().filter(|segment_id| !wanted.contains(segment_id)) {
        tx.exit_segment(environment_id, *segment_id, &profile.profile_id, at)?;
    }
    Ok(())
}

/// The identifier segment membership is evaluated with: the user id, or for a profile known only
/// anonymously its profile id (stable, unlike which of its anonymous ids a call names).
pub fn membership_identifier(profile: &StoredProfile) -> &str {
    profile.user_id.as_deref().unwrap_or(&profile.profile_id)
}

/// Re-evaluates the memberships of one page of profiles (after `after`, at most `limit`): the
/// background step that follows a segment change. Returns how many were processed and the cursor
/// for the next page (`None` when done).
pub fn apply_membership_refresh(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    policy: &WritePolicy,
    after: Option<&str>,
    limit: usize,
    at: Timestamp,
) -> Result<(usize, Option<String>), StoreError> {
    let profile_ids = tx.profile_ids_after(environment_id, after, limit)?;
    for profile_id in &profile_ids {
        if let Some(profile) = tx.load_profile(environment_id, profile_id)? {
            refresh_membership(tx, environment_id, &profile, policy, at)?;
        }
    }
    let next = if profile_ids.len() < limit { None } else { profile_ids.last().cloned() };
    Ok((profile_ids.len(), next))
}

fn taken(field: &str, value: &str, owner: &str) -> FieldError {
    FieldError::new(ErrorCode::IdentifierTaken, field, format!("`{value}` already identifies profile {owner}"))
}

/// The profile a selector names, if any.
pub fn resolve(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    selector: &ProfileSelector,
) -> Result<Option<StoredProfile>, StoreError> {
    match selector {
        ProfileSelector::ProfileId(profile_id) => {
            if let Some(profile) = tx.load_profile(environment_id, profile_id)? {
                return Ok(Some(profile));
            }
            // A merged-away id stands for its survivor, for writes as for reads.
            match tx.forwarded_profile_id(environment_id, profile_id)? {
                Some(survivor_id) => tx.load_profile(environment_id, &survivor_id),
                None => Ok(None),
            }
        }
        ProfileSelector::Identifier(IdentifierKind::Email, email) => match normalize_email(email) {
            Some(normalized) => tx.find_by_identifier(environment_id, IdentifierKind::Email, &normalized),
            None => Ok(None),
        },
        ProfileSelector::Identifier(kind, value) => tx.find_by_identifier(environment_id, *kind, value),
    }
}

/// Serializes a profile, checks the profile limits on the bytes that will be stored, and writes it.
fn write_profile(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    profile: &StoredProfile,
    limits: &Limits,
) -> Result<Result<(), FieldError>, StoreError> {
    let traits_json = profile.traits.live_values_json();
    let trait_timestamps_json = profile.traits.timestamps_json();
    // Tombstones count towards the stored size, so deletes of made-up keys cannot grow a profile
    // without bound.
    let stored_bytes = traits_json.len() + trait_timestamps_json.len();
    if let Err(violation) = limits.validate_profile(profile.traits.live_count(), stored_bytes) {
        return Ok(Err(violation));
    }
    tx.save_profile(environment_id, &ProfileWrite { profile, traits_json, trait_timestamps_json })?;
    Ok(Ok(()))
}

fn check_merge_cap(
    profile: &StoredProfile,
    absorbed: &StoredProfile,
    limits: &Limits,
    field: &str,
) -> Result<(), FieldError> {
    let merges = profile.merge_count + absorbed.merge_count + 1;
    if usize::try_from(merges).unwrap_or(usize::MAX) > limits.max_merges_per_profile {
        return Err(FieldError::new(
            ErrorCode::TooManyMerges,
            field,
            format!(
                "merging would make {merges} merges into profile {}; the limit is {} per profile",
                profile.profile_id, limits.max_merges_per_profile
            ),
        ));
    }
    Ok(())
}

/// Refuses a link or merge that would leave the profile with more identifiers than the cap
/// (counting the absorbed profile's identifiers, or else the one new anonymous id).
fn check_identifier_cap(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    profile_id: &str,
    absorbed: Option<&StoredProfile>,
    limits: &Limits,
    field: &str,
) -> Result<Result<(), FieldError>, StoreError> {
    let mut count = tx.identifiers_of(environment_id, profile_id)?.len();
    match absorbed {
        // The absorbed profile's identifiers (the linked anonymous id among them) all move over.
        Some(absorbed) => count += tx.identifiers_of(environment_id, &absorbed.profile_id)?.len(),
        None => count += 1,
    }
    if count > limits.max_identifiers_per_profile {
        return Ok(Err(FieldError::new(
            ErrorCode::TooManyIdentifiers,
            field,
            format!(
                "profile {profile_id} would hold {count} identifiers; the limit is {} per profile",
                limits.max_identifiers_per_profile
            ),
        )));
    }
    Ok(Ok(()))
}

/// Merges an absorbed profile's traits and counters into the survivor; returns the trait changes.
fn absorb_traits(profile: &mut StoredProfile, absorbed: &StoredProfile) -> Vec<TraitChange> {
    profile.created_at = profile.created_at.min(absorbed.created_at);
    profile.merge_count += absorbed.merge_count + 1;
    profile.traits.merge(&absorbed.traits)
}

/// Moves everything of an absorbed profile to the survivor and retires it. Its user id becomes an
/// anonymous id of the survivor, so its later calls still land on the same person.
fn move_absorbed(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    target_id: &str,
    absorbed: &StoredProfile,
    at: Timestamp,
) -> Result<(), StoreError> {
    // The absorbed profile's stints end here; its history moves with its other activity and the
    // survivor's memberships are re-evaluated by the caller.
    for segment_id in tx.open_memberships(environment_id, &absorbed.profile_id)? {
        tx.exit_segment(environment_id, segment_id, &absorbed.profile_id, at)?;
    }
    if let Some(absorbed_user_id) = &absorbed.user_id {
        tx.delete_identifier(environment_id, IdentifierKind::UserId, absorbed_user_id)?;
        tx.put_identifier(environment_id, IdentifierKind::AnonymousId, absorbed_user_id, target_id)?;
    }
    tx.move_identifiers(environment_id, &absorbed.profile_id, target_id)?;
    tx.move_activity(environment_id, &absorbed.profile_id, target_id)?;
    tx.retire_profile(environment_id, &absorbed.profile_id, target_id)
}

/// Adds each increment to its trait (a missing trait counts as 0). The sum is written just after
/// the trait's current timestamp when that is newer than the command's, so an increment is never
/// lost to ordering.
fn increment_traits(
    traits: &mut TraitSet,
    increments: &serde_json::Map<String, serde_json::Value>,
    at: Timestamp,
) -> Result<Vec<TraitChange>, FieldError> {
    let mut changes = Vec::new();
    for (key, increment) in increments {
        let entry = traits.get(key);
        let current = entry.and_then(|entry| entry.value.clone()).unwrap_or(serde_json::json!(0));
        let sum = match (current.as_i64(), increment.as_i64()) {
            (Some(current), Some(increment)) => current.checked_add(increment).map(serde_json::Value::from),
            _ => match (current.as_f64(), increment.as_f64()) {
                (Some(current), Some(increment)) => serde_json::Number::from_f64(current + increment).map(Into::into),
                _ => {
                    return Err(FieldError::new(
                        ErrorCode::InvalidType,
                        roster_core::error::join_path("trait_increments", key),
                        format!("trait `{key}` holds {current}, which is not a number"),
                    ));
                }
            },
        };
        let Some(sum) = sum else {
            return Err(FieldError::new(
                ErrorCode::InvalidType,
                roster_core::error::join_path("trait_increments", key),
                "the sum is out of range",
            ));
        };
        let written_at = match entry.map(|entry| entry.updated_at) {
            Some(current_at) if current_at >= at => Timestamp::from_micros(current_at.as_micros().saturating_add(1)),
            _ => at,
        };
        changes.extend(traits.apply(key, Some(sum), written_at));
    }
    Ok(changes)
}

/// Whether the profile's `name` may be (re)computed from its parts: it has none, or the one it has
/// is exactly what its current `first_name`/`last_name` make (so a name the user chose is kept).
fn name_is_derived(traits: &TraitSet) -> bool {
    let Some(name) = traits.get("name").and_then(|entry| entry.value.as_ref()) else { return true };
    let first = traits.get("first_name").and_then(|entry| entry.value.as_ref());
    let last = traits.get("last_name").and_then(|entry| entry.value.as_ref());
    full_name(first, last).is_some_and(|derived| name.as_str() == Some(derived.as_str()))
}

/// `name` from `first_name`/`last_name` when the patch sets either and does not send `name`.
fn fill_name(
    traits: &mut TraitSet,
    patch: &serde_json::Map<String, serde_json::Value>,
    at: Timestamp,
) -> Option<TraitChange> {
    if patch.contains_key("name") || !(patch.contains_key("first_name") || patch.contains_key("last_name")) {
        return None;
    }
    let first = traits.get("first_name").and_then(|entry| entry.value.clone());
    let last = traits.get("last_name").and_then(|entry| entry.value.clone());
    let name = full_name(first.as_ref(), last.as_ref())?;
    traits.apply("name", Some(serde_json::Value::String(name)), at)
}

/// Makes the profile's email identifier match its `email` trait: drops stale email identifiers,
/// claims the current one unless another profile holds it (then a warning).
fn reconcile_email(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    profile: &StoredProfile,
) -> Result<Vec<LinkWarning>, StoreError> {
    let wanted = profile
        .traits
        .get("email")
        .and_then(|entry| entry.value.as_ref())
        .and_then(serde_json::Value::as_str)
        .and_then(normalize_email);
    let held: Vec<String> = tx
        .identifiers_of(environment_id, &profile.profile_id)?
        .into_iter()
        .filter(|(kind, _)| *kind == IdentifierKind::Email)
        .map(|(_, value)| value)
        .collect();
    for stale in held.iter().filter(|value| Some(*value) != wanted.as_ref()) {
        tx.delete_identifier(environment_id, IdentifierKind::Email, stale)?;
    }
    let Some(wanted) = wanted else { return Ok(Vec::new()) };
    if held.contains(&wanted) {
        return Ok(Vec::new());
    }
    match tx.find_by_identifier(environment_id, IdentifierKind::Email, &wanted)? {
        Some(owner) if owner.profile_id != profile.profile_id => {
            Ok(vec![LinkWarning::EmailOwnedByOtherProfile { email: wanted, owner_profile_id: owner.profile_id }])
        }
        _ => {
            tx.put_identifier(environment_id, IdentifierKind::Email, &wanted, &profile.profile_id)?;
            Ok(Vec::new())
        }
    }
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
    tx.save_profile(environment_id, &write)?;
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

/// The profile an identify's `anonymous_id` names: one holding it as an anonymous id, or one whose
/// user id it is.
fn find_anonymous(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    anonymous_id: &str,
) -> Result<Option<StoredProfile>, StoreError> {
    if let Some(profile) = tx.find_by_identifier(environment_id, IdentifierKind::AnonymousId, anonymous_id)? {
        return Ok(Some(profile));
    }
    // A user id named as an anonymous id: a track-only distinct id merges in; an identified
    // user's id makes the linking rules answer with a warning instead of linking it twice.
    tx.find_by_identifier(environment_id, IdentifierKind::UserId, anonymous_id)
}

/// Whether the profile's own user id is suppressed (`already_checked` was checked by the caller).
fn owner_is_suppressed(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    profile: &StoredProfile,
    already_checked: Option<&str>,
) -> Result<bool, StoreError> {
    match profile.user_id.as_deref() {
        Some(owner) if Some(owner) != already_checked => tx.is_suppressed(environment_id, owner),
        _ => Ok(false),
    }
}

/// Reuses a profile already loaded by a lookup instead of reading it again.
fn take_loaded<const N: usize>(profile_id: &str, loaded: [Option<StoredProfile>; N]) -> Option<StoredProfile> {
    loaded.into_iter().flatten().find(|profile| profile.profile_id == profile_id)
}
