//! Write-behind usage tracking: `last_used_at` and use counts, batched.
//!
//! Each cached key carries a [`UsageCell`]: a use adds to its counters (two atomic updates,
//! no lock, no map), and the first use after a flush puts the key on a queue. Uses of keys
//! read without the cache, and counts put back after a failed flush, go to a map with one
//! entry per key. A background task flushes both to the store every interval in one
//! `record_usage` call.
//!
//! The same flush writes the usage analytics ([`KeyStore::record_usage_counts`]): the uses
//! above as `accepted` in the hour of their latest use, and the rejections counted here (per
//! key once a key was resolved, else per collection), each in its hour.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::cache::ResolvedKey;
use crate::clock::WallAnchor;
use crate::store::{
    hour_of, KeyStore, KeyUsage, StoreError, UsageCount, UsageOutcome, UsageSubject,
};

/// The most analytics counts kept for a store that keeps failing; beyond, the oldest go.
const MAX_PENDING_COUNTS: usize = 100_000;

/// Counts uses of keys on the request path and writes them behind, in batches.
///
/// `repr(C)`, the fields every recorded use reads first (the time anchor and whether the
/// flusher runs): one cache line of the recorder per request instead of two.
#[repr(C)]
pub(crate) struct UsageRecorder {
    /// Times of use from the hit path's monotonic reading (the system clock); `None` with
    /// another clock, which is then read for each use.
    wall: Option<WallAnchor>,
    started: AtomicBool,
    /// Cached keys used since the last flush, each once per cache fill.
    queue: Mutex<Vec<Arc<ResolvedKey>>>,
    /// Uses not held in a cell, one entry per key id: `(uses, latest)`.
    loose: Mutex<HashMap<Uuid, (u64, i64)>>,
    /// Rejections since the last flush, by subject, hour (unix seconds) and outcome. Bounded
    /// by the resolved keys and the configured collections.
    rejections: Mutex<HashMap<(UsageSubject, i64, UsageOutcome), u64>>,
    /// Analytics a failed flush could not write, retried with the next.
    unwritten: Mutex<Vec<UsageCount>>,
    store: Arc<dyn KeyStore>,
    interval: Duration,
}

