//! Roster's engine: the single write path and read path. Every dialect adapter translates its
//! vendor's request into the calls here and the results back; no adapter holds logic of its own.
//!
//! The engine validates input against the configured limits (through `roster-core`), authorises
//! the caller's key for the operation, and hands durable work to the [`Store`].

mod devices;
mod document;
mod flags;
mod keys;
mod query_slots;
mod rejections;
mod settings;

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use std::time::Duration;

use roster_core::reserved::normalize_email;
use roster_core::{
    DeviceUpdate, ErrorCode, FieldError, IdentifierKind, IdentifyCommand, Limits, Timestamp, TrackCommand,
};
use roster_store::{QueryBounds, Store, StoreError, WritePolicy};
use serde_json::{Map, Value};

pub use flags::{
    AnswerSurface, CompiledFlags, FeatureView, FlagAnswer, FlagsAnswer, MembershipProgress, SegmentRef, SegmentView,
};
pub use keys::{Environment, KeyIndex, Principal};
pub use rejections::{REJECTIONS_KEPT, RefusedMessage};
pub use roster_store::{
    Device, EventPage, IdentifyOutcome, MemberPage, MergeOutcome, Profile, ProfileFilter, ProfilePage, ProfileSelector,
    QueryOutput, Rejection, SegmentMember, StoredEvent, TrackOutcome,
};
pub use settings::EnvironmentSettings;

/// Errors of an engine operation, each mapping to one public error (status, code, message).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A user's SQL was refused (not read-only, or reaching beyond the views).
    #[error("{0}")]
    QueryRefused(String),
    /// A user's SQL failed to compile or run.
    #[error("{0}")]
    QueryFailed(String),
    /// A user's SQL hit its time limit.
    #[error("{0}")]
    QueryTimeout(String),
    /// Users' SQL cannot run on this store as configured.
    #[error("{0}")]
    QueryUnavailable(String),
    /// The environment already runs as many queries as it may at once.
    #[error("{0}")]
    TooManyQueries(String),
    #[error("storage failed: {0}")]
    Store(StoreError),
}

impl From<StoreError> for EngineError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::QueryRefused(message) => EngineError::QueryRefused(message),
            StoreError::QueryFailed(message) => EngineError::QueryFailed(message),
            timeout @ StoreError::QueryTimeout(_) => EngineError::QueryTimeout(timeout.to_string()),
            StoreError::QueryUnavailable(message) => EngineError::QueryUnavailable(message),
            StoreError::InvalidInput(message) => EngineError::Invalid(FieldError::new(
                ErrorCode::InvalidType,
                "",
                format!("cannot be stored: {message}"),
            )),
            other => EngineError::Store(other),
        }
    }
}

pub type EngineResult<T> = Result<T, EngineError>;

/// Engine settings that are not the store's.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub limits: Limits,
    /// A resent message id within this window is applied once (Segment's retry window is a day).
    pub dedup_window: Duration,
    /// Trait history older than this is deleted; `None` keeps it forever.
    pub trait_history_retention: Option<Duration>,
    /// Longest a user's SQL may run.
    pub query_timeout: Duration,
    /// Most rows a user's SQL answers; the answer says when it was cut.
    pub query_max_rows: usize,
    /// Users' queries running at once over all environments.
    pub query_concurrency: usize,
    /// Users' queries running at once in one environment (so one cannot starve the others).
    pub query_concurrency_per_environment: usize,
}

/// Queries at once by default: one per core (at least two), half of them for any one environment.
pub fn default_query_concurrency() -> (usize, usize) {
    let total = std::thread::available_parallelism().map_or(2, std::num::NonZero::get).max(2);
    (total, (total / 2).max(1))
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            limits: Limits::default(),
            dedup_window: Duration::from_secs(24 * 3600),
            trait_history_retention: Some(Duration::from_secs(365 * 24 * 3600)),
            query_timeout: Duration::from_secs(10),
            query_max_rows: 10_000,
            query_concurrency: default_query_concurrency().0,
            query_concurrency_per_environment: default_query_concurrency().1,
        }
    }
}

impl EngineConfig {
    /// Limits and dedup window; the environment's segments are added per write (see
    /// `Engine::write_policy`).
    fn base_write_policy(&self) -> WritePolicy {
        WritePolicy {
            limits: self.limits.clone(),
            dedup_window_micros: i64::try_from(self.dedup_window.as_micros()).unwrap_or(i64::MAX),
            segments: None,
        }
    }
}

