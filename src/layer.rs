//! [`ApiKeyLayer`] and its builder.
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
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower_layer::Layer;
use uuid::Uuid;

use crate::cache::{CacheConfig, Identity, IdentityValue, KeyCache};
use crate::clock::{Clock, SystemClock};
use crate::credential::CredentialExtractor;
use crate::interop::{DigestScheme, ForeignSource, ForeignSources, NoNativeStore};
use crate::invalidation::Invalidation;
use crate::key::KeyFormat;
use crate::principal::Principal;
use crate::ratelimit::{
    FailedAttemptLimit, FailureTracker, Limiters, RateLimitPolicy, RateLimiter,
};
use crate::rejection::AuthRejection;
use crate::secret::{Digest, Secret, SecretRing};
use crate::service::ApiKeyService;
use crate::stats::{Counters, LayerStats};
use crate::store::{KeyStore, StoreError};
use crate::usage::UsageRecorder;
use crate::verify::{CollectionConfig, IdentityMapper, Mode, Prepared, Shared, StoreHealth};

/// A collection of keys, named by the slug clients send in
/// `Authorization: <slug> API-Key <key>` (Payload CMS's form).
#[derive(Debug, Clone)]
pub struct Collection {
    slug: String,
    opaque: bool,
    foreign: Option<ForeignSource>,
}

impl PartialEq for Collection {
    fn eq(&self, other: &Self) -> bool {
        self.slug == other.slug
            && self.opaque == other.opaque
            && match (&self.foreign, &other.foreign) {
                (None, None) => true,
                (Some(a), Some(b)) => {
                    a.scheme.issuer() == b.scheme.issuer() && Arc::ptr_eq(&a.store, &b.store)
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
        }
    }

    /// A collection that also accepts keys of a foreign format (Payload UUIDs, imported
    /// keys): 1 to 512 visible ASCII characters, no checksum.
    pub fn opaque(slug: impl Into<String>) -> Self {
        Self {
            slug: slug.into(),
            opaque: true,
            foreign: None,
        }
    }

    /// A collection of keys issued by another system (Payload CMS, Strapi), verified with
    /// that system's digest scheme against a read-only `store` over its tables (see
    /// `PayloadStore` and `StrapiStore`, feature `interop`). Its keys
    /// are opaque strings; its principals' uses are never written back.
    ///
    /// For a Payload collection the `<slug> API-Key <key>` form is matched as Payload does:
    /// byte-exactly, `API-Key` case-sensitive, one space each side, the rest of the value the
    /// key. In optional mode, `Bearer` tokens of Strapi's shape are claimed for a Strapi
    /// collection instead of being left to another layer.
    pub fn foreign(
        slug: impl Into<String>,
        scheme: impl Into<DigestScheme>,
        store: Arc<dyn KeyStore>,
    ) -> Self {
        let slug = slug.into();
        Self {
            foreign: Some(ForeignSource {
                slug: slug.as_str().into(),
                scheme: scheme.into(),
                store,
            }),
            slug,
            opaque: true,
        }
    }

    /// The slug.
    pub fn slug(&self) -> &str {
        &self.slug
    }
}

/// What [`ApiKeyLayerBuilder::build`] found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildErrorKind {
    /// No store was given.
    MissingStore,
    /// No secret ring was given.
    MissingSecrets,
    /// A collection slug is empty, or holds whitespace, control or non-ASCII characters.
    InvalidCollection,
    /// Two collections share a slug.
    DuplicateCollection,
    /// An API-key header name is not a valid header name.
    InvalidHeaderName,
    /// The query parameter name is empty or holds `&`, `=` or whitespace.
    InvalidQueryParam,
}

/// The layer could not be built.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid keywarden layer configuration: {message}")]
pub struct BuildError {
    kind: BuildErrorKind,
    message: String,
}

