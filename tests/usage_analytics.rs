//! Per-key usage analytics (issue 14 §2) on every store: requests through a real router are
//! counted per key, hour and outcome (written behind by the usage flush, never per request);
//! rejections no key can be blamed for are counted per collection; reports by hour and day;
//! the HTTP API gives a key's report to whoever may see the key.
#![cfg(all(feature = "sqlite", feature = "postgres", feature = "manage-api"))]

mod support;

use std::sync::Arc;

use axum::Router;
use keywarden::clock::{Clock, ManualClock};
use keywarden::manage::{Granularity, UsageQuery};
use keywarden::{
    management_router, ApiKeyLayer, Collection, ExpiresIn, KeyManager, KeyStore, MemoryStore,
    NewKey,
};
use support::{get_with, request, send};
use time::{Duration, OffsetDateTime};

fn layer(store: &Arc<dyn KeyStore>, clock: &ManualClock) -> ApiKeyLayer {
    ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(support::ring())
        .clock(Arc::new(clock.clone()))
        .collection(Collection::new("users"))
        .build()
        .unwrap()
}

#[tokio::test]
async fn outcomes_are_counted_per_key_and_per_collection_on_every_store() {
    for (name, store, pg) in support::every_store("usage").await {
        // A minute into the hour: the uses below, and the clock 10 minutes later, are in one
        // hourly bucket whatever the time the test runs.
        let start = OffsetDateTime::now_utc()
            .replace_minute(1)
            .and_then(|t| t.replace_second(0))
            .unwrap();
        let clock = ManualClock::new(start);
        let layer = layer(&store, &clock);
        let manager = KeyManager::for_layer(&layer);
        let app = support::app().layer(layer.clone());
        let limited = manager
            .create(NewKey::new("limited", "alice").rate_limit("2/min".parse().unwrap()))
            .await
            .unwrap();
        let revoked = manager.create(NewKey::new("gone", "bob")).await.unwrap();
        manager.revoke(revoked.record.id).await.unwrap();
        let expiring = manager
            .create(
                NewKey::new("short", "carol").expires_in(ExpiresIn::After(Duration::minutes(5))),
            )
            .await
            .unwrap();
        let reader = manager
            .create(NewKey::new("reader", "dave").read_only(true))
            .await
            .unwrap();
        let get = |key: String| {
            let app = app.clone();
            async move {
                get_with(&app, "/whoami", &[("x-api-key", key.as_bytes())])
                    .await
                    .status
            }
        };
        for expected in [200, 200, 429] {
            assert_eq!(
                get(limited.key.expose().to_owned()).await,
                expected,
                "{name}"
            );
        }
        assert_eq!(get(revoked.key.expose().to_owned()).await, 401);
        assert_eq!(get(expiring.key.expose().to_owned()).await, 200);
        clock.advance(Duration::minutes(10));
        assert_eq!(get(expiring.key.expose().to_owned()).await, 401);
        let write = send(
            &app,
            request(
                "POST",
                "/write",
                &[("x-api-key", reader.key.expose().as_bytes())],
            ),
        )
        .await;
        assert_eq!(write.status, 403, "{name}");
        // Rejections no key is blamed for: per the collection the credential named.
        let deleted = manager
            .create(NewKey::new("deleted", "erin"))
            .await
            .unwrap();
        manager.delete(deleted.record.id).await.unwrap();
        let unknown = format!("users API-Key {}", deleted.key.expose());
        let reply = get_with(&app, "/whoami", &[("authorization", unknown.as_bytes())]).await;
        assert_eq!(reply.status, 401);
        let reply = get_with(&app, "/whoami", &[("x-api-key", b"not a key")]).await;
        assert_eq!(reply.status, 401);
        // No key at all is not a rejection of anyone.
        assert_eq!(get_with(&app, "/whoami", &[]).await.status, 401);

        layer.flush_usage().await.unwrap();
        let now = clock.now();
        let day = UsageQuery::last(Duration::days(1), now, Granularity::Hour);
        let report = manager.usage(limited.record.id, &day).await.unwrap();
        assert_eq!(
            report.buckets.len(),
            25,
            "{name}: every hour, zeros included"
        );
        assert_eq!(
            (
                report.total.accepted,
                report.total.rate_limited,
                report.total.rejected
            ),
            (2, 1, 1),
            "{name}"
        );
        let hour = report
            .buckets
            .iter()
            .find(|b| b.accepted > 0)
            .expect("a bucket with the uses");
        assert!(hour.start <= now && now - hour.start < Duration::hours(1));
        let report = manager.usage(revoked.record.id, &day).await.unwrap();
        assert_eq!(
            (report.total.revoked, report.total.accepted),
            (1, 0),
            "{name}"
        );
        let report = manager.usage(expiring.record.id, &day).await.unwrap();
        assert_eq!(
            (report.total.accepted, report.total.expired),
            (1, 1),
            "{name}"
        );
        let report = manager.usage(reader.record.id, &day).await.unwrap();
        assert_eq!(report.total.insufficient_scope, 1, "{name}");
        let users = manager.collection_usage("users", &day).await.unwrap();
        assert_eq!(users.total.invalid, 1, "{name}");
        let unnamed = manager.collection_usage("", &day).await.unwrap();
        assert_eq!(unnamed.total.malformed, 1, "{name}");

        // A second flush adds to the same hour (the budget has refilled meanwhile); by day it
        // is one bucket.
        assert_eq!(get(limited.key.expose().to_owned()).await, 200);
        layer.flush_usage().await.unwrap();
        let week = UsageQuery::last(Duration::days(7), now, Granularity::Day);
        let report = manager.usage(limited.record.id, &week).await.unwrap();
        assert_eq!(report.buckets.len(), 8, "{name}");
        assert_eq!(
            (report.total.accepted, report.total.rate_limited),
            (3, 1),
            "{name}"
        );
        assert_eq!(report.buckets.iter().filter(|b| b.rejected > 0).count(), 1);

        // Spans are bounded, and retention prunes.
        let long = UsageQuery::last(Duration::days(40), now, Granularity::Hour);
        assert!(manager.usage(limited.record.id, &long).await.is_err());
        clock.advance(Duration::days(100));
        assert!(
            manager.prune_usage(Duration::days(90)).await.unwrap() >= 6,
            "{name}"
        );
        let report = manager.usage(limited.record.id, &week).await.unwrap();
        assert_eq!(report.total.accepted + report.total.rejected, 0, "{name}");
        support::drop_schema(pg).await;
    }
}

