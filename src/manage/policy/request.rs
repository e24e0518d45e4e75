//! What a management caller asks for, as text: a new key or a patch, every field optional,
//! parsed here by the one set of rules (durations, instants, rate limits, free text).

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::expiry::parse_instant;
use super::validate::check_free_text;
use crate::manage::ManageError;
use crate::ratelimit::RateLimitPolicy;
use crate::store::{KeyPatch, OwnerKind};

/// A key to create, as a caller submits it; [`Caller::new_key`](super::Caller::new_key)
/// fills the gaps from the caller and checks it.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct CreateRequest {
    pub(crate) name: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) collection: Option<String>,
    pub(crate) subject: Option<String>,
    pub(crate) owner_kind: Option<OwnerKind>,
    pub(crate) scopes: Option<Vec<String>>,
    pub(crate) read_only: Option<bool>,
    pub(crate) environment: Option<String>,
    pub(crate) expires_in: Option<String>,
    pub(crate) expires_at: Option<String>,
    pub(crate) metadata: Option<Value>,
    pub(crate) rate_limit: Option<String>,
}

impl CreateRequest {
    /// The member names, for errors that must never repeat a name the client sent.
    pub(crate) const FIELDS: &'static [&'static str] = &[
        "name",
        "description",
        "collection",
        "subject",
        "owner_kind",
        "scopes",
        "read_only",
        "environment",
        "expires_in",
        "expires_at",
        "metadata",
        "rate_limit",
    ];
}

fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A change to a key, as a caller submits it. Absent leaves a field alone; `null` clears the
/// nullable ones.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct PatchRequest {
    name: Option<String>,
    #[serde(deserialize_with = "nullable")]
    description: Option<Option<String>>,
    scopes: Option<Vec<String>>,
    read_only: Option<bool>,
    #[serde(deserialize_with = "nullable")]
    metadata: Option<Option<Value>>,
    #[serde(deserialize_with = "nullable")]
    rate_limit: Option<Option<String>>,
    #[serde(deserialize_with = "nullable")]
    expires_at: Option<Option<String>>,
    disabled: Option<bool>,
}

impl PatchRequest {
    /// The member names, for errors that must never repeat a name the client sent.
    pub(crate) const FIELDS: &'static [&'static str] = &[
        "name",
        "description",
        "scopes",
        "read_only",
        "metadata",
        "rate_limit",
        "expires_at",
        "disabled",
    ];

    /// The patch, its text parsed.
    ///
    /// # Errors
    /// [`ManageErrorKind::Invalid`](crate::manage::ManageErrorKind::Invalid) naming the field.
    pub(crate) fn into_patch(self) -> Result<KeyPatch, ManageError> {
        check_free_text(
            self.description.as_ref().and_then(Option::as_deref),
            self.metadata.as_ref().and_then(Option::as_ref),
        )?;
        let rate_limit = match self.rate_limit {
            Some(Some(text)) => Some(Some(parse_rate_limit(&text)?)),
            Some(None) => Some(None),
            None => None,
        };
        let expires_at = match self.expires_at {
            Some(Some(text)) => Some(Some(parse_time("expires_at", &text)?)),
            Some(None) => Some(None),
            None => None,
        };
        Ok(KeyPatch {
            name: self.name,
            description: self.description,
            scopes: self.scopes,
            read_only: self.read_only,
            metadata: self
                .metadata
                .map(|m| m.unwrap_or_else(|| Value::Object(Map::new()))),
            rate_limit,
            expires_at,
            revoked_at: None,
            disabled: self.disabled,
            expected_updated_at: None,
        })
    }
}

/// An RFC 3339 instant for `field`.
pub(crate) fn parse_time(field: &'static str, text: &str) -> Result<OffsetDateTime, ManageError> {
    parse_instant(text).ok_or_else(|| {
        ManageError::invalid(
            field,
            "expected an RFC 3339 timestamp such as 2030-01-31T12:00:00Z",
        )
    })
}

pub(crate) fn parse_rate_limit(text: &str) -> Result<RateLimitPolicy, ManageError> {
    text.parse().map_err(|_| {
        ManageError::invalid(
            "rate_limit",
            "expected a rate limit such as 100/min or 100/min,burst=20",
        )
    })
}