impl std::fmt::Debug for UsageRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queued = self.queue.lock().map_or(0, |queue| queue.len());
        f.debug_struct("UsageRecorder")
            .field("queued", &queued)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl UsageRecorder {
    /// `system_clock`: the layer judges time by the system clock, so the time of a use can
    /// come from the hit path's own monotonic reading ([`UsageRecorder::wall`]).
    pub(crate) fn new(
        store: Arc<dyn KeyStore>,
        interval: Duration,
        system_clock: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            wall: system_clock.then(WallAnchor::new),
            queue: Mutex::default(),
            loose: Mutex::default(),
            rejections: Mutex::default(),
            unwritten: Mutex::default(),
            store,
            interval,
            started: AtomicBool::new(false),
        })
    }

    /// Notes one use at `at` (Unix nanoseconds). Starts the flusher on first use, inside
    /// the caller's runtime.
    pub(crate) fn record(self: &Arc<Self>, key: &Arc<ResolvedKey>, at: i64) {
        if key.usage.add(&key.queued, 1, at) {
            self.enqueue(Arc::clone(key));
        }
        self.ensure_flusher();
    }

    /// Notes one use of a key that is not cached (the cache is off): counted by id, so the
    /// pending uses stay one entry per key however many requests there are.
    pub(crate) fn record_uncached(self: &Arc<Self>, id: Uuid, at: i64) {
        self.add_loose(id, 1, at);
        self.ensure_flusher();
    }

    /// Counts a rejection of `subject` at `at` for the analytics.
    pub(crate) fn record_rejection(
        self: &Arc<Self>,
        subject: UsageSubject,
        outcome: UsageOutcome,
        at: OffsetDateTime,
    ) {
        let hour = hour_of(at).unix_timestamp();
        {
            let mut rejections = self
                .rejections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let slot = rejections.entry((subject, hour, outcome)).or_default();
            *slot = slot.saturating_add(1);
        }
        self.ensure_flusher();
    }

    /// Inlined: every recorded use checks it, and it is one load once the flusher runs.
    #[inline]
    fn ensure_flusher(self: &Arc<Self>) {
        if !self.started.load(Ordering::Relaxed) && !self.started.swap(true, Ordering::AcqRel) {
            self.spawn_flusher();
        }
    }

    fn add_loose(&self, id: Uuid, uses: u64, last: i64) {
        let mut loose = self.loose.lock().unwrap_or_else(PoisonError::into_inner);
        merge_uses(&mut loose, id, uses, last);
    }

    fn enqueue(&self, key: Arc<ResolvedKey>) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.push(key);
        if queue.len() >= MAX_QUEUED {
            // Cache fills churned faster than flushes: fold the cells into per-key counts
            // rather than keep every filled entry alive.
            let folded = std::mem::take(&mut *queue);
            drop(queue);
            for key in folded {
                let (uses, last) = key.usage.take(&key.queued);
                if uses > 0 {
                    self.add_loose(key.principal.key_id(), uses, last);
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn queued(&self) -> (usize, usize) {
        (
            self.queue.lock().unwrap().len(),
            self.loose.lock().unwrap().len(),
        )
    }

    /// Starts the flusher on the current tokio runtime, if there is one. The layer's builder
    /// calls this; a layer built outside a runtime starts it on its first recorded use.
    pub(crate) fn start(self: &Arc<Self>) {
        self.ensure_flusher();
    }

    #[cold]
    fn spawn_flusher(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (a synchronous caller): the next use, or `flush`, will do.
            self.started.store(false, Ordering::Release);
            return;
        };
        // If the worker ends for any reason (its runtime shut down, even before its first
        // poll), the guard is dropped with it and the next use starts a new one.
        let worker = UsageFlusher {
            recorder: Arc::downgrade(self),
            interval: self.interval,
            _restart: RestartOnDrop(Arc::downgrade(self)),
        };
        runtime.spawn(worker.run());
    }

    #[cfg(test)]
    pub(crate) fn flusher_running(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Turns the hit path's monotonic readings into times of use, with the system clock.
    #[inline]
    pub(crate) fn wall(&self) -> Option<&WallAnchor> {
        self.wall.as_ref()
    }

    /// Writes every pending use to the store in one batch, one row per key.
    pub(crate) async fn flush(&self) -> Result<usize, StoreError> {
        if let Some(wall) = &self.wall {
            wall.reanchor();
        }
        let queued =
            std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
        let mut rows =
            std::mem::take(&mut *self.loose.lock().unwrap_or_else(PoisonError::into_inner));
        // A key read into the cache again has a new cell: merge them into one row.
        for key in queued {
            let (uses, last) = key.usage.take(&key.queued);
            if uses > 0 {
                merge_uses(&mut rows, key.principal.key_id(), uses, last);
            }
        }
        let written = self.flush_uses(rows).await?;
        let uses = written.len();
        self.flush_counts(written).await?;
        Ok(uses)
    }

    /// Writes the uses; returns what was written (for the analytics).
    async fn flush_uses(
        &self,
        rows: HashMap<Uuid, (u64, i64)>,
    ) -> Result<Vec<KeyUsage>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let batch: Vec<KeyUsage> = rows
            .iter()
            .map(|(&id, &(uses, last))| KeyUsage {
                id,
                last_used_at: from_nanos(last),
                uses,
            })
            .collect();
        match self.store.record_usage(&batch).await {
            Ok(()) => Ok(batch),
            Err(error) => {
                // Kept by key id, not by cell: a store that keeps failing holds one entry per
                // key, not every cache fill since.
                for (id, (uses, last)) in rows {
                    self.add_loose(id, uses, last);
                }
                Err(error)
            }
        }
    }
}

impl UsageRecorder {
    /// Writes the analytics: `written` uses as `accepted`, the rejections, and whatever an
    /// earlier flush could not write. On failure everything is kept for the next flush (up
    /// to [`MAX_PENDING_COUNTS`]).
    async fn flush_counts(&self, written: Vec<KeyUsage>) -> Result<(), StoreError> {
        let rejections = std::mem::take(
            &mut *self
                .rejections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut counts = std::mem::take(
            &mut *self
                .unwritten
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        counts.extend(written.iter().map(|u| UsageCount {
            subject: UsageSubject::Key(u.id),
            hour: hour_of(u.last_used_at),
            outcome: UsageOutcome::Accepted,
            count: u.uses,
        }));
        counts.extend(
            rejections
                .into_iter()
                .map(|((subject, hour, outcome), count)| UsageCount {
                    subject,
                    hour: OffsetDateTime::from_unix_timestamp(hour)
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                    outcome,
                    count,
                }),
        );
        if counts.is_empty() {
            return Ok(());
        }
        match self.store.record_usage_counts(&counts).await {
            Ok(()) => Ok(()),
            Err(error) => {
                let mut unwritten = self
                    .unwritten
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                counts.append(&mut unwritten);
                if counts.len() > MAX_PENDING_COUNTS {
                    let dropped = counts.len() - MAX_PENDING_COUNTS;
                    counts.drain(..dropped);
                    tracing::warn!(target: "keywarden", dropped, "usage analytics dropped: the store keeps failing");
                }
                *unwritten = counts;
                Err(error)
            }
        }
    }
}

/// Adds `uses` uses of key `id`, the latest at `last`, to its pending row.
fn merge_uses(rows: &mut HashMap<Uuid, (u64, i64)>, id: Uuid, uses: u64, last: i64) {
    let row = rows.entry(id).or_insert((0, i64::MIN));
    row.0 = row.0.saturating_add(uses);
    row.1 = row.1.max(last);
}

/// Queued cells beyond which they are folded into per-key counts.
const MAX_QUEUED: usize = 1 << 16;

fn from_nanos(nanos: i64) -> OffsetDateTime {
    // Every i64 of nanoseconds is a valid OffsetDateTime.
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

struct RestartOnDrop(Weak<UsageRecorder>);

/// The background worker that writes recorded uses to the store every interval. It runs on
/// the tokio runtime that was current when the layer was built (or, for a layer built outside
/// one, when it first recorded a use); it holds the recorder weakly and stops once the layer
/// is dropped. Uses recorded since its last tick are written by
/// [`ApiKeyLayer::flush_usage`](crate::ApiKeyLayer::flush_usage): call it at shutdown.
struct UsageFlusher {
    recorder: Weak<UsageRecorder>,
    interval: Duration,
    _restart: RestartOnDrop,
}

impl UsageFlusher {
    async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            // The layer is gone: stop. Its last uses were flushed by `flush`, if called.
            let Some(recorder) = self.recorder.upgrade() else {
                break;
            };
            if let Err(error) = recorder.flush().await {
                tracing::warn!(target: "keywarden", error = %error, "flushing key usage failed; will retry");
            }
        }
    }
}

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        if let Some(recorder) = self.0.upgrade() {
            recorder.started.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::unix_nanos as to_nanos;
    use crate::store::test_support::record;
    use crate::store::MemoryStore;

    fn cached(record: &crate::store::KeyRecord) -> Arc<ResolvedKey> {
        Arc::new(ResolvedKey::new(
            record,
            false,
            &crate::principal::TEST_PROFILES,
        ))
    }

    fn now() -> i64 {
        to_nanos(OffsetDateTime::now_utc())
    }

    #[tokio::test]
    async fn batches_merge_counts_and_keep_the_latest_time() {
        let store = Arc::new(MemoryStore::new());
        let r = record(1);
        store.insert(&r).await.unwrap();
        let recorder = UsageRecorder::new(store.clone(), Duration::from_secs(3600), false);
        let t0 = OffsetDateTime::now_utc();
        let key = cached(&r);
        recorder.record(&key, to_nanos(t0 + time::Duration::seconds(5)));
        recorder.record(&key, to_nanos(t0));
        // The same key read into the cache again: a second cell, merged into one row.
        recorder.record(&cached(&r), to_nanos(t0));
        recorder.record(&cached(&record(3)), to_nanos(t0));
        assert_eq!(recorder.flush().await.unwrap(), 2);
        assert_eq!(
            recorder.flush().await.unwrap(),
            0,
            "nothing pending after a flush"
        );
        let stored = store.get(r.id).await.unwrap().unwrap();
        assert_eq!(stored.use_count, 3);
        assert_eq!(
            stored.last_used_at.map(to_nanos),
            Some(to_nanos(t0 + time::Duration::seconds(5)))
        );
        // Used again after the flush: queued again.
        recorder.record(&key, to_nanos(t0 + time::Duration::seconds(9)));
        assert_eq!(recorder.flush().await.unwrap(), 1);
        assert_eq!(store.get(r.id).await.unwrap().unwrap().use_count, 4);
    }

    #[test]
    fn a_flusher_lost_with_its_runtime_is_restarted() {
        let store = Arc::new(MemoryStore::new());
        let recorder = UsageRecorder::new(store.clone(), Duration::from_millis(10), false);
        let r = record(2);
        let key = cached(&r);
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        first.block_on(async {
            store.insert(&r).await.unwrap();
            recorder.record(&key, now());
            tokio::task::yield_now().await;
        });
        assert!(recorder.flusher_running());
        drop(first);
        assert!(
            !recorder.flusher_running(),
            "the dead flusher gave up its slot"
        );

        // A flusher dropped before it was ever polled gives up its slot too.
        let unpolled = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        unpolled.block_on(async { recorder.record(&key, now()) });
        assert!(recorder.flusher_running());
        drop(unpolled);
        assert!(!recorder.flusher_running());

        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        second.block_on(async {
            recorder.record(&key, now());
            assert!(recorder.flusher_running());
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(store.get(r.id).await.unwrap().unwrap().use_count, 3);
        });
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_the_counts() {
        #[derive(Debug)]
        struct Failing;
        #[async_trait::async_trait]
        impl KeyStore for Failing {
            async fn insert(&self, _: &crate::store::KeyRecord) -> Result<(), StoreError> {
                unreachable!()
            }
            async fn find_by_digest(
                &self,
                _: &crate::secret::Digest,
            ) -> Result<Option<crate::store::KeyRecord>, StoreError> {
                unreachable!()
            }
            async fn get(&self, _: Uuid) -> Result<Option<crate::store::KeyRecord>, StoreError> {
                unreachable!()
            }
            async fn update(
                &self,
                _: Uuid,
                _: &crate::store::KeyPatch,
                _: OffsetDateTime,
            ) -> Result<Option<crate::store::KeyRecord>, StoreError> {
                unreachable!()
            }
            async fn add_digest(
                &self,
                _: Uuid,
                _: &crate::secret::Digest,
                _: &crate::secret::Digest,
                _: crate::secret::SecretId,
            ) -> Result<bool, StoreError> {
                unreachable!()
            }
            async fn delete(&self, _: Uuid) -> Result<Option<crate::store::KeyRecord>, StoreError> {
                unreachable!()
            }
            async fn list(
                &self,
                _: &crate::store::KeyQuery,
            ) -> Result<crate::store::KeyPage, StoreError> {
                unreachable!()
            }
            async fn record_usage(&self, _: &[KeyUsage]) -> Result<(), StoreError> {
                Err(StoreError::new(
                    crate::store::StoreErrorKind::Unavailable,
                    "down",
                ))
            }
        }
        let recorder = UsageRecorder::new(Arc::new(Failing), Duration::from_secs(3600), false);
        let key = cached(&record(4));
        let t = now();
        recorder.record(&key, t);
        recorder.record(&key, t);
        assert!(recorder.flush().await.is_err());
        assert_eq!(recorder.queued(), (0, 1), "put back by key id, not by cell");
        recorder.record(&key, t + 1);
        recorder.record_uncached(key.principal.key_id(), t + 2);
        assert_eq!(recorder.queued(), (1, 1));
        assert!(recorder.flush().await.is_err());
        let loose = recorder.loose.lock().unwrap().clone();
        assert_eq!(
            loose.get(&key.principal.key_id()),
            Some(&(4, t + 2)),
            "failed batches put back and merged"
        );
    }

    #[tokio::test]
    async fn uncached_uses_and_churned_fills_stay_one_entry_per_key() {
        let store = Arc::new(MemoryStore::new());
        let r = record(5);
        store.insert(&r).await.unwrap();
        let recorder = UsageRecorder::new(store.clone(), Duration::from_secs(3600), false);
        for _ in 0..1000 {
            recorder.record_uncached(r.id, now());
        }
        // More cache fills of one key than the queue keeps: folded by key id.
        for _ in 0..MAX_QUEUED + 10 {
            recorder.record(&cached(&r), now());
        }
        let (queued, loose) = recorder.queued();
        assert!(queued < MAX_QUEUED, "queue folded: {queued}");
        assert_eq!(loose, 1);
        assert_eq!(recorder.flush().await.unwrap(), 1);
        let stored = store.get(r.id).await.unwrap().unwrap();
        assert_eq!(stored.use_count, 1000 + MAX_QUEUED as u64 + 10);
    }
}
