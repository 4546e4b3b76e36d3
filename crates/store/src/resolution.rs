//! Identity resolution carried out inside a backend's transaction. Written once for every
//! backend: a backend implements [`IdentityTx`] (lookups and writes on its own tables) and calls
//! [`apply_identify`] for each command, inside one transaction per batch.

use roster_core::{
    FieldError, IdentifierKind, IdentifyCommand, Limits, LinkInput, LinkTarget, ProfileRef, Timestamp, TraitSet,
    plan_link,
};

use crate::StoreError;
use crate::model::{EnvironmentId, IdentifyOutcome};

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
}

/// A profile row ready to be written: traits already serialized, so the size limit is checked on
/// exactly the bytes that will be stored.
pub struct ProfileWrite<'a> {
    pub profile: &'a StoredProfile,
    pub traits_json: String,
    pub trait_timestamps_json: String,
}

/// The lookups and writes resolution needs, implemented by each backend on its open transaction.
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

    /// A new, never reused profile id.
    fn new_profile_id(&mut self) -> String;
}

/// Applies one identify. A `FieldError` means the item was rejected before anything was written;
/// a `StoreError` means the transaction must be abandoned.
pub fn apply_identify(
    tx: &mut impl IdentityTx,
    environment_id: EnvironmentId,
    command: &IdentifyCommand,
    limits: &Limits,
    received_at: Timestamp,
) -> Result<Result<IdentifyOutcome, FieldError>, StoreError> {
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
        LinkTarget::New => StoredProfile {
            profile_id: tx.new_profile_id(),
            user_id: None,
            identified: false,
            traits: TraitSet::new(),
            created_at: received_at,
            updated_at: received_at,
        },
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
    if let Some(absorbed) = &absorbed {
        profile.traits.merge(&absorbed.traits);
        profile.created_at = profile.created_at.min(absorbed.created_at);
    }

    let mut changed_traits = profile.traits.apply_patch(&command.traits, command.timestamp);
    changed_traits.extend(profile.traits.apply_patch_if_absent(&command.traits_set_once, command.timestamp));

    // A distinct id that was never identified (track-only activity) stays linked as a device id
    // when the profile gets its real user id.
    let demoted_user_id = match &plan.set_user_id {
        Some(new_user_id) if profile.user_id.as_deref() != Some(new_user_id) => profile.user_id.take(),
        _ => None,
    };
    if let Some(new_user_id) = &plan.set_user_id {
        profile.user_id = Some(new_user_id.clone());
    }
    profile.identified |= plan.mark_identified;
    profile.updated_at = received_at;

    let traits_json = profile.traits.live_values_json();
    if let Err(violation) = limits.validate_profile(profile.traits.live_count(), traits_json.len()) {
        return Ok(Err(violation));
    }
    let trait_timestamps_json = profile.traits.timestamps_json();

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

    Ok(Ok(IdentifyOutcome {
        profile_id: profile.profile_id,
        created,
        merged_profile_ids,
        changed_traits,
        warnings: plan.warnings,
    }))
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
