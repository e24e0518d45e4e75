//! Escalation paths of `keys:self` found by review after the management-scope fixes: each
//! test asserts the secure answer and failed before its fix.

mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::Router;
use http::Request;
use keywarden::{management_router, ratelimit::RateLimitPolicy, ExpiresIn, KeyManager, NewKey};
use serde_json::{json, Value};
use support::{send, Fixture, Reply};

fn policy(text: &str) -> RateLimitPolicy {
    text.parse().unwrap()
}

fn api(fx: &Fixture, manager: KeyManager) -> Router {
    Router::new()
        .nest("/admin", management_router(Arc::new(manager)))
        .layer(fx.layer.clone())
}

async fn call(api: &Router, key: &str, method: &str, uri: &str, body: Option<Value>) -> Reply {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {key}"));
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(body.map_or_else(Body::empty, |v| Body::from(v.to_string())))
        .unwrap();
    send(api, req).await
}

/// A short-lived, rate-limited `keys:self` key in the `test`
/// environment grants a scope it holds (`billing:write`, and `keys:self`) to a sibling key
/// of its owner that never expires, has no rate limit and lives in `live`. PATCH used to check
/// only that the caller holds the scope, not that the target is no more powerful than the
/// caller (the check a rotation makes), so the caller's scope outlived it and crossed
/// environments.
#[tokio::test]
async fn keys_self_cannot_add_scopes_to_a_more_powerful_key() {
    let fx = Fixture::new();
    let api = api(&fx, KeyManager::for_layer(&fx.layer));
    let caller = fx
        .key(
            NewKey::new("short", "alice")
                .scope("keys:self")
                .scope("billing:write")
                .scope("read")
                .environment("test")
                .expires_in(ExpiresIn::DAYS_7)
                .rate_limit(policy("10/min")),
        )
        .await;
    let sibling = fx
        .key(
            NewKey::new("forever", "alice")
                .scope("read")
                .environment("live"),
        )
        .await;
    let reply = call(
        &api,
        caller.key.expose(),
        "PATCH",
        &format!("/admin/keys/{}", sibling.record.id),
        Some(json!({"scopes": ["read", "billing:write", "keys:self"]})),
    )
    .await;
    let now = fx.manager.get(sibling.record.id).await.unwrap();
    assert!(
        reply.status == 403 && !now.scopes.iter().any(|s| s == "billing:write"),
        "keys:self widened a never-expiring, unlimited `live` key: status {} scopes {:?}",
        reply.status,
        now.scopes
    );
}

/// A manager built with `KeyManager::new(..).invalidates(&layer)`
/// (the documented way to attach a layer) used not to learn the layer's default rate limit,
/// so the effective-limit checks of the management API saw "unlimited" and a `keys:self`
/// key held to the 100/s default created a key limited to 1000000/s.
#[tokio::test]
async fn keys_self_is_held_to_the_default_of_every_invalidated_layer() {
    let fx = Fixture::with(|b| b.default_rate_limit(policy("100/s")));
    let manager = KeyManager::new(fx.store.clone(), support::ring())
        .with_clock(Arc::new(fx.clock.clone()))
        .invalidates(&fx.layer);
    let api = api(&fx, manager);
    let caller = fx
        .key(
            NewKey::new("alice", "alice")
                .scope("keys:self")
                .scope("read"),
        )
        .await;
    let reply = call(
        &api,
        caller.key.expose(),
        "POST",
        "/admin/keys",
        Some(json!({"name": "fast", "rate_limit": "1000000/s"})),
    )
    .await;
    assert_eq!(
        reply.status,
        403,
        "keys:self escaped the layer's default rate limit: {}",
        reply.text()
    );
}

/// Adding a scope the caller holds to a key no more powerful than the caller (same
/// environment, expiring no later, rate-limited at least as tightly) stays allowed.
#[tokio::test]
async fn keys_self_may_add_scopes_to_a_key_no_more_powerful() {
    let fx = Fixture::new();
    let api = api(&fx, KeyManager::for_layer(&fx.layer));
    let caller = fx
        .key(
            NewKey::new("caller", "alice")
                .scope("keys:self")
                .scope("billing:write")
                .scope("read")
                .expires_in(ExpiresIn::DAYS_30)
                .rate_limit(policy("10/min")),
        )
        .await;
    let sibling = fx
        .key(
            NewKey::new("narrow", "alice")
                .scope("read")
                .expires_in(ExpiresIn::DAYS_7)
                .rate_limit(policy("5/min")),
        )
        .await;
    let reply = call(
        &api,
        caller.key.expose(),
        "PATCH",
        &format!("/admin/keys/{}", sibling.record.id),
        Some(json!({"scopes": ["read", "billing:write"]})),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let now = fx.manager.get(sibling.record.id).await.unwrap();
    assert!(now.scopes.iter().any(|s| s == "billing:write"));
}
