//! Wire formats <-> domain types, both directions.
//!
//! `json` holds the JSON-lines contract used by `replay` and by JSON input topics; `avro` the
//! Confluent-framed Avro records of the Kafka topics (`schemas/*.avsc`). Both validate through
//! the same function, so a record means the same in either format. Wire types never leave this
//! module: everything past it sees only `crate::domain`.

pub mod avro;
pub mod json;
pub mod output;
pub mod registry;

use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, PrimitiveDateTime, Time};

use crate::domain::{Timestamp, MILLIS_PER_DAY};

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
    /// Not a Confluent-framed record: too short, or a magic byte other than 0.
    #[error("not Confluent wire format: {0}")]
    Framing(String),
    /// The schema id in the frame is not known.
    #[error("unknown schema id {0}")]
    UnknownSchema(u32),
    /// The Avro body does not decode with the writer's schema (truncated, wrong types, ...).
    #[error("invalid Avro: {0}")]
    Avro(String),
    /// A field is present but its value is not acceptable.
    #[error("field `{field}`: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Larger than the configured limit; not decoded.
    #[error("record of {bytes} bytes is over the limit of {limit}")]
    Oversized {
        /// Record size.
        bytes: usize,
        /// The limit (`input.max_record_bytes`).
        limit: usize,
    },
    /// No payload at all.
    #[error("empty record")]
    Empty,
    /// A record of the service's own topics (the identity topic) that does not read: written by
    /// a newer version, or damaged.
    #[error("unreadable internal record: {0}")]
    Internal(String),
    /// A valid event of another source than the topic carries.
    #[error("a `{got}` event on a topic of `{expected}` events")]
    WrongSource {
        /// What the topic carries.
        expected: &'static str,
        /// What the record is.
        got: &'static str,
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
            DecodeError::Framing(_) => "bad_framing",
            DecodeError::UnknownSchema(_) => "unknown_schema_id",
            DecodeError::Avro(_) => "invalid_avro",
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::Empty => "empty_record",
            DecodeError::WrongSource { .. } => "wrong_source",
            DecodeError::Internal(_) => "invalid_internal_record",
        }
    }
}

/// Parses an RFC 3339 timestamp (any offset) into UTC milliseconds, rejecting instants before
/// 1970 or after 2200.
pub fn parse_timestamp(text: &str) -> Result<Timestamp, String> {
    let parsed = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|error| format!("`{text}` is not an RFC 3339 timestamp: {error}"))?;
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
    let millis =
        i64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| "timestamp out of range".to_owned())?;
    let timestamp = Timestamp::from_millis(millis);
    if timestamp.is_plausible() {
        Ok(timestamp)
    } else {
        Err(format!("{at} is outside the accepted range 1970-01-01 to 2200-01-01"))
    }
}

/// Formats as RFC 3339 in UTC with millisecond precision, e.g. `2024-05-01T08:00:00.000Z`.
///
/// Hand-written (civil date from day number, after Howard Hinnant's `civil_from_days`) because
/// it runs once per output record and per generated event: about 20 ns instead of the ~300 ns of
/// a general formatter.
pub fn format_timestamp(at: Timestamp) -> String {
    let millis = at.millis();
    let days = millis.div_euclid(MILLIS_PER_DAY);
    let of_day = millis.rem_euclid(MILLIS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        return format!("@{millis}ms");
    }
    let (hour, minute, second, milli) = (
        of_day / 3_600_000,
        of_day / 60_000 % 60,
        of_day / 1000 % 60,
        of_day % 1000,
    );
    let mut text = String::with_capacity(24);
    push_digits(&mut text, year, 4);
    for (separator, value, width) in [
        ('-', i64::from(month), 2),
        ('-', i64::from(day), 2),
        ('T', hour, 2),
        (':', minute, 2),
        (':', second, 2),
        ('.', milli, 3),
    ] {
        text.push(separator);
        push_digits(&mut text, value, width);
    }
    text.push('Z');
    text
}

/// Appends `value` as exactly `width` decimal digits (zero-padded).
fn push_digits(text: &mut String, value: i64, width: u32) {
    for power in (0..width).rev() {
        let digit = (value / 10_i64.pow(power) % 10) as u8;
        text.push(char::from(b'0' + digit));
    }
}

/// (year, month, day) of a day number (days since 1970-01-01), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
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
    fn the_fast_formatter_agrees_with_the_time_crate() {
        let format =
            time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
        let mut millis: i64 = 0;
        while millis < Timestamp::MAX_VALID.millis() {
            let expected = OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
                .unwrap()
                .format(&format)
                .unwrap();
            assert_eq!(format_timestamp(Timestamp::from_millis(millis)), expected);
            millis += 7_777_777_777; // about 90 days and an odd number of milliseconds
        }
        assert_eq!(
            format_timestamp(Timestamp::from_millis(951_782_400_000)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn dates_are_midnight_utc() {
        assert_eq!(parse_time_argument("1997-09-30").unwrap().day(), 10_134);
    }
}
