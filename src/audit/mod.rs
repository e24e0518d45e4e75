//! The tamper-evident audit log of key management.
//!
//! Every management change ([`KeyManager`](crate::KeyManager): create, update, revoke,
//! disable, enable, rotate, delete, reveal, retire a secret) is an [`AuditEvent`], written by
//! the store **in the same transaction as the change**: a change whose event cannot be written
//! does not happen. On PostgreSQL a trigger also records changes made with plain SQL (actor
//! [`Actor::Sql`]); they enter the chain the next time keywarden writes or reads the log.
//!
//! # The chain
//!
//! Events are numbered 1, 2, 3, … without gaps. Each carries a MAC:
//! `HMAC-SHA256(k, "keywarden audit event v1" ‖ previous MAC ‖ content)` where `k` is derived
//! from the application secret ([`AuditSealer`]) and `content` is every field of the event. So
//! someone with write access to the database but not the secret cannot edit, delete, insert or
//! reorder events without [`AuditVerifier`] (`keywarden audit verify`) naming the first broken
//! one. Retention ([`KeyStore::prune_audit`](crate::KeyStore::prune_audit)) deletes the oldest
//! events and leaves a sealed [`AuditCheckpoint`] (the last deleted event's number and MAC), so
//! the rest stays checkable.
//!
//! What the chain cannot show: the newest events deleted together (a truncated tail looks like
//! a shorter log). Note the head `keywarden audit verify` prints (its number and MAC) somewhere
//! the database's writers cannot reach, or forward events (webhooks, a log shipper), to catch
//! that too.
//!
//! Authentication failures are not events (an attacker would fill the disk).
//!
//! ```
//! use keywarden::audit::{Actor, AuditAction};
//!
//! assert_eq!(AuditAction::Revoked.as_str(), "key.revoked");
//! assert_eq!("key.enabled".parse::<AuditAction>(), Ok(AuditAction::Enabled));
//! assert_eq!(Actor::Cli.to_string(), "cli");
//! ```

use std::fmt;
use std::net::IpAddr;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::secret::{SecretId, SecretRing};

mod actor;

pub use actor::Actor;

type HmacSha256 = Hmac<Sha256>;

/// The label the chain key is derived under (with a NUL byte: never an API key).
const KEY_LABEL: &[u8] = b"keywarden audit log key v1\0";
const EVENT_DOMAIN: &[u8] = b"keywarden audit event v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"keywarden audit checkpoint v1\0";

/// The longest request id kept; longer ones are dropped, not cut.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuditAction {
    /// `key.created`
    Created,
    /// `key.updated`: fields other than the state changed.
    Updated,
    /// `key.revoked`
    Revoked,
    /// `key.disabled`
    Disabled,
    /// `key.enabled`: a disabled key re-enabled.
    Enabled,
    /// `key.rotated`: the event of the old key; `changes` names the successor.
    Rotated,
    /// `key.deleted`
    Deleted,
    /// `key.revealed`: a viewable key's plaintext was shown.
    Revealed,
    /// `secret.retired`: the digests of a previous secret were dropped.
    SecretRetired,
    /// `webhook.created`: a webhook subscription was created.
    WebhookCreated,
    /// `webhook.updated`: a subscription's URL, events, description or state changed.
    WebhookUpdated,
    /// `webhook.deleted`: a subscription was deleted.
    WebhookDeleted,
    /// `owner.updated`: the policy an owner's keys share was created or changed.
    OwnerUpdated,
    /// `owner.deleted`: an owner's policy was removed.
    OwnerDeleted,
}

impl AuditAction {
    /// Every action, for listings and parsers.
    pub const ALL: [AuditAction; 14] = [
        AuditAction::Created,
        AuditAction::Updated,
        AuditAction::Revoked,
        AuditAction::Disabled,
        AuditAction::Enabled,
        AuditAction::Rotated,
        AuditAction::Deleted,
        AuditAction::Revealed,
        AuditAction::SecretRetired,
        AuditAction::WebhookCreated,
        AuditAction::WebhookUpdated,
        AuditAction::WebhookDeleted,
        AuditAction::OwnerUpdated,
        AuditAction::OwnerDeleted,
    ];

