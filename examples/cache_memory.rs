//! Bytes of resident memory per cached key: fills the layer's cache through its public API
//! (`ApiKeyLayer::verify`, the same lookup as the request path) and reads `VmRSS` from
//! `/proc/self/status` before and after. Linux only.
//!
//! ```text
//! cargo run --release --example cache_memory -- 100000 1000000
//! ```
//!
//! The keys are created through a KeyManager in a memory store *before* the first RSS
//! reading, and before the layer is built (so no creation notice reaches its cache), so the
//! store and the plaintext list are in the baseline; the delta is what the cache (moka's
//! found map, moka's not-found entries, the cached entries and principals) adds.
//!
//! `--parts` also measures maps alone, with a 32-byte key and an `Arc` value like the
//! cache's: moka in the configurations keywarden has used, the `DashMap` that mirrored it for
//! hits, and the sharded map that holds found keys now. What they take is structure that no
//! change to the cached records can remove.
//!
//! ```text
//! cargo run --release --example cache_memory -- --parts 1000000
//! ```

use std::sync::Arc;

use keywarden::{ApiKeyLayer, Collection, KeyManager, MemoryStore, NewKey, SecretRing};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let [part, count] = &args[..] {
        if PARTS.iter().any(|(name, _)| name == part) {
            let count: usize = count.parse().expect("a count");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(measure_part(part, count));
            return;
        }
    }
    let parts = args.first().is_some_and(|a| a == "--parts");
    if parts {
        args.remove(0);
    }
    let counts: Vec<usize> = args
        .iter()
        .map(|s| s.parse().expect("a key count"))
        .collect();
    let counts = if counts.is_empty() {
        vec![100_000, 1_000_000]
    } else {
        counts
    };
    if let ([count], false) = (&counts[..], parts) {
        let count = *count;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(measure(count));
        return;
    }
    println!("| cached keys | RSS before (MiB) | RSS after (MiB) | bytes per cached key |");
    println!("| ---: | ---: | ---: | ---: |");
    // One fresh process per count, so memory freed by one run cannot hide the next one's.
    let exe = std::env::current_exe().expect("own path");
    for &count in &counts {
        let status = std::process::Command::new(&exe)
            .arg(count.to_string())
            .status()
            .expect("run a measurement");
        assert!(status.success(), "measurement for {count} keys failed");
    }
    if parts {
        println!();
        println!("| map alone | entries | bytes per entry |");
        println!("| --- | ---: | ---: |");
        for (part, _) in PARTS {
            for count in &counts {
                let status = std::process::Command::new(&exe)
                    .args([part, &count.to_string()])
                    .status()
                    .expect("run a measurement");
                assert!(status.success(), "{part} for {count} entries failed");
            }
        }
    }
}

/// The maps `--parts` measures: moka as keywarden configured it before issue 19 (capacity,
/// per-entry expiry, invalidation closures, eviction listener), as it held found keys until
/// they moved to the found map (no invalidation closures), as it holds not-found digests now
/// (expiry, no listener), in its plainest configuration; the `DashMap` that mirrored moka
/// for hits; and the structure of the found map (a `HashMap` per shard behind a lock).
const PARTS: [(&str, &str); 6] = [
    (
        "moka-closures",
        "moka: expiry, listener, invalidation closures (before issue 19)",
    ),
    (
        "moka-listener",
        "moka: expiry, listener (found keys, before the found map)",
    ),
    ("moka", "moka: expiry (keywarden's not-found digests now)"),
    ("moka-plain", "moka: capacity only"),
    ("dashmap", "DashMap (the front map, before the found map)"),
    (
        "sharded",
        "HashMap in 8 shards behind RwLocks (the found map)",
    ),
];

/// One of the cache's two maps alone: 32-byte keys (like a digest), `Arc` values.
async fn measure_part(part: &str, count: usize) {
    struct Lifetime;
    impl moka::Expiry<[u8; 32], Arc<u64>> for Lifetime {
        fn expire_after_create(
            &self,
            _: &[u8; 32],
            _: &Arc<u64>,
            _: std::time::Instant,
        ) -> Option<std::time::Duration> {
            Some(std::time::Duration::from_secs(3600))
        }
    }
    let key = |i: usize| {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        key
    };
    let values: Vec<Arc<u64>> = (0..count as u64).map(Arc::new).collect();
    let before = rss_bytes();
    let label = PARTS
        .iter()
        .find(|(name, _)| *name == part)
        .map(|(_, label)| *label)
        .expect("a known part");
    let after = if let Some(config) = part.strip_prefix("moka") {
        let mut builder = moka::future::Cache::builder().max_capacity(2 * count as u64);
        if config != "-plain" {
            builder = builder.expire_after(Lifetime);
        }
        if config == "-closures" {
            builder = builder.support_invalidation_closures();
        }
        let cache: moka::future::Cache<[u8; 32], Arc<u64>> =
            if config == "-closures" || config == "-listener" {
                builder.eviction_listener(|_, _, _| {}).build()
            } else {
                builder.build()
            };
        for (i, value) in values.iter().enumerate() {
            cache.insert(key(i), Arc::clone(value)).await;
        }
        cache.run_pending_tasks().await;
        assert_eq!(cache.entry_count(), count as u64);
        rss_bytes()
    } else if part == "dashmap" {
        let map = dashmap::DashMap::new();
        for (i, value) in values.iter().enumerate() {
            map.insert(key(i), Arc::clone(value));
        }
        assert_eq!(map.len(), count);
        rss_bytes()
    } else {
        let shards: Vec<std::sync::RwLock<std::collections::HashMap<[u8; 32], Arc<u64>>>> =
            (0..8).map(|_| Default::default()).collect();
        for (i, value) in values.iter().enumerate() {
            let key = key(i);
            let shard = usize::from(key[1]) % 8;
            shards[shard]
                .write()
                .unwrap()
                .insert(key, Arc::clone(value));
        }
        let len: usize = shards.iter().map(|s| s.read().unwrap().len()).sum();
        assert_eq!(len, count);
        rss_bytes()
    };
    let per_entry = after.saturating_sub(before) as f64 / count as f64;
    println!("| {label} | {count} | {per_entry:.0} |");
}

async fn measure(count: usize) {
    let store = Arc::new(MemoryStore::new());
    let secrets = SecretRing::from_strs("memory-secret-0123456789-abcdefghijklmnop", None).unwrap();
    // The keys are created before the layer exists, so their creation notices (each of which
    // invalidates the layer's not-found entries) cannot leave anything behind in the
    // baseline for the cache to reuse.
    let manager = KeyManager::new(store.clone(), secrets.clone());
    let mut keys = Vec::with_capacity(count);
    for i in 0..count {
        let created = manager
            .create(NewKey::new(format!("key-{i}"), format!("user-{i}")).scope("read"))
            .await
            .unwrap();
        keys.push(created.key);
    }
    let layer = ApiKeyLayer::builder()
        .store(store)
        .secrets(secrets)
        .collection(Collection::new("users"))
        .cache_capacity(2 * count as u64)
        .usage_flush_interval(None)
        .build()
        .unwrap();
    assert_eq!(layer.cached_entries().await, 0, "nothing cached yet");
    let before = rss_bytes();
    for key in &keys {
        layer
            .verify(key.expose(), &http::Method::GET)
            .await
            .expect("a valid key");
    }
    let cached = layer.cached_entries().await;
    let after = rss_bytes();
    assert_eq!(cached, count as u64, "every key is cached");
    let per_key = after.saturating_sub(before) as f64 / count as f64;
    println!(
        "| {count} | {:.1} | {:.1} | {per_key:.0} |",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
}
