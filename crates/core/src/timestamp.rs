//! Timestamps as microseconds since the Unix epoch: totally ordered, cheap to compare and store,
//! and precise enough to order updates that SDKs stamp in milliseconds.

use std::fmt;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{ErrorCode, FieldError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Parses an RFC 3339 timestamp (`2026-01-02T03:04:05.678Z`, any offset). `path` names the
    /// field for the error.
    pub fn parse_rfc3339(text: &str, path: &str) -> Result<Self, FieldError> {
        let invalid = || {
            FieldError::new(
                ErrorCode::InvalidTimestamp,
                path,
                format!(
                    "`{}` is not an RFC 3339 timestamp such as 2026-01-02T03:04:05.678Z",
                    truncate_for_message(text)
                ),
            )
        };
        let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| invalid())?;
        let micros = parsed.unix_timestamp_nanos() / 1_000;
        i64::try_from(micros).map(Timestamp).map_err(|_| invalid())
    }

    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000;
        match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(datetime) => datetime.format(&Rfc3339).unwrap_or_else(|_| self.0.to_string()),
            Err(_) => self.0.to_string(),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.to_rfc3339())
    }
}

/// Keeps echoed user input in error messages short.
pub(crate) fn truncate_for_message(text: &str) -> String {
    const SHOWN: usize = 64;
    if text.len() <= SHOWN {
        return text.to_owned();
    }
    format!("{}…", crate::limits::prefix_within(text, SHOWN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip_with_offsets() {
        let utc = Timestamp::parse_rfc3339("2026-01-02T03:04:05.678Z", "timestamp").unwrap();
        let offset = Timestamp::parse_rfc3339("2026-01-02T04:04:05.678+01:00", "timestamp").unwrap();
        assert_eq!(utc, offset);
        assert_eq!(utc.to_rfc3339(), "2026-01-02T03:04:05.678Z");
    }

    #[test]
    fn rejects_non_rfc3339_with_the_field_path() {
        let error = Timestamp::parse_rfc3339("yesterday", "[2].timestamp").unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidTimestamp);
        assert_eq!(error.path, "[2].timestamp");
        assert!(error.message.contains("yesterday"));
    }
}
