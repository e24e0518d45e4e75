//! Credits: a key's budget of uses, spent through the layer (`oneshot`), priced per route
//! with `Cost`, refilled on a schedule, given back when idle or at shutdown, and — the
//! contract — never more accepted than the budget across instances: two layers over one
//! PostgreSQL store, and two `keywarden serve` processes.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::{Extension, Router};
use http::Request;
use keywarden::ratelimit::RateLimitPolicy;
use keywarden::server::AuthServer;
use keywarden::store::{Credits, KeyPatch, Refill};
use keywarden::{
    ApiKeyLayer, Collection, Cost, KeyManager, KeyStore, MemoryStore, NewKey, PostgresStore,
};
use serde_json::{json, Value};
use support::serve::ServeProcess;
use support::{ring, send, service_url, unique, Fixture, ManagementApi, Reply, TempDir, SECRET};
use tower::ServiceExt;

fn get_req(uri: &str, key: &str) -> Request<Body> {
    Request::builder()
        .uri(uri)
        .header("x-api-key", key)
        .body(Body::empty())
        .unwrap()
}

fn remaining(reply: &Reply) -> Option<u64> {
    reply
        .headers
        .get("credits-remaining")
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

async fn balance(store: &dyn KeyStore, id: uuid::Uuid) -> Option<u64> {
    store
        .get(id)
        .await
        .unwrap()
        .unwrap()
        .credits
        .map(|c| c.remaining)
}

#[tokio::test]
async fn each_request_spends_a_credit_and_the_last_is_refused_with_usage_exceeded() {
    let fx = Fixture::new();
    let created = fx.key(NewKey::new("metered", "alice").credits(3)).await;
    assert_eq!(created.record.credits, Some(Credits::new(3)));
    let key = created.key.expose();
    let app = fx.app();
    for left in [2, 1, 0] {
        let reply = send(&app, get_req("/whoami", key)).await;
        assert_eq!(reply.status, 200);
        assert_eq!(remaining(&reply), Some(left));
    }
    let refused = send(&app, get_req("/whoami", key)).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.code(), "usage_exceeded");
    assert!(
        refused.headers.get("retry-after").is_none(),
        "no refill: nothing to wait for"
    );
    assert!(!refused.text().contains(key), "never echoes the key");

    // gRPC clients get RESOURCE_EXHAUSTED.
    let grpc = Request::builder()
        .uri("/whoami")
        .header("x-api-key", key)
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .unwrap();
    let reply = send(&app, grpc).await;
    assert_eq!(reply.headers["grpc-status"], "8");

    // A key without credits reports none and is never refused for them.
    let free = fx.key(NewKey::new("free", "bob")).await;
    let reply = send(&app, get_req("/whoami", free.key.expose())).await;
    assert_eq!(reply.status, 200);
    assert_eq!(remaining(&reply), None);
}

#[tokio::test]
async fn a_refused_request_costs_nothing() {
    let policy: RateLimitPolicy = "3/min".parse().unwrap();
    let fx = Fixture::new();
    let mut new = NewKey::new("metered", "alice").credits(10).read_only(true);
    new.rate_limit = Some(policy);
    let created = fx.key(new).await;
    let key = created.key.expose();
    let app = fx.app();
    // Read-only on a write: refused by the key layer before any credit is taken.
    let write = Request::builder()
        .method("POST")
        .uri("/write")
        .header("x-api-key", key)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, write).await.code(), "insufficient_scope");
    // A scope the route requires: refused inside the key layer, and the credit goes back.
    assert_eq!(
        send(&app, get_req("/admin", key)).await.code(),
        "insufficient_scope"
    );
    for left in [9, 8] {
        let ok = send(&app, get_req("/whoami", key)).await;
        assert_eq!(ok.status, 200);
        assert_eq!(remaining(&ok), Some(left));
    }
    // Over the rate limit (the /admin request counted there): no credit.
    assert_eq!(
        send(&app, get_req("/whoami", key)).await.code(),
        "rate_limited"
    );
    fx.layer.return_credits().await;
    assert_eq!(
        balance(fx.store.as_ref(), created.record.id).await,
        Some(8),
        "only the two accepted requests were charged"
    );
}

