//! A driver for counting the cache lines a request touches when the caches are cold, as they
//! are on a loaded server (the kernel's network stack and other work run between two
//! requests): the three axum routers of the load harness's head-to-head (bare route, the
//! hand-written `from_fn` middleware of `examples/support/handwritten.rs`, keywarden with
//! `same_body`), the same 10,000 keys read
//! in the same order, with a walk over 4 MiB of memory between two requests.
//!
//! ```text
//! cargo build --release --example cold_lines
//! COLD_VARIANT=keywarden valgrind --tool=callgrind --cache-sim=yes \
//!     --I1=32768,8,64 --D1=32768,8,64 --LL=1048576,16,64 \
//!     --toggle-collect='cold_lines::requests*' --toggle-collect='cold_lines::evict*' \
//!     target/release/examples/cold_lines 2000
//! ```
//!
//! Collection is on inside `requests` and toggled off again inside `evict`, so the walk is
//! not counted. `DLmr + DLmw` per request is the number of data lines the request brought
//! in from memory (every line it touches, once); `I1mr` the misses in the 32 KiB L1i (the
//! walk does not evict code, but a request's code, 50–60 KiB with axum's, does not fit: most
//! of its code lines miss on every request, so `I1mr` approaches the code lines it runs).
//! `COLD_VARIANT` is `bare`, `handwritten` or `keywarden`; `COLD_EVICT=off` leaves the caches warm.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::middleware;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use keywarden::key::ApiKey;
use keywarden::{ApiKeyLayer, Collection, KeyManager, MemoryStore, NewKey, SecretRing};
use tower::ServiceExt;

#[path = "support/driver.rs"]
mod driver;
#[path = "support/handwritten.rs"]
mod handwritten;

const KEYS: usize = 10_000;

fn request(key: &ApiKey) -> Request<Body> {
    Request::builder()
        .uri("/")
        .header("x-api-key", key.expose())
        .body(Body::empty())
        .expect("a request")
}

/// Evicts the (simulated) caches: writes one word in every line of `scratch`.
#[inline(never)]
fn evict(scratch: &mut [u64]) {
    for (i, word) in scratch.iter_mut().enumerate().step_by(8) {
        *word = word.wrapping_add(i as u64);
    }
    black_box(scratch);
}

/// The measured loop: `n` requests on keys chosen by an LCG walk, each after an eviction.
#[inline(never)]
fn requests(
    runtime: &tokio::runtime::Runtime,
    router: &Router,
    keys: &[ApiKey],
    scratch: &mut [u64],
    cold: bool,
    n: usize,
) -> usize {
    let mut ok = 0;
    let mut walk = driver::KeyWalk::new(keys.len());
    for _ in 0..n {
        let req = request(&keys[walk.next_index()]);
        if cold {
            evict(scratch);
        }
        let response = runtime
            .block_on(router.clone().oneshot(req))
            .expect("infallible");
        ok += usize::from(response.status() == StatusCode::OK);
    }
    black_box(ok)
}

fn main() {
    let n = driver::count_arg(2_000);
    let variant = std::env::var("COLD_VARIANT").unwrap_or_else(|_| "keywarden".into());
    let cold = std::env::var("COLD_EVICT").map_or(true, |v| v != "off");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(MemoryStore::new()))
        .secrets(
            SecretRing::from_strs("cold-lines-secret-0123456789-abcdefghijklmn", None)
                .expect("a secret"),
        )
        .collection(Collection::new("users"))
        // As the load harness runs it (`--cache-ttl 3600`) and `hit_profile` (no usage flush
        // within a run): nothing timed happens among the measured requests.
        .cache_ttl(Duration::from_secs(3600))
        .usage_flush_interval(Some(Duration::from_secs(3600)))
        .build()
        .expect("a layer");
    let manager = KeyManager::for_layer(&layer);
    let keys: Vec<ApiKey> = runtime.block_on(async {
        let mut keys = Vec::with_capacity(KEYS);
        for i in 0..KEYS {
            let new = NewKey::new(format!("k{i}"), format!("u{i}"));
            keys.push(manager.create(new).await.expect("a key").key);
        }
        keys
    });
    let route = Router::new().route("/", get(|| async { "hello" }));
    let router = match variant.as_str() {
        "bare" => route,
        "handwritten" => route.layer(middleware::from_fn_with_state(
            handwritten::owners(keys.iter().map(ApiKey::expose)),
            handwritten::handwritten_auth,
        )),
        "keywarden" => route.layer(layer.same_body()),
        other => panic!("unknown COLD_VARIANT {other}"),
    };
    // Every key once (keywarden's cache fills), and every answer a 200.
    runtime.block_on(async {
        for key in &keys {
            let response = router
                .clone()
                .oneshot(request(key))
                .await
                .expect("infallible");
            assert_eq!(response.status(), StatusCode::OK, "{variant}");
        }
    });
    let mut scratch = vec![0u64; 1 << 19];
    let ok = requests(&runtime, &router, &keys, &mut scratch, cold, n);
    assert_eq!(ok, n, "{variant}: every request a 200");
    println!("{variant}: {n} requests");
}
