//! Times and durations that come from outside: one set of rules, range-checked where they
//! enter, so that nothing later can overflow or panic on them.
//!
//! A time is *representable* when it lies in 1970-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999Z:
//! the range RFC 3339 text can carry and every Kafka consumer can read. Anything outside
//! is refused here (`None`), and stamping a record (`record::stamp`) falls back to the receive time
//! for a record whose source time is not representable, flagging it in the record.

use std::time::{Duration, SystemTime};

/// 9999-12-31T23:59:59.999Z in Unix milliseconds: the last representable instant.
pub const MAX_UNIX_MS: u64 = 253_402_300_799_999;

/// The longest duration accepted from outside (a command's `ttl` or `timeout`, a config
/// interval): 100 years. Anything longer is a mistake or an attack, and refusing it here
/// keeps every later `SystemTime + Duration` far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Whether `t` can be written as an RFC 3339 time (and is not before the Unix epoch).
pub fn representable(t: SystemTime) -> bool {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .is_ok_and(|d| d.as_millis() <= u128::from(MAX_UNIX_MS))
}

/// `t` if it is representable.
pub fn checked(t: SystemTime) -> Option<SystemTime> {
    representable(t).then_some(t)
}

/// Unix milliseconds → time, if representable.
pub fn from_unix_ms(ms: u64) -> Option<SystemTime> {
    if ms > MAX_UNIX_MS {
        return None;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// Unix seconds (fractional) → time, if finite and representable.
pub fn from_unix_secs_f64(secs: f64) -> Option<SystemTime> {
    if !secs.is_finite() || secs < 0.0 || secs * 1000.0 > MAX_UNIX_MS as f64 {
        return None;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(secs).ok()?)
}

/// `t + d`, or `None` when the sum would not be representable.
pub fn add(t: SystemTime, d: Duration) -> Option<SystemTime> {
    t.checked_add(d).and_then(checked)
}

/// `t` moved into the representable range (the nearer end of it).
pub fn clamp(t: SystemTime) -> SystemTime {
    if t < SystemTime::UNIX_EPOCH {
        return SystemTime::UNIX_EPOCH;
    }
    let max = SystemTime::UNIX_EPOCH + Duration::from_millis(MAX_UNIX_MS);
    t.min(max)
}

/// RFC 3339 with milliseconds of `t` clamped into range: for times the agent derives
/// (a window's end one second after 9999-12-31T23:59:59), never a panic.
pub fn format_clamped(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(clamp(t)).to_string()
}

/// RFC 3339 with milliseconds (`2024-01-15T10:30:00.000Z`), or `None` when `t` is out of
/// range (the formatter would panic).
pub fn format_rfc3339_millis(t: SystemTime) -> Option<String> {
    representable(t).then(|| humantime::format_rfc3339_millis(t).to_string())
}

/// RFC 3339 / ISO 8601 date-time: `Z`, `z`, `±hh:mm`, `±hhmm` or no zone (taken as UTC),
/// with or without fractional seconds, `T` or a space between date and time. The
/// result must be representable after the offset is applied
/// (`1970-01-01T00:00:00+00:01` is not).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if !s.is_ascii() || s.len() < 19 || s.len() > 40 {
        return None;
    }
    let (main, offset) = split_zone(s)?;
    let t = humantime::parse_rfc3339_weak(main).ok()?;
    let t = if offset >= 0 {
        t.checked_sub(Duration::from_secs(offset.unsigned_abs()))?
    } else {
        t.checked_add(Duration::from_secs(offset.unsigned_abs()))?
    };
    checked(t)
}

/// Splits off the zone designator; returns the local part and the offset in seconds.
fn split_zone(s: &str) -> Option<(&str, i64)> {
    if let Some(main) = s.strip_suffix(['Z', 'z']) {
        return Some((main, 0));
    }
    // A zone sign can only come after the time of day (index 19 or later): the '-' of
    // the date comes earlier.
    match s.rfind(['+', '-']) {
        Some(i) if i >= 19 => {
            let sign = if s.as_bytes()[i] == b'-' { -1 } else { 1 };
            let hm: String = s[i + 1..].chars().filter(|c| *c != ':').collect();
            if hm.len() != 4 || !hm.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let h: i64 = hm[..2].parse().ok()?;
            let m: i64 = hm[2..].parse().ok()?;
            if h > 23 || m > 59 {
                return None;
            }
            Some((&s[..i], sign * (h * 3600 + m * 60)))
        }
        _ => Some((s, 0)),
    }
}

/// A duration from text (`30s`, `2m`, `1h 30m`) within [`MAX_DURATION`].
pub fn parse_duration_text(s: &str) -> Option<Duration> {
    if s.len() > 64 {
        return None;
    }
    humantime::parse_duration(s)
        .ok()
        .filter(|d| *d <= MAX_DURATION)
}

/// A duration from a number of seconds, finite, non-negative and within [`MAX_DURATION`].
pub fn duration_from_secs_f64(secs: f64) -> Option<Duration> {
    if !secs.is_finite() || secs < 0.0 || secs > MAX_DURATION.as_secs_f64() {
        return None;
    }
    Duration::try_from_secs_f64(secs).ok()
}

