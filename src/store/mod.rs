//! Key storage: the [`KeyStore`] trait, the stored [`KeyRecord`], and the backends.
//!
//! A store never sees a plaintext key: records hold the key's HMAC digest and the id of the
//! secret that made it. After a secret rotation a key gains a further digest under the new
//! secret on first use ([`KeyStore::add_digest`]); its old digest stays valid until the operator
//! retires the old secret ([`KeyStore::retire_secret`]). Lookups by digest, any of a key's
//! digests, are the hot path's only store query, and the layer caches them.
//!
//! ```
//! use std::sync::Arc;
//! use keywarden::{KeyStore, MemoryStore};
//!
//! let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
//! # let _ = store;
//! ```

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::{AuditCheckpoint, AuditPage, AuditQuery, AuditSealer, ChainHead};
use crate::net::IpNetwork;
use crate::ratelimit::RateLimitPolicy;
use crate::secret::{Digest, SecretId};

mod analytics;
mod audited;
mod credits;
mod feed;
mod foreign;
mod memory;
mod none;
mod observe;
mod owners;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;
mod webhooks;

pub use analytics::{hour_of, HourlyUsage, UsageCount, UsageOutcome, UsageSubject};
pub(crate) use audited::{no_audit_log, unverified_prune};
pub use audited::{Applied, AuditWrite, ChangeOutcome, KeyChange};
pub(crate) use credits::{period_end, unix_millis};
pub use credits::{refill_period, CreditLease, Credits, Refill, RefillParseError, MAX_CREDITS};
pub(crate) use feed::MemoryFeed;
pub use feed::{FeedEntry, FeedPage};
pub use foreign::{ForeignDigest, ForeignScheme, ForeignSource};
pub use memory::MemoryStore;
pub(crate) use none::NoStore;
pub(crate) use observe::Observers;
pub use observe::{StoreChange, StoreObserver};
pub(crate) use owners::{owner_pool, owner_rate_bucket};
pub use owners::{OwnerLimits, OwnerPolicy, OwnerPolicyUpdate};
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
pub use webhooks::{WebhookPatch, WebhookProgress, WebhookRecord, WebhookStore};

/// Who owns a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum OwnerKind {
    /// A person.
    User,
    /// A team or organisation.
    Team,
    /// A machine or service account.
    Service,
}

impl OwnerKind {
    /// `user`, `team` or `service`.
    pub fn as_str(&self) -> &'static str {
        match self {
            OwnerKind::User => "user",
            OwnerKind::Team => "team",
            OwnerKind::Service => "service",
        }
    }
}

impl fmt::Display for OwnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An owner kind other than `user`, `team` or `service`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown owner kind (expected user, team or service)")]
pub struct OwnerKindParseError;

impl std::str::FromStr for OwnerKind {
    type Err = OwnerKindParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(OwnerKind::User),
            "team" => Ok(OwnerKind::Team),
            "service" => Ok(OwnerKind::Service),
            _ => Err(OwnerKindParseError),
        }
    }
}

/// The state of a key at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Usable.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked (permanent).
    Revoked,
    /// Disabled (reversible).
    Disabled,
}

impl KeyState {
    /// `active`, `expired`, `revoked` or `disabled`.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Expired => "expired",
            KeyState::Revoked => "revoked",
            KeyState::Disabled => "disabled",
        }
    }
}

impl std::str::FromStr for KeyState {
    type Err = KeyStateParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(KeyState::Active),
            "expired" => Ok(KeyState::Expired),
            "revoked" => Ok(KeyState::Revoked),
            "disabled" => Ok(KeyState::Disabled),
            _ => Err(KeyStateParseError),
        }
    }
}

/// A key state other than `active`, `expired`, `revoked` or `disabled`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key state (expected active, expired, revoked or disabled)")]
pub struct KeyStateParseError;

