//! Credits: a key's budget of uses in total, optionally refilled on a schedule, and the
//! leases instances draw from it.
//!
//! The balance lives in the store. An instance never asks the store per request: it
//! [leases](KeyStore::lease_credits) a block of credits in one atomic statement and spends it in
//! memory, and gives back what it did not spend ([`KeyStore::return_credits`]) when the key
//! leaves its cache, when the lease sits idle, or at shutdown. Leased credits are gone from the
//! store while leased, so all instances together never accept more than the balance. A crashed
//! instance loses its unspent lease (the key then accepts fewer, never more).
//!
//! A refill **sets** the balance to the refill amount at the start of each period (unused
//! credits do not carry over; [Unkey's](https://www.unkey.com/docs/apis/features/refill)
//! semantics). Periods are counted from when the key's credits were last set, and leases
//! from a period that has ended are void: their credits are neither spent nor given back.
//!
//! ```
//! use keywarden::store::{Credits, Refill};
//!
//! let refill: Refill = "1000/day".parse().unwrap();
//! assert_eq!(refill.amount(), 1000);
//! assert_eq!(refill.to_string(), "1000/day");
//! let credits = Credits::new(500).with_refill(refill);
//! assert_eq!(credits.remaining, 500);
//! ```
//!
//! [`KeyStore::lease_credits`]: super::KeyStore::lease_credits
//! [`KeyStore::return_credits`]: super::KeyStore::return_credits

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use time::OffsetDateTime;

#[cfg(doc)]
use super::KeyStore;

/// The most credits a key may hold: 2^53 − 1, the largest integer JSON clients (JavaScript)
/// read exactly, and far from what a signed 64-bit SQL integer holds, so sums of a balance
/// and returned leases never overflow.
pub const MAX_CREDITS: u64 = (1 << 53) - 1;

/// A key's credits: how many uses it has left, and its refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    /// Credits left in the store. When read back, credits instances hold leased are not
    /// counted (they are spent, or returned, within the lease's idle time).
    pub remaining: u64,
    /// The refill, if any.
    pub refill: Option<Refill>,
}

impl Credits {
    /// `remaining` credits, never refilled.
    pub fn new(remaining: u64) -> Self {
        Self {
            remaining,
            refill: None,
        }
    }

    /// Sets the refill.
    #[must_use]
    pub fn with_refill(mut self, refill: Refill) -> Self {
        self.refill = Some(refill);
        self
    }
}

/// Refill `amount` credits every `interval`: the balance is **set** to `amount` when a period
/// begins (unused credits do not carry over). Written `1000/day`, `50000/month`, `10/30min`…:
/// an amount, a slash and a period of `s`, `min`, `h`, `day`, `week` or `month` (30 days),
/// optionally with a whole multiplier; at least one second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Refill {
    amount: u64,
    interval: Duration,
}

/// A refill that does not parse, or is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid refill {0:?}: expected AMOUNT/PERIOD such as 1000/day, 50000/month or 10/30min (a period of s, min, h, day, week or month = 30 days, optionally with a multiplier, at least one second; an amount from 1 to {MAX_CREDITS})"
)]
pub struct RefillParseError(String);

/// The shortest refill interval.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

impl Refill {
    /// `amount` credits every `interval`.
    ///
    /// # Errors
    /// An amount of 0 or above [`MAX_CREDITS`], or an interval shorter than a second or not a
    /// whole number of milliseconds.
    pub fn new(amount: u64, interval: Duration) -> Result<Self, RefillParseError> {
        let refill = Self { amount, interval };
        if amount == 0
            || amount > MAX_CREDITS
            || interval < MIN_INTERVAL
            || interval.as_nanos() % 1_000_000 != 0
            || u64::try_from(interval.as_millis()).map_or(true, |ms| ms > i64::MAX as u64)
        {
            return Err(RefillParseError(refill.to_string()));
        }
        Ok(refill)
    }

    /// Credits per period.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// The period.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The period in milliseconds (what the SQL stores keep).
    pub fn interval_millis(&self) -> u64 {
        // `new` keeps intervals whole milliseconds below i64::MAX.
        self.interval.as_millis() as u64
    }

