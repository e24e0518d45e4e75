//! The audit log (issue 14 §1) on every store: memory, SQLite (a file) and PostgreSQL (own
//! schema per test). Every management change is one sealed event written with the change;
//! edits, deletions and reorderings made in the database are found; a change whose event
//! cannot be written does not happen; plain SQL on PostgreSQL is recorded as `sql`;
//! retention keeps the rest verifiable; the HTTP API shows `keys:self` only its own events.
#![cfg(all(feature = "sqlite", feature = "postgres", feature = "manage-api"))]

mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::Router;
use http::Request;
use keywarden::audit::{Actor, AuditAction, AuditQuery, ChainBreak, ChangeContext};
use keywarden::manage::RevealKeyRing;
use keywarden::store::{KeyPatch, UnmigratedKeys};
use keywarden::{
    management_router, ApiKeyLayer, Collection, KeyManager, KeyStore, MemoryStore, NewKey,
    PostgresStore, SecretRing, SqliteStore,
};
use support::{service_url, unique, Reply, OLD_SECRET, SECRET};
use time::Duration;

enum Db {
    Memory,
    Sqlite(SqliteStore, std::path::PathBuf),
    Postgres(PostgresStore, String),
}

struct Backend {
    name: &'static str,
    store: Arc<dyn KeyStore>,
    db: Db,
}

impl Backend {
    /// Runs SQL against the backing database (the tamperer's access); `false` for memory.
    async fn sql(&self, statement: &str) -> bool {
        match &self.db {
            Db::Memory => return false,
            Db::Sqlite(store, _) => {
                sqlx::raw_sql(statement)
                    .execute(store.pool())
                    .await
                    .unwrap();
            }
            Db::Postgres(store, _) => {
                sqlx::raw_sql(statement)
                    .execute(store.pool())
                    .await
                    .unwrap();
            }
        }
        true
    }

    async fn finish(self) {
        match self.db {
            Db::Memory => {}
            Db::Sqlite(store, path) => {
                store.pool().close().await;
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
            }
            Db::Postgres(store, schema) => {
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .execute(store.pool())
                    .await
                    .unwrap();
            }
        }
    }
}

async fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend {
        name: "memory",
        store: Arc::new(MemoryStore::new()),
        db: Db::Memory,
    }];
    let path = std::env::temp_dir().join(format!("{}.db", unique("keywarden_audit")));
    let sqlite = SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    backends.push(Backend {
        name: "sqlite",
        store: Arc::new(sqlite.clone()),
        db: Db::Sqlite(sqlite, path),
    });
    if let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") {
        let schema = unique("kw_audit");
        let pg = PostgresStore::connect_with_schema(&url, &schema)
            .await
            .unwrap();
        backends.push(Backend {
            name: "postgres",
            store: Arc::new(pg.clone()),
            db: Db::Postgres(pg, schema),
        });
    }
    backends
}

fn reveal_ring() -> RevealKeyRing {
    RevealKeyRing::from_strs("reveal-key-for-the-audit-tests-0123456789ab", None).unwrap()
}

fn manager_current(_: &KeyManager) -> keywarden::secret::SecretId {
    SecretRing::from_strs(SECRET, None).unwrap().current_id()
}

