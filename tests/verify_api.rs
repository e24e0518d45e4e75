//! `keywarden::server`: the verification API (`POST /v1/keys/verify`) and forward auth
//! (`/v1/auth`), through real routers with `oneshot` and a real server on loopback with a real
//! client. The nginx end-to-end test is tests/gateway_nginx.rs.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use http::Request;
use keywarden::ratelimit::{ClientAddressSource, FailedAttemptLimit, RateLimitPolicy};
use keywarden::server::AuthServer;
use keywarden::store::{ForeignDigest, ForeignScheme, ForeignSource, KeyRecord};
use keywarden::{ApiKeyLayer, Collection, KeyManager, KeyStore, MemoryStore, NewKey, StoreError};
use serde_json::{json, Value};
use support::{ring, send, Fixture, Reply};

fn router(fx: &Fixture) -> Router {
    AuthServer::new(fx.layer.clone()).router()
}

/// A fixture and a caller key holding `keys:verify`.
async fn env() -> (Fixture, Router, String) {
    let fx = Fixture::new();
    let caller = fx
        .key(NewKey::new("gateway", "svc-gateway").scope("keys:verify"))
        .await;
    let app = router(&fx);
    (fx, app, caller.key.expose().to_owned())
}

fn verify_request(caller: Option<&str>, content_type: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = Request::builder().method("POST").uri("/v1/keys/verify");
    if let Some(caller) = caller {
        builder = builder.header("x-api-key", caller);
    }
    if let Some(content_type) = content_type {
        builder = builder.header("content-type", content_type);
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

async fn verify(app: &Router, caller: &str, body: Value) -> Value {
    let reply = send(
        app,
        verify_request(Some(caller), Some("application/json"), &body.to_string()),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["content-type"], "application/json");
    reply.json()
}

#[tokio::test]
async fn a_valid_key_answers_its_principal_and_rate_limit() {
    let (fx, app, caller) = env().await;
    let key = fx
        .key(
            NewKey::new("worker", "alice")
                .scope("articles:read")
                .scope("articles:write")
                .rate_limit("10/min".parse::<RateLimitPolicy>().unwrap()),
        )
        .await;
    let verdict = verify(&app, &caller, json!({ "key": key.key.expose() })).await;
    assert_eq!(verdict["valid"], true);
    assert_eq!(verdict["principal"]["subject"], "alice");
    assert_eq!(verdict["principal"]["key_id"], key.record.id.to_string());
    assert_eq!(
        verdict["principal"]["scopes"],
        json!(["articles:read", "articles:write"])
    );
    assert_eq!(verdict["ratelimit"]["limit"], 10);
    assert_eq!(verdict["ratelimit"]["remaining"], 9);
    assert!(verdict["ratelimit"]["reset"].as_u64().unwrap() >= 1);
    let text = verdict.to_string();
    assert!(!text.contains(key.key.expose()), "the key is never echoed");

    // Scopes asked for are judged like `Principal::has_scope`; cost 1 is accepted.
    let verdict = verify(
        &app,
        &caller,
        json!({ "key": key.key.expose(), "scopes": ["articles:read"], "cost": 1 }),
    )
    .await;
    assert_eq!(verdict["valid"], true);
    assert_eq!(
        verdict["ratelimit"]["remaining"], 8,
        "one use per verification"
    );
    let verdict = verify(
        &app,
        &caller,
        json!({ "key": key.key.expose(), "scopes": ["articles:read", "billing"] }),
    )
    .await;
    assert_eq!(verdict["valid"], false);
    assert_eq!(verdict["code"], "insufficient_scope");
    assert!(verdict["detail"].as_str().unwrap().contains("billing"));

    // A key without a rate limit has none to report.
    let plain = fx.key(NewKey::new("plain", "bob").scope("*")).await;
    let verdict = verify(
        &app,
        &caller,
        json!({ "key": plain.key.expose(), "scopes": ["anything:at-all"] }),
    )
    .await;
    assert_eq!(verdict["valid"], true);
    assert_eq!(verdict["ratelimit"], Value::Null);
    // `*` never grants a management scope, here as anywhere.
    let verdict = verify(
        &app,
        &caller,
        json!({ "key": plain.key.expose(), "scopes": ["keys:admin"] }),
    )
    .await;
    assert_eq!(verdict["code"], "insufficient_scope");
}

#[tokio::test]
async fn invalid_keys_answer_the_layers_codes() {
    let (fx, app, caller) = env().await;
    let revoked = fx.key(NewKey::new("old", "alice")).await;
    fx.manager.revoke(revoked.record.id).await.unwrap();
    let unknown = {
        let other = Fixture::new();
        other.key(NewKey::new("elsewhere", "eve")).await
    };
    let limited = fx
        .key(NewKey::new("slow", "carol").rate_limit("1/min".parse().unwrap()))
        .await;
    let cases = [
        (revoked.key.expose().to_owned(), "revoked_key"),
        (unknown.key.expose().to_owned(), "invalid_key"),
        ("kw_live_not-a-key".to_owned(), "malformed_key"),
    ];
    for (key, code) in cases {
        let verdict = verify(&app, &caller, json!({ "key": key })).await;
        assert_eq!(verdict["valid"], false, "{code}");
        assert_eq!(verdict["code"], code);
        assert!(verdict["detail"].is_string());
        assert!(!verdict.to_string().contains(&key));
    }
    assert_eq!(
        verify(&app, &caller, json!({ "key": limited.key.expose() })).await["valid"],
        true
    );
    let verdict = verify(&app, &caller, json!({ "key": limited.key.expose() })).await;
    assert_eq!(verdict["code"], "rate_limited");
    assert_eq!(verdict["ratelimit"]["remaining"], 0);
    assert!(verdict["retry_after"].as_u64().unwrap() >= 1);
}

/// A content type, a body, the status, code and first field name answered.
type BadBody = (
    Option<&'static str>,
    String,
    u16,
    &'static str,
    Option<&'static str>,
);

#[tokio::test]
async fn malformed_bodies_are_problems_that_never_echo_the_input() {
    let (_fx, app, caller) = env().await;
    let secret_looking = "kw_live_SECRETSECRET";
    let cases: [BadBody; 9] = [
        (
            None,
            json!({"key": "x"}).to_string(),
            400,
            "invalid_request",
            None,
        ),
        (
            Some("application/json"),
            String::new(),
            400,
            "invalid_request",
            None,
        ),
        (
            Some("application/json"),
            format!("{{\"key\": \"{secret_looking}"),
            400,
            "invalid_request",
            None,
        ),
        (
            Some("application/json"),
            format!("[\"{secret_looking}\"]"),
            400,
            "invalid_request",
            None,
        ),
        (
            Some("application/json"),
            json!({}).to_string(),
            422,
            "validation_failed",
            Some("key"),
        ),
        (
            Some("application/json"),
            json!({"key": ""}).to_string(),
            422,
            "validation_failed",
            Some("key"),
        ),
        (
            Some("application/json"),
            json!({"key": 42}).to_string(),
            422,
            "validation_failed",
            Some("key"),
        ),
        (
            Some("application/json"),
            json!({"key": "k", "scopes": secret_looking}).to_string(),
            422,
            "validation_failed",
            Some("scopes"),
        ),
        (
            Some("application/json"),
            json!({"key": "k", secret_looking: 1}).to_string(),
            422,
            "validation_failed",
            Some("body"),
        ),
    ];
    for (content_type, body, status, code, field) in cases {
        let reply = send(&app, verify_request(Some(&caller), content_type, &body)).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.text());
        assert_eq!(reply.code(), code, "{body}");
        assert!(!reply.text().contains("SECRET"), "{}", reply.text());
        if let Some(field) = field {
            assert_eq!(reply.json()["errors"][0]["field"], field, "{body}");
        }
    }
    // A cost is a whole number from 0 to 4294967295; anything else names the field.
    for cost in [json!(-1), json!("1"), json!(1.5), json!(4_294_967_296_u64)] {
        let reply = send(
            &app,
            verify_request(
                Some(&caller),
                Some("application/json"),
                &json!({"key": "k", "cost": cost}).to_string(),
            ),
        )
        .await;
        assert_eq!(reply.status, 422, "{cost}");
        assert_eq!(reply.json()["errors"][0]["field"], "cost");
    }
    let reply = send(
        &app,
        verify_request(
            Some(&caller),
            Some("application/json"),
            &json!({"key": "k", "cost": -5}).to_string(),
        ),
    )
    .await;
    assert_eq!(
        reply.json()["errors"][0]["message"],
        "cost must be a whole number from 0 to 4294967295"
    );
}

#[tokio::test]
async fn the_caller_needs_keys_verify_by_its_exact_name() {
    let (fx, app, _) = env().await;
    let target = fx.key(NewKey::new("t", "alice")).await;
    let body = json!({ "key": target.key.expose() }).to_string();

    let reply = send(&app, verify_request(None, Some("application/json"), &body)).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.code(), "missing_credentials");

    for scopes in [
        &["read"][..],
        &["*"],
        &["keys:*"],
        &["keys:admin"],
        &["keys:self"],
    ] {
        let caller = fx
            .key(
                scopes
                    .iter()
                    .fold(NewKey::new("c", "svc"), |k, s| k.scope(*s)),
            )
            .await;
        let reply = send(
            &app,
            verify_request(Some(caller.key.expose()), Some("application/json"), &body),
        )
        .await;
        assert_eq!(reply.status, 403, "{scopes:?}");
        assert_eq!(reply.code(), "insufficient_scope");
        assert!(reply.text().contains("keys:verify"));
    }

    let revoked = fx.key(NewKey::new("c", "svc").scope("keys:verify")).await;
    fx.manager.revoke(revoked.record.id).await.unwrap();
    let reply = send(
        &app,
        verify_request(Some(revoked.key.expose()), Some("application/json"), &body),
    )
    .await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.code(), "revoked_key");

    // The caller is authenticated before the body is read: no verdict, no body errors.
    let reply = send(&app, verify_request(None, Some("application/json"), "{")).await;
    assert_eq!(reply.status, 401);
}

