//! The middleware: [`ApiKeyLayer`], its builder, its service and response future.
//!
//! All shared state (the cache, the store handle, the prepared HMAC state) is built once in
//! [`ApiKeyLayerBuilder::build`] and shared behind one `Arc`, so axum cloning the layer for every
//! route costs one reference count each.
//!
//! ```
//! use std::sync::Arc;
//! use axum::{routing::get, Router};
//! use keywarden::{ApiKeyLayer, Collection, MemoryStore, Principal, SecretRing};
//!
//! let secrets = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
//! let layer = ApiKeyLayer::builder()
//!     .store(Arc::new(MemoryStore::new()))
//!     .secrets(secrets)
//!     .collection(Collection::new("users"))
//!     .build()
//!     .unwrap();
//!
//! let app: Router = Router::new()
//!     .route("/whoami", get(|p: Principal| async move { p.subject().to_owned() }))
//!     .layer(layer);
//! # let _ = app;
//! ```

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use tower_layer::Layer;
use uuid::Uuid;

use crate::clock::Clock;
use crate::key::KeyFormat;
use crate::principal::Principal;
use crate::ratelimit::{ClientAddresses, RateLimitPolicy};
#[cfg(feature = "manage-api")]
use crate::rejection::Quota;
use crate::rejection::{AuthRejection, RateLimitStatus};
use crate::secret::{Digest, SecretRing};
use crate::store::{ForeignScheme, ForeignSource, KeyStore, StoreError};
use crate::verify::{ForeignCollection, Verifier};

mod builder;
mod cost;
mod future;
mod same_body;
mod service;

pub use crate::body::AuthBody;
pub use crate::stats::LayerStats;
pub use builder::{ApiKeyLayerBuilder, BuildError, BuildErrorKind};
#[cfg(feature = "manage-api")]
pub(crate) use cost::refund_credits;
pub use cost::{Cost, CostService};
pub use future::ResponseFuture;
pub use same_body::{SameBodyFuture, SameBodyLayer, SameBodyService};
pub use service::ApiKeyService;

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

/// A collection of keys, named by the slug clients send in
/// `Authorization: <slug> API-Key <key>` (Payload CMS's form).
#[derive(Debug, Clone)]
pub struct Collection {
    slug: String,
    opaque: bool,
    foreign: Option<ForeignCollection>,
    owner_rate_limit: Option<RateLimitPolicy>,
}

impl PartialEq for Collection {
    fn eq(&self, other: &Self) -> bool {
        self.slug == other.slug
            && self.opaque == other.opaque
            && self.owner_rate_limit == other.owner_rate_limit
            && match (&self.foreign, &other.foreign) {
                (None, None) => true,
                (Some(a), Some(b)) => {
                    a.scheme.issuer() == b.scheme.issuer() && Arc::ptr_eq(&a.source, &b.source)
                }
                _ => false,
            }
    }
}

impl Eq for Collection {}

impl Collection {
    /// A collection of keywarden-format keys.
    pub fn new(slug: impl Into<String>) -> Self {
        Self {
            slug: slug.into(),
            opaque: false,
            foreign: None,
            owner_rate_limit: None,
        }
    }

    /// A collection that also accepts keys of a foreign format (Payload UUIDs, imported
    /// keys): 1 to 512 visible ASCII characters, no checksum.
    pub fn opaque(slug: impl Into<String>) -> Self {
        Self {
            slug: slug.into(),
            opaque: true,
            foreign: None,
            owner_rate_limit: None,
        }
    }

    /// A collection of keys issued by another system, verified with that system's digest
    /// `scheme` against a read-only `source` over its tables (feature `interop`:
    /// `keywarden::interop::{PayloadScheme, PayloadStore, StrapiScheme, StrapiStore}`; or your
    /// own [`ForeignScheme`] and [`ForeignSource`]). Its keys are opaque strings; its
    /// principals' uses are never written back.
    ///
    /// For a Payload collection the `<slug> API-Key <key>` form is matched as Payload does:
    /// byte-exactly, `API-Key` case-sensitive, one space each side, the rest of the value the
    /// key ([`ForeignScheme::exact_api_key_form`]). In optional mode, `Bearer` tokens of
    /// Strapi's shape are claimed for a Strapi collection instead of being left to another
    /// layer ([`ForeignScheme::claims_bearer`]).
    pub fn foreign(
        slug: impl Into<String>,
        scheme: impl ForeignScheme,
        source: Arc<dyn ForeignSource>,
    ) -> Self {
        let slug = slug.into();
        Self {
            foreign: Some(ForeignCollection {
                slug: slug.as_str().into(),
                scheme: Arc::new(scheme),
                source,
            }),
            slug,
            opaque: true,
            owner_rate_limit: None,
        }
    }

