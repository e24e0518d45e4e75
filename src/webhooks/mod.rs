//! Signed webhooks: audit events and expiring keys, POSTed to subscribers by the
//! [Standard Webhooks](https://www.standardwebhooks.com/) convention.
//!
//! A subscription ([`KeyManager::create_webhook`](crate::KeyManager::create_webhook), `POST
//! /webhooks`, `keywarden webhooks create`) names a URL and the event types it wants: the
//! [audit](crate::audit) actions (`key.created`, `key.revoked`, …, `secret.retired`),
//! `key.expiring` (a key's expiry is within the lead time, default 7 days), or `*`. Its signing
//! secret (`whsec_…`) is shown once; the store keeps it sealed under the application secret.
//!
//! **Delivery is at least once, in order, from an outbox that survives restarts**: the audit
//! log is the outbox, and each subscription keeps a cursor (the last event delivered) in the
//! store. A [`WebhookDeliverer`] (run by `keywarden serve`) takes a lease on a subscription (so
//! one instance delivers it at a time), POSTs the events after its cursor, and moves the cursor
//! only after a 2xx. A failure (a non-2xx status, a timeout, a refused connection) is retried
//! with exponential backoff (5 s, 10 s, 20 s, … up to an hour between attempts, for as long as
//! it takes); the subscription shows `attempts`, `last_error` and `failing_since`. A process
//! killed mid-delivery leaves the cursor where it was: the event is sent again, with the same
//! `webhook-id`, so receivers can drop duplicates.
//!
//! Each request carries `webhook-id`, `webhook-timestamp` (unix seconds) and
//! `webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`, where the
//! key is the base64 part of the `whsec_` secret. The body is
//! `{"type": "key.revoked", "timestamp": "…", "data": {…}}` (`data` is the audit event, or for
//! `key.expiring` the key's id, collection, subject, name and expiry).
//!
//! # SSRF
//!
//! A webhook URL makes keywarden send requests where the caller says. In a deployment where
//! whoever manages webhooks is not trusted with the network, restrict targets with
//! [`WebhookTargets`] (a host allowlist; plain `http` off by default; redirects are never
//! followed) — `keywarden serve --webhook-hosts hooks.example.com,*.partner.example`. An
//! allowlisted name can still resolve to an internal address (DNS is the name owner's):
//! allow only hosts you control.
//!
//! ```
//! use keywarden::webhooks::{sign, WebhookTargets};
//!
//! let targets = WebhookTargets::hosts(["hooks.example.com", "*.partner.example"]);
//! assert!(targets.check("https://hooks.example.com/keywarden").is_ok());
//! assert!(targets.check("https://a.partner.example/in").is_ok());
//! assert!(targets.check("https://169.254.169.254/latest/meta-data").is_err());
//! assert!(targets.check("http://hooks.example.com/").is_err(), "https only");
//!
//! let secret = [7u8; 32];
//! let signature = sign(&secret, "evt_1", 1_700_000_000, br#"{"type":"key.revoked"}"#);
//! assert!(signature.starts_with("v1,"));
//! ```

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::audit::{AuditAction, AuditQuery};
use crate::clock::{Clock, SystemClock};
use crate::secret::{SecretId, SecretRing};
use crate::store::{
    KeyQuery, KeyRecord, KeyState, KeyStore, StoreError, WebhookProgress, WebhookRecord,
};

type HmacSha256 = Hmac<Sha256>;

const SEAL_LABEL: &[u8] = b"keywarden webhook secret key v1\0";
/// The prefix of a signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// The synthetic event announcing a key's coming expiry.
pub const KEY_EXPIRING: &str = "key.expiring";
/// The longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Every event type a subscription can name (besides `*`).
pub fn event_types() -> impl Iterator<Item = &'static str> {
    AuditAction::ALL
        .into_iter()
        .map(|a| a.as_str())
        .chain(std::iter::once(KEY_EXPIRING))
}

