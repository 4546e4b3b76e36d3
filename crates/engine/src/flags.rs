//! Segments, feature flags and their evaluation.
//!
//! Each environment's configuration is compiled once per change into an immutable
//! [`Evaluator`]; all compiled environments sit in one map behind an [`ArcSwap`], so an
//! evaluation loads a pointer, evaluates, and never takes a lock. A change (through this node)
//! recompiles and swaps the whole map; a node that shares its database with others notices
//! changes made elsewhere by the configuration's version (see `refresh_stale_flags`).
//!
//! Segment membership is tracked by the write path itself (every write that changes a profile
//! re-evaluates it, in its transaction); a segment change additionally starts a background pass
//! over the environment's existing profiles, whose progress the segment's view reports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use roster_core::flags::{
    Evaluator, FeatureDefinition, FlagConfig, Identity, IdentityOverride, Reason, SegmentDefinition, validate_feature,
    validate_identity_override, validate_segment,
};
use roster_store::model::EnvironmentId;
use roster_store::{MemberPage, Store, WritePolicy};
use serde_json::{Map, Value};

use crate::{Engine, EngineError, EngineResult, IdentifyInput, Principal, now};

/// Profiles re-evaluated per write transaction by the background pass (bounds how long it holds
/// the writer).
const MEMBERSHIP_PAGE: usize = 500;

/// One environment's compiled flags.
#[derive(Debug)]
pub struct CompiledFlags {
    /// The store's configuration version this was compiled from.
    pub version: i64,
    pub config: FlagConfig,
    /// Shared with write policies, which track segment membership with it.
    pub evaluator: Arc<Evaluator>,
}

/// Where the background membership pass of an environment stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MembershipProgress {
    /// `computing` while the pass runs, `ready` when memberships match the current segments.
    pub state: &'static str,
    pub profiles_processed: u64,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: Option<String>,
}

/// Compiled flags of every environment seen so far, and the bookkeeping of changes.
#[derive(Default)]
pub(crate) struct FlagState {
    compiled: ArcSwap<HashMap<EnvironmentId, Arc<CompiledFlags>>>,
    /// Serialises configuration changes with their recompilation, so an older compile never
    /// replaces a newer one.
    changes: tokio::sync::Mutex<()>,
    /// Background membership passes: progress, and a generation that makes an older pass stop
    /// when a newer change starts another.
    passes: Arc<Mutex<HashMap<EnvironmentId, (u64, MembershipProgress)>>>,
}

/// A segment as the management API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegmentView {
    pub id: i64,
    #[serde(flatten)]
    pub definition: SegmentDefinition,
    pub membership: Option<MembershipProgress>,
}

/// A feature as the management API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FeatureView {
    pub id: i64,
    #[serde(flatten)]
    pub definition: FeatureDefinition,
}

/// One flag in an evaluation's answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlagAnswer {
    pub feature_id: i64,
    pub feature: String,
    pub enabled: bool,
    pub value: Value,
    pub variant: Option<String>,
    /// `IDENTITY_OVERRIDE`, `TARGETING_MATCH; segment=…`, `SPLIT; weight=…`, `DEFAULT` or `STATIC`.
    pub reason: String,
}

/// Where an evaluation's answer goes, which decides what of the stored profile it may show a
/// client key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerSurface {
    /// Roster's own `/v1/flags`: a client key sees no stored data it did not send.
    Native,
    /// Flagsmith's identities endpoint: Flagsmith answers with the identity's stored traits and
    /// its client SDKs read them, so client keys see them unless the environment's
    /// `flagsmith_client_key_reads_traits` setting is off.
    FlagsmithIdentity,
}

/// An evaluation's answer: every flag, and the segments the identity is in.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlagsAnswer {
    /// The profile the identify landed on (`None` for the environment defaults, or when the
    /// user id is suppressed and nothing was stored).
    pub profile_id: Option<String>,
    /// The traits the evaluation used (stored ones; transient ones are not listed). For a client
    /// key that may not read stored traits: only the traits its request sent.
    pub traits: Map<String, Value>,
    pub flags: Vec<FlagAnswer>,
    pub segments: Vec<SegmentRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SegmentRef {
    pub id: i64,
    pub name: String,
}