/// One identify as a dialect hands it over: typed, not yet validated against limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdentifyInput {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub traits: Map<String, Value>,
    pub traits_set_once: Map<String, Value>,
    /// `None` means "now" (receive time).
    pub timestamp: Option<Timestamp>,
    /// The environment slug the caller says it writes to; must be the key's own.
    pub environment: Option<String>,
    /// The client's message id; a resend within the dedup window is applied once.
    pub message_id: Option<String>,
    /// The SDK's context; a `device.token` in it registers that device to the profile.
    pub context: Option<Map<String, Value>>,
    /// Numbers added to numeric traits in the same write.
    pub trait_increments: Map<String, Value>,
}

/// An alias as a dialect hands it over: `previous_id` (an anonymous id or an earlier distinct
/// id) now belongs to `user_id`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AliasInput {
    pub previous_id: Option<String>,
    pub user_id: Option<String>,
    pub timestamp: Option<Timestamp>,
    pub environment: Option<String>,
    pub message_id: Option<String>,
}

/// One tracked event as a dialect hands it over.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackInput {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub event: Option<String>,
    pub properties: Map<String, Value>,
    /// `None` means "now" (receive time).
    pub timestamp: Option<Timestamp>,
    pub environment: Option<String>,
    pub message_id: Option<String>,
    /// The SDK's context; a `device.token` in it refreshes that device's `last_used` (and its
    /// context attributes) on the event's profile.
    pub context: Option<Map<String, Value>>,
}

/// Keys of a new or rotated environment. The server key is only ever shown here: the store keeps
/// its hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EnvironmentKeys {
    pub slug: String,
    pub client_key: String,
    pub server_key: String,
}

/// What first start prints once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BootstrapCredentials {
    pub admin_token: String,
    pub environments: Vec<EnvironmentKeys>,
}

/// The slug of the environment created on first start.
pub const DEFAULT_ENVIRONMENT_SLUG: &str = "development";

pub struct Engine {
    store: Arc<dyn Store>,
    config: EngineConfig,
    /// Keys → environments, rebuilt after every key change; readers clone the `Arc` and never
    /// hold the lock while working.
    key_index: RwLock<Arc<KeyIndex>>,
    /// Serialises key changes with their reload, so a slower reload never installs an older index.
    key_changes: tokio::sync::Mutex<()>,
    /// Compiled segments and flags per environment.
    flags: flags::FlagState,
    /// Turns for users' SQL, fair between environments.
    query_slots: query_slots::QuerySlots,
}

impl Engine {
    /// Builds the engine over `store`, loading the environment keys.
    pub async fn new(store: Arc<dyn Store>, config: EngineConfig) -> EngineResult<Self> {
        let query_slots = query_slots::QuerySlots::new(
            config.query_concurrency,
            config.query_concurrency_per_environment,
            config.query_timeout,
        );
        let engine = Engine {
            store,
            query_slots,
            config,
            key_index: RwLock::new(Arc::new(KeyIndex::default())),
            key_changes: tokio::sync::Mutex::new(()),
            flags: flags::FlagState::default(),
        };
        engine.reload_keys().await?;
        Ok(engine)
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// Issues a new admin token, replacing the old one (which stops working at once): recovery
    /// for whoever runs Roster on the host and lost the token printed at first start. Answers the
    /// new token, shown only here.
    pub async fn reset_admin_token(&self) -> EngineResult<String> {
        let _serialised = self.key_changes.lock().await;
        let admin_token = keys::generate_admin_token();
        if !self.store.replace_admin_token_hash(keys::hash_secret(&admin_token)).await? {
            return Err(EngineError::NotFound("the store has no admin token yet; start or `init` it first".into()));
        }
        self.reload_keys().await?;
        tracing::info!("admin token reset");
        Ok(admin_token)
    }

    /// On an empty store, creates the `development` environment and an admin token and returns
    /// them (the only time the secrets exist in clear). `None` when already bootstrapped.
    pub async fn bootstrap_if_empty(&self) -> EngineResult<Option<BootstrapCredentials>> {
        if self.store.admin_token_hash().await?.is_some() {
            return Ok(None);
        }
        let _serialised = self.key_changes.lock().await;
        let admin_token = keys::generate_admin_token();
        let (new_environment, environment_keys) = keys::new_environment(DEFAULT_ENVIRONMENT_SLUG, "Development", now());
        let created = self.store.bootstrap(new_environment, keys::hash_secret(&admin_token)).await?;
        self.reload_keys().await?;
        Ok(created.map(|_| BootstrapCredentials { admin_token, environments: vec![environment_keys] }))
    }

    /// Whether any environment lets browsers on `origin` call its client endpoints (what a CORS
    /// preflight, which carries no key, can be answered from).
    pub fn origin_allowed_anywhere(&self, origin: &str) -> bool {
        self.current_keys().environments().iter().any(|environment| environment.settings.allows_origin(origin))
    }

    /// Resolves a presented key (client key, server key or admin token).
    pub fn authenticate(&self, presented_key: &str) -> Option<Principal> {
        self.current_keys().authenticate(presented_key)
    }

    pub async fn create_environment(
        &self,
        principal: &Principal,
        slug: &str,
        name: Option<&str>,
    ) -> EngineResult<EnvironmentKeys> {
        principal.require_admin()?;
        keys::validate_slug(slug)?;
        let _serialised = self.key_changes.lock().await;
        let (new_environment, environment_keys) = keys::new_environment(slug, name.unwrap_or(slug), now());
        match self.store.create_environment(new_environment).await {
            Ok(_) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(EngineError::Conflict(format!("an environment with slug `{slug}` already exists")));
            }
            Err(error) => return Err(error.into()),
        }
        self.reload_keys().await?;
        tracing::info!(slug, "created environment");
        Ok(environment_keys)
    }

