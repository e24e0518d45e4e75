//! Per-key usage analytics as stored: requests per hour and outcome, written behind in batches
//! with the usage flush ([`KeyStore::record_usage_counts`](super::KeyStore::record_usage_counts)).

use std::fmt;

use time::OffsetDateTime;
use uuid::Uuid;

/// How a request ended, as usage analytics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum UsageOutcome {
    /// Accepted.
    Accepted,
    /// Over the key's rate limit (429).
    RateLimited,
    /// A read-only key on an unsafe method, or a scope the layer requires (403).
    InsufficientScope,
    /// An expired key (401).
    Expired,
    /// A revoked or disabled key (401).
    Revoked,
    /// A key that is not recognised: unknown, or of another collection (401).
    Invalid,
    /// A value that is not a key at all (401).
    Malformed,
    /// A key used from an address outside its allowed networks (403).
    IpNotAllowed,
    /// A key without credits left for the request (429).
    UsageExceeded,
    /// Anything else: the store unavailable, a blocked client address, …
    Other,
}

impl UsageOutcome {
    /// Every outcome, in column order.
    pub const ALL: [UsageOutcome; 10] = [
        Self::Accepted,
        Self::RateLimited,
        Self::InsufficientScope,
        Self::Expired,
        Self::Revoked,
        Self::Invalid,
        Self::Malformed,
        Self::IpNotAllowed,
        Self::UsageExceeded,
        Self::Other,
    ];

    /// `accepted`, `rate_limited`, `insufficient_scope`, `expired`, `revoked`, `invalid`,
    /// `malformed`, `ip_not_allowed`, `usage_exceeded` or `other`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::RateLimited => "rate_limited",
            Self::InsufficientScope => "insufficient_scope",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Invalid => "invalid",
            Self::Malformed => "malformed",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::UsageExceeded => "usage_exceeded",
            Self::Other => "other",
        }
    }

    /// The outcome named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == name)
    }
}

impl fmt::Display for UsageOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a count belongs to: a key, or (for rejections no key can be blamed for) a collection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UsageSubject {
    /// A key.
    Key(Uuid),
    /// A collection by slug; `""` for credentials that named none (`Bearer`, `X-Api-Key`).
    Collection(String),
}

/// Requests of one subject, hour and outcome, to add to the stored count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCount {
    /// Whose.
    pub subject: UsageSubject,
    /// The hour (UTC, truncated to the hour).
    pub hour: OffsetDateTime,
    /// How they ended.
    pub outcome: UsageOutcome,
    /// How many.
    pub count: u64,
}

/// A stored hourly count (the subject is the one asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourlyUsage {
    /// The hour.
    pub hour: OffsetDateTime,
    /// How they ended.
    pub outcome: UsageOutcome,
    /// How many.
    pub count: u64,
}

/// `at` truncated to its UTC hour.
pub fn hour_of(at: OffsetDateTime) -> OffsetDateTime {
    let Some(at) = at.checked_to_offset(time::UtcOffset::UTC) else {
        return at;
    };
    at.replace_minute(0)
        .and_then(|t| t.replace_second(0))
        .and_then(|t| t.replace_nanosecond(0))
        .unwrap_or(at)
}
