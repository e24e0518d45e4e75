//! The in-process limiter: governor's GCRA, keyed by key id (or by another caller identity,
//! such as the actor of a reveal), one keyed limiter per policy.
//!
//! Time is the clock's monotonic reading, never the wall clock: a system clock stepped back
//! an hour must not make every key wait an hour, and one stepped forward must not refill
//! every budget.
//!
//! A limiter whose every key has a full budget again carries no information, so it is
//! dropped (and made afresh by the next request under its policy): a deployment that cycles
//! through many distinct policies holds limiters only for those with budget still being
//! spent. Limiters are not tied to cache entries: a key that drops out of the cache keeps
//! its spent budget, so cache evictions never hand out fresh bursts.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::clock::Clock as GovernorClock;
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::Quota;
use uuid::Uuid;

use super::{Decision, RateLimitPolicy};
use crate::clock::Clock;
use crate::rejection::RateLimitStatus;

/// governor reads time through our injectable clock's monotonic reading, so tests can step
/// it, as nanoseconds since the limiter was made.
#[derive(Clone)]
struct ClockAdapter {
    clock: Arc<dyn Clock>,
    origin: Instant,
}

impl GovernorClock for ClockAdapter {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let since = self
            .clock
            .monotonic()
            .saturating_duration_since(self.origin);
        Nanos::from(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
    }
}

type Keyed<K> =
    governor::RateLimiter<K, DashMapStateStore<K>, ClockAdapter, StateInformationMiddleware>;

/// How many checks between sweeps of idle per-key state and idle limiters.
const SWEEP_EVERY: u64 = 1 << 16;
/// Limiters held before making a new one first sweeps idle ones; after a sweep the threshold
/// is twice the limiters left, so sweeping costs O(1) amortized per limiter made.
const MIN_SWEEP_AT: usize = 64;

pub(crate) struct LocalLimiter<K: Hash + Eq + Clone = Uuid> {
    clock: ClockAdapter,
    limiters: DashMap<RateLimitPolicy, Keyed<K>>,
    checks: AtomicU64,
    /// Making a limiter when this many are held sweeps idle ones first.
    sweep_at: AtomicUsize,
}

impl<K: Hash + Eq + Clone> LocalLimiter<K> {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        let origin = clock.monotonic();
        Self {
            clock: ClockAdapter { clock, origin },
            limiters: DashMap::new(),
            checks: AtomicU64::new(0),
            sweep_at: AtomicUsize::new(MIN_SWEEP_AT),
        }
    }

    /// How many per-policy limiters are held.
    pub(crate) fn len(&self) -> usize {
        self.limiters.len()
    }

    /// Drops per-key state that is back to a full budget, then limiters left with none.
    ///
    /// `retain` holds each shard's write lock while it decides, and [`check`](Self::check)
    /// holds a read lock on the limiter's shard while it takes from a budget, so a limiter is
    /// never dropped between a check and its effect.
    fn sweep(&self) {
        self.limiters.retain(|_, limiter| {
            limiter.retain_recent();
            limiter.shrink_to_fit();
            !limiter.is_empty()
        });
        self.limiters.shrink_to_fit();
        self.sweep_at.store(
            (2 * self.limiters.len()).max(MIN_SWEEP_AT),
            Ordering::Relaxed,
        );
    }

    /// Takes one request from `key`'s budget under `policy`.
    pub(crate) fn check(&self, key: K, policy: &RateLimitPolicy) -> Decision {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        let limiter = match self.limiters.get(policy) {
            Some(limiter) => limiter,
            None => {
                if self.limiters.len() >= self.sweep_at.load(Ordering::Relaxed) {
                    self.sweep();
                }
                self.limiters
                    .entry(*policy)
                    .or_insert_with(|| {
                        governor::RateLimiter::dashmap_with_clock(quota(policy), self.clock.clone())
                            .with_middleware::<StateInformationMiddleware>()
                    })
                    .downgrade()
            }
        };
        let emission = emission_interval(policy);
        match limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision::allowed(status(policy, remaining, emission))
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Decision::denied(status(policy, 0, emission), wait)
            }
        }
    }
}

/// The time one request's worth of budget takes to come back.
pub(crate) fn emission_interval(policy: &RateLimitPolicy) -> Duration {
    (policy.period() / policy.limit()).max(Duration::from_nanos(1))
}

fn quota(policy: &RateLimitPolicy) -> Quota {
    let burst = NonZeroU32::new(policy.burst()).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(emission_interval(policy))
        .expect("the emission interval is at least one nanosecond")
        .allow_burst(burst)
}

