//! Resolution: from a digest to what the request path needs about the key, through the cache,
//! the store (one query per miss, shared by concurrent misses), the store's health, lazy
//! re-digesting under the current secret, and the foreign collections.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::{mono_now, MonoNanos};

use http::HeaderMap;

use crate::cache::{CacheHit, Identity, KeyCache, Resolution, ResolvedKey, StaleEntry};
use crate::credits::CreditLedger;
use crate::principal::{Interner, Principal};
use crate::ratelimit::Blocked;
use crate::rejection::{AuthRejection, RejectionKind};
use crate::secret::{Digest, SecretId};
use crate::stats::{CacheLookup, Counters};
use crate::store::{ForeignScheme, ForeignSource, KeyRecord, KeyStore, StoreError, StoreErrorKind};

use super::prepare::{CollectionConfig, CredentialCheck, MissDigests};

/// What an identity mapping returns: the application's identity, or the rejection to answer.
pub(crate) type MappedIdentity = Result<Arc<dyn Identity>, AuthRejection>;

/// Maps a principal to the application's own identity type, once per cache fill.
pub(crate) type IdentityMapper =
    Arc<dyn Fn(Principal) -> Pin<Box<dyn Future<Output = MappedIdentity> + Send>> + Send + Sync>;

/// A collection whose keys another system issued: its scheme and its read-only source.
#[derive(Clone, Debug)]
pub(crate) struct ForeignCollection {
    pub(crate) slug: Box<str>,
    pub(crate) scheme: Arc<dyn ForeignScheme>,
    pub(crate) source: Arc<dyn ForeignSource>,
}

/// Whether the store recently failed. While it is marked down, misses fail fast with 503 and
/// stale entries answer without waiting for a timeout; after `retry` one request probes again.
pub(crate) struct StoreHealth {
    origin: Instant,
    /// Nanoseconds since `origin` until which the store counts as down; 0 when up.
    down_until: AtomicU64,
    pub(crate) retry: Duration,
}

impl StoreHealth {
    pub(crate) fn new(retry: Duration) -> Self {
        Self {
            origin: Instant::now(),
            down_until: AtomicU64::new(0),
            retry,
        }
    }

    fn elapsed(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn is_down(&self) -> bool {
        let until = self.down_until.load(Ordering::Acquire);
        until != 0 && self.elapsed() < until
    }

    fn mark_down(&self) {
        let retry = u64::try_from(self.retry.as_nanos()).unwrap_or(u64::MAX);
        let until = self.elapsed().saturating_add(retry).max(1);
        self.down_until.store(until, Ordering::Release);
    }

    /// Returns whether the store had been marked down.
    fn mark_up(&self) -> bool {
        self.down_until.load(Ordering::Acquire) != 0
            && self.down_until.swap(0, Ordering::AcqRel) != 0
    }
}

/// From a digest to a [`ResolvedKey`]: cache, store, health, lazy re-digest, foreign sources.
pub(crate) struct Resolver {
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) cache: KeyCache,
    pub(crate) health: StoreHealth,
    pub(crate) store_timeout: Duration,
    /// Collections verified by a foreign scheme against a read-only source.
    pub(crate) foreign: Vec<ForeignCollection>,
    pub(crate) identity: Option<IdentityMapper>,
    pub(crate) collections: Arc<[CollectionConfig]>,
    /// The id of the ring's current secret: keys found under a previous one gain a digest
    /// under it.
    pub(crate) current_secret: SecretId,
    pub(crate) counters: Arc<Counters>,
    /// The principals' shared profiles (collection, scopes, ...): owned here, dropped with
    /// the layer.
    pub(crate) profiles: Interner,
    /// Where keys with credits get their accounts.
    pub(crate) credits: Arc<CreditLedger>,
}

impl Resolver {
    /// The foreign collection of this slug, if it is foreign.
    pub(crate) fn foreign(&self, collection: &str) -> Option<&ForeignCollection> {
        self.foreign.iter().find(|c| *c.slug == *collection)
    }

    /// Whether this collection is verified by a foreign scheme (so its keys live only in the
    /// foreign source, and its uses are never written).
    fn owns_foreign(&self, collection: &str) -> bool {
        !self.foreign.is_empty() && self.foreign(collection).is_some()
    }

