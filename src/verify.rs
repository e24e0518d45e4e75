//! The verification pipeline shared by every clone of the layer and service.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::AUTHORIZATION;
use http::{HeaderMap, Method, Request};

use crate::cache::{Hit, Identity, KeyCache, Lookup, Resolved, StaleEntry};
use crate::clock::Clock;
use crate::credential::{CredentialError, CredentialExtractor, CredentialSource, HeaderSources};
use crate::interop::{ForeignSources, MissKeys};
use crate::key::{validate_opaque, KeyError, KeyFormat};
use crate::principal::Principal;
use crate::ratelimit::{Blocked, Decision, FailureTracker, Limiters, RateLimitPolicy};
use crate::rejection::{AuthRejection, RateLimitStatus, RejectionKind};
use crate::secret::{Digest, SecretId, SecretRing};
use crate::stats::{bump, Counters};
use crate::store::{KeyRecord, KeyStore, StoreError, StoreErrorKind};
use crate::usage::UsageRecorder;

/// Whether requests without a credential are rejected or passed through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// No credential → 401 `missing_credentials`.
    #[default]
    Required,
    /// No credential → the request passes with no principal; a `Bearer` token without a
    /// keywarden prefix is left to another authentication layer. A credential that is ours but
    /// invalid is still rejected.
    Optional,
}

pub(crate) type IdentityMapper = Arc<dyn Fn(&Principal) -> Arc<dyn Identity> + Send + Sync>;

pub(crate) struct CollectionConfig {
    pub(crate) slug: Box<str>,
    pub(crate) opaque: bool,
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) ring: SecretRing,
    pub(crate) format: KeyFormat,
    pub(crate) extractor: CredentialExtractor,
    pub(crate) collections: Vec<CollectionConfig>,
    pub(crate) any_opaque: bool,
    pub(crate) mode: Mode,
    pub(crate) strip: bool,
    pub(crate) cache: KeyCache,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) identity: Option<IdentityMapper>,
    pub(crate) usage: Option<Arc<UsageRecorder>>,
    pub(crate) limiters: Limiters,
    pub(crate) failures: Option<FailureTracker>,
    pub(crate) store_timeout: Duration,
    pub(crate) health: StoreHealth,
    pub(crate) counters: Counters,
    /// Collections verified by a foreign scheme against a read-only store.
    pub(crate) foreign: ForeignSources,
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

/// The synchronous first half of a request: what to do before any I/O.
pub(crate) enum Prepared {
    Reject(AuthRejection),
    Anonymous,
    Lookup(Lookup1),
}

/// A well-formed credential, digested. Owns no request data.
pub(crate) struct Lookup1 {
    pub(crate) digest: Digest,
    pub(crate) binding: Option<usize>,
    /// Accepted as a foreign (opaque) format: only opaque collections may own it.
    pub(crate) opaque: bool,
    pub(crate) from_authorization: bool,
    /// Which configured API-key headers carried it.
    pub(crate) headers: HeaderSources,
}

impl Shared {
    /// Extracts, format-checks and digests the credential. No allocation, no I/O.
    pub(crate) fn prepare(&self, headers: &HeaderMap, query: Option<&str>) -> Prepared {
        let credential = match self.extractor.extract(headers, query) {
            Ok(Some(credential)) => credential,
            Ok(None) => return Prepared::Anonymous,
            Err(error) => return Prepared::Reject(credential_rejection(error)),
        };
        let key = credential.key();
        let binding = match credential.source() {
            CredentialSource::Collection(index) => Some(index),
            _ => None,
        };
        let mut opaque = false;
        if let Err(error) = self.format.parse(key) {
            // A key with our prefix is ours to judge: a bad one is malformed, never "opaque".
            let opaque_allowed = !self.format.claims(key)
                && match binding {
                    Some(index) => self.collections[index].opaque,
                    None => self.any_opaque,
                };
            if !opaque_allowed || validate_opaque(key).is_err() {
                return Prepared::Reject(AuthRejection::new(
                    RejectionKind::MalformedKey,
                    key_error_detail(error),
                ));
            }
            opaque = true;
        }
        Prepared::Lookup(Lookup1 {
            digest: self.ring.digest(key),
            binding,
            opaque,
            from_authorization: credential.from_authorization(),
            headers: credential.header_sources(),
        })
    }

    /// Digests of the key under previous secrets and foreign schemes, for a cache miss.
    /// Re-extracts the key from the request rather than copying it on the hit path.
    pub(crate) fn previous_digests(&self, headers: &HeaderMap, query: Option<&str>) -> MissKeys {
        if !self.ring.has_previous() && self.foreign.is_empty() {
            return MissKeys::default();
        }
        match self.extractor.extract(headers, query) {
            Ok(Some(credential)) => MissKeys::new(self, credential.key()),
            _ => MissKeys::default(),
        }
    }

