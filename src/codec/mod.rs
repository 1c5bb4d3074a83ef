//! Wire formats <-> domain types, both directions.
//!
//! `json` holds the JSON-lines contract used by `replay` and by JSON input topics. Wire types
//! never leave this module: everything past it sees only `crate::domain`.

pub mod json;

use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, PrimitiveDateTime, Time};

use crate::domain::Timestamp;

/// Why an input record could not be turned into an event. Each variant has a short, bounded
/// [`DecodeError::reason`] code for metrics and dead-letter headers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not UTF-8.
    #[error("invalid UTF-8 at byte {0}")]
    InvalidUtf8(usize),
    /// Not JSON, or a field has the wrong JSON type.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// A required field is absent or null.
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    /// An enumerated field has a value outside its set.
    #[error("field `{field}`: unknown value `{value}`")]
    UnknownSymbol {
        /// The field.
        field: &'static str,
        /// The value seen (truncated).
        value: String,
    },
    /// A field is present but its value is not acceptable.
    #[error("field `{field}`: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl DecodeError {
    /// A short, fixed code for metric labels and dead-letter headers.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::InvalidUtf8(_) => "invalid_utf8",
            DecodeError::Json(_) => "invalid_json",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::UnknownSymbol { .. } => "unknown_symbol",
            DecodeError::InvalidField { .. } => "invalid_field",
        }
    }
}

/// Parses an RFC 3339 timestamp (any offset) into UTC milliseconds, rejecting instants before
/// 1970 or after 2200.
pub fn parse_timestamp(text: &str) -> Result<Timestamp, String> {
    let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|error| format!("`{text}` is not an RFC 3339 timestamp: {error}"))?;
    checked_timestamp(parsed)
}

/// Parses a command-line time: an RFC 3339 timestamp, or a bare date `YYYY-MM-DD` meaning
/// midnight UTC.
pub fn parse_time_argument(text: &str) -> Result<Timestamp, String> {
    if let Ok(date) = Date::parse(text, time::macros::format_description!("[year]-[month]-[day]")) {
        return checked_timestamp(PrimitiveDateTime::new(date, Time::MIDNIGHT).assume_utc());
    }
    parse_timestamp(text)
}

fn checked_timestamp(at: OffsetDateTime) -> Result<Timestamp, String> {
    let millis = i64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| "timestamp out of range".to_owned())?;
    let timestamp = Timestamp::from_millis(millis);
    if timestamp.is_plausible() {
        Ok(timestamp)
    } else {
        Err(format!("{at} is outside the accepted range 1970-01-01 to 2200-01-01"))
    }
}

/// Formats as RFC 3339 in UTC with millisecond precision, e.g. `2024-05-01T08:00:00.000Z`.
pub fn format_timestamp(at: Timestamp) -> String {
    let nanos = i128::from(at.millis()) * 1_000_000;
    match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(utc) => {
            let (year, month, day) = (utc.year(), u8::from(utc.month()), utc.day());
            let (hour, minute, second, milli) = (utc.hour(), utc.minute(), utc.second(), utc.millisecond());
            format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z")
        }
        Err(_) => format!("@{}ms", at.millis()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_through_text() {
        let at = parse_timestamp("2024-05-01T10:00:00.123+02:00").unwrap();
        assert_eq!(format_timestamp(at), "2024-05-01T08:00:00.123Z");
        assert_eq!(parse_timestamp(&format_timestamp(at)).unwrap(), at);
    }

    #[test]
    fn dates_are_midnight_utc() {
        assert_eq!(parse_time_argument("1997-09-30").unwrap().day(), 10_134);
    }
}
