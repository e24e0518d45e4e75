//! What a management caller asks for, as text: a new key or a patch, every field optional,
//! parsed here by the one set of rules (durations, instants, rate limits, free text).

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::expiry::parse_instant;
use super::validate::check_free_text;
use crate::manage::ManageError;
use crate::net::IpNetwork;
use crate::ratelimit::RateLimitPolicy;
use crate::store::{KeyPatch, OwnerKind, Refill, MAX_CREDITS};

// `Caller::new_key` fills the gaps from the caller and checks it. No container
// `#[serde(default)]`: utoipa would document a `null` default for every member.
/// A key to create. Only `name` is required; leave a member out (or send `null`) for its
/// default. Unknown members are refused (422, field `body`).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateKeyRequest)]
pub(crate) struct CreateRequest {
    /// A label for people, e.g. `ci deploys`.
    #[schema(required = true, nullable = false, examples("ci deploys"))]
    pub(crate) name: Option<String>,
    /// Free text; no control characters.
    #[schema(nullable = false)]
    pub(crate) description: Option<String>,
    /// The collection the key authenticates as; default: the caller's. It must be one a
    /// layer of the manager serves.
    #[schema(nullable = false, examples("users"))]
    pub(crate) collection: Option<String>,
    /// The owner's id within the collection; default: the caller's.
    #[schema(nullable = false)]
    pub(crate) subject: Option<String>,
    /// The owner's kind; default: the caller's.
    #[schema(nullable = false)]
    pub(crate) owner_kind: Option<OwnerKind>,
    /// The scopes granted; default: none. A `keys:self` caller grants only scopes it holds.
    #[schema(nullable = false)]
    pub(crate) scopes: Option<Vec<String>>,
    /// A read-only key may only make safe requests (GET, HEAD, OPTIONS, TRACE); default:
    /// `false`.
    #[schema(nullable = false)]
    pub(crate) read_only: Option<bool>,
    /// The environment in the key's prefix (`kw_<environment>_`); default: the caller's.
    #[schema(nullable = false, examples("live"))]
    pub(crate) environment: Option<String>,
    /// A lifetime from now such as `7d`, `30d`, `90d`, `24h` or `unlimited`. Give this or
    /// `expires_at`, not both; default: unlimited (a `keys:self` caller's own expiry).
    #[schema(nullable = false, examples("30d"))]
    pub(crate) expires_in: Option<String>,
    /// An RFC 3339 instant in the future. Give this or `expires_in`, not both.
    #[schema(nullable = false, format = DateTime, examples("2030-01-31T12:00:00Z"))]
    pub(crate) expires_at: Option<String>,
    /// A JSON object of your own; default: `{}`. No control characters.
    #[schema(nullable = false, value_type = Option<Object>)]
    pub(crate) metadata: Option<Value>,
    /// A per-key rate limit such as `100/min` or `100/min,burst=20`; default: none (the
    /// layer's default applies; a `keys:self` caller's own).
    #[schema(nullable = false, value_type = Option<RateLimitPolicy>)]
    pub(crate) rate_limit: Option<String>,
    /// The networks the key may be used from, in CIDR notation (`10.0.0.0/8`,
    /// `2001:db8::/32`) or single addresses; at most 64. Requests from elsewhere get 403
    /// `ip_not_allowed`. Default: anywhere (a `keys:self` caller's own list, which it may
    /// only narrow).
    #[schema(nullable = false)]
    pub(crate) allowed_ips: Option<Vec<String>>,
    /// Credits: how many requests the key may make in total (each costs 1, or its route's
    /// cost); at 0 it gets 429 `usage_exceeded`. Default: unlimited (a `keys:self` caller
    /// with credits: its own balance, and never more).
    #[schema(nullable = false, value_type = Option<u64>, minimum = 0, maximum = 9007199254740991_u64, examples(1000))]
    pub(crate) credits: Option<Value>,
    /// A refill such as `1000/day` or `50000/month` (30 days): the balance is set to the
    /// amount at the start of each period, counted from when the credits were set. Without
    /// `credits`, the key starts with the amount.
    #[schema(nullable = false, value_type = Option<Refill>)]
    pub(crate) refill: Option<String>,
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
        "allowed_ips",
        "credits",
        "refill",
    ];
}

