//! The lookup cache: digest → resolved key.
//!
//! Found and not-found results are both cached (not-found with a short TTL so a key created
//! elsewhere is usable soon). Concurrent misses for one digest share one store query. The
//! cache never decides expiry: entries carry the key's `expires_at`, judged at request time.
//!
//! A found entry past its TTL is kept for a further stale window: it is re-read from the
//! store by one request at a time, and answered from while the store is unreachable.
//!
//! Two maps, each bounded by the configured capacity:
//! - **Found keys** live in a compact sharded map of our own ([`FoundMap`]): digest → entry,
//!   read synchronously by the hit path under a shard's read lock, with expiry and the
//!   invalidation check applied on read, and evicted by a second-chance sweep (an entry used
//!   since the last sweep survives it). Only keys that exist can enter it, so no flood of
//!   made-up digests can push a key in use out.
//! - **Not-found digests** live in moka, whose admission policy (TinyLFU) and per-entry
//!   expiry suit the one-off digests of guessed or mistyped keys; moka also coalesces
//!   concurrent misses of one digest into one store query, whatever they find.
//!
//! moka's bookkeeping is about 390 bytes per entry, and the found map's 130–190 (a 64-byte
//! bucket per key in a table a third to a half full): keeping found keys out of moka is what
//! brings a cached key under 512 bytes.
//!
//! An invalidation by key id or of all not-found entries takes effect through a generation
//! counter every lookup checks (an entry read before an invalidation that concerns it is
//! never served, and is re-read); the entries themselves go at their next lookup, expiry or
//! eviction.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use http::Extensions;
use moka::future::Cache;
use moka::Expiry;
use uuid::Uuid;

use crate::clock::{mono_now, MonoNanos};
use crate::credits::CreditAccount;
use crate::principal::{Interner, Principal};
use crate::rejection::AuthRejection;
use crate::secret::Digest;
use crate::store::{KeyRecord, StoreError};

mod table;

use table::{Table, Visit};

/// The application identity derived from a principal, inserted into request extensions.
pub(crate) trait Identity: Send + Sync {
    fn insert_into(&self, extensions: &mut Extensions);
}

pub(crate) struct IdentityValue<T>(pub(crate) T);

impl<T: Clone + Send + Sync + 'static> Identity for IdentityValue<T> {
    fn insert_into(&self, extensions: &mut Extensions) {
        extensions.insert(self.0.clone());
    }
}

/// Everything the request path needs about a key, computed once per cache fill.
///
/// `repr(C)`, in this order: everything a hit reads or writes comes first, right after the
/// reference count the hit moves, and packed without padding (the flags next to each other,
/// the collection index in four bytes), so it spans at most 80 bytes from the allocation's
/// start: two cache lines from any 16-byte-aligned start, where the 120 bytes it used to span
/// took three for three starts of four (BENCHMARKS.md, section 19). The boxes only some keys
/// have come last, read only when `extras` says one is there.
#[repr(C)]
pub(crate) struct ResolvedKey {
    /// The cache's state of the key: its entry's deadlines and generation, in the same
    /// allocation as the fields every hit reads.
    pub(crate) slot: Slot,
    pub(crate) principal: Principal,
    /// Uses not yet written to the store (its `queued` flag is [`ResolvedKey::queued`]).
    pub(crate) usage: UsageCell,
    /// The index of the key's collection among the layer's configured ones, plus one; `None`
    /// when the layer does not serve it (see [`ResolvedKey::collection`]).
    collection_index: Option<NonZeroU32>,
    /// Used since the found map's last eviction sweep of its shard: such an entry gets a
    /// second chance (the sweep clears the flag instead of evicting it).
    pub(crate) used: AtomicBool,
    /// Whether the key is in the usage recorder's queue (see [`UsageCell`]).
    pub(crate) queued: AtomicBool,
    // Expiry is read from the principal; the allowlist, read-only and rate-limit checks from
    // `checks`, copied from it.
    pub(crate) revoked: bool,
    pub(crate) disabled: bool,
    /// Uses are recorded (not for keys of a read-only foreign store). `false` until the
    /// layer, which knows its foreign collections, says otherwise.
    pub(crate) tracks_usage: bool,
    /// What the request checks need from the principal's shared profile, copied here so a
    /// hit on a key without them does not read the profile at all. Always
    /// `KeyChecks::of(&principal)`: set with the principal in [`ResolvedKey::new`], and
    /// neither changes after (a principal is immutable; `Admission::check` asserts it in
    /// debug builds).
    pub(crate) checks: KeyChecks,
    /// Whether any of `identity`, `credits` and `owner` is set: a hit on a key with none
    /// reads no further. Kept by the setters below, the only way to set them.
    extras: bool,
    /// Set while one request re-reads this stale entry, so the others do not pile onto the
    /// store. (Not read by a fresh hit.)
    pub(crate) refreshing: AtomicBool,
    /// The application's identity for this key, or why the mapping refused it (answered on
    /// every request of the key, like a revocation, until the entry is re-read). Boxed: a
    /// rejection is about 100 bytes, and most layers map no identity, so every cached key
    /// would carry the space for nothing.
    identity: Option<Box<Result<Arc<dyn Identity>, AuthRejection>>>,
    /// The credits this instance holds for the key, if it has credits (boxed: most keys
    /// have none, and every cached key would carry the space).
    credits: Option<Box<CreditAccount>>,
    /// What the key shares with its owner's other keys, if the owner has a policy or its
    /// collection an owner rate limit (boxed, like the credits).
    owner: Option<Box<OwnerShare>>,
}

/// Which of the profile's request checks apply to a key (see [`ResolvedKey::checks`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct KeyChecks {
    /// The key may be used only from listed networks.
    pub(crate) allowlist: bool,
    /// The key may only read.
    pub(crate) read_only: bool,
    /// The key has a rate limit of its own.
    pub(crate) rate_limit: bool,
}

impl KeyChecks {
    pub(crate) fn of(principal: &Principal) -> Self {
        Self {
            allowlist: !principal.allowed_ips().is_empty(),
            read_only: principal.is_read_only(),
            rate_limit: principal.rate_limit().is_some(),
        }
    }
}

/// The limits a key shares with its owner's other keys.
pub(crate) struct OwnerShare {
    /// The rate limit the owner's keys share, and its limiter bucket (computed once per
    /// cache fill): the owner's stored rate limit, else its collection's owner rate limit.
    pub(crate) rate_limit: Option<(uuid::Uuid, crate::ratelimit::RateLimitPolicy)>,
    /// The owner's shared credits on this instance: one account for all its cached keys.
    pub(crate) credits: Option<Arc<CreditAccount>>,
}

impl ResolvedKey {
    /// The accounts a request with this key spends from: the key's own credits and its
    /// owner's shared ones (either, both or neither).
    #[inline]
    pub(crate) fn accounts(&self) -> (Option<&CreditAccount>, Option<&CreditAccount>) {
        if !self.has_extras() {
            return (None, None);
        }
        let owner = match self.owner.as_deref() {
            Some(owner) => owner.credits.as_deref(),
            None => None,
        };
        (self.credits.as_deref(), owner)
    }

    /// Whether the key has an identity, credits or an owner share; `false` spares a hit the
    /// reads of the three boxes.
    #[inline]
    fn has_extras(&self) -> bool {
        debug_assert_eq!(
            self.extras,
            self.identity.is_some() || self.credits.is_some() || self.owner.is_some()
        );
        self.extras
    }

    /// The application's identity for this key, or why the mapping refused it.
    #[inline]
    pub(crate) fn identity(&self) -> Option<&Result<Arc<dyn Identity>, AuthRejection>> {
        if !self.has_extras() {
            return None;
        }
        self.identity.as_deref()
    }

    /// What the key shares with its owner's other keys.
    #[inline]
    pub(crate) fn owner(&self) -> Option<&OwnerShare> {
        if !self.has_extras() {
            return None;
        }
        self.owner.as_deref()
    }

    /// Sets the application's identity (on a cache fill).
    pub(crate) fn set_identity(&mut self, identity: Result<Arc<dyn Identity>, AuthRejection>) {
        self.identity = Some(Box::new(identity));
        self.extras = true;
    }

    /// Sets the key's own credit account (on a cache fill).
    pub(crate) fn set_credits(&mut self, account: CreditAccount) {
        self.credits = Some(Box::new(account));
        self.extras = true;
    }

    /// Sets what the key shares with its owner's other keys (on a cache fill).
    pub(crate) fn set_owner(&mut self, owner: OwnerShare) {
        self.owner = Some(Box::new(owner));
        self.extras = true;
    }

