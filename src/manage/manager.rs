//! The [`KeyManager`]: creates and manages keys, and keeps the caches of the layers it knows
//! in step with every change.

use std::fmt;
use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use super::policy::{validate_new, validate_patch, ExpiresIn};
use super::reveal::{self, RevealKey, RevealKeyRing, RevealLimiter};
use super::{ManageError, ManageErrorKind};
use crate::audit::{
    Actor, AuditAction, AuditPage, AuditQuery, AuditSealer, AuditVerification, AuditVerifier,
    ChangeContext,
};
use crate::clock::{Clock, SystemClock};
use crate::invalidation::{Invalidation, InvalidationPublisher};
use crate::key::{ApiKey, KeyFormat};
use crate::layer::ApiKeyLayer;
use crate::net::IpNetwork;
use crate::ratelimit::RateLimitPolicy;
use crate::secret::{SecretId, SecretRing};
use crate::store::{
    AuditWrite, ChangeOutcome, Credits, KeyChange, KeyPage, KeyPatch, KeyQuery, KeyRecord,
    KeyState, KeyStore, OwnerKind, Refill, SecretRetirement, StoreError, UnmigratedKeys,
};

/// Beyond this many keys a secret retirement drops whole caches rather than key by key.
const MAX_KEY_INVALIDATIONS: usize = 256;

/// What a new key should be. Only a name and a subject are required.
#[derive(Debug, Clone, PartialEq)]
pub struct NewKey {
    /// Human-readable name.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// Collection; `None` (the default) files the key under the manager's
    /// [`default_collection`](KeyManager::default_collection).
    pub collection: Option<String>,
    /// Owner id.
    pub subject: String,
    /// Owner kind (default user).
    pub owner_kind: OwnerKind,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Read-only: safe methods only.
    pub read_only: bool,
    /// Environment: picks the key prefix (default `live`).
    pub environment: String,
    /// Lifetime (default unlimited).
    pub expires_in: ExpiresIn,
    /// Metadata: a JSON object (default empty).
    pub metadata: serde_json::Value,
    /// Per-key rate limit.
    pub rate_limit: Option<RateLimitPolicy>,
    /// The networks the key may be used from (default empty: anywhere); at most 64.
    pub allowed_ips: Vec<IpNetwork>,
    /// Credits: uses in total, optionally refilled (default `None`: unlimited).
    pub credits: Option<Credits>,
}

impl NewKey {
    /// A key named `name` owned by `subject`, with the defaults.
    pub fn new(name: impl Into<String>, subject: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: None,
            collection: None,
            subject: subject.into(),
            owner_kind: OwnerKind::User,
            scopes: Vec::new(),
            read_only: false,
            environment: "live".into(),
            expires_in: ExpiresIn::Unlimited,
            metadata: serde_json::Value::Object(Default::default()),
            rate_limit: None,
            allowed_ips: Vec::new(),
            credits: None,
        }
    }

    /// Gives the key `credits` uses in total (each accepted request costs one, or its
    /// [`Cost`](crate::Cost)); at 0 it gets `usage_exceeded`. Keeps a refill set before.
    #[must_use]
    pub fn credits(mut self, credits: u64) -> Self {
        let refill = self.credits.and_then(|c| c.refill);
        self.credits = Some(Credits {
            remaining: credits,
            refill,
        });
        self
    }

    /// Refills the key's credits (the balance is set to the refill's amount each period).
    /// A key given a refill but no [`credits`](Self::credits) starts with the refill's amount.
    #[must_use]
    pub fn refill(mut self, refill: Refill) -> Self {
        let remaining = self.credits.map_or(refill.amount(), |c| c.remaining);
        self.credits = Some(Credits {
            remaining,
            refill: Some(refill),
        });
        self
    }

    /// Sets the description.
    #[must_use]
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Sets the collection.
    #[must_use]
    pub fn collection(mut self, collection: impl Into<String>) -> Self {
        self.collection = Some(collection.into());
        self
    }

    /// Sets the owner kind.
    #[must_use]
    pub fn owner_kind(mut self, kind: OwnerKind) -> Self {
        self.owner_kind = kind;
        self
    }

    /// Adds a scope.
    #[must_use]
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scopes.push(scope.into());
        self
    }

    /// Makes the key read-only.
    #[must_use]
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets the environment (`live`, `test`, ...).
    #[must_use]
    pub fn environment(mut self, env: impl Into<String>) -> Self {
        self.environment = env.into();
        self
    }

    /// Sets the lifetime.
    #[must_use]
    pub fn expires_in(mut self, expires_in: ExpiresIn) -> Self {
        self.expires_in = expires_in;
        self
    }

    /// Sets the metadata (a JSON object).
    #[must_use]
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets a per-key rate limit.
    #[must_use]
    pub fn rate_limit(mut self, policy: RateLimitPolicy) -> Self {
        self.rate_limit = Some(policy);
        self
    }

    /// Adds a network the key may be used from. A key with none may be used from anywhere;
    /// with some, requests from elsewhere get `ip_not_allowed`.
    #[must_use]
    pub fn allow_ip(mut self, network: IpNetwork) -> Self {
        self.allowed_ips.push(network);
        self
    }
}

/// A key just created: the only time its plaintext exists.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The plaintext key. Show it once; it cannot be recovered.
    pub key: ApiKey,
    /// The stored record.
    pub record: KeyRecord,
}

/// Creates and manages keys. Every change that affects verification drops the key from the
/// caches of the layers it was told about, immediately.
///
/// Every change is written with its [audit event](crate::audit), in one transaction, naming
/// the manager's [`ChangeContext`] (its actor, by default [`Actor::application`]; set one
/// with [`with_actor`](Self::with_actor) or, per request, [`acting_as`](Self::acting_as)).
#[derive(Clone)]
pub struct KeyManager {
    store: Arc<dyn KeyStore>,
    pub(super) ring: SecretRing,
    format: KeyFormat,
    clock: Arc<dyn Clock>,
    layers: Vec<ApiKeyLayer>,
    publishers: Vec<Arc<dyn InvalidationPublisher>>,
    pub(super) reveal: Option<RevealKeyRing>,
    pub(super) reveal_limiter: Arc<RevealLimiter>,
    /// Seals audit events; `None` after [`without_audit_log`](Self::without_audit_log).
    audit: Option<AuditSealer>,
    /// Who the changes are recorded as made by.
    context: ChangeContext,
    /// Where webhooks may point.
    #[cfg(feature = "webhooks")]
    webhook_targets: crate::webhooks::WebhookTargets,
    /// The rate limit of keys without their own, where the keys are verified.
    default_rate_limit: Option<RateLimitPolicy>,
}

