//! One layer's state serves every route: `layer.optional()` and `layer.required()` share the
//! cache and see each other's invalidations; and one rule, in both modes, for a `Bearer` token
//! that is not a keywarden key beside a keywarden key (issue 20, items 1 and 7).

mod support;

use axum::routing::get;
use axum::Router;
use keywarden::{Mode, NewKey, Principal};
use support::{get_with, Fixture};

/// `/api` needs a key; `/dashboard` also serves visitors without one.
fn app(fx: &Fixture) -> Router {
    let api = Router::new()
        .route(
            "/api",
            get(|p: Principal| async move { p.subject().to_owned() }),
        )
        .route_layer(fx.layer.required());
    let dashboard = Router::new()
        .route(
            "/dashboard",
            get(|p: Option<Principal>| async move {
                p.map_or("visitor".to_owned(), |p| p.subject().to_owned())
            }),
        )
        .route_layer(fx.layer.optional());
    api.merge(dashboard)
}

#[tokio::test]
async fn optional_and_required_views_share_one_cache_and_its_invalidations() {
    let fx = Fixture::new();
    assert_eq!(fx.layer.mode(), Mode::Required);
    assert_eq!(fx.layer.optional().mode(), Mode::Optional);
    assert_eq!(fx.layer.optional().required().mode(), Mode::Required);
    let app = app(&fx);
    let key = fx.key(NewKey::new("k", "alice")).await;
    let header = [("x-api-key", key.key.expose().as_bytes())];

    assert_eq!(get_with(&app, "/api", &header).await.text(), "alice");
    assert_eq!(get_with(&app, "/dashboard", &header).await.text(), "alice");
    assert_eq!(get_with(&app, "/dashboard", &[]).await.text(), "visitor");
    assert_eq!(
        get_with(&app, "/api", &[]).await.code(),
        "missing_credentials"
    );
    // One cache: the second view's request was a hit of the first's fill.
    assert_eq!(fx.layer.cached_entries().await, 1);

    // Revoked through the manager of the one layer: both views reject it at once, with no
    // `invalidates` line to forget.
    fx.manager.revoke(key.record.id).await.unwrap();
    assert_eq!(get_with(&app, "/api", &header).await.code(), "revoked_key");
    assert_eq!(
        get_with(&app, "/dashboard", &header).await.code(),
        "revoked_key"
    );
}

/// The rule: a `Bearer` token that is not a keywarden key (no keywarden prefix, not claimed by
/// a foreign collection) belongs to another authentication layer. Beside a keywarden key it is
/// ignored, in both modes; alone, a required layer still reads it (and rejects it as
/// malformed), an optional one passes it on.
#[tokio::test]
async fn a_foreign_bearer_beside_a_key_is_ignored_in_both_modes() {
    let fx = Fixture::new();
    let app = app(&fx);
    let key = fx.key(NewKey::new("k", "alice")).await;
    let jwt = b"Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJl";
    let both = [
        ("authorization", &jwt[..]),
        ("x-api-key", key.key.expose().as_bytes()),
    ];
    for route in ["/api", "/dashboard"] {
        let reply = get_with(&app, route, &both).await;
        assert_eq!(
            (reply.status.as_u16(), reply.text()),
            (200, "alice".into()),
            "{route}"
        );
    }

    let alone = [("authorization", &jwt[..])];
    assert_eq!(get_with(&app, "/api", &alone).await.code(), "malformed_key");
    assert_eq!(get_with(&app, "/dashboard", &alone).await.text(), "visitor");

    // Two keywarden keys that differ are still ambiguous, in both modes.
    let other = fx.key(NewKey::new("k2", "bob")).await;
    let bearer = format!("Bearer {}", other.key.expose());
    let two = [
        ("authorization", bearer.as_bytes()),
        ("x-api-key", key.key.expose().as_bytes()),
    ];
    for route in ["/api", "/dashboard"] {
        assert_eq!(
            get_with(&app, route, &two).await.code(),
            "ambiguous_credentials",
            "{route}"
        );
    }
}