fn reason_text(reason: Reason<'_>) -> String {
    match reason {
        Reason::IdentityOverride => "IDENTITY_OVERRIDE".into(),
        Reason::TargetingMatch { segment } => format!("TARGETING_MATCH; segment={segment}"),
        Reason::Split { weight } => format!("SPLIT; weight={weight}"),
        Reason::Default => "DEFAULT".into(),
        Reason::Static => "STATIC".into(),
    }
}

impl Engine {
    /// The environment's compiled flags: from the shared map (no lock), compiled on first use.
    pub(crate) async fn compiled_flags(&self, environment_id: EnvironmentId) -> EngineResult<Arc<CompiledFlags>> {
        if let Some(compiled) = self.flags.compiled.load().get(&environment_id) {
            return Ok(Arc::clone(compiled));
        }
        self.recompile(environment_id).await
    }

    /// Reloads and recompiles one environment's flags and swaps them in.
    async fn recompile(&self, environment_id: EnvironmentId) -> EngineResult<Arc<CompiledFlags>> {
        let record = self.store.flag_config(environment_id).await?;
        let evaluator = Evaluator::compile(&record.config)
            .map_err(|error| EngineError::Store(roster_store::StoreError::Corrupt(error.to_string())))?;
        let compiled =
            Arc::new(CompiledFlags { version: record.version, config: record.config, evaluator: Arc::new(evaluator) });
        self.flags.compiled.rcu(|current| {
            let mut next = HashMap::clone(current);
            let keep_newer = next.get(&environment_id).is_some_and(|existing| existing.version > compiled.version);
            if !keep_newer {
                next.insert(environment_id, Arc::clone(&compiled));
            }
            next
        });
        Ok(compiled)
    }

    /// Recompiles every environment whose stored configuration moved past the compiled one
    /// (changed through another node sharing the database). Returns how many were recompiled.
    pub async fn refresh_stale_flags(&self) -> EngineResult<usize> {
        let compiled = self.flags.compiled.load_full();
        let mut refreshed = 0;
        for (environment_id, flags) in compiled.iter() {
            if self.store.flags_version(*environment_id).await? != flags.version {
                self.recompile(*environment_id).await?;
                refreshed += 1;
            }
        }
        Ok(refreshed)
    }