    /// The hit path: a fresh cached answer, synchronously, or `None` when the store must be
    /// asked (a miss, or a stale entry): then [`Shared::resolve`]. `blocked` as there.
    pub(crate) fn resolve_cached(
        &self,
        digest: &Digest,
        blocked: Option<&Blocked>,
    ) -> Option<Result<Arc<Resolved>, AuthRejection>> {
        let hit = self.cache.lookup(digest);
        match (hit, blocked) {
            (hit, Some(blocked)) => Some(self.past_block(hit, blocked)),
            (Some(Hit::Fresh(lookup)), None) => Some(found(lookup)),
            (_, None) => None,
        }
    }

    /// The answer for a client address over its failure budget: only a key cached as valid,
    /// and fresh, gets past it; anything that would need the store is refused.
    fn past_block(
        &self,
        hit: Option<Hit>,
        blocked: &Blocked,
    ) -> Result<Arc<Resolved>, AuthRejection> {
        match hit {
            Some(Hit::Fresh(Lookup::Found(resolved))) => Ok(resolved),
            _ => Err(self.blocked_rejection(blocked)),
        }
    }

    /// Resolves a digest: from the cache when it can, else from the store (concurrent misses
    /// of one digest share one query). `blocked` is set for a client address over its failure
    /// budget that may still use cached keys: anything needing the store is refused.
    pub(crate) async fn resolve(
        &self,
        digest: Digest,
        headers: &HeaderMap,
        query: Option<&str>,
        blocked: Option<&Blocked>,
    ) -> Result<Arc<Resolved>, AuthRejection> {
        let hit = match self.cache.lookup(&digest) {
            Some(hit) => Some(hit),
            None => self.cache.recover(&digest).await,
        };
        if let Some(blocked) = blocked {
            return self.past_block(hit, blocked);
        }
        match hit {
            Some(Hit::Fresh(lookup)) => found(lookup),
            Some(Hit::Stale(stale)) => self.refresh_stale(digest, stale, headers, query).await,
            None => {
                let previous = self.previous_digests(headers, query);
                self.resolve_miss(digest, previous).await
            }
        }
    }

