#![cfg(all(feature = "sqlite", feature = "postgres", feature = "manage-api"))]
//! Timestamps written into the SQL stores by hand, outside what keywarden itself writes:
//! PostgreSQL's `infinity`, `-infinity` and years past 9999, SQLite's huge, negative and
//! non-integer values. None may panic a request; `expires_at = 'infinity'` means no expiry;
//! anything unrepresentable makes that one row corrupt: 503 `store_unavailable` for its key
//! (and for `GET /keys/{id}`), and skipped by every listing, which keeps working for the rest.
//!
//! Every odd value is written with plain SQL into a real database (PostgreSQL through
//! `KEYWARDEN_TEST_POSTGRES_URL`, in a schema of its own, and a SQLite file) and checked
//! through the store API, the layer (`oneshot`) and the management API's listing.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use keywarden::{
    management_router, store::KeyQuery, store::StoreErrorKind, ApiKeyLayer, Collection, KeyManager,
    KeyStore, NewKey, PostgresStore, SqliteStore,
};
use support::{get_with, ring, service_url};
use uuid::Uuid;

/// How a hand-written value must be read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// `expires_at` reads as `None`: the key works.
    NeverExpires,
    /// A representable instant in the past as `expires_at`: 401 `expired_key`.
    Expired,
    /// A representable (if odd) instant in another column: the key works.
    Readable,
    /// The row is corrupt.
    Corrupt,
}

enum Db {
    Sqlite(SqliteStore, std::path::PathBuf),
    Postgres(PostgresStore, String),
}

impl Db {
    fn store(&self) -> Arc<dyn KeyStore> {
        match self {
            Db::Sqlite(store, _) => Arc::new(store.clone()),
            Db::Postgres(store, _) => Arc::new(store.clone()),
        }
    }

    /// `UPDATE keywarden_keys SET <column> = <literal>` for one key, in plain SQL.
    async fn set(&self, id: Uuid, column: &str, literal: &str) {
        let sql = format!("UPDATE keywarden_keys SET {column} = {literal} WHERE id = ");
        let changed = match self {
            Db::Sqlite(store, _) => sqlx::query(&format!("{sql}?"))
                .bind(id.as_bytes().as_slice())
                .execute(store.pool())
                .await
                .unwrap()
                .rows_affected(),
            Db::Postgres(store, _) => sqlx::query(&format!("{sql}$1"))
                .bind(id)
                .execute(store.pool())
                .await
                .unwrap()
                .rows_affected(),
        };
        assert_eq!(changed, 1, "{column} = {literal}");
    }

