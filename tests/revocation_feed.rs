//! Revocation that never silently degrades: the change feed in every store, polling without
//! LISTEN, replay after a lost connection instead of a cache flush, and bounded blindness.
//! Against the real PostgreSQL of this machine, with real `keywarden serve` processes reaching
//! it through a TCP proxy the tests cut.
#![cfg(all(
    feature = "postgres",
    feature = "sqlite",
    feature = "redis",
    feature = "cli"
))]

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keywarden::invalidation::InvalidationListener;
use keywarden::store::{
    FeedPage, KeyPage, KeyPatch, KeyQuery, KeyRecord, KeyUsage, StoreChange, StoreErrorKind,
};
use keywarden::{
    ApiKeyLayer, Collection, KeyManager, KeyStore, MemoryStore, NewKey, PostgresStore, StoreError,
};
use serde_json::Value;
use support::serve::ServeProcess;
use support::*;
use time::OffsetDateTime;
use uuid::Uuid;

/// The timing-sensitive tests take turns: on two cores, the 10,000-key warm-up beside a
/// propagation measurement would measure the machine, not the listener.
static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn layer_over(store: Arc<dyn KeyStore>) -> ApiKeyLayer {
    ApiKeyLayer::builder()
        .store(store)
        .secrets(ring())
        .collection(Collection::new("users"))
        // Only the feed or a notification can make an instance notice a change in time.
        .cache_ttl(Duration::from_secs(600))
        .usage_flush_interval(None)
        .build()
        .unwrap()
}

async fn feed_after(store: &dyn KeyStore, after: u64) -> FeedPage {
    store
        .change_feed(after, 1_000)
        .await
        .unwrap()
        .expect("a feed")
}

#[tokio::test]
async fn every_store_feeds_each_verification_change_in_commit_order() {
    for (name, store, pg) in every_store("feed").await {
        let layer = layer_over(store.clone());
        let manager = KeyManager::for_layer(&layer);
        let start = feed_after(&*store, u64::MAX).await.head;

        let created = manager
            .create(NewKey::new("feed", "alice").collection("users"))
            .await
            .unwrap();
        let id = created.record.id;
        let page = feed_after(&*store, start).await;
        let changes: Vec<StoreChange> = page.changes.iter().map(|c| c.change).collect();
        // SQLite also feeds an insert as a change of its key (`INSERT OR REPLACE`).
        let expected: &[StoreChange] = if name == "sqlite" {
            &[StoreChange::Created, StoreChange::Key(id)]
        } else {
            &[StoreChange::Created]
        };
        assert_eq!(changes, expected, "{name}");
        let after_create = page.head;

        // Usage changes no answer: no entry.
        store
            .record_usage(&[KeyUsage {
                id,
                last_used_at: OffsetDateTime::now_utc(),
                uses: 3,
            }])
            .await
            .unwrap();
        assert!(
            feed_after(&*store, after_create).await.changes.is_empty(),
            "{name}: usage updates are not fed"
        );

        manager.revoke(id).await.unwrap();
        manager.delete(id).await.unwrap();
        let page = feed_after(&*store, after_create).await;
        assert!(
            page.changes.len() >= 2
                && page
                    .changes
                    .iter()
                    .all(|c| c.change == StoreChange::Key(id)),
            "{name}: {page:?}"
        );
        assert!(
            page.changes.windows(2).all(|w| w[0].seq < w[1].seq),
            "{name}: sequences increase: {page:?}"
        );
        assert_eq!(page.head, page.changes.last().unwrap().seq, "{name}");
        // A page holds at most what was asked for, from the sequence asked for.
        let one = store.change_feed(start, 1).await.unwrap().unwrap();
        assert_eq!(one.changes.len(), 1, "{name}");
        assert_eq!(one.changes[0].change, StoreChange::Created, "{name}");

        if let Some((pg, _)) = &pg {
            // Plain SQL counts too: the trigger writes the feed, whoever changes a key.
            let other = manager
                .create(NewKey::new("sql", "bob").collection("users"))
                .await
                .unwrap();
            let before = feed_after(&*store, 0).await.head;
            sqlx::query("UPDATE keywarden_keys SET disabled = true WHERE id = $1")
                .bind(other.record.id)
                .execute(pg.pool())
                .await
                .unwrap();
            let page = feed_after(&*store, before).await;
            assert_eq!(
                page.changes.iter().map(|c| c.change).collect::<Vec<_>>(),
                [StoreChange::Key(other.record.id)]
            );
        }
        if let Some((pg, _)) = &pg {
            // TRUNCATE fires no row trigger: it is fed as "anything may have changed".
            let before = feed_after(&*store, 0).await.head;
            sqlx::query("TRUNCATE keywarden_keys CASCADE")
                .execute(pg.pool())
                .await
                .unwrap();
            let page = feed_after(&*store, before).await;
            assert!(
                page.changes.iter().any(|c| c.change == StoreChange::All),
                "{page:?}"
            );
        }
        if name != "memory" {
            // Pruning keeps the newest entry, so a reader can tell "nothing new" from "pruned".
            let head = feed_after(&*store, 0).await.head;
            let pruned = store
                .prune_changes(OffsetDateTime::now_utc() + time::Duration::hours(1))
                .await
                .unwrap();
            assert!(pruned >= 1, "{name}");
            let page = feed_after(&*store, 0).await;
            assert_eq!((page.oldest, page.head), (head, head), "{name}");
        }
        drop_schema(pg).await;
    }
}

