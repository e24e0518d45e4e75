//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`): pick
//! any exporter (Prometheus, StatsD, OpenTelemetry, ...) and install it before building the
//! layer.
//!
//! ```
//! use std::sync::Arc;
//! use keywarden::{ApiKeyLayer, Collection, MemoryStore, SecretRing};
//!
//! // Install your recorder first (e.g. `metrics_exporter_prometheus::PrometheusBuilder::new()
//! // .install_recorder()`): the layer registers its handles with it when it is built.
//! let layer = ApiKeyLayer::builder()
//!     .store(Arc::new(MemoryStore::new()))
//!     .secrets(SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap())
//!     .collection(Collection::new("users"))
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//! // Scrape `keywarden_requests_total{collection="users",outcome="accepted"}` and the rest.
//! assert_eq!(keywarden::metrics::REQUESTS, "keywarden_requests_total");
//! ```
//!
//! # Registered once, when the layer is built
//!
//! [`ApiKeyLayerBuilder::build`](crate::ApiKeyLayerBuilder::build) describes every metric and
//! registers every handle (every label combination, so each series exists from zero) with
//! the recorder in effect at that moment: the global one, or a local one inside
//! [`metrics::with_local_recorder`](https://docs.rs/metrics/latest/metrics/fn.with_local_recorder.html).
//! The request path then bumps handles it already holds and never looks a metric up. **A
//! recorder installed after the layer was built sees nothing from it.** Without a recorder the
//! handles are no-ops.
//!
//! # Names, types and labels
//!
//! These names and label values are a contract: they change only in a major version.
//!
//! | name | type | labels | what |
//! | --- | --- | --- | --- |
//! | `keywarden_requests_total` | counter | `collection`, `outcome` | every authentication the layer decides: a request, or a call of `check`, `check_headers` or `verify` |
//! | `keywarden_cache_lookups_total` | counter | `result` | the request path's cache lookups |
//! | `keywarden_cache_stale_answers_total` | counter | | answers from an entry past its TTL because the store was unreachable |
//! | `keywarden_store_lookup_duration_seconds` | histogram | | each key lookup in the store (or a foreign source), errors and timeouts included |
//! | `keywarden_store_errors_total` | counter | `kind` | store lookups that failed |
//! | `keywarden_rate_limit_decisions_total` | counter | `decision` | per-key rate-limit checks |
//! | `keywarden_clients_blocked_total` | counter | | requests refused because their client address had too many failed attempts |
//! | `keywarden_invalidations_total` | counter | `source`, `kind` | cache invalidations applied |
//! | `keywarden_invalidation_reconnects_total` | counter | `source` | whole-cache flushes: a notification channel reconnected with no change feed to replay from, or the feed was pruned past what the instance had applied |
//! | `keywarden_revocation_blind` | gauge | | 1 while the instance has heard nothing from the change feed or a notification transport for its `max_blind` (see `docs/deploy.md`), else 0 |
//!
//! | label | values |
//! | --- | --- |
//! | `collection` | a configured collection's slug; `""` when the request is tied to none (no or malformed credential, an unknown key presented without a collection, a layer configured with no collections) |
//! | `outcome` | `accepted`; `anonymous` (optional mode, no credential, passed through); or a rejection code: `missing_credentials`, `malformed_key`, `invalid_key`, `expired_key`, `revoked_key`, `ambiguous_credentials`, `insufficient_scope`, `rate_limited`, `store_unavailable` |
//! | `result` | `hit` (a fresh entry of a key), `negative_hit` (a fresh "not found" entry), `miss` (no entry: the store is asked, one query shared by concurrent misses), `stale` (an entry past its TTL: re-read, or answered stale) |
//! | `kind` (store errors) | `error`, `timeout` (the store timeout, or an identity mapping that outran it) |
//! | `decision` | `allowed`, `limited` |
//! | `source` | `postgres` (NOTIFY), `redis` (pub/sub), `local` (a change made through the store in this process; no reconnects), `feed` (the store's change feed, polled or replayed) |
//! | `kind` (invalidations) | `key`, `created`, `all` |
//!
//! No key, key id or subject is ever a label: every label set is fixed when the layer is built.
//! `RequireScopeLayer`'s own `insufficient_scope` rejections are not counted here (the key
//! was accepted by the layer).
//!
//! The counters that [`ApiKeyLayer::stats`](crate::ApiKeyLayer::stats) reports are bumped by
//! the same calls: `store_errors` and `store_timeouts` are `keywarden_store_errors_total` by
//! `kind`, `stale_served` is `keywarden_cache_stale_answers_total`, `rate_limited` is
//! `keywarden_rate_limit_decisions_total{decision="limited"}`, `clients_blocked` is
//! `keywarden_clients_blocked_total`, `invalidations_received` is
//! `keywarden_invalidations_total` without `source="local"`, and `reconnect_flushes` is
//! `keywarden_invalidation_reconnects_total`.
//!
//! # Tracing
//!
//! Each authentication also runs in one `tracing` span, `authenticate` (target `keywarden`),
//! with the fields `collection`, `key_id` (once the key is resolved) and `outcome` (the label
//! above); never the key. It is at `DEBUG` level: with a subscriber at `INFO` (or none) a
//! request pays one level check for it and gets no span at all. Turn it on with
//! `RUST_LOG=keywarden=debug` (or a per-target filter in your subscriber).
//!
//! Two layers in one process that name the same collection share its series: recorders key
//! a metric by its name and labels.

/// `keywarden_requests_total`: authentications by `collection` and `outcome`.
pub const REQUESTS: &str = "keywarden_requests_total";
/// `keywarden_cache_lookups_total`: cache lookups by `result`.
pub const CACHE_LOOKUPS: &str = "keywarden_cache_lookups_total";
/// `keywarden_cache_stale_answers_total`: answers from stale entries during a store outage.
pub const CACHE_STALE_ANSWERS: &str = "keywarden_cache_stale_answers_total";
/// `keywarden_store_lookup_duration_seconds`: store lookup latency, in seconds.
pub const STORE_LOOKUP_DURATION: &str = "keywarden_store_lookup_duration_seconds";
/// `keywarden_store_errors_total`: failed store lookups by `kind`.
pub const STORE_ERRORS: &str = "keywarden_store_errors_total";
/// `keywarden_rate_limit_decisions_total`: per-key rate-limit checks by `decision`.
pub const RATE_LIMIT_DECISIONS: &str = "keywarden_rate_limit_decisions_total";
/// `keywarden_clients_blocked_total`: requests refused by failed-attempt limiting.
pub const CLIENTS_BLOCKED: &str = "keywarden_clients_blocked_total";
/// `keywarden_invalidations_total`: invalidations by `source` and `kind`.
pub const INVALIDATIONS: &str = "keywarden_invalidations_total";
/// `keywarden_invalidation_reconnects_total`: reconnect flushes by `source`.
pub const INVALIDATION_RECONNECTS: &str = "keywarden_invalidation_reconnects_total";
/// `keywarden_revocation_blind`: 1 while the instance cannot hear of changes (no answer from
/// the change feed or a notification transport for `max_blind`), else 0.
pub const REVOCATION_BLIND: &str = "keywarden_revocation_blind";

/// Histogram buckets (seconds) that suit [`STORE_LOOKUP_DURATION`], from an indexed local
/// lookup to the default 2 s store timeout; for exporters that need buckets
/// (`PrometheusBuilder::set_buckets_for_metric`).
pub const STORE_LOOKUP_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