impl BuildError {
    fn new(kind: BuildErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// What was wrong.
    pub fn kind(&self) -> BuildErrorKind {
        self.kind
    }
}

/// Builds an [`ApiKeyLayer`]. Only [`store`](Self::store) and [`secrets`](Self::secrets) are
/// required.
#[must_use]
pub struct ApiKeyLayerBuilder {
    store: Option<Arc<dyn KeyStore>>,
    secrets: Option<SecretRing>,
    format: KeyFormat,
    collections: Vec<Collection>,
    headers: Vec<String>,
    query_param: Option<String>,
    mode: Mode,
    strip: bool,
    cache: CacheConfig,
    clock: Arc<dyn Clock>,
    identity: Option<IdentityMapper>,
    usage_interval: Option<Duration>,
    store_timeout: Duration,
    store_retry: Duration,
    limiter: RateLimiter,
    default_rate_limit: Option<RateLimitPolicy>,
    failed_attempts: Option<FailedAttemptLimit>,
}

impl Default for ApiKeyLayerBuilder {
    fn default() -> Self {
        Self {
            store: None,
            secrets: None,
            format: KeyFormat::default(),
            collections: Vec::new(),
            headers: Vec::new(),
            query_param: None,
            mode: Mode::Required,
            strip: false,
            cache: CacheConfig::default(),
            clock: Arc::new(SystemClock),
            identity: None,
            usage_interval: Some(DEFAULT_USAGE_INTERVAL),
            store_timeout: Duration::from_secs(2),
            store_retry: Duration::from_secs(1),
            limiter: RateLimiter::local(),
            default_rate_limit: None,
            failed_attempts: None,
        }
    }
}

/// How often recorded uses are flushed to the store by default.
const DEFAULT_USAGE_INTERVAL: Duration = Duration::from_secs(10);

impl fmt::Debug for ApiKeyLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyLayerBuilder")
            .field("store", &self.store)
            .field("secrets", &self.secrets)
            .field("collections", &self.collections)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ApiKeyLayerBuilder {
    /// Where keys are looked up. Optional when every collection is
    /// [`foreign`](Collection::foreign).
    pub fn store(mut self, store: Arc<dyn KeyStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The application secret ring. Optional when every collection is
    /// [`foreign`](Collection::foreign): the cache is then keyed with a random per-process
    /// secret.
    pub fn secrets(mut self, secrets: SecretRing) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// Accepted key prefixes (default `kw_live`, `kw_test`).
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// Adds a collection. With no collections, keys of any collection are accepted through
    /// `Bearer` and `X-Api-Key`, and the `<slug> API-Key` form is always `invalid_key`. With
    /// collections, only keys of a configured collection are accepted, and the slug form
    /// accepts only keys of the named collection.
    pub fn collection(mut self, collection: Collection) -> Self {
        self.collections.push(collection);
        self
    }

    /// Also reads keys from this header (`X-Api-Key` is always read).
    pub fn header(mut self, name: impl Into<String>) -> Self {
        self.headers.push(name.into());
        self
    }

    /// Also reads keys from this query parameter. Off by default: URLs end up in logs.
    pub fn query_param(mut self, name: impl Into<String>) -> Self {
        self.query_param = Some(name.into());
        self
    }

    /// Required (default) or optional credentials.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Shorthand for `mode(Mode::Optional)`.
    pub fn optional(self) -> Self {
        self.mode(Mode::Optional)
    }

    /// Removes the credential headers before the inner service sees the request (they are
    /// always marked sensitive).
    pub fn strip_credentials(mut self, strip: bool) -> Self {
        self.strip = strip;
        self
    }

    /// How long a found key stays cached (default 60 s). Revocations through the
    /// [`ApiKeyLayer::invalidate_key`] handle take effect immediately regardless.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache.ttl = ttl;
        self
    }

    /// How long an unknown digest stays cached (default 5 s).
    pub fn negative_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache.negative_ttl = ttl;
        self
    }

    /// The most entries the cache holds (default 100,000). `0` turns the cache off: every
    /// request then queries the store (no coalescing either), which is how Payload and Strapi
    /// work; it exists for comparison benchmarks and is not recommended in production.
    pub fn cache_capacity(mut self, entries: u64) -> Self {
        self.cache.max_capacity = entries;
        self
    }

