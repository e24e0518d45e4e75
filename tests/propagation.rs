//! Cross-instance invalidation against the real PostgreSQL (LISTEN/NOTIFY) and Redis (pub/sub)
//! of this machine: two layers with separate caches over one store; a revocation on A must
//! reach B within a second, and a change made while B's notification connection was down must
//! reach B when it comes back: replayed from the change feed (PostgreSQL), or by flushing
//! the cache (Redis without a feed).
#![cfg(all(feature = "postgres", feature = "redis", feature = "sqlite"))]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use keywarden::{
    invalidation::InvalidationListener, redis::RedisBackend, ApiKeyLayer, Collection, KeyManager,
    KeyStore, NewKey, PostgresStore, SqliteStore,
};
use support::*;

const REVOCATIONS: usize = 100;

fn layer(store: Arc<dyn KeyStore>) -> ApiKeyLayer {
    ApiKeyLayer::builder()
        .store(store)
        .secrets(ring())
        .collection(Collection::new("users"))
        // Only an invalidation can make B notice a revocation within the test's bounds.
        .cache_ttl(Duration::from_secs(600))
        .usage_flush_interval(None)
        .build()
        .unwrap()
}

async fn status(app: &Router, key: &str) -> (u16, String) {
    let reply = get_with(app, "/whoami", &[("x-api-key", key.as_bytes())]).await;
    let code = if reply.status.is_success() {
        String::new()
    } else {
        reply.code()
    };
    (reply.status.as_u16(), code)
}

