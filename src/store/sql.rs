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