    /// The hit path: a fresh cached answer at `now`, synchronously, or `None` when the store
    /// must be asked (a miss, or a stale entry): then [`Resolver::resolve`]. `blocked` as
    /// there.
    pub(crate) fn resolve_cached(
        &self,
        digest: &Digest,
        blocked: Option<&Blocked>,
        now: MonoNanos,
    ) -> Option<Result<Arc<ResolvedKey>, AuthRejection>> {
        let hit = self.cache.lookup_at(digest, now);
        // Counted only when answered here: otherwise `resolve` looks again and counts.
        match (hit, blocked) {
            (hit, Some(blocked)) => {
                self.count_lookup(hit.as_ref());
                Some(self.past_block(hit, blocked))
            }
            (Some(CacheHit::Fresh(resolution)), None) => {
                self.counters.cache_lookup(match resolution {
                    Resolution::Found(_) => CacheLookup::Hit,
                    Resolution::Missing => CacheLookup::NegativeHit,
                });
                Some(found(resolution))
            }
            (_, None) => None,
        }
    }

    fn count_lookup(&self, hit: Option<&CacheHit>) {
        self.counters.cache_lookup(match hit {
            None => CacheLookup::Miss,
            Some(CacheHit::Fresh(Resolution::Found(_))) => CacheLookup::Hit,
            Some(CacheHit::Fresh(Resolution::Missing)) => CacheLookup::NegativeHit,
            Some(CacheHit::Stale(_)) => CacheLookup::Stale,
        });
    }

    /// The answer for a client address over its failure budget: only a key cached as valid,
    /// and fresh, gets past it; anything that would need the store is refused.
    fn past_block(
        &self,
        hit: Option<CacheHit>,
        blocked: &Blocked,
    ) -> Result<Arc<ResolvedKey>, AuthRejection> {
        match hit {
            Some(CacheHit::Fresh(Resolution::Found(resolved))) => Ok(resolved),
            _ => Err(self.blocked_rejection(blocked)),
        }
    }

    /// Resolves a digest: from the cache when it can, else from the store (concurrent misses
    /// of one digest share one query). `blocked` is set for a client address over its failure
    /// budget that may still use cached keys: anything needing the store is refused.
    pub(crate) async fn resolve(
        &self,
        credentials: &CredentialCheck,
        digest: Digest,
        headers: &HeaderMap,
        query: Option<&str>,
        optional: bool,
        blocked: Option<&Blocked>,
    ) -> Result<Arc<ResolvedKey>, AuthRejection> {
        let hit = match self.cache.lookup_at(&digest, mono_now()) {
            Some(hit) => Some(hit),
            None => self.cache.lookup_missing(&digest).await,
        };
        self.count_lookup(hit.as_ref());
        if let Some(blocked) = blocked {
            return self.past_block(hit, blocked);
        }
        match hit {
            Some(CacheHit::Fresh(resolution)) => found(resolution),
            Some(CacheHit::Stale(stale)) => {
                self.refresh_stale(credentials, digest, stale, headers, query, optional)
                    .await
            }
            None => {
                let miss = credentials.miss_digests(headers, query, &self.foreign, optional);
                self.resolve_miss(digest, miss).await
            }
        }
    }

    /// A found entry past its TTL: one request re-reads it; while the store is down, or
    /// another request is re-reading it, the stale entry answers.
    async fn refresh_stale(
        &self,
        credentials: &CredentialCheck,
        digest: Digest,
        stale: StaleEntry,
        headers: &HeaderMap,
        query: Option<&str>,
        optional: bool,
    ) -> Result<Arc<ResolvedKey>, AuthRejection> {
        if let Some(_claim) = (!self.health.is_down())
            .then(|| stale.claim_refresh())
            .flatten()
        {
            let miss = credentials.miss_digests(headers, query, &self.foreign, optional);
            match self.cache.refresh(digest, self.load(digest, &miss)).await {
                Ok(resolution) => return found(resolution),
                // Not an outage (the store is not marked down, and the row is not corrupt):
                // an identity mapping that timed out. Its verdict is unknown, so the stale
                // one is not trusted past the TTL.
                Err(error) if !self.health.is_down() && error.kind() != StoreErrorKind::Corrupt => {
                    return Err(self.unavailable());
                }
                Err(_) => {}
            }
        }
        // The re-read may have taken up to the store timeout: the entry is judged again (a
        // revocation heard meanwhile, its lifetime, bounded blindness) before it answers.
        if !stale.still_servable(&self.cache, &digest) {
            return Err(self.unavailable());
        }
        if self.health.is_down() {
            self.counters.stale_served();
            tracing::debug!(target: "keywarden", "key store unreachable: answering from a stale cache entry");
        }
        found(stale.resolution())
    }

    /// A cache miss: one store query, shared by concurrent misses of the same digest.
    pub(crate) async fn resolve_miss(
        &self,
        digest: Digest,
        miss: MissDigests,
    ) -> Result<Arc<ResolvedKey>, AuthRejection> {
        if self.health.is_down() {
            return Err(self.unavailable());
        }
        let resolution = self
            .cache
            .get_or_load(digest, || self.load(digest, &miss))
            .await
            .map_err(|_| self.unavailable())?;
        found(resolution)
    }

