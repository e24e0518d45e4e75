//! Verification, in three named steps shared by every front end (the layer's service and
//! [`ApiKeyLayer::verify`](crate::ApiKeyLayer::verify)):
//!
//! 1. [`CredentialCheck`] (credential preparation): extract, format-check and digest the key;
//!    synchronous, no allocation.
//! 2. [`Resolver`] (resolution): cache, store (one query per miss), store health, lazy
//!    re-digest, foreign collections.
//! 3. [`Admission`]: the key against the request, rate limits, failed-attempt limiting,
//!    usage; then [`Verifier::admit_or_reject`] ends the hit and the miss paths alike.

use std::net::IpAddr;
use std::sync::Arc;

use http::{Method, Request};

use crate::cache::ResolvedKey;
use crate::credential::X_API_KEY;
use crate::principal::Principal;
use crate::rejection::{AuthRejection, RateLimitStatus, RejectionKind};
use crate::stats::Counters;
use crate::store::{StoreChange, StoreObserver};

mod admit;
mod prepare;
mod resolve;

pub(crate) use admit::Admission;
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

/// A resolved key that passed its checks, with its rate-limit status; or why not.
pub(crate) type Outcome = Result<(Arc<ResolvedKey>, Option<RateLimitStatus>), AuthRejection>;

/// Every layer hears of its store's changes in this process, so layers over one store never
/// disagree about a changed key (see [`KeyStore::observe`](crate::store::KeyStore::observe)).
impl StoreObserver for Verifier {
    fn changed(&self, change: StoreChange) {
        let cache = &self.resolver.cache;
        match change {
            StoreChange::Key(id) => cache.invalidate_key(id),
            StoreChange::Created => cache.invalidate_missing(),
            _ => cache.invalidate_all(),
        }
    }
}

impl Verifier {
    /// The hit path's outcome, when it can be decided without waiting: a fresh cache entry
    /// (or a blocked client address) and an in-memory limiter. `None`: the request must wait
    /// for the store or a remote limiter ([`Verifier::outcome`]).
    pub(crate) fn outcome_now(
        &self,
        key: &PresentedKey,
        method: &Method,
        blocked: Option<&crate::ratelimit::Blocked>,
    ) -> Option<Outcome> {
        if self.admission.limiters.is_remote() {
            return None;
        }
        let resolved = self.resolver.resolve_cached(&key.digest, blocked)?;
        Some(resolved.and_then(|resolved| {
            self.admission.check(&resolved, key, method)?;
            let status = self.admission.rate_limit_local(&resolved)?;
            Ok((resolved, status))
        }))
    }

    /// The outcome of a request that may wait: resolution through the store, the checks,
    /// then the (maybe remote) rate limit.
    pub(crate) async fn outcome(
        &self,
        key: &PresentedKey,
        headers: &http::HeaderMap,
        query: Option<&str>,
        method: &Method,
        optional: bool,
        blocked: Option<&crate::ratelimit::Blocked>,
    ) -> Outcome {
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
            .await?;
        self.admission.check(&resolved, key, method)?;
        let status = self
            .admission
            .rate_limit(&resolved, || self.resolver.unavailable())
            .await?;
        Ok((resolved, status))
    }

    /// The one ending of the hit and the miss paths: an accepted request is admitted (its use
    /// noted, its credential headers protected, the principal and the application's identity
    /// put into its extensions); a rejected one counts against its client address.
    pub(crate) fn admit_or_reject<B>(
        &self,
        req: &mut Request<B>,
        key: &PresentedKey,
        client: Option<IpAddr>,
        outcome: Outcome,
    ) -> Result<Option<RateLimitStatus>, AuthRejection> {
        let (resolved, status) = match outcome {
            Ok(accepted) => accepted,
            Err(rejection) => {
                self.admission.note_failure(client, rejection.kind());
                return Err(rejection);
            }
        };
        tracing::trace!(
            target: "keywarden",
            key_id = %resolved.principal.key_id(),
            "request authenticated"
        );
        self.admission.record_use(&resolved);
        self.credentials.protect_headers(req.headers_mut(), key);
        let extensions = req.extensions_mut();
        if let Some(Ok(identity)) = &resolved.identity {
            identity.insert_into(extensions);
        }
        extensions.insert(resolved.principal.clone());
        Ok(status)
    }

    /// The request path for a credential that arrives without a request to admit (a
    /// verification API, forward auth): the layer's own extraction from `headers` (required
    /// mode, no query parameter), the client's failure budget, the hit path or resolution,
    /// the checks for `method`, the rate limit; then what [`Verifier::admit_or_reject`] does
    /// besides touching a request: the use is noted, a rejected key counts against `client`.
    pub(crate) async fn check(
        &self,
        headers: &http::HeaderMap,
        method: &Method,
        client: Option<IpAddr>,
    ) -> Result<(Principal, Option<RateLimitStatus>), AuthRejection> {
        let (resolved, status) = self.decide(headers, method, client).await?;
        self.admission.record_use(&resolved);
        Ok((resolved.principal.clone(), status))
    }

    /// [`Verifier::check`] for a key given as text: read as an `X-Api-Key` header would be.
    pub(crate) async fn check_key(
        &self,
        key: &str,
        method: &Method,
        client: Option<IpAddr>,
    ) -> Result<(Principal, Option<RateLimitStatus>), AuthRejection> {
        self.check(&key_headers(key)?, method, client).await
    }

    /// Verifies a key given outside HTTP, with the request path's checks; its use is not
    /// recorded.
    pub(crate) async fn verify_key(
        &self,
        key: &str,
        method: &Method,
    ) -> Result<Principal, AuthRejection> {
        let (resolved, _) = self.decide(&key_headers(key)?, method, None).await?;
        Ok(resolved.principal.clone())
    }

    /// What [`Verifier::check`] decides, before the use is noted: extraction, the client's
    /// failure budget, the hit path or resolution, the checks and the rate limit; a rejected
    /// key counts against `client`.
    async fn decide(
        &self,
        headers: &http::HeaderMap,
        method: &Method,
        client: Option<IpAddr>,
    ) -> Outcome {
        let blocked = self.admission.blocked(client);
        let key = match self.credentials.prepare(headers, None, false) {
            Presented::Key(key) => key,
            Presented::Nothing => {
                return Err(AuthRejection::new(
                    RejectionKind::MissingCredentials,
                    "send an API key in the Authorization or X-Api-Key header",
                ))
            }
            Presented::Reject(rejection) => {
                if let Some(blocked) = &blocked {
                    return Err(self.resolver.blocked_rejection(blocked));
                }
                self.admission.note_failure(client, rejection.kind());
                return Err(rejection);
            }
        };
        if let Some(blocked) = blocked.as_ref().filter(|b| !b.allow_cached) {
            return Err(self.resolver.blocked_rejection(blocked));
        }
        let outcome = match self.outcome_now(&key, method, blocked.as_ref()) {
            Some(outcome) => outcome,
            None => {
                self.outcome(&key, headers, None, method, false, blocked.as_ref())
                    .await
            }
        };
        if let Err(rejection) = &outcome {
            self.admission.note_failure(client, rejection.kind());
        }
        outcome
    }
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
