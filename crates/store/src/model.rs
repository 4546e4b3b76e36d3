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
    /// The environment's settings as a JSON object (`{}` until one is set); the engine reads them.
    pub settings: String,
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
    /// The email identifier (the normalised `email` trait), when this profile holds it.
    pub email: Option<String>,
    pub traits: Map<String, Value>,
    pub trait_timestamps: BTreeMap<String, Timestamp>,
    pub devices: Vec<Device>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A push/device token of a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub token: String,
    pub platform: Option<String>,
    pub attributes: Map<String, Value>,
    pub last_used: Option<Timestamp>,
    pub last_status: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Names one profile: by id, or by one of its identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileSelector {
    ProfileId(String),
    Identifier(roster_core::IdentifierKind, String),
}

/// What an explicit merge moved.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeOutcome {
    pub profile_id: String,
    pub merged_profile_id: String,
    /// Identifiers of the secondary profile now pointing at the primary (`kind`, `value`).
    pub moved_identifiers: Vec<(roster_core::IdentifierKind, String)>,
    pub changed_traits: Vec<String>,
}

/// What one applied identify did.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentifyOutcome {
    pub profile_id: String,
    pub created: bool,
    /// A resend of a message id already applied inside the dedup window: nothing was written.
    pub duplicate: bool,
    /// The user id is suppressed: acknowledged, nothing was written.
    pub suppressed: bool,
    /// Profiles merged into this one by this call (their ids now forward here).
    pub merged_profile_ids: Vec<String>,
    /// Trait keys whose stored state this call changed (older writes change nothing).
    pub changed_traits: Vec<String>,
    pub warnings: Vec<LinkWarning>,
}

/// What one recorded event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackOutcome {
    pub event_id: String,
    pub profile_id: String,
    /// A resend of a message id already recorded inside the dedup window: nothing was written.
    pub duplicate: bool,
    /// The user id is suppressed: acknowledged, nothing was written.
    pub suppressed: bool,
}

impl IdentifyOutcome {
    /// The answer to a call for a suppressed person: acknowledged, nothing written.
    pub fn suppressed() -> Self {
        IdentifyOutcome {
            profile_id: String::new(),
            created: false,
            duplicate: false,
            suppressed: true,
            merged_profile_ids: Vec::new(),
            changed_traits: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

impl TrackOutcome {
    /// The answer to a call for a suppressed person: acknowledged, nothing written.
    pub fn suppressed() -> Self {
        TrackOutcome { event_id: String::new(), profile_id: String::new(), duplicate: false, suppressed: true }
    }
}

/// How writes are applied, beyond the limits of one item.
#[derive(Debug, Clone)]
pub struct WritePolicy {
    pub limits: roster_core::Limits,
    /// A message id seen within this many microseconds is a duplicate.
    pub dedup_window_micros: i64,
    /// The environment's segments as compiled now: a write that changes a profile's traits or
    /// identity re-evaluates its memberships in the same transaction. `None`: not tracked.
    pub segments: Option<std::sync::Arc<roster_core::flags::Evaluator>>,
}

impl Default for WritePolicy {
    fn default() -> Self {
        WritePolicy {
            limits: roster_core::Limits::default(),
            dedup_window_micros: 24 * 3600 * 1_000_000,
            segments: None,
        }
    }
}

/// One stored event, as the timeline shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event_id: String,
    pub profile_id: String,
    pub distinct_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub event: String,
    pub properties: Map<String, Value>,
    pub timestamp: Timestamp,
    pub received_at: Timestamp,
    pub identity_traits: Map<String, Value>,
    /// The SDK's `context` sent with the event, if any.
    pub context: Option<Map<String, Value>>,
}

/// A page of a profile's events, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    /// Pass as `before` to get the next (older) page; `None` on the last page.
    pub next_before: Option<String>,
}

/// Bounds on one SQL query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryBounds {
    pub timeout: std::time::Duration,
    pub max_rows: usize,
}

/// The answer of one SQL query: column names and rows of JSON values.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryOutput {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    /// More rows existed than `max_rows`; the rest were not read.
    pub truncated: bool,
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

/// An environment's flag configuration and its version (bumped by every change, so nodes sharing
/// a database can tell when to recompile).
#[derive(Debug, Clone, PartialEq)]
pub struct FlagConfigRecord {
    pub config: roster_core::flags::FlagConfig,
    pub version: i64,
}

/// A current member of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentMember {
    pub profile_id: String,
    pub user_id: Option<String>,
    pub entered_at: Timestamp,
}

/// One page of a segment's current members, in profile id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberPage {
    pub members: Vec<SegmentMember>,
    /// Current members in all.
    pub total: u64,
    /// Pass as `after` for the next page; `None` on the last.
    pub next_after: Option<String>,
}

/// A message a dialect refused, for the environment's rejections log: SDKs drop refused messages
/// after logging them locally, so this is where a user sees what was refused and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    /// Increasing per store; pages walk back from the newest.
    pub rejection_id: i64,
    #[serde(skip)]
    pub received_at: Timestamp,
    /// `native`, `segment`, `flagsmith`, `customerio`.
    pub dialect: String,
    /// The request path the message came to.
    pub endpoint: String,
    /// Where in the request body (`batch[3]`, `[0].traits.bio`).
    pub path: String,
    pub message_id: Option<String>,
    /// The public error code and message.
    pub code: String,
    pub error: String,
    /// The refused message, cut to a bounded size (the cut is marked).
    pub payload: String,
}
