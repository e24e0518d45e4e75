use std::collections::{BTreeMap, HashMap};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    KeyPage, KeyPatch, KeyQuery, KeyRecord, KeyStore, KeyUsage, StoreError, StoreErrorKind,
};
use crate::secret::{Digest, SecretId};

/// An in-process store for tests, examples and single-process tools. Nothing is persisted.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: BTreeMap<Uuid, KeyRecord>,
    by_digest: HashMap<Digest, Uuid>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of stored records.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A poisoned lock only means another thread panicked mid-operation; every operation here
    // leaves the maps consistent before it can panic, so the data is still sound.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut inner = self.write();
        if inner.by_id.contains_key(&record.id) || inner.by_digest.contains_key(&record.digest) {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                "a key with this id or digest exists",
            ));
        }
        inner.by_digest.insert(record.digest, record.id);
        inner.by_id.insert(record.id, record.clone());
        Ok(())
    }

    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        let inner = self.read();
        Ok(inner
            .by_digest
            .get(digest)
            .and_then(|id| inner.by_id.get(id))
            .cloned())
    }

    async fn get(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.read().by_id.get(&id).cloned())
    }

    async fn update(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        now: OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut inner = self.write();
        let Some(record) = inner.by_id.get_mut(&id) else {
            return Ok(None);
        };
        // Under the write lock: the check and the write are one step.
        patch.check_expected(record)?;
        patch.apply_to(record, now);
        Ok(Some(record.clone()))
    }

    async fn redigest(
        &self,
        id: Uuid,
        old: &Digest,
        new: &Digest,
        secret_id: SecretId,
    ) -> Result<bool, StoreError> {
        let mut inner = self.write();
        let Inner { by_id, by_digest } = &mut *inner;
        let Some(record) = by_id.get_mut(&id) else {
            return Ok(false);
        };
        if record.digest != *old {
            return Ok(false);
        }
        if by_digest.get(new).is_some_and(|other| *other != id) {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                "another key has this digest",
            ));
        }
        by_digest.remove(old);
        by_digest.insert(*new, id);
        record.digest = *new;
        record.secret_id = secret_id;
        Ok(true)
    }

    async fn reseal(&self, id: Uuid, old: &[u8], new: &[u8]) -> Result<bool, StoreError> {
        let mut inner = self.write();
        match inner.by_id.get_mut(&id) {
            Some(record) if record.encrypted_key.as_deref() == Some(old) => {
                record.encrypted_key = Some(new.to_vec());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn delete(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        let mut inner = self.write();
        let removed = inner.by_id.remove(&id);
        if let Some(record) = &removed {
            inner.by_digest.remove(&record.digest);
        }
        Ok(removed)
    }

    async fn list(&self, query: &KeyQuery) -> Result<KeyPage, StoreError> {
        let inner = self.read();
        let limit = query.effective_limit();
        let start = match query.after {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        let items: Vec<KeyRecord> = inner
            .by_id
            .range((start, std::ops::Bound::Unbounded))
            .map(|(_, r)| r)
            .filter(|r| query.matches(r))
            .take(limit + 1)
            .cloned()
            .collect();
        Ok(KeyPage::from_overfetch(items, limit))
    }

    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        let mut inner = self.write();
        for u in usage {
            if let Some(record) = inner.by_id.get_mut(&u.id) {
                record.use_count = record.use_count.saturating_add(u.uses);
                if record.last_used_at.is_none_or(|at| at < u.last_used_at) {
                    record.last_used_at = Some(u.last_used_at);
                }
            }
        }
        Ok(())
    }
}
