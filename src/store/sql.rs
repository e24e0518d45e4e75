//! Helpers shared by the SQL stores.

use std::collections::BTreeMap;

use time::OffsetDateTime;
use uuid::Uuid;

use super::{KeyPage, KeyRecord, KeyUsage, StoreError, StoreErrorKind};

/// Rows per usage-update statement: large enough that a flush of thousands of keys is a few
/// statements, small enough to keep each statement's parameter and working set modest.
pub(super) const USAGE_CHUNK_ROWS: usize = 1000;

/// Sums a batch per key (saturating) and keeps each key's latest use, in id order (a fixed
/// lock order, so two concurrent batches cannot deadlock).
pub(super) fn aggregate_usage(usage: &[KeyUsage]) -> BTreeMap<Uuid, (u64, OffsetDateTime)> {
    let mut totals: BTreeMap<Uuid, (u64, OffsetDateTime)> = BTreeMap::new();
    for u in usage {
        totals
            .entry(u.id)
            .and_modify(|(uses, at)| {
                *uses = uses.saturating_add(u.uses);
                *at = (*at).max(u.last_used_at);
            })
            .or_insert((u.uses, u.last_used_at));
    }
    totals
}

/// Whether a stored instant lies in years 0000 to 9999: what RFC 3339 can write, and so what
/// the management API and the CLI can show. Rows with other instants are corrupt.
pub(super) fn in_rfc3339_range(at: &OffsetDateTime) -> bool {
    (0..=9999).contains(&at.year())
}

/// Counts beyond `i64::MAX` cannot be stored; they saturate there.
pub(super) fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A page from up to `limit + 1` rows in id order (as [`KeyPage::from_overfetch`]), skipping
/// rows that do not decode ([`StoreErrorKind::Corrupt`]) with a warning naming the key id.
///
/// A row someone wrote by hand must not make the whole listing fail, or the operator could not
/// even page past it. The cursor comes from the rows, not the decoded records, so a page with
/// skipped rows may hold fewer than `limit` items (even none) and still have a next page.
/// Errors of any other kind (a missing column) fail the page.
pub(super) fn page_skipping_corrupt<R>(
    rows: &[R],
    limit: usize,
    id: impl Fn(&R) -> Result<Uuid, StoreError>,
    decode: impl Fn(&R) -> Result<KeyRecord, StoreError>,
) -> Result<KeyPage, StoreError> {
    let page = &rows[..rows.len().min(limit)];
    let next_cursor = match page.last() {
        Some(last) if rows.len() > limit => Some(id(last)?),
        _ => None,
    };
    let mut items = Vec::with_capacity(page.len());
    for row in page {
        match decode(row) {
            Ok(record) => items.push(record),
            Err(error) if error.kind() == StoreErrorKind::Corrupt => {
                // The error names the column, never the stored value.
                match id(row) {
                    Ok(key_id) => tracing::warn!(
                        target: "keywarden",
                        %key_id,
                        %error,
                        "listing skips a stored key that cannot be read; fix or delete its row"
                    ),
                    Err(_) => tracing::warn!(
                        target: "keywarden",
                        %error,
                        "listing skips a stored key that cannot be read (its id is unreadable too)"
                    ),
                }
            }
            Err(error) => return Err(error),
        }
    }
    Ok(KeyPage { items, next_cursor })
}

/// The SQL dialects of the stores, where credits statements differ.
#[derive(Debug, Clone, Copy)]
pub(super) enum Dialect {
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    Sqlite,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Postgres,
}

impl Dialect {
    /// Parameter `n` (1-based).
    fn param(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }

    /// The two-argument minimum and maximum.
    fn min_max(self) -> (&'static str, &'static str) {
        match self {
            Dialect::Sqlite => ("MIN", "MAX"),
            Dialect::Postgres => ("LEAST", "GREATEST"),
        }
    }
}

/// The owner's policy, read with a key (correlated subqueries on the owners' primary key).
macro_rules! owner_columns {
    ($keys:literal) => {
        concat!(
            "(SELECT o.rate_limit FROM keywarden_owners AS o WHERE o.collection = ",
            $keys,
            ".collection AND o.subject = ",
            $keys,
            ".subject) AS owner_rate_limit, ",
            "(SELECT o.credits_refill FROM keywarden_owners AS o WHERE o.collection = ",
            $keys,
            ".collection AND o.subject = ",
            $keys,
            ".subject) AS owner_credits_refill, ",
            "(SELECT o.credits_generation FROM keywarden_owners AS o WHERE o.collection = ",
            $keys,
            ".collection AND o.subject = ",
            $keys,
            ".subject) AS owner_credits_generation"
        )
    };
}

