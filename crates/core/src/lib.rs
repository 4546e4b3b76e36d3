//! Roster's pure domain: typed trait values and their validation, per-trait last-writer-wins
//! merge, and the identity-linking rules. Nothing here does I/O, spawns, or awaits, so every rule
//! users rely on can be tested exhaustively and deterministically.

pub mod device;
pub mod error;
pub mod flags;
pub mod identify;
pub mod limits;
pub mod linking;
pub mod reserved;
pub mod timestamp;
pub mod traits;

pub use device::DeviceUpdate;
pub use error::{ErrorCode, FieldError};
pub use identify::{IdentifierKind, IdentifyCommand, TrackCommand};
pub use limits::Limits;
pub use linking::{LinkInput, LinkPlan, LinkTarget, LinkWarning, ProfileRef, plan_link};
pub use timestamp::Timestamp;
pub use traits::{TraitChange, TraitEntry, TraitSet};
