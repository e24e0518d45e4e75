//! `last_used_at` and use counts are written behind, in batches, never per request.

mod support;

use std::sync::Arc;
use std::time::Duration;

use keywarden::{
    clock::Clock, clock::ManualClock, ApiKeyLayer, Collection, KeyManager, KeyStore, NewKey,
};
use support::{get_with, ring, CountingStore};
use time::OffsetDateTime;

#[tokio::test(start_paused = true)]
async fn a_thousand_requests_make_a_handful_of_writes() {
    let store = Arc::new(CountingStore::default());
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .collection(Collection::new("users"))
        .clock(Arc::new(clock.clone()))
        .usage_flush_interval(Some(Duration::from_secs(10)))
        .build()
        .unwrap();
    let app = support::app().layer(layer.clone());
    let manager = KeyManager::for_layer(&layer);
    let a = manager.create(NewKey::new("a", "alice")).await.unwrap();
    let b = manager.create(NewKey::new("b", "bob")).await.unwrap();

    for i in 0..1000 {
        clock.advance(time::Duration::milliseconds(1));
        let key = if i % 4 == 0 { &b.key } else { &a.key };
        let reply = get_with(&app, "/whoami", &[("x-api-key", key.expose().as_bytes())]).await;
        assert_eq!(reply.status, 200);
    }
    let last_request = clock.now();
    assert_eq!(
        store.usage_writes(),
        0,
        "nothing is written on the request path"
    );

    // One flush interval later the background task has written one batch.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(store.usage_writes(), 1);
    let a_now = store.get(a.record.id).await.unwrap().unwrap();
    let b_now = store.get(b.record.id).await.unwrap().unwrap();
    assert_eq!((a_now.use_count, b_now.use_count), (750, 250));
    assert_eq!(a_now.last_used_at, Some(last_request));
    assert_eq!(
        b_now.last_used_at,
        Some(last_request - time::Duration::milliseconds(3))
    );

    // Quiet intervals write nothing.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(store.usage_writes(), 1);

    // At shutdown the last uses are flushed explicitly.
    clock.advance(time::Duration::seconds(5));
    get_with(&app, "/whoami", &[("x-api-key", a.key.expose().as_bytes())]).await;
    layer.flush_usage().await.unwrap();
    assert_eq!(store.usage_writes(), 2);
    let a_now = store.get(a.record.id).await.unwrap().unwrap();
    assert_eq!(a_now.use_count, 751);
    assert_eq!(a_now.last_used_at, Some(clock.now()));
}

#[tokio::test]
async fn usage_tracking_can_be_turned_off() {
    let store = Arc::new(CountingStore::default());
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .usage_flush_interval(None)
        .build()
        .unwrap();
    let key = KeyManager::for_layer(&layer)
        .create(NewKey::new("a", "alice"))
        .await
        .unwrap();
    let app = support::app().layer(layer.clone());
    get_with(
        &app,
        "/whoami",
        &[("x-api-key", key.key.expose().as_bytes())],
    )
    .await;
    layer.flush_usage().await.unwrap();
    assert_eq!(store.usage_writes(), 0);
}

/// With the system clock, the time of use comes from the hit path's one monotonic reading
/// (turned into wall-clock time by an offset taken before every flush): it lies between two
/// wall-clock readings around the requests, to the precision the store keeps.
#[tokio::test]
async fn the_system_clock_dates_uses_from_the_hit_paths_reading() {
    let store = Arc::new(keywarden::MemoryStore::new());
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .collection(Collection::new("users"))
        .usage_flush_interval(Some(Duration::from_secs(3600)))
        .build()
        .unwrap();
    let app = support::app().layer(layer.clone());
    let created = KeyManager::for_layer(&layer)
        .create(NewKey::new("a", "alice"))
        .await
        .unwrap();
    let key = created.key.expose().as_bytes();
    // The first request is a miss (its use is dated too); the rest are hits.
    let before = OffsetDateTime::now_utc();
    for _ in 0..3 {
        let reply = get_with(&app, "/whoami", &[("x-api-key", key)]).await;
        assert_eq!(reply.status, 200);
    }
    let after = OffsetDateTime::now_utc();
    layer.flush_usage().await.unwrap();
    let record = store.get(created.record.id).await.unwrap().unwrap();
    assert_eq!(record.use_count, 3);
    let used = record.last_used_at.expect("a time of use");
    // Stores keep microseconds; allow that, and a millisecond for the two clocks' anchoring.
    let slack = time::Duration::milliseconds(1);
    assert!(
        before - slack <= used && used <= after + slack,
        "{before} <= {used} <= {after}"
    );
}
