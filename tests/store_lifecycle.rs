//! The key lifecycle and secret rotation through the layer, on every store: memory, SQLite and
//! PostgreSQL (own schema per test). Also scans the raw stored data for plaintext keys.
#![cfg(all(feature = "sqlite", feature = "postgres"))]

mod support;

use std::sync::Arc;

use keywarden::{
    clock::ManualClock, ApiKeyLayer, Collection, ExpiresIn, KeyManager, KeyStore, MemoryStore,
    NewKey, PostgresStore, SecretRing, SqliteStore,
};
use support::{get_with, service_url, OLD_SECRET, SECRET};
use time::{Duration, OffsetDateTime};

/// A store plus whatever must be cleaned up after it.
struct Backend {
    name: &'static str,
    store: Arc<dyn KeyStore>,
    cleanup: Cleanup,
}

enum Cleanup {
    None,
    File(std::path::PathBuf),
    Schema(PostgresStore, String),
}

impl Backend {
    /// Every plaintext-bearing byte the store holds, as text.
    async fn raw_contents(&self) -> String {
        match &self.cleanup {
            Cleanup::None => format!("{:?}", self.store),
            Cleanup::File(path) => {
                let mut bytes = std::fs::read(path).unwrap();
                for suffix in ["-wal", "-shm"] {
                    let mut side = path.clone().into_os_string();
                    side.push(suffix);
                    if let Ok(more) = std::fs::read(&side) {
                        bytes.extend(more);
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Cleanup::Schema(pg, _) => {
                let rows: Vec<(String,)> =
                    sqlx::query_as("SELECT row_to_json(k)::text FROM keywarden_keys k")
                        .fetch_all(pg.pool())
                        .await
                        .unwrap();
                rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("\n")
            }
        }
    }

    async fn finish(self) {
        match self.cleanup {
            Cleanup::None => {}
            Cleanup::File(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
            }
            Cleanup::Schema(pg, schema) => {
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .execute(pg.pool())
                    .await
                    .unwrap();
            }
        }
    }
}

fn random_suffix() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
}

async fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend {
        name: "memory",
        store: Arc::new(MemoryStore::new()),
        cleanup: Cleanup::None,
    }];
    let path = std::env::temp_dir().join(format!("keywarden-lifecycle-{}.db", random_suffix()));
    let sqlite = SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    backends.push(Backend {
        name: "sqlite",
        store: Arc::new(sqlite),
        cleanup: Cleanup::File(path),
    });
    if let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") {
        let schema = format!("kw_lifecycle_{}", random_suffix());
        let pg = PostgresStore::connect_with_schema(&url, &schema)
            .await
            .unwrap();
        backends.push(Backend {
            name: "postgres",
            store: Arc::new(pg.clone()),
            cleanup: Cleanup::Schema(pg, schema),
        });
    }
    backends
}

fn layer(store: &Arc<dyn KeyStore>, secrets: SecretRing, clock: &ManualClock) -> ApiKeyLayer {
    ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(secrets)
        .clock(Arc::new(clock.clone()))
        .collection(Collection::new("users"))
        .build()
        .unwrap()
}