    /// The stable name: `key.created`, …, `secret.retired`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Created => "key.created",
            Self::Updated => "key.updated",
            Self::Revoked => "key.revoked",
            Self::Disabled => "key.disabled",
            Self::Enabled => "key.enabled",
            Self::Rotated => "key.rotated",
            Self::Deleted => "key.deleted",
            Self::Revealed => "key.revealed",
            Self::SecretRetired => "secret.retired",
            Self::WebhookCreated => "webhook.created",
            Self::WebhookUpdated => "webhook.updated",
            Self::WebhookDeleted => "webhook.deleted",
            Self::OwnerUpdated => "owner.updated",
            Self::OwnerDeleted => "owner.deleted",
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for AuditAction {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// An action name that is not one of [`AuditAction::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown audit action (expected one of key.created, key.updated, key.revoked, key.disabled, key.enabled, key.rotated, key.deleted, key.revealed, secret.retired, webhook.created, webhook.updated, webhook.deleted, owner.updated, owner.deleted)")]
pub struct AuditActionParseError;

impl std::str::FromStr for AuditAction {
    type Err = AuditActionParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or(AuditActionParseError)
    }
}

/// Who made a change and through which request: recorded with every event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeContext {
    /// The caller.
    pub actor: Actor,
    /// The caller's address, when known (the management API's client address).
    pub client_address: Option<IpAddr>,
    /// The request's id (`X-Request-Id`), when it had one.
    pub request_id: Option<String>,
}

impl ChangeContext {
    /// A context with only an actor.
    pub fn new(actor: Actor) -> Self {
        Self {
            actor,
            client_address: None,
            request_id: None,
        }
    }

    /// Sets the client address.
    #[must_use]
    pub fn client_address(mut self, address: Option<IpAddr>) -> Self {
        self.client_address = address.map(crate::net::canonical);
        self
    }

    /// Sets the request id, kept only when it is 1 to [`MAX_REQUEST_ID_LEN`] visible ASCII
    /// characters (anything else could forge log lines or hide a key).
    #[must_use]
    pub fn request_id(mut self, id: Option<&str>) -> Self {
        self.request_id = id
            .filter(|id| {
                !id.is_empty()
                    && id.len() <= MAX_REQUEST_ID_LEN
                    && id.bytes().all(|b| b.is_ascii_graphic())
            })
            .map(str::to_owned);
        self
    }
}

impl Default for ChangeContext {
    /// [`Actor::application`] with no request.
    fn default() -> Self {
        Self::new(Actor::application())
    }
}

/// The MAC of one event (or of nothing: the chain's start is all zero).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditMac([u8; 32]);

impl AuditMac {
    /// The MAC before the first event.
    pub const GENESIS: AuditMac = AuditMac([0; 32]);

    /// From stored bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn ct_eq(&self, other: &AuditMac) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for AuditMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuditMac({})", &self.to_hex()[..16])
    }
}

impl Serialize for AuditMac {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

/// Where the chain stands: the last event's number and MAC (0 and
/// [`AuditMac::GENESIS`] before the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// The last event's number.
    pub seq: u64,
    /// The last event's MAC.
    pub mac: AuditMac,
}

impl ChainHead {
    /// The head of an empty log.
    pub const GENESIS: ChainHead = ChainHead {
        seq: 0,
        mac: AuditMac::GENESIS,
    };
}

/// An event as the manager describes it, before the store numbers and seals it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// When.
    pub at: OffsetDateTime,
    /// What.
    pub action: AuditAction,
    /// Who and through which request.
    pub context: ChangeContext,
    /// The key the event is about.
    pub key_id: Option<Uuid>,
    /// That key's collection.
    pub collection: Option<String>,
    /// That key's subject.
    pub subject: Option<String>,
    /// What changed: a JSON object, `{"field": {"from": …, "to": …}}` for key fields, other
    /// members for other facts (a rotation's `successor`). Never a key, digest or secret.
    pub changes: serde_json::Map<String, serde_json::Value>,
}

