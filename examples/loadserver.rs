//! The load harness's server: one small handler behind one authentication variant.
//!
//! ```text
//! cargo run --release --example loadserver --features sqlite,postgres -- \
//!     --variant keywarden-hit --addr 127.0.0.1:3101 --keys-file /tmp/keys.txt
//! ```
//!
//! Variants (all serve `GET /` → `hello`, the same handler):
//! - `bare`: no authentication.
//! - `tower-http`: tower-http's static bearer validator (`ValidateRequestHeaderLayer::bearer`).
//! - `keywarden-hit`: memory store, one key, warm cache.
//! - `keywarden-hit-10k`: memory store, 10,000 keys rotated by the client, warm cache.
//! - `keywarden-hit-10k-authbody`: `keywarden-hit-10k` applied as `.layer(layer)`, with
//!   `AuthBody` responses that axum boxes; every other keywarden variant is applied as the
//!   README shows for axum, `.layer(layer.same_body())`.
//! - `keywarden-sqlite`: SQLite store, cache on, 10,000 keys rotated by the client.
//! - `keywarden-sqlite-nocache`: SQLite store, `cache_capacity(0)`: a store query per request.
//! - `keywarden-postgres-nocache`: PostgreSQL store (schema `kw_loadbench`), no cache.
//! - `keywarden-malformed`: memory store; the client sends a key with a bad checksum.
//! - `keywarden-hit-allowlist`: `keywarden-hit` whose key carries an IP allowlist holding
//!   `127.0.0.0/8` (so every request is checked against it and passes); served with connect
//!   info (`into_make_service_with_connect_info::<SocketAddr>()`), which the allowlist needs.
//! - `keywarden-hit-connectinfo`: `keywarden-hit` served with connect info, key without an
//!   allowlist: separates axum's per-request `ConnectInfo` extension from the allowlist check.
//! - `keywarden-hit-owner`: `keywarden-hit` whose collection has an owner budget
//!   (`Collection::owner_rate_limit`) too high ever to refuse (1,000,000,000/s): every request
//!   takes one from it and gets `RateLimit-*` headers.
//! - `keywarden-hit-credits`: `keywarden-hit` whose key has credits (`NewKey::credits`,
//!   10^12, never run out): every request spends one from the instance's lease and gets
//!   `Credits-Remaining`. Leases hold the layer's default block (100) unless
//!   `--credit-block N` sets `ApiKeyLayerBuilder::credit_leases(N, 10 s)`.
//! - `handwritten`, `handwritten-10k`: what a user would write instead of keywarden, the shape
//!   axum's docs recommend: an `axum::middleware::from_fn_with_state` function that SHA-256s
//!   the `X-Api-Key` value, looks the digest up in a `HashMap<Vec<u8>, Arc<Owner>>` and inserts
//!   the owner into the request extensions (one key, or 10,000 rotated by the client). The
//!   client must send `X-Api-Key` (`bench/load.py --header x-api-key`).
//! - any keywarden variant with `-metrics` appended (`keywarden-hit-metrics`, ...): the same
//!   with metrics on: a Prometheus recorder (`metrics-exporter-prometheus`) installed before
//!   the layer is built, rendered at `GET /metrics` (outside the layer). Without the suffix no
//!   recorder is installed, so the layer's handles are no-ops: metrics off.
//!
//! Keys are real keys created through [`KeyManager`]; the server writes the ones the client
//! should send to `--keys-file`, one a line, then prints `ready <addr>` on stdout. `GET /stats`
//! (outside the layer) returns `{"lookups": n, "leases": n, "returns": n}`, the store's digest
//! lookups, credit leases and credit returns so far (its round trips on the request path). The server
//! binds loopback only and exits on SIGTERM or Ctrl-C. `--cache-ttl SECS` sets the cached
//! variants' TTL (default 60 s, the layer's default).
//!
//! This is a benchmark tool: the keys it writes are throwaway keys for a throwaway store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::middleware;
use axum::routing::get;
use axum::Router;
use keywarden::net::IpNetwork;
use keywarden::ratelimit::RateLimitPolicy;
use keywarden::{
    secret::Digest, secret::SecretId, store::CreditLease, store::KeyPage, store::KeyPatch,
    store::KeyQuery, store::KeyRecord, store::KeyUsage, ApiKeyLayer, Collection, KeyManager,
    KeyStore, MemoryStore, NewKey, PostgresStore, SecretRing, SqliteStore, StoreError,
};
use time::OffsetDateTime;
use uuid::Uuid;