    /// A found entry past its TTL: one request re-reads it; while the store is down, or
    /// another request is re-reading it, the stale entry answers.
    async fn refresh_stale(
        &self,
        digest: Digest,
        stale: StaleEntry,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Arc<Resolved>, AuthRejection> {
        if let Some(_claim) = (!self.health.is_down())
            .then(|| stale.claim_refresh())
            .flatten()
        {
            let previous = self.previous_digests(headers, query);
            let refreshed = self
                .cache
                .refresh(digest, self.load(digest, &previous))
                .await;
            if let Ok(lookup) = refreshed {
                return found(lookup);
            }
        }
        if self.health.is_down() {
            bump(&self.counters.stale_served);
            tracing::debug!(target: "keywarden", "key store unreachable: answering from a stale cache entry");
        }
        found(stale.lookup())
    }

    /// A cache miss: one store query, shared by concurrent misses of the same digest.
    pub(crate) async fn resolve_miss(
        &self,
        digest: Digest,
        previous: MissKeys,
    ) -> Result<Arc<Resolved>, AuthRejection> {
        if self.health.is_down() {
            return Err(self.unavailable());
        }
        let lookup = self
            .cache
            .get_or_load(digest, || self.load(digest, &previous))
            .await
            .map_err(|_| self.unavailable())?;
        found(lookup)
    }

    /// A 503 `store_unavailable`, counted.
    pub(crate) fn unavailable(&self) -> AuthRejection {
        bump(&self.counters.unavailable);
        AuthRejection::new(
            RejectionKind::StoreUnavailable,
            "the key store is unavailable; retry shortly",
        )
        .with_retry_after(self.health.retry)
    }

    /// A 429 for a client address over its failure budget, counted.
    pub(crate) fn blocked_rejection(&self, blocked: &Blocked) -> AuthRejection {
        bump(&self.counters.clients_blocked);
        AuthRejection::rate_limited(blocked.status, blocked.retry_after)
            .with_detail("too many rejected keys from this address; retry later")
    }

    /// One store call under the store timeout, with the outcome recorded in the store's
    /// health, the counters and tracing.
    pub(crate) async fn store_call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let error = match tokio::time::timeout(self.store_timeout, call).await {
            Ok(Ok(value)) => {
                if self.health.mark_up() {
                    tracing::info!(target: "keywarden", "key store is reachable again");
                }
                return Ok(value);
            }
            Ok(Err(error)) => {
                bump(&self.counters.store_errors);
                error
            }
            Err(_) => {
                bump(&self.counters.store_timeouts);
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

    async fn load(&self, digest: Digest, keys: &MissKeys) -> Result<Lookup, StoreError> {
        if let Some(record) = self.find_native(&digest).await? {
            return Ok(Lookup::Found(self.resolved(&record)));
        }
        for &(secret_id, old) in &keys.previous {
            let Some(record) = self.find_native(&old).await? else {
                continue;
            };
            self.add_current_digest(&record, secret_id, &old, &digest)
                .await;
            return Ok(Lookup::Found(self.resolved(&record)));
        }
        self.load_foreign(keys).await
    }

    /// A record of keywarden's own store by one of its digests. A collection has one source:
    /// native rows filed under a foreign collection are ignored, whichever secret found them.
    async fn find_native(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self
            .store_call(self.store.find_by_digest(digest))
            .await?
            .filter(|r| !self.foreign.owns(&r.collection)))
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
        let current_id = self.ring.current_id();
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

    /// The rate-limit policy that applies to a key: its own, else the layer default.
    pub(crate) fn policy(&self, resolved: &Resolved) -> Option<RateLimitPolicy> {
        resolved
            .principal
            .rate_limit()
            .or(self.limiters.default_policy)
    }

    /// Takes one request from the key's budget. `Ok(None)`: no policy applies.
    pub(crate) async fn rate_limit(
        &self,
        resolved: &Resolved,
    ) -> Result<Option<RateLimitStatus>, AuthRejection> {
        if !self.limiters.is_remote() {
            return self.rate_limit_local(resolved);
        }
        let Some(policy) = self.policy(resolved) else {
            return Ok(None);
        };
        let decision = self
            .limiters
            .check(resolved.principal.key_id(), &policy)
            .await
            .map_err(|_| self.unavailable())?;
        self.limit_decision(decision)
    }

    /// [`Shared::rate_limit`] for a layer whose limiter is in memory: synchronous.
    pub(crate) fn rate_limit_local(
        &self,
        resolved: &Resolved,
    ) -> Result<Option<RateLimitStatus>, AuthRejection> {
        let Some(policy) = self.policy(resolved) else {
            return Ok(None);
        };
        let decision = self
            .limiters
            .check_local(resolved.principal.key_id(), &policy);
        self.limit_decision(decision)
    }

    fn limit_decision(&self, decision: Decision) -> Result<Option<RateLimitStatus>, AuthRejection> {
        if decision.allowed {
            return Ok(Some(decision.status));
        }
        bump(&self.counters.rate_limited);
        Err(AuthRejection::rate_limited(
            decision.status,
            decision.retry_after,
        ))
    }

    /// The client address, when failed-attempt limiting is on.
    pub(crate) fn client_address(
        &self,
        headers: &HeaderMap,
        extensions: &http::Extensions,
    ) -> Option<IpAddr> {
        self.failures
            .as_ref()
            .and_then(|failures| failures.address(headers, extensions))
    }

    /// Whether this address is over its failure budget.
    pub(crate) fn blocked(&self, client: Option<IpAddr>) -> Option<Blocked> {
        let (failures, ip) = (self.failures.as_ref()?, client?);
        failures.check(ip)
    }

    /// Counts a rejection against the client address if it is a rejected key.
    pub(crate) fn note_failure(&self, client: Option<IpAddr>, kind: RejectionKind) {
        let (Some(failures), Some(ip)) = (self.failures.as_ref(), client) else {
            return;
        };
        if matches!(
            kind,
            RejectionKind::MalformedKey
                | RejectionKind::InvalidKey
                | RejectionKind::ExpiredKey
                | RejectionKind::RevokedKey
        ) {
            failures.record_failure(ip);
        }
    }

    /// What the request path needs about a key: built once per cache fill, so that a hit
    /// compares no strings.
    pub(crate) fn resolved(&self, record: &KeyRecord) -> Arc<Resolved> {
        // A key of a foreign collection never holds a management scope.
        let foreign = self.foreign.owns(&record.collection);
        let mut resolved = Resolved::new(record, foreign, |principal| {
            self.identity.as_ref().map(|map| map(principal))
        });
        resolved.collection = self
            .collections
            .iter()
            .position(|c| *c.slug == *record.collection)
            .and_then(|index| u32::try_from(index).ok());
        // A foreign store is never written to.
        resolved.tracks_usage = !foreign;
        Arc::new(resolved)
    }

    /// Checks a resolved key against the request. The collection is checked first so a key of
    /// another collection is indistinguishable from an unknown one. The clock is read only for
    /// a key that expires.
    pub(crate) fn check(
        &self,
        resolved: &Resolved,
        lookup: &Lookup1,
        method: &Method,
        clock: &dyn Clock,
    ) -> Result<(), AuthRejection> {
        let configured = resolved.collection.map(|index| index as usize);
        let collection_ok = match lookup.binding {
            Some(index) => configured == Some(index),
            None => self.collections.is_empty() || configured.is_some(),
        } && (!lookup.opaque
            || configured.is_some_and(|i| self.collections[i].opaque));
        if !collection_ok {
            return Err(AuthRejection::new(
                RejectionKind::InvalidKey,
                "the key is not recognised",
            ));
        }
        if resolved.revoked {
            return Err(AuthRejection::new(
                RejectionKind::RevokedKey,
                "the key has been revoked",
            ));
        }
        if resolved.disabled {
            return Err(AuthRejection::new(
                RejectionKind::RevokedKey,
                "the key is disabled",
            ));
        }
        if resolved
            .principal
            .expires_at()
            .is_some_and(|at| at <= clock.now())
        {
            return Err(AuthRejection::new(
                RejectionKind::ExpiredKey,
                "the key has expired",
            ));
        }
        if resolved.principal.is_read_only() && !method.is_safe() {
            return Err(AuthRejection::new(
                RejectionKind::InsufficientScope,
                "the key is read-only; only GET, HEAD, OPTIONS and TRACE are allowed",
            ));
        }
        Ok(())
    }

    /// Lets an accepted request through: notes the use, protects the credential headers and
    /// puts the principal (and the application's identity) into the request extensions.
    pub(crate) fn admit<B>(
        &self,
        req: &mut Request<B>,
        resolved: &Arc<Resolved>,
        lookup: &Lookup1,
    ) {
        tracing::trace!(
            target: "keywarden",
            key_id = %resolved.principal.key_id(),
            "request authenticated"
        );
        self.record_use(resolved);
        self.protect_headers(req.headers_mut(), lookup);
        let extensions = req.extensions_mut();
        if let Some(identity) = &resolved.identity {
            identity.insert_into(extensions);
        }
        extensions.insert(resolved.principal.clone());
    }

    /// Notes a successful use, written behind in batches. Reads the clock only when usage
    /// is recorded.
    fn record_use(&self, resolved: &Arc<Resolved>) {
        if let Some(usage) = &self.usage {
            if resolved.tracks_usage {
                let now = self.clock.now_unix_nanos();
                if self.cache.enabled() {
                    usage.record(resolved, now);
                } else {
                    usage.record_uncached(resolved.principal.key_id(), now);
                }
            }
        }
    }

    /// Marks the credential headers sensitive, and strips them if configured. Only the headers
    /// that carried the credential are touched: a configured API-key header that is present
    /// always carried it (extraction fails otherwise), so this is every credential header.
    pub(crate) fn protect_headers(&self, headers: &mut HeaderMap, lookup: &Lookup1) {
        let names = self.extractor.header_names();
        let names = match lookup.headers {
            HeaderSources::None => &[][..],
            HeaderSources::One(index) => &names[index..=index],
            HeaderSources::Several => names,
        };
        if self.strip {
            if lookup.from_authorization {
                headers.remove(AUTHORIZATION);
            }
            for name in names {
                headers.remove(name);
            }
            return;
        }
        if lookup.from_authorization {
            if let Some(value) = headers.get_mut(AUTHORIZATION) {
                value.set_sensitive(true);
            }
        }
        for name in names {
            if let Some(value) = headers.get_mut(name) {
                value.set_sensitive(true);
            }
        }
    }
}

fn found(lookup: Lookup) -> Result<Arc<Resolved>, AuthRejection> {
    match lookup {
        Lookup::Found(resolved) => Ok(resolved),
        Lookup::Missing => Err(not_recognised()),
    }
}

fn not_recognised() -> AuthRejection {
    AuthRejection::new(RejectionKind::InvalidKey, "the key is not recognised")
}

fn credential_rejection(error: CredentialError) -> AuthRejection {
    match error {
        CredentialError::Ambiguous => AuthRejection::new(
            RejectionKind::AmbiguousCredentials,
            "send exactly one API key, in one header",
        ),
        CredentialError::UnknownCollection => AuthRejection::new(
            RejectionKind::InvalidKey,
            "the Authorization header names an unknown collection",
        ),
        CredentialError::Malformed(detail) => {
            AuthRejection::new(RejectionKind::MalformedKey, detail)
        }
    }
}

fn key_error_detail(error: KeyError) -> &'static str {
    match error {
        KeyError::WrongPrefix => "the key does not have a recognised prefix",
        KeyError::WrongLength => "the key has the wrong length",
        KeyError::BadAlphabet => "the key contains an invalid character",
        KeyError::BadChecksum => "the key's checksum does not match (typo or truncated key?)",
        KeyError::InvalidPrefix => "the key is malformed",
    }
}