/// One event of the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
pub struct AuditEvent {
    /// Its number: 1, 2, 3, … without gaps.
    pub seq: u64,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "manage-api", schema(value_type = String, format = DateTime))]
    pub at: OffsetDateTime,
    /// What: `key.created`, `key.updated`, `key.revoked`, `key.disabled`, `key.enabled`,
    /// `key.rotated`, `key.deleted`, `key.revealed` or `secret.retired`.
    #[cfg_attr(feature = "manage-api", schema(value_type = String, example = "key.revoked"))]
    pub action: AuditAction,
    /// Who: `{"kind": "key", "id", "subject"}`, `{"kind": "cli"}`,
    /// `{"kind": "sql", "name": <database role>}` or `{"kind": "other", "name"}`.
    #[cfg_attr(feature = "manage-api", schema(value_type = Object))]
    pub actor: Actor,
    /// The key it is about.
    pub key_id: Option<Uuid>,
    /// That key's collection.
    pub collection: Option<String>,
    /// That key's subject.
    pub subject: Option<String>,
    /// What changed (see [`AuditEntry::changes`]).
    #[cfg_attr(feature = "manage-api", schema(value_type = Object))]
    pub changes: serde_json::Map<String, serde_json::Value>,
    /// The caller's address.
    #[cfg_attr(feature = "manage-api", schema(value_type = Option<String>))]
    pub client_address: Option<IpAddr>,
    /// The request id.
    pub request_id: Option<String>,
    /// The secret whose derived key sealed the event.
    #[serde(serialize_with = "display")]
    #[cfg_attr(feature = "manage-api", schema(value_type = String))]
    pub sealed_by: SecretId,
    /// `HMAC(k, previous MAC ‖ content)`, hex.
    #[cfg_attr(feature = "manage-api", schema(value_type = String))]
    pub mac: AuditMac,
}

fn display<T: fmt::Display, S: serde::Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

impl AuditEvent {
    /// The bytes the MAC covers, after the previous MAC: every field but the MAC, in a fixed
    /// order, as a JSON array (times in unix microseconds).
    fn content(&self) -> Vec<u8> {
        let actor = &self.actor;
        serde_json::to_vec(&serde_json::json!([
            self.seq,
            unix_micros(self.at),
            self.action.as_str(),
            actor.kind(),
            actor.key_id(),
            actor.name(),
            self.key_id,
            self.collection,
            self.subject,
            self.changes,
            self.client_address,
            self.request_id,
            self.sealed_by.to_string(),
        ]))
        .expect("JSON values always serialize")
    }

    /// The head after this event.
    pub fn head(&self) -> ChainHead {
        ChainHead {
            seq: self.seq,
            mac: self.mac,
        }
    }
}

/// Unix microseconds: the stores' resolution.
pub(crate) fn unix_micros(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos().div_euclid(1_000)).unwrap_or(i64::MAX)
}

/// The sealed record of pruned events: the last deleted event's number and MAC, so the
/// remaining chain still links to something the secret vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCheckpoint {
    /// Where the chain stood after the last deleted event.
    pub head: ChainHead,
    /// The secret that sealed the checkpoint.
    pub sealed_by: SecretId,
    /// `HMAC(k, "checkpoint" ‖ seq ‖ MAC)`.
    pub seal: AuditMac,
}

/// Seals events and checks seals, with keys derived from the application secret ring: new
/// events are sealed under the current secret; events sealed under a previous secret verify
/// as long as that secret stays in the ring.
#[derive(Clone)]
pub struct AuditSealer {
    keys: Vec<(SecretId, Zeroizing<[u8; 32]>)>,
}

