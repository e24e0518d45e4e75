//! Expiry presets and durations: `7d`, `30d`, `90d`, `unlimited`, or any `N{s,m,h,d,w}`;
//! RFC 3339 instants; rotation grace periods.

use std::fmt;
use std::str::FromStr;

use time::Duration;

/// How long a new key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpiresIn {
    /// Never expires.
    #[default]
    Unlimited,
    /// Expires this long after creation (a [`time::Duration`], e.g.
    /// `time::Duration::days(30)`; the layer's builder takes `std::time::Duration`).
    After(Duration),
    /// Expires at this instant.
    At(time::OffsetDateTime),
}

impl ExpiresIn {
    /// 7 days.
    pub const DAYS_7: Self = Self::After(Duration::days(7));
    /// 30 days.
    pub const DAYS_30: Self = Self::After(Duration::days(30));
    /// 90 days.
    pub const DAYS_90: Self = Self::After(Duration::days(90));

    /// The expiry of a key created at `now`, or `None` for unlimited. A lifetime past the
    /// last representable instant saturates there.
    pub fn expires_at(self, now: time::OffsetDateTime) -> Option<time::OffsetDateTime> {
        match self {
            Self::Unlimited => None,
            Self::After(d) => Some(
                now.checked_add(d)
                    .unwrap_or_else(|| time::PrimitiveDateTime::MAX.assume_utc()),
            ),
            Self::At(at) => Some(at),
        }
    }
}

/// A duration string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: expected a positive number with a unit s, m, h, d or w (e.g. 30d, 24h) or `unlimited`")]
pub struct DurationParseError(String);

/// Parses a positive duration such as `90s`, `15m`, `24h`, `30d` or `2w`.
///
/// # Errors
/// [`DurationParseError`] for anything else, zero, or a value that overflows.
pub fn parse_duration(text: &str) -> Result<Duration, DurationParseError> {
    let err = || DurationParseError(text.chars().take(32).collect());
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number.parse().map_err(|_| err())?;
    let seconds_per = match unit {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(err()),
    };
    let seconds = n.checked_mul(seconds_per).ok_or_else(err)?;
    if seconds <= 0 || seconds > 100 * 365 * 86_400 {
        return Err(err());
    }
    Ok(Duration::seconds(seconds))
}

/// How long the old key keeps working after a rotation that names no grace period.
pub const DEFAULT_GRACE: Duration = Duration::hours(24);

/// A grace period that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a duration such as 24h, 15m or 0s")]
pub struct GraceParseError(());

/// Parses a rotation's grace period: `None` is [`DEFAULT_GRACE`], zero in any unit (`0`,
/// `0s`, `00h`) ends the old key at once, anything else is a [`parse_duration`].
///
/// ```
/// use keywarden::{manage::parse_grace, manage::DEFAULT_GRACE};
/// use time::Duration;
///
/// assert_eq!(parse_grace(None), Ok(DEFAULT_GRACE));
/// assert_eq!(parse_grace(Some("0s")), Ok(Duration::ZERO));
/// assert_eq!(parse_grace(Some("15m")), Ok(Duration::minutes(15)));
/// assert!(parse_grace(Some("soon")).is_err());
/// ```
///
/// # Errors
/// [`GraceParseError`] for anything else (a negative or unitless non-zero number, an
/// unknown unit). The error never repeats the text.
pub fn parse_grace(text: Option<&str>) -> Result<Duration, GraceParseError> {
    let Some(text) = text.map(str::trim) else {
        return Ok(DEFAULT_GRACE);
    };
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    if !number.is_empty()
        && number.bytes().all(|b| b == b'0')
        && matches!(unit, "" | "s" | "m" | "min" | "h" | "d" | "w")
    {
        return Ok(Duration::ZERO);
    }
    parse_duration(text).map_err(|_| GraceParseError(()))
}

/// A lifetime only (a duration or `unlimited`): `None` for anything else, an absolute instant
/// included (those are [`parse_instant`]'s).
#[cfg(feature = "manage-api")]
pub(crate) fn parse_lifetime(text: &str) -> Option<ExpiresIn> {
    match text.parse::<ExpiresIn>() {
        Ok(ExpiresIn::At(_)) | Err(_) => None,
        Ok(lifetime) => Some(lifetime),
    }
}

/// An RFC 3339 instant, in UTC and truncated to the microseconds stores keep (so what is
/// shown back matches what is stored).
#[cfg(feature = "manage-api")]
pub(crate) fn parse_instant(text: &str) -> Option<time::OffsetDateTime> {
    let at =
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?
            // Checked: `9999-12-31T23:59:59-05:00` is past the last instant in UTC.
            .checked_to_offset(time::UtcOffset::UTC)?;
    Some(
        at.replace_nanosecond(at.nanosecond() / 1_000 * 1_000)
            .unwrap_or(at),
    )
}

impl FromStr for ExpiresIn {
    type Err = DurationParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "unlimited" | "never" | "none" => Ok(Self::Unlimited),
            other => match time::OffsetDateTime::parse(
                other,
                &time::format_description::well_known::Rfc3339,
            ) {
                Ok(at) => Ok(Self::At(at)),
                Err(_) => parse_duration(other).map(Self::After),
            },
        }
    }
}