    /// The index of the key's collection among the layer's configured ones; `None` when the
    /// layer does not serve it (then the key is rejected as unknown, unless the layer has no
    /// collections at all).
    #[inline]
    pub(crate) fn collection(&self) -> Option<u32> {
        self.collection_index.map(|index| index.get() - 1)
    }

    /// Sets the collection index (on a cache fill); an index that does not fit is `None`.
    pub(crate) fn set_collection(&mut self, index: Option<u32>) {
        self.collection_index = index
            .and_then(|i| i.checked_add(1))
            .and_then(NonZeroU32::new);
    }

    /// Whether requests with this key spend credits: its own, or its owner's.
    #[inline]
    pub(crate) fn has_credits(&self) -> bool {
        let (key, owner) = self.accounts();
        key.is_some() || owner.is_some()
    }

    /// Builds the principal once, and the application identity from it.
    /// `foreign`: the key was verified from another system's store (see
    /// [`Principal::is_foreign`]).
    pub(crate) fn new(record: &KeyRecord, foreign: bool, profiles: &Interner) -> Self {
        let principal = Principal::from_record(record, foreign, profiles);
        Self {
            slot: Slot::default(),
            checks: KeyChecks::of(&principal),
            principal,
            usage: UsageCell::default(),
            collection_index: None,
            used: AtomicBool::new(false),
            queued: AtomicBool::new(false),
            revoked: record.revoked_at.is_some(),
            disabled: record.disabled,
            tracks_usage: false,
            extras: false,
            refreshing: AtomicBool::new(false),
            identity: None,
            credits: None,
            owner: None,
        }
    }

    /// Another resolved key of the same record with the same principal and flags, and no
    /// identity, credits or owner share (tests re-reading a record).
    #[cfg(test)]
    pub(crate) fn reread(&self) -> Self {
        Self {
            slot: Slot::default(),
            principal: self.principal.clone(),
            usage: UsageCell::default(),
            collection_index: self.collection_index,
            used: AtomicBool::new(false),
            queued: AtomicBool::new(false),
            revoked: self.revoked,
            disabled: self.disabled,
            tracks_usage: self.tracks_usage,
            checks: self.checks,
            extras: false,
            refreshing: AtomicBool::new(false),
            identity: None,
            credits: None,
            owner: None,
        }
    }
}

/// Uses of one cached key not yet written to the store, with its key's `queued` flag
/// ([`ResolvedKey::queued`], kept beside the key's other flags).
///
/// `SeqCst` for the count and the queued flag: a use either sees `queued` still set, and then
/// its count is taken by the flush that clears it, or it queues the key again itself. No use
/// is left behind.
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct UsageCell {
    uses: AtomicU64,
    /// Unix nanoseconds of the latest use.
    last: AtomicI64,
}

impl UsageCell {
    /// Adds `uses` uses, the latest at `last`; returns whether the caller must queue the key.
    pub(crate) fn add(&self, queued: &AtomicBool, uses: u64, last: i64) -> bool {
        self.uses.fetch_add(uses, Ordering::SeqCst);
        // Not `fetch_max`, a locked compare-and-swap on every request: two uses racing here
        // may leave the earlier of their two times, and either is the time of the latest
        // use. (A flush may miss a time stored after it took the count, with `fetch_max`
        // too; the key's next use, or the next flush, carries a later one.)
        if last > self.last.load(Ordering::Relaxed) {
            self.last.store(last, Ordering::Relaxed);
        }
        !queued.load(Ordering::SeqCst) && !queued.swap(true, Ordering::SeqCst)
    }

    /// Takes the uses so far, and the time of the latest.
    pub(crate) fn take(&self, queued: &AtomicBool) -> (u64, i64) {
        queued.store(false, Ordering::SeqCst);
        let uses = self.uses.swap(0, Ordering::SeqCst);
        (uses, self.last.load(Ordering::SeqCst))
    }
}

#[derive(Clone)]
pub(crate) enum Resolution {
    Found(Arc<ResolvedKey>),
    Missing,
}

/// The cache's time: the process's monotonic nanoseconds ([`MonoNanos`]).
type Nanos = MonoNanos;

/// A duration in nanoseconds, saturating.
fn nanos(duration: Duration) -> Nanos {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// When a cached lookup was read and how long it may be served, and the cache generation its
/// store read began at. A not-found digest's is its whole entry (in moka); a found key's lives
/// in the resolved key itself ([`Slot`]), so a hit follows one pointer from the found map.
#[derive(Debug, Default)]
pub(crate) struct Stamp {
    /// The generation at which the store read began, or a later one at which the hit path
    /// found no invalidation since that concerns it.
    generation: AtomicU64,
    /// Until when it is fresh (read time + TTL), and when it is gone (for a found entry,
    /// after the stale window too), in the cache's time. Deadlines, so the hit path compares
    /// instead of subtracts. 0 (the default) is never servable.
    fresh_until: AtomicU64,
    expires: AtomicU64,
}

impl Stamp {
    fn new(generation: u64, read_at: Nanos, ttl: Duration, lifetime: Duration) -> Self {
        let stamp = Self::default();
        stamp.set(generation, read_at, ttl, lifetime);
        stamp
    }

    /// Stamps a new read. Stamped before it is published (under the found map's write lock,
    /// or through moka), so readers see a whole stamp; the atomics are what let a shared
    /// entry be read while its generation moves, not a licence to stamp a published one again.
    fn set(&self, generation: u64, read_at: Nanos, ttl: Duration, lifetime: Duration) {
        self.fresh_until
            .store(read_at.saturating_add(nanos(ttl)), Ordering::Relaxed);
        self.expires
            .store(read_at.saturating_add(nanos(lifetime)), Ordering::Relaxed);
        self.generation.store(generation, Ordering::Release);
    }

    #[inline]
    fn expires(&self) -> Nanos {
        self.expires.load(Ordering::Relaxed)
    }

    #[inline]
    fn fresh_until(&self) -> Nanos {
        self.fresh_until.load(Ordering::Relaxed)
    }
}

/// A not-found digest's entry (in moka).
type Missing = Arc<Stamp>;

/// The cache's state of a found key, kept in its [`ResolvedKey`]: one allocation per cached
/// key, so a hit reads the entry's deadlines and the key's fields from adjacent lines instead
/// of following a pointer from one to the other. A key never stored in the cache keeps the
/// default (never servable, never looked up).
#[derive(Debug, Default)]
pub(crate) struct Slot {
    stamp: Stamp,
}

/// A cache hit: fresh, or past its TTL but within the stale window.
pub(crate) enum CacheHit {
    Fresh(Resolution),
    Stale(StaleEntry),
}

/// A found entry past its TTL.
pub(crate) struct StaleEntry {
    key: Arc<ResolvedKey>,
}

impl StaleEntry {
    pub(crate) fn resolution(&self) -> Resolution {
        Resolution::Found(Arc::clone(&self.key))
    }

    /// Whether the entry can still be served: within its lifetime, no invalidation since its
    /// read concerns it, and bounded blindness does not withhold it. A request that waited
    /// for a failed re-read asks again before answering from it.
    pub(crate) fn still_servable(&self, cache: &KeyCache, digest: &Digest) -> bool {
        let now = cache.now();
        cache
            .classify(digest, &self.key.slot.stamp, found_id(&self.key), now)
            .is_ok()
    }

    /// Claims the re-read of this entry; only one caller at a time gets it.
    pub(crate) fn claim_refresh(&self) -> Option<RefreshClaim<'_>> {
        (!self.key.refreshing.swap(true, Ordering::AcqRel))
            .then_some(RefreshClaim(&self.key.refreshing))
    }
}

/// The key id an invalidation by id concerns, read only off the rare path.
fn found_id(key: &ResolvedKey) -> impl FnOnce() -> Option<Uuid> + '_ {
    || Some(key.principal.key_id())
}

/// The claim to re-read a stale entry. Given back when dropped — also when the request that
/// held it is dropped mid-read — so a later request can try again.
pub(crate) struct RefreshClaim<'a>(&'a AtomicBool);

impl Drop for RefreshClaim<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What an invalidation dropped: remembered for a while so the hit path can tell whether an
/// entry read before it is concerned.
#[derive(Clone, Copy)]
enum Dropped {
    Key(Uuid),
    Digest(Digest),
    /// Every not-found entry (a key was created elsewhere).
    Missing,
    All,
}

/// How many invalidations the hit path can look back over; older entries are re-read.
const RECENT_INVALIDATIONS: usize = 256;

/// Found entries live for the TTL plus the stale window, not-found ones for the negative TTL.
#[derive(Clone, Copy)]
struct Ttl {
    found: Duration,
    missing: Duration,
}

