//! The in-process limiter: GCRA (the algorithm governor and the Redis script use), one budget
//! per key id (or per other caller identity, such as the actor of a reveal), whatever the
//! policy.
//!
//! Time is the clock's monotonic reading, never the wall clock: a system clock stepped back
//! an hour must not make every key wait an hour, and one stepped forward must not refill
//! every budget.
//!
//! A budget is one number, the key's theoretical arrival time (TAT), kept across policy
//! changes exactly as the Redis limiter keeps it: changing a key's policy (tightening its
//! burst one step at a time, say) never hands out a fresh burst. A key whose budget is full
//! again carries no information, so its state is dropped; a deployment that cycles through
//! many keys and policies holds state only for keys still spending. State is not tied to
//! cache entries: a key that drops out of the cache keeps its spent budget, so cache
//! evictions never hand out fresh bursts either.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use uuid::Uuid;

use super::{Decision, RateLimitPolicy};
use crate::clock::Clock;
use crate::rejection::RateLimitStatus;

/// How many checks between sweeps of full budgets.
const SWEEP_EVERY: u64 = 1 << 16;
/// Budgets held before a new key's first check sweeps full ones; after a sweep the threshold
/// is twice the budgets left, so sweeping costs O(1) amortized per key.
const MIN_SWEEP_AT: usize = 64;

pub(crate) struct LocalLimiter<K: Hash + Eq + Clone = Uuid> {
    clock: Arc<dyn Clock>,
    /// The zero of the TATs: the clock's monotonic reading when the limiter was made.
    origin: Instant,
    /// Each key's TAT, in nanoseconds since `origin`. A read lock on the shard and a
    /// compare-and-swap on the cell decide a request.
    budgets: DashMap<K, AtomicU64>,
    checks: AtomicU64,
    /// A new key's first check sweeps full budgets when this many are held.
    sweep_at: AtomicUsize,
}

impl<K: Hash + Eq + Clone> LocalLimiter<K> {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        let origin = clock.monotonic();
        Self {
            clock,
            origin,
            budgets: DashMap::new(),
            checks: AtomicU64::new(0),
            sweep_at: AtomicUsize::new(MIN_SWEEP_AT),
        }
    }

    /// How many keys' budgets are held (those still being spent, until the next sweep).
    pub(crate) fn len(&self) -> usize {
        self.budgets.len()
    }

    fn now(&self) -> u64 {
        let since = self
            .clock
            .monotonic()
            .saturating_duration_since(self.origin);
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Drops the budgets that are full again: a TAT not after now is the same as no state.
    ///
    /// `retain` holds each shard's write lock while it decides, and [`check`](Self::check)
    /// holds a read lock on the key's shard while it spends, so a budget is never dropped
    /// between a check and its effect.
    fn sweep(&self) {
        let now = self.now();
        self.budgets
            .retain(|_, tat| tat.load(Ordering::Acquire) > now);
        self.budgets.shrink_to_fit();
        self.sweep_at.store(
            (2 * self.budgets.len()).max(MIN_SWEEP_AT),
            Ordering::Relaxed,
        );
    }

    /// Takes one request from `key`'s budget under `policy`.
    pub(crate) fn check(&self, key: K, policy: &RateLimitPolicy) -> Decision {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        let now = self.now();
        let emission = emission_interval(policy);
        let step = u64::try_from(emission.as_nanos()).unwrap_or(u64::MAX);
        // GCRA: a request is allowed while the TAT it leaves is at most `burst` emission
        // intervals ahead of now.
        let tolerance = step.saturating_mul(u64::from(policy.burst().max(1)));
        let tat = match self.budgets.get(&key) {
            Some(tat) => tat,
            None => {
                if self.budgets.len() >= self.sweep_at.load(Ordering::Relaxed) {
                    self.sweep();
                }
                self.budgets
                    .entry(key)
                    .or_insert_with(|| AtomicU64::new(0))
                    .downgrade()
            }
        };
        let mut current = tat.load(Ordering::Acquire);
        loop {
            let next = current.max(now).saturating_add(step);
            let ahead = next - now;
            if ahead > tolerance {
                let wait = Duration::from_nanos(ahead - tolerance);
                return Decision::denied(status(policy, 0, emission), wait);
            }
            match tat.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let remaining = (tolerance - ahead) / step.max(1);
                    let remaining = u32::try_from(remaining).unwrap_or(u32::MAX);
                    return Decision::allowed(status(policy, remaining, emission));
                }
                Err(actual) => current = actual,
            }
        }
    }
}

impl<K: Hash + Eq + Clone> LocalLimiter<K> {
    /// Gives back one request taken by [`check`](Self::check): the TAT moves back one
    /// emission interval (a budget that refilled meanwhile stays full; no state, nothing to
    /// give back).
    pub(crate) fn refund(&self, key: K, policy: &RateLimitPolicy) {
        let step = u64::try_from(emission_interval(policy).as_nanos()).unwrap_or(u64::MAX);
        if let Some(tat) = self.budgets.get(&key) {
            let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                Some(current.saturating_sub(step))
            });
        }
    }
}

/// The time one request's worth of budget takes to come back.
pub(crate) fn emission_interval(policy: &RateLimitPolicy) -> Duration {
    (policy.period() / policy.limit()).max(Duration::from_nanos(1))
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
            .field("budgets", &self.budgets.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::num::NonZeroU32;
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
    fn keys_have_separate_budgets_and_keep_them_across_policies() {
        let (limiter, _) = limiter();
        let policy: RateLimitPolicy = "1/h".parse().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(limiter.check(a, &policy).allowed);
        assert!(!limiter.check(a, &policy).allowed);
        assert!(limiter.check(b, &policy).allowed);
        // A's spent budget follows it to another policy: no fresh burst.
        let other: RateLimitPolicy = "2/h".parse().unwrap();
        assert!(!limiter.check(a, &other).allowed);
    }

    /// Found in review: budgets were kept per (policy, key), so a `keys:self` caller that
    /// tightened a key's burst one step at a time handed it a fresh burst at every step.
    #[test]
    fn tightening_a_policy_step_by_step_hands_out_no_fresh_burst() {
        let (limiter, _) = limiter();
        let key = Uuid::now_v7();
        let mut allowed = 0;
        for burst in (1..=10).rev() {
            let policy: RateLimitPolicy = format!("10/min,burst={burst}").parse().unwrap();
            allowed += (0..20)
                .filter(|_| limiter.check(key, &policy).allowed)
                .count();
        }
        assert_eq!(allowed, 10, "one burst in all, at one instant");
        // Loosening does not refill either: the spent time is carried over.
        let loose: RateLimitPolicy = "10/min,burst=20".parse().unwrap();
        let more = (0..20)
            .filter(|_| limiter.check(key, &loose).allowed)
            .count();
        assert_eq!(more, 10, "the larger burst's extra room only");
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
        // A budget full again is dropped.
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