/// A stored key. Holds the digest of the key, never the key.
#[derive(Clone, PartialEq)]
pub struct KeyRecord {
    /// Key id (UUIDv7: time-ordered).
    pub id: Uuid,
    /// The key's primary digest: HMAC-SHA256 of the key under the secret `secret_id`.
    ///
    /// Set when the key is created and kept when the key gains further digests under later
    /// secrets ([`KeyStore::add_digest`]; those are not part of the record, and nothing shows
    /// them). Replaced only when its secret is retired ([`KeyStore::retire_secret`]): by one of
    /// the key's further digests, or, for a key that had none, by a placeholder that matches
    /// no key (the key is then revoked). Unique among every digest in the store. Never shown
    /// by listings, the CLI or the management API.
    pub digest: Digest,
    /// The secret that made `digest`; all zero for the placeholder of a key whose only secret
    /// was retired.
    pub secret_id: SecretId,
    /// The prefix and first body characters, for listings (`kw_live_AbC1`).
    pub display_start: String,
    /// Human-readable name.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// The collection (Payload-style slug) the key belongs to, e.g. `users`.
    pub collection: String,
    /// The owner's id.
    pub subject: String,
    /// The owner's kind.
    pub owner_kind: OwnerKind,
    /// Granted scopes; `*` grants all.
    pub scopes: Vec<String>,
    /// The environment named by the key's prefix (`live`, `test`, ...).
    pub environment: String,
    /// Read-only keys may only use safe methods (GET, HEAD, OPTIONS, TRACE).
    pub read_only: bool,
    /// Application metadata (a JSON object).
    pub metadata: serde_json::Value,
    /// The key's own rate limit, if any.
    pub rate_limit: Option<RateLimitPolicy>,
    /// The networks requests with this key may come from; empty: anywhere. A request from
    /// elsewhere (or from an unknown address) gets `ip_not_allowed`.
    pub allowed_ips: Vec<IpNetwork>,
    /// The key's credits (uses left in total, and their refill); `None`: unlimited. A
    /// request when none are left gets `usage_exceeded`.
    pub credits: Option<Credits>,
    /// The limits the key's owner shares with its other keys, as stored when the record was
    /// read ([`KeyStore::set_owner_policy`]). Not written by [`KeyStore::insert`] or
    /// [`KeyStore::update`]: the owner's policy is changed on its own.
    pub owner: OwnerLimits,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Last modification time.
    pub updated_at: OffsetDateTime,
    /// Expiry, if any.
    pub expires_at: Option<OffsetDateTime>,
    /// Last successful use (written behind, in batches).
    pub last_used_at: Option<OffsetDateTime>,
    /// Number of successful uses recorded.
    pub use_count: u64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<OffsetDateTime>,
    /// Disabled keys are rejected until enabled again.
    pub disabled: bool,
    /// The key this one replaced in a rotation.
    pub rotated_from: Option<Uuid>,
    /// The key encrypted with the deployment's reveal key, when viewable keys are on.
    pub encrypted_key: Option<Vec<u8>>,
}

impl KeyRecord {
    /// The key's state at `now`: revoked wins over disabled, disabled over expired.
    pub fn state(&self, now: OffsetDateTime) -> KeyState {
        if self.revoked_at.is_some() {
            KeyState::Revoked
        } else if self.disabled {
            KeyState::Disabled
        } else if self.expires_at.is_some_and(|at| at <= now) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("digest", &self.digest)
            .field("secret_id", &self.secret_id)
            .field("display_start", &self.display_start)
            .field("name", &self.name)
            .field("collection", &self.collection)
            .field("subject", &self.subject)
            .field("owner_kind", &self.owner_kind)
            .field("scopes", &self.scopes)
            .field("environment", &self.environment)
            .field("read_only", &self.read_only)
            .field("allowed_ips", &self.allowed_ips)
            .field("credits", &self.credits)
            .field("owner", &self.owner)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at)
            .field("disabled", &self.disabled)
            .field(
                "encrypted_key",
                &self.encrypted_key.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

/// A partial update: `None` leaves a field as it is; for nullable fields `Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyPatch {
    /// New name.
    pub name: Option<String>,
    /// New description.
    pub description: Option<Option<String>>,
    /// New scopes.
    pub scopes: Option<Vec<String>>,
    /// New read-only flag.
    pub read_only: Option<bool>,
    /// New metadata.
    pub metadata: Option<serde_json::Value>,
    /// New rate limit.
    pub rate_limit: Option<Option<RateLimitPolicy>>,
    /// New allowed networks (empty: anywhere).
    pub allowed_ips: Option<Vec<IpNetwork>>,
    /// Sets the key's credit balance (`Some(n)`), or makes it unlimited (`None`, which drops
    /// its refill too). Setting credits voids every lease instances hold, and restarts the
    /// refill schedule from now.
    pub credits: Option<Option<u64>>,
    /// Sets or clears the refill. A key without credits gets the refill's amount as its
    /// balance; a key with credits keeps its balance. Voids leases and restarts the schedule
    /// like [`credits`](Self::credits).
    pub credit_refill: Option<Option<Refill>>,
    /// New expiry.
    pub expires_at: Option<Option<OffsetDateTime>>,
    /// Revoke at this time. A revoked key stays revoked: a later patch cannot clear it.
    pub revoked_at: Option<OffsetDateTime>,
    /// New disabled flag.
    pub disabled: Option<bool>,
    /// Optimistic concurrency: apply the patch only if the record's `updated_at` is still
    /// this instant (compared at the stores' microsecond resolution), checked in the same
    /// transaction as the write. Otherwise the store writes nothing and fails with
    /// [`StoreErrorKind::Conflict`]. `None` (the default) applies the patch unconditionally.
    ///
    /// Every update moves `updated_at` forward (see [`apply_to`](Self::apply_to)), so it
    /// serves as the record's version.
    pub expected_updated_at: Option<OffsetDateTime>,
}

impl KeyPatch {
    /// Applies the patch to a record and sets `updated_at` to `now`, or to one microsecond
    /// after the previous `updated_at` if that is later: every update changes the version,
    /// even two within one microsecond or under a clock that stands still or steps back.
    /// Stores that read, modify and write a row in a transaction use this so every backend
    /// applies patches identically (after [`check_expected`](Self::check_expected)).
    pub fn apply_to(&self, record: &mut KeyRecord, now: OffsetDateTime) {
        if let Some(name) = &self.name {
            record.name.clone_from(name);
        }
        if let Some(description) = &self.description {
            record.description.clone_from(description);
        }
        if let Some(scopes) = &self.scopes {
            record.scopes.clone_from(scopes);
        }
        if let Some(read_only) = self.read_only {
            record.read_only = read_only;
        }
        if let Some(metadata) = &self.metadata {
            record.metadata.clone_from(metadata);
        }
        if let Some(rate_limit) = self.rate_limit {
            record.rate_limit = rate_limit;
        }
        if let Some(allowed_ips) = &self.allowed_ips {
            record.allowed_ips.clone_from(allowed_ips);
        }
        if let Some(credits) = self.credits {
            let refill = record.credits.and_then(|c| c.refill);
            record.credits = credits.map(|remaining| Credits { remaining, refill });
        }
        if let Some(refill) = self.credit_refill {
            match (&mut record.credits, refill) {
                (Some(credits), refill) => credits.refill = refill,
                (None, Some(refill)) => {
                    record.credits = Some(Credits {
                        remaining: refill.amount(),
                        refill: Some(refill),
                    });
                }
                (None, None) => {}
            }
        }
        if let Some(expires_at) = self.expires_at {
            record.expires_at = expires_at;
        }
        if let Some(revoked_at) = self.revoked_at {
            record.revoked_at.get_or_insert(revoked_at);
        }
        if let Some(disabled) = self.disabled {
            record.disabled = disabled;
        }
        record.updated_at = record
            .updated_at
            .checked_add(time::Duration::MICROSECOND)
            .map_or(now, |next| now.max(next));
    }