/// moka holds only not-found digests: each lives for the negative TTL.
impl Expiry<Digest, Missing> for Ttl {
    fn expire_after_create(&self, _: &Digest, _: &Missing, _: Instant) -> Option<Duration> {
        Some(self.missing)
    }

    fn expire_after_update(
        &self,
        _: &Digest,
        _: &Missing,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.missing)
    }
}

/// Cache sizing and lifetimes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheConfig {
    pub(crate) ttl: Duration,
    pub(crate) negative_ttl: Duration,
    pub(crate) max_capacity: u64,
    /// How long past its TTL a found entry may answer while the store is unreachable.
    pub(crate) stale: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            max_capacity: 100_000,
            stale: Duration::from_secs(300),
        }
    }
}

/// Found keys: digest → entry, in shards behind read-write locks, holding at most `capacity`
/// entries together. Each shard is an open-addressing [`Table`] whose bucket, one cache line,
/// holds the digest and the entry: a hit reads the line of its bucket, then the resolved key's
/// and the principal's at once.
///
/// The hit path takes one shard's read lock. Inserts take a write lock, and an insert that
/// takes the map past its capacity sweeps its shard: expired entries and entries not used
/// since the shard's last sweep go, entries used since get a second chance (their flag is
/// cleared), until a sixteenth of the shard (at least the excess) is free, so sweeps stay rare
/// and their cost per insert small. Each sweep goes on where the shard's last one stopped (a
/// clock hand), so no key is swept more often for where its digest falls in the table. Every
/// so many inserts (a shard's share of the capacity, at least [`FOUND_SWEEP_EVERY`]) one
/// shard, in turn, also drops its expired entries, so entries of keys no longer used do not
/// wait for the map to fill to be freed; an insert visits about one entry for it. A sweep
/// holds its shard's write lock: at a capacity of 1,000,000 on a machine with two cores, a
/// walk over 125,000 entries (in 250,000–375,000 buckets), once per 125,000 inserts; an
/// eviction sweep stops once it has freed enough.
struct FoundMap {
    shards: Shards,
    /// Entries in all shards.
    len: AtomicUsize,
    capacity: usize,
    inserts: AtomicUsize,
    /// Inserts between two sweeps of a shard's expired entries.
    sweep_every: usize,
}

/// One shard of the [`FoundMap`].
type Shard = RwLock<ShardMap>;
type ShardMap = Table<Entry>;

/// A found key in the map: the resolved key, and a handle on its principal beside it. A hit
/// reads both; with the principal's address in the map's bucket, the two are fetched from
/// memory at once instead of one after the other (the resolved key's own handle is only
/// known once its line has arrived).
struct Entry {
    key: Arc<ResolvedKey>,
    principal: Principal,
}

impl Entry {
    fn new(key: Arc<ResolvedKey>) -> Self {
        Self {
            principal: key.principal.clone(),
            key,
        }
    }
}

// A bucket of the found map is one cache line (`Entry` is two pointers): a field added to
// `Entry` must not make it two.
const _: () = assert!(table::bucket_size::<Entry>() == 64);

/// The fewest inserts into the found map between two sweeps of a shard's expired entries.
const FOUND_SWEEP_EVERY: usize = 1024;

