//! Owner policies through the manager: validated, audited, and every instance told to re-read
//! the owner's keys.

use super::policy::validate_owner;
use super::{KeyManager, ManageError, ManageErrorKind};
use crate::audit::AuditAction;
use serde_json::{json, Map, Value};

use crate::ratelimit::RateLimitPolicy;
use crate::store::{Credits, KeyQuery, OwnerPolicy, OwnerPolicyUpdate};

impl KeyManager {
    /// The policy `subject`'s keys in `collection` share, if the owner has one.
    ///
    /// # Errors
    /// [`ManageErrorKind::Store`].
    pub async fn owner_policy(
        &self,
        collection: &str,
        subject: &str,
    ) -> Result<Option<OwnerPolicy>, ManageError> {
        Ok(self.store().owner_policy(collection, subject).await?)
    }

    /// Every owner policy, of one collection or all, ordered by collection and subject.
    ///
    /// # Errors
    /// [`ManageErrorKind::Store`].
    pub async fn owner_policies(
        &self,
        collection: Option<&str>,
    ) -> Result<Vec<OwnerPolicy>, ManageError> {
        Ok(self.store().list_owner_policies(collection).await?)
    }

    /// Creates or changes the policy all of `subject`'s keys in `collection` share: a rate
    /// limit and/or credits, counted on top of each key's own. Takes effect on every instance
    /// as a key change does (the owner's keys are re-read). Setting credits voids what
    /// instances hold leased of the old ones. An update that leaves nothing to limit removes
    /// the policy (like [`delete_owner_policy`](Self::delete_owner_policy)) and answers an
    /// empty one.
    ///
    /// # Errors
    /// [`ManageErrorKind::Invalid`] for a bad collection, subject or credits (with
    /// [`ManageError::field`]), [`ManageErrorKind::UnknownCollection`] for a collection none
    /// of the manager's layers serves, [`ManageErrorKind::ReadOnly`] for a foreign one, or
    /// [`ManageErrorKind::Store`].
    pub async fn set_owner_policy(
        &self,
        collection: &str,
        subject: &str,
        update: OwnerPolicyUpdate,
    ) -> Result<OwnerPolicy, ManageError> {
        validate_owner(collection, subject, &update)?;
        self.check_owner_collection(collection)?;
        let before = self.store().owner_policy(collection, subject).await?;
        let (old_rate, old_credits) = before
            .as_ref()
            .map_or((None, None), |b| (b.rate_limit, b.credits));
        let new_credits = if update.changes_credits() {
            update.apply_credits(old_credits)
        } else {
            old_credits
        };
        if update.rate_limit.unwrap_or(old_rate).is_none() && new_credits.is_none() {
            // Nothing left to limit: the policy goes (audited as a deletion), or is never made.
            if before.is_some() {
                match self.delete_owner_policy(collection, subject).await {
                    Ok(_) => {}
                    Err(error) if error.kind() == ManageErrorKind::NotFound => {}
                    Err(error) => return Err(error),
                }
            }
            return Ok(OwnerPolicy {
                collection: collection.to_owned(),
                subject: subject.to_owned(),
                rate_limit: None,
                credits: None,
                updated_at: self.now(),
            });
        }
        let mut details = owner_details(collection, subject);
        if let Some(rate_limit) = update.rate_limit {
            change(
                &mut details,
                "rate_limit",
                rate_text(old_rate),
                rate_text(rate_limit),
            );
        }
        if update.changes_credits() {
            change(
                &mut details,
                "credits",
                old_credits.map(|c| c.remaining).into(),
                new_credits.map(|c| c.remaining).into(),
            );
            change(
                &mut details,
                "refill",
                refill_text(old_credits),
                refill_text(new_credits),
            );
        }
        self.record_event(AuditAction::OwnerUpdated, details)
            .await?;
        let policy = self
            .store()
            .set_owner_policy(collection, subject, &update, self.now())
            .await?;
        self.invalidate_owner(collection, subject).await;
        tracing::info!(target: "keywarden", collection, subject, "owner policy set");
        Ok(policy)
    }