    /// Whether `current`, the stored record read in the transaction about to write it, is
    /// the version [`expected_updated_at`](Self::expected_updated_at) names (always true
    /// without one).
    ///
    /// # Errors
    /// [`StoreErrorKind::Conflict`] when the record changed since that version was read.
    pub fn check_expected(&self, current: &KeyRecord) -> Result<(), StoreError> {
        fn micros(at: OffsetDateTime) -> i128 {
            at.unix_timestamp_nanos().div_euclid(1_000)
        }
        match self.expected_updated_at {
            Some(expected) if micros(expected) != micros(current.updated_at) => {
                Err(StoreError::new(
                    StoreErrorKind::Conflict,
                    "the key changed since it was read",
                ))
            }
            _ => Ok(()),
        }
    }

    /// Whether the patch sets credits or their refill (the stores then rewrite the balance
    /// and void outstanding leases).
    pub fn changes_credits(&self) -> bool {
        self.credits.is_some() || self.credit_refill.is_some()
    }

    /// Whether the patch changes anything the request path checks.
    pub fn affects_verification(&self) -> bool {
        *self
            != KeyPatch {
                name: self.name.clone(),
                description: self.description.clone(),
                expected_updated_at: self.expected_updated_at,
                ..KeyPatch::default()
            }
    }
}

/// Filters and a cursor for [`KeyStore::list`]. Results are ordered by id (creation order).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyQuery {
    /// Only keys of this collection.
    pub collection: Option<String>,
    /// Only keys of this subject.
    pub subject: Option<String>,
    /// Only keys of this environment (the last segment of their prefix, e.g. `live`).
    pub environment: Option<String>,
    /// Only keys in this state at `now`.
    pub state: Option<KeyState>,
    /// The instant `state` is judged at.
    pub now: OffsetDateTime,
    /// Only keys whose expiry is after the first instant and at or before the second.
    pub expires_between: Option<(OffsetDateTime, OffsetDateTime)>,
    /// Only keys with an id greater than this (the previous page's `next_cursor`).
    pub after: Option<Uuid>,
    /// Page size, 1 to [`KeyQuery::MAX_LIMIT`].
    pub limit: u32,
}

impl KeyQuery {
    /// The largest page size.
    pub const MAX_LIMIT: u32 = 500;

    /// All keys, first page of 100, states judged now.
    pub fn new() -> Self {
        Self {
            collection: None,
            subject: None,
            environment: None,
            state: None,
            now: OffsetDateTime::now_utc(),
            expires_between: None,
            after: None,
            limit: 100,
        }
    }

