#![cfg(all(feature = "cli", unix))]
//! `keywarden serve` as something to deploy: the config file (and what wins over it), errors
//! that name the line and field, `/readyz`, JSON logs with one line per request, and a
//! SIGTERM that drains requests in flight and writes the last key uses.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod support;

use support::serve::ServeProcess;
use support::{service_url, unique, url_addr, url_via, TcpProxy, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_keywarden");
const SECRET: &str = "serve-ops-test-secret-0123456789abcdefghij";

/// The binary with a clean keywarden environment, the test secret and the temp database.
fn command(dir: &TempDir) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path());
    for (var, _) in std::env::vars() {
        if var.starts_with("KEYWARDEN_") {
            cmd.env_remove(var);
        }
    }
    cmd.env("KEYWARDEN_DATABASE_URL", dir.db_url());
    cmd.env("KEYWARDEN_SECRET", SECRET);
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn succeeded(output: Output) -> String {
    assert!(output.status.success(), "failed: {}", text(&output.stderr));
    text(&output.stdout)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn readyz(http: &reqwest::Client, server: &ServeProcess) -> (u16, Value) {
    let response = http.get(server.url("/readyz")).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Every JSON log line on stderr, parsed; panics on a line that is not JSON.
fn json_logs(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with("warning: "))
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect()
}

#[tokio::test]
async fn the_config_file_sets_collections_prefixes_logs_and_loses_to_the_environment() {
    let dir = TempDir::new("serve-config");
    let config = dir.write(
        "keywarden.toml",
        r#"
key_prefixes = ["acme_live", "acme_test"]

[server]
addr = "127.0.0.1:0"

[auth]
collections = ["partners", "bots"]

[cache]
ttl = "30s"

[log]
format = "text"
requests = true
"#,
    );
    // The CLI reads the same file: the key gets the deployment's prefix.
    let mut create = command(&dir);
    create.args([
        "--config",
        &config,
        "keys",
        "create",
        "--json",
        "--name",
        "p",
        "--subject",
        "acme-partner",
        "--collection",
        "partners",
    ]);
    let created: Value = serde_json::from_str(&succeeded(create.output().unwrap())).unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("acme_live_"), "{key}");

    // The environment wins over the file: JSON logs although the file says text.
    let mut serve = command(&dir);
    serve
        .args(["serve", "--config", &config])
        .env("KEYWARDEN_LOG_FORMAT", "json");
    let server = ServeProcess::spawn(serve, dir.path(), "serve");
    let http = client();
    server.wait_healthy(&http).await;
    assert!(
        server.stdout().contains("collections partners, bots"),
        "{}",
        server.stdout()
    );

    let whoami = |header: String| {
        http.get(server.url("/whoami"))
            .header("authorization", header)
            .send()
    };
    let response = whoami(format!("partners API-Key {key}")).await.unwrap();
    assert_eq!(response.status(), 200);
    let principal: Value = response.json().await.unwrap();
    assert_eq!(principal["subject"], "acme-partner");
    // `users` is not configured here: an unknown slug.
    let response = whoami(format!("users API-Key {key}")).await.unwrap();
    assert_eq!(response.status(), 401);
    let response = http
        .get(server.url("/whoami?api_key=should-not-be-logged"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let mut server = server;
    assert!(server.send_sigterm(), "no kill tool");
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", server.stderr());
    let (stdout, stderr) = (server.stdout(), server.stderr());
    {
        assert!(
            !stdout.contains(&key) && !stderr.contains(&key),
            "the key was printed"
        );
        assert!(
            !stderr.contains("should-not-be-logged"),
            "a query was logged"
        );
        let logs = json_logs(&stderr);
        let requests: Vec<&Value> = logs
            .iter()
            .filter(|l| l["target"] == "keywarden::access")
            .collect();
        let whoami: Vec<(u64, &str)> = requests
            .iter()
            .filter(|l| l["path"] == "/whoami")
            .map(|l| (l["status"].as_u64().unwrap(), l["code"].as_str().unwrap()))
            .collect();
        assert_eq!(
            whoami,
            [
                (200, ""),
                (401, "invalid_key"),
                (401, "missing_credentials")
            ],
            "{logs:?}"
        );
        for line in &requests {
            assert_eq!(line["level"], "INFO");
            assert_eq!(line["method"], "GET");
            assert!(line["millis"].as_f64().unwrap() >= 0.0);
            assert!(line["timestamp"].is_string());
        }
        assert!(logs.iter().any(|l| l["message"] == "listening"), "{logs:?}");
        assert!(logs.iter().any(|l| l["message"] == "shut down"), "{logs:?}");
    }
}

#[test]
fn a_bad_config_file_stops_serve_naming_the_line_and_the_field() {
    let dir = TempDir::new("serve-bad-config");
    let cases = [
        (
            "[server]\naddr = \"127.0.0.1:0\"\n\n[cache]\nttl = \"soon\"\n",
            "line 5, cache.ttl: invalid duration",
        ),
        (
            "[cache]\nttl_seconds = 5\n",
            "line 2, cache.ttl_seconds: unknown field `ttl_seconds`",
        ),
        (
            "database_url = \"postgres://kw:hunter2@db/keys\"\n[server]\naddr = 3000\n",
            "line 3, server.addr: invalid type",
        ),
        (
            "[log]\nformat = \"xml\"\n",
            "line 2, log.format: unknown variant `xml`",
        ),
        (
            "key_prefixes = [\"Bad Prefix\"]\n",
            "line 1, key_prefixes: invalid key prefix",
        ),
        ("[auth]\ncollections = []\n", "auth.collections is empty"),
        (
            "[server]\nclient_address_header = \"x-forwarded-for\"\n\
             trusted_proxies = [\"::ffff:0.0.0.0/96\"]\n",
            "trusted proxies may not be 0.0.0.0/0",
        ),
        (
            "[server]\nclient_address_header = \"x-forwarded-for\"\ntrusted_proxies = []\n",
            "trusted proxies: the list is empty",
        ),
        ("[log]\nlevel = \"infoo\"\n", "invalid log filter"),
        (
            "[server]\ntrusted_proxies = [\"10.0.0.1\"]\n",
            "trusted proxies need the header",
        ),
        (
            "[auth]\ncollections = [\"users\"]\nopaque_collections = [\"imported\"]\n",
            "auth.opaque_collections names \"imported\"",
        ),
    ];
    for (contents, expected) in cases {
        let path = dir.write("bad.toml", contents);
        let output = command(&dir)
            .args(["serve", "--config", &path, "--addr", "127.0.0.1:0"])
            .output()
            .unwrap();
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{contents}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{contents}: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains(expected), "{contents}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    let output = command(&dir)
        .args(["serve", "--config", "missing.toml"])
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.starts_with("error: cannot read the config file missing.toml"),
        "{stderr}"
    );
}

/// SIGTERM: `/readyz` fails at once while requests are still served for the shutdown delay,
/// then the listener closes, a request in flight still gets its answer, and the uses the
/// layer kept in memory are written before the process exits 0.
#[tokio::test]
async fn sigterm_fails_readiness_drains_in_flight_requests_and_writes_the_last_uses() {
    let dir = TempDir::new("serve-drain");
    let config = dir.write(
        "keywarden.toml",
        r#"
[server]
shutdown_delay = "1500ms"
shutdown_grace = "20s"

[cache]
# Only the shutdown writes uses in this test.
usage_flush_interval = "1h"
"#,
    );
    let mut create = command(&dir);
    create.args([
        "keys",
        "create",
        "--json",
        "--name",
        "v",
        "--scope",
        "keys:verify",
    ]);
    let created: Value = serde_json::from_str(&succeeded(create.output().unwrap())).unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();

    let mut serve = command(&dir);
    serve.args(["serve", "--addr", "127.0.0.1:0", "--config", &config]);
    let mut server = ServeProcess::spawn(serve, dir.path(), "serve");
    let http = client();
    server.wait_healthy(&http).await;
    let (status, body) = readyz(&http, &server).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({
            "status": "ready",
            "checks": { "store": "ok", "revocation": "poll" }
        })
    );

    for _ in 0..3 {
        let response = http
            .get(server.url("/whoami"))
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    // A verify request whose body is still on its way when the signal comes.
    let body = format!(r#"{{"key": "{key}"}}"#);
    let (head, tail) = body.split_at(10);
    let mut slow = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    slow.write_all(
        format!(
            "POST /v1/keys/verify HTTP/1.1\r\nhost: test\r\nx-api-key: {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert!(server.send_sigterm(), "no kill tool");
    // During the delay: not ready, but still serving.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let (status, body) = readyz(&http, &server).await;
        if status == 503 {
            assert_eq!(body, serde_json::json!({ "status": "draining" }));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "/readyz still ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = http
        .get(server.url("/whoami"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "requests are served during the delay"
    );

    // After the delay the listener is closed; the request in flight is still answered.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let refused = tokio::net::TcpStream::connect(server.addr()).await;
    assert!(refused.is_err(), "still accepting after the delay");
    slow.write_all(tail.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_string(&mut answer))
        .await
        .expect("the request in flight was not answered")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"valid\":true"), "{answer}");

    let status = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", server.stderr());
    assert!(server.stdout().contains("shut down"));

    // 4 × /whoami (one during the delay), the verify request's caller key and the verified
    // key: 6 uses, written by the shutdown (the flush interval is an hour).
    let mut show = command(&dir);
    show.args(["keys", "show", &id, "--json"]);
    let shown: Value = serde_json::from_str(&succeeded(show.output().unwrap())).unwrap();
    assert_eq!(shown["use_count"], 6, "{shown}");
    assert!(shown["last_used_at"].is_string(), "{shown}");
}

/// `/readyz` follows Redis when serve uses it: 503 naming `redis` while it is unreachable,
/// ready again once it answers. Multi-threaded: the proxy runs while the test thread waits
/// for the process to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis() {
    let Some(redis_url) = service_url("KEYWARDEN_TEST_REDIS_URL") else {
        return;
    };
    let dir = TempDir::new("serve-ready-redis");
    let proxy = TcpProxy::start(url_addr(&redis_url)).await;
    let mut serve = command(&dir);
    serve
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env("KEYWARDEN_REDIS_URL", url_via(&redis_url, proxy.addr))
        .env("KEYWARDEN_REDIS_NAMESPACE", unique("kwready"));
    let server = ServeProcess::spawn(serve, dir.path(), "serve");
    let http = client();
    server.wait_healthy(&http).await;
    let (status, body) = readyz(&http, &server).await;
    assert_eq!(
        (status, &body["checks"]["redis"]),
        (200, &Value::from("ok"))
    );

    proxy.cut();
    // A verdict is reused for a second: poll.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = readyz(&http, &server).await;
        if status == 503 || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["redis"], "unreachable");
    assert_eq!(body["checks"]["store"], "ok");

    proxy.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = readyz(&http, &server).await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.terminate();
}

/// A switch the file turns on, the environment (or `--flag=false`) turns off again.
#[tokio::test]
async fn the_environment_turns_off_what_the_file_turned_on() {
    let dir = TempDir::new("serve-bool-precedence");
    let config = dir.write(
        "keywarden.toml",
        "[server]\nverify_without_key_on_loopback = true\n[log]\nrequests = true\n",
    );
    let mut create = command(&dir);
    create.args(["keys", "create", "--json", "--name", "k"]);
    let created: Value = serde_json::from_str(&succeeded(create.output().unwrap())).unwrap();
    let key = created["key"].as_str().unwrap().to_owned();

    for (name, env, flag) in [
        (
            "env",
            Some(("KEYWARDEN_VERIFY_WITHOUT_KEY_ON_LOOPBACK", "false")),
            None,
        ),
        ("flag", None, Some("--verify-without-key-on-loopback=false")),
    ] {
        let mut serve = command(&dir);
        serve.args(["serve", "--addr", "127.0.0.1:0", "--config", &config]);
        serve.env("KEYWARDEN_LOG_REQUESTS", "false");
        if let Some((var, value)) = env {
            serve.env(var, value);
        }
        if let Some(flag) = flag {
            serve.arg(flag);
        }
        let mut server = ServeProcess::spawn(serve, dir.path(), name);
        let http = client();
        server.wait_healthy(&http).await;
        // No caller key: refused, although the file opened the endpoint on loopback.
        let response = http
            .post(server.url("/v1/keys/verify"))
            .json(&serde_json::json!({ "key": key }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{name}");
        assert!(server.send_sigterm());
        assert!(server.wait_exit(Duration::from_secs(20)).success());
        assert!(
            !server.stderr().contains("keywarden::access"),
            "{name}: requests were logged: {}",
            server.stderr()
        );
    }

    // And the file alone opens it (on loopback), with a warning.
    let mut serve = command(&dir);
    serve.args(["serve", "--addr", "127.0.0.1:0", "--config", &config]);
    let server = ServeProcess::spawn(serve, dir.path(), "file");
    let http = client();
    server.wait_healthy(&http).await;
    let response = http
        .post(server.url("/v1/keys/verify"))
        .json(&serde_json::json!({ "key": key }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        server.stderr().contains("needs no caller key"),
        "{}",
        server.stderr()
    );
    server.terminate();
}
