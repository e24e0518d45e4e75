#![cfg(feature = "cli")]
//! End-to-end tests of the built `keywarden` binary: key commands against a temporary SQLite
//! file, one-line errors, and `serve` called over loopback by a real HTTP client.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

use support::serve::ServeProcess;
use support::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_keywarden");
const SECRET: &str = "cli-test-secret-0123456789abcdefghijklmnop";

/// The binary with a clean keywarden environment, the temp database and optionally a secret.
fn command(dir: &TempDir, secret: Option<&str>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path());
    for var in [
        "KEYWARDEN_SECRET",
        "KEYWARDEN_PREVIOUS_SECRETS",
        "KEYWARDEN_DATABASE_URL",
        "KEYWARDEN_REDIS_URL",
        "KEYWARDEN_REDIS_NAMESPACE",
        "KEYWARDEN_ADDR",
        "KEYWARDEN_CONFIG",
        "KEYWARDEN_METRICS_ADDR",
        "KEYWARDEN_COLLECTIONS",
        "KEYWARDEN_CLIENT_ADDRESS_HEADER",
        "KEYWARDEN_SHUTDOWN_GRACE",
        "KEYWARDEN_LOG",
        "KEYWARDEN_LOG_FORMAT",
        "KEYWARDEN_LOG_REQUESTS",
        "KEYWARDEN_VERIFY_WITHOUT_KEY_ON_LOOPBACK",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("KEYWARDEN_DATABASE_URL", dir.db_url());
    if let Some(secret) = secret {
        cmd.env("KEYWARDEN_SECRET", secret);
    }
    cmd
}

fn run(dir: &TempDir, secret: Option<&str>, args: &[&str]) -> Output {
    command(dir, secret).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs with the test secret, asserts success, returns stdout.
#[track_caller]
fn ok(dir: &TempDir, args: &[&str]) -> String {
    let output = run(dir, Some(SECRET), args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        text(&output.stderr)
    );
    text(&output.stdout)
}

#[track_caller]
fn ok_json(dir: &TempDir, args: &[&str]) -> Value {
    let stdout = ok(dir, args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"))
}

/// Asserts a non-zero exit with exactly one `error: ...` line on stderr; returns that line.
#[track_caller]
fn fails(dir: &TempDir, secret: Option<&str>, args: &[&str]) -> String {
    let output = run(dir, secret, args);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: want one line, got {stderr:?}"
    );
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr:?}");
    stderr.trim_end().to_owned()
}

