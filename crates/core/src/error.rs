//! Field-level validation errors. Every rejection names the field path it is about and the rule
//! it broke, so a client can fix its payload without reading server logs.

use std::fmt;

/// Stable, machine-readable error codes. The string form (`as_str`) is part of the public API:
/// clients match on it, so variants are only ever added, never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    MalformedJson,
    InvalidType,
    UnknownField,
    MissingIdentifier,
    InvalidIdentifier,
    InvalidTimestamp,
    TraitKeyTooLong,
    TraitKeyEmpty,
    TraitStringTooLong,
    TraitNestingTooDeep,
    TooManyTraits,
    ProfileTooLarge,
    EventTooLarge,
    InvalidReservedTrait,
    TooManyIdentifiers,
    TooManyMerges,
    IdentifierTaken,
    IdentifierSuppressed,
    InvalidSegmentRule,
    InvalidFeature,
    NameTaken,
    NulCharacter,
    SegmentInUse,
    MissingEventName,
    EnvironmentMismatch,
    PayloadTooLarge,
    TooManyItems,
    UnsupportedMediaType,
    MissingApiKey,
    InvalidApiKey,
    Forbidden,
    OriginNotAllowed,
    NotFound,
    MethodNotAllowed,
    InvalidQueryParameter,
    EnvironmentExists,
    QueryRefused,
    QueryFailed,
    QueryTimeout,
    QueryUnavailable,
    TooManyQueries,
    RequestTimeout,
    Overloaded,
    NotReady,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::InvalidType => "invalid_type",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::MissingIdentifier => "missing_identifier",
            ErrorCode::InvalidIdentifier => "invalid_identifier",
            ErrorCode::InvalidTimestamp => "invalid_timestamp",
            ErrorCode::TraitKeyTooLong => "trait_key_too_long",
            ErrorCode::TraitKeyEmpty => "trait_key_empty",
            ErrorCode::TraitStringTooLong => "trait_string_too_long",
            ErrorCode::TraitNestingTooDeep => "trait_nesting_too_deep",
            ErrorCode::TooManyTraits => "too_many_traits",
            ErrorCode::ProfileTooLarge => "profile_too_large",
            ErrorCode::EventTooLarge => "event_too_large",
            ErrorCode::InvalidReservedTrait => "invalid_reserved_trait",
            ErrorCode::TooManyIdentifiers => "too_many_identifiers",
            ErrorCode::TooManyMerges => "too_many_merges",
            ErrorCode::IdentifierTaken => "identifier_taken",
            ErrorCode::IdentifierSuppressed => "identifier_suppressed",
            ErrorCode::InvalidSegmentRule => "invalid_segment_rule",
            ErrorCode::InvalidFeature => "invalid_feature",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::NulCharacter => "nul_character",
            ErrorCode::SegmentInUse => "segment_in_use",
            ErrorCode::MissingEventName => "missing_event_name",
            ErrorCode::EnvironmentMismatch => "environment_mismatch",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::TooManyItems => "too_many_items",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::MissingApiKey => "missing_api_key",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::InvalidQueryParameter => "invalid_query_parameter",
            ErrorCode::EnvironmentExists => "environment_exists",
            ErrorCode::QueryRefused => "query_refused",
            ErrorCode::QueryFailed => "query_failed",
            ErrorCode::QueryTimeout => "query_timeout",
            ErrorCode::QueryUnavailable => "query_unavailable",
            ErrorCode::TooManyQueries => "too_many_queries",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A rejection of one field of one item. `path` uses JSON-path-like dotted notation relative to the
/// item (`traits.address.street`, `traits.tags[3]`); the server prefixes the item index in batches.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    pub code: ErrorCode,
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(code: ErrorCode, path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { code, path: path.into(), message: message.into() }
    }

    /// The same error seen from an enclosing document (`prefix` + `.` + own path).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.path = join_path(prefix, &self.path);
        self
    }
}

/// Joins two path segments; array indexes (`[3]`) attach without a dot.
pub fn join_path(prefix: &str, suffix: &str) -> String {
    match (prefix.is_empty(), suffix.is_empty()) {
        (true, _) => suffix.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) if suffix.starts_with('[') => format!("{prefix}{suffix}"),
        (false, false) => format!("{prefix}.{suffix}"),
    }
}
