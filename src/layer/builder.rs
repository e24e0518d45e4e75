//! [`ApiKeyLayerBuilder`]: configuration, validated once in [`build`](ApiKeyLayerBuilder::build).

use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use super::{ApiKeyLayer, Collection, Mode};
use crate::cache::{CacheConfig, Identity, IdentityValue, KeyCache};
use crate::clock::{Clock, SystemClock};
use crate::credential::CredentialExtractor;
use crate::credits::{CreditLedger, LeaseConfig};
use crate::key::KeyFormat;
use crate::principal::{Interner, Principal, MAX_INTERNED_PROFILES};
use crate::ratelimit::{
    ClientAddressSource, FailedAttemptLimit, FailureTracker, Limiters, RateLimitPolicy, RateLimiter,
};
use crate::rejection::AuthRejection;
use crate::secret::{Secret, SecretRing};
use crate::stats::Counters;
use crate::store::{KeyStore, NoStore, StoreObserver};
use crate::usage::UsageRecorder;
use crate::verify::{
    Admission, CollectionConfig, CredentialCheck, ForeignCollection, IdentityMapper,
    MappedIdentity, Resolver, StoreHealth, Verifier,
};

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
    /// The layer and its failed-attempt limit name different client address sources.
    ConflictingClientAddress,
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
    /// No clock was set: the system clock's readings may be shared (see `UsageRecorder`).
    system_clock: bool,
    identity: Option<IdentityMapper>,
    usage_interval: Option<Duration>,
    store_timeout: Duration,
    store_retry: Duration,
    limiter: RateLimiter,
    default_rate_limit: Option<RateLimitPolicy>,
    failed_attempts: Option<FailedAttemptLimit>,
    client_address: Option<ClientAddressSource>,
    credit_leases: LeaseConfig,
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
            system_clock: true,
            identity: None,
            usage_interval: Some(DEFAULT_USAGE_INTERVAL),
            store_timeout: Duration::from_secs(2),
            store_retry: Duration::from_secs(1),
            limiter: RateLimiter::local(),
            default_rate_limit: None,
            failed_attempts: None,
            client_address: None,
            credit_leases: LeaseConfig::default(),
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

    /// The most keys the cache holds (default 100,000), and, separately, the most unknown
    /// digests it remembers (as not found, for the negative TTL). Past it, keys not used
    /// since the cache last made room go first; a key in use is kept, and no flood of
    /// made-up keys can push it out (they only fill the unknown-digest side, whose admission
    /// favours digests seen often). `0` turns the cache off: every
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

    /// How keys with [credits](crate::store::Credits) lease them from the store: at most
    /// `max_block` credits per lease (default 100; fewer when the balance is low: an eighth
    /// of what is left, at least what the request costs), given back after `idle` without a
    /// request (default 10 s) so other instances can spend them. A bigger block means fewer
    /// store round trips (about 1,000 ÷ `max_block` per 1,000 requests) but more credits held
    /// by an instance that goes quiet or crashes (a crashed instance's are lost: the key then
    /// accepts fewer requests, never more). Leases are never taken per request on a cached
    /// key; a layer with the cache off leases exactly each request's cost.
    ///
    /// # Panics
    /// If `max_block` is 0.
    pub fn credit_leases(mut self, max_block: u64, idle: Duration) -> Self {
        assert!(
            max_block > 0,
            "a credit lease must hold at least one credit"
        );
        self.credit_leases = LeaseConfig { max_block, idle };
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

    /// Where a request's client address comes from (default: the connection), for keys'
    /// IP allowlists ([`KeyRecord::allowed_ips`](crate::store::KeyRecord::allowed_ips)) and
    /// failed-attempt limiting. Behind a reverse proxy, name it with
    /// [`ClientAddressSource::TrustedProxies`]: a forwarding header (`X-Forwarded-For`) is
    /// then believed only on connections from the proxies. A header believed from anyone
    /// lets every client choose its own address, and so pass any allowlist.
    pub fn client_address(mut self, source: ClientAddressSource) -> Self {
        self.client_address = Some(source);
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
        self.system_clock = false;
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
    /// extensions beside the [`Principal`] so existing handlers and extractors run unchanged
    /// (take it with [`Identity<T>`](crate::Identity), which answers keywarden's 401 when a
    /// request has no principal). The mapping runs once per cache fill, not per request.
    /// For a mapping that can refuse or must look something up, see
    /// [`try_map_identity`](Self::try_map_identity).
    pub fn map_identity<T, F>(mut self, map: F) -> Self
    where
        T: Clone + Send + Sync + 'static,
        F: Fn(&Principal) -> T + Send + Sync + 'static,
    {
        self.identity = Some(Arc::new(move |principal: Principal| {
            let mapped: MappedIdentity = Ok(Arc::new(IdentityValue(map(&principal))));
            Box::pin(std::future::ready(mapped))
        }));
        self
    }

    /// Maps the principal to the application's identity asynchronously, and may refuse it:
    /// look up the tenant, refuse a suspended one. An `Err` is the answer to every request
    /// with that key (build it with the code that fits, e.g.
    /// `AuthRejection::new(RejectionKind::RevokedKey, "the tenant is suspended")`), after the
    /// key's own checks (a revoked key still says `revoked_key`).
    ///
    /// Decide from the principal's subject and collection, never from its metadata: a
    /// `keys:self` key may write its owner's keys' metadata.
    ///
    /// Runs once per cache fill, like a store read, and under the store timeout (a mapping
    /// that does not finish in time answers 503 `store_unavailable`, is not cached, and does
    /// not let a stale entry answer in its place). Its
    /// answer, either way, is cached with the key: a tenant suspended now is refused when the
    /// entry is re-read (`cache_ttl`) or at once after
    /// [`ApiKeyLayer::invalidate_key`](super::ApiKeyLayer::invalidate_key).
    ///
    /// ```
    /// use keywarden::{ApiKeyLayer, AuthRejection, Principal, RejectionKind};
    ///
    /// #[derive(Clone)]
    /// struct Tenant { id: String }
    ///
    /// let builder = ApiKeyLayer::builder().try_map_identity(|principal: Principal| async move {
    ///     if principal.subject() == "suspended-tenant" {
    ///         return Err(AuthRejection::new(RejectionKind::RevokedKey, "the tenant is suspended"));
    ///     }
    ///     Ok(Tenant { id: principal.subject().to_owned() })
    /// });
    /// # let _ = builder;
    /// ```
    pub fn try_map_identity<T, F, Fut>(mut self, map: F) -> Self
    where
        T: Clone + Send + Sync + 'static,
        F: Fn(Principal) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, AuthRejection>> + Send + 'static,
    {
        let map = Arc::new(map);
        self.identity = Some(Arc::new(move |principal: Principal| {
            let future = map(principal);
            Box::pin(async move {
                let mapped: MappedIdentity = future
                    .await
                    .map(|value| Arc::new(IdentityValue(value)) as Arc<dyn Identity>);
                mapped
            })
        }));
        self
    }

    /// Validates the configuration and builds the shared state once. With the `metrics`
    /// feature it also registers the layer's metrics with the `metrics` recorder in effect
    /// now (`keywarden::metrics`): install your exporter before calling it.
    ///
    /// # Errors
    /// A [`BuildError`] naming the first problem found.
    pub fn build(self) -> Result<ApiKeyLayer, BuildError> {
        let all_foreign =
            !self.collections.is_empty() && self.collections.iter().all(|c| c.foreign.is_some());
        let store = match self.store {
            Some(store) => store,
            None if all_foreign => Arc::new(NoStore),
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
                owner_rate_limit: c.owner_rate_limit,
            });
        }
        let mut extractor = CredentialExtractor::new(collections.iter().map(|c| &*c.slug));
        let foreign: Vec<ForeignCollection> = self
            .collections
            .into_iter()
            .filter_map(|c| c.foreign)
            .collect();
        for (index, c) in collections.iter().enumerate() {
            let Some(f) = foreign.iter().find(|f| f.slug == c.slug) else {
                continue;
            };
            if f.scheme.exact_api_key_form() {
                extractor = extractor.exact_api_key_form(index);
            }
        }
        {
            let claims: Vec<_> = foreign.iter().map(|f| f.scheme.clone()).collect();
            if !claims.is_empty() {
                extractor = extractor.claim_bearer(move |token: &[u8]| {
                    claims.iter().any(|scheme| scheme.claims_bearer(token))
                });
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
        // One state serves both modes (`ApiKeyLayer::optional`/`required`): each reads
        // `Bearer` tokens that are not keywarden keys its own way.
        let optional = extractor.clone().ignore_foreign_bearer(self.format.clone());
        let required = extractor.foreign_bearer_as_fallback(self.format.clone());
        let any_opaque = collections.iter().any(|c| c.opaque);
        let collections: Arc<[CollectionConfig]> = collections.into();
        let usage = self
            .usage_interval
            .filter(|_| !store.is_read_only())
            .map(|interval| UsageRecorder::new(store.clone(), interval, self.system_clock));
        if let Some(usage) = &usage {
            // The flusher is a named worker started here, on the caller's runtime.
            usage.start();
        }
        let limiters = Limiters::new(self.limiter, self.default_rate_limit, self.clock.clone());
        let limit_source = self
            .failed_attempts
            .as_ref()
            .and_then(|limit| limit.address.clone());
        let client_source = match (self.client_address, limit_source) {
            (Some(layer), Some(limit)) if layer != limit => {
                return Err(BuildError::new(
                    BuildErrorKind::ConflictingClientAddress,
                    "the layer's client_address and its failed-attempt limit's client_address differ: set one",
                ))
            }
            (Some(source), _) | (None, Some(source)) => source,
            (None, None) => ClientAddressSource::Connection,
        };
        let failures = self.failed_attempts.map(|mut limit| {
            limit.address = Some(client_source.clone());
            FailureTracker::new(limit, self.clock.clone())
        });
        // Registers the metrics handles (feature `metrics`) with the recorder in effect now.
        let counters = Arc::new(Counters::new(collections.iter().map(|c| &*c.slug)));
        let cache = KeyCache::new(self.cache);
        let credits = CreditLedger::new(
            store.clone(),
            self.clock.clone(),
            self.credit_leases,
            cache.enabled(),
            self.store_timeout,
        );
        let current_secret = ring.current_id();
        let verifier = Arc::new(Verifier {
            admission: Admission {
                collections: collections.clone(),
                clock: self.clock,
                limiters,
                failures,
                client_source,
                warned_unknown_address: AtomicBool::new(false),
                usage,
                cached: cache.enabled(),
                credits: credits.clone(),
                counters: counters.clone(),
            },
            resolver: Resolver {
                store,
                cache,
                health: StoreHealth::new(self.store_retry),
                store_timeout: self.store_timeout,
                foreign,
                identity: self.identity,
                collections: collections.clone(),
                current_secret,
                counters: counters.clone(),
                profiles: Interner::new(MAX_INTERNED_PROFILES),
                credits,
            },
            credentials: CredentialCheck {
                required,
                optional,
                format: self.format,
                ring,
                collections,
                any_opaque,
                strip: self.strip,
            },
            counters,
        });
        // Changes made through the store, by anyone in this process, reach this layer's cache.
        let observer: Arc<dyn StoreObserver> = verifier.clone();
        verifier.resolver.store.observe(Arc::downgrade(&observer));
        Ok(ApiKeyLayer {
            verifier,
            mode: self.mode,
        })
    }
}