    /// Removes an owner's policy and its credits: its keys are limited by their own limits
    /// (and their collection's [`owner_rate_limit`](crate::Collection::owner_rate_limit))
    /// again.
    ///
    /// # Errors
    /// [`ManageErrorKind::NotFound`] when the owner has no policy, or
    /// [`ManageErrorKind::Store`].
    pub async fn delete_owner_policy(
        &self,
        collection: &str,
        subject: &str,
    ) -> Result<OwnerPolicy, ManageError> {
        let Some(before) = self.owner_policy(collection, subject).await? else {
            return Err(no_policy());
        };
        let mut details = owner_details(collection, subject);
        change(
            &mut details,
            "rate_limit",
            rate_text(before.rate_limit),
            Value::Null,
        );
        change(
            &mut details,
            "credits",
            before.credits.map(|c| c.remaining).into(),
            Value::Null,
        );
        change(
            &mut details,
            "refill",
            refill_text(before.credits),
            Value::Null,
        );
        self.record_event(AuditAction::OwnerDeleted, details)
            .await?;
        let removed = self
            .store()
            .delete_owner_policy(collection, subject)
            .await?
            .ok_or_else(no_policy)?;
        self.invalidate_owner(collection, subject).await;
        tracing::info!(target: "keywarden", collection, subject, "owner policy deleted");
        Ok(removed)
    }

    /// Tells this process's layers and the publishers about every key of an owner. The
    /// built-in stores feed the keys themselves; this is the fast path.
    async fn invalidate_owner(&self, collection: &str, subject: &str) {
        let mut query = KeyQuery {
            collection: Some(collection.to_owned()),
            subject: Some(subject.to_owned()),
            limit: KeyQuery::MAX_LIMIT,
            ..KeyQuery::new()
        };
        loop {
            let page = match self.store().list(&query).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(target: "keywarden", %error, "listing an owner's keys to drop them from caches failed; the change feed and the cache TTL bound the delay");
                    return;
                }
            };
            for record in &page.items {
                self.invalidate_id(record.id).await;
            }
            match page.next_cursor {
                Some(next) => query.after = Some(next),
                None => return,
            }
        }
    }

    fn check_owner_collection(&self, collection: &str) -> Result<(), ManageError> {
        if let Some(issuer) = self
            .layers()
            .iter()
            .find_map(|layer| layer.foreign_issuer(collection))
        {
            return Err(ManageError {
                kind: ManageErrorKind::ReadOnly,
                field: Some("collection"),
                message: format!(
                    "collection `{collection}` holds keys issued by {issuer}; keywarden keeps no owner policies for it"
                ),
                source: None,
                unmigrated: Vec::new(),
            });
        }
        self.check_served(collection)
    }
}

/// `{"from": …, "to": …}` under `field`, when the value changes.
fn change(details: &mut Map<String, Value>, field: &str, from: Value, to: Value) {
    if from != to {
        details.insert(field.into(), json!({ "from": from, "to": to }));
    }
}

fn rate_text(rate: Option<RateLimitPolicy>) -> Value {
    rate.map(|r| r.to_string()).into()
}

fn refill_text(credits: Option<Credits>) -> Value {
    credits.and_then(|c| c.refill).map(|r| r.to_string()).into()
}

fn owner_details(collection: &str, subject: &str) -> Map<String, Value> {
    let mut details = Map::new();
    details.insert("collection".into(), collection.into());
    details.insert("subject".into(), subject.into());
    details
}

fn no_policy() -> ManageError {
    ManageError {
        kind: ManageErrorKind::NotFound,
        field: None,
        message: "this owner has no policy".into(),
        source: None,
        unmigrated: Vec::new(),
    }
}