    /// Issues new client and server keys for an environment; the old ones stop working at once.
    pub async fn rotate_keys(&self, principal: &Principal, slug: &str) -> EngineResult<EnvironmentKeys> {
        principal.require_admin()?;
        let _serialised = self.key_changes.lock().await;
        let (client_key, server_key) = (keys::generate_client_key(), keys::generate_server_key());
        let replaced =
            self.store.replace_environment_keys(slug, client_key.clone(), keys::hash_secret(&server_key)).await?;
        if replaced.is_none() {
            return Err(EngineError::NotFound(format!("no environment has slug `{slug}`")));
        }
        self.reload_keys().await?;
        tracing::info!(slug, "rotated environment keys");
        Ok(EnvironmentKeys { slug: slug.to_owned(), client_key, server_key })
    }

    /// Replaces the fields of an environment's settings that `patch` names (admin token).
    pub async fn update_environment_settings(
        &self,
        principal: &Principal,
        slug: &str,
        patch: &Map<String, Value>,
    ) -> EngineResult<Arc<Environment>> {
        principal.require_admin()?;
        let _serialised = self.key_changes.lock().await;
        let Some(current) = self.current_keys().environments().into_iter().find(|environment| environment.slug == slug)
        else {
            return Err(EngineError::NotFound(format!("no environment has slug `{slug}`")));
        };
        let settings = current.settings.patched(patch)?;
        let stored = serde_json::to_string(&settings)
            .map_err(|error| EngineError::Store(StoreError::Database(error.to_string())))?;
        if self.store.replace_environment_settings(slug, stored).await?.is_none() {
            return Err(EngineError::NotFound(format!("no environment has slug `{slug}`")));
        }
        self.reload_keys().await?;
        tracing::info!(slug, ?settings, "changed environment settings");
        self.current_keys()
            .environments()
            .into_iter()
            .find(|environment| environment.slug == slug)
            .ok_or_else(|| EngineError::NotFound(format!("no environment has slug `{slug}`")))
    }

    /// Server-key rights on an environment, for trusted local tools that already hold the data
    /// directory (the `roster query --data-dir` CLI). `None` when no environment has that slug.
    pub fn local_principal(&self, slug: &str) -> Option<Principal> {
        self.current_keys()
            .environments()
            .into_iter()
            .find(|environment| environment.slug == slug)
            .map(Principal::Server)
    }

    pub async fn environments(&self, principal: &Principal) -> EngineResult<Vec<Arc<Environment>>> {
        principal.require_admin()?;
        Ok(self.current_keys().environments())
    }

