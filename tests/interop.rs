//! Payload CMS and Strapi keys verified from tables laid out like the peers' own (SQLite and
//! PostgreSQL), through the layer, with rows whose indexes are known answers computed
//! independently (Python's hmac/hashlib, cross-checked with Node's crypto).
#![cfg(all(feature = "interop", feature = "sqlite", feature = "postgres"))]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::{get, post};
use axum::{Json, Router};
use keywarden::store::ForeignSource;
use keywarden::{
    clock::ManualClock, interop::PayloadHash, interop::PayloadScheme, interop::PayloadStore,
    interop::PayloadTable, interop::StrapiScheme, interop::StrapiStore, interop::StrapiTables,
    manage::ManageErrorKind, store::ForeignDigest, store::KeyRecord, store::StoreErrorKind,
    ApiKeyLayer, Collection, KeyManager, NewKey, Principal, RequireScopeLayer, StoreError,
};
use support::{get_with, request, ring, send, CountingStore};
use time::OffsetDateTime;

// --- Payload -------------------------------------------------------------------------------

const PAYLOAD_SECRET: &str = "keywarden-payload-test-secret";
const PAYLOAD_PREVIOUS: &str = "previous-payload-secret";
/// A UUIDv4 key, as Payload's admin UI generates.
const UUID_KEY: &str = "0f8b4a7c-3d2e-4b1a-9c5d-6e7f8a9b0c1d";
/// Any string can be a Payload key (keywarden takes those of visible ASCII).
const ANY_KEY: &str = "any-string-key!";
/// HMAC-SHA1 of UUID_KEY under PAYLOAD_SECRET's derived secret (Payload 2.x–3.46 rows).
const UUID_SHA1: &str = "596fc9b22e006464366d4a95a53cd83f875972dc";
/// HMAC-SHA256 of ANY_KEY under PAYLOAD_SECRET's derived secret (Payload 3.47+ rows).
const ANY_SHA256: &str = "901313752bfd819b33789b84601961a4f752f2fa6efb8d4854497756c97d1a00";
/// A key indexed under PAYLOAD_PREVIOUS only (a rotated-out secret, Payload 4.0's keyring).
const KEYRING_KEY: &str = "keyring-only";
/// HMAC-SHA256 of KEYRING_KEY under PAYLOAD_PREVIOUS's derived secret.
const KEYRING_SHA256_PREVIOUS: &str =
    "aac4ea8531ba7045c4e846c4fb6cf83a538acda273d1dc6c770a345ae508c706";

fn payload_scheme() -> PayloadScheme {
    PayloadScheme::new(PAYLOAD_SECRET)
        .unwrap()
        .with_previous(PAYLOAD_PREVIOUS)
        .unwrap()
        .hash(PayloadHash::Both)
}

/// Index of a key under the current secret, computed by our own scheme (for rows whose exact
/// bits the known-answer rows above already pin down).
fn payload_index(key: &str) -> String {
    PayloadScheme::new(PAYLOAD_SECRET)
        .unwrap()
        .hash(PayloadHash::Sha256)
        .digests(key.as_bytes())[0]
        .as_str()
        .to_owned()
}

/// Payload users: (id, email, key index, enable_a_p_i_key, _verified).
/// (id, email, key index, enable_a_p_i_key, _verified)
type PayloadUser = (i64, &'static str, String, Option<bool>, Option<bool>);

fn payload_users() -> Vec<PayloadUser> {
    vec![
        (
            1,
            "sha1@example.com",
            UUID_SHA1.into(),
            Some(true),
            Some(true),
        ),
        (2, "sha256@example.com", ANY_SHA256.into(), Some(true), None),
        (
            3,
            "disabled@example.com",
            payload_index("disabled-key"),
            Some(false),
            Some(true),
        ),
        (
            4,
            "unverified@example.com",
            payload_index("unverified-key"),
            Some(true),
            Some(false),
        ),
        (
            5,
            "nullflag@example.com",
            payload_index("null-flag-key"),
            None,
            Some(true),
        ),
        (
            6,
            "old@example.com",
            KEYRING_SHA256_PREVIOUS.into(),
            Some(true),
            Some(true),
        ),
        (
            7,
            "twin-a@example.com",
            payload_index("twin-key"),
            Some(true),
            Some(true),
        ),
        (
            8,
            "twin-b@example.com",
            payload_index("twin-key"),
            Some(true),
            Some(true),
        ),
    ]
}

fn sql_bool(value: Option<bool>, sqlite: bool) -> &'static str {
    match (value, sqlite) {
        (None, _) => "NULL",
        (Some(true), true) => "1",
        (Some(false), true) => "0",
        (Some(true), false) => "true",
        (Some(false), false) => "false",
    }
}

/// The users table as Payload's drizzle adapters create it (snake_case columns).
fn payload_sql(sqlite: bool, table: &str) -> String {
    let mut sql = if sqlite {
        format!(
            "CREATE TABLE {table} (
               id integer PRIMARY KEY NOT NULL,
               role text,
               updated_at text DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) NOT NULL,
               created_at text DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) NOT NULL,
               enable_a_p_i_key integer,
               api_key text,
               api_key_index text,
               email text NOT NULL,
               reset_password_token text,
               reset_password_expiration text,
               salt text,
               hash text,
               _verified integer,
               _verificationtoken text,
               login_attempts numeric DEFAULT 0,
               lock_until text);
             CREATE UNIQUE INDEX users_email_idx ON {table} (email);"
        )
    } else {
        format!(
            "CREATE TYPE enum_users_role AS ENUM ('admin', 'editor');
             CREATE TABLE {table} (
               id serial PRIMARY KEY NOT NULL,
               role enum_users_role,
               updated_at timestamp(3) with time zone DEFAULT now() NOT NULL,
               created_at timestamp(3) with time zone DEFAULT now() NOT NULL,
               enable_a_p_i_key boolean,
               api_key varchar,
               api_key_index varchar,
               email varchar NOT NULL,
               reset_password_token varchar,
               reset_password_expiration timestamp(3) with time zone,
               salt varchar,
               hash varchar,
               _verified boolean,
               _verificationtoken varchar,
               login_attempts numeric DEFAULT 0,
               lock_until timestamp(3) with time zone);"
        )
    };
    for (id, email, index, enabled, verified) in payload_users() {
        sql.push_str(&format!(
            "INSERT INTO {table} (id, role, enable_a_p_i_key, api_key, api_key_index, email, salt, hash, _verified)
             VALUES ({id}, 'editor', {}, 'aabbccdd-encrypted-key', '{index}', '{email}', 'salt-{id}', 'hash-{id}', {});",
            sql_bool(enabled, sqlite),
            sql_bool(verified, sqlite),
        ));
    }
    sql
}

// --- Strapi --------------------------------------------------------------------------------

const STRAPI_SALT: &str = "keywarden-strapi-salt==";
const FULL: &str = "0123456789abcdef";
const FULL_ACCESS_KEY: &str = "1e848c3f08b2d4d77ba5df2789905ff304f6b66528c16865c11742cc26ed41d0\
                               c851bae5262b905fa75b86dd4b40a40325295e523f0061fbdecf6551dae0d4ba";
