//! Roster's storage contract: one [`Store`] trait, with the embedded SQLite backend as the
//! default. Every backend runs the same contract test suite (`contract`), so the engine and the
//! dialects above never know which one they talk to.
//!
//! Identity resolution is written once, in [`resolution`], over the small synchronous
//! [`resolution::IdentityTx`] interface each backend implements inside its own transaction; the
//! decisions themselves are pure functions of `roster-core`.

mod flag_errors;
pub mod model;
pub mod postgres;
pub mod resolution;
mod rows;
pub mod sqlite;

#[cfg(test)]
mod contract;

use async_trait::async_trait;
use roster_core::flags::{FeatureDefinition, IdentityOverride, SegmentDefinition};
use roster_core::{DeviceUpdate, FieldError, IdentifierKind, IdentifyCommand, Timestamp, TrackCommand};

pub use model::{
    Device, EnvironmentId, EnvironmentRecord, EventPage, FlagConfigRecord, IdentifyOutcome, MemberPage, MergeOutcome,
    NewEnvironment, Profile, ProfileFilter, ProfilePage, ProfileSelector, QueryBounds, QueryOutput, Rejection,
    SegmentMember, StoredEvent, TrackOutcome, WritePolicy,
};
pub use postgres::{PostgresOptions, PostgresStore, drop_store_schema};
pub use sqlite::SqliteStore;

