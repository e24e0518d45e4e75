//! Store traffic: concurrent misses coalesce into one query; malformed keys cause none; hits
//! cause none.

mod support;

use std::sync::Arc;
use std::time::Duration;

use keywarden::{key::KeyPrefix, ApiKeyLayer, Collection, NewKey};
use support::{get_with, ring, CountingStore};

fn setup() -> (Arc<CountingStore>, ApiKeyLayer, axum::Router) {
    let store = Arc::new(CountingStore::slow(Duration::from_millis(50)));
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .collection(Collection::new("users"))
        .build()
        .unwrap();
    let app = support::app().layer(layer.clone());
    (store, layer, app)
}

async fn concurrently(app: &axum::Router, key: &str, n: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let app = app.clone();
            let key = key.to_owned();
            tokio::spawn(async move {
                get_with(&app, "/whoami", &[("x-api-key", key.as_bytes())])
                    .await
                    .status
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::with_capacity(n);
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_unknown_keys_make_one_query() {
    let (store, _, app) = setup();
    let unknown = KeyPrefix::new("kw_live").unwrap().generate();
    let statuses = concurrently(&app, unknown.expose(), 1000).await;
    assert!(statuses.iter().all(|&s| s == 401));
    assert_eq!(store.lookups(), 1);
    // The not-found result is cached too.
    concurrently(&app, unknown.expose(), 10).await;
    assert_eq!(store.lookups(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_valid_requests_make_one_query() {
    let (store, layer, app) = setup();
    let manager = keywarden::KeyManager::for_layer(&layer);
    let key = manager.create(NewKey::new("k", "alice")).await.unwrap().key;
    let statuses = concurrently(&app, key.expose(), 1000).await;
    assert!(statuses.iter().all(|&s| s == 200));
    assert_eq!(store.lookups(), 1);
}

#[tokio::test]
async fn malformed_keys_never_reach_the_store() {
    let (store, _, app) = setup();
    let good = KeyPrefix::new("kw_live").unwrap().generate();
    let mut bad_checksum = good.expose().to_owned();
    bad_checksum.pop();
    bad_checksum.push(if good.expose().ends_with('0') {
        '1'
    } else {
        '0'
    });
    for value in [bad_checksum.as_str(), "kw_live_x", "kw_prod_abc", "a b", ""] {
        let reply = get_with(&app, "/whoami", &[("x-api-key", value.as_bytes())]).await;
        assert_eq!(reply.code(), "malformed_key", "{value:?}");
    }
    let reply = get_with(
        &app,
        "/whoami",
        &[("authorization", b"nobody API-Key kw_live_x")],
    )
    .await;
    assert_eq!(reply.code(), "invalid_key");
    assert_eq!(store.lookups(), 0);
}

#[tokio::test]
async fn cache_capacity_zero_queries_the_store_on_every_request() {
    let store = Arc::new(CountingStore::default());
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .collection(Collection::new("users"))
        .cache_capacity(0)
        .build()
        .unwrap();
    let app = support::app().layer(layer.clone());
    let manager = keywarden::KeyManager::for_layer(&layer);
    let created = manager.create(NewKey::new("k", "alice")).await.unwrap();
    let key = created.key;
    for n in 1..=3 {
        let reply = get_with(&app, "/whoami", &[("x-api-key", key.expose().as_bytes())]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(store.lookups(), n, "one store query per request");
    }
    assert_eq!(layer.cached_entries().await, 0);
    // Revocation needs no invalidation when nothing is cached.
    manager.revoke(created.record.id).await.unwrap();
    let reply = get_with(&app, "/whoami", &[("x-api-key", key.expose().as_bytes())]).await;
    assert_eq!(reply.code(), "revoked_key");
    // Malformed keys still cost no query.
    let reply = get_with(&app, "/whoami", &[("x-api-key", b"kw_live_nope")]).await;
    assert_eq!(reply.code(), "malformed_key");
    assert_eq!(store.lookups(), 4);
}