const READ: &str = "ffffffffffffffff";
const READ_ACCESS_KEY: &str = "87daa535d29e1e950fd5ac80ab5375a1714a448ba72fdc71dcc0f0fe011b2889\
                               dd30fc6b41c7a0a5153515b37f33ffc597aef18f75654e9a3097963bf835a4bd";

fn strapi_token(unit: &str) -> String {
    unit.repeat(256 / unit.len())
}

fn access_key(unit: &str) -> String {
    StrapiScheme::new(STRAPI_SALT)
        .unwrap()
        .digests(strapi_token(unit).as_bytes())[0]
        .as_str()
        .to_owned()
}

/// Tokens: (id, name, type, access key, expires in ms from now, kind).
/// (id, name, type, access key, expires in ms from now, kind)
type StrapiToken = (
    i64,
    &'static str,
    &'static str,
    String,
    Option<i64>,
    Option<&'static str>,
);

fn strapi_tokens() -> Vec<StrapiToken> {
    vec![
        (1, "full", "full-access", FULL_ACCESS_KEY.into(), None, None),
        (
            2,
            "read",
            "read-only",
            READ_ACCESS_KEY.into(),
            None,
            Some("content-api"),
        ),
        (
            3,
            "custom",
            "custom",
            access_key("a1"),
            None,
            Some("content-api"),
        ),
        (
            4,
            "expired",
            "full-access",
            access_key("b2"),
            Some(-3_600_000),
            None,
        ),
        (
            5,
            "admin",
            "full-access",
            access_key("c3"),
            None,
            Some("admin"),
        ),
        (
            6,
            "day",
            "full-access",
            access_key("d4"),
            Some(86_400_000),
            Some("content-api"),
        ),
        (7, "mystery", "god-mode", access_key("e5"), None, None),
    ]
}

/// Strapi 5's tables as knex creates them. SQLite keeps dates as integer milliseconds,
/// PostgreSQL as `timestamp(6)` without time zone.
fn strapi_sql(sqlite: bool, schema: &str) -> String {
    strapi_sql_of(sqlite, schema, 5)
}

/// Strapi `major`'s tables: 4 has the link table `…_token_links` and no `kind` column (nor
/// admin tokens in this table); 5 (5.45+) has `…_token_lnk` and `kind`.
fn strapi_sql_of(sqlite: bool, schema: &str, major: u8) -> String {
    let (links, kind_column) = if major == 4 {
        ("strapi_api_token_permissions_token_links", "")
    } else {
        (
            "strapi_api_token_permissions_token_lnk",
            ", kind varchar(255)",
        )
    };
    let (serial, datetime) = if sqlite {
        ("integer PRIMARY KEY AUTOINCREMENT NOT NULL", "datetime")
    } else {
        ("serial PRIMARY KEY NOT NULL", "timestamp(6)")
    };
    let mut sql = format!(
        "CREATE TABLE {schema}strapi_api_tokens (id {serial}, document_id varchar(255),
           name varchar(255), description varchar(255), type varchar(255),
           access_key varchar(255), encrypted_key text, last_used_at {datetime},
           expires_at {datetime}, lifespan bigint, created_at {datetime}, updated_at {datetime},
           published_at {datetime}, created_by_id integer, updated_by_id integer,
           locale varchar(255){kind_column});
         CREATE TABLE {schema}strapi_api_token_permissions (id {serial}, document_id varchar(255),
           action varchar(255), created_at {datetime}, updated_at {datetime});
         CREATE TABLE {schema}{links} (id {serial},
           api_token_permission_id integer, api_token_id integer,
           api_token_permission_ord double precision);"
    );
    let now_ms = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let date = |ms: i128| {
        if sqlite {
            ms.to_string()
        } else {
            format!("(to_timestamp({ms} / 1000.0) AT TIME ZONE 'UTC')")
        }
    };
    for (id, name, kind_of, key, expires, kind) in strapi_tokens() {
        if major == 4 && kind.is_some_and(|k| k != "content-api") {
            continue;
        }
        let expires = expires.map_or("NULL".to_owned(), |d| date(now_ms + i128::from(d)));
        let (kind_name, kind) = if major == 4 {
            ("", String::new())
        } else {
            (
                ", kind",
                format!(", {}", kind.map_or("NULL".to_owned(), |k| format!("'{k}'"))),
            )
        };
        sql.push_str(&format!(
            "INSERT INTO {schema}strapi_api_tokens (id, document_id, name, description, type,
               access_key, encrypted_key, expires_at, created_at, updated_at{kind_name})
             VALUES ({id}, 'doc{id}', '{name}', '', '{kind_of}', '{key}', 'v1:sealed', {expires},
               {now}, {now}{kind});",
            now = date(now_ms),
        ));
    }
    for (id, action) in [
        (1, "api::article.article.find"),
        (2, "api::article.article.findOne"),
    ] {
        sql.push_str(&format!(
            "INSERT INTO {schema}strapi_api_token_permissions (id, action) VALUES ({id}, '{action}');
             INSERT INTO {schema}{links}
               (api_token_permission_id, api_token_id, api_token_permission_ord) VALUES ({id}, 3, {id});"
        ));
    }
    sql
}

// --- Databases -----------------------------------------------------------------------------

/// A SQLite file seeded with `sql`, removed on drop.
struct SqliteFile(std::path::PathBuf);

impl SqliteFile {
    async fn create(sql: &str) -> Self {
        let path = std::env::temp_dir().join(format!("kw-interop-{}.db", uuid::Uuid::now_v7()));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        pool.close().await;
        Self(path)
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.0.display())
    }

    /// Every row of `table`, to show nothing was written.
    async fn dump(&self, table: &str) -> String {
        let pool = sqlx::SqlitePool::connect(&self.url()).await.unwrap();
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT json_object('row', json_array(*)) FROM (SELECT * FROM {table} ORDER BY id)"
        ))
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|_| Vec::new());
        pool.close().await;
        rows.join("\n")
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

/// A PostgreSQL schema of its own, seeded by `seed(schema)`; `None` without the service.
async fn pg_schema(seed: impl Fn(&str) -> String) -> Option<(String, String, sqlx::PgPool)> {
    let url = support::service_url("KEYWARDEN_TEST_POSTGRES_URL")?;
    let schema = format!(
        "kw_interop_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA {schema}; SET search_path TO {schema}; {}",
        seed(&schema)
    ))
    .execute(&pool)
    .await
    .unwrap();
    Some((url, schema, pool))
}

async fn drop_schema(pool: &sqlx::PgPool, schema: &str) {
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pool)
        .await
        .unwrap();
    pool.close().await;
}

// --- A foreign store that counts lookups ------------------------------------------------

#[derive(Debug)]
struct Counting<S> {
    inner: S,
    lookups: AtomicUsize,
}

#[async_trait::async_trait]
impl<S: ForeignSource> ForeignSource for Counting<S> {
    async fn find(&self, digests: &[ForeignDigest]) -> Result<Option<KeyRecord>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.find(digests).await
    }
}

// --- Payload tests -------------------------------------------------------------------------

struct PayloadRig {
    layer: ApiKeyLayer,
    native: Arc<CountingStore>,
    foreign: Arc<Counting<PayloadStore>>,
    app: Router,
}

