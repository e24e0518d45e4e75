//! Forward auth behind a real nginx (`auth_request`), configured with exactly the file
//! docs/gateways.md shows (docs/gateways/nginx.conf), in front of a small upstream that
//! echoes the identity headers it sees.
//!
//! Needs the `nginx` binary (Debian package `nginx`; or set `KEYWARDEN_NGINX` to its path).
//! Without it the test is skipped with a message, except under `CI=true`, where it fails.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::routing::any;
use axum::{Json, Router};
use keywarden::ratelimit::ClientAddressSource;
use keywarden::server::AuthServer;
use keywarden::NewKey;
use serde_json::{json, Value};
use support::{Fixture, TempDir};

/// The configuration docs/gateways.md ships.
const SHIPPED: &str = include_str!("../docs/gateways/nginx.conf");

/// The nginx binary, or `None` (skip) when it is not installed outside CI.
fn nginx_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("KEYWARDEN_NGINX")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("PATH")
                .map(|path| {
                    std::env::split_paths(&path)
                        .map(|dir| dir.join("nginx"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        )
        .chain(["/usr/sbin/nginx".into(), "/usr/local/sbin/nginx".into()]);
    for candidate in candidates {
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("nginx is not installed under CI=true: install the Debian package `nginx`");
    }
    eprintln!("skipping: nginx is not installed (Debian package `nginx`, or set KEYWARDEN_NGINX)");
    None
}

/// An nginx started by this test, killed (by its own pid) on drop.
struct Nginx {
    child: Child,
    error_log: PathBuf,
}

impl Nginx {
    fn start(binary: &Path, dir: &Path, port: u16, keywarden: SocketAddr, app: SocketAddr) -> Self {
        let mut site = SHIPPED.to_owned();
        for (from, to) in [
            ("server 127.0.0.1:3000;", format!("server {keywarden};")),
            ("server 127.0.0.1:8080;", format!("server {app};")),
            ("listen 80;", format!("listen 127.0.0.1:{port};")),
        ] {
            assert!(site.contains(from), "the shipped config has `{from}`");
            site = site.replace(from, &to);
        }
        let d = dir.display();
        // One process, as the current user, in the foreground; every path in the temp dir.
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/client_body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{site}\n}}\n"
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let error_log = dir.join("error.log");
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let nginx = Self { child, error_log };
        nginx.wait_listening(port, dir);
        nginx
    }

    fn wait_listening(&self, port: u16, dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            let stderr = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {stderr} {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.error_log).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Only the process this test started.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(app: Router) -> SocketAddr {
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
async fn upstream(hits: Arc<AtomicUsize>) -> SocketAddr {
    let app = Router::new().fallback(any(move |headers: HeaderMap| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let seen: serde_json::Map<String, Value> = headers
                .iter()
                .filter(|(name, _)| {
                    name.as_str().starts_with("x-keywarden-")
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn docs_show_the_tested_nginx_config() {
    let docs = include_str!("../docs/gateways.md");
    assert!(
        docs.contains(SHIPPED.trim_end()),
        "docs/gateways.md must show docs/gateways/nginx.conf verbatim"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_in_front_of_an_upstream() {
    let Some(binary) = nginx_binary() else {
        return;
    };
    let fx = Fixture::new();
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

    let keywarden = serve(
        AuthServer::new(fx.layer.clone())
            .client_address(ClientAddressSource::TrustedHeader(
                "x-real-ip".parse().unwrap(),
            ))
            .router(),
    )
    .await;
    let hits = Arc::new(AtomicUsize::new(0));
    let app = upstream(hits.clone()).await;
    let dir = TempDir::new("nginx");
    let port = free_port();
    let nginx = Nginx::start(&binary, dir.path(), port, keywarden, app);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/orders/7");
    let log = || nginx.log();

    // A valid key reaches the upstream, which sees our identity, not the client's claims,
    // and not the key.
    let response = http
        .get(&url)
        .header("x-api-key", valid.key.expose())
        .header("x-keywarden-subject", "mallory")
        .header("x-keywarden-scopes", "*")
        .header("x-keywarden-code", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", log());
    let seen: Value = response.json().await.unwrap();
    assert_eq!(
        seen,
        json!({
            "x-keywarden-subject": "alice",
            "x-keywarden-key-id": valid.record.id.to_string(),
            "x-keywarden-collection": "users",
            "x-keywarden-scopes": "orders:read,orders:write",
        })
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Rejections: keywarden's status, code and headers; the upstream never sees them.
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
        .get(&url)
        .header("x-keywarden-subject", "mallory")
        .send()
        .await
        .unwrap();
    let headers = rejected(response, 401, "missing_credentials").await;
    assert!(headers.contains_key("www-authenticate"));
    let response = http
        .get(&url)
        .header("authorization", format!("Bearer {}", revoked.key.expose()))
        .send()
        .await
        .unwrap();
    let headers = rejected(response, 401, "revoked_key").await;
    assert!(headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    let response = http
        .post(&url)
        .header("x-api-key", reader.key.expose())
        .body("{}")
        .send()
        .await
        .unwrap();
    rejected(response, 403, "insufficient_scope").await;
    // A client claiming its DELETE is a GET (nginx passes client headers into the
    // subrequest): the shipped configuration overwrites the header, so still a 403.
    let response = http
        .delete(&url)
        .header("x-api-key", reader.key.expose())
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
    // The read-only key may read.
    let response = http
        .get(&url)
        .header("x-api-key", reader.key.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = http
        .get(&url)
        .header("x-api-key", limited.key.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = http
        .get(&url)
        .header("x-api-key", limited.key.expose())
        .send()
        .await
        .unwrap();
    let headers = rejected(response, 429, "rate_limited").await;
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    drop(nginx);
}
