//! Owner policies: a rate limit and/or credits all of an owner's keys share, stored per owner,
//! through the layer (memory, SQLite, PostgreSQL, Redis limits), the feed, the management API
//! and the CLI's manager.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use keywarden::ratelimit::RateLimitPolicy;
use keywarden::secret::{Digest, SecretId};
use keywarden::store::{
    Credits, KeyPage, KeyPatch, KeyQuery, KeyRecord, KeyUsage, OwnerPolicy, OwnerPolicyUpdate,
    StoreError, StoreErrorKind,
};
use keywarden::{ApiKeyLayer, Collection, KeyManager, KeyStore, NewKey};
use serde_json::json;
use support::*;
use tower::ServiceExt;

fn policy(text: &str) -> RateLimitPolicy {
    text.parse().unwrap()
}

fn get_req(key: &str) -> Request<Body> {
    Request::builder()
        .uri("/whoami")
        .header("x-api-key", key)
        .body(Body::empty())
        .unwrap()
}

async fn by_key(app: &Router, key: &str) -> Reply {
    send(app, get_req(key)).await
}

fn credits_left(reply: &Reply) -> Option<u64> {
    reply
        .headers
        .get("credits-remaining")
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

async fn key_of(manager: &KeyManager, new: NewKey) -> (uuid::Uuid, String) {
    let created = manager.create(new).await.unwrap();
    (created.record.id, created.key.expose().to_owned())
}

#[tokio::test]
async fn a_stored_owner_rate_limit_is_shared_and_replaces_the_collections() {
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(keywarden::MemoryStore::new()) as Arc<dyn KeyStore>)
        .secrets(ring())
        .collection(Collection::new("users").owner_rate_limit(policy("10/h")))
        .build()
        .unwrap();
    let manager = KeyManager::for_layer(&layer);
    let (_, a1) = key_of(&manager, NewKey::new("a1", "alice")).await;
    let (_, a2) = key_of(&manager, NewKey::new("a2", "alice")).await;
    let (_, bob) = key_of(&manager, NewKey::new("b", "bob")).await;
    let app = support::app().layer(layer);
    // Cached before the policy exists: the change must reach the cache.
    assert_eq!(by_key(&app, &a1).await.status, 200);

    manager
        .set_owner_policy(
            "users",
            "alice",
            OwnerPolicyUpdate::default().rate_limit(Some(policy("3/h"))),
        )
        .await
        .unwrap();
    // Alice's stored 3/h replaces the collection's 10/h for her, across both keys, in a
    // budget of its own (the request spent under the collection's does not count).
    let mut accepted = 0;
    for key in [&a1, &a2, &a1, &a2] {
        let reply = by_key(&app, key).await;
        if reply.status == 200 {
            accepted += 1;
            assert_eq!(reply.headers["ratelimit-limit"], "3");
        } else {
            assert_eq!(reply.code(), "rate_limited");
            assert_eq!(
                reply.json()["detail"],
                "too many requests for this key's owner"
            );
        }
    }
    assert_eq!(accepted, 3, "3 per hour for all of alice's keys");
    // Bob keeps the collection's budget.
    for _ in 0..10 {
        assert_eq!(by_key(&app, &bob).await.status, 200);
    }
    assert_eq!(by_key(&app, &bob).await.status, 429);

    // Removing the policy gives alice the collection's limit again.
    manager.delete_owner_policy("users", "alice").await.unwrap();
    let reply = by_key(&app, &a2).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["ratelimit-limit"], "10");
    assert_eq!(
        reply.headers["ratelimit-remaining"], "8",
        "the collection's budget, where the first request was spent"
    );
}