/// A member that may be absent (`None`), `null` (`Some(None)`) or a value: for
/// `#[serde(default, deserialize_with = "nullable")]` on PATCH bodies.
pub(crate) fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A change to a key. Every member is optional: a member left out is left unchanged.
/// `description`, `metadata`, `rate_limit`, `expires_at` and `allowed_ips` also take `null`,
/// which clears them; the other members cannot be cleared. Unknown members are refused (422, field `body`).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PatchKeyRequest)]
pub(crate) struct PatchRequest {
    /// Absent: unchanged. A string: the new name.
    #[schema(nullable = false)]
    name: Option<String>,
    /// Absent: unchanged. `null`: removed. A string: the new description.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    description: Option<Option<String>>,
    /// Absent: unchanged. An array: replaces every scope. A `keys:self` caller sets only
    /// scopes it holds.
    #[schema(nullable = false)]
    scopes: Option<Vec<String>>,
    /// Absent: unchanged. A boolean: the new value (a `keys:self` caller may only set `true`).
    #[schema(nullable = false)]
    read_only: Option<bool>,
    /// Absent: unchanged. `null`: reset to `{}`. An object: replaces the metadata.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Object>)]
    metadata: Option<Option<Value>>,
    /// Absent: unchanged. `null`: removed (the layer's default applies). A rate limit such
    /// as `100/min,burst=20`: the new one (a `keys:self` caller may only tighten it).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<RateLimitPolicy>)]
    rate_limit: Option<Option<String>>,
    /// Absent: unchanged. `null`: never expires (a `keys:self` caller may not). An RFC 3339
    /// instant: the new expiry (a `keys:self` caller may only bring it forward).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = DateTime)]
    expires_at: Option<Option<String>>,
    /// Absent: unchanged. A boolean: disables or re-enables the key (a `keys:self` caller
    /// may only disable).
    #[schema(nullable = false)]
    disabled: Option<bool>,
    /// Absent: unchanged. An array of networks (CIDR or single addresses): replaces the
    /// allowlist. `[]` or `null`: the key may be used from anywhere. A `keys:self` caller may
    /// only narrow it, within its own.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Vec<String>>)]
    allowed_ips: Option<Option<Vec<String>>>,
    /// Absent: unchanged. A number: the new balance (voids what instances hold leased, and
    /// restarts the refill schedule from now; a `keys:self` caller may only lower it).
    /// `null`: unlimited (drops the refill too).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u64>, minimum = 0, maximum = 9007199254740991_u64)]
    credits: Option<Option<Value>>,
    /// Absent: unchanged. A refill such as `1000/day`: the new one (a key without credits
    /// starts with its amount). `null`: no refill.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Refill>)]
    refill: Option<Option<String>>,
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
        "allowed_ips",
        "credits",
        "refill",
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
            allowed_ips: match self.allowed_ips {
                Some(Some(entries)) => Some(parse_networks(&entries)?),
                Some(None) => Some(Vec::new()),
                None => None,
            },
            credits: match self.credits {
                Some(Some(credits)) => Some(Some(parse_credits(&credits)?)),
                Some(None) => Some(None),
                None => None,
            },
            credit_refill: match self.refill {
                Some(Some(text)) => Some(Some(parse_refill(&text)?)),
                Some(None) => Some(None),
                None => None,
            },
            expected_updated_at: None,
        })
    }
}

/// An allowlist as text: each entry a CIDR network or one address; sorted, without repeats.
/// A bad entry is named by its position, never repeated (it is submitted text).
pub(crate) fn parse_networks(entries: &[String]) -> Result<Vec<IpNetwork>, ManageError> {
    let mut networks = entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            entry.parse::<IpNetwork>().map_err(|error| {
                ManageError::invalid(
                    "allowed_ips",
                    format!(
                        "entry {index} is not an IP network ({}); write one such as \
                         10.0.0.0/8, 2001:db8::/32 or 192.0.2.7",
                        error.reason()
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    networks.sort();
    networks.dedup();
    Ok(networks)
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

/// A credit balance as sent: a whole number from 0 to [`MAX_CREDITS`] (any other JSON value
/// is refused with the rule, never serde's wording).
pub(crate) fn parse_credits(credits: &Value) -> Result<u64, ManageError> {
    credits
        .as_u64()
        .filter(|c| *c <= MAX_CREDITS)
        .ok_or_else(|| {
            ManageError::invalid(
                "credits",
                format!("credits must be a whole number from 0 to {MAX_CREDITS}"),
            )
        })
}

/// A refill as text.
pub(crate) fn parse_refill(text: &str) -> Result<Refill, ManageError> {
    text.parse().map_err(|_| {
        ManageError::invalid(
            "refill",
            format!(
                "expected a refill such as 1000/day, 50000/month or 10/30min: an amount from 1 \
                 to {MAX_CREDITS}, then a period of s, min, h, day, week or month (30 days), at \
                 least one second"
            ),
        )
    })
}

pub(crate) fn parse_rate_limit(text: &str) -> Result<RateLimitPolicy, ManageError> {
    text.parse().map_err(|_| {
        ManageError::invalid(
            "rate_limit",
            "expected a rate limit such as 100/min or 100/min,burst=20: N/s, N/min, N/h or \
             N/day (or a multiple such as N/30s), optionally followed by ,burst=M",
        )
    })
}