#[path = "support/handwritten.rs"]
mod handwritten;
use handwritten::{handwritten_auth, owners, Owners};

const SECRET: &str = "load-harness-secret-0123456789-abcdefghijk";
const ROTATED_KEYS: usize = 10_000;
/// `keywarden-hit-credits`' balance per key: more than any run spends.
const CREDITS: u64 = 1_000_000_000_000;

async fn hello() -> &'static str {
    "hello"
}

/// `count` keys of keywarden's shape and the hand-written middleware's map of their digests.
fn handwritten_keys(count: usize) -> (Owners, Vec<String>) {
    let keys: Vec<String> = (0..count).map(|_| fake_token()).collect();
    (owners(keys.iter().map(String::as_str)), keys)
}

/// Counts digest lookups so the harness can check "zero store queries" for malformed keys,
/// and credit leases and returns so it can report a credits key's store round trips.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn KeyStore>,
    counts: Arc<StoreCounts>,
}

/// The store calls on the request path, for `GET /stats`.
#[derive(Debug, Default)]
struct StoreCounts {
    lookups: AtomicUsize,
    leases: AtomicUsize,
    returns: AtomicUsize,
}

#[async_trait::async_trait]
impl KeyStore for Counting {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(record).await
    }
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        self.counts.lookups.fetch_add(1, Ordering::Relaxed);
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
        old: &Digest,
        new: &Digest,
        secret_id: SecretId,
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
    // Forwarded, not left to the trait's defaults: the default lease fails (a key with credits
    // would get 503) and the default return drops the credits.
    async fn lease_credits(
        &self,
        id: Uuid,
        need: u64,
        want: u64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditLease>, StoreError> {
        self.counts.leases.fetch_add(1, Ordering::Relaxed);
        self.inner.lease_credits(id, need, want, now).await
    }
    async fn return_credits(
        &self,
        id: Uuid,
        amount: u64,
        generation: u64,
        period: u64,
    ) -> Result<bool, StoreError> {
        self.counts.returns.fetch_add(1, Ordering::Relaxed);
        self.inner
            .return_credits(id, amount, generation, period)
            .await
    }
}

struct Args {
    variant: String,
    addr: SocketAddr,
    keys_file: PathBuf,
    dir: PathBuf,
    postgres_url: String,
    cache_ttl: Option<std::time::Duration>,
    credit_block: Option<u64>,
}