/// A foreign scheme whose "digest" is the key itself, and a source holding one record.
#[derive(Debug)]
struct TestScheme;

impl ForeignScheme for TestScheme {
    fn issuer(&self) -> &'static str {
        "partner"
    }
    fn digests(&self, key: &[u8]) -> Vec<ForeignDigest> {
        vec![ForeignDigest::from_mac("plain", key)]
    }
}

#[derive(Debug)]
struct OneRecord(ForeignDigest, KeyRecord);

#[async_trait::async_trait]
impl ForeignSource for OneRecord {
    async fn find(&self, digests: &[ForeignDigest]) -> Result<Option<KeyRecord>, StoreError> {
        Ok(digests.contains(&self.0).then(|| self.1.clone()))
    }
}

#[tokio::test]
async fn a_foreign_principal_never_holds_keys_verify() {
    // The record: any native record with `keys:verify`, served as the partner's.
    let scratch = Arc::new(MemoryStore::new());
    let created = KeyManager::new(scratch.clone(), ring())
        .create(
            NewKey::new("partner", "p1")
                .collection("partners")
                .scope("keys:verify"),
        )
        .await
        .unwrap();
    let record = scratch.get(created.record.id).await.unwrap().unwrap();
    let foreign_key = "partner-issued-key-0001";
    let source: Arc<dyn ForeignSource> = Arc::new(OneRecord(
        ForeignDigest::from_mac("plain", foreign_key.as_bytes()),
        record,
    ));
    let store = Arc::new(MemoryStore::new());
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .collection(Collection::new("users"))
        .collection(Collection::foreign("partners", TestScheme, source))
        .build()
        .unwrap();
    let target = KeyManager::for_layer(&layer)
        .create(NewKey::new("t", "alice").collection("users"))
        .await
        .unwrap();
    let app: Router = AuthServer::new(layer.clone()).router();
    let body = json!({ "key": target.key.expose() }).to_string();
    let req = Request::builder()
        .method("POST")
        .uri("/v1/keys/verify")
        .header("authorization", format!("partners API-Key {foreign_key}"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let reply = send(&app, req).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.code(), "insufficient_scope");
    // The foreign key itself is valid: it is verified, but cannot verify.
    let (principal, _) = layer
        .check_headers(
            &[(
                http::header::AUTHORIZATION,
                format!("partners API-Key {foreign_key}").parse().unwrap(),
            )]
            .into_iter()
            .collect(),
            &http::Method::GET,
            None,
        )
        .await
        .unwrap();
    assert!(principal.is_foreign());
}

fn from_peer(mut req: Request<Body>, peer: &str) -> Request<Body> {
    req.extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    req
}

#[tokio::test]
async fn the_loopback_option_opens_only_loopback_connections() {
    let fx = Fixture::new();
    let target = fx.key(NewKey::new("t", "alice")).await;
    let body = json!({ "key": target.key.expose() }).to_string();
    let closed: Router = AuthServer::new(fx.layer.clone()).router();
    let open: Router = AuthServer::new(fx.layer.clone())
        .verify_without_caller_key_from_loopback()
        .router();
    let keyless = || verify_request(None, Some("application/json"), &body);

    let reply = send(&closed, from_peer(keyless(), "127.0.0.1:5000")).await;
    assert_eq!(reply.status, 401, "off unless chosen");
    for peer in ["127.0.0.1:5000", "[::1]:5000"] {
        let reply = send(&open, from_peer(keyless(), peer)).await;
        assert_eq!(reply.status, 200, "{peer}");
        assert_eq!(reply.json()["valid"], true);
    }
    let reply = send(&open, from_peer(keyless(), "192.0.2.7:5000")).await;
    assert_eq!(reply.status, 401, "a remote peer still needs a caller key");
    let reply = send(&open, keyless()).await;
    assert_eq!(reply.status, 401, "no known peer: still needs a caller key");
    // A forwarded header never makes a request loopback.
    let mut req = from_peer(keyless(), "192.0.2.7:5000");
    req.headers_mut()
        .insert("x-forwarded-for", "127.0.0.1".parse().unwrap());
    assert_eq!(send(&open, req).await.status, 401);
}

/// A real server on loopback, a real client; failed-attempt limiting counts the address the
/// calling service forwards, through the layer's own limiter.
#[tokio::test]
async fn a_real_client_over_loopback_and_failed_attempt_limiting_by_forwarded_address() {
    let fx = Fixture::with(|b| {
        b.failed_attempt_limit(
            FailedAttemptLimit::new(2, Duration::from_secs(60)).client_address(
                ClientAddressSource::TrustedHeader("x-forwarded-for".parse().unwrap()),
            ),
        )
    });
    let caller = fx
        .key(NewKey::new("gateway", "svc").scope("keys:verify"))
        .await;
    let good = fx.key(NewKey::new("good", "alice")).await;
    let bad = Fixture::new().key(NewKey::new("bad", "eve")).await;
    let app: Router = AuthServer::new(fx.layer.clone())
        .client_address(ClientAddressSource::TrustedHeader(
            "x-forwarded-for".parse().unwrap(),
        ))
        .router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/keys/verify");
    let post = |key: &str, from: &str| {
        client
            .post(&url)
            .header("x-api-key", caller.key.expose())
            .header("x-forwarded-for", from)
            .json(&json!({ "key": key }))
            .send()
    };
    let res = post(good.key.expose(), "198.51.100.1").await.unwrap();
    assert_eq!(res.status(), 200);
    let verdict: Value = res.json().await.unwrap();
    assert_eq!(verdict["valid"], true);
    assert_eq!(verdict["principal"]["subject"], "alice");

    for _ in 0..2 {
        let verdict: Value = post(bad.key.expose(), "203.0.113.9")
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(verdict["code"], "invalid_key");
    }
    // That address is over its budget: its verifications are refused before any store work.
    let verdict: Value = post(bad.key.expose(), "203.0.113.9")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(verdict["code"], "rate_limited", "{verdict}");
    assert!(verdict["retry_after"].as_u64().unwrap() >= 1);
    // Another address is not.
    let verdict: Value = post(good.key.expose(), "198.51.100.1")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(verdict["valid"], true);
    server.abort();
}

fn auth_request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::empty()).unwrap()
}

