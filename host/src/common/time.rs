//! Event time: watermarks, timestamps as microseconds, Spark-style durations, output modes.

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::compute::cast;
use arrow::compute::kernels::cast_utils::parse_interval_month_day_nano;
use arrow::datatypes::{DataType, TimeUnit};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// A watermark: the promise that no more rows with an event time (microseconds since the Unix
/// epoch) before it will arrive. Rows older than the watermark are *late*.
///
/// [`Watermark::NONE`] means nothing is known yet (no row seen); [`Watermark::END`] means the
/// input has ended, so every window and frame can be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Watermark(pub i64);

impl Watermark {
    /// Nothing is known yet: nothing is late and nothing can be closed.
    pub const NONE: Watermark = Watermark(i64::MIN);
    /// The input has ended: everything can be closed.
    pub const END: Watermark = Watermark(i64::MAX);

    /// The watermark in microseconds since the epoch.
    pub fn micros(self) -> i64 {
        self.0
    }

    /// Whether a row with event time `ts` is behind this watermark.
    pub fn is_late(self, ts: i64) -> bool {
        ts < self.0
    }

    /// This watermark held back by `by` microseconds: an operator that may still emit rows up
    /// to `by` older than its input watermark (an interval join) passes this downstream, so
    /// windows after it do not close too early. `NONE` and `END` stay as they are.
    pub fn held_back(self, by: i64) -> Watermark {
        if self == Self::NONE || self == Self::END {
            self
        } else {
            Watermark(self.0.saturating_sub(by.max(0)))
        }
    }

    /// The watermark of rows whose latest event time is `max_event_time`, allowing `delay`
    /// of disorder.
    pub fn from_max_event_time(max_event_time: i64, delay: i64) -> Watermark {
        if max_event_time == i64::MIN {
            Self::NONE
        } else {
            Watermark(max_event_time.saturating_sub(delay))
        }
    }

    /// RFC 3339 text, or `None` for `NONE`/`END`.
    pub fn rfc3339(self) -> Option<String> {
        if self == Self::NONE || self == Self::END {
            return None;
        }
        arrow::temporal_conversions::timestamp_us_to_datetime(self.0)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
    }
}

impl std::fmt::Display for Watermark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::NONE => write!(f, "none"),
            Self::END => write!(f, "end of input"),
            w => write!(f, "{}", w.rfc3339().unwrap_or_else(|| w.0.to_string())),
        }
    }
}

/// A timestamp or date array as `Int64` microseconds since the epoch.
///
/// # Errors
/// Arrays that are not timestamps or dates.
pub fn to_micros(array: &ArrayRef) -> Result<ArrayRef> {
    if array.data_type() == &DataType::Int64 {
        return Ok(Arc::clone(array));
    }
    let as_ts = cast(array, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
    Ok(cast(&as_ts, &DataType::Int64)?)
}

/// Parses a point in time given on the command line: RFC 3339 (`2026-11-01T08:00:00Z`,
/// `2026-11-01T09:00:00+01:00`), or a date and time without a zone, read as UTC, as SQL writes
/// it (`2026-11-01 08:00:00`, `2026-11-01T08:00:00.250`, `2026-11-01`). Returns microseconds
/// since the epoch, as Riffle's event times count.
///
/// # Errors
/// A message naming the text and the forms accepted.
pub fn parse_timestamp(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_micros());
    }
    for form in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, form) {
            return Ok(t.and_utc().timestamp_micros());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
            .timestamp_micros());
    }
    Err(format!(
        "{text:?} is not a time; write e.g. 2026-11-01T08:00:00Z, 2026-11-01 08:00:00 (UTC) or \
         2026-11-01"
    ))
}

/// Parses a Spark-style duration (`'1 minute'`, `'30 seconds'`, `'1 hour 30 minutes'`,
/// `'500 milliseconds'`) into microseconds.
///
/// # Errors
/// A message naming the text when it is not a positive, fixed-length duration (months and
/// years have no fixed length).
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let interval = parse_interval_month_day_nano(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. '1 minute'"))?;
    if interval.months != 0 {
        return Err(format!(
            "{text:?}: months and years have no fixed length; use days"
        ));
    }
    let micros = (interval.days as i64)
        .checked_mul(86_400_000_000)
        .and_then(|d| d.checked_add(interval.nanoseconds / 1000))
        .ok_or_else(|| format!("{text:?} is too long"))?;
    if micros <= 0 {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(micros)
}

/// A duration in configuration files, written like SQL intervals (`"10 seconds"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SqlDuration(pub i64);

impl SqlDuration {
    /// Microseconds.
    pub fn micros(self) -> i64 {
        self.0
    }

    /// As a standard duration.
    pub fn std(self) -> std::time::Duration {
        std::time::Duration::from_micros(self.0 as u64)
    }
}

impl TryFrom<String> for SqlDuration {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        parse_duration(&text).map(SqlDuration)
    }
}

/// Spark's output modes: which result rows a trigger writes to the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// Only rows that are final and will never change (closed windows, new stateless rows).
    #[default]
    Append,
    /// The rows that changed in this trigger.
    Update,
    /// The whole result table on every trigger.
    Complete,
}

impl std::str::FromStr for OutputMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "append" => Ok(OutputMode::Append),
            "update" => Ok(OutputMode::Update),
            "complete" => Ok(OutputMode::Complete),
            other => Err(format!(
                "unknown output mode {other:?}: expected append, update or complete"
            )),
        }
    }
}

impl std::fmt::Display for OutputMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OutputMode::Append => "append",
            OutputMode::Update => "update",
            OutputMode::Complete => "complete",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_spark() {
        assert_eq!(parse_duration("1 minute"), Ok(60_000_000));
        assert_eq!(parse_duration("30 seconds"), Ok(30_000_000));
        assert_eq!(parse_duration("1 hour 30 minutes"), Ok(5_400_000_000));
        assert_eq!(parse_duration("500 milliseconds"), Ok(500_000));
        assert_eq!(parse_duration("2 days"), Ok(172_800_000_000));
        assert!(
            parse_duration("1 month")
                .unwrap_err()
                .contains("fixed length")
        );
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0 seconds").is_err());
        assert!(parse_duration("2000000000 days").is_err());
    }

    #[test]
    fn command_line_times_are_rfc_3339_or_utc() {
        let eight = 1_761_984_000_000_000; // 2025-11-01T08:00:00Z
        assert_eq!(parse_timestamp("2025-11-01T08:00:00Z"), Ok(eight));
        assert_eq!(parse_timestamp("2025-11-01T09:00:00+01:00"), Ok(eight));
        assert_eq!(parse_timestamp("2025-11-01 08:00:00"), Ok(eight));
        assert_eq!(
            parse_timestamp("2025-11-01T08:00:00.25"),
            Ok(eight + 250_000)
        );
        assert_eq!(parse_timestamp("2025-11-01"), Ok(eight - 8 * 3_600_000_000));
        assert!(
            parse_timestamp("yesterday")
                .unwrap_err()
                .contains("2026-11-01")
        );
        assert!(parse_timestamp("2025-13-01").is_err());
    }

    #[test]
    fn watermark_hold_back_keeps_the_sentinels() {
        assert_eq!(Watermark(100).held_back(30), Watermark(70));
        assert_eq!(Watermark::NONE.held_back(30), Watermark::NONE);
        assert_eq!(Watermark::END.held_back(30), Watermark::END);
        assert!(Watermark(100).is_late(99));
        assert!(!Watermark(100).is_late(100));
        assert_eq!(Watermark::from_max_event_time(i64::MIN, 5), Watermark::NONE);
    }
}
