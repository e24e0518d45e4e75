//! Bytes of resident memory per cached key: fills the layer's cache through its public API
//! (`ApiKeyLayer::verify`, the same lookup as the request path) and reads `VmRSS` from
//! `/proc/self/status` before and after. Linux only.
//!
//! ```text
//! cargo run --release --example cache_memory -- 100000 1000000
//! ```
//!
//! The keys are created through the KeyManager in a memory store *before* the first RSS
//! reading, so the store and the plaintext list are in the baseline; the delta is what the
//! cache (moka's entries, their `Resolved` records and principals, moka's bookkeeping) adds.

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
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("a key count"))
        .collect();
    let counts = if counts.is_empty() {
        vec![100_000, 1_000_000]
    } else {
        counts
    };
    if let [count] = counts[..] {
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
    for count in counts {
        let status = std::process::Command::new(&exe)
            .arg(count.to_string())
            .status()
            .expect("run a measurement");
        assert!(status.success(), "measurement for {count} keys failed");
    }
}

async fn measure(count: usize) {
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(MemoryStore::new()))
        .secrets(SecretRing::from_strs("memory-secret-0123456789-abcdefghijklmnop", None).unwrap())
        .collection(Collection::new("users"))
        .cache_capacity(2 * count as u64)
        .usage_flush_interval(None)
        .build()
        .unwrap();
    let manager = KeyManager::for_layer(&layer);
    let mut keys = Vec::with_capacity(count);
    for i in 0..count {
        let created = manager
            .create(NewKey::new(format!("key-{i}"), format!("user-{i}")).scope("read"))
            .await
            .unwrap();
        keys.push(created.key);
    }
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
