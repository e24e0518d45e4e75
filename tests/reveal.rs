//! Viewable keys end to end, on every store backend: rotating the reveal key loses nothing and
//! re-seals lazily; the older ciphertext format still opens; inactive keys are refused unless
//! asked; altered or moved ciphertexts fail closed; a failing re-seal still reveals; and the
//! `keywarden keys reveal` command.

mod support;

use std::sync::Arc;

use keywarden::{
    manage::Actor, manage::ManageErrorKind, manage::RevealKey, manage::RevealKeyId,
    manage::RevealKeyRing, manage::RevealOptions, store::KeyRecord, KeyManager, KeyStore,
    MemoryStore, NewKey, Secret, SecretRing,
};
use uuid::Uuid;

const OLD_REVEAL: &str = "legacy-reveal-key-0123456789abcdefghij";
const NEW_REVEAL: &str = "integration-new-reveal-key-0123456789ab";

/// A row sealed in the format written before reveal key ids (nonce ‖ ciphertext ‖ tag, the row
/// id as associated data) under `OLD_REVEAL`, made with Python's `cryptography`.
const LEGACY_ROW: &str = "0191e2a4-7b3c-7d4e-8f00-112233445566";
const LEGACY_KEY: &str = "kw_live_LegacyVector0123456789abcdefghijklmnopqrstuv";
const LEGACY_SEALED: &str = "a1b2c3d4e5f60718293a4b5c4fa28191f5c80c6fc69e78f3683fed6c852e0391ddfceadd1ead5c618775b309da67e155dcd267a31fcfac9ab4bac223087bfca307405451045b50329dffb192c1303047";

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn reveal_id(secret: &str) -> RevealKeyId {
    RevealKey::new(&Secret::new(secret).unwrap()).id()
}

async fn sealed(store: &Arc<dyn KeyStore>, id: Uuid) -> Vec<u8> {
    store.get(id).await.unwrap().unwrap().encrypted_key.unwrap()
}

/// How a test makes the store's re-seal writes fail for real, and stop failing.
enum Breaker {
    None,
    #[cfg(feature = "sqlite")]
    Sqlite(keywarden::SqliteStore, std::path::PathBuf),
    #[cfg(feature = "postgres")]
    Postgres(keywarden::PostgresStore, String),
}

impl Breaker {
    async fn set(&self, broken: bool) -> bool {
        match self {
            Breaker::None => false,
            #[cfg(feature = "sqlite")]
            Breaker::Sqlite(store, _) => {
                let sql = if broken {
                    "CREATE TRIGGER no_reseal BEFORE UPDATE OF encrypted_key ON keywarden_keys \
                     BEGIN SELECT RAISE(ABORT, 'encrypted keys are frozen'); END"
                } else {
                    "DROP TRIGGER no_reseal"
                };
                sqlx::query(sql).execute(store.pool()).await.unwrap();
                true
            }
            #[cfg(feature = "postgres")]
            Breaker::Postgres(store, schema) => {
                let statements = if broken {
                    vec![
                        format!(
                            "CREATE FUNCTION \"{schema}\".no_reseal() RETURNS trigger \
                             LANGUAGE plpgsql AS $$ BEGIN \
                             RAISE EXCEPTION 'encrypted keys are frozen'; END $$"
                        ),
                        format!(
                            "CREATE TRIGGER no_reseal BEFORE UPDATE OF encrypted_key \
                             ON \"{schema}\".keywarden_keys FOR EACH ROW \
                             EXECUTE FUNCTION \"{schema}\".no_reseal()"
                        ),
                    ]
                } else {
                    vec![format!(
                        "DROP TRIGGER no_reseal ON \"{schema}\".keywarden_keys"
                    )]
                };
                for sql in statements {
                    sqlx::query(&sql).execute(store.pool()).await.unwrap();
                }
                true
            }
        }
    }