    async fn close(self) {
        match self {
            Db::Sqlite(store, path) => {
                store.pool().close().await;
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Db::Postgres(store, schema) => {
                sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                    .execute(store.pool())
                    .await
                    .unwrap();
                store.pool().close().await;
            }
        }
    }
}

fn sqlite_cases() -> Vec<(&'static str, &'static str, Expect)> {
    use Expect::*;
    vec![
        ("expires_at", "9223372036854775807", Corrupt),
        ("expires_at", "-9223372036854775808", Corrupt),
        ("expires_at", "253402300800000000", Corrupt), // year 10000
        ("expires_at", "1.5", Corrupt),
        ("expires_at", "1e300", Corrupt),
        ("expires_at", "'infinity'", Corrupt),
        ("expires_at", "x'00'", Corrupt),
        ("expires_at", "-1", Expired), // 1969-12-31T23:59:59.999999Z
        ("created_at", "9223372036854775807", Corrupt),
        ("created_at", "'2030-01-01T00:00:00Z'", Corrupt),
        ("created_at", "-62135596800000000", Readable), // 0001-01-01
        ("created_at", "-62198755200000000", Corrupt),  // -0001-01-01: not RFC 3339
        ("updated_at", "2.5", Corrupt),
        ("updated_at", "-9223372036854775808", Corrupt),
        ("last_used_at", "9223372036854775807", Corrupt),
        ("last_used_at", "'yesterday'", Corrupt),
        ("revoked_at", "1e18", Corrupt),
        ("revoked_at", "-9223372036854775807", Corrupt),
    ]
}

fn postgres_cases() -> Vec<(&'static str, &'static str, Expect)> {
    use Expect::*;
    vec![
        ("expires_at", "'infinity'", NeverExpires),
        ("expires_at", "'-infinity'", Corrupt),
        ("expires_at", "'10000-01-01 00:00:00+00'", Corrupt),
        ("expires_at", "'294276-12-31 23:59:59.999999+00'", Corrupt), // PostgreSQL's last
        ("expires_at", "'4713-01-01 00:00:00+00 BC'", Corrupt),       // PostgreSQL's first
        ("expires_at", "'0002-01-01 00:00:00+00 BC'", Corrupt),       // ISO year -0001
        ("expires_at", "'1900-01-01 00:00:00+00'", Expired),
        ("created_at", "'infinity'", Corrupt),
        ("created_at", "'-infinity'", Corrupt),
        ("created_at", "'12000-06-01 00:00:00+00'", Corrupt),
        ("created_at", "'0001-01-01 00:00:00+00'", Readable),
        ("updated_at", "'infinity'", Corrupt),
        ("updated_at", "'-infinity'", Corrupt),
        ("last_used_at", "'infinity'", Corrupt),
        ("last_used_at", "'-infinity'", Corrupt),
        ("revoked_at", "'infinity'", Corrupt),
        ("revoked_at", "'-infinity'", Corrupt),
        ("revoked_at", "'99999-01-01 00:00:00+00'", Corrupt),
    ]
}

async fn check(db: Db, cases: Vec<(&'static str, &'static str, Expect)>) {
    let store = db.store();
    let layer = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .collection(Collection::new("users"))
        .build()
        .unwrap();
    let manager = Arc::new(KeyManager::for_layer(&layer));
    let api = Router::new()
        .nest("/admin", management_router(manager.clone()))
        .route("/whoami", axum::routing::get(|| async { "ok" }))
        .layer(layer);

    let admin = manager
        .create(NewKey::new("admin", "root").scope("keys:admin"))
        .await
        .unwrap();
    let admin_auth = format!("Bearer {}", admin.key.expose());
    let control = manager.create(NewKey::new("control", "u")).await.unwrap();

    let mut keys = Vec::new();
    for (i, (column, literal, expect)) in cases.iter().enumerate() {
        let created = manager
            .create(NewKey::new(format!("case {i}"), "u"))
            .await
            .unwrap();
        db.set(created.record.id, column, literal).await;
        keys.push((created, *column, *literal, *expect));
    }

    for (created, column, literal, expect) in &keys {
        let what = format!("{column} = {literal}");
        let id = created.record.id;

        // The store, by id and by digest.
        let by_id = store.get(id).await;
        let by_digest = store.find_by_digest(&created.record.digest).await;
        for found in [by_id, by_digest] {
            match expect {
                Expect::Corrupt => {
                    let error = found.expect_err(&what);
                    assert_eq!(error.kind(), StoreErrorKind::Corrupt, "{what}: {error}");
                    assert!(error.to_string().contains(column), "{what}: {error}");
                }
                Expect::NeverExpires => {
                    let record = found.expect(&what).expect(&what);
                    assert_eq!(record.expires_at, None, "{what}");
                }
                Expect::Expired => {
                    let record = found.expect(&what).expect(&what);
                    assert!(record.expires_at.unwrap() < time::OffsetDateTime::UNIX_EPOCH);
                    assert!(record.expires_at.unwrap().year() >= 1900);
                }
                Expect::Readable => {
                    let record = found.expect(&what).expect(&what);
                    assert_eq!(record.created_at.year(), 1, "{what}");
                }
            }
        }

        // The request path.
        let auth = format!("Bearer {}", created.key.expose());
        let reply = get_with(&api, "/whoami", &[("authorization", auth.as_bytes())]).await;
        match expect {
            Expect::Corrupt => {
                assert_eq!(reply.status, 503, "{what}");
                assert_eq!(reply.code(), "store_unavailable", "{what}");
                assert!(reply.headers.contains_key("retry-after"), "{what}");
            }
            Expect::Expired => {
                assert_eq!(reply.status, 401, "{what}");
                assert_eq!(reply.code(), "expired_key", "{what}");
            }
            Expect::NeverExpires | Expect::Readable => {
                assert_eq!(reply.status, 200, "{what}: {}", reply.text())
            }
        }

        // The management API for that one key.
        let uri = format!("/admin/keys/{id}");
        let reply = get_with(&api, &uri, &[("authorization", admin_auth.as_bytes())]).await;
        if *expect == Expect::Corrupt {
            assert_eq!(reply.status, 503, "{what}");
            assert_eq!(reply.code(), "store_unavailable", "{what}");
        } else {
            assert_eq!(reply.status, 200, "{what}: {}", reply.text());
            if *expect == Expect::NeverExpires {
                assert!(reply.json()["expires_at"].is_null(), "{what}");
                assert_eq!(reply.json()["state"], "active", "{what}");
            }
        }
    }

    // A corrupt row is that row's problem: the store is not marked down for anyone else.
    for auth in [&admin_auth, &format!("Bearer {}", control.key.expose())] {
        let reply = get_with(&api, "/whoami", &[("authorization", auth.as_bytes())]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }

    let readable: BTreeSet<Uuid> = [admin.record.id, control.record.id]
        .into_iter()
        .chain(
            keys.iter()
                .filter(|k| k.3 != Expect::Corrupt)
                .map(|k| k.0.record.id),
        )
        .collect();

    // Listings skip corrupt rows, whole and page by page (the cursor walks past them).
    let page = store.list(&KeyQuery::new()).await.expect("list");
    assert_eq!(page.next_cursor, None);
    let listed: BTreeSet<Uuid> = page.items.iter().map(|r| r.id).collect();
    assert_eq!(listed, readable);
    for limit in [1, 2, 3] {
        let mut query = KeyQuery {
            limit,
            ..KeyQuery::new()
        };
        let mut seen = BTreeSet::new();
        let mut pages = 0;
        loop {
            let page = store.list(&query).await.expect("list a page");
            pages += 1;
            assert!(page.items.len() <= limit as usize);
            seen.extend(page.items.iter().map(|r| r.id));
            match page.next_cursor {
                Some(cursor) => query.after = Some(cursor),
                None => break,
            }
        }
        assert_eq!(seen, readable, "limit {limit}");
        assert!(pages >= (keys.len() + 2) / limit as usize, "limit {limit}");
    }

    let reply = get_with(
        &api,
        "/admin/keys",
        &[("authorization", admin_auth.as_bytes())],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let listed: BTreeSet<Uuid> = reply.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(listed, readable);

    // The state filters run in SQL: they must not trip over the same rows either.
    for state in ["active", "expired", "revoked", "disabled"] {
        let uri = format!("/admin/keys?state={state}");
        let reply = get_with(&api, &uri, &[("authorization", admin_auth.as_bytes())]).await;
        assert_eq!(reply.status, 200, "{state}: {}", reply.text());
    }

    db.close().await;
}

#[tokio::test]
async fn sqlite_odd_timestamps_never_panic_and_corrupt_only_their_row() {
    let path = std::env::temp_dir().join(format!(
        "keywarden-timestamps-{}.db",
        Uuid::now_v7().simple()
    ));
    let store = SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    check(Db::Sqlite(store, path), sqlite_cases()).await;
}

#[tokio::test]
async fn postgres_odd_timestamps_never_panic_and_corrupt_only_their_row() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = format!("kw_ts_{}", Uuid::now_v7().simple());
    let store = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    check(Db::Postgres(store, schema), postgres_cases()).await;
}
