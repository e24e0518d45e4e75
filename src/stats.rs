//! Outcome counters for what is not on the hit path: store trouble, rate limiting, blocked
//! clients and cross-instance invalidation. Read them with
//! [`ApiKeyLayer::stats`](crate::ApiKeyLayer::stats) and export them to your metrics system.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a layer's counters since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerStats {
    /// Store lookups that failed with an error.
    pub store_errors: u64,
    /// Store lookups that did not answer within the store timeout.
    pub store_timeouts: u64,
    /// Requests answered from a cache entry past its TTL because the store was unreachable.
    pub stale_served: u64,
    /// Requests rejected with `store_unavailable` (503).
    pub unavailable: u64,
    /// Requests rejected by a per-key rate limit.
    pub rate_limited: u64,
    /// Requests rejected because their client address had too many failed attempts.
    pub clients_blocked: u64,
    /// Invalidation messages applied from other instances.
    pub invalidations_received: u64,
    /// Whole-cache flushes after an invalidation channel reconnected.
    pub reconnect_flushes: u64,
    /// A gauge, not a counter: the keys whose in-process rate-limit budget is held now, those
    /// still spending it (a budget full again is dropped).
    pub rate_limiters: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) store_errors: AtomicU64,
    pub(crate) store_timeouts: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) unavailable: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) clients_blocked: AtomicU64,
    pub(crate) invalidations_received: AtomicU64,
    pub(crate) reconnect_flushes: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> LayerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LayerStats {
            store_errors: get(&self.store_errors),
            store_timeouts: get(&self.store_timeouts),
            stale_served: get(&self.stale_served),
            unavailable: get(&self.unavailable),
            rate_limited: get(&self.rate_limited),
            clients_blocked: get(&self.clients_blocked),
            invalidations_received: get(&self.invalidations_received),
            reconnect_flushes: get(&self.reconnect_flushes),
            rate_limiters: 0,
        }
    }
}
