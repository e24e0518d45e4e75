//! What the gateway tests share: finding the gateway's binary, a loopback server, an upstream
//! that echoes the identity headers it sees, and the end-to-end scenario every gateway must
//! pass in front of keywarden's forward auth.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::any;
use axum::{Json, Router};
use keywarden::{CreatedKey, NewKey};
use serde_json::{json, Value};

use super::Fixture;

/// The binary `name` from `env_var`, `PATH` or `extra` paths; `None` (skip, with a message)
/// when it is missing outside CI. Under `CI=true` a missing binary fails the test.
pub fn find_binary(name: &str, env_var: &str, package: &str, extra: &[&str]) -> Option<PathBuf> {
    let candidates = std::env::var_os(env_var)
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("PATH")
                .map(|path| {
                    std::env::split_paths(&path)
                        .map(|dir| dir.join(name))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        )
        .chain(extra.iter().map(PathBuf::from));
    for candidate in candidates {
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{name} is not installed under CI=true: install the Debian package `{package}`");
    }
    eprintln!("skipping: {name} is not installed (Debian package `{package}`, or set {env_var})");
    None
}

/// Serves `app` on a free loopback port, with connection info.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// The upstream: counts requests and echoes the `X-Keywarden-*` headers it sees.
pub async fn upstream(hits: Arc<AtomicUsize>) -> SocketAddr {
    let app = Router::new().fallback(any(move |headers: HeaderMap| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            // Any spelling of our headers (`X_Keywarden_Subject` too): apps that map header
            // names to `HTTP_X_KEYWARDEN_SUBJECT` cannot tell them apart.
            let seen: serde_json::Map<String, Value> = headers
                .iter()
                .filter(|(name, _)| {
                    name.as_str().contains("keywarden")
                        || *name == "authorization"
                        || *name == "x-api-key"
                })
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        Value::from(String::from_utf8_lossy(value.as_bytes()).into_owned()),
                    )
                })
                .collect();
            Json(Value::Object(seen))
        }
    }));
    serve(app).await
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The keys the scenario uses, created in `fx`.
pub struct ScenarioKeys {
    pub valid: CreatedKey,
    pub reader: CreatedKey,
    pub revoked: CreatedKey,
    pub limited: CreatedKey,
}

impl ScenarioKeys {
    pub async fn create(fx: &Fixture) -> Self {
        let valid = fx
            .key(
                NewKey::new("app", "alice")
                    .scope("orders:read")
                    .scope("orders:write"),
            )
            .await;
        let reader = fx.key(NewKey::new("reader", "bob").read_only(true)).await;
        let revoked = fx.key(NewKey::new("old", "carol")).await;
        fx.manager.revoke(revoked.record.id).await.unwrap();
        let limited = fx
            .key(NewKey::new("slow", "dave").rate_limit("1/min".parse().unwrap()))
            .await;
        Self {
            valid,
            reader,
            revoked,
            limited,
        }
    }
}

/// The end-to-end scenario through a gateway at `url` (a path the gateway protects): a valid
/// key reaches the upstream with our identity headers and never the client's forged ones;
/// missing and revoked keys get 401, a read-only key on POST (and on a DELETE claiming to be
/// a GET) 403, a rate-limited key 429 with `Retry-After`, each with keywarden's problem+json
/// body and `X-Keywarden-Code`; no rejection reaches the upstream. `strips_key`: the
/// gateway's configuration also keeps the key from the upstream. `log` is the gateway's log,
/// shown when an assertion fails.
pub async fn forward_auth_scenario(
    url: &str,
    keys: &ScenarioKeys,
    hits: &AtomicUsize,
    strips_key: bool,
    log: impl Fn() -> String,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let response = http
        .get(url)
        .header("x-api-key", keys.valid.key.expose())
        .header("x-keywarden-subject", "mallory")
        .header("x-keywarden-scopes", "*")
        .header("x-keywarden-code", "forged")
        .header("x_keywarden_subject", "mallory")
        .header("X-Keywarden_Scopes", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", log());
    let seen: Value = response.json().await.unwrap();
    let identity = json!({
        "x-keywarden-subject": "alice",
        "x-keywarden-key-id": keys.valid.record.id.to_string(),
        "x-keywarden-collection": "users",
        "x-keywarden-scopes": "orders:read,orders:write",
    });
    if strips_key {
        assert_eq!(seen, identity);
    } else {
        // The upstream also sees the key the request carried; never a forged identity.
        let mut expected = identity.as_object().unwrap().clone();
        expected.insert("x-api-key".into(), keys.valid.key.expose().into());
        assert_eq!(seen, Value::Object(expected));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let rejected = |response: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(response.status(), status, "{code}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(response.headers()["x-keywarden-code"], code);
        let headers = response.headers().clone();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], status);
        assert_eq!(body["code"], code);
        headers
    };
    let response = http
        .get(url)
        .header("x-keywarden-subject", "mallory")
        .send()
        .await
        .unwrap();
    let headers = rejected(response, 401, "missing_credentials").await;
    assert!(headers.contains_key("www-authenticate"));
    let response = http
        .get(url)
        .header(
            "authorization",
            format!("Bearer {}", keys.revoked.key.expose()),
        )
        .send()
        .await
        .unwrap();
    let headers = rejected(response, 401, "revoked_key").await;
    assert!(headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    let response = http
        .post(url)
        .header("x-api-key", keys.reader.key.expose())
        .body("{}")
        .send()
        .await
        .unwrap();
    rejected(response, 403, "insufficient_scope").await;
    // A client claiming its DELETE is a GET: the gateway overwrites the header.
    let response = http
        .delete(url)
        .header("x-api-key", keys.reader.key.expose())
        .header("x-forwarded-method", "GET")
        .header("x-original-method", "GET")
        .send()
        .await
        .unwrap();
    rejected(response, 403, "insufficient_scope").await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "no rejection reached the upstream"
    );
    let response = http
        .get(url)
        .header("x-api-key", keys.reader.key.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the read-only key may read");
    let response = http
        .get(url)
        .header("x-api-key", keys.limited.key.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = http
        .get(url)
        .header("x-api-key", keys.limited.key.expose())
        .send()
        .await
        .unwrap();
    let headers = rejected(response, 429, "rate_limited").await;
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}