async fn all_events(manager: &KeyManager) -> Vec<keywarden::audit::AuditEvent> {
    manager
        .audit(&AuditQuery {
            limit: AuditQuery::MAX_LIMIT,
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn every_change_is_one_sealed_event_on_every_store() {
    for backend in backends().await {
        let name = backend.name;
        let ring = SecretRing::from_strs(SECRET, Some(OLD_SECRET)).unwrap();
        let manager = KeyManager::new(backend.store.clone(), ring)
            .with_reveal_keys(reveal_ring())
            .with_actor(Actor::Cli);

        let a = manager
            .create(NewKey::new("a", "alice").scope("read"))
            .await
            .unwrap();
        let id = a.record.id;
        manager
            .update(
                id,
                KeyPatch {
                    name: Some("renamed".into()),
                    scopes: Some(vec!["read".into(), "write".into()]),
                    ..KeyPatch::default()
                },
            )
            .await
            .unwrap();
        let disable = KeyPatch {
            disabled: Some(true),
            ..KeyPatch::default()
        };
        manager.update(id, disable).await.unwrap();
        let enable = KeyPatch {
            disabled: Some(false),
            ..KeyPatch::default()
        };
        manager.update(id, enable).await.unwrap();
        let shown = manager
            .reveal(id, &Actor::Other("ops".into()))
            .await
            .unwrap();
        assert_eq!(shown, a.key, "{name}");
        let as_admin = manager.acting_as(
            ChangeContext::new(Actor::Key {
                id: uuid::Uuid::now_v7(),
                subject: "root".into(),
            })
            .client_address(Some("::ffff:10.1.2.3".parse().unwrap()))
            .request_id(Some("req-42")),
        );
        let successor = as_admin.rotate(id, Duration::hours(1)).await.unwrap();
        manager.revoke(id).await.unwrap();
        manager.delete(successor.record.id).await.unwrap();
        // Retiring the ring's previous secret (no key has a digest under it) is an event.
        let old_id = SecretRing::from_strs(OLD_SECRET, None)
            .unwrap()
            .current_id();
        manager
            .retire_secret(old_id, UnmigratedKeys::Refuse)
            .await
            .unwrap();
        // The current secret cannot be retired: refused before any change, no event.
        assert!(manager
            .retire_secret(manager_current(&manager), UnmigratedKeys::Refuse)
            .await
            .is_err());

        let events = all_events(&manager).await;
        let actions: Vec<AuditAction> = events.iter().map(|e| e.action).collect();
        let expected_prefix = [
            AuditAction::Created,
            AuditAction::Updated,
            AuditAction::Disabled,
            AuditAction::Enabled,
            AuditAction::Revealed,
            AuditAction::Created,
            AuditAction::Rotated,
            AuditAction::Revoked,
            AuditAction::Deleted,
        ];
        assert_eq!(&actions[..9], &expected_prefix, "{name}");
        assert_eq!(actions[9..], [AuditAction::SecretRetired], "{name}");
        assert_eq!(events[9].key_id, None);
        assert_eq!(
            events[9].changes["secret_id"],
            serde_json::json!(old_id.to_string()),
            "{name}"
        );
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=events.len() as u64).collect::<Vec<_>>(),
            "{name}: numbered without gaps"
        );
        assert_eq!(events[0].actor, Actor::Cli, "{name}");
        assert_eq!(events[0].key_id, Some(id));
        assert_eq!(events[0].collection.as_deref(), Some("users"));
        assert_eq!(events[0].subject.as_deref(), Some("alice"));
        assert_eq!(
            events[1].changes["name"],
            serde_json::json!({"from": "a", "to": "renamed"}),
            "{name}"
        );
        assert_eq!(
            events[1].changes["scopes"]["to"],
            serde_json::json!(["read", "write"])
        );
        assert!(!events[1].changes.contains_key("description"), "{name}");
        assert_eq!(events[4].actor, Actor::Other("ops".into()), "{name}");
        // The rotation: the new key's creation and the old key's event, by the admin key,
        // with the request's address (IPv4-mapped normalised) and id.
        assert_eq!(events[5].key_id, Some(successor.record.id));
        assert_eq!(
            events[5].changes["rotated_from"]["to"],
            serde_json::json!(id.to_string())
        );
        assert_eq!(events[6].key_id, Some(id));
        assert_eq!(
            events[6].changes["successor"],
            serde_json::json!(successor.record.id.to_string())
        );
        assert!(events[6].changes.contains_key("expires_at"), "{name}");
        assert_eq!(events[6].actor.kind(), "key", "{name}");
        assert_eq!(
            events[6].client_address,
            Some("10.1.2.3".parse().unwrap()),
            "{name}"
        );
        assert_eq!(events[6].request_id.as_deref(), Some("req-42"));
        assert_eq!(
            events[7].actor,
            Actor::Cli,
            "acting_as leaves the manager's own"
        );

        // No event holds key material.
        let text = serde_json::to_string(&events).unwrap();
        for secret in [a.key.expose(), successor.key.expose()] {
            assert!(!text.contains(secret), "{name}: a key in the log");
        }
        assert!(!text.contains(&a.record.digest.to_hex()), "{name}");

        let verified = manager.verify_audit().await.unwrap();
        assert_eq!(verified.broken, None, "{name}");
        assert_eq!(verified.checked, events.len() as u64, "{name}");
        assert_eq!(verified.head, events.last().unwrap().head());

        // Filters.
        let by_key = manager
            .audit(&AuditQuery {
                key_id: Some(successor.record.id),
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(
            by_key.items.iter().map(|e| e.action).collect::<Vec<_>>(),
            [AuditAction::Created, AuditAction::Deleted],
            "{name}"
        );
        let by_actor = manager
            .audit(&AuditQuery {
                actor: Some("key".into()),
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(by_actor.items.len(), 2, "{name}: the rotation's two events");
        let page = manager
            .audit(&AuditQuery {
                limit: 3,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(page.items.len(), 3);
        assert_eq!(page.next_cursor, Some(3), "{name}");
        let revoked = manager
            .audit(&AuditQuery {
                action: Some(AuditAction::Revoked),
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(revoked.items.len(), 1, "{name}");
        backend.finish().await;
    }
}

#[tokio::test]
async fn edits_deletions_and_reorderings_in_the_database_are_found() {
    for backend in backends().await {
        if matches!(backend.db, Db::Memory) {
            continue;
        }
        let name = backend.name;
        let manager = KeyManager::new(backend.store.clone(), support::ring());
        for n in 0..5 {
            manager
                .create(NewKey::new(format!("k{n}"), "alice"))
                .await
                .unwrap();
        }
        assert_eq!(manager.verify_audit().await.unwrap().broken, None);

        // Someone with write access but not the secret changes whom event 3 was about.
        backend
            .sql("UPDATE keywarden_audit SET subject = 'mallory' WHERE seq = 3")
            .await;
        let found = manager.verify_audit().await.unwrap();
        assert_eq!(found.broken, Some((3, ChainBreak::BadMac)), "{name}");
        assert_eq!(found.checked, 2, "{name}");
        backend
            .sql("UPDATE keywarden_audit SET subject = 'alice' WHERE seq = 3")
            .await;
        assert_eq!(manager.verify_audit().await.unwrap().broken, None, "{name}");

        // Deleting an event in the middle.
        backend
            .sql("DELETE FROM keywarden_audit WHERE seq = 2")
            .await;
        let found = manager.verify_audit().await.unwrap();
        assert_eq!(found.broken, Some((3, ChainBreak::Missing(1))), "{name}");

        // Renumbering to hide the gap breaks the MAC instead.
        backend
            .sql(
                "UPDATE keywarden_audit SET seq = seq + 1000 WHERE seq > 2; \
                 UPDATE keywarden_audit SET seq = seq - 1001 WHERE seq > 1000;",
            )
            .await;
        let found = manager.verify_audit().await.unwrap();
        assert_eq!(found.broken, Some((2, ChainBreak::BadMac)), "{name}");
        backend.finish().await;
    }
}

#[tokio::test]
async fn a_change_whose_event_cannot_be_written_does_not_happen() {
    for backend in backends().await {
        let name = backend.name;
        let manager = KeyManager::new(backend.store.clone(), support::ring());
        let key = manager.create(NewKey::new("k", "alice")).await.unwrap();
        let blocked = match &backend.db {
            Db::Memory => continue,
            Db::Sqlite(..) => {
                backend
                    .sql(
                        "CREATE TRIGGER no_audit BEFORE INSERT ON keywarden_audit \
                         BEGIN SELECT RAISE(ABORT, 'audit log full'); END;",
                    )
                    .await
            }
            Db::Postgres(..) => {
                backend
                    .sql(
                        "CREATE FUNCTION no_audit() RETURNS trigger LANGUAGE plpgsql AS \
                         $$ BEGIN RAISE EXCEPTION 'audit log full'; END $$; \
                         CREATE TRIGGER no_audit BEFORE INSERT ON keywarden_audit \
                         FOR EACH ROW EXECUTE FUNCTION no_audit();",
                    )
                    .await
            }
        };
        assert!(blocked);
        let error = manager.revoke(key.record.id).await.unwrap_err();
        assert_eq!(
            error.kind(),
            keywarden::manage::ManageErrorKind::Store,
            "{name}"
        );
        let still = manager.get(key.record.id).await.unwrap();
        assert_eq!(still.revoked_at, None, "{name}: revoked without its event");
        assert!(manager.create(NewKey::new("other", "alice")).await.is_err());
        let keys = manager.list(&keywarden::KeyQuery::new()).await.unwrap();
        assert_eq!(keys.items.len(), 1, "{name}: created without its event");
        assert!(manager.delete(key.record.id).await.is_err());
        assert!(manager.get(key.record.id).await.is_ok(), "{name}");
        backend.finish().await;
    }
}

#[tokio::test]
async fn plain_sql_changes_on_postgres_are_recorded_as_sql() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_audit_sql");
    let pg = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let manager = KeyManager::new(Arc::new(pg.clone()), support::ring());
    let key = manager.create(NewKey::new("k", "alice")).await.unwrap();
    // Usage writes and keywarden's own changes are not plain-SQL events.
    manager
        .store()
        .record_usage(&[keywarden::store::KeyUsage {
            id: key.record.id,
            last_used_at: time::OffsetDateTime::now_utc(),
            uses: 3,
        }])
        .await
        .unwrap();
    // A DBA revokes the key by hand (another connection, another search_path).
    let mut dba = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query(&format!(
        "UPDATE {schema}.keywarden_keys SET revoked_at = now() WHERE id = $1"
    ))
    .bind(key.record.id)
    .execute(&mut dba)
    .await
    .unwrap();
    // Setting the old marker setting does not hide a change; a digest swap is recorded
    // without its values.
    let other = manager.create(NewKey::new("other", "bob")).await.unwrap();
    sqlx::raw_sql(&format!(
        "SELECT set_config('keywarden.audited', 'on', false); \
         UPDATE {schema}.keywarden_keys SET digest = decode(repeat('ab', 32), 'hex') \
         WHERE id = '{}'",
        other.record.id
    ))
    .execute(&mut dba)
    .await
    .unwrap();
    // Rows no trigger wrote (a bad action, a number serde cannot hold, a time in 1970) are
    // sealed as they are, now, and never block a management write.
    sqlx::raw_sql(&format!(
        "INSERT INTO {schema}.keywarden_audit_pending (action, changes, at, db_role) \
         VALUES ('key.stolen', '{{\"a\": 1e400}}', '1970-01-01', 'nobody')"
    ))
    .execute(&mut dba)
    .await
    .unwrap();
    manager
        .update(
            key.record.id,
            KeyPatch {
                name: Some("after".into()),
                ..KeyPatch::default()
            },
        )
        .await
        .unwrap();
    let events = all_events(&manager).await;
    assert_eq!(
        events.iter().map(|e| e.action).collect::<Vec<_>>(),
        [
            AuditAction::Created,
            AuditAction::Revoked,
            AuditAction::Created,
            AuditAction::Updated,
            AuditAction::Updated,
            AuditAction::Updated
        ],
        "{events:#?}"
    );
    assert_eq!(events[1].actor.kind(), "sql");
    assert_eq!(events[1].actor.name(), Some("postgres"));
    assert_eq!(events[1].key_id, Some(key.record.id));
    assert!(events[1].changes.contains_key("revoked_at"));
    let swap = &events[3];
    assert_eq!(swap.actor.kind(), "sql", "{swap:?}");
    assert_eq!(swap.key_id, Some(other.record.id));
    assert_eq!(swap.changes["credential"], "changed");
    assert!(
        !serde_json::to_string(swap).unwrap().contains("abab"),
        "no digest"
    );
    let forged = &events[4];
    assert_eq!(forged.changes["unparsed_action"], "key.stolen");
    assert!(forged.changes.contains_key("unparsed"), "{forged:?}");
    assert!(
        forged.at > time::OffsetDateTime::now_utc() - Duration::minutes(5),
        "sealed now, not in 1970"
    );
    assert_eq!(events[5].actor, Actor::application());
    assert_eq!(manager.verify_audit().await.unwrap().broken, None);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pg.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_changes_on_postgres_number_without_gaps() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_audit_race");
    let pg = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let manager = Arc::new(KeyManager::new(Arc::new(pg.clone()), support::ring()));
    let tasks: Vec<_> = (0..24)
        .map(|n| {
            let manager = manager.clone();
            tokio::spawn(async move {
                let key = manager
                    .create(NewKey::new(format!("k{n}"), "alice"))
                    .await
                    .unwrap();
                manager.revoke(key.record.id).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let verified = manager.verify_audit().await.unwrap();
    assert_eq!(verified.broken, None);
    assert_eq!(verified.checked, 48);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pg.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn retention_prunes_and_the_rest_stays_verifiable() {
    for backend in backends().await {
        let name = backend.name;
        let clock = keywarden::clock::ManualClock::new(time::OffsetDateTime::now_utc());
        let manager = KeyManager::new(backend.store.clone(), support::ring())
            .with_clock(Arc::new(clock.clone()));
        for n in 0..3 {
            manager
                .create(NewKey::new(format!("old{n}"), "alice"))
                .await
                .unwrap();
        }
        clock.advance(Duration::days(100));
        manager.create(NewKey::new("new", "alice")).await.unwrap();
        assert_eq!(manager.prune_audit(Duration::days(90)).await.unwrap(), 3);
        assert_eq!(manager.prune_audit(Duration::days(90)).await.unwrap(), 0);
        let verified = manager.verify_audit().await.unwrap();
        assert_eq!(verified.broken, None, "{name}");
        assert_eq!(verified.checked, 1, "{name}");
        assert_eq!(verified.checkpoint.map(|c| c.seq), Some(3), "{name}");
        // Numbering goes on after the pruned events.
        manager.create(NewKey::new("newer", "alice")).await.unwrap();
        let events = all_events(&manager).await;
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5],
            "{name}"
        );
        // An event whose time was moved back (to have it pruned early) breaks the chain, and
        // nothing is pruned from a chain that does not verify.
        let epoch = if name == "postgres" { "'epoch'" } else { "0" };
        if backend
            .sql(&format!(
                "UPDATE keywarden_audit SET at = {epoch} WHERE seq = 5"
            ))
            .await
        {
            let refused = manager.prune_audit(Duration::days(90)).await.unwrap_err();
            assert_eq!(
                refused.kind(),
                keywarden::manage::ManageErrorKind::Conflict,
                "{name}"
            );
            assert_eq!(
                all_events(&manager).await.len(),
                2,
                "{name}: nothing pruned"
            );
            backend.finish().await;
            continue;
        }
        // Moving the checkpoint (to hide deleting more) breaks its seal.
        if backend
            .sql("UPDATE keywarden_audit_checkpoint SET seq = 4")
            .await
        {
            backend
                .sql("DELETE FROM keywarden_audit WHERE seq = 4")
                .await;
            let found = manager.verify_audit().await.unwrap();
            assert_eq!(found.broken, Some((0, ChainBreak::BadCheckpoint)), "{name}");
        }
        backend.finish().await;
    }
}

#[tokio::test]
async fn a_new_secret_seals_on_and_the_old_one_still_verifies() {
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let before = KeyManager::new(
        store.clone(),
        SecretRing::from_strs(OLD_SECRET, None).unwrap(),
    );
    before.create(NewKey::new("a", "alice")).await.unwrap();
    let after = KeyManager::new(
        store.clone(),
        SecretRing::from_strs(SECRET, Some(OLD_SECRET)).unwrap(),
    );
    after.create(NewKey::new("b", "alice")).await.unwrap();
    let events = all_events(&after).await;
    assert_ne!(events[0].sealed_by, events[1].sealed_by);
    assert_eq!(after.verify_audit().await.unwrap().broken, None);
    // Without the old secret, the first event cannot be checked, and says why.
    let forgetful = KeyManager::new(store, SecretRing::from_strs(SECRET, None).unwrap());
    assert!(matches!(
        forgetful.verify_audit().await.unwrap().broken,
        Some((1, ChainBreak::UnknownSecret(_)))
    ));
}

// --- The HTTP API -------------------------------------------------------------------------

struct Api {
    app: Router,
    manager: Arc<KeyManager>,
}

fn api() -> Api {
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(MemoryStore::new()))
        .secrets(support::ring())
        .collection(Collection::new("users"))
        .build()
        .unwrap();
    let manager = Arc::new(KeyManager::for_layer(&layer));
    let app = Router::new()
        .nest("/admin", management_router(manager.clone()))
        .layer(layer);
    Api { app, manager }
}

async fn call(app: &Router, key: &str, method: &str, uri: &str, body: Option<&str>) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("x-api-key", key)
        .header("x-request-id", "req-7");
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            [192, 0, 2, 9],
            4000,
        ))))
        .body(Body::from(body.unwrap_or("").to_owned()))
        .unwrap();
    support::send(app, request).await
}

#[tokio::test]
async fn the_api_records_its_callers_and_shows_keys_self_only_its_own_events() {
    let api = api();
    let admin = api
        .manager
        .create(NewKey::new("admin", "root").scope("keys:admin"))
        .await
        .unwrap();
    let alice = api
        .manager
        .create(NewKey::new("alice self", "alice").scope("keys:self"))
        .await
        .unwrap();
    let admin_key = admin.key.expose();
    let alice_key = alice.key.expose();

    let made = call(
        &api.app,
        admin_key,
        "POST",
        "/admin/keys",
        Some(r#"{"name": "bob's", "subject": "bob"}"#),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let bob_key_id = made.json()["id"].as_str().unwrap().to_owned();
    let mine = call(
        &api.app,
        alice_key,
        "POST",
        "/admin/keys",
        Some(r#"{"name": "alice's second"}"#),
    )
    .await;
    assert_eq!(mine.status, 201, "{}", mine.text());

    let all = call(&api.app, admin_key, "GET", "/admin/audit", None).await;
    assert_eq!(all.status, 200, "{}", all.text());
    let items = all.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 4, "{items:#?}");
    let by_admin = &items[2];
    assert_eq!(by_admin["action"], "key.created");
    assert_eq!(by_admin["actor"]["kind"], "key");
    assert_eq!(by_admin["actor"]["id"], admin.record.id.to_string());
    assert_eq!(by_admin["actor"]["subject"], "root");
    assert_eq!(by_admin["client_address"], "192.0.2.9");
    assert_eq!(by_admin["request_id"], "req-7");
    assert_eq!(by_admin["key_id"], bob_key_id);
    assert_eq!(by_admin["mac"].as_str().unwrap().len(), 64);

    // keys:self: only events about alice's keys, whatever the filters ask for.
    let own = call(&api.app, alice_key, "GET", "/admin/audit", None).await;
    assert_eq!(own.status, 200);
    let own_items = own.json()["items"].as_array().unwrap().clone();
    assert_eq!(own_items.len(), 2, "{own_items:#?}");
    assert!(own_items.iter().all(|e| e["subject"] == "alice"));
    // Other actors are shown by kind only: not the application's name, nor another key's
    // id, address or request; the caller's own events in full.
    assert_eq!(
        own_items[0]["actor"],
        serde_json::json!({"kind": "other", "name": "redacted"})
    );
    assert_eq!(own_items[1]["actor"]["id"], alice.record.id.to_string());
    assert_eq!(own_items[1]["client_address"], "192.0.2.9");
    let peek = call(
        &api.app,
        alice_key,
        "GET",
        &format!("/admin/audit?key_id={bob_key_id}"),
        None,
    )
    .await;
    assert_eq!(peek.json()["items"], serde_json::json!([]));
    let peek = call(&api.app, alice_key, "GET", "/admin/audit?subject=bob", None).await;
    assert_eq!(peek.json()["items"], serde_json::json!([]));

    // Filters and paging are validated and never echo what was sent.
    let bad = call(
        &api.app,
        admin_key,
        "GET",
        "/admin/audit?action=key.stolen&limit=0&since=yesterday&kw_live_secret=1",
        None,
    )
    .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    for field in ["action", "limit", "since", "query"] {
        assert!(
            bad.text().contains(&format!("\"{field}\"")),
            "{}",
            bad.text()
        );
    }
    assert!(!bad.text().contains("kw_live_secret"));
    assert!(!bad.text().contains("key.stolen"));
    let page = call(&api.app, admin_key, "GET", "/admin/audit?limit=3", None).await;
    assert_eq!(page.json()["next_cursor"], 3);
    let rest = call(&api.app, admin_key, "GET", "/admin/audit?after=3", None).await;
    assert_eq!(rest.json()["items"].as_array().unwrap().len(), 1);
    let revoked = call(
        &api.app,
        admin_key,
        "GET",
        "/admin/audit?action=key.created&actor=key",
        None,
    )
    .await;
    assert_eq!(revoked.json()["items"].as_array().unwrap().len(), 2);

    // A key without a management scope reads nothing.
    let plain = api
        .manager
        .create(NewKey::new("plain", "carol").scope("read"))
        .await
        .unwrap();
    let denied = call(&api.app, plain.key.expose(), "GET", "/admin/audit", None).await;
    assert_eq!(denied.status, 403);
}

/// The plain-SQL trigger's function runs as its owner: no other role may attach it to a table
/// of its own (a temporary `keywarden_keys` whose inserts would then run the function's
/// statements, with the owner's rights, against tables the attacker chose).
#[tokio::test]
async fn other_roles_cannot_borrow_the_audit_trigger_function() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_audit_guard");
    let pg = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let role = unique("kw_intruder");
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {schema} TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.keywarden_keys TO {role};"
    ))
    .execute(pg.pool())
    .await
    .unwrap();
    let intruder_url = match url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
    {
        Some((_, host)) => format!("postgres://{role}@{host}"),
        None => panic!("the test URL names a user"),
    };
    let mut intruder = <sqlx::PgConnection as sqlx::Connection>::connect(&intruder_url)
        .await
        .unwrap();
    let attached = sqlx::raw_sql(&format!(
        "CREATE TEMP TABLE keywarden_keys (id uuid, collection text, subject text); \
         CREATE TRIGGER borrowed AFTER INSERT ON pg_temp.keywarden_keys \
         FOR EACH ROW EXECUTE FUNCTION {schema}.keywarden_audit_sql_change();"
    ))
    .execute(&mut intruder)
    .await;
    let error = attached
        .expect_err("EXECUTE is revoked from PUBLIC")
        .to_string();
    assert!(error.contains("permission denied"), "{error}");
    // Its plain-SQL changes to the real table are still recorded, as its own role.
    let manager = KeyManager::new(Arc::new(pg.clone()), support::ring());
    let key = manager.create(NewKey::new("k", "alice")).await.unwrap();
    sqlx::query(&format!(
        "UPDATE {schema}.keywarden_keys SET name = 'renamed' WHERE id = $1"
    ))
    .bind(key.record.id)
    .execute(&mut intruder)
    .await
    .unwrap();
    // Nor can it mark its transaction as keywarden's.
    let marked = sqlx::query(&format!(
        "INSERT INTO {schema}.keywarden_audit_tx (txid) VALUES (txid_current())"
    ))
    .execute(&mut intruder)
    .await;
    assert!(marked.is_err());
    let events = all_events(&manager).await;
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[1].actor, Actor::Sql(role.clone()));
    assert_eq!(manager.verify_audit().await.unwrap().broken, None);
    drop(intruder);
    sqlx::raw_sql(&format!(
        "DROP SCHEMA {schema} CASCADE; DROP OWNED BY {role}; DROP ROLE {role};"
    ))
    .execute(pg.pool())
    .await
    .unwrap();
}

/// A mass change made with plain SQL is sealed a batch (1,000) at a time: a management write
/// seals one batch in its transaction, readers seal the rest, in order.
#[tokio::test]
async fn a_mass_plain_sql_change_is_sealed_in_batches() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_audit_mass");
    let pg = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "INSERT INTO {schema}.keywarden_audit_pending (action, changes) \
         SELECT 'key.updated', jsonb_build_object('n', n) FROM generate_series(1, 2500) AS n"
    ))
    .execute(pg.pool())
    .await
    .unwrap();
    let manager = KeyManager::new(Arc::new(pg.clone()), support::ring());
    manager.create(NewKey::new("k", "alice")).await.unwrap();
    let pending: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {schema}.keywarden_audit_pending"
    ))
    .fetch_one(pg.pool())
    .await
    .unwrap();
    assert_eq!(pending, 1500, "one batch sealed with the write");
    let verified = manager.verify_audit().await.unwrap();
    assert_eq!(verified.broken, None);
    assert_eq!(verified.checked, 2501);
    let page = manager
        .audit(&AuditQuery {
            limit: 3,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let order: Vec<i64> = page
        .items
        .iter()
        .map(|e| e.changes["n"].as_i64().unwrap())
        .collect();
    assert_eq!(order, [1, 2, 3], "oldest first");
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pg.pool())
        .await
        .unwrap();
}