fn create_key(dir: &TempDir, extra: &[&str]) -> (String, String) {
    let mut args = vec!["keys", "create", "--json"];
    args.extend_from_slice(extra);
    let json = ok_json(dir, &args);
    (
        json["key"].as_str().unwrap().to_owned(),
        json["id"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn secret_generate_needs_no_secret() {
    let dir = TempDir::new("secret");
    let output = run(&dir, None, &["secret", "generate"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let secret = text(&output.stdout).trim().to_owned();
    assert_eq!(secret.len(), 43);
    assert!(secret.bytes().all(|b| b.is_ascii_alphanumeric()));

    let output = run(&dir, None, &["secret", "generate", "--json"]);
    assert!(output.status.success());
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    let other = json["secret"].as_str().unwrap();
    assert_ne!(other, secret, "each call generates a new secret");

    // The generated secret is accepted as KEYWARDEN_SECRET.
    let output = run(&dir, Some(&secret), &["keys", "list"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        !text(&output.stdout).contains(&secret) && !text(&output.stderr).contains(&secret),
        "the secret is never printed back"
    );
}

#[test]
fn create_list_show_with_json_before_and_after_the_subcommand() {
    let dir = TempDir::new("crud");
    let json = ok_json(
        &dir,
        &[
            "keys",
            "create",
            "--name",
            "ci deploys",
            "--subject",
            "alice",
            "--owner-kind",
            "service",
            "--collection",
            "services",
            "--scope",
            "deploy",
            "--scope",
            "read",
            "--expires-in",
            "30d",
            "--rate-limit",
            "100/min",
            "--description",
            "the CI pipeline",
            "--json",
        ],
    );
    let key = json["key"].as_str().unwrap().to_owned();
    let id = json["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("kw_live_") && key.len() == 57, "{key}");
    assert_eq!(json["name"], "ci deploys");
    assert_eq!(json["subject"], "alice");
    assert_eq!(json["owner_kind"], "service");
    assert_eq!(json["collection"], "services");
    assert_eq!(json["scopes"], serde_json::json!(["deploy", "read"]));
    assert_eq!(json["rate_limit"], "100/min");
    assert_eq!(json["state"], "active");
    assert!(json["expires_at"].is_string());
    assert!(key.starts_with(json["display_start"].as_str().unwrap()));
    assert!(json.get("digest").is_none());

    let (test_key, _) = create_key(&dir, &["--name", "test key", "--env", "test"]);
    assert!(test_key.starts_with("kw_test_"));

    // Human create output: the key once, with the warning.
    let human = ok(&dir, &["keys", "create", "--name", "human"]);
    assert!(human.contains("will not be shown again"), "{human}");
    assert_eq!(human.matches("kw_live_").count(), 1, "{human}");

    // --json before and after the subcommand.
    for args in [
        &["--json", "keys", "list"][..],
        &["keys", "list", "--json"][..],
        &["keys", "--json", "list"][..],
    ] {
        let page = ok_json(&dir, args);
        let items = page["items"].as_array().unwrap();
        assert_eq!(items.len(), 3, "{args:?}");
        assert_eq!(items[0]["id"], id.as_str());
        assert!(page["next_cursor"].is_null());
    }
    let page = ok_json(&dir, &["keys", "list", "--json", "--subject", "alice"]);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let page = ok_json(&dir, &["keys", "list", "--json", "--env", "test"]);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{page}");
    assert_eq!(items[0]["name"], "test key");
    let page = ok_json(&dir, &["keys", "list", "--json", "--limit", "2"]);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let page = ok_json(&dir, &["keys", "list", "--json", "--after", &cursor]);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);

    let table = ok(&dir, &["keys", "list"]);
    let header = table.lines().next().unwrap();
    for column in [
        "ID",
        "NAME",
        "DISPLAY",
        "COLLECTION",
        "SUBJECT",
        "STATE",
        "EXPIRES",
        "LAST USED",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(table.contains(&id) && table.contains("ci deploys") && table.contains("services"));
    assert!(!table.contains(&key) && !table.contains(&test_key));

    let shown = ok(&dir, &["keys", "show", &id]);
    assert!(
        shown.contains("ci deploys") && shown.contains("the CI pipeline"),
        "{shown}"
    );
    let shown = ok_json(&dir, &["--json", "keys", "show", &id]);
    assert_eq!(shown["id"], id.as_str());
    assert!(shown.get("key").is_none());
    assert!(!shown.to_string().contains(&key));

    // --database-url before and after the subcommand, instead of the environment.
    let url = dir.db_url();
    for args in [
        vec!["--database-url", &url, "keys", "show", &id, "--json"],
        vec!["keys", "show", &id, "--database-url", &url, "--json"],
    ] {
        let output = command(&dir, Some(SECRET))
            .env_remove("KEYWARDEN_DATABASE_URL")
            .args(&args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
        let json: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(json["id"], id.as_str());
    }
}

#[test]
fn update_rotate_revoke_delete() {
    let dir = TempDir::new("lifecycle");
    let (key, id) = create_key(&dir, &["--name", "old name", "--scope", "a"]);

    let json = ok_json(
        &dir,
        &[
            "keys",
            "update",
            &id,
            "--name",
            "new name",
            "--scope",
            "b",
            "--disable",
            "--json",
        ],
    );
    assert_eq!(json["name"], "new name");
    assert_eq!(json["scopes"], serde_json::json!(["b"]));
    assert_eq!(json["state"], "disabled");
    let json = ok_json(
        &dir,
        &[
            "keys",
            "update",
            &id,
            "--enable",
            "--read-only",
            "true",
            "--expires-in",
            "7d",
            "--rate-limit",
            "5/s",
            "--json",
        ],
    );
    assert_eq!(json["state"], "active");
    assert_eq!(json["read_only"], true);
    assert_eq!(json["rate_limit"], "5/s");
    assert!(json["expires_at"].is_string());
    let json = ok_json(
        &dir,
        &[
            "keys",
            "update",
            &id,
            "--no-rate-limit",
            "--expires-in",
            "unlimited",
            "--json",
        ],
    );
    assert!(json["rate_limit"].is_null() && json["expires_at"].is_null());

    let rotated = ok_json(&dir, &["keys", "rotate", &id, "--grace", "1h", "--json"]);
    let new_key = rotated["key"].as_str().unwrap();
    assert_ne!(new_key, key);
    assert_eq!(rotated["rotated_from"], id.as_str());
    assert_eq!(rotated["old_key_id"], id.as_str());
    assert!(rotated["old_key_expires_at"].is_string());
    let human = ok(&dir, &["keys", "rotate", rotated["id"].as_str().unwrap()]);
    assert!(human.contains("will not be shown again"), "{human}");
    assert_eq!(human.matches("kw_live_").count(), 1, "{human}");

    let revoked = ok(&dir, &["keys", "revoke", &id]);
    assert!(revoked.contains(&id), "{revoked}");
    let json = ok_json(&dir, &["keys", "show", &id, "--json"]);
    assert_eq!(json["state"], "revoked");
    assert!(json["revoked_at"].is_string());
    let page = ok_json(&dir, &["keys", "list", "--state", "revoked", "--json"]);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);

    ok(&dir, &["keys", "delete", &id]);
    let error = fails(&dir, Some(SECRET), &["keys", "show", &id]);
    assert_eq!(error, format!("error: no key with id {id}"));
}

#[test]
fn errors_are_one_line_and_non_zero() {
    let dir = TempDir::new("errors");

    let error = fails(&dir, None, &["keys", "list"]);
    assert!(
        error.contains("KEYWARDEN_SECRET") && error.contains("keywarden secret generate"),
        "{error}"
    );
    assert!(
        !dir.path().join("keys.db").exists(),
        "no database is created without a secret"
    );
    let error = fails(&dir, Some("too-short"), &["keys", "create", "--name", "x"]);
    assert!(
        error.contains("at least 32") && error.contains("keywarden secret generate"),
        "{error}"
    );
    assert!(!error.contains("too-short"), "the secret is not echoed");
    let error = fails(&dir, None, &["serve", "--addr", "127.0.0.1:0"]);
    assert!(error.contains("KEYWARDEN_SECRET"), "{error}");

    let unknown = "01900000-0000-7000-8000-000000000000";
    for args in [
        &["keys", "show", unknown][..],
        &["keys", "revoke", unknown][..],
        &["keys", "rotate", unknown][..],
        &["keys", "delete", unknown][..],
        &["keys", "update", unknown, "--name", "n"][..],
    ] {
        let error = fails(&dir, Some(SECRET), args);
        assert_eq!(
            error,
            format!("error: no key with id {unknown}"),
            "{args:?}"
        );
    }

    let secret = Some(SECRET);
    let error = fails(&dir, secret, &["keys", "show", "not-a-uuid"]);
    assert!(
        error.contains("not-a-uuid") && error.contains("UUID"),
        "{error}"
    );
    let error = fails(
        &dir,
        secret,
        &["keys", "create", "--name", "x", "--expires-in", "1y"],
    );
    assert!(error.contains("duration"), "{error}");
    let error = fails(
        &dir,
        secret,
        &["keys", "rotate", unknown, "--grace", "soon"],
    );
    assert!(error.contains("duration"), "{error}");
    let error = fails(
        &dir,
        secret,
        &["keys", "create", "--name", "x", "--rate-limit", "lots"],
    );
    assert!(error.contains("rate limit"), "{error}");
    let error = fails(
        &dir,
        secret,
        &["keys", "create", "--name", "x", "--owner-kind", "robot"],
    );
    assert!(error.contains("owner kind"), "{error}");
    let error = fails(
        &dir,
        secret,
        &["keys", "create", "--name", "x", "--env", "prod"],
    );
    assert!(error.contains("environment"), "{error}");
    let error = fails(&dir, secret, &["keys", "create", "--name", " "]);
    assert!(error.contains("name"), "{error}");
    let error = fails(
        &dir,
        secret,
        &["keys", "create", "--name", "x", "--metadata", "[1]"],
    );
    assert!(error.contains("JSON object"), "{error}");
    let (_, id) = create_key(&dir, &["--name", "x"]);
    let error = fails(&dir, secret, &["keys", "update", &id]);
    assert!(error.contains("nothing to update"), "{error}");

    let error = fails(
        &dir,
        secret,
        &["--database-url", "mysql://db/keys", "keys", "list"],
    );
    assert!(error.contains("unsupported database URL"), "{error}");
    let error = fails(
        &dir,
        secret,
        &[
            "--database-url",
            "postgres://me:hunter2@127.0.0.1:1/keys",
            "keys",
            "list",
        ],
    );
    assert!(error.contains("PostgreSQL"), "{error}");
    assert!(
        !error.contains("hunter2"),
        "the password is not echoed: {error}"
    );
    let missing_dir = format!("sqlite://{}/no/such/dir/keys.db", dir.path().display());
    let error = fails(
        &dir,
        secret,
        &["--database-url", &missing_dir, "keys", "list"],
    );
    assert!(error.contains("SQLite"), "{error}");
}

/// Issue 13: the CLI applies the library's one management policy, as the HTTP API does:
/// control characters in free text are refused with the API's message, a grace period parses
/// by the API's rule (`none` and `0xyz` are errors, not zero), and `--json` prints the API's
/// view of a key.
#[test]
fn the_cli_applies_the_management_apis_rules() {
    let dir = TempDir::new("policy");
    let secret = Some(SECRET);
    let error = fails(
        &dir,
        secret,
        &[
            "keys",
            "create",
            "--name",
            "x",
            "--description",
            "a\u{1b}[31mred",
        ],
    );
    assert_eq!(
        error,
        "error: description must not contain control characters"
    );
    let error = fails(
        &dir,
        secret,
        &[
            "keys",
            "create",
            "--name",
            "x",
            "--metadata",
            r#"{"k": "v\u0007"}"#,
        ],
    );
    assert_eq!(error, "error: metadata must not contain control characters");
    let (_, id) = create_key(&dir, &["--name", "k"]);
    let error = fails(
        &dir,
        secret,
        &["keys", "update", &id, "--description", "tab\there"],
    );
    assert_eq!(
        error,
        "error: description must not contain control characters"
    );
    for bad in ["none", "0xyz", "1.5h"] {
        let error = fails(&dir, secret, &["keys", "rotate", &id, "--grace", bad]);
        assert!(
            error.contains("expected a duration such as 24h, 15m or 0s"),
            "{error}"
        );
    }

    let stdout = ok(&dir, &["keys", "rotate", &id, "--grace", "0", "--json"]);
    assert!(stdout.starts_with("{\n  \"key\": "), "{stdout}");
    let rotated: Value = serde_json::from_str(&stdout).unwrap();
    let mut names: Vec<&str> = rotated
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "allowed_ips",
            "collection",
            "created_at",
            "credits",
            "description",
            "disabled",
            "display_start",
            "environment",
            "expires_at",
            "id",
            "key",
            "last_used_at",
            "metadata",
            "name",
            "old_key_expires_at",
            "old_key_id",
            "owner_kind",
            "rate_limit",
            "read_only",
            "refill",
            "revoked_at",
            "rotated_from",
            "scopes",
            "state",
            "subject",
            "updated_at",
            "use_count",
        ]
    );
    // Zero grace ended the old key at once.
    let old = ok_json(&dir, &["keys", "show", &id, "--json"]);
    assert_eq!(old["state"], "expired", "{old}");
    assert_eq!(old["expires_at"], rotated["old_key_expires_at"]);
}

#[test]
fn migrate_needs_no_secret() {
    let dir = TempDir::new("migrate");
    let output = run(&dir, None, &["migrate"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(dir.path().join("keys.db").exists());
    let output = run(&dir, None, &["migrate", "--json"]);
    assert!(output.status.success());
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["migrated"], true);
}

#[test]
fn database_files_hold_no_plaintext_key() {
    let dir = TempDir::new("bytes");
    let mut keys = Vec::new();
    for i in 0..5 {
        let (key, _) = create_key(&dir, &["--name", &format!("k{i}"), "--scope", "s"]);
        keys.push(key);
    }
    let rotated = ok_json(&dir, &["keys", "list", "--json"]);
    let first = rotated["items"][0]["id"].as_str().unwrap().to_owned();
    keys.push(
        ok_json(&dir, &["keys", "rotate", &first, "--json"])["key"]
            .as_str()
            .unwrap()
            .to_owned(),
    );

    // The main file and the WAL: SQLite may not have checkpointed yet.
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("keys.db")
        {
            bytes.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(bytes.len() > 4096);
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for key in &keys {
        // The display start (prefix and 4 body characters) is stored; nothing after it is.
        let secret_part = &key["kw_live_".len() + 4..];
        assert!(!contains(key.as_bytes()), "plaintext key in the database");
        assert!(
            !contains(secret_part.as_bytes()),
            "key body in the database"
        );
        assert!(
            !contains(&secret_part.as_bytes()[..16]),
            "key body in the database"
        );
    }
    assert!(!contains(SECRET.as_bytes()), "secret in the database");
}

type Server = ServeProcess;

/// `keywarden serve` on a free loopback port over the test database, with `extra` arguments.
fn start_with(dir: &TempDir, name: &str, extra: &[&str]) -> Server {
    let mut command = command(dir, Some(SECRET));
    command.args(["serve", "--addr", "127.0.0.1:0"]).args(extra);
    ServeProcess::spawn(command, dir.path(), name)
}

fn start(dir: &TempDir, name: &str) -> Server {
    start_with(dir, name, &[])
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Status and problem code of a rejection; checks the problem+json content type.
async fn problem(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let json: Value = response.json().await.unwrap();
    (status, json["code"].as_str().unwrap_or_default().to_owned())
}

async fn whoami(
    http: &reqwest::Client,
    server: &Server,
    header: (&str, String),
) -> reqwest::Response {
    http.get(server.url("/whoami"))
        .header(header.0, header.1)
        .send()
        .await
        .unwrap()
}

fn header_forms(key: &str) -> [(&'static str, String); 3] {
    [
        ("authorization", format!("users API-Key {key}")),
        ("authorization", format!("Bearer {key}")),
        ("x-api-key", key.to_owned()),
    ]
}

#[tokio::test]
async fn serve_whoami_and_cli_revocation() {
    let dir = TempDir::new("serve");
    let (key, id) = create_key(&dir, &["--name", "alice's key", "--subject", "alice"]);
    let (team_key, _) = create_key(
        &dir,
        &[
            "--name",
            "team",
            "--subject",
            "t1",
            "--collection",
            "teams",
            "--owner-kind",
            "team",
        ],
    );
    let http = client();

    let server = start(&dir, "serve1");
    server.wait_healthy(&http).await;
    for header in header_forms(&key) {
        let response = whoami(&http, &server, header).await;
        assert_eq!(response.status(), 200);
        let json: Value = response.json().await.unwrap();
        assert_eq!(json["subject"], "alice");
        assert_eq!(json["collection"], "users");
        assert_eq!(json["key_id"], id.as_str());
    }
    let response = whoami(
        &http,
        &server,
        ("authorization", format!("teams API-Key {team_key}")),
    )
    .await;
    assert_eq!(response.status(), 200);
    let response = http.get(server.url("/whoami")).send().await.unwrap();
    assert_eq!(problem(response).await, (401, "missing_credentials".into()));
    let response = whoami(&http, &server, ("x-api-key", format!("{key}x"))).await;
    assert_eq!(problem(response).await.0, 401);
    #[cfg(unix)]
    server.terminate();
    #[cfg(not(unix))]
    drop(server);

    // Revoked by the CLI: a server started afterwards rejects the key.
    ok(&dir, &["keys", "revoke", &id]);
    let server = start(&dir, "serve2");
    server.wait_healthy(&http).await;
    for header in header_forms(&key) {
        let response = whoami(&http, &server, header).await;
        assert_eq!(problem(response).await, (401, "revoked_key".into()));
    }
}

/// `serve` offers the verification API (caller scope `keys:verify`) and forward auth; the
/// keyless loopback option needs a loopback address and opens only the verify API.
#[tokio::test]
async fn serve_offers_the_verify_api_and_forward_auth() {
    let dir = TempDir::new("serve-verify");
    let (key, id) = create_key(&dir, &["--name", "k", "--subject", "alice", "--read-only"]);
    let (caller, _) = create_key(&dir, &["--name", "gw", "--scope", "keys:verify"]);
    let http = client();
    let server = start(&dir, "serve-verify");
    server.wait_healthy(&http).await;
    let verify = |caller: Option<&str>| {
        let mut req = http
            .post(server.url("/v1/keys/verify"))
            .json(&serde_json::json!({ "key": key }));
        if let Some(caller) = caller {
            req = req.header("x-api-key", caller);
        }
        req.send()
    };
    let response = verify(Some(&caller)).await.unwrap();
    assert_eq!(response.status(), 200);
    let verdict: Value = response.json().await.unwrap();
    assert_eq!(verdict["valid"], true);
    assert_eq!(verdict["principal"]["key_id"], id.as_str());
    let response = verify(Some(&key)).await.unwrap();
    assert_eq!(problem(response).await, (403, "insufficient_scope".into()));
    let response = verify(None).await.unwrap();
    assert_eq!(problem(response).await, (401, "missing_credentials".into()));

    let response = http
        .get(server.url("/v1/auth"))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-keywarden-subject"], "alice");
    assert_eq!(response.headers()["x-keywarden-key-id"], id.as_str());
    let response = http
        .get(server.url("/v1/auth"))
        .header("x-api-key", &key)
        .header("x-forwarded-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(problem(response).await, (403, "insufficient_scope".into()));
    drop(server);

    let open = start_with(&dir, "serve-open", &["--verify-without-key-on-loopback"]);
    open.wait_healthy(&http).await;
    let response = http
        .post(open.url("/v1/keys/verify"))
        .json(&serde_json::json!({ "key": key }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["valid"], true);
    drop(open);

    let error = fails(
        &dir,
        Some(SECRET),
        &[
            "serve",
            "--addr",
            "0.0.0.0:0",
            "--verify-without-key-on-loopback",
        ],
    );
    assert!(error.contains("needs a loopback --addr"), "{error}");
}

#[test]
fn serve_with_unreachable_redis_fails_in_one_line_without_the_url() {
    let dir = TempDir::new("redis-down");
    let output = command(&dir, Some(SECRET))
        .env(
            "KEYWARDEN_REDIS_URL",
            "redis://:hunter2-password@127.0.0.1:1",
        )
        .args(["serve", "--addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.starts_with("error: cannot use Redis"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the Redis URL is not echoed: {stderr}"
    );
}

/// Two `serve` processes over one SQLite file, with the machine's Redis: one rate-limit
/// budget per key across both, and a CLI revocation reaching both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_rate_limits_and_revocations_through_redis() {
    let redis = match std::env::var("KEYWARDEN_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "KEYWARDEN_TEST_REDIS_URL is not set under CI=true"
            );
            eprintln!("skipping: KEYWARDEN_TEST_REDIS_URL is not set");
            return;
        }
    };
    let dir = TempDir::new("redis");
    let namespace = format!(
        "kwcli{}x{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let (key, id) = create_key(
        &dir,
        &["--name", "shared", "--subject", "s", "--rate-limit", "3/h"],
    );
    let args = [
        "--redis-url",
        redis.as_str(),
        "--redis-namespace",
        namespace.as_str(),
    ];
    let a = start_with(&dir, "a", &args);
    let b = start_with(&dir, "b", &args);
    let http = client();
    a.wait_healthy(&http).await;
    b.wait_healthy(&http).await;
    async fn get(http: &reqwest::Client, server: &Server, key: &str) -> reqwest::Response {
        whoami(http, server, ("x-api-key", key.to_owned())).await
    }
    let first = get(&http, &a, &key).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["ratelimit-remaining"], "2");
    assert_eq!(get(&http, &b, &key).await.status(), 200);
    assert_eq!(get(&http, &a, &key).await.status(), 200);
    let denied = get(&http, &b, &key).await;
    assert!(denied.headers().contains_key("retry-after"));
    assert_eq!(problem(denied).await, (429, "rate_limited".into()));

    // Revoked by the CLI, told through Redis: both servers reject within a second.
    let output = command(&dir, Some(SECRET))
        .env("KEYWARDEN_REDIS_URL", &redis)
        .env("KEYWARDEN_REDIS_NAMESPACE", &namespace)
        .args(["keys", "revoke", &id])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let revoked_at = Instant::now();
    for server in [&a, &b] {
        loop {
            let (status, code) = problem(get(&http, server, &key).await).await;
            if (status, code.as_str()) == (401, "revoked_key") {
                break;
            }
            assert_eq!(status, 429, "{code}");
            assert!(
                revoked_at.elapsed() < Duration::from_secs(1),
                "a server still accepts the key 1 s after the CLI revoked it"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Needs the management API (`keywarden::management_router`) mounted under `/admin`.
#[tokio::test]
async fn revocation_through_the_management_api_is_immediate() {
    let dir = TempDir::new("admin");
    let (key, id) = create_key(&dir, &["--name", "user key", "--subject", "alice"]);
    let (admin, _) = create_key(
        &dir,
        &[
            "--name",
            "admin",
            "--subject",
            "ops",
            "--scope",
            "keys:admin",
        ],
    );
    let http = client();
    let server = start(&dir, "admin");
    server.wait_healthy(&http).await;

    // Cache the user key's principal in the server first.
    let response = whoami(&http, &server, ("x-api-key", key.clone())).await;
    assert_eq!(response.status(), 200);

    let response = http
        .get(server.url("/admin/keys"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET /admin/keys");
    let listing = response.text().await.unwrap();
    assert!(
        listing.contains(&id) && !listing.contains(&key),
        "{listing}"
    );

    let response = http
        .post(server.url(&format!("/admin/keys/{id}/revoke")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "POST /admin/keys/{{id}}/revoke: {}",
        response.status()
    );

    for header in header_forms(&key) {
        let response = whoami(&http, &server, header).await;
        assert_eq!(problem(response).await, (401, "revoked_key".into()));
    }
    // The admin key itself still works.
    let response = whoami(&http, &server, ("x-api-key", admin.clone())).await;
    assert_eq!(response.status(), 200);
}

/// Issue 14 §1: the CLI's changes are audited as `cli`; `audit list`, `audit verify` (exit 1
/// naming the first broken event after tampering) and `audit prune`.
#[tokio::test]
async fn audit_list_verify_and_prune() {
    let dir = TempDir::new("audit");
    let (_, id) = create_key(&dir, &["--name", "ci", "--subject", "alice"]);
    ok(&dir, &["keys", "revoke", &id]);

    let listed = ok_json(&dir, &["audit", "list", "--json"]);
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{listed}");
    assert_eq!(items[0]["action"], "key.created");
    assert_eq!(items[1]["action"], "key.revoked");
    assert_eq!(items[1]["actor"], serde_json::json!({"kind": "cli"}));
    assert_eq!(items[1]["key_id"], id.as_str());
    let text_list = ok(&dir, &["audit", "list", "--key", &id, "--since", "1h"]);
    let lines: Vec<&str> = text_list.lines().collect();
    assert_eq!(lines.len(), 2, "{text_list}");
    assert!(
        lines[1].starts_with("#2 ")
            && lines[1].contains(" key.revoked ")
            && lines[1].contains("  by cli"),
        "{text_list}"
    );
    assert!(lines[1].contains("(users/alice)"), "{text_list}");
    let only = ok_json(
        &dir,
        &["audit", "list", "--action", "key.revoked", "--json"],
    );
    assert_eq!(only["items"].as_array().unwrap().len(), 1);
    let none = ok(&dir, &["audit", "list", "--until", "1h"]);
    assert_eq!(none.trim(), "no audit events");

    let verified = ok(&dir, &["audit", "verify"]);
    assert!(
        verified.starts_with("audit log intact: 2 event(s) checked; head #2 "),
        "{verified}"
    );
    let verified = ok_json(&dir, &["audit", "verify", "--json"]);
    assert_eq!(verified["intact"], true);
    assert_eq!(verified["head"]["seq"], 2);

    // Someone with the database but not the secret rewrites who revoked what.
    let pool = sqlx::SqlitePool::connect(&dir.db_url()).await.unwrap();
    sqlx::query("UPDATE keywarden_audit SET subject = 'bob' WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let broken = fails(&dir, Some(SECRET), &["audit", "verify"]);
    assert!(broken.contains("broken at event #2"), "{broken}");
    assert!(broken.contains("1 event(s) before it verified"), "{broken}");
    // Another secret cannot check it at all, and says which secret sealed it.
    let other = fails(
        &dir,
        Some("another-secret-0123456789abcdefghijklmnopq"),
        &["audit", "verify"],
    );
    assert!(
        other.contains("broken at event #1") && other.contains("not in the configured ring"),
        "{other}"
    );

    // Nothing is pruned from a log that does not verify.
    let refused = fails(
        &dir,
        Some(SECRET),
        &["audit", "prune", "--older-than", "1s"],
    );
    assert!(refused.contains("nothing was pruned"), "{refused}");
    let pool = sqlx::SqlitePool::connect(&dir.db_url()).await.unwrap();
    sqlx::query("UPDATE keywarden_audit SET subject = 'alice' WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let pruned = ok_json(&dir, &["audit", "prune", "--older-than", "90d", "--json"]);
    assert_eq!(pruned["deleted"], 0);
    let bad = run(
        &dir,
        Some(SECRET),
        &["audit", "list", "--since", "yesterday"],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("--since"),
        "{}",
        text(&bad.stderr)
    );
}

#[tokio::test]
async fn allowlists_from_the_cli_hold_in_serve() {
    let dir = TempDir::new("allowlist");
    let json = ok_json(
        &dir,
        &[
            "keys",
            "create",
            "--name",
            "office",
            "--allow-ip",
            "10.0.0.0/8",
            "--allow-ip",
            "2001:db8::/32",
            "--json",
        ],
    );
    assert_eq!(
        json["allowed_ips"],
        serde_json::json!(["10.0.0.0/8", "2001:db8::/32"])
    );
    let (office_key, office) = (
        json["key"].as_str().unwrap().to_owned(),
        json["id"].as_str().unwrap().to_owned(),
    );
    let human = ok(&dir, &["keys", "show", &office]);
    assert!(
        human.contains("allowed ips   10.0.0.0/8, 2001:db8::/32"),
        "{human}"
    );
    let human = ok(
        &dir,
        &[
            "keys",
            "create",
            "--name",
            "two",
            "--allow-ip",
            "192.0.2.0/24,198.51.100.7",
        ],
    );
    assert!(
        human.contains("Accepted only from 192.0.2.0/24, 198.51.100.7/32."),
        "{human}"
    );
    let (local_key, local) = create_key(&dir, &["--name", "local", "--allow-ip", "127.0.0.1"]);
    let human = ok(&dir, &["keys", "show", &local]);
    assert!(human.contains("allowed ips   127.0.0.1/32"), "{human}");

    for (bad, why) in [
        ("10.0.0.1/8", "bits are set past the prefix length"),
        ("10.0.0.0/33", "the prefix is longer than the address"),
        ("office", "not an IP address"),
    ] {
        let error = fails(
            &dir,
            Some(SECRET),
            &["keys", "create", "--name", "x", "--allow-ip", bad],
        );
        assert!(
            error.contains("--allow-ip") && error.contains(why),
            "{error}"
        );
    }
    // A usage error: clap's own message and exit code, like every conflicting pair.
    let output = run(
        &dir,
        Some(SECRET),
        &[
            "keys",
            "update",
            &office,
            "--allow-ip",
            "10.0.0.0/8",
            "--allow-any-ip",
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("cannot be used with '--allow-any-ip'"));

    let server = start(&dir, "serve-allowlist");
    let http = client();
    let res = whoami(&http, &server, ("x-api-key", local_key.clone())).await;
    assert_eq!(res.status(), 200);
    let res = whoami(&http, &server, ("x-api-key", office_key.clone())).await;
    assert_eq!(problem(res).await, (403, "ip_not_allowed".to_owned()));

    // Changed from the CLI: the server sees it (change feed) within its poll interval.
    let json = ok_json(
        &dir,
        &[
            "keys",
            "update",
            &office,
            "--allow-ip",
            "127.0.0.0/8,192.0.2.1",
            "--json",
        ],
    );
    assert_eq!(
        json["allowed_ips"],
        serde_json::json!(["127.0.0.0/8", "192.0.2.1/32"])
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res = whoami(&http, &server, ("x-api-key", office_key.clone())).await;
        if res.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the change never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let json = ok_json(
        &dir,
        &["keys", "update", &local, "--allow-any-ip", "--json"],
    );
    assert_eq!(json["allowed_ips"], serde_json::json!([]));
    let human = ok(&dir, &["keys", "show", &local]);
    assert!(human.contains("allowed ips   any"), "{human}");
}

#[tokio::test]
async fn serve_shares_one_budget_per_owner_from_the_config_file() {
    let dir = TempDir::new("owner-limit");
    let config = dir.write(
        "keywarden.toml",
        "[auth]\nowner_rate_limits = { users = \"3/h\" }\n",
    );
    let (one, _) = create_key(&dir, &["--name", "one", "--subject", "alice"]);
    let (two, _) = create_key(&dir, &["--name", "two", "--subject", "alice"]);
    let (bob, _) = create_key(&dir, &["--name", "bob", "--subject", "bob"]);
    let mut command = command(&dir, Some(SECRET));
    command
        .env("KEYWARDEN_CONFIG", &config)
        .args(["serve", "--addr", "127.0.0.1:0"]);
    let server = ServeProcess::spawn(command, dir.path(), "serve-owner-limit");
    let http = client();
    let mut codes = Vec::new();
    for key in [&one, &two, &one, &two] {
        let res = whoami(&http, &server, ("x-api-key", key.clone())).await;
        codes.push(res.status().as_u16());
    }
    assert_eq!(codes, [200, 200, 200, 429], "alice's keys share 3 an hour");
    let res = whoami(&http, &server, ("x-api-key", bob.clone())).await;
    assert_eq!(res.status(), 200, "bob has his own budget");
}

#[tokio::test]
async fn credits_from_the_cli_hold_in_serve() {
    let dir = TempDir::new("credits");
    let json = ok_json(
        &dir,
        &[
            "keys",
            "create",
            "--name",
            "partner",
            "--credits",
            "2",
            "--refill",
            "50/month",
            "--json",
        ],
    );
    assert_eq!(
        (json["credits"].clone(), json["refill"].clone()),
        (serde_json::json!(2), serde_json::json!("50/month"))
    );
    let (key, id) = (
        json["key"].as_str().unwrap().to_owned(),
        json["id"].as_str().unwrap().to_owned(),
    );
    let human = ok(
        &dir,
        &["keys", "create", "--name", "human", "--credits", "7"],
    );
    assert!(human.contains("Credits: 7."), "{human}");
    let human = ok(
        &dir,
        &["keys", "create", "--name", "daily", "--refill", "100/day"],
    );
    assert!(
        human.contains("Credits: 100, set to 100 again every day."),
        "{human}"
    );
    let shown = ok(&dir, &["keys", "show", &id]);
    assert!(shown.contains("credits       2"), "{shown}");
    assert!(shown.contains("refill        50/month"), "{shown}");

    for (args, wanted) in [
        (
            &["--credits", "-5"][..],
            "credits must be a whole number from 0 to",
        ),
        (
            &["--credits", "lots"],
            "credits must be a whole number from 0 to",
        ),
        (&["--refill", "5/fortnight"], "invalid refill"),
        (&["--refill", "0/day"], "invalid refill"),
    ] {
        let mut all = vec!["keys", "create", "--name", "x"];
        all.extend_from_slice(args);
        let output = run(&dir, Some(SECRET), &all);
        assert!(!output.status.success(), "{args:?}");
        let stderr = text(&output.stderr);
        assert!(stderr.contains(wanted), "{args:?}: {stderr}");
    }
    let output = run(
        &dir,
        Some(SECRET),
        &[
            "keys",
            "update",
            &id,
            "--credits",
            "5",
            "--unlimited-credits",
        ],
    );
    assert_eq!(output.status.code(), Some(2));

    let server = start(&dir, "serve-credits");
    let http = client();
    for _ in 0..2 {
        let res = whoami(&http, &server, ("x-api-key", key.clone())).await;
        assert_eq!(res.status(), 200);
    }
    let res = whoami(&http, &server, ("x-api-key", key.clone())).await;
    assert_eq!(problem(res).await, (429, "usage_exceeded".to_owned()));

    // Topped up from the CLI: the server hears of it (change feed) within its poll interval.
    let json = ok_json(&dir, &["keys", "update", &id, "--credits", "1", "--json"]);
    assert_eq!(json["credits"], 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res = whoami(&http, &server, ("x-api-key", key.clone())).await;
        if res.status() == 200 {
            assert_eq!(res.headers()["credits-remaining"], "0");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never topped up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let json = ok_json(
        &dir,
        &["keys", "update", &id, "--unlimited-credits", "--json"],
    );
    assert_eq!(
        (json["credits"].clone(), json["refill"].clone()),
        (Value::Null, Value::Null)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_policies_from_the_cli_hold_in_serve() {
    let dir = TempDir::new("owners");
    let mut keys = Vec::new();
    for name in ["one", "two"] {
        let json = ok_json(
            &dir,
            &[
                "keys",
                "create",
                "--name",
                name,
                "--subject",
                "acme",
                "--json",
            ],
        );
        keys.push(json["key"].as_str().unwrap().to_owned());
    }
    let set = ok(
        &dir,
        &[
            "owners",
            "set",
            "acme",
            "--credits",
            "3",
            "--refill",
            "3/day",
            "--rate-limit",
            "100/min",
        ],
    );
    assert!(
        set.contains("users/acme  rate limit: 100/min  credits: 3, set to 3 again every day"),
        "{set}"
    );
    let shown = ok_json(&dir, &["owners", "show", "acme", "--json"]);
    assert_eq!(
        (
            shown["rate_limit"].clone(),
            shown["credits"].clone(),
            shown["refill"].clone()
        ),
        (
            serde_json::json!("100/min"),
            serde_json::json!(3),
            serde_json::json!("3/day")
        )
    );
    let listed = ok(&dir, &["owners", "list"]);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines[0].starts_with("COLLECTION  SUBJECT  RATE LIMIT  CREDITS"),
        "{listed}"
    );
    assert!(
        lines[1].starts_with("users       acme     100/min     3, set to 3 again every day"),
        "{listed}"
    );

    // Bad input: a one-line error and a non-zero exit, never a panic.
    for (args, wanted) in [
        (&["owners", "set", "acme"][..], "nothing to change"),
        (
            &["owners", "set", "acme", "--credits", "-1"],
            "credits must be a whole number from 0 to",
        ),
        (
            &["owners", "set", "acme", "--refill", "1/fortnight"],
            "invalid refill",
        ),
        (
            &["owners", "show", "nobody"],
            "owner users/nobody has no policy",
        ),
        (
            &["owners", "delete", "nobody"],
            "owner users/nobody has no policy",
        ),
        (
            &[
                "owners",
                "set",
                "acme",
                "--collection",
                "bad slug",
                "--credits",
                "1",
            ],
            "collection must be 1 to 64 visible ASCII characters",
        ),
    ] {
        let output = run(&dir, Some(SECRET), args);
        assert!(!output.status.success(), "{args:?}");
        let stderr = text(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(wanted), "{args:?}: {stderr}");
    }

    // Two keys, one budget of 3, in a real server.
    let server = start(&dir, "serve-owners");
    let http = client();
    let mut accepted = 0;
    for i in 0..6 {
        let res = whoami(&http, &server, ("x-api-key", keys[i % 2].clone())).await;
        if res.status() == 200 {
            accepted += 1;
        } else {
            assert_eq!(problem(res).await, (429, "usage_exceeded".to_owned()));
        }
    }
    assert_eq!(accepted, 3, "one budget for both keys");

    // Removed from the CLI: the server hears of it through the change feed.
    let deleted = ok(&dir, &["owners", "delete", "acme"]);
    assert!(
        deleted.contains("removed the policy of users/acme"),
        "{deleted}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res = whoami(&http, &server, ("x-api-key", keys[0].clone())).await;
        if res.status() == 200 {
            assert!(res.headers().get("credits-remaining").is_none());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the policy never went"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ok(&dir, &["owners", "list"]).trim(), "no owner policies");
}