fn parse_args() -> Args {
    let mut variant = None;
    let mut addr: SocketAddr = "127.0.0.1:3101".parse().expect("valid address");
    let mut keys_file = PathBuf::from("keys.txt");
    let mut dir = std::env::temp_dir();
    let mut postgres_url = std::env::var("KEYWARDEN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let mut cache_ttl = None;
    let mut credit_block = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--variant" => variant = Some(value()),
            "--addr" => addr = value().parse().unwrap_or_else(|_| usage("bad --addr")),
            "--keys-file" => keys_file = value().into(),
            "--dir" => dir = value().into(),
            "--postgres-url" => postgres_url = value(),
            "--cache-ttl" => {
                let secs: u64 = value().parse().unwrap_or_else(|_| usage("bad --cache-ttl"));
                cache_ttl = Some(std::time::Duration::from_secs(secs));
            }
            "--credit-block" => match value().parse() {
                Ok(block) if block > 0 => credit_block = Some(block),
                _ => usage("bad --credit-block"),
            },
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if !addr.ip().is_loopback() {
        usage("--addr must be a loopback address");
    }
    Args {
        variant: variant.unwrap_or_else(|| usage("--variant is required")),
        addr,
        keys_file,
        dir,
        postgres_url,
        cache_ttl,
        credit_block,
    }
}

fn usage(problem: &str) -> ! {
    eprintln!("loadserver: {problem}");
    eprintln!("usage: loadserver --variant V [--addr 127.0.0.1:PORT] [--keys-file F] [--dir D] [--postgres-url U] [--cache-ttl SECS] [--credit-block N]");
    std::process::exit(2)
}

fn main() {
    let args = parse_args();
    // One worker: the harness pins the server to one core and divides its CPU time by the
    // requests served.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(error) = runtime.block_on(run(args)) {
        eprintln!("loadserver: {error}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let counts = Arc::new(StoreCounts::default());
    let handler = Router::new().route("/", get(hello));
    // Metrics on: the recorder must be installed before the layer registers its handles.
    let (variant, prometheus) = match args.variant.strip_suffix("-metrics") {
        Some(base) if base.starts_with("keywarden-") => {
            let handle =
                metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
            (base, Some(handle))
        }
        _ => (args.variant.as_str(), None),
    };
    let (app, keys): (Router, Vec<String>) = match variant {
        "bare" => (handler, vec![fake_token()]),
        "tower-http" => {
            let token = fake_token();
            #[allow(deprecated)] // the point is to measure exactly this validator
            let layer = tower_http::validate_request::ValidateRequestHeaderLayer::bearer(&token);
            (handler.layer(layer), vec![token])
        }
        "handwritten" | "handwritten-10k" => {
            let count = if variant == "handwritten-10k" {
                ROTATED_KEYS
            } else {
                1
            };
            let (owners, keys) = handwritten_keys(count);
            let layer = middleware::from_fn_with_state(owners, handwritten_auth);
            (handler.layer(layer), keys)
        }
        "keywarden-hit"
        | "keywarden-hit-10k"
        | "keywarden-hit-10k-authbody"
        | "keywarden-malformed"
        | "keywarden-hit-allowlist"
        | "keywarden-hit-connectinfo"
        | "keywarden-hit-owner"
        | "keywarden-hit-credits" => {
            let count = if variant.starts_with("keywarden-hit-10k") {
                ROTATED_KEYS
            } else {
                1
            };
            let features = Features {
                allow_loopback: variant == "keywarden-hit-allowlist",
                owner_limit: variant == "keywarden-hit-owner",
                credits: variant == "keywarden-hit-credits",
                credit_block: args.credit_block,
            };
            let store = Arc::new(MemoryStore::new());
            let (layer, mut keys) =
                keywarden_with(store, &counts, count, None, args.cache_ttl, features).await?;
            if variant == "keywarden-malformed" {
                keys = keys.iter().map(|k| break_checksum(k)).collect();
            }
            if variant == "keywarden-hit-10k-authbody" {
                // The layer as it is, with `AuthBody` responses (which axum boxes).
                (handler.layer(layer), keys)
            } else {
                // As the README applies it in axum: responses in axum's own body type.
                (handler.layer(layer.same_body()), keys)
            }
        }
        "keywarden-sqlite" | "keywarden-sqlite-nocache" => {
            let path = args
                .dir
                .join(format!("loadbench-{}.db", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let store =
                Arc::new(SqliteStore::connect(&format!("sqlite://{}", path.display())).await?);
            let capacity = (variant == "keywarden-sqlite-nocache").then_some(0);
            let (layer, keys) =
                keywarden(store, &counts, ROTATED_KEYS, capacity, args.cache_ttl).await?;
            (handler.layer(layer.same_body()), keys)
        }
        "keywarden-postgres-nocache" => {
            let schema = "kw_loadbench";
            drop_schema(&args.postgres_url, schema).await?;
            let store =
                Arc::new(PostgresStore::connect_with_schema(&args.postgres_url, schema).await?);
            let (layer, keys) = keywarden(store, &counts, ROTATED_KEYS, Some(0), None).await?;
            (handler.layer(layer.same_body()), keys)
        }
        other => usage(&format!("unknown variant {other}")),
    };
    let stats = {
        let counts = counts.clone();
        Router::new().route(
            "/stats",
            get(move || async move {
                format!(
                    "{{\"lookups\": {}, \"leases\": {}, \"returns\": {}}}\n",
                    counts.lookups.load(Ordering::Relaxed),
                    counts.leases.load(Ordering::Relaxed),
                    counts.returns.load(Ordering::Relaxed)
                )
            }),
        )
    };
    let mut app = app.merge(stats);
    if let Some(handle) = prometheus {
        app = app.route("/metrics", get(move || std::future::ready(handle.render())));
    }
    std::fs::write(&args.keys_file, keys.join("\n") + "\n")?;
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("ready {}", listener.local_addr()?);
    // Only the variants whose keys need a client address pay for axum's per-request
    // `ConnectInfo` extension, so the others measure exactly as before.
    if matches!(
        variant,
        "keywarden-hit-allowlist" | "keywarden-hit-connectinfo"
    ) {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown())
        .await?;
    } else {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown())
            .await?;
    }
    if variant == "keywarden-postgres-nocache" {
        drop_schema(&args.postgres_url, "kw_loadbench").await?;
    }
    Ok(())
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The per-key and per-collection features a variant turns on (none by default).
#[derive(Debug, Clone, Copy, Default)]
struct Features {
    /// Every key's IP allowlist holds `127.0.0.0/8`.
    allow_loopback: bool,
    /// The collection has an owner budget that never refuses.
    owner_limit: bool,
    /// Every key has credits, too many ever to run out.
    credits: bool,
    /// The most credits one lease takes (the layer's default when `None`).
    credit_block: Option<u64>,
}

/// A layer over `store` (wrapped to count its calls) and `count` keys created through the
/// KeyManager; `capacity` overrides the cache capacity (`Some(0)` turns the cache off) and
/// `ttl` the found-entry TTL (default 60 s).
async fn keywarden(
    store: Arc<dyn KeyStore>,
    counts: &Arc<StoreCounts>,
    count: usize,
    capacity: Option<u64>,
    ttl: Option<std::time::Duration>,
) -> Result<(ApiKeyLayer, Vec<String>), Box<dyn std::error::Error>> {
    keywarden_with(store, counts, count, capacity, ttl, Features::default()).await
}

/// [`keywarden`] with per-key and per-collection features.
async fn keywarden_with(
    store: Arc<dyn KeyStore>,
    counts: &Arc<StoreCounts>,
    count: usize,
    capacity: Option<u64>,
    ttl: Option<std::time::Duration>,
    features: Features,
) -> Result<(ApiKeyLayer, Vec<String>), Box<dyn std::error::Error>> {
    let store = Arc::new(Counting {
        inner: store,
        counts: counts.clone(),
    });
    let mut collection = Collection::new("users");
    if features.owner_limit {
        collection = collection.owner_rate_limit("1000000000/s".parse::<RateLimitPolicy>()?);
    }
    let mut builder = ApiKeyLayer::builder()
        .store(store)
        .secrets(SecretRing::from_strs(SECRET, None)?)
        .collection(collection);
    if let Some(capacity) = capacity {
        builder = builder.cache_capacity(capacity);
    }
    if let Some(ttl) = ttl {
        builder = builder.cache_ttl(ttl);
    }
    if let Some(block) = features.credit_block {
        // The layer's default idle time: only the block size changes.
        builder = builder.credit_leases(block, std::time::Duration::from_secs(10));
    }
    let layer = builder.build()?;
    let manager = KeyManager::for_layer(&layer);
    let mut keys = Vec::with_capacity(count);
    for i in 0..count {
        let mut new = NewKey::new(format!("load-{i}"), format!("user-{i}"));
        if features.allow_loopback {
            new = new.allow_ip("127.0.0.0/8".parse::<IpNetwork>()?);
        }
        if features.credits {
            new = new.credits(CREDITS);
        }
        let created = manager.create(new).await?;
        keys.push(created.key.expose().to_owned());
    }
    Ok((layer, keys))
}

/// A token for the variants that do not use keywarden keys (same length as a key).
fn fake_token() -> String {
    keywarden::key::KeyPrefix::new("kw_live")
        .expect("valid prefix")
        .generate()
        .expose()
        .to_owned()
}

/// The same key with one body character changed: a checksum mismatch.
fn break_checksum(key: &str) -> String {
    let mut bytes = key.as_bytes().to_vec();
    bytes[20] = if bytes[20] == b'a' { b'b' } else { b'a' };
    String::from_utf8(bytes).expect("ASCII")
}

async fn drop_schema(url: &str, schema: &str) -> Result<(), Box<dyn std::error::Error>> {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect(url).await?;
    conn.execute(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE").as_str())
        .await?;
    conn.close().await?;
    Ok(())
}
