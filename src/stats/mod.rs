//! What a layer counts: the outcome counters of [`ApiKeyLayer::stats`](crate::ApiKeyLayer::stats)
//! (store trouble, rate limiting, blocked clients, cross-instance invalidation) and, with the
//! `metrics` feature, the same events and the hit path's through the `metrics` facade
//! (names in [`keywarden::metrics`](crate::metrics)).
//!
//! Every event is one method of [`Counters`], which bumps the in-process counter and the
//! facade's handle together, so the two never disagree. Without the `metrics` feature the
//! facade half is a zero-sized type whose methods do nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::rejection::RejectionKind;

#[cfg(feature = "metrics")]
mod facade;

#[cfg(feature = "metrics")]
use facade::Instruments;

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
    /// When the instance last heard of changes, while it is blind: an
    /// [`InvalidationListener`](crate::invalidation::InvalidationListener) has had no answer
    /// from the change feed or a notification transport for its `max_blind`. `None` while it
    /// hears (or has no listener).
    pub blind_since: Option<std::time::SystemTime>,
}

/// How one authentication ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A principal was admitted.
    Accepted,
    /// Optional mode, no credential: passed through without a principal.
    Anonymous,
    /// Rejected with this code.
    Rejected(RejectionKind),
}

impl Verdict {
    /// Every verdict, in label-table order.
    #[cfg(feature = "metrics")]
    pub(crate) const COUNT: usize = 2 + RejectionKind::ALL.len();

    #[cfg(feature = "metrics")]
    pub(crate) fn all() -> impl Iterator<Item = Verdict> {
        [Verdict::Accepted, Verdict::Anonymous]
            .into_iter()
            .chain(RejectionKind::ALL.into_iter().map(Verdict::Rejected))
    }

    /// The `outcome` label (and the span's `outcome` field): `accepted`, `anonymous` or the
    /// rejection code.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Anonymous => "anonymous",
            Verdict::Rejected(kind) => kind.code(),
        }
    }
}

/// What a cache lookup found: the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheLookup {
    /// A fresh entry for a key.
    Hit,
    /// A fresh "not found" entry.
    NegativeHit,
    /// No entry: the store is asked.
    Miss,
    /// A found entry past its TTL: re-read, or answered stale.
    Stale,
}

/// Where an invalidation came from: the `source` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeSource {
    /// PostgreSQL `NOTIFY`.
    #[cfg(feature = "postgres")]
    Postgres = 0,
    /// Redis pub/sub.
    #[cfg(feature = "redis")]
    Redis = 1,
    /// A change made through the store in this process.
    Local = 2,
    /// The store's change feed, polled (or replayed after a lost notification connection).
    Feed = 3,
}

impl ChangeSource {
    /// The transport's name in logs (the `source` label).
    pub(crate) fn label(self) -> &'static str {
        match self {
            #[cfg(feature = "postgres")]
            ChangeSource::Postgres => "postgres",
            #[cfg(feature = "redis")]
            ChangeSource::Redis => "redis",
            ChangeSource::Local => "local",
            ChangeSource::Feed => "feed",
        }
    }
}

/// What an invalidation dropped: the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    /// One key's entries.
    Key,
    /// The "not found" entries (a key was created).
    Created,
    /// Everything.
    All,
}

