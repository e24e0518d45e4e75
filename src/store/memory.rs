use std::collections::{BTreeMap, HashMap};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    no_secret, period_end, refill_period, retired_placeholder, unix_millis, Applied, AuditWrite,
    ChangeOutcome, CreditLease, FeedPage, HourlyUsage, KeyChange, KeyPage, KeyPatch, KeyQuery,
    KeyRecord, KeyStore, KeyUsage, MemoryFeed, Observers, OwnerLimits, OwnerPolicy,
    OwnerPolicyUpdate, SecretRetirement, StoreChange, StoreError, StoreErrorKind, StoreObserver,
    UnmigratedKeys, UsageCount, UsageOutcome, UsageSubject, WebhookPatch, WebhookProgress,
    WebhookRecord, WebhookStore,
};
use crate::audit::{AuditCheckpoint, AuditEvent, AuditPage, AuditQuery, AuditSealer, ChainHead};
use crate::secret::{Digest, SecretId};

/// An in-process store for tests, examples and single-process tools. Nothing is persisted.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
    observers: Observers,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: BTreeMap<Uuid, KeyRecord>,
    /// Every digest of every key: the records' and the added ones.
    by_digest: HashMap<Digest, Uuid>,
    /// Digests added after creation ([`KeyStore::add_digest`]), per key.
    added: HashMap<Uuid, Vec<(SecretId, Digest)>>,
    /// The audit log, in number order, and the retention checkpoint.
    audit: Vec<AuditEvent>,
    checkpoint: Option<AuditCheckpoint>,
    webhooks: BTreeMap<Uuid, WebhookRecord>,
    /// Usage analytics: counts by subject, hour and outcome.
    usage_counts: BTreeMap<(UsageSubject, OffsetDateTime, UsageOutcome), u64>,
    /// The change feed (the newest 100,000 changes), written with each change.
    feed: MemoryFeed,
    /// Where each key's credits stand (the balance is the record's).
    credits: HashMap<Uuid, CreditState>,
    /// Owner policies by collection and subject, with their credits' state.
    owners: BTreeMap<(String, String), MemoryOwner>,
    /// The owner of each pool (leases name the pool).
    owner_pools: HashMap<Uuid, (String, String)>,
}

/// An owner's policy and where its shared credits stand.
#[derive(Debug, Clone)]
struct MemoryOwner {
    policy: OwnerPolicy,
    credits: Option<CreditState>,
}

impl MemoryOwner {
    fn limits(&self) -> OwnerLimits {
        OwnerLimits {
            rate_limit: self.policy.rate_limit,
            credits: self.policy.credits.map(|c| c.refill),
            generation: self.credits.map_or(0, |c| c.generation),
        }
    }
}