    /// A 503 `store_unavailable`, counted.
    pub(crate) fn unavailable(&self) -> AuthRejection {
        self.counters.unavailable();
        AuthRejection::new(
            RejectionKind::StoreUnavailable,
            "the key store is unavailable; retry shortly",
        )
        .with_retry_after(self.health.retry)
    }

    /// A 429 for a client address over its failure budget, counted.
    pub(crate) fn blocked_rejection(&self, blocked: &Blocked) -> AuthRejection {
        self.counters.client_blocked();
        AuthRejection::rate_limited(blocked.status, blocked.retry_after)
            .with_detail("too many rejected keys from this address; retry later")
    }

    /// One store call under the store timeout, with the outcome recorded in the store's
    /// health, the counters and tracing.
    pub(crate) async fn store_call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let answer = tokio::time::timeout(self.store_timeout, call).await;
        self.counters.store_lookup(started.elapsed());
        let error = match answer {
            Ok(Ok(value)) => {
                if self.health.mark_up() {
                    tracing::info!(target: "keywarden", "key store is reachable again");
                }
                return Ok(value);
            }
            Ok(Err(error)) => {
                self.counters.store_error();
                error
            }
            Err(_) => {
                self.counters.store_timeout();
                StoreError::new(
                    StoreErrorKind::Timeout,
                    format!(
                        "the key store did not answer within {} ms",
                        self.store_timeout.as_millis()
                    ),
                )
            }
        };
        // A corrupt row is that row's problem, not an outage.
        if error.kind() != StoreErrorKind::Corrupt {
            self.health.mark_down();
        }
        tracing::warn!(target: "keywarden", error = %error, kind = ?error.kind(), "key store lookup failed");
        Err(error)
    }

    async fn load(&self, digest: Digest, miss: &MissDigests) -> Result<Resolution, StoreError> {
        if let Some(record) = self.find_native(&digest).await? {
            return Ok(Resolution::Found(self.resolved(&record).await?));
        }
        for &(secret_id, old) in &miss.previous {
            let Some(record) = self.find_native(&old).await? else {
                continue;
            };
            self.add_current_digest(&record, secret_id, &old, &digest)
                .await;
            return Ok(Resolution::Found(self.resolved(&record).await?));
        }
        self.load_foreign(miss).await
    }

    /// After the native store found nothing: each foreign source the key could belong to, in
    /// configuration order. The record is always filed under the collection that found it.
    async fn load_foreign(&self, miss: &MissDigests) -> Result<Resolution, StoreError> {
        for (index, digests) in &miss.foreign {
            let collection = &self.foreign[*index];
            let found = self.store_call(collection.source.find(digests));
            if let Some(mut record) = found.await? {
                record.collection = collection.slug.to_string();
                return Ok(Resolution::Found(self.resolved(&record).await?));
            }
        }
        Ok(Resolution::Missing)
    }

    /// A record of keywarden's own store by one of its digests. A collection has one source:
    /// native rows filed under a foreign collection are ignored, whichever secret found them.
    async fn find_native(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self
            .store_call(self.store.find_by_digest(digest))
            .await?
            .filter(|r| !self.owns_foreign(&r.collection)))
    }

    /// Lazy migration: the key, found under a previous secret, also gets its digest under the
    /// current one, so from now on it is found with one query. Its old digest stays valid, so
    /// instances still on the old secret keep verifying it. A failure only costs the
    /// migration: the key was found, and stays valid under the previous secret.
    async fn add_current_digest(
        &self,
        record: &KeyRecord,
        secret_id: SecretId,
        old: &Digest,
        current: &Digest,
    ) {
        let current_id = self.current_secret;
        let add = self.store.add_digest(record.id, old, current, current_id);
        match tokio::time::timeout(self.store_timeout, add).await {
            Ok(Ok(true)) => tracing::info!(
                target: "keywarden",
                key_id = %record.id,
                from_secret = %secret_id,
                to_secret = %current_id,
                "re-digested key under the current secret; its previous digest stays valid"
            ),
            Ok(Ok(false)) => tracing::debug!(
                target: "keywarden",
                key_id = %record.id,
                "key not re-digested: it already has a digest under the current secret, or no longer the one that found it"
            ),
            Ok(Err(error)) => tracing::warn!(
                target: "keywarden",
                key_id = %record.id,
                error = %error,
                "could not re-digest key; it stays valid under the previous secret"
            ),
            Err(_) => tracing::warn!(
                target: "keywarden",
                key_id = %record.id,
                "re-digesting timed out; the key stays valid under the previous secret"
            ),
        }
    }

    /// What the request path needs about a key: built once per cache fill, so that a hit
    /// compares no strings.
    /// The application's identity mapping runs here, under the store timeout: a mapping that
    /// does not finish in time is a store timeout (503, not cached).
    pub(crate) async fn resolved(
        &self,
        record: &KeyRecord,
    ) -> Result<Arc<ResolvedKey>, StoreError> {
        // A key of a foreign collection never holds a management scope.
        let foreign = self.owns_foreign(&record.collection);
        let mut resolved = ResolvedKey::new(record, foreign, &self.profiles);
        if let Some(map) = &self.identity {
            let mapped = tokio::time::timeout(self.store_timeout, map(resolved.principal.clone()));
            let Ok(mapped) = mapped.await else {
                self.counters.store_timeout();
                return Err(StoreError::new(
                    StoreErrorKind::Timeout,
                    "the identity mapping did not finish within the store timeout",
                ));
            };
            resolved.set_identity(mapped);
        }
        resolved.set_collection(
            self.collections
                .iter()
                .position(|c| *c.slug == *record.collection)
                .and_then(|index| u32::try_from(index).ok()),
        );
        // A foreign store is never written to.
        resolved.tracks_usage = !foreign;
        if record.credits.is_some() && !foreign {
            resolved.set_credits(self.credits.account(record.id));
        }
        // The owner's budget, computed once per cache fill: its stored rate limit (a bucket per
        // policy), else its collection's owner rate limit; its shared credits' account.
        let collection_limit = resolved
            .collection()
            .and_then(|index| self.collections.get(index as usize))
            .and_then(|c| c.owner_rate_limit);
        if !record.owner.is_empty() || collection_limit.is_some() {
            let pool = crate::store::owner_pool(&record.collection, &record.subject);
            let credits = match record.owner.credits {
                Some(_) if !foreign => {
                    Some(self.credits.owner_account(pool, record.owner.generation))
                }
                _ => None,
            };
            let rate_limit = match record.owner.rate_limit {
                Some(policy) => Some((crate::store::owner_rate_bucket(pool, &policy), policy)),
                None => collection_limit.map(|policy| (pool, policy)),
            };
            resolved.set_owner(crate::cache::OwnerShare {
                rate_limit,
                credits,
            });
        }
        Ok(Arc::new(resolved))
    }
}