    /// One rate limit per owner: all the keys of one subject in this collection share this
    /// budget, on top of each key's own limit (or the layer's default). Without it, an owner
    /// with ten keys has ten budgets. The budget lives in the layer's limiter, so with
    /// `RateLimiter::redis` (feature `redis`) it holds across instances.
    ///
    /// A request spends the key's budget first, then the owner's: one refused by its key's
    /// own limit spends nothing of the owner's, and one refused by the owner's limit gets its
    /// key's back (so a client retrying while its owner is over budget does not drain its own
    /// key). (A key with no limit of its own, or a looser one, can still use up the
    /// whole owner budget.) The `RateLimit-*` headers report whichever budget has less left.
    /// An owner is a subject within this collection, whatever its owner kind.
    ///
    /// ```
    /// use keywarden::{ratelimit::RateLimitPolicy, Collection};
    ///
    /// let customers = Collection::new("customers")
    ///     .owner_rate_limit("1000/min".parse::<RateLimitPolicy>().unwrap());
    /// # let _ = customers;
    /// ```
    #[must_use]
    pub fn owner_rate_limit(mut self, policy: RateLimitPolicy) -> Self {
        self.owner_rate_limit = Some(policy);
        self
    }

    /// The slug.
    pub fn slug(&self) -> &str {
        &self.slug
    }
}

/// The API-key authentication layer. Clones share one cache and one store handle.
#[derive(Clone)]
pub struct ApiKeyLayer {
    pub(crate) verifier: Arc<Verifier>,
    mode: Mode,
}

impl ApiKeyLayer {
    /// This layer in optional mode: requests without a credential pass with no principal.
    /// It shares this layer's state (cache, store, limits, invalidations), so an app can put
    /// the optional and the required form on different routes without a second cache that
    /// would miss the other's invalidations.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use keywarden::{ApiKeyLayer, MemoryStore, SecretRing};
    /// use axum::{routing::get, Router};
    /// # let layer = ApiKeyLayer::builder().store(Arc::new(MemoryStore::new()))
    /// #     .secrets(SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap())
    /// #     .build().unwrap();
    /// let api = Router::new()
    ///     .route("/api/items", get(|| async { "items" }))
    ///     .layer(layer.clone());
    /// // The dashboard also takes sessions: a key is optional there.
    /// let dashboard = Router::new()
    ///     .route("/dashboard", get(|| async { "hi" }))
    ///     .layer(layer.optional());
    /// let app: Router = api.merge(dashboard);
    /// # let _ = app;
    /// ```
    #[must_use]
    pub fn optional(&self) -> Self {
        Self {
            verifier: self.verifier.clone(),
            mode: Mode::Optional,
        }
    }

    /// This layer with responses in the inner service's own body type (a rejection's body is
    /// built with `From<Bytes>`), sharing its state: see [`SameBodyLayer`]. For axum:
    /// `.layer(layer)`'s responses carry [`AuthBody`], which axum boxes into its own `Body`
    /// once per response; `.layer(layer.same_body())` answers the same in axum's `Body`, so
    /// nothing is boxed (a small saving; `.layer(layer)` is always correct).
    #[must_use]
    pub fn same_body(&self) -> SameBodyLayer {
        SameBodyLayer::new(self.clone())
    }

    /// This layer in required mode (no credential → 401), sharing its state; see
    /// [`optional`](Self::optional).
    #[must_use]
    pub fn required(&self) -> Self {
        Self {
            verifier: self.verifier.clone(),
            mode: Mode::Required,
        }
    }

    /// Whether requests without a credential are rejected or passed through.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Starts a builder.
    pub fn builder() -> ApiKeyLayerBuilder {
        ApiKeyLayerBuilder::default()
    }

    /// Verifies a key outside HTTP (a WebSocket handshake message, a queue consumer) with the
    /// same checks as the request path: format, digest, cache and store, collection,
    /// revocation, expiry, the identity mapping's verdict
    /// ([`try_map_identity`](ApiKeyLayerBuilder::try_map_identity)), the key's rate limit and
    /// its credits (a call counts as one use, and spends one credit: a key with none left gets
    /// `usage_exceeded`). `method` decides the read-only check.
    ///
    /// # Errors
    /// The [`AuthRejection`] the request path would have produced.
    pub async fn verify(
        &self,
        key: &str,
        method: &http::Method,
    ) -> Result<Principal, AuthRejection> {
        self.verifier.verify_key(key, method).await
    }