    /// Whether this refill gives no more than `other`: an amount at most `other`'s, no more
    /// often, and no more per unit of time.
    pub fn is_within(&self, other: &Refill) -> bool {
        let mine = u128::from(self.amount) * other.interval.as_nanos();
        let theirs = u128::from(other.amount) * self.interval.as_nanos();
        self.amount <= other.amount && mine <= theirs
    }
}

impl FromStr for Refill {
    type Err = RefillParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RefillParseError(s.chars().take(64).collect());
        let (amount, period) = s.trim().split_once('/').ok_or_else(err)?;
        let amount: u64 = amount.trim().parse().map_err(|_| err())?;
        // A bare `m` is a minute to a rate limit and could read as a month on a bill: refills
        // spell out `min` or `month`.
        if period
            .trim()
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .eq_ignore_ascii_case("m")
        {
            return Err(err());
        }
        let interval = crate::ratelimit::parse_period(period, true).ok_or_else(err)?;
        Self::new(amount, interval).map_err(|_| err())
    }
}

impl fmt::Display for Refill {
    /// `N/day`, `N/week`, `N/month` (30 days), `N/h`, `N/min`, `N/s`, else `N/<seconds>s`
    /// or `N/<ms>ms`: text that parses back to the refill.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.amount,
            crate::ratelimit::format_period(self.interval, true)
        )
    }
}

impl serde::Serialize for Refill {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Refill {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// In the management API's OpenAPI document: the refill's text.
#[cfg(feature = "manage-api")]
impl utoipa::PartialSchema for Refill {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "Refill AMOUNT credits every PERIOD (`s`, `min`, `h`, `day`, `week`, `month` = \
                 30 days, optionally with a multiplier such as `30min`; at least one second): \
                 the balance is set to AMOUNT when each period begins",
            ))
            .examples(["1000/day", "50000/month"])
            .into()
    }
}

#[cfg(feature = "manage-api")]
impl utoipa::ToSchema for Refill {
    fn name() -> std::borrow::Cow<'static, str> {
        "Refill".into()
    }
}

/// Credits leased to an instance by [`KeyStore::lease_credits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditLease {
    /// Credits taken from the store for the instance to spend: 0 when fewer than the
    /// request needed were left (then none are taken).
    pub granted: u64,
    /// Credits left in the store after this lease.
    pub remaining: u64,
    /// The refill period the lease belongs to (0 for a key without a refill).
    pub period: u64,
    /// The credits' generation: it changes whenever the credits are set or their refill
    /// changes, which voids every earlier lease.
    pub generation: u64,
    /// When the lease's period ends (the next refill), for a key with a refill.
    pub period_ends_at: Option<OffsetDateTime>,
}

impl CreditLease {
    /// The lease a store grants: `available` credits (after any refill due), of which the
    /// request needs `need` and the instance would like `want`; it gets at most an eighth of
    /// what is left beyond what it needs, so instances share a dwindling balance. Nothing when
    /// fewer than `need` are available.
    pub fn grant(available: u64, need: u64, want: u64) -> u64 {
        if available < need {
            return 0;
        }
        want.min(available / LEASE_SHARE).max(need).min(available)
    }
}

/// The share of the balance one lease may take beyond its need: one eighth.
pub(crate) const LEASE_SHARE: u64 = 8;

/// Where a refill schedule stands at `now_ms` (unix milliseconds): the period number, counted
/// from `anchor_ms`, never below `stored` (a clock stepped back does not refill twice).
pub fn refill_period(now_ms: i64, anchor_ms: i64, interval_ms: i64, stored: u64) -> u64 {
    if interval_ms <= 0 {
        return stored;
    }
    let elapsed = now_ms.saturating_sub(anchor_ms).max(0);
    u64::try_from(elapsed / interval_ms)
        .unwrap_or(0)
        .max(stored)
}

/// Unix milliseconds of `at`.
pub(crate) fn unix_millis(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos().div_euclid(1_000_000)).unwrap_or(i64::MAX)
}