/// [`generation_floor`](super::sql) for the memory store: the time in microseconds.
fn generation_floor(now: OffsetDateTime) -> u64 {
    u64::try_from(now.unix_timestamp_nanos() / 1_000)
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A key's credit schedule and generation; its balance is in its record.
#[derive(Debug, Clone, Copy)]
struct CreditState {
    anchor_ms: i64,
    period: u64,
    generation: u64,
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
        self.observers
            .created(Self::insert_in(&mut self.write(), record))
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
        self.observers
            .changed(Self::update_in(&mut self.write(), id, patch, now))
    }

    async fn add_digest(
        &self,
        id: Uuid,
        found_by: &Digest,
        new: &Digest,
        secret_id: SecretId,
    ) -> Result<bool, StoreError> {
        self.observers.changed_if(
            id,
            self.add_digest_unobserved(id, found_by, new, secret_id)
                .await,
        )
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

    async fn retire_secret(
        &self,
        secret_id: SecretId,
        unmigrated: UnmigratedKeys,
        now: OffsetDateTime,
    ) -> Result<SecretRetirement, StoreError> {
        self.observers.changed_all(Self::retire_secret_in(
            &mut self.write(),
            secret_id,
            unmigrated,
            now,
        ))
    }

    async fn delete(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.observers
            .changed(Self::delete_in(&mut self.write(), id))
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

    async fn lease_credits(
        &self,
        id: Uuid,
        need: u64,
        want: u64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditLease>, StoreError> {
        let mut inner = self.write();
        let Inner { by_id, credits, .. } = &mut *inner;
        let (Some(record), Some(state)) = (by_id.get_mut(&id), credits.get_mut(&id)) else {
            return Ok(None);
        };
        let Some(balance) = &mut record.credits else {
            return Ok(None);
        };
        Ok(Some(lease_from(balance, state, need, want, now)))
    }

    async fn return_credits(
        &self,
        id: Uuid,
        amount: u64,
        generation: u64,
        period: u64,
    ) -> Result<bool, StoreError> {
        let mut inner = self.write();
        let Inner { by_id, credits, .. } = &mut *inner;
        let current = credits
            .get(&id)
            .is_some_and(|s| s.generation == generation && s.period == period);
        match by_id.get_mut(&id).and_then(|r| r.credits.as_mut()) {
            Some(balance) if current => {
                balance.remaining = balance.remaining.saturating_add(amount);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn owner_policy(
        &self,
        collection: &str,
        subject: &str,
    ) -> Result<Option<OwnerPolicy>, StoreError> {
        Ok(self
            .read()
            .owners
            .get(&(collection.to_owned(), subject.to_owned()))
            .map(|owner| owner.policy.clone()))
    }

    async fn list_owner_policies(
        &self,
        collection: Option<&str>,
    ) -> Result<Vec<OwnerPolicy>, StoreError> {
        Ok(self
            .read()
            .owners
            .values()
            .filter(|owner| collection.is_none_or(|c| owner.policy.collection == c))
            .map(|owner| owner.policy.clone())
            .collect())
    }

    async fn set_owner_policy(
        &self,
        collection: &str,
        subject: &str,
        update: &OwnerPolicyUpdate,
        now: OffsetDateTime,
    ) -> Result<OwnerPolicy, StoreError> {
        let (policy, keys) = {
            let mut inner = self.write();
            let slot = (collection.to_owned(), subject.to_owned());
            let before = inner.owners.get(&slot).cloned();
            let mut owner = before.clone().unwrap_or_else(|| MemoryOwner {
                policy: OwnerPolicy {
                    collection: collection.to_owned(),
                    subject: subject.to_owned(),
                    rate_limit: None,
                    credits: None,
                    updated_at: now,
                },
                credits: None,
            });
            if let Some(rate_limit) = update.rate_limit {
                owner.policy.rate_limit = rate_limit;
            }
            if update.changes_credits() {
                owner.policy.credits = update.apply_credits(owner.policy.credits);
                owner.credits = owner.policy.credits.map(|_| CreditState {
                    anchor_ms: unix_millis(now),
                    period: 0,
                    generation: before
                        .as_ref()
                        .and_then(|b| b.credits)
                        .map_or(0, |s| s.generation + 1)
                        .max(generation_floor(now)),
                });
            }
            owner.policy.updated_at = now;
            let policy = owner.policy.clone();
            let limits = owner.limits();
            inner.owner_pools.insert(policy.pool(), slot.clone());
            inner.owners.insert(slot, owner);
            (
                policy,
                Self::owner_changed(&mut inner, collection, subject, limits),
            )
        };
        for id in keys {
            self.observers.notify(StoreChange::Key(id));
        }
        Ok(policy)
    }

    async fn delete_owner_policy(
        &self,
        collection: &str,
        subject: &str,
    ) -> Result<Option<OwnerPolicy>, StoreError> {
        let (removed, keys) = {
            let mut inner = self.write();
            let removed = inner
                .owners
                .remove(&(collection.to_owned(), subject.to_owned()));
            if let Some(owner) = &removed {
                inner.owner_pools.remove(&owner.policy.pool());
            }
            let keys = match &removed {
                Some(_) => {
                    Self::owner_changed(&mut inner, collection, subject, OwnerLimits::default())
                }
                None => Vec::new(),
            };
            (removed.map(|owner| owner.policy), keys)
        };
        for id in keys {
            self.observers.notify(StoreChange::Key(id));
        }
        Ok(removed)
    }

    async fn lease_owner_credits(
        &self,
        pool: Uuid,
        need: u64,
        want: u64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditLease>, StoreError> {
        let mut inner = self.write();
        let Inner {
            owners,
            owner_pools,
            ..
        } = &mut *inner;
        let Some(owner) = owner_pools.get(&pool).and_then(|slot| owners.get_mut(slot)) else {
            return Ok(None);
        };
        let (Some(balance), Some(state)) = (&mut owner.policy.credits, &mut owner.credits) else {
            return Ok(None);
        };
        Ok(Some(lease_from(balance, state, need, want, now)))
    }

    async fn return_owner_credits(
        &self,
        pool: Uuid,
        amount: u64,
        generation: u64,
        period: u64,
    ) -> Result<bool, StoreError> {
        let mut inner = self.write();
        let Inner {
            owners,
            owner_pools,
            ..
        } = &mut *inner;
        let Some(owner) = owner_pools.get(&pool).and_then(|slot| owners.get_mut(slot)) else {
            return Ok(false);
        };
        match (&mut owner.policy.credits, owner.credits) {
            (Some(balance), Some(state))
                if state.generation == generation && state.period == period =>
            {
                balance.remaining = balance.remaining.saturating_add(amount);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn apply_audited(
        &self,
        change: KeyChange<'_>,
        audit: &AuditWrite<'_>,
    ) -> Result<Applied, StoreError> {
        // One write lock over the change and its event: nothing lands between them.
        let mut inner = self.write();
        let (outcome, entry) = match change {
            KeyChange::Insert(record) => {
                self.observers
                    .created(Self::insert_in(&mut inner, record))?;
                (ChangeOutcome::Inserted, Some(audit.created(record)))
            }
            KeyChange::Update { id, patch, now } => {
                let before = inner.by_id.get(&id).cloned();
                let after = self
                    .observers
                    .changed(Self::update_in(&mut inner, id, patch, now))?;
                let entry = before
                    .zip(after.as_ref())
                    .map(|(b, a)| audit.updated(&b, a));
                (ChangeOutcome::Updated(after), entry)
            }
            KeyChange::Delete(id) => {
                let gone = self.observers.changed(Self::delete_in(&mut inner, id))?;
                let entry = gone.as_ref().map(|r| audit.deleted(r));
                (ChangeOutcome::Deleted(gone), entry)
            }
            KeyChange::RetireSecret {
                secret_id,
                unmigrated,
                now,
            } => {
                let outcome = self.observers.changed_all(Self::retire_secret_in(
                    &mut inner, secret_id, unmigrated, now,
                ))?;
                let entry = outcome.retired.then(|| audit.retired(secret_id, &outcome));
                (ChangeOutcome::Retired(outcome), entry)
            }
            KeyChange::Note(record) => (ChangeOutcome::Noted, Some(audit.noted(record))),
            KeyChange::Event if audit.action.is_none() => {
                return Err(StoreError::new(
                    StoreErrorKind::Other,
                    "an event without a key needs an action",
                ))
            }
            KeyChange::Event => (ChangeOutcome::Noted, Some(audit.event())),
        };
        let event = entry.map(|entry| {
            let head = inner
                .audit
                .last()
                .map(AuditEvent::head)
                .or(inner.checkpoint.as_ref().map(|c| c.head))
                .unwrap_or(ChainHead::GENESIS);
            let event = audit.sealer.seal(head, &entry);
            inner.audit.push(event.clone());
            event
        });
        Ok(Applied { outcome, event })
    }

    async fn audit_events(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        let inner = self.read();
        let after = query.after.unwrap_or(0);
        let start = inner.audit.partition_point(|e| e.seq <= after);
        let limit = query.effective_limit();
        let items = inner.audit[start..]
            .iter()
            .filter(|e| query.matches(e))
            .take(limit + 1)
            .cloned()
            .collect();
        Ok(AuditPage::from_overfetch(items, limit))
    }

    async fn audit_head(&self) -> Result<ChainHead, StoreError> {
        let inner = self.read();
        Ok(inner
            .audit
            .last()
            .map(AuditEvent::head)
            .or(inner.checkpoint.as_ref().map(|c| c.head))
            .unwrap_or(ChainHead::GENESIS))
    }

    fn webhooks(&self) -> Option<&dyn WebhookStore> {
        Some(self)
    }

    async fn record_usage_counts(&self, counts: &[UsageCount]) -> Result<(), StoreError> {
        let mut inner = self.write();
        for c in counts {
            let slot = inner
                .usage_counts
                .entry((c.subject.clone(), c.hour, c.outcome))
                .or_default();
            *slot = slot.saturating_add(c.count);
        }
        Ok(())
    }

    async fn usage_counts(
        &self,
        subject: &UsageSubject,
        since: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Vec<HourlyUsage>, StoreError> {
        Ok(self
            .read()
            .usage_counts
            .iter()
            .filter(|((s, hour, _), _)| s == subject && *hour >= since && *hour < until)
            .map(|((_, hour, outcome), count)| HourlyUsage {
                hour: *hour,
                outcome: *outcome,
                count: *count,
            })
            .collect())
    }

    async fn prune_usage_counts(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let mut inner = self.write();
        let was = inner.usage_counts.len();
        inner.usage_counts.retain(|(_, hour, _), _| *hour >= before);
        Ok((was - inner.usage_counts.len()) as u64)
    }

    async fn audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>, StoreError> {
        Ok(self.read().checkpoint.clone())
    }

    async fn prune_audit(
        &self,
        before: OffsetDateTime,
        sealer: &AuditSealer,
    ) -> Result<u64, StoreError> {
        let mut inner = self.write();
        let Some(last) = inner.audit.iter().rposition(|e| e.at < before) else {
            return Ok(0);
        };
        crate::audit::verify_prefix(sealer, inner.checkpoint.as_ref(), &inner.audit[..=last])
            .map_err(super::unverified_prune)?;
        let head = inner.audit[last].head();
        inner.audit.drain(..=last);
        inner.checkpoint = Some(sealer.checkpoint(head));
        Ok(last as u64 + 1)
    }

    fn observe(&self, observer: std::sync::Weak<dyn StoreObserver>) {
        self.observers.add(observer);
    }

    async fn change_feed(&self, after: u64, limit: u32) -> Result<Option<FeedPage>, StoreError> {
        Ok(Some(self.read().feed.page(after, limit as usize)))
    }
}

/// The writes themselves; the `KeyStore` methods add the in-process change notices.
impl MemoryStore {
    fn insert_in(inner: &mut Inner, record: &KeyRecord) -> Result<(), StoreError> {
        if inner.by_id.contains_key(&record.id) || inner.by_digest.contains_key(&record.digest) {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                "a key with this id or digest exists",
            ));
        }
        inner.by_digest.insert(record.digest, record.id);
        let mut stored = record.clone();
        stored.owner = inner
            .owners
            .get(&(record.collection.clone(), record.subject.clone()))
            .map(MemoryOwner::limits)
            .unwrap_or_default();
        inner.by_id.insert(record.id, stored);
        if record.credits.is_some() {
            let state = CreditState {
                anchor_ms: unix_millis(record.created_at),
                period: 0,
                generation: generation_floor(record.created_at),
            };
            inner.credits.insert(record.id, state);
        }
        inner.feed.push(StoreChange::Created);
        Ok(())
    }

    fn update_in(
        inner: &mut Inner,
        id: Uuid,
        patch: &KeyPatch,
        now: OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let Some(record) = inner.by_id.get_mut(&id) else {
            return Ok(None);
        };
        // Under the write lock: the check and the write are one step.
        patch.check_expected(record)?;
        patch.apply_to(record, now);
        let record = record.clone();
        if patch.changes_credits() {
            match record.credits {
                Some(_) => {
                    // Never a generation an instance may still hold a lease of.
                    let generation = inner
                        .credits
                        .get(&id)
                        .map_or(0, |s| s.generation + 1)
                        .max(generation_floor(now));
                    let state = CreditState {
                        anchor_ms: unix_millis(now),
                        period: 0,
                        generation,
                    };
                    inner.credits.insert(id, state);
                }
                None => {
                    inner.credits.remove(&id);
                }
            }
        }
        inner.feed.push(StoreChange::Key(id));
        Ok(Some(record))
    }

    async fn add_digest_unobserved(
        &self,
        id: Uuid,
        found_by: &Digest,
        new: &Digest,
        secret_id: SecretId,
    ) -> Result<bool, StoreError> {
        let mut inner = self.write();
        let Inner {
            by_id,
            by_digest,
            added,
            ..
        } = &mut *inner;
        match by_digest.get(new) {
            Some(owner) if *owner != id => {
                return Err(StoreError::new(
                    StoreErrorKind::Conflict,
                    "another key has this digest",
                ))
            }
            Some(_) => return Ok(false),
            None => {}
        }
        let Some(record) = by_id.get(&id) else {
            return Ok(false);
        };
        let extra = added.entry(id).or_default();
        let still_valid = record.digest == *found_by || extra.iter().any(|(_, d)| d == found_by);
        if !still_valid
            || record.secret_id == secret_id
            || extra.iter().any(|(s, _)| *s == secret_id)
        {
            return Ok(false);
        }
        extra.push((secret_id, *new));
        by_digest.insert(*new, id);
        Ok(true)
    }

    fn retire_secret_in(
        inner: &mut Inner,
        secret_id: SecretId,
        unmigrated: UnmigratedKeys,
        now: OffsetDateTime,
    ) -> Result<SecretRetirement, StoreError> {
        let Inner {
            by_id,
            by_digest,
            added,
            feed,
            ..
        } = inner;
        let only_under = |record: &KeyRecord| {
            record.secret_id == secret_id
                && added
                    .get(&record.id)
                    .is_none_or(|extra| extra.iter().all(|(s, _)| *s == secret_id))
        };
        let stranded: Vec<Uuid> = by_id
            .values()
            .filter(|r| r.revoked_at.is_none() && only_under(r))
            .map(|r| r.id)
            .collect();
        if unmigrated == UnmigratedKeys::Refuse && !stranded.is_empty() {
            return Ok(SecretRetirement {
                retired: false,
                unmigrated: stranded,
                ..SecretRetirement::default()
            });
        }
        let mut outcome = SecretRetirement {
            retired: true,
            unmigrated: stranded,
            ..SecretRetirement::default()
        };
        for record in by_id.values_mut() {
            let extra = added.entry(record.id).or_default();
            let before = extra.len();
            extra.retain(|(s, d)| {
                let keep = *s != secret_id;
                if !keep {
                    by_digest.remove(d);
                }
                keep
            });
            let mut lost = before - extra.len();
            if record.secret_id == secret_id {
                by_digest.remove(&record.digest);
                lost += 1;
                // Promote the lowest of the other digests, as the SQL stores do.
                extra.sort_by(|a, b| a.1.as_bytes().cmp(b.1.as_bytes()));
                if extra.is_empty() {
                    record.digest = retired_placeholder(record.id);
                    record.secret_id = no_secret();
                    record.revoked_at.get_or_insert(now);
                    record.updated_at = now;
                    by_digest.insert(record.digest, record.id);
                } else {
                    let (s, d) = extra.remove(0);
                    record.digest = d;
                    record.secret_id = s;
                }
            }
            if extra.is_empty() {
                added.remove(&record.id);
            }
            if lost > 0 {
                outcome.dropped += lost as u64;
                outcome.affected.push(record.id);
                feed.push(StoreChange::Key(record.id));
            }
        }
        Ok(outcome)
    }

    fn delete_in(inner: &mut Inner, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        let removed = inner.by_id.remove(&id);
        inner.credits.remove(&id);
        if let Some(record) = &removed {
            inner.feed.push(StoreChange::Key(id));
            inner.by_digest.remove(&record.digest);
            for (_, digest) in inner.added.remove(&id).unwrap_or_default() {
                inner.by_digest.remove(&digest);
            }
        }
        Ok(removed)
    }
}

/// One lease from a balance, as the SQL stores' lease statement takes it: a refill due at
/// `now` first sets the balance to the refill amount.
fn lease_from(
    balance: &mut super::Credits,
    state: &mut CreditState,
    need: u64,
    want: u64,
    now: OffsetDateTime,
) -> CreditLease {
    let interval = balance
        .refill
        .map(|r| i64::try_from(r.interval_millis()).unwrap_or(i64::MAX));
    if let (Some(refill), Some(ms)) = (balance.refill, interval) {
        let period = refill_period(unix_millis(now), state.anchor_ms, ms, state.period);
        if period > state.period {
            state.period = period;
            balance.remaining = refill.amount();
        }
    }
    let granted = CreditLease::grant(balance.remaining, need, want);
    balance.remaining -= granted;
    CreditLease {
        granted,
        remaining: balance.remaining,
        period: state.period,
        generation: state.generation,
        period_ends_at: interval.and_then(|ms| period_end(state.anchor_ms, ms, state.period)),
    }
}

impl MemoryStore {
    /// Puts an owner's new limits on its keys' records and feeds each: the keys changed.
    fn owner_changed(
        inner: &mut Inner,
        collection: &str,
        subject: &str,
        limits: OwnerLimits,
    ) -> Vec<Uuid> {
        let mut keys = Vec::new();
        for record in inner.by_id.values_mut() {
            if record.collection == collection && record.subject == subject {
                record.owner = limits;
                keys.push(record.id);
            }
        }
        for id in &keys {
            inner.feed.push(StoreChange::Key(*id));
        }
        keys
    }
}

#[async_trait]
impl WebhookStore for MemoryStore {
    async fn insert_webhook(&self, record: &WebhookRecord) -> Result<(), StoreError> {
        let mut inner = self.write();
        if inner.webhooks.contains_key(&record.id) {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                "a webhook with this id exists",
            ));
        }
        inner.webhooks.insert(record.id, record.clone());
        Ok(())
    }

    async fn list_webhooks(&self) -> Result<Vec<WebhookRecord>, StoreError> {
        Ok(self.read().webhooks.values().cloned().collect())
    }

    async fn get_webhook(&self, id: Uuid) -> Result<Option<WebhookRecord>, StoreError> {
        Ok(self.read().webhooks.get(&id).cloned())
    }

    async fn update_webhook(
        &self,
        id: Uuid,
        patch: &WebhookPatch,
    ) -> Result<Option<WebhookRecord>, StoreError> {
        let mut inner = self.write();
        Ok(inner.webhooks.get_mut(&id).map(|record| {
            patch.apply_to(record);
            record.clone()
        }))
    }

    async fn delete_webhook(&self, id: Uuid) -> Result<Option<WebhookRecord>, StoreError> {
        Ok(self.write().webhooks.remove(&id))
    }

    async fn lease_webhook(
        &self,
        id: Uuid,
        owner: Uuid,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Option<WebhookRecord>, StoreError> {
        let mut inner = self.write();
        let Some(record) = inner.webhooks.get_mut(&id) else {
            return Ok(None);
        };
        let free = record.lease_owner == Some(owner) || record.lease_until.is_none_or(|u| u <= now);
        if !free {
            return Ok(None);
        }
        record.lease_owner = Some(owner);
        record.lease_until = Some(until);
        Ok(Some(record.clone()))
    }

    async fn record_webhook_progress(
        &self,
        id: Uuid,
        owner: Uuid,
        progress: &WebhookProgress,
    ) -> Result<bool, StoreError> {
        let mut inner = self.write();
        match inner.webhooks.get_mut(&id) {
            Some(record) if record.lease_owner == Some(owner) => {
                record.cursor = progress.cursor;
                record.expiring_cursor = progress.expiring_cursor;
                record.attempts = progress.attempts;
                record.next_attempt_at = progress.next_attempt_at;
                record.last_error.clone_from(&progress.last_error);
                record.failing_since = progress.failing_since;
                record.lease_until = Some(progress.lease_until);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
