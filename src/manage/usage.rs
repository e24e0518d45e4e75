//! Per-key usage analytics through the [`KeyManager`]: requests per hour or day and outcome,
//! from the counts the layer writes behind with its usage flush.

use serde::Serialize;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use super::{KeyManager, ManageError};
use crate::store::{hour_of, UsageOutcome, UsageSubject};

/// Bucket size of a [`UsageReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One bucket per UTC hour (at most 31 days).
    Hour,
    /// One bucket per UTC day (at most 400 days).
    Day,
}

impl Granularity {
    /// `hour` or `day`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            _ => None,
        }
    }

    fn step(self) -> Duration {
        match self {
            Self::Hour => Duration::HOUR,
            Self::Day => Duration::DAY,
        }
    }

    /// The longest span one report covers.
    pub fn max_span(self) -> Duration {
        match self {
            Self::Hour => Duration::days(31),
            Self::Day => Duration::days(400),
        }
    }

    fn floor(self, at: OffsetDateTime) -> OffsetDateTime {
        let hour = hour_of(at);
        match self {
            Self::Hour => hour,
            Self::Day => hour.replace_hour(0).unwrap_or(hour),
        }
    }
}

/// What a usage report covers: `[since, until)`, rounded out to whole buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageQuery {
    /// From (rounded down to the bucket).
    pub since: OffsetDateTime,
    /// To (exclusive; rounded up to the bucket).
    pub until: OffsetDateTime,
    /// Bucket size.
    pub granularity: Granularity,
}

impl UsageQuery {
    /// The last `span` up to `now`, in `granularity` buckets.
    pub fn last(span: Duration, now: OffsetDateTime, granularity: Granularity) -> Self {
        Self {
            since: now.checked_sub(span).unwrap_or(now),
            until: now,
            granularity,
        }
    }
}

/// Requests of one bucket by outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
pub struct UsageBucket {
    /// The bucket's start (UTC).
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "manage-api", schema(value_type = String, format = DateTime))]
    pub start: OffsetDateTime,
    /// Accepted requests.
    pub accepted: u64,
    /// Every rejection below, summed.
    pub rejected: u64,
    /// Over the rate limit.
    pub rate_limited: u64,
    /// A read-only key on an unsafe method.
    pub insufficient_scope: u64,
    /// Expired.
    pub expired: u64,
    /// Revoked or disabled.
    pub revoked: u64,
    /// Not recognised (per collection: unknown keys).
    pub invalid: u64,
    /// Not a key at all (per collection only).
    pub malformed: u64,
    /// Used from an address outside the key's allowed networks.
    pub ip_not_allowed: u64,
    /// Refused for want of credits.
    pub usage_exceeded: u64,
    /// Anything else (store unavailable, …).
    pub other: u64,
}

impl UsageBucket {
    /// An empty bucket starting at `start`.
    pub fn empty(start: OffsetDateTime) -> Self {
        Self {
            start,
            accepted: 0,
            rejected: 0,
            rate_limited: 0,
            insufficient_scope: 0,
            expired: 0,
            revoked: 0,
            invalid: 0,
            malformed: 0,
            ip_not_allowed: 0,
            usage_exceeded: 0,
            other: 0,
        }
    }

    fn add(&mut self, outcome: UsageOutcome, count: u64) {
        let slot = match outcome {
            UsageOutcome::Accepted => &mut self.accepted,
            UsageOutcome::RateLimited => &mut self.rate_limited,
            UsageOutcome::InsufficientScope => &mut self.insufficient_scope,
            UsageOutcome::Expired => &mut self.expired,
            UsageOutcome::Revoked => &mut self.revoked,
            UsageOutcome::Invalid => &mut self.invalid,
            UsageOutcome::Malformed => &mut self.malformed,
            UsageOutcome::IpNotAllowed => &mut self.ip_not_allowed,
            UsageOutcome::UsageExceeded => &mut self.usage_exceeded,
            _ => &mut self.other,
        };
        *slot = slot.saturating_add(count);
        if outcome != UsageOutcome::Accepted {
            self.rejected = self.rejected.saturating_add(count);
        }
    }
}

