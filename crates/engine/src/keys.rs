//! Environment keys and who a presented key makes the caller.
//!
//! Client keys are public (browsers and apps ship them), so they are stored as is. Server keys
//! (`ser.` prefix, which Flagsmith's SDKs require for local evaluation) and the admin token are
//! secrets: only their SHA-256 is stored, and the clear value is shown once when issued.

use std::collections::HashMap;
use std::sync::Arc;

use roster_core::{ErrorCode, FieldError, Timestamp};
use roster_store::{EnvironmentId, EnvironmentRecord, NewEnvironment};
use sha2::{Digest, Sha256};

use crate::settings::EnvironmentSettings;
use crate::{EngineError, EnvironmentKeys};

const SERVER_KEY_PREFIX: &str = "ser.";
const ADMIN_TOKEN_PREFIX: &str = "adm.";
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// An environment as requests see it (no secrets).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Environment {
    #[serde(skip)]
    pub id: EnvironmentId,
    pub slug: String,
    pub name: String,
    pub client_key: String,
    pub settings: EnvironmentSettings,
}

/// Who is calling, decided by the key they presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A public client key: may identify/track and read the flags of the identity it names.
    Client(Arc<Environment>),
    /// A secret server key: everything inside its environment.
    Server(Arc<Environment>),
    /// The admin token: manages environments and keys.
    Admin,
}

impl Principal {
    /// The environment a client or server key belongs to; the admin token has none.
    pub fn require_environment(&self) -> Result<&Environment, EngineError> {
        match self {
            Principal::Client(environment) | Principal::Server(environment) => Ok(environment),
            Principal::Admin => Err(EngineError::Forbidden(
                "the admin token manages environments; use an environment's client or server key for data".into(),
            )),
        }
    }

    pub(crate) fn require_server(&self) -> Result<&Environment, EngineError> {
        match self {
            Principal::Server(environment) => Ok(environment),
            Principal::Client(_) => Err(EngineError::Forbidden(
                "client keys may only identify and track; reading profiles needs the environment's server key".into(),
            )),
            Principal::Admin => self.require_environment(),
        }
    }

    pub(crate) fn require_admin(&self) -> Result<(), EngineError> {
        match self {
            Principal::Admin => Ok(()),
            _ => Err(EngineError::Forbidden("managing environments needs the admin token".into())),
        }
    }

    pub fn environment(&self) -> Option<&Arc<Environment>> {
        match self {
            Principal::Client(environment) | Principal::Server(environment) => Some(environment),
            Principal::Admin => None,
        }
    }
}

/// Lookup tables from keys to environments, immutable once built.
#[derive(Debug, Default)]
pub struct KeyIndex {
    by_client_key: HashMap<String, Arc<Environment>>,
    by_server_key_hash: HashMap<String, Arc<Environment>>,
    admin_token_hash: Option<String>,
    ordered: Vec<Arc<Environment>>,
}

impl KeyIndex {
    pub(crate) fn build(records: Vec<EnvironmentRecord>, admin_token_hash: Option<String>) -> Self {
        let mut index = KeyIndex { admin_token_hash, ..KeyIndex::default() };
        for record in records {
            let environment = Arc::new(Environment {
                id: record.id,
                settings: EnvironmentSettings::from_stored(&record.slug, &record.settings),
                slug: record.slug,
                name: record.name,
                client_key: record.client_key.clone(),
            });
            index.by_client_key.insert(record.client_key, Arc::clone(&environment));
            index.by_server_key_hash.insert(record.server_key_hash, Arc::clone(&environment));
            index.ordered.push(environment);
        }
        index
    }

    pub(crate) fn authenticate(&self, presented_key: &str) -> Option<Principal> {
        if presented_key.starts_with(SERVER_KEY_PREFIX) {
            return self.by_server_key_hash.get(&hash_secret(presented_key)).cloned().map(Principal::Server);
        }
        if presented_key.starts_with(ADMIN_TOKEN_PREFIX) {
            let presented_hash = hash_secret(presented_key);
            return (self.admin_token_hash.as_deref() == Some(presented_hash.as_str())).then_some(Principal::Admin);
        }
        self.by_client_key.get(presented_key).cloned().map(Principal::Client)
    }