/// Checks a subscription's event list: known types or `*`, at least one, no duplicates.
///
/// # Errors
/// What is wrong, never repeating the submitted text.
pub fn check_events(events: &[String]) -> Result<(), String> {
    if events.is_empty() {
        return Err("name at least one event type, or *".into());
    }
    for (i, event) in events.iter().enumerate() {
        if event != "*" && !event_types().any(|t| t == event) {
            return Err(format!(
                "unknown event type (expected *, or: {})",
                event_types().collect::<Vec<_>>().join(", ")
            ));
        }
        if events[..i].contains(event) {
            return Err("an event type is listed twice".into());
        }
    }
    Ok(())
}

/// The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256 of
/// `"{id}.{timestamp}.{body}"` under `secret` (the decoded part of the `whsec_` secret).
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{signature}")
}

/// A new signing secret: 32 random bytes, and their `whsec_<base64>` text (shown once).
pub(crate) fn generate_secret() -> (Zeroizing<[u8; 32]>, Zeroizing<String>) {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut *bytes).expect("the OS random number generator failed");
    let text = Zeroizing::new(format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(*bytes)
    ));
    (bytes, text)
}

/// Seals and opens signing secrets with AES-256-GCM under keys derived from the secret ring:
/// `secret id (8) ‖ nonce (12) ‖ ciphertext`, the webhook id as associated data.
#[derive(Clone)]
pub(crate) struct SecretSeal {
    keys: Vec<(SecretId, Zeroizing<[u8; 32]>)>,
}

impl SecretSeal {
    pub(crate) fn new(ring: &SecretRing) -> Self {
        Self {
            keys: ring.derived_keys(SEAL_LABEL),
        }
    }

    pub(crate) fn seal(&self, webhook: Uuid, secret: &[u8; 32]) -> Vec<u8> {
        let (id, key) = &self.keys[0];
        let cipher = Aes256Gcm::new_from_slice(&key[..]).expect("a 32-byte key");
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).expect("the OS random number generator failed");
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret,
                    aad: webhook.as_bytes(),
                },
            )
            .expect("AES-GCM encryption cannot fail for a short message");
        let mut out = Vec::with_capacity(8 + 12 + ciphertext.len());
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub(crate) fn open(&self, webhook: Uuid, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < 8 + 12 + 16 {
            return None;
        }
        let (id, rest) = sealed.split_at(8);
        let (nonce, ciphertext) = rest.split_at(12);
        let (_, key) = self.keys.iter().find(|(k, _)| k.as_bytes() == id)?;
        let cipher = Aes256Gcm::new_from_slice(&key[..]).ok()?;
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: webhook.as_bytes(),
                },
            )
            .ok()
            .map(Zeroizing::new)
    }
}

/// Where webhooks may be sent. By default: any `https` host with a public address; loopback,
/// private, link-local and other non-public addresses (IP literals, and what names resolve
/// to at send time) only when listed by address in the allowlist or with
/// [`allow_private`](Self::allow_private).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookTargets {
    hosts: Option<Vec<String>>,
    allow_http: bool,
    allow_private: bool,
}

/// Whether `ip` is a public unicast address: not loopback, private (RFC 1918, fc00::/7),
/// link-local (169.254/16 with the cloud metadata endpoints, fe80::/10), shared (100.64/10),
/// unspecified, broadcast, multicast, documentation or reserved. IPv4-mapped IPv6 addresses
/// are judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match crate::net::canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_unspecified()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let first = seg[0];
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                ))
            };
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the IPv4 address inside them.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(embedded(seg[6], seg[7]));
            }
            if first == 0x2002 {
                return is_public(embedded(seg[1], seg[2]));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first == 0x2001 && v6.segments()[1] == 0x0db8)
                || (first == 0x2001 && v6.segments()[1] == 0)
                || (first == 0x64 && v6.segments()[1] == 0xff9b)
                || (first & 0xffc0) == 0xfec0
                || v6.segments()[..6] == [0; 6])
        }
    }
}

impl WebhookTargets {
    /// Any `https` URL (the default). Fine where only trusted operators manage webhooks.
    pub fn any() -> Self {
        Self::default()
    }