/// Config durations: humantime text (`20ms`, `5s`, `1h 30m`), at most [`MAX_DURATION`],
/// so that no timer or deadline built from a config value can overflow. Use as
/// `#[serde(with = "crate::time::serde_duration")]` on `Duration` and
/// `Option<Duration>` fields.
pub mod serde_duration {
    use std::time::Duration;

    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    /// What the bound is checked on.
    pub trait Bounded {
        /// The longest duration the value holds, to check against the bound.
        fn longest(&self) -> Option<Duration>;
    }
    impl Bounded for Duration {
        fn longest(&self) -> Option<Duration> {
            Some(*self)
        }
    }
    impl Bounded for Option<Duration> {
        fn longest(&self) -> Option<Duration> {
            *self
        }
    }

    /// Writes a duration as humantime text (`1m 30s`).
    pub fn serialize<T, S>(v: &T, s: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        for<'a> humantime_serde::Serde<&'a T>: serde::Serialize,
    {
        humantime_serde::serialize(v, s)
    }

    /// Reads humantime text and refuses durations past the bound.
    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Bounded,
        humantime_serde::Serde<T>: Deserialize<'de>,
    {
        let v: T = humantime_serde::deserialize(d)?;
        match v.longest() {
            Some(x) if x > super::MAX_DURATION => Err(D::Error::custom(format!(
                "{} is too long: a duration of at most 100 years (such as \"20ms\", \"5s\", \"2h\")",
                humantime::format_duration(x)
            ))),
            _ => Ok(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t: SystemTime) -> u128 {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    }

    #[test]
    fn zones_are_applied_and_the_result_must_be_representable() {
        let t = parse_rfc3339("2024-01-15T10:30:00.000Z").unwrap();
        assert_eq!(ms(t), 1_705_314_600_000);
        assert_eq!(parse_rfc3339("2024-01-15T11:30:00+01:00"), Some(t));
        assert_eq!(parse_rfc3339("2024-01-15T05:30:00-0500"), Some(t));
        assert_eq!(parse_rfc3339("2024-01-15 10:30:00"), Some(t));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00+00:01"), None);
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59-01:00"), None);
        assert!(parse_rfc3339("9999-12-31T23:59:59.999Z").is_some());
        assert_eq!(parse_rfc3339("2024-01-15T10:30:00+25:00"), None);
        assert_eq!(parse_rfc3339("2024-01-15T10:30:00+1:00"), None);
        assert_eq!(parse_rfc3339("2024-01-15T10:30:00é"), None);
        assert_eq!(parse_rfc3339(""), None);
    }

    #[test]
    fn unix_numbers_outside_the_range_are_refused() {
        assert_eq!(from_unix_ms(MAX_UNIX_MS).map(ms), Some(MAX_UNIX_MS as u128));
        assert_eq!(from_unix_ms(MAX_UNIX_MS + 1), None);
        assert_eq!(from_unix_ms(u64::MAX), None);
        assert_eq!(from_unix_secs_f64(f64::NAN), None);
        assert_eq!(from_unix_secs_f64(f64::INFINITY), None);
        assert_eq!(from_unix_secs_f64(-1.0), None);
        assert_eq!(from_unix_secs_f64(1e300), None);
        assert_eq!(from_unix_secs_f64(1.5).map(ms), Some(1500));
    }

    #[test]
    fn formatting_never_panics_and_refuses_what_it_cannot_write() {
        assert_eq!(
            format_rfc3339_millis(SystemTime::UNIX_EPOCH).as_deref(),
            Some("1970-01-01T00:00:00.000Z")
        );
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(format_rfc3339_millis(far), None);
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(format_rfc3339_millis(before), None);
        assert_eq!(add(far, Duration::from_secs(1)), None);
        assert_eq!(format_clamped(far), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_clamped(before), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn config_durations_are_bounded() {
        #[derive(serde::Deserialize, serde::Serialize, Debug)]
        struct C {
            #[serde(with = "super::serde_duration")]
            d: Duration,
            #[serde(default, with = "super::serde_duration")]
            o: Option<Duration>,
        }
        let c: C = toml::from_str("d = \"20ms\"\no = \"2s\"").unwrap();
        assert_eq!(
            (c.d, c.o),
            (Duration::from_millis(20), Some(Duration::from_secs(2)))
        );
        assert!(toml::to_string(&c).unwrap().contains("\"20ms\""));
        for bad in ["10000000000y", "101y"] {
            let e = toml::from_str::<C>(&format!("d = \"{bad}\"")).unwrap_err();
            assert!(e.to_string().contains("at most 100 years"), "{e}");
        }
        assert!(toml::from_str::<C>("d = \"1s\"\no = \"200y\"").is_err());
    }

    #[test]
    fn durations_are_bounded() {
        assert_eq!(parse_duration_text("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration_text("300000000000y"), None);
        assert_eq!(parse_duration_text("101y"), None);
        assert_eq!(duration_from_secs_f64(f64::NAN), None);
        assert_eq!(duration_from_secs_f64(-0.5), None);
        assert_eq!(duration_from_secs_f64(1e300), None);
        assert_eq!(
            duration_from_secs_f64(2.5),
            Some(Duration::from_millis(2500))
        );
    }
}
