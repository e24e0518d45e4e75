//! The in-process limiter: governor's GCRA, keyed by key id (or by another caller identity,
//! such as the actor of a reveal), one keyed limiter per policy.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

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

/// governor reads time through our injectable clock, so tests can step it.
#[derive(Clone)]
struct ClockAdapter(Arc<dyn Clock>);

impl GovernorClock for ClockAdapter {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let nanos = self.0.now().unix_timestamp_nanos();
        Nanos::from(u64::try_from(nanos).unwrap_or(0))
    }
}

type Keyed<K> =
    governor::RateLimiter<K, DashMapStateStore<K>, ClockAdapter, StateInformationMiddleware>;

/// How many checks between sweeps of idle per-key state.
const SWEEP_EVERY: u64 = 1 << 16;

pub(crate) struct LocalLimiter<K: Hash + Eq + Clone = Uuid> {
    clock: ClockAdapter,
    limiters: DashMap<RateLimitPolicy, Arc<Keyed<K>>>,
    checks: std::sync::atomic::AtomicU64,
}

impl<K: Hash + Eq + Clone> LocalLimiter<K> {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock: ClockAdapter(clock),
            limiters: DashMap::new(),
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn limiter(&self, policy: &RateLimitPolicy) -> Arc<Keyed<K>> {
        if let Some(limiter) = self.limiters.get(policy) {
            return limiter.clone();
        }
        self.limiters
            .entry(*policy)
            .or_insert_with(|| {
                Arc::new(
                    governor::RateLimiter::dashmap_with_clock(quota(policy), self.clock.clone())
                        .with_middleware::<StateInformationMiddleware>(),
                )
            })
            .clone()
    }

    /// Takes one request from `key`'s budget under `policy`.
    pub(crate) fn check(&self, key: K, policy: &RateLimitPolicy) -> Decision {
        let limiter = self.limiter(policy);
        let checks = self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if checks % SWEEP_EVERY == SWEEP_EVERY - 1 {
            // Keys whose budget is full again carry no information: drop them.
            for limiter in self.limiters.iter() {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
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

    #[test]
    fn status_reports_time_to_full() {
        let policy: RateLimitPolicy = "100/min,burst=20".parse().unwrap();
        let s = status(&policy, 15, emission_interval(&policy));
        assert_eq!((s.limit, s.remaining), (100, 15));
        assert_eq!(s.reset, Duration::from_secs(3));
    }
}
