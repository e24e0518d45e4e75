//! Helpers shared by the SQL stores.

use std::collections::BTreeMap;

use time::OffsetDateTime;
use uuid::Uuid;

use super::KeyUsage;

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

/// Counts beyond `i64::MAX` cannot be stored; they saturate there.
pub(super) fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
