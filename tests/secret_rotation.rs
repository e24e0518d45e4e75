//! Application-secret rotation across instances: a key used on an instance holding the new
//! secret keeps verifying on instances still holding only the old one (a rolling deploy, a
//! rollback), and the previous-secret lookup follows the same rules as the current one.

mod support;

use std::sync::Arc;

use keywarden::{
    interop::PayloadScheme, Collection, KeyManager, KeyStore, MemoryStore, NewKey, SecretRing,
};
use support::{get_with, Fixture, OLD_SECRET, SECRET};

/// The old ring alone: an instance not yet deployed with the new secret, or rolled back.
fn old_ring() -> SecretRing {
    SecretRing::from_strs(OLD_SECRET, None).unwrap()
}

/// The new secret, with the old one as previous.
fn new_ring() -> SecretRing {
    SecretRing::from_strs(SECRET, Some(OLD_SECRET)).unwrap()
}

#[tokio::test]
async fn a_key_used_on_a_new_instance_still_verifies_on_an_old_one() {
    let store = Arc::new(MemoryStore::new());
    let a = Fixture::with_store(store.clone(), new_ring(), |b| b);
    let b = Fixture::with_store(store.clone(), old_ring(), |b| b);
    let created = b.key(NewKey::new("k", "alice")).await;
    let key = created.key.expose().as_bytes();

    let reply = get_with(&a.app(), "/whoami", &[("x-api-key", key)]).await;
    assert_eq!(reply.status, 200, "A accepts the key and re-digests it");
    // B has not seen the key yet: it looks it up after A's re-digest.
    let reply = get_with(&b.app(), "/whoami", &[("x-api-key", key)]).await;
    assert_eq!(
        reply.status,
        200,
        "B, on the old secret, still verifies the key: {}",
        reply.text()
    );
    // And again from a cold cache, any number of uses later on A.
    for _ in 0..3 {
        a.layer.invalidate_all();
        let reply = get_with(&a.app(), "/whoami", &[("x-api-key", key)]).await;
        assert_eq!(reply.status, 200);
    }
    b.layer.invalidate_all();
    let reply = get_with(&b.app(), "/whoami", &[("x-api-key", key)]).await;
    assert_eq!(reply.status, 200, "B after repeated uses on A");
    // A key created on A (new secret) is A's business; B never knew that secret.
    let fresh = a.key(NewKey::new("fresh", "bob")).await;
    let reply = get_with(
        &b.app(),
        "/whoami",
        &[("x-api-key", fresh.key.expose().as_bytes())],
    )
    .await;
    assert_eq!(reply.code(), "invalid_key");
}

/// Native rows filed under a foreign (Payload) collection's slug are ignored whichever secret
/// finds them: under the current secret (as before) and under a previous one.
#[tokio::test]
async fn native_rows_of_a_foreign_collection_are_ignored_under_previous_secrets_too() {
    let store = Arc::new(MemoryStore::new());
    // Filed under `users` by a tool that does not know `users` is Payload's: one made under
    // the old secret, one under the current.
    let old = KeyManager::new(store.clone(), old_ring())
        .create(NewKey::new("stray-old", "mallory").collection("users"))
        .await
        .unwrap();
    let current = KeyManager::new(store.clone(), new_ring())
        .create(NewKey::new("stray-current", "mallory").collection("users"))
        .await
        .unwrap();
    let native = KeyManager::new(store.clone(), old_ring())
        .create(NewKey::new("native", "alice").collection("services"))
        .await
        .unwrap();
    // A Payload source that holds no keys: only the native rows are in question here.
    #[derive(Debug)]
    struct EmptyPayload;
    #[async_trait::async_trait]
    impl keywarden::store::ForeignSource for EmptyPayload {
        async fn find(
            &self,
            _: &[keywarden::store::ForeignDigest],
        ) -> Result<Option<keywarden::store::KeyRecord>, keywarden::StoreError> {
            Ok(None)
        }
    }
    let payload_store: Arc<dyn keywarden::store::ForeignSource> = Arc::new(EmptyPayload);
    let layer = keywarden::ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(new_ring())
        .collection(Collection::new("services"))
        .collection(Collection::foreign(
            "users",
            PayloadScheme::new("payload-secret-for-the-foreign-collection").unwrap(),
            payload_store,
        ))
        .build()
        .unwrap();
    let app = support::app().layer(layer.clone());

    for (name, created) in [("current", &current), ("previous", &old)] {
        for (scheme, form) in [
            ("Bearer", format!("Bearer {}", created.key.expose())),
            ("API-Key", format!("users API-Key {}", created.key.expose())),
        ] {
            layer.invalidate_all();
            let reply = get_with(&app, "/whoami", &[("authorization", form.as_bytes())]).await;
            assert_eq!(
                reply.status,
                401,
                "{name} secret, {scheme}: {}",
                reply.text()
            );
            assert_eq!(reply.code(), "invalid_key", "{name}");
        }
    }
    // Not re-digested either: the row gained no digest under the current secret.
    let under_current = new_ring().digest(old.key.expose().as_bytes());
    assert_eq!(store.find_by_digest(&under_current).await.unwrap(), None);
    assert_eq!(
        store.get(old.record.id).await.unwrap().unwrap(),
        old.record,
        "the stray row is untouched"
    );
    // A native key of a native collection, under the previous secret, still verifies.
    let reply = get_with(
        &app,
        "/whoami",
        &[("x-api-key", native.key.expose().as_bytes())],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// The PostgreSQL trigger tells other instances when a key loses a digest (a retired secret),
/// and stays quiet when a key gains one (nothing cached can be wrong then).
#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_notifies_dropped_digests_but_not_added_ones() {
    use keywarden::{secret::SecretId, store::UnmigratedKeys, PostgresStore};
    let Some(url) = support::service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = support::unique("kw_digests");
    let store = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let created = KeyManager::new(Arc::new(store.clone()), new_ring())
        .create(NewKey::new("k", "alice"))
        .await
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(store.pool())
        .await
        .unwrap();
    listener.listen("keywarden_invalidate").await.unwrap();
    async fn next(listener: &mut sqlx::postgres::PgListener) -> Option<String> {
        tokio::time::timeout(std::time::Duration::from_millis(500), listener.recv())
            .await
            .ok()
            .map(|n| n.unwrap().payload().to_owned())
    }

    // A rolled-back instance (old secret current) adds an old-secret digest: no notice.
    let old_digest = old_ring().digest(created.key.expose().as_bytes());
    let old_id: SecretId = old_ring().current_id();
    assert!(store
        .add_digest(
            created.record.id,
            &created.record.digest,
            &old_digest,
            old_id
        )
        .await
        .unwrap());
    assert_eq!(next(&mut listener).await, None, "adding a digest is silent");

    // Retiring the old secret drops only that added digest: the key's record is unchanged,
    // and the digests table's trigger tells every instance.
    let outcome = store
        .retire_secret(
            old_id,
            UnmigratedKeys::Refuse,
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
    assert_eq!((outcome.dropped, outcome.affected.len()), (1, 1));
    assert_eq!(
        store.get(created.record.id).await.unwrap().unwrap(),
        created.record
    );
    assert_eq!(
        next(&mut listener).await,
        Some(format!("{schema} key {}", created.record.id))
    );
    drop(listener);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(store.pool())
        .await
        .unwrap();
}