    /// Removes the test's database file or schema.
    async fn finish(self) {
        match self {
            Breaker::None => {}
            #[cfg(feature = "sqlite")]
            Breaker::Sqlite(store, path) => {
                store.pool().close().await;
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            #[cfg(feature = "postgres")]
            Breaker::Postgres(store, schema) => {
                sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .execute(store.pool())
                    .await
                    .unwrap();
            }
        }
    }
}

async fn backends() -> Vec<(&'static str, Arc<dyn KeyStore>, Breaker)> {
    let mut backends: Vec<(&'static str, Arc<dyn KeyStore>, Breaker)> =
        vec![("memory", Arc::new(MemoryStore::new()), Breaker::None)];
    #[cfg(feature = "sqlite")]
    {
        let path = std::env::temp_dir().join(format!("{}.db", support::unique("kw_reveal")));
        let store = keywarden::SqliteStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        backends.push((
            "sqlite",
            Arc::new(store.clone()),
            Breaker::Sqlite(store, path),
        ));
    }
    #[cfg(feature = "postgres")]
    if let Some(url) = support::service_url("KEYWARDEN_TEST_POSTGRES_URL") {
        let schema = support::unique("kw_reveal");
        let store = keywarden::PostgresStore::connect_with_schema(&url, &schema)
            .await
            .unwrap();
        backends.push((
            "postgres",
            Arc::new(store.clone()),
            Breaker::Postgres(store, schema),
        ));
    }
    backends
}

/// A record holding the legacy ciphertext, inserted as an older keywarden would have.
async fn insert_legacy(store: &Arc<dyn KeyStore>, template: &KeyRecord) {
    let mut record = template.clone();
    record.id = Uuid::parse_str(LEGACY_ROW).unwrap();
    record.digest = SecretRing::from_strs(support::SECRET, None)
        .unwrap()
        .digest(LEGACY_KEY.as_bytes());
    record.name = "legacy".into();
    record.encrypted_key = Some(unhex(LEGACY_SEALED));
    store.insert(&record).await.unwrap();
}

#[tokio::test]
async fn rotating_the_reveal_key_loses_nothing_on_every_store() {
    for (name, store, breaker) in backends().await {
        let secrets = SecretRing::from_strs(support::SECRET, None).unwrap();
        let before = KeyManager::new(store.clone(), secrets.clone())
            .with_reveal_keys(RevealKeyRing::from_strs(OLD_REVEAL, None).unwrap());
        let a = before.create(NewKey::new("a", "alice")).await.unwrap();
        let b = before.create(NewKey::new("b", "bob")).await.unwrap();
        let c = before.create(NewKey::new("c", "carol")).await.unwrap();
        insert_legacy(&store, &a.record).await;
        let legacy = Uuid::parse_str(LEGACY_ROW).unwrap();
        let a_before = sealed(&store, a.record.id).await;
        assert_eq!(
            RevealKeyId::of_encrypted(&a_before),
            Some(reveal_id(OLD_REVEAL)),
            "{name}"
        );

        // The old reveal key moves to the previous keys.
        let after = KeyManager::new(store.clone(), secrets.clone())
            .with_reveal_keys(RevealKeyRing::from_strs(NEW_REVEAL, Some(OLD_REVEAL)).unwrap());
        assert_eq!(after.reveal(a.record.id, &Actor::Cli).await.unwrap(), a.key);
        let a_after = sealed(&store, a.record.id).await;
        assert_eq!(
            RevealKeyId::of_encrypted(&a_after),
            Some(reveal_id(NEW_REVEAL)),
            "{name}: re-sealed under the new reveal key"
        );
        let shown = after.reveal(legacy, &Actor::Cli).await.unwrap();
        assert_eq!(shown.expose(), LEGACY_KEY, "{name}: the older format opens");
        assert_eq!(
            RevealKeyId::of_encrypted(&sealed(&store, legacy).await),
            Some(reveal_id(NEW_REVEAL)),
            "{name}: the older format is re-sealed as an envelope"
        );

        // A re-seal that fails still reveals, and leaves the old ciphertext for next time.
        if breaker.set(true).await {
            let c_before = sealed(&store, c.record.id).await;
            assert_eq!(after.reveal(c.record.id, &Actor::Cli).await.unwrap(), c.key);
            assert_eq!(sealed(&store, c.record.id).await, c_before, "{name}");
            breaker.set(false).await;
            assert_eq!(after.reveal(c.record.id, &Actor::Cli).await.unwrap(), c.key);
            assert_eq!(
                RevealKeyId::of_encrypted(&sealed(&store, c.record.id).await),
                Some(reveal_id(NEW_REVEAL)),
                "{name}"
            );
        }

        // Re-sealed keys no longer need the old reveal key; unmigrated ones name it.
        let new_only = KeyManager::new(store.clone(), secrets.clone())
            .with_reveal_keys(RevealKeyRing::from_strs(NEW_REVEAL, None).unwrap());
        assert_eq!(
            new_only.reveal(a.record.id, &Actor::Cli).await.unwrap(),
            a.key
        );
        assert_eq!(
            new_only.reveal(legacy, &Actor::Cli).await.unwrap().expose(),
            LEGACY_KEY
        );
        let err = new_only.reveal(b.record.id, &Actor::Cli).await.unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::NotRevealable, "{name}");
        assert!(
            err.to_string().contains(&reveal_id(OLD_REVEAL).to_string()),
            "{name}: {err}"
        );

        // Re-sealing is a compare-and-swap that touches nothing else.
        assert!(
            !store
                .reseal(a.record.id, &a_before, &[1, 2, 3])
                .await
                .unwrap(),
            "{name}: stale"
        );
        assert!(!store.reseal(Uuid::now_v7(), &a_after, &[1]).await.unwrap());
        let a_record = store.get(a.record.id).await.unwrap().unwrap();
        assert_eq!(a_record.encrypted_key.as_deref(), Some(&a_after[..]));
        assert_eq!(
            KeyRecord {
                encrypted_key: a.record.encrypted_key.clone(),
                ..a_record
            },
            a.record,
            "{name}: only the ciphertext changed"
        );

        // Altered, or moved from another key: refused, never re-sealed, never a panic.
        let b_sealed = sealed(&store, b.record.id).await;
        let mut tampered = b_sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(store
            .reseal(b.record.id, &b_sealed, &tampered)
            .await
            .unwrap());
        let err = after.reveal(b.record.id, &Actor::Cli).await.unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::NotRevealable, "{name}");
        assert!(store
            .reseal(b.record.id, &tampered, &a_after)
            .await
            .unwrap());
        let err = after.reveal(b.record.id, &Actor::Cli).await.unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::NotRevealable, "{name}");
        assert_eq!(sealed(&store, b.record.id).await, a_after, "{name}");
        for text in [err.to_string(), format!("{err:?}"), format!("{after:?}")] {
            for secret in [OLD_REVEAL, NEW_REVEAL, a.key.expose(), b.key.expose()] {
                assert!(!text.contains(secret), "{name}: {text}");
            }
        }