#[tokio::test]
async fn a_route_priced_with_cost_charges_the_rest_or_gives_back() {
    let fx = Fixture::new();
    let created = fx.key(NewKey::new("metered", "alice").credits(7)).await;
    let key = created.key.expose();
    let app = Router::new()
        .route("/search", get(|| async { "results" }).layer(Cost::new(5)))
        .route("/health", get(|| async { "ok" }).layer(Cost::new(0)))
        .route("/item", get(|| async { "item" }))
        .layer(fx.layer.clone());

    let reply = send(&app, get_req("/search", key)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(remaining(&reply), Some(2), "the route cost 5");
    // Too few for another search: refused, and the 1 the key layer took goes back.
    let refused = send(&app, get_req("/search", key)).await;
    assert_eq!(refused.code(), "usage_exceeded");
    // Free routes cost nothing.
    for _ in 0..3 {
        let reply = send(&app, get_req("/health", key)).await;
        assert_eq!(reply.status, 200);
        assert_eq!(remaining(&reply), Some(2));
    }
    for left in [1, 0] {
        let reply = send(&app, get_req("/item", key)).await;
        assert_eq!(reply.status, 200);
        assert_eq!(remaining(&reply), Some(left));
    }
    assert_eq!(
        send(&app, get_req("/item", key)).await.code(),
        "usage_exceeded"
    );
    // Inside the key layer a route is priced only once the key layer charged its default 1:
    // a key with nothing left is refused before the route is known (a route free for such
    // keys sets its cost before the key layer, below).
    assert_eq!(
        send(&app, get_req("/health", key)).await.code(),
        "usage_exceeded"
    );
}

#[tokio::test]
async fn a_cost_set_before_the_key_layer_is_charged_at_once() {
    let fx = Fixture::new();
    let created = fx.key(NewKey::new("metered", "alice").credits(10)).await;
    let key = created.key.expose();
    let app = support::app()
        .layer(fx.layer.clone())
        .layer(Extension(Cost::new(3)));
    let reply = send(&app, get_req("/whoami", key)).await;
    assert_eq!(remaining(&reply), Some(7));
    let reply = send(&app, get_req("/whoami", key)).await;
    assert_eq!(remaining(&reply), Some(4));
    let reply = send(&app, get_req("/whoami", key)).await;
    assert_eq!(remaining(&reply), Some(1));
    assert_eq!(
        send(&app, get_req("/whoami", key)).await.code(),
        "usage_exceeded"
    );
    // A cost of 0 set before the key layer: free even for a key with nothing left.
    let free = support::app()
        .layer(fx.layer.clone())
        .layer(Extension(Cost::new(0)));
    let reply = send(&free, get_req("/whoami", key)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(remaining(&reply), Some(1));
}

#[tokio::test]
async fn a_refill_sets_the_balance_again_and_retry_after_points_to_it() {
    let fx = Fixture::new();
    let refill: Refill = "2/min".parse().unwrap();
    let created = fx.key(NewKey::new("metered", "alice").refill(refill)).await;
    assert_eq!(
        created.record.credits,
        Some(Credits::new(2).with_refill(refill))
    );
    let key = created.key.expose();
    let app = fx.app();
    for _ in 0..2 {
        assert_eq!(send(&app, get_req("/whoami", key)).await.status, 200);
    }
    let refused = send(&app, get_req("/whoami", key)).await;
    assert_eq!(refused.code(), "usage_exceeded");
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");

    fx.clock.advance(time::Duration::seconds(61));
    for left in [1, 0] {
        let reply = send(&app, get_req("/whoami", key)).await;
        assert_eq!(reply.status, 200);
        assert_eq!(remaining(&reply), Some(left));
    }
    assert_eq!(
        send(&app, get_req("/whoami", key)).await.code(),
        "usage_exceeded"
    );
}

#[tokio::test]
async fn leased_credits_go_back_at_shutdown_and_when_idle() {
    let fx = Fixture::with(|b| b.credit_leases(100, Duration::from_millis(100)));
    let created = fx.key(NewKey::new("metered", "alice").credits(1_000)).await;
    let id = created.record.id;
    let app = fx.app();
    let reply = send(&app, get_req("/whoami", created.key.expose())).await;
    assert_eq!(remaining(&reply), Some(999));
    // One lease of 100 (an eighth of 1,000 is more) is out.
    assert_eq!(balance(fx.store.as_ref(), id).await, Some(900));
    // Idle: the sweep gives the unspent 99 back.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while balance(fx.store.as_ref(), id).await != Some(999) {
        assert!(std::time::Instant::now() < deadline, "never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Spending leases again; shutdown gives the rest back at once.
    for _ in 0..3 {
        assert_eq!(
            send(&app, get_req("/whoami", created.key.expose()))
                .await
                .status,
            200
        );
    }
    fx.layer.return_credits().await;
    assert_eq!(balance(fx.store.as_ref(), id).await, Some(996));
}

#[tokio::test]
async fn setting_credits_reaches_the_layer_at_once() {
    let fx = Fixture::new();
    let created = fx.key(NewKey::new("metered", "alice").credits(100)).await;
    let key = created.key.expose();
    let app = fx.app();
    assert_eq!(send(&app, get_req("/whoami", key)).await.status, 200);
    // The instance holds a lease; setting the balance voids it.
    let patch = KeyPatch {
        credits: Some(Some(1)),
        ..KeyPatch::default()
    };
    fx.manager.update(created.record.id, patch).await.unwrap();
    let reply = send(&app, get_req("/whoami", key)).await;
    assert_eq!(remaining(&reply), Some(0));
    assert_eq!(
        send(&app, get_req("/whoami", key)).await.code(),
        "usage_exceeded"
    );
    // Unlimited again.
    let patch = KeyPatch {
        credits: Some(None),
        ..KeyPatch::default()
    };
    fx.manager.update(created.record.id, patch).await.unwrap();
    let reply = send(&app, get_req("/whoami", key)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(remaining(&reply), None);
}

#[tokio::test]
async fn an_uncached_layer_charges_each_request_exactly() {
    let fx = Fixture::with(|b| b.cache_capacity(0));
    let created = fx.key(NewKey::new("metered", "alice").credits(3)).await;
    let key = created.key.expose();
    let app = fx.app();
    for left in [2, 1, 0] {
        let reply = send(&app, get_req("/whoami", key)).await;
        assert_eq!(remaining(&reply), Some(left));
        assert_eq!(
            balance(fx.store.as_ref(), created.record.id).await,
            Some(left),
            "nothing held back"
        );
    }
    assert_eq!(
        send(&app, get_req("/whoami", key)).await.code(),
        "usage_exceeded"
    );
}

/// Sends `total` requests with `key` at once, alternating between `apps`; counts the accepted
/// and checks every refusal is `usage_exceeded`.
async fn storm(apps: &[Router], key: &str, total: usize) -> usize {
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let app = apps[i % apps.len()].clone();
        let (key, accepted) = (key.to_owned(), accepted.clone());
        tasks.spawn(async move {
            let reply = Reply::from(app.oneshot(get_req("/whoami", &key)).await.unwrap()).await;
            match reply.status.as_u16() {
                200 => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                _ => assert_eq!(reply.code(), "usage_exceeded"),
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    accepted.load(Ordering::Relaxed)
}

fn pg_layer(store: PostgresStore) -> ApiKeyLayer {
    ApiKeyLayer::builder()
        .store(Arc::new(store))
        .secrets(ring())
        .collection(Collection::new("users"))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_layers_on_postgres_accept_exactly_the_budget() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_credits");
    let pg_a = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let pg_b = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let (layer_a, layer_b) = (pg_layer(pg_a.clone()), pg_layer(pg_b.clone()));
    let manager = KeyManager::for_layer(&layer_a);
    let created = manager
        .create(NewKey::new("metered", "alice").credits(500))
        .await
        .unwrap();
    let apps = [
        support::app().layer(layer_a.clone()),
        support::app().layer(layer_b.clone()),
    ];
    let accepted = storm(&apps, created.key.expose(), 2_000).await;
    assert_eq!(accepted, 500, "exactly the budget, across both layers");
    // Nothing is left anywhere: not in the store, not in either layer.
    layer_a.return_credits().await;
    layer_b.return_credits().await;
    assert_eq!(balance(&pg_a, created.record.id).await, Some(0));

    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pg_a.pool())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_serve_processes_accept_exactly_the_budget() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_credits_serve");
    let store = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let manager = KeyManager::for_layer(&pg_layer(store.clone()));
    let created = manager
        .create(NewKey::new("metered", "alice").credits(500))
        .await
        .unwrap();
    let dir = TempDir::new("credits_serve");
    let sep = if url.contains('?') { '&' } else { '?' };
    let database = format!("{url}{sep}options=-c%20search_path%3D{schema}");
    let spawn = |name: &str| {
        let mut cmd = ServeProcess::command(env!("CARGO_BIN_EXE_keywarden"), dir.path());
        cmd.env("KEYWARDEN_DATABASE_URL", &database)
            .env("KEYWARDEN_SECRET", SECRET)
            .args(["serve", "--addr", "127.0.0.1:0"]);
        ServeProcess::spawn(cmd, dir.path(), name)
    };
    let (mut a, mut b) = (spawn("a"), spawn("b"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    a.wait_healthy(&http).await;
    b.wait_healthy(&http).await;

    let key = created.key.expose().to_owned();
    let accepted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..2_000 {
        let url = if i % 2 == 0 {
            a.url("/v1/auth")
        } else {
            b.url("/v1/auth")
        };
        let (http, key, accepted, refused, limit) = (
            http.clone(),
            key.clone(),
            accepted.clone(),
            refused.clone(),
            limit.clone(),
        );
        tasks.spawn(async move {
            let _permit = limit.acquire().await.unwrap();
            let response = http.get(url).header("x-api-key", key).send().await.unwrap();
            match response.status().as_u16() {
                200 => accepted.fetch_add(1, Ordering::Relaxed),
                429 => {
                    assert_eq!(response.headers()["x-keywarden-code"], "usage_exceeded");
                    refused.fetch_add(1, Ordering::Relaxed)
                }
                other => panic!("unexpected status {other}"),
            };
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(accepted.load(Ordering::Relaxed), 500, "{}", a.stderr());
    assert_eq!(refused.load(Ordering::Relaxed), 1_500);

    // Shut down cleanly: nothing was left to give back, and nothing appears.
    assert!(a.send_sigterm() && b.send_sigterm());
    a.wait_exit(Duration::from_secs(20));
    b.wait_exit(Duration::from_secs(20));
    assert_eq!(balance(&store, created.record.id).await, Some(0));

    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(store.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_shutdown_gives_a_serve_process_lease_back() {
    // The in-process twin of the serve test's shutdown: a layer that leased and stopped
    // gives back everything unspent, so a restart never strands credits.
    let store = Arc::new(MemoryStore::new());
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .collection(Collection::new("users"))
        .build()
        .unwrap();
    let manager = KeyManager::for_layer(&layer);
    let created = manager
        .create(NewKey::new("metered", "alice").credits(800))
        .await
        .unwrap();
    let app = support::app().layer(layer.clone());
    assert_eq!(
        send(&app, get_req("/whoami", created.key.expose()))
            .await
            .status,
        200
    );
    assert_eq!(balance(store.as_ref(), created.record.id).await, Some(700));
    layer.return_credits().await;
    assert_eq!(balance(store.as_ref(), created.record.id).await, Some(799));
}

#[tokio::test]
async fn the_management_api_sets_shows_and_validates_credits() {
    let env = ManagementApi::new().await;
    let reply = env
        .call(
            "POST",
            "/admin/keys",
            &env.admin,
            Some(json!({"name": "partner", "subject": "acme", "credits": 1000, "refill": "1000/day"})),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let created = reply.json();
    assert_eq!(
        (created["credits"].clone(), created["refill"].clone()),
        (json!(1000), json!("1000/day"))
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let plain = env
        .call(
            "POST",
            "/admin/keys",
            &env.admin,
            Some(json!({"name": "free", "subject": "acme"})),
        )
        .await
        .json();
    assert_eq!(
        (plain["credits"].clone(), plain["refill"].clone()),
        (Value::Null, Value::Null)
    );

    // PATCH: a new balance, then unlimited (which drops the refill), then a refill alone.
    let uri = format!("/admin/keys/{id}");
    let reply = env
        .call("PATCH", &uri, &env.admin, Some(json!({"credits": 5})))
        .await;
    assert_eq!(reply.json()["credits"], 5, "{}", reply.text());
    assert_eq!(reply.json()["refill"], "1000/day");
    let reply = env
        .call("PATCH", &uri, &env.admin, Some(json!({"credits": null})))
        .await;
    assert_eq!(
        (
            reply.json()["credits"].clone(),
            reply.json()["refill"].clone()
        ),
        (Value::Null, Value::Null)
    );
    let reply = env
        .call(
            "PATCH",
            &uri,
            &env.admin,
            Some(json!({"refill": "50/month"})),
        )
        .await;
    assert_eq!(
        (
            reply.json()["credits"].clone(),
            reply.json()["refill"].clone()
        ),
        (json!(50), json!("50/month"))
    );
    let reply = env
        .call("PATCH", &uri, &env.admin, Some(json!({"refill": null})))
        .await;
    assert_eq!(
        (
            reply.json()["credits"].clone(),
            reply.json()["refill"].clone()
        ),
        (json!(50), Value::Null)
    );

    // Bad input: a clear 422 naming the field, never a 500.
    for (body, field) in [
        (json!({"name": "k", "credits": -5}), "credits"),
        (json!({"name": "k", "credits": 1.5}), "credits"),
        (json!({"name": "k", "credits": "many"}), "credits"),
        (
            json!({"name": "k", "credits": 9_223_372_036_854_775_807_i64}),
            "credits",
        ),
        (json!({"name": "k", "refill": "5/fortnight"}), "refill"),
        (json!({"name": "k", "refill": "0/day"}), "refill"),
        (json!({"name": "k", "refill": "5/500ms"}), "refill"),
    ] {
        let reply = env
            .call("POST", "/admin/keys", &env.admin, Some(body.clone()))
            .await;
        let (got, message) = ManagementApi::field_error(&reply);
        assert_eq!(got, field, "{body}: {message}");
        assert!(
            !message.contains("fortnight"),
            "never repeats submitted text: {message}"
        );
    }
    for (body, field) in [
        (json!({"credits": -1}), "credits"),
        (json!({"refill": "1000/week,burst=2"}), "refill"),
        (json!({"credits": null, "refill": "10/day"}), "refill"),
    ] {
        let reply = env
            .call("PATCH", &uri, &env.admin, Some(body.clone()))
            .await;
        assert_eq!(ManagementApi::field_error(&reply).0, field, "{body}");
    }
}

#[tokio::test]
async fn a_self_key_gives_credits_out_of_its_own_and_never_more() {
    let env = ManagementApi::new().await;
    let refill: Refill = "100/day".parse().unwrap();
    let own = env
        .fx
        .key(
            NewKey::new("me", "alice")
                .scope("keys:self")
                .credits(40)
                .refill(refill),
        )
        .await;
    let me = own.key.expose();
    let balance_now = || async {
        env.fx
            .store
            .get(own.record.id)
            .await
            .unwrap()
            .unwrap()
            .credits
            .unwrap()
            .remaining
    };
    // Nothing asked (a key with unlimited credits), a refill (each key refilled: a budget
    // multiplied), more than it has: refused, and nothing taken.
    for body in [
        json!({"name": "unlimited"}),
        json!({"name": "fast", "credits": 1, "refill": "10/day"}),
        json!({"name": "refill-only", "refill": "10/day"}),
        json!({"name": "big", "credits": 1000}),
    ] {
        let before = balance_now().await;
        let reply = env
            .call("POST", "/admin/keys", me, Some(body.clone()))
            .await;
        assert_eq!(reply.status, 403, "{body}: {}", reply.text());
        assert_eq!(reply.code(), "insufficient_scope");
        assert!(balance_now().await <= before, "{body}");
        assert!(
            before - balance_now().await <= 5,
            "{body}: at most this request's lease"
        );
    }
    // Within its own: the credits move out of the caller's balance.
    let before = balance_now().await;
    let reply = env
        .call(
            "POST",
            "/admin/keys",
            me,
            Some(json!({"name": "child", "credits": 10})),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(
        (
            reply.json()["credits"].clone(),
            reply.json()["refill"].clone()
        ),
        (json!(10), Value::Null)
    );
    let after = balance_now().await;
    assert!(
        before - after >= 10,
        "the 10 left the caller's balance: {before} -> {after}"
    );
    let child = reply.json()["id"].as_str().unwrap().to_owned();
    // Its own keys: only lower.
    let uri = format!("/admin/keys/{child}");
    for body in [
        json!({"credits": null}),
        json!({"credits": 11}),
        json!({"refill": "1/day"}),
    ] {
        let reply = env.call("PATCH", &uri, me, Some(body.clone())).await;
        assert_eq!(reply.status, 403, "{body}: {}", reply.text());
    }
    let reply = env
        .call("PATCH", &uri, me, Some(json!({"credits": 3})))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["credits"], 3);

    // A caller with unlimited credits may give any, refill included.
    let free = env
        .fx
        .key(NewKey::new("free", "bob").scope("keys:self"))
        .await;
    let reply = env
        .call(
            "POST",
            "/admin/keys",
            free.key.expose(),
            Some(json!({"name": "k", "credits": 1_000_000, "refill": "5/h"})),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
}

fn verify(caller: &str, body: Value) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("/v1/keys/verify")
        .header("x-api-key", caller)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn the_verify_api_and_forward_auth_charge_the_cost() {
    let fx = Fixture::new();
    let caller = fx
        .key(NewKey::new("gateway", "svc").scope("keys:verify"))
        .await
        .key;
    let key = fx
        .key(NewKey::new("metered", "alice").scope("read").credits(10))
        .await;
    let server: Router = AuthServer::new(fx.layer.clone()).router();
    let k = key.key.expose();

    let verdict = send(
        &server,
        verify(caller.expose(), json!({"key": k, "cost": 4})),
    )
    .await
    .json();
    assert_eq!(
        (
            verdict["valid"].clone(),
            verdict["credits_remaining"].clone()
        ),
        (json!(true), json!(6)),
        "{verdict}"
    );
    // A missing scope refuses and costs nothing.
    let verdict = send(
        &server,
        verify(
            caller.expose(),
            json!({"key": k, "cost": 4, "scopes": ["write"]}),
        ),
    )
    .await
    .json();
    assert_eq!(verdict["code"], "insufficient_scope", "{verdict}");
    let verdict = send(
        &server,
        verify(caller.expose(), json!({"key": k, "cost": 0})),
    )
    .await
    .json();
    assert_eq!(verdict["credits_remaining"], 6, "{verdict}");
    // More than is left: usage_exceeded, nothing spent.
    let verdict = send(
        &server,
        verify(caller.expose(), json!({"key": k, "cost": 7})),
    )
    .await
    .json();
    assert_eq!(
        (verdict["valid"].clone(), verdict["code"].clone()),
        (json!(false), json!("usage_exceeded"))
    );
    // Bad costs are a 422 naming the field.
    for cost in [json!(-1), json!(4_294_967_296_u64), json!("5")] {
        let reply = send(
            &server,
            verify(caller.expose(), json!({"key": k, "cost": cost})),
        )
        .await;
        assert_eq!(reply.status, 422, "{cost}: {}", reply.text());
        assert_eq!(reply.json()["errors"][0]["field"], "cost");
    }
    // A key without credits is never charged, and reports none.
    let free = fx.key(NewKey::new("free", "bob")).await;
    let verdict = send(
        &server,
        verify(
            caller.expose(),
            json!({"key": free.key.expose(), "cost": 1000}),
        ),
    )
    .await
    .json();
    assert_eq!(verdict["valid"], true);
    assert!(verdict.get("credits_remaining").is_none(), "{verdict}");

    // Forward auth: 1 per request, whatever the URL says (a gateway may pass the client's
    // query or path along: a client must not name its own price).
    let forward = |uri: &str| {
        Request::builder()
            .uri(uri)
            .header("x-api-key", k)
            .body(Body::empty())
            .unwrap()
    };
    for (uri, left) in [
        ("/v1/auth", 5),
        ("/v1/auth?cost=0", 4),
        ("/v1/auth/cost/0?cost=0", 3),
    ] {
        let reply = send(&server, forward(uri)).await;
        assert_eq!(reply.status, 200, "{uri}");
        assert_eq!(remaining(&reply), Some(left), "{uri}");
    }
    for _ in 0..3 {
        assert_eq!(send(&server, forward("/v1/auth")).await.status, 200);
    }
    let reply = send(&server, forward("/v1/auth")).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.headers["x-keywarden-code"], "usage_exceeded");
}
