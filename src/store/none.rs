//! The native store of a layer whose collections are all foreign.

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    KeyPage, KeyPatch, KeyQuery, KeyRecord, KeyStore, KeyUsage, StoreError, StoreErrorKind,
};
use crate::secret::{Digest, SecretId};

/// Finds nothing and refuses every write: the store of a layer that verifies only keys other
/// systems issued.
#[derive(Debug, Default)]
pub(crate) struct NoStore;

fn read_only() -> StoreError {
    StoreError::new(
        StoreErrorKind::ReadOnly,
        "this layer has no keywarden key store: it is read-only; manage these keys in the system that issued them",
    )
}

#[async_trait]
impl KeyStore for NoStore {
    async fn insert(&self, _: &KeyRecord) -> Result<(), StoreError> {
        Err(read_only())
    }
    async fn find_by_digest(&self, _: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn get(&self, _: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn update(
        &self,
        _: Uuid,
        _: &KeyPatch,
        _: OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        Err(read_only())
    }
    async fn add_digest(
        &self,
        _: Uuid,
        _: &Digest,
        _: &Digest,
        _: SecretId,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn delete(&self, _: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        Err(read_only())
    }
    async fn list(&self, _: &KeyQuery) -> Result<KeyPage, StoreError> {
        Ok(KeyPage {
            items: Vec::new(),
            next_cursor: None,
        })
    }
    async fn record_usage(&self, _: &[KeyUsage]) -> Result<(), StoreError> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
    }
}
