//! The `metrics` facade's handles, registered once per layer (feature `metrics`).

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};

use super::{CacheLookup, ChangeKind, ChangeSource, Verdict};
use crate::metrics::{
    CACHE_LOOKUPS, CACHE_STALE_ANSWERS, CLIENTS_BLOCKED, INVALIDATIONS, INVALIDATION_RECONNECTS,
    RATE_LIMIT_DECISIONS, REQUESTS, REVOCATION_BLIND, STORE_ERRORS, STORE_LOOKUP_DURATION,
};
use crate::rejection::RejectionKind;

/// The `source` labels, by [`ChangeSource`] discriminant (every build registers all three, so
/// the series are the same whatever the features).
const SOURCES: [&str; 4] = ["postgres", "redis", "local", "feed"];
/// The invalidation `kind` labels, by [`ChangeKind`] discriminant.
const KINDS: [&str; 3] = ["key", "created", "all"];

/// Every handle a layer records to, each label combination registered up front.
#[derive(Debug)]
pub(super) struct Instruments {
    /// `(collections + 1) × Verdict::COUNT`: row 0 is "no collection", row `i + 1` the
    /// collection at index `i`.
    requests: Box<[Counter]>,
    /// By [`CacheLookup`] in declaration order.
    cache: [Counter; 4],
    stale_answers: Counter,
    store_latency: Histogram,
    store_errors: Counter,
    store_timeouts: Counter,
    allowed: Counter,
    limited: Counter,
    clients_blocked: Counter,
    /// `SOURCES × KINDS`.
    invalidations: [Counter; 12],
    /// Whole-cache flushes by source (postgres, redis, local: never, feed: pruned past).
    reconnects: [Counter; 4],
    /// 1 while the instance is blind (see `LayerStats::blind_since`).
    blind: Gauge,
}

impl Instruments {
    pub(super) fn register<'a>(collections: impl Iterator<Item = &'a str>) -> Self {
        describe();
        let slugs: Vec<&str> = std::iter::once("").chain(collections).collect();
        let requests = slugs
            .iter()
            .flat_map(|slug| {
                Verdict::all().map(move |verdict| {
                    metrics::counter!(REQUESTS, "collection" => slug.to_string(), "outcome" => verdict.label())
                })
            })
            .collect();
        let lookup = |result: &'static str| metrics::counter!(CACHE_LOOKUPS, "result" => result);
        let invalidations = std::array::from_fn(|i| {
            let (source, kind) = (SOURCES[i / KINDS.len()], KINDS[i % KINDS.len()]);
            metrics::counter!(INVALIDATIONS, "source" => source, "kind" => kind)
        });
        Self {
            requests,
            cache: [
                lookup("hit"),
                lookup("negative_hit"),
                lookup("miss"),
                lookup("stale"),
            ],
            stale_answers: metrics::counter!(CACHE_STALE_ANSWERS),
            store_latency: metrics::histogram!(STORE_LOOKUP_DURATION),
            store_errors: metrics::counter!(STORE_ERRORS, "kind" => "error"),
            store_timeouts: metrics::counter!(STORE_ERRORS, "kind" => "timeout"),
            allowed: metrics::counter!(RATE_LIMIT_DECISIONS, "decision" => "allowed"),
            limited: metrics::counter!(RATE_LIMIT_DECISIONS, "decision" => "limited"),
            clients_blocked: metrics::counter!(CLIENTS_BLOCKED),
            invalidations,
            reconnects: SOURCES
                .map(|source| metrics::counter!(INVALIDATION_RECONNECTS, "source" => source)),
            blind: metrics::gauge!(REVOCATION_BLIND),
        }
    }

    #[inline]
    pub(super) fn verdict(&self, collection: Option<u32>, verdict: Verdict) {
        let row = collection.map_or(0, |index| index as usize + 1);
        let column = match verdict {
            Verdict::Accepted => 0,
            Verdict::Anonymous => 1,
            Verdict::Rejected(kind) => 2 + kind_index(kind),
        };
        if let Some(counter) = self.requests.get(row * Verdict::COUNT + column) {
            counter.increment(1);
        }
    }

    #[inline]
    pub(super) fn cache_lookup(&self, result: CacheLookup) {
        self.cache[result as usize].increment(1);
    }

    pub(super) fn stale_served(&self) {
        self.stale_answers.increment(1);
    }

    pub(super) fn store_lookup(&self, elapsed: Duration) {
        self.store_latency.record(elapsed);
    }

    pub(super) fn store_error(&self, timeout: bool) {
        if timeout {
            self.store_timeouts.increment(1);
        } else {
            self.store_errors.increment(1);
        }
    }

    #[inline]
    pub(super) fn rate_limit(&self, allowed: bool) {
        if allowed {
            self.allowed.increment(1);
        } else {
            self.limited.increment(1);
        }
    }

    pub(super) fn client_blocked(&self) {
        self.clients_blocked.increment(1);
    }

    pub(super) fn invalidation(&self, source: ChangeSource, kind: ChangeKind) {
        let index = source as usize * KINDS.len() + kind as usize;
        self.invalidations[index].increment(1);
    }

    pub(super) fn reconnect_flush(&self, source: ChangeSource) {
        if let Some(counter) = self.reconnects.get(source as usize) {
            counter.increment(1);
        }
    }

    pub(super) fn blind(&self, blind: bool) {
        self.blind.set(if blind { 1.0 } else { 0.0 });
    }
}