/// The credit columns read with a record: the refill (on the keys row), the balance (from
/// the credits table), and the owner's policy.
pub(super) const CREDIT_COLUMNS: &str = concat!(
    "keywarden_keys.credits_refill, \
    (SELECT c.remaining FROM keywarden_credits AS c WHERE c.key_id = keywarden_keys.id) \
    AS credits_remaining, ",
    owner_columns!("keywarden_keys")
);

/// [`CREDIT_COLUMNS`] of the keys table aliased `k`.
pub(super) const KEY_CREDIT_COLUMNS: &str = concat!(
    "k.credits_refill, \
    (SELECT c.remaining FROM keywarden_credits AS c WHERE c.key_id = k.id) AS credits_remaining, ",
    owner_columns!("k")
);

/// Where a balance lives: a key's credits, or the credits an owner's keys share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CreditTable {
    /// `keywarden_credits`, by key id.
    Key,
    /// `keywarden_owner_credits`, by owner pool.
    Owner,
}

impl CreditTable {
    fn name(self) -> &'static str {
        match self {
            Self::Key => "keywarden_credits",
            Self::Owner => "keywarden_owner_credits",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Self::Key => "key_id",
            Self::Owner => "pool",
        }
    }
}

/// An owner's limits as read with a key: its rate limit text, refill text and credits
/// generation (`NULL`: no shared credits).
pub(super) fn decode_owner(
    rate_limit: Option<String>,
    refill: Option<String>,
    generation: Option<i64>,
) -> Result<super::OwnerLimits, StoreError> {
    let corrupt = |column: &str, problem: &str| {
        StoreError::new(
            StoreErrorKind::Corrupt,
            format!("stored owner policy has an invalid {column} column: {problem}"),
        )
    };
    let rate_limit = rate_limit
        .map(|p| p.parse::<crate::ratelimit::RateLimitPolicy>())
        .transpose()
        .map_err(|_| corrupt("rate_limit", "not a rate-limit policy"))?;
    let refill = refill
        .map(|r| r.parse::<super::Refill>())
        .transpose()
        .map_err(|_| corrupt("credits_refill", "not a refill"))?;
    Ok(super::OwnerLimits {
        rate_limit,
        credits: generation.map(|_| refill),
        generation: generation
            .map(u64::try_from)
            .transpose()
            .map_err(|_| corrupt("credits_generation", "negative"))?
            .unwrap_or(0),
    })
}

/// One lease, in one statement: a refill due at `now` sets the balance to the refill amount,
/// then [`CreditLease::grant`](super::CreditLease::grant) credits are taken. Every `SET`
/// expression reads the row as it was (before the statement), so `granted` is what was taken.
/// Parameters: 1 key id (or owner pool), 2 now (unix ms), 3 need, 4 want.
pub(super) fn lease_statement(dialect: Dialect, table: CreditTable) -> String {
    let p = |n| dialect.param(n);
    let (min, max) = dialect.min_max();
    let (now, need, want) = (p(2), p(3), p(4));
    let due = format!("(refill_ms IS NOT NULL AND ({now} - anchor_ms) / refill_ms > period)");
    let available = format!("(CASE WHEN {due} THEN refill_amount ELSE remaining END)");
    let share = super::credits::LEASE_SHARE;
    let grant = format!(
        "(CASE WHEN {available} < {need} THEN 0 \
         ELSE {min}({max}({min}({want}, {available} / {share}), {need}), {available}) END)"
    );
    format!(
        "UPDATE {table} SET granted = {grant}, remaining = {available} - {grant}, \
         period = CASE WHEN {due} THEN ({now} - anchor_ms) / refill_ms ELSE period END \
         WHERE {column} = {id} \
         RETURNING granted, remaining, period, generation, anchor_ms, refill_ms",
        table = table.name(),
        column = table.id(),
        id = p(1)
    )
}

/// Gives back unspent leased credits if the lease is still of the credits' generation and
/// period. Parameters: 1 key id (or owner pool), 2 amount, 3 generation, 4 period.
pub(super) fn return_statement(dialect: Dialect, table: CreditTable) -> String {
    let p = |n| dialect.param(n);
    format!(
        "UPDATE {table} SET remaining = remaining + {amount} \
         WHERE {column} = {id} AND generation = {generation} AND period = {period}",
        table = table.name(),
        column = table.id(),
        id = p(1),
        amount = p(2),
        generation = p(3),
        period = p(4)
    )
}