/// Failures of the storage layer itself (not of the caller's input, which are [`FieldError`]s).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("the store is shutting down")]
    Closed,
    /// The database cannot store a value the caller sent (e.g. text it cannot encode).
    #[error("{0}")]
    InvalidInput(String),
    /// A concurrent transaction conflicted with this one (it is retried before this surfaces).
    #[error("concurrent writes conflicted: {0}")]
    Contention(String),
    /// A user's SQL was refused before running (a write, DDL, a table outside the views, …).
    #[error("{0}")]
    QueryRefused(String),
    /// A user's SQL failed (syntax, unknown column, …).
    #[error("{0}")]
    QueryFailed(String),
    /// A user's SQL ran past its time limit and was stopped.
    #[error("the query ran longer than {0:?} and was stopped")]
    QueryTimeout(std::time::Duration),
    /// Users' SQL cannot run on this store as configured (the message says what to change).
    #[error("{0}")]
    QueryUnavailable(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Database(error.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One item's result in a batch: applied, or rejected with the field and rule it broke.
pub type ItemResult = Result<IdentifyOutcome, FieldError>;

/// One event's result in a batch.
pub type TrackResult = Result<TrackOutcome, FieldError>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates the first environment and records the admin token hash, atomically, unless the
    /// store was already bootstrapped. Returns the environment when this call bootstrapped.
    async fn bootstrap(
        &self,
        first_environment: NewEnvironment,
        admin_token_hash: String,
    ) -> StoreResult<Option<EnvironmentRecord>>;

    /// The admin token hash recorded at bootstrap.
    async fn admin_token_hash(&self) -> StoreResult<Option<String>>;

    /// Replaces the admin token's hash (key recovery on the host); `false` when the store was
    /// never bootstrapped.
    async fn replace_admin_token_hash(&self, admin_token_hash: String) -> StoreResult<bool>;

    /// Answers when the store can serve a trivial read (readiness checks). The default reads the
    /// admin token hash: one row, through the same connections every request uses, so it fails
    /// when they cannot reach the data.
    async fn ping(&self) -> StoreResult<()> {
        self.admin_token_hash().await.map(|_| ())
    }

    async fn environments(&self) -> StoreResult<Vec<EnvironmentRecord>>;

    /// Fails with [`StoreError::Conflict`] when the slug or a key is taken.
    async fn create_environment(&self, environment: NewEnvironment) -> StoreResult<EnvironmentRecord>;

    /// Replaces an environment's settings (a JSON object the engine reads and writes); `None`
    /// when no environment has that slug.
    async fn replace_environment_settings(
        &self,
        slug: &str,
        settings: String,
    ) -> StoreResult<Option<EnvironmentRecord>>;

    /// Replaces an environment's keys; `None` when no environment has that slug.
    async fn replace_environment_keys(
        &self,
        slug: &str,
        client_key: String,
        server_key_hash: String,
    ) -> StoreResult<Option<EnvironmentRecord>>;

    /// Applies identifies in order, in one durable transaction: when this returns, every applied
    /// item is committed and fsync'd, and visible to every later read. Items that break a
    /// profile-level limit are rejected one by one; the others are applied.
    async fn identify(
        &self,
        environment_id: EnvironmentId,
        commands: Vec<IdentifyCommand>,
        policy: WritePolicy,
    ) -> StoreResult<Vec<ItemResult>>;

    /// Records events in order, in one durable transaction, each with a snapshot of its profile's
    /// traits. Resent message ids inside the dedup window are answered as duplicates.
    async fn track(
        &self,
        environment_id: EnvironmentId,
        commands: Vec<TrackCommand>,
        policy: WritePolicy,
    ) -> StoreResult<Vec<TrackResult>>;

    /// A profile's events, newest first, before the cursor `before` (a `next_before` from an
    /// earlier page). `None` when the profile does not exist; merged-away ids forward.
    async fn profile_events(
        &self,
        environment_id: EnvironmentId,
        profile_id: &str,
        before: Option<String>,
        limit: usize,
    ) -> StoreResult<Option<EventPage>>;

    /// Runs one read-only SQL statement over the environment's views (`identities`, `events`,
    /// `trait_changes`), refusing anything else, within `bounds`.
    async fn query(&self, environment_id: EnvironmentId, sql: &str, bounds: QueryBounds) -> StoreResult<QueryOutput>;

    /// Merges `secondary` into `primary` atomically (see `resolution::apply_merge`).
    async fn merge_profiles(
        &self,
        environment_id: EnvironmentId,
        primary: ProfileSelector,
        secondary: ProfileSelector,
        policy: WritePolicy,
    ) -> StoreResult<Result<MergeOutcome, FieldError>>;

    /// Changes a profile's user id and/or email; the profile id, traits, devices and events stay.
    async fn change_identifiers(
        &self,
        environment_id: EnvironmentId,
        profile_id: &str,
        user_id: Option<String>,
        email: Option<String>,
        policy: WritePolicy,
    ) -> StoreResult<Result<String, FieldError>>;

    /// Erases the profile a selector names and everything about it, in one transaction. Returns
    /// the erased profile id, `None` when nothing matched.
    async fn erase_profile(
        &self,
        environment_id: EnvironmentId,
        selector: ProfileSelector,
    ) -> StoreResult<Option<String>>;

    /// Suppresses (or lifts the suppression of) a user id: identifies and tracks naming it are
    /// acknowledged and dropped.
    async fn set_suppressed(&self, environment_id: EnvironmentId, user_id: &str, suppressed: bool) -> StoreResult<()>;

    /// Registers or updates a device on a profile; `false` when the profile does not exist.
    async fn upsert_device(
        &self,
        environment_id: EnvironmentId,
        profile_id: &str,
        device: DeviceUpdate,
    ) -> StoreResult<bool>;

    /// Deletes a device of a profile; whether it existed.
    async fn delete_device(&self, environment_id: EnvironmentId, profile_id: &str, token: &str) -> StoreResult<bool>;

    /// Appends refused messages to the environment's rejections log (`rejection_id` and order
    /// are the store's), keeping only its newest `keep` entries.
    async fn record_rejections(
        &self,
        environment_id: EnvironmentId,
        rejections: Vec<Rejection>,
        keep: usize,
    ) -> StoreResult<()>;

    /// Deletes the environment's rejections whose refused message contains any of `mentions`
    /// (JSON-quoted identifiers of a person being erased) or was received before `before`;
    /// answers how many went.
    async fn forget_rejections(
        &self,
        environment_id: EnvironmentId,
        mentions: Vec<String>,
        before: Option<Timestamp>,
    ) -> StoreResult<usize>;

    /// The environment's rejections, newest first, with ids below `before`, at most `limit`.
    async fn rejections(
        &self,
        environment_id: EnvironmentId,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<Rejection>>;

    /// Deletes message ids older than `messages_before` and trait history older than
    /// `history_before`, a bounded number per call. Returns how many rows went.
    async fn purge_expired(&self, messages_before: Timestamp, history_before: Option<Timestamp>) -> StoreResult<usize>;

    /// A profile by id; ids of profiles merged away forward to the survivor.
    async fn profile(&self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<Option<Profile>>;

    async fn profile_by_identifier(
        &self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
    ) -> StoreResult<Option<Profile>>;

    /// Profiles in `profile_id` order (ids are time-ordered UUIDv7), after `after`, at most `limit`.
    async fn list_profiles(
        &self,
        environment_id: EnvironmentId,
        filter: ProfileFilter,
        after: Option<String>,
        limit: usize,
    ) -> StoreResult<ProfilePage>;

    /// The environment's segments, features and identity overrides, the key identities are
    /// hashed with, and the configuration's version.
    async fn flag_config(&self, environment_id: EnvironmentId) -> StoreResult<FlagConfigRecord>;

    /// Only the configuration's version: cheap enough to poll.
    async fn flags_version(&self, environment_id: EnvironmentId) -> StoreResult<i64>;

    /// Creates (`segment_id` `None`) or replaces a segment, already validated; its id.
    async fn save_segment(
        &self,
        environment_id: EnvironmentId,
        segment_id: Option<i64>,
        definition: SegmentDefinition,
    ) -> StoreResult<Result<i64, FieldError>>;

    /// Deletes a segment and its membership history; refused while a feature overrides it.
    async fn delete_segment(
        &self,
        environment_id: EnvironmentId,
        segment_id: i64,
    ) -> StoreResult<Result<bool, FieldError>>;

    /// Creates or replaces a feature, already validated (overridden segments must exist); its id.
    async fn save_feature(
        &self,
        environment_id: EnvironmentId,
        feature_id: Option<i64>,
        definition: FeatureDefinition,
    ) -> StoreResult<Result<i64, FieldError>>;

    /// Deletes a feature and its identity overrides.
    async fn delete_feature(&self, environment_id: EnvironmentId, feature_id: i64) -> StoreResult<bool>;

    /// Sets a profile's override of a feature (a merged-away id forwards); the profile id it landed on.
    async fn put_identity_override(
        &self,
        environment_id: EnvironmentId,
        profile_id: &str,
        feature_id: i64,
        state: IdentityOverride,
    ) -> StoreResult<Result<String, FieldError>>;

    async fn delete_identity_override(
        &self,
        environment_id: EnvironmentId,
        profile_id: &str,
        feature_id: i64,
    ) -> StoreResult<bool>;

    /// Re-evaluates the segment memberships of one page of profiles with `policy.segments`;
    /// how many were processed, and where the next page starts (`None`: done).
    async fn refresh_memberships(
        &self,
        environment_id: EnvironmentId,
        policy: WritePolicy,
        after: Option<String>,
        limit: usize,
    ) -> StoreResult<(usize, Option<String>)>;

    /// A segment's current members, in profile id order, with their count.
    async fn segment_members(
        &self,
        environment_id: EnvironmentId,
        segment_id: i64,
        after: Option<String>,
        limit: usize,
    ) -> StoreResult<MemberPage>;
}
