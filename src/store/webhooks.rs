//! Webhook subscriptions and their delivery state, kept in the key store beside the audit log
//! they deliver ([`WebhookStore`]; the logic is in `keywarden::webhooks`).

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;

/// A webhook subscription and how far its delivery has come.
#[derive(Clone, PartialEq)]
pub struct WebhookRecord {
    /// Id (UUIDv7).
    pub id: Uuid,
    /// Where events are POSTed.
    pub url: String,
    /// The event types it receives (`key.revoked`, …, `key.expiring`), or `*` for all.
    pub events: Vec<String>,
    /// Optional description.
    pub description: Option<String>,
    /// The signing secret, sealed under the application secret ring (never in plaintext).
    pub sealed_secret: Vec<u8>,
    /// Paused: nothing is delivered, and the cursor stays.
    pub disabled: bool,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// The number of the last audit event delivered or skipped: delivery goes on after it.
    pub cursor: u64,
    /// Keys whose expiry notice time (expiry − lead time) is at or before this have been
    /// announced (`key.expiring`).
    pub expiring_cursor: OffsetDateTime,
    /// Failed attempts at the event at the cursor.
    pub attempts: u32,
    /// No attempt before this (the backoff after a failure).
    pub next_attempt_at: Option<OffsetDateTime>,
    /// The last failure: a status code or a transport error kind, never a response body.
    pub last_error: Option<String>,
    /// Failing without a success since.
    pub failing_since: Option<OffsetDateTime>,
    /// The instance delivering it, until the lease ends.
    pub lease_owner: Option<Uuid>,
    /// When the lease ends.
    pub lease_until: Option<OffsetDateTime>,
}

impl std::fmt::Debug for WebhookRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRecord")
            .field("id", &self.id)
            .field("url", &"[url]")
            .field("events", &self.events)
            .field("disabled", &self.disabled)
            .field("cursor", &self.cursor)
            .field("attempts", &self.attempts)
            .field("sealed_secret", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// A partial update of a subscription's settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WebhookPatch {
    /// New URL.
    pub url: Option<String>,
    /// New event types.
    pub events: Option<Vec<String>>,
    /// New description.
    pub description: Option<Option<String>>,
    /// Pause or resume. Resuming clears the backoff.
    pub disabled: Option<bool>,
}

impl WebhookPatch {
    /// Applies the patch.
    pub fn apply_to(&self, record: &mut WebhookRecord) {
        if let Some(url) = &self.url {
            record.url.clone_from(url);
        }
        if let Some(events) = &self.events {
            record.events.clone_from(events);
        }
        if let Some(description) = &self.description {
            record.description.clone_from(description);
        }
        if let Some(disabled) = self.disabled {
            if record.disabled && !disabled {
                record.attempts = 0;
                record.next_attempt_at = None;
            }
            record.disabled = disabled;
        }
    }
}

/// Where a delivery stands after a round, written only while the writer holds the lease.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookProgress {
    /// See [`WebhookRecord::cursor`].
    pub cursor: u64,
    /// See [`WebhookRecord::expiring_cursor`].
    pub expiring_cursor: OffsetDateTime,
    /// See [`WebhookRecord::attempts`].
    pub attempts: u32,
    /// See [`WebhookRecord::next_attempt_at`].
    pub next_attempt_at: Option<OffsetDateTime>,
    /// See [`WebhookRecord::last_error`].
    pub last_error: Option<String>,
    /// See [`WebhookRecord::failing_since`].
    pub failing_since: Option<OffsetDateTime>,
    /// The lease is extended to this (each write renews it).
    pub lease_until: OffsetDateTime,
}

/// Webhook subscriptions in a store. The built-in stores implement it
/// ([`KeyStore::webhooks`](super::KeyStore::webhooks)).
#[async_trait]
pub trait WebhookStore: Send + Sync {
    /// Inserts a subscription.
    async fn insert_webhook(&self, record: &WebhookRecord) -> Result<(), StoreError>;
    /// Every subscription, by id.
    async fn list_webhooks(&self) -> Result<Vec<WebhookRecord>, StoreError>;
    /// One subscription.
    async fn get_webhook(&self, id: Uuid) -> Result<Option<WebhookRecord>, StoreError>;
    /// Applies a patch; `None` for an unknown id.
    async fn update_webhook(
        &self,
        id: Uuid,
        patch: &WebhookPatch,
    ) -> Result<Option<WebhookRecord>, StoreError>;
    /// Deletes a subscription; `None` for an unknown id.
    async fn delete_webhook(&self, id: Uuid) -> Result<Option<WebhookRecord>, StoreError>;
    /// Takes the delivery lease of `id` for `owner` until `until`, if it is free, expired at
    /// `now`, or already `owner`'s, and returns the subscription as it is now (deliveries
    /// start from this fresh copy: its cursor, URL and state). `None`: leased elsewhere, or
    /// gone. One instance delivers a subscription at a time.
    async fn lease_webhook(
        &self,
        id: Uuid,
        owner: Uuid,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Option<WebhookRecord>, StoreError>;
    /// Writes progress if `owner` still holds the lease; returns whether it did.
    async fn record_webhook_progress(
        &self,
        id: Uuid,
        owner: Uuid,
        progress: &WebhookProgress,
    ) -> Result<bool, StoreError>;
}
