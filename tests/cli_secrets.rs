#![cfg(feature = "cli")]
//! How the `keywarden` binary reads its secrets: one set of rules for `KEYWARDEN_SECRET`,
//! `KEYWARDEN_PREVIOUS_SECRETS` and their `_FILE` forms (the library's `SecretRing::load`),
//! weak-secret warnings on stderr, and a secret with a trailing newline (a Kubernetes Secret
//! made `--from-file`) that keeps its identity when it moves to the previous secrets.
//!
//! The environment is set on child processes only; this process's environment is untouched.

mod support;

use std::collections::HashMap;
use std::ffi::OsString;
use std::process::{Command, Output};
use std::sync::Arc;

use keywarden::{ApiKeyLayer, Collection, SecretRing, SqliteStore};
use serde_json::Value;
use support::{get_with, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_keywarden");
const SECRET: &str = "kPz3Vq9LmW2xR7tY5nB8cJ4hF6gD1sA0eUoIiQwZ";
const NEXT: &str = "Nx7Rt2Wq9Lp4Zm6Kc8Vb1Hs3Jd5Gf0Ay2Ue4Io6Py8Tr";
const VARS: [&str; 7] = [
    "KEYWARDEN_SECRET",
    "KEYWARDEN_SECRET_FILE",
    "KEYWARDEN_PREVIOUS_SECRETS",
    "KEYWARDEN_PREVIOUS_SECRETS_FILE",
    "KEYWARDEN_DATABASE_URL",
    "KEYWARDEN_REDIS_URL",
    "KEYWARDEN_REDIS_NAMESPACE",
];

/// The binary with only `env` as its keywarden environment.
fn run(dir: &TempDir, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path());
    for var in VARS {
        cmd.env_remove(var);
    }
    cmd.env("KEYWARDEN_DATABASE_URL", dir.db_url());
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `keys create --json` under `env`: the plaintext key.
fn create(dir: &TempDir, env: &[(&str, &str)]) -> String {
    let output = run(dir, env, &["keys", "create", "--name", "k", "--json"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    json["key"].as_str().unwrap().to_owned()
}

/// Whether `key` verifies through a layer over the CLI's database with `ring`.
async fn verifies(dir: &TempDir, ring: SecretRing, key: &str) -> bool {
    let store = SqliteStore::connect(&dir.db_url()).await.unwrap();
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(store.clone()))
        .secrets(ring)
        .collection(Collection::new("users"))
        .build()
        .unwrap();
    let app = axum::Router::new()
        .route("/whoami", axum::routing::get(|| async { "ok" }))
        .layer(layer);
    let auth = format!("Bearer {key}");
    let reply = get_with(&app, "/whoami", &[("authorization", auth.as_bytes())]).await;
    store.pool().close().await;
    reply.status == 200
}

fn load(vars: &[(&'static str, &str)]) -> SecretRing {
    let map: HashMap<&str, OsString> = vars.iter().map(|(k, v)| (*k, (*v).into())).collect();
    SecretRing::load(|name| map.get(name).cloned()).unwrap().0
}

#[tokio::test]
async fn a_secret_with_a_trailing_newline_keeps_its_keys_when_moved_to_the_previous_ones() {
    let dir = TempDir::new("newline");
    let with_newline = format!("{SECRET}\n");
    // One key per check: a key found under a previous secret moves to the current one.
    let keys: Vec<String> = (0..3)
        .map(|_| create(&dir, &[("KEYWARDEN_SECRET", &with_newline)]))
        .collect();

    // As a previous secret in the variable (read as the CLI and `serve` read it)...
    let ring = SecretRing::from_strs(NEXT, Some(&with_newline)).unwrap();
    assert!(
        verifies(&dir, ring, &keys[0]).await,
        "KEYWARDEN_PREVIOUS_SECRETS"
    );
    // ... in a mounted file of previous secrets ...
    let file = dir.write("previous", &format!("{SECRET}\n"));
    let ring = load(&[
        ("KEYWARDEN_SECRET", NEXT),
        ("KEYWARDEN_PREVIOUS_SECRETS_FILE", &file),
    ]);
    assert_eq!(ring.previous_ids().count(), 1);
    assert!(
        verifies(&dir, ring, &keys[1]).await,
        "KEYWARDEN_PREVIOUS_SECRETS_FILE"
    );
    // ... and as the current secret again, from a file with the same newline.
    let file = dir.write("current", &with_newline);
    let ring = load(&[("KEYWARDEN_SECRET_FILE", &file)]);
    assert!(!ring.has_previous());
    assert!(
        verifies(&dir, ring, &keys[2]).await,
        "KEYWARDEN_SECRET_FILE"
    );

    // The CLI itself accepts the moved secret: a key made under the new ring verifies too.
    let file = dir.write("previous", &with_newline);
    let env = [
        ("KEYWARDEN_SECRET", NEXT),
        ("KEYWARDEN_PREVIOUS_SECRETS_FILE", file.as_str()),
    ];
    let second = create(&dir, &env);
    assert!(verifies(&dir, load(&env), &second).await);
}

#[test]
fn secret_files_work_and_conflict_with_their_variables() {
    let dir = TempDir::new("files");
    let file = dir.write("secret", &format!("{SECRET}\r\n"));
    create(&dir, &[("KEYWARDEN_SECRET_FILE", &file)]);

    for (var, file_var) in [
        ("KEYWARDEN_SECRET", "KEYWARDEN_SECRET_FILE"),
        (
            "KEYWARDEN_PREVIOUS_SECRETS",
            "KEYWARDEN_PREVIOUS_SECRETS_FILE",
        ),
    ] {
        let env = [("KEYWARDEN_SECRET", SECRET), (var, NEXT), (file_var, &file)];
        let output = run(&dir, &env, &["keys", "list"]);
        assert!(!output.status.success());
        let error = text(&output.stderr);
        assert_eq!(error.lines().count(), 1, "{error}");
        assert!(error.contains(var) && error.contains(file_var), "{error}");
    }

    let missing = dir.path().join("missing").display().to_string();
    let output = run(
        &dir,
        &[("KEYWARDEN_SECRET_FILE", &missing)],
        &["keys", "list"],
    );
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("KEYWARDEN_SECRET_FILE"));

    // Ambiguous values are refused, not silently read as another secret, and not echoed.
    let output = run(
        &dir,
        &[("KEYWARDEN_SECRET", &format!("{SECRET} "))],
        &["keys", "list"],
    );
    assert!(!output.status.success());
    let error = text(&output.stderr);
    assert!(
        error.contains("ambiguous") && !error.contains(SECRET),
        "{error}"
    );
}

#[test]
fn weak_secrets_warn_on_stderr_and_generated_ones_do_not() {
    let dir = TempDir::new("weak");
    let output = run(&dir, &[], &["secret", "generate"]);
    assert!(output.status.success());
    let generated = text(&output.stdout).trim().to_owned();
    let output = run(&dir, &[("KEYWARDEN_SECRET", &generated)], &["keys", "list"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        !text(&output.stderr).contains("warning"),
        "{}",
        text(&output.stderr)
    );

    for weak in ["x".repeat(40), "0123456789abcdef".repeat(2)] {
        let output = run(&dir, &[("KEYWARDEN_SECRET", &weak)], &["keys", "list"]);
        assert!(output.status.success(), "a weak secret still works");
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("warning") && stderr.contains("looks weak"),
            "{stderr}"
        );
        assert!(!stderr.contains(&weak[..16]), "the secret is not printed");
    }
}
