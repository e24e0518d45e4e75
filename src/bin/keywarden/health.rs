//! `serve`'s probes: `GET /healthz` answers while the process runs (in the demo router), and
//! `GET /readyz` only while the instance can serve — the store reachable with every migration
//! applied, Redis answering when configured, and no shutdown under way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use keywarden::{
    invalidation::InvalidationListener, redis::RedisBackend, store::StoreErrorKind, KeyStore,
};
use serde_json::{json, Map, Value};

use crate::with_sources;

/// How long one dependency may take to answer a readiness probe.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a readiness verdict is reused: a flood of probes (the endpoint is open) costs
/// one store query and one Redis `PING` per second, never one per request.
const VERDICT_TTL: Duration = Duration::from_secs(1);

/// What `/readyz` checks. Shared by the router and the shutdown path, which marks it draining.
pub(crate) struct Readiness {
    store: Arc<dyn KeyStore>,
    redis: Option<RedisBackend>,
    draining: AtomicBool,
    verdict_ttl: Duration,
    /// The last verdict and when it was reached; the lock also makes concurrent probes wait
    /// for one check instead of each running its own.
    last: tokio::sync::Mutex<Option<Verdict>>,
    /// How changes made elsewhere reach this instance, reported (not a readiness condition:
    /// a blind instance's store check fails anyway).
    revocation: Option<Arc<InvalidationListener>>,
}

/// When a readiness verdict was reached, whether ready, and each check's answer.
type Verdict = (Instant, bool, Map<String, Value>);

impl Readiness {
    pub(crate) fn new(store: Arc<dyn KeyStore>, redis: Option<RedisBackend>) -> Self {
        Self {
            store,
            redis,
            draining: AtomicBool::new(false),
            verdict_ttl: VERDICT_TTL,
            last: tokio::sync::Mutex::new(None),
            revocation: None,
        }
    }

    /// Reports `listener`'s path (and blindness) under `checks.revocation`.
    pub(crate) fn revocation(mut self, listener: Arc<InvalidationListener>) -> Self {
        self.revocation = Some(listener);
        self
    }

    /// Checks on every probe (tests).
    #[cfg(test)]
    fn uncached(mut self) -> Self {
        self.verdict_ttl = Duration::ZERO;
        self
    }

    /// The verdict of the last second, or a fresh one.
    async fn verdict(&self) -> (bool, Map<String, Value>) {
        let mut last = self.last.lock().await;
        if let Some((at, ready, checks)) = last.as_ref() {
            if at.elapsed() < self.verdict_ttl {
                return (*ready, checks.clone());
            }
        }
        let (ready, checks) = self.check().await;
        *last = Some((Instant::now(), ready, checks.clone()));
        (ready, checks)
    }

    /// From now on `/readyz` answers 503 `draining`: load balancers stop sending new requests
    /// while the ones in flight finish.
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Each check's verdict (`ok` or why not), and whether all passed.
    async fn check(&self) -> (bool, Map<String, Value>) {
        let mut checks = Map::new();
        let mut ready = true;
        let store = match tokio::time::timeout(CHECK_TIMEOUT, self.store.check_ready()).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(error)) => {
                ready = false;
                tracing::warn!(error = %with_sources(&error), "readiness: the store is not ready");
                match error.kind() {
                    // The schema message says what to do (`keywarden migrate`), nothing more.
                    StoreErrorKind::Schema => format!("schema: {}", error_message(&error)),
                    StoreErrorKind::Timeout => "timeout".to_owned(),
                    _ => "unreachable".to_owned(),
                }
            }
            Err(_) => {
                ready = false;
                tracing::warn!("readiness: the store did not answer within {CHECK_TIMEOUT:?}");
                "timeout".to_owned()
            }
        };
        checks.insert("store".into(), store.into());
        if let Some(redis) = &self.redis {
            let verdict = match redis.ping().await {
                Ok(()) => "ok",
                Err(error) => {
                    ready = false;
                    tracing::warn!(error = %with_sources(&error), "readiness: Redis is not answering");
                    "unreachable"
                }
            };
            checks.insert("redis".into(), verdict.into());
        }
        if let Some(listener) = &self.revocation {
            let path = listener.path();
            let verdict = match listener.blind_since() {
                Some(since) => format!(
                    "{path}, blind: last answer {}",
                    time::OffsetDateTime::from(since)
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                ),
                None => path,
            };
            checks.insert("revocation".into(), verdict.into());
        }
        (ready, checks)
    }
}

/// The message a [`keywarden::StoreError`] was made with, without the `key store error
/// (Kind):` prefix of its `Display`.
fn error_message(error: &keywarden::StoreError) -> String {
    let text = error.to_string();
    match text.split_once("): ") {
        Some((_, message)) => message.to_owned(),
        None => text,
    }
}

/// `GET /readyz`.
pub(crate) fn router(readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> Response {
    let (status, body) = if readiness.draining.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "draining" }),
        )
    } else {
        match readiness.verdict().await {
            (true, checks) => (
                StatusCode::OK,
                json!({ "status": "ready", "checks": checks }),
            ),
            (false, checks) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "status": "not_ready", "checks": checks }),
            ),
        }
    };
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use keywarden::{MemoryStore, SqliteStore};
    use tower::ServiceExt;

    async fn get_readyz(readiness: Arc<Readiness>) -> (StatusCode, Value) {
        let response = router(readiness)
            .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(response.headers()["cache-control"], "no-store");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// An in-memory SQLite database keywarden never migrated.
    async fn unmigrated_store() -> SqliteStore {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        SqliteStore::from_pool(pool)
    }

    #[tokio::test]
    async fn ready_until_draining() {
        let readiness = Arc::new(Readiness::new(Arc::new(MemoryStore::new()), None));
        let (status, body) = get_readyz(readiness.clone()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({ "status": "ready", "checks": { "store": "ok" } })
        );

        readiness.drain();
        let (status, body) = get_readyz(readiness).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, json!({ "status": "draining" }));
    }

    #[tokio::test]
    async fn an_unmigrated_database_is_not_ready() {
        let store = unmigrated_store().await;
        let readiness = Arc::new(Readiness::new(Arc::new(store.clone()), None).uncached());
        let (status, body) = get_readyz(readiness.clone()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "not_ready");
        let verdict = body["checks"]["store"].as_str().unwrap();
        assert!(verdict.contains("keywarden migrate"), "{verdict}");

        store.migrate().await.unwrap();
        let (status, _) = get_readyz(readiness).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_verdict_is_reused_for_a_second() {
        let store = unmigrated_store().await;
        let readiness = Arc::new(Readiness::new(Arc::new(store.clone()), None));
        let (status, _) = get_readyz(readiness.clone()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        store.migrate().await.unwrap();
        // Still the verdict of a moment ago: probes do not each query the store.
        let (status, _) = get_readyz(readiness).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
