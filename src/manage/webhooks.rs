//! Webhook subscriptions through the [`KeyManager`] (feature `webhooks`); delivery is
//! [`WebhookDeliverer`](crate::webhooks::WebhookDeliverer)'s.

use time::OffsetDateTime;
use uuid::Uuid;

use super::policy::check_free_text;
use super::{KeyManager, ManageError, ManageErrorKind};
use crate::audit::AuditAction;
use crate::store::{WebhookPatch, WebhookRecord, WebhookStore};
use crate::webhooks::{check_events, generate_secret, CreatedWebhook, SecretSeal, WebhookView};

/// The longest description accepted.
const MAX_DESCRIPTION_LEN: usize = 1024;

/// A new subscription: where, and which events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWebhook {
    /// Where events are POSTed (`https`, within the manager's
    /// [`WebhookTargets`](crate::webhooks::WebhookTargets)).
    pub url: String,
    /// Event types (see [`crate::webhooks::event_types`]) or `*`.
    pub events: Vec<String>,
    /// Optional description.
    pub description: Option<String>,
}

impl NewWebhook {
    /// A subscription of `url` to `events`.
    pub fn new<I, S>(url: impl Into<String>, events: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            url: url.into(),
            events: events.into_iter().map(Into::into).collect(),
            description: None,
        }
    }
}

fn no_webhooks() -> ManageError {
    ManageError::invalid("webhooks", "this key store keeps no webhooks")
        .with_kind(ManageErrorKind::Store)
}

/// What an audit event says of a subscription: its id, the URL's host (never its path or
/// query, which may hold the receiver's token) and its events.
fn details(
    id: Uuid,
    url: Option<&str>,
    events: Option<&[String]>,
    disabled: Option<bool>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    map.insert("webhook_id".into(), id.to_string().into());
    if let Some(host) = url
        .and_then(|url| reqwest::Url::parse(url).ok())
        .and_then(|url| url.host_str().map(str::to_owned))
    {
        map.insert("host".into(), host.into());
    }
    if let Some(events) = events {
        map.insert("events".into(), events.to_vec().into());
    }
    if let Some(disabled) = disabled {
        map.insert("disabled".into(), disabled.into());
    }
    map
}

fn webhook_not_found(id: Uuid) -> ManageError {
    ManageError::not_found(id).with_message(format!("no webhook with id {id}"))
}

impl KeyManager {
    fn webhook_store(&self) -> Result<&dyn WebhookStore, ManageError> {
        self.store().webhooks().ok_or_else(no_webhooks)
    }

    fn check_webhook(
        &self,
        url: Option<&str>,
        events: Option<&[String]>,
        description: Option<&str>,
    ) -> Result<(), ManageError> {
        if let Some(url) = url {
            self.webhook_targets()
                .check(url)
                .map_err(|reason| ManageError::invalid("url", reason))?;
        }
        if let Some(events) = events {
            check_events(events).map_err(|reason| ManageError::invalid("events", reason))?;
        }
        if description.is_some_and(|d| d.len() > MAX_DESCRIPTION_LEN) {
            return Err(ManageError::invalid(
                "description",
                format!("at most {MAX_DESCRIPTION_LEN} bytes"),
            ));
        }
        check_free_text(description, None)
    }

