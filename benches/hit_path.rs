//! The request path's cost, piece by piece, with the raw HMAC alongside for comparison.
//!
//! Run: `cargo bench --bench hit_path`. Compare figures within one run only: this machine is
//! shared and noisy, so ratios against `bare` and `hmac/prepared` are what matter.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::Empty;
use keywarden::{
    credential::CredentialExtractor, key::ApiKey, key::KeyFormat, key::KeyPrefix, ApiKeyLayer,
    ApiKeyLayerBuilder, Collection, KeyManager, MemoryStore, NewKey, SecretRing,
};
use sha2::Sha256;
use tower::{Layer, Service, ServiceExt};

#[path = "../examples/support/handwritten.rs"]
mod handwritten;

const SECRET: &str = "benchmark-secret-0123456789-abcdefghijk";
const CACHED_KEYS: usize = 10_000;

fn noop() -> impl Service<
    Request<()>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Empty::new()))
    })
}

/// The next index of a cheap LCG walk over the cached keys, so the key order is not
/// sequential.
fn step(index: usize) -> usize {
    index
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        % CACHED_KEYS
}

/// A current-thread runtime for the set-up and the `to_async` runs.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A layer over `store` with the benchmarks' secret and one collection, `users`.
fn users_layer(store: Arc<MemoryStore>) -> ApiKeyLayerBuilder {
    ApiKeyLayer::builder()
        .store(store)
        .secrets(SecretRing::from_strs(SECRET, None).unwrap())
        .collection(Collection::new("users"))
}

fn request(key: &str) -> Request<()> {
    let mut req = Request::new(());
    req.headers_mut()
        .insert("x-api-key", HeaderValue::from_str(key).expect("ASCII key"));
    req
}

fn primitives(c: &mut Criterion) {
    let key = KeyPrefix::new("kw_live").unwrap().generate();
    let ring = SecretRing::from_strs(SECRET, None).unwrap();
    let format = KeyFormat::default();
    let mut group = c.benchmark_group("primitives");
    group.bench_function("hmac/prepared", |b| {
        b.iter(|| ring.digest(black_box(key.expose().as_bytes())))
    });
    // What the hand-written middleware pays instead: one plain SHA-256 of the key (the
    // HMAC's premium over it is one more compression of the 64-byte block).
    group.bench_function("sha256/plain", |b| {
        b.iter(|| {
            use sha2::Digest as _;
            Sha256::digest(black_box(key.expose().as_bytes()))
        })
    });
    group.bench_function("hmac/keyed_per_call", |b| {
        b.iter(|| {
            let mut mac = <Hmac<Sha256>>::new_from_slice(black_box(SECRET.as_bytes())).unwrap();
            mac.update(black_box(key.expose().as_bytes()));
            mac.finalize().into_bytes()
        })
    });
    group.bench_function("parse/valid", |b| {
        b.iter(|| format.parse(black_box(key.expose().as_bytes())).is_ok())
    });
    let mut bad = key.expose().as_bytes().to_vec();
    bad[20] = if bad[20] == b'a' { b'b' } else { b'a' };
    group.bench_function("parse/bad_checksum", |b| {
        b.iter(|| format.parse(black_box(&bad)).is_err())
    });

    let extractor = CredentialExtractor::new(["users", "teams", "services"]);
    for (name, header, value) in [
        (
            "extract/payload",
            "authorization",
            format!("users API-Key {}", key.expose()),
        ),
        (
            "extract/bearer",
            "authorization",
            format!("Bearer {}", key.expose()),
        ),
        ("extract/x-api-key", "x-api-key", key.expose().to_owned()),
    ] {
        let mut headers = HeaderMap::new();
        headers.insert(header, HeaderValue::from_str(&value).unwrap());
        group.bench_function(name, |b| {
            b.iter(|| {
                extractor
                    .extract(black_box(&headers), None)
                    .unwrap()
                    .is_some()
            })
        });
    }
    group.finish();
}

