//! Rate-limit policies attached to keys.
//!
//! A policy reads like `100/min` or `100/min,burst=20`: so many requests per period, with an
//! optional burst (by default the burst equals the limit).
//!
//! ```
//! use keywarden::RateLimitPolicy;
//!
//! let policy: RateLimitPolicy = "100/min,burst=20".parse().unwrap();
//! assert_eq!(policy.limit(), 100);
//! assert_eq!(policy.burst(), 20);
//! assert_eq!(policy.to_string(), "100/min,burst=20");
//! ```

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

/// So many requests per period, with a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimitPolicy {
    limit: NonZeroU32,
    period: Duration,
    burst: NonZeroU32,
}

/// A rate-limit policy string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rate limit {0:?}: expected N/s, N/min, N/h or N/day, optionally followed by ,burst=M"
)]
pub struct RateLimitParseError(String);

impl RateLimitPolicy {
    /// `limit` requests per `period`, burst equal to the limit.
    ///
    /// # Panics
    /// If `period` is zero.
    pub fn new(limit: NonZeroU32, period: Duration) -> Self {
        assert!(!period.is_zero(), "rate-limit period must be positive");
        Self {
            limit,
            period,
            burst: limit,
        }
    }

    /// Sets the burst: how many requests may arrive at once.
    #[must_use]
    pub fn with_burst(mut self, burst: NonZeroU32) -> Self {
        self.burst = burst;
        self
    }

    /// Requests allowed per period.
    pub fn limit(&self) -> u32 {
        self.limit.get()
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The burst size.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// Whether this policy allows no more than `other`: a sustained rate and a burst each at
    /// most `other`'s.
    pub fn is_within(&self, other: &RateLimitPolicy) -> bool {
        // limit / period <= other.limit / other.period, cross-multiplied in nanoseconds.
        let mine = u128::from(self.limit.get()) * other.period.as_nanos();
        let theirs = u128::from(other.limit.get()) * self.period.as_nanos();
        mine <= theirs && self.burst <= other.burst
    }
}

const UNITS: [(&str, u64); 8] = [
    ("s", 1),
    ("sec", 1),
    ("m", 60),
    ("min", 60),
    ("h", 3600),
    ("hour", 3600),
    ("d", 86_400),
    ("day", 86_400),
];

impl FromStr for RateLimitPolicy {
    type Err = RateLimitParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RateLimitParseError(s.chars().take(64).collect());
        let (rate, burst) = match s.trim().split_once(',') {
            Some((rate, burst)) => (rate.trim(), Some(burst.trim())),
            None => (s.trim(), None),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(err)?;
        let limit: NonZeroU32 = count.trim().parse().map_err(|_| err())?;
        let seconds = UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit.trim()))
            .map(|(_, secs)| *secs)
            .ok_or_else(err)?;
        let mut policy = Self::new(limit, Duration::from_secs(seconds));
        if let Some(burst) = burst {
            let value = burst.strip_prefix("burst=").ok_or_else(err)?;
            policy.burst = value.trim().parse().map_err(|_| err())?;
        }
        Ok(policy)
    }
}

impl fmt::Display for RateLimitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.period.as_secs();
        let unit = match secs {
            1 => "s".to_owned(),
            60 => "min".to_owned(),
            3600 => "h".to_owned(),
            86_400 => "day".to_owned(),
            _ => format!("{secs}s"),
        };
        write!(f, "{}/{unit}", self.limit)?;
        if self.burst != self.limit {
            write!(f, ",burst={}", self.burst)?;
        }
        Ok(())
    }
}

impl serde::Serialize for RateLimitPolicy {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RateLimitPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_canonical_forms() {
        for (input, canonical) in [
            ("100/min", "100/min"),
            ("100/m", "100/min"),
            (" 10 / s ", "10/s"),
            ("5000/hour", "5000/h"),
            ("1/day", "1/day"),
            ("100/min,burst=20", "100/min,burst=20"),
            ("100/min, burst=100", "100/min"),
        ] {
            let policy: RateLimitPolicy = input.parse().unwrap();
            assert_eq!(policy.to_string(), canonical, "{input}");
            assert_eq!(canonical.parse::<RateLimitPolicy>().unwrap(), policy);
        }
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "",
            "100",
            "0/min",
            "-1/min",
            "100/week",
            "100/min,b=2",
            "100/min,burst=0",
            "x/s",
        ] {
            assert!(bad.parse::<RateLimitPolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn within_compares_rates_across_periods() {
        let p = |s: &str| s.parse::<RateLimitPolicy>().unwrap();
        assert!(p("60/min").is_within(&p("1/s,burst=60")));
        assert!(p("59/min").is_within(&p("1/s,burst=60")));
        assert!(!p("61/min").is_within(&p("1/s,burst=61")));
        assert!(!p("1/s,burst=10").is_within(&p("100/min,burst=5")));
        assert!(p("100/day").is_within(&p("100/h")));
    }

    #[test]
    fn serde_uses_the_string_form() {
        let policy: RateLimitPolicy = "7/s,burst=3".parse().unwrap();
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(json, "\"7/s,burst=3\"");
        assert_eq!(
            serde_json::from_str::<RateLimitPolicy>(&json).unwrap(),
            policy
        );
    }
}