/// Sets a key's credits: a new balance (when parameter 6 is true; else the balance stays),
/// the refill and its schedule from now, and a new generation that voids every lease: the
/// old one plus 1, and never below parameter 7 (the time in microseconds), so credits removed
/// and set again never reuse a generation some instance still holds a lease of.
/// Parameters: 1 key id (or owner pool), 2 balance, 3 refill amount, 4 refill ms, 5 now (unix
/// ms), 6 whether the balance is set, 7 the generation floor. Returns the generation.
pub(super) fn set_credits_statement(dialect: Dialect, table: CreditTable) -> String {
    let p = |n| dialect.param(n);
    let (_, max) = dialect.min_max();
    format!(
        "INSERT INTO {table} \
         ({column}, remaining, refill_amount, refill_ms, anchor_ms, period, generation) \
         VALUES ({id}, {balance}, {amount}, {ms}, {now}, 0, {floor}) \
         ON CONFLICT ({column}) DO UPDATE SET \
         remaining = CASE WHEN {set} THEN excluded.remaining ELSE {table}.remaining END, \
         refill_amount = excluded.refill_amount, refill_ms = excluded.refill_ms, \
         anchor_ms = excluded.anchor_ms, period = 0, \
         generation = {max}({table}.generation + 1, excluded.generation) \
         RETURNING generation",
        table = table.name(),
        column = table.id(),
        id = p(1),
        balance = p(2),
        amount = p(3),
        ms = p(4),
        now = p(5),
        set = p(6),
        floor = p(7)
    )
}

/// A lease as the lease statement returns it.
pub(super) fn decode_lease(
    granted: i64,
    remaining: i64,
    period: i64,
    generation: i64,
    anchor_ms: i64,
    refill_ms: Option<i64>,
) -> Result<super::CreditLease, StoreError> {
    let count = |value: i64, column: &'static str| {
        u64::try_from(value).map_err(|_| {
            StoreError::new(
                StoreErrorKind::Corrupt,
                format!("keywarden_credits.{column} is negative"),
            )
        })
    };
    let period = count(period, "period")?;
    Ok(super::CreditLease {
        granted: count(granted, "granted")?,
        remaining: count(remaining, "remaining")?,
        period,
        generation: count(generation, "generation")?,
        period_ends_at: refill_ms.and_then(|ms| super::period_end(anchor_ms, ms, period)),
    })
}

/// The refill text of a record's credits, as the keys row keeps it.
pub(super) fn refill_text(record: &KeyRecord) -> Option<String> {
    record.credits.and_then(|c| c.refill).map(|r| r.to_string())
}

/// A key's credits from its balance (`NULL`: the key has none) and refill text.
pub(super) fn decode_credits(
    remaining: Option<i64>,
    refill: Option<String>,
) -> Result<Option<super::Credits>, StoreError> {
    let corrupt = |column: &str, problem: &str| {
        StoreError::new(
            StoreErrorKind::Corrupt,
            format!("stored key has an invalid {column} column: {problem}"),
        )
    };
    let Some(remaining) = remaining else {
        return Ok(None);
    };
    Ok(Some(super::Credits {
        remaining: u64::try_from(remaining)
            .map_err(|_| corrupt("credits_remaining", "negative"))?,
        refill: refill
            .map(|r| r.parse::<super::Refill>())
            .transpose()
            .map_err(|_| corrupt("credits_refill", "not a refill"))?,
    }))
}

