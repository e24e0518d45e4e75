//! A key as the management front ends show it: one JSON view for the HTTP API and the CLI's
//! `--json` output.

use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::manage::CreatedKey;
use crate::net::IpNetwork;
use crate::ratelimit::RateLimitPolicy;
use crate::store::{KeyPage, KeyRecord, KeyState, OwnerKind, Refill};

/// A key as JSON: every field of its [`KeyRecord`] but the digest, the secret id and the
/// encrypted key, plus its `state` at the time of the view. Timestamps are RFC 3339.
///
/// ```
/// use keywarden::{manage::KeyView, MemoryStore, KeyManager, NewKey, SecretRing};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// # let secrets = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
/// # let manager = KeyManager::new(std::sync::Arc::new(MemoryStore::new()), secrets);
/// let created = manager.create(NewKey::new("ci", "alice")).await.unwrap();
/// let view = KeyView::new(&created.record, time::OffsetDateTime::now_utc());
/// let json = serde_json::to_value(view).unwrap();
/// assert_eq!(json["state"], "active");
/// assert!(json.get("digest").is_none());
/// # }
/// ```
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "manage-api",
    schema(description = "A key: every field but its secrets, \
    plus its `state` when the view was made. Timestamps are RFC 3339.")
)]
pub struct KeyView<'a> {
    /// The key id.
    id: Uuid,
    /// A label for people.
    name: &'a str,
    /// Free text, if any.
    description: Option<&'a str>,
    /// The first characters of the key, to recognize it (`kw_live_ab12`).
    display_start: &'a str,
    /// The collection the key authenticates as.
    collection: &'a str,
    /// The owner's id within the collection.
    subject: &'a str,
    /// The owner's kind.
    owner_kind: OwnerKind,
    /// The scopes granted.
    #[cfg_attr(feature = "manage-api", schema(value_type = Vec<String>))]
    scopes: &'a [String],
    /// The environment in the key's prefix (`kw_<environment>_`).
    environment: &'a str,
    /// Only safe methods (GET, HEAD, OPTIONS, TRACE) are admitted.
    read_only: bool,
    /// The caller's own JSON object.
    #[cfg_attr(feature = "manage-api", schema(value_type = Object))]
    metadata: &'a Value,
    /// The key's own rate limit; `null`: the layer's default applies.
    rate_limit: Option<RateLimitPolicy>,
    /// The networks the key may be used from (CIDR); empty: anywhere.
    #[cfg_attr(feature = "manage-api", schema(value_type = Vec<String>))]
    allowed_ips: &'a [IpNetwork],
    /// Credits left in the store (credits instances hold leased are not counted: they are
    /// spent or given back within seconds); `null`: unlimited.
    credits: Option<u64>,
    /// The credits' refill (the balance is set to its amount each period); `null`: none.
    #[cfg_attr(feature = "manage-api", schema(value_type = Option<String>))]
    refill: Option<Refill>,
    /// The key's state when the view was made.
    state: KeyState,
    /// When the key was created.
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    /// When the key was last changed.
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    /// When the key expires; `null`: never.
    #[serde(with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    /// When the key last authenticated a request, if ever (recorded in batches).
    #[serde(with = "time::serde::rfc3339::option")]
    last_used_at: Option<OffsetDateTime>,
    /// How many requests the key authenticated (recorded in batches).
    use_count: u64,
    /// When the key was revoked; `null`: not revoked.
    #[serde(with = "time::serde::rfc3339::option")]
    revoked_at: Option<OffsetDateTime>,
    /// Disabled keys are refused until enabled again.
    disabled: bool,
    /// The key this one was rotated from, if any.
    rotated_from: Option<Uuid>,
}

impl<'a> KeyView<'a> {
    /// The view of `record`, its state judged at `now`.
    pub fn new(record: &'a KeyRecord, now: OffsetDateTime) -> Self {
        Self {
            id: record.id,
            name: &record.name,
            description: record.description.as_deref(),
            display_start: &record.display_start,
            collection: &record.collection,
            subject: &record.subject,
            owner_kind: record.owner_kind,
            scopes: &record.scopes,
            environment: &record.environment,
            read_only: record.read_only,
            metadata: &record.metadata,
            rate_limit: record.rate_limit,
            allowed_ips: &record.allowed_ips,
            credits: record.credits.map(|c| c.remaining),
            refill: record.credits.and_then(|c| c.refill),
            state: record.state(now),
            created_at: record.created_at,
            updated_at: record.updated_at,
            expires_at: record.expires_at,
            last_used_at: record.last_used_at,
            use_count: record.use_count,
            revoked_at: record.revoked_at,
            disabled: record.disabled,
            rotated_from: record.rotated_from,
        }
    }
}

/// A key just created or rotated, as JSON: `key` (the plaintext, the only view that holds it)
/// followed by the [`KeyView`] members.
#[derive(Clone, Serialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "manage-api",
    schema(description = "A key just created or rotated: \
    `key`, the plaintext (in this response only), and the `KeyView` members.")
)]
pub struct CreatedKeyView<'a> {
    /// The plaintext key, in this response only.
    key: &'a str,
    #[serde(flatten)]
    view: KeyView<'a>,
}

impl<'a> CreatedKeyView<'a> {
    /// The view of `created`, its state judged at `now`.
    pub fn new(created: &'a CreatedKey, now: OffsetDateTime) -> Self {
        Self {
            key: created.key.expose(),
            view: KeyView::new(&created.record, now),
        }
    }
}

/// Never prints the plaintext.
impl std::fmt::Debug for CreatedKeyView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKeyView")
            .field("key", &"[redacted]")
            .field("view", &self.view)
            .finish()
    }
}

/// One page of keys as JSON: `{"items": [KeyView...], "next_cursor": id or null}`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
pub struct KeyPageView<'a> {
    /// The keys of this page, in creation order.
    items: Vec<KeyView<'a>>,
    /// Pass as `after` for the next page; `null`: this is the last page.
    next_cursor: Option<Uuid>,
}

impl<'a> KeyPageView<'a> {
    /// The view of `page`, states judged at `now`.
    pub fn new(page: &'a KeyPage, now: OffsetDateTime) -> Self {
        Self {
            items: page
                .items
                .iter()
                .map(|record| KeyView::new(record, now))
                .collect(),
            next_cursor: page.next_cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::record;

    #[test]
    fn a_view_holds_every_field_but_the_secrets() {
        let mut key = record(1);
        key.expires_at = Some(time::macros::datetime!(2030-01-01 00:00 UTC));
        let json = serde_json::to_value(KeyView::new(&key, key.created_at)).unwrap();
        let names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names.len(), 24, "{names:?}");
        for secret in ["digest", "secret_id", "encrypted_key", "key"] {
            assert!(json.get(secret).is_none(), "{secret}");
        }
        assert_eq!(json["expires_at"], "2030-01-01T00:00:00Z");
        assert_eq!(json["state"], "active");
    }

    #[test]
    fn a_created_keys_view_shows_the_plaintext_in_json_only() {
        let created = CreatedKey {
            key: crate::key::ApiKey::new("kw_live_the-plaintext"),
            record: record(2),
        };
        let view = CreatedKeyView::new(&created, created.record.created_at);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["key"], "kw_live_the-plaintext");
        assert_eq!(json["name"], created.record.name);
        let debug = format!("{view:?}");
        assert!(!debug.contains("the-plaintext"), "{debug}");
        assert!(
            debug.starts_with(r#"CreatedKeyView { key: "[redacted]", view: KeyView {"#),
            "{debug}"
        );
        assert!(debug.contains(&created.record.name), "{debug}");
    }
}
