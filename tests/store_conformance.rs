//! Conformance: every `KeyStore` backend behaves like `MemoryStore`.
//!
//! Each test is an `async fn(Arc<dyn KeyStore>)`; the `conformance!` macro runs it against
//! the memory store, SQLite (a temporary file and `sqlite::memory:`) and PostgreSQL (a fresh
//! schema per test, dropped afterwards; needs `KEYWARDEN_TEST_POSTGRES_URL`).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use keywarden::{
    manage::ManageErrorKind,
    secret::Digest,
    secret::SecretId,
    store::KeyPatch,
    store::KeyQuery,
    store::KeyRecord,
    store::KeyState,
    store::KeyUsage,
    store::SecretRetirement,
    store::StoreErrorKind,
    store::UnmigratedKeys,
    store::{Credits, Refill},
    KeyManager, KeyStore, MemoryStore, NewKey, OwnerKind, SecretRing,
};
use serde_json::json;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use tokio::sync::Barrier;
use uuid::Uuid;

mod support;

type Store = Arc<dyn KeyStore>;

#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
const POSTGRES_URL_ENV: &str = "KEYWARDEN_TEST_POSTGRES_URL";

/// A fixed instant with microsecond precision, so every backend stores it exactly.
const BASE: OffsetDateTime = datetime!(2031-05-06 07:08:09.123_456 UTC);

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Skips a backend whose server is not configured, except in CI, where a skipped suite must
/// fail loudly rather than pass silently.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
fn skip_unless_ci(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason}, and CI=true: the conformance suite must not be skipped in CI");
    }
    eprintln!("{reason}");
}

/// Runs a test body in its own task so a panic still lets the harness clean up, then
/// re-raises it.
async fn run_isolated<F, Fut>(store: Store, test: F) -> Result<(), tokio::task::JoinError>
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(test(store)).await
}

fn rethrow(outcome: Result<(), tokio::task::JoinError>) {
    if let Err(err) = outcome {
        match err.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(err) => panic!("test task failed: {err}"),
        }
    }
}

async fn with_memory<F, Fut>(test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    rethrow(run_isolated(Arc::new(MemoryStore::new()), test).await);
}

#[cfg(feature = "sqlite")]
async fn with_sqlite_file<F, Fut>(test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let path = std::env::temp_dir().join(format!("keywarden-conformance-{}.db", random_hex(8)));
    let store = Arc::new(
        keywarden::SqliteStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("open the SQLite file"),
    );
    let outcome = run_isolated(store.clone(), test).await;
    store.pool().close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    rethrow(outcome);
}

#[cfg(feature = "sqlite")]
async fn with_sqlite_memory<F, Fut>(test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let store = keywarden::SqliteStore::connect("sqlite::memory:")
        .await
        .expect("open in-memory SQLite");
    rethrow(run_isolated(Arc::new(store), test).await);
}

#[cfg(feature = "postgres")]
async fn with_postgres<F, Fut>(test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(url) = std::env::var(POSTGRES_URL_ENV)
        .ok()
        .filter(|u| !u.is_empty())
    else {
        skip_unless_ci(&format!(
            "skipping PostgreSQL conformance: {POSTGRES_URL_ENV} is not set"
        ));
        return;
    };
    let schema = format!("kw_{}", random_hex(8));
    let store = Arc::new(
        keywarden::PostgresStore::connect_with_schema(&url, &schema)
            .await
            .expect("connect to PostgreSQL"),
    );
    let outcome = run_isolated(store.clone(), test).await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(store.pool())
        .await
        .expect("drop the test schema");
    store.pool().close().await;
    rethrow(outcome);
}

/// Declares each test once per backend: `memory::name`, `sqlite_file::name`, ...
macro_rules! conformance {
    ($($test:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::with_memory(super::$test).await
                }
            )+
        }

        #[cfg(feature = "sqlite")]
        mod sqlite_file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::with_sqlite_file(super::$test).await
                }
            )+
        }

        #[cfg(feature = "sqlite")]
        mod sqlite_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::with_sqlite_memory(super::$test).await
                }
            )+
        }

        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::with_postgres(super::$test).await
                }
            )+
        }
    };
}

conformance!(
    a_connected_store_is_ready,
    roundtrip_keeps_every_field,
    timestamps_are_kept_to_the_microsecond,
    duplicate_digest_conflicts,
    duplicate_id_conflicts,
    unknown_ids_are_absent,
    update_applies_patch_semantics,
    concurrent_updates_of_different_fields_are_all_kept,
    conditional_update_refuses_a_stale_version,
    add_digest_keeps_every_digest_valid,
    delete_frees_added_digests,
    retire_secret_drops_only_its_digests,
    retire_secret_refuses_to_strand_keys,
    retire_secret_with_revoke_strands_nothing_silently,
    rolling_deploy_keeps_old_instances_verifying,
    delete_returns_the_row_and_frees_the_digest,
    list_paginates_in_id_order,
    list_filters_by_collection_subject_environment_and_state,
    list_clamps_the_limit,
    record_usage_accumulates,
    record_usage_in_bulk,
    a_keyless_event_without_an_action_is_refused,
    credits_are_leased_and_returned,
    credits_refill_sets_the_balance_each_period,
    setting_credits_voids_earlier_leases,
    concurrent_leases_never_hand_out_more_than_the_balance,
    owner_policies_are_kept_read_with_keys_and_fed,
    owner_credits_are_leased_returned_and_voided,
    concurrent_owner_leases_never_hand_out_more_than_the_balance,
);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("OS randomness");
    bytes
}

#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
fn random_hex(len: usize) -> String {
    random_bytes::<32>()[..len]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn digest() -> Digest {
    Digest::from_bytes(random_bytes())
}

/// A record with defaults wherever a field has one.
fn plain(collection: &str, subject: &str) -> KeyRecord {
    KeyRecord {
        id: Uuid::now_v7(),
        digest: digest(),
        secret_id: SecretId::from_bytes([1; 8]),
        display_start: "kw_live_AbCd".into(),
        name: "plain".into(),
        description: None,
        collection: collection.into(),
        subject: subject.into(),
        owner_kind: OwnerKind::User,
        scopes: vec![],
        environment: "live".into(),
        read_only: false,
        metadata: json!({}),
        rate_limit: None,
        created_at: BASE,
        updated_at: BASE,
        expires_at: None,
        last_used_at: None,
        use_count: 0,
        revoked_at: None,
        disabled: false,
        rotated_from: None,
        encrypted_key: None,
        allowed_ips: Vec::new(),
        credits: None,
        owner: keywarden::store::OwnerLimits::default(),
    }
}

/// A record with every field set to something other than its default.
fn full() -> KeyRecord {
    KeyRecord {
        id: Uuid::now_v7(),
        digest: digest(),
        secret_id: SecretId::from_bytes([0xde, 0xad, 0xbe, 0xef, 0, 1, 0xfe, 0xff]),
        display_start: "kw_test_Zz9q".into(),
        name: "billing export".into(),
        description: Some("nightly export — ünïcödé, 'quotes' and \"doubles\"".into()),
        collection: "services".into(),
        subject: "svc-42".into(),
        owner_kind: OwnerKind::Service,
        scopes: vec!["invoices:read".into(), "exports:write".into(), "*".into()],
        environment: "test".into(),
        read_only: true,
        metadata: json!({
            "team": "payments",
            "tier": 3,
            "big": 9_007_199_254_740_993_u64,
            "nested": {"flags": [true, false, null], "ratio": 0.5, "empty": {}},
        }),
        rate_limit: Some("120/min,burst=30".parse().unwrap()),
        created_at: BASE,
        updated_at: BASE + Duration::seconds(1),
        expires_at: Some(BASE + Duration::days(30)),
        last_used_at: Some(BASE + Duration::hours(2)),
        use_count: 1_234_567_890_123,
        revoked_at: Some(BASE + Duration::hours(3)),
        disabled: true,
        rotated_from: Some(Uuid::now_v7()),
        encrypted_key: Some(vec![0, 1, 2, 0x7f, 0x80, 0xfe, 0xff]),
        allowed_ips: vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.7".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
            "::1".parse().unwrap(),
        ],
        credits: Some(Credits::new(9_876_543_210).with_refill("50000/month".parse().unwrap())),
        owner: keywarden::store::OwnerLimits::default(),
    }
}

/// The record with every timestamp floored to the microsecond, in UTC.
fn to_micros(mut r: KeyRecord) -> KeyRecord {
    fn floor(at: OffsetDateTime) -> OffsetDateTime {
        let at = at.to_offset(time::UtcOffset::UTC);
        at.replace_nanosecond(at.microsecond() * 1_000).unwrap()
    }
    r.created_at = floor(r.created_at);
    r.updated_at = floor(r.updated_at);
    r.expires_at = r.expires_at.map(floor);
    r.last_used_at = r.last_used_at.map(floor);
    r.revoked_at = r.revoked_at.map(floor);
    r
}