/// The lowest generation credits set at `now` get: the time in microseconds.
pub(super) fn generation_floor(now: time::OffsetDateTime) -> i64 {
    i64::try_from(now.unix_timestamp_nanos() / 1_000)
        .unwrap_or(i64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::record;
    use crate::store::{Credits, Refill};

    fn corrupt<T: std::fmt::Debug>(result: Result<T, StoreError>) -> String {
        let error = result.expect_err("corrupt");
        assert_eq!(error.kind(), StoreErrorKind::Corrupt, "{error}");
        error.to_string()
    }

    #[test]
    fn usage_is_summed_per_key_with_the_latest_use() {
        let (a, b) = (Uuid::from_u128(2), Uuid::from_u128(1));
        let at = |s: i64| OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s);
        let use_of = |id, uses, s| KeyUsage {
            id,
            last_used_at: at(s),
            uses,
        };
        let totals = aggregate_usage(&[
            use_of(a, 2, 10),
            use_of(b, 1, 5),
            use_of(a, u64::MAX, 7),
            use_of(b, 3, 9),
        ]);
        let rows: Vec<_> = totals.into_iter().collect();
        assert_eq!(rows, vec![(b, (4, at(9))), (a, (u64::MAX, at(10)))]);
    }

    #[test]
    fn instants_and_counts_stay_in_what_the_columns_hold() {
        let year = |y| {
            time::Date::from_calendar_date(y, time::Month::January, 1)
                .unwrap()
                .midnight()
                .assume_utc()
        };
        assert!(in_rfc3339_range(&year(0)));
        assert!(in_rfc3339_range(&year(9999)));
        assert!(!in_rfc3339_range(&year(-1)));
        assert_eq!(clamp_i64(7), 7);
        assert_eq!(clamp_i64(u64::MAX), i64::MAX);
    }

    #[test]
    fn a_page_skips_corrupt_rows_and_keeps_its_cursor() {
        let records: Vec<KeyRecord> = (0..4).map(record).collect();
        // Rows: (index of the record, whether it decodes) — the third is corrupt.
        type Row = (usize, Result<(), StoreErrorKind>);
        let rows: Vec<Row> = vec![
            (0, Ok(())),
            (1, Ok(())),
            (2, Err(StoreErrorKind::Corrupt)),
            (3, Ok(())),
        ];
        let id = |row: &Row| Ok(records[row.0].id);
        let decode = |row: &Row| match row.1 {
            Ok(()) => Ok(records[row.0].clone()),
            Err(kind) => Err(StoreError::new(kind, "bad column")),
        };
        let ids = |page: &KeyPage| page.items.iter().map(|r| r.id).collect::<Vec<_>>();
        // limit 3 of 4 rows: a next page, after the last row of this one (the corrupt one).
        let page = page_skipping_corrupt(&rows, 3, id, decode).unwrap();
        assert_eq!(ids(&page), vec![records[0].id, records[1].id]);
        assert_eq!(page.next_cursor, Some(records[2].id));
        // All rows fit: no next page.
        let page = page_skipping_corrupt(&rows, 4, id, decode).unwrap();
        assert_eq!(
            ids(&page),
            vec![records[0].id, records[1].id, records[3].id]
        );
        assert_eq!(page.next_cursor, None);
        let page = page_skipping_corrupt(&rows, 5, id, decode).unwrap();
        assert_eq!(page.next_cursor, None);
        // Any other error fails the page.
        let rows: Vec<Row> = vec![(0, Ok(())), (1, Err(StoreErrorKind::Unavailable))];
        let error = page_skipping_corrupt(&rows, 5, id, decode).unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    }

    #[test]
    fn statements_use_each_dialects_parameters_functions_and_tables() {
        let lease = lease_statement(Dialect::Sqlite, CreditTable::Key);
        assert!(
            lease.starts_with("UPDATE keywarden_credits SET granted = "),
            "{lease}"
        );
        assert!(
            lease.contains("WHERE key_id = ?1 RETURNING granted"),
            "{lease}"
        );
        for part in ["?2 - anchor_ms", "< ?3", "MIN(MAX(MIN(?4, ", "/ 8), ?3)"] {
            assert!(lease.contains(part), "{part}: {lease}");
        }
        assert!(!lease.contains('$') && !lease.contains("LEAST"), "{lease}");
        let lease = lease_statement(Dialect::Postgres, CreditTable::Owner);
        assert!(
            lease.starts_with("UPDATE keywarden_owner_credits SET"),
            "{lease}"
        );
        assert!(lease.contains("WHERE pool = $1 RETURNING"), "{lease}");
        for part in ["$2 - anchor_ms", "LEAST(GREATEST(LEAST($4, "] {
            assert!(lease.contains(part), "{part}: {lease}");
        }
        assert!(!lease.contains('?') && !lease.contains("MIN("), "{lease}");

        assert_eq!(
            return_statement(Dialect::Sqlite, CreditTable::Key),
            "UPDATE keywarden_credits SET remaining = remaining + ?2 \
             WHERE key_id = ?1 AND generation = ?3 AND period = ?4"
        );
        assert_eq!(
            return_statement(Dialect::Postgres, CreditTable::Owner),
            "UPDATE keywarden_owner_credits SET remaining = remaining + $2 \
             WHERE pool = $1 AND generation = $3 AND period = $4"
        );

        let set = set_credits_statement(Dialect::Postgres, CreditTable::Key);
        assert!(
            set.starts_with("INSERT INTO keywarden_credits (key_id, remaining"),
            "{set}"
        );
        for part in [
            "VALUES ($1, $2, $3, $4, $5, 0, $7)",
            "ON CONFLICT (key_id) DO UPDATE",
            "CASE WHEN $6 THEN excluded.remaining ELSE keywarden_credits.remaining END",
            "GREATEST(keywarden_credits.generation + 1, excluded.generation)",
            "RETURNING generation",
        ] {
            assert!(set.contains(part), "{part}: {set}");
        }
        let set = set_credits_statement(Dialect::Sqlite, CreditTable::Owner);
        for part in [
            "INSERT INTO keywarden_owner_credits (pool, ",
            "VALUES (?1, ?2, ?3, ?4, ?5, 0, ?7)",
            "MAX(keywarden_owner_credits.generation + 1, excluded.generation)",
        ] {
            assert!(set.contains(part), "{part}: {set}");
        }
    }

    #[test]
    fn an_owner_decodes_from_its_columns_or_says_which_is_corrupt() {
        let owner = decode_owner(Some("10/s".into()), Some("5/day".into()), Some(3)).unwrap();
        assert_eq!(owner.rate_limit, Some("10/s".parse().unwrap()));
        assert_eq!(
            owner.credits,
            Some(Some("5/day".parse::<Refill>().unwrap()))
        );
        assert_eq!(owner.generation, 3);
        // Credits without a refill; no credits (a refill column without a generation is
        // ignored: the generation says whether the owner has credits).
        let owner = decode_owner(None, None, Some(1)).unwrap();
        assert_eq!((owner.rate_limit, owner.credits), (None, Some(None)));
        let owner = decode_owner(None, Some("5/day".into()), None).unwrap();
        assert_eq!((owner.credits, owner.generation), (None, 0));
        assert!(corrupt(decode_owner(Some("fast".into()), None, None)).contains("rate_limit"));
        assert!(corrupt(decode_owner(None, Some("x".into()), Some(1))).contains("credits_refill"));
        assert!(corrupt(decode_owner(None, None, Some(-1))).contains("credits_generation"));
    }

    #[test]
    fn a_lease_decodes_with_its_period_end_or_says_which_column_is_negative() {
        let lease = decode_lease(5, 95, 2, 7, 1_000, Some(60_000)).unwrap();
        assert_eq!(
            (
                lease.granted,
                lease.remaining,
                lease.period,
                lease.generation
            ),
            (5, 95, 2, 7)
        );
        assert_eq!(
            lease.period_ends_at,
            Some(OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(1_000 + 3 * 60_000))
        );
        assert_eq!(
            decode_lease(0, 0, 0, 1, 0, None).unwrap().period_ends_at,
            None
        );
        for (lease, column) in [
            (decode_lease(-1, 0, 0, 1, 0, None), "granted"),
            (decode_lease(0, -1, 0, 1, 0, None), "remaining"),
            (decode_lease(0, 0, -1, 1, 0, None), "period"),
            (decode_lease(0, 0, 0, -1, 0, None), "generation"),
        ] {
            assert!(corrupt(lease).contains(column), "{column}");
        }
    }

    #[test]
    fn credits_decode_from_balance_and_refill_and_write_back_as_text() {
        assert_eq!(decode_credits(None, Some("5/day".into())).unwrap(), None);
        let refill: Refill = "5/day".parse().unwrap();
        assert_eq!(
            decode_credits(Some(3), Some("5/day".into())).unwrap(),
            Some(Credits {
                remaining: 3,
                refill: Some(refill)
            })
        );
        assert_eq!(
            decode_credits(Some(0), None).unwrap(),
            Some(Credits {
                remaining: 0,
                refill: None
            })
        );
        assert!(corrupt(decode_credits(Some(-1), None)).contains("credits_remaining"));
        assert!(corrupt(decode_credits(Some(1), Some("often".into()))).contains("credits_refill"));

        let mut r = record(1);
        assert_eq!(refill_text(&r), None);
        r.credits = Some(Credits {
            remaining: 1,
            refill: None,
        });
        assert_eq!(refill_text(&r), None);
        r.credits = Some(Credits {
            remaining: 1,
            refill: Some(refill),
        });
        assert_eq!(refill_text(&r), Some(refill.to_string()));
        assert_eq!(refill_text(&r).unwrap().parse::<Refill>().unwrap(), refill);
    }

    #[test]
    fn the_generation_floor_is_the_time_in_microseconds() {
        let at = OffsetDateTime::UNIX_EPOCH + time::Duration::nanoseconds(5_000_123_456);
        assert_eq!(generation_floor(at), 5_000_123);
        assert_eq!(generation_floor(OffsetDateTime::UNIX_EPOCH), 1, "never 0");
    }
}
