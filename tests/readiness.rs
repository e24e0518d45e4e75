#![cfg(all(feature = "sqlite", feature = "postgres"))]
//! `KeyStore::check_ready` of the SQL stores: ready once migrated, a `Schema` error naming
//! the missing migrations otherwise, and an unreachable database is not ready (PostgreSQL
//! behind a proxy the test cuts).

use keywarden::store::StoreErrorKind;
use keywarden::{KeyStore, PostgresStore, SqliteStore};

mod support;

use support::{service_url, unique, url_addr, url_via, TcpProxy, TempDir};

#[tokio::test]
async fn sqlite_is_ready_only_with_every_migration() {
    let dir = TempDir::new("ready-sqlite");
    let store = SqliteStore::connect(&dir.db_url()).await.unwrap();
    store.check_ready().await.unwrap();

    // A database left by an older version: its newest migration is missing.
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let error = store.check_ready().await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Schema);
    assert!(
        error.to_string().contains("1 migration(s) not applied"),
        "{error}"
    );

    // A database keywarden never migrated.
    sqlx::query("DROP TABLE _sqlx_migrations")
        .execute(store.pool())
        .await
        .unwrap();
    let error = store.check_ready().await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Schema);
    assert!(error.to_string().contains("keywarden migrate"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_is_ready_only_when_reachable_and_migrated() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let proxy = TcpProxy::start(url_addr(&url)).await;
    let schema = unique("kw_ready");
    let store = PostgresStore::connect_with_schema(&url_via(&url, proxy.addr), &schema)
        .await
        .unwrap();
    store.check_ready().await.unwrap();

    proxy.cut();
    let error = tokio::time::timeout(std::time::Duration::from_secs(60), store.check_ready())
        .await
        .expect("check_ready hung on a cut connection")
        .unwrap_err();
    assert!(
        matches!(
            error.kind(),
            StoreErrorKind::Unavailable | StoreErrorKind::Timeout
        ),
        "{error}"
    );

    proxy.restore();
    let mut ready = false;
    for _ in 0..50 {
        if store.check_ready().await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "not ready after the database came back");

    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let error = store.check_ready().await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Schema, "{error}");

    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(store.pool())
        .await
        .unwrap();
}