impl fmt::Debug for AuditSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSealer")
            .field(
                "secrets",
                &self.keys.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl AuditSealer {
    /// A sealer over every secret of the ring.
    pub fn new(ring: &SecretRing) -> Self {
        Self {
            keys: ring.derived_keys(KEY_LABEL),
        }
    }

    fn key(&self, id: SecretId) -> Option<&[u8; 32]> {
        self.keys
            .iter()
            .find(|(k, _)| *k == id)
            .map(|(_, key)| &**key)
    }

    fn current(&self) -> (SecretId, &[u8; 32]) {
        let (id, key) = &self.keys[0];
        (*id, key)
    }

    fn mac(key: &[u8; 32], domain: &[u8], prev: &AuditMac, content: &[u8]) -> AuditMac {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
        mac.update(domain);
        mac.update(&prev.0);
        mac.update(content);
        AuditMac(mac.finalize().into_bytes().into())
    }

    /// The event that follows `head`: numbered `head.seq + 1` and sealed under the current
    /// secret.
    pub fn seal(&self, head: ChainHead, entry: &AuditEntry) -> AuditEvent {
        let (sealed_by, key) = self.current();
        let mut event = AuditEvent {
            seq: head.seq + 1,
            at: entry.at,
            action: entry.action,
            actor: entry.context.actor.clone(),
            key_id: entry.key_id,
            collection: entry.collection.clone(),
            subject: entry.subject.clone(),
            changes: entry.changes.clone(),
            client_address: entry.context.client_address,
            request_id: entry.context.request_id.clone(),
            sealed_by,
            mac: AuditMac::GENESIS,
        };
        event.mac = Self::mac(key, EVENT_DOMAIN, &head.mac, &event.content());
        event
    }

    /// Whether `event` follows `head`: the next number, and a MAC over `head`'s MAC and its
    /// content.
    ///
    /// # Errors
    /// The reason it does not.
    pub fn check(&self, head: ChainHead, event: &AuditEvent) -> Result<(), ChainBreak> {
        if event.seq != head.seq + 1 {
            return Err(if event.seq <= head.seq {
                ChainBreak::OutOfOrder
            } else {
                ChainBreak::Missing(event.seq - head.seq - 1)
            });
        }
        let key = self
            .key(event.sealed_by)
            .ok_or(ChainBreak::UnknownSecret(event.sealed_by))?;
        let expected = Self::mac(key, EVENT_DOMAIN, &head.mac, &event.content());
        if expected.ct_eq(&event.mac) {
            Ok(())
        } else {
            Err(ChainBreak::BadMac)
        }
    }

    /// A checkpoint for `head`, sealed under the current secret.
    pub fn checkpoint(&self, head: ChainHead) -> AuditCheckpoint {
        let (sealed_by, key) = self.current();
        AuditCheckpoint {
            head,
            sealed_by,
            seal: Self::mac(key, CHECKPOINT_DOMAIN, &head.mac, &head.seq.to_be_bytes()),
        }
    }

    /// Whether the checkpoint's seal is one of this ring's.
    ///
    /// # Errors
    /// [`ChainBreak::UnknownSecret`] or [`ChainBreak::BadCheckpoint`].
    pub fn check_checkpoint(&self, checkpoint: &AuditCheckpoint) -> Result<(), ChainBreak> {
        let key = self
            .key(checkpoint.sealed_by)
            .ok_or(ChainBreak::UnknownSecret(checkpoint.sealed_by))?;
        let head = checkpoint.head;
        let expected = Self::mac(key, CHECKPOINT_DOMAIN, &head.mac, &head.seq.to_be_bytes());
        if expected.ct_eq(&checkpoint.seal) {
            Ok(())
        } else {
            Err(ChainBreak::BadCheckpoint)
        }
    }
}

/// Why the chain does not hold at an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainBreak {
    /// The MAC does not match the content and the previous MAC: the event, or one before it,
    /// was changed.
    #[error("its MAC does not match its content and the previous event's MAC (edited, or an event before it was replaced)")]
    BadMac,
    /// Events before it are missing.
    #[error("{0} event(s) before it are missing")]
    Missing(u64),
    /// Its number is not after the previous event's.
    #[error("its number does not follow the previous event's (reordered or duplicated)")]
    OutOfOrder,
    /// Sealed under a secret this ring does not hold.
    #[error("it was sealed under secret {0}, which is not in the configured ring (add it to KEYWARDEN_PREVIOUS_SECRETS to check it)")]
    UnknownSecret(SecretId),
    /// The retention checkpoint's seal does not match.
    #[error("the retention checkpoint's seal does not match (edited)")]
    BadCheckpoint,
}

/// Checks a log from its start (or checkpoint) event by event, in number order.
#[derive(Debug)]
pub struct AuditVerifier<'a> {
    sealer: &'a AuditSealer,
    head: ChainHead,
    checked: u64,
}

