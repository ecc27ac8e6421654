//! The node annotations that declare autonomy (SPEC §4): an autonomous edge
//! node cut off from the cloud keeps its subnet, its peers keep its routes
//! and (with `netd-controller`) its pods are not evicted.
//!
//! Three annotations switch it on, as the systems netd replaces write them:
//! Alibaba Cloud edge's `node.beta.alibabacloud.com/autonomy=true`,
//! OpenYurt's older `node.beta.openyurt.io/autonomy=true`, and OpenYurt's
//! bounded `node.openyurt.io/autonomy-duration=<Go duration>` (`0` means
//! forever). The duration, when present, bounds autonomy whichever flag
//! switched it on; alone, it switches it on.

use std::time::Duration;

/// The autonomy annotation (Alibaba Cloud edge).
pub const ANNOTATION_AUTONOMY: &str = "node.beta.alibabacloud.com/autonomy";
/// The autonomy annotation (OpenYurt), also honoured.
pub const ANNOTATION_AUTONOMY_OPENYURT: &str = "node.beta.openyurt.io/autonomy";
/// OpenYurt's bounded autonomy: how long the node stays autonomous once cut
/// off (a Go duration; `0` means forever).
pub const ANNOTATION_AUTONOMY_DURATION: &str = "node.openyurt.io/autonomy-duration";

/// Every annotation that takes part, in the order they are read.
pub const ANNOTATIONS: [&str; 3] = [ANNOTATION_AUTONOMY, ANNOTATION_AUTONOMY_OPENYURT, ANNOTATION_AUTONOMY_DURATION];

/// True for an autonomy annotation value that means "on".
pub fn autonomy_on(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// What a node's annotations say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Autonomy {
    /// Not autonomous: a silent node goes NotReady and its pods are evicted
    /// after their tolerations; its lease may be reclaimed.
    Off,
    /// Autonomous with no bound.
    Forever,
    /// Autonomous for this long after the node is cut off.
    For(Duration),
}

impl Autonomy {
    /// True unless [`Autonomy::Off`].
    pub fn is_on(self) -> bool {
        !matches!(self, Self::Off)
    }

    /// Whether a node last heard from (its lease renewed) at `renewed_at`
    /// still counts as autonomous at `now`: always when [`Forever`](Self::Forever),
    /// until the bound has run from the last renewal when [`For`](Self::For).
    /// A registry keeps the node's subnet exactly that long.
    pub fn holds_at(self, renewed_at: std::time::SystemTime, now: std::time::SystemTime) -> bool {
        match self {
            Self::Off => false,
            Self::Forever => true,
            Self::For(bound) => bound.is_zero() || renewed_at.checked_add(bound).is_none_or(|end| end > now),
        }
    }
}

impl std::fmt::Display for Autonomy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Forever => f.write_str("on (no time limit)"),
            Self::For(d) => write!(f, "on for {} after the node is cut off", format_go_duration(*d)),
        }
    }
}

/// A node's autonomy and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutonomyStatus {
    /// The effect.
    pub autonomy: Autonomy,
    /// The annotations that produced it (empty when off).
    pub sources: Vec<&'static str>,
    /// An annotation that is present but unusable, and how it was taken.
    pub problem: Option<String>,
}

impl AutonomyStatus {
    /// Reads the annotations through `get` (annotation key -> value).
    ///
    /// A duration that does not parse still means the operator asked for
    /// autonomy: it is taken as "no time limit" (evicting the pods of a node
    /// meant to be autonomous is the harm to avoid) and reported in
    /// [`AutonomyStatus::problem`].
    pub fn from_annotations<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Self {
        let mut sources = Vec::new();
        for key in [ANNOTATION_AUTONOMY, ANNOTATION_AUTONOMY_OPENYURT] {
            if autonomy_on(get(key)) {
                sources.push(key);
            }
        }
        let mut problem = None;
        let bound = match get(ANNOTATION_AUTONOMY_DURATION) {
            None => None,
            Some(text) => {
                sources.push(ANNOTATION_AUTONOMY_DURATION);
                match parse_go_duration(text) {
                    Ok(d) if d.is_zero() => Some(Autonomy::Forever),
                    Ok(d) => Some(Autonomy::For(d)),
                    Err(reason) => {
                        problem = Some(format!(
                            "{ANNOTATION_AUTONOMY_DURATION}={text:?} is not a duration ({reason}); taken as no time limit"
                        ));
                        Some(Autonomy::Forever)
                    }
                }
            }
        };
        let autonomy = match bound {
            Some(bounded) => bounded,
            None if sources.is_empty() => Autonomy::Off,
            None => Autonomy::Forever,
        };
        Self { autonomy, sources, problem }
    }
}

/// Why a Go duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Empty text.
    #[error("empty")]
    Empty,
    /// A negative duration.
    #[error("negative")]
    Negative,
    /// Something else than number+unit pairs.
    #[error("expected number+unit pairs such as 90s, 1h30m or 0 (units ns, us, ms, s, m, h) at {0:?}")]
    Syntax(String),
    /// Longer than this process can count.
    #[error("too long")]
    Overflow,
}