#[tokio::test]
async fn an_owners_keys_spend_its_shared_credits_and_their_own() {
    let fx = Fixture::new();
    let (own_id, own) = key_of(&fx.manager, NewKey::new("own", "alice").credits(100)).await;
    let (_, free) = key_of(&fx.manager, NewKey::new("free", "alice")).await;
    let (_, bob) = key_of(&fx.manager, NewKey::new("bob", "bob")).await;
    fx.manager
        .set_owner_policy(
            "users",
            "alice",
            OwnerPolicyUpdate::default().credits(Some(5)),
        )
        .await
        .unwrap();
    let app = fx.app();
    // The fewer credits left is reported: the owner's.
    let mut left = Vec::new();
    let mut via_own = 0;
    for key in [&own, &free, &own, &free, &own] {
        let reply = by_key(&app, key).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        left.push(credits_left(&reply).unwrap());
        via_own += usize::from(key == &own);
    }
    assert_eq!(left, [4, 3, 2, 1, 0]);
    for key in [&own, &free] {
        let reply = by_key(&app, key).await;
        assert_eq!(reply.status, 429);
        assert_eq!(reply.code(), "usage_exceeded");
        assert_eq!(
            reply.json()["detail"],
            "the credits this key's owner shares with its other keys are used up"
        );
    }
    // Another owner is untouched; a key without credits of its own reports none.
    let reply = by_key(&app, &bob).await;
    assert_eq!(reply.status, 200);
    assert_eq!(credits_left(&reply), None);

    // The key's own credits paid only for accepted requests: what the owner refused came back.
    fx.layer.return_credits().await;
    let own_record = fx.store.get(own_id).await.unwrap().unwrap();
    assert_eq!(own_record.credits, Some(Credits::new(100 - via_own as u64)));
    let owner = fx
        .manager
        .owner_policy("users", "alice")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(owner.credits, Some(Credits::new(0)));

    // New credits for the owner reach the cached keys at once.
    fx.manager
        .set_owner_policy(
            "users",
            "alice",
            OwnerPolicyUpdate::default().credits(Some(1)),
        )
        .await
        .unwrap();
    assert_eq!(by_key(&app, &free).await.status, 200);
    assert_eq!(by_key(&app, &own).await.code(), "usage_exceeded");
}