fn payload_rig(store: PayloadStore) -> PayloadRig {
    let native = Arc::new(CountingStore::default());
    let foreign = Arc::new(Counting {
        inner: store,
        lookups: AtomicUsize::new(0),
    });
    let layer = ApiKeyLayer::builder()
        .store(native.clone())
        .secrets(ring())
        .collection(Collection::new("services"))
        .collection(Collection::foreign(
            "users",
            payload_scheme(),
            foreign.clone(),
        ))
        .build()
        .unwrap();
    let app = support::app().layer(layer.clone());
    PayloadRig {
        layer,
        native,
        foreign,
        app,
    }
}

fn payload_auth(key: &str) -> String {
    format!("users API-Key {key}")
}

async fn payload_suite(rig: &PayloadRig) {
    let app = &rig.app;
    // A Payload 2.x/3.0–3.46 row (HMAC-SHA1 index) and a 3.47+ row (HMAC-SHA256).
    let reply = get_with(
        app,
        "/whoami",
        &[("authorization", payload_auth(UUID_KEY).as_bytes())],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let who = reply.json();
    assert_eq!(who["subject"], "1");
    assert_eq!(who["collection"], "users");
    assert_eq!(who["environment"], "payload");
    assert_eq!(who["owner_kind"], "user");
    assert_eq!(who["key_name"], "sha1@example.com");
    assert_eq!(who["metadata"]["role"], "editor");
    for secret in ["api_key", "api_key_index", "hash", "salt"] {
        assert!(who["metadata"].get(secret).is_none(), "{secret} leaked");
    }
    assert!(!reply.text().contains("encrypted-key") && !reply.text().contains(UUID_SHA1));

    let reply = get_with(
        app,
        "/whoami",
        &[("authorization", payload_auth(ANY_KEY).as_bytes())],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["subject"], "2");
    // Writes are fine: Payload keys are not read-only.
    let reply = send(
        app,
        request(
            "POST",
            "/write",
            &[("authorization", payload_auth(ANY_KEY).as_bytes())],
        ),
    )
    .await;
    assert_eq!(reply.status, 200);

    // Keyring: a row indexed under the previous secret still verifies (and is not rewritten).
    let reply = get_with(
        app,
        "/whoami",
        &[("authorization", payload_auth(KEYRING_KEY).as_bytes())],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["subject"], "6");

    // enable_a_p_i_key false or null, and _verified false, never authenticate.
    for key in ["disabled-key", "null-flag-key", "unverified-key"] {
        let reply = get_with(
            app,
            "/whoami",
            &[("authorization", payload_auth(key).as_bytes())],
        )
        .await;
        assert_eq!(reply.status, 401, "{key}");
        assert_eq!(reply.code(), "revoked_key", "{key}");
    }
    // Two users with one index: refused.
    let reply = get_with(
        app,
        "/whoami",
        &[("authorization", payload_auth("twin-key").as_bytes())],
    )
    .await;
    assert_eq!(reply.code(), "invalid_key");
    // Unknown keys.
    let reply = get_with(
        app,
        "/whoami",
        &[("authorization", payload_auth("no-such-key").as_bytes())],
    )
    .await;
    assert_eq!(reply.code(), "invalid_key");

    // Payload's prefix is matched case-sensitively and exactly: other spellings are not
    // credentials at all (Payload ignores them too).
    for value in [
        format!("users api-key {UUID_KEY}"),
        format!("users API-KEY {UUID_KEY}"),
        format!("users  API-Key {UUID_KEY}"),
    ] {
        let reply = get_with(app, "/whoami", &[("authorization", value.as_bytes())]).await;
        assert_eq!(reply.code(), "missing_credentials", "{value}");
    }
    // The rest of the value is the key: an extra space makes a key Payload would not find.
    let reply = get_with(
        app,
        "/whoami",
        &[(
            "authorization",
            format!("users API-Key  {UUID_KEY}").as_bytes(),
        )],
    )
    .await;
    assert_eq!(reply.status, 401);
    // A Payload key is not accepted for another collection.
    let reply = get_with(
        app,
        "/whoami",
        &[(
            "authorization",
            format!("services API-Key {UUID_KEY}").as_bytes(),
        )],
    )
    .await;
    assert_eq!(
        reply.code(),
        "malformed_key",
        "`services` takes only keywarden keys"
    );
    // Payload keys holding whitespace are not supported (keys are visible ASCII): refused.
    let reply = get_with(
        app,
        "/whoami",
        &[("authorization", b"users API-Key my secret key")],
    )
    .await;
    assert_eq!(reply.code(), "malformed_key");
    // keywarden's other forms work for foreign keys too.
    let reply = get_with(app, "/whoami", &[("x-api-key", UUID_KEY.as_bytes())]).await;
    assert_eq!(reply.status, 200);
}

async fn payload_caching_and_read_only(rig: &PayloadRig) {
    let app = &rig.app;
    let before = rig.foreign.lookups.load(Ordering::SeqCst);
    // The hit path: cached, found and not-found alike.
    for _ in 0..3 {
        get_with(
            app,
            "/whoami",
            &[("authorization", payload_auth(UUID_KEY).as_bytes())],
        )
        .await;
        get_with(
            app,
            "/whoami",
            &[("authorization", payload_auth("no-such-key").as_bytes())],
        )
        .await;
    }
    assert_eq!(
        rig.foreign.lookups.load(Ordering::SeqCst),
        before,
        "served from the cache"
    );
    // Concurrent misses share one query.
    let key = payload_auth(ANY_KEY);
    rig.layer.invalidate_all();
    let before = rig.foreign.lookups.load(Ordering::SeqCst);
    let replies = futures_join(app, &key, 16).await;
    assert!(replies.iter().all(|s| *s == 200));
    assert_eq!(rig.foreign.lookups.load(Ordering::SeqCst), before + 1);

    // No usage write-behind into any store for foreign keys.
    rig.layer.flush_usage().await.unwrap();
    assert_eq!(rig.native.usage_writes(), 0);

    // Key management refuses foreign collections and foreign stores.
    let manager = KeyManager::for_layer(&rig.layer);
    let err = manager
        .create(NewKey::new("x", "1").collection("users"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ManageErrorKind::ReadOnly);
    assert!(err.to_string().contains("payload"), "{err}");
    manager
        .create(NewKey::new("svc", "s").collection("services"))
        .await
        .unwrap();
    // A foreign source is not a `KeyStore`: a `KeyManager` over one does not compile.
}

async fn futures_join(app: &Router, authorization: &str, n: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let app = app.clone();
            let value = authorization.to_owned();
            tokio::spawn(async move {
                get_with(&app, "/whoami", &[("authorization", value.as_bytes())])
                    .await
                    .status
                    .as_u16()
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn payload_table(table: &str) -> PayloadTable {
    PayloadTable::new(table).verify(true)
}

#[tokio::test]
async fn payload_keys_from_a_sqlite_database() {
    let db = SqliteFile::create(&payload_sql(true, "users")).await;
    let before = db.dump("users").await;
    let store = PayloadStore::connect(&db.url(), payload_table("users"))
        .await
        .unwrap();
    let rig = payload_rig(store);
    payload_suite(&rig).await;
    payload_caching_and_read_only(&rig).await;
    assert_eq!(
        db.dump("users").await,
        before,
        "the Payload table is unchanged"
    );
    assert!(!before.is_empty());
}

#[tokio::test]
async fn payload_keys_from_a_postgres_database() {
    let Some((url, schema, pool)) = pg_schema(|_| payload_sql(false, "users")).await else {
        return;
    };
    let table = format!("{schema}.users");
    let store = PayloadStore::connect(&url, payload_table(&table))
        .await
        .unwrap();
    let rig = payload_rig(store);
    payload_suite(&rig).await;
    payload_caching_and_read_only(&rig).await;
    // Key ids are stable per user, so a layer can drop one user's cached keys.
    let probe = PayloadStore::connect(&url, payload_table(&table))
        .await
        .unwrap();
    let principal = rig
        .layer
        .verify(UUID_KEY, &http::Method::GET)
        .await
        .unwrap();
    assert_eq!(principal.key_id(), probe.key_id("1"));
    assert_ne!(principal.key_id(), probe.key_id("2"));
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn payload_sha1_only_and_sha256_only_deployments() {
    let db = SqliteFile::create(&payload_sql(true, "users")).await;
    let url = db.url();
    let layer = |hash: PayloadHash| {
        let url = url.clone();
        async move {
            let store = PayloadStore::connect(&url, payload_table("users"))
                .await
                .unwrap();
            ApiKeyLayer::builder()
                .collection(Collection::foreign(
                    "users",
                    PayloadScheme::new(PAYLOAD_SECRET).unwrap().hash(hash),
                    Arc::new(store),
                ))
                .build()
                .unwrap()
        }
    };
    let get = http::Method::GET;
    let sha1 = layer(PayloadHash::Sha1).await;
    assert!(sha1.verify(UUID_KEY, &get).await.is_ok());
    assert!(sha1.verify(ANY_KEY, &get).await.is_err());
    let sha256 = layer(PayloadHash::Sha256).await;
    assert!(
        sha256.verify(UUID_KEY, &get).await.is_err(),
        "4.0 drops SHA-1 lookups"
    );
    assert_eq!(sha256.verify(ANY_KEY, &get).await.unwrap().subject(), "2");
    // Without the previous secret, the rotated row is not found.
    assert!(sha256.verify(KEYRING_KEY, &get).await.is_err());
}

#[tokio::test]
async fn layers_with_only_foreign_collections_need_no_store_or_secret() {
    let db = SqliteFile::create(&payload_sql(true, "users")).await;
    let store = PayloadStore::connect(&db.url(), payload_table("users"))
        .await
        .unwrap();
    let layer = ApiKeyLayer::builder()
        .collection(Collection::foreign(
            "users",
            payload_scheme(),
            Arc::new(store),
        ))
        .build()
        .unwrap();
    assert!(layer.store().is_read_only());
    let principal = layer.verify(ANY_KEY, &http::Method::GET).await.unwrap();
    assert_eq!(principal.subject(), "2");
    let err = KeyManager::for_layer(&layer)
        .create(NewKey::new("x", "1").collection("users"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ManageErrorKind::ReadOnly);
    // A native collection still needs both.
    let err = ApiKeyLayer::builder()
        .collection(Collection::new("services"))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), keywarden::layer::BuildErrorKind::MissingStore);
}

#[tokio::test]
async fn misconfigured_tables_fail_clearly() {
    let db = SqliteFile::create(&payload_sql(true, "users")).await;
    let err = PayloadStore::connect(&db.url(), PayloadTable::new("users; DROP TABLE users"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema);
    // A table that does not exist fails at connect, named, not on every request.
    let err = PayloadStore::connect(&db.url(), PayloadTable::new("members"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema);
    assert!(err.to_string().contains("`members`"), "{err}");
    // The table read at connect is the one queried: a table dropped later is store_unavailable
    // at request time, never a panic or a pass.
    let store = PayloadStore::connect(&db.url(), payload_table("users"))
        .await
        .unwrap();
    let writer = sqlx::SqlitePool::connect(&db.url()).await.unwrap();
    sqlx::raw_sql("DROP TABLE users")
        .execute(&writer)
        .await
        .unwrap();
    writer.close().await;
    let layer = ApiKeyLayer::builder()
        .collection(store.into_collection(payload_scheme()))
        .build()
        .unwrap();
    let err = layer
        .verify(UUID_KEY, &http::Method::GET)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), keywarden::RejectionKind::StoreUnavailable);
}

/// A Payload 4.0 auth collection's table (slug `api-keys`): no `enable_a_p_i_key` (4.0 can leave out
/// the field) and an `api_key_last4`. Row 2's key was removed, so its index is null.
fn payload4_sql(sqlite: bool, table: &str) -> String {
    let (id, text, time) = if sqlite {
        ("integer PRIMARY KEY NOT NULL", "text", "text")
    } else {
        (
            "serial PRIMARY KEY NOT NULL",
            "varchar",
            "timestamp(3) with time zone",
        )
    };
    format!(
        "CREATE TABLE {table} (id {id}, updated_at {time}, created_at {time},
           email {text} NOT NULL, api_key {text}, api_key_index {text}, api_key_last4 {text},
           salt {text}, hash {text});
         INSERT INTO {table} (id, email, api_key, api_key_index, api_key_last4)
           VALUES (1, 'ada@example.com', 'sealed', '{index}', '0c1d'),
                  (2, 'bob@example.com', NULL, NULL, NULL);",
        index = payload_index(UUID_KEY),
    )
}

/// What a user of Payload 4.0 writes: the slug once, nothing about the flag column.
async fn payload4_suite(store: PayloadStore) {
    assert_eq!(store.enabled_column(), None, "no flag column was found");
    let scheme = PayloadScheme::new(PAYLOAD_SECRET)
        .unwrap()
        .hash(PayloadHash::Sha256);
    let layer = ApiKeyLayer::builder()
        .collection(store.into_collection(scheme))
        .build()
        .unwrap();
    let app = support::app().layer(layer);
    let reply = get_with(
        &app,
        "/whoami",
        &[(
            "authorization",
            format!("api-keys API-Key {UUID_KEY}").as_bytes(),
        )],
    )
    .await;
    assert_eq!(reply.status, 200, "a valid 4.0 key: {}", reply.text());
    assert_eq!(reply.json()["subject"], "1");
    assert_eq!(reply.json()["key_name"], "ada@example.com");
    assert_eq!(reply.json()["metadata"]["api_key_last4"], "0c1d");
    // The table name is not the slug: `api_keys API-Key …` is no credential here.
    let reply = get_with(
        &app,
        "/whoami",
        &[(
            "authorization",
            format!("api_keys API-Key {UUID_KEY}").as_bytes(),
        )],
    )
    .await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    // A key that is not indexed (removed: index null) is unknown, not "disabled".
    let reply = get_with(
        &app,
        "/whoami",
        &[(
            "authorization",
            format!("api-keys API-Key {ANY_KEY}").as_bytes(),
        )],
    )
    .await;
    assert_eq!(reply.status, 401);
    assert!(reply.text().contains("invalid_key"), "{}", reply.text());
}

/// Columns named explicitly but missing fail at connect, naming table and column.
async fn payload4_misconfigurations(url: &str, table: impl Fn() -> PayloadTable) {
    for (config, column) in [
        (
            table().enabled_column(Some("enable_a_p_i_key")),
            "enable_a_p_i_key",
        ),
        (table().verify(true), "_verified"),
        (table().name_column("username"), "username"),
        (table().hide_column("notes"), "notes"),
        (table().index_column("api_key_hash"), "api_key_hash"),
    ] {
        let err = PayloadStore::connect(url, config).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");
        let message = err.to_string();
        assert!(
            message.contains("api_keys`") && message.contains(&format!("`{column}`")),
            "{message}"
        );
    }
    // Turning the flag off explicitly is fine.
    let store = PayloadStore::connect(url, table().enabled_column(None))
        .await
        .unwrap();
    assert_eq!(store.enabled_column(), None);
}

#[tokio::test]
async fn payload_4_tables_without_the_flag_from_sqlite() {
    let db = SqliteFile::create(&payload4_sql(true, "api_keys")).await;
    let store = PayloadStore::connect(&db.url(), PayloadTable::from_slug("api-keys"))
        .await
        .unwrap();
    payload4_suite(store).await;
    payload4_misconfigurations(&db.url(), || PayloadTable::from_slug("api-keys")).await;
    // A table with the flag still reads it, detected the same way.
    let db = SqliteFile::create(&payload_sql(true, "users")).await;
    let store = PayloadStore::connect(&db.url(), PayloadTable::from_slug("users"))
        .await
        .unwrap();
    assert_eq!(store.enabled_column(), Some("enable_a_p_i_key"));
}

#[tokio::test]
async fn payload_4_tables_without_the_flag_from_postgres() {
    let Some((url, schema, pool)) = pg_schema(|_| payload4_sql(false, "api_keys")).await else {
        return;
    };
    // `@payloadcms/db-postgres`'s `schemaName`: the slug's table in that schema.
    let table = || PayloadTable::from_slug("api-keys").schema(&schema);
    let store = PayloadStore::connect(&url, table()).await.unwrap();
    payload4_suite(store).await;
    payload4_misconfigurations(&url, table).await;
    // Outside the connection's search_path, an unqualified name is no table: said at connect.
    let err = PayloadStore::connect(&url, PayloadTable::from_slug("api-keys"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema);
    assert!(
        err.to_string().contains("`api_keys` does not exist"),
        "{err}"
    );
    // Over a pool whose search_path has the schema, the unqualified name resolves there, and
    // the columns are read from that schema's table.
    let store_pool = sqlx::postgres::PgPoolOptions::new()
        .after_connect({
            let schema = schema.clone();
            move |conn, _| {
                let schema = schema.clone();
                Box::pin(async move {
                    sqlx::Executor::execute(
                        &mut *conn,
                        format!("SET search_path TO {schema}").as_str(),
                    )
                    .await?;
                    Ok(())
                })
            }
        })
        .connect(&url)
        .await
        .unwrap();
    let store = PayloadStore::postgres(store_pool.clone(), PayloadTable::from_slug("api-keys"))
        .await
        .unwrap();
    payload4_suite(store).await;
    store_pool.close().await;
    drop_schema(&pool, &schema).await;
}

/// Payload 4.0's keyring (`PAYLOAD_SECRET` + `previousSecrets`; 4.0.0-canary.14's
/// `auth/strategies/apiKey.ts` looks the key up under every keyring secret's index,
/// `auth/crypto.ts` derives each as 2.x–3.x did). Indexes computed independently, with Python's
/// `hmac`/`hashlib` and Node's `crypto`:
///   d = sha256(secret).hexdigest()[:32]; hmac(d.encode(), key.encode(), sha256).hexdigest()
const KEYRING_NEW: &str = "payload-4-new-secret";
const KEYRING_OLD: &str = "payload-4-old-secret";
const OLD_KEY: &str = "written-under-the-old-secret";
const OLD_KEY_INDEX_OLD_SECRET: &str =
    "15440b9bd0f0963cba9a94d2a4d5fec255e40a61df0c8fcb21339ee5adaab465";
const NEW_KEY: &str = "written-under-the-new-secret";
const NEW_KEY_INDEX_NEW_SECRET: &str =
    "ca61e3fa96b2aff17e05a8a28e12197dc4a7e8a63eea75b8247b6cf216c2e58e";

#[tokio::test]
async fn payload_4_keyring_reads_keys_written_under_a_previous_secret() {
    let db = SqliteFile::create(&format!(
        "CREATE TABLE users (id integer PRIMARY KEY NOT NULL, email text NOT NULL,
           api_key text, api_key_index text, api_key_last4 text);
         INSERT INTO users (id, email, api_key, api_key_index) VALUES
           (1, 'old@example.com', 'v1:sealed', '{OLD_KEY_INDEX_OLD_SECRET}'),
           (2, 'new@example.com', 'v1:sealed', '{NEW_KEY_INDEX_NEW_SECRET}');"
    ))
    .await;
    let layer = |scheme: PayloadScheme| {
        let url = db.url();
        async move {
            let store = PayloadStore::connect(&url, PayloadTable::from_slug("users"))
                .await
                .unwrap();
            ApiKeyLayer::builder()
                .collection(store.into_collection(scheme.hash(PayloadHash::Sha256)))
                .build()
                .unwrap()
        }
    };
    let get = http::Method::GET;
    // The new secret with the old one as a previous secret: both keys, as Payload 4.0.
    let ring = layer(
        PayloadScheme::new(KEYRING_NEW)
            .unwrap()
            .with_previous(KEYRING_OLD)
            .unwrap(),
    )
    .await;
    assert_eq!(ring.verify(OLD_KEY, &get).await.unwrap().subject(), "1");
    assert_eq!(ring.verify(NEW_KEY, &get).await.unwrap().subject(), "2");
    // Without it, the old key is unknown (Payload: no user), not disabled.
    let new_only = layer(PayloadScheme::new(KEYRING_NEW).unwrap()).await;
    assert_eq!(
        new_only.verify(OLD_KEY, &get).await.unwrap_err().kind(),
        keywarden::RejectionKind::InvalidKey
    );
    assert_eq!(new_only.verify(NEW_KEY, &get).await.unwrap().subject(), "2");
    // Under the old secret alone, the other way round.
    let old_only = layer(PayloadScheme::new(KEYRING_OLD).unwrap()).await;
    assert_eq!(old_only.verify(OLD_KEY, &get).await.unwrap().subject(), "1");
    assert_eq!(
        old_only.verify(NEW_KEY, &get).await.unwrap_err().kind(),
        keywarden::RejectionKind::InvalidKey
    );
}

#[tokio::test]
async fn payload_flag_column_in_another_schema_is_not_mistaken() {
    // Two tables of one name: the 3.x one (with the flag) in `public`-like schema A, the 4.0
    // one in schema B. The columns must be read from the table the queries will hit.
    let Some((url, schema, pool)) = pg_schema(|s| {
        format!(
            "{} CREATE SCHEMA {s}_v3; {}",
            payload4_sql(false, "api_keys"),
            payload_sql(false, &format!("{s}_v3.api_keys"))
                .replace(
                    "CREATE TYPE enum_users_role",
                    &format!("CREATE TYPE {s}_v3.enum_users_role")
                )
                .replace(
                    "role enum_users_role",
                    &format!("role {s}_v3.enum_users_role")
                )
        )
    })
    .await
    else {
        return;
    };
    let v4 = PayloadStore::connect(&url, PayloadTable::from_slug("api-keys").schema(&schema))
        .await
        .unwrap();
    assert_eq!(v4.enabled_column(), None);
    let v3 = PayloadStore::connect(
        &url,
        PayloadTable::from_slug("api-keys").schema(&format!("{schema}_v3")),
    )
    .await
    .unwrap();
    assert_eq!(v3.enabled_column(), Some("enable_a_p_i_key"));
    sqlx::raw_sql(&format!("DROP SCHEMA {schema}_v3 CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
    drop_schema(&pool, &schema).await;
}

// --- Strapi tests --------------------------------------------------------------------------

fn strapi_app(layer: &ApiKeyLayer) -> Router {
    Router::new()
        .route("/whoami", get(|p: Principal| async move { Json(p) }))
        .route("/write", post(|p: Principal| async move { Json(p) }))
        .route(
            "/articles",
            get(|p: Principal| async move { Json(p) })
                .route_layer(RequireScopeLayer::new("api::article.article.find")),
        )
        .route(
            "/articles/publish",
            post(|p: Principal| async move { Json(p) })
                .route_layer(RequireScopeLayer::new("api::article.article.publish")),
        )
        .route(
            "/maybe",
            get(|p: Option<Principal>| async move {
                p.map_or("anonymous".to_owned(), |p| p.subject().to_owned())
            }),
        )
        .layer(layer.clone())
}

fn strapi_layer(store: StrapiStore, clock: &ManualClock, optional: bool) -> ApiKeyLayer {
    let builder = ApiKeyLayer::builder()
        .clock(Arc::new(clock.clone()))
        .collection(Collection::foreign(
            "strapi",
            StrapiScheme::new(STRAPI_SALT).unwrap(),
            Arc::new(store),
        ));
    if optional {
        builder.optional()
    } else {
        builder
    }
    .build()
    .unwrap()
}

fn bearer(unit: &str) -> String {
    format!("Bearer {}", strapi_token(unit))
}

async fn strapi_suite(store: impl Fn() -> StrapiStore) {
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let layer = strapi_layer(store(), &clock, false);
    let app = strapi_app(&layer);
    let auth = |unit: &str| bearer(unit);

    // full-access: everything.
    let reply = get_with(&app, "/whoami", &[("authorization", auth(FULL).as_bytes())]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let who = reply.json();
    assert_eq!(who["subject"], "1");
    assert_eq!(who["key_name"], "full");
    assert_eq!(who["environment"], "strapi");
    assert_eq!(who["owner_kind"], "service");
    assert_eq!(who["collection"], "strapi");
    assert_eq!(who["metadata"]["document_id"], "doc1");
    assert!(
        who["metadata"].get("access_key").is_none()
            && who["metadata"].get("encrypted_key").is_none()
    );
    assert!(!reply.text().contains(FULL_ACCESS_KEY) && !reply.text().contains("sealed"));
    let reply = send(
        &app,
        request(
            "POST",
            "/articles/publish",
            &[("authorization", auth(FULL).as_bytes())],
        ),
    )
    .await;
    assert_eq!(reply.status, 200);

    // read-only: safe methods only.
    let reply = get_with(
        &app,
        "/articles",
        &[("authorization", auth(READ).as_bytes())],
    )
    .await;
    assert_eq!(reply.status, 200);
    let reply = send(
        &app,
        request(
            "POST",
            "/write",
            &[("authorization", auth(READ).as_bytes())],
        ),
    )
    .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.code(), "insufficient_scope");

    // custom: its permissions, as scopes.
    let reply = get_with(
        &app,
        "/articles",
        &[("authorization", auth("a1").as_bytes())],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["scopes"],
        serde_json::json!(["api::article.article.find", "api::article.article.findOne"])
    );
    let reply = send(
        &app,
        request(
            "POST",
            "/articles/publish",
            &[("authorization", auth("a1").as_bytes())],
        ),
    )
    .await;
    assert_eq!(reply.code(), "insufficient_scope");

    // expires_at in the past; admin tokens; unknown types; unknown tokens.
    let reply = get_with(&app, "/whoami", &[("authorization", auth("b2").as_bytes())]).await;
    assert_eq!(reply.code(), "expired_key");
    let reply = get_with(&app, "/whoami", &[("authorization", auth("c3").as_bytes())]).await;
    assert_eq!(
        reply.code(),
        "invalid_key",
        "admin tokens are not content-API tokens"
    );
    let reply = get_with(&app, "/whoami", &[("authorization", auth("e5").as_bytes())]).await;
    assert_eq!(reply.code(), "revoked_key", "unknown types fail closed");
    let reply = get_with(&app, "/whoami", &[("authorization", auth("99").as_bytes())]).await;
    assert_eq!(reply.code(), "invalid_key");

    // Expiry is judged at request time, not at cache time.
    let reply = get_with(&app, "/whoami", &[("authorization", auth("d4").as_bytes())]).await;
    assert_eq!(reply.status, 200);
    clock.advance(time::Duration::days(2));
    let reply = get_with(&app, "/whoami", &[("authorization", auth("d4").as_bytes())]).await;
    assert_eq!(reply.code(), "expired_key");

    // Header parity with Strapi's extractToken: `bearer` any case, split on whitespace,
    // exactly two parts.
    let token = strapi_token(FULL);
    for (value, ok) in [
        (format!("bearer {token}"), true),
        (format!("BEARER {token}"), true),
        (format!("Bearer   {token}"), true),
        (format!("Bearer {token} extra"), false),
        (format!("Bearer {token}x"), false),
        (format!("Token {token}"), false),
        ("Bearer".to_owned(), false),
    ] {
        let reply = get_with(&app, "/whoami", &[("authorization", value.as_bytes())]).await;
        assert_eq!(reply.status == 200, ok, "{value}: {}", reply.text());
    }

    // Optional mode: Strapi-shaped Bearer tokens are ours, JWTs are left to another layer.
    let optional = strapi_app(&strapi_layer(store(), &clock, true));
    let reply = get_with(
        &optional,
        "/maybe",
        &[("authorization", auth(FULL).as_bytes())],
    )
    .await;
    assert_eq!(reply.text(), "1");
    let reply = get_with(
        &optional,
        "/maybe",
        &[("authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig")],
    )
    .await;
    assert_eq!(reply.text(), "anonymous");
    let reply = get_with(
        &optional,
        "/maybe",
        &[("authorization", auth("99").as_bytes())],
    )
    .await;
    assert_eq!(
        reply.code(),
        "invalid_key",
        "a Strapi-shaped token that is not found is rejected"
    );
}

#[tokio::test]
async fn strapi_tokens_from_a_sqlite_database() {
    let db = SqliteFile::create(&strapi_sql(true, "")).await;
    let before = db.dump("strapi_api_tokens").await;
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            db.url()
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .unwrap()
                .read_only(true),
        )
        .await
        .unwrap();
    let store = StrapiStore::sqlite(pool.clone(), StrapiTables::new())
        .await
        .unwrap();
    assert_eq!(
        store.links_table(),
        "strapi_api_token_permissions_token_lnk"
    );
    assert_eq!(store.kind_column(), Some("kind"));
    strapi_suite(|| store.clone()).await;
    assert_eq!(db.dump("strapi_api_tokens").await, before);
}

#[tokio::test]
async fn strapi_tokens_from_a_postgres_database() {
    let Some((url, schema, pool)) = pg_schema(|_| strapi_sql(false, "")).await else {
        return;
    };
    let store_pool = sqlx::postgres::PgPoolOptions::new()
        .after_connect({
            let schema = schema.clone();
            move |conn, _| {
                let schema = schema.clone();
                Box::pin(async move {
                    sqlx::Executor::execute(
                        &mut *conn,
                        format!("SET search_path TO {schema}").as_str(),
                    )
                    .await?;
                    Ok(())
                })
            }
        })
        .connect(&url)
        .await
        .unwrap();
    let store = StrapiStore::postgres(store_pool.clone(), StrapiTables::new())
        .await
        .unwrap();
    assert_eq!(
        store.links_table(),
        "strapi_api_token_permissions_token_lnk"
    );
    strapi_suite(|| store.clone()).await;
    // A schema-qualified tokens table: the permission tables are found beside it, and
    // `connect` (read-only transactions) works too.
    let qualified = StrapiTables::new().tokens(format!("{schema}.strapi_api_tokens"));
    let store = StrapiStore::connect(&url, qualified).await.unwrap();
    assert_eq!(
        store.links_table(),
        format!("{schema}.strapi_api_token_permissions_token_lnk")
    );
    let layer = strapi_layer(store, &ManualClock::new(OffsetDateTime::now_utc()), false);
    let principal = layer
        .verify(&strapi_token("a1"), &http::Method::GET)
        .await
        .unwrap();
    assert_eq!(principal.scopes().len(), 2);
    store_pool.close().await;
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn strapi_tokens_through_a_real_server() {
    let db = SqliteFile::create(&strapi_sql(true, "")).await;
    let store = StrapiStore::connect(&db.url(), StrapiTables::new())
        .await
        .unwrap();
    let layer = strapi_layer(store, &ManualClock::new(OffsetDateTime::now_utc()), false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = strapi_app(&layer);
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/whoami");
    let ok = client
        .get(&url)
        .header("authorization", bearer(READ))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let who: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(who["key_name"], "read");
    assert_eq!(who["read_only"], true);
    let denied = client
        .post(format!("http://{addr}/write"))
        .header("authorization", bearer(READ))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    let expired = client
        .get(&url)
        .header("authorization", bearer("b2"))
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), 401);
    let body = expired.text().await.unwrap();
    assert!(
        body.contains("expired_key") && !body.contains(&strapi_token("b2")),
        "{body}"
    );
    server.abort();
}

#[tokio::test]
async fn strapi_4_is_detected() {
    let db = SqliteFile::create(&strapi_sql_of(true, "", 4)).await;
    let store = StrapiStore::connect(&db.url(), StrapiTables::new())
        .await
        .unwrap();
    assert_eq!(
        store.links_table(),
        "strapi_api_token_permissions_token_links"
    );
    assert_eq!(store.kind_column(), None, "no kind column before 5.45");
    let layer = strapi_layer(store, &ManualClock::new(OffsetDateTime::now_utc()), false);
    let principal = layer
        .verify(&strapi_token("a1"), &http::Method::GET)
        .await
        .unwrap();
    assert_eq!(
        principal.scopes(),
        ["api::article.article.find", "api::article.article.findOne"]
    );
    // Without a kind column every token is a content-API token: the full-access token works.
    assert!(layer
        .verify(&strapi_token(FULL), &http::Method::POST)
        .await
        .is_ok());
    // A kind column named explicitly must exist: refused at connect, naming table and column.
    let err = StrapiStore::connect(&db.url(), StrapiTables::new().kind_column("kind"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema);
    let message = err.to_string();
    assert!(
        message.contains("strapi_api_tokens") && message.contains("`kind`"),
        "{message}"
    );
    // So must a link table named explicitly.
    let err = StrapiStore::connect(
        &db.url(),
        StrapiTables::new().links("strapi_api_token_permissions_token_lnk"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema);
    assert!(
        err.to_string()
            .contains("strapi_api_token_permissions_token_lnk"),
        "{err}"
    );
}

#[tokio::test]
async fn strapi_link_tables_both_or_neither_fail_at_connect() {
    let both = format!(
        "{} CREATE TABLE strapi_api_token_permissions_token_links (id integer PRIMARY KEY,
           api_token_permission_id integer, api_token_id integer);",
        strapi_sql(true, "")
    );
    let db = SqliteFile::create(&both).await;
    let err = StrapiStore::connect(&db.url(), StrapiTables::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema);
    assert!(
        err.to_string()
            .contains("both of the permission link tables"),
        "{err}"
    );
    // Naming one settles it.
    let store = StrapiStore::connect(
        &db.url(),
        StrapiTables::new().links("strapi_api_token_permissions_token_lnk"),
    )
    .await
    .unwrap();
    assert_eq!(
        store.links_table(),
        "strapi_api_token_permissions_token_lnk"
    );

    let neither = strapi_sql(true, "").replace(
        "strapi_api_token_permissions_token_lnk",
        "strapi_api_token_permissions_elsewhere",
    );
    let db = SqliteFile::create(&neither).await;
    let err = StrapiStore::connect(&db.url(), StrapiTables::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema);
    assert!(
        err.to_string()
            .contains("neither of the permission link tables"),
        "{err}"
    );
}

#[tokio::test]
async fn native_keys_are_unaffected_by_foreign_collections() {
    let db = SqliteFile::create(&payload_sql(true, "users")).await;
    let store = PayloadStore::connect(&db.url(), payload_table("users"))
        .await
        .unwrap();
    let rig = payload_rig(store);
    let manager = KeyManager::for_layer(&rig.layer);
    let created = manager
        .create(NewKey::new("svc", "svc-1").collection("services"))
        .await
        .unwrap();
    let key = created.key.expose().to_owned();
    let before = rig.foreign.lookups.load(Ordering::SeqCst);
    for _ in 0..3 {
        let reply = get_with(
            &rig.app,
            "/whoami",
            &[("authorization", format!("Bearer {key}").as_bytes())],
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    // Unknown keys in keywarden's format never reach the foreign store.
    let bogus = keywarden::key::KeyPrefix::new("kw_live")
        .unwrap()
        .generate();
    let reply = get_with(
        &rig.app,
        "/whoami",
        &[("x-api-key", bogus.expose().as_bytes())],
    )
    .await;
    assert_eq!(reply.code(), "invalid_key");
    assert_eq!(rig.foreign.lookups.load(Ordering::SeqCst), before);
    rig.layer.flush_usage().await.unwrap();
    assert_eq!(
        rig.native.usage_writes(),
        1,
        "native uses are still written behind"
    );
}

// --- Foreign keys never manage keys (issue 12, item 1) --------------------------------------

/// A layer with the native collection `services` and `foreign`, the management API and
/// `/whoami` behind it, a native admin key and a native key to aim at.
struct ManagedRig {
    app: Router,
    manager: Arc<KeyManager>,
    admin: String,
    victim: uuid::Uuid,
}

async fn managed_rig(foreign: Collection) -> ManagedRig {
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(keywarden::MemoryStore::new()))
        .secrets(ring())
        .collection(Collection::new("services"))
        .collection(foreign)
        .build()
        .unwrap();
    let manager = Arc::new(KeyManager::for_layer(&layer));
    let admin = manager
        .create(
            NewKey::new("admin", "root")
                .collection("services")
                .scope("keys:admin"),
        )
        .await
        .unwrap()
        .key
        .expose()
        .to_owned();
    let victim = manager
        .create(
            NewKey::new("victim", "bob")
                .collection("services")
                .scope("read"),
        )
        .await
        .unwrap()
        .record
        .id;
    let app = Router::new()
        .nest("/admin", keywarden::management_router(manager.clone()))
        .route("/whoami", get(|p: Principal| async move { Json(p) }))
        .layer(layer);
    ManagedRig {
        app,
        manager,
        admin,
        victim,
    }
}

impl ManagedRig {
    async fn call(
        &self,
        authorization: &str,
        method: &str,
        uri: &str,
        body: &str,
    ) -> support::Reply {
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", authorization)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_owned()))
            .unwrap();
        send(&self.app, req).await
    }

    /// Every management route answers `authorization` with 403 `insufficient_scope`, and
    /// nothing changes.
    async fn assert_no_management(&self, authorization: &str) {
        let who = self.call(authorization, "GET", "/whoami", "").await;
        assert_eq!(who.status, 200, "the key itself is valid: {}", who.text());
        let keys = || async {
            self.manager
                .list(&keywarden::store::KeyQuery::new())
                .await
                .unwrap()
                .items
        };
        let before = keys().await;
        let id = self.victim;
        for (method, uri, body) in [
            ("GET", "/admin/keys".to_owned(), ""),
            (
                "POST",
                "/admin/keys".to_owned(),
                r#"{"name": "n", "collection": "services", "subject": "eve", "scopes": ["*"]}"#,
            ),
            ("GET", format!("/admin/keys/{id}"), ""),
            ("PATCH", format!("/admin/keys/{id}"), r#"{"scopes": ["*"]}"#),
            ("POST", format!("/admin/keys/{id}/revoke"), ""),
            ("POST", format!("/admin/keys/{id}/rotate"), ""),
            ("DELETE", format!("/admin/keys/{id}"), ""),
        ] {
            let reply = self.call(authorization, method, &uri, body).await;
            assert_eq!(reply.status, 403, "{method} {uri}: {}", reply.text());
            assert_eq!(reply.code(), "insufficient_scope", "{method} {uri}");
        }
        assert_eq!(keys().await, before, "nothing was created or changed");
        // The native admin still manages keys.
        let admin = format!("Bearer {}", self.admin);
        let listed = self.call(&admin, "GET", "/admin/keys", "").await;
        assert_eq!(listed.status, 200, "{}", listed.text());
    }
}

/// Strapi's `full-access` and `read-only` tokens map to scope `*`: they must not be keywarden
/// admins (`GET /admin/keys`, creating keys for any subject, revoking others' keys).
#[tokio::test]
async fn strapi_tokens_never_manage_keys() {
    let db = SqliteFile::create(&strapi_sql(true, "")).await;
    let store = StrapiStore::connect(&db.url(), StrapiTables::new())
        .await
        .unwrap();
    let rig = managed_rig(Collection::foreign(
        "strapi",
        StrapiScheme::new(STRAPI_SALT).unwrap(),
        Arc::new(store),
    ))
    .await;
    for unit in [FULL, READ] {
        let who = rig.call(&bearer(unit), "GET", "/whoami", "").await;
        assert_eq!(
            who.json()["scopes"],
            serde_json::json!(["api::*", "plugin::*"]),
            "fixture"
        );
        rig.assert_no_management(&bearer(unit)).await;
    }
}

/// Whatever scopes a foreign collection gives its keys, management scopes included, its keys
/// never manage keywarden's.
#[tokio::test]
async fn payload_keys_never_manage_keys_whatever_their_scopes() {
    let db = SqliteFile::create(&payload_sql(true, "users")).await;
    let table = payload_table("users").scopes(["keys:admin", "keys:self", "*"]);
    let store = PayloadStore::connect(&db.url(), table).await.unwrap();
    let rig = managed_rig(Collection::foreign(
        "users",
        payload_scheme(),
        Arc::new(store),
    ))
    .await;
    let auth = payload_auth(UUID_KEY);
    let who = rig.call(&auth, "GET", "/whoami", "").await;
    assert!(
        who.json()["scopes"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("keys:admin")),
        "fixture: {}",
        who.text()
    );
    rig.assert_no_management(&auth).await;
}

/// Strapi's per-action permissions through `StrapiContentApi`: a full-access token may do
/// every action, a read-only one find/findOne only, a custom one exactly its permissions
/// (`find`, `findOne`); nothing unmapped passes.
#[tokio::test]
async fn strapi_content_api_actions_are_authorized_per_route() {
    use keywarden::interop::StrapiContentApi;
    let db = SqliteFile::create(&strapi_sql(true, "")).await;
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect(&db.url())
        .await
        .unwrap();
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let layer = strapi_layer(
        StrapiStore::sqlite(pool, StrapiTables::new())
            .await
            .unwrap(),
        &clock,
        false,
    );
    let actions = StrapiContentApi::new("/api")
        .collection_type("articles", "api::article.article")
        .single_type("homepage", "api::homepage.homepage");
    let ok = || async { "ok" };
    let app = Router::new()
        .route("/api/articles", get(ok).post(ok))
        .route("/api/articles/{id}", get(ok).put(ok).delete(ok))
        .route("/api/homepage", get(ok).put(ok))
        .route("/api/other", get(ok))
        .route_layer(actions.layer())
        .layer(layer);
    let status = |method: &'static str, path: &'static str, unit: &'static str| {
        let app = app.clone();
        async move {
            send(
                &app,
                request(method, path, &[("authorization", bearer(unit).as_bytes())]),
            )
            .await
            .status
        }
    };
    let routes = [
        ("GET", "/api/articles"),
        ("GET", "/api/articles/1"),
        ("POST", "/api/articles"),
        ("PUT", "/api/articles/1"),
        ("DELETE", "/api/articles/1"),
        ("GET", "/api/homepage"),
        ("PUT", "/api/homepage"),
        ("GET", "/api/other"),
    ];
    let mut full = Vec::new();
    let mut read = Vec::new();
    let mut custom = Vec::new();
    for (method, path) in routes {
        full.push(status(method, path, FULL).await);
        read.push(status(method, path, READ).await);
        custom.push(status(method, path, "a1").await);
    }
    assert_eq!(full, [200, 200, 200, 200, 200, 200, 200, 403]);
    assert_eq!(read, [200, 200, 403, 403, 403, 200, 403, 403]);
    assert_eq!(custom, [200, 200, 403, 403, 403, 403, 403, 403]);
    // Without a token: 401 before any action is judged.
    let reply = send(&app, request("GET", "/api/articles", &[])).await;
    assert_eq!(reply.status, 401);
}