/// A store whose feed and lookups can be switched off: the store "out of reach".
#[derive(Debug)]
struct Switchable {
    inner: Arc<dyn KeyStore>,
    down: AtomicBool,
    lookups: AtomicUsize,
}

impl Switchable {
    fn new(inner: Arc<dyn KeyStore>) -> Self {
        Self {
            inner,
            down: AtomicBool::new(false),
            lookups: AtomicUsize::new(0),
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::new(StoreErrorKind::Unavailable, "switched off"))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl KeyStore for Switchable {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(record).await
    }
    async fn find_by_digest(
        &self,
        digest: &keywarden::secret::Digest,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.find_by_digest(digest).await
    }
    async fn get(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get(id).await
    }
    async fn update(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        now: OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.update(id, patch, now).await
    }
    async fn add_digest(
        &self,
        id: Uuid,
        old: &keywarden::secret::Digest,
        new: &keywarden::secret::Digest,
        secret_id: keywarden::secret::SecretId,
    ) -> Result<bool, StoreError> {
        self.inner.add_digest(id, old, new, secret_id).await
    }
    async fn delete(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.delete(id).await
    }
    async fn list(&self, query: &KeyQuery) -> Result<KeyPage, StoreError> {
        self.inner.list(query).await
    }
    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        self.inner.record_usage(usage).await
    }
    async fn apply_audited(
        &self,
        change: keywarden::store::KeyChange<'_>,
        audit: &keywarden::store::AuditWrite<'_>,
    ) -> Result<keywarden::store::Applied, StoreError> {
        self.inner.apply_audited(change, audit).await
    }
    async fn change_feed(&self, after: u64, limit: u32) -> Result<Option<FeedPage>, StoreError> {
        self.check()?;
        self.inner.change_feed(after, limit).await
    }
}

async fn status(app: &axum::Router, key: &str) -> (u16, String) {
    let reply = get_with(app, "/whoami", &[("x-api-key", key.as_bytes())]).await;
    let code = if reply.status.is_success() {
        String::new()
    } else {
        reply.code()
    };
    (reply.status.as_u16(), code)
}

/// Instance B over a store that can be switched off, beside a manager (through instance A)
/// over the same data, and one key.
struct Instance {
    b_store: Arc<Switchable>,
    b: ApiKeyLayer,
    app_b: axum::Router,
    manager: KeyManager,
    key: keywarden::CreatedKey,
    /// Instance A, whose manager makes the changes.
    _a: ApiKeyLayer,
}