fn query() -> KeyQuery {
    KeyQuery {
        now: BASE,
        ..KeyQuery::new()
    }
}

async fn list_all(store: &Store, mut q: KeyQuery) -> Vec<Uuid> {
    let mut ids = Vec::new();
    loop {
        let page = store.list(&q).await.unwrap();
        ids.extend(page.items.iter().map(|r| r.id));
        match page.next_cursor {
            Some(cursor) => {
                assert_eq!(Some(cursor), page.items.last().map(|r| r.id));
                q.after = Some(cursor);
            }
            None => return ids,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

async fn a_connected_store_is_ready(store: Store) {
    store
        .check_ready()
        .await
        .expect("a migrated store is ready");
}

async fn roundtrip_keeps_every_field(store: Store) {
    let record = full();
    store.insert(&record).await.unwrap();
    assert_eq!(store.get(record.id).await.unwrap(), Some(record.clone()));
    let found = store.find_by_digest(&record.digest).await.unwrap().unwrap();
    assert_eq!(found, record);
    // PartialEq on the record compares these too, but spell out what is easy to get wrong.
    assert_eq!(found.metadata, record.metadata);
    assert_eq!(found.encrypted_key, record.encrypted_key);
    assert_eq!(found.rate_limit, record.rate_limit);
    assert_eq!(found.use_count, record.use_count);
    assert_eq!(found.expires_at, record.expires_at);
    assert_eq!(found.last_used_at, record.last_used_at);
    assert_eq!(found.revoked_at, record.revoked_at);
    assert_eq!(store.find_by_digest(&digest()).await.unwrap(), None);

    let page = store.list(&query()).await.unwrap();
    assert_eq!(page.items, vec![record]);
    assert_eq!(page.next_cursor, None);
}

async fn timestamps_are_kept_to_the_microsecond(store: Store) {
    let mut record = full();
    record.created_at = datetime!(2031-05-06 07:08:09.123_456_789 +02:00);
    record.updated_at = datetime!(1999-12-31 23:59:59.999_999_999 UTC);
    record.expires_at = Some(datetime!(2040-01-01 0:00:00.000_001 UTC));
    store.insert(&record).await.unwrap();
    let got = store.get(record.id).await.unwrap().unwrap();
    assert_eq!(to_micros(got), to_micros(record));
}

async fn duplicate_digest_conflicts(store: Store) {
    let first = full();
    store.insert(&first).await.unwrap();
    let second = KeyRecord {
        digest: first.digest,
        ..plain("users", "u")
    };
    let err = store.insert(&second).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict, "{err}");
    assert_eq!(store.get(second.id).await.unwrap(), None);
    assert_eq!(
        store.find_by_digest(&first.digest).await.unwrap(),
        Some(first)
    );
}

async fn duplicate_id_conflicts(store: Store) {
    let first = full();
    store.insert(&first).await.unwrap();
    let second = KeyRecord {
        id: first.id,
        ..plain("users", "u")
    };
    let err = store.insert(&second).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict, "{err}");
    assert_eq!(store.find_by_digest(&second.digest).await.unwrap(), None);
    assert_eq!(store.get(first.id).await.unwrap(), Some(first));
}

async fn unknown_ids_are_absent(store: Store) {
    let known = full();
    store.insert(&known).await.unwrap();
    let unknown = Uuid::now_v7();
    assert_eq!(store.get(unknown).await.unwrap(), None);
    let patch = KeyPatch {
        name: Some("x".into()),
        ..KeyPatch::default()
    };
    assert_eq!(store.update(unknown, &patch, BASE).await.unwrap(), None);
    assert_eq!(store.delete(unknown).await.unwrap(), None);
    let added = store
        .add_digest(
            unknown,
            &known.digest,
            &digest(),
            SecretId::from_bytes([2; 8]),
        )
        .await
        .unwrap();
    assert!(!added);
    store
        .record_usage(&[KeyUsage {
            id: unknown,
            last_used_at: BASE,
            uses: 3,
        }])
        .await
        .unwrap();
    assert_eq!(store.get(known.id).await.unwrap(), Some(known));
}

async fn update_applies_patch_semantics(store: Store) {
    let mut record = plain("users", "alice");
    record.description = Some("first".into());
    record.rate_limit = Some("10/s".parse().unwrap());
    record.expires_at = Some(BASE + Duration::days(1));
    store.insert(&record).await.unwrap();

    // Every field at once, clearing the nullable ones with Some(None).
    let t1 = BASE + Duration::hours(1);
    let everything = KeyPatch {
        name: Some("renamed".into()),
        description: Some(None),
        scopes: Some(vec!["a".into(), "b".into()]),
        read_only: Some(true),
        metadata: Some(json!({"k": [1, 2, 3]})),
        rate_limit: Some(None),
        expires_at: Some(None),
        revoked_at: Some(t1),
        disabled: Some(true),
        allowed_ips: Some(vec![
            "198.51.100.0/24".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]),
        credits: Some(Some(77)),
        credit_refill: Some(Some("5/h".parse().unwrap())),
        expected_updated_at: None,
    };
    let mut expected = record.clone();
    everything.apply_to(&mut expected, t1);
    assert_eq!(expected.description, None, "fixture sanity");
    assert_eq!(
        expected.credits,
        Some(Credits::new(77).with_refill("5/h".parse().unwrap())),
        "fixture sanity"
    );
    let updated = store.update(record.id, &everything, t1).await.unwrap();
    assert_eq!(updated.as_ref(), Some(&expected));
    assert_eq!(store.get(record.id).await.unwrap(), Some(expected.clone()));

    // A revoked key stays revoked at its first revocation time; other fields still change.
    let t2 = t1 + Duration::hours(1);
    let later = KeyPatch {
        revoked_at: Some(t2),
        disabled: Some(false),
        description: Some(Some("back".into())),
        rate_limit: Some(Some("5/min,burst=2".parse().unwrap())),
        expires_at: Some(Some(t2 + Duration::days(7))),
        allowed_ips: Some(Vec::new()),
        credits: Some(None),
        ..KeyPatch::default()
    };
    later.apply_to(&mut expected, t2);
    let updated = store.update(record.id, &later, t2).await.unwrap().unwrap();
    assert_eq!(updated, expected);
    assert_eq!(updated.revoked_at, Some(t1));
    assert_eq!(updated.description.as_deref(), Some("back"));

    // An empty patch only touches updated_at; None leaves nullable fields alone.
    let t3 = t2 + Duration::hours(1);
    KeyPatch::default().apply_to(&mut expected, t3);
    let updated = store
        .update(record.id, &KeyPatch::default(), t3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated, expected);
    assert_eq!(updated.updated_at, t3);
    assert_eq!(store.get(record.id).await.unwrap(), Some(expected));
}

/// Nine patches per key, each setting a different field to a value derived from `k`.
fn field_patches(k: usize, at: OffsetDateTime) -> Vec<KeyPatch> {
    let none = KeyPatch::default;
    vec![
        KeyPatch {
            name: Some(format!("name-{k}")),
            ..none()
        },
        KeyPatch {
            description: Some(Some(format!("description-{k}"))),
            ..none()
        },
        KeyPatch {
            scopes: Some(vec![format!("scope-{k}"), "shared".into()]),
            ..none()
        },
        KeyPatch {
            read_only: Some(true),
            ..none()
        },
        KeyPatch {
            metadata: Some(json!({ "k": k })),
            ..none()
        },
        KeyPatch {
            rate_limit: Some(Some(format!("{}/min", k + 1).parse().unwrap())),
            ..none()
        },
        KeyPatch {
            expires_at: Some(Some(at + Duration::days(k as i64 + 1))),
            ..none()
        },
        KeyPatch {
            revoked_at: Some(at),
            ..none()
        },
        KeyPatch {
            disabled: Some(true),
            ..none()
        },
    ]
}

async fn concurrent_updates_of_different_fields_are_all_kept(store: Store) {
    const KEYS: usize = 3;
    const USES_PER_KEY: u64 = 5;
    let now = BASE + Duration::minutes(5);
    let records: Vec<KeyRecord> = (0..KEYS).map(|_| plain("users", "racer")).collect();
    for r in &records {
        store.insert(r).await.unwrap();
    }
    let tasks = KEYS * (field_patches(0, now).len() + USES_PER_KEY as usize);
    assert!(tasks >= 20);
    let barrier = Arc::new(Barrier::new(tasks));
    let mut handles = Vec::new();
    for (k, r) in records.iter().enumerate() {
        for patch in field_patches(k, now) {
            let (store, barrier, id) = (store.clone(), barrier.clone(), r.id);
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                let updated = store.update(id, &patch, now).await.unwrap();
                assert!(updated.is_some());
            }));
        }
        for n in 0..USES_PER_KEY {
            let (store, barrier, id) = (store.clone(), barrier.clone(), r.id);
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                let usage = KeyUsage {
                    id,
                    last_used_at: now + Duration::seconds(n as i64),
                    uses: 1,
                };
                store.record_usage(&[usage]).await.unwrap();
            }));
        }
    }
    assert_eq!(handles.len(), tasks);
    for handle in handles {
        handle.await.unwrap();
    }
    for (k, r) in records.iter().enumerate() {
        let mut expected = r.clone();
        for patch in field_patches(k, now) {
            patch.apply_to(&mut expected, now);
        }
        expected.use_count = USES_PER_KEY;
        expected.last_used_at = Some(now + Duration::seconds(USES_PER_KEY as i64 - 1));
        assert_eq!(store.get(r.id).await.unwrap(), Some(expected), "key {k}");
    }
}