/// Parses a Go `time.ParseDuration` string (`300ms`, `1.5h`, `2h45m`, `0`).
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if let Some(negated) = text.strip_prefix('-') {
        return match parse_go_duration(negated)? {
            d if d.is_zero() => Ok(Duration::ZERO),
            _ => Err(DurationError::Negative),
        };
    }
    let rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return Err(DurationError::Empty);
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total: u128 = 0;
    let mut left = rest;
    while !left.is_empty() {
        let number_len = left.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(left.len());
        let (number, after) = left.split_at(number_len);
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let syntax = || DurationError::Syntax(left.to_string());
        let nanos_per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => return Err(syntax()),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(syntax());
        }
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| DurationError::Overflow)? };
        let mut part = whole.checked_mul(nanos_per_unit).ok_or(DurationError::Overflow)?;
        let mut scale = nanos_per_unit;
        for digit in fraction.bytes() {
            scale /= 10;
            part += u128::from(digit - b'0') * scale;
        }
        total = total.checked_add(part).ok_or(DurationError::Overflow)?;
        left = next;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| DurationError::Overflow)?;
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| DurationError::Overflow)?;
    Ok(Duration::new(secs, nanos))
}

/// Formats a duration as Go prints one (`1h30m0s`, `1.5s`, `0s`), which
/// [`parse_go_duration`] reads back.
pub fn format_go_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let nanos = d.subsec_nanos();
    let seconds = if nanos == 0 {
        format!("{s}s")
    } else {
        let fraction = format!("{nanos:09}");
        format!("{s}.{}s", fraction.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::HashMap;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn autonomy_holds_for_its_bound_after_the_last_renewal() {
        let renewed = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = |secs| renewed + Duration::from_secs(secs);
        assert!(!Autonomy::Off.holds_at(renewed, renewed));
        assert!(Autonomy::Forever.holds_at(renewed, later(10 * 365 * 86_400)));
        let two_hours = Autonomy::For(Duration::from_secs(7200));
        assert!(two_hours.holds_at(renewed, later(7199)));
        assert!(!two_hours.holds_at(renewed, later(7200)));
        assert!(Autonomy::For(Duration::ZERO).holds_at(renewed, later(1 << 40)), "0 is no limit");
        let far = Autonomy::For(Duration::MAX);
        assert!(far.holds_at(SystemTime::now(), SystemTime::now()), "an overflowing end never comes");
    }

    #[test]
    fn go_durations_parse_as_go_does() {
        let ok = [
            ("0", 0.0),
            ("0s", 0.0),
            ("-0", 0.0),
            ("300ms", 0.3),
            ("1.5h", 5400.0),
            ("2h45m", 9900.0),
            ("1h0m0s", 3600.0),
            ("+90s", 90.0),
            (".5s", 0.5),
            ("1us", 0.000001),
            ("1µs", 0.000001),
            ("10ns", 0.00000001),
        ];
        for (text, secs) in ok {
            let d = parse_go_duration(text).unwrap();
            assert!((d.as_secs_f64() - secs).abs() < 1e-12, "{text} -> {d:?}");
        }
        for bad in ["", "5", "1d", "h", "-5s", "1.2.3s", "1 h", "abc", "99999999999999999999999h"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} parsed");
        }
        for d in [Duration::from_secs(5400), Duration::from_millis(1500), Duration::from_secs(59), Duration::ZERO] {
            assert_eq!(parse_go_duration(&format_go_duration(d)).unwrap(), d);
        }
        assert_eq!(format_go_duration(Duration::from_secs(5400)), "1h30m0s");
    }

    #[test]
    fn annotations_give_the_autonomy_and_its_sources() {
        let status = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            AutonomyStatus::from_annotations(|k| map.get(k).map(String::as_str))
        };
        let off = status(&[(ANNOTATION_AUTONOMY, "false"), ("other", "true")]);
        assert_eq!((off.autonomy, off.sources.len()), (Autonomy::Off, 0));
        let on = status(&[(ANNOTATION_AUTONOMY, "True")]);
        assert_eq!((on.autonomy, on.sources), (Autonomy::Forever, vec![ANNOTATION_AUTONOMY]));
        let yurt = status(&[(ANNOTATION_AUTONOMY_OPENYURT, "true"), (ANNOTATION_AUTONOMY_DURATION, "2h")]);
        assert_eq!(yurt.autonomy, Autonomy::For(Duration::from_secs(7200)));
        assert_eq!(yurt.sources, vec![ANNOTATION_AUTONOMY_OPENYURT, ANNOTATION_AUTONOMY_DURATION]);
        assert_eq!(status(&[(ANNOTATION_AUTONOMY_DURATION, "0")]).autonomy, Autonomy::Forever);
        let bad = status(&[(ANNOTATION_AUTONOMY_DURATION, "2 days")]);
        assert_eq!(bad.autonomy, Autonomy::Forever);
        assert!(bad.problem.unwrap().contains("not a duration"));
        assert_eq!(Autonomy::For(Duration::from_secs(90)).to_string(), "on for 1m30s after the node is cut off");
    }
}