    /// Only these hosts: exact names (`hooks.example.com`, `10.0.0.7`) or `*.domain`
    /// (any subdomain, not the domain itself). Compared case-insensitively.
    pub fn hosts<I, S>(hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            hosts: Some(
                hosts
                    .into_iter()
                    .map(|h| h.into().trim().to_ascii_lowercase())
                    .collect(),
            ),
            allow_http: false,
            allow_private: false,
        }
    }

    /// Also allows non-public addresses (internal receivers): only where whoever manages
    /// webhooks may reach the internal network anyway.
    #[must_use]
    pub fn allow_private(mut self, allow: bool) -> Self {
        self.allow_private = allow;
        self
    }

    /// Whether `ip` may be reached for `host` (a name or the address itself).
    fn allows_address(&self, host: &str, ip: IpAddr) -> bool {
        self.allow_private
            || is_public(ip)
            || self.hosts.as_ref().is_some_and(|hosts| {
                hosts.iter().any(|h| {
                    h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .is_ok_and(|listed| {
                            crate::net::canonical(listed) == crate::net::canonical(ip)
                        })
                }) || hosts
                    .iter()
                    .any(|h| h == host && host.parse::<IpAddr>().is_err())
            })
    }

    /// Also allows plain `http` URLs (local receivers, tests).
    #[must_use]
    pub fn allow_http(mut self, allow: bool) -> Self {
        self.allow_http = allow;
        self
    }

    /// The host allowlist, if one is set.
    pub fn allowed_hosts(&self) -> Option<&[String]> {
        self.hosts.as_deref()
    }

    /// Whether `url` is an allowed target.
    ///
    /// # Errors
    /// Why not, never repeating the URL.
    pub fn check(&self, url: &str) -> Result<(), String> {
        if url.len() > MAX_URL_LEN {
            return Err(format!("the URL is longer than {MAX_URL_LEN} bytes"));
        }
        // The parser the requests are sent with: what is checked is what is reached.
        let parsed =
            reqwest::Url::parse(url).map_err(|_| "not an absolute http(s) URL".to_owned())?;
        match parsed.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err("only https URLs are allowed (plain http: keywarden serve \
                            --webhook-allow-http, KEYWARDEN_WEBHOOK_ALLOW_HTTP)"
                    .into())
            }
            _ => return Err("not an absolute http(s) URL".into()),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("URLs with credentials are not allowed".into());
        }
        // Lowercased, IDNA-encoded, IPv4 forms normalised (`0x7f.1` is `127.0.0.1`).
        let host = parsed
            .host_str()
            .ok_or_else(|| "the URL has no host".to_owned())?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            if !self.allows_address(&host, ip) {
                return Err(
                    "the address is not public (loopback, private, link-local, …): allow \
                     non-public addresses (keywarden serve: --webhook-allow-private, \
                     KEYWARDEN_WEBHOOK_ALLOW_PRIVATE) or list the address in the allowed \
                     webhook hosts"
                        .into(),
                );
            }
        }
        if let Some(hosts) = &self.hosts {
            let allowed = hosts
                .iter()
                .any(|pattern| match pattern.strip_prefix("*.") {
                    Some(domain) => host
                        .strip_suffix(domain)
                        .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                    None => *pattern == host,
                });
            if !allowed {
                return Err("the host is not in the allowed webhook hosts".into());
            }
        }
        Ok(())
    }
}

/// A subscription as the API and CLI show it: never its secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
pub struct WebhookView {
    /// Id.
    pub id: Uuid,
    /// Where events are POSTed.
    pub url: String,
    /// The event types it receives, or `*`.
    pub events: Vec<String>,
    /// Description.
    pub description: Option<String>,
    /// Paused.
    pub disabled: bool,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "manage-api", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
    /// The last audit event number delivered (or skipped as not subscribed).
    pub delivered_through: u64,
    /// Failed attempts at the next event.
    pub attempts: u32,
    /// No attempt before this.
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "manage-api", schema(value_type = Option<String>, format = DateTime))]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// The last failure: an HTTP status or a transport error kind.
    pub last_error: Option<String>,
    /// Failing since.
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "manage-api", schema(value_type = Option<String>, format = DateTime))]
    pub failing_since: Option<OffsetDateTime>,
}