/// Issue 12, item 7: an update conditional on a version the record has moved past writes
/// nothing and is a conflict; on the current version it applies. Every write moves the
/// version, even at the same instant; of racing conditional updates on one version, exactly
/// one wins.
async fn conditional_update_refuses_a_stale_version(store: Store) {
    let mut record = plain("users", "alice");
    record.rate_limit = Some("100/min".parse().unwrap());
    store.insert(&record).await.unwrap();
    let read = store.get(record.id).await.unwrap().unwrap();

    // Another writer (an admin tightening the key) lands first, at the very same instant.
    let tighten = KeyPatch {
        rate_limit: Some(Some("10/min".parse().unwrap())),
        ..KeyPatch::default()
    };
    let tightened = store
        .update(record.id, &tighten, BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(
        tightened.updated_at > read.updated_at,
        "every write moves the version, even within one microsecond"
    );

    let stale = KeyPatch {
        rate_limit: Some(Some("50/min".parse().unwrap())),
        name: Some("stale".into()),
        expected_updated_at: Some(read.updated_at),
        ..KeyPatch::default()
    };
    let err = store.update(record.id, &stale, BASE).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    assert_eq!(
        store.get(record.id).await.unwrap(),
        Some(tightened.clone()),
        "a stale update writes nothing"
    );

    // Against the current version it applies, and moves the version on.
    let current = KeyPatch {
        expected_updated_at: Some(tightened.updated_at),
        rate_limit: Some(Some("5/min".parse().unwrap())),
        ..stale.clone()
    };
    let updated = store
        .update(record.id, &current, BASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.rate_limit, Some("5/min".parse().unwrap()));
    assert_eq!(updated.name, "stale");
    assert!(updated.updated_at > tightened.updated_at);
    assert_eq!(store.get(record.id).await.unwrap(), Some(updated.clone()));
    // The version it was read at is now stale too.
    let again = store.update(record.id, &current, BASE).await.unwrap_err();
    assert_eq!(again.kind(), StoreErrorKind::Conflict);
    // An unknown id is absent, not a conflict.
    assert_eq!(
        store.update(Uuid::now_v7(), &current, BASE).await.unwrap(),
        None
    );

    // Racing conditional updates of one version: one wins, the others conflict.
    const RACERS: usize = 8;
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut handles = Vec::new();
    for n in 0..RACERS {
        let (store, barrier, id) = (store.clone(), barrier.clone(), record.id);
        let patch = KeyPatch {
            name: Some(format!("racer-{n}")),
            expected_updated_at: Some(updated.updated_at),
            ..KeyPatch::default()
        };
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            store.update(id, &patch, BASE).await
        }));
    }
    let mut winners = Vec::new();
    for handle in handles {
        match handle.await.unwrap() {
            Ok(Some(record)) => winners.push(record),
            Ok(None) => panic!("the key exists"),
            Err(err) => assert_eq!(err.kind(), StoreErrorKind::Conflict, "{err}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one racer wins");
    assert_eq!(store.get(record.id).await.unwrap(), Some(winners.remove(0)));
}

async fn add_digest_keeps_every_digest_valid(store: Store) {
    let a = full();
    let b = plain("users", "bob");
    store.insert(&a).await.unwrap();
    store.insert(&b).await.unwrap();
    let new_secret = SecretId::from_bytes([9; 8]);

    // A `found_by` that is not the key's: nothing changes.
    let added = store
        .add_digest(a.id, &digest(), &digest(), new_secret)
        .await
        .unwrap();
    assert!(!added);
    assert_eq!(store.get(a.id).await.unwrap(), Some(a.clone()));

    // A new digest that belongs to another key conflicts and changes nothing.
    let err = store
        .add_digest(a.id, &a.digest, &b.digest, new_secret)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict, "{err}");
    assert_eq!(
        store.find_by_digest(&b.digest).await.unwrap(),
        Some(b.clone())
    );

    // The right `found_by` adds the digest; the record, old digest included, is unchanged and
    // found by either digest.
    let new = digest();
    assert!(store
        .add_digest(a.id, &a.digest, &new, new_secret)
        .await
        .unwrap());
    assert_eq!(store.find_by_digest(&new).await.unwrap(), Some(a.clone()));
    assert_eq!(
        store.find_by_digest(&a.digest).await.unwrap(),
        Some(a.clone()),
        "the old digest stays valid"
    );
    assert_eq!(store.get(a.id).await.unwrap(), Some(a.clone()));
    let page = store.list(&query()).await.unwrap();
    assert_eq!(page.items.len(), 2, "an added digest is no record");

    // Idempotent; one digest per secret; another key's digest proves nothing; an added
    // digest proves the key too.
    assert!(!store
        .add_digest(a.id, &a.digest, &new, new_secret)
        .await
        .unwrap());
    let other = digest();
    assert!(!store
        .add_digest(a.id, &a.digest, &other, new_secret)
        .await
        .unwrap());
    assert_eq!(store.find_by_digest(&other).await.unwrap(), None);
    assert!(!store
        .add_digest(b.id, &new, &digest(), new_secret)
        .await
        .unwrap());
    let third = digest();
    assert!(store
        .add_digest(a.id, &new, &third, SecretId::from_bytes([10; 8]))
        .await
        .unwrap());
    assert_eq!(store.find_by_digest(&third).await.unwrap(), Some(a.clone()));
    // Not under the record's own secret: that digest is the record's.
    assert!(!store
        .add_digest(b.id, &b.digest, &digest(), b.secret_id)
        .await
        .unwrap());
    // A digest added to one key cannot be added to another.
    let err = store
        .add_digest(b.id, &b.digest, &new, SecretId::from_bytes([11; 8]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict, "{err}");
    assert_eq!(store.get(b.id).await.unwrap(), Some(b));
}

async fn delete_frees_added_digests(store: Store) {
    let a = plain("users", "a");
    store.insert(&a).await.unwrap();
    let added = digest();
    assert!(store
        .add_digest(a.id, &a.digest, &added, SecretId::from_bytes([9; 8]))
        .await
        .unwrap());
    assert_eq!(store.delete(a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(store.find_by_digest(&added).await.unwrap(), None);
    assert_eq!(store.find_by_digest(&a.digest).await.unwrap(), None);
    // Both digests are free again.
    let b = KeyRecord {
        digest: added,
        ..plain("users", "b")
    };
    store.insert(&b).await.unwrap();
    assert_eq!(store.find_by_digest(&added).await.unwrap(), Some(b.clone()));
    assert!(store
        .add_digest(b.id, &b.digest, &a.digest, SecretId::from_bytes([9; 8]))
        .await
        .unwrap());
}

fn old_id() -> SecretId {
    SecretId::from_bytes([0x0d; 8])
}

fn new_id() -> SecretId {
    SecretId::from_bytes([0x0e; 8])
}

fn other_id() -> SecretId {
    SecretId::from_bytes([0x0f; 8])
}

async fn retire_secret_drops_only_its_digests(store: Store) {
    let now = BASE + Duration::days(1);
    // Created under OLD, used since the rotation (has a NEW digest).
    let migrated = KeyRecord {
        secret_id: old_id(),
        ..plain("users", "migrated")
    };
    // Created under NEW; also holds an OLD digest (an old-ring instance re-digested it).
    let newer = KeyRecord {
        secret_id: new_id(),
        ..plain("users", "newer")
    };
    // Created under NEW, never touched.
    let untouched = KeyRecord {
        secret_id: new_id(),
        ..plain("users", "untouched")
    };
    // Created under OLD, with NEW and OTHER digests.
    let both = KeyRecord {
        secret_id: old_id(),
        ..plain("users", "both")
    };
    for r in [&migrated, &newer, &untouched, &both] {
        store.insert(r).await.unwrap();
    }
    let (migrated_new, newer_old, both_new, both_other) = (digest(), digest(), digest(), digest());
    for (r, d, s) in [
        (&migrated, migrated_new, new_id()),
        (&newer, newer_old, old_id()),
        (&both, both_new, new_id()),
        (&both, both_other, other_id()),
    ] {
        assert!(store.add_digest(r.id, &r.digest, &d, s).await.unwrap());
    }

    let outcome = store
        .retire_secret(old_id(), UnmigratedKeys::Refuse, now)
        .await
        .unwrap();
    assert!(outcome.retired, "{outcome:?}");
    assert_eq!(outcome.dropped, 3, "{outcome:?}");
    assert!(outcome.unmigrated.is_empty());
    let mut affected = vec![migrated.id, newer.id, both.id];
    affected.sort();
    assert_eq!(outcome.affected, affected);

    // OLD digests find nothing; the others still find their key.
    for old in [&migrated.digest, &newer_old, &both.digest] {
        assert_eq!(store.find_by_digest(old).await.unwrap(), None);
    }
    let promoted = KeyRecord {
        digest: migrated_new,
        secret_id: new_id(),
        ..migrated.clone()
    };
    assert_eq!(
        store.get(migrated.id).await.unwrap(),
        Some(promoted.clone())
    );
    assert_eq!(
        store.find_by_digest(&migrated_new).await.unwrap(),
        Some(promoted)
    );
    assert_eq!(store.get(newer.id).await.unwrap(), Some(newer.clone()));
    assert_eq!(
        store.find_by_digest(&newer.digest).await.unwrap(),
        Some(newer)
    );
    assert_eq!(store.get(untouched.id).await.unwrap(), Some(untouched));
    // The lower of the two remaining digests became the record's; the other still finds it.
    let both_now = store.get(both.id).await.unwrap().unwrap();
    let (low, low_id, high) = if both_new.as_bytes() < both_other.as_bytes() {
        (both_new, new_id(), both_other)
    } else {
        (both_other, other_id(), both_new)
    };
    assert_eq!(
        both_now,
        KeyRecord {
            digest: low,
            secret_id: low_id,
            ..both.clone()
        }
    );
    assert_eq!(store.find_by_digest(&high).await.unwrap(), Some(both_now));

    // Retiring again finds nothing to drop.
    let again = store
        .retire_secret(old_id(), UnmigratedKeys::Refuse, now)
        .await
        .unwrap();
    assert_eq!(
        again,
        SecretRetirement {
            retired: true,
            ..SecretRetirement::default()
        }
    );
}

async fn retire_secret_refuses_to_strand_keys(store: Store) {
    let now = BASE + Duration::days(1);
    let migrated = KeyRecord {
        secret_id: old_id(),
        ..plain("users", "migrated")
    };
    let stranded = KeyRecord {
        secret_id: old_id(),
        ..plain("users", "stranded")
    };
    // A revoked key never blocks a retirement.
    let revoked = KeyRecord {
        secret_id: old_id(),
        revoked_at: Some(BASE),
        ..plain("users", "revoked")
    };
    for r in [&migrated, &stranded, &revoked] {
        store.insert(r).await.unwrap();
    }
    let migrated_new = digest();
    assert!(store
        .add_digest(migrated.id, &migrated.digest, &migrated_new, new_id())
        .await
        .unwrap());

    let outcome = store
        .retire_secret(old_id(), UnmigratedKeys::Refuse, now)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        SecretRetirement {
            retired: false,
            unmigrated: vec![stranded.id],
            ..SecretRetirement::default()
        }
    );
    // Nothing changed.
    for r in [&migrated, &stranded, &revoked] {
        assert_eq!(store.get(r.id).await.unwrap().as_ref(), Some(r));
        assert_eq!(
            store.find_by_digest(&r.digest).await.unwrap().as_ref(),
            Some(r)
        );
    }
    assert_eq!(
        store.find_by_digest(&migrated_new).await.unwrap(),
        Some(migrated.clone())
    );

    // Once the stranded key gains a digest, the retirement goes through; the revoked key's
    // digest is dropped too, and it stays revoked as it was.
    let stranded_new = digest();
    assert!(store
        .add_digest(stranded.id, &stranded.digest, &stranded_new, new_id())
        .await
        .unwrap());
    let outcome = store
        .retire_secret(old_id(), UnmigratedKeys::Refuse, now)
        .await
        .unwrap();
    assert!(outcome.retired);
    assert_eq!(outcome.dropped, 3);
    assert!(outcome.unmigrated.is_empty());
    let mut affected = vec![migrated.id, stranded.id, revoked.id];
    affected.sort();
    assert_eq!(outcome.affected, affected);
    assert_eq!(store.find_by_digest(&revoked.digest).await.unwrap(), None);
    let revoked_now = store.get(revoked.id).await.unwrap().unwrap();
    assert_eq!(revoked_now.revoked_at, Some(BASE));
    assert_eq!(revoked_now.secret_id, SecretId::from_bytes([0; 8]));
    assert_eq!(
        store
            .find_by_digest(&stranded_new)
            .await
            .unwrap()
            .map(|r| r.id),
        Some(stranded.id)
    );
}

async fn retire_secret_with_revoke_strands_nothing_silently(store: Store) {
    let now = BASE + Duration::days(1);
    let stranded = KeyRecord {
        secret_id: old_id(),
        ..plain("users", "stranded")
    };
    let other = plain("users", "other");
    store.insert(&stranded).await.unwrap();
    store.insert(&other).await.unwrap();
    let outcome = store
        .retire_secret(old_id(), UnmigratedKeys::Revoke, now)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        SecretRetirement {
            retired: true,
            dropped: 1,
            unmigrated: vec![stranded.id],
            affected: vec![stranded.id],
        }
    );
    assert_eq!(store.find_by_digest(&stranded.digest).await.unwrap(), None);
    let got = store.get(stranded.id).await.unwrap().unwrap();
    assert_eq!(got.state(now), KeyState::Revoked);
    assert_eq!(got.revoked_at, Some(now));
    assert_eq!(got.updated_at, now);
    assert_eq!(got.secret_id, SecretId::from_bytes([0; 8]));
    assert_ne!(got.digest, stranded.digest);
    // Its placeholder digest finds nothing that verifies as a key of another record, and the
    // rest of the record is as it was.
    assert_eq!(
        got,
        KeyRecord {
            digest: got.digest,
            secret_id: got.secret_id,
            revoked_at: Some(now),
            updated_at: now,
            ..stranded.clone()
        }
    );
    assert_eq!(store.get(other.id).await.unwrap(), Some(other));
}

/// A rolling deploy: instance A holds the new secret and the old one, instance B only the old
/// one, over one store. A key used on A keeps verifying on B; once the old secret is retired,
/// B rejects it and A still accepts it.
async fn rolling_deploy_keeps_old_instances_verifying(store: Store) {
    let old_ring = SecretRing::from_strs(support::OLD_SECRET, None).unwrap();
    let new_ring = SecretRing::from_strs(support::SECRET, Some(support::OLD_SECRET)).unwrap();
    let layer = |ring: SecretRing| {
        keywarden::ApiKeyLayer::builder()
            .store(store.clone())
            .secrets(ring)
            .collection(keywarden::Collection::new("users"))
            .build()
            .unwrap()
    };
    let (a, b) = (layer(new_ring.clone()), layer(old_ring.clone()));
    let (app_a, app_b) = (
        support::app().layer(a.clone()),
        support::app().layer(b.clone()),
    );
    let created = KeyManager::for_layer(&b)
        .create(NewKey::new("k", "alice"))
        .await
        .unwrap();
    // Never used since the rotation: stays on the old secret only.
    let idle = KeyManager::for_layer(&b)
        .create(NewKey::new("idle", "bob"))
        .await
        .unwrap();
    let key = created.key.expose().as_bytes();
    let whoami = |app: &axum::Router, key: &[u8]| {
        let app = app.clone();
        let key = key.to_vec();
        async move { support::get_with(&app, "/whoami", &[("x-api-key", &key)]).await }
    };

    assert_eq!(whoami(&app_b, key).await.status, 200, "B before A");
    assert_eq!(whoami(&app_a, key).await.status, 200, "A re-digests");
    let new_digest = new_ring.digest(key);
    assert_eq!(
        store
            .find_by_digest(&new_digest)
            .await
            .unwrap()
            .map(|r| r.id),
        Some(created.record.id),
        "A added its digest"
    );
    assert_eq!(
        store.get(created.record.id).await.unwrap().unwrap(),
        created.record,
        "the record, old digest included, is unchanged"
    );
    // B, cold, still finds the key by its old digest.
    b.invalidate_all();
    assert_eq!(whoami(&app_b, key).await.status, 200, "B after A");
    // A now finds it with one query under the new secret, even without the old secret.
    let only_new = layer(SecretRing::from_strs(support::SECRET, None).unwrap());
    let app_only_new = support::app().layer(only_new.clone());
    assert_eq!(whoami(&app_only_new, key).await.status, 200);

    // Retire the old secret, through a manager that knows both instances.
    let manager = KeyManager::new(
        store.clone(),
        SecretRing::from_strs(support::SECRET, None).unwrap(),
    )
    .invalidates(&a)
    .invalidates(&b)
    .invalidates(&only_new);
    let refused = manager
        .retire_secret(old_ring.current_id(), UnmigratedKeys::Refuse)
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ManageErrorKind::UnmigratedKeys);
    assert_eq!(refused.unmigrated_keys(), [idle.record.id]);
    assert_eq!(
        whoami(&app_b, key).await.status,
        200,
        "a refusal changes nothing"
    );
    let current = manager
        .retire_secret(new_ring.current_id(), UnmigratedKeys::Revoke)
        .await
        .unwrap_err();
    assert_eq!(current.kind(), ManageErrorKind::CurrentSecret);

    let outcome = manager
        .retire_secret(old_ring.current_id(), UnmigratedKeys::Revoke)
        .await
        .unwrap();
    assert!(outcome.retired);
    assert_eq!(outcome.dropped, 2);
    assert_eq!(outcome.unmigrated, [idle.record.id]);
    // B's cached answer is gone: it rejects the key now; A still verifies it.
    let reply = whoami(&app_b, key).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.code(), "invalid_key");
    assert_eq!(whoami(&app_a, key).await.status, 200);
    assert_eq!(whoami(&app_only_new, key).await.status, 200);
    // The idle key was revoked: no instance accepts it.
    let idle_key = idle.key.expose().as_bytes();
    assert_eq!(whoami(&app_a, idle_key).await.status, 401);
    assert_eq!(whoami(&app_b, idle_key).await.status, 401);
    assert_eq!(
        store
            .get(idle.record.id)
            .await
            .unwrap()
            .unwrap()
            .state(OffsetDateTime::now_utc()),
        KeyState::Revoked
    );
}