fn layer_path(c: &mut Criterion) {
    let runtime = runtime();
    let store = Arc::new(MemoryStore::new());
    let builder = || users_layer(store.clone()).cache_capacity(2 * CACHED_KEYS as u64);
    let layer = builder().build().unwrap();
    let manager = KeyManager::for_layer(&layer);
    let keys: Vec<ApiKey> = runtime.block_on(async {
        let mut keys = Vec::with_capacity(CACHED_KEYS);
        for i in 0..CACHED_KEYS {
            keys.push(
                manager
                    .create(NewKey::new(format!("k{i}"), format!("u{i}")))
                    .await
                    .unwrap()
                    .key,
            );
        }
        keys
    });
    let service = layer.layer(noop());
    // Warm the cache with every key.
    runtime.block_on(async {
        for key in &keys {
            let response = service
                .clone()
                .oneshot(request(key.expose()))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    });
    let bare = noop();
    let mut group = c.benchmark_group("layer");
    group.bench_function("bare", |b| {
        b.to_async(&runtime)
            .iter(|| bare.clone().oneshot(request(keys[0].expose())))
    });
    group.bench_function("hit/one_key", |b| {
        b.to_async(&runtime)
            .iter(|| service.clone().oneshot(request(keys[0].expose())))
    });
    let mut next = 0usize;
    group.bench_function("hit/10k_keys_random", |b| {
        b.to_async(&runtime).iter_batched(
            || {
                next = step(next);
                request(keys[next].expose())
            },
            |req| service.clone().oneshot(req),
            BatchSize::SmallInput,
        )
    });
    // The same hit with metrics on: a layer over the same store whose handles are registered
    // with a Prometheus recorder (feature `metrics`). `hit/one_key` has none: its handles
    // are no-ops, which is what metrics off costs.
    #[cfg(feature = "metrics")]
    let _recorder = {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metered = metrics::with_local_recorder(&recorder, || builder().build().unwrap());
        let metered = metered.layer(noop());
        runtime.block_on(async {
            let response = metered
                .clone()
                .oneshot(request(keys[0].expose()))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        });
        group.bench_function("hit/one_key_metrics", |b| {
            b.to_async(&runtime)
                .iter(|| metered.clone().oneshot(request(keys[0].expose())))
        });
        recorder
    };
    let mut malformed = keys[0].expose().to_owned();
    malformed.replace_range(20..21, if &malformed[20..21] == "a" { "b" } else { "a" });
    group.bench_function("reject/malformed", |b| {
        b.to_async(&runtime)
            .iter(|| service.clone().oneshot(request(&malformed)))
    });
    group.finish();
}

/// The hit path with a per-key rate limit (the local limiter) on every request.
fn limited_path(c: &mut Criterion) {
    let runtime = runtime();
    let layer = users_layer(Arc::new(MemoryStore::new()))
        // High enough never to deny inside a benchmark run.
        .default_rate_limit("1000000000/s".parse().unwrap())
        .build()
        .unwrap();
    let key = runtime.block_on(async {
        KeyManager::for_layer(&layer)
            .create(NewKey::new("limited", "u"))
            .await
            .unwrap()
            .key
    });
    let service = layer.layer(noop());
    let mut group = c.benchmark_group("layer");
    group.bench_function("hit/one_key_rate_limited", |b| {
        b.to_async(&runtime)
            .iter(|| service.clone().oneshot(request(key.expose())))
    });
    group.finish();
}

/// The hit path of a key with credits (10^12, never run out): one credit spent from the
/// instance's lease per request, `Credits-Remaining` on the response; one request in 100
/// leases the next block (the default) from the memory store.
fn credits_path(c: &mut Criterion) {
    let runtime = runtime();
    let layer = users_layer(Arc::new(MemoryStore::new())).build().unwrap();
    let key = runtime.block_on(async {
        KeyManager::for_layer(&layer)
            .create(NewKey::new("metered", "u").credits(1_000_000_000_000))
            .await
            .unwrap()
            .key
    });
    let service = layer.layer(noop());
    let mut group = c.benchmark_group("layer");
    group.bench_function("hit/one_key_credits", |b| {
        b.to_async(&runtime)
            .iter(|| service.clone().oneshot(request(key.expose())))
    });
    group.finish();
}

/// In axum, as the load harness serves them: the bare route, the middleware a user would
/// write by hand (`from_fn`: SHA-256 of `X-Api-Key`, a `HashMap` lookup, the owner into the
/// extensions) and keywarden (`same_body`), the same 10,000 keys read in the same order.
/// The load harness's head-to-head (`bench/load.py`) is the measure of issue 19; this one
/// has warm caches and no sockets, so it shows the layers' own cost.
fn against_handwritten(c: &mut Criterion) {
    use axum::{body::Body, middleware, routing::get, Router};

    let runtime = runtime();
    let store = Arc::new(MemoryStore::new());
    let layer = users_layer(store).build().unwrap();
    let manager = KeyManager::for_layer(&layer);
    let keys: Vec<ApiKey> = runtime.block_on(async {
        let mut keys = Vec::with_capacity(CACHED_KEYS);
        for i in 0..CACHED_KEYS {
            let new = NewKey::new(format!("k{i}"), format!("u{i}"));
            keys.push(manager.create(new).await.unwrap().key);
        }
        keys
    });
    let owners = handwritten::owners(keys.iter().map(ApiKey::expose));
    let route = || Router::new().route("/", get(|| async { "hello" }));
    let routers = [
        ("axum/bare", route()),
        (
            "axum/handwritten_10k",
            route().layer(middleware::from_fn_with_state(
                owners,
                handwritten::handwritten_auth,
            )),
        ),
        ("axum/keywarden_10k", route().layer(layer.same_body())),
    ];
    let request = |key: &ApiKey| {
        Request::builder()
            .uri("/")
            .header("x-api-key", key.expose())
            .body(Body::empty())
            .unwrap()
    };
    // Between two requests a server's core runs the kernel's network stack (and other
    // work), which evicts much of what the last request left in the caches: the `_cold`
    // variants put a loopback socket round trip and a walk over 2 MiB of memory between two
    // requests, untimed, to see each layer with the caches a loaded server gives it.
    let mut scratch = vec![0u64; 2 << 17];
    let pipe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    pipe.connect(pipe.local_addr().unwrap()).unwrap();
    fn pollute(scratch: &mut [u64], pipe: &std::net::UdpSocket) {
        let mut buf = [0u8; 512];
        for _ in 0..2 {
            pipe.send(&[7; 200]).unwrap();
            pipe.recv(&mut buf).unwrap();
        }
        for (i, word) in scratch.iter_mut().enumerate().step_by(8) {
            *word = word.wrapping_add(i as u64);
        }
        black_box(&scratch);
    }
    let mut group = c.benchmark_group("layer");
    for (name, router) in &routers {
        // Every key once (keywarden's cache fills), and every answer a 200.
        runtime.block_on(async {
            for key in &keys {
                let response = router.clone().oneshot(request(key)).await.unwrap();
                assert_eq!(response.status(), 200, "{name}");
            }
        });
        let mut next = 0usize;
        let cold = format!("{name}_cold");
        group.bench_function(&cold, |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    next = step(next);
                    let req = request(&keys[next]);
                    pollute(&mut scratch, &pipe);
                    let start = std::time::Instant::now();
                    let response = runtime.block_on(router.clone().oneshot(req));
                    total += start.elapsed();
                    drop(black_box(response));
                }
                total
            })
        });
        group.bench_function(*name, |b| {
            b.to_async(&runtime).iter_batched(
                || {
                    next = step(next);
                    request(&keys[next])
                },
                |req| router.clone().oneshot(req),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    primitives,
    layer_path,
    limited_path,
    credits_path,
    against_handwritten
);
criterion_main!(benches);