    /// How long a found key may keep answering from the cache past its TTL while the store
    /// is unreachable (default 5 min; zero turns stale answers off). Keys not in the cache
    /// get 503 `store_unavailable` during an outage either way. Revocations still arrive
    /// through cross-instance invalidation while the store is down.
    pub fn stale_window(mut self, window: Duration) -> Self {
        self.cache.stale = window;
        self
    }

    /// How long one store lookup may take before it counts as a failure (default 2 s).
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// After a store failure, how long misses fail fast with 503 before the store is tried
    /// again; also the `Retry-After` of those 503s (default 1 s).
    pub fn store_retry_after(mut self, retry: Duration) -> Self {
        self.store_retry = retry.max(Duration::from_millis(1));
        self
    }

    /// Where per-key rate limits are counted (default: [`RateLimiter::local`]).
    pub fn rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = limiter;
        self
    }

    /// The rate limit of keys that have none of their own (default: unlimited).
    pub fn default_rate_limit(mut self, policy: RateLimitPolicy) -> Self {
        self.default_rate_limit = Some(policy);
        self
    }

    /// Turns on failed-attempt limiting per client address (off by default).
    pub fn failed_attempt_limit(mut self, limit: FailedAttemptLimit) -> Self {
        self.failed_attempts = Some(limit);
        self
    }

    /// The clock expiry is judged against (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How often `last_used_at` and use counts are written to the store, in one batch
    /// (default 10 s); `None` turns usage tracking off. Uses are never written per request.
    /// Call [`ApiKeyLayer::flush_usage`] at shutdown to write the last ones.
    pub fn usage_flush_interval(mut self, interval: Option<Duration>) -> Self {
        self.usage_interval = interval.filter(|i| !i.is_zero());
        self
    }

    /// Maps the principal to the application's own identity type, inserted into request
    /// extensions beside the [`Principal`] so existing handlers and extractors run unchanged.
    /// The mapping runs once per cache fill, not per request.
    pub fn map_identity<T, F>(mut self, map: F) -> Self
    where
        T: Clone + Send + Sync + 'static,
        F: Fn(&Principal) -> T + Send + Sync + 'static,
    {
        self.identity = Some(Arc::new(move |principal: &Principal| {
            Arc::new(IdentityValue(map(principal))) as Arc<dyn Identity>
        }));
        self
    }

    /// Validates the configuration and builds the shared state once.
    ///
    /// # Errors
    /// A [`BuildError`] naming the first problem found.
    pub fn build(self) -> Result<ApiKeyLayer, BuildError> {
        let all_foreign =
            !self.collections.is_empty() && self.collections.iter().all(|c| c.foreign.is_some());
        let store = match self.store {
            Some(store) => store,
            None if all_foreign => Arc::new(NoNativeStore),
            None => {
                return Err(BuildError::new(
                    BuildErrorKind::MissingStore,
                    "no key store",
                ))
            }
        };
        let ring = match self.secrets {
            Some(ring) => ring,
            // Only cache keys are digested with it; nothing digested is ever stored.
            None if all_foreign => SecretRing::new(Secret::generate()),
            None => {
                return Err(BuildError::new(
                    BuildErrorKind::MissingSecrets,
                    "no secret ring",
                ))
            }
        };
        let mut collections: Vec<CollectionConfig> = Vec::new();
        for c in &self.collections {
            if c.slug.is_empty() || !c.slug.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(BuildError::new(
                    BuildErrorKind::InvalidCollection,
                    "collection slugs must be non-empty visible ASCII",
                ));
            }
            if c.slug.eq_ignore_ascii_case("bearer") {
                // `Authorization: Bearer ...` would always be read as the Bearer scheme.
                return Err(BuildError::new(
                    BuildErrorKind::InvalidCollection,
                    "`bearer` cannot be a collection slug",
                ));
            }
            if collections.iter().any(|existing| *existing.slug == *c.slug) {
                return Err(BuildError::new(
                    BuildErrorKind::DuplicateCollection,
                    format!("collection `{}` is configured twice", c.slug),
                ));
            }
            collections.push(CollectionConfig {
                slug: c.slug.as_str().into(),
                opaque: c.opaque || c.foreign.is_some(),
            });
        }
        let mut extractor = CredentialExtractor::new(collections.iter().map(|c| &*c.slug));
        for (index, c) in self.collections.iter().enumerate() {
            match c.foreign.as_ref().map(|f| &f.scheme) {
                Some(DigestScheme::Payload(_)) => extractor = extractor.exact_api_key_form(index),
                Some(DigestScheme::Strapi(_)) if self.mode == Mode::Optional => {
                    extractor = extractor.claim_bearer(crate::interop::is_strapi_token);
                }
                _ => {}
            }
        }
        for name in &self.headers {
            let name = HeaderName::try_from(name.as_str()).map_err(|_| {
                BuildError::new(
                    BuildErrorKind::InvalidHeaderName,
                    format!("bad header name `{name}`"),
                )
            })?;
            if name == http::header::AUTHORIZATION {
                return Err(BuildError::new(
                    BuildErrorKind::InvalidHeaderName,
                    "`authorization` is always read with its schemes; it cannot be a raw key header",
                ));
            }
            extractor = extractor.header(name);
        }
        if let Some(param) = self.query_param {
            if param.is_empty()
                || param
                    .bytes()
                    .any(|b| b == b'&' || b == b'=' || !b.is_ascii_graphic())
            {
                return Err(BuildError::new(
                    BuildErrorKind::InvalidQueryParam,
                    "bad query parameter name",
                ));
            }
            extractor = extractor.query_param(param);
        }
        if self.mode == Mode::Optional {
            extractor = extractor.ignore_foreign_bearer(self.format.clone());
        }
        let any_opaque = collections.iter().any(|c| c.opaque);
        let usage = self
            .usage_interval
            .filter(|_| !store.is_read_only())
            .map(|interval| UsageRecorder::new(store.clone(), interval));
        let limiters = Limiters::new(self.limiter, self.default_rate_limit, self.clock.clone());
        let failures = self
            .failed_attempts
            .map(|limit| FailureTracker::new(limit, self.clock.clone()));
        let foreign = ForeignSources::new(
            self.collections
                .into_iter()
                .filter_map(|c| c.foreign)
                .collect(),
        );
        Ok(ApiKeyLayer {
            shared: Arc::new(Shared {
                store,
                ring,
                format: self.format,
                extractor,
                collections,
                any_opaque,
                mode: self.mode,
                strip: self.strip,
                cache: KeyCache::new(self.cache),
                clock: self.clock,
                identity: self.identity,
                usage,
                limiters,
                failures,
                store_timeout: self.store_timeout,
                health: StoreHealth::new(self.store_retry),
                counters: Counters::default(),
                foreign,
            }),
        })
    }
}