#[tokio::test]
async fn lifecycle_through_the_layer_on_every_store() {
    for backend in backends().await {
        let clock = ManualClock::new(OffsetDateTime::now_utc());
        let layer = layer(&backend.store, support::ring(), &clock);
        let manager = KeyManager::for_layer(&layer);
        let app = support::app().layer(layer.clone());
        let call = |key: String| {
            let app = app.clone();
            async move {
                let reply = get_with(&app, "/whoami", &[("x-api-key", key.as_bytes())]).await;
                if reply.status == 200 {
                    "ok".to_owned()
                } else {
                    reply.code()
                }
            }
        };
        let name = backend.name;

        // create → use → revoke
        let a = manager.create(NewKey::new("a", "alice")).await.unwrap();
        assert_eq!(call(a.key.expose().into()).await, "ok", "{name}");
        manager.revoke(a.record.id).await.unwrap();
        assert_eq!(call(a.key.expose().into()).await, "revoked_key", "{name}");

        // expire
        let b = manager
            .create(NewKey::new("b", "bob").expires_in(ExpiresIn::DAYS_7))
            .await
            .unwrap();
        assert_eq!(call(b.key.expose().into()).await, "ok", "{name}");
        clock.advance(Duration::days(7));
        assert_eq!(call(b.key.expose().into()).await, "expired_key", "{name}");

        // rotate: both work until the grace deadline, then only the new one
        let c = manager.create(NewKey::new("c", "carol")).await.unwrap();
        let c2 = manager
            .rotate(c.record.id, Duration::hours(1))
            .await
            .unwrap();
        assert_eq!(call(c.key.expose().into()).await, "ok", "{name}");
        assert_eq!(call(c2.key.expose().into()).await, "ok", "{name}");
        clock.advance(Duration::hours(1));
        assert_eq!(call(c.key.expose().into()).await, "expired_key", "{name}");
        assert_eq!(call(c2.key.expose().into()).await, "ok", "{name}");

        // delete
        manager.delete(c2.record.id).await.unwrap();
        assert_eq!(call(c2.key.expose().into()).await, "invalid_key", "{name}");

        // No plaintext anywhere in what the store holds.
        layer.flush_usage().await.unwrap();
        let raw = backend.raw_contents().await;
        assert!(
            raw.contains(&a.record.display_start),
            "{name}: the scan sees the rows"
        );
        for key in [&a.key, &b.key, &c.key, &c2.key] {
            let body = &key.expose()["kw_live_".len()..];
            assert!(
                !raw.contains(body),
                "{name}: a key body is stored in plaintext"
            );
            assert!(
                !raw.contains(&body[10..30]),
                "{name}: a key fragment is stored"
            );
        }
        assert!(!raw.contains(SECRET), "{name}");
        backend.finish().await;
    }
}

#[tokio::test]
async fn secret_rotation_keeps_every_key_on_every_store() {
    for backend in backends().await {
        let name = backend.name;
        let clock = ManualClock::new(OffsetDateTime::now_utc());
        let old_ring = SecretRing::from_strs(OLD_SECRET, None).unwrap();
        let before = layer(&backend.store, old_ring.clone(), &clock);
        let created = KeyManager::for_layer(&before)
            .create(NewKey::new("k", "alice"))
            .await
            .unwrap();
        assert_eq!(created.record.secret_id, old_ring.current_id());

        // B current, A previous: the key verifies and is re-digested under B.
        let rotated_ring = SecretRing::from_strs(SECRET, Some(OLD_SECRET)).unwrap();
        let during = layer(&backend.store, rotated_ring.clone(), &clock);
        let app = support::app().layer(during);
        let reply = get_with(
            &app,
            "/whoami",
            &[("x-api-key", created.key.expose().as_bytes())],
        )
        .await;
        assert_eq!(reply.status, 200, "{name}");
        // Re-digested: found under B too, and still under A (instances on A alone keep
        // verifying it).
        let under_b = rotated_ring.digest(created.key.expose().as_bytes());
        let stored = backend.store.find_by_digest(&under_b).await.unwrap();
        assert_eq!(
            stored.map(|r| r.id),
            Some(created.record.id),
            "{name}: re-digested"
        );
        let stored = backend.store.get(created.record.id).await.unwrap().unwrap();
        assert_eq!(stored.secret_id, old_ring.current_id(), "{name}");
        assert_eq!(
            backend
                .store
                .find_by_digest(&stored.digest)
                .await
                .unwrap()
                .map(|r| r.id),
            Some(created.record.id),
            "{name}: the old digest stays valid"
        );

        // A dropped from the ring: still verifies.
        let after = layer(
            &backend.store,
            SecretRing::from_strs(SECRET, None).unwrap(),
            &clock,
        );
        let app = support::app().layer(after);
        let reply = get_with(
            &app,
            "/whoami",
            &[("x-api-key", created.key.expose().as_bytes())],
        )
        .await;
        assert_eq!(reply.status, 200, "{name}");
        backend.finish().await;
    }
}
