//! What went wrong in a management operation.

use uuid::Uuid;

use crate::store::{StoreError, StoreErrorKind};

/// What went wrong in a management operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManageErrorKind {
    /// No key with that id.
    NotFound,
    /// A field is invalid; see [`ManageError::field`].
    Invalid,
    /// The operation conflicts with the key's state (e.g. rotating a revoked key).
    Conflict,
    /// The store failed.
    Store,
    /// The key cannot be revealed: viewable keys are off, the key was created while they
    /// were off, the reveal key that encrypted it is not configured, or the stored ciphertext
    /// was altered or moved from another key.
    NotRevealable,
    /// The store or collection holds another system's keys (Payload CMS, Strapi), which
    /// keywarden verifies but never manages.
    ReadOnly,
    /// The key is revoked, disabled or expired, and the operation needs an active key
    /// (revealing one without
    /// [`RevealOptions::include_inactive`](crate::manage::RevealOptions::include_inactive)).
    Inactive,
    /// The caller has made too many of these requests; the message says when to retry.
    RateLimited,
    /// [`KeyManager::retire_secret`](crate::KeyManager::retire_secret) was asked to retire
    /// the manager's current secret.
    CurrentSecret,
    /// [`KeyManager::retire_secret`](crate::KeyManager::retire_secret) refused: some keys
    /// have no digest under any other secret (see [`ManageError::unmigrated_keys`]).
    UnmigratedKeys,
    /// [`KeyManager::create`](crate::KeyManager::create) was asked for a collection none of
    /// the manager's layers serves: the key would be refused as `invalid_key` wherever it is
    /// used. The field is `collection`.
    UnknownCollection,
}

/// A management error. Never contains key material.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ManageError {
    pub(super) kind: ManageErrorKind,
    pub(super) field: Option<&'static str>,
    pub(super) message: String,
    #[source]
    pub(super) source: Option<StoreError>,
    pub(super) unmigrated: Vec<Uuid>,
}

impl ManageError {
    pub(crate) fn not_found(id: Uuid) -> Self {
        Self {
            kind: ManageErrorKind::NotFound,
            field: None,
            message: format!("no key with id {id}"),
            source: None,
            unmigrated: Vec::new(),
        }
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ManageErrorKind::Invalid,
            field: Some(field),
            message: message.into(),
            source: None,
            unmigrated: Vec::new(),
        }
    }

    pub(super) fn not_revealable(message: impl Into<String>) -> Self {
        Self {
            kind: ManageErrorKind::NotRevealable,
            field: None,
            message: message.into(),
            source: None,
            unmigrated: Vec::new(),
        }
    }

    pub(super) fn conflict(message: impl Into<String>) -> Self {
        Self {
            kind: ManageErrorKind::Conflict,
            field: None,
            message: message.into(),
            source: None,
            unmigrated: Vec::new(),
        }
    }

    #[cfg(feature = "webhooks")]
    pub(super) fn with_message(mut self, message: String) -> Self {
        self.message = message;
        self
    }

    pub(super) fn with_kind(mut self, kind: ManageErrorKind) -> Self {
        self.kind = kind;
        self
    }

    pub(super) fn changed() -> Self {
        Self::conflict("the key changed since it was read; read it again and retry")
    }

    /// A failed [`KeyStore::update`]: it changes neither id nor digest, so its only conflict
    /// is a stale [`KeyPatch::expected_updated_at`].
    pub(super) fn from_update(error: StoreError) -> Self {
        match error.kind() {
            StoreErrorKind::Conflict => Self {
                source: Some(error),
                ..Self::changed()
            },
            _ => Self::from(error),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ManageErrorKind {
        self.kind
    }

    /// The invalid field, for [`ManageErrorKind::Invalid`].
    pub fn field(&self) -> Option<&'static str> {
        self.field
    }

    /// The store error behind a [`ManageErrorKind::Store`] error.
    pub fn store_error(&self) -> Option<&StoreError> {
        self.source.as_ref()
    }

    /// For [`ManageErrorKind::UnmigratedKeys`]: the keys whose only digest is under the secret
    /// being retired, in id order. Empty otherwise.
    pub fn unmigrated_keys(&self) -> &[Uuid] {
        &self.unmigrated
    }
}

impl From<StoreError> for ManageError {
    fn from(error: StoreError) -> Self {
        let (kind, message) = match error.kind() {
            StoreErrorKind::Conflict => (
                ManageErrorKind::Conflict,
                "the key conflicts with an existing key".to_owned(),
            ),
            StoreErrorKind::ReadOnly => (ManageErrorKind::ReadOnly, error.to_string()),
            _ => (ManageErrorKind::Store, format!("key store error: {error}")),
        };
        Self {
            kind,
            field: None,
            message,
            source: Some(error),
            unmigrated: Vec::new(),
        }
    }
}