impl fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyManager")
            .field("store", &self.store)
            .field("secrets", &self.ring)
            .field("format", &self.format)
            .field("reveal_keys", &self.reveal)
            .field("reveal_limit", &self.reveal_limiter)
            .field("default_rate_limit", &self.default_rate_limit)
            .field("audit_log", &self.audit.is_some())
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl KeyManager {
    /// A manager over `store`, digesting with `secrets`, default key format, system clock,
    /// no default rate limit.
    pub fn new(store: Arc<dyn KeyStore>, secrets: SecretRing) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        Self {
            store,
            ring: secrets.clone(),
            format: KeyFormat::default(),
            reveal_limiter: Arc::new(RevealLimiter::new(
                reveal::default_reveal_limit(),
                clock.clone(),
            )),
            audit: Some(AuditSealer::new(&secrets)),
            context: ChangeContext::default(),
            #[cfg(feature = "webhooks")]
            webhook_targets: crate::webhooks::WebhookTargets::any(),
            clock,
            layers: Vec::new(),
            publishers: Vec::new(),
            reveal: None,
            default_rate_limit: None,
        }
    }

    /// A manager sharing the layer's store, secrets, key format, clock and default rate
    /// limit, that invalidates the layer's cache on every change.
    pub fn for_layer(layer: &ApiKeyLayer) -> Self {
        Self {
            store: layer.store().clone(),
            ring: layer.secrets().clone(),
            format: layer.key_format().clone(),
            reveal_limiter: Arc::new(RevealLimiter::new(
                reveal::default_reveal_limit(),
                layer.clock(),
            )),
            audit: Some(AuditSealer::new(layer.secrets())),
            context: ChangeContext::default(),
            #[cfg(feature = "webhooks")]
            webhook_targets: crate::webhooks::WebhookTargets::any(),
            clock: layer.clock(),
            layers: vec![layer.clone()],
            publishers: Vec::new(),
            reveal: None,
            default_rate_limit: layer.default_rate_limit(),
        }
    }

    /// Sets the rate limit that applies to keys without their own: the
    /// [`default_rate_limit`](crate::ApiKeyLayerBuilder::default_rate_limit) of the layer that
    /// verifies them ([`for_layer`](Self::for_layer) takes it from its layer). The
    /// management API (`management_router`) compares effective limits (a key's own,
    /// else this one), so a `keys:self` caller cannot escape the default by creating or
    /// patching a key without a limit, or with a looser one.
    #[must_use]
    pub fn with_default_rate_limit(mut self, policy: Option<RateLimitPolicy>) -> Self {
        self.default_rate_limit = policy;
        self
    }

    /// The rate limits of keys without their own wherever this manager's keys are verified:
    /// the one set with [`with_default_rate_limit`](Self::with_default_rate_limit) and each
    /// invalidated layer's default. Never empty (`[None]`: unlimited everywhere).
    #[cfg(feature = "manage-api")]
    pub(crate) fn default_rate_limits(&self) -> Vec<Option<RateLimitPolicy>> {
        let mut defaults: Vec<Option<RateLimitPolicy>> = self
            .layers
            .iter()
            .map(ApiKeyLayer::default_rate_limit)
            .collect();
        if self.default_rate_limit.is_some() || defaults.is_empty() {
            defaults.push(self.default_rate_limit);
        }
        defaults.dedup();
        defaults
    }

    /// The address of a request's client as the first layer reads it (trusted proxies
    /// included), else the connection's.
    #[cfg(feature = "manage-api")]
    pub(crate) fn client_address(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Option<std::net::IpAddr> {
        self.layers
            .first()
            .map(ApiKeyLayer::client_address_source)
            .cloned()
            .unwrap_or_default()
            .address(headers, extensions)
    }

    /// Whether `collection` is one of the layers' foreign (Payload CMS, Strapi) collections.
    #[cfg(feature = "manage-api")]
    pub(crate) fn is_foreign_collection(&self, collection: &str) -> bool {
        self.layers
            .iter()
            .any(|layer| layer.foreign_issuer(collection).is_some())
    }

    /// The native collections of the layers this manager invalidates, each once, in the
    /// order configured; `None` when keys of any collection verify somewhere (no layer, or a
    /// layer without collections).
    /// [`ManageErrorKind::UnknownCollection`] for a collection none of the manager's layers
    /// serves (its keys would never verify).
    pub(super) fn check_served(&self, collection: &str) -> Result<(), ManageError> {
        let Some(served) = self
            .served_collections()
            .filter(|served| !served.contains(&collection))
        else {
            return Ok(());
        };
        // The name is submitted text (maybe a key pasted in the wrong field): never
        // repeat it; the configured ones are safe to list.
        Err(ManageError {
            kind: ManageErrorKind::UnknownCollection,
            field: Some("collection"),
            message: format!(
                "no layer serves this collection, so its keys would never verify; \
                 collections served: {}",
                if served.is_empty() {
                    "none (only foreign ones)".to_owned()
                } else {
                    served.join(", ")
                }
            ),
            source: None,
            unmigrated: Vec::new(),
        })
    }

    /// The layers whose caches the manager keeps current.
    pub(super) fn layers(&self) -> &[ApiKeyLayer] {
        &self.layers
    }

    /// Drops a key from the layers' caches and tells the publishers.
    pub(super) async fn invalidate_id(&self, id: Uuid) {
        self.invalidate(id).await;
    }

    fn served_collections(&self) -> Option<Vec<&str>> {
        if self.layers.is_empty()
            || self
                .layers
                .iter()
                .any(|layer| layer.collection_slugs().next().is_none())
        {
            return None;
        }
        let mut served: Vec<&str> = Vec::new();
        for layer in &self.layers {
            for slug in layer.collection_slugs() {
                if layer.foreign_issuer(slug).is_none() && !served.contains(&slug) {
                    served.push(slug);
                }
            }
        }
        Some(served)
    }

    /// The collection of a [`NewKey`] that names none: the one native collection of the
    /// layers this manager invalidates when they have exactly one, `users` otherwise (and for
    /// a manager without layers, or whose layers accept any collection).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use keywarden::{ApiKeyLayer, Collection, KeyManager, MemoryStore, SecretRing};
    ///
    /// let secrets = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
    /// let layer = ApiKeyLayer::builder()
    ///     .store(Arc::new(MemoryStore::new()))
    ///     .secrets(secrets.clone())
    ///     .collection(Collection::new("customers"))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(KeyManager::for_layer(&layer).default_collection(), "customers");
    /// let plain = KeyManager::new(Arc::new(MemoryStore::new()), secrets);
    /// assert_eq!(plain.default_collection(), "users");
    /// ```
    pub fn default_collection(&self) -> &str {
        match self.served_collections().as_deref() {
            Some([only]) => only,
            _ => "users",
        }
    }

    /// Records changes as made by `actor` (the `keywarden` CLI uses [`Actor::Cli`]).
    #[must_use]
    pub fn with_actor(mut self, actor: Actor) -> Self {
        self.context = ChangeContext::new(actor);
        self
    }

    /// A manager like this one whose changes are recorded with `context`: the caller of one
    /// request (the management API makes one per request). Shares everything else, the
    /// reveal budget included.
    #[must_use]
    pub fn acting_as(&self, context: ChangeContext) -> Self {
        Self {
            context,
            ..self.clone()
        }
    }

    /// Restricts where webhooks may point (default: any `https` URL). See
    /// [`crate::webhooks`] on SSRF.
    #[cfg(feature = "webhooks")]
    #[must_use]
    pub fn with_webhook_targets(mut self, targets: crate::webhooks::WebhookTargets) -> Self {
        self.webhook_targets = targets;
        self
    }

    /// Where webhooks may point.
    #[cfg(feature = "webhooks")]
    pub fn webhook_targets(&self) -> &crate::webhooks::WebhookTargets {
        &self.webhook_targets
    }

    /// The context changes are recorded with.
    pub fn context(&self) -> &ChangeContext {
        &self.context
    }

    /// Makes changes without audit events, through the store's plain methods: only for a
    /// custom [`KeyStore`] that keeps no audit log (the built-in stores all keep one).
    /// Without this, such a store refuses every change ("keeps no audit log").
    #[must_use]
    pub fn without_audit_log(mut self) -> Self {
        self.audit = None;
        self
    }

    /// Also invalidates this layer's cache on changes.
    #[must_use]
    pub fn invalidates(mut self, layer: &ApiKeyLayer) -> Self {
        self.layers.push(layer.clone());
        self
    }

    /// Also tells other instances about every change, through `publisher` (for example a
    /// `RedisBackend` (feature `redis`) their
    /// [`InvalidationListener`](crate::invalidation::InvalidationListener)s subscribe to). A failed
    /// publish is logged, not returned: the change itself is already stored, and the other
    /// instances' cache TTL bounds how long they may miss it.
    #[must_use]
    pub fn publishes_to(mut self, publisher: impl InvalidationPublisher) -> Self {
        self.publishers.push(Arc::new(publisher));
        self
    }

    /// Sets the key format (prefixes per environment).
    #[must_use]
    pub fn with_key_format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// Turns on viewable keys: new keys are also stored AES-256-GCM-encrypted with this key
    /// and can be shown again with [`reveal`](Self::reveal). Off by default: a stolen database
    /// plus the reveal key yields every viewable key. A ring of one key; see
    /// [`with_reveal_keys`](Self::with_reveal_keys) to keep previous reveal keys.
    #[must_use]
    pub fn with_reveal_key(self, key: RevealKey) -> Self {
        self.with_reveal_keys(RevealKeyRing::new(key))
    }

    /// Turns on viewable keys with a ring of reveal keys: new keys are sealed under the
    /// current one, and keys sealed under a previous one still reveal (and are re-sealed under
    /// the current one when they do).
    #[must_use]
    pub fn with_reveal_keys(mut self, ring: RevealKeyRing) -> Self {
        self.reveal = Some(ring);
        self
    }

    /// Sets how many keys each [`Actor`](crate::manage::Actor) may reveal (default 10 a minute),
    /// counted in this process.
    #[must_use]
    pub fn with_reveal_limit(mut self, policy: RateLimitPolicy) -> Self {
        self.reveal_limiter = Arc::new(RevealLimiter::new(policy, self.clock.clone()));
        self
    }

    /// Sets the clock.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.reveal_limiter = Arc::new(self.reveal_limiter.with_clock(clock.clone()));
        self.clock = clock;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    pub(crate) fn now(&self) -> OffsetDateTime {
        // Stores keep microseconds; truncating here makes records roundtrip exactly.
        let now = self.clock.now();
        now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
            .unwrap_or(now)
    }

    /// Creates a key and returns its plaintext, once. A key without a collection is filed
    /// under the [`default_collection`](Self::default_collection).
    ///
    /// # Errors
    /// [`ManageErrorKind::Invalid`] for bad fields (with [`ManageError::field`]),
    /// [`ManageErrorKind::ReadOnly`] for a foreign (Payload CMS, Strapi) collection,
    /// [`ManageErrorKind::UnknownCollection`] for a collection none of the manager's layers
    /// serves, [`ManageErrorKind::Store`] if the store fails.
    pub async fn create(&self, new: NewKey) -> Result<CreatedKey, ManageError> {
        self.create_record(new, None).await
    }

    /// Stores a new key: a created one, or the successor of `rotated_from` (whose collection
    /// is not judged again: it is the old key's).
    async fn create_record(
        &self,
        new: NewKey,
        rotated_from: Option<Uuid>,
    ) -> Result<CreatedKey, ManageError> {
        let new = validate_new(new)?;
        let collection = new
            .collection
            .clone()
            .unwrap_or_else(|| self.default_collection().to_owned());
        if let Some(issuer) = self
            .layers
            .iter()
            .find_map(|layer| layer.foreign_issuer(&collection))
        {
            return Err(ManageError {
                kind: ManageErrorKind::ReadOnly,
                field: Some("collection"),
                message: format!(
                    "collection `{collection}` holds keys issued by {issuer}; create them in {issuer}"
                ),
                source: None,
                unmigrated: Vec::new(),
            });
        }
        if rotated_from.is_none() {
            self.check_served(&collection)?;
        }
        let prefix = self
            .format
            .prefix_for_env(&new.environment)
            .ok_or_else(|| {
                ManageError::invalid(
                    "environment",
                    format!(
                        "no key prefix for this environment (configured: {})",
                        self.format
                            .prefixes()
                            .iter()
                            .map(|p| p.environment())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        let now = self.now();
        let expires_at =
            match new.expires_in {
                ExpiresIn::Unlimited => None,
                ExpiresIn::After(lifetime) => Some(now.checked_add(lifetime).ok_or_else(|| {
                    ManageError::invalid("expires_in", "the lifetime is too long")
                })?),
                ExpiresIn::At(at) if at <= now => {
                    return Err(ManageError::invalid(
                        "expires_at",
                        "the expiry must be in the future",
                    ))
                }
                ExpiresIn::At(at) => Some(at),
            };
        let key = prefix.generate();
        let id = Uuid::now_v7();
        let record = KeyRecord {
            id,
            digest: self.ring.digest(key.expose().as_bytes()),
            secret_id: self.ring.current_id(),
            display_start: key.display_start(),
            name: new.name,
            description: new.description,
            collection,
            subject: new.subject,
            owner_kind: new.owner_kind,
            scopes: new.scopes,
            environment: new.environment,
            read_only: new.read_only,
            metadata: new.metadata,
            rate_limit: new.rate_limit,
            allowed_ips: new.allowed_ips,
            credits: new.credits,
            owner: crate::store::OwnerLimits::default(),
            created_at: now,
            updated_at: now,
            expires_at,
            last_used_at: None,
            use_count: 0,
            revoked_at: None,
            disabled: false,
            rotated_from,
            encrypted_key: self.reveal.as_ref().map(|r| r.seal(id, &key)),
        };
        self.apply(KeyChange::Insert(&record), None, None).await?;
        // A client may have tried this digest before it existed: drop the cached not-found.
        for layer in &self.layers {
            layer.invalidate_digest(&record.digest).await;
        }
        self.publish(Invalidation::Created).await;
        tracing::info!(target: "keywarden", key_id = %record.id, collection = %record.collection, "key created");
        Ok(CreatedKey { key, record })
    }

    /// The key with this id.
    ///
    /// # Errors
    /// [`ManageErrorKind::NotFound`] or [`ManageErrorKind::Store`].
    pub async fn get(&self, id: Uuid) -> Result<KeyRecord, ManageError> {
        self.store
            .get(id)
            .await?
            .ok_or_else(|| ManageError::not_found(id))
    }

    /// One page of keys.
    ///
    /// # Errors
    /// [`ManageErrorKind::Store`].
    pub async fn list(&self, query: &KeyQuery) -> Result<KeyPage, ManageError> {
        Ok(self.store.list(query).await?)
    }

    /// Applies a patch. With [`KeyPatch::expected_updated_at`] set, only if the key has not
    /// changed since that version was read (checked and written atomically by the store).
    ///
    /// # Errors
    /// [`ManageErrorKind::NotFound`], [`ManageErrorKind::Invalid`],
    /// [`ManageErrorKind::Conflict`] when the key changed since `expected_updated_at` (nothing
    /// was written; read it again and retry), or [`ManageErrorKind::Store`].
    pub async fn update(&self, id: Uuid, mut patch: KeyPatch) -> Result<KeyRecord, ManageError> {
        validate_patch(&mut patch)?;
        let record = self
            .apply_update(id, &patch, None, None)
            .await
            .map_err(ManageError::from_update)?
            .ok_or_else(|| ManageError::not_found(id))?;
        // The principal carries every field, name included: drop it from the caches.
        self.invalidate(id).await;
        tracing::info!(target: "keywarden", key_id = %id, "key updated");
        Ok(record)
    }

    /// Revokes a key, permanently.
    ///
    /// # Errors
    /// [`ManageErrorKind::NotFound`] or [`ManageErrorKind::Store`].
    pub async fn revoke(&self, id: Uuid) -> Result<KeyRecord, ManageError> {
        let patch = KeyPatch {
            revoked_at: Some(self.now()),
            ..KeyPatch::default()
        };
        let record = self
            .apply_update(id, &patch, None, None)
            .await?
            .ok_or_else(|| ManageError::not_found(id))?;
        self.invalidate(id).await;
        tracing::info!(target: "keywarden", key_id = %id, "key revoked");
        Ok(record)
    }

    /// Replaces a key with a new one of the same attributes and lifetime. The old key keeps
    /// working until `grace` has passed (or its own expiry, if sooner). `grace` is a
    /// [`time::Duration`] (the layer's builder takes `std::time::Duration`):
    /// `time::Duration::hours(24)`, or [`DEFAULT_GRACE`](super::DEFAULT_GRACE).
    ///
    /// # Errors
    /// [`ManageErrorKind::NotFound`], [`ManageErrorKind::Conflict`] for a revoked key,
    /// [`ManageErrorKind::Invalid`] for a negative grace, or [`ManageErrorKind::Store`].
    pub async fn rotate(&self, id: Uuid, grace: Duration) -> Result<CreatedKey, ManageError> {
        self.rotate_until(id, grace, None).await
    }

    /// [`rotate`](Self::rotate), with the new key expiring no later than `latest` (for a
    /// caller that may not create keys outliving itself).
    ///
    /// # Errors
    /// As [`rotate`](Self::rotate); also [`ManageErrorKind::Invalid`] if `latest` has passed,
    /// and [`ManageErrorKind::Conflict`] if the old key changed while it was being rotated
    /// (then no new key is left behind).
    pub async fn rotate_until(
        &self,
        id: Uuid,
        grace: Duration,
        latest: Option<OffsetDateTime>,
    ) -> Result<CreatedKey, ManageError> {
        self.rotate_checked(id, grace, latest, None).await
    }

    /// The key that replaced `old` in an earlier rotation, if any. Ids are time-ordered, so
    /// only the owner's keys made after `old` are read.
    async fn successor(
        &self,
        old: &KeyRecord,
        now: OffsetDateTime,
    ) -> Result<Option<Uuid>, ManageError> {
        let mut query = KeyQuery::new();
        query.collection = Some(old.collection.clone());
        query.subject = Some(old.subject.clone());
        query.now = now;
        query.after = Some(old.id);
        query.limit = KeyQuery::MAX_LIMIT;
        loop {
            let page = self.store.list(&query).await?;
            if let Some(next) = page.items.iter().find(|r| r.rotated_from == Some(old.id)) {
                return Ok(Some(next.id));
            }
            match page.next_cursor {
                Some(cursor) => query.after = Some(cursor),
                None => return Ok(None),
            }
        }
    }

    /// [`rotate_until`](Self::rotate_until) of the key version `checked` (its `updated_at`)
    /// a caller's checks read: a key changed since is a [`ManageErrorKind::Conflict`].
    pub(crate) async fn rotate_checked(
        &self,
        id: Uuid,
        grace: Duration,
        latest: Option<OffsetDateTime>,
        checked: Option<OffsetDateTime>,
    ) -> Result<CreatedKey, ManageError> {
        if grace.is_negative() {
            return Err(ManageError::invalid(
                "grace",
                "the grace period cannot be negative",
            ));
        }
        let old = self.get(id).await?;
        if checked.is_some_and(|version| version != old.updated_at) {
            return Err(ManageError::changed());
        }
        if old.revoked_at.is_some() {
            return Err(ManageError::conflict("a revoked key cannot be rotated"));
        }
        let now = self.now();
        if old.state(now) != KeyState::Active {
            return Err(ManageError::conflict(format!(
                "only active keys can be rotated; this key is {}",
                old.state(now).as_str()
            )));
        }
        if let Some(successor) = self.successor(&old, now).await? {
            // Its expiry is now the grace deadline, which a second successor would inherit as
            // its lifetime: it would expire silently with the first grace period.
            return Err(ManageError::conflict(format!(
                "this key was already rotated; rotate its successor {successor} instead"
            )));
        }
        let deadline = now
            .checked_add(grace)
            .ok_or_else(|| ManageError::invalid("grace", "the grace period is too long"))?;
        // The new key gets the old one's lifetime, counted from now; a lifetime too long to
        // count from now keeps the old key's absolute expiry instead.
        let lifetime = match old.expires_at {
            Some(at) => {
                let span = (at - old.created_at).max(Duration::seconds(1));
                match now.checked_add(span) {
                    Some(_) => ExpiresIn::After(span),
                    None => ExpiresIn::At(at),
                }
            }
            None => ExpiresIn::Unlimited,
        };
        let lifetime = match (latest, lifetime.expires_at(now)) {
            (Some(latest), _) if latest <= now => {
                return Err(ManageError::invalid(
                    "expires_at",
                    "the expiry limit has passed",
                ))
            }
            (Some(latest), None) => ExpiresIn::At(latest),
            (Some(latest), Some(at)) if at > latest => ExpiresIn::At(latest),
            _ => lifetime,
        };
        let new = NewKey {
            name: old.name.clone(),
            description: old.description.clone(),
            collection: Some(old.collection.clone()),
            subject: old.subject.clone(),
            owner_kind: old.owner_kind,
            scopes: old.scopes.clone(),
            read_only: old.read_only,
            environment: old.environment.clone(),
            expires_in: lifetime,
            metadata: old.metadata.clone(),
            rate_limit: old.rate_limit,
            allowed_ips: old.allowed_ips.clone(),
            // The balance moves to the new key: the old one spends no more (its leases are
            // voided), so the two never hold more than the key had.
            credits: old.credits,
        };
        let created = self.create_record(new, Some(id)).await?;
        let old_deadline = old.expires_at.map_or(deadline, |at| at.min(deadline));
        // The new key copies `old`: if the key changed meanwhile (revoked, tightened), the
        // copy is stale, and the rotation is undone below.
        let patch = KeyPatch {
            expires_at: Some(Some(old_deadline)),
            // Its refill too: otherwise both keys would be refilled through the grace period.
            credits: old.credits.map(|_| Some(0)),
            credit_refill: old.credits.map(|_| None),
            expected_updated_at: Some(old.updated_at),
            ..KeyPatch::default()
        };
        let mut successor = serde_json::Map::new();
        successor.insert("successor".into(), created.record.id.to_string().into());
        let ended = match self
            .apply_update(id, &patch, Some(AuditAction::Rotated), Some(successor))
            .await
        {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(ManageError::not_found(id)),
            Err(error) => Err(ManageError::from_update(error)),
        };
        if let Err(error) = ended {
            // Without the deadline the rotation did not happen: remove the new key, whose
            // plaintext the caller will never see.
            let undo = self
                .apply(KeyChange::Delete(created.record.id), None, None)
                .await;
            if let Err(cleanup) = undo {
                tracing::error!(
                    target: "keywarden",
                    key_id = %created.record.id,
                    error = %cleanup,
                    "rotation failed and its new key could not be removed; revoke it"
                );
            }
            return Err(error);
        }
        self.invalidate(id).await;
        tracing::info!(target: "keywarden", key_id = %id, new_key_id = %created.record.id, "key rotated");
        Ok(created)
    }

    /// Takes `amount` credits out of key `id`'s balance for good (none when it has fewer):
    /// what a `keys:self` caller gives a key it creates. Returns the lease (its `granted` is
    /// `amount`, or 0), or `None` for a key without credits.
    #[cfg(feature = "manage-api")]
    pub(crate) async fn take_credits(
        &self,
        id: Uuid,
        amount: u64,
    ) -> Result<Option<crate::store::CreditLease>, ManageError> {
        Ok(self
            .store
            .lease_credits(id, amount, amount, self.now())
            .await?)
    }

    /// Gives credits [`take_credits`](Self::take_credits) took back (a creation that failed).
    #[cfg(feature = "manage-api")]
    pub(crate) async fn untake_credits(&self, id: Uuid, lease: &crate::store::CreditLease) {
        if let Err(error) = self
            .store
            .return_credits(id, lease.granted, lease.generation, lease.period)
            .await
        {
            tracing::warn!(target: "keywarden", key_id = %id, error = %error, "credits taken for a key that was not created could not be given back");
        }
    }

    /// Deletes a key and returns its last record.
    ///
    /// # Errors
    /// [`ManageErrorKind::NotFound`] or [`ManageErrorKind::Store`].
    pub async fn delete(&self, id: Uuid) -> Result<KeyRecord, ManageError> {
        let ChangeOutcome::Deleted(record) = self.apply(KeyChange::Delete(id), None, None).await?
        else {
            unreachable!("a delete answers Deleted")
        };
        let record = record.ok_or_else(|| ManageError::not_found(id))?;
        self.invalidate(id).await;
        tracing::info!(target: "keywarden", key_id = %id, "key deleted");
        Ok(record)
    }

    /// Retires a previous secret: drops every digest made under `secret_id` from the store,
    /// once every instance runs a ring without it (until then, instances still holding only
    /// that secret verify keys by those digests). Keys keep verifying under the digests they
    /// gained from the newer secret on first use; the affected keys leave the caches of the
    /// layers this manager invalidates and of the instances it publishes to (PostgreSQL
    /// instances also hear it from the database).
    ///
    /// Keys that have no other digest (not used through an instance holding a newer secret
    /// since the rotation, and not revoked) would never verify again. With viewable keys on,
    /// the manager first gives each such key it can reveal a digest under its current secret.
    /// Any left make [`UnmigratedKeys::Refuse`] fail with nothing changed; use them once
    /// through an instance with the new ring, or pass [`UnmigratedKeys::Revoke`] to drop their
    /// digests anyway and revoke them.
    ///
    /// # Errors
    /// [`ManageErrorKind::CurrentSecret`] for the manager's current secret,
    /// [`ManageErrorKind::UnmigratedKeys`] (with [`ManageError::unmigrated_keys`]) as above,
    /// [`ManageErrorKind::ReadOnly`] or [`ManageErrorKind::Store`].
    pub async fn retire_secret(
        &self,
        secret_id: SecretId,
        unmigrated: UnmigratedKeys,
    ) -> Result<SecretRetirement, ManageError> {
        if secret_id == self.ring.current_id() {
            return Err(ManageError {
                kind: ManageErrorKind::CurrentSecret,
                field: Some("secret_id"),
                message: format!(
                    "secret {secret_id} is the current secret; rotate to a new one first"
                ),
                source: None,
                unmigrated: Vec::new(),
            });
        }
        let mut outcome = self.retire(secret_id, UnmigratedKeys::Refuse).await?;
        if !outcome.retired && self.reveal.is_some() {
            self.migrate_revealable(&outcome.unmigrated).await?;
            outcome = self.retire(secret_id, UnmigratedKeys::Refuse).await?;
        }
        if !outcome.retired && unmigrated == UnmigratedKeys::Revoke {
            outcome = self.retire(secret_id, UnmigratedKeys::Revoke).await?;
        }
        if !outcome.retired {
            let count = outcome.unmigrated.len();
            return Err(ManageError {
                kind: ManageErrorKind::UnmigratedKeys,
                field: None,
                message: format!(
                    "{count} key(s) have no digest under any other secret (not used through an \
                     instance with a newer secret since the rotation) and would never verify \
                     again; use them once through such an instance, or force the retirement to \
                     revoke them"
                ),
                source: None,
                unmigrated: outcome.unmigrated,
            });
        }
        if outcome.dropped == 0 && !self.ring.previous_ids().any(|id| id == secret_id) {
            // Nothing was stored under it and this ring does not know it: most likely a
            // mistyped id, which must not look like a finished retirement.
            return Err(ManageError {
                kind: ManageErrorKind::NotFound,
                field: Some("secret_id"),
                message: format!(
                    "no key has a digest under secret {secret_id}, and it is not a previous \
                     secret of this ring; check the id (`keywarden serve` prints the ring's ids)"
                ),
                source: None,
                unmigrated: Vec::new(),
            });
        }
        if outcome.affected.len() > MAX_KEY_INVALIDATIONS {
            for layer in &self.layers {
                layer.invalidate_all();
            }
            self.publish(Invalidation::All).await;
        } else {
            for &id in &outcome.affected {
                self.invalidate(id).await;
            }
        }
        tracing::info!(
            target: "keywarden",
            secret_id = %secret_id,
            dropped = outcome.dropped,
            keys = outcome.affected.len(),
            revoked = outcome.unmigrated.len(),
            "secret retired"
        );
        Ok(outcome)
    }

    /// Gives each of these keys whose plaintext the reveal key opens a digest under the
    /// current secret.
    async fn migrate_revealable(&self, ids: &[Uuid]) -> Result<(), ManageError> {
        let Some(reveal) = &self.reveal else {
            return Ok(());
        };
        for &id in ids {
            let Some(record) = self.store.get(id).await? else {
                continue;
            };
            let Some(key) = record
                .encrypted_key
                .as_deref()
                .and_then(|sealed| reveal.open(id, sealed))
            else {
                continue;
            };
            let digest = self.ring.digest(key.expose().as_bytes());
            if self
                .store
                .add_digest(id, &record.digest, &digest, self.ring.current_id())
                .await?
            {
                tracing::info!(target: "keywarden", key_id = %id, "re-digested a viewable key under the current secret");
            }
        }
        Ok(())
    }

    /// Makes a change with its audit event (in one transaction), or without one after
    /// [`without_audit_log`](Self::without_audit_log).
    async fn apply(
        &self,
        change: KeyChange<'_>,
        action: Option<AuditAction>,
        details: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<ChangeOutcome, StoreError> {
        self.apply_as(change, action, details, &self.context).await
    }

    /// Writes an event about no key (a webhook subscription's or an owner policy's change),
    /// before the change. Returns the event's number (0 without an audit log).
    pub(super) async fn record_event(
        &self,
        action: AuditAction,
        details: serde_json::Map<String, serde_json::Value>,
    ) -> Result<u64, StoreError> {
        let Some(sealer) = &self.audit else {
            return Ok(0);
        };
        let write = AuditWrite {
            sealer,
            context: &self.context,
            at: self.now(),
            action: Some(action),
            details: &details,
        };
        let applied = self.store.apply_audited(KeyChange::Event, &write).await?;
        Ok(applied.event.map_or(0, |e| e.seq))
    }

    pub(super) async fn apply_as(
        &self,
        change: KeyChange<'_>,
        action: Option<AuditAction>,
        details: Option<serde_json::Map<String, serde_json::Value>>,
        context: &ChangeContext,
    ) -> Result<ChangeOutcome, StoreError> {
        let Some(sealer) = &self.audit else {
            return Ok(match change {
                KeyChange::Insert(record) => {
                    self.store.insert(record).await?;
                    ChangeOutcome::Inserted
                }
                KeyChange::Update { id, patch, now } => {
                    ChangeOutcome::Updated(self.store.update(id, patch, now).await?)
                }
                KeyChange::Delete(id) => ChangeOutcome::Deleted(self.store.delete(id).await?),
                KeyChange::RetireSecret {
                    secret_id,
                    unmigrated,
                    now,
                } => ChangeOutcome::Retired(
                    self.store.retire_secret(secret_id, unmigrated, now).await?,
                ),
                KeyChange::Note(_) | KeyChange::Event => ChangeOutcome::Noted,
            });
        };
        let details = details.unwrap_or_default();
        let write = AuditWrite {
            sealer,
            context,
            at: self.now(),
            action,
            details: &details,
        };
        Ok(self.store.apply_audited(change, &write).await?.outcome)
    }

    async fn apply_update(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        action: Option<AuditAction>,
        details: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let now = self.now();
        match self
            .apply(KeyChange::Update { id, patch, now }, action, details)
            .await?
        {
            ChangeOutcome::Updated(record) => Ok(record),
            _ => unreachable!("an update answers Updated"),
        }
    }

    async fn retire(
        &self,
        secret_id: SecretId,
        unmigrated: UnmigratedKeys,
    ) -> Result<SecretRetirement, StoreError> {
        let now = self.now();
        let change = KeyChange::RetireSecret {
            secret_id,
            unmigrated,
            now,
        };
        match self.apply(change, None, None).await? {
            ChangeOutcome::Retired(outcome) => Ok(outcome),
            _ => unreachable!("a retirement answers Retired"),
        }
    }

    /// One page of the audit log, oldest first. Changes made with plain SQL (PostgreSQL) are
    /// sealed into the log first.
    ///
    /// # Errors
    /// [`ManageErrorKind::Store`], also when the store keeps no audit log.
    pub async fn audit(&self, query: &AuditQuery) -> Result<AuditPage, ManageError> {
        if let Some(sealer) = &self.audit {
            self.store.seal_pending_audit(sealer).await?;
        }
        Ok(self.store.audit_events(query).await?)
    }

    /// Checks the whole audit log, from its retention checkpoint (if events were pruned) to
    /// its last event: every event numbered after the one before and sealed over it under a
    /// secret of this manager's ring. Stops at the first break.
    ///
    /// # Errors
    /// [`ManageErrorKind::Store`], also when the store keeps no audit log or the manager was
    /// built [`without_audit_log`](Self::without_audit_log).
    pub async fn verify_audit(&self) -> Result<AuditVerification, ManageError> {
        let Some(sealer) = &self.audit else {
            return Err(crate::store::no_audit_log().into());
        };
        self.store.seal_pending_audit(sealer).await?;
        let checkpoint = self.store.audit_checkpoint().await?;
        let mut verification = AuditVerification {
            checked: 0,
            checkpoint: checkpoint.as_ref().map(|c| c.head),
            head: crate::audit::ChainHead::GENESIS,
            broken: None,
        };
        let mut verifier = match AuditVerifier::new(sealer, checkpoint.as_ref()) {
            Ok(verifier) => verifier,
            Err(broken) => {
                verification.broken = Some((0, broken));
                return Ok(verification);
            }
        };
        let mut query = AuditQuery {
            limit: AuditQuery::MAX_LIMIT,
            ..AuditQuery::default()
        };
        'pages: loop {
            let page = self.store.audit_events(&query).await?;
            for event in &page.items {
                if let Err(broken) = verifier.next(event) {
                    verification.broken = Some((event.seq, broken));
                    break 'pages;
                }
            }
            match page.next_cursor {
                Some(cursor) => query.after = Some(cursor),
                None => break,
            }
        }
        verification.checked = verifier.checked();
        verification.head = verifier.head();
        Ok(verification)
    }

    /// Deletes the audit events older than `retention` (by number: every event up to the
    /// last one dated before now − `retention`), leaving a sealed checkpoint so the rest
    /// stays verifiable. Checks the whole chain first and prunes nothing from a log that does
    /// not verify. Returns how many were deleted.
    ///
    /// # Errors
    /// [`ManageErrorKind::Invalid`] for a negative retention, [`ManageErrorKind::Conflict`]
    /// when the log does not verify, [`ManageErrorKind::Store`].
    pub async fn prune_audit(&self, retention: Duration) -> Result<u64, ManageError> {
        if retention.is_negative() {
            return Err(ManageError::invalid(
                "retention",
                "the retention cannot be negative",
            ));
        }
        let Some(sealer) = &self.audit else {
            return Err(crate::store::no_audit_log().into());
        };
        // The cut is chosen by the events' times: only from a chain that verifies, or an
        // edited time (or a forged pending row) could make it delete recent events and seal
        // a checkpoint over the damage.
        let verified = self.verify_audit().await?;
        if let Some((seq, why)) = verified.broken {
            return Err(ManageError::conflict(format!(
                "the audit log does not verify (event #{seq}: {why}); nothing was pruned"
            )));
        }
        let before = self
            .now()
            .checked_sub(retention)
            .ok_or_else(|| ManageError::invalid("retention", "the retention is too long"))?;
        Ok(self.store.prune_audit(before, sealer).await?)
    }

    async fn invalidate(&self, id: Uuid) {
        for layer in &self.layers {
            layer.invalidate_key(id);
        }
        self.publish(Invalidation::Key(id)).await;
    }

    async fn publish(&self, invalidation: Invalidation) {
        for publisher in &self.publishers {
            if let Err(error) = publisher.publish(&invalidation).await {
                tracing::warn!(target: "keywarden", %error, "other instances were not told about a key change; their cache TTL bounds the delay");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::manage::Actor;
    use crate::store::MemoryStore;

    fn manager() -> (KeyManager, ManualClock) {
        let clock = ManualClock::new(OffsetDateTime::now_utc());
        let ring = SecretRing::from_strs("manager-test-secret-0123456789abcdef", None).unwrap();
        let manager =
            KeyManager::new(Arc::new(MemoryStore::new()), ring).with_clock(Arc::new(clock.clone()));
        (manager, clock)
    }

    #[tokio::test]
    async fn create_stores_only_the_digest() {
        let (m, _) = manager();
        let created = m
            .create(NewKey::new("k", "u1").scope("b").scope("a").scope("a"))
            .await
            .unwrap();
        let stored = m.get(created.record.id).await.unwrap();
        assert_eq!(stored, created.record);
        assert_eq!(stored.scopes, vec!["a", "b"], "sorted and deduplicated");
        assert!(created.key.expose().starts_with(&stored.display_start));
        assert!(!format!("{stored:?}").contains(created.key.expose()));
    }

    #[tokio::test]
    async fn validation_names_the_field() {
        let (m, _) = manager();
        for (new, field) in [
            (NewKey::new("", "u"), "name"),
            (NewKey::new("n", ""), "subject"),
            (NewKey::new("n", "u").collection("has space"), "collection"),
            (NewKey::new("n", "u").scope(""), "scopes"),
            (NewKey::new("n", "u").environment("prod"), "environment"),
            (
                NewKey::new("n", "u").metadata(serde_json::json!([1])),
                "metadata",
            ),
        ] {
            let err = m.create(new).await.unwrap_err();
            assert_eq!(err.kind(), ManageErrorKind::Invalid);
            assert_eq!(err.field(), Some(field));
        }
    }

    #[tokio::test]
    async fn rotate_keeps_attributes_and_sets_grace() {
        let (m, clock) = manager();
        let old = m
            .create(
                NewKey::new("k", "u1")
                    .scope("s")
                    .expires_in(ExpiresIn::DAYS_30),
            )
            .await
            .unwrap();
        let new = m.rotate(old.record.id, Duration::hours(24)).await.unwrap();
        assert_eq!(new.record.rotated_from, Some(old.record.id));
        assert_eq!(new.record.scopes, old.record.scopes);
        assert_eq!(
            new.record.expires_at.unwrap() - new.record.created_at,
            Duration::days(30)
        );
        let old_now = m.get(old.record.id).await.unwrap();
        assert_eq!(old_now.expires_at, Some(m.now() + Duration::hours(24)));
        clock.advance(Duration::hours(25));
        assert_eq!(old_now.state(clock.now()), KeyState::Expired);
        m.revoke(old.record.id).await.unwrap();
        assert_eq!(
            m.rotate(old.record.id, Duration::ZERO)
                .await
                .unwrap_err()
                .kind(),
            ManageErrorKind::Conflict
        );
        assert_eq!(
            m.rotate(new.record.id, Duration::hours(-1))
                .await
                .unwrap_err()
                .kind(),
            ManageErrorKind::Invalid
        );
    }

    #[tokio::test]
    async fn viewable_keys_are_revealed_only_when_enabled() {
        let (plain, _) = manager();
        let created = plain.create(NewKey::new("k", "u")).await.unwrap();
        assert!(created.record.encrypted_key.is_none());
        let err = plain
            .reveal(created.record.id, &Actor::Cli)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::NotRevealable);

        let secret = crate::secret::Secret::new("reveal-key-for-tests-0123456789abcdef").unwrap();
        let viewable = KeyManager::new(plain.store().clone(), plain.ring.clone())
            .with_reveal_key(RevealKey::new(&secret));
        let err = viewable
            .reveal(created.record.id, &Actor::Cli)
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            ManageErrorKind::NotRevealable,
            "created while off"
        );
        let shown = viewable.create(NewKey::new("v", "u")).await.unwrap();
        assert_eq!(
            viewable.reveal(shown.record.id, &Actor::Cli).await.unwrap(),
            shown.key
        );
        let rotated = viewable
            .rotate(shown.record.id, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(
            viewable
                .reveal(rotated.record.id, &Actor::Cli)
                .await
                .unwrap(),
            rotated.key
        );
        assert!(!format!("{viewable:?}").contains("reveal-key"));
    }

    #[tokio::test]
    async fn extreme_expiries_are_errors_not_panics() {
        let (m, _) = manager();
        let far = time::macros::datetime!(9999-12-31 23:59:59.999999 UTC);
        let err = m
            .create(NewKey::new("k", "u").expires_in(ExpiresIn::After(Duration::MAX)))
            .await
            .unwrap_err();
        assert_eq!(err.field(), Some("expires_in"));
        let err = m
            .create(NewKey::new("k", "u").expires_in(ExpiresIn::At(OffsetDateTime::UNIX_EPOCH)))
            .await
            .unwrap_err();
        assert_eq!(err.field(), Some("expires_at"));
        let created = m
            .create(NewKey::new("k", "u").expires_in(ExpiresIn::At(far)))
            .await
            .unwrap();
        let rotated = m
            .rotate(created.record.id, Duration::hours(1))
            .await
            .unwrap();
        assert_eq!(
            rotated.record.expires_at,
            Some(far),
            "too long to count from now: kept"
        );
        let err = m
            .rotate(rotated.record.id, Duration::MAX)
            .await
            .unwrap_err();
        assert_eq!(err.field(), Some("grace"));
    }

    #[tokio::test]
    async fn nul_bytes_are_validation_errors() {
        let (m, _) = manager();
        let err = m
            .create(NewKey::new("k", "u").description("a\0b"))
            .await
            .unwrap_err();
        assert_eq!(err.field(), Some("description"));
        let err = m
            .create(NewKey::new("k", "u").metadata(serde_json::json!({"a": ["ok", "b\0"]})))
            .await
            .unwrap_err();
        assert_eq!(err.field(), Some("metadata"));
        let created = m.create(NewKey::new("k", "u")).await.unwrap();
        let patch = KeyPatch {
            metadata: Some(serde_json::json!({"k\0": 1})),
            ..KeyPatch::default()
        };
        assert_eq!(
            m.update(created.record.id, patch)
                .await
                .unwrap_err()
                .field(),
            Some("metadata")
        );
    }

    /// Found by a new user: a key in its grace period could be rotated again, and the second
    /// successor inherited the grace deadline as its lifetime, expiring silently.
    #[tokio::test]
    async fn a_rotated_key_is_not_rotated_again() {
        let (m, _) = manager();
        let old = m.create(NewKey::new("r", "u")).await.unwrap();
        let first = m.rotate(old.record.id, Duration::hours(2)).await.unwrap();
        let err = m
            .rotate(old.record.id, Duration::hours(2))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::Conflict);
        assert!(
            err.to_string().contains(&first.record.id.to_string()),
            "{err}"
        );
        // The successor rotates as usual, and keeps an unlimited lifetime.
        let second = m.rotate(first.record.id, Duration::hours(2)).await.unwrap();
        assert_eq!(second.record.expires_at, None);
    }

    #[tokio::test]
    async fn only_active_keys_rotate() {
        let (m, clock) = manager();
        let disabled = m.create(NewKey::new("d", "u")).await.unwrap();
        m.update(
            disabled.record.id,
            KeyPatch {
                disabled: Some(true),
                ..KeyPatch::default()
            },
        )
        .await
        .unwrap();
        let err = m
            .rotate(disabled.record.id, Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::Conflict);
        let expiring = m
            .create(NewKey::new("e", "u").expires_in(ExpiresIn::DAYS_7))
            .await
            .unwrap();
        clock.advance(Duration::days(8));
        let err = m
            .rotate(expiring.record.id, Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::Conflict);
    }

    #[tokio::test]
    async fn retiring_an_unknown_secret_id_is_not_found() {
        let store: Arc<dyn KeyStore> = Arc::new(crate::store::MemoryStore::new());
        let ring = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
        let manager = KeyManager::new(store, ring);
        manager.create(NewKey::new("k", "u1")).await.unwrap();
        let unknown = SecretId::from_bytes([7; 8]);
        let error = manager
            .retire_secret(unknown, UnmigratedKeys::Refuse)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ManageErrorKind::NotFound);
        assert!(error.to_string().contains(&unknown.to_string()), "{error}");
    }

    #[tokio::test]
    async fn retiring_a_secret_spares_the_current_one_and_migrates_viewable_keys() {
        const OLD: &str = "manager-old-secret-0123456789abcdefgh";
        const NEW: &str = "manager-new-secret-0123456789abcdefgh";
        let reveal = RevealKey::new(
            &crate::secret::Secret::new("reveal-key-0123456789abcdefghijkl").unwrap(),
        );
        let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
        let old_ring = SecretRing::from_strs(OLD, None).unwrap();
        let before =
            KeyManager::new(store.clone(), old_ring.clone()).with_reveal_key(reveal.clone());
        let viewable = before.create(NewKey::new("viewable", "u")).await.unwrap();
        let plain = KeyManager::new(store.clone(), old_ring.clone())
            .create(NewKey::new("plain", "u"))
            .await
            .unwrap();
        let new_ring = SecretRing::from_strs(NEW, None).unwrap();
        let after = KeyManager::new(store.clone(), new_ring.clone()).with_reveal_key(reveal);

        let err = after
            .retire_secret(new_ring.current_id(), UnmigratedKeys::Revoke)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::CurrentSecret);
        assert_eq!(err.field(), Some("secret_id"));

        // The viewable key is re-digested from its plaintext; the plain one cannot be.
        let err = after
            .retire_secret(old_ring.current_id(), UnmigratedKeys::Refuse)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::UnmigratedKeys);
        assert_eq!(err.unmigrated_keys(), [plain.record.id]);
        assert!(!err.to_string().contains(plain.key.expose()));
        let under_new = new_ring.digest(viewable.key.expose().as_bytes());
        assert_eq!(
            store
                .find_by_digest(&under_new)
                .await
                .unwrap()
                .map(|r| r.id),
            Some(viewable.record.id)
        );
        assert_eq!(m_state(&after, plain.record.id).await, KeyState::Active);

        let outcome = after
            .retire_secret(old_ring.current_id(), UnmigratedKeys::Revoke)
            .await
            .unwrap();
        assert!(outcome.retired);
        assert_eq!(outcome.dropped, 2);
        assert_eq!(outcome.unmigrated, [plain.record.id]);
        assert_eq!(m_state(&after, plain.record.id).await, KeyState::Revoked);
        assert_eq!(m_state(&after, viewable.record.id).await, KeyState::Active);
        assert_eq!(
            store.find_by_digest(&viewable.record.digest).await.unwrap(),
            None
        );
        assert_eq!(
            after.get(viewable.record.id).await.unwrap().digest,
            under_new,
            "the new digest became the record's"
        );
    }

    fn layer_of(collections: &[&str]) -> ApiKeyLayer {
        let ring = SecretRing::from_strs("manager-test-secret-0123456789abcdef", None).unwrap();
        collections
            .iter()
            .fold(
                ApiKeyLayer::builder()
                    .store(Arc::new(MemoryStore::new()))
                    .secrets(ring),
                |builder, slug| builder.collection(crate::layer::Collection::new(*slug)),
            )
            .build()
            .unwrap()
    }

    /// Issue 20, item 2: a manager of a layer whose only collection is `customers` files new
    /// keys there. They went to `users`, which the same layer refuses as `invalid_key`.
    #[tokio::test]
    async fn new_keys_default_to_the_layers_only_collection() {
        let layer = layer_of(&["customers"]);
        let m = KeyManager::for_layer(&layer);
        assert_eq!(m.default_collection(), "customers");
        let created = m.create(NewKey::new("k", "u")).await.unwrap();
        assert_eq!(created.record.collection, "customers");
        let principal = layer
            .verify(created.key.expose(), &::http::Method::GET)
            .await
            .unwrap();
        assert_eq!(principal.collection(), "customers");
        // Its rotation stays there.
        let rotated = m.rotate(created.record.id, Duration::ZERO).await.unwrap();
        assert_eq!(rotated.record.collection, "customers");

        // Several collections: `users`, as without layers.
        let several = layer_of(&["users", "teams"]);
        assert_eq!(
            KeyManager::for_layer(&several).default_collection(),
            "users"
        );
        let (plain, _) = manager();
        assert_eq!(plain.default_collection(), "users");
        let created = plain.create(NewKey::new("k", "u")).await.unwrap();
        assert_eq!(created.record.collection, "users");
    }

    /// Issue 20, item 2: a collection none of the manager's layers serves is refused, and the
    /// refusal does not repeat the submitted name.
    #[tokio::test]
    async fn a_collection_no_layer_serves_is_refused() {
        let customers = layer_of(&["customers"]);
        let m = KeyManager::for_layer(&customers);
        let err = m
            .create(NewKey::new("k", "u").collection("kw_live_pasted"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::UnknownCollection);
        assert_eq!(err.field(), Some("collection"));
        assert!(!err.to_string().contains("kw_live_pasted"), "{err}");
        assert!(err.to_string().contains("customers"), "{err}");
        let err = m
            .create(NewKey::new("k", "u").collection("users"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::UnknownCollection);

        // Neither of two collections is `users`: no guess, the default is refused.
        let two = KeyManager::for_layer(&layer_of(&["customers", "partners"]));
        let err = two.create(NewKey::new("k", "u")).await.unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::UnknownCollection);
        assert!(two
            .create(NewKey::new("k", "u").collection("partners"))
            .await
            .is_ok());

        // A collection served by any of the layers is fine; a layer without collections
        // accepts every one, and so does a manager without layers.
        let both = KeyManager::for_layer(&customers).invalidates(&layer_of(&["users"]));
        assert!(both
            .create(NewKey::new("k", "u").collection("users"))
            .await
            .is_ok());
        let open = KeyManager::for_layer(&layer_of(&[]));
        assert!(open
            .create(NewKey::new("k", "u").collection("anything"))
            .await
            .is_ok());
        let (plain, _) = manager();
        assert!(plain
            .create(NewKey::new("k", "u").collection("anything"))
            .await
            .is_ok());
    }

    async fn m_state(m: &KeyManager, id: Uuid) -> KeyState {
        m.get(id).await.unwrap().state(m.now())
    }

    #[tokio::test]
    async fn unknown_ids_are_not_found() {
        let (m, _) = manager();
        let id = Uuid::now_v7();
        assert_eq!(
            m.get(id).await.unwrap_err().kind(),
            ManageErrorKind::NotFound
        );
        assert_eq!(
            m.revoke(id).await.unwrap_err().kind(),
            ManageErrorKind::NotFound
        );
        assert_eq!(
            m.delete(id).await.unwrap_err().kind(),
            ManageErrorKind::NotFound
        );
        assert_eq!(
            m.update(id, KeyPatch::default()).await.unwrap_err().kind(),
            ManageErrorKind::NotFound
        );
        assert_eq!(
            m.rotate(id, Duration::ZERO).await.unwrap_err().kind(),
            ManageErrorKind::NotFound
        );
    }
}