/// What [`AuditVerifier`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerification {
    /// Events checked.
    pub checked: u64,
    /// The checkpoint the check started from, if events were pruned.
    pub checkpoint: Option<ChainHead>,
    /// The last event that verified (or the checkpoint, or the genesis head).
    pub head: ChainHead,
    /// The first event that broke the chain (its number, 0 for the checkpoint), and why.
    pub broken: Option<(u64, ChainBreak)>,
}

impl<'a> AuditVerifier<'a> {
    /// A verifier starting at the checkpoint, or at the start of the log without one.
    ///
    /// # Errors
    /// The checkpoint's seal does not hold.
    pub fn new(
        sealer: &'a AuditSealer,
        checkpoint: Option<&AuditCheckpoint>,
    ) -> Result<Self, ChainBreak> {
        let head = match checkpoint {
            Some(checkpoint) => {
                sealer.check_checkpoint(checkpoint)?;
                checkpoint.head
            }
            None => ChainHead::GENESIS,
        };
        Ok(Self {
            sealer,
            head,
            checked: 0,
        })
    }

    /// Checks the next event.
    ///
    /// # Errors
    /// Why it breaks the chain; the verifier's head stays at the last good event.
    pub fn next(&mut self, event: &AuditEvent) -> Result<(), ChainBreak> {
        self.sealer.check(self.head, event)?;
        self.head = event.head();
        self.checked += 1;
        Ok(())
    }

    /// Events checked so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// The last good head.
    pub fn head(&self) -> ChainHead {
        self.head
    }
}

/// Checks that `events` (in number order) continue the chain from `checkpoint` (or the
/// start): what a store checks, inside the transaction, before it prunes them.
///
/// # Errors
/// The first broken event's number (0 for the checkpoint) and why.
pub fn verify_prefix(
    sealer: &AuditSealer,
    checkpoint: Option<&AuditCheckpoint>,
    events: &[AuditEvent],
) -> Result<(), (u64, ChainBreak)> {
    let mut verifier = AuditVerifier::new(sealer, checkpoint).map_err(|why| (0, why))?;
    for event in events {
        verifier.next(event).map_err(|why| (event.seq, why))?;
    }
    Ok(())
}

/// Filters and a cursor for reading the log, in number order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuditQuery {
    /// Only events about this key.
    pub key_id: Option<Uuid>,
    /// Only events by this actor: a kind (`cli`, `key`, `sql`, `other`) or one actor as
    /// [`Actor`]'s `Display` writes it (`key:<id>`, `sql:<role>`, `other:<name>`).
    pub actor: Option<String>,
    /// Only this action.
    pub action: Option<AuditAction>,
    /// Only events about keys of this collection …
    pub collection: Option<String>,
    /// … and this subject.
    pub subject: Option<String>,
    /// Only events at or after this instant.
    pub since: Option<OffsetDateTime>,
    /// Only events before this instant.
    pub until: Option<OffsetDateTime>,
    /// Only events numbered after this (the previous page's `next_cursor`).
    pub after: Option<u64>,
    /// Page size, 1 to [`AuditQuery::MAX_LIMIT`] (0: the default, 100).
    pub limit: u32,
}

impl AuditQuery {
    /// The largest page size.
    pub const MAX_LIMIT: u32 = 1000;

    /// The limit clamped to 1..=MAX_LIMIT (100 when unset).
    pub fn effective_limit(&self) -> usize {
        match self.limit {
            0 => 100,
            n => n.min(Self::MAX_LIMIT) as usize,
        }
    }

    /// The actor filter as the sealed columns hold it: a kind, and a key id or a name.
    /// `None` without a filter; a filter that names no actor matches nothing (kind `""`).
    pub fn actor_filter(&self) -> Option<ActorFilter> {
        let text = self.actor.as_deref()?;
        let (kind, rest) = match text.split_once(':') {
            Some((kind, rest)) => (kind, Some(rest)),
            None => (text, None),
        };
        let known = ["cli", "key", "sql", "other"].contains(&kind);
        Some(match (known, kind, rest) {
            (true, _, None) => ActorFilter {
                kind: kind.to_owned(),
                key_id: None,
                name: None,
            },
            (true, "key", Some(id)) => match Uuid::try_parse(id) {
                Ok(id) => ActorFilter {
                    kind: "key".into(),
                    key_id: Some(id),
                    name: None,
                },
                Err(_) => ActorFilter::nothing(),
            },
            (true, "sql" | "other", Some(name)) => ActorFilter {
                kind: kind.to_owned(),
                key_id: None,
                name: Some(name.to_owned()),
            },
            _ => ActorFilter::nothing(),
        })
    }