impl Instance {
    async fn new(name: &str) -> Self {
        let shared: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
        let b_store = Arc::new(Switchable::new(shared.clone()));
        let b = layer_over(b_store.clone());
        let app_b = app().layer(b.clone());
        let a = layer_over(shared);
        let manager = KeyManager::for_layer(&a);
        let key = manager
            .create(NewKey::new(name, "alice").collection("users"))
            .await
            .unwrap();
        Self {
            b_store,
            b,
            app_b,
            manager,
            key,
            _a: a,
        }
    }
}

/// A key revoked while an instance was blind is refused once it hears again: the entry its
/// blindness withheld stays cached, and the missed revocation is applied before the instance
/// counts as hearing, so the entry is never served in between.
#[tokio::test]
async fn a_key_revoked_while_blind_is_refused_once_the_instance_hears_again() {
    let Instance {
        b_store,
        b,
        app_b,
        manager,
        key,
        ..
    } = Instance::new("revoked-while-blind").await;
    let _listener = InvalidationListener::builder(&b)
        .poll_every(Duration::from_millis(50))
        .max_blind(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    assert_eq!(status(&app_b, key.key.expose()).await.0, 200);
    b_store.down.store(true, Ordering::SeqCst);
    let start = Instant::now();
    while b.stats().blind_since.is_none() {
        assert!(start.elapsed() < Duration::from_secs(5), "never blind");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    manager.revoke(key.record.id).await.unwrap();
    b_store.down.store(false, Ordering::SeqCst);
    // From the moment B hears again, the key is refused: never a 200 in between.
    let start = Instant::now();
    loop {
        let (code, kind) = status(&app_b, key.key.expose()).await;
        if b.stats().blind_since.is_none() || code == 401 {
            assert_eq!((code, kind.as_str()), (401, "revoked_key"));
            break;
        }
        assert_ne!(code, 200, "served while blind");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never heard again"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for _ in 0..20 {
        assert_eq!(
            status(&app_b, key.key.expose()).await,
            (401, "revoked_key".into())
        );
    }
}

#[tokio::test]
async fn a_blind_instance_stops_trusting_old_entries_and_says_since_when() {
    let Instance {
        b_store,
        b,
        app_b,
        key,
        ..
    } = Instance::new("blind").await;
    let listener = InvalidationListener::builder(&b)
        .poll_every(Duration::from_millis(100))
        .max_blind(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    assert_eq!(listener.path(), "poll");
    assert_eq!(status(&app_b, key.key.expose()).await.0, 200);
    assert_eq!(b.stats().blind_since, None);

    // The store goes out of reach: within max_blind the cached key is still served.
    b_store.down.store(true, Ordering::SeqCst);
    let cut = std::time::SystemTime::now();
    assert_eq!(status(&app_b, key.key.expose()).await.0, 200);
    let start = Instant::now();
    while b.stats().blind_since.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never declared blind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let since = b.stats().blind_since.unwrap();
    assert!(
        since <= cut + Duration::from_millis(100),
        "blind since the last answer"
    );
    assert!(listener.blind_since().is_some());
    // Past max_blind the entry (read before the cut) is re-checked, and the store is down.
    assert_eq!(
        status(&app_b, key.key.expose()).await,
        (503, "store_unavailable".into())
    );

    // The store answers again: sighted, and the key is served from the cache at once (the
    // refused lookups kept the entry; the feed has caught up, so it can be trusted again).
    b_store.down.store(false, Ordering::SeqCst);
    let start = Instant::now();
    while b.stats().blind_since.is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never sighted again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // (With the store out of reach again for this one request: it is not asked.)
    b_store.down.store(true, Ordering::SeqCst);
    assert_eq!(status(&app_b, key.key.expose()).await.0, 200);
    drop(listener);
    b_store.down.store(false, Ordering::SeqCst);

    // Availability preferred: blindness is reported, the cache still served.
    let listener = InvalidationListener::builder(&b)
        .poll_every(Duration::from_millis(100))
        .max_blind(Duration::from_secs(1))
        .prefer_availability()
        .start()
        .await
        .unwrap();
    // Starting it flushed the cache: the key is read again, once the store's retry window
    // after the failed lookup (1 s) has passed.
    let start = Instant::now();
    while status(&app_b, key.key.expose()).await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never served again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b_store.down.store(true, Ordering::SeqCst);
    let start = Instant::now();
    while listener.blind_since().is_none() {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(b.stats().blind_since.is_some(), "reported");
    assert_eq!(
        status(&app_b, key.key.expose()).await.0,
        200,
        "not enforced"
    );
    b_store.down.store(false, Ordering::SeqCst);
}

/// Records made in memory by a manager, for bulk insertion elsewhere, with their keys.
async fn mint(count: usize) -> Vec<(KeyRecord, String)> {
    let layer = layer_over(Arc::new(MemoryStore::new()));
    let manager = KeyManager::for_layer(&layer).without_audit_log();
    let mut minted = Vec::with_capacity(count);
    for i in 0..count {
        let created = manager
            .create(NewKey::new(format!("warm-{i}"), format!("user-{i}")).collection("users"))
            .await
            .unwrap();
        minted.push((created.record, created.key.expose().to_owned()));
    }
    minted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_blip_replays_the_changed_keys_instead_of_flushing_a_warm_cache() {
    let _turn = TIMED.lock().await;
    const WARM: usize = 10_000;
    const CHANGED: usize = 25;
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_blip");
    let pg_a = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let pg_b = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let minted = mint(WARM).await;
    futures_util::stream::iter(minted.iter())
        .map(|(record, _)| {
            let pg = pg_a.clone();
            async move { pg.insert(record).await.unwrap() }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;

    let b_store = Arc::new(Switchable::new(Arc::new(pg_b.clone())));
    let b = layer_over(b_store.clone());
    let app_b = app().layer(b.clone());
    // A long poll interval: only the reconnect's replay can bring the changes in time.
    let listener = InvalidationListener::builder(&b)
        .postgres(&pg_b)
        .poll_every(Duration::from_secs(600))
        .max_blind(Duration::from_secs(1_200))
        .start()
        .await
        .unwrap();
    assert_eq!(listener.path(), "listen+poll");
    let serve_all = |expect_revoked: usize| {
        let app_b = app_b.clone();
        let minted = &minted;
        async move {
            let statuses: Vec<(u16, String)> = futures_util::stream::iter(minted.iter())
                .map(|(_, key)| {
                    let app_b = app_b.clone();
                    async move { status(&app_b, key).await }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            let revoked = statuses
                .iter()
                .filter(|s| **s == (401, "revoked_key".to_owned()))
                .count();
            let ok = statuses.iter().filter(|s| s.0 == 200).count();
            assert_eq!((ok, revoked), (WARM - expect_revoked, expect_revoked));
        }
    };
    serve_all(0).await;
    let warm_reads = b_store.lookups.load(Ordering::SeqCst);
    assert_eq!(warm_reads, WARM, "one read per key to warm the cache");

    // The blip: B's listener connection dies, and keys change while it is away (one
    // transaction: the notifications go out at its commit, when the listener is gone).
    let ids: Vec<Uuid> = minted.iter().take(CHANGED).map(|(r, _)| r.id).collect();
    let mut tx = pg_a.pool().begin().await.unwrap();
    sqlx::query("UPDATE keywarden_keys SET revoked_at = now() WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("keywarden-listener:{schema}"))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(killed, vec![true]);
    tx.commit().await.unwrap();
    let head = pg_a.change_feed(u64::MAX, 0).await.unwrap().unwrap().head;
    let start = Instant::now();
    while listener.reconnects() < 1 || listener.cursor() < head {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no replay: {listener:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(listener.flushes(), 0, "replayed, not flushed");
    assert_eq!(b.stats().reconnect_flushes, 0);

    serve_all(CHANGED).await;
    let reads = b_store.lookups.load(Ordering::SeqCst) - warm_reads;
    println!(
        "after a listener blip with {CHANGED} keys changed in a {WARM}-key warm cache: {reads} store reads"
    );
    assert!(
        reads <= CHANGED,
        "{reads} store reads after the blip, for {CHANGED} changed keys"
    );
    drop(listener);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pg_a.pool())
        .await
        .unwrap();
}

/// A schema of its own with keywarden's tables, its manager (the "other instance"), and a
/// `keywarden serve` reaching it through a proxy the test controls.
struct Deployment {
    url: String,
    schema: String,
    store: PostgresStore,
    manager: KeyManager,
    proxy: TcpProxy,
    dir: TempDir,
    http: reqwest::Client,
}

impl Deployment {
    async fn new(url: &str, tag: &str) -> Self {
        let schema = unique(tag);
        let store = PostgresStore::connect_with_schema(url, &schema)
            .await
            .unwrap();
        let manager = KeyManager::for_layer(&layer_over(Arc::new(store.clone())));
        let proxy = TcpProxy::start(url_addr(url)).await;
        Self {
            url: url.to_owned(),
            schema,
            store,
            manager,
            proxy,
            dir: TempDir::new(tag),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        }
    }

    /// `keywarden serve` over the proxy, in this schema, with `args`.
    fn serve(&self, name: &str, args: &[&str]) -> ServeProcess {
        let via = url_via(&self.url, self.proxy.addr);
        let sep = if via.contains('?') { '&' } else { '?' };
        let database = format!("{via}{sep}options=-c%20search_path%3D{}", self.schema);
        let mut cmd = ServeProcess::command(env!("CARGO_BIN_EXE_keywarden"), self.dir.path());
        cmd.env("KEYWARDEN_DATABASE_URL", database)
            .env("KEYWARDEN_SECRET", SECRET)
            .env("RUST_LOG", "keywarden=debug")
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(args);
        ServeProcess::spawn(cmd, self.dir.path(), name)
    }

    async fn key(&self, name: &str) -> (Uuid, String) {
        let created = self
            .manager
            .create(NewKey::new(name, "alice").collection("users"))
            .await
            .unwrap();
        (created.record.id, created.key.expose().to_owned())
    }

    /// What forward auth on `server` answers for `key`: status and rejection code.
    async fn auth(&self, server: &ServeProcess, key: &str) -> (u16, String) {
        let response = self
            .http
            .get(server.url("/v1/auth"))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
        let code = response
            .headers()
            .get("x-keywarden-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (response.status().as_u16(), code)
    }

    async fn readyz(&self, server: &ServeProcess) -> Value {
        self.http
            .get(server.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until `server` answers `key` with `want`; how long that took.
    async fn until(
        &self,
        server: &ServeProcess,
        key: &str,
        want: (u16, &str),
        within: Duration,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let got = self.auth(server, key).await;
            if got.0 == want.0 && got.1 == want.1 {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "still {got:?} after {within:?}, wanted {want:?}: {}",
                server.stderr()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn drop_schema(self) {
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .execute(self.store.pool())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_listen_a_revocation_reaches_serve_within_the_poll_interval() {
    let _turn = TIMED.lock().await;
    const REVOCATIONS: usize = 15;
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let d = Deployment::new(&url, "kw_poll").await;
    let b = d.serve("b", &["--revocation-listen=false"]);
    let ready = d.readyz(&b).await;
    assert_eq!(ready["checks"]["revocation"], "poll", "{ready}");
    assert!(b.stdout().contains("within 2s (poll)"), "{}", b.stdout());

    let mut keys = Vec::new();
    for i in 0..REVOCATIONS {
        let key = d.key(&format!("poll-{i}")).await;
        assert_eq!(d.auth(&b, &key.1).await.0, 200, "B caches the key");
        keys.push(key);
    }
    let mut delays = Vec::new();
    for (id, key) in &keys {
        d.manager.revoke(*id).await.unwrap();
        delays.push(
            d.until(&b, key, (401, "revoked_key"), Duration::from_secs(5))
                .await,
        );
    }
    let (p50, p99) = percentiles(&mut delays);
    let max = *delays.last().unwrap();
    println!(
        "LISTEN off, poll every 2 s: {REVOCATIONS} revocations reached serve in p50 = {p50:?}, p99 = {p99:?}, max = {max:?}"
    );
    assert!(
        max <= Duration::from_millis(2_100),
        "a revocation took {max:?} (> 2 s + 100 ms)"
    );
    b.terminate();
    d.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_partition_heals_serve_catches_up_within_a_second() {
    let _turn = TIMED.lock().await;
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let d = Deployment::new(&url, "kw_heal").await;
    let b = d.serve("b", &["--max-blind", "60s"]);
    let ready = d.readyz(&b).await;
    assert_eq!(ready["checks"]["revocation"], "listen+poll", "{ready}");
    let (id, key) = d.key("heal").await;
    assert_eq!(d.auth(&b, &key).await.0, 200);

    // The network between B and the database goes silent; the key is revoked meanwhile.
    d.proxy.black_hole();
    d.manager.revoke(id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        d.auth(&b, &key).await.0,
        200,
        "within max_blind, B answers from its cache"
    );
    d.proxy.restore();
    let healed = d
        .until(&b, &key, (401, "revoked_key"), Duration::from_secs(5))
        .await;
    println!("revocation reached serve {healed:?} after the partition healed");
    assert!(
        healed <= Duration::from_secs(1),
        "{healed:?} after the partition healed"
    );
    b.terminate();
    d.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_longer_than_max_blind_makes_serve_refuse_what_it_cannot_recheck() {
    let _turn = TIMED.lock().await;
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let d = Deployment::new(&url, "kw_blind").await;
    let b = d.serve("b", &["--max-blind", "3s", "--revocation-poll", "1s"]);
    let (revoked_id, revoked) = d.key("revoked").await;
    let (_, kept) = d.key("kept").await;
    let (_, unseen) = d.key("unseen").await;
    assert_eq!(d.auth(&b, &revoked).await.0, 200);
    assert_eq!(d.auth(&b, &kept).await.0, 200);

    d.proxy.black_hole();
    let cut = Instant::now();
    d.manager.revoke(revoked_id).await.unwrap();
    // Blind at most 3 s after the cut (after the last answer, which came before it): from
    // then on nothing read before the cut is served. A refusal itself takes the store timeout.
    let mut last_accepted = Duration::ZERO;
    loop {
        let sent = cut.elapsed();
        match d.auth(&b, &revoked).await {
            (200, _) => last_accepted = sent,
            (503, code) if code == "store_unavailable" => break,
            other => panic!("unexpected {other:?}"),
        }
        assert!(cut.elapsed() < Duration::from_secs(10), "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "partition with max_blind 3 s: the revoked key was last accepted {last_accepted:?} into it"
    );
    assert!(
        last_accepted <= Duration::from_millis(3_200),
        "accepted {last_accepted:?} into the partition (max_blind 3 s)"
    );
    assert_eq!(
        d.auth(&b, &kept).await,
        (503, "store_unavailable".into()),
        "a key it cannot re-check is refused too"
    );
    assert_eq!(
        d.auth(&b, &unseen).await,
        (503, "store_unavailable".into()),
        "an unseen key gets 503"
    );
    let ready = d.readyz(&b).await;
    let revocation = ready["checks"]["revocation"].as_str().unwrap_or_default();
    assert!(
        revocation.starts_with("listen+poll, blind: last answer "),
        "{ready}"
    );

    d.proxy.restore();
    d.until(&b, &revoked, (401, "revoked_key"), Duration::from_secs(5))
        .await;
    d.until(&b, &kept, (200, ""), Duration::from_secs(5)).await;
    assert!(
        b.stderr().contains("no answer from the change feed"),
        "the blindness was logged"
    );
    b.terminate();
    d.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_notification_cannot_hide_a_revocation() {
    let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let schema = unique("kw_forge");
    let pg_a = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let pg_b = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap();
    let manager = KeyManager::for_layer(&layer_over(Arc::new(pg_a.clone())));
    let key = manager
        .create(NewKey::new("forged", "alice").collection("users"))
        .await
        .unwrap();
    let b = layer_over(Arc::new(pg_b.clone()));
    let app_b = app().layer(b.clone());
    let listener = InvalidationListener::builder(&b)
        .postgres(&pg_b)
        .poll_every(Duration::from_millis(500))
        .start()
        .await
        .unwrap();
    assert_eq!(status(&app_b, key.key.expose()).await.0, 200);

    // Any database user may NOTIFY: announce the next number with some other key...
    let head = pg_a.change_feed(u64::MAX, 0).await.unwrap().unwrap().head;
    sqlx::query("SELECT pg_notify('keywarden_feed', $1)")
        .bind(format!("{schema} {} key {}", head + 1, Uuid::now_v7()))
        .execute(pg_a.pool())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...then the real change with that number, whose own notification is lost.
    let mut tx = pg_a.pool().begin().await.unwrap();
    sqlx::query("UPDATE keywarden_keys SET revoked_at = now() WHERE id = $1")
        .bind(key.record.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("keywarden-listener:{schema}"))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let start = Instant::now();
    while status(&app_b, key.key.expose()).await != (401, "revoked_key".to_owned()) {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the forged notification hid the revocation: {listener:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(listener);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pg_a.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn sqlite_insert_or_replace_is_fed_as_a_change_of_the_key() {
    let dir = TempDir::new("feed-replace");
    let store = keywarden::SqliteStore::connect(&dir.db_url())
        .await
        .unwrap();
    let manager = KeyManager::for_layer(&layer_over(Arc::new(store.clone())));
    let key = manager
        .create(NewKey::new("replace", "alice").collection("users"))
        .await
        .unwrap();
    let before = feed_after(&store, 0).await.head;
    // REPLACE deletes the old row without firing its delete trigger.
    sqlx::query("INSERT OR REPLACE INTO keywarden_keys SELECT * FROM keywarden_keys WHERE id = ?")
        .bind(key.record.id.as_bytes().to_vec())
        .execute(store.pool())
        .await
        .unwrap();
    let page = feed_after(&store, before).await;
    assert!(
        page.changes
            .iter()
            .any(|c| c.change == StoreChange::Key(key.record.id)),
        "{page:?}"
    );
    // A row under another id with the same digest replaces the key too: the old key is fed.
    let before = page.head;
    let other = Uuid::now_v7();
    sqlx::query(
        "INSERT OR REPLACE INTO keywarden_keys SELECT ?, digest, secret_id, display_start, \
         name, description, collection, subject, owner_kind, scopes, environment, read_only, \
         metadata, rate_limit, created_at, updated_at, expires_at, last_used_at, use_count, \
         revoked_at, disabled, rotated_from, encrypted_key, allowed_ips, credits_refill, \
         credits_generation FROM keywarden_keys WHERE id = ?",
    )
    .bind(other.as_bytes().to_vec())
    .bind(key.record.id.as_bytes().to_vec())
    .execute(store.pool())
    .await
    .unwrap();
    let page = feed_after(&store, before).await;
    let changes: Vec<StoreChange> = page.changes.iter().map(|c| c.change).collect();
    assert!(
        changes.contains(&StoreChange::Key(key.record.id))
            && changes.contains(&StoreChange::Key(other)),
        "{changes:?}"
    );
}

#[tokio::test]
async fn a_listener_refuses_a_blindness_bound_its_polls_cannot_keep() {
    let layer = layer_over(Arc::new(MemoryStore::new()));
    for (poll, max_blind) in [(2_000, 3_000), (100, 500)] {
        let error = InvalidationListener::builder(&layer)
            .poll_every(Duration::from_millis(poll))
            .max_blind(Duration::from_millis(max_blind))
            .start()
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), StoreErrorKind::Other, "{error}");
        assert!(error.to_string().contains("max_blind"), "{error}");
    }
}

#[test]
fn serve_refuses_a_blindness_bound_the_poll_cannot_keep() {
    let dir = TempDir::new("feed-flags");
    for (args, expected) in [
        (
            &["--max-blind", "3s"][..],
            "max blind 3s must be at least twice the revocation poll interval (2s) and at least 1s",
        ),
        (
            &["--revocation-poll", "0s"][..],
            "revocation poll interval 0ns is too short: at least 100ms",
        ),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keywarden"));
        for (var, _) in std::env::vars() {
            if var.starts_with("KEYWARDEN_") {
                cmd.env_remove(var);
            }
        }
        let output = cmd
            .current_dir(dir.path())
            .env("KEYWARDEN_DATABASE_URL", dir.db_url())
            .env("KEYWARDEN_SECRET", SECRET)
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
