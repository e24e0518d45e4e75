//! Admission: what happens after a key is resolved. The key is checked against the request
//! (collection, revocation, expiry, client address, read-only), its rate limit is taken,
//! failures count against the client address, and an accepted request gets the principal and
//! is counted for usage.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{HeaderMap, Method};
use uuid::Uuid;

use crate::cache::ResolvedKey;
use crate::clock::{Clock, MonoNanos};
use crate::credits::CreditLedger;
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
    /// The credits of keys with credits.
    pub(crate) credits: Arc<CreditLedger>,
    pub(crate) counters: Arc<Counters>,
}

/// In the extensions of an accepted request whose key has credits: what the key layer charged
/// it, for an inner [`Cost`](crate::Cost) layer to charge more or give some back.
#[derive(Clone)]
pub(crate) struct Charged {
    pub(crate) resolved: Arc<ResolvedKey>,
    pub(crate) ledger: Arc<CreditLedger>,
    pub(crate) cost: u64,
}

impl Charged {
    /// Gives back everything the request was charged (it was refused after all).
    pub(crate) fn refund(&self) {
        self.refund_part(self.cost);
    }

    /// Gives back `amount` of what the request was charged.
    pub(crate) fn refund_part(&self, amount: u64) {
        let (key, owner) = self.resolved.accounts();
        self.ledger.refund_both(key, owner, amount);
    }

    /// The credits this instance knows are left to the key (the fewer of its own and its
    /// owner's).
    pub(crate) fn known_left(&self) -> Option<u64> {
        let (key, owner) = self.resolved.accounts();
        self.ledger.known_left_both(key, owner)
    }

    /// Charges `extra` more without waiting: the credits left, or `None` when the store must
    /// be asked ([`Charged::charge_more`]).
    pub(crate) fn spend_more_now(&self, extra: u64) -> Option<u64> {
        let (key, owner) = self.resolved.accounts();
        self.ledger.spend_now_both(key, owner, extra)
    }

    /// Charges `extra` more, leasing if needed.
    pub(crate) async fn charge_more(
        &self,
        extra: u64,
        unavailable: impl Fn() -> AuthRejection,
    ) -> Result<Option<u64>, AuthRejection> {
        let (key, owner) = self.resolved.accounts();
        self.ledger
            .charge_both(key, owner, extra, unavailable)
            .await
    }
}

/// A key's credits on the hit path.
pub(crate) enum ChargeNow {
    /// The key has no credits.
    Unlimited,
    /// Spent `cost`: `left` are left.
    Spent { left: u64, cost: u64 },
    /// The instance holds too few: the store must be asked for `cost` credits.
    Pending(u64),
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
        debug_assert_eq!(
            resolved.checks,
            crate::cache::KeyChecks::of(&resolved.principal),
            "the checks are the principal's"
        );
        let configured = resolved.collection().map(|index| index as usize);
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
        if resolved.checks.allowlist {
            self.check_address(resolved, client())?;
        }
        if resolved.checks.read_only && !method.is_safe() {
            return Err(AuthRejection::new(
                RejectionKind::InsufficientScope,
                "the key is read-only; only GET, HEAD, OPTIONS and TRACE are allowed",
            ));
        }
        if let Some(Err(rejection)) = resolved.identity() {
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
        if resolved.checks.rate_limit {
            resolved.principal.rate_limit()
        } else {
            self.limiters.default_policy
        }
    }

    /// The budget all the keys of this key's owner share, if any: the limiter bucket and the
    /// policy, as computed when the key was cached (the owner's stored rate limit, else its
    /// collection's).
    fn owner_budget(&self, resolved: &ResolvedKey) -> Option<(Uuid, RateLimitPolicy)> {
        resolved.owner()?.rate_limit
    }

    /// Takes one request from the key's budget, then from its owner's; a request the owner's
    /// budget refuses gets its key's back, so a client retrying while its owner is over budget
    /// does not drain its own key. `Ok(None)`: no policy applies. `unavailable` answers a
    /// remote limiter that cannot be reached.
    pub(crate) async fn rate_limit(
        &self,
        resolved: &ResolvedKey,
        unavailable: impl Fn() -> AuthRejection,
    ) -> Result<Option<RateLimitStatus>, AuthRejection> {
        if !self.limiters.is_remote() {
            return self.rate_limit_local(resolved);
        }
        let key_id = resolved.principal.key_id();
        let key_policy = self.policy(resolved);
        let key = match &key_policy {
            Some(policy) => Some(
                self.limiters
                    .check(key_id, policy)
                    .await
                    .map_err(|_| unavailable())?,
            ),
            None => None,
        };
        if key.as_ref().is_some_and(|decision| !decision.allowed) {
            return self.limit_decision(key, None);
        }
        let owner = match self.owner_budget(resolved) {
            Some((bucket, policy)) => {
                let decision = self.limiters.check(bucket, &policy).await;
                if !decision.as_ref().is_ok_and(|d| d.allowed) {
                    if let Some(policy) = &key_policy {
                        self.limiters.refund(key_id, policy).await;
                    }
                }
                Some(decision.map_err(|_| unavailable())?)
            }
            None => None,
        };
        self.limit_decision(key, owner)
    }