impl From<&WebhookRecord> for WebhookView {
    fn from(record: &WebhookRecord) -> Self {
        Self {
            id: record.id,
            url: record.url.clone(),
            events: record.events.clone(),
            description: record.description.clone(),
            disabled: record.disabled,
            created_at: record.created_at,
            delivered_through: record.cursor,
            attempts: record.attempts,
            next_attempt_at: record.next_attempt_at,
            last_error: record.last_error.clone(),
            failing_since: record.failing_since,
        }
    }
}

/// A new subscription and its signing secret, shown this once.
#[derive(Clone, Serialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
pub struct CreatedWebhook {
    /// The subscription.
    #[serde(flatten)]
    pub webhook: WebhookView,
    /// The signing secret (`whsec_…`): verify `webhook-signature` with it. Not shown again.
    pub secret: String,
}

impl fmt::Debug for CreatedWebhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedWebhook")
            .field("webhook", &self.webhook)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// Delivers webhooks from a store's audit log: see the [module docs](self).
#[derive(Clone)]
pub struct WebhookDeliverer {
    store: Arc<dyn KeyStore>,
    seal: SecretSeal,
    targets: WebhookTargets,
    clock: Arc<dyn Clock>,
    client: reqwest::Client,
    owner: Uuid,
    lease: StdDuration,
    batch: u32,
    expiring_lead: time::Duration,
}

impl fmt::Debug for WebhookDeliverer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookDeliverer")
            .field("targets", &self.targets)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// What one [`WebhookDeliverer::run_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryRound {
    /// Requests answered with a 2xx.
    pub delivered: u64,
    /// Requests that failed (to be retried).
    pub failed: u64,
}

/// The wait before the next attempt after `attempts` failures: 5 s doubling, at most an hour.
pub fn backoff(attempts: u32) -> StdDuration {
    let exponent = attempts.saturating_sub(1).min(20);
    StdDuration::from_secs(5u64.saturating_mul(1 << exponent)).min(StdDuration::from_secs(3600))
}

impl WebhookDeliverer {
    /// A deliverer over `store`'s subscriptions and audit log, opening signing secrets with
    /// `ring`. Requests time out after 10 s and never follow redirects.
    ///
    /// # Panics
    /// If the TLS backend cannot be initialised.
    pub fn new(store: Arc<dyn KeyStore>, ring: &SecretRing) -> Self {
        let targets = WebhookTargets::any();
        Self {
            store,
            seal: SecretSeal::new(ring),
            client: client_for(&targets),
            targets,
            clock: Arc::new(SystemClock),
            owner: Uuid::now_v7(),
            lease: StdDuration::from_secs(15),
            batch: 100,
            expiring_lead: time::Duration::days(7),
        }
    }

    /// Only these targets (checked again before each request).
    #[must_use]
    pub fn targets(mut self, targets: WebhookTargets) -> Self {
        self.client = client_for(&targets);
        self.targets = targets;
        self
    }

    /// How long before a key's expiry `key.expiring` is sent (default 7 days).
    #[must_use]
    pub fn expiring_lead(mut self, lead: time::Duration) -> Self {
        self.expiring_lead = lead;
        self
    }