impl fmt::Display for ExpiresIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unlimited => f.write_str("unlimited"),
            Self::At(at) => match at.format(&time::format_description::well_known::Rfc3339) {
                Ok(text) => f.write_str(&text),
                Err(_) => write!(f, "{at}"),
            },
            Self::After(d) => {
                let s = d.whole_seconds();
                if s % 86_400 == 0 {
                    write!(f, "{}d", s / 86_400)
                } else if s % 3_600 == 0 {
                    write!(f, "{}h", s / 3_600)
                } else if s % 60 == 0 {
                    write!(f, "{}m", s / 60)
                } else {
                    write!(f, "{s}s")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_durations() {
        assert_eq!("7d".parse::<ExpiresIn>().unwrap(), ExpiresIn::DAYS_7);
        assert_eq!("30d".parse::<ExpiresIn>().unwrap(), ExpiresIn::DAYS_30);
        assert_eq!("90d".parse::<ExpiresIn>().unwrap(), ExpiresIn::DAYS_90);
        assert_eq!(
            "unlimited".parse::<ExpiresIn>().unwrap(),
            ExpiresIn::Unlimited
        );
        assert_eq!(parse_duration("24h").unwrap(), Duration::hours(24));
        assert_eq!(parse_duration("15m").unwrap(), Duration::minutes(15));
        assert_eq!(parse_duration("2w").unwrap(), Duration::weeks(2));
        for (text, canonical) in [
            ("48h", "2d"),
            ("90m", "90m"),
            ("3600s", "1h"),
            ("unlimited", "unlimited"),
        ] {
            assert_eq!(text.parse::<ExpiresIn>().unwrap().to_string(), canonical);
        }
    }

    #[test]
    fn grace_defaults_to_a_day_and_accepts_zero_in_any_unit() {
        assert_eq!(parse_grace(None).unwrap(), Duration::hours(24));
        for zero in ["0", "0s", "0h", "00m", "0min", " 0d ", "0w"] {
            assert_eq!(parse_grace(Some(zero)).unwrap(), Duration::ZERO, "{zero}");
        }
        assert_eq!(parse_grace(Some("24h")).unwrap(), Duration::hours(24));
        assert_eq!(parse_grace(Some("15m")).unwrap(), Duration::minutes(15));
        for bad in ["-1h", "soon", "", "none", "0xyz", "0 s", "1", "1.5h"] {
            assert!(parse_grace(Some(bad)).is_err(), "{bad}");
        }
        let error = parse_grace(Some("kw_live_secret")).unwrap_err().to_string();
        assert!(!error.contains("kw_live"), "{error}");
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in [
            "",
            "d",
            "30",
            "0d",
            "-1d",
            "1y",
            "30 days",
            "99999999999999999999d",
            "1.5h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    /// A lifetime is at most a hundred years, exactly.
    #[test]
    fn durations_are_bounded_at_a_hundred_years() {
        assert_eq!(parse_duration("36500d"), Ok(Duration::days(36_500)));
        assert!(parse_duration("36501d").is_err());
        assert_eq!(parse_duration("5214w"), Ok(Duration::weeks(5_214)));
        assert!(parse_duration("5215w").is_err());
        assert_eq!(parse_duration("1s"), Ok(Duration::seconds(1)));
        assert_eq!(parse_duration(" 90s "), Ok(Duration::seconds(90)));
        assert_eq!(parse_duration("2min"), Ok(Duration::minutes(2)));
        assert_eq!(parse_duration("3h"), Ok(Duration::hours(3)));
    }

    #[test]
    fn an_expiry_is_counted_from_creation_and_saturates() {
        let now = time::macros::datetime!(2030-01-02 03:04:05 UTC);
        assert_eq!(ExpiresIn::Unlimited.expires_at(now), None);
        assert_eq!(
            ExpiresIn::DAYS_7.expires_at(now),
            Some(time::macros::datetime!(2030-01-09 03:04:05 UTC))
        );
        let at = time::macros::datetime!(2031-05-06 07:08:09 UTC);
        assert_eq!(ExpiresIn::At(at).expires_at(now), Some(at));
        assert_eq!(
            ExpiresIn::After(Duration::MAX).expires_at(now),
            Some(time::PrimitiveDateTime::MAX.assume_utc())
        );
    }

    #[test]
    fn instants_print_as_rfc3339_and_every_unit_prints_canonically() {
        let at = time::macros::datetime!(2031-05-06 07:08:09 UTC);
        assert_eq!(ExpiresIn::At(at).to_string(), "2031-05-06T07:08:09Z");
        assert_eq!(
            "2031-05-06T07:08:09Z".parse::<ExpiresIn>(),
            Ok(ExpiresIn::At(at))
        );
        for (text, canonical) in [
            ("90s", "90s"),
            ("120s", "2m"),
            ("2w", "14d"),
            ("none", "unlimited"),
        ] {
            assert_eq!(text.parse::<ExpiresIn>().unwrap().to_string(), canonical);
        }
    }

    #[cfg(feature = "manage-api")]
    #[test]
    fn lifetimes_and_instants_are_told_apart() {
        assert_eq!(parse_lifetime("30d"), Some(ExpiresIn::DAYS_30));
        assert_eq!(parse_lifetime(" unlimited "), Some(ExpiresIn::Unlimited));
        assert_eq!(parse_lifetime("2031-05-06T07:08:09Z"), None);
        assert_eq!(parse_lifetime("soon"), None);

        // In UTC, truncated to the microseconds a store keeps.
        assert_eq!(
            parse_instant(" 2031-05-06T09:08:09.123456789+02:00 "),
            Some(time::macros::datetime!(2031-05-06 07:08:09.123456 UTC))
        );
        assert_eq!(parse_instant("30d"), None);
    }
}