    /// Gives back the rate-limit budget [`Admission::rate_limit`] took (the key's and its
    /// owner's) from a request refused after it, for lack of credits: a key out of credits
    /// that keeps retrying must not spend its owner's shared rate limit.
    pub(crate) async fn refund_rate_limits(&self, resolved: &ResolvedKey) {
        let key_id = resolved.principal.key_id();
        if let Some(policy) = self.policy(resolved) {
            self.limiters.refund(key_id, &policy).await;
        }
        if let Some((bucket, policy)) = self.owner_budget(resolved) {
            self.limiters.refund(bucket, &policy).await;
        }
    }

    /// [`Admission::rate_limit`] for a layer whose limiter is in memory: synchronous.
    /// Inlined for its first test: a key under no budget (neither its own, the layer's
    /// default, nor its owner's) returns at once.
    #[inline]
    pub(crate) fn rate_limit_local(
        &self,
        resolved: &ResolvedKey,
    ) -> Result<Option<RateLimitStatus>, AuthRejection> {
        if !resolved.checks.rate_limit
            && self.limiters.default_policy.is_none()
            && resolved.owner().is_none()
        {
            // The same answer the budgets would give: neither has a policy.
            debug_assert!(self.policy(resolved).is_none() && self.owner_budget(resolved).is_none());
            return Ok(None);
        }
        self.rate_limit_budgets(resolved)
    }

    fn rate_limit_budgets(
        &self,
        resolved: &ResolvedKey,
    ) -> Result<Option<RateLimitStatus>, AuthRejection> {
        let key_id = resolved.principal.key_id();
        let key_policy = self.policy(resolved);
        let key = key_policy
            .as_ref()
            .map(|policy| self.limiters.check_local(key_id, policy));
        if key.as_ref().is_some_and(|decision| !decision.allowed) {
            return self.limit_decision(key, None);
        }
        let owner = self.owner_budget(resolved).map(|(bucket, policy)| {
            let decision = self.limiters.check_local(bucket, &policy);
            if !decision.allowed {
                if let Some(policy) = &key_policy {
                    self.limiters.refund_local(key_id, policy);
                }
            }
            decision
        });
        self.limit_decision(key, owner)
    }

    /// The verdict of the key's decision and its owner's (either may be absent): refused if
    /// either refused, else allowed with the status of whichever has less left. Counted once.
    fn limit_decision(
        &self,
        key: Option<Decision>,
        owner: Option<Decision>,
    ) -> Result<Option<RateLimitStatus>, AuthRejection> {
        let (decision, owners) = match (key, owner) {
            (None, None) => return Ok(None),
            (Some(key), None) => (key, false),
            (None, Some(owner)) => (owner, true),
            (Some(key), Some(owner)) => {
                if !owner.allowed || owner.status.remaining < key.status.remaining {
                    (owner, true)
                } else {
                    (key, false)
                }
            }
        };
        self.counters.rate_limit(decision.allowed);
        if decision.allowed {
            return Ok(Some(decision.status));
        }
        let rejection = AuthRejection::rate_limited(decision.status, decision.retry_after);
        Err(if owners {
            rejection.with_detail("too many requests for this key's owner")
        } else {
            rejection
        })
    }

    /// Spends the request's credits from what this instance holds, if the key has credits.
    /// `cost` is called only for such a key.
    pub(crate) fn charge_now(
        &self,
        resolved: &ResolvedKey,
        cost: impl FnOnce() -> u64,
    ) -> ChargeNow {
        let (key, owner) = resolved.accounts();
        if key.is_none() && owner.is_none() {
            return ChargeNow::Unlimited;
        }
        let cost = cost();
        if cost == 0 {
            // Free: nothing to lease; what this instance knows is left.
            return ChargeNow::Spent {
                left: self.credits.known_left_both(key, owner).unwrap_or(0),
                cost,
            };
        }
        match self.credits.spend_now_both(key, owner, cost) {
            Some(left) => ChargeNow::Spent { left, cost },
            None => ChargeNow::Pending(cost),
        }
    }

    /// Spends `cost` credits of the key, leasing from the store if this instance holds too
    /// few: the credits left (`None`: the key has none), or `usage_exceeded`.
    pub(crate) async fn charge(
        &self,
        resolved: &ResolvedKey,
        cost: u64,
        unavailable: impl Fn() -> AuthRejection,
    ) -> Result<Option<u64>, AuthRejection> {
        let (key, owner) = resolved.accounts();
        if key.is_none() && owner.is_none() {
            return Ok(None);
        }
        if cost == 0 {
            return Ok(self.credits.known_left_both(key, owner));
        }
        self.credits
            .charge_both(key, owner, cost, unavailable)
            .await
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

    /// Notes a successful use at `at`, written behind in batches. With the system clock the
    /// time comes from `at` (the hit path's one reading); another clock is read, and only
    /// when usage is recorded.
    pub(crate) fn record_use(&self, resolved: &Arc<ResolvedKey>, at: MonoNanos) {
        if let Some(usage) = &self.usage {
            if resolved.tracks_usage {
                let now = match usage.wall() {
                    Some(wall) => wall.unix_nanos(at),
                    None => self.clock.now_unix_nanos(),
                };
                if self.cached {
                    usage.record(resolved, now);
                } else {
                    usage.record_uncached(resolved.principal.key_id(), now);
                }
            }
        }
    }
}
