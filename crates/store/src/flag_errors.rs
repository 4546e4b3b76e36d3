//! The refusals of flag-configuration writes, worded once for every backend.

use roster_core::{ErrorCode, FieldError};

pub(crate) fn segment_not_found() -> FieldError {
    FieldError::new(ErrorCode::NotFound, "segment_id", "no such segment in this environment")
}

pub(crate) fn feature_not_found() -> FieldError {
    FieldError::new(ErrorCode::NotFound, "feature_id", "no such feature in this environment")
}

/// Another segment or feature (`what`) of the environment has this name.
pub(crate) fn name_taken(what: &str, name: &str) -> FieldError {
    FieldError::new(ErrorCode::NameTaken, "name", format!("another {what} is named `{name}`"))
}

pub(crate) fn segment_in_use(feature_name: &str) -> FieldError {
    FieldError::new(
        ErrorCode::SegmentInUse,
        "segment_id",
        format!("feature `{feature_name}` overrides this segment; remove the override first"),
    )
}

/// A feature's override `index` names a segment the environment does not have.
pub(crate) fn unknown_override_segment(index: usize, segment_id: i64) -> FieldError {
    FieldError::new(
        ErrorCode::InvalidFeature,
        format!("segment_overrides[{index}].segment_id"),
        format!("no segment {segment_id} in this environment"),
    )
}
