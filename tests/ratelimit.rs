//! Per-key rate limits (local with a controlled clock; Redis shared by two instances; Redis
//! down → the configured fallback) and failed-attempt limiting per client address.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keywarden::{
    key::KeyPrefix, net::IpNetwork, ratelimit::BlockedClients, ratelimit::ClientAddressSource,
    ratelimit::FailedAttemptLimit, ratelimit::RateLimitPolicy, ratelimit::TrustedProxies,
    ApiKeyLayer, Collection, KeyManager, NewKey,
};
use support::*;

fn policy(text: &str) -> RateLimitPolicy {
    text.parse().unwrap()
}

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply.headers[name].to_str().unwrap()
}

#[tokio::test]
async fn local_limiter_exact_burst_and_refill() {
    let fx = Fixture::new();
    let key = fx
        .key(
            NewKey::new("limited", "u1")
                .collection("users")
                .rate_limit(policy("10/min,burst=3")),
        )
        .await;
    let app = fx.app();
    let auth = [("x-api-key", key.key.expose().as_bytes())];
    for remaining in ["2", "1", "0"] {
        let reply = get_with(&app, "/whoami", &auth).await;
        assert_eq!(reply.status, 200);
        // Allowed responses carry the budget too.
        assert_eq!(header(&reply, "ratelimit-limit"), "10");
        assert_eq!(header(&reply, "ratelimit-remaining"), remaining);
    }
    let denied = get_with(&app, "/whoami", &auth).await;
    assert_eq!(denied.status, 429);
    assert_eq!(denied.code(), "rate_limited");
    assert_eq!(header(&denied, "retry-after"), "6");
    assert_eq!(header(&denied, "ratelimit-remaining"), "0");
    assert_eq!(header(&denied, "ratelimit-limit"), "10");
    assert_eq!(header(&denied, "ratelimit-reset"), "18");

    // One request comes back every 6 s, not before.
    fx.clock.advance(time::Duration::seconds(5));
    assert_eq!(get_with(&app, "/whoami", &auth).await.status, 429);
    fx.clock.advance(time::Duration::seconds(1));
    assert_eq!(get_with(&app, "/whoami", &auth).await.status, 200);
    assert_eq!(get_with(&app, "/whoami", &auth).await.status, 429);
    // A long pause refills the burst, never more.
    fx.clock.advance(time::Duration::hours(1));
    let mut allowed = 0;
    for _ in 0..10 {
        if get_with(&app, "/whoami", &auth).await.status == 200 {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3);
    assert_eq!(fx.layer.stats().rate_limited, 1 + 1 + 1 + 7);

    // gRPC callers get resource-exhausted.
    let reply = get_with(
        &app,
        "/whoami",
        &[
            ("x-api-key", key.key.expose().as_bytes()),
            ("content-type", b"application/grpc"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply, "grpc-status"), "8");
}

#[tokio::test]
async fn layer_default_applies_to_keys_without_their_own() {
    let fx = Fixture::with(|b| b.default_rate_limit(policy("1/h")));
    let plain = fx.key(NewKey::new("plain", "u1").collection("users")).await;
    let own = fx
        .key(
            NewKey::new("own", "u2")
                .collection("users")
                .rate_limit(policy("2/h")),
        )
        .await;
    let app = fx.app();
    let plain_auth = [("x-api-key", plain.key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/whoami", &plain_auth).await.status, 200);
    assert_eq!(get_with(&app, "/whoami", &plain_auth).await.status, 429);
    let own_auth = [("x-api-key", own.key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/whoami", &own_auth).await.status, 200);
    assert_eq!(get_with(&app, "/whoami", &own_auth).await.status, 200);
    assert_eq!(get_with(&app, "/whoami", &own_auth).await.status, 429);
    // A rejected key does not spend budget: revoked keys are refused before the limiter.
    fx.manager.revoke(plain.record.id).await.unwrap();
    assert_eq!(
        get_with(&app, "/whoami", &plain_auth).await.code(),
        "revoked_key"
    );
}

async fn by_key(app: &axum::Router, key: &str) -> Reply {
    get_with(app, "/whoami", &[("x-api-key", key.as_bytes())]).await
}

/// [`owner_limited`] over a memory store, with the in-process limiter.
fn local_owner_limited(owner: &str) -> ApiKeyLayer {
    owner_limited(
        Arc::new(keywarden::MemoryStore::new()),
        owner,
        keywarden::ratelimit::RateLimiter::local(),
    )
}

/// Two keys of `subject` in `users`: one with its own limit `own`, and a sibling without.
async fn own_and_sibling(layer: &ApiKeyLayer, subject: &str, own: &str) -> (String, String) {
    let manager = KeyManager::for_layer(layer);
    let mut keys = Vec::new();
    for (name, limit) in [("own", Some(own)), ("sibling", None)] {
        let mut new = NewKey::new(name, subject).collection("users");
        if let Some(limit) = limit {
            new = new.rate_limit(policy(limit));
        }
        keys.push(manager.create(new).await.unwrap().key.expose().to_owned());
    }
    let sibling = keys.pop().unwrap();
    (keys.pop().unwrap(), sibling)
}

/// A layer over `store` whose `users` keys share one budget per owner; `teams` has none.
fn owner_limited(
    store: Arc<keywarden::MemoryStore>,
    owner: &str,
    limiter: keywarden::ratelimit::RateLimiter,
) -> ApiKeyLayer {
    ApiKeyLayer::builder()
        .store(store as Arc<dyn keywarden::KeyStore>)
        .secrets(ring())
        .collection(Collection::new("users").owner_rate_limit(policy(owner)))
        .collection(Collection::new("teams"))
        .rate_limiter(limiter)
        .usage_flush_interval(None)
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_owners_keys_share_one_budget() {
    let layer = local_owner_limited("3/h");
    let manager = KeyManager::for_layer(&layer);
    let create = |name: &'static str, subject: &'static str, collection: &'static str| {
        let manager = manager.clone();
        async move {
            manager
                .create(NewKey::new(name, subject).collection(collection))
                .await
                .unwrap()
                .key
                .expose()
                .to_owned()
        }
    };
    let (a1, a2, a3) = (
        create("a1", "alice", "users").await,
        create("a2", "alice", "users").await,
        create("a3", "alice", "users").await,
    );
    let bob = create("b", "bob", "users").await;
    let team = create("t", "alice", "teams").await;
    let app = app().layer(layer.clone());
    // Three keys, one budget: more keys are not more requests.
    for (key, remaining) in [(&a1, "2"), (&a2, "1"), (&a3, "0")] {
        let reply = by_key(&app, key).await;
        assert_eq!(reply.status, 200);
        assert_eq!(header(&reply, "ratelimit-limit"), "3");
        assert_eq!(header(&reply, "ratelimit-remaining"), remaining);
    }
    for key in [&a1, &a2, &a3] {
        let reply = by_key(&app, key).await;
        assert_eq!(reply.code(), "rate_limited");
        assert_eq!(
            reply.json()["detail"],
            "too many requests for this key's owner"
        );
        assert!(header(&reply, "retry-after").parse::<u64>().unwrap() > 0);
    }
    // Another owner, and the same subject in a collection without an owner budget, are
    // untouched.
    for _ in 0..3 {
        assert_eq!(by_key(&app, &bob).await.status, 200);
    }
    assert_eq!(by_key(&app, &bob).await.status, 429);
    for _ in 0..10 {
        assert_eq!(by_key(&app, &team).await.status, 200);
    }
}

#[tokio::test]
async fn a_key_at_its_own_limit_spends_nothing_of_its_owners() {
    let layer = local_owner_limited("4/h");
    let (tight, sibling) = own_and_sibling(&layer, "alice", "1/h").await;
    let app = app().layer(layer);
    // The key's own budget has less left: its headers are the key's.
    let reply = by_key(&app, &tight).await;
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply, "ratelimit-limit"), "1");
    assert_eq!(header(&reply, "ratelimit-remaining"), "0");
    for _ in 0..5 {
        let reply = by_key(&app, &tight).await;
        assert_eq!(reply.json()["detail"], "too many requests for this key");
    }
    // Refused by its own limit, the tight key spent nothing of the owner's: 3 are left.
    for remaining in ["2", "1", "0"] {
        let reply = by_key(&app, &sibling).await;
        assert_eq!(reply.status, 200);
        assert_eq!(header(&reply, "ratelimit-remaining"), remaining);
    }
    assert_eq!(by_key(&app, &sibling).await.code(), "rate_limited");
}

#[tokio::test]
async fn the_owners_refusal_wins_even_over_a_key_spending_its_last_request() {
    let layer = local_owner_limited("1/h");
    let (last, sibling) = own_and_sibling(&layer, "alice", "1/h").await;
    let app = app().layer(layer);
    assert_eq!(by_key(&app, &sibling).await.status, 200);
    // The key takes its only request (0 left) and the owner has none: refused, the owner's.
    let reply = by_key(&app, &last).await;
    assert_eq!(reply.status, 429);
    assert_eq!(
        reply.json()["detail"],
        "too many requests for this key's owner"
    );
}

#[tokio::test]
async fn the_headers_report_the_budget_with_less_left() {
    // The owner has less left than the key: the owner's figures.
    let layer = local_owner_limited("3/h");
    let (own, _) = own_and_sibling(&layer, "alice", "10/h").await;
    let first = app().layer(layer);
    let reply = by_key(&first, &own).await;
    assert_eq!(header(&reply, "ratelimit-limit"), "3");
    assert_eq!(header(&reply, "ratelimit-remaining"), "2");
    // As much left on both: the key's (its reset: 30 min per request at 2/h, not 30 s).
    let layer = local_owner_limited("2/min");
    let (own, _) = own_and_sibling(&layer, "bob", "2/h").await;
    let app = app().layer(layer);
    let reply = by_key(&app, &own).await;
    assert_eq!(header(&reply, "ratelimit-remaining"), "1");
    assert_eq!(header(&reply, "ratelimit-reset"), "1800");
}

#[tokio::test]
async fn a_request_its_owner_refuses_gives_its_key_the_budget_back() {
    let clock = keywarden::clock::ManualClock::new(time::OffsetDateTime::now_utc());
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(keywarden::MemoryStore::new()) as Arc<dyn keywarden::KeyStore>)
        .secrets(ring())
        .clock(Arc::new(clock.clone()))
        .collection(Collection::new("users").owner_rate_limit(policy("1/min")))
        .usage_flush_interval(None)
        .build()
        .unwrap();
    let keys = own_and_sibling(&layer, "quinn", "2/h").await;
    let app = app().layer(layer);
    assert_eq!(
        by_key(&app, &keys.1).await.status,
        200,
        "the sibling empties the owner"
    );
    for _ in 0..5 {
        let reply = by_key(&app, &keys.0).await;
        assert_eq!(
            reply.json()["detail"],
            "too many requests for this key's owner"
        );
    }
    // Five refusals later the key still has both of its requests.
    for _ in 0..2 {
        clock.advance(time::Duration::minutes(1));
        assert_eq!(by_key(&app, &keys.0).await.status, 200);
    }
    clock.advance(time::Duration::minutes(1));
    let reply = by_key(&app, &keys.0).await;
    assert_eq!(reply.json()["detail"], "too many requests for this key");
}

/// Found in review (issue 22): the local limiter followed the wall clock, so stepping the
/// system clock back an hour made the next request of a `100/s` key wait an hour.
#[tokio::test]
async fn stepping_the_wall_clock_back_does_not_block_a_key() {
    let fx = Fixture::new();
    let key = fx
        .key(
            NewKey::new("fast", "u1")
                .collection("users")
                .rate_limit(policy("100/s")),
        )
        .await;
    let app = fx.app();
    let auth = [("x-api-key", key.key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/whoami", &auth).await.status, 200);
    fx.clock.advance(time::Duration::hours(-1));
    let reply = get_with(&app, "/whoami", &auth).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(header(&reply, "ratelimit-remaining"), "98");
    fx.clock
        .set(time::OffsetDateTime::now_utc() - time::Duration::hours(1));
    let mut denied = None;
    for _ in 0..200 {
        let reply = get_with(&app, "/whoami", &auth).await;
        if reply.status == 429 {
            denied = Some(reply);
            break;
        }
    }
    // Spent within the second: the wait is one emission interval (10 ms, rounded up).
    let denied = denied.expect("the burst is limited");
    assert_eq!(header(&denied, "retry-after"), "1");
    fx.clock.advance(time::Duration::milliseconds(10));
    assert_eq!(get_with(&app, "/whoami", &auth).await.status, 200);
}

/// Found in review (issue 12): every distinct policy kept its limiter forever (about 30 MB
/// of RSS after 20,000 create → use → delete cycles).
#[tokio::test]
async fn limiters_of_distinct_policies_do_not_accumulate() {
    let fx = Fixture::new();
    let app = fx.app();
    let mut most = 0;
    for n in 1..=2_000u32 {
        let created =
            fx.key(NewKey::new("cycle", "u1").collection("users").rate_limit(
                RateLimitPolicy::new(
                    std::num::NonZeroU32::new(n).unwrap(),
                    Duration::from_secs(1),
                ),
            ))
            .await;
        let auth = [("x-api-key", created.key.expose().as_bytes())];
        assert_eq!(get_with(&app, "/whoami", &auth).await.status, 200);
        fx.manager.delete(created.record.id).await.unwrap();
        fx.clock.advance(time::Duration::seconds(1));
        most = most.max(fx.layer.stats().rate_limiters);
    }
    assert!(
        most <= 64,
        "{most} limiters held at once for 2,000 policies"
    );
}

#[cfg(feature = "redis")]
mod redis_limits {
    use super::*;
    use keywarden::{ratelimit::RateLimiter, redis::RedisBackend, KeyStore, MemoryStore};
    use tokio::time::Instant;

    fn instance(store: Arc<MemoryStore>, limiter: RateLimiter) -> ApiKeyLayer {
        ApiKeyLayer::builder()
            .store(store as Arc<dyn KeyStore>)
            .secrets(ring())
            .collection(Collection::new("users"))
            .rate_limiter(limiter)
            .usage_flush_interval(None)
            .build()
            .unwrap()
    }

    async fn allowed(app: &axum::Router, key: &str, n: usize) -> usize {
        let mut ok = 0;
        for _ in 0..n {
            let reply = get_with(app, "/whoami", &[("x-api-key", key.as_bytes())]).await;
            match reply.status.as_u16() {
                200 => ok += 1,
                429 => assert_eq!(reply.code(), "rate_limited"),
                other => panic!("unexpected {other}: {}", reply.text()),
            }
        }
        ok
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_share_one_budget() {
        let Some(url) = service_url("KEYWARDEN_TEST_REDIS_URL") else {
            return;
        };
        let backend = RedisBackend::connect(&url, &unique("kwtest"))
            .await
            .unwrap();
        let store = Arc::new(MemoryStore::new());
        let a = instance(store.clone(), RateLimiter::redis(&backend));
        let b = instance(store.clone(), RateLimiter::redis(&backend));
        let manager = KeyManager::for_layer(&a);
        let (app_a, app_b) = (app().layer(a), app().layer(b));

        // A slow refill: exactly the burst gets through, however the requests are split.
        let slow = manager
            .create(
                NewKey::new("slow", "u")
                    .collection("users")
                    .rate_limit(policy("5/h")),
            )
            .await
            .unwrap();
        let (ka, kb) = (slow.key.expose().to_owned(), slow.key.expose().to_owned());
        let (ra, rb) = tokio::join!(allowed(&app_a, &ka, 20), allowed(&app_b, &kb, 20));
        assert_eq!(ra + rb, 5, "A allowed {ra}, B allowed {rb}");
        assert!(ra > 0 || rb > 0);

        // A fast refill over a measured second: burst + rate × time, within one burst.
        let fast = manager
            .create(
                NewKey::new("fast", "u")
                    .collection("users")
                    .rate_limit(policy("20/s,burst=5")),
            )
            .await
            .unwrap();
        let key = fast.key.expose().to_owned();
        let start = Instant::now();
        let run = |app: axum::Router, key: String| async move {
            let mut ok = 0;
            while start.elapsed() < Duration::from_secs(1) {
                ok += allowed(&app, &key, 1).await;
            }
            ok
        };
        let (fa, fb) = tokio::join!(
            run(app_a.clone(), key.clone()),
            run(app_b.clone(), key.clone())
        );
        let elapsed = start.elapsed().as_secs_f64();
        let expected = 5.0 + 20.0 * elapsed;
        let total = (fa + fb) as f64;
        println!("redis shared budget: A {fa} + B {fb} = {total} in {elapsed:.3} s (policy allows {expected:.1})");
        assert!(
            (total - expected).abs() <= 5.0,
            "allowed {total}, policy allows {expected:.1} ± one burst"
        );
    }

    /// Two instances, two keys of one owner, one Redis: the owner's budget holds across both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_owners_budget_holds_across_instances() {
        let Some(url) = service_url("KEYWARDEN_TEST_REDIS_URL") else {
            return;
        };
        let backend = RedisBackend::connect(&url, &unique("kwtest"))
            .await
            .unwrap();
        let store = Arc::new(MemoryStore::new());
        let a = owner_limited(store.clone(), "5/h", RateLimiter::redis(&backend));
        let b = owner_limited(store.clone(), "5/h", RateLimiter::redis(&backend));
        let manager = KeyManager::for_layer(&a);
        let mut keys = Vec::new();
        for name in ["one", "two"] {
            let created = manager
                .create(NewKey::new(name, "alice").collection("users"))
                .await
                .unwrap();
            keys.push(created.key.expose().to_owned());
        }
        let (app_a, app_b) = (app().layer(a), app().layer(b));
        let (r1, r2, r3, r4) = tokio::join!(
            allowed(&app_a, &keys[0], 10),
            allowed(&app_b, &keys[0], 10),
            allowed(&app_a, &keys[1], 10),
            allowed(&app_b, &keys[1], 10),
        );
        assert_eq!(r1 + r2 + r3 + r4, 5, "{r1} + {r2} + {r3} + {r4}");
    }

    /// The same with Redis: a request the owner refuses gives the key its budget back.
    #[tokio::test]
    async fn redis_gives_a_key_back_what_its_owner_refused() {
        let Some(url) = service_url("KEYWARDEN_TEST_REDIS_URL") else {
            return;
        };
        let backend = RedisBackend::connect(&url, &unique("kwtest"))
            .await
            .unwrap();
        let layer = owner_limited(
            Arc::new(MemoryStore::new()),
            "2/s,burst=1",
            RateLimiter::redis(&backend).fail_closed(),
        );
        let (own, sibling) = own_and_sibling(&layer, "quinn", "2/h").await;
        let app = app().layer(layer);
        assert_eq!(by_key(&app, &sibling).await.status, 200);
        let mut refused = 0;
        for _ in 0..5 {
            let reply = by_key(&app, &own).await;
            if reply.status == 429 {
                assert_eq!(
                    reply.json()["detail"],
                    "too many requests for this key's owner"
                );
                refused += 1;
            }
        }
        assert!(
            refused > 0,
            "the owner's budget refused nothing: the test proves nothing"
        );
        // Whatever the owner refused, the key kept its two requests: at most two more pass,
        // one per owner refill, and then the key's own limit speaks.
        let mut served = 5 - refused;
        let mut own_limit = false;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(550)).await;
            let reply = by_key(&app, &own).await;
            match reply.status.as_u16() {
                200 => served += 1,
                429 if reply.json()["detail"] == "too many requests for this key" => {
                    own_limit = true;
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(served, 2, "the key's own 2/h, never less");
        assert!(own_limit);
    }

    /// A layer that fails closed on a Redis error (so a script error cannot hide behind
    /// the local fallback), a plain connection to poke at its keys, and a key.
    async fn poked(
        url: &str,
        rate: &str,
    ) -> (
        axum::Router,
        redis::aio::MultiplexedConnection,
        String,
        String,
    ) {
        let namespace = unique("kwtest");
        let backend = RedisBackend::connect(url, &namespace).await.unwrap();
        let store = Arc::new(MemoryStore::new());
        let layer = instance(store, RateLimiter::redis(&backend).fail_closed());
        let created = KeyManager::for_layer(&layer)
            .create(
                NewKey::new("k", "u")
                    .collection("users")
                    .rate_limit(policy(rate)),
            )
            .await
            .unwrap();
        let connection = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let budget = format!("{namespace}:rl:{}", created.record.id);
        (
            app().layer(layer),
            connection,
            budget,
            created.key.expose().to_owned(),
        )
    }

    async fn pttl(connection: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query_async(connection)
            .await
            .unwrap()
    }

    async fn status(app: &axum::Router, key: &str) -> Reply {
        get_with(app, "/whoami", &[("x-api-key", key.as_bytes())]).await
    }

    #[tokio::test]
    async fn limiter_keys_always_carry_a_ttl() {
        let Some(url) = service_url("KEYWARDEN_TEST_REDIS_URL") else {
            return;
        };
        let (app, mut connection, budget, key) = poked(&url, "2/h").await;
        assert_eq!(status(&app, &key).await.status, 200);
        let ttl = pttl(&mut connection, &budget).await;
        assert!(ttl > 0 && ttl <= 1_801_000, "PTTL {ttl}");
        // A sane value written without a TTL gets one on the next request, even a denied one.
        let now: (i64, i64) = redis::cmd("TIME")
            .query_async(&mut connection)
            .await
            .unwrap();
        let spent = now.0 * 1_000_000 + now.1 + 3_600_000_000;
        let _: () = redis::cmd("SET")
            .arg(&budget)
            .arg(spent)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(pttl(&mut connection, &budget).await, -1);
        assert_eq!(status(&app, &key).await.status, 429);
        assert!(pttl(&mut connection, &budget).await > 0);
    }

    /// Found in review (issue 22): a stored value that is not a number made the script fail
    /// on every request of that key, forever.
    #[tokio::test]
    async fn garbage_in_a_limiter_key_is_repaired() {
        let Some(url) = service_url("KEYWARDEN_TEST_REDIS_URL") else {
            return;
        };
        let (app, mut connection, budget, key) = poked(&url, "2/h").await;
        let _: () = redis::cmd("SET")
            .arg(&budget)
            .arg("not-a-number")
            .query_async(&mut connection)
            .await
            .unwrap();
        let reply = status(&app, &key).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.headers["ratelimit-remaining"], "1");
        assert!(pttl(&mut connection, &budget).await > 0);
        assert_eq!(status(&app, &key).await.status, 200);
        assert_eq!(status(&app, &key).await.status, 429);

        // Another type under the key (a hash): also decided, and replaced.
        let _: () = redis::cmd("DEL")
            .arg(&budget)
            .query_async(&mut connection)
            .await
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg(&budget)
            .arg("field")
            .arg("value")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(status(&app, &key).await.status, 200);
        assert!(pttl(&mut connection, &budget).await > 0);
    }

    /// A stored arrival time far in the future (a Redis clock stepped back, a foreign write)
    /// is clamped to a spent budget that refills normally.
    #[tokio::test]
    async fn an_absurd_future_budget_is_clamped() {
        let Some(url) = service_url("KEYWARDEN_TEST_REDIS_URL") else {
            return;
        };
        let (app, mut connection, budget, key) = poked(&url, "2/h").await;
        let _: () = redis::cmd("SET")
            .arg(&budget)
            .arg("99999999999999999999")
            .query_async(&mut connection)
            .await
            .unwrap();
        let reply = status(&app, &key).await;
        assert_eq!(reply.status, 429, "{}", reply.text());
        // At most one emission interval (30 min), not centuries.
        let retry: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=1_800).contains(&retry), "Retry-After {retry}");
        let stored: String = redis::cmd("GET")
            .arg(&budget)
            .query_async(&mut connection)
            .await
            .unwrap();
        let now: (i64, i64) = redis::cmd("TIME")
            .query_async(&mut connection)
            .await
            .unwrap();
        let now = now.0 * 1_000_000 + now.1;
        let stored: i64 = stored.parse().unwrap();
        assert!(stored <= now + 3_600_000_000, "clamped to one full refill");
        let ttl = pttl(&mut connection, &budget).await;
        assert!(ttl > 0 && ttl <= 3_601_000, "PTTL {ttl}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_falls_back_as_configured() {
        let Some(url) = service_url("KEYWARDEN_TEST_REDIS_URL") else {
            return;
        };
        let proxy = TcpProxy::start(url_addr(&url)).await;
        let backend = RedisBackend::connect(&url_via(&url, proxy.addr), &unique("kwtest"))
            .await
            .unwrap()
            .with_command_timeout(Duration::from_millis(200));
        let store = Arc::new(MemoryStore::new());
        let open = instance(store.clone(), RateLimiter::redis(&backend));
        let closed = instance(store.clone(), RateLimiter::redis(&backend).fail_closed());
        let manager = KeyManager::for_layer(&open).invalidates(&closed);
        let created = manager
            .create(
                NewKey::new("k", "u")
                    .collection("users")
                    .rate_limit(policy("2/h")),
            )
            .await
            .unwrap();
        let key = created.key.expose().to_owned();
        let (app_open, app_closed) = (app().layer(open.clone()), app().layer(closed));
        // Redis is up: one shared budget of 2.
        assert_eq!(allowed(&app_open, &key, 1).await, 1);
        assert_eq!(allowed(&app_closed, &key, 3).await, 1);

        proxy.cut();
        // Fail-open: counted locally, still limited (burst 2 in this process).
        let start = Instant::now();
        assert_eq!(allowed(&app_open, &key, 4).await, 2);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a dead Redis must not stall requests"
        );
        // Fail-closed: 503 store_unavailable with Retry-After.
        let reply = get_with(&app_closed, "/whoami", &[("x-api-key", key.as_bytes())]).await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.code(), "store_unavailable");
        assert!(reply.headers.contains_key("retry-after"));

        // Redis back: the shared budget (spent) answers again.
        proxy.restore();
        let start = Instant::now();
        loop {
            let reply = get_with(&app_closed, "/whoami", &[("x-api-key", key.as_bytes())]).await;
            if reply.status == 429 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "Redis limiter did not recover"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn bad_key() -> String {
    // Well-formed but unknown: costs a store lookup without the limit.
    KeyPrefix::new("kw_live")
        .unwrap()
        .generate()
        .expose()
        .to_owned()
}

#[tokio::test]
async fn failed_attempts_block_one_address_before_store_work() {
    let store = Arc::new(CountingStore::default());
    let clock = keywarden::clock::ManualClock::new(time::OffsetDateTime::now_utc());
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .clock(Arc::new(clock.clone()))
        .collection(Collection::new("users"))
        .failed_attempt_limit(
            FailedAttemptLimit::new(3, Duration::from_secs(60)).client_address(
                ClientAddressSource::TrustedHeader("x-real-ip".parse().unwrap()),
            ),
        )
        .usage_flush_interval(None)
        .build()
        .unwrap();
    let manager = KeyManager::for_layer(&layer);
    let good = manager
        .create(NewKey::new("good", "u").collection("users"))
        .await
        .unwrap();
    let app = app().layer(layer.clone());
    let from = |ip: &'static str, key: &str| {
        let key = key.to_owned();
        let app = app.clone();
        async move {
            get_with(
                &app,
                "/whoami",
                &[("x-api-key", key.as_bytes()), ("x-real-ip", ip.as_bytes())],
            )
            .await
        }
    };

    // Three rejected keys of each kind that counts: unknown, malformed, unknown.
    assert_eq!(from("203.0.113.5", &bad_key()).await.code(), "invalid_key");
    assert_eq!(
        from("203.0.113.5", "kw_live_garbage").await.code(),
        "malformed_key"
    );
    assert_eq!(from("203.0.113.5", &bad_key()).await.code(), "invalid_key");
    let lookups = store.lookups();
    // The fourth attempt is refused before any store work, with the limiter's headers.
    let blocked = from("203.0.113.5", &bad_key()).await;
    assert_eq!(blocked.status, 429);
    assert_eq!(blocked.code(), "rate_limited");
    assert_eq!(header(&blocked, "retry-after"), "60");
    assert_eq!(header(&blocked, "ratelimit-limit"), "3");
    assert_eq!(
        store.lookups(),
        lookups,
        "no store query for a blocked address"
    );
    // Even a valid key is refused from that address (the default, fail closed)...
    assert_eq!(from("203.0.113.5", good.key.expose()).await.status, 429);
    // ...while another address is unaffected.
    assert_eq!(from("198.51.100.1", good.key.expose()).await.status, 200);
    // Now cached as valid, and still refused from the blocked address: only
    // `BlockedClients::AllowCachedKeys` lets cached keys past a block.
    assert_eq!(from("203.0.113.5", good.key.expose()).await.status, 429);
    assert_eq!(from("198.51.100.1", &bad_key()).await.code(), "invalid_key");
    assert!(layer.stats().clients_blocked >= 2);
    // The window ends.
    clock.advance(time::Duration::seconds(60));
    assert_eq!(from("203.0.113.5", good.key.expose()).await.status, 200);
}

#[tokio::test]
async fn blocked_address_may_keep_using_cached_keys_if_configured() {
    let store = Arc::new(CountingStore::default());
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .collection(Collection::new("users"))
        .failed_attempt_limit(
            FailedAttemptLimit::new(2, Duration::from_secs(60))
                .client_address(ClientAddressSource::TrustedHeader(
                    "x-forwarded-for".parse().unwrap(),
                ))
                .blocked_clients(BlockedClients::AllowCachedKeys),
        )
        .usage_flush_interval(None)
        .build()
        .unwrap();
    let manager = KeyManager::for_layer(&layer);
    let warm = manager
        .create(NewKey::new("warm", "u").collection("users"))
        .await
        .unwrap();
    let cold = manager
        .create(NewKey::new("cold", "u").collection("users"))
        .await
        .unwrap();
    let app = app().layer(layer.clone());
    // The proxy appends the real client last; what the client claimed comes first.
    let xff = b"10.9.9.9, 192.0.2.44";
    let send = |key: String| {
        let app = app.clone();
        async move {
            get_with(
                &app,
                "/whoami",
                &[("x-api-key", key.as_bytes()), ("x-forwarded-for", xff)],
            )
            .await
        }
    };
    assert_eq!(send(warm.key.expose().to_owned()).await.status, 200);
    for _ in 0..2 {
        assert_eq!(send(bad_key()).await.code(), "invalid_key");
    }
    let lookups = store.lookups();
    assert_eq!(
        send(warm.key.expose().to_owned()).await.status,
        200,
        "cached valid key works"
    );
    assert_eq!(
        send(cold.key.expose().to_owned()).await.status,
        429,
        "uncached key needs the store"
    );
    assert_eq!(send(bad_key()).await.status, 429);
    assert_eq!(store.lookups(), lookups);
}

/// `ApiKeyLayer::check` (the verification API, forward auth) refuses a blocked address as
/// the request path does: by default every key, even one cached as valid; with
/// `AllowCachedKeys`, every key but one cached as valid.
#[tokio::test]
async fn check_blocks_an_address_as_the_request_path_does() {
    use keywarden::{MemoryStore, RejectionKind};
    use std::net::IpAddr;

    for allow_cached in [false, true] {
        let mut limit = FailedAttemptLimit::new(2, Duration::from_secs(60));
        if allow_cached {
            limit = limit.blocked_clients(BlockedClients::AllowCachedKeys);
        }
        let layer = ApiKeyLayer::builder()
            .store(Arc::new(MemoryStore::new()))
            .secrets(ring())
            .collection(Collection::new("users"))
            .failed_attempt_limit(limit)
            .usage_flush_interval(None)
            .build()
            .unwrap();
        let manager = KeyManager::for_layer(&layer);
        let create =
            |name: &'static str| manager.create(NewKey::new(name, "u").collection("users"));
        let (warm, cold) = (create("warm").await.unwrap(), create("cold").await.unwrap());
        let blocked: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "198.51.100.7".parse().unwrap();
        let check = |key: String, client: IpAddr| {
            let layer = layer.clone();
            async move {
                layer
                    .check(&key, &http::Method::GET, Some(client))
                    .await
                    .map(|(principal, _)| principal.key_name().to_owned())
                    .map_err(|rejection| rejection.kind())
            }
        };
        let warm_key = warm.key.expose().to_owned();
        assert_eq!(check(warm_key.clone(), other).await, Ok("warm".to_owned()));
        for _ in 0..2 {
            assert_eq!(
                check(bad_key(), blocked).await,
                Err(RejectionKind::InvalidKey)
            );
        }
        let cold_key = cold.key.expose().to_owned();
        assert_eq!(
            check(cold_key.clone(), blocked).await,
            Err(RejectionKind::RateLimited),
            "allow_cached: {allow_cached}"
        );
        assert_eq!(
            check(warm_key, blocked).await,
            if allow_cached {
                Ok("warm".to_owned())
            } else {
                Err(RejectionKind::RateLimited)
            },
            "allow_cached: {allow_cached}"
        );
        assert_eq!(check(cold_key, other).await, Ok("cold".to_owned()));
    }
}

#[tokio::test]
async fn connection_address_from_a_real_server() {
    let fx = Fixture::with(|b| {
        b.failed_attempt_limit(FailedAttemptLimit::new(2, Duration::from_secs(60)))
    });
    let good = fx.key(NewKey::new("good", "u").collection("users")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = fx.app().into_make_service_with_connect_info::<SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/whoami");
    let get = |key: String| {
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .get(url)
                .header("x-api-key", key)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get(good.key.expose().to_owned()).await, 200);
    assert_eq!(get(bad_key()).await, 401);
    assert_eq!(get(bad_key()).await, 401);
    assert_eq!(get(bad_key()).await, 429);
    assert_eq!(
        get(good.key.expose().to_owned()).await,
        429,
        "loopback is blocked now"
    );
    server.abort();
}

/// Trusted proxies over a real connection: the forwarded header is believed only when the
/// connection comes from a listed proxy. Here the test client connects from 127.0.0.1, and
/// sends a different `X-Forwarded-For` each time.
#[tokio::test]
async fn trusted_proxies_from_a_real_server() {
    async fn statuses(proxies: &[&str]) -> Vec<u16> {
        let source = ClientAddressSource::TrustedProxies(TrustedProxies::new(
            "x-forwarded-for".parse().unwrap(),
            proxies.iter().map(|p| p.parse::<IpNetwork>().unwrap()),
        ));
        let fx = Fixture::with(|b| {
            b.failed_attempt_limit(
                FailedAttemptLimit::new(2, Duration::from_secs(60)).client_address(source),
            )
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = fx.app().into_make_service_with_connect_info::<SocketAddr>();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        let mut statuses = Vec::new();
        for i in 0..4 {
            let response = client
                .get(format!("http://{addr}/whoami"))
                .header("x-api-key", bad_key())
                // A client-chosen entry first, then the "proxy's" own.
                .header("x-forwarded-for", format!("10.0.0.1, 203.0.113.{i}"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .unwrap();
            statuses.push(response.status().as_u16());
        }
        server.abort();
        statuses
    }
    // 127.0.0.1 is a trusted proxy: each request blames its own forwarded client.
    assert_eq!(statuses(&["127.0.0.0/8"]).await, [401, 401, 401, 401]);
    // Only ::1 is trusted: the header from 127.0.0.1 is ignored, the connection is blamed.
    assert_eq!(statuses(&["::1"]).await, [401, 401, 429, 429]);
}

/// A policy built in code with any period is stored as text that reads back as the same
/// policy, in every store (it used to print `7/0s` for 500 ms, a corrupt key once stored).
#[cfg(all(feature = "sqlite", feature = "postgres"))]
#[tokio::test]
async fn a_policy_of_any_period_survives_every_store() {
    use std::num::NonZeroU32;
    let odd = RateLimitPolicy::new(NonZeroU32::new(7).unwrap(), Duration::from_millis(500))
        .with_burst(NonZeroU32::new(3).unwrap());
    for (name, store, pg) in every_store("policy_text").await {
        let layer = ApiKeyLayer::builder()
            .store(store.clone())
            .secrets(ring())
            .collection(Collection::new("users"))
            .usage_flush_interval(None)
            .build()
            .unwrap();
        let manager = KeyManager::for_layer(&layer);
        let created = manager
            .create(NewKey::new("odd", "alice").rate_limit(odd))
            .await
            .unwrap();
        let stored = manager.get(created.record.id).await.unwrap();
        assert_eq!(stored.rate_limit, Some(odd), "{name}");
        let reply = by_key(&app().layer(layer), created.key.expose()).await;
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        drop_schema(pg).await;
    }
}
