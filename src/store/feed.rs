//! The change feed: every change that matters for verification, numbered in commit order.
//!
//! Instances apply it from the last sequence they applied ([`KeyStore::change_feed`]), so a
//! change missed on the fast path (NOTIFY, Redis pub/sub) is replayed, not repaired by dropping
//! every cached key. See [`crate::invalidation`].
//!
//! [`KeyStore::change_feed`]: super::KeyStore::change_feed

use std::collections::VecDeque;

use super::StoreChange;

/// One change in a store's feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedEntry {
    /// Its sequence number: increasing in commit order (not necessarily without gaps).
    pub seq: u64,
    /// What it means for caches.
    pub change: StoreChange,
}

impl FeedEntry {
    /// A feed entry (for custom stores).
    pub fn new(seq: u64, change: StoreChange) -> Self {
        Self { seq, change }
    }
}

/// A page of the change feed: the changes after the asked-for sequence, oldest first, and
/// where the feed stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedPage {
    /// Changes after the given sequence, in sequence order, at most the asked-for number.
    pub changes: Vec<FeedEntry>,
    /// The newest sequence in the feed (0 when it is empty).
    pub head: u64,
    /// The oldest sequence still kept (0 when it is empty): a reader whose last applied
    /// sequence is below `oldest - 1` may have missed pruned changes.
    pub oldest: u64,
}

impl FeedPage {
    /// A page (for custom stores).
    pub fn new(changes: Vec<FeedEntry>, head: u64, oldest: u64) -> Self {
        Self {
            changes,
            head,
            oldest,
        }
    }
}

/// The feed query of the SQL stores: the changes after `$1` (at most `$2`), then the newest and
/// the oldest sequence as marker rows (kind 1 and 2), in one indexed round trip.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) const FEED_SQL: &str = "SELECT * FROM (SELECT 0 AS kind, seq, key_id \
    FROM keywarden_changes WHERE seq > $1 ORDER BY seq LIMIT $2) AS changes \
    UNION ALL SELECT 1, COALESCE(MAX(seq), 0), NULL FROM keywarden_changes \
    UNION ALL SELECT 2, COALESCE(MIN(seq), 0), NULL FROM keywarden_changes";

/// Turns [`FEED_SQL`]'s rows into a page.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn page_from_rows(
    rows: impl IntoIterator<Item = (i32, i64, Option<uuid::Uuid>)>,
) -> Result<FeedPage, super::StoreError> {
    let mut page = FeedPage::default();
    for (kind, seq, key) in rows {
        let seq = u64::try_from(seq).map_err(|_| {
            super::StoreError::new(
                super::StoreErrorKind::Other,
                "the change feed holds a negative sequence",
            )
        })?;
        match kind {
            0 => page.changes.push(FeedEntry::new(
                seq,
                match key {
                    None => StoreChange::Created,
                    // A TRUNCATE.
                    Some(id) if id.is_nil() => StoreChange::All,
                    Some(id) => StoreChange::Key(id),
                },
            )),
            1 => page.head = seq,
            _ => page.oldest = seq,
        }
    }
    Ok(page)
}

/// How many changes the memory store keeps.
const MEMORY_FEED: usize = 100_000;

/// The memory store's feed, kept under its write lock.
#[derive(Debug, Default)]
pub(crate) struct MemoryFeed {
    last: u64,
    entries: VecDeque<FeedEntry>,
}

impl MemoryFeed {
    pub(crate) fn push(&mut self, change: StoreChange) {
        self.last += 1;
        self.entries.push_back(FeedEntry::new(self.last, change));
        if self.entries.len() > MEMORY_FEED {
            self.entries.pop_front();
        }
    }

    pub(crate) fn page(&self, after: u64, limit: usize) -> FeedPage {
        let start = self.entries.partition_point(|e| e.seq <= after);
        FeedPage {
            changes: self
                .entries
                .iter()
                .skip(start)
                .take(limit)
                .copied()
                .collect(),
            head: self.last,
            oldest: self.entries.front().map_or(0, |e| e.seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_from_a_sequence_and_forgets_the_oldest() {
        let mut feed = MemoryFeed::default();
        assert_eq!(feed.page(0, 10), FeedPage::default());
        for _ in 0..5 {
            feed.push(StoreChange::Created);
        }
        let page = feed.page(2, 2);
        assert_eq!(
            page.changes.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!((page.head, page.oldest), (5, 1));
        assert!(feed.page(5, 10).changes.is_empty());
        for _ in 0..MEMORY_FEED {
            feed.push(StoreChange::All);
        }
        let page = feed.page(0, 1);
        assert_eq!(page.oldest, 6);
        assert_eq!(page.changes[0].seq, 6);
        assert_eq!(page.head, 5 + MEMORY_FEED as u64);
    }
}