    /// The clock (tests).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Delivers what is due, then every `interval`, on the current runtime, until the
    /// returned handle is dropped or aborted.
    pub fn start(self, interval: StdDuration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(error) = self.run_once().await {
                    tracing::warn!(target: "keywarden::webhooks", %error, "webhook delivery round failed");
                }
            }
        })
    }

    /// One round: every enabled subscription that is due and not leased elsewhere.
    ///
    /// # Errors
    /// The store failed, or keeps no webhooks.
    pub async fn run_once(&self) -> Result<DeliveryRound, StoreError> {
        let hooks = self.store.webhooks().ok_or_else(no_webhooks)?;
        let mut round = DeliveryRound::default();
        for listed in hooks.list_webhooks().await? {
            let now = self.clock.now();
            if listed.disabled || listed.next_attempt_at.is_some_and(|at| at > now) {
                continue;
            }
            let until = now + self.lease;
            // Deliver from the copy the lease returns, not the listing: the cursor, URL and
            // state may have changed since.
            let Some(hook) = hooks
                .lease_webhook(listed.id, self.owner, now, until)
                .await?
            else {
                continue;
            };
            if hook.disabled || hook.next_attempt_at.is_some_and(|at| at > now) {
                continue;
            }
            self.deliver(&hook, &mut round).await?;
        }
        Ok(round)
    }

    async fn deliver(
        &self,
        hook: &WebhookRecord,
        round: &mut DeliveryRound,
    ) -> Result<(), StoreError> {
        let hooks = self.store.webhooks().ok_or_else(no_webhooks)?;
        let mut progress = WebhookProgress {
            cursor: hook.cursor,
            expiring_cursor: hook.expiring_cursor,
            attempts: hook.attempts,
            next_attempt_at: hook.next_attempt_at,
            last_error: hook.last_error.clone(),
            failing_since: hook.failing_since,
            lease_until: self.clock.now() + self.lease,
        };
        let Some(secret) = self.seal.open(hook.id, &hook.sealed_secret) else {
            self.fail(
                hook.id,
                "-",
                &mut progress,
                "signing secret sealed under a secret not in the ring".into(),
            );
            round.failed += 1;
            hooks
                .record_webhook_progress(hook.id, self.owner, self.renewed(&mut progress))
                .await?;
            return Ok(());
        };
        let wants = |event: &str| hook.events.iter().any(|e| e == "*" || e == event);
        // The audit log, after the cursor.
        let page = self
            .store
            .audit_events(&AuditQuery {
                after: Some(hook.cursor),
                limit: self.batch,
                ..AuditQuery::default()
            })
            .await?;
        for event in &page.items {
            if wants(event.action.as_str()) {
                let body = payload(event.action.as_str(), self.clock.now(), event);
                let message = format!("evt_{}", event.seq);
                if let Err(error) = self.post(hook, &secret, &message, &body).await {
                    self.fail(hook.id, &message, &mut progress, error);
                    round.failed += 1;
                    hooks
                        .record_webhook_progress(hook.id, self.owner, self.renewed(&mut progress))
                        .await?;
                    return Ok(());
                }
                round.delivered += 1;
            }
            progress.cursor = event.seq;
            self.succeed(&mut progress);
            // Each step is stored: a crash re-sends at most the event in flight.
            if !hooks
                .record_webhook_progress(hook.id, self.owner, self.renewed(&mut progress))
                .await?
            {
                return Ok(()); // The lease moved to another instance.
            }
        }
        if wants(KEY_EXPIRING) {
            self.deliver_expiring(hook, &secret, &mut progress, round)
                .await?;
        }
        Ok(())
    }

    /// `key.expiring` for active keys whose notice time (expiry − lead) passed since the
    /// subscription's expiring cursor.
    async fn deliver_expiring(
        &self,
        hook: &WebhookRecord,
        secret: &[u8],
        progress: &mut WebhookProgress,
        round: &mut DeliveryRound,
    ) -> Result<(), StoreError> {
        let hooks = self.store.webhooks().ok_or_else(no_webhooks)?;
        let now = self.clock.now();
        let horizon = now + self.expiring_lead;
        let from = progress.expiring_cursor + self.expiring_lead;
        if horizon <= from {
            return Ok(());
        }
        let mut query = KeyQuery::new();
        query.now = now;
        query.state = Some(KeyState::Active);
        query.expires_between = Some((from, horizon));
        query.limit = KeyQuery::MAX_LIMIT;
        let mut keys: Vec<KeyRecord> = Vec::new();
        loop {
            let page = self.store.list(&query).await?;
            keys.extend(page.items);
            match page.next_cursor {
                Some(cursor) => query.after = Some(cursor),
                None => break,
            }
        }
        keys.sort_by_key(|k| (k.expires_at, k.id));
        for key in &keys {
            let Some(expires_at) = key.expires_at else {
                continue;
            };
            let data = serde_json::json!({
                "key_id": key.id,
                "collection": key.collection,
                "subject": key.subject,
                "name": key.name,
                "expires_at": expires_at.format(&Rfc3339).unwrap_or_default(),
            });
            let body = payload(KEY_EXPIRING, now, &data);
            let id = format!(
                "exp_{}_{}",
                key.id.simple(),
                crate::audit::unix_micros(expires_at)
            );
            if let Err(error) = self.post(hook, secret, &id, &body).await {
                self.fail(hook.id, &id, progress, error);
                round.failed += 1;
                hooks
                    .record_webhook_progress(hook.id, self.owner, self.renewed(progress))
                    .await?;
                return Ok(());
            }
            round.delivered += 1;
            progress.expiring_cursor = expires_at - self.expiring_lead;
            self.succeed(progress);
            if !hooks
                .record_webhook_progress(hook.id, self.owner, self.renewed(progress))
                .await?
            {
                return Ok(());
            }
        }
        progress.expiring_cursor = now;
        hooks
            .record_webhook_progress(hook.id, self.owner, self.renewed(progress))
            .await?;
        Ok(())
    }

    /// The progress with the lease renewed from now.
    fn renewed<'p>(&self, progress: &'p mut WebhookProgress) -> &'p WebhookProgress {
        progress.lease_until = self.clock.now() + self.lease;
        progress
    }

    /// How long a lease lasts without a write (default 15 s; each event delivered renews it).
    #[must_use]
    pub fn lease(mut self, lease: StdDuration) -> Self {
        self.lease = lease;
        self
    }

    fn succeed(&self, progress: &mut WebhookProgress) {
        progress.attempts = 0;
        progress.next_attempt_at = None;
        progress.last_error = None;
        progress.failing_since = None;
    }

    fn fail(&self, hook: Uuid, message: &str, progress: &mut WebhookProgress, error: String) {
        let now = self.clock.now();
        progress.attempts = progress.attempts.saturating_add(1);
        let wait = backoff(progress.attempts);
        progress.next_attempt_at = Some(now + wait);
        progress.failing_since.get_or_insert(now);
        tracing::warn!(
            target: "keywarden::webhooks",
            webhook_id = %hook,
            message_id = message,
            attempts = progress.attempts,
            retry_in_s = wait.as_secs(),
            error = %error,
            "webhook delivery failed; retrying with backoff"
        );
        progress.last_error = Some(error);
    }

    /// One signed POST; the error is a status or a transport error kind (never a body).
    async fn post(
        &self,
        hook: &WebhookRecord,
        secret: &[u8],
        id: &str,
        body: &[u8],
    ) -> Result<(), String> {
        self.targets
            .check(&hook.url)
            .map_err(|reason| format!("target refused: {reason}"))?;
        let timestamp = self.clock.now().unix_timestamp();
        let response = self
            .client
            .post(&hook.url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sign(secret, id, timestamp, body))
            .body(body.to_vec())
            .send()
            .await
            .map_err(|error| {
                if error.is_timeout() {
                    "timed out".to_owned()
                } else if error.is_connect() {
                    "connection failed".to_owned()
                } else {
                    "request failed".to_owned()
                }
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }
}

/// The HTTP client of deliveries: 10 s timeout, no redirects, and names resolved only to the
/// addresses `targets` allow (so a name pointing inside the network is refused at send time).
fn client_for(targets: &WebhookTargets) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(StdDuration::from_secs(10))
        .user_agent(concat!("keywarden-webhooks/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(Resolver(targets.clone())))
        // A proxy would resolve names itself, past the address check above.
        .no_proxy()
        .build()
        .expect("the HTTP client builds")
}

/// Resolves names and drops the addresses the targets do not allow.
struct Resolver(WebhookTargets);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let targets = self.0.clone();
        let host = name.as_str().to_ascii_lowercase();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| targets.allows_address(&host, addr.ip()))
                .collect();
            if addrs.is_empty() {
                return Err("the name resolves to no allowed (public) address".into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn no_webhooks() -> StoreError {
    StoreError::new(
        crate::store::StoreErrorKind::Other,
        "this key store keeps no webhooks (KeyStore::webhooks)",
    )
}

fn payload(kind: &str, now: OffsetDateTime, data: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": kind,
        "timestamp": now.format(&Rfc3339).unwrap_or_default(),
        "data": data,
    }))
    .expect("JSON values always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The Standard Webhooks reference vector.
        let secret = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn targets_allow_only_what_is_listed() {
        let t = WebhookTargets::hosts(["hooks.example.com", "*.partner.example", "10.0.0.7"]);
        assert!(t.check("https://HOOKS.example.com:8443/in?x=1").is_ok());
        assert!(t.check("https://a.b.partner.example/").is_ok());
        assert!(t.check("https://partner.example/").is_err());
        assert!(t.check("https://evilpartner.example/").is_err());
        assert!(t.check("https://10.0.0.7/").is_ok());
        assert!(t.check("https://hooks.example.com.evil.test/").is_err());
        assert!(t.check("https://user:pw@hooks.example.com/").is_err());
        assert!(t.check("ftp://hooks.example.com/").is_err());
        assert!(t.check("/relative").is_err());
        assert!(t.check("http://hooks.example.com/").is_err());
        assert!(t
            .clone()
            .allow_http(true)
            .check("http://hooks.example.com/")
            .is_ok());
        for private in [
            "https://[::1]:9/",
            "https://127.0.0.1/",
            "https://10.1.2.3/",
            "https://169.254.169.254/latest/meta-data",
            "https://[::ffff:192.168.0.1]/",
            "https://[fd00::1]/",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://[64:ff9b::a00:1]/",
            "https://[2002:a00:1::]/",
            "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
            "https://[fec0::1]/",
        ] {
            assert!(WebhookTargets::any().check(private).is_err(), "{private}");
            assert!(
                WebhookTargets::any()
                    .allow_private(true)
                    .check(private)
                    .is_ok(),
                "{private}"
            );
        }
        assert!(WebhookTargets::any()
            .check("https://93.184.215.14/")
            .is_ok());
        assert!(WebhookTargets::any()
            .check(&format!("https://h/{}", "a".repeat(MAX_URL_LEN)))
            .is_err());
        // What the sender would reach, not what the text looks like.
        let local = WebhookTargets::hosts(["127.0.0.1"]).allow_http(true);
        assert!(local.check("http://0x7f.1/").is_ok(), "the same address");
        // WHATWG parsing: the backslash ends the host, so this reaches hooks.example.com.
        assert!(t.check("https://hooks.example.com\\@evil.test/").is_ok());
        assert!(t.check("https://evil.test\\@hooks.example.com/").is_err());
        assert!(t.check("https://hooks.example.com%2eevil.test/").is_err());
        assert!(
            t.check("https://hooks.example.com./").is_err(),
            "fail closed"
        );
    }

    #[test]
    fn secrets_seal_per_webhook_and_open_only_with_the_ring() {
        let ring = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
        let seal = SecretSeal::new(&ring);
        let (secret, text) = generate_secret();
        assert!(text.starts_with(SECRET_PREFIX));
        let id = Uuid::now_v7();
        let sealed = seal.seal(id, &secret);
        assert_eq!(&seal.open(id, &sealed).unwrap()[..], &secret[..]);
        assert!(
            seal.open(Uuid::now_v7(), &sealed).is_none(),
            "bound to its webhook"
        );
        let other = SecretSeal::new(
            &SecretRing::from_strs("another-secret-of-at-least-32-bytes!!", None).unwrap(),
        );
        assert!(other.open(id, &sealed).is_none());
        let rotated = SecretSeal::new(
            &SecretRing::from_strs(
                "another-secret-of-at-least-32-bytes!!",
                Some("a-secret-of-at-least-thirty-two-bytes!"),
            )
            .unwrap(),
        );
        assert!(
            rotated.open(id, &sealed).is_some(),
            "previous secrets still open"
        );
    }

    #[test]
    fn backoff_doubles_up_to_an_hour_and_events_are_checked() {
        assert_eq!(backoff(1), StdDuration::from_secs(5));
        assert_eq!(backoff(2), StdDuration::from_secs(10));
        assert_eq!(backoff(5), StdDuration::from_secs(80));
        assert_eq!(backoff(40), StdDuration::from_secs(3600));
        assert!(check_events(&["key.revoked".into(), "key.expiring".into()]).is_ok());
        assert!(check_events(&["*".into()]).is_ok());
        assert!(check_events(&[]).is_err());
        assert!(check_events(&["key.stolen".into()]).is_err());
        assert!(check_events(&["key.revoked".into(), "key.revoked".into()]).is_err());
    }
}
