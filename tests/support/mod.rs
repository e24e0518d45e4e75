//! Shared helpers for the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use axum::body::Body;
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use keywarden::{
    clock::ManualClock, ApiKeyLayer, ApiKeyLayerBuilder, Collection, CreatedKey, KeyManager,
    MemoryStore, NewKey, Principal, RequireScopeLayer, SecretRing,
};
use time::OffsetDateTime;
use tower::ServiceExt;

#[cfg(all(feature = "cli", unix))]
pub mod serve;

#[cfg(feature = "manage-api")]
pub mod gateway;

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
pub const OLD_SECRET: &str = "integration-test-old-secret-0123456789ab";

pub fn ring() -> SecretRing {
    SecretRing::from_strs(SECRET, None).unwrap()
}

/// A memory store, a manual clock, a layer and a manager that invalidates it.
pub struct Fixture {
    pub store: Arc<MemoryStore>,
    pub clock: ManualClock,
    pub layer: ApiKeyLayer,
    pub manager: KeyManager,
}

impl Fixture {
    /// Collections users/teams/services, required mode.
    pub fn new() -> Self {
        Self::with(|b| b)
    }

    pub fn with(configure: impl FnOnce(ApiKeyLayerBuilder) -> ApiKeyLayerBuilder) -> Self {
        Self::with_store(Arc::new(MemoryStore::new()), ring(), configure)
    }

    pub fn with_store(
        store: Arc<MemoryStore>,
        secrets: SecretRing,
        configure: impl FnOnce(ApiKeyLayerBuilder) -> ApiKeyLayerBuilder,
    ) -> Self {
        let clock = ManualClock::new(OffsetDateTime::now_utc());
        let builder = ApiKeyLayer::builder()
            .store(store.clone())
            .secrets(secrets)
            .clock(Arc::new(clock.clone()))
            .collection(Collection::new("users"))
            .collection(Collection::new("teams"))
            .collection(Collection::new("services"));
        let layer = configure(builder).build().unwrap();
        let manager = KeyManager::for_layer(&layer);
        Self {
            store,
            clock,
            layer,
            manager,
        }
    }

    pub async fn key(&self, new: NewKey) -> CreatedKey {
        self.manager.create(new).await.unwrap()
    }

    pub fn app(&self) -> Router {
        app().layer(self.layer.clone())
    }
}

/// The routes every test serves: `/whoami` returns the principal, `/admin` needs scope
/// `admin`, `POST /write` accepts writes, `/maybe` works with or without a principal.
pub fn app() -> Router {
    Router::new()
        .route("/whoami", get(|p: Principal| async move { Json(p) }))
        .route("/write", post(|p: Principal| async move { Json(p) }))
        .route(
            "/admin",
            get(|p: Principal| async move { Json(p) }).route_layer(RequireScopeLayer::new("admin")),
        )
        .route(
            "/maybe",
            get(|p: Option<Principal>| async move {
                p.map_or("anonymous".to_owned(), |p| p.subject().to_owned())
            }),
        )
}

/// The create body of the management API's lifecycle test: every member a caller usually
/// sets. tests/openapi.rs checks it against the published schema.
pub fn create_example() -> serde_json::Value {
    serde_json::json!({
        "name": "ci deploys",
        "description": "for CI",
        "subject": "alice",
        "scopes": ["read", "deploy"],
        "expires_in": "30d",
        "metadata": {"team": "infra"},
        "rate_limit": "100/min",
    })
}

/// The patch body of the lifecycle test: every member, `null` clearing the nullable ones.
pub fn patch_example() -> serde_json::Value {
    serde_json::json!({
        "name": "renamed",
        "description": null,
        "scopes": ["read"],
        "read_only": true,
        "metadata": {"team": "ops"},
        "rate_limit": null,
        "expires_at": "2099-01-01T00:00:00Z",
    })
}

pub fn request(method: &str, uri: &str, headers: &[(&str, &[u8])]) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::empty()).unwrap()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub async fn from(response: Response<Body>) -> Self {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes().to_vec();
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The problem+json code, after checking the content type and status field.
    pub fn code(&self) -> String {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "status {}",
            self.status
        );
        let json = self.json();
        assert_eq!(json["status"], self.status.as_u16());
        json["code"].as_str().unwrap().to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(app: &Router, req: Request<Body>) -> Reply {
    Reply::from(app.clone().oneshot(req).await.unwrap()).await
}

pub async fn get_with(app: &Router, uri: &str, headers: &[(&str, &[u8])]) -> Reply {
    send(app, request("GET", uri, headers)).await
}

/// Skips a service-backed test without its URL, but fails it under `CI=true`.
pub fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{var} is not set under CI=true: the service-backed suite must run");
            }
            eprintln!("skipping: {var} is not set");
            None
        }
    }
}