/// Requests per bucket for one key or collection, every bucket of the span present (zeros
/// included), oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "manage-api", derive(utoipa::ToSchema))]
pub struct UsageReport {
    /// The key (for a key's report).
    pub key_id: Option<Uuid>,
    /// The collection (for a collection's report of rejections no key is blamed for).
    pub collection: Option<String>,
    /// Bucket size.
    pub granularity: Granularity,
    /// The first bucket's start.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "manage-api", schema(value_type = String, format = DateTime))]
    pub since: OffsetDateTime,
    /// The end of the last bucket.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "manage-api", schema(value_type = String, format = DateTime))]
    pub until: OffsetDateTime,
    /// The buckets.
    pub buckets: Vec<UsageBucket>,
    /// The sums over every bucket (`start` is `since`).
    pub total: UsageBucket,
}

impl KeyManager {
    /// A key's requests per hour or day by outcome (accepted, rate limited, insufficient scope,
    /// expired, revoked, …), as written by the layers' usage flush (so up to one flush
    /// interval behind). Counts stay after the key is deleted, until the retention prunes
    /// them.
    ///
    /// # Errors
    /// [`ManageErrorKind::Invalid`](super::ManageErrorKind::Invalid) for an empty or too long
    /// span, [`ManageErrorKind::Store`](super::ManageErrorKind::Store).
    pub async fn usage(&self, id: Uuid, query: &UsageQuery) -> Result<UsageReport, ManageError> {
        self.report(UsageSubject::Key(id), query).await
    }

    /// The rejections no key could be blamed for (unknown and malformed keys) per hour or day,
    /// for credentials naming `collection` (`""` for `Bearer` and `X-Api-Key`).
    ///
    /// # Errors
    /// As [`usage`](Self::usage).
    pub async fn collection_usage(
        &self,
        collection: &str,
        query: &UsageQuery,
    ) -> Result<UsageReport, ManageError> {
        self.report(UsageSubject::Collection(collection.to_owned()), query)
            .await
    }

    async fn report(
        &self,
        subject: UsageSubject,
        query: &UsageQuery,
    ) -> Result<UsageReport, ManageError> {
        let g = query.granularity;
        let since = g.floor(query.since);
        let mut until = g.floor(query.until);
        if until < query.until {
            until = until
                .checked_add(g.step())
                .ok_or_else(|| ManageError::invalid("until", "until is too far in the future"))?;
        }
        if until <= since {
            return Err(ManageError::invalid("until", "until must be after since"));
        }
        if until - since > g.max_span() {
            return Err(ManageError::invalid(
                "since",
                format!(
                    "at most {} days per report at this granularity{}",
                    g.max_span().whole_days(),
                    if g == Granularity::Hour {
                        "; ask for days for longer spans"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let rows = self.store().usage_counts(&subject, since, until).await?;
        let mut buckets = Vec::new();
        let mut start = since;
        while start < until {
            buckets.push(UsageBucket::empty(start));
            start += g.step();
        }
        let mut total = UsageBucket::empty(since);
        for row in rows {
            let index = ((row.hour - since).whole_seconds() / g.step().whole_seconds()) as usize;
            if let Some(bucket) = buckets.get_mut(index) {
                bucket.add(row.outcome, row.count);
                total.add(row.outcome, row.count);
            }
        }
        let (key_id, collection) = match subject {
            UsageSubject::Key(id) => (Some(id), None),
            UsageSubject::Collection(slug) => (None, Some(slug)),
        };
        Ok(UsageReport {
            key_id,
            collection,
            granularity: g,
            since,
            until,
            buckets,
            total,
        })
    }

    /// Deletes usage counts older than `retention`; returns how many rows.
    ///
    /// # Errors
    /// [`ManageErrorKind::Invalid`](super::ManageErrorKind::Invalid) for a negative retention,
    /// [`ManageErrorKind::Store`](super::ManageErrorKind::Store).
    pub async fn prune_usage(&self, retention: Duration) -> Result<u64, ManageError> {
        if retention.is_negative() {
            return Err(ManageError::invalid(
                "retention",
                "the retention cannot be negative",
            ));
        }
        let before = self
            .now()
            .checked_sub(retention)
            .ok_or_else(|| ManageError::invalid("retention", "the retention is too long"))?;
        Ok(self.store().prune_usage_counts(hour_of(before)).await?)
    }
}