fn found(resolution: Resolution) -> Result<Arc<ResolvedKey>, AuthRejection> {
    match resolution {
        Resolution::Found(resolved) => Ok(resolved),
        Resolution::Missing => Err(AuthRejection::new(
            RejectionKind::InvalidKey,
            "the key is not recognised",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store marked down stays down for `retry`, then counts as up again; marking it up
    /// says whether it had been down (the "reachable again" log line).
    #[test]
    fn the_store_counts_as_down_for_the_retry_window() {
        let health = StoreHealth::new(Duration::from_secs(60));
        assert!(!health.is_down());
        assert!(!health.mark_up(), "it was not down");
        health.mark_down();
        assert!(health.is_down());
        assert!(health.is_down(), "asking does not end the window");
        assert!(health.mark_up(), "it had been down");
        assert!(!health.is_down());
        assert!(!health.mark_up(), "once");

        // Without a retry window, a failure does not hold later requests back.
        let no_window = StoreHealth::new(Duration::ZERO);
        no_window.mark_down();
        assert!(no_window.mark_up(), "still recorded as a failure");
    }

    /// The window is measured from the health's origin: ten seconds in, a store marked down
    /// until five seconds in is up, and one marked down until a minute in is down.
    #[test]
    fn the_window_ends_when_its_time_has_passed() {
        let at = |down_until: Duration| StoreHealth {
            origin: Instant::now() - Duration::from_secs(10),
            down_until: AtomicU64::new(u64::try_from(down_until.as_nanos()).unwrap()),
            retry: Duration::from_secs(60),
        };
        assert!(!at(Duration::from_secs(5)).is_down());
        assert!(!at(Duration::from_nanos(1)).is_down());
        assert!(at(Duration::from_secs(60)).is_down());
        assert!(!at(Duration::ZERO).is_down(), "0: never marked down");

        let health = at(Duration::ZERO);
        health.mark_down();
        let until = Duration::from_nanos(health.down_until.load(Ordering::Acquire));
        assert!(
            until >= Duration::from_secs(70) && until < Duration::from_secs(80),
            "{until:?}"
        );
    }
}