    /// Whether an event passes the filters (the cursor and limit aside).
    pub fn matches(&self, event: &AuditEvent) -> bool {
        self.key_id.is_none_or(|id| event.key_id == Some(id))
            && self.actor_filter().is_none_or(|f| {
                f.kind == event.actor.kind()
                    && f.key_id.is_none_or(|id| event.actor.key_id() == Some(id))
                    && f.name
                        .as_deref()
                        .is_none_or(|name| event.actor.name() == Some(name))
            })
            && self.action.is_none_or(|a| a == event.action)
            && self
                .collection
                .as_ref()
                .is_none_or(|c| event.collection.as_ref() == Some(c))
            && self
                .subject
                .as_ref()
                .is_none_or(|s| event.subject.as_ref() == Some(s))
            && self.since.is_none_or(|t| event.at >= t)
            && self.until.is_none_or(|t| event.at < t)
    }
}

/// Checks an actor filter: a kind (`cli`, `key`, `sql`, `other`), `key:<uuid>`,
/// `sql:<role>` or `other:<name>`.
///
/// # Errors
/// What is wrong, never repeating the text.
pub fn check_actor_filter(text: &str) -> Result<(), String> {
    let expected = "expected cli, key, sql, other, key:<key id>, sql:<role> or other:<name>";
    match text.split_once(':') {
        None if ["cli", "key", "sql", "other"].contains(&text) => Ok(()),
        Some(("key", id)) if Uuid::try_parse(id).is_ok() => Ok(()),
        Some(("sql" | "other", name)) if !name.is_empty() => Ok(()),
        _ => Err(expected.to_owned()),
    }
}

/// An actor filter as stored: compared with the sealed `actor_kind`, `actor_key_id` and
/// `actor_name` columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorFilter {
    /// `cli`, `key`, `sql` or `other` (`""`: matches nothing).
    pub kind: String,
    /// For `key:<id>`.
    pub key_id: Option<Uuid>,
    /// For `sql:<role>` and `other:<name>`.
    pub name: Option<String>,
}

impl ActorFilter {
    fn nothing() -> Self {
        Self {
            kind: String::new(),
            key_id: None,
            name: None,
        }
    }
}

/// One page of events.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    /// The events, in number order.
    pub items: Vec<AuditEvent>,
    /// Pass as [`AuditQuery::after`] for the next page; `None` on the last page.
    pub next_cursor: Option<u64>,
}

