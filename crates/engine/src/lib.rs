//! Roster's engine: the single write path and read path. Every dialect adapter translates its
//! vendor's request into the calls here and the results back; no adapter holds logic of its own.
//!
//! The engine validates input against the configured limits (through `roster-core`), authorises
//! the caller's key for the operation, and hands durable work to the [`Store`].

mod keys;

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use roster_core::{ErrorCode, FieldError, IdentifierKind, IdentifyCommand, Limits, Timestamp};
use roster_store::{Store, StoreError};
use serde_json::{Map, Value};

pub use keys::{Environment, KeyIndex, Principal};
pub use roster_store::{IdentifyOutcome, Profile, ProfileFilter, ProfilePage};

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
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
}

pub type EngineResult<T> = Result<T, EngineError>;

/// Engine settings that are not the store's.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    pub limits: Limits,
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
}

impl Engine {
    /// Builds the engine over `store`, loading the environment keys.
    pub async fn new(store: Arc<dyn Store>, config: EngineConfig) -> EngineResult<Self> {
        let engine = Engine { store, config, key_index: RwLock::new(Arc::new(KeyIndex::default())) };
        engine.reload_keys().await?;
        Ok(engine)
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// On an empty store, creates the `development` environment and an admin token and returns
    /// them (the only time the secrets exist in clear). `None` when already bootstrapped.
    pub async fn bootstrap_if_empty(&self) -> EngineResult<Option<BootstrapCredentials>> {
        if self.store.admin_token_hash().await?.is_some() {
            return Ok(None);
        }
        let admin_token = keys::generate_admin_token();
        let (new_environment, environment_keys) = keys::new_environment(DEFAULT_ENVIRONMENT_SLUG, "Development", now());
        let created = self.store.bootstrap(new_environment, keys::hash_secret(&admin_token)).await?;
        self.reload_keys().await?;
        Ok(created.map(|_| BootstrapCredentials { admin_token, environments: vec![environment_keys] }))
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
        let environment = principal.require_environment()?;
        let received_at = now();
        let mut results: Vec<Option<Result<IdentifyOutcome, FieldError>>> = Vec::with_capacity(items.len());
        let mut commands = Vec::with_capacity(items.len());
        for item in items {
            match item.and_then(|input| self.identify_command(environment, input, received_at)) {
                Ok(command) => {
                    commands.push(command);
                    results.push(None);
                }
                Err(rejection) => results.push(Some(Err(rejection))),
            }
        }
        let mut applied = if commands.is_empty() {
            Vec::new().into_iter()
        } else {
            self.store.identify(environment.id, commands, self.config.limits.clone()).await?.into_iter()
        };
        Ok(results
            .into_iter()
            .map(|slot| slot.unwrap_or_else(|| applied.next().unwrap_or_else(|| Err(lost_item()))))
            .collect())
    }

    fn identify_command(
        &self,
        environment: &Environment,
        input: IdentifyInput,
        received_at: Timestamp,
    ) -> Result<IdentifyCommand, FieldError> {
        if let Some(named) = &input.environment
            && named != &environment.slug
        {
            return Err(FieldError::new(
                ErrorCode::EnvironmentMismatch,
                "environment",
                format!("the API key belongs to environment `{}`, not `{named}`", environment.slug),
            ));
        }
        IdentifyCommand::new(
            input.user_id,
            input.anonymous_id,
            input.traits,
            input.traits_set_once,
            input.timestamp.unwrap_or(received_at),
            &self.config.limits,
        )
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
        Ok(self.store.profile_by_identifier(environment.id, kind, value).await?)
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

/// The store answers one result per command; a shorter answer is a backend bug, reported per item
/// rather than by panicking.
fn lost_item() -> FieldError {
    FieldError::new(ErrorCode::Internal, "", "the store returned no result for this item")
}

fn now() -> Timestamp {
    let micros = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_micros()).unwrap_or_default();
    Timestamp::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}
