//! Management changes written together with their audit events
//! ([`KeyStore::apply_audited`](super::KeyStore::apply_audited)).

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{KeyPatch, KeyRecord, SecretRetirement, StoreError, StoreErrorKind, UnmigratedKeys};
use crate::audit::{AuditAction, AuditEntry, AuditEvent, AuditSealer, ChangeContext};
use crate::secret::SecretId;

/// A management change, applied by [`KeyStore::apply_audited`](super::KeyStore::apply_audited)
/// with its audit event.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum KeyChange<'a> {
    /// [`KeyStore::insert`](super::KeyStore::insert).
    Insert(&'a KeyRecord),
    /// [`KeyStore::update`](super::KeyStore::update).
    Update {
        /// The key.
        id: Uuid,
        /// The patch.
        patch: &'a KeyPatch,
        /// The time `updated_at` moves to.
        now: OffsetDateTime,
    },
    /// [`KeyStore::delete`](super::KeyStore::delete).
    Delete(Uuid),
    /// [`KeyStore::retire_secret`](super::KeyStore::retire_secret). The event is written only
    /// when the secret was retired.
    RetireSecret {
        /// The secret.
        secret_id: SecretId,
        /// What to do with keys that have no other digest.
        unmigrated: UnmigratedKeys,
        /// The time revocations are dated.
        now: OffsetDateTime,
    },
    /// Nothing changes; only the event is written (a reveal of this key).
    Note(&'a KeyRecord),
    /// No key is involved; only the event is written, with the [`AuditWrite`]'s action
    /// (required) and details (a webhook subscription's change, recorded before it is made).
    Event,
}

/// What [`KeyStore::apply_audited`](super::KeyStore::apply_audited) did, as the plain method
/// of the change would have answered.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ChangeOutcome {
    /// Inserted.
    Inserted,
    /// The updated record, or `None` for an unknown id (no event).
    Updated(Option<KeyRecord>),
    /// The deleted record, or `None` for an unknown id (no event).
    Deleted(Option<KeyRecord>),
    /// The retirement (an event only when `retired`).
    Retired(SecretRetirement),
    /// Only the event was written.
    Noted,
}

/// A change's outcome and the event written with it (`None` when nothing changed: an unknown
/// id, a refused retirement).
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// What the change did.
    pub outcome: ChangeOutcome,
    /// The event, numbered and sealed.
    pub event: Option<AuditEvent>,
}

/// How to describe and seal the event of a change.
#[derive(Debug, Clone, Copy)]
pub struct AuditWrite<'a> {
    /// Seals the event under the application secret.
    pub sealer: &'a AuditSealer,
    /// Who, from where, which request.
    pub context: &'a ChangeContext,
    /// When.
    pub at: OffsetDateTime,
    /// The action; `None` derives it from the change (an update that revokes is
    /// `key.revoked`, one that disables `key.disabled`, …).
    pub action: Option<AuditAction>,
    /// Facts beside the field changes (a rotation's `successor`), merged into `changes`.
    pub details: &'a Map<String, Value>,
}