    /// Every `every`, for as long as the engine lives, reloads environments and keys and
    /// recompiles flags changed elsewhere: how nodes sharing one database pick up configuration
    /// changed through the others (within `every` plus one round trip).
    pub fn spawn_shared_state_refresh(self: &Arc<Self>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                let Some(engine) = engine.upgrade() else { return };
                if let Err(error) = engine.reload_keys().await {
                    tracing::warn!(%error, "reloading environments and keys failed");
                }
                match engine.refresh_stale_flags().await {
                    Ok(0) => {}
                    Ok(refreshed) => tracing::info!(refreshed, "recompiled flags changed by another node"),
                    Err(error) => tracing::warn!(%error, "checking for flag changes failed"),
                }
            }
        })
    }

    /// The write policy of an environment: limits, dedup window, and its segments for
    /// membership tracking.
    pub(crate) async fn write_policy(&self, environment_id: EnvironmentId) -> EngineResult<WritePolicy> {
        let compiled = self.compiled_flags(environment_id).await?;
        let mut policy = self.config.base_write_policy();
        policy.segments = Some(Arc::clone(&compiled.evaluator));
        Ok(policy)
    }

    pub async fn list_segments(&self, principal: &Principal) -> EngineResult<Vec<SegmentView>> {
        let environment = principal.require_server()?;
        let compiled = self.compiled_flags(environment.id).await?;
        let progress = self.membership_progress(environment.id);
        Ok(compiled
            .config
            .segments
            .iter()
            .map(|segment| SegmentView {
                id: segment.id,
                definition: segment.definition.clone(),
                membership: progress.clone(),
            })
            .collect())
    }

    pub async fn segment(&self, principal: &Principal, segment_id: i64) -> EngineResult<SegmentView> {
        self.list_segments(principal)
            .await?
            .into_iter()
            .find(|segment| segment.id == segment_id)
            .ok_or_else(|| EngineError::NotFound(format!("no segment {segment_id} in this environment")))
    }

    /// Creates (`segment_id` `None`) or replaces a segment. Its rules are checked first: a rule
    /// that could not be evaluated is refused here, never at evaluation. Membership of existing
    /// profiles is then recomputed in the background.
    pub async fn save_segment(
        &self,
        principal: &Principal,
        segment_id: Option<i64>,
        definition: SegmentDefinition,
    ) -> EngineResult<SegmentView> {
        let environment = principal.require_server()?;
        validate_segment(&definition)?;
        let _serialised = self.flags.changes.lock().await;
        let saved = self.store.save_segment(environment.id, segment_id, definition).await??;
        self.recompile(environment.id).await?;
        self.start_membership_pass(environment.id).await?;
        tracing::info!(environment = %environment.slug, segment_id = saved, "saved segment");
        drop(_serialised);
        self.segment(principal, saved).await
    }

    pub async fn delete_segment(&self, principal: &Principal, segment_id: i64) -> EngineResult<()> {
        let environment = principal.require_server()?;
        let _serialised = self.flags.changes.lock().await;
        if !self.store.delete_segment(environment.id, segment_id).await?? {
            return Err(EngineError::NotFound(format!("no segment {segment_id} in this environment")));
        }
        self.recompile(environment.id).await?;
        Ok(())
    }

    pub async fn list_features(&self, principal: &Principal) -> EngineResult<Vec<FeatureView>> {
        let environment = principal.require_server()?;
        let compiled = self.compiled_flags(environment.id).await?;
        Ok(compiled
            .config
            .features
            .iter()
            .map(|feature| FeatureView { id: feature.id, definition: feature.definition.clone() })
            .collect())
    }

    pub async fn feature(&self, principal: &Principal, feature_id: i64) -> EngineResult<FeatureView> {
        self.list_features(principal)
            .await?
            .into_iter()
            .find(|feature| feature.id == feature_id)
            .ok_or_else(|| EngineError::NotFound(format!("no feature {feature_id} in this environment")))
    }

    /// Creates (`feature_id` `None`) or replaces a feature.
    pub async fn save_feature(
        &self,
        principal: &Principal,
        feature_id: Option<i64>,
        definition: FeatureDefinition,
    ) -> EngineResult<FeatureView> {
        let environment = principal.require_server()?;
        validate_feature(&definition)?;
        let _serialised = self.flags.changes.lock().await;
        let saved = self.store.save_feature(environment.id, feature_id, definition).await??;
        self.recompile(environment.id).await?;
        tracing::info!(environment = %environment.slug, feature_id = saved, "saved feature");
        drop(_serialised);
        self.feature(principal, saved).await
    }

    pub async fn delete_feature(&self, principal: &Principal, feature_id: i64) -> EngineResult<()> {
        let environment = principal.require_server()?;
        let _serialised = self.flags.changes.lock().await;
        if !self.store.delete_feature(environment.id, feature_id).await? {
            return Err(EngineError::NotFound(format!("no feature {feature_id} in this environment")));
        }
        self.recompile(environment.id).await?;
        Ok(())
    }

    /// Overrides a feature for one profile (above every segment override). Returns the profile
    /// id it landed on (a merged-away id forwards).
    pub async fn put_identity_override(
        &self,
        principal: &Principal,
        profile_id: &str,
        feature_id: i64,
        state: IdentityOverride,
    ) -> EngineResult<String> {
        let environment = principal.require_server()?;
        validate_identity_override(&state)?;
        let _serialised = self.flags.changes.lock().await;
        let landed = self.store.put_identity_override(environment.id, profile_id, feature_id, state).await??;
        self.recompile(environment.id).await?;
        Ok(landed)
    }

    pub async fn delete_identity_override(
        &self,
        principal: &Principal,
        profile_id: &str,
        feature_id: i64,
    ) -> EngineResult<()> {
        let environment = principal.require_server()?;
        let _serialised = self.flags.changes.lock().await;
        if !self.store.delete_identity_override(environment.id, profile_id, feature_id).await? {
            return Err(EngineError::NotFound(format!(
                "profile `{profile_id}` has no override of feature {feature_id}"
            )));
        }
        self.recompile(environment.id).await?;
        Ok(())
    }

    /// A segment's current members (server key).
    pub async fn segment_members(
        &self,
        principal: &Principal,
        segment_id: i64,
        after: Option<String>,
        limit: usize,
    ) -> EngineResult<MemberPage> {
        let environment = principal.require_server()?;
        self.segment(principal, segment_id).await?;
        Ok(self.store.segment_members(environment.id, segment_id, after, limit).await?)
    }

    /// Identifies, then evaluates every flag for that identity with its full stored traits (and
    /// the transient ones, which are used and not stored). Client keys may call it for the
    /// identity they name.
    pub async fn identify_and_evaluate(
        &self,
        principal: &Principal,
        input: IdentifyInput,
        transient_traits: Map<String, Value>,
        surface: AnswerSurface,
    ) -> EngineResult<FlagsAnswer> {
        let environment = principal.require_environment()?;
        self.config.limits.validate_trait_patch(&transient_traits, "transient_traits")?;
        let identifier = input.user_id.clone().or_else(|| input.anonymous_id.clone());
        let sent_traits = input.traits.clone();
        let outcome = self.identify(principal, vec![Ok(input)]).await?.remove(0)?;
        let compiled = self.compiled_flags(environment.id).await?;
        let identifier = identifier.unwrap_or_default();
        if outcome.suppressed {
            // Nothing is stored for a suppressed user; flags still answer from what was sent.
            let identity = Identity {
                identifier: &identifier,
                profile_id: None,
                traits: &sent_traits,
                transient_traits: Some(&transient_traits),
            };
            return Ok(answer(&compiled, Some(&identity), None, sent_traits.clone()));
        }
        let profile = self.store.profile(environment.id, &outcome.profile_id).await?.ok_or_else(|| {
            EngineError::NotFound(format!("profile `{}` vanished during evaluation", outcome.profile_id))
        })?;
        let identifier = profile.user_id.clone().unwrap_or(identifier);
        let identity = Identity {
            identifier: &identifier,
            profile_id: Some(&profile.profile_id),
            traits: &profile.traits,
            transient_traits: Some(&transient_traits),
        };
        let full = answer(&compiled, Some(&identity), Some(profile.profile_id.clone()), profile.traits.clone());
        Ok(visible_to(full, principal, &sent_traits, surface))
    }

    /// Evaluates flags for an identity that is not stored (Flagsmith's transient identities):
    /// only the traits given count, nothing is written.
    pub async fn evaluate_transient(
        &self,
        principal: &Principal,
        identifier: &str,
        traits: Map<String, Value>,
    ) -> EngineResult<FlagsAnswer> {
        let environment = principal.require_environment()?;
        self.config.limits.validate_identifier(identifier, "identifier")?;
        self.config.limits.validate_trait_patch(&traits, "traits")?;
        let compiled = self.compiled_flags(environment.id).await?;
        let identity = Identity { identifier, profile_id: None, traits: &traits, transient_traits: None };
        Ok(answer(&compiled, Some(&identity), None, traits.clone()))
    }

    /// The environment's flags with no identity: defaults, and overrides of segments that match
    /// on the environment alone.
    pub async fn default_flags(&self, principal: &Principal) -> EngineResult<FlagsAnswer> {
        let environment = principal.require_environment()?;
        let compiled = self.compiled_flags(environment.id).await?;
        Ok(answer(&compiled, None, None, Map::new()))
    }

    /// The whole environment (features, segments, identity overrides) in Flagsmith's
    /// environment-document format, for SDKs that evaluate locally. Server key.
    pub async fn environment_document(&self, principal: &Principal) -> EngineResult<Value> {
        let environment = principal.require_server()?;
        let compiled = self.compiled_flags(environment.id).await?;
        let mut user_ids = HashMap::new();
        for identity_override in &compiled.config.identity_overrides {
            if !user_ids.contains_key(&identity_override.profile_id)
                && let Some(profile) = self.store.profile(environment.id, &identity_override.profile_id).await?
            {
                user_ids.insert(identity_override.profile_id.clone(), profile.user_id);
            }
        }
        Ok(crate::document::environment_document(&compiled.config, environment.id, &environment.slug, &user_ids))
    }

    /// Membership progress of the environment's last background pass, if one ran.
    fn membership_progress(&self, environment_id: EnvironmentId) -> Option<MembershipProgress> {
        let passes = self.flags.passes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        passes.get(&environment_id).map(|(_, progress)| progress.clone())
    }

    /// Starts re-evaluating every profile of the environment against its current segments; a pass
    /// already running for it stops at its next page.
    async fn start_membership_pass(&self, environment_id: EnvironmentId) -> EngineResult<()> {
        let policy = self.write_policy(environment_id).await?;
        let started_at = now();
        let generation = {
            let mut passes = self.flags.passes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let generation = passes.get(&environment_id).map_or(1, |(generation, _)| generation + 1);
            let progress = MembershipProgress {
                state: "computing",
                profiles_processed: 0,
                started_at: started_at.to_rfc3339(),
                finished_at: None,
            };
            passes.insert(environment_id, (generation, progress));
            generation
        };
        let store = Arc::clone(&self.store);
        let passes = Arc::clone(&self.flags.passes);
        tokio::spawn(async move {
            run_membership_pass(store, passes, environment_id, generation, policy).await;
        });
        Ok(())
    }
}