/// The headers' view of a budget: `remaining` requests left now, full again after
/// `(burst - remaining)` emission intervals.
pub(crate) fn status(
    policy: &RateLimitPolicy,
    remaining: u32,
    emission: Duration,
) -> RateLimitStatus {
    let remaining = remaining.min(policy.burst());
    RateLimitStatus {
        limit: policy.limit(),
        remaining: remaining.min(policy.limit()),
        reset: emission.saturating_mul(policy.burst() - remaining),
    }
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for LocalLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("policies", &self.limiters.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use time::OffsetDateTime;

    fn limiter() -> (LocalLimiter, ManualClock) {
        let clock = ManualClock::new(OffsetDateTime::UNIX_EPOCH + time::Duration::days(1));
        (LocalLimiter::new(Arc::new(clock.clone())), clock)
    }

    #[test]
    fn exact_burst_then_one_per_emission_interval() {
        let (limiter, clock) = limiter();
        let policy: RateLimitPolicy = "10/min,burst=3".parse().unwrap();
        let key = Uuid::now_v7();
        for expected_remaining in [2, 1, 0] {
            let d = limiter.check(key, &policy);
            assert!(d.allowed);
            assert_eq!(d.status.remaining, expected_remaining);
        }
        let denied = limiter.check(key, &policy);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_secs(6));
        clock.advance(time::Duration::seconds(5));
        assert!(!limiter.check(key, &policy).allowed);
        clock.advance(time::Duration::seconds(1));
        assert!(limiter.check(key, &policy).allowed);
        assert!(!limiter.check(key, &policy).allowed);
        // A full refill takes burst × interval and gives back exactly the burst.
        clock.advance(time::Duration::seconds(18));
        let allowed = (0..10)
            .filter(|_| limiter.check(key, &policy).allowed)
            .count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn keys_and_policies_have_separate_budgets() {
        let (limiter, _) = limiter();
        let policy: RateLimitPolicy = "1/h".parse().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(limiter.check(a, &policy).allowed);
        assert!(!limiter.check(a, &policy).allowed);
        assert!(limiter.check(b, &policy).allowed);
        let other: RateLimitPolicy = "2/h".parse().unwrap();
        assert!(limiter.check(a, &other).allowed);
    }

    /// Found in review: the limiter followed the wall clock, so stepping it back an hour
    /// made the next request of a `100/s` key wait an hour.
    #[test]
    fn stepping_the_wall_clock_does_not_move_budgets() {
        let (limiter, clock) = limiter();
        let policy: RateLimitPolicy = "100/s".parse().unwrap();
        let key = Uuid::now_v7();
        assert!(limiter.check(key, &policy).allowed);
        clock.advance(time::Duration::hours(-1));
        let after_back = limiter.check(key, &policy);
        assert!(
            after_back.allowed,
            "denied for {:?}",
            after_back.retry_after
        );
        clock.set(clock.now() - time::Duration::hours(1));
        for _ in 0..98 {
            let d = limiter.check(key, &policy);
            assert!(d.allowed && d.retry_after < Duration::from_secs(1));
        }
        // Spent: the wait is one emission interval, never the hour the clock moved.
        let denied = limiter.check(key, &policy);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_millis(10));
        // Stepping the wall clock forward a day refills nothing.
        clock.set(clock.now() + time::Duration::days(1));
        assert!(!limiter.check(key, &policy).allowed);
        clock.advance(time::Duration::milliseconds(10));
        assert!(limiter.check(key, &policy).allowed);
    }

    /// Found in review: every distinct policy kept its limiter forever.
    #[test]
    fn idle_limiters_are_dropped_and_spent_budgets_kept() {
        let (limiter, clock) = limiter();
        let slow: RateLimitPolicy = "1/h".parse().unwrap();
        let spent = Uuid::now_v7();
        assert!(limiter.check(spent, &slow).allowed);
        for n in 1..=2_000u32 {
            let policy = RateLimitPolicy::new(NonZeroU32::new(n).unwrap(), Duration::from_secs(1));
            assert!(limiter.check(Uuid::now_v7(), &policy).allowed);
            // Each budget is full again a second later.
            clock.advance(time::Duration::seconds(1));
            assert!(
                limiter.len() <= MIN_SWEEP_AT,
                "{} limiters held",
                limiter.len()
            );
        }
        // The `1/h` budget was still being spent: its limiter survived every sweep.
        assert!(!limiter.check(spent, &slow).allowed);
        limiter.sweep();
        assert_eq!(limiter.len(), 1);
        // governor drops a key's state one emission interval after its budget is full.
        clock.advance(time::Duration::hours(2));
        limiter.sweep();
        assert_eq!(limiter.len(), 0);
        assert!(limiter.check(spent, &slow).allowed);
    }

    #[test]
    fn status_reports_time_to_full() {
        let policy: RateLimitPolicy = "100/min,burst=20".parse().unwrap();
        let s = status(&policy, 15, emission_interval(&policy));
        assert_eq!((s.limit, s.remaining), (100, 15));
        assert_eq!(s.reset, Duration::from_secs(3));
    }
}