    /// Checks a key for a request made elsewhere (a verification API, a gateway's
    /// forward-auth call) through exactly the request path: format, digest, cache (found and
    /// not-found entries, coalesced misses) and store, the key's checks for `method`
    /// (read-only keys only on safe methods), its rate limit (a call counts as one use, which
    /// is recorded), and failed-attempt limiting by `client` when the layer has it on (a
    /// rejected key counts against `client`; an address over its budget is `rate_limited`).
    ///
    /// Unlike [`verify`](Self::verify) it also returns the rate-limit status, for the
    /// `RateLimit-*` headers.
    ///
    /// # Errors
    /// The [`AuthRejection`] the request path would have produced.
    pub async fn check(
        &self,
        key: &str,
        method: &http::Method,
        client: Option<IpAddr>,
    ) -> Result<(Principal, Option<RateLimitStatus>), AuthRejection> {
        self.verifier
            .check_key(key, method, ClientAddresses::same(client), 1, &[])
            .await
            .map(|(principal, quota)| (principal, quota.rate))
    }

    /// [`check`](Self::check) for a credential in request headers, found as the layer finds
    /// it (`Authorization: Bearer`, `<collection> API-Key`, `X-Api-Key` and the configured
    /// extra headers; never the query string), always in required mode: no credential is
    /// `missing_credentials`.
    ///
    /// # Errors
    /// The [`AuthRejection`] the request path would have produced.
    pub async fn check_headers(
        &self,
        headers: &http::HeaderMap,
        method: &http::Method,
        client: Option<IpAddr>,
    ) -> Result<(Principal, Option<RateLimitStatus>), AuthRejection> {
        self.verifier
            .check(headers, method, ClientAddresses::same(client), 1, &[])
            .await
            .map(|(principal, quota)| (principal, quota.rate))
    }

    /// [`check_headers`](Self::check_headers) with separate addresses for failed-attempt
    /// limiting and for the key's IP allowlist.
    #[cfg(feature = "manage-api")]
    pub(crate) async fn check_headers_from(
        &self,
        headers: &http::HeaderMap,
        method: &http::Method,
        client: ClientAddresses,
        cost: u64,
    ) -> Result<(Principal, Quota), AuthRejection> {
        self.verifier
            .check(headers, method, client, cost, &[])
            .await
    }

    /// [`check`](Self::check) with separate addresses for failed-attempt limiting and for the
    /// key's IP allowlist.
    #[cfg(feature = "manage-api")]
    pub(crate) async fn check_from(
        &self,
        key: &str,
        method: &http::Method,
        client: ClientAddresses,
        cost: u64,
        scopes: &[String],
    ) -> Result<(Principal, Quota), AuthRejection> {
        self.verifier
            .check_key(key, method, client, cost, scopes)
            .await
    }

    /// Drops every cached digest of this key, on this instance, now.
    pub fn invalidate_key(&self, id: Uuid) {
        self.verifier.resolver.cache.invalidate_key(id);
    }

    /// Drops one cached digest (for example a cached not-found entry for a new key).
    pub async fn invalidate_digest(&self, digest: &Digest) {
        self.verifier.resolver.cache.invalidate_digest(digest).await;
    }

    /// Writes pending `last_used_at` and use counts to the store now. Call it at shutdown;
    /// otherwise a background task does it every flush interval.
    ///
    /// # Errors
    /// The store's error; the uses stay pending and are retried by the next flush.
    pub async fn flush_usage(&self) -> Result<(), StoreError> {
        match &self.verifier.admission.usage {
            Some(usage) => usage.flush().await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Gives every credit this layer holds leased back to the store now. Call it at shutdown
    /// (with [`flush_usage`](Self::flush_usage)) so other instances can spend them; otherwise
    /// a lease goes back after sitting idle, and a key's lease when the key leaves the cache.
    /// Keys lease again on their next request. Failures are logged: those credits are lost
    /// (the key then accepts fewer requests, never more).
    pub async fn return_credits(&self) {
        self.verifier.admission.credits.return_all().await;
    }

    /// Drops the whole cache.
    pub fn invalidate_all(&self) {
        self.verifier.resolver.cache.invalidate_all();
    }

    /// Drops the cached "not found" answers: a key was created elsewhere, and a digest cached
    /// as unknown may now be its.
    pub fn invalidate_not_found(&self) {
        self.verifier.resolver.cache.invalidate_missing();
    }

    /// Counters of store trouble, rate limiting, blocked clients and invalidations.
    pub fn stats(&self) -> LayerStats {
        let mut stats = self.verifier.counters.snapshot();
        stats.rate_limiters = self.verifier.admission.limiters.local_len() as u64;
        stats.blind_since = self.verifier.resolver.cache.blind_since();
        stats
    }

    /// Starts (`Some(last heard)`) or ends (`None`) bounded blindness: while it lasts, cached
    /// entries read more than `max_blind` ago are not served but re-read.
    pub(crate) fn set_blind(
        &self,
        since: Option<std::time::SystemTime>,
        max_blind: std::time::Duration,
        enforce: bool,
    ) {
        self.verifier
            .resolver
            .cache
            .set_blind(since, max_blind, enforce);
    }

    pub(crate) fn counters(&self) -> &crate::stats::Counters {
        &self.verifier.counters
    }

    /// Approximate number of cached entries (found and not-found).
    pub async fn cached_entries(&self) -> u64 {
        self.verifier.resolver.cache.run_pending_tasks().await;
        self.verifier.resolver.cache.entry_count()
    }

    /// The store this layer reads.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.verifier.resolver.store
    }

    /// The secret ring this layer digests with.
    pub fn secrets(&self) -> &SecretRing {
        &self.verifier.credentials.ring
    }

    /// The accepted key format.
    pub fn key_format(&self) -> &KeyFormat {
        &self.verifier.credentials.format
    }

    /// The clock expiry is judged against.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.verifier.admission.clock.clone()
    }