/// Revokes keys one at a time through A's manager and measures how long B keeps accepting.
async fn measure(manager: &KeyManager, b: &Router, transport: &str) {
    let mut keys = Vec::new();
    for i in 0..REVOCATIONS {
        let created = manager
            .create(NewKey::new(format!("k{i}"), "subject").collection("users"))
            .await
            .unwrap();
        keys.push(created);
    }
    for created in &keys {
        assert_eq!(
            status(b, created.key.expose()).await.0,
            200,
            "B caches the key"
        );
    }
    let mut delays = Vec::with_capacity(REVOCATIONS);
    for created in &keys {
        manager.revoke(created.record.id).await.unwrap();
        let start = Instant::now();
        loop {
            match status(b, created.key.expose()).await {
                (200, _) => {}
                (401, code) if code == "revoked_key" => break,
                other => panic!("unexpected {other:?}"),
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{transport}: B still accepts a key revoked 5 s ago"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delays.push(start.elapsed());
    }
    let (p50, p99) = percentiles(&mut delays);
    println!(
        "{transport}: {REVOCATIONS} revocations, propagation p50 = {p50:?}, p99 = {p99:?}, max = {:?}",
        delays.last().unwrap()
    );
    assert!(
        p99 <= Duration::from_secs(1),
        "{transport}: p99 {p99:?} > 1 s"
    );
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notify_propagates_revocations_and_replays_on_reconnect() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_prop");
    // Two instances: two pools, two caches, one table.
    let store_a = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let store_b = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let a = layer(Arc::new(store_a.clone()));
    let b = layer(Arc::new(store_b.clone()));
    let listener = InvalidationListener::postgres(&b, &store_b).await.unwrap();
    let manager = KeyManager::for_layer(&a);
    let app_b = app().layer(b.clone());

    measure(&manager, &app_b, "postgres LISTEN/NOTIFY").await;
    assert!(listener.received() >= REVOCATIONS as u64);

    // Usage flushes must not churn the other instances' caches: they are not fed.
    let extra = manager
        .create(NewKey::new("usage", "subject").collection("users"))
        .await
        .unwrap();
    let head = store_a
        .change_feed(u64::MAX, 0)
        .await
        .unwrap()
        .unwrap()
        .head;
    store_a
        .record_usage(&[keywarden::store::KeyUsage {
            id: extra.record.id,
            last_used_at: time::OffsetDateTime::now_utc(),
            uses: 3,
        }])
        .await
        .unwrap();
    assert_eq!(
        store_a
            .change_feed(u64::MAX, 0)
            .await
            .unwrap()
            .unwrap()
            .head,
        head,
        "usage updates are not fed (nor notified)"
    );

    // Kill the notification connection; a key revoked around then must still be rejected.
    let keep = manager
        .create(NewKey::new("keep", "subject").collection("users"))
        .await
        .unwrap();
    let victim = manager
        .create(NewKey::new("victim", "subject").collection("users"))
        .await
        .unwrap();
    assert_eq!(status(&app_b, keep.key.expose()).await.0, 200);
    assert_eq!(status(&app_b, victim.key.expose()).await.0, 200);
    assert!(b.cached_entries().await >= 2);
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("keywarden-listener:{schema}"))
    .fetch_all(store_a.pool())
    .await
    .unwrap();
    assert_eq!(
        killed,
        vec![true],
        "exactly our listener's connection was terminated"
    );
    // Straight into the table, while the listener is (probably) away.
    sqlx::query("UPDATE keywarden_keys SET revoked_at = now() WHERE id = $1")
        .bind(victim.record.id)
        .execute(store_a.pool())
        .await
        .unwrap();
    wait_for("the listener to reconnect", || listener.reconnects() == 1).await;
    assert!(listener.is_connected());
    // The change feed carried what the notification missed: replayed, not flushed.
    let head = store_a
        .change_feed(u64::MAX, 0)
        .await
        .unwrap()
        .unwrap()
        .head;
    wait_for("the replay", || listener.cursor() >= head).await;
    assert_eq!(b.stats().reconnect_flushes, 0);
    assert_eq!(listener.flushes(), 0);
    assert!(
        b.cached_entries().await >= 1,
        "the reconnect kept B's cache"
    );
    assert_eq!(
        status(&app_b, victim.key.expose()).await,
        (401, "revoked_key".into())
    );
    assert_eq!(status(&app_b, keep.key.expose()).await.0, 200);

    // Notifications flow again after the reconnect.
    manager.revoke(keep.record.id).await.unwrap();
    let start = Instant::now();
    while status(&app_b, keep.key.expose()).await.0 == 200 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "no notification after reconnect"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    drop(listener);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(store_a.pool())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_propagates_revocations_and_flushes_on_reconnect() {
    let Some(url) = service_url("KEYWARDEN_TEST_REDIS_URL") else {
        return;
    };
    let namespace = unique("kwtest");
    // Two instances over one SQLite file: no NOTIFY here, only Redis carries the news.
    let path = std::env::temp_dir().join(format!("{}.db", unique("keywarden-prop")));
    let db = format!("sqlite://{}", path.display());
    let store_a = SqliteStore::connect(&db).await.unwrap();
    let store_b = SqliteStore::connect(&db).await.unwrap();
    let a = layer(Arc::new(store_a));
    let b = layer(Arc::new(store_b));
    // B's subscription goes through a proxy the test can sever.
    let proxy = TcpProxy::start(url_addr(&url)).await;
    let backend_a = RedisBackend::connect(&url, &namespace).await.unwrap();
    let backend_b = RedisBackend::connect(&url_via(&url, proxy.addr), &namespace)
        .await
        .unwrap();
    let listener = InvalidationListener::redis(&b, &backend_b).await.unwrap();
    let manager = KeyManager::for_layer(&a).publishes_to(backend_a.clone());
    let app_b = app().layer(b.clone());

    measure(&manager, &app_b, "redis pub/sub").await;
    assert!(listener.received() >= REVOCATIONS as u64);

    let keep = manager
        .create(NewKey::new("keep", "subject").collection("users"))
        .await
        .unwrap();
    assert_eq!(status(&app_b, keep.key.expose()).await.0, 200);
    assert!(b.cached_entries().await >= 1);
    proxy.sever();
    wait_for("the subscriber to reconnect", || listener.reconnects() == 1).await;
    assert_eq!(b.stats().reconnect_flushes, 1);
    assert_eq!(
        b.cached_entries().await,
        0,
        "the reconnect flushed B's whole cache"
    );
    assert_eq!(status(&app_b, keep.key.expose()).await.0, 200);
    manager.revoke(keep.record.id).await.unwrap();
    let start = Instant::now();
    while status(&app_b, keep.key.expose()).await.0 == 200 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "no message after reconnect"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    drop(listener);
    let _ = std::fs::remove_file(&path);
}