/// The API-key authentication layer. Clones share one cache and one store handle.
#[derive(Clone)]
pub struct ApiKeyLayer {
    shared: Arc<Shared>,
}

impl ApiKeyLayer {
    /// Starts a builder.
    pub fn builder() -> ApiKeyLayerBuilder {
        ApiKeyLayerBuilder::default()
    }

    /// Verifies a key outside HTTP (a WebSocket handshake message, a queue consumer) with the
    /// same checks as the request path: format, digest, cache and store, collection,
    /// revocation, expiry and the key's rate limit (a call counts as one use). `method`
    /// decides the read-only check.
    ///
    /// # Errors
    /// The [`AuthRejection`] the request path would have produced.
    pub async fn verify(
        &self,
        key: &str,
        method: &http::Method,
    ) -> Result<Principal, AuthRejection> {
        let mut headers = http::HeaderMap::new();
        let value = http::HeaderValue::from_bytes(key.as_bytes()).map_err(|_| {
            AuthRejection::new(
                crate::RejectionKind::MalformedKey,
                "the key contains invalid bytes",
            )
        })?;
        headers.insert(crate::credential::X_API_KEY, value);
        let lookup = match self.shared.prepare(&headers, None) {
            Prepared::Lookup(lookup) => lookup,
            Prepared::Reject(rejection) => return Err(rejection),
            Prepared::Anonymous => {
                return Err(AuthRejection::new(
                    crate::RejectionKind::MissingCredentials,
                    "no key given",
                ))
            }
        };
        let resolved = self
            .shared
            .resolve(lookup.digest, &headers, None, None)
            .await?;
        self.shared
            .check(&resolved, &lookup, method, &*self.shared.clock)?;
        self.shared.rate_limit(&resolved).await?;
        Ok(resolved.principal.clone())
    }