        // Inactive keys only when asked.
        after.revoke(a.record.id).await.unwrap();
        let err = after.reveal(a.record.id, &Actor::Cli).await.unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::Inactive, "{name}");
        let options = RevealOptions::new().include_inactive(true);
        assert_eq!(
            after
                .reveal_with(a.record.id, &Actor::Cli, options)
                .await
                .unwrap(),
            a.key,
            "{name}"
        );
        breaker.finish().await;
    }
}

#[cfg(feature = "cli")]
mod cli {
    use std::process::{Command, Output};

    use super::*;

    const BIN: &str = env!("CARGO_BIN_EXE_keywarden");

    struct Dir(std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn run(dir: &Dir, reveal: &[(&str, &str)], args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(&dir.0);
        for var in [
            "KEYWARDEN_PREVIOUS_SECRETS",
            "KEYWARDEN_REDIS_URL",
            "KEYWARDEN_REVEAL_KEY",
            "KEYWARDEN_REVEAL_KEY_FILE",
            "KEYWARDEN_PREVIOUS_REVEAL_KEYS",
            "KEYWARDEN_PREVIOUS_REVEAL_KEYS_FILE",
        ] {
            cmd.env_remove(var);
        }
        cmd.env(
            "KEYWARDEN_DATABASE_URL",
            format!("sqlite://{}", dir.0.join("keys.db").display()),
        )
        .env("KEYWARDEN_SECRET", support::SECRET)
        .envs(reveal.iter().copied())
        .args(args)
        .output()
        .unwrap()
    }

    fn json(output: &Output) -> serde_json::Value {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    #[tokio::test]
    async fn keys_reveal_follows_the_ring_and_refuses_inactive_keys() {
        let dir = Dir(std::env::temp_dir().join(support::unique("kw_reveal_cli")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let old = [("KEYWARDEN_REVEAL_KEY", OLD_REVEAL)];
        let created = json(&run(
            &dir,
            &old,
            &["keys", "create", "--name", "ci", "--json"],
        ));
        let id = created["id"].as_str().unwrap().to_owned();
        let key = created["key"].as_str().unwrap().to_owned();
        let shown = json(&run(&dir, &old, &["keys", "reveal", &id, "--json"]));
        assert_eq!(shown["key"], key.as_str());
        assert_eq!(shown["id"], id.as_str());

        // Rotated reveal key: revealed, and re-sealed under the new one.
        let rotated = [
            ("KEYWARDEN_REVEAL_KEY", NEW_REVEAL),
            ("KEYWARDEN_PREVIOUS_REVEAL_KEYS", OLD_REVEAL),
        ];
        let output = run(&dir, &rotated, &["keys", "reveal", &id]);
        assert!(output.status.success());
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), key);
        let store: Arc<dyn KeyStore> = Arc::new(
            keywarden::SqliteStore::connect(&format!(
                "sqlite://{}",
                dir.0.join("keys.db").display()
            ))
            .await
            .unwrap(),
        );
        let id_uuid = Uuid::parse_str(&id).unwrap();
        assert_eq!(
            RevealKeyId::of_encrypted(&sealed(&store, id_uuid).await),
            Some(reveal_id(NEW_REVEAL))
        );
        let new_only = [("KEYWARDEN_REVEAL_KEY", NEW_REVEAL)];
        assert_eq!(
            json(&run(&dir, &new_only, &["keys", "reveal", &id, "--json"]))["key"],
            key.as_str()
        );

        // Revoked: refused with a hint, then revealed when asked.
        json(&run(&dir, &new_only, &["keys", "revoke", &id, "--json"]));
        let refused = run(&dir, &new_only, &["keys", "reveal", &id]);
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("revoked") && stderr.contains("--include-inactive"),
            "{stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(refused.stdout.is_empty());
        let shown = json(&run(
            &dir,
            &new_only,
            &["keys", "reveal", &id, "--include-inactive", "--json"],
        ));
        assert_eq!(shown["key"], key.as_str());

        // No reveal key: refused. A bad one: named, never echoed.
        let off = run(&dir, &[], &["keys", "reveal", &id, "--include-inactive"]);
        assert!(!off.status.success());
        assert!(String::from_utf8_lossy(&off.stderr).contains("not enabled"));
        let bad = run(
            &dir,
            &[("KEYWARDEN_REVEAL_KEY", "too-short-reveal-key")],
            &["keys", "reveal", &id],
        );
        assert!(!bad.status.success());
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(stderr.contains("KEYWARDEN_REVEAL_KEY"), "{stderr}");
        assert!(!stderr.contains("too-short-reveal-key"), "{stderr}");
        for output in [&refused, &off, &bad] {
            let text = String::from_utf8_lossy(&output.stderr);
            for secret in [OLD_REVEAL, NEW_REVEAL, key.as_str()] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }

    #[test]
    fn reveal_key_warnings_are_printed_and_a_trailing_newline_is_not_part_of_the_key() {
        let dir = Dir(std::env::temp_dir().join(support::unique("kw_reveal_warn")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let weak = "ab1".repeat(12);
        let output = run(
            &dir,
            &[("KEYWARDEN_REVEAL_KEY", &weak)],
            &["keys", "list", "--json"],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(
            stderr.lines().any(|l| l.starts_with("warning: ")
                && l.contains("KEYWARDEN_REVEAL_KEY")
                && l.contains(&reveal_id(&weak).to_string())),
            "{stderr}"
        );
        assert!(!stderr.contains(&weak[..12]), "{stderr}");

        // Sealed under "KEY\n", revealed once "KEY\n" moved to the previous reveal keys.
        let with_newline = format!("{OLD_REVEAL}\n");
        let current = [("KEYWARDEN_REVEAL_KEY", with_newline.as_str())];
        let output = run(&dir, &current, &["keys", "create", "--name", "n", "--json"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("warning: KEYWARDEN_REVEAL_KEY ends with a line break"),
            "{stderr}"
        );
        let created = json(&output);
        let id = created["id"].as_str().unwrap();
        let moved = [
            ("KEYWARDEN_REVEAL_KEY", NEW_REVEAL),
            ("KEYWARDEN_PREVIOUS_REVEAL_KEYS", with_newline.as_str()),
        ];
        let shown = run(&dir, &moved, &["keys", "reveal", id, "--json"]);
        assert!(
            shown.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&shown.stderr)
        );
        assert_eq!(json(&shown)["key"], created["key"]);
    }
}
