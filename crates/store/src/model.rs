//! Records the store hands out and takes in.

use std::collections::BTreeMap;

use roster_core::{LinkWarning, Timestamp};
use serde_json::{Map, Value};

/// Internal numeric id of an environment; never shown to users (they see the slug).
pub type EnvironmentId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentRecord {
    pub id: EnvironmentId,
    pub slug: String,
    pub name: String,
    /// Public: safe to ship in browsers and apps, so it is stored as is.
    pub client_key: String,
    /// Secret: only its SHA-256 is kept, so a copy of the database does not leak working keys.
    pub server_key_hash: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEnvironment {
    pub slug: String,
    pub name: String,
    pub client_key: String,
    pub server_key_hash: String,
    pub created_at: Timestamp,
}

/// A profile as read back: identifiers, live traits and the timestamp of each.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub profile_id: String,
    pub user_id: Option<String>,
    /// Whether an identify named the user id (a track-only distinct id is not identified).
    pub identified: bool,
    pub anonymous_ids: Vec<String>,
    pub traits: Map<String, Value>,
    pub trait_timestamps: BTreeMap<String, Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// What one applied identify did.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentifyOutcome {
    pub profile_id: String,
    pub created: bool,
    /// Profiles merged into this one by this call (their ids now forward here).
    pub merged_profile_ids: Vec<String>,
    /// Trait keys whose stored state this call changed (older writes change nothing).
    pub changed_traits: Vec<String>,
    pub warnings: Vec<LinkWarning>,
}

/// Filters of the profile listing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileFilter {
    /// Only profiles whose trait `key` equals `value` exactly (type included).
    pub trait_equals: Option<(String, Value)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProfilePage {
    pub profiles: Vec<Profile>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next_after: Option<String>,
}