    /// Drops every cached digest of this key, on this instance, now.
    pub fn invalidate_key(&self, id: Uuid) {
        self.shared.cache.invalidate_key(id);
    }

    /// Drops one cached digest (for example a cached not-found entry for a new key).
    pub async fn invalidate_digest(&self, digest: &Digest) {
        self.shared.cache.invalidate_digest(digest).await;
    }

    /// Writes pending `last_used_at` and use counts to the store now. Call it at shutdown;
    /// otherwise a background task does it every flush interval.
    ///
    /// # Errors
    /// The store's error; the uses stay pending and are retried by the next flush.
    pub async fn flush_usage(&self) -> Result<(), StoreError> {
        match &self.shared.usage {
            Some(usage) => usage.flush().await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Drops the whole cache.
    pub fn invalidate_all(&self) {
        self.shared.cache.invalidate_all();
    }

    /// Applies an invalidation received from another instance.
    pub fn apply(&self, invalidation: &Invalidation) {
        match invalidation {
            Invalidation::Key(id) => self.shared.cache.invalidate_key(*id),
            Invalidation::Created => self.shared.cache.invalidate_missing(),
            Invalidation::All => self.shared.cache.invalidate_all(),
        }
    }

    /// Counters of store trouble, rate limiting, blocked clients and invalidations.
    pub fn stats(&self) -> LayerStats {
        let mut stats = self.shared.counters.snapshot();
        stats.rate_limiters = self.shared.limiters.local_len() as u64;
        stats
    }

    #[cfg(any(feature = "postgres", feature = "redis"))]
    pub(crate) fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Approximate number of cached entries (found and not-found).
    pub async fn cached_entries(&self) -> u64 {
        self.shared.cache.run_pending_tasks().await;
        self.shared.cache.entry_count()
    }

    /// The store this layer reads.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.shared.store
    }

    /// The secret ring this layer digests with.
    pub fn secrets(&self) -> &SecretRing {
        &self.shared.ring
    }

    /// The accepted key format.
    pub fn key_format(&self) -> &KeyFormat {
        &self.shared.format
    }

    /// The clock expiry is judged against.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.shared.clock.clone()
    }

    /// The rate limit of keys that have none of their own (`None`: unlimited).
    pub(crate) fn default_rate_limit(&self) -> Option<RateLimitPolicy> {
        self.shared.limiters.default_policy
    }

    /// The slugs of the configured collections (native and foreign), in the order they were
    /// added. None: keys of any collection are accepted.
    pub(crate) fn collection_slugs(&self) -> impl Iterator<Item = &str> + '_ {
        self.shared.collections.iter().map(|c| &*c.slug)
    }

    /// The issuer (`payload`, `strapi`) of a foreign collection; `None` for a native one.
    pub(crate) fn foreign_issuer(&self, collection: &str) -> Option<&'static str> {
        self.shared
            .foreign
            .get(collection)
            .map(|source| source.scheme.issuer())
    }
}

impl fmt::Debug for ApiKeyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyLayer")
            .field("store", &self.shared.store)
            .field("secrets", &self.shared.ring)
            .field("mode", &self.shared.mode)
            .field(
                "collections",
                &self
                    .shared
                    .collections
                    .iter()
                    .map(|c| &*c.slug)
                    .collect::<Vec<_>>(),
            )
            .field("cache", &self.shared.cache)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for ApiKeyLayer {
    type Service = ApiKeyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKeyService::new(inner, self.shared.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manage::{KeyManager, NewKey};
    use crate::store::MemoryStore;
    use http::{Request, Response};
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
        let usage = layer.shared.usage.as_ref().expect("usage on");
        assert_eq!(usage.queued(), (0, 1));
        layer.flush_usage().await.unwrap();
        let stored = store.get(created.record.id).await.unwrap().unwrap();
        assert_eq!(stored.use_count, 1000);
    }
}
