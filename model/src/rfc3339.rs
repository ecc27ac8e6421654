//! RFC 3339 times as Kubernetes writes them: `2024-05-01T12:00:00Z`, or with
//! a fraction (`MicroTime`) or an offset. One formatter and one parser for
//! every part of netd (Node conditions and Leases, autonomy reports,
//! rollout states), on the `time` crate.

use std::time::SystemTime;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// `time` as RFC 3339 in UTC, whole seconds (`2024-05-01T12:00:00Z`), as
/// the API server writes `metav1.Time`. A time before 1970 or past year
/// 9999 is written as 1970-01-01T00:00:00Z.
pub fn format(time: SystemTime) -> String {
    let secs = time.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format_unix(secs).unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// Unix seconds as RFC 3339 in UTC; `None` past what RFC 3339 can write
/// (year 9999).
pub fn format_unix(secs: u64) -> Option<String> {
    let time = OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    time.format(&Rfc3339).ok()
}

/// An RFC 3339 time (a fraction and an offset allowed); `None` when `text`
/// is not one or lies before 1970.
pub fn parse(text: &str) -> Option<SystemTime> {
    let time = OffsetDateTime::parse(text.trim(), &Rfc3339).ok()?;
    let unix = time.unix_timestamp_nanos();
    let nanos = u64::try_from(unix).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_are_written_as_the_api_server_writes_them() {
        assert_eq!(format(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(format(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)), "2000-02-29T01:01:01Z");
        assert_eq!(format(UNIX_EPOCH + Duration::from_millis(1_735_689_599_900)), "2024-12-31T23:59:59Z");
        assert_eq!(format_unix(253_402_300_800), None, "year 10000");
    }

    #[test]
    fn times_parse_back_with_fractions_and_offsets() {
        for secs in [0u64, 951_782_400 + 3661, 1_735_689_599, 4_102_444_800] {
            let time = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse(&format(time)), Some(time), "{}", format(time));
        }
        let micro = parse("2024-05-01T12:00:00.123456Z").unwrap();
        assert_eq!(micro.duration_since(UNIX_EPOCH).unwrap().subsec_micros(), 123_456);
        assert_eq!(parse("2024-05-01T14:00:00+02:00"), parse("2024-05-01T12:00:00Z"));
        assert_eq!(parse(" 2024-05-01t12:00:00z "), parse("2024-05-01T12:00:00Z"));
        for bad in [
            "",
            "2024-05-01",
            "2024-13-01T00:00:00Z",
            "2024-05-01T12:00Z",
            "yesterday",
            "2024-05-01T12:00:00.x1Z",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
