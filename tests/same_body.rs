//! `ApiKeyLayer::same_body`: the same answers as the layer (status, headers, body bytes), in
//! the inner service's own body type, through an axum Router and as a plain tower service.

mod support;

use std::convert::Infallible;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use keywarden::layer::SameBodyService;
use keywarden::NewKey;
use support::{app, request, send, Fixture};
use tower::{Layer, ServiceExt};

/// A request: method, path, headers.
type Case<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);

/// Every outcome the layer has an answer for, through both forms of the layer: the replies
/// are byte for byte the same.
#[tokio::test]
async fn same_body_answers_exactly_as_the_layer() {
    let fx = Fixture::with(|b| b.default_rate_limit("100/min".parse().unwrap()));
    let key = fx.key(NewKey::new("k", "alice")).await.key;
    let key = key.expose().to_owned();
    let read_only = fx.key(NewKey::new("r", "bob").read_only(true)).await.key;
    let read_only = read_only.expose().to_owned();
    let revoked = fx.key(NewKey::new("gone", "carol")).await;
    fx.manager.revoke(revoked.record.id).await.unwrap();
    let revoked = revoked.key.expose().to_owned();
    // A well-formed key another store holds (same secret): unknown here.
    let unknown = Fixture::new().key(NewKey::new("x", "nobody")).await.key;
    let unknown = unknown.expose().to_owned();
    let mut broken = key.clone();
    broken.pop();
    broken.push(if key.ends_with('A') { 'B' } else { 'A' });

    let layered = fx.app();
    let same = app().layer(fx.layer.same_body());
    let cases: Vec<Case> = vec![
        ("GET", "/whoami", vec![("x-api-key", key.clone())]),
        // Again: a hit, after the first request's miss.
        ("GET", "/whoami", vec![("x-api-key", key.clone())]),
        (
            "GET",
            "/whoami",
            vec![("authorization", format!("Bearer {key}"))],
        ),
        ("GET", "/whoami", vec![]),
        ("GET", "/whoami", vec![("x-api-key", broken)]),
        ("GET", "/whoami", vec![("x-api-key", unknown)]),
        ("GET", "/whoami", vec![("x-api-key", revoked)]),
        ("POST", "/write", vec![("x-api-key", read_only)]),
        ("GET", "/admin", vec![("x-api-key", key.clone())]),
        (
            "GET",
            "/whoami",
            vec![
                ("x-api-key", key.clone()),
                ("authorization", "Bearer kw_live_other".to_owned()),
            ],
        ),
        ("GET", "/maybe", vec![("x-api-key", key.clone())]),
    ];
    let mut statuses = Vec::new();
    for (method, uri, headers) in &cases {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        let a = send(&layered, request(method, uri, &headers)).await;
        let b = send(&same, request(method, uri, &headers)).await;
        assert_eq!(a.status, b.status, "{method} {uri}");
        // The rate limit's remaining count and reset differ by the requests each form took
        // from the key's one budget: compared by name; every other header by value.
        let split = |h: &http::HeaderMap| {
            let mut values = h.clone();
            let limits: Vec<String> = h
                .keys()
                .map(|name| name.as_str().to_owned())
                .filter(|name| name.starts_with("ratelimit"))
                .collect();
            for name in &limits {
                values.remove(name.as_str());
            }
            (values, limits)
        };
        assert_eq!(split(&a.headers), split(&b.headers), "{method} {uri}");
        assert_eq!(a.text(), b.text(), "{method} {uri}");
        statuses.push(b.status.as_u16());
    }
    // The cases cover acceptance and the layer's rejections alike.
    assert_eq!(
        statuses,
        [200, 200, 200, 401, 401, 401, 401, 403, 403, 400, 200],
        "the outcomes this test means to compare"
    );
}

/// Outside axum: the service's responses are the inner service's body type, and a
/// rejection's body is built from its bytes.
#[tokio::test]
async fn a_plain_service_keeps_its_body_type() {
    let fx = Fixture::new();
    let key = fx.key(NewKey::new("k", "alice")).await.key;
    let inner = tower::service_fn(|_req: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
    });
    let service: SameBodyService<_> = fx.layer.same_body().layer(inner);

    let response: Response<Full<Bytes>> = service
        .clone()
        .oneshot(request(
            "GET",
            "/",
            &[("x-api-key", key.expose().as_bytes())],
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");

    let response: Response<Full<Bytes>> = service.oneshot(request("GET", "/", &[])).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["code"], "missing_credentials");
}

/// The mode switches and the way back to the layer, as the docs show them.
#[tokio::test]
async fn modes_and_the_layer_behind() {
    let fx = Fixture::new();
    let same = fx.layer.same_body();
    let optional = app().layer(same.optional());
    let reply = send(&optional, request("GET", "/maybe", &[])).await;
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (200, "anonymous")
    );
    let required = app().layer(same.optional().required());
    assert_eq!(
        send(&required, request("GET", "/maybe", &[])).await.status,
        401
    );
    // The same state: a key created through the layer behind it is accepted at once.
    let manager = keywarden::KeyManager::for_layer(same.api_key_layer());
    let key = manager.create(NewKey::new("k", "dave")).await.unwrap().key;
    let reply = send(
        &required,
        request("GET", "/maybe", &[("x-api-key", key.expose().as_bytes())]),
    )
    .await;
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (200, "dave")
    );
}

/// A scope check applied with `same_body` refuses and admits as the plain one does, byte for
/// byte, in axum's body type.
#[tokio::test]
async fn a_scope_check_with_same_body_answers_as_the_plain_one() {
    use axum::routing::get;
    use keywarden::{Principal, RequireScopeLayer};
    let fx = Fixture::new();
    let plain = axum::Router::new()
        .route(
            "/admin",
            get(|p: Principal| async move { p.subject().to_owned() })
                .route_layer(RequireScopeLayer::new("admin")),
        )
        .layer(fx.layer.clone());
    let same = axum::Router::new()
        .route(
            "/admin",
            get(|p: Principal| async move { p.subject().to_owned() })
                .route_layer(RequireScopeLayer::new("admin").same_body()),
        )
        .layer(fx.layer.same_body());
    let without = fx.key(NewKey::new("k", "erin")).await.key;
    let with = fx.key(NewKey::new("a", "frank").scope("admin")).await.key;
    let mut statuses = Vec::new();
    for key in [without.expose(), with.expose()] {
        let headers = [("x-api-key", key.as_bytes())];
        let a = send(&plain, request("GET", "/admin", &headers)).await;
        let b = send(&same, request("GET", "/admin", &headers)).await;
        assert_eq!(
            (a.status, &a.headers, a.text()),
            (b.status, &b.headers, b.text())
        );
        statuses.push(b.status.as_u16());
    }
    assert_eq!(statuses, [403, 200]);
}
