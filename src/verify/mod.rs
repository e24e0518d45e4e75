//! Verification, in three named steps shared by every front end (the layer's service and
//! [`ApiKeyLayer::verify`](crate::ApiKeyLayer::verify)):
//!
//! 1. [`CredentialCheck`] (credential preparation): extract, format-check and digest the key;
//!    synchronous, no allocation.
//! 2. [`Resolver`] (resolution): cache, store (one query per miss), store health, lazy
//!    re-digest, foreign collections.
//! 3. [`Admission`]: the key against the request, rate limits, failed-attempt limiting,
//!    usage; then [`Verifier::admit_or_reject`] ends the hit and the miss paths alike.

use crate::clock::{mono_now, MonoNanos};
use std::net::IpAddr;
use std::sync::Arc;

use http::{Method, Request};
use tracing::field::{display, Empty};
use tracing::{Instrument, Span};
use uuid::Uuid;

use crate::cache::ResolvedKey;
use crate::credential::X_API_KEY;
use crate::principal::Principal;
use crate::ratelimit::{Blocked, ClientAddresses};
use crate::rejection::{AuthRejection, Quota, RejectionKind};
use crate::stats::{ChangeKind, ChangeSource, Counters, Verdict};
use crate::store::{StoreChange, StoreObserver, UsageOutcome, UsageSubject};

mod admit;
mod prepare;
mod resolve;

pub(crate) use admit::{Admission, ChargeNow, Charged};
pub(crate) use prepare::{CollectionConfig, CredentialCheck, Presented, PresentedKey};
pub(crate) use resolve::{
    ForeignCollection, IdentityMapper, MappedIdentity, Resolver, StoreHealth,
};

/// A layer's verification state, built once by the builder and shared by its services.
pub(crate) struct Verifier {
    pub(crate) credentials: CredentialCheck,
    pub(crate) resolver: Resolver,
    pub(crate) admission: Admission,
    pub(crate) counters: Arc<Counters>,
}

/// A resolved key that passed its checks, with its rate-limit status and credits left; or why
/// not.
pub(crate) type Outcome = Result<(Arc<ResolvedKey>, Quota), AuthRejection>;

/// An [`Outcome`] with what metrics and the span report about a rejection: the configured
/// collection it counts under (the one the credential named, else the resolved key's) and
/// the id of a key that was found but refused.
pub(crate) struct Decided {
    pub(crate) outcome: Outcome,
    pub(crate) collection: Option<u32>,
    pub(crate) key_id: Option<Uuid>,
    /// Accepted so far, but the request's credits (this many) must still be leased from the
    /// store: [`Verifier::settle`].
    pub(crate) pending_cost: Option<u64>,
}

impl Decided {
    /// Before any key was resolved: counted under the collection the credential named.
    fn unresolved(key: &PresentedKey, outcome: Outcome) -> Self {
        Self {
            outcome,
            collection: binding(key),
            key_id: None,
            pending_cost: None,
        }
    }

    /// After `resolved` was found: admitted with its rate-limit status and credits, or
    /// refused.
    fn resolved(
        key: &PresentedKey,
        resolved: Arc<ResolvedKey>,
        checked: Result<Quota, AuthRejection>,
    ) -> Self {
        let collection = binding(key).or(resolved.collection());
        let key_id = Some(resolved.principal.key_id());
        Self {
            outcome: checked.map(|quota| (resolved, quota)),
            collection,
            key_id,
            pending_cost: None,
        }
    }
}

/// The collection an `Authorization: <slug> API-Key` credential named.
pub(crate) fn binding(key: &PresentedKey) -> Option<u32> {
    key.binding.and_then(|index| u32::try_from(index).ok())
}

/// The span of one authentication, at `DEBUG`; never carries the key. Below `DEBUG` (a
/// subscriber at `INFO`, or none) it is `Span::none()` after one level check: not even a
/// disabled span, whose enter, exit and drop would still run `tracing`'s `log` fallback when
/// no subscriber is set.
pub(crate) fn auth_span() -> Span {
    if tracing::Level::DEBUG > tracing::level_filters::STATIC_MAX_LEVEL
        || tracing::Level::DEBUG > tracing::level_filters::LevelFilter::current()
    {
        return Span::none();
    }
    tracing::debug_span!(
        target: "keywarden",
        "authenticate",
        collection = Empty,
        key_id = Empty,
        outcome = Empty
    )
}