    /// The identify write path. Each item gets its own result, in order; valid items are applied
    /// (durably, before this returns) even when others are rejected. Paths in errors are relative
    /// to the item.
    pub async fn identify(
        &self,
        principal: &Principal,
        items: Vec<Result<IdentifyInput, FieldError>>,
    ) -> EngineResult<Vec<Result<IdentifyOutcome, FieldError>>> {
        self.identify_as(principal, items, "identify").await
    }

    /// The identify write path, its items counted under `operation` (alias is an identify).
    async fn identify_as(
        &self,
        principal: &Principal,
        items: Vec<Result<IdentifyInput, FieldError>>,
        operation: &'static str,
    ) -> EngineResult<Vec<Result<IdentifyOutcome, FieldError>>> {
        let environment = principal.require_environment()?;
        let received_at = now();
        let commands = items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                item.and_then(|input| self.identify_command(environment, input, nth_receive_time(received_at, index)))
            })
            .collect();
        let policy = self.write_policy(environment.id).await?;
        let mut results =
            apply_in_order(commands, |commands| self.store.identify(environment.id, commands, policy)).await?;
        if matches!(principal, Principal::Client(_)) {
            for outcome in results.iter_mut().flatten() {
                outcome.warnings = std::mem::take(&mut outcome.warnings)
                    .into_iter()
                    .filter_map(roster_core::LinkWarning::for_client_key)
                    .collect();
            }
        }
        count_items(operation, &results);
        Ok(results)
    }

    fn identify_command(
        &self,
        environment: &Environment,
        input: IdentifyInput,
        received_at: Timestamp,
    ) -> Result<IdentifyCommand, FieldError> {
        check_environment(environment, input.environment.as_deref())?;
        IdentifyCommand::new(
            input.user_id,
            input.anonymous_id,
            input.traits,
            input.traits_set_once,
            input.timestamp.unwrap_or(received_at),
            &self.config.limits,
        )?
        .with_message_id(input.message_id, &self.config.limits)?
        .with_context(input.context.as_ref(), &self.config.limits)?
        .with_increments(input.trait_increments, &self.config.limits)
    }

    /// Alias (Segment/Altertable): links `previous_id` to `user_id` under exactly the rules of an
    /// identify naming both, so the same guards hold (two identified users never merge).
    pub async fn alias(
        &self,
        principal: &Principal,
        items: Vec<Result<AliasInput, FieldError>>,
    ) -> EngineResult<Vec<Result<IdentifyOutcome, FieldError>>> {
        let identifies = items
            .into_iter()
            .map(|item| {
                let alias = item?;
                let Some(previous_id) = alias.previous_id else {
                    return Err(FieldError::new(
                        ErrorCode::MissingIdentifier,
                        "previous_id",
                        "an alias needs `previous_id`",
                    ));
                };
                let Some(user_id) = alias.user_id else {
                    return Err(FieldError::new(ErrorCode::MissingIdentifier, "user_id", "an alias needs `user_id`"));
                };
                Ok(IdentifyInput {
                    user_id: Some(user_id),
                    anonymous_id: Some(previous_id),
                    timestamp: alias.timestamp,
                    environment: alias.environment,
                    message_id: alias.message_id,
                    ..IdentifyInput::default()
                })
            })
            .collect();
        self.identify_as(principal, identifies, "alias").await
    }

    /// Merges two profiles named explicitly (the only way two identified users merge). Server key.
    pub async fn merge(
        &self,
        principal: &Principal,
        primary: ProfileSelector,
        secondary: ProfileSelector,
    ) -> EngineResult<MergeOutcome> {
        let environment = principal.require_server()?;
        let policy = self.write_policy(environment.id).await?;
        let outcome = self.store.merge_profiles(environment.id, primary, secondary, policy).await?;
        Ok(outcome?)
    }

    /// Changes a profile's user id and/or email, keeping its id, traits, devices and events.
    /// Server key.
    pub async fn change_identifiers(
        &self,
        principal: &Principal,
        profile_id: &str,
        user_id: Option<String>,
        email: Option<String>,
    ) -> EngineResult<Profile> {
        let environment = principal.require_server()?;
        if user_id.is_none() && email.is_none() {
            return Err(
                FieldError::new(ErrorCode::MissingIdentifier, "user_id", "send `user_id`, `email`, or both").into()
            );
        }
        let policy = self.write_policy(environment.id).await?;
        let changed = self.store.change_identifiers(environment.id, profile_id, user_id, email, policy).await??;
        self.profile(principal, &changed).await
    }

    /// Erases a profile and everything about it. Server key.
    pub async fn erase(&self, principal: &Principal, selector: ProfileSelector) -> EngineResult<String> {
        let environment = principal.require_server()?;
        // Who the person is, read first: the rejections log may hold refused messages naming
        // them, which go too.
        let person = match &selector {
            ProfileSelector::ProfileId(profile_id) => self.store.profile(environment.id, profile_id).await?,
            ProfileSelector::Identifier(IdentifierKind::Email, value) => match normalize_email(value) {
                Some(email) => self.store.profile_by_identifier(environment.id, IdentifierKind::Email, &email).await?,
                None => None,
            },
            ProfileSelector::Identifier(kind, value) => {
                self.store.profile_by_identifier(environment.id, *kind, value).await?
            }
        };
        let erased = self
            .store
            .erase_profile(environment.id, selector)
            .await?
            .ok_or_else(|| EngineError::NotFound("no profile matches; nothing was erased".into()))?;
        if let Some(person) = person {
            let mentions = person
                .user_id
                .iter()
                .chain(&person.anonymous_ids)
                .chain(&person.email)
                .map(|identifier| Value::String(identifier.clone()).to_string())
                .collect();
            self.store.forget_rejections(environment.id, mentions, None).await?;
        }
        Ok(erased)
    }

    /// Suppresses or lifts the suppression of a user id. Server key.
    pub async fn set_suppressed(&self, principal: &Principal, user_id: &str, suppressed: bool) -> EngineResult<()> {
        let environment = principal.require_server()?;
        self.config.limits.validate_identifier(user_id, "user_id")?;
        Ok(self.store.set_suppressed(environment.id, user_id, suppressed).await?)
    }

    /// Registers or updates a device of a profile. Server key.
    #[allow(clippy::too_many_arguments)]
    pub async fn put_device(
        &self,
        principal: &Principal,
        profile_id: &str,
        token: &str,
        platform: Option<String>,
        attributes: Map<String, Value>,
        last_status: Option<String>,
    ) -> EngineResult<Profile> {
        let environment = principal.require_server()?;
        let device = DeviceUpdate::new(token.to_owned(), platform, attributes, last_status, &self.config.limits, "")?;
        if !self.store.upsert_device(environment.id, profile_id, device).await? {
            return Err(EngineError::NotFound(format!(
                "no profile `{profile_id}` in environment `{}`",
                environment.slug
            )));
        }
        self.profile(principal, profile_id).await
    }

    /// Deletes a device of a profile. Server key.
    pub async fn delete_device(&self, principal: &Principal, profile_id: &str, token: &str) -> EngineResult<()> {
        let environment = principal.require_server()?;
        if self.store.delete_device(environment.id, profile_id, token).await? {
            return Ok(());
        }
        Err(EngineError::NotFound(format!("profile `{profile_id}` has no device `{token}`")))
    }

    /// The track write path: each event gets its own result, in order; valid events are recorded
    /// durably, with their profile's traits of the moment, before this returns.
    pub async fn track(
        &self,
        principal: &Principal,
        items: Vec<Result<TrackInput, FieldError>>,
    ) -> EngineResult<Vec<Result<TrackOutcome, FieldError>>> {
        let environment = principal.require_environment()?;
        let received_at = now();
        let mut devices: Vec<Option<DeviceUpdate>> = Vec::with_capacity(items.len());
        let commands = items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                devices.push(None);
                let input = item?;
                check_environment(environment, input.environment.as_deref())?;
                if let Some(context) = &input.context {
                    devices[index] = DeviceUpdate::from_context(context, &self.config.limits)?;
                }
                TrackCommand::new(
                    input.user_id,
                    input.anonymous_id,
                    input.event,
                    input.properties,
                    input.timestamp.unwrap_or(nth_receive_time(received_at, index)),
                    input.message_id,
                    &self.config.limits,
                )?
                .with_context(input.context.as_ref(), &self.config.limits)
            })
            .collect();
        let policy = self.write_policy(environment.id).await?;
        let results = apply_in_order(commands, |commands| self.store.track(environment.id, commands, policy)).await?;
        self.refresh_devices_of_events(environment.id, &results, devices).await?;
        count_items("track", &results);
        Ok(results)
    }

    /// A profile's events, newest first. Server key only.
    pub async fn profile_events(
        &self,
        principal: &Principal,
        profile_id: &str,
        before: Option<String>,
        limit: usize,
    ) -> EngineResult<EventPage> {
        let environment = principal.require_server()?;
        self.store.profile_events(environment.id, profile_id, before, limit).await?.ok_or_else(|| {
            EngineError::NotFound(format!("no profile `{profile_id}` in environment `{}`", environment.slug))
        })
    }

    /// Runs one read-only SQL statement over the key's environment. Server key only.
    pub async fn query(&self, principal: &Principal, sql: &str) -> EngineResult<QueryOutput> {
        let environment = principal.require_server()?;
        let bounds = QueryBounds { timeout: self.config.query_timeout, max_rows: self.config.query_max_rows };
        let turn = self.query_slots.turn(environment.id).await?;
        let started = std::time::Instant::now();
        // The query runs on a task that holds the turn until the store answers: a client that
        // hangs up does not free its turn while its query still runs.
        let (store, environment_id, sql_text) = (Arc::clone(&self.store), environment.id, sql.to_owned());
        let answered = tokio::spawn(async move {
            let _turn = turn;
            store.query(environment_id, &sql_text, bounds).await
        })
        .await
        .map_err(|error| EngineError::Store(StoreError::Database(format!("the query task failed: {error}"))))?;
        let outcome = match &answered {
            Ok(_) => "ok",
            Err(StoreError::QueryRefused(_)) => "refused",
            Err(StoreError::QueryTimeout(_)) => "timeout",
            Err(StoreError::QueryFailed(_)) => "failed",
            Err(_) => "error",
        };
        metrics::counter!("roster_sql_queries_total", "outcome" => outcome).increment(1);
        metrics::histogram!("roster_sql_query_duration_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        Ok(answered?)
    }

    /// Whether the store answers a trivial read (readiness). The caller bounds how long it waits.
    pub async fn ping(&self) -> EngineResult<()> {
        Ok(self.store.ping().await?)
    }

    /// Deletes expired message ids and trait history, a bounded batch at a time, until none is
    /// left. Returns how many rows went.
    pub async fn purge_expired(&self) -> EngineResult<usize> {
        let now = now().as_micros();
        let micros = |duration: Duration| i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
        let messages_before = Timestamp::from_micros(now.saturating_sub(micros(self.config.dedup_window)));
        let history_before = self
            .config
            .trait_history_retention
            .map(|retention| Timestamp::from_micros(now.saturating_sub(micros(retention))));
        let mut total = 0;
        let rejections_before = Timestamp::from_micros(now.saturating_sub(micros(rejections::REJECTIONS_RETENTION)));
        for environment in self.current_keys().environments() {
            total += self.store.forget_rejections(environment.id, Vec::new(), Some(rejections_before)).await?;
        }
        loop {
            let removed = self.store.purge_expired(messages_before, history_before).await?;
            total += removed;
            if removed == 0 {
                return Ok(total);
            }
        }
    }

    /// Runs `purge_expired` every `every`, for as long as the engine lives.
    pub fn spawn_maintenance(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                let Some(engine) = engine.upgrade() else { return };
                match engine.purge_expired().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "purged expired message ids and trait history"),
                    Err(error) => tracing::warn!(%error, "purge of expired rows failed"),
                }
            }
        })
    }

    /// A profile by id (merged-away ids forward to the survivor). Server key only.
    pub async fn profile(&self, principal: &Principal, profile_id: &str) -> EngineResult<Profile> {
        let environment = principal.require_server()?;
        self.store.profile(environment.id, profile_id).await?.ok_or_else(|| {
            EngineError::NotFound(format!("no profile `{profile_id}` in environment `{}`", environment.slug))
        })
    }

    /// A profile by one of its identifiers. Server key only.
    pub async fn profile_by_identifier(
        &self,
        principal: &Principal,
        kind: IdentifierKind,
        value: &str,
    ) -> EngineResult<Option<Profile>> {
        let environment = principal.require_server()?;
        let value = match kind {
            IdentifierKind::Email => match normalize_email(value) {
                Some(normalized) => normalized,
                None => return Ok(None),
            },
            _ => value.to_owned(),
        };
        Ok(self.store.profile_by_identifier(environment.id, kind, &value).await?)
    }

    /// A page of profiles. Server key only.
    pub async fn list_profiles(
        &self,
        principal: &Principal,
        filter: ProfileFilter,
        after: Option<String>,
        limit: usize,
    ) -> EngineResult<ProfilePage> {
        let environment = principal.require_server()?;
        Ok(self.store.list_profiles(environment.id, filter, after, limit).await?)
    }

    async fn reload_keys(&self) -> EngineResult<()> {
        let environments = self.store.environments().await?;
        let admin_token_hash = self.store.admin_token_hash().await?;
        let index = Arc::new(KeyIndex::build(environments, admin_token_hash));
        *self.key_index.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = index;
        Ok(())
    }

    fn current_keys(&self) -> Arc<KeyIndex> {
        Arc::clone(&self.key_index.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

/// The default timestamp of the `index`-th item of a request: one microsecond apart, so items
/// sent without timestamps keep their order within the request (equal timestamps would be ordered
/// by value instead).
fn nth_receive_time(received_at: Timestamp, index: usize) -> Timestamp {
    Timestamp::from_micros(received_at.as_micros().saturating_add(i64::try_from(index).unwrap_or(i64::MAX)))
}

/// Refuses an item that names another environment than its key's.
fn check_environment(environment: &Environment, named: Option<&str>) -> Result<(), FieldError> {
    match named {
        Some(named) if named != environment.slug => Err(FieldError::new(
            ErrorCode::EnvironmentMismatch,
            "environment",
            format!("the API key belongs to environment `{}`, not `{named}`", environment.slug),
        )),
        _ => Ok(()),
    }
}

/// Sends the valid items to the store in one call and puts each result back in its item's place;
/// rejected items keep their rejection.
async fn apply_in_order<Command, Outcome, Apply, Applied>(
    items: Vec<Result<Command, FieldError>>,
    apply: Apply,
) -> EngineResult<Vec<Result<Outcome, FieldError>>>
where
    Apply: FnOnce(Vec<Command>) -> Applied,
    Applied: Future<Output = Result<Vec<Result<Outcome, FieldError>>, StoreError>>,
{
    let mut slots: Vec<Option<Result<Outcome, FieldError>>> = Vec::with_capacity(items.len());
    let mut commands = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Ok(command) => {
                commands.push(command);
                slots.push(None);
            }
            Err(rejection) => slots.push(Some(Err(rejection))),
        }
    }
    let mut applied = if commands.is_empty() { Vec::new().into_iter() } else { apply(commands).await?.into_iter() };
    Ok(slots
        .into_iter()
        .map(|slot| slot.unwrap_or_else(|| applied.next().unwrap_or_else(|| Err(lost_item()))))
        .collect())
}

