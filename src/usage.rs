//! Write-behind usage tracking: `last_used_at` and use counts, batched.
//!
//! The request path adds to an in-memory map (one sharded-map update, no I/O); a background
//! task flushes the map to the store every interval in one `record_usage` call. A failed flush
//! puts the counts back so the next one retries them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::store::{KeyStore, KeyUsage, StoreError};

#[derive(Debug, Clone, Copy)]
struct Pending {
    uses: u64,
    last: OffsetDateTime,
}

#[derive(Debug)]
pub(crate) struct UsageRecorder {
    pending: DashMap<Uuid, Pending>,
    store: Arc<dyn KeyStore>,
    interval: Duration,
    started: AtomicBool,
}

impl UsageRecorder {
    pub(crate) fn new(store: Arc<dyn KeyStore>, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            pending: DashMap::new(),
            store,
            interval,
            started: AtomicBool::new(false),
        })
    }

    /// Notes one use. Starts the flusher on first use, inside the caller's runtime.
    pub(crate) fn record(self: &Arc<Self>, id: Uuid, at: OffsetDateTime) {
        self.pending
            .entry(id)
            .and_modify(|p| {
                p.uses += 1;
                if at > p.last {
                    p.last = at;
                }
            })
            .or_insert(Pending { uses: 1, last: at });
        if !self.started.load(Ordering::Relaxed) && !self.started.swap(true, Ordering::AcqRel) {
            self.spawn_flusher();
        }
    }

    fn spawn_flusher(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (a synchronous caller): uses are flushed by `flush` only.
            self.started.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        let interval = self.interval;
        // If this task ends for any reason (its runtime shut down, even before its first
        // poll), the guard is dropped with it and the next use starts a new flusher.
        let restart = RestartOnDrop(weak.clone());
        runtime.spawn(async move {
            let _restart = restart;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                // The layer is gone: stop. Its last uses were flushed by `flush`, if called.
                let Some(recorder) = weak.upgrade() else { break };
                if let Err(error) = recorder.flush().await {
                    tracing::warn!(target: "keywarden", error = %error, "flushing key usage failed; will retry");
                }
            }
        });
    }

    #[cfg(test)]
    pub(crate) fn flusher_running(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Writes every pending use to the store in one batch.
    pub(crate) async fn flush(&self) -> Result<usize, StoreError> {
        let ids: Vec<Uuid> = self.pending.iter().map(|e| *e.key()).collect();
        let batch: Vec<KeyUsage> = ids
            .into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .map(|(id, p)| KeyUsage {
                id,
                last_used_at: p.last,
                uses: p.uses,
            })
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        match self.store.record_usage(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(error) => {
                for usage in batch {
                    self.pending
                        .entry(usage.id)
                        .and_modify(|p| {
                            p.uses += usage.uses;
                            p.last = p.last.max(usage.last_used_at);
                        })
                        .or_insert(Pending {
                            uses: usage.uses,
                            last: usage.last_used_at,
                        });
                }
                Err(error)
            }
        }
    }
}

struct RestartOnDrop(Weak<UsageRecorder>);

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
    use crate::store::test_support::record;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn batches_merge_counts_and_keep_the_latest_time() {
        let store = Arc::new(MemoryStore::new());
        let r = record(1);
        store.insert(&r).await.unwrap();
        let recorder = UsageRecorder::new(store.clone(), Duration::from_secs(3600));
        let t0 = OffsetDateTime::now_utc();
        recorder.record(r.id, t0 + time::Duration::seconds(5));
        recorder.record(r.id, t0);
        recorder.record(Uuid::now_v7(), t0);
        assert_eq!(recorder.flush().await.unwrap(), 2);
        assert_eq!(
            recorder.flush().await.unwrap(),
            0,
            "nothing pending after a flush"
        );
        let stored = store.get(r.id).await.unwrap().unwrap();
        assert_eq!(stored.use_count, 2);
        assert_eq!(stored.last_used_at, Some(t0 + time::Duration::seconds(5)));
    }

    #[test]
    fn a_flusher_lost_with_its_runtime_is_restarted() {
        let store = Arc::new(MemoryStore::new());
        let recorder = UsageRecorder::new(store.clone(), Duration::from_millis(10));
        let r = record(2);
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        first.block_on(async {
            store.insert(&r).await.unwrap();
            recorder.record(r.id, OffsetDateTime::now_utc());
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
        unpolled.block_on(async { recorder.record(r.id, OffsetDateTime::now_utc()) });
        assert!(recorder.flusher_running());
        drop(unpolled);
        assert!(!recorder.flusher_running());

        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        second.block_on(async {
            recorder.record(r.id, OffsetDateTime::now_utc());
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
            async fn insert(&self, _: &crate::KeyRecord) -> Result<(), StoreError> {
                unreachable!()
            }
            async fn find_by_digest(
                &self,
                _: &crate::Digest,
            ) -> Result<Option<crate::KeyRecord>, StoreError> {
                unreachable!()
            }
            async fn get(&self, _: Uuid) -> Result<Option<crate::KeyRecord>, StoreError> {
                unreachable!()
            }
            async fn update(
                &self,
                _: Uuid,
                _: &crate::KeyPatch,
                _: OffsetDateTime,
            ) -> Result<Option<crate::KeyRecord>, StoreError> {
                unreachable!()
            }
            async fn redigest(
                &self,
                _: Uuid,
                _: &crate::Digest,
                _: &crate::Digest,
                _: crate::SecretId,
            ) -> Result<bool, StoreError> {
                unreachable!()
            }
            async fn delete(&self, _: Uuid) -> Result<Option<crate::KeyRecord>, StoreError> {
                unreachable!()
            }
            async fn list(&self, _: &crate::KeyQuery) -> Result<crate::KeyPage, StoreError> {
                unreachable!()
            }
            async fn record_usage(&self, _: &[KeyUsage]) -> Result<(), StoreError> {
                Err(StoreError::new(crate::StoreErrorKind::Unavailable, "down"))
            }
        }
        let recorder = UsageRecorder::new(Arc::new(Failing), Duration::from_secs(3600));
        let id = Uuid::now_v7();
        let t = OffsetDateTime::now_utc();
        recorder.record(id, t);
        recorder.record(id, t);
        assert!(recorder.flush().await.is_err());
        recorder.record(id, t);
        let pending = recorder.pending.get(&id).map(|p| p.uses);
        assert_eq!(pending, Some(3), "failed batch put back and merged");
    }
}
