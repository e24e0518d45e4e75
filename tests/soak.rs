//! A bounded soak: a real server on loopback (SQLite store) under steady load while keys are
//! created, rotated, revoked and deleted. Ignored by default; run it with
//!
//! ```text
//! KEYWARDEN_SOAK_SECS=180 cargo test --all-features --test soak -- --ignored --nocapture
//! ```
//!
//! It checks that
//! - no request started after a revocation (or a zero-grace rotation, or a delete) returned is
//!   accepted with that key: on a single instance the manager invalidates the layer's cache
//!   before it returns, so the propagation bound is zero;
//! - no request fails: every answer is the handler's 200 for a live key or the documented
//!   rejection for a dead one; no transport error, no 5xx, no timeout;
//! - RSS stays flat: the average of the last third of the samples is within 15 % + 4 MiB of
//!   the average after warm-up.

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keywarden::{
    manage::ManageErrorKind, ApiKeyLayer, Collection, KeyManager, NewKey, SecretRing, SqliteStore,
};

const ALIVE: u64 = u64::MAX;
const CLIENTS: usize = 4;
/// Requests per second per client.
const RATE: u64 = 250;
const MAX_LIVE: usize = 100;
const MAX_DEAD: usize = 100;

struct Tracked {
    id: uuid::Uuid,
    key: String,
    /// Nanoseconds since the start at which the key was known dead (the revoking call had
    /// returned); `ALIVE` until then.
    dead_since: AtomicU64,
    /// Set just before the key is revoked: from then on a rejection is expected.
    dying: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Counters {
    requests: AtomicUsize,
    accepted: AtomicUsize,
    rejected_dead: AtomicUsize,
    errors: AtomicUsize,
    accepted_after_death: AtomicUsize,
    max_latency_us: AtomicU64,
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of several minutes: run explicitly"]
async fn soak() {
    let seconds: u64 = std::env::var("KEYWARDEN_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let duration = Duration::from_secs(seconds);
    let path = std::env::temp_dir().join(format!(
        "keywarden-soak-{}.db",
        uuid::Uuid::now_v7().simple()
    ));
    let store = Arc::new(
        SqliteStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap(),
    );
    let layer = ApiKeyLayer::builder()
        .store(store)
        .secrets(SecretRing::from_strs(support::SECRET, None).unwrap())
        .collection(Collection::new("users"))
        .build()
        .unwrap();
    let manager = Arc::new(KeyManager::for_layer(&layer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = support::app().layer(layer.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let start = Instant::now();
    let now = move || start.elapsed().as_nanos() as u64;
    let live: Arc<Mutex<Vec<Arc<Tracked>>>> = Arc::default();
    let dead: Arc<Mutex<Vec<Arc<Tracked>>>> = Arc::default();
    let counters = Arc::new(Counters::default());
    let churn_ops = Arc::new(AtomicUsize::new(0));

    let new_tracked = |created: keywarden::CreatedKey| {
        Arc::new(Tracked {
            id: created.record.id,
            key: created.key.expose().to_owned(),
            dead_since: AtomicU64::new(ALIVE),
            dying: false.into(),
        })
    };
    for i in 0..20 {
        let created = manager
            .create(NewKey::new(format!("seed-{i}"), "soak"))
            .await
            .unwrap();
        live.lock().unwrap().push(new_tracked(created));
    }

    // Clients: a steady rate each, mostly live keys, some dead ones.
    let mut clients = Vec::new();
    for client_index in 0..CLIENTS {
        let (live, dead, counters) = (live.clone(), dead.clone(), counters.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let url = format!("http://{addr}/whoami");
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n: usize = client_index;
            while start.elapsed() < duration {
                tick.tick().await;
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let pick_dead = n % 5 == 0;
                let tracked = {
                    let pool = if pick_dead { dead.lock() } else { live.lock() }.unwrap();
                    if pool.is_empty() {
                        continue;
                    }
                    pool[(n >> 33) % pool.len()].clone()
                };
                let started = now();
                let sent = Instant::now();
                let response = http
                    .get(&url)
                    .header("x-api-key", &tracked.key)
                    .send()
                    .await;
                let latency = sent.elapsed().as_micros() as u64;
                counters
                    .max_latency_us
                    .fetch_max(latency, Ordering::Relaxed);
                counters.requests.fetch_add(1, Ordering::Relaxed);
                let Ok(response) = response else {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let status = response.status().as_u16();
                let body = response.bytes().await.unwrap_or_default();
                let dead_since = tracked.dead_since.load(Ordering::SeqCst);
                match status {
                    200 => {
                        counters.accepted.fetch_add(1, Ordering::Relaxed);
                        if dead_since <= started {
                            counters
                                .accepted_after_death
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    401 if tracked.dying.load(Ordering::SeqCst) => {
                        let json: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        let code = json["code"].as_str().unwrap_or_default();
                        if matches!(code, "revoked_key" | "expired_key" | "invalid_key") {
                            counters.rejected_dead.fetch_add(1, Ordering::Relaxed);
                        } else {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        eprintln!("unexpected {status} for a live key: {body:?}");
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    // Churn: create, rotate (with and without grace), revoke, delete.
    let churn = {
        let (live, dead, manager, churn_ops) = (
            live.clone(),
            dead.clone(),
            manager.clone(),
            churn_ops.clone(),
        );
        tokio::spawn(async move {
            let mut step: usize = 0;
            let kill = |tracked: &Arc<Tracked>| tracked.dying.store(true, Ordering::SeqCst);
            let buried = |tracked: Arc<Tracked>| {
                tracked.dead_since.store(now(), Ordering::SeqCst);
                let mut dead = dead.lock().unwrap();
                dead.push(tracked);
                if dead.len() > MAX_DEAD {
                    Some(dead.remove(0))
                } else {
                    None
                }
            };
            while start.elapsed() < duration {
                tokio::time::sleep(Duration::from_millis(20)).await;
                step += 1;
                let victim = {
                    let live = live.lock().unwrap();
                    live.get(step % live.len().max(1)).cloned()
                };
                let expired = match (step % 4, victim) {
                    (0, _) | (_, None) => {
                        let created = manager
                            .create(NewKey::new(format!("k-{step}"), "soak"))
                            .await
                            .unwrap();
                        live.lock().unwrap().push(new_tracked(created));
                        None
                    }
                    (1, Some(victim)) => {
                        // Zero grace: the old key dies when rotate returns.
                        kill(&victim);
                        match manager.rotate(victim.id, time::Duration::ZERO).await {
                            Ok(rotated) => live.lock().unwrap().push(new_tracked(rotated)),
                            // Rotated before, with grace: a key is rotated once, so end it.
                            Err(e) if e.kind() == ManageErrorKind::Conflict => {
                                manager.revoke(victim.id).await.unwrap();
                            }
                            Err(e) => panic!("rotate: {e}"),
                        }
                        live.lock().unwrap().retain(|t| t.id != victim.id);
                        buried(victim)
                    }
                    (2, Some(victim)) => {
                        // With grace: both keys stay live.
                        match manager.rotate(victim.id, time::Duration::hours(1)).await {
                            Ok(rotated) => live.lock().unwrap().push(new_tracked(rotated)),
                            // Rotated before: it keeps its grace period.
                            Err(e) if e.kind() == ManageErrorKind::Conflict => {}
                            Err(e) => panic!("rotate: {e}"),
                        }
                        None
                    }
                    (_, Some(victim)) => {
                        kill(&victim);
                        manager.revoke(victim.id).await.unwrap();
                        live.lock().unwrap().retain(|t| t.id != victim.id);
                        buried(victim)
                    }
                };
                // Keep the store and the pools bounded: the oldest dead key is deleted (and
                // stays rejected, now as unknown), extra live keys are revoked.
                if let Some(oldest) = expired {
                    manager.delete(oldest.id).await.unwrap();
                }
                let extra = {
                    let mut live = live.lock().unwrap();
                    (live.len() > MAX_LIVE).then(|| live.remove(0))
                };
                if let Some(extra) = extra {
                    kill(&extra);
                    manager.revoke(extra.id).await.unwrap();
                    if let Some(oldest) = buried(extra) {
                        manager.delete(oldest.id).await.unwrap();
                    }
                }
                churn_ops.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    // RSS samples, one a second.
    let mut samples = Vec::new();
    while start.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(rss_kib());
    }
    churn.await.unwrap();
    for client in clients {
        client.await.unwrap();
    }
    server.abort();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }

    let average = |s: &[u64]| s.iter().sum::<u64>() / s.len().max(1) as u64;
    let warm = samples.len() / 5;
    let baseline = average(&samples[warm..warm + (samples.len() / 5).max(1)]);
    let last = average(&samples[samples.len() * 2 / 3..]);
    let requests = counters.requests.load(Ordering::Relaxed);
    let report = format!(
        "soak: {seconds} s, {requests} requests ({:.0}/s), {} accepted, {} rejected as dead, \
         {} errors, {} accepted after death, {} churn steps, max latency {} µs; \
         RSS KiB: start {}, baseline {baseline}, last third {last}, max {}, end {}",
        requests as f64 / seconds as f64,
        counters.accepted.load(Ordering::Relaxed),
        counters.rejected_dead.load(Ordering::Relaxed),
        counters.errors.load(Ordering::Relaxed),
        counters.accepted_after_death.load(Ordering::Relaxed),
        churn_ops.load(Ordering::Relaxed),
        counters.max_latency_us.load(Ordering::Relaxed),
        samples.first().unwrap(),
        samples.iter().max().unwrap(),
        samples.last().unwrap(),
    );
    eprintln!("{report}");
    assert!(
        requests > 0 && counters.rejected_dead.load(Ordering::Relaxed) > 0,
        "{report}"
    );
    assert_eq!(counters.errors.load(Ordering::Relaxed), 0, "{report}");
    assert_eq!(
        counters.accepted_after_death.load(Ordering::Relaxed),
        0,
        "{report}"
    );
    assert!(
        last <= baseline + baseline * 15 / 100 + 4096,
        "RSS grew: {report}"
    );
}