impl FoundMap {
    fn new(capacity: u64) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        // Enough shards that cores reading different keys rarely meet on one lock (as
        // `DashMap` sizes them), and no more than the capacity fills well: a small cache
        // has one shard, so its bound is exact.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let by_cores = cores.saturating_mul(4).next_power_of_two();
        let by_size = (capacity / 256).max(1).next_power_of_two();
        let count = by_cores.min(by_size).min(256);
        Self {
            shards: Shards {
                shards: (0..count).map(|_| RwLock::new(Table::default())).collect(),
                mask: count - 1,
            },
            len: AtomicUsize::new(0),
            capacity,
            inserts: AtomicUsize::new(0),
            sweep_every: (capacity / count).max(FOUND_SWEEP_EVERY),
        }
    }

    #[inline]
    fn shard(&self, digest: &Digest) -> &Shard {
        self.shards.shard(digest)
    }

    /// `f` on the entry of `digest`, under its shard's read lock.
    #[inline]
    fn with<R>(&self, digest: &Digest, f: impl FnOnce(&Arc<ResolvedKey>) -> R) -> Option<R> {
        self.shards.with(digest, f)
    }

    /// Inserts `key` (stamped); `now` in the cache's time, for the sweeps.
    ///
    /// What leaves the map (a replaced entry, evicted and expired ones) is dropped after the
    /// shard's lock is released: dropping the last handle on a resolved key frees it and runs
    /// the application identity's `Drop`, which the hits waiting on the lock need not wait for.
    fn insert(&self, digest: Digest, key: Arc<ResolvedKey>, now: Nanos) {
        let (replaced, evicted) = {
            let mut shard = self
                .shard(&digest)
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let replaced = shard.insert(digest, Entry::new(key));
            let mut evicted = Vec::new();
            if replaced.is_none() {
                let len = self.len.fetch_add(1, Ordering::AcqRel) + 1;
                if len > self.capacity {
                    evicted = self.evict(&mut shard, len - self.capacity, now);
                }
            }
            (replaced, evicted)
        };
        drop((replaced, evicted));
        let inserts = self.inserts.fetch_add(1, Ordering::Relaxed) + 1;
        if inserts % self.sweep_every == 0 {
            let index = (inserts / self.sweep_every) & self.shards.mask;
            let expired = self.shards.shards[index]
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, entry| {
                    if now < entry.key.slot.stamp.expires() {
                        Visit::Keep
                    } else {
                        Visit::Remove
                    }
                });
            self.len.fetch_sub(expired.len(), Ordering::AcqRel);
        }
    }

    /// Frees at least `over` entries of `shard` (all of them at most), and a sixteenth of it
    /// if that is more: expired and unused ones first, then any. Returns them, for the
    /// caller to drop once it has released the shard's lock.
    fn evict(&self, shard: &mut ShardMap, over: usize, now: Nanos) -> Vec<Entry> {
        let target = over.max(shard.len() / 16).min(shard.len());
        let mut freed = 0;
        let mut gone = shard.retain(|_, entry| {
            if freed >= target {
                return Visit::Stop;
            }
            // `swap`: a used entry survives this sweep, and the next one unless used again.
            let key = &entry.key;
            if now >= key.slot.stamp.expires() || !key.used.swap(false, Ordering::Relaxed) {
                freed += 1;
                return Visit::Remove;
            }
            Visit::Keep
        });
        if freed < target {
            // Everything was in use: the excess goes anyway.
            gone.extend(shard.retain(|_, _| {
                if freed >= target {
                    return Visit::Stop;
                }
                freed += 1;
                Visit::Remove
            }));
        }
        self.len.fetch_sub(gone.len(), Ordering::AcqRel);
        gone
    }

    fn remove(&self, digest: &Digest) {
        self.remove_if(digest, |_| true);
    }

    /// Removes the entry of `digest` if `doomed` says so (dropped after the shard's lock is
    /// released, as in [`FoundMap::insert`]).
    fn remove_if(&self, digest: &Digest, doomed: impl FnOnce(&Arc<ResolvedKey>) -> bool) {
        // Most removals are of digests the map does not hold (every store read that found
        // nothing, for a key a client made up, removes its digest): a read lock tells, and the
        // shard's hits need not wait for a write lock. (An entry inserted after the look is
        // one inserted after the removal: the generation check, not the removal, is what
        // keeps invalidated entries from being served.)
        if self.with(digest, |_| ()).is_none() {
            return;
        }
        let removed = self
            .shard(digest)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove_if(digest, |entry| doomed(&entry.key));
        if removed.is_some() {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn clear(&self) {
        for shard in &*self.shards.shards {
            let cleared = shard
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            self.len.fetch_sub(cleared.len(), Ordering::AcqRel);
        }
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    #[cfg(test)]
    fn contains(&self, digest: &Digest) -> bool {
        self.with(digest, |_| ()).is_some()
    }

    #[cfg(test)]
    fn digests(&self) -> Vec<Digest> {
        self.shards
            .shards
            .iter()
            .flat_map(|shard| {
                let shard = shard.read().unwrap_or_else(PoisonError::into_inner);
                shard.digests().copied().collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The found map's shards, shared by the map and the hit path: the cache holds them
/// directly, so a hit goes from the cache to its shard without passing through the map.
#[derive(Clone)]
struct Shards {
    shards: Arc<[Shard]>,
    /// `shards.len() - 1`; the length is a power of two.
    mask: usize,
}

impl Shards {
    /// The shard of `digest`: chosen by bytes the map's hash does not use (it uses the first
    /// eight), so the hashes within a shard stay as spread as the digests.
    #[inline]
    fn shard(&self, digest: &Digest) -> &Shard {
        let bytes = digest.as_bytes();
        let index = usize::from(u16::from_le_bytes([bytes[8], bytes[9]])) & self.mask;
        &self.shards[index]
    }

    /// `f` on the entry of `digest`, under its shard's read lock.
    #[inline]
    fn with<R>(&self, digest: &Digest, f: impl FnOnce(&Arc<ResolvedKey>) -> R) -> Option<R> {
        let shard = self
            .shard(digest)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        shard.get(digest).map(|entry| {
            // The principal's line is requested now, beside the resolved key's (see `Entry`).
            std::hint::black_box(entry.principal.key_id());
            f(&entry.key)
        })
    }
}

/// Why a coalesced load's result is not stored in moka: a found key (it goes to the
/// [`FoundMap`]) or a failed read (errors are not cached). Every caller waiting on the load
/// gets it all the same.
enum Unstored {
    Found(Arc<ResolvedKey>),
    Failed(Arc<StoreError>),
}

/// The cache, plus a generation counter that every invalidation bumps.
///
/// A load that read the store before an invalidation may insert its (stale) result after it:
/// an invalidation only reaches entries already present. Each entry records the generation
/// at which its store read began, and neither the hit path ([`KeyCache::lookup`]) nor
/// [`KeyCache::get_or_load`] trusts an entry older than an invalidation that concerns it.
#[derive(Clone)]
pub(crate) struct KeyCache {
    /// Not-found digests, and the coalescing of every miss.
    cache: Cache<Digest, Missing>,
    /// Found keys.
    found: Arc<FoundMap>,
    /// The found map's shards, read by the hit path.
    shards: Shards,
    generation: Arc<AtomicU64>,
    ttl: Duration,
    stale: Duration,
    lifetimes: Ttl,
    /// `false` when built with capacity 0: every lookup reads the store.
    enabled: bool,
    /// The latest invalidations, by generation; bumped and appended under the lock.
    recent: Arc<Mutex<VecDeque<(u64, Dropped)>>>,
    /// Whether the instance can still hear of changes (bounded blindness).
    blind: Arc<Blindness>,
}

/// Bounded blindness: while an invalidation listener reports that neither the change feed
/// nor a notification transport has answered for its `max_blind`, entries read longer ago
/// than that are not served; requests for them read the store, which fails (503) while it is
/// out of reach. The entries stay cached: once the instance hears again (after applying what
/// it missed) they are served again. The hit path pays one relaxed load while the instance
/// can hear.
#[derive(Debug, Default)]
struct Blindness {
    on: AtomicBool,
    /// `max_blind` in nanoseconds.
    max_blind: AtomicU64,
    /// When the instance last heard, while blind (for stats); `None` while it hears.
    since: Mutex<Option<SystemTime>>,
}

impl Blindness {
    /// Whether an entry fresh until `fresh_until` (read `ttl` before that) was read longer
    /// than `max_blind` before `now` (all in the cache's time).
    #[cold]
    fn too_old(&self, fresh_until: Nanos, ttl: Duration, now: Nanos) -> bool {
        let max_blind = self.max_blind.load(Ordering::Acquire);
        let read_at = fresh_until.saturating_sub(nanos(ttl));
        read_at.saturating_add(max_blind) <= now
    }
}

/// How many times a miss re-reads the store while invalidations keep racing it.
const MAX_RELOADS: usize = 3;

impl KeyCache {
    pub(crate) fn new(config: CacheConfig) -> Self {
        let lifetimes = Ttl {
            found: config.ttl.saturating_add(config.stale),
            missing: config.negative_ttl,
        };
        let cache = Cache::builder()
            .max_capacity(config.max_capacity)
            .expire_after(lifetimes)
            .build();
        let found = FoundMap::new(config.max_capacity);
        Self {
            cache,
            shards: found.shards.clone(),
            found: Arc::new(found),
            generation: Arc::new(AtomicU64::new(0)),
            ttl: config.ttl,
            stale: config.stale,
            lifetimes,
            enabled: config.max_capacity > 0,
            recent: Arc::default(),
            blind: Arc::default(),
        }
    }

    /// The cache's time now.
    fn now(&self) -> Nanos {
        mono_now()
    }

    /// [`KeyCache::lookup_at`] now.
    #[cfg(test)]
    pub(crate) fn lookup(&self, digest: &Digest) -> Option<CacheHit> {
        self.lookup_at(digest, mono_now())
    }

    /// The hit path: a found key, fresh or stale, at `now`, synchronously and without
    /// touching moka. An entry whose store read began before an invalidation that concerns it
    /// may have been inserted after that invalidation ran (a load racing a revocation): it is
    /// never returned, and [`KeyCache::get_or_load`] re-reads it. Not-found digests are
    /// moka's: [`KeyCache::lookup_missing`]. `now` is the request's one clock reading, taken
    /// before the shard's lock: deadlines are judged at the request's time, so a request
    /// that waited for the lock (a sweep holding it) is judged as of its arrival, a wait
    /// (milliseconds at most) after which an entry that just expired may still answer it.
    /// Invalidations are unaffected (the generation is read under the lock).
    #[inline]
    pub(crate) fn lookup_at(&self, digest: &Digest, now: MonoNanos) -> Option<CacheHit> {
        if !self.enabled {
            return None;
        }
        match self.shards.with(digest, |key| {
            let slot = &key.slot;
            match self.classify(digest, &slot.stamp, found_id(key), now) {
                Ok(fresh) => {
                    if !key.used.load(Ordering::Relaxed) {
                        key.used.store(true, Ordering::Relaxed);
                    }
                    Ok(if fresh {
                        CacheHit::Fresh(Resolution::Found(Arc::clone(key)))
                    } else {
                        CacheHit::Stale(StaleEntry {
                            key: Arc::clone(key),
                        })
                    })
                }
                Err(gone) => Err(gone.then(|| Arc::clone(key))),
            }
        })? {
            Ok(hit) => Some(hit),
            // Expired or superseded: let the miss path read it again.
            Err(Some(dropped)) => {
                self.found
                    .remove_if(digest, |held| Arc::ptr_eq(held, &dropped));
                None
            }
            Err(None) => None,
        }
    }

    /// The miss path's first step: a cached not-found digest (these live in moka), served by
    /// the same rules as a hit.
    pub(crate) async fn lookup_missing(&self, digest: &Digest) -> Option<CacheHit> {
        if !self.enabled {
            return None;
        }
        let stamp = self.cache.get(digest).await?;
        match self.classify(digest, &stamp, || None, self.now()) {
            Ok(true) => Some(CacheHit::Fresh(Resolution::Missing)),
            // Past the found TTL (a negative TTL longer than it): read the store again, as a
            // stale found key is, rather than trust the not-found answer for longer.
            Ok(false) => {
                self.cache.invalidate(digest).await;
                None
            }
            Err(_) => None,
        }
    }

    /// Whether an entry stamped `stamp` is servable at `now`: `Ok(true)` fresh, `Ok(false)`
    /// stale (past its TTL, within the stale window), or not: `Err(true)`: past its lifetime
    /// or an invalidation since its read concerns it, gone for good; `Err(false)`: only
    /// bounded blindness withholds it, and it may be served again once the instance hears
    /// again. `id`: the key id of a found entry (read only if an invalidation happened since
    /// the entry's generation).
    #[inline]
    fn classify(
        &self,
        digest: &Digest,
        stamp: &Stamp,
        id: impl FnOnce() -> Option<Uuid>,
        now: Nanos,
    ) -> Result<bool, bool> {
        if now >= stamp.expires() || !self.current(digest, stamp, id) {
            return Err(true);
        }
        if self.distrusted(stamp, now) {
            return Err(false);
        }
        Ok(self.stale.is_zero() || now < stamp.fresh_until())
    }

    /// Whether bounded blindness forbids serving an entry stamped `stamp` (read too long ago
    /// while the instance cannot hear of changes).
    #[inline]
    fn distrusted(&self, stamp: &Stamp, now: Nanos) -> bool {
        self.blind.on.load(Ordering::Relaxed)
            && self.blind.too_old(stamp.fresh_until(), self.ttl, now)
    }

    /// Starts (`Some(last heard)`) or ends (`None`) bounded blindness: while it lasts and is
    /// `enforce`d, entries read more than `max_blind` ago are not served. Not enforced (the
    /// operator prefers availability), it is only reported.
    pub(crate) fn set_blind(&self, since: Option<SystemTime>, max_blind: Duration, enforce: bool) {
        self.blind
            .max_blind
            .store(nanos(max_blind), Ordering::Release);
        *self
            .blind
            .since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = since;
        self.blind
            .on
            .store(since.is_some() && enforce, Ordering::Release);
    }

    /// Since when the instance has been blind, if it is.
    pub(crate) fn blind_since(&self) -> Option<SystemTime> {
        *self
            .blind
            .since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether an entry stamped `stamp` may be served: no invalidation since its read
    /// concerns it. Stamps an unconcerned entry with the current generation, so its next hit
    /// skips the check.
    #[inline]
    fn current(&self, digest: &Digest, stamp: &Stamp, id: impl FnOnce() -> Option<Uuid>) -> bool {
        let current = self.generation.load(Ordering::Acquire);
        if stamp.generation.load(Ordering::Acquire) == current {
            return true;
        }
        if self.concerned(digest, stamp, id()) {
            return false;
        }
        stamp.generation.fetch_max(current, Ordering::AcqRel);
        true
    }

    /// The cached lookup, fresh or stale alike, found or not.
    #[cfg(test)]
    pub(crate) async fn get(&self, digest: &Digest) -> Option<Resolution> {
        let hit = match self.lookup(digest) {
            Some(hit) => Some(hit),
            None => self.lookup_missing(digest).await,
        };
        hit.map(|hit| match hit {
            CacheHit::Fresh(lookup) => lookup,
            CacheHit::Stale(stale) => stale.resolution(),
        })
    }

    /// Whether an invalidation after the generation of an entry stamped `stamp` (of key `id`,
    /// `None`: a not-found digest) concerns it, or may have: the record does not reach back
    /// that far.
    #[cold]
    fn concerned(&self, digest: &Digest, stamp: &Stamp, id: Option<Uuid>) -> bool {
        let read_at = stamp.generation.load(Ordering::Acquire);
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent
            .front()
            .is_none_or(|&(oldest, _)| oldest > read_at + 1)
        {
            return true;
        }
        recent
            .iter()
            .filter(|(generation, _)| *generation > read_at)
            .any(|(_, dropped)| match dropped {
                Dropped::Key(key) => id == Some(*key),
                Dropped::Digest(dropped) => dropped == digest,
                Dropped::Missing => id.is_none(),
                Dropped::All => true,
            })
    }

    /// Stamps a lookup read from the store with the generation its read began at, and puts a
    /// found key in the found map; a not-found one leaves the found map, and its new moka
    /// entry is returned for the caller to store (moka's insert is async). One clock reading
    /// for the stamp and the map's sweeps.
    fn place(&self, digest: Digest, lookup: &Resolution, generation: u64) -> Option<Missing> {
        let now = self.now();
        match lookup {
            Resolution::Found(key) => {
                debug_assert_eq!(
                    key.slot.stamp.expires(),
                    0,
                    "a found key is stamped once: each read makes a new one"
                );
                key.slot
                    .stamp
                    .set(generation, now, self.ttl, self.lifetimes.found);
                // A new entry survives the first sweep it meets: it was read to be used.
                key.used.store(true, Ordering::Relaxed);
                self.found.insert(digest, Arc::clone(key), now);
                None
            }
            Resolution::Missing => {
                self.found.remove(&digest);
                Some(Arc::new(Stamp::new(
                    generation,
                    now,
                    self.ttl,
                    self.lifetimes.missing,
                )))
            }
        }
    }

    /// Re-reads a stale entry. The result replaces the entry; an error leaves the stale entry
    /// in place.
    pub(crate) async fn refresh<Fut>(
        &self,
        digest: Digest,
        load: Fut,
    ) -> Result<Resolution, StoreError>
    where
        Fut: Future<Output = Result<Resolution, StoreError>>,
    {
        let generation = self.generation.load(Ordering::Acquire);
        let lookup = load.await?;
        // Stored with the generation its read began at, whatever invalidations ran meanwhile:
        // no lookup serves it if one of them concerns it (as for `get_or_load`).
        self.store(digest, &lookup, generation).await;
        Ok(lookup)
    }

    /// Stamps `lookup` and puts it where its kind lives, dropping what the other map held for
    /// its digest.
    async fn store(&self, digest: Digest, lookup: &Resolution, generation: u64) {
        match self.place(digest, lookup, generation) {
            Some(missing) => self.cache.insert(digest, missing).await,
            None => self.cache.invalidate(&digest).await,
        }
    }

    /// The cached lookup, or `load`'s result; concurrent callers for one digest share one
    /// `load`. Errors are not cached. A result whose store read began before an invalidation
    /// is discarded and read again.
    pub(crate) async fn get_or_load<F, Fut>(
        &self,
        digest: Digest,
        load: F,
    ) -> Result<Resolution, Arc<StoreError>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Resolution, StoreError>>,
    {
        if !self.enabled {
            // No cache, no coalescing: one store query per lookup.
            return load().await.map_err(Arc::new);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            // moka coalesces the load and keeps a not-found result; a found one is handed to
            // every waiter as `Unstored` and kept in the found map instead.
            let outcome = self
                .cache
                .try_get_with(digest, async {
                    // A load for this digest may have finished between the caller's miss and
                    // now: its entry is in the found map. Taken if it may be served (one that
                    // only bounded blindness withholds stays, and the store is read).
                    let now = self.now();
                    let servable = self.found.with(&digest, |key| {
                        self.classify(&digest, &key.slot.stamp, found_id(key), now)
                            .is_ok()
                            .then(|| Arc::clone(key))
                    });
                    if let Some(key) = servable.flatten() {
                        return Err(Unstored::Found(key));
                    }
                    let generation = self.generation.load(Ordering::Acquire);
                    let lookup = load()
                        .await
                        .map_err(|error| Unstored::Failed(Arc::new(error)))?;
                    // Stored whatever invalidations ran meanwhile: the entry carries the
                    // generation its read began at, and no lookup serves it if one of them
                    // concerns it (not storing it would make every request of a key whose
                    // read met an unrelated invalidation a store query).
                    let missing = self.place(digest, &lookup, generation);
                    match (lookup, missing) {
                        (Resolution::Found(key), _) => Err(Unstored::Found(key)),
                        (Resolution::Missing, missing) => Ok(missing.unwrap_or_default()),
                    }
                })
                .await;
            // moka's clock and ours differ by the moment of insertion: an entry moka still
            // holds may be past the deadline the hit path applies. An entry an invalidation
            // since its read concerns (a racing load's result, or one an invalidation left
            // in place) is never returned: the hit path's rule.
            let now = self.now();
            let (lookup, stamp, found) = match &outcome {
                Ok(stamp) => (Resolution::Missing, &**stamp, None),
                Err(unstored) => match &**unstored {
                    Unstored::Found(key) => (
                        Resolution::Found(Arc::clone(key)),
                        &key.slot.stamp,
                        Some(&**key),
                    ),
                    Unstored::Failed(error) => return Err(Arc::clone(error)),
                },
            };
            let live = now < stamp.expires() && !self.distrusted(stamp, now);
            // The key id is read only if an invalidation happened since the entry's read.
            let id = || found.map(|key| key.principal.key_id());
            if live && self.current(&digest, stamp, id) {
                return Ok(lookup);
            }
            // Possibly stale: drop it (not a newer entry another caller stored meanwhile) and
            // read again.
            match &lookup {
                Resolution::Found(key) => {
                    self.found.remove_if(&digest, |held| Arc::ptr_eq(held, key))
                }
                Resolution::Missing => self.cache.invalidate(&digest).await,
            }
            if attempt >= MAX_RELOADS {
                // Invalidations keep racing: answer from a fresh read, but do not cache it.
                return load().await.map_err(Arc::new);
            }
        }
    }

    fn bump(&self, dropped: Dropped) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        recent.push_back((generation, dropped));
        if recent.len() > RECENT_INVALIDATIONS {
            recent.pop_front();
        }
    }

    pub(crate) async fn invalidate_digest(&self, digest: &Digest) {
        self.bump(Dropped::Digest(*digest));
        self.found.remove(digest);
        self.cache.invalidate(digest).await;
    }

    /// Drops every entry of key `id`. The hit path stops serving them at once (the
    /// generation check), and so does the miss path: an entry an invalidation concerns is
    /// re-read wherever it is found. The entries themselves are left for the next lookup of
    /// their digest, expiry or eviction to drop: finding them would take a scan of the whole
    /// cache (moka's invalidation closures did that scan in the background, and cost a
    /// write-order queue node on every entry, ≈ 60 bytes per cached key, to do it).
    pub(crate) fn invalidate_key(&self, id: Uuid) {
        self.bump(Dropped::Key(id));
    }

    /// Drops every cached not-found entry (a key was created elsewhere): as
    /// [`KeyCache::invalidate_key`], by the generation check; they expire after the negative
    /// TTL anyway.
    pub(crate) fn invalidate_missing(&self) {
        self.bump(Dropped::Missing);
    }

    pub(crate) fn invalidate_all(&self) {
        self.bump(Dropped::All);
        self.found.clear();
        self.cache.invalidate_all();
    }

    /// `false` when built with capacity 0.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Found keys and not-found digests cached.
    pub(crate) fn entry_count(&self) -> u64 {
        u64::try_from(self.found.len())
            .unwrap_or(u64::MAX)
            .saturating_add(self.cache.entry_count())
    }

    pub(crate) async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// Inserts as a racing load would, with `generation`.
    #[cfg(test)]
    async fn insert_raw(&self, digest: Digest, lookup: Resolution, generation: u64) {
        self.store(digest, &lookup, generation).await;
    }
}

impl fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyCache")
            .field("found", &self.found.len())
            .field("missing", &self.cache.entry_count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::record;
    use std::sync::atomic::{AtomicUsize, Ordering};

    impl Resolution {
        /// Another read of the same record: a new resolved key (as the store path makes one
        /// per read), the same principal.
        fn reread(&self) -> Resolution {
            match self {
                Resolution::Found(key) => Resolution::Found(Arc::new(key.reread())),
                Resolution::Missing => Resolution::Missing,
            }
        }
    }

    /// Everything a hit reads or writes lies in the resolved key's first 64 bytes, so with
    /// the `Arc`'s 16-byte header it spans at most 80 bytes from the allocation's start: two
    /// cache lines from any 16-byte-aligned start.
    #[test]
    fn a_hit_touches_two_lines_of_the_resolved_key() {
        use std::mem::{offset_of, size_of};
        let hot_end = offset_of!(ResolvedKey, extras) + size_of::<bool>();
        assert!(hot_end <= 64, "hot fields end at {hot_end}");
        for field in [
            offset_of!(ResolvedKey, slot),
            offset_of!(ResolvedKey, principal),
            offset_of!(ResolvedKey, usage),
            offset_of!(ResolvedKey, collection_index),
            offset_of!(ResolvedKey, used),
            offset_of!(ResolvedKey, queued),
            offset_of!(ResolvedKey, revoked),
            offset_of!(ResolvedKey, disabled),
            offset_of!(ResolvedKey, tracks_usage),
            offset_of!(ResolvedKey, checks),
        ] {
            assert!(field < hot_end);
        }
        // The rarely used boxes come after.
        assert!(offset_of!(ResolvedKey, identity) >= hot_end);
        assert!(offset_of!(ResolvedKey, credits) >= hot_end);
        assert!(offset_of!(ResolvedKey, owner) >= hot_end);
        assert_eq!(size_of::<ResolvedKey>(), 88);
    }

    /// `extras` follows the setters, so a key without identity, credits or owner share reads
    /// none of the three boxes, and one with any of them reads them.
    #[test]
    fn extras_follow_the_setters() {
        let r = record(1);
        let profiles = crate::principal::Interner::new(crate::principal::MAX_INTERNED_PROFILES);
        let mut key = ResolvedKey::new(&r, false, &profiles);
        assert!(key.identity().is_none() && key.owner().is_none());
        assert!(key.accounts().0.is_none());
        assert!(!key.has_credits());
        key.set_owner(OwnerShare {
            rate_limit: None,
            credits: None,
        });
        assert!(key.owner().is_some());
        assert!(key.identity().is_none());
        key.set_collection(Some(3));
        assert_eq!(key.collection(), Some(3));
        key.set_collection(None);
        assert_eq!(key.collection(), None);
        key.set_collection(Some(u32::MAX));
        assert_eq!(key.collection(), None, "an index that does not fit is none");
    }

    fn found(n: u8) -> (Digest, Resolution) {
        let r = record(n);
        (
            r.digest,
            Resolution::Found(Arc::new(ResolvedKey::new(
                &r,
                false,
                &crate::principal::TEST_PROFILES,
            ))),
        )
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load() {
        let cache = KeyCache::new(CacheConfig::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let digest = Digest::from_bytes([7; 32]);
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let cache = cache.clone();
                let loads = loads.clone();
                tokio::spawn(async move {
                    cache
                        .get_or_load(digest, || async {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok(Resolution::Missing)
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Ok(Resolution::Missing)));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_invalidation_during_a_load_is_not_lost() {
        let cache = KeyCache::new(CacheConfig::default());
        let (digest, stale) = found(1);
        let reads = Arc::new(AtomicUsize::new(0));
        let (loading_tx, loading_rx) = tokio::sync::oneshot::channel::<()>();
        let (invalidated_tx, invalidated_rx) = tokio::sync::oneshot::channel::<()>();
        let loading_tx = std::sync::Mutex::new(Some(loading_tx));
        let invalidated_rx = tokio::sync::Mutex::new(Some(invalidated_rx));
        let loader = {
            let cache = cache.clone();
            let reads = reads.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load(digest, || {
                        let first = reads.fetch_add(1, Ordering::SeqCst) == 0;
                        let stale = stale.clone();
                        let loading_tx = loading_tx.lock().unwrap().take();
                        let invalidated_rx = &invalidated_rx;
                        async move {
                            if first {
                                // The store read happens now; the revocation lands before
                                // the result is inserted.
                                loading_tx.unwrap().send(()).unwrap();
                                invalidated_rx.lock().await.take().unwrap().await.unwrap();
                                Ok(stale)
                            } else {
                                Ok(Resolution::Missing)
                            }
                        }
                    })
                    .await
            })
        };
        loading_rx.await.unwrap();
        cache.invalidate_digest(&digest).await;
        invalidated_tx.send(()).unwrap();
        let result = loader.await.unwrap().unwrap();
        assert!(
            matches!(result, Resolution::Missing),
            "the stale read was discarded"
        );
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        assert!(matches!(
            cache.get(&digest).await,
            Some(Resolution::Missing)
        ));
    }

    /// Found by the soak: between a racing load's insert and its own generation check, the hit
    /// path served the stale entry, so a key revoked a moment earlier was accepted.
    #[tokio::test]
    async fn the_hit_path_never_serves_an_entry_read_before_an_invalidation() {
        let cache = KeyCache::new(CacheConfig::default());
        let (digest, stale) = found(2);
        let (other, unrelated) = found(3);
        let id = match &stale {
            Resolution::Found(r) => r.principal.key_id(),
            Resolution::Missing => unreachable!(),
        };
        cache
            .get_or_load(other, || async { Ok(unrelated.clone()) })
            .await
            .unwrap();
        let read_at = cache.generation.load(Ordering::Acquire);
        // The revocation: store updated, generation bumped, present entries dropped...
        cache.invalidate_key(id);
        // ...then the racing load's result lands.
        cache.insert_raw(digest, stale, read_at).await;
        assert!(cache.get(&digest).await.is_none(), "stale entry served");
        assert!(
            cache.get(&other).await.is_some(),
            "an entry the invalidation does not concern is still served"
        );
        // A racing negative entry, then the key is created: the digest is invalidated.
        let (created, _) = found(4);
        let read_at = cache.generation.load(Ordering::Acquire);
        cache.invalidate_digest(&created).await;
        cache
            .insert_raw(created, Resolution::Missing, read_at)
            .await;
        assert!(
            cache.get(&created).await.is_none(),
            "stale not-found served"
        );
        let fresh = cache
            .get_or_load(digest, || async { Ok(Resolution::Missing) })
            .await
            .unwrap();
        assert!(
            matches!(fresh, Resolution::Missing),
            "re-read on the miss path"
        );
        assert!(matches!(
            cache.get(&digest).await,
            Some(Resolution::Missing)
        ));
    }

    /// Each map keeps its bound, holds only its kind, and drops what an invalidation or a
    /// flush drops.
    #[tokio::test]
    async fn both_maps_keep_their_bounds() {
        let cache = KeyCache::new(CacheConfig {
            max_capacity: 32,
            ..CacheConfig::default()
        });
        for n in 0..=255u8 {
            let digest = Digest::from_bytes([n; 32]);
            let lookup = if n % 2 == 0 {
                found(n).1
            } else {
                Resolution::Missing
            };
            cache
                .get_or_load(digest, || async { Ok(lookup.clone()) })
                .await
                .unwrap();
        }
        cache.run_pending_tasks().await;
        assert!(cache.cache.entry_count() <= 32, "moka kept its bound");
        let held = cache.found.digests();
        assert!(
            !held.is_empty() && held.len() <= 32,
            "found map: {}",
            held.len()
        );
        assert_eq!(cache.found.len(), held.len(), "the count is exact");
        for digest in &held {
            assert_eq!(digest.as_bytes()[0] % 2, 0, "only found keys");
            assert!(!cache.cache.contains_key(digest), "not in moka too");
        }
        let kept = held[0];
        assert!(cache.lookup(&kept).is_some(), "a kept entry is a hit");
        cache.invalidate_digest(&kept).await;
        assert!(!cache.found.contains(&kept));
        assert!(cache.lookup(&kept).is_none());
        cache.invalidate_all();
        assert_eq!(
            cache.found.len(),
            0,
            "a flush empties the found map at once"
        );
        assert!(cache.found.digests().is_empty());
    }

    /// Entries past their lifetime are swept without the map filling up, and the count stays
    /// exact; a live entry is never swept.
    #[test]
    fn the_found_map_sweeps_expired_entries() {
        // Filled below its capacity: nothing is evicted, only swept.
        let map = FoundMap::new(16_384);
        // Keys stamped as read at 1 µs in the cache's time, living `lifetime`.
        let stamped = |n: u8, lifetime: Duration| {
            let (digest, lookup) = found(n);
            let Resolution::Found(key) = lookup else {
                unreachable!()
            };
            key.slot.stamp.set(0, 1_000, Duration::ZERO, lifetime);
            (digest, key)
        };
        let (live, kept) = stamped(1, Duration::from_secs(3600));
        map.insert(live, kept, 1_000);
        // Expired at once; one key may stand for all of them.
        let (_, gone) = stamped(2, Duration::ZERO);
        let inserted = 16_383;
        assert!(map.sweep_every < inserted);
        for i in 0..inserted {
            let digest = spread(u32::try_from(i).unwrap(), 3);
            map.insert(digest, Arc::clone(&gone), 1_000);
        }
        assert!(map.len() < inserted + 1, "nothing swept: {}", map.len());
        assert_eq!(map.len(), map.digests().len(), "the count is exact");
        assert!(map.contains(&live), "a live entry stays");
    }

    /// A miss that lost the race to a load of the same key (it missed the found map just
    /// before that load stored its entry) takes the entry instead of reading the store again.
    #[tokio::test]
    async fn a_miss_behind_a_finished_load_reads_nothing() {
        let cache = KeyCache::new(CacheConfig::default());
        let (digest, lookup) = found(6);
        let loads = AtomicUsize::new(0);
        let load = || {
            loads.fetch_add(1, Ordering::SeqCst);
            let lookup = lookup.reread();
            async move { Ok(lookup) }
        };
        cache.get_or_load(digest, load).await.unwrap();
        cache.get_or_load(digest, load).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        // Unless the entry may not be served: then it is read again.
        let id = match &lookup {
            Resolution::Found(r) => r.principal.key_id(),
            Resolution::Missing => unreachable!(),
        };
        cache.invalidate_key(id);
        cache.get_or_load(digest, load).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    /// A stale entry is judged again after a re-read failed: a revocation heard meanwhile
    /// wins.
    #[tokio::test]
    async fn a_stale_entry_is_judged_again_before_it_answers() {
        let cache = KeyCache::new(CacheConfig {
            ttl: Duration::from_millis(10),
            stale: Duration::from_secs(60),
            ..CacheConfig::default()
        });
        let (digest, lookup) = found(7);
        cache
            .get_or_load(digest, || async { Ok(lookup.clone()) })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Some(CacheHit::Stale(stale)) = cache.lookup(&digest) else {
            panic!("stale");
        };
        assert!(stale.still_servable(&cache, &digest));
        cache.invalidate_missing();
        assert!(stale.still_servable(&cache, &digest), "not concerned");
        let id = match &lookup {
            Resolution::Found(r) => r.principal.key_id(),
            Resolution::Missing => unreachable!(),
        };
        cache.invalidate_key(id);
        assert!(!stale.still_servable(&cache, &digest));
    }

    #[tokio::test]
    async fn concurrent_misses_of_a_found_key_share_one_load() {
        let cache = KeyCache::new(CacheConfig::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let (digest, lookup) = found(5);
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let cache = cache.clone();
                let loads = loads.clone();
                let lookup = lookup.clone();
                tokio::spawn(async move {
                    cache
                        .get_or_load(digest, || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            let lookup = lookup.clone();
                            async move {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                Ok(lookup)
                            }
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Ok(Resolution::Found(_))));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(cache.found.contains(&digest));
        cache.run_pending_tasks().await;
        assert_eq!(cache.cache.entry_count(), 0, "moka keeps no found key");
        assert!(matches!(cache.lookup(&digest), Some(CacheHit::Fresh(_))));
    }

    /// An application identity that, when dropped, notes whether its shard's lock was free.
    struct LockProbe {
        shards: Shards,
        digest: Digest,
        free: Arc<Mutex<Vec<bool>>>,
    }

    impl Identity for LockProbe {
        fn insert_into(&self, _: &mut Extensions) {}
    }

    impl Drop for LockProbe {
        fn drop(&mut self) {
            let free = self.shards.shard(&self.digest).try_write().is_ok();
            self.free.lock().unwrap().push(free);
        }
    }

    #[test]
    fn what_leaves_the_found_map_is_dropped_outside_its_lock() {
        let free = Arc::new(Mutex::new(Vec::new()));
        // Capacity 2: one shard, and the third key evicts.
        let map = FoundMap::new(2);
        let probed = |i: u32| {
            let digest = spread(i, 5);
            let (_, lookup) = found(1);
            let Resolution::Found(key) = lookup else {
                unreachable!()
            };
            let mut key = Arc::into_inner(key).expect("one handle");
            key.set_identity(Ok(Arc::new(LockProbe {
                shards: map.shards.clone(),
                digest,
                free: Arc::clone(&free),
            })));
            key.slot
                .stamp
                .set(0, 1_000, Duration::from_secs(60), Duration::from_secs(60));
            (digest, Arc::new(key))
        };
        // Removed.
        let (digest, key) = probed(1);
        map.insert(digest, key, 1_000);
        map.remove(&digest);
        // Replaced by a new read of the same digest.
        let (digest, key) = probed(2);
        map.insert(digest, key, 1_000);
        let (_, again) = probed(2);
        map.insert(digest, again, 1_000);
        // Evicted (never used), then the rest cleared.
        let (digest, key) = probed(3);
        map.insert(digest, key, 1_000);
        let (digest, key) = probed(4);
        map.insert(digest, key, 1_000);
        map.clear();
        let free = free.lock().unwrap();
        assert_eq!(free.len(), 5, "every probe dropped: {free:?}");
        assert!(free.iter().all(|&f| f), "dropped under the lock: {free:?}");
    }

    fn spread(i: u32, tag: u8) -> Digest {
        // Spread over the hash bits the way an HMAC output is.
        let mut bytes = [tag; 32];
        let h = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(tag);
        bytes[..8].copy_from_slice(&h.to_le_bytes());
        bytes[8..12].copy_from_slice(&i.to_le_bytes());
        Digest::from_bytes(bytes)
    }

    /// A key in use stays cached while others churn through a full cache: one-off digests
    /// (moka's, they cannot reach the found map) and other keys (the found map's second
    /// chance: a key used since the last sweep survives it).
    #[tokio::test]
    async fn a_key_in_use_survives_churn() {
        let cache = KeyCache::new(CacheConfig {
            max_capacity: 64,
            ..CacheConfig::default()
        });
        let hot = spread(0, 0xAA);
        let (_, hot_lookup) = found(1);
        let reads = AtomicUsize::new(0);
        let load_hot = || {
            reads.fetch_add(1, Ordering::SeqCst);
            let lookup = hot_lookup.reread();
            async move { Ok(lookup) }
        };
        cache.get_or_load(hot, load_hot).await.unwrap();
        let (_, other_key) = found(2);
        for i in 1..4_000 {
            if cache.lookup(&hot).is_none() && cache.lookup_missing(&hot).await.is_none() {
                cache.get_or_load(hot, load_hot).await.unwrap();
            }
            let cold = spread(i, 2);
            let lookup = if i % 2 == 0 {
                Resolution::Missing
            } else {
                other_key.reread()
            };
            cache
                .get_or_load(cold, || async { Ok(lookup.reread()) })
                .await
                .unwrap();
            if i % 64 == 0 {
                cache.run_pending_tasks().await;
            }
        }
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "the key in use was evicted by churn"
        );
        assert!(cache.found.len() <= 64);
    }

    /// A stale found key answers as stale, from the found map; re-read as not found it moves
    /// to moka, and back when found again.
    #[tokio::test]
    async fn each_kind_lives_in_its_own_map() {
        let cache = KeyCache::new(CacheConfig {
            ttl: Duration::from_millis(20),
            stale: Duration::from_secs(60),
            ..CacheConfig::default()
        });
        let (digest, lookup) = found(1);
        cache
            .get_or_load(digest, || async { Ok(lookup.reread()) })
            .await
            .unwrap();
        assert!(cache.found.contains(&digest));
        assert!(cache.lookup_missing(&digest).await.is_none());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(
            matches!(cache.lookup(&digest), Some(CacheHit::Stale(_))),
            "past its TTL it is stale, and gets refreshed"
        );
        cache
            .refresh(digest, async { Ok(Resolution::Missing) })
            .await
            .unwrap();
        assert!(!cache.found.contains(&digest), "not found any more");
        assert!(cache.lookup(&digest).is_none());
        assert!(matches!(
            cache.lookup_missing(&digest).await,
            Some(CacheHit::Fresh(Resolution::Missing))
        ));
        let again = lookup.clone();
        cache.refresh(digest, async { Ok(again) }).await.unwrap();
        assert!(
            cache.lookup_missing(&digest).await.is_none(),
            "moka's copy went"
        );
        assert!(matches!(cache.lookup(&digest), Some(CacheHit::Fresh(_))));
        // An invalidated entry is served by neither path.
        let id = match &lookup {
            Resolution::Found(r) => r.principal.key_id(),
            Resolution::Missing => unreachable!(),
        };
        cache.invalidate_key(id);
        assert!(cache.lookup(&digest).is_none());
        assert!(!cache.found.contains(&digest), "dropped by the lookup");
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let cache = KeyCache::new(CacheConfig::default());
        let digest = Digest::from_bytes([1; 32]);
        let err = cache
            .get_or_load(digest, || async {
                Err(StoreError::new(
                    crate::store::StoreErrorKind::Unavailable,
                    "down",
                ))
            })
            .await;
        assert!(err.is_err());
        assert!(cache.get(&digest).await.is_none());
    }

    #[tokio::test]
    async fn invalidation_by_key_id_and_digest() {
        let cache = KeyCache::new(CacheConfig::default());
        let (d1, l1) = found(1);
        let (d2, l2) = found(2);
        let id1 = match &l1 {
            Resolution::Found(r) => r.principal.key_id(),
            Resolution::Missing => unreachable!(),
        };
        cache
            .get_or_load(d1, || async { Ok(l1.clone()) })
            .await
            .unwrap();
        cache
            .get_or_load(d2, || async { Ok(l2.clone()) })
            .await
            .unwrap();
        cache.invalidate_key(id1);
        assert!(
            cache.get(&d1).await.is_none(),
            "invalidated entries are never returned"
        );
        assert!(cache.get(&d2).await.is_some());
        cache.invalidate_digest(&d2).await;
        assert!(cache.get(&d2).await.is_none());
    }

    #[tokio::test]
    async fn a_blind_cache_serves_only_entries_read_within_max_blind() {
        let cache = KeyCache::new(CacheConfig {
            ttl: Duration::from_secs(60),
            stale: Duration::from_secs(60),
            ..CacheConfig::default()
        });
        let (old, l1) = found(1);
        cache
            .get_or_load(old, || async { Ok(l1.reread()) })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let max_blind = Duration::from_millis(50);
        // Reported, not enforced: served.
        cache.set_blind(Some(SystemTime::now()), max_blind, false);
        assert!(cache.lookup(&old).is_some());
        assert!(cache.blind_since().is_some());
        // Enforced: the entry read 60 ms ago is not served, by the hit path nor the miss path.
        cache.set_blind(Some(SystemTime::now()), max_blind, true);
        assert!(cache.lookup(&old).is_none(), "the hit path refuses it");
        let (fresh, l2) = found(2);
        let reads = AtomicUsize::new(0);
        let reread = cache
            .get_or_load(old, || {
                reads.fetch_add(1, Ordering::SeqCst);
                let l1 = l1.clone();
                async move { Ok(l1) }
            })
            .await
            .unwrap();
        assert!(matches!(reread, Resolution::Found(_)));
        assert_eq!(reads.load(Ordering::SeqCst), 1, "the miss path re-reads it");
        // An entry read while blind is fresh: served until it, too, is older than max_blind.
        cache
            .get_or_load(fresh, || async { Ok(l2.reread()) })
            .await
            .unwrap();
        assert!(cache.lookup(&fresh).is_some());
        assert!(cache.lookup(&old).is_some(), "the re-read entry is served");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(cache.lookup(&fresh).is_none());
        // Sighted again: what the cache still holds is served again (a lookup refused for
        // blindness alone keeps the entry), with no store read.
        cache.set_blind(None, max_blind, true);
        assert!(cache.lookup(&fresh).is_some());
        assert!(cache.blind_since().is_none());
    }

    #[tokio::test]
    async fn capacity_zero_reads_the_store_every_time() {
        let cache = KeyCache::new(CacheConfig {
            max_capacity: 0,
            ..CacheConfig::default()
        });
        let (digest, lookup) = found(1);
        let loads = AtomicUsize::new(0);
        for _ in 0..3 {
            let result = cache
                .get_or_load(digest, || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    let lookup = lookup.clone();
                    async move { Ok(lookup) }
                })
                .await
                .unwrap();
            assert!(matches!(result, Resolution::Found(_)));
            assert!(cache.get(&digest).await.is_none(), "nothing is kept");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn negative_entries_expire_sooner() {
        let cache = KeyCache::new(CacheConfig {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_millis(30),
            max_capacity: 100,
            stale: Duration::ZERO,
        });
        let (d1, l1) = found(1);
        let missing = Digest::from_bytes([9; 32]);
        cache
            .get_or_load(d1, || async { Ok(l1.clone()) })
            .await
            .unwrap();
        cache
            .get_or_load(missing, || async { Ok(Resolution::Missing) })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(cache.get(&missing).await.is_none());
        assert!(cache.get(&d1).await.is_some());
    }

    #[tokio::test]
    async fn found_entries_turn_stale_then_refresh() {
        let cache = KeyCache::new(CacheConfig {
            ttl: Duration::from_millis(30),
            negative_ttl: Duration::from_millis(30),
            max_capacity: 100,
            stale: Duration::from_secs(60),
        });
        let (d1, l1) = found(1);
        cache
            .get_or_load(d1, || async { Ok(l1.clone()) })
            .await
            .unwrap();
        assert!(matches!(cache.lookup(&d1), Some(CacheHit::Fresh(_))));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Some(CacheHit::Stale(stale)) = cache.lookup(&d1) else {
            panic!("past its TTL the entry is stale, not gone");
        };
        let claim = stale.claim_refresh();
        assert!(claim.is_some());
        let Some(CacheHit::Stale(other)) = cache.lookup(&d1) else {
            panic!("still stale");
        };
        assert!(other.claim_refresh().is_none(), "one refresher at a time");
        // A failed re-read keeps the stale entry and frees the claim.
        let down = cache
            .refresh(d1, async {
                Err(StoreError::new(
                    crate::store::StoreErrorKind::Unavailable,
                    "down",
                ))
            })
            .await;
        assert!(down.is_err());
        drop(claim);
        let Some(CacheHit::Stale(again)) = cache.lookup(&d1) else {
            panic!("still stale after a failed refresh");
        };
        assert!(again.claim_refresh().is_some());
        cache
            .refresh(d1, async { Ok(Resolution::Missing) })
            .await
            .unwrap();
        assert!(matches!(
            cache.lookup_missing(&d1).await,
            Some(CacheHit::Fresh(Resolution::Missing))
        ));
    }

    #[tokio::test]
    async fn created_elsewhere_drops_only_not_found_entries() {
        let cache = KeyCache::new(CacheConfig::default());
        let (d1, l1) = found(1);
        let missing = Digest::from_bytes([9; 32]);
        cache
            .get_or_load(d1, || async { Ok(l1.clone()) })
            .await
            .unwrap();
        cache
            .get_or_load(missing, || async { Ok(Resolution::Missing) })
            .await
            .unwrap();
        cache.invalidate_missing();
        assert!(cache.get(&missing).await.is_none());
        assert!(cache.get(&d1).await.is_some());
        // A not-found read that raced the creation notice is not served either.
        let read_at = cache.generation.load(Ordering::Acquire);
        cache.invalidate_missing();
        cache
            .insert_raw(missing, Resolution::Missing, read_at)
            .await;
        assert!(
            cache.get(&missing).await.is_none(),
            "stale not-found served"
        );
        assert!(
            cache.get(&d1).await.is_some(),
            "found entries are not concerned"
        );
    }
}