#[tokio::test]
async fn a_route_cost_and_a_scope_refusal_count_for_the_owner_too() {
    use keywarden::Cost;
    let fx = Fixture::new();
    let (_, key) = key_of(&fx.manager, NewKey::new("k", "carol")).await;
    fx.manager
        .set_owner_policy(
            "users",
            "carol",
            OwnerPolicyUpdate::default().credits(Some(10)),
        )
        .await
        .unwrap();
    let app = support::app()
        .route(
            "/expensive",
            axum::routing::get(|| async { "done" }).route_layer(Cost::new(4)),
        )
        .layer(fx.layer.clone());
    let reply = send(
        &app,
        Request::builder()
            .uri("/expensive")
            .header("x-api-key", &key)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(credits_left(&reply), Some(6));
    // Refused for a scope the key lacks: the owner's credit comes back.
    let reply = send(
        &app,
        Request::builder()
            .uri("/admin")
            .header("x-api-key", &key)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 403);
    let reply = by_key(&app, &key).await;
    assert_eq!(credits_left(&reply), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_set_by_another_process_arrives_through_the_change_feed() {
    let dir = TempDir::new("owner_feed");
    let url = dir.db_url();
    let serving = Arc::new(keywarden::SqliteStore::connect(&url).await.unwrap());
    let layer = ApiKeyLayer::builder()
        .store(serving.clone())
        .secrets(ring())
        .collection(Collection::new("users"))
        .build()
        .unwrap();
    let _listener = keywarden::invalidation::InvalidationListener::builder(&layer)
        .poll_every(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    // The CLI: its own connection, no layer to tell.
    let cli = KeyManager::new(
        Arc::new(keywarden::SqliteStore::connect(&url).await.unwrap()),
        ring(),
    );
    let (_, key) = key_of(&cli, NewKey::new("k", "dora")).await;
    let app = support::app().layer(layer.clone());
    assert_eq!(by_key(&app, &key).await.status, 200, "cached, unlimited");
    cli.set_owner_policy(
        "users",
        "dora",
        OwnerPolicyUpdate::default().credits(Some(0)),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = by_key(&app, &key).await;
        if reply.status == 429 {
            assert_eq!(reply.code(), "usage_exceeded");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the policy never reached the serving layer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_layers_on_postgres_accept_exactly_the_owners_budget() {
    use keywarden::PostgresStore;
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_owners");
    let pg_a = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let pg_b = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let layer = |store: PostgresStore| {
        ApiKeyLayer::builder()
            .store(Arc::new(store))
            .secrets(ring())
            .collection(Collection::new("users"))
            .build()
            .unwrap()
    };
    let (layer_a, layer_b) = (layer(pg_a.clone()), layer(pg_b.clone()));
    let manager = KeyManager::for_layer(&layer_a);
    let mut keys = Vec::new();
    for name in ["one", "two", "three", "four"] {
        keys.push(key_of(&manager, NewKey::new(name, "erin")).await.1);
    }
    manager
        .set_owner_policy(
            "users",
            "erin",
            OwnerPolicyUpdate::default().credits(Some(500)),
        )
        .await
        .unwrap();
    let apps = [
        support::app().layer(layer_a.clone()),
        support::app().layer(layer_b.clone()),
    ];
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..2_000 {
        let app = apps[i % 2].clone();
        let key = keys[(i / 2) % keys.len()].clone();
        let accepted = accepted.clone();
        tasks.spawn(async move {
            let reply = Reply::from(app.oneshot(get_req(&key)).await.unwrap()).await;
            match reply.status.as_u16() {
                200 => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                _ => assert_eq!(reply.code(), "usage_exceeded", "{}", reply.text()),
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        500,
        "exactly the owner's budget, across four keys and two layers"
    );
    layer_a.return_credits().await;
    layer_b.return_credits().await;
    let owner = pg_a.owner_policy("users", "erin").await.unwrap().unwrap();
    assert_eq!(owner.credits, Some(Credits::new(0)));
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pg_a.pool())
        .await
        .unwrap();
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_owner_rate_limit_holds_across_instances_with_redis() {
    use keywarden::{ratelimit::RateLimiter, redis::RedisBackend, MemoryStore};
    let Some(url) = service_url("KEYWARDEN_TEST_REDIS_URL") else {
        return;
    };
    let backend = RedisBackend::connect(&url, &unique("kwtest"))
        .await
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let instance = || {
        ApiKeyLayer::builder()
            .store(store.clone() as Arc<dyn KeyStore>)
            .secrets(ring())
            .collection(Collection::new("users"))
            .rate_limiter(RateLimiter::redis(&backend))
            .usage_flush_interval(None)
            .build()
            .unwrap()
    };
    let (a, b) = (instance(), instance());
    let manager = KeyManager::for_layer(&a).invalidates(&b);
    let (_, k1) = key_of(&manager, NewKey::new("one", "fay")).await;
    let (_, k2) = key_of(&manager, NewKey::new("two", "fay")).await;
    manager
        .set_owner_policy(
            "users",
            "fay",
            OwnerPolicyUpdate::default().rate_limit(Some(policy("5/h"))),
        )
        .await
        .unwrap();
    let (app_a, app_b) = (support::app().layer(a), support::app().layer(b));
    let allowed = |app: Router, key: String| async move {
        let mut ok = 0;
        for _ in 0..10 {
            let reply = by_key(&app, &key).await;
            match reply.status.as_u16() {
                200 => ok += 1,
                _ => assert_eq!(reply.code(), "rate_limited"),
            }
        }
        ok
    };
    let (r1, r2, r3, r4) = tokio::join!(
        allowed(app_a.clone(), k1.clone()),
        allowed(app_b.clone(), k1),
        allowed(app_a, k2.clone()),
        allowed(app_b, k2),
    );
    assert_eq!(r1 + r2 + r3 + r4, 5, "{r1} + {r2} + {r3} + {r4}");
}

#[cfg(feature = "manage-api")]
#[tokio::test]
async fn the_management_api_sets_shows_and_removes_owner_policies() {
    let api = ManagementApi::new().await;
    let (_, own) = key_of(
        &api.fx.manager,
        NewKey::new("self", "gil").scope("keys:self"),
    )
    .await;
    let uri = "/admin/owners/users/gil";

    // Only keys:admin sets a policy; the owner's own key may read it.
    let refused = api
        .call("PATCH", uri, &own, Some(json!({ "credits": 10 })))
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.code(), "insufficient_scope");
    let none = api.call("GET", uri, &api.admin, None).await;
    assert_eq!(none.status, 404);

    let set = api
        .call(
            "PATCH",
            uri,
            &api.admin,
            Some(json!({ "rate_limit": "600/min", "credits": 1000, "refill": "1000/day" })),
        )
        .await;
    assert_eq!(set.status, 200, "{}", set.text());
    let body = set.json();
    assert_eq!(body["collection"], "users");
    assert_eq!(body["subject"], "gil");
    assert_eq!(body["rate_limit"], "600/min");
    assert_eq!(body["credits"], 1000);
    assert_eq!(body["refill"], "1000/day");

    // Members left out stay; null removes.
    let changed = api
        .call(
            "PATCH",
            uri,
            &api.admin,
            Some(json!({ "rate_limit": null })),
        )
        .await;
    assert_eq!(changed.status, 200);
    assert_eq!(changed.json()["rate_limit"], serde_json::Value::Null);
    assert_eq!(changed.json()["credits"], 1000);

    // The owner's own request spent from the shared credits: this instance leased a block
    // (the balance shown does not count it).
    let mine = api.call("GET", uri, &own, None).await;
    assert_eq!(mine.status, 200);
    assert_eq!(mine.json()["credits"], 900);
    assert_eq!(mine.headers["credits-remaining"], "999");
    let other = api
        .call("GET", "/admin/owners/users/root", &own, None)
        .await;
    assert_eq!(other.status, 403);
    let listed = api.call("GET", "/admin/owners", &own, None).await;
    assert_eq!(listed.status, 403);
    let listed = api
        .call("GET", "/admin/owners?collection=users", &api.admin, None)
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json().as_array().unwrap().len(), 1);
    let listed = api
        .call("GET", "/admin/owners?collection=teams", &api.admin, None)
        .await;
    assert_eq!(listed.json().as_array().unwrap().len(), 0, "filtered");
    for (uri, field) in [
        (
            "/admin/owners?collection=users&collection=teams",
            "collection",
        ),
        ("/admin/owners?subject=gil", "query"),
    ] {
        let reply = api.call("GET", uri, &api.admin, None).await;
        assert_eq!(ManagementApi::field_error(&reply).0, field, "{uri}");
    }

    // Bad input: 422 naming the field, never the value.
    for (body, field) in [
        (json!({ "credits": -1 }), "credits"),
        (json!({ "credits": "lots" }), "credits"),
        (json!({ "refill": "5/fortnight" }), "refill"),
        (json!({ "rate_limit": "fast" }), "rate_limit"),
        (json!({ "credits": null, "refill": "1/day" }), "refill"),
        (json!({}), "rate_limit"),
        (json!({ "owner": "x" }), "body"),
    ] {
        let reply = api.call("PATCH", uri, &api.admin, Some(body.clone())).await;
        let (got, _) = ManagementApi::field_error(&reply);
        assert_eq!(got, field, "{body}");
    }
    let unknown = api
        .call(
            "PATCH",
            "/admin/owners/galaxies/gil",
            &api.admin,
            Some(json!({ "credits": 1 })),
        )
        .await;
    assert_eq!(ManagementApi::field_error(&unknown).0, "collection");

    // Audited.
    let audit = api
        .call("GET", "/admin/audit?action=owner.updated", &api.admin, None)
        .await;
    assert_eq!(audit.status, 200, "{}", audit.text());
    let events = audit.json()["items"].as_array().unwrap().clone();
    assert_eq!(events.len(), 2);
    assert_eq!(
        (
            events[0]["collection"].clone(),
            events[0]["subject"].clone()
        ),
        (json!("users"), json!("gil")),
        "filed under the owner"
    );
    assert_eq!(
        events[0]["changes"]["credits"],
        json!({ "from": null, "to": 1000 })
    );
    assert_eq!(
        events[0]["changes"]["refill"],
        json!({ "from": null, "to": "1000/day" })
    );
    assert_eq!(
        events[1]["changes"]["rate_limit"],
        json!({ "from": "600/min", "to": null })
    );
    assert!(events[1]["changes"].get("credits").is_none(), "unchanged");
    let by_owner = api
        .call("GET", "/admin/audit?subject=gil", &api.admin, None)
        .await;
    assert!(by_owner.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "owner.updated"));

    // A path that is not two UTF-8 segments: a problem, not a bare 400.
    let garbled = api
        .call("GET", "/admin/owners/users/%FF", &api.admin, None)
        .await;
    assert_eq!(garbled.status, 400);
    assert_eq!(garbled.code(), "invalid_request");
    let slash = api
        .call("GET", "/admin/owners/users/org%2Fteam", &api.admin, None)
        .await;
    assert_eq!(slash.status, 404, "an encoded slash is part of the subject");

    // Nothing left to limit: the policy goes.
    let emptied = api
        .call("PATCH", uri, &api.admin, Some(json!({ "credits": null })))
        .await;
    assert_eq!(emptied.status, 200, "{}", emptied.text());
    assert_eq!(
        (
            emptied.json()["rate_limit"].clone(),
            emptied.json()["credits"].clone()
        ),
        (serde_json::Value::Null, serde_json::Value::Null)
    );
    assert_eq!(api.call("GET", uri, &api.admin, None).await.status, 404);
    let recreated = api
        .call("PATCH", uri, &api.admin, Some(json!({ "credits": 1000 })))
        .await;
    assert_eq!(recreated.status, 200);

    let deleted = api.call("DELETE", uri, &api.admin, None).await;
    assert_eq!(deleted.status, 204);
    let audit = api
        .call("GET", "/admin/audit?action=owner.deleted", &api.admin, None)
        .await;
    assert_eq!(
        audit.json()["items"][0]["changes"]["credits"],
        json!({ "from": 900, "to": null }),
        "what was removed is recorded (the balance without this instance's lease)"
    );
    assert_eq!(audit.json()["items"].as_array().unwrap().len(), 2);
    let again = api.call("DELETE", uri, &api.admin, None).await;
    assert_eq!(again.status, 404);
    assert_eq!(again.code(), "not_found");
    assert_eq!(again.json()["title"], "No owner policy");
}

#[tokio::test]
async fn a_key_out_of_credits_spends_none_of_its_owners_rate_limit() {
    let fx = Fixture::new();
    let (_, spent) = key_of(&fx.manager, NewKey::new("spent", "hal").credits(1)).await;
    let (_, sibling) = key_of(&fx.manager, NewKey::new("sibling", "hal")).await;
    fx.manager
        .set_owner_policy(
            "users",
            "hal",
            OwnerPolicyUpdate::default().rate_limit(Some(policy("3/h"))),
        )
        .await
        .unwrap();
    let app = fx.app();
    assert_eq!(by_key(&app, &spent).await.status, 200);
    // Retries of a key with no credits left are refused for its credits, and give back the
    // owner's rate budget they passed through.
    for _ in 0..5 {
        assert_eq!(by_key(&app, &spent).await.code(), "usage_exceeded");
    }
    for remaining in ["1", "0"] {
        let reply = by_key(&app, &sibling).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.headers["ratelimit-remaining"], remaining);
    }
    assert_eq!(by_key(&app, &sibling).await.code(), "rate_limited");
}

#[tokio::test]
async fn raising_an_owners_rate_limit_takes_effect_at_once() {
    let fx = Fixture::new();
    let (_, key) = key_of(&fx.manager, NewKey::new("k", "ivy")).await;
    let set = |rate: &'static str| {
        let manager = fx.manager.clone();
        async move {
            manager
                .set_owner_policy(
                    "users",
                    "ivy",
                    OwnerPolicyUpdate::default().rate_limit(Some(policy(rate))),
                )
                .await
                .unwrap();
        }
    };
    set("2/h").await;
    let app = fx.app();
    assert_eq!(by_key(&app, &key).await.status, 200);
    assert_eq!(by_key(&app, &key).await.status, 200);
    assert_eq!(by_key(&app, &key).await.code(), "rate_limited");
    // The customer's plan is raised: a fresh budget under the new limit, not what is left of
    // the old one's window.
    set("1000/h").await;
    let reply = by_key(&app, &key).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["ratelimit-limit"], "1000");
    assert_eq!(reply.headers["ratelimit-remaining"], "999");
}

/// A memory store that tells its layers nothing (no change observers), so only the
/// manager's own invalidation reaches them; `delete_owner_policy` can be made to find nothing
/// (another process removed the policy first) or to fail.
#[derive(Debug, Default)]
struct Quiet {
    inner: keywarden::MemoryStore,
    /// 0: forward; 1: the policy vanished meanwhile; 2: the store fails.
    delete_mode: AtomicUsize,
}

#[async_trait::async_trait]
impl KeyStore for Quiet {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(record).await
    }
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.find_by_digest(digest).await
    }
    async fn get(&self, id: uuid::Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get(id).await
    }
    async fn update(
        &self,
        id: uuid::Uuid,
        patch: &KeyPatch,
        now: time::OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.update(id, patch, now).await
    }
    async fn add_digest(
        &self,
        id: uuid::Uuid,
        old: &Digest,
        new: &Digest,
        secret_id: SecretId,
    ) -> Result<bool, StoreError> {
        self.inner.add_digest(id, old, new, secret_id).await
    }
    async fn delete(&self, id: uuid::Uuid) -> Result<Option<KeyRecord>, StoreError> {
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
        change: keywarden::store::KeyChange<'_>,
        audit: &keywarden::store::AuditWrite<'_>,
    ) -> Result<keywarden::store::Applied, StoreError> {
        self.inner.apply_audited(change, audit).await
    }
    async fn owner_policy(
        &self,
        collection: &str,
        subject: &str,
    ) -> Result<Option<OwnerPolicy>, StoreError> {
        self.inner.owner_policy(collection, subject).await
    }
    async fn set_owner_policy(
        &self,
        collection: &str,
        subject: &str,
        update: &OwnerPolicyUpdate,
        now: time::OffsetDateTime,
    ) -> Result<OwnerPolicy, StoreError> {
        self.inner
            .set_owner_policy(collection, subject, update, now)
            .await
    }
    async fn delete_owner_policy(
        &self,
        collection: &str,
        subject: &str,
    ) -> Result<Option<OwnerPolicy>, StoreError> {
        match self.delete_mode.load(Ordering::SeqCst) {
            0 => self.inner.delete_owner_policy(collection, subject).await,
            1 => {
                self.inner.delete_owner_policy(collection, subject).await?;
                Ok(None)
            }
            _ => Err(StoreError::new(StoreErrorKind::Unavailable, "down")),
        }
    }
}

impl Quiet {
    /// A layer over a new quiet store, serving `users`, and its manager.
    fn layer() -> (Arc<Quiet>, ApiKeyLayer, KeyManager) {
        let store = Arc::new(Quiet::default());
        let layer = ApiKeyLayer::builder()
            .store(store.clone())
            .secrets(ring())
            .collection(Collection::new("users"))
            .build()
            .unwrap();
        let manager = KeyManager::for_layer(&layer);
        (store, layer, manager)
    }
}

/// The manager drops every key of the owner from the caches of the layers it was told about,
/// even when their store tells them nothing: a new limit applies at once there too.
#[tokio::test]
async fn a_policy_change_reaches_a_layer_whose_store_tells_it_nothing() {
    let (_store, layer, manager) = Quiet::layer();
    let (_, key) = key_of(&manager, NewKey::new("k", "una")).await;
    let (_, other) = key_of(&manager, NewKey::new("k2", "una")).await;
    let app = app().layer(layer.clone());
    assert_eq!(by_key(&app, &key).await.status, 200, "cached");
    assert_eq!(by_key(&app, &other).await.status, 200, "cached");
    manager
        .set_owner_policy(
            "users",
            "una",
            OwnerPolicyUpdate::default().rate_limit(Some(policy("1/h"))),
        )
        .await
        .unwrap();
    assert_eq!(by_key(&app, &key).await.status, 200);
    assert_eq!(by_key(&app, &other).await.code(), "rate_limited");
}

/// Removing everything an owner's policy limits deletes it; a policy another process removed
/// meanwhile is no error, a store that fails is.
#[tokio::test]
async fn emptying_a_policy_deletes_it_and_only_a_real_failure_is_an_error() {
    let (store, _layer, manager) = Quiet::layer();
    let limit = || OwnerPolicyUpdate::default().rate_limit(Some(policy("5/h")));
    let empty = || OwnerPolicyUpdate::default().rate_limit(None);
    for mode in [0, 1] {
        manager
            .set_owner_policy("users", "vic", limit())
            .await
            .unwrap();
        store.delete_mode.store(mode, Ordering::SeqCst);
        let emptied = manager
            .set_owner_policy("users", "vic", empty())
            .await
            .unwrap();
        assert!(emptied.rate_limit.is_none() && emptied.credits.is_none());
        assert!(manager
            .owner_policy("users", "vic")
            .await
            .unwrap()
            .is_none());
        store.delete_mode.store(0, Ordering::SeqCst);
    }
    manager
        .set_owner_policy("users", "vic", limit())
        .await
        .unwrap();
    store.delete_mode.store(2, Ordering::SeqCst);
    let error = manager
        .set_owner_policy("users", "vic", empty())
        .await
        .expect_err("the store failed");
    assert_eq!(error.kind(), keywarden::manage::ManageErrorKind::Store);
    // Through the API, a failing store is a 503, not a policy that is not there.
    let api = Router::new()
        .nest(
            "/admin",
            keywarden::manage::management_router(Arc::new(manager)),
        )
        .layer(axum::Extension(
            keywarden::testing::PrincipalBuilder::new("test")
                .scopes(["keys:admin"])
                .build(),
        ));
    let request = Request::builder()
        .method("DELETE")
        .uri("/admin/owners/users/vic")
        .body(Body::empty())
        .unwrap();
    let reply = send(&api, request).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
}