/// The background pass: pages through the profiles, one write transaction per page.
async fn run_membership_pass(
    store: Arc<dyn Store>,
    passes: Arc<Mutex<HashMap<EnvironmentId, (u64, MembershipProgress)>>>,
    environment_id: EnvironmentId,
    generation: u64,
    policy: WritePolicy,
) {
    let mut after = None;
    loop {
        let still_current = {
            let passes = passes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            passes.get(&environment_id).is_some_and(|(current, _)| *current == generation)
        };
        if !still_current {
            return;
        }
        let page = store.refresh_memberships(environment_id, policy.clone(), after.take(), MEMBERSHIP_PAGE).await;
        let (processed, next) = match page {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(environment_id, %error, "segment membership pass failed; the next segment change retries");
                return;
            }
        };
        let mut passes = passes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some((current, progress)) = passes.get_mut(&environment_id) else { return };
        if *current != generation {
            return;
        }
        progress.profiles_processed += processed as u64;
        if next.is_none() {
            progress.state = "ready";
            progress.finished_at = Some(now().to_rfc3339());
            tracing::info!(environment_id, profiles = progress.profiles_processed, "segment memberships recomputed");
            return;
        }
        after = next;
    }
}

/// What of an answer the caller may see. Server keys see everything. A client key sees no stored
/// data it did not send: the traits its request sent (not the profile's others), and only the
/// segments that decided one of the flags (membership of any other would tell about stored
/// traits) — except where the surface and the environment let it read stored traits.
fn visible_to(
    mut answer: FlagsAnswer,
    principal: &Principal,
    sent_traits: &Map<String, Value>,
    surface: AnswerSurface,
) -> FlagsAnswer {
    let Principal::Client(environment) = principal else { return answer };
    // Profile ids are UUIDv7: one would tell when (and that) the person was first seen.
    answer.profile_id = None;
    if surface == AnswerSurface::FlagsmithIdentity && environment.settings.flagsmith_client_key_reads_traits {
        return answer;
    }
    answer.traits =
        sent_traits.iter().filter(|(_, value)| !value.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
    let deciding: Vec<String> = answer
        .flags
        .iter()
        .filter_map(|flag| flag.reason.strip_prefix("TARGETING_MATCH; segment=").map(str::to_owned))
        .collect();
    answer.segments.retain(|segment| deciding.contains(&segment.name));
    answer
}

fn answer(
    compiled: &CompiledFlags,
    identity: Option<&Identity<'_>>,
    profile_id: Option<String>,
    traits: Map<String, Value>,
) -> FlagsAnswer {
    let evaluation = compiled.evaluator.evaluate(identity);
    let subject = if identity.is_some() { "identity" } else { "environment" };
    metrics::counter!("roster_flag_evaluations_total", "subject" => subject).increment(1);
    FlagsAnswer {
        profile_id,
        traits,
        flags: evaluation
            .flags
            .iter()
            .map(|flag| FlagAnswer {
                feature_id: flag.feature_id(),
                feature: flag.name().to_owned(),
                enabled: flag.enabled(),
                value: flag.value().clone(),
                variant: flag.variant().map(str::to_owned),
                reason: reason_text(flag.reason()),
            })
            .collect(),
        segments: evaluation
            .segments
            .iter()
            .map(|(id, name)| SegmentRef { id: *id, name: (*name).to_owned() })
            .collect(),
    }
}