/// A memory store that counts digest lookups and usage writes, optionally slowing lookups
/// so concurrent requests overlap.
#[derive(Debug, Default)]
pub struct CountingStore {
    pub inner: MemoryStore,
    pub lookups: std::sync::atomic::AtomicUsize,
    pub usage_writes: std::sync::atomic::AtomicUsize,
    pub delay: std::time::Duration,
}

impl CountingStore {
    pub fn slow(delay: std::time::Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    pub fn lookups(&self) -> usize {
        self.lookups.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn usage_writes(&self) -> usize {
        self.usage_writes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl keywarden::KeyStore for CountingStore {
    async fn insert(
        &self,
        record: &keywarden::store::KeyRecord,
    ) -> Result<(), keywarden::StoreError> {
        self.inner.insert(record).await
    }
    async fn find_by_digest(
        &self,
        digest: &keywarden::secret::Digest,
    ) -> Result<Option<keywarden::store::KeyRecord>, keywarden::StoreError> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.find_by_digest(digest).await
    }
    async fn get(
        &self,
        id: uuid::Uuid,
    ) -> Result<Option<keywarden::store::KeyRecord>, keywarden::StoreError> {
        self.inner.get(id).await
    }
    async fn update(
        &self,
        id: uuid::Uuid,
        patch: &keywarden::store::KeyPatch,
        now: OffsetDateTime,
    ) -> Result<Option<keywarden::store::KeyRecord>, keywarden::StoreError> {
        self.inner.update(id, patch, now).await
    }
    async fn add_digest(
        &self,
        id: uuid::Uuid,
        old: &keywarden::secret::Digest,
        new: &keywarden::secret::Digest,
        secret_id: keywarden::secret::SecretId,
    ) -> Result<bool, keywarden::StoreError> {
        self.inner.add_digest(id, old, new, secret_id).await
    }
    async fn delete(
        &self,
        id: uuid::Uuid,
    ) -> Result<Option<keywarden::store::KeyRecord>, keywarden::StoreError> {
        self.inner.delete(id).await
    }
    async fn list(
        &self,
        query: &keywarden::store::KeyQuery,
    ) -> Result<keywarden::store::KeyPage, keywarden::StoreError> {
        self.inner.list(query).await
    }
    async fn record_usage(
        &self,
        usage: &[keywarden::store::KeyUsage],
    ) -> Result<(), keywarden::StoreError> {
        self.usage_writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.record_usage(usage).await
    }
    async fn apply_audited(
        &self,
        change: keywarden::store::KeyChange<'_>,
        audit: &keywarden::store::AuditWrite<'_>,
    ) -> Result<keywarden::store::Applied, keywarden::StoreError> {
        self.inner.apply_audited(change, audit).await
    }
    async fn audit_events(
        &self,
        query: &keywarden::audit::AuditQuery,
    ) -> Result<keywarden::audit::AuditPage, keywarden::StoreError> {
        self.inner.audit_events(query).await
    }
}

/// A store under test: its name, the store, and the PostgreSQL store and schema to drop after.
#[cfg(all(feature = "sqlite", feature = "postgres"))]
pub type TestStore = (
    &'static str,
    Arc<dyn keywarden::KeyStore>,
    Option<(keywarden::PostgresStore, String)>,
);

/// A memory store, a SQLite file and (with its URL) a PostgreSQL schema of its own, each new.
#[cfg(all(feature = "sqlite", feature = "postgres"))]
pub async fn every_store(tag: &str) -> Vec<TestStore> {
    let path = std::env::temp_dir().join(format!("{}.db", unique(&format!("keywarden_{tag}"))));
    let sqlite = keywarden::SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let mut stores: Vec<TestStore> = vec![
        ("memory", Arc::new(MemoryStore::new()), None),
        ("sqlite", Arc::new(sqlite), None),
    ];
    if let Some(url) = service_url("KEYWARDEN_TEST_POSTGRES_URL") {
        let schema = unique(&format!("kw_{tag}"));
        let pg = keywarden::PostgresStore::connect_with_schema(&url, &schema)
            .await
            .unwrap();
        stores.push(("postgres", Arc::new(pg.clone()), Some((pg, schema))));
    }
    stores
}

/// Drops the PostgreSQL schema of an [`every_store`] entry.
#[cfg(all(feature = "sqlite", feature = "postgres"))]
pub async fn drop_schema(pg: Option<(keywarden::PostgresStore, String)>) {
    if let Some((pg, schema)) = pg {
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(pg.pool())
            .await
            .unwrap();
    }
}

/// A fresh lowercase name for a schema, namespace or file.
pub fn unique(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}_{hex}")
}

/// A TCP proxy on loopback between a client under test and a real server, which a test can
/// cut (refuse and drop every connection), sever (drop live connections only), turn into a
/// black hole (accept and never answer) and restore.
pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    state: Arc<ProxyState>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    /// 0 forward, 1 refuse, 2 black hole.
    mode: std::sync::atomic::AtomicU8,
    connections: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl TcpProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState::default());
        let accept = {
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        continue;
                    };
                    let mode = state.mode.load(std::sync::atomic::Ordering::SeqCst);
                    if mode == 1 {
                        drop(client);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if mode == 2 {
                            // Hold the socket open, read and discard, never answer.
                            let mut sink = tokio::io::sink();
                            let _ = tokio::io::copy(&mut client, &mut sink).await;
                            return;
                        }
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    let mut connections = state.connections.lock().unwrap();
                    connections.retain(|c| !c.is_finished());
                    connections.push(task.abort_handle());
                }
            })
        };
        Self {
            addr,
            state,
            accept,
        }
    }

    /// Drops every live connection; new ones are still forwarded.
    pub fn sever(&self) {
        for connection in self.state.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// Refuses new connections and drops live ones: the server is gone.
    pub fn cut(&self) {
        self.state
            .mode
            .store(1, std::sync::atomic::Ordering::SeqCst);
        self.sever();
    }

    /// Accepts new connections but never answers; drops live ones.
    pub fn black_hole(&self) {
        self.state
            .mode
            .store(2, std::sync::atomic::Ordering::SeqCst);
        self.sever();
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.state
            .mode
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever();
    }
}