fn problem(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.code(), code);
    assert_eq!(reply.headers["x-keywarden-code"], code);
    for name in ["x-keywarden-subject", "x-keywarden-key-id"] {
        assert!(!reply.headers.contains_key(name));
    }
}

#[tokio::test]
async fn forward_auth_answers_identity_headers_or_the_layers_rejection() {
    let fx = Fixture::new();
    let app = router(&fx);
    let key = fx
        .key(
            NewKey::new("k", "alicé 100%")
                .collection("teams")
                .scope("read")
                .scope("write")
                .rate_limit("2/min".parse().unwrap()),
        )
        .await;
    let reader = fx.key(NewKey::new("r", "bob").read_only(true)).await;

    // Any method, any path under the prefix (Envoy appends the original path).
    for (method, uri) in [
        ("GET", "/v1/auth"),
        ("GET", "/v1/auth/"),
        ("GET", "/v1/auth/a/b"),
        ("POST", "/v1/auth/orders/7?x=1"),
    ] {
        let reply = send(
            &app,
            auth_request(method, uri, &[("x-api-key", reader.key.expose())]),
        )
        .await;
        if method == "GET" {
            assert_eq!(reply.status, 200);
            assert_eq!(reply.headers["x-keywarden-subject"], "bob");
            assert_eq!(reply.headers["x-keywarden-collection"], "users");
            assert_eq!(
                reply.headers["x-keywarden-key-id"],
                reader.record.id.to_string()
            );
            assert_eq!(reply.headers["x-keywarden-scopes"], "");
            assert!(reply.body.is_empty());
        } else {
            // Envoy keeps the original method: a read-only key may not POST.
            problem(&reply, 403, "insufficient_scope");
        }
    }
    // The forwarded method decides, whatever the check request's own.
    for header in ["x-forwarded-method", "x-original-method"] {
        let reply = send(
            &app,
            auth_request(
                "GET",
                "/v1/auth",
                &[
                    ("authorization", &format!("Bearer {}", reader.key.expose())),
                    (header, "DELETE"),
                ],
            ),
        )
        .await;
        problem(&reply, 403, "insufficient_scope");
        let reply = send(
            &app,
            auth_request(
                "GET",
                "/v1/auth",
                &[("x-api-key", reader.key.expose()), (header, "HEAD")],
            ),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    let reply = send(
        &app,
        auth_request(
            "GET",
            "/v1/auth",
            &[
                ("x-api-key", reader.key.expose()),
                ("x-forwarded-method", "BAD METHOD"),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, 400);

    // The collection form; the subject is percent-encoded.
    let reply = send(
        &app,
        auth_request(
            "POST",
            "/v1/auth",
            &[(
                "authorization",
                &format!("teams API-Key {}", key.key.expose()),
            )],
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["x-keywarden-subject"], "alic%C3%A9%20100%25");
    assert_eq!(reply.headers["x-keywarden-collection"], "teams");
    assert_eq!(reply.headers["x-keywarden-scopes"], "read,write");
    assert_eq!(reply.headers["ratelimit-limit"], "2");
    assert_eq!(reply.headers["ratelimit-remaining"], "1");

    // Rejections: the layer's status, headers and problem+json.
    let reply = send(&app, auth_request("GET", "/v1/auth", &[])).await;
    problem(&reply, 401, "missing_credentials");
    assert!(reply.headers.contains_key("www-authenticate"));
    let reply = send(
        &app,
        auth_request(
            "GET",
            "/v1/auth",
            &[(
                "authorization",
                &format!("users API-Key {}", key.key.expose()),
            )],
        ),
    )
    .await;
    problem(&reply, 401, "invalid_key");
    let _ = send(
        &app,
        auth_request("GET", "/v1/auth", &[("x-api-key", key.key.expose())]),
    )
    .await;
    let reply = send(
        &app,
        auth_request("GET", "/v1/auth", &[("x-api-key", key.key.expose())]),
    )
    .await;
    problem(&reply, 429, "rate_limited");
    assert!(
        reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(reply.headers["ratelimit-remaining"], "0");
    fx.manager.revoke(reader.record.id).await.unwrap();
    let reply = send(
        &app,
        auth_request("GET", "/v1/auth", &[("x-api-key", reader.key.expose())]),
    )
    .await;
    problem(&reply, 401, "revoked_key");
    let reply = send(
        &app,
        auth_request(
            "GET",
            "/v1/auth",
            &[
                ("x-api-key", reader.key.expose()),
                ("authorization", "Bearer kw_live_other"),
            ],
        ),
    )
    .await;
    problem(&reply, 400, "ambiguous_credentials");
}

/// The verify API and forward auth share the layer's pipeline: concurrent misses make one
/// store query, hits and cached not-found answers make none, and a revocation through a
/// manager of the layer applies at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_endpoints_use_the_layers_cache_and_coalescing() {
    let store = Arc::new(support::CountingStore::slow(Duration::from_millis(50)));
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .collection(Collection::new("users"))
        .build()
        .unwrap();
    let manager = KeyManager::for_layer(&layer);
    let caller = manager
        .create(NewKey::new("gw", "svc").scope("keys:verify"))
        .await
        .unwrap();
    let key = manager.create(NewKey::new("k", "alice")).await.unwrap();
    let unknown = keywarden::key::KeyPrefix::new("kw_live")
        .unwrap()
        .generate();
    let app: Router = AuthServer::new(layer.clone()).router();
    // Warm the caller's own entry.
    let reply = send(
        &app,
        verify_request(
            Some(caller.key.expose()),
            Some("application/json"),
            &json!({ "key": key.key.expose() }).to_string(),
        ),
    )
    .await;
    assert_eq!(reply.json()["valid"], true);
    let before = store.lookups();

    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let app = app.clone();
            let caller = caller.key.expose().to_owned();
            let unknown = unknown.expose().to_owned();
            tokio::spawn(async move {
                let body = json!({ "key": unknown }).to_string();
                if i % 2 == 0 {
                    let req = verify_request(Some(&caller), Some("application/json"), &body);
                    send(&app, req).await.json()["code"].clone()
                } else {
                    let req = auth_request("GET", "/v1/auth", &[("x-api-key", &unknown)]);
                    Value::from(send(&app, req).await.code())
                }
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), "invalid_key");
    }
    assert_eq!(
        store.lookups(),
        before + 1,
        "one query for 50 concurrent misses"
    );
    for _ in 0..5 {
        let reply = send(
            &app,
            auth_request("GET", "/v1/auth", &[("x-api-key", key.key.expose())]),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(store.lookups(), before + 1, "hits make no query");

    manager.revoke(key.record.id).await.unwrap();
    let reply = send(
        &app,
        auth_request("GET", "/v1/auth", &[("x-api-key", key.key.expose())]),
    )
    .await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.code(), "revoked_key");
}