#[derive(Debug)]
pub(crate) struct Counters {
    store_errors: AtomicU64,
    store_timeouts: AtomicU64,
    stale_served: AtomicU64,
    unavailable: AtomicU64,
    rate_limited: AtomicU64,
    clients_blocked: AtomicU64,
    invalidations_received: AtomicU64,
    reconnect_flushes: AtomicU64,
    instruments: Instruments,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// Counters for a layer with these collections (the `collection` label's values). With
    /// the `metrics` feature, registers every handle with the current recorder now, so the
    /// request path never looks one up.
    pub(crate) fn new<'a>(collections: impl Iterator<Item = &'a str>) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = collections;
        Self {
            store_errors: AtomicU64::new(0),
            store_timeouts: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            clients_blocked: AtomicU64::new(0),
            invalidations_received: AtomicU64::new(0),
            reconnect_flushes: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            instruments: Instruments::register(collections),
            #[cfg(not(feature = "metrics"))]
            instruments: Instruments,
        }
    }

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
            blind_since: None,
        }
    }

    /// One authentication decided, for the configured collection at `collection` (`None`:
    /// not tied to one).
    #[inline]
    pub(crate) fn verdict(&self, collection: Option<u32>, verdict: Verdict) {
        self.instruments.verdict(collection, verdict);
    }

    /// One cache lookup on the request path.
    #[inline]
    pub(crate) fn cache_lookup(&self, result: CacheLookup) {
        self.instruments.cache_lookup(result);
    }

    /// A request answered from a stale entry because the store was unreachable.
    pub(crate) fn stale_served(&self) {
        bump(&self.stale_served);
        self.instruments.stale_served();
    }

    /// A store lookup that answered (with a value or an error) after `elapsed`.
    pub(crate) fn store_lookup(&self, elapsed: Duration) {
        self.instruments.store_lookup(elapsed);
    }

    /// A store lookup that failed with an error.
    pub(crate) fn store_error(&self) {
        bump(&self.store_errors);
        self.instruments.store_error(false);
    }

    /// A store lookup (or identity mapping) that did not finish within the store timeout.
    pub(crate) fn store_timeout(&self) {
        bump(&self.store_timeouts);
        self.instruments.store_error(true);
    }

    /// A `store_unavailable` rejection.
    pub(crate) fn unavailable(&self) {
        bump(&self.unavailable);
    }

    /// A per-key rate-limit decision.
    #[inline]
    pub(crate) fn rate_limit(&self, allowed: bool) {
        if !allowed {
            bump(&self.rate_limited);
        }
        self.instruments.rate_limit(allowed);
    }

    /// A request refused because its client address is over its failure budget.
    pub(crate) fn client_blocked(&self) {
        bump(&self.clients_blocked);
        self.instruments.client_blocked();
    }

    /// An invalidation applied to the cache. Only those from other instances count in
    /// [`LayerStats::invalidations_received`].
    pub(crate) fn invalidation(&self, source: ChangeSource, kind: ChangeKind) {
        if source != ChangeSource::Local {
            bump(&self.invalidations_received);
        }
        self.instruments.invalidation(source, kind);
    }

    /// A whole-cache flush after an invalidation channel reconnected without a change feed to
    /// replay from, or after the feed was pruned past what this instance had applied.
    pub(crate) fn reconnect_flush(&self, source: ChangeSource) {
        bump(&self.reconnect_flushes);
        self.instruments.reconnect_flush(source);
    }

    /// Whether the instance is blind now (the `keywarden_revocation_blind` gauge).
    pub(crate) fn blind(&self, blind: bool) {
        self.instruments.blind(blind);
    }
}

/// The facade half without the `metrics` feature: nothing to record.
#[cfg(not(feature = "metrics"))]
#[derive(Debug)]
struct Instruments;

#[cfg(not(feature = "metrics"))]
impl Instruments {
    #[inline(always)]
    fn verdict(&self, _: Option<u32>, _: Verdict) {}
    #[inline(always)]
    fn cache_lookup(&self, _: CacheLookup) {}
    fn stale_served(&self) {}
    fn store_lookup(&self, _: Duration) {}
    fn store_error(&self, _timeout: bool) {}
    #[inline(always)]
    fn rate_limit(&self, _allowed: bool) {}
    fn client_blocked(&self) {}
    fn invalidation(&self, _: ChangeSource, _: ChangeKind) {}
    fn reconnect_flush(&self, _: ChangeSource) {}
    fn blind(&self, _: bool) {}
}