/// `host:port` of a `scheme://user@host:port/...` URL.
pub fn url_addr(url: &str) -> std::net::SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host_port = host_port.split(['/', '?']).next().unwrap();
    use std::net::ToSocketAddrs;
    host_port.to_socket_addrs().unwrap().next().unwrap()
}

/// The same URL, pointed at `addr`.
pub fn url_via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, host_part) = match rest.rsplit_once('@') {
        Some((user, host)) => (format!("{user}@"), host),
        None => (String::new(), rest),
    };
    let tail = host_part.find(['/', '?']).map_or("", |i| &host_part[i..]);
    format!("{scheme}://{user}{addr}{tail}")
}

/// p50 and p99 of durations.
pub fn percentiles(
    samples: &mut [std::time::Duration],
) -> (std::time::Duration, std::time::Duration) {
    samples.sort();
    let at =
        |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.50), at(0.99))
}

/// A fresh directory, removed on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "keywarden-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn db_url(&self) -> String {
        format!("sqlite://{}", self.0.join("keys.db").display())
    }

    /// Writes `contents` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fixture with the management API behind its layer, and an admin key.
#[cfg(feature = "manage-api")]
pub struct ManagementApi {
    pub fx: Fixture,
    pub api: Router,
    pub admin: String,
}

#[cfg(feature = "manage-api")]
impl ManagementApi {
    pub async fn new() -> Self {
        let fx = Fixture::new();
        let manager = Arc::new(KeyManager::for_layer(&fx.layer));
        let api = Router::new()
            .nest("/admin", keywarden::management_router(manager))
            .layer(fx.layer.clone());
        let admin = fx
            .key(NewKey::new("admin", "root").scope("keys:admin"))
            .await
            .key
            .expose()
            .to_owned();
        Self { fx, api, admin }
    }

    /// `method uri` with `key` and a JSON `body`, from the connection address 10.1.1.1.
    pub async fn call(
        &self,
        method: &str,
        uri: &str,
        key: &str,
        body: Option<serde_json::Value>,
    ) -> Reply {
        let builder = Request::builder()
            .method(method)
            .uri(uri)
            .header("x-api-key", key);
        let mut req = match body {
            Some(body) => builder
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
            None => builder.body(Body::empty()).unwrap(),
        };
        req.extensions_mut().insert(axum::extract::ConnectInfo(
            "10.1.1.1:1".parse::<std::net::SocketAddr>().unwrap(),
        ));
        send(&self.api, req).await
    }

    /// The field and message of a 422's first error.
    pub fn field_error(reply: &Reply) -> (String, String) {
        assert_eq!(reply.status, 422, "{}", reply.text());
        let json = reply.json();
        (
            json["errors"][0]["field"].as_str().unwrap().to_owned(),
            json["errors"][0]["message"].as_str().unwrap().to_owned(),
        )
    }
}