/// When period `period` of a refill anchored at `anchor_ms` ends.
pub(crate) fn period_end(anchor_ms: i64, interval_ms: i64, period: u64) -> Option<OffsetDateTime> {
    let end = i64::try_from(period)
        .ok()?
        .checked_add(1)?
        .checked_mul(interval_ms)?
        .checked_add(anchor_ms)?;
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(end) * 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_parse_and_print_canonically() {
        for (input, canonical, ms) in [
            ("1000/day", "1000/day", 86_400_000),
            ("50000/month", "50000/month", 30 * 86_400_000),
            ("5/30min", "5/30min", 1_800_000),
            ("7/week", "7/week", 7 * 86_400_000),
            ("7/7d", "7/week", 7 * 86_400_000),
            ("5/2day", "5/2days", 2 * 86_400_000),
            ("5/6h", "5/6h", 6 * 3_600_000),
            ("5/90min", "5/90min", 90 * 60_000),
            ("1/s", "1/s", 1_000),
            ("3/1500ms", "3/1500ms", 1_500),
            (" 9 / h ", "9/h", 3_600_000),
        ] {
            let refill: Refill = input.parse().unwrap();
            assert_eq!(refill.to_string(), canonical, "{input}");
            assert_eq!(refill.interval_millis(), ms, "{input}");
            assert_eq!(canonical.parse::<Refill>().unwrap(), refill);
        }
    }

    #[test]
    fn bad_refills_are_refused_with_the_rule() {
        for bad in [
            "",
            "1000",
            "0/day",
            "-5/day",
            "5/fortnight",
            "5/500ms",
            "5/0s",
            "x/day",
            "5/day,burst=2",
            "9007199254740992/day",
        ] {
            let err = bad.parse::<Refill>().unwrap_err();
            assert!(err.to_string().contains("expected AMOUNT/PERIOD"), "{bad}");
        }
        assert!(Refill::new(1, Duration::from_nanos(1_000_000_500)).is_err());
        assert!(Refill::new(1, Duration::from_millis(1_500)).is_ok());
        assert_eq!(
            Refill::new(3, Duration::from_secs(90)).unwrap().interval(),
            Duration::from_secs(90)
        );
        assert!(Refill::new(1, Duration::from_millis(999)).is_err());
        assert!(Refill::new(MAX_CREDITS, Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn within_compares_amount_and_rate() {
        let r = |s: &str| s.parse::<Refill>().unwrap();
        assert!(r("100/day").is_within(&r("100/day")));
        assert!(r("10/day").is_within(&r("100/day")));
        assert!(!r("100/h").is_within(&r("100/day")));
        // The same rate in bigger gulps is more than the caller has.
        assert!(!r("700/week").is_within(&r("100/day")));
        assert!(r("100/week").is_within(&r("100/day")));
    }

    #[test]
    fn grants_share_a_dwindling_balance_and_never_exceed_it() {
        assert_eq!(CreditLease::grant(500, 1, 100), 62);
        assert_eq!(CreditLease::grant(10_000, 1, 100), 100);
        assert_eq!(CreditLease::grant(7, 1, 100), 1);
        assert_eq!(CreditLease::grant(7, 5, 100), 5);
        assert_eq!(CreditLease::grant(4, 5, 100), 0);
        assert_eq!(CreditLease::grant(0, 1, 100), 0);
        assert_eq!(CreditLease::grant(3, 3, 1), 3);
        for available in 0..200 {
            for need in 0..5 {
                let granted = CreditLease::grant(available, need, 50);
                assert!(granted <= available);
                assert!(granted == 0 || granted >= need);
            }
        }
    }

    #[test]
    fn periods_count_from_the_anchor_and_never_go_back() {
        assert_eq!(refill_period(0, 0, 1_000, 0), 0);
        assert_eq!(refill_period(999, 0, 1_000, 0), 0);
        assert_eq!(refill_period(1_000, 0, 1_000, 0), 1);
        assert_eq!(refill_period(5_500, 500, 1_000, 0), 5);
        assert_eq!(refill_period(100, 500, 1_000, 3), 3);
        assert_eq!(refill_period(100, 500, 0, 3), 3);
        assert_eq!(period_end(500, 1_000, 4).map(unix_millis), Some(5_500));
    }
}