#[tokio::test]
async fn a_keys_report_has_the_keys_authorization() {
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let layer = layer(&store, &clock);
    let manager = Arc::new(KeyManager::for_layer(&layer));
    let app = Router::new()
        .nest("/admin", management_router(manager.clone()))
        .layer(layer.clone());
    let admin = manager
        .create(NewKey::new("admin", "root").scope("keys:admin"))
        .await
        .unwrap();
    let alice = manager
        .create(NewKey::new("alice", "alice").scope("keys:self"))
        .await
        .unwrap();
    let bob = manager.create(NewKey::new("bob", "bob")).await.unwrap();
    let as_key = |key: &str, uri: String| {
        let app = app.clone();
        let key = key.to_owned();
        async move { get_with(&app, &uri, &[("x-api-key", key.as_bytes())]).await }
    };
    let uri = format!("/admin/keys/{}/usage?granularity=day", alice.record.id);
    assert_eq!(as_key(alice.key.expose(), uri.clone()).await.status, 200);
    layer.flush_usage().await.unwrap();
    let own = as_key(alice.key.expose(), uri).await;
    assert_eq!(own.status, 200, "{}", own.text());
    let body = own.json();
    assert_eq!(body["granularity"], "day");
    assert_eq!(body["buckets"].as_array().unwrap().len(), 31);
    assert!(body["total"]["accepted"].as_u64().unwrap() >= 1, "{body}");
    let other = as_key(
        alice.key.expose(),
        format!("/admin/keys/{}/usage", bob.record.id),
    )
    .await;
    assert_eq!(other.status, 404, "another owner's key is not found");
    let admin_reads = as_key(
        admin.key.expose(),
        format!("/admin/keys/{}/usage", bob.record.id),
    )
    .await;
    assert_eq!(admin_reads.status, 200);
    assert_eq!(admin_reads.json()["buckets"].as_array().unwrap().len(), 169);

    let bad = as_key(
        admin.key.expose(),
        format!(
            "/admin/keys/{}/usage?granularity=week&since=yesterday&kw_live_x=1",
            bob.record.id
        ),
    )
    .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    for field in ["granularity", "since", "query"] {
        assert!(
            bad.text().contains(&format!("\"{field}\"")),
            "{}",
            bad.text()
        );
    }
    assert!(!bad.text().contains("kw_live_x"));
    let too_long = as_key(
        admin.key.expose(),
        format!(
            "/admin/keys/{}/usage?since=2020-01-01T00:00:00Z&until=2021-01-01T00:00:00Z",
            bob.record.id
        ),
    )
    .await;
    assert_eq!(too_long.status, 422, "{}", too_long.text());

    let denied = as_key(alice.key.expose(), "/admin/usage?collection=users".into()).await;
    assert_eq!(denied.status, 403);
    let unattributed = as_key(admin.key.expose(), "/admin/usage?collection=users".into()).await;
    assert_eq!(unattributed.status, 200, "{}", unattributed.text());
    assert_eq!(unattributed.json()["collection"], "users");
    let missing = as_key(admin.key.expose(), "/admin/usage".into()).await;
    assert_eq!(missing.status, 422);
}