    /// Whether a record passes the filters (the cursor and limit aside).
    pub fn matches(&self, record: &KeyRecord) -> bool {
        self.collection
            .as_ref()
            .is_none_or(|c| *c == record.collection)
            && self.subject.as_ref().is_none_or(|s| *s == record.subject)
            && self
                .environment
                .as_ref()
                .is_none_or(|e| *e == record.environment)
            && self.state.is_none_or(|s| record.state(self.now) == s)
            && self.expires_between.is_none_or(|(after, until)| {
                record
                    .expires_at
                    .is_some_and(|at| at > after && at <= until)
            })
    }

    /// The limit clamped to 1..=MAX_LIMIT.
    pub fn effective_limit(&self) -> usize {
        self.limit.clamp(1, Self::MAX_LIMIT) as usize
    }
}

impl Default for KeyQuery {
    fn default() -> Self {
        Self::new()
    }
}

/// One page of [`KeyStore::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct KeyPage {
    /// The records, ordered by id.
    pub items: Vec<KeyRecord>,
    /// Pass as [`KeyQuery::after`] for the next page; `None` on the last page.
    pub next_cursor: Option<Uuid>,
}

impl KeyPage {
    /// A page from up to `limit + 1` records in id order: fetching one record more than the
    /// page tells whether another page follows without a count query.
    pub fn from_overfetch(mut items: Vec<KeyRecord>, limit: usize) -> Self {
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|r| r.id)
        } else {
            None
        };
        Self { items, next_cursor }
    }
}

/// Uses of one key to add to its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUsage {
    /// The key.
    pub id: Uuid,
    /// The latest use in the batch; the store keeps the later of this and what it has.
    pub last_used_at: OffsetDateTime,
    /// Uses in the batch, added to `use_count`.
    pub uses: u64,
}

/// What [`KeyStore::retire_secret`] does with keys whose only digest is under the retired
/// secret (keys not used through an instance holding a newer secret since the rotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnmigratedKeys {
    /// Retire nothing, and report them.
    #[default]
    Refuse,
    /// Retire anyway: their digests are dropped and they are revoked, since they could never
    /// verify again.
    Revoke,
}

/// What [`KeyStore::retire_secret`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretRetirement {
    /// Whether the secret's digests were dropped; `false` only when
    /// [`UnmigratedKeys::Refuse`] found [`unmigrated`](Self::unmigrated) keys, and then
    /// nothing changed.
    pub retired: bool,
    /// How many digests were dropped.
    pub dropped: u64,
    /// Keys, not revoked before, whose only digest was under the secret: the reason for a
    /// refusal, or the keys revoked by a forced retirement. In id order.
    pub unmigrated: Vec<Uuid>,
    /// Every key that lost a digest: caches must forget them. In id order.
    pub affected: Vec<Uuid>,
}

/// The placeholder digest of a key whose only secret was retired: 16 zero bytes and the key
/// id. Not an HMAC output anyone can produce, and unique per key.
pub(crate) fn retired_placeholder(id: Uuid) -> Digest {
    let mut bytes = [0u8; 32];
    bytes[16..].copy_from_slice(id.as_bytes());
    Digest::from_bytes(bytes)
}

/// The secret id stored beside [`retired_placeholder`].
pub(crate) fn no_secret() -> SecretId {
    SecretId::from_bytes([0; 8])
}

/// What went wrong in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// A record with this id or digest already exists; or, from [`KeyStore::update`], the
    /// record changed since the version the patch expected.
    Conflict,
    /// The store cannot be reached or refused the connection.
    Unavailable,
    /// The store did not answer in time.
    Timeout,
    /// A stored row could not be decoded.
    Corrupt,
    /// Migrations failed or the schema is not what this version expects.
    Schema,
    /// The store is a read-only view of another system's keys (Payload CMS, Strapi): it
    /// refuses every write. Manage those keys in the system that issued them.
    ReadOnly,
    /// Anything else.
    Other,
}

/// An error from a [`KeyStore`]. Never contains key material.
#[derive(Debug, thiserror::Error)]
#[error("key store error ({kind:?}): {message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StoreError {
    /// An error of `kind` with a message.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