async fn delete_returns_the_row_and_frees_the_digest(store: Store) {
    let record = full();
    let other = plain("users", "keep");
    store.insert(&record).await.unwrap();
    store.insert(&other).await.unwrap();
    assert_eq!(store.delete(record.id).await.unwrap(), Some(record.clone()));
    assert_eq!(store.find_by_digest(&record.digest).await.unwrap(), None);
    assert_eq!(store.get(record.id).await.unwrap(), None);
    assert_eq!(store.delete(record.id).await.unwrap(), None);
    assert_eq!(store.get(other.id).await.unwrap(), Some(other));

    let reuse = KeyRecord {
        digest: record.digest,
        ..plain("users", "new")
    };
    store.insert(&reuse).await.unwrap();
    assert_eq!(
        store.find_by_digest(&record.digest).await.unwrap(),
        Some(reuse)
    );
}

async fn list_paginates_in_id_order(store: Store) {
    let mut records: Vec<KeyRecord> = (0..23).map(|_| plain("pages", "p")).collect();
    let mut expected: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    expected.sort();
    // Insert out of order: listings follow ids, not insertion order.
    records.reverse();
    records.swap(3, 17);
    for r in &records {
        store.insert(r).await.unwrap();
    }
    store.insert(&plain("elsewhere", "p")).await.unwrap();

    let mut q = KeyQuery {
        collection: Some("pages".into()),
        limit: 5,
        ..query()
    };
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    loop {
        let page = store.list(&q).await.unwrap();
        sizes.push(page.items.len());
        seen.extend(page.items.iter().map(|r| r.id));
        match page.next_cursor {
            Some(cursor) => {
                assert_eq!(Some(cursor), page.items.last().map(|r| r.id));
                q.after = Some(cursor);
            }
            None => break,
        }
    }
    assert_eq!(sizes, [5, 5, 5, 5, 3]);
    assert_eq!(seen, expected, "ordered, no duplicates, no gaps");

    // A page that ends exactly at the last record has no cursor.
    let whole = store
        .list(&KeyQuery {
            collection: Some("pages".into()),
            limit: 23,
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(whole.items.len(), 23);
    assert_eq!(whole.next_cursor, None);
    let first = store
        .list(&KeyQuery {
            collection: Some("pages".into()),
            limit: 22,
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(first.next_cursor, Some(expected[21]));
    let rest = store
        .list(&KeyQuery {
            collection: Some("pages".into()),
            after: first.next_cursor,
            limit: 22,
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(
        rest.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        [expected[22]]
    );
    assert_eq!(rest.next_cursor, None);

    // A cursor past everything gives an empty last page.
    let empty = store
        .list(&KeyQuery {
            after: Some(Uuid::max()),
            ..query()
        })
        .await
        .unwrap();
    assert!(empty.items.is_empty());
    assert_eq!(empty.next_cursor, None);
}

async fn list_filters_by_collection_subject_environment_and_state(store: Store) {
    let now = datetime!(2032-01-01 0:00 UTC);
    let make = |collection: &str,
                subject: &str,
                expires: Option<OffsetDateTime>,
                revoked: bool,
                disabled: bool| KeyRecord {
        expires_at: expires,
        revoked_at: revoked.then_some(now - Duration::days(1)),
        disabled,
        ..plain(collection, subject)
    };
    let past = Some(now - Duration::seconds(1));
    let future = Some(now + Duration::microseconds(1));
    let cases = [
        (
            "never expires",
            make("users", "alice", None, false, false),
            KeyState::Active,
        ),
        (
            "expires later",
            make("teams", "bob", future, false, false),
            KeyState::Active,
        ),
        (
            "expires now",
            make("users", "bob", Some(now), false, false),
            KeyState::Expired,
        ),
        (
            "expired",
            make("teams", "alice", past, false, false),
            KeyState::Expired,
        ),
        (
            "revoked",
            make("users", "alice", future, true, false),
            KeyState::Revoked,
        ),
        (
            "revoked wins",
            make("teams", "bob", past, true, true),
            KeyState::Revoked,
        ),
        (
            "disabled",
            make("users", "bob", None, false, true),
            KeyState::Disabled,
        ),
        (
            "disabled wins",
            make("teams", "alice", past, false, true),
            KeyState::Disabled,
        ),
    ];
    for (name, record, state) in &cases {
        assert_eq!(record.state(now), *state, "fixture {name}");
        store.insert(record).await.unwrap();
    }
    let records: Vec<&KeyRecord> = cases.iter().map(|(_, r, _)| r).collect();
    let expect = |keep: &dyn Fn(&KeyRecord) -> bool| -> Vec<Uuid> {
        let ids: BTreeSet<Uuid> = records.iter().filter(|r| keep(r)).map(|r| r.id).collect();
        ids.into_iter().collect()
    };

    for state in [
        KeyState::Active,
        KeyState::Expired,
        KeyState::Revoked,
        KeyState::Disabled,
    ] {
        let q = KeyQuery {
            state: Some(state),
            now,
            limit: 1,
            ..KeyQuery::new()
        };
        let got = list_all(&store, q).await;
        assert_eq!(got.len(), 2, "{state:?}");
        assert_eq!(got, expect(&|r| r.state(now) == state), "{state:?}");
    }

    // Judged at `query.now`, not the wall clock: a day later "expires later" is expired too.
    let later = KeyQuery {
        state: Some(KeyState::Expired),
        now: now + Duration::days(1),
        ..KeyQuery::new()
    };
    assert_eq!(list_all(&store, later).await.len(), 3);

    let by_collection = KeyQuery {
        collection: Some("users".into()),
        now,
        limit: 3,
        ..KeyQuery::new()
    };
    assert_eq!(
        list_all(&store, by_collection).await,
        expect(&|r| r.collection == "users")
    );
    let by_subject = KeyQuery {
        subject: Some("bob".into()),
        now,
        ..KeyQuery::new()
    };
    assert_eq!(
        list_all(&store, by_subject).await,
        expect(&|r| r.subject == "bob")
    );
    let combined = KeyQuery {
        collection: Some("teams".into()),
        subject: Some("alice".into()),
        state: Some(KeyState::Disabled),
        now,
        ..KeyQuery::new()
    };
    let got = list_all(&store, combined).await;
    assert_eq!(got, [cases[7].1.id]);
    let none = KeyQuery {
        collection: Some("nobody".into()),
        now,
        ..KeyQuery::new()
    };
    assert!(list_all(&store, none).await.is_empty());

    // Every fixture above is `live`: add `test` keys, one of them bob's.
    let test_keys = [
        KeyRecord {
            environment: "test".into(),
            ..plain("users", "bob")
        },
        KeyRecord {
            environment: "test".into(),
            ..plain("teams", "carol")
        },
    ];
    for record in &test_keys {
        store.insert(record).await.unwrap();
    }
    let by_environment = KeyQuery {
        environment: Some("test".into()),
        now,
        limit: 1,
        ..KeyQuery::new()
    };
    let mut want: Vec<Uuid> = test_keys.iter().map(|r| r.id).collect();
    want.sort();
    assert_eq!(list_all(&store, by_environment).await, want);
    let live_bob = KeyQuery {
        environment: Some("live".into()),
        subject: Some("bob".into()),
        now,
        ..KeyQuery::new()
    };
    assert_eq!(
        list_all(&store, live_bob).await,
        expect(&|r| r.subject == "bob")
    );
}

async fn list_clamps_the_limit(store: Store) {
    for _ in 0..3 {
        store.insert(&plain("users", "c")).await.unwrap();
    }
    let page = store
        .list(&KeyQuery {
            limit: 0,
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.next_cursor.is_some());
    let page = store
        .list(&KeyQuery {
            limit: u32::MAX,
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(page.items.len(), 3);
    assert_eq!(page.next_cursor, None);
}

async fn record_usage_accumulates(store: Store) {
    let fresh = plain("users", "usage");
    let used = full();
    store.insert(&fresh).await.unwrap();
    store.insert(&used).await.unwrap();
    let (t0, t1, t2) = (
        BASE - Duration::days(1),
        BASE + Duration::days(1),
        BASE + Duration::days(2),
    );
    let usage = |id, at, uses| KeyUsage {
        id,
        last_used_at: at,
        uses,
    };

    store
        .record_usage(&[usage(fresh.id, t1, 3), usage(Uuid::now_v7(), t2, 5)])
        .await
        .unwrap();
    let got = store.get(fresh.id).await.unwrap().unwrap();
    assert_eq!((got.use_count, got.last_used_at), (3, Some(t1)));

    // An older use adds to the count but does not move last_used_at back.
    store.record_usage(&[usage(fresh.id, t0, 2)]).await.unwrap();
    let got = store.get(fresh.id).await.unwrap().unwrap();
    assert_eq!((got.use_count, got.last_used_at), (5, Some(t1)));

    // Several entries for one key in a batch all count; the latest wins.
    store
        .record_usage(&[
            usage(fresh.id, t2, 1),
            usage(used.id, t0, 7),
            usage(fresh.id, t1, 4),
        ])
        .await
        .unwrap();
    store.record_usage(&[]).await.unwrap();

    let expected_fresh = KeyRecord {
        use_count: 10,
        last_used_at: Some(t2),
        ..fresh.clone()
    };
    assert_eq!(store.get(fresh.id).await.unwrap(), Some(expected_fresh));
    // The full record's earlier last_used_at (BASE + 2h) is later than t0: kept.
    let expected_used = KeyRecord {
        use_count: used.use_count + 7,
        ..used.clone()
    };
    assert_eq!(store.get(used.id).await.unwrap(), Some(expected_used));
}

/// A batch of more rows than a SQL store sends in one statement: every known key is updated
/// exactly once whatever the batch order, duplicates add up, unknown ids are ignored and
/// `last_used_at` only moves forward.
async fn record_usage_in_bulk(store: Store) {
    let (records, untouched) = insert_bulk_keys(&store, 2_500).await;
    let later = BASE + Duration::hours(1);
    let mut batch: Vec<KeyUsage> = records
        .iter()
        .enumerate()
        .map(|(i, r)| KeyUsage {
            id: r.id,
            last_used_at: later,
            uses: i as u64 + 1,
        })
        .collect();
    // An earlier duplicate (adds, does not move last_used_at back) and unknown ids.
    batch.push(KeyUsage {
        id: records[0].id,
        last_used_at: BASE - Duration::days(3),
        uses: 1,
    });
    for _ in 0..10 {
        batch.push(KeyUsage {
            id: Uuid::now_v7(),
            last_used_at: later,
            uses: 1,
        });
    }
    batch.reverse();
    store.record_usage(&batch).await.unwrap();

    for (i, r) in records.iter().enumerate() {
        let uses = i as u64 + 1 + u64::from(i == 0);
        let expected = KeyRecord {
            use_count: r.use_count + uses,
            last_used_at: r.last_used_at.max(Some(later)),
            ..r.clone()
        };
        assert_eq!(store.get(r.id).await.unwrap(), Some(expected), "key {i}");
    }
    assert_eq!(store.get(untouched.id).await.unwrap(), Some(untouched));
}

/// Inserts `count` keys with a mix of usage histories (never used; used before, at and after
/// `BASE + 1h`), and one more key that tests leave out of their batches.
async fn insert_bulk_keys(store: &Store, count: usize) -> (Vec<KeyRecord>, KeyRecord) {
    let later = BASE + Duration::hours(1);
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let mut record = plain("users", &format!("bulk-{i}"));
        (record.use_count, record.last_used_at) = match i % 4 {
            0 => (0, None),
            1 => (i as u64, Some(BASE - Duration::days(1))),
            2 => (i as u64, Some(later)),
            _ => (i as u64, Some(later + Duration::days(1))),
        };
        store.insert(&record).await.unwrap();
        records.push(record);
    }
    let mut untouched = plain("users", "bulk-untouched");
    (untouched.use_count, untouched.last_used_at) = (3, Some(BASE));
    store.insert(&untouched).await.unwrap();
    (records, untouched)
}

/// SQL stores keep counts in a signed 64-bit column: a bulk batch saturates at `i64::MAX`,
/// whether the stored count or the batch's own count overflows.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
/// A keyless event (`KeyChange::Event`) must name its action: without one the store refuses
/// it and records nothing, rather than sealing an event under an action it made up.
async fn a_keyless_event_without_an_action_is_refused(store: Store) {
    use keywarden::audit::{Actor, AuditQuery, AuditSealer, ChangeContext};
    use keywarden::store::{AuditWrite, KeyChange};

    let ring = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
    let sealer = AuditSealer::new(&ring);
    let context = ChangeContext::new(Actor::Cli);
    let details = serde_json::Map::new();
    let write = |action| AuditWrite {
        sealer: &sealer,
        context: &context,
        at: BASE,
        action,
        details: &details,
    };
    let events = || async { store.audit_events(&AuditQuery::default()).await.unwrap() };

    let err = store
        .apply_audited(KeyChange::Event, &write(None))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Other, "{err}");
    assert!(events().await.items.is_empty(), "nothing was recorded");

    let action = "secret.retired".parse().unwrap();
    let applied = store
        .apply_audited(KeyChange::Event, &write(Some(action)))
        .await
        .unwrap();
    assert_eq!(applied.event.map(|e| e.action), Some(action));
    assert_eq!(events().await.items.len(), 1);
}

async fn sql_bulk_usage_saturates_at_i64_max(store: Store) {
    const MAX: u64 = i64::MAX as u64;
    let later = BASE + Duration::hours(1);
    let mut records = Vec::new();
    for (i, use_count) in [MAX - 3, MAX, 5, 0]
        .into_iter()
        .cycle()
        .take(1_200)
        .enumerate()
    {
        let mut record = plain("users", &format!("saturate-{i}"));
        record.use_count = use_count;
        store.insert(&record).await.unwrap();
        records.push(record);
    }
    let batch: Vec<KeyUsage> = records
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            // The key at 2 mod 4 gets a batch count past u64::MAX (two entries).
            let uses = if i % 4 == 2 { [u64::MAX, 9] } else { [10, 0] };
            uses.map(|uses| KeyUsage {
                id: r.id,
                last_used_at: later,
                uses,
            })
        })
        .collect();
    store.record_usage(&batch).await.unwrap();
    for (i, r) in records.iter().enumerate() {
        let got = store.get(r.id).await.unwrap().unwrap();
        let expected = match i % 4 {
            0..=2 => MAX,
            _ => 10,
        };
        assert_eq!(
            (got.use_count, got.last_used_at),
            (expected, Some(later)),
            "key {i}"
        );
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_bulk_usage_saturates_at_i64_max() {
    with_sqlite_file(sql_bulk_usage_saturates_at_i64_max).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_bulk_usage_saturates_at_i64_max() {
    with_postgres(sql_bulk_usage_saturates_at_i64_max).await;
}

/// The time of one `record_usage` of 10,000 rows (the usage flush of a busy instance), printed
/// rather than asserted: `cargo test --release --all-features --test store_conformance
/// usage_flush_timing -- --ignored --nocapture`.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
async fn time_usage_flush(store: Store) {
    const ROWS: usize = 10_000;
    const RUNS: u32 = 7;
    let (records, _) = insert_bulk_keys(&store, ROWS).await;
    let mut times = Vec::new();
    for run in 0..RUNS {
        let usage: Vec<KeyUsage> = records
            .iter()
            .map(|r| KeyUsage {
                id: r.id,
                last_used_at: BASE + Duration::hours(2) + Duration::seconds(run.into()),
                uses: 1,
            })
            .collect();
        let started = std::time::Instant::now();
        store.record_usage(&usage).await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "record_usage of {ROWS} rows: {:?} (median of {RUNS})",
        times[times.len() / 2]
    );
}

#[cfg(feature = "sqlite")]
#[tokio::test]
#[ignore = "a timing, not a test"]
async fn sqlite_usage_flush_timing() {
    with_sqlite_file(time_usage_flush).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
#[ignore = "a timing, not a test"]
async fn postgres_usage_flush_timing() {
    with_postgres(time_usage_flush).await;
}

// ---------------------------------------------------------------------------------------------
// Credits
// ---------------------------------------------------------------------------------------------

/// An instant at the millisecond, as refill schedules keep it.
fn millis(at: OffsetDateTime) -> i128 {
    at.unix_timestamp_nanos() / 1_000_000
}

fn with_credits(credits: Credits) -> KeyRecord {
    KeyRecord {
        credits: Some(credits),
        ..plain("users", "credits")
    }
}

async fn credits_are_leased_and_returned(store: Store) {
    let record = with_credits(Credits::new(500));
    store.insert(&record).await.unwrap();
    assert_eq!(store.get(record.id).await.unwrap(), Some(record.clone()));

    // An eighth of the balance, at least what is needed, at most what is wanted.
    let lease = store
        .lease_credits(record.id, 1, 100, BASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((lease.granted, lease.remaining, lease.period), (62, 438, 0));
    assert_eq!(lease.period_ends_at, None, "no refill");
    let read = store.get(record.id).await.unwrap().unwrap();
    assert_eq!(
        read.credits,
        Some(Credits::new(438)),
        "the balance without the lease"
    );
    // Leasing changes nothing a cache answers: the record's version stays.
    assert_eq!(read.updated_at, record.updated_at);

    // Unspent credits go back, once, and only to the lease's generation and period.
    assert!(store
        .return_credits(record.id, 10, lease.generation, 0)
        .await
        .unwrap());
    assert!(!store
        .return_credits(record.id, 10, lease.generation + 1, 0)
        .await
        .unwrap());
    assert!(!store
        .return_credits(record.id, 10, lease.generation, 1)
        .await
        .unwrap());
    assert_eq!(
        store.get(record.id).await.unwrap().unwrap().credits,
        Some(Credits::new(448))
    );

    // Fewer left than needed: nothing is taken.
    let big = store
        .lease_credits(record.id, 449, 1000, BASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((big.granted, big.remaining), (0, 448));
    let all = store
        .lease_credits(record.id, 448, 448, BASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((all.granted, all.remaining), (448, 0));

    // No credits, or no key: no lease.
    let unlimited = plain("users", "free");
    store.insert(&unlimited).await.unwrap();
    assert_eq!(
        store
            .lease_credits(unlimited.id, 1, 10, BASE)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .lease_credits(Uuid::now_v7(), 1, 10, BASE)
            .await
            .unwrap(),
        None
    );
    assert!(!store.return_credits(Uuid::now_v7(), 1, 1, 0).await.unwrap());

    // Deleting the key deletes its credits.
    store.delete(record.id).await.unwrap();
    assert_eq!(
        store.lease_credits(record.id, 1, 10, BASE).await.unwrap(),
        None
    );
}

async fn credits_refill_sets_the_balance_each_period(store: Store) {
    let refill: Refill = "10/day".parse().unwrap();
    let record = with_credits(Credits::new(3).with_refill(refill));
    store.insert(&record).await.unwrap();
    let day = Duration::days(1);

    let first = store
        .lease_credits(record.id, 1, 100, BASE + Duration::hours(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.granted, first.remaining, first.period), (1, 2, 0));
    assert_eq!(first.period_ends_at.map(millis), Some(millis(BASE + day)));

    // A new period sets the balance to the refill amount (unused credits do not carry over).
    let second = store
        .lease_credits(record.id, 1, 100, BASE + day + Duration::seconds(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((second.granted, second.remaining, second.period), (1, 9, 1));
    assert_eq!(
        second.period_ends_at.map(millis),
        Some(millis(BASE + day * 2))
    );
    // The first period's lease is void.
    assert!(!store
        .return_credits(record.id, 1, first.generation, first.period)
        .await
        .unwrap());
    // A clock stepped back does not go back a period, nor refill twice.
    let back = store
        .lease_credits(record.id, 1, 1, BASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((back.granted, back.remaining, back.period), (1, 8, 1));
    // Skipped periods refill once, to the amount.
    let later = store
        .lease_credits(record.id, 1, 1, BASE + day * 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((later.granted, later.remaining, later.period), (1, 9, 10));
    assert_eq!(
        store.get(record.id).await.unwrap().unwrap().credits,
        Some(Credits::new(9).with_refill(refill))
    );
}

async fn setting_credits_voids_earlier_leases(store: Store) {
    let record = with_credits(Credits::new(100));
    store.insert(&record).await.unwrap();
    let lease = store
        .lease_credits(record.id, 1, 10, BASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.granted, 10);

    let t1 = BASE + Duration::minutes(1);
    let set = KeyPatch {
        credits: Some(Some(5)),
        ..KeyPatch::default()
    };
    let updated = store.update(record.id, &set, t1).await.unwrap().unwrap();
    assert_eq!(updated.credits, Some(Credits::new(5)));
    assert!(
        !store
            .return_credits(record.id, 10, lease.generation, lease.period)
            .await
            .unwrap(),
        "a lease of credits set before is void"
    );
    let next = store
        .lease_credits(record.id, 1, 10, t1)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(next.generation, lease.generation);
    assert_eq!((next.granted, next.remaining), (1, 4));

    // A refill alone keeps the balance, restarts the schedule from now, and voids leases.
    let t2 = t1 + Duration::minutes(1);
    let refill = KeyPatch {
        credit_refill: Some(Some("50/h".parse().unwrap())),
        ..KeyPatch::default()
    };
    let updated = store.update(record.id, &refill, t2).await.unwrap().unwrap();
    assert_eq!(
        updated.credits,
        Some(Credits::new(4).with_refill("50/h".parse().unwrap()))
    );
    assert!(!store
        .return_credits(record.id, 1, next.generation, next.period)
        .await
        .unwrap());
    let hourly = store
        .lease_credits(record.id, 1, 1, t2 + Duration::minutes(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((hourly.remaining, hourly.period), (3, 0));
    assert_eq!(
        hourly.period_ends_at.map(millis),
        Some(millis(t2 + Duration::hours(1)))
    );

    // Unlimited: no credits, no leases; a refill on a key without credits starts it at the
    // refill's amount.
    let unlimited = KeyPatch {
        credits: Some(None),
        ..KeyPatch::default()
    };
    let updated = store
        .update(record.id, &unlimited, t2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.credits, None);
    assert_eq!(
        store.lease_credits(record.id, 1, 1, t2).await.unwrap(),
        None
    );
    let updated = store.update(record.id, &refill, t2).await.unwrap().unwrap();
    assert_eq!(
        updated.credits,
        Some(Credits::new(50).with_refill("50/h".parse().unwrap()))
    );
    assert_eq!(store.get(record.id).await.unwrap(), Some(updated));
}

async fn concurrent_leases_never_hand_out_more_than_the_balance(store: Store) {
    let record = with_credits(Credits::new(1_000));
    store.insert(&record).await.unwrap();
    let barrier = Arc::new(Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (store, barrier, id) = (store.clone(), barrier.clone(), record.id);
            tokio::spawn(async move {
                barrier.wait().await;
                let mut taken = 0;
                loop {
                    let lease = store.lease_credits(id, 1, 7, BASE).await.unwrap().unwrap();
                    if lease.granted == 0 {
                        return taken;
                    }
                    taken += lease.granted;
                }
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, 1_000, "every credit leased exactly once");
    assert_eq!(
        store.get(record.id).await.unwrap().unwrap().credits,
        Some(Credits::new(0))
    );
}

// ---------------------------------------------------------------------------------------------
// Owner policies
// ---------------------------------------------------------------------------------------------

/// The keys the feed names after `after` (`None`: the store keeps no feed).
async fn fed_keys(store: &Store, after: u64) -> Option<BTreeSet<Uuid>> {
    let page = store.change_feed(after, 1_000).await.unwrap()?;
    Some(
        page.changes
            .iter()
            .filter_map(|entry| match entry.change {
                keywarden::store::StoreChange::Key(id) => Some(id),
                _ => None,
            })
            .collect(),
    )
}

async fn feed_head(store: &Store) -> u64 {
    store
        .change_feed(0, 1)
        .await
        .unwrap()
        .map_or(0, |page| page.head)
}

async fn owner_policies_are_kept_read_with_keys_and_fed(store: Store) {
    let (a1, a2, bob) = (
        plain("users", "alice"),
        plain("users", "alice"),
        plain("users", "bob"),
    );
    for record in [&a1, &a2, &bob] {
        store.insert(record).await.unwrap();
    }
    assert_eq!(store.owner_policy("users", "alice").await.unwrap(), None);
    let rate: keywarden::ratelimit::RateLimitPolicy = "600/min".parse().unwrap();
    let before = feed_head(&store).await;
    let set = keywarden::store::OwnerPolicyUpdate::default()
        .rate_limit(Some(rate))
        .credits(Some(100));
    let policy = store
        .set_owner_policy("users", "alice", &set, BASE)
        .await
        .unwrap();
    assert_eq!(
        (
            policy.collection.as_str(),
            policy.subject.as_str(),
            policy.rate_limit,
            policy.credits
        ),
        ("users", "alice", Some(rate), Some(Credits::new(100)))
    );
    assert_eq!(policy.updated_at, BASE);
    assert_eq!(
        store.owner_policy("users", "alice").await.unwrap(),
        Some(policy.clone())
    );
    // Every key of the owner is read with the policy, and fed: caches re-read them.
    for id in [a1.id, a2.id] {
        let read = store.get(id).await.unwrap().unwrap();
        assert_eq!(read.owner.rate_limit, Some(rate));
        assert_eq!(read.owner.credits, Some(None), "credits without a refill");
    }
    assert!(store.get(bob.id).await.unwrap().unwrap().owner.is_empty());
    if let Some(fed) = fed_keys(&store, before).await {
        assert_eq!(
            fed,
            BTreeSet::from([a1.id, a2.id]),
            "the owner's keys, only"
        );
    }
    // Found by digest too (the request path's read).
    let found = store.find_by_digest(&a1.digest).await.unwrap().unwrap();
    assert_eq!(found.owner.rate_limit, Some(rate));
    // A key created later carries the policy as well.
    let a3 = plain("users", "alice");
    store.insert(&a3).await.unwrap();
    assert_eq!(
        store.get(a3.id).await.unwrap().unwrap().owner.rate_limit,
        Some(rate)
    );

    // Changing the rate limit alone keeps the balance; removing it keeps the credits.
    let t1 = BASE + Duration::minutes(1);
    let pool = policy.pool();
    store.lease_owner_credits(pool, 1, 10, t1).await.unwrap();
    let generation = store.get(a1.id).await.unwrap().unwrap().owner.generation;
    let unrated = store
        .set_owner_policy(
            "users",
            "alice",
            &keywarden::store::OwnerPolicyUpdate::default().rate_limit(None),
            t1,
        )
        .await
        .unwrap();
    assert_eq!(unrated.rate_limit, None);
    assert_eq!(
        unrated.credits,
        Some(Credits::new(90)),
        "the lease is not counted"
    );
    assert_eq!(unrated.updated_at, t1);
    let read = store.get(a1.id).await.unwrap().unwrap();
    assert_eq!(
        (read.owner.rate_limit, read.owner.credits),
        (None, Some(None))
    );
    assert_eq!(
        read.owner.generation, generation,
        "a rate limit change keeps the credits' generation"
    );

    // Listed by collection and subject.
    let teams = store
        .set_owner_policy(
            "teams",
            "acme",
            &keywarden::store::OwnerPolicyUpdate::default().rate_limit(Some(rate)),
            t1,
        )
        .await
        .unwrap();
    assert_eq!(teams.credits, None);
    let all = store.list_owner_policies(None).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|p| (p.collection.as_str(), p.subject.as_str()))
            .collect::<Vec<_>>(),
        [("teams", "acme"), ("users", "alice")]
    );
    let users = store.list_owner_policies(Some("users")).await.unwrap();
    assert_eq!(users, vec![unrated.clone()]);

    // Deleting the policy: the keys carry none, and are fed again.
    let before = feed_head(&store).await;
    let removed = store.delete_owner_policy("users", "alice").await.unwrap();
    assert_eq!(removed, Some(unrated));
    assert!(store.get(a2.id).await.unwrap().unwrap().owner.is_empty());
    if let Some(fed) = fed_keys(&store, before).await {
        assert_eq!(fed, BTreeSet::from([a1.id, a2.id, a3.id]));
    }
    assert_eq!(store.owner_policy("users", "alice").await.unwrap(), None);
    assert_eq!(
        store.lease_owner_credits(pool, 1, 1, t1).await.unwrap(),
        None,
        "the shared credits went with the policy"
    );
    assert_eq!(
        store.delete_owner_policy("users", "alice").await.unwrap(),
        None
    );
}

async fn owner_credits_are_leased_returned_and_voided(store: Store) {
    use keywarden::store::OwnerPolicyUpdate;
    let key = plain("users", "carol");
    store.insert(&key).await.unwrap();
    let policy = store
        .set_owner_policy(
            "users",
            "carol",
            &OwnerPolicyUpdate::default().credits(Some(500)),
            BASE,
        )
        .await
        .unwrap();
    let pool = policy.pool();
    let first_generation = store.get(key.id).await.unwrap().unwrap().owner.generation;
    assert_ne!(first_generation, 0);
    // Like a key's: an eighth of the balance, at least what is needed, at most what is wanted.
    let lease = store
        .lease_owner_credits(pool, 1, 100, BASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((lease.granted, lease.remaining, lease.period), (62, 438, 0));
    // Leases change nothing a cache answers: the key's version stays.
    assert_eq!(
        store.get(key.id).await.unwrap().unwrap().updated_at,
        key.updated_at
    );
    assert!(store
        .return_owner_credits(pool, 10, lease.generation, 0)
        .await
        .unwrap());
    assert!(!store
        .return_owner_credits(pool, 10, lease.generation + 1, 0)
        .await
        .unwrap());
    assert_eq!(
        store
            .owner_policy("users", "carol")
            .await
            .unwrap()
            .unwrap()
            .credits,
        Some(Credits::new(448))
    );
    // A key's own credits and its owner's are separate balances.
    assert_eq!(store.lease_credits(key.id, 1, 1, BASE).await.unwrap(), None);

    // A new balance voids the lease; a refill alone keeps the balance and restarts periods.
    let t1 = BASE + Duration::minutes(1);
    let set = store
        .set_owner_policy(
            "users",
            "carol",
            &OwnerPolicyUpdate::default().credits(Some(5)),
            t1,
        )
        .await
        .unwrap();
    assert_eq!(set.credits, Some(Credits::new(5)));
    assert_ne!(
        store.get(key.id).await.unwrap().unwrap().owner.generation,
        first_generation,
        "keys are read with the new generation"
    );
    assert!(!store
        .return_owner_credits(pool, 10, lease.generation, 0)
        .await
        .unwrap());
    let refill: Refill = "10/day".parse().unwrap();
    let refilled = store
        .set_owner_policy(
            "users",
            "carol",
            &OwnerPolicyUpdate::default().refill(Some(refill)),
            t1,
        )
        .await
        .unwrap();
    assert_eq!(refilled.credits, Some(Credits::new(5).with_refill(refill)));
    assert_eq!(
        store.get(key.id).await.unwrap().unwrap().owner.credits,
        Some(Some(refill))
    );
    let next_day = store
        .lease_owner_credits(pool, 1, 1, t1 + Duration::days(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (next_day.granted, next_day.remaining, next_day.period),
        (1, 9, 1)
    );

    // No credits: no lease; a refill on an owner without credits starts at its amount.
    let removed = store
        .set_owner_policy(
            "users",
            "carol",
            &OwnerPolicyUpdate::default().credits(None),
            t1,
        )
        .await
        .unwrap();
    assert_eq!(removed.credits, None);
    assert!(store.get(key.id).await.unwrap().unwrap().owner.is_empty());
    assert_eq!(
        store.lease_owner_credits(pool, 1, 1, t1).await.unwrap(),
        None
    );
    let restarted = store
        .set_owner_policy(
            "users",
            "carol",
            &OwnerPolicyUpdate::default().refill(Some(refill)),
            t1,
        )
        .await
        .unwrap();
    assert_eq!(
        restarted.credits,
        Some(Credits::new(10).with_refill(refill))
    );
    let after = store
        .lease_owner_credits(pool, 1, 1, t1)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(
        after.generation, lease.generation,
        "never a generation reused"
    );
    assert_eq!(
        store
            .lease_owner_credits(Uuid::now_v7(), 1, 1, t1)
            .await
            .unwrap(),
        None
    );
}

async fn concurrent_owner_leases_never_hand_out_more_than_the_balance(store: Store) {
    let policy = store
        .set_owner_policy(
            "users",
            "dave",
            &keywarden::store::OwnerPolicyUpdate::default().credits(Some(1_000)),
            BASE,
        )
        .await
        .unwrap();
    let pool = policy.pool();
    let barrier = Arc::new(Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut taken = 0;
                loop {
                    let lease = store
                        .lease_owner_credits(pool, 1, 7, BASE)
                        .await
                        .unwrap()
                        .unwrap();
                    if lease.granted == 0 {
                        return taken;
                    }
                    taken += lease.granted;
                }
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, 1_000, "every shared credit leased exactly once");
}
