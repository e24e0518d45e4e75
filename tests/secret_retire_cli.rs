#![cfg(all(feature = "cli", feature = "postgres"))]
//! A secret rotation rolled out over two real `keywarden serve` processes on PostgreSQL
//! (loopback, a real HTTP client), then `keywarden secret retire`: instance A runs the new
//! secret with the old one as previous, instance B still runs only the old one.

mod support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keywarden::{Secret, SecretRing};
use serde_json::Value;
use support::serve::ServeProcess;
use support::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_keywarden");
const OLD: &str = "retire-cli-old-secret-0123456789abcdefghij";
const NEW: &str = "retire-cli-new-secret-0123456789abcdefghij";

/// The binary with a clean keywarden environment, the test's database and a secret ring.
fn command(url: &str, secret: &str, previous: Option<&str>) -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "KEYWARDEN_SECRET",
        "KEYWARDEN_PREVIOUS_SECRETS",
        "KEYWARDEN_DATABASE_URL",
        "KEYWARDEN_REDIS_URL",
        "KEYWARDEN_REDIS_NAMESPACE",
        "KEYWARDEN_ADDR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("KEYWARDEN_DATABASE_URL", url);
    cmd.env("KEYWARDEN_SECRET", secret);
    if let Some(previous) = previous {
        cmd.env("KEYWARDEN_PREVIOUS_SECRETS", previous);
    }
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn json_ok(output: &Output) -> Value {
    assert!(output.status.success(), "failed: {}", text(&output.stderr));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&output.stdout)))
}

/// `keywarden serve` over `url` with this secret ring, its output in `dir`.
fn start(
    dir: &TempDir,
    url: &str,
    name: &str,
    secret: &str,
    previous: Option<&str>,
) -> ServeProcess {
    let mut serve = command(url, secret, previous);
    serve.args(["serve", "--addr", "127.0.0.1:0"]);
    ServeProcess::spawn(serve, dir.path(), name)
}

async fn whoami(server: &ServeProcess, http: &reqwest::Client, key: &str) -> (u16, String) {
    let response = http
        .get(server.url("/whoami"))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let code = body["code"].as_str().unwrap_or_default().to_owned();
    (status, code)
}

/// Drops the test's schema when the test fails before it does (best effort, with `psql`).
struct Schema {
    base: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                self.base.as_str(),
                "-qc",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
            ])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_the_old_secret_across_two_serve_processes() {
    let Some(base) = support::service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = Schema {
        base: base.clone(),
        name: support::unique("kw_retire"),
    };
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
        sqlx::query(&format!("CREATE SCHEMA {}", schema.name))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    // Every connection of every process works in the test's schema.
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!(
        "{base}{separator}options=-c%20search_path%3D{}",
        schema.name
    );
    let old_id = Secret::new(OLD).unwrap().id().to_string();
    let new_id = Secret::new(NEW).unwrap().id().to_string();

    // Two keys made before the rotation, under the old secret.
    let create = |name: &str| {
        let output = command(&url, OLD, None)
            .args(["keys", "create", "--json", "--name", name])
            .output()
            .unwrap();
        let json = json_ok(&output);
        (
            json["key"].as_str().unwrap().to_owned(),
            json["id"].as_str().unwrap().to_owned(),
        )
    };
    let (key, _) = create("used");
    let (idle_key, idle_id) = create("idle");

    let dir = TempDir::new("retire-cli");
    let a = start(&dir, &url, "a", NEW, Some(OLD));
    let b = start(&dir, &url, "b", OLD, None);
    assert!(
        a.stdout()
            .contains(&format!("secret ids: current {new_id}, previous {old_id}")),
        "A prints its ring's ids: {}",
        a.stdout()
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // Used on A (re-digested under the new secret), then on B: both accept it.
    assert_eq!(whoami(&a, &http, &key).await, (200, String::new()));
    assert_eq!(
        whoami(&b, &http, &key).await,
        (200, String::new()),
        "B, still on the old secret, verifies a key A re-digested"
    );
    assert_eq!(whoami(&b, &http, &idle_key).await, (200, String::new()));

    // Refused: the idle key has only its old digest. Nothing changes.
    let output = command(&url, NEW, None)
        .args(["secret", "retire", &old_id])
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(&idle_id), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    let output = command(&url, NEW, None)
        .args(["secret", "retire", &old_id, "--json"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let refusal: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(refusal["retired"], false);
    assert_eq!(refusal["unmigrated_keys"], serde_json::json!([idle_id]));
    assert_eq!(whoami(&b, &http, &key).await, (200, String::new()));

    // The current secret cannot be retired.
    let output = command(&url, NEW, Some(OLD))
        .args(["secret", "retire", &new_id, "--force"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("current secret"),
        "{}",
        text(&output.stderr)
    );

    // Forced: both old digests go, the idle key is revoked.
    let output = command(&url, NEW, None)
        .args(["--json", "secret", "retire", &old_id, "--force"])
        .output()
        .unwrap();
    let outcome = json_ok(&output);
    assert_eq!(outcome["retired"], true);
    assert_eq!(outcome["secret_id"], old_id.as_str());
    assert_eq!(outcome["dropped_digests"], 2);
    assert_eq!(outcome["revoked_keys"], serde_json::json!([idle_id]));

    // B hears of it through NOTIFY and rejects the key; A still accepts it.
    let retired_at = Instant::now();
    loop {
        match whoami(&b, &http, &key).await {
            (401, code) => {
                assert_eq!(code, "invalid_key");
                break;
            }
            (200, _) => assert!(
                retired_at.elapsed() < Duration::from_secs(1),
                "B still accepts the key 1 s after the retirement"
            ),
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(whoami(&a, &http, &key).await, (200, String::new()));
    // The idle key has no digest left: no instance finds it, and it shows as revoked.
    for server in [&a, &b] {
        assert_eq!(
            whoami(server, &http, &idle_key).await,
            (401, "invalid_key".into())
        );
    }
    let output = command(&url, NEW, None)
        .args(["keys", "show", &idle_id, "--json"])
        .output()
        .unwrap();
    assert_eq!(json_ok(&output)["state"], "revoked");

    // No listing shows a digest, old or new.
    let output = command(&url, NEW, None)
        .args(["keys", "list", "--json"])
        .output()
        .unwrap();
    let listing = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    for ring in [
        SecretRing::from_strs(OLD, None).unwrap(),
        SecretRing::from_strs(NEW, None).unwrap(),
    ] {
        for k in [&key, &idle_key] {
            assert!(!listing.contains(&ring.digest(k.as_bytes()).to_hex()));
        }
    }
    assert!(!listing.contains("digest"), "{listing}");
    drop((a, b));
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
    sqlx::query(&format!("DROP SCHEMA {} CASCADE", schema.name))
        .execute(&mut conn)
        .await
        .unwrap();
}