impl AuditPage {
    /// A page from up to `limit + 1` events in number order.
    pub fn from_overfetch(mut items: Vec<AuditEvent>, limit: usize) -> Self {
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|e| e.seq)
        } else {
            None
        };
        Self { items, next_cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(secret: &str) -> SecretRing {
        SecretRing::from_strs(secret, None).unwrap()
    }

    fn entry(n: u8) -> AuditEntry {
        AuditEntry {
            at: OffsetDateTime::from_unix_timestamp(1_800_000_000 + i64::from(n)).unwrap(),
            action: AuditAction::Updated,
            context: ChangeContext::new(Actor::Cli),
            key_id: Some(Uuid::from_bytes([n; 16])),
            collection: Some("users".into()),
            subject: Some("alice".into()),
            changes: serde_json::json!({"name": {"from": "a", "to": "b"}})
                .as_object()
                .unwrap()
                .clone(),
        }
    }

    fn chain(sealer: &AuditSealer, n: u8) -> Vec<AuditEvent> {
        let mut head = ChainHead::GENESIS;
        (1..=n)
            .map(|i| {
                let event = sealer.seal(head, &entry(i));
                head = event.head();
                event
            })
            .collect()
    }

    fn verify(sealer: &AuditSealer, events: &[AuditEvent]) -> Result<u64, (u64, ChainBreak)> {
        let mut verifier = AuditVerifier::new(sealer, None).unwrap();
        for event in events {
            verifier.next(event).map_err(|b| (event.seq, b))?;
        }
        Ok(verifier.checked())
    }

    #[test]
    fn a_sealed_chain_verifies_and_every_edit_breaks_it() {
        let sealer = AuditSealer::new(&ring("a-secret-of-at-least-thirty-two-bytes!"));
        let events = chain(&sealer, 4);
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(verify(&sealer, &events), Ok(4));

        let mut edited = events.clone();
        edited[1].subject = Some("mallory".into());
        assert_eq!(verify(&sealer, &edited), Err((2, ChainBreak::BadMac)));

        let mut edited = events.clone();
        edited[2]
            .changes
            .insert("scopes".into(), serde_json::json!("*"));
        assert_eq!(verify(&sealer, &edited), Err((3, ChainBreak::BadMac)));

        let mut edited = events.clone();
        edited[0].actor = Actor::Sql("dba".into());
        assert_eq!(verify(&sealer, &edited), Err((1, ChainBreak::BadMac)));

        let mut deleted = events.clone();
        deleted.remove(1);
        assert_eq!(verify(&sealer, &deleted), Err((3, ChainBreak::Missing(1))));

        let mut renumbered = events.clone();
        renumbered.remove(1);
        for e in &mut renumbered[1..] {
            e.seq -= 1;
        }
        assert_eq!(verify(&sealer, &renumbered), Err((2, ChainBreak::BadMac)));

        let mut swapped = events.clone();
        swapped.swap(1, 2);
        assert_eq!(verify(&sealer, &swapped), Err((3, ChainBreak::Missing(1))));
    }

    #[test]
    fn another_secret_cannot_forge_and_previous_secrets_still_verify() {
        let old = AuditSealer::new(&ring("an-old-secret-of-at-least-32-bytes!!"));
        let forger = AuditSealer::new(&ring("a-forgers-secret-of-at-least-32-bytes"));
        let events = chain(&old, 2);
        assert!(matches!(
            verify(&forger, &events),
            Err((1, ChainBreak::UnknownSecret(_)))
        ));
        // A forger who copies the victim's secret id still cannot make the MAC.
        let mut forged = chain(&forger, 2);
        for e in &mut forged {
            e.sealed_by = events[0].sealed_by;
        }
        assert_eq!(verify(&old, &forged), Err((1, ChainBreak::BadMac)));

        let rotated = AuditSealer::new(
            &SecretRing::from_strs(
                "the-new-secret-of-at-least-32-bytes!",
                Some("an-old-secret-of-at-least-32-bytes!!"),
            )
            .unwrap(),
        );
        let mut all = events.clone();
        all.push(rotated.seal(events[1].head(), &entry(3)));
        assert_ne!(all[2].sealed_by, all[1].sealed_by);
        assert_eq!(verify(&rotated, &all), Ok(3));
    }

    #[test]
    fn checkpoints_are_sealed() {
        let sealer = AuditSealer::new(&ring("a-secret-of-at-least-thirty-two-bytes!"));
        let events = chain(&sealer, 3);
        let checkpoint = sealer.checkpoint(events[1].head());
        let mut verifier = AuditVerifier::new(&sealer, Some(&checkpoint)).unwrap();
        verifier.next(&events[2]).unwrap();
        let mut moved = checkpoint.clone();
        moved.head.seq = 0;
        assert_eq!(
            AuditVerifier::new(&sealer, Some(&moved)).unwrap_err(),
            ChainBreak::BadCheckpoint
        );
    }

    #[test]
    fn request_ids_are_kept_only_when_plain() {
        let id = |s: &str| ChangeContext::default().request_id(Some(s)).request_id;
        assert_eq!(id("req-123"), Some("req-123".into()));
        assert_eq!(id(""), None);
        assert_eq!(id("two words"), None);
        assert_eq!(id("line\nbreak"), None);
        assert_eq!(id(&"x".repeat(MAX_REQUEST_ID_LEN + 1)), None);
        assert!("key.nope".parse::<AuditAction>().is_err());
        for action in AuditAction::ALL {
            assert_eq!(action.as_str().parse::<AuditAction>(), Ok(action));
        }
    }
}
