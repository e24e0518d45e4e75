//! Admission: what happens after a key is resolved. The key is checked against the request
//! (collection, revocation, expiry, client address, read-only), its rate limit is taken,
//! failures count against the client address, and an accepted request gets the principal and
//! is counted for usage.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{HeaderMap, Method};

use crate::cache::ResolvedKey;
use crate::clock::Clock;
use crate::ratelimit::{
    Blocked, ClientAddressSource, Decision, FailureTracker, Limiters, RateLimitPolicy,
};
use crate::rejection::{AuthRejection, RateLimitStatus, RejectionKind};
use crate::stats::Counters;
use crate::usage::UsageRecorder;

use super::prepare::{CollectionConfig, PresentedKey};

/// The checks and limits between a resolved key and the inner service.
pub(crate) struct Admission {
    pub(crate) collections: Arc<[CollectionConfig]>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) limiters: Limiters,
    pub(crate) failures: Option<FailureTracker>,
    /// Where client addresses come from (for allowlists, and failed-attempt limiting, whose
    /// tracker holds the same source).
    pub(crate) client_source: ClientAddressSource,
    /// A key with an allowlist met a request without a known address (logged once).
    pub(crate) warned_unknown_address: AtomicBool,
    pub(crate) usage: Option<Arc<UsageRecorder>>,
    /// The layer caches keys (capacity above 0): uses are then counted on the cached entry.
    pub(crate) cached: bool,
    pub(crate) counters: Arc<Counters>,
}

impl Admission {
    /// Checks a resolved key against the request. The collection is checked first so a key of
    /// another collection is indistinguishable from an unknown one. The clock is read only for
    /// a key that expires, and `client` called only for a key with an allowlist.
    pub(crate) fn check(
        &self,
        resolved: &ResolvedKey,
        key: &PresentedKey,
        method: &Method,
        client: impl FnOnce() -> Option<IpAddr>,
    ) -> Result<(), AuthRejection> {
        let configured = resolved.collection.map(|index| index as usize);
        let collection_ok = match key.binding {
            Some(index) => configured == Some(index),
            None => self.collections.is_empty() || configured.is_some(),
        } && (!key.opaque
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
            .is_some_and(|at| at <= self.clock.now())
        {
            return Err(AuthRejection::new(
                RejectionKind::ExpiredKey,
                "the key has expired",
            ));
        }
        if !resolved.principal.allowed_ips().is_empty() {
            self.check_address(resolved, client())?;
        }
        if resolved.principal.is_read_only() && !method.is_safe() {
            return Err(AuthRejection::new(
                RejectionKind::InsufficientScope,
                "the key is read-only; only GET, HEAD, OPTIONS and TRACE are allowed",
            ));
        }
        if let Some(Err(rejection)) = resolved.identity.as_deref() {
            return Err(rejection.clone());
        }
        Ok(())
    }

    /// A key with an allowlist: the client must be inside it; an unknown address never is.
    #[cold]
    fn check_address(
        &self,
        resolved: &ResolvedKey,
        client: Option<IpAddr>,
    ) -> Result<(), AuthRejection> {
        if resolved.principal.allows_address(client) {
            return Ok(());
        }
        if client.is_some() {
            return Err(AuthRejection::new(
                RejectionKind::IpNotAllowed,
                "the key may not be used from this address",
            ));
        }
        if !self.warned_unknown_address.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "keywarden",
                "a key with an IP allowlist was used on a request whose client address is unknown: it is refused (logged once). Behind a proxy: the proxy sent no usable client address header, or none is configured (`keywarden serve --client-address-header`, `ApiKeyLayerBuilder::client_address`). In your own server: serve axum with `into_make_service_with_connect_info::<SocketAddr>()`, or insert a `ClientIp` extension (tonic, hyper)"
            );
        }
        Err(AuthRejection::new(
            RejectionKind::IpNotAllowed,
            "the key may only be used from listed addresses, and this request's address is unknown",
        ))
    }

    /// The client address for a key's allowlist, from the configured source, strictly: never
    /// a proxy's own address in place of its client's
    /// ([`ClientAddressSource::origin_address`]). Failed-attempt limiting may fall back to the
    /// connection's address; an allowlist must not.
    pub(crate) fn allowlist_client(
        &self,
        headers: &HeaderMap,
        extensions: &http::Extensions,
    ) -> Option<IpAddr> {
        self.client_source.origin_address(headers, extensions)
    }

    /// The rate-limit policy that applies to a key: its own, else the layer default.
    pub(crate) fn policy(&self, resolved: &ResolvedKey) -> Option<RateLimitPolicy> {
        resolved
            .principal
            .rate_limit()
            .or(self.limiters.default_policy)
    }

    /// Takes one request from the key's budget. `Ok(None)`: no policy applies. `unavailable`
    /// answers a remote limiter that cannot be reached.
    pub(crate) async fn rate_limit(
        &self,
        resolved: &ResolvedKey,
        unavailable: impl FnOnce() -> AuthRejection,
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
            .map_err(|_| unavailable())?;
        self.limit_decision(decision)
    }

    /// [`Admission::rate_limit`] for a layer whose limiter is in memory: synchronous.
    pub(crate) fn rate_limit_local(
        &self,
        resolved: &ResolvedKey,
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
        self.counters.rate_limit(decision.allowed);
        if decision.allowed {
            return Ok(Some(decision.status));
        }
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

    /// Notes a successful use, written behind in batches. Reads the clock only when usage
    /// is recorded.
    pub(crate) fn record_use(&self, resolved: &Arc<ResolvedKey>) {
        if let Some(usage) = &self.usage {
            if resolved.tracks_usage {
                let now = self.clock.now_unix_nanos();
                if self.cached {
                    usage.record(resolved, now);
                } else {
                    usage.record_uncached(resolved.principal.key_id(), now);
                }
            }
        }
    }
}