    /// Subscribes a URL to events from now on, and returns its signing secret, once.
    ///
    /// # Errors
    /// [`ManageErrorKind::Invalid`] for a URL outside the
    /// [webhook targets](Self::with_webhook_targets), unknown event types or a bad
    /// description; [`ManageErrorKind::Store`].
    pub async fn create_webhook(&self, new: NewWebhook) -> Result<CreatedWebhook, ManageError> {
        self.check_webhook(
            Some(&new.url),
            Some(&new.events),
            new.description.as_deref(),
        )?;
        let hooks = self.webhook_store()?;
        let id = Uuid::now_v7();
        let (secret, text) = generate_secret();
        let record = WebhookRecord {
            id,
            url: new.url,
            events: new.events,
            description: new.description,
            sealed_secret: SecretSeal::new(&self.ring).seal(id, &secret),
            disabled: false,
            created_at: self.now(),
            cursor: 0,
            // Keys already inside the lead time are announced at the first round.
            expiring_cursor: OffsetDateTime::UNIX_EPOCH,
            attempts: 0,
            next_attempt_at: None,
            last_error: None,
            failing_since: None,
            lease_owner: None,
            lease_until: None,
        };
        // The event first: a subscription whose creation cannot be recorded is not made. It
        // receives the events after its own creation (not the history).
        let mut record = record;
        record.cursor = self
            .record_event(
                AuditAction::WebhookCreated,
                details(id, Some(&record.url), Some(&record.events), None),
            )
            .await?;
        if record.cursor == 0 {
            record.cursor = self.store().audit_head().await.map_or(0, |head| head.seq);
        }
        hooks.insert_webhook(&record).await?;
        tracing::info!(target: "keywarden", webhook_id = %id, "webhook created");
        Ok(CreatedWebhook {
            webhook: WebhookView::from(&record),
            secret: text.to_string(),
        })
    }

    /// Every subscription, with its delivery state.
    ///
    /// # Errors
    /// [`ManageErrorKind::Store`].
    pub async fn list_webhooks(&self) -> Result<Vec<WebhookView>, ManageError> {
        let hooks = self.webhook_store()?;
        Ok(hooks
            .list_webhooks()
            .await?
            .iter()
            .map(WebhookView::from)
            .collect())
    }

    /// One subscription.
    ///
    /// # Errors
    /// [`ManageErrorKind::NotFound`], [`ManageErrorKind::Store`].
    pub async fn get_webhook(&self, id: Uuid) -> Result<WebhookView, ManageError> {
        let hooks = self.webhook_store()?;
        hooks
            .get_webhook(id)
            .await?
            .map(|r| WebhookView::from(&r))
            .ok_or_else(|| webhook_not_found(id))
    }

    /// Changes a subscription (URL, events, description; `disabled` pauses it, and resuming
    /// retries at once).
    ///
    /// # Errors
    /// As [`create_webhook`](Self::create_webhook); [`ManageErrorKind::NotFound`].
    pub async fn update_webhook(
        &self,
        id: Uuid,
        patch: WebhookPatch,
    ) -> Result<WebhookView, ManageError> {
        if patch == WebhookPatch::default() {
            return Err(ManageError::invalid(
                "body",
                "nothing to change: give a url, events, description or disabled",
            ));
        }
        self.check_webhook(
            patch.url.as_deref(),
            patch.events.as_deref(),
            patch.description.as_ref().and_then(Option::as_deref),
        )?;
        let hooks = self.webhook_store()?;
        hooks
            .get_webhook(id)
            .await?
            .ok_or_else(|| webhook_not_found(id))?;
        let mut changed = details(
            id,
            patch.url.as_deref(),
            patch.events.as_deref(),
            patch.disabled,
        );
        if patch.description.is_some() {
            changed.insert("description".into(), "changed".into());
        }
        self.record_event(AuditAction::WebhookUpdated, changed)
            .await?;
        let record = hooks
            .update_webhook(id, &patch)
            .await?
            .ok_or_else(|| webhook_not_found(id))?;
        tracing::info!(target: "keywarden", webhook_id = %id, "webhook updated");
        Ok(WebhookView::from(&record))
    }

    /// Deletes a subscription (events not yet delivered are not sent).
    ///
    /// # Errors
    /// [`ManageErrorKind::NotFound`], [`ManageErrorKind::Store`].
    pub async fn delete_webhook(&self, id: Uuid) -> Result<WebhookView, ManageError> {
        let hooks = self.webhook_store()?;
        let existing = hooks
            .get_webhook(id)
            .await?
            .ok_or_else(|| webhook_not_found(id))?;
        self.record_event(
            AuditAction::WebhookDeleted,
            details(id, Some(&existing.url), Some(&existing.events), None),
        )
        .await?;
        let record = hooks
            .delete_webhook(id)
            .await?
            .ok_or_else(|| webhook_not_found(id))?;
        tracing::info!(target: "keywarden", webhook_id = %id, "webhook deleted");
        Ok(WebhookView::from(&record))
    }
}
