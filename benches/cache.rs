//! The cache read alone, for reference: moka (configured as keywarden configures it, and
//! bare) against plain concurrent maps, 10,000 keys read at random. Also the per-request
//! usage bookkeeping (a `DashMap` entry update keyed by key id).
//!
//! Run: `cargo bench --bench cache`. Compare figures within one run only.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::hint::black_box;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dashmap::DashMap;
use keywarden::{secret::Digest, SecretRing};
use moka::Expiry;
use uuid::Uuid;

const KEYS: usize = 10_000;
const SECRET: &str = "benchmark-secret-0123456789-abcdefghijk";

/// Stands in for the cached `Resolved` (a pointer to a shared record).
type Value = Arc<[u64; 16]>;

/// keywarden's cache entry shape: the lookup plus a generation.
#[derive(Clone)]
#[allow(dead_code)] // mirrors keywarden's entry size
struct Cached {
    value: Option<Value>,
    generation: u64,
}

struct Ttl;

impl Expiry<Digest, Cached> for Ttl {
    fn expire_after_create(&self, _: &Digest, v: &Cached, _: Instant) -> Option<Duration> {
        Some(if v.value.is_some() {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(5)
        })
    }
}

fn digests() -> Vec<Digest> {
    let ring = SecretRing::from_strs(SECRET, None).unwrap();
    (0..KEYS)
        .map(|i| ring.digest(format!("kw_live_{i:049}").as_bytes()))
        .collect()
}

/// A cheap LCG walk over indices so reads are not sequential.
struct Walk(usize);

impl Walk {
    fn next(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 17) % KEYS
    }
}

fn cache_reads(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let digests = digests();
    let value: Value = Arc::new([7; 16]);
    let mut group = c.benchmark_group("cache_get_10k_random");

    // As keywarden builds it: per-entry expiry and an eviction listener (invalidation
    // closures until issue 19).
    let keywarden_like: moka::future::Cache<Digest, Cached> = moka::future::Cache::builder()
        .max_capacity(100_000)
        .expire_after(Ttl)
        .eviction_listener(|_, _, _| {})
        .build();
    let plain_future: moka::future::Cache<Digest, Value> =
        moka::future::Cache::builder().max_capacity(100_000).build();
    let dashmap: DashMap<Digest, Value> = DashMap::new();
    let rwlock: RwLock<HashMap<Digest, Value>> = RwLock::new(HashMap::new());
    runtime.block_on(async {
        for d in &digests {
            keywarden_like
                .insert(
                    *d,
                    Cached {
                        value: Some(value.clone()),
                        generation: 0,
                    },
                )
                .await;
            plain_future.insert(*d, value.clone()).await;
            dashmap.insert(*d, value.clone());
            rwlock.write().unwrap().insert(*d, value.clone());
        }
        keywarden_like.run_pending_tasks().await;
        plain_future.run_pending_tasks().await;
    });

    let mut walk = Walk(1);
    group.bench_function("moka_future/keywarden_config", |b| {
        b.to_async(&runtime)
            .iter(|| keywarden_like.get(black_box(&digests[walk.next()])))
    });
    let mut walk = Walk(1);
    group.bench_function("moka_future/plain", |b| {
        b.to_async(&runtime)
            .iter(|| plain_future.get(black_box(&digests[walk.next()])))
    });
    let mut walk = Walk(1);
    group.bench_function("dashmap", |b| {
        b.iter(|| {
            dashmap
                .get(black_box(&digests[walk.next()]))
                .map(|v| v.clone())
        })
    });
    let mut walk = Walk(1);
    group.bench_function("rwlock_hashmap", |b| {
        b.iter(|| {
            rwlock
                .read()
                .unwrap()
                .get(black_box(&digests[walk.next()]))
                .cloned()
        })
    });
    let mut walk = Walk(1);
    group.bench_function("index_only", |b| {
        b.iter(|| black_box(&digests[walk.next()]).as_bytes()[0])
    });
    group.finish();

    // The hash alone: 32 digest bytes (what `Digest` hashed before) vs `Digest`'s own hash.
    let state = std::collections::hash_map::RandomState::new();
    let mut walk = Walk(1);
    c.bench_function("hash/siphash_32_bytes", |b| {
        b.iter(|| state.hash_one(black_box(digests[walk.next()].as_bytes())))
    });
    let mut walk = Walk(1);
    c.bench_function("hash/digest_hash", |b| {
        b.iter(|| state.hash_one(black_box(&digests[walk.next()])))
    });
}

fn usage_bookkeeping(c: &mut Criterion) {
    let ids: Vec<Uuid> = (0..KEYS).map(|_| Uuid::now_v7()).collect();
    let pending: DashMap<Uuid, (u64, time::OffsetDateTime)> = DashMap::new();
    let now = time::OffsetDateTime::now_utc();
    let mut walk = Walk(1);
    c.bench_function("usage/dashmap_entry_10k_random", |b| {
        b.iter(|| {
            pending
                .entry(black_box(ids[walk.next()]))
                .and_modify(|p| {
                    p.0 += 1;
                    if now > p.1 {
                        p.1 = now;
                    }
                })
                .or_insert((1, now));
        })
    });
    c.bench_function("clock/offset_date_time_now_utc", |b| {
        b.iter(time::OffsetDateTime::now_utc)
    });
    c.bench_function("clock/instant_now", |b| b.iter(Instant::now));
}

criterion_group!(benches, cache_reads, usage_bookkeeping);
criterion_main!(benches);