    pub(crate) fn environments(&self) -> Vec<Arc<Environment>> {
        self.ordered.clone()
    }
}

pub(crate) fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

fn random_base62(length: usize) -> String {
    let mut bytes = vec![0u8; length];
    getrandom::fill(&mut bytes).expect("the operating system's random source is unavailable");
    // 62 does not divide 256; the bias (4/256 on 8 of 62 symbols) costs < 0.1 bit per symbol,
    // irrelevant at these lengths (≥ 22 symbols, > 128 bits).
    bytes.iter().map(|byte| BASE62[usize::from(*byte) % BASE62.len()] as char).collect()
}

pub(crate) fn generate_client_key() -> String {
    random_base62(22)
}

pub(crate) fn generate_server_key() -> String {
    format!("{SERVER_KEY_PREFIX}{}", random_base62(32))
}

pub(crate) fn generate_admin_token() -> String {
    format!("{ADMIN_TOKEN_PREFIX}{}", random_base62(40))
}

pub(crate) fn new_environment(slug: &str, name: &str, created_at: Timestamp) -> (NewEnvironment, EnvironmentKeys) {
    let (client_key, server_key) = (generate_client_key(), generate_server_key());
    let record = NewEnvironment {
        slug: slug.to_owned(),
        name: name.to_owned(),
        client_key: client_key.clone(),
        server_key_hash: hash_secret(&server_key),
        created_at,
    };
    (record, EnvironmentKeys { slug: slug.to_owned(), client_key, server_key })
}

/// Slugs appear in URLs, SQL results and SDK configuration: lower-case letters, digits, `-`, `_`.
pub(crate) fn validate_slug(slug: &str) -> Result<(), FieldError> {
    let well_formed = !slug.is_empty()
        && slug.len() <= 64
        && slug.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_')
        && slug.as_bytes()[0].is_ascii_alphanumeric();
    if well_formed {
        return Ok(());
    }
    Err(FieldError::new(
        ErrorCode::InvalidType,
        "slug",
        "must be 1 to 64 characters of a-z, 0-9, `-` and `_`, starting with a letter or digit",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: EnvironmentId, slug: &str, client_key: &str, server_key: &str) -> EnvironmentRecord {
        EnvironmentRecord {
            id,
            slug: slug.into(),
            name: slug.into(),
            client_key: client_key.into(),
            server_key_hash: hash_secret(server_key),
            created_at: Timestamp::from_micros(0),
            settings: "{}".into(),
        }
    }

    #[test]
    fn keys_resolve_to_their_role_and_environment() {
        let index = KeyIndex::build(
            vec![record(1, "development", "client-dev", "ser.dev"), record(2, "production", "client-prod", "ser.prod")],
            Some(hash_secret("adm.secret")),
        );
        assert!(
            matches!(index.authenticate("client-dev"), Some(Principal::Client(environment)) if environment.slug == "development")
        );
        assert!(
            matches!(index.authenticate("ser.prod"), Some(Principal::Server(environment)) if environment.slug == "production")
        );
        assert_eq!(index.authenticate("adm.secret"), Some(Principal::Admin));
        assert_eq!(index.authenticate("adm.wrong"), None);
        assert_eq!(index.authenticate("ser.wrong"), None);
        assert_eq!(index.authenticate("unknown"), None);
    }

    #[test]
    fn generated_keys_have_their_prefixes_and_differ() {
        assert!(generate_server_key().starts_with("ser."));
        assert!(generate_admin_token().starts_with("adm."));
        assert_ne!(generate_client_key(), generate_client_key());
        assert_eq!(generate_client_key().len(), 22);
    }

    #[test]
    fn slugs_are_validated() {
        assert!(validate_slug("production").is_ok());
        assert!(validate_slug("eu-west_2").is_ok());
        assert!(validate_slug("").is_err());
        assert!(validate_slug("Prod").is_err());
        assert!(validate_slug("-x").is_err());
        assert!(validate_slug("a/b").is_err());
    }
}