tokio::task_local! {
    /// The wire format the request being served came in (`native`, `segment`, `flagsmith`,
    /// `customerio`), set by the server around each request so the write path can label its
    /// counts without every adapter passing it along.
    static DIALECT: &'static str;
}

/// Runs `work` (a request's handling) as coming in `dialect`, for the items counters.
pub async fn within_dialect<F: std::future::Future>(dialect: &'static str, work: F) -> F::Output {
    DIALECT.scope(dialect, work).await
}

/// Counts a write's items by dialect, operation and outcome (`roster_items_total`): every item
/// handed to the write path. Work outside a request (import, the CLI) counts as `internal`.
/// Items a dialect refused before building a command (unknown message type, unparsable message)
/// never get here; `record_rejections` counts every refusal by dialect.
fn count_items<Outcome>(operation: &'static str, results: &[Result<Outcome, FieldError>]) {
    let dialect = DIALECT.try_with(|dialect| *dialect).unwrap_or("internal");
    let accepted = results.iter().filter(|result| result.is_ok()).count();
    let rejected = results.len() - accepted;
    if accepted > 0 {
        metrics::counter!("roster_items_total", "dialect" => dialect, "operation" => operation, "outcome" => "accepted")
            .increment(accepted as u64);
    }
    if rejected > 0 {
        metrics::counter!("roster_items_total", "dialect" => dialect, "operation" => operation, "outcome" => "rejected")
            .increment(rejected as u64);
    }
}

/// The store answers one result per command; a shorter answer is a backend bug, reported per item
/// rather than by panicking.
fn lost_item() -> FieldError {
    FieldError::new(ErrorCode::Internal, "", "the store returned no result for this item")
}

fn now() -> Timestamp {
    let micros = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_micros()).unwrap_or_default();
    Timestamp::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}