/// Ends the authentication's span. A span that is [`Span::none`] (the hit path's usual case:
/// no subscriber, or one above `DEBUG`) holds nothing to release or report, and is forgotten
/// rather than dropped: its drop glue is a call of its own on every request.
#[inline(always)]
pub(crate) fn end_span(span: Span) {
    if span.is_none() {
        std::mem::forget(span);
    } else {
        drop(span);
    }
}

/// Every layer hears of its store's changes in this process, so layers over one store never
/// disagree about a changed key (see [`KeyStore::observe`](crate::store::KeyStore::observe)).
impl StoreObserver for Verifier {
    fn changed(&self, change: StoreChange) {
        let cache = &self.resolver.cache;
        let kind = match change {
            StoreChange::Key(id) => {
                cache.invalidate_key(id);
                ChangeKind::Key
            }
            StoreChange::Created => {
                cache.invalidate_missing();
                ChangeKind::Created
            }
            _ => {
                cache.invalidate_all();
                ChangeKind::All
            }
        };
        self.counters.invalidation(ChangeSource::Local, kind);
    }
}

impl Verifier {
    /// The hit path's outcome, when it can be decided without waiting: a fresh cache entry
    /// (or a blocked client address) and an in-memory limiter. `None`: the request must wait
    /// for the store or a remote limiter ([`Verifier::outcome`]).
    /// `cost` (the request's credits) is called only for a key with credits; a key whose
    /// credits this instance must first lease is decided with a
    /// [`pending_cost`](Decided::pending_cost).
    /// `now`: the request's one clock reading on the hit path, for the cache's deadlines and
    /// (in [`Verifier::admit_or_reject`]) the time of use.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn outcome_now(
        &self,
        key: &PresentedKey,
        method: &Method,
        blocked: Option<&crate::ratelimit::Blocked>,
        now: MonoNanos,
        client: impl FnOnce() -> Option<IpAddr>,
        cost: impl FnOnce() -> u64,
    ) -> Option<Decided> {
        if self.admission.limiters.is_remote() {
            return None;
        }
        let resolved = match self.resolver.resolve_cached(&key.digest, blocked, now)? {
            Ok(resolved) => resolved,
            Err(rejection) => return Some(Decided::unresolved(key, Err(rejection))),
        };
        let checked = self
            .admission
            .check(&resolved, key, method, client)
            .and_then(|()| self.admission.rate_limit_local(&resolved));
        let mut pending_cost = None;
        let mut charged = 0;
        let checked = checked.map(|rate| {
            let credits = match self.admission.charge_now(&resolved, cost) {
                ChargeNow::Unlimited => None,
                ChargeNow::Spent { left, cost } => {
                    charged = cost;
                    Some(left)
                }
                ChargeNow::Pending(cost) => {
                    pending_cost = Some(cost);
                    None
                }
            };
            Quota {
                rate,
                credits,
                charged,
            }
        });
        let mut decided = Decided::resolved(key, resolved, checked);
        decided.pending_cost = pending_cost;
        Some(decided)
    }

    /// Finishes a decision whose credits must be leased from the store
    /// ([`Decided::pending_cost`]): charged, or refused with `usage_exceeded` (or
    /// `store_unavailable`).
    pub(crate) async fn settle(&self, mut decided: Decided) -> Decided {
        let Some(cost) = decided.pending_cost.take() else {
            return decided;
        };
        if let Ok((resolved, quota)) = &mut decided.outcome {
            match self
                .admission
                .charge(resolved, cost, || self.resolver.unavailable())
                .await
            {
                Ok(left) => {
                    quota.credits = left;
                    // Nothing was charged to a key whose credits are gone from the store.
                    quota.charged = if left.is_some() { cost } else { 0 };
                }
                Err(rejection) => {
                    if quota.rate.is_some() {
                        self.admission.refund_rate_limits(resolved).await;
                    }
                    decided.outcome = Err(rejection);
                }
            }
        }
        decided
    }

    /// The outcome of a request that may wait: resolution through the store, the checks,
    /// then the (maybe remote) rate limit. `client` is called only for a key with an
    /// allowlist.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn outcome(
        &self,
        key: &PresentedKey,
        headers: &http::HeaderMap,
        query: Option<&str>,
        method: &Method,
        optional: bool,
        blocked: Option<&crate::ratelimit::Blocked>,
        client: impl FnOnce() -> Option<IpAddr>,
        cost: impl FnOnce() -> u64,
    ) -> Decided {
        let resolved = self
            .resolver
            .resolve(
                &self.credentials,
                key.digest,
                headers,
                query,
                optional,
                blocked,
            )
            .await;
        let resolved = match resolved {
            Ok(resolved) => resolved,
            Err(rejection) => return Decided::unresolved(key, Err(rejection)),
        };
        if let Err(rejection) = self.admission.check(&resolved, key, method, client) {
            return Decided::resolved(key, resolved, Err(rejection));
        }
        let rate = match self
            .admission
            .rate_limit(&resolved, || self.resolver.unavailable())
            .await
        {
            Ok(rate) => rate,
            Err(rejection) => return Decided::resolved(key, resolved, Err(rejection)),
        };
        let checked = match resolved.has_credits() {
            false => Ok(Quota {
                rate,
                ..Quota::default()
            }),
            true => {
                let cost = cost();
                let charged = self
                    .admission
                    .charge(&resolved, cost, || self.resolver.unavailable())
                    .await;
                if charged.is_err() && rate.is_some() {
                    self.admission.refund_rate_limits(&resolved).await;
                }
                charged.map(|credits| Quota {
                    rate,
                    credits,
                    charged: if credits.is_some() { cost } else { 0 },
                })
            }
        };
        Decided::resolved(key, resolved, checked)
    }

    /// Counts one authentication and fills in its span.
    pub(crate) fn tally(
        &self,
        span: &Span,
        collection: Option<u32>,
        verdict: Verdict,
        key_id: Option<Uuid>,
    ) {
        self.counters.verdict(collection, verdict);
        if let Verdict::Rejected(kind) = verdict {
            self.count_rejection(collection, kind, key_id);
        }
        if span.is_disabled() {
            return;
        }
        let slug = collection.and_then(|index| self.credentials.collections.get(index as usize));
        if let Some(config) = slug {
            span.record("collection", &*config.slug);
        }
        if let Some(id) = key_id {
            span.record("key_id", display(id));
        }
        span.record("outcome", verdict.label());
    }

    /// Counts a rejection for the usage analytics: against the key once one was resolved,
    /// else against the collection the credential named (`""` for none). A request that
    /// presented no key is not counted.
    fn count_rejection(&self, collection: Option<u32>, kind: RejectionKind, key_id: Option<Uuid>) {
        let Some(usage) = &self.admission.usage else {
            return;
        };
        let outcome = match kind {
            RejectionKind::MissingCredentials => return,
            RejectionKind::RateLimited => UsageOutcome::RateLimited,
            RejectionKind::InsufficientScope => UsageOutcome::InsufficientScope,
            RejectionKind::ExpiredKey => UsageOutcome::Expired,
            RejectionKind::RevokedKey => UsageOutcome::Revoked,
            RejectionKind::InvalidKey => UsageOutcome::Invalid,
            RejectionKind::MalformedKey => UsageOutcome::Malformed,
            RejectionKind::IpNotAllowed => UsageOutcome::IpNotAllowed,
            RejectionKind::UsageExceeded => UsageOutcome::UsageExceeded,
            _ => UsageOutcome::Other,
        };
        // A key presented under another collection is not its owner's use: counted where it
        // was presented, like an unknown key.
        let key_id = key_id.filter(|_| outcome != UsageOutcome::Invalid);
        let subject = match key_id {
            Some(id) => UsageSubject::Key(id),
            None => UsageSubject::Collection(
                collection
                    .and_then(|index| self.credentials.collections.get(index as usize))
                    .map_or_else(String::new, |c| c.slug.to_string()),
            ),
        };
        usage.record_rejection(subject, outcome, self.admission.clock.now());
    }

    /// [`Verifier::tally`] for a rejection decided before any key was resolved.
    pub(crate) fn tally_rejection(
        &self,
        span: &Span,
        collection: Option<u32>,
        rejection: &AuthRejection,
    ) {
        self.tally(span, collection, Verdict::Rejected(rejection.kind()), None);
    }

    /// The one ending of the hit and the miss paths: an accepted request is admitted (its use
    /// noted, its credential headers protected, the principal and the application's identity
    /// put into its extensions); a rejected one counts against its client address. Either
    /// way it is counted and `span` filled in. `now`: when the request was decided (its use
    /// is recorded at that time).
    pub(crate) fn admit_or_reject<B>(
        &self,
        req: &mut Request<B>,
        key: &PresentedKey,
        client: Option<IpAddr>,
        decided: Decided,
        now: MonoNanos,
        span: &Span,
    ) -> Result<Quota, AuthRejection> {
        debug_assert!(decided.pending_cost.is_none(), "settle before admitting");
        let (resolved, status) = match decided.outcome {
            Ok(accepted) => accepted,
            Err(rejection) => {
                let verdict = Verdict::Rejected(rejection.kind());
                self.tally(span, decided.collection, verdict, decided.key_id);
                self.admission.note_failure(client, rejection.kind());
                return Err(rejection);
            }
        };
        self.tally(span, decided.collection, Verdict::Accepted, decided.key_id);
        tracing::trace!(
            target: "keywarden",
            key_id = %resolved.principal.key_id(),
            "request authenticated"
        );
        self.admission.record_use(&resolved, now);
        self.credentials.protect_headers(req.headers_mut(), key);
        let extensions = req.extensions_mut();
        if let Some(Ok(identity)) = resolved.identity() {
            identity.insert_into(extensions);
        }
        extensions.insert(resolved.principal.clone());
        if resolved.has_credits() && status.credits.is_some() {
            extensions.insert(Charged {
                ledger: self.admission.credits.clone(),
                cost: status.charged,
                resolved,
            });
        }
        Ok(status)
    }

    /// The request path for a credential that arrives without a request to admit (a
    /// verification API, forward auth): the layer's own extraction from `headers` (required
    /// mode, no query parameter), the client's failure budget, the hit path or resolution,
    /// the checks for `method`, the rate limit; then what [`Verifier::admit_or_reject`] does
    /// besides touching a request: the use is noted, a rejected key counts against `client`.
    /// `cost`: the credits the request spends, for a key with credits. `scopes`: scopes the
    /// key must hold (`insufficient_scope` naming the first it lacks; its credits are given
    /// back then).
    pub(crate) async fn check(
        &self,
        headers: &http::HeaderMap,
        method: &Method,
        client: ClientAddresses,
        cost: u64,
        scopes: &[String],
    ) -> Result<(Principal, Quota), AuthRejection> {
        let (resolved, quota) = self.decide(headers, method, client, cost).await?;
        if let Some(missing) = scopes.iter().find(|s| !resolved.principal.has_scope(s)) {
            let (key, owner) = resolved.accounts();
            self.admission
                .credits
                .refund_both(key, owner, quota.charged);
            // The scope asked for is the caller's text, not the key: it may be named.
            let detail = format!("the key does not hold the scope `{missing}`");
            return Err(AuthRejection::new(RejectionKind::InsufficientScope, detail));
        }
        self.admission.record_use(&resolved, mono_now());
        Ok((resolved.principal.clone(), quota))
    }

    /// [`Verifier::check`] for a key given as text: read as an `X-Api-Key` header would be.
    pub(crate) async fn check_key(
        &self,
        key: &str,
        method: &Method,
        client: ClientAddresses,
        cost: u64,
        scopes: &[String],
    ) -> Result<(Principal, Quota), AuthRejection> {
        self.check(&key_headers(key)?, method, client, cost, scopes)
            .await
    }

    /// Verifies a key given outside HTTP, with the request path's checks; its use is not
    /// recorded, and spends one credit of a key with credits (like its rate limit).
    pub(crate) async fn verify_key(
        &self,
        key: &str,
        method: &Method,
    ) -> Result<Principal, AuthRejection> {
        let (resolved, _) = self
            .decide(&key_headers(key)?, method, ClientAddresses::default(), 1)
            .await?;
        Ok(resolved.principal.clone())
    }

    /// What [`Verifier::check`] decides, before the use is noted: extraction, the client's
    /// failure budget, the hit path or resolution, the checks and the rate limit; a rejected
    /// key counts against `client`.
    async fn decide(
        &self,
        headers: &http::HeaderMap,
        method: &Method,
        addresses: ClientAddresses,
        cost: u64,
    ) -> Outcome {
        let (client, origin) = (addresses.blamed, addresses.origin);
        let span = auth_span();
        let Started { key, blocked, now } =
            span.in_scope(|| self.decide_now(&span, headers, method, client, origin, cost))?;
        let decided = match now {
            Some(decided) => self.settle(decided).instrument(span.clone()).await,
            None => {
                self.outcome(
                    &key,
                    headers,
                    None,
                    method,
                    false,
                    blocked.as_ref(),
                    || origin,
                    || cost,
                )
                .instrument(span.clone())
                .await
            }
        };
        let _entered = span.enter();
        let verdict = match &decided.outcome {
            Ok(_) => Verdict::Accepted,
            Err(rejection) => {
                self.admission.note_failure(client, rejection.kind());
                Verdict::Rejected(rejection.kind())
            }
        };
        self.tally(&span, decided.collection, verdict, decided.key_id);
        decided.outcome
    }

    /// The synchronous start of [`Verifier::decide`]: extraction, the client's failure budget
    /// and the hit path (`None` when the request must wait). Rejections here are counted.
    fn decide_now(
        &self,
        span: &Span,
        headers: &http::HeaderMap,
        method: &Method,
        client: Option<IpAddr>,
        origin: Option<IpAddr>,
        cost: u64,
    ) -> Result<Started, AuthRejection> {
        let blocked = self.admission.blocked(client);
        let key = match self.credentials.prepare(headers, None, false) {
            Presented::Key(key) => key,
            Presented::Nothing => {
                let rejection = AuthRejection::new(
                    RejectionKind::MissingCredentials,
                    "send an API key in the Authorization or X-Api-Key header",
                );
                self.tally_rejection(span, None, &rejection);
                return Err(rejection);
            }
            Presented::Reject(rejection) => {
                let rejection = match &blocked {
                    Some(blocked) => self.resolver.blocked_rejection(blocked),
                    None => {
                        self.admission.note_failure(client, rejection.kind());
                        rejection
                    }
                };
                self.tally_rejection(span, None, &rejection);
                return Err(rejection);
            }
        };
        if let Some(blocked) = blocked.as_ref().filter(|b| !b.allow_cached) {
            let rejection = self.resolver.blocked_rejection(blocked);
            self.tally_rejection(span, binding(&key), &rejection);
            return Err(rejection);
        }
        let now = self.outcome_now(
            &key,
            method,
            blocked.as_ref(),
            mono_now(),
            || origin,
            || cost,
        );
        Ok(Started { key, blocked, now })
    }
}

/// What [`Verifier::decide_now`] leaves to wait for: the key, its client's block, and the
/// hit path's decision if there was one.
struct Started {
    key: PresentedKey,
    blocked: Option<Blocked>,
    now: Option<Decided>,
}

/// A key given as text, as the `X-Api-Key` header that carries it.
fn key_headers(key: &str) -> Result<http::HeaderMap, AuthRejection> {
    let value = http::HeaderValue::from_bytes(key.as_bytes()).map_err(|_| {
        AuthRejection::new(
            RejectionKind::MalformedKey,
            "the key contains invalid bytes",
        )
    })?;
    let mut headers = http::HeaderMap::new();
    headers.insert(X_API_KEY, value);
    Ok(headers)
}
