//! Store outages against the real PostgreSQL, through a TCP proxy the test cuts: cached keys
//! keep working for the stale window, uncached keys get 503 with Retry-After, a hanging store
//! times out, and service resumes by itself. No panic, no leaked task.
#![cfg(feature = "postgres")]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keywarden::{ApiKeyLayer, Collection, KeyManager, NewKey, PostgresStore};
use support::*;

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

async fn settle_tasks(baseline: usize) -> usize {
    let start = Instant::now();
    loop {
        let alive = alive_tasks();
        if alive <= baseline || start.elapsed() > Duration::from_secs(5) {
            return alive;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_store_serves_cached_keys_rejects_others_and_recovers() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_outage");
    let direct = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let baseline = alive_tasks();
    let proxy = TcpProxy::start(url_addr(&url)).await;
    let store = PostgresStore::connect_with_schema(&url_via(&url, proxy.addr), &schema)
        .await
        .unwrap();
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(store.clone()))
        .secrets(ring())
        .collection(Collection::new("users"))
        .cache_ttl(Duration::from_millis(300))
        .stale_window(Duration::from_secs(60))
        .store_timeout(Duration::from_millis(500))
        .store_retry_after(Duration::from_millis(500))
        .usage_flush_interval(None)
        .build()
        .unwrap();
    let manager = KeyManager::for_layer(&layer);
    let cached = manager
        .create(NewKey::new("cached", "u").collection("users"))
        .await
        .unwrap();
    let cold = manager
        .create(NewKey::new("cold", "u").collection("users"))
        .await
        .unwrap();
    let app = app().layer(layer.clone());
    let call = |key: String| {
        let app = app.clone();
        async move { get_with(&app, "/whoami", &[("x-api-key", key.as_bytes())]).await }
    };
    assert_eq!(call(cached.key.expose().to_owned()).await.status, 200);

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(400)).await; // past the TTL: the entry is stale
    let start = Instant::now();
    let reply = call(cached.key.expose().to_owned()).await;
    assert_eq!(reply.status, 200, "a cached key works through the outage");
    let reply = call(cold.key.expose().to_owned()).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.code(), "store_unavailable");
    assert_eq!(reply.headers["retry-after"], "1");
    // While the store is marked down, nothing waits for it.
    for _ in 0..20 {
        assert_eq!(call(cached.key.expose().to_owned()).await.status, 200);
        assert_eq!(call(cold.key.expose().to_owned()).await.status, 503);
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "outage answers are prompt: {:?}",
        start.elapsed()
    );
    let stats = layer.stats();
    assert!(stats.stale_served >= 20, "{stats:?}");
    assert!(stats.unavailable >= 21, "{stats:?}");
    assert!(stats.store_errors + stats.store_timeouts >= 1, "{stats:?}");

    proxy.restore();
    let start = Instant::now();
    loop {
        match call(cold.key.expose().to_owned()).await.status.as_u16() {
            200 => break,
            503 => {}
            other => panic!("unexpected {other}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "service did not resume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("resumed {:?} after the store came back", start.elapsed());
    assert_eq!(call(cached.key.expose().to_owned()).await.status, 200);
    // Fresh again: a revocation made now is seen (the stale copy is gone).
    manager.revoke(cached.record.id).await.unwrap();
    assert_eq!(
        call(cached.key.expose().to_owned()).await.code(),
        "revoked_key"
    );

    drop(app);
    drop(manager);
    drop(layer);
    store.pool().close().await;
    drop(store);
    drop(proxy);
    let alive = settle_tasks(baseline).await;
    assert!(
        alive <= baseline,
        "{alive} tasks alive, {baseline} before: a task leaked"
    );
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(direct.pool())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_store_times_out_instead_of_hanging_requests() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_hang");
    let direct = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let proxy = TcpProxy::start(url_addr(&url)).await;
    let store = PostgresStore::connect_with_schema(&url_via(&url, proxy.addr), &schema)
        .await
        .unwrap();
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(store.clone()))
        .secrets(ring())
        .collection(Collection::new("users"))
        .store_timeout(Duration::from_millis(300))
        .usage_flush_interval(None)
        .build()
        .unwrap();
    let key = KeyManager::for_layer(&layer)
        .create(NewKey::new("k", "u").collection("users"))
        .await
        .unwrap();
    let app = app().layer(layer.clone());
    proxy.black_hole();
    let start = Instant::now();
    let reply = get_with(
        &app,
        "/whoami",
        &[("x-api-key", key.key.expose().as_bytes())],
    )
    .await;
    let took = start.elapsed();
    assert_eq!(reply.code(), "store_unavailable");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    assert_eq!(layer.stats().store_timeouts, 1);
    proxy.restore();
    store.pool().close().await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(direct.pool())
        .await
        .unwrap();
}