/// The column of a rejection code in [`RejectionKind::ALL`]'s order.
fn kind_index(kind: RejectionKind) -> usize {
    RejectionKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(0)
}

/// HELP texts and units, for exporters that print them.
fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        "Authentications decided by the API-key layer, by collection and outcome"
    );
    metrics::describe_counter!(
        CACHE_LOOKUPS,
        "Key cache lookups on the request path, by result"
    );
    metrics::describe_counter!(
        CACHE_STALE_ANSWERS,
        "Answers from cache entries past their TTL while the key store was unreachable"
    );
    metrics::describe_histogram!(
        STORE_LOOKUP_DURATION,
        Unit::Seconds,
        "Key store lookup latency, errors and timeouts included"
    );
    metrics::describe_counter!(STORE_ERRORS, "Failed key store lookups, by kind");
    metrics::describe_counter!(
        RATE_LIMIT_DECISIONS,
        "Per-key rate-limit checks, by decision"
    );
    metrics::describe_counter!(
        CLIENTS_BLOCKED,
        "Requests refused because their client address had too many failed attempts"
    );
    metrics::describe_counter!(
        INVALIDATIONS,
        "Cache invalidations applied, by source and kind"
    );
    metrics::describe_counter!(
        INVALIDATION_RECONNECTS,
        "Whole-cache flushes after an invalidation channel reconnected, by source"
    );
    metrics::describe_gauge!(
        REVOCATION_BLIND,
        "1 while the instance has heard nothing from the change feed or a notification transport for max_blind"
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::num::NonZeroU32;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Weak};
    use std::time::Duration;

    use http::{Request, Response};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use time::OffsetDateTime;
    use tower::{Layer, ServiceExt};
    use uuid::Uuid;

    use crate::key::KeyPrefix;
    use crate::layer::{ApiKeyLayer, ApiKeyLayerBuilder, Collection};
    use crate::manage::{KeyManager, NewKey};
    use crate::ratelimit::RateLimitPolicy;
    use crate::secret::{Digest, SecretId, SecretRing};
    use crate::store::{
        KeyPage, KeyPatch, KeyQuery, KeyRecord, KeyStore, KeyUsage, MemoryStore, StoreError,
        StoreErrorKind, StoreObserver,
    };

    const SECRET: &str = "metrics-unit-test-secret-0123456789abcdef";

    /// Each series' value (a histogram's: its number of samples) by
    /// `name{label="value",...}`, labels sorted. Reading resets the recorder's counters.
    fn read(snapshotter: &Snapshotter) -> BTreeMap<String, u64> {
        let mut values = BTreeMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|label| format!("{}=\"{}\"", label.key(), label.value()))
                .collect();
            labels.sort();
            let value = match value {
                DebugValue::Counter(n) => n,
                DebugValue::Histogram(samples) => samples.len() as u64,
                DebugValue::Gauge(g) => g.into_inner() as u64,
            };
            values.insert(format!("{}{{{}}}", key.name(), labels.join(",")), value);
        }
        values
    }

    #[track_caller]
    fn assert_series(values: &BTreeMap<String, u64>, expected: &[(&str, u64)]) {
        for (series, value) in expected {
            assert_eq!(values.get(*series), Some(value), "{series} in {values:#?}");
        }
    }

    /// A layer with collections users and teams, its handles registered with a recorder of
    /// its own.
    fn layer(
        store: Arc<dyn KeyStore>,
        configure: impl FnOnce(ApiKeyLayerBuilder) -> ApiKeyLayerBuilder,
    ) -> (ApiKeyLayer, Snapshotter) {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let builder = ApiKeyLayer::builder()
            .store(store)
            .secrets(SecretRing::from_strs(SECRET, None).unwrap())
            .collection(Collection::new("users"))
            .collection(Collection::new("teams"))
            .usage_flush_interval(None);
        let layer = metrics::with_local_recorder(&recorder, || configure(builder).build().unwrap());
        (layer, snapshotter)
    }

    async fn status(layer: &ApiKeyLayer, header: Option<(&str, &str)>) -> u16 {
        let service = layer.layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(()))
        }));
        let mut req = Request::builder().uri("/");
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        let res = service.oneshot(req.body(()).unwrap()).await.unwrap();
        res.status().as_u16()
    }

    fn unknown_key() -> String {
        KeyPrefix::new("kw_live")
            .unwrap()
            .generate()
            .expose()
            .to_owned()
    }

    #[tokio::test]
    async fn every_series_exists_from_zero_with_bounded_labels() {
        let (_layer, snapshotter) = layer(Arc::new(MemoryStore::new()), |b| b);
        let values = read(&snapshotter);
        let requests: Vec<_> = values
            .keys()
            .filter(|k| k.starts_with("keywarden_requests_total{"))
            .collect();
        // ("", users, teams) × (accepted, anonymous, 11 codes).
        assert_eq!(requests.len(), 3 * 13, "{requests:#?}");
        assert!(values.values().all(|v| *v == 0), "{values:#?}");
        assert_series(
            &values,
            &[
                (
                    "keywarden_requests_total{collection=\"\",outcome=\"missing_credentials\"}",
                    0,
                ),
                (
                    "keywarden_requests_total{collection=\"teams\",outcome=\"accepted\"}",
                    0,
                ),
                ("keywarden_cache_lookups_total{result=\"negative_hit\"}", 0),
                ("keywarden_store_errors_total{kind=\"timeout\"}", 0),
                (
                    "keywarden_invalidations_total{kind=\"created\",source=\"local\"}",
                    0,
                ),
                (
                    "keywarden_invalidation_reconnects_total{source=\"redis\"}",
                    0,
                ),
            ],
        );
    }

    #[tokio::test]
    async fn outcomes_by_collection_cache_results_and_local_invalidations() {
        let (layer, snapshotter) = layer(Arc::new(MemoryStore::new()), |b| b);
        let manager = KeyManager::for_layer(&layer);
        let created = manager
            .create(NewKey::new("k", "s").collection("users"))
            .await
            .unwrap();
        let key = created.key.expose();
        let unknown = unknown_key();
        let users_form = format!("users API-Key {key}");
        let teams_form = format!("teams API-Key {unknown}");
        // A miss, then two hits.
        assert_eq!(status(&layer, Some(("x-api-key", key))).await, 200);
        assert_eq!(status(&layer, Some(("x-api-key", key))).await, 200);
        assert_eq!(
            status(&layer, Some(("authorization", &users_form))).await,
            200
        );
        assert_eq!(status(&layer, None).await, 401);
        assert_eq!(
            status(&layer, Some(("x-api-key", "kw_live_nope"))).await,
            401
        );
        // A miss, then negative hits; the slug form counts under the collection it names.
        assert_eq!(status(&layer, Some(("x-api-key", &unknown))).await, 401);
        assert_eq!(status(&layer, Some(("x-api-key", &unknown))).await, 401);
        assert_eq!(
            status(&layer, Some(("authorization", &teams_form))).await,
            401
        );
        // The revocation drops the entry: a miss, and the key's own collection.
        manager.revoke(created.record.id).await.unwrap();
        assert_eq!(status(&layer, Some(("x-api-key", key))).await, 401);
        // `check` (verification API, forward auth) is an authentication too.
        let checked = layer.check(key, &http::Method::GET, None).await;
        assert!(checked.is_err());

        let values = read(&snapshotter);
        assert_series(
            &values,
            &[
                (
                    "keywarden_requests_total{collection=\"users\",outcome=\"accepted\"}",
                    3,
                ),
                (
                    "keywarden_requests_total{collection=\"\",outcome=\"missing_credentials\"}",
                    1,
                ),
                (
                    "keywarden_requests_total{collection=\"\",outcome=\"malformed_key\"}",
                    1,
                ),
                (
                    "keywarden_requests_total{collection=\"\",outcome=\"invalid_key\"}",
                    2,
                ),
                (
                    "keywarden_requests_total{collection=\"teams\",outcome=\"invalid_key\"}",
                    1,
                ),
                (
                    "keywarden_requests_total{collection=\"users\",outcome=\"revoked_key\"}",
                    2,
                ),
                // `check` of the revoked key: a hit (of a key that is refused).
                ("keywarden_cache_lookups_total{result=\"hit\"}", 3),
                ("keywarden_cache_lookups_total{result=\"miss\"}", 3),
                ("keywarden_cache_lookups_total{result=\"negative_hit\"}", 2),
                ("keywarden_cache_lookups_total{result=\"stale\"}", 0),
                ("keywarden_store_lookup_duration_seconds{}", 3),
                (
                    "keywarden_invalidations_total{kind=\"created\",source=\"local\"}",
                    1,
                ),
                (
                    "keywarden_invalidations_total{kind=\"key\",source=\"local\"}",
                    1,
                ),
            ],
        );
        let total: u64 = values
            .iter()
            .filter(|(k, _)| k.starts_with("keywarden_requests_total{"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(total, 10);
        // No key, no key id, no subject in any series.
        let id = created.record.id.to_string();
        assert!(values
            .keys()
            .all(|k| !k.contains(key) && !k.contains(&unknown) && !k.contains(&id)));
        // Local changes are not "received" invalidations.
        assert_eq!(layer.stats().invalidations_received, 0);
    }

    #[tokio::test]
    async fn rate_limit_decisions_match_the_stats() {
        let policy = RateLimitPolicy::new(NonZeroU32::new(2).unwrap(), Duration::from_secs(60));
        let (layer, snapshotter) = layer(Arc::new(MemoryStore::new()), |b| {
            b.default_rate_limit(policy)
        });
        let created = KeyManager::for_layer(&layer)
            .create(NewKey::new("k", "s").collection("users"))
            .await
            .unwrap();
        let key = created.key.expose();
        for expected in [200, 200, 429] {
            assert_eq!(status(&layer, Some(("x-api-key", key))).await, expected);
        }
        let values = read(&snapshotter);
        assert_series(
            &values,
            &[
                (
                    "keywarden_rate_limit_decisions_total{decision=\"allowed\"}",
                    2,
                ),
                (
                    "keywarden_rate_limit_decisions_total{decision=\"limited\"}",
                    1,
                ),
                (
                    "keywarden_requests_total{collection=\"users\",outcome=\"rate_limited\"}",
                    1,
                ),
                (
                    "keywarden_requests_total{collection=\"users\",outcome=\"accepted\"}",
                    2,
                ),
            ],
        );
        assert_eq!(layer.stats().rate_limited, 1);
    }

    /// A memory store whose lookups fail while `failing` is set.
    #[derive(Debug, Default)]
    struct Flaky {
        inner: MemoryStore,
        failing: AtomicBool,
    }

    #[async_trait::async_trait]
    impl KeyStore for Flaky {
        async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
            self.inner.insert(record).await
        }
        async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::new(StoreErrorKind::Unavailable, "down"));
            }
            self.inner.find_by_digest(digest).await
        }
        async fn get(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
            self.inner.get(id).await
        }
        async fn update(
            &self,
            id: Uuid,
            patch: &KeyPatch,
            now: OffsetDateTime,
        ) -> Result<Option<KeyRecord>, StoreError> {
            self.inner.update(id, patch, now).await
        }
        async fn add_digest(
            &self,
            id: Uuid,
            old: &Digest,
            new: &Digest,
            secret_id: SecretId,
        ) -> Result<bool, StoreError> {
            self.inner.add_digest(id, old, new, secret_id).await
        }
        async fn delete(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
            self.inner.delete(id).await
        }
        async fn list(&self, query: &KeyQuery) -> Result<KeyPage, StoreError> {
            self.inner.list(query).await
        }
        async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
            self.inner.record_usage(usage).await
        }
        async fn apply_audited(
            &self,
            change: crate::store::KeyChange<'_>,
            audit: &crate::store::AuditWrite<'_>,
        ) -> Result<crate::store::Applied, StoreError> {
            self.inner.apply_audited(change, audit).await
        }
        fn observe(&self, observer: Weak<dyn StoreObserver>) {
            self.inner.observe(observer);
        }
    }
    #[tokio::test]
    async fn store_errors_stale_answers_and_unavailable_match_the_stats() {
        let store = Arc::new(Flaky::default());
        let (layer, snapshotter) = layer(store.clone(), |b| {
            b.cache_ttl(Duration::from_millis(30))
                .stale_window(Duration::from_secs(60))
        });
        let created = KeyManager::for_layer(&layer)
            .create(NewKey::new("k", "s").collection("users"))
            .await
            .unwrap();
        let key = created.key.expose();
        assert_eq!(status(&layer, Some(("x-api-key", key))).await, 200);
        store.failing.store(true, Ordering::SeqCst);
        assert_eq!(
            status(&layer, Some(("x-api-key", &unknown_key()))).await,
            503
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Past its TTL, the store marked down: the stale entry answers.
        assert_eq!(status(&layer, Some(("x-api-key", key))).await, 200);

        let values = read(&snapshotter);
        let stats = layer.stats();
        assert_eq!(
            (stats.store_errors, stats.stale_served, stats.unavailable),
            (1, 1, 1)
        );
        assert_series(
            &values,
            &[
                ("keywarden_store_errors_total{kind=\"error\"}", 1),
                ("keywarden_store_errors_total{kind=\"timeout\"}", 0),
                ("keywarden_cache_stale_answers_total{}", 1),
                ("keywarden_cache_lookups_total{result=\"stale\"}", 1),
                ("keywarden_store_lookup_duration_seconds{}", 2),
                (
                    "keywarden_requests_total{collection=\"\",outcome=\"store_unavailable\"}",
                    1,
                ),
                (
                    "keywarden_requests_total{collection=\"users\",outcome=\"accepted\"}",
                    2,
                ),
            ],
        );
    }
}