    /// Where the layer reads client addresses (for IP allowlists and failed-attempt
    /// limiting).
    #[cfg(feature = "manage-api")]
    pub(crate) fn client_address_source(&self) -> &crate::ratelimit::ClientAddressSource {
        &self.verifier.admission.client_source
    }

    /// The rate limit of keys that have none of their own (`None`: unlimited).
    pub(crate) fn default_rate_limit(&self) -> Option<RateLimitPolicy> {
        self.verifier.admission.limiters.default_policy
    }

    /// The slugs of the configured collections (native and foreign), in the order they were
    /// added. None: keys of any collection are accepted.
    pub(crate) fn collection_slugs(&self) -> impl Iterator<Item = &str> + '_ {
        self.verifier
            .credentials
            .collections
            .iter()
            .map(|c| &*c.slug)
    }

    /// The issuer (`payload`, `strapi`) of a foreign collection; `None` for a native one.
    pub(crate) fn foreign_issuer(&self, collection: &str) -> Option<&'static str> {
        self.verifier
            .resolver
            .foreign(collection)
            .map(|foreign| foreign.scheme.issuer())
    }
}

impl fmt::Debug for ApiKeyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyLayer")
            .field("store", &self.verifier.resolver.store)
            .field("secrets", &self.verifier.credentials.ring)
            .field("mode", &self.mode)
            .field(
                "collections",
                &self
                    .verifier
                    .credentials
                    .collections
                    .iter()
                    .map(|c| &*c.slug)
                    .collect::<Vec<_>>(),
            )
            .field("cache", &self.verifier.resolver.cache)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for ApiKeyLayer {
    type Service = ApiKeyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKeyService::new(inner, self.verifier.clone(), self.mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manage::{KeyManager, NewKey};
    use crate::store::MemoryStore;
    use http::{Request, Response};
    use std::time::Duration;
    use tower::{Service, ServiceExt};

    /// With the cache off every request resolves its own record; its uses must still pend as
    /// one entry per key, not one per request (found in review).
    #[tokio::test]
    async fn uncached_uses_pend_once_per_key() {
        let store = Arc::new(MemoryStore::new());
        let layer = ApiKeyLayer::builder()
            .store(store.clone())
            .secrets(
                SecretRing::from_strs("layer-unit-test-secret-0123456789abcdef", None).unwrap(),
            )
            .cache_capacity(0)
            .usage_flush_interval(Some(Duration::from_secs(3600)))
            .build()
            .unwrap();
        let created = KeyManager::for_layer(&layer)
            .create(NewKey::new("k", "s"))
            .await
            .unwrap();
        let mut service = layer.layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(()))
        }));
        for _ in 0..1000 {
            let req = Request::builder()
                .header("x-api-key", created.key.expose())
                .body(())
                .unwrap();
            let res = service.ready().await.unwrap().call(req).await.unwrap();
            assert_eq!(res.status(), 200);
        }
        let usage = layer.verifier.admission.usage.as_ref().expect("usage on");
        assert_eq!(usage.queued(), (0, 1));
        layer.flush_usage().await.unwrap();
        let stored = store.get(created.record.id).await.unwrap().unwrap();
        assert_eq!(stored.use_count, 1000);
    }
}