/// The fields an event shows (never the digest, secret id or encrypted key).
fn fields(record: &KeyRecord) -> [(&'static str, Value); 12] {
    [
        ("name", Value::from(record.name.clone())),
        ("description", Value::from(record.description.clone())),
        ("scopes", Value::from(record.scopes.clone())),
        ("read_only", Value::from(record.read_only)),
        ("metadata", record.metadata.clone()),
        (
            "rate_limit",
            Value::from(record.rate_limit.map(|p| p.to_string())),
        ),
        (
            "allowed_ips",
            Value::from(
                record
                    .allowed_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            ),
        ),
        ("credits", Value::from(record.credits.map(|c| c.remaining))),
        (
            "refill",
            Value::from(record.credits.and_then(|c| c.refill).map(|r| r.to_string())),
        ),
        ("expires_at", instant(record.expires_at)),
        ("revoked_at", instant(record.revoked_at)),
        ("disabled", Value::from(record.disabled)),
    ]
}

fn instant(at: Option<OffsetDateTime>) -> Value {
    at.and_then(|at| at.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::from)
}

fn change(from: Value, to: Value) -> Value {
    let mut map = Map::new();
    map.insert("from".into(), from);
    map.insert("to".into(), to);
    Value::Object(map)
}

impl AuditWrite<'_> {
    fn entry(
        &self,
        action: AuditAction,
        key: Option<&KeyRecord>,
        mut changes: Map<String, Value>,
    ) -> AuditEntry {
        for (name, value) in self.details {
            changes.insert(name.clone(), value.clone());
        }
        AuditEntry {
            at: self.at,
            action: self.action.unwrap_or(action),
            context: self.context.clone(),
            key_id: key.map(|k| k.id),
            collection: key.map(|k| k.collection.clone()),
            subject: key.map(|k| k.subject.clone()),
            changes,
        }
    }

    /// The event of a created key: every shown field, from nothing.
    pub(crate) fn created(&self, record: &KeyRecord) -> AuditEntry {
        let mut changes = Map::new();
        for (name, value) in fields(record) {
            if !value.is_null() {
                changes.insert(name.into(), change(Value::Null, value));
            }
        }
        for (name, value) in [
            ("owner_kind", Value::from(record.owner_kind.as_str())),
            ("environment", Value::from(record.environment.clone())),
            (
                "rotated_from",
                record
                    .rotated_from
                    .map_or(Value::Null, |id| id.to_string().into()),
            ),
        ] {
            if !value.is_null() {
                changes.insert(name.into(), change(Value::Null, value));
            }
        }
        self.entry(AuditAction::Created, Some(record), changes)
    }

    /// The event of an update: the fields that changed, before → after, and the action the
    /// change amounts to.
    pub(crate) fn updated(&self, before: &KeyRecord, after: &KeyRecord) -> AuditEntry {
        let mut changes = Map::new();
        for ((name, from), (_, to)) in fields(before).into_iter().zip(fields(after)) {
            if from != to {
                changes.insert(name.into(), change(from, to));
            }
        }
        let action = if before.revoked_at.is_none() && after.revoked_at.is_some() {
            AuditAction::Revoked
        } else if before.disabled && !after.disabled {
            AuditAction::Enabled
        } else if !before.disabled && after.disabled {
            AuditAction::Disabled
        } else {
            AuditAction::Updated
        };
        self.entry(action, Some(after), changes)
    }

    /// The event of a deleted key.
    pub(crate) fn deleted(&self, record: &KeyRecord) -> AuditEntry {
        self.entry(AuditAction::Deleted, Some(record), Map::new())
    }

    /// The event of a retired secret.
    pub(crate) fn retired(&self, secret_id: SecretId, outcome: &SecretRetirement) -> AuditEntry {
        let mut changes = Map::new();
        changes.insert("secret_id".into(), secret_id.to_string().into());
        changes.insert("digests_dropped".into(), outcome.dropped.into());
        changes.insert(
            "keys_revoked".into(),
            outcome
                .unmigrated
                .iter()
                .map(|id| Value::from(id.to_string()))
                .collect(),
        );
        self.entry(AuditAction::SecretRetired, None, changes)
    }

    /// An event about no key: the write's own action and details. Details naming a
    /// `collection` and a `subject` (an owner's policy) file the event under that owner, so
    /// the owner filters find it.
    pub(crate) fn event(&self) -> AuditEntry {
        let mut entry = self.entry(AuditAction::Updated, None, Map::new());
        let text = |name: &str| self.details.get(name).and_then(Value::as_str);
        if let (Some(collection), Some(subject)) = (text("collection"), text("subject")) {
            entry.collection = Some(collection.to_owned());
            entry.subject = Some(subject.to_owned());
        }
        entry
    }

    /// The event of a change that changes nothing stored.
    pub(crate) fn noted(&self, record: &KeyRecord) -> AuditEntry {
        self.entry(AuditAction::Revealed, Some(record), Map::new())
    }
}

/// The error of a prune refused because the events it would delete do not verify.
pub(crate) fn unverified_prune((seq, why): (u64, crate::audit::ChainBreak)) -> StoreError {
    StoreError::new(
        StoreErrorKind::Corrupt,
        format!("the audit log does not verify (event #{seq}: {why}); nothing was pruned"),
    )
}

/// The error of a store that keeps no audit log.
pub(crate) fn no_audit_log() -> StoreError {
    StoreError::new(
        StoreErrorKind::Other,
        "this key store keeps no audit log: implement KeyStore::apply_audited and \
         KeyStore::audit_events, or build the KeyManager with without_audit_log()",
    )
}

#[cfg(test)]
mod tests {
    use super::super::test_support::record;
    use super::*;
    use crate::audit::Actor;
    use crate::SecretRing;

    #[test]
    fn updates_name_their_action_and_only_the_changed_fields() {
        let sealer = AuditSealer::new(
            &SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap(),
        );
        let context = ChangeContext::new(Actor::Cli);
        let details = Map::new();
        let write = AuditWrite {
            sealer: &sealer,
            context: &context,
            at: OffsetDateTime::now_utc(),
            action: None,
            details: &details,
        };
        let before = record(1);
        let mut after = before.clone();
        after.name = "renamed".into();
        let entry = write.updated(&before, &after);
        assert_eq!(entry.action, AuditAction::Updated);
        assert_eq!(
            Value::Object(entry.changes),
            serde_json::json!({"name": {"from": "key 1", "to": "renamed"}})
        );
        let mut revoked = before.clone();
        revoked.revoked_at = Some(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(
            write.updated(&before, &revoked).action,
            AuditAction::Revoked
        );
        let mut disabled = before.clone();
        disabled.disabled = true;
        assert_eq!(
            write.updated(&before, &disabled).action,
            AuditAction::Disabled
        );
        assert_eq!(
            write.updated(&disabled, &before).action,
            AuditAction::Enabled
        );

        let mut viewable = before.clone();
        viewable.encrypted_key = Some(b"sealed".to_vec());
        let created = serde_json::to_string(&write.created(&viewable).changes).unwrap();
        for hidden in ["digest", "secret_id", "encrypted_key", "sealed"] {
            assert!(!created.contains(hidden), "{created}");
        }
    }
}