/// The application's own identity type, mapped asynchronously and fallibly; its extractor
/// answers keywarden's 401 behind an optional layer rather than axum's 500 (issue 20, item 4).
#[tokio::test]
async fn a_fallible_async_identity_mapping_and_its_extractor() {
    use keywarden::{AuthRejection, Identity, RejectionKind};

    #[derive(Clone)]
    struct Caller {
        tenant: String,
    }

    let fx = Fixture::with(|b| {
        b.try_map_identity(|principal: Principal| async move {
            // A lookup the mapping waits for.
            tokio::task::yield_now().await;
            if principal.subject() == "suspended" {
                return Err(AuthRejection::new(
                    RejectionKind::RevokedKey,
                    "the tenant is suspended",
                ));
            }
            Ok(Caller {
                tenant: format!("tenant-{}", principal.subject()),
            })
        })
    });
    let handler = get(|Identity(caller): Identity<Caller>| async move { caller.tenant });
    let app = Router::new()
        .route("/api", handler.clone())
        .route_layer(fx.layer.required())
        .merge(
            Router::new()
                .route("/open", handler)
                .route_layer(fx.layer.optional()),
        );

    let alice = fx.key(NewKey::new("k", "alice")).await;
    let header = [("x-api-key", alice.key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/api", &header).await.text(), "tenant-alice");
    assert_eq!(
        get_with(&app, "/open", &header).await.text(),
        "tenant-alice"
    );

    // No key behind the optional layer: keywarden's 401, problem+json, not a 500.
    let reply = get_with(&app, "/open", &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.code()),
        (401, "missing_credentials".into())
    );

    // The mapping refuses: the documented code it chose, on both routes, every time.
    let suspended = fx.key(NewKey::new("k", "suspended")).await;
    let header = [("x-api-key", suspended.key.expose().as_bytes())];
    for route in ["/api", "/open", "/api"] {
        let reply = get_with(&app, route, &header).await;
        assert_eq!(reply.code(), "revoked_key", "{route}");
        assert!(
            reply.text().contains("the tenant is suspended"),
            "{}",
            reply.text()
        );
    }
}

/// Scopes per method with `handler.layer(..)`, as the `scope` module shows; and a scope layer
/// placed outside the key layer says so instead of answering a valid admin key with a bare
/// "requires an API key" (issue 20, item 5).
#[tokio::test]
async fn per_method_scopes_and_a_misplaced_scope_layer() {
    use axum::handler::Handler;
    use keywarden::RequireScopeLayer;

    let fx = Fixture::new();
    let app = Router::new()
        .route(
            "/articles",
            get((|| async { "article" }).layer(RequireScopeLayer::new("articles:read")))
                .delete((|| async { "deleted" }).layer(RequireScopeLayer::new("articles:delete"))),
        )
        .layer(fx.layer.clone());
    let reader = fx
        .key(NewKey::new("r", "alice").scope("articles:read"))
        .await;
    let header = [("x-api-key", reader.key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/articles", &header).await.text(), "article");
    let req = support::request("DELETE", "/articles", &header);
    assert_eq!(support::send(&app, req).await.code(), "insufficient_scope");

    // Wrong order: the scope layer is outermost, so it runs before the key layer.
    let misplaced = Router::new()
        .route("/admin", get(|| async { "admin" }))
        .layer(fx.layer.clone())
        .layer(RequireScopeLayer::new("admin"));
    let admin = fx.key(NewKey::new("a", "root").scope("admin")).await;
    let reply = get_with(
        &misplaced,
        "/admin",
        &[("x-api-key", admin.key.expose().as_bytes())],
    )
    .await;
    assert_eq!(reply.code(), "missing_credentials");
    assert!(
        reply
            .text()
            .contains("RequireScopeLayer must be inside ApiKeyLayer"),
        "{}",
        reply.text()
    );
    // Right order behind an optional layer, no key: the plain 401.
    let optional = Router::new()
        .route(
            "/admin",
            get(|| async { "admin" }).route_layer(RequireScopeLayer::new("admin")),
        )
        .layer(fx.layer.optional());
    let reply = get_with(&optional, "/admin", &[]).await;
    assert_eq!(reply.code(), "missing_credentials");
    assert!(
        reply.text().contains("this route requires an API key"),
        "{}",
        reply.text()
    );
}

/// `Identity<T>` on a layer that maps no `T`: a valid key is not told "send a key" but that the
/// server is misconfigured (R1's finding).
#[tokio::test]
async fn an_identity_the_layer_does_not_map_is_a_configuration_error() {
    use keywarden::Identity;

    #[derive(Clone)]
    struct Unmapped;

    let fx = Fixture::new();
    let app = Router::new()
        .route("/api", get(|_: Identity<Unmapped>| async { "never" }))
        .layer(fx.layer.clone());
    let key = fx.key(NewKey::new("k", "alice")).await;
    let reply = get_with(&app, "/api", &[("x-api-key", key.key.expose().as_bytes())]).await;
    assert_eq!(reply.status.as_u16(), 401);
    assert!(
        reply.text().contains("a configuration error"),
        "{}",
        reply.text()
    );
    assert!(
        !reply.text().contains("Unmapped"),
        "no type names to clients"
    );
}

/// A mapping that stops answering in time is not an outage: a stale entry is not served past
/// its TTL on its account (R2's finding: a slow tenant lookup kept a suspended tenant in).
#[tokio::test]
async fn a_timed_out_identity_mapping_does_not_serve_the_stale_identity() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use keywarden::{AuthRejection, Identity, RejectionKind};

    #[derive(Clone)]
    struct Tenant(String);

    let slow = Arc::new(AtomicBool::new(false));
    let flag = slow.clone();
    let fx = Fixture::with(move |b| {
        b.cache_ttl(Duration::from_millis(50))
            .store_timeout(Duration::from_millis(100))
            .try_map_identity(move |p: Principal| {
                let flag = flag.clone();
                async move {
                    if flag.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        return Err(AuthRejection::new(
                            RejectionKind::RevokedKey,
                            "the tenant is suspended",
                        ));
                    }
                    Ok(Tenant(p.subject().to_owned()))
                }
            })
    });
    let app = Router::new()
        .route(
            "/t",
            get(|Identity(t): Identity<Tenant>| async move { t.0 }),
        )
        .layer(fx.layer.clone());
    let key = fx.key(NewKey::new("k", "acme")).await;
    let header = [("x-api-key", key.key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/t", &header).await.text(), "acme");

    slow.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(80)).await; // past the TTL: the entry is stale
    let reply = get_with(&app, "/t", &header).await;
    assert_eq!(reply.code(), "store_unavailable", "{}", reply.text());
    let err = fx
        .layer
        .verify(key.key.expose(), &http::Method::GET)
        .await
        .unwrap_err();
    assert_ne!(err.kind(), RejectionKind::InvalidKey);
}

/// Two layers built separately over one store, with no `invalidates` line: a key revoked
/// through either's manager, or by a direct store call, is refused by both at once (issue 20,
/// item 1: no way to build two layers over one store that miss each other's changes).
#[tokio::test]
async fn separately_built_layers_over_one_store_hear_each_others_changes() {
    use std::sync::Arc;

    use keywarden::store::KeyPatch;
    use keywarden::{ApiKeyLayer, Collection, KeyManager, KeyStore, MemoryStore};

    let store = Arc::new(MemoryStore::new());
    let build = || {
        ApiKeyLayer::builder()
            .store(store.clone())
            .secrets(support::ring())
            .collection(Collection::new("users"))
            .build()
            .unwrap()
    };
    let (a, b) = (build(), build());
    let route = |layer: &ApiKeyLayer| {
        Router::new()
            .route(
                "/",
                get(|p: Principal| async move { p.subject().to_owned() }),
            )
            .layer(layer.clone())
    };
    let (app_a, app_b) = (route(&a), route(&b));
    let manager = KeyManager::for_layer(&a);

    // A not-found answer cached by b is dropped when a's manager creates the key.
    let created = manager.create(NewKey::new("k", "alice")).await.unwrap();
    let header = [("x-api-key", created.key.expose().as_bytes())];
    for app in [&app_a, &app_b] {
        assert_eq!(get_with(app, "/", &header).await.text(), "alice");
    }
    manager.revoke(created.record.id).await.unwrap();
    for app in [&app_a, &app_b] {
        assert_eq!(get_with(app, "/", &header).await.code(), "revoked_key");
    }

    // A change made straight through the store reaches both too.
    let other = manager.create(NewKey::new("k2", "bob")).await.unwrap();
    let header = [("x-api-key", other.key.expose().as_bytes())];
    for app in [&app_a, &app_b] {
        assert_eq!(get_with(app, "/", &header).await.text(), "bob");
    }
    let patch = KeyPatch {
        disabled: Some(true),
        ..KeyPatch::default()
    };
    store
        .update(other.record.id, &patch, time::OffsetDateTime::now_utc())
        .await
        .unwrap();
    for app in [&app_a, &app_b] {
        assert_eq!(get_with(app, "/", &header).await.code(), "revoked_key");
    }
}
