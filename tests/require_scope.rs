//! `RequireScopeLayer` as a tower service between the key layer and a real inner stack: tower's
//! readiness contract, with the same `ConcurrencyLimit(1)` the key layer is held to.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use keywarden::{NewKey, RequireScopeLayer};
use support::{request, Fixture};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

/// `ConcurrencyLimit` panics when `call` comes without its own `poll_ready`, so a scope layer
/// that answered "ready" without asking the inner service fails here; with a limit of one it
/// also shows that backpressure passes through the scope layer. Exercised when the scope is
/// held (the inner service is called), missing (403) and without a key (401), and with two
/// requests in flight.
#[tokio::test]
async fn the_scope_layer_passes_the_inner_services_readiness_through() {
    let fx = Fixture::new();
    let reader = fx
        .key(NewKey::new("r", "alice").scope("articles:read"))
        .await;
    let writer = fx
        .key(NewKey::new("w", "bob").scope("articles:write"))
        .await;
    let inner = ServiceBuilder::new().concurrency_limit(1).service_fn(
        |_req: http::Request<axum::body::Body>| async {
            Ok::<_, Infallible>(http::Response::new(axum::body::Body::empty()))
        },
    );
    let mut service = fx
        .layer
        .layer(RequireScopeLayer::new("articles:read").layer(inner));
    let with_key = |value: &str| request("GET", "/", &[("x-api-key", value.as_bytes())]);
    let (reader, writer) = (reader.key.expose(), writer.key.expose());

    for (req, status) in [
        (with_key(reader), 200),
        (with_key(writer), 403),
        (request("GET", "/", &[]), 401),
        (with_key(reader), 200),
        (with_key(reader), 200),
    ] {
        let response = service.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(response.status(), status);
    }

    // Two requests in flight: the second is readied only once the first has finished.
    let first = service.ready().await.unwrap().call(with_key(reader));
    let mut clone = service.clone();
    let second_ready = tokio::time::timeout(Duration::from_millis(50), clone.ready()).await;
    assert!(
        second_ready.is_err(),
        "the permit is held by the first request"
    );
    assert_eq!(first.await.unwrap().status(), 200);
    let second = clone.ready().await.unwrap().call(with_key(reader));
    assert_eq!(second.await.unwrap().status(), 200);
}

/// The same stack without the key layer in front: the scope layer alone must not call an
/// inner service it did not ready.
#[tokio::test]
async fn the_scope_layer_alone_readies_before_it_calls() {
    let inner = ServiceBuilder::new().concurrency_limit(1).service_fn(
        |_req: http::Request<axum::body::Body>| async {
            Ok::<_, Infallible>(http::Response::new(axum::body::Body::empty()))
        },
    );
    let mut service = RequireScopeLayer::new("read").layer(inner);
    for _ in 0..3 {
        let mut req = request("GET", "/", &[]);
        req.extensions_mut().insert(
            keywarden::testing::PrincipalBuilder::new("test")
                .scopes(["read"])
                .build(),
        );
        let response = service.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(response.status(), 200);
    }
}