/// Where keys live. Object-safe: the layer holds an `Arc<dyn KeyStore>`.
///
/// A key has one or more digests, at most one per secret: the record's
/// [`digest`](KeyRecord::digest) and any added by [`add_digest`](Self::add_digest).
/// Implementations must keep every digest unique across the store, find a key by any of its
/// digests, order listings by id, and apply patches with [`KeyPatch::check_expected`] and
/// [`KeyPatch::apply_to`] semantics atomically (no lost updates under concurrency).
#[async_trait]
pub trait KeyStore: Send + Sync + fmt::Debug + 'static {
    /// Inserts a new record.
    ///
    /// # Errors
    /// [`StoreErrorKind::Conflict`] if the id or digest exists.
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;

    /// The record with this digest, its record digest or one [added](Self::add_digest) to it:
    /// the request path's lookup (one indexed query).
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError>;

    /// The record with this id.
    async fn get(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError>;

    /// Applies `patch` atomically and returns the updated record, or `None` for an unknown id.
    ///
    /// # Errors
    /// [`StoreErrorKind::Conflict`], with nothing written, when the patch has an
    /// [`expected_updated_at`](KeyPatch::expected_updated_at) and the record's `updated_at`
    /// differs ([`KeyPatch::check_expected`], in the same transaction as the write).
    async fn update(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        now: OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError>;

    /// Adds `new`, made under the secret `secret_id`, as a further digest of key `id` if
    /// `found_by` is still one of its digests: the lazy migration to the current secret after
    /// a rotation. The key's other digests stay valid, so instances still on the old secret
    /// (a rolling deploy, a rollback) keep verifying it. Returns whether a digest was added:
    /// `false` for an unknown id, a `found_by` that is no longer the key's, or a key that
    /// already has `new` or a digest under `secret_id`. Never changes the record.
    ///
    /// # Errors
    /// [`StoreErrorKind::Conflict`] if `new` is a digest of another key.
    async fn add_digest(
        &self,
        id: Uuid,
        found_by: &Digest,
        new: &Digest,
        secret_id: SecretId,
    ) -> Result<bool, StoreError>;

    /// Drops every digest made under the secret `secret_id`, atomically, once no instance
    /// uses that secret any more. A key whose record digest is under it gets one of its other
    /// digests as its record digest.
    ///
    /// Keys whose only digest is under `secret_id` (not revoked, and not used through an
    /// instance holding a newer secret since the rotation) would never verify again: with
    /// [`UnmigratedKeys::Refuse`] nothing changes and they are reported in
    /// [`SecretRetirement::unmigrated`] (with `retired: false`); with
    /// [`UnmigratedKeys::Revoke`] their digest is replaced by a placeholder that matches
    /// nothing and they are revoked at `now`. Revoked keys never block a retirement: their
    /// digests are dropped the same way.
    ///
    /// The default implementation refuses: [`StoreErrorKind::ReadOnly`] for a read-only store,
    /// [`StoreErrorKind::Other`] otherwise.
    ///
    /// # Errors
    /// As the store's other writes.
    async fn retire_secret(
        &self,
        secret_id: SecretId,
        unmigrated: UnmigratedKeys,
        now: OffsetDateTime,
    ) -> Result<SecretRetirement, StoreError> {
        let _ = (secret_id, unmigrated, now);
        Err(if self.is_read_only() {
            StoreError::new(
                StoreErrorKind::ReadOnly,
                "the store is read-only: it holds no keywarden digests to retire",
            )
        } else {
            StoreError::new(
                StoreErrorKind::Other,
                "this key store does not support retiring a secret",
            )
        })
    }

    /// Deletes a record and returns it, or `None` for an unknown id.
    async fn delete(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError>;

    /// Replaces the [`encrypted_key`](KeyRecord::encrypted_key) of `id` with `new` if it is
    /// still `old`: the lazy re-encryption of a viewable key under the current reveal key.
    /// Returns whether the row changed. Changes nothing else, `updated_at` included.
    ///
    /// The default implementation changes nothing and returns `Ok(false)`: such a store's
    /// viewable keys stay revealable for as long as the reveal key that sealed them stays in
    /// the manager's ring.
    ///
    /// # Errors
    /// As the store's other writes.
    async fn reseal(&self, id: Uuid, old: &[u8], new: &[u8]) -> Result<bool, StoreError> {
        let _ = (id, old, new);
        Ok(false)
    }

    /// One page of records matching the query.
    async fn list(&self, query: &KeyQuery) -> Result<KeyPage, StoreError>;

    /// Adds batched uses; unknown ids are ignored.
    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError>;

    /// Registers `observer` to hear, in this process, of every change made through this store
    /// handle (and its clones). Every layer registers itself when it is built, so layers over
    /// one store drop a changed key at once whichever of them, or whoever, changed it. The
    /// built-in stores implement it; a store that wraps another must forward it. The default
    /// registers nothing (layers then rely on [`KeyManager::invalidates`], the invalidation
    /// listeners and the cache TTL).
    ///
    /// [`KeyManager::invalidates`]: crate::KeyManager::invalidates
    fn observe(&self, observer: std::sync::Weak<dyn StoreObserver>) {
        let _ = observer;
    }

    /// Whether the store can serve requests now: reachable, and its schema is the one this
    /// version of keywarden expects (every migration applied). A readiness probe (`/readyz` of
    /// `keywarden serve`) calls it; the request path never does. The default answers `Ok`
    /// (an in-process store is always ready).
    ///
    /// # Errors
    /// [`StoreErrorKind::Unavailable`] or [`StoreErrorKind::Timeout`] when the store cannot be
    /// reached, [`StoreErrorKind::Schema`] when migrations are missing.
    async fn check_ready(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Applies a management change and appends its [audit event](crate::audit) **in one
    /// transaction**: the event is numbered after the log's last one and sealed with
    /// `audit.sealer`, and if it cannot be written the change is not made either. An update
    /// or delete of an unknown id, or a refused secret retirement, writes nothing. Observers
    /// hear of the change as from the plain method.
    ///
    /// [`KeyManager`](crate::KeyManager) makes every change through this method. The default
    /// implementation fails (the store keeps no audit log); the built-in stores implement it.
    ///
    /// # Errors
    /// As the plain method of the change.
    async fn apply_audited(
        &self,
        change: KeyChange<'_>,
        audit: &AuditWrite<'_>,
    ) -> Result<Applied, StoreError> {
        let _ = (change, audit);
        Err(no_audit_log())
    }

    /// One page of the audit log, in number order. The default fails (no audit log).
    ///
    /// # Errors
    /// As the store's other reads.
    async fn audit_events(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        let _ = query;
        Err(no_audit_log())
    }

    /// The retention checkpoint, once events have been pruned. The default fails (no audit
    /// log).
    ///
    /// # Errors
    /// As the store's other reads.
    async fn audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>, StoreError> {
        Err(no_audit_log())
    }

    /// Deletes the events dated before `before` (by number: every event up to the last one
    /// dated before it) and seals a checkpoint at the last deleted one, in one transaction.
    /// Returns how many were deleted. The default fails (no audit log).
    ///
    /// # Errors
    /// As the store's other writes.
    async fn prune_audit(
        &self,
        before: OffsetDateTime,
        sealer: &AuditSealer,
    ) -> Result<u64, StoreError> {
        let _ = (before, sealer);
        Err(no_audit_log())
    }

    /// The audit log's head: the last event's number and MAC (the checkpoint's after
    /// pruning; [`ChainHead::GENESIS`] when empty). The default fails (no audit log).
    ///
    /// # Errors
    /// As the store's other reads.
    async fn audit_head(&self) -> Result<ChainHead, StoreError> {
        Err(no_audit_log())
    }

    /// Adds hourly request counts (usage analytics), written behind by the layer's usage
    /// flush. The default keeps none (and succeeds, so the flush goes on).
    ///
    /// # Errors
    /// As the store's other writes.
    async fn record_usage_counts(&self, counts: &[UsageCount]) -> Result<(), StoreError> {
        let _ = counts;
        Ok(())
    }

    /// The hourly counts of `subject` from `since` (inclusive) to `until` (exclusive), by
    /// hour. The default fails (the store keeps no analytics).
    ///
    /// # Errors
    /// As the store's other reads.
    async fn usage_counts(
        &self,
        subject: &UsageSubject,
        since: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Vec<HourlyUsage>, StoreError> {
        let _ = (subject, since, until);
        Err(StoreError::new(
            StoreErrorKind::Other,
            "this key store keeps no usage analytics",
        ))
    }

    /// Deletes the hourly counts of hours before `before`; returns how many rows. The
    /// default has none.
    ///
    /// # Errors
    /// As the store's other writes.
    async fn prune_usage_counts(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let _ = before;
        Ok(0)
    }

    /// The change feed: the changes after sequence `after` (at most `limit`, oldest first) and
    /// where the feed stands. `None` when the store keeps no feed (the default): instances
    /// then learn of other instances' changes only from a notification transport or the cache
    /// TTL. The built-in stores keep one, written in the same transaction as each change.
    ///
    /// # Errors
    /// If the store cannot be read.
    async fn change_feed(&self, after: u64, limit: u32) -> Result<Option<FeedPage>, StoreError> {
        let _ = (after, limit);
        Ok(None)
    }

    /// Deletes feed entries recorded before `before`, always keeping the newest; returns how
    /// many went. An instance whose last applied sequence was pruned drops its whole cache.
    ///
    /// # Errors
    /// As the store's other writes.
    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let _ = before;
        Ok(0)
    }

    /// The store's webhook subscriptions, if it keeps them (the built-in stores do).
    fn webhooks(&self) -> Option<&dyn WebhookStore> {
        None
    }

    /// Seals changes recorded without keywarden (plain SQL on PostgreSQL, caught by a
    /// trigger) into the log; returns how many. Audited writes do it first, in their own
    /// transaction; readers call it before reading. The default has none to seal.
    ///
    /// # Errors
    /// As the store's other writes.
    async fn seal_pending_audit(&self, sealer: &AuditSealer) -> Result<u64, StoreError> {
        let _ = sealer;
        Ok(0)
    }

    /// Leases credits of key `id` to an instance, atomically: applies a refill that is due at
    /// `now` (the balance is set to the refill amount), then takes
    /// [`CreditLease::grant`]`(balance, need, want)` credits from the balance. `need` is what
    /// the request at hand costs beyond what the instance holds; `want` the block it would
    /// like. `None`: the key has no credits (or does not exist).
    ///
    /// The default fails: a store that cannot lease credits makes keys with credits fail
    /// closed (503 `store_unavailable`). The built-in stores implement it in one statement.
    ///
    /// # Errors
    /// As the store's other writes.
    async fn lease_credits(
        &self,
        id: Uuid,
        need: u64,
        want: u64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditLease>, StoreError> {
        let _ = (id, need, want, now);
        Err(StoreError::new(
            StoreErrorKind::Other,
            "this key store does not keep credits",
        ))
    }

    /// Gives `amount` unspent credits of a lease back to key `id`'s balance, if the credits
    /// are still of the lease's `generation` and refill `period` (a refill or a new balance
    /// since voids the lease). Returns whether they were added back.
    ///
    /// # Errors
    /// As the store's other writes.
    async fn return_credits(
        &self,
        id: Uuid,
        amount: u64,
        generation: u64,
        period: u64,
    ) -> Result<bool, StoreError> {
        let _ = (id, amount, generation, period);
        Ok(false)
    }

    /// The policy of `subject`'s keys in `collection`, if the owner has one.
    ///
    /// # Errors
    /// As the store's other reads.
    async fn owner_policy(
        &self,
        collection: &str,
        subject: &str,
    ) -> Result<Option<OwnerPolicy>, StoreError> {
        let _ = (collection, subject);
        Ok(None)
    }

    /// Every owner policy, of one collection or of all, ordered by collection and subject.
    ///
    /// # Errors
    /// As the store's other reads.
    async fn list_owner_policies(
        &self,
        collection: Option<&str>,
    ) -> Result<Vec<OwnerPolicy>, StoreError> {
        let _ = collection;
        Ok(Vec::new())
    }

    /// Creates or changes an owner's policy, atomically, and makes every instance re-read the
    /// owner's keys (the built-in stores feed each of them to the change feed in the same
    /// transaction). Changing the credits voids every lease of the old ones.
    ///
    /// # Errors
    /// [`StoreErrorKind::Other`] for a store without owner policies (the default), else as
    /// the store's other writes.
    async fn set_owner_policy(
        &self,
        collection: &str,
        subject: &str,
        update: &OwnerPolicyUpdate,
        now: OffsetDateTime,
    ) -> Result<OwnerPolicy, StoreError> {
        let _ = (collection, subject, update, now);
        Err(StoreError::new(
            StoreErrorKind::Other,
            "this key store does not keep owner policies",
        ))
    }

    /// Removes an owner's policy (and its credits): the policy removed, `None` if there was
    /// none. The owner's keys are re-read like after [`set_owner_policy`](Self::set_owner_policy).
    ///
    /// # Errors
    /// As [`set_owner_policy`](Self::set_owner_policy).
    async fn delete_owner_policy(
        &self,
        collection: &str,
        subject: &str,
    ) -> Result<Option<OwnerPolicy>, StoreError> {
        let _ = (collection, subject);
        Ok(None)
    }

    /// [`lease_credits`](Self::lease_credits) from the credits an owner's keys share, by the
    /// owner's pool ([`OwnerPolicy::pool`]). `Ok(None)`: the owner has no credits.
    ///
    /// # Errors
    /// As [`lease_credits`](Self::lease_credits).
    async fn lease_owner_credits(
        &self,
        pool: Uuid,
        need: u64,
        want: u64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditLease>, StoreError> {
        let _ = (pool, need, want, now);
        Err(StoreError::new(
            StoreErrorKind::Other,
            "this key store does not keep owner credits",
        ))
    }

    /// [`return_credits`](Self::return_credits) to an owner's shared credits.
    ///
    /// # Errors
    /// As the store's other writes.
    async fn return_owner_credits(
        &self,
        pool: Uuid,
        amount: u64,
        generation: u64,
        period: u64,
    ) -> Result<bool, StoreError> {
        let _ = (pool, amount, generation, period);
        Ok(false)
    }

    /// Whether the store refuses every write ([`StoreErrorKind::ReadOnly`]). The layer never
    /// records usage in a read-only store, and [`KeyManager`](crate::KeyManager) operations
    /// on one fail with [`ManageErrorKind::ReadOnly`](crate::manage::ManageErrorKind::ReadOnly).
    fn is_read_only(&self) -> bool {
        false
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A record with every field set, for store tests.
    pub(crate) fn record(n: u8) -> KeyRecord {
        let now = OffsetDateTime::now_utc();
        KeyRecord {
            id: Uuid::now_v7(),
            digest: Digest::from_bytes([n; 32]),
            secret_id: SecretId::from_bytes([1; 8]),
            display_start: "kw_live_AbCd".into(),
            name: format!("key {n}"),
            description: None,
            collection: "users".into(),
            subject: "user-1".into(),
            owner_kind: OwnerKind::User,
            scopes: vec!["read".into()],
            environment: "live".into(),
            read_only: false,
            metadata: serde_json::json!({}),
            rate_limit: None,
            allowed_ips: Vec::new(),
            credits: None,
            owner: OwnerLimits::default(),
            created_at: now,
            updated_at: now,
            expires_at: None,
            last_used_at: None,
            use_count: 0,
            revoked_at: None,
            disabled: false,
            rotated_from: None,
            encrypted_key: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::record;
    use super::*;
    use time::Duration;

    #[test]
    fn state_precedence() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(1);
        assert_eq!(r.state(now), KeyState::Active);
        r.expires_at = Some(now);
        assert_eq!(
            r.state(now),
            KeyState::Expired,
            "expiry instant is exclusive"
        );
        r.disabled = true;
        assert_eq!(r.state(now), KeyState::Disabled);
        r.revoked_at = Some(now);
        assert_eq!(r.state(now), KeyState::Revoked);
    }

    #[test]
    fn patch_applies_fields_and_never_unrevokes() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(1);
        r.updated_at = now - Duration::hours(2);
        let first = now - Duration::hours(1);
        KeyPatch {
            revoked_at: Some(first),
            description: Some(Some("d".into())),
            ..KeyPatch::default()
        }
        .apply_to(&mut r, now);
        KeyPatch {
            revoked_at: Some(now),
            description: Some(None),
            ..KeyPatch::default()
        }
        .apply_to(&mut r, now);
        assert_eq!(r.revoked_at, Some(first));
        assert_eq!(r.description, None);
        assert_eq!(
            r.updated_at,
            now + Duration::MICROSECOND,
            "the second write moved on"
        );
    }

    /// Issue 12, item 7: `updated_at` is a version, so every write must change it.
    #[test]
    fn every_patch_moves_the_version_forward() {
        let now = time::macros::datetime!(2030-01-01 00:00:00.000001 UTC);
        let mut r = record(1);
        r.updated_at = now - Duration::hours(1);
        let patch = KeyPatch {
            name: Some("n".into()),
            ..KeyPatch::default()
        };
        patch.apply_to(&mut r, now);
        assert_eq!(r.updated_at, now);
        // Same instant (a stopped clock, or two writes in one microsecond): still moves.
        patch.apply_to(&mut r, now);
        assert_eq!(r.updated_at, now + Duration::MICROSECOND);
        // A clock that stepped back does not move it back.
        patch.apply_to(&mut r, now - Duration::minutes(5));
        assert_eq!(r.updated_at, now + Duration::microseconds(2));
    }

    #[test]
    fn a_conditional_patch_checks_the_version_at_microseconds() {
        let at = time::macros::datetime!(2030-01-01 00:00:00.000005 UTC);
        let mut r = record(1);
        r.updated_at = at;
        let expecting = |v| KeyPatch {
            expected_updated_at: Some(v),
            ..KeyPatch::default()
        };
        assert!(KeyPatch::default().check_expected(&r).is_ok());
        assert!(expecting(at).check_expected(&r).is_ok());
        assert!(
            expecting(at + Duration::nanoseconds(999))
                .check_expected(&r)
                .is_ok(),
            "stores keep microseconds"
        );
        let stale = expecting(at - Duration::MICROSECOND).check_expected(&r);
        assert_eq!(stale.unwrap_err().kind(), StoreErrorKind::Conflict);
        assert!(
            !expecting(at).affects_verification(),
            "a condition alone changes nothing the request path checks"
        );
    }

    #[test]
    fn only_cosmetic_patches_leave_verification_alone() {
        let cosmetic = KeyPatch {
            name: Some("n".into()),
            description: Some(None),
            ..KeyPatch::default()
        };
        assert!(!cosmetic.affects_verification());
        let scopes = KeyPatch {
            scopes: Some(vec![]),
            ..cosmetic
        };
        assert!(scopes.affects_verification());
    }

    #[test]
    fn debug_redacts_encrypted_key() {
        let mut r = record(1);
        r.encrypted_key = Some(b"ciphertext-bytes".to_vec());
        let text = format!("{r:?}");
        assert!(!text.contains("99, 105"), "{text}");
        assert!(text.contains("[redacted]"));
    }
}
