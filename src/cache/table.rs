//! The found map's table: digest → value by open addressing, one 64-byte bucket per slot.
//!
//! A lookup hashes to a bucket and reads it: the digest it holds and the value beside it,
//! from one cache line. (A Swiss table, `std`'s `HashMap`, first reads a group of control
//! bytes and only then the bucket they point at: two dependent loads where this takes one.
//! Under load, with the table out of the core's caches, the first line of the hit path is
//! the most expensive one; BENCHMARKS.md, section 20.)
//!
//! Linear probing, a digest's home bucket by the multiply-shift range reduction of its first
//! eight bytes (an HMAC output: uniform, and not choosable without the secret), at most half
//! the buckets used, so a lookup that finds its digest reads about 1.2–1.5 buckets on average
//! (one that does not, 1.6–2.5: it stops at the first empty one). Removal shifts the
//! following entries back instead of leaving tombstones, so lookups never slow down with
//! churn. Growth is by half again (a table is a third to a half full), not doubling, which
//! bounds the buckets per entry at three. Sweeps go round the table from where the last one
//! stopped (see [`Table::retain`]).

use crate::secret::Digest;

/// One slot: the digest and its value, alone in a cache line (`align(64)`), so a lookup that
/// finds its digest in its home bucket reads one line.
#[repr(align(64))]
struct Bucket<V>(Option<(Digest, V)>);

impl<V> Bucket<V> {
    const EMPTY: Self = Self(None);
}

/// An open-addressing table from digests to `V`.
pub(super) struct Table<V> {
    buckets: Box<[Bucket<V>]>,
    len: usize,
    /// Where the last sweep that stopped early stopped: the next one goes on from there, so
    /// sweeps go round the table (a clock hand) instead of always starting at its start.
    hand: usize,
}

/// What [`Table::retain`] does with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Visit {
    Keep,
    Remove,
    /// Keeps it and visits no more (a sweep that has freed enough).
    Stop,
}

/// The size of a bucket holding `V`: the found map asserts it is one cache line.
pub(super) const fn bucket_size<V>() -> usize {
    std::mem::size_of::<Bucket<V>>()
}

/// The fewest buckets a table that holds anything has.
const MIN_BUCKETS: usize = 16;

/// The home bucket of `digest` among `n`: its first eight bytes, as a fraction of 2⁶⁴, times
/// `n` (uniform for uniform digests, whatever `n` is).
#[inline]
fn home(digest: &Digest, n: usize) -> usize {
    let bytes = digest.as_bytes();
    let hash = u64::from_le_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ]);
    let n = n as u64;
    // The product's high half is below `n`, so it fits in `usize`.
    ((u128::from(hash) * u128::from(n)) >> 64) as usize
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Self {
            buckets: Box::default(),
            len: 0,
            hand: 0,
        }
    }
}

impl<V> Table<V> {
    /// Entries held.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The bucket after `i`, wrapping.
    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.buckets.len() {
            0
        } else {
            i + 1
        }
    }

    /// The bucket holding `digest`, if it is held.
    #[inline]
    fn find(&self, digest: &Digest) -> Option<usize> {
        let n = self.buckets.len();
        if n == 0 {
            return None;
        }
        // Ends: at most half the buckets are used, so an empty one comes.
        let mut i = home(digest, n);
        loop {
            match &self.buckets[i].0 {
                None => return None,
                Some((held, _)) if held == digest => return Some(i),
                Some(_) => i = self.next(i),
            }
        }
    }

    /// The value of `digest`.
    #[inline]
    pub(super) fn get(&self, digest: &Digest) -> Option<&V> {
        let i = self.find(digest)?;
        self.buckets[i].0.as_ref().map(|(_, value)| value)
    }

    /// Puts `value` for `digest`, returning the value it replaces.
    pub(super) fn insert(&mut self, digest: Digest, value: V) -> Option<V> {
        if let Some(i) = self.find(&digest) {
            let slot = self.buckets[i].0.as_mut().map(|(_, held)| held);
            return slot.map(|held| std::mem::replace(held, value));
        }
        if (self.len + 1) * 2 > self.buckets.len() {
            self.grow();
        }
        self.place(digest, value);
        self.len += 1;
        None
    }

    /// Puts an entry known to be absent into the first free bucket from its home.
    fn place(&mut self, digest: Digest, value: V) {
        let mut i = home(&digest, self.buckets.len());
        while self.buckets[i].0.is_some() {
            i = self.next(i);
        }
        self.buckets[i].0 = Some((digest, value));
    }

    /// Half as many buckets again (at least [`MIN_BUCKETS`]), every entry placed anew.
    fn grow(&mut self) {
        let n = (self.buckets.len() + self.buckets.len() / 2).max(MIN_BUCKETS);
        let old = std::mem::replace(&mut self.buckets, empty(n));
        for bucket in old.into_vec() {
            if let Some((digest, value)) = bucket.0 {
                self.place(digest, value);
            }
        }
    }

    /// Removes the entry of `digest` if `doomed` says so, returning it.
    pub(super) fn remove_if(
        &mut self,
        digest: &Digest,
        doomed: impl FnOnce(&V) -> bool,
    ) -> Option<V> {
        let i = self.find(digest)?;
        let value = self.buckets[i].0.as_ref().map(|(_, value)| value)?;
        if !doomed(value) {
            return None;
        }
        Some(self.take(i))
    }

    /// Empties bucket `i` (held) and shifts back the entries after it that may move into the
    /// gap (those whose home is not between the gap and where they are), so every entry stays
    /// reachable from its home without tombstones.
    fn take(&mut self, i: usize) -> V {
        let n = self.buckets.len();
        let mut gap = i;
        let mut j = self.next(i);
        while let Some((digest, _)) = &self.buckets[j].0 {
            // How far the entry at `j` is from its home, and from the gap.
            let displaced = (j + n - home(digest, n)) % n;
            let from_gap = (j + n - gap) % n;
            if displaced >= from_gap {
                self.buckets.swap(gap, j);
                gap = j;
            }
            j = self.next(j);
        }
        self.len -= 1;
        let taken = std::mem::replace(&mut self.buckets[gap], Bucket::EMPTY);
        match taken.0 {
            Some((_, value)) => value,
            None => unreachable!("the gap holds the removed entry"),
        }
    }

    /// Visits the entries, each once, removing those `visit` says to remove, until it says
    /// to stop (or every entry is visited). Starts about where the last sweep that stopped
    /// early stopped. Returns the removed values, for the caller to drop when it likes (after
    /// releasing a lock, say).
    pub(super) fn retain(&mut self, mut visit: impl FnMut(&Digest, &V) -> Visit) -> Vec<V> {
        let mut removed = Vec::new();
        let n = self.buckets.len();
        // From just after an empty bucket (the first at or after the hand): removals shift
        // entries back into the bucket being visited, never across the empty one, so an entry
        // is never moved into a bucket already visited or visited twice.
        let from = if n == 0 { 0 } else { self.hand % n };
        let Some(empty) = (0..n)
            .map(|k| (from + k) % n)
            .find(|&i| self.buckets[i].0.is_none())
        else {
            return removed;
        };
        for step in 1..n {
            let i = (empty + step) % n;
            while let Some((digest, value)) = &self.buckets[i].0 {
                match visit(digest, value) {
                    Visit::Keep => break,
                    Visit::Remove => removed.push(self.take(i)),
                    Visit::Stop => {
                        self.hand = i;
                        return removed;
                    }
                }
            }
        }
        removed
    }

    /// Removes every entry (the buckets stay allocated), returning the values as
    /// [`Table::retain`] does.
    pub(super) fn clear(&mut self) -> Vec<V> {
        self.len = 0;
        self.buckets
            .iter_mut()
            .filter_map(|bucket| bucket.0.take().map(|(_, value)| value))
            .collect()
    }

    /// The digests held.
    #[cfg(test)]
    pub(super) fn digests(&self) -> impl Iterator<Item = &Digest> {
        self.buckets
            .iter()
            .filter_map(|bucket| bucket.0.as_ref().map(|(digest, _)| digest))
    }
}

/// `n` empty buckets.
fn empty<V>(n: usize) -> Box<[Bucket<V>]> {
    (0..n).map(|_| Bucket::EMPTY).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    /// A digest whose home is chosen by `lead` (the high byte of the hash, so homes cluster
    /// and wrap), told apart by `tag`.
    fn digest(lead: u8, tag: u16) -> Digest {
        let mut bytes = [0u8; 32];
        bytes[7] = lead;
        bytes[8..10].copy_from_slice(&tag.to_le_bytes());
        Digest::from_bytes(bytes)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u16, u32),
        /// Removes a digest that may or may not be held.
        Remove(u8, u16),
        /// Removes the `n`th held digest (modulo how many), if its value is even.
        RemoveHeldIfEven(usize),
        /// Removes the `n`th held digest (modulo how many).
        RemoveHeld(usize),
        RetainOdd,
        /// Removes the first `k` entries the sweep meets, then stops (as eviction does).
        RemoveFirst(usize),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct leads and tags: many collisions, clusters, wrap-around and replaces.
        let lead = prop_oneof![
            Just(0u8),
            Just(1),
            Just(128),
            Just(254),
            Just(255),
            any::<u8>()
        ];
        let tag = 0u16..60;
        prop_oneof![
            12 => (lead.clone(), tag.clone(), any::<u32>())
                .prop_map(|(l, t, v)| Op::Insert(l, t, v)),
            2 => (lead, tag).prop_map(|(l, t)| Op::Remove(l, t)),
            3 => any::<usize>().prop_map(Op::RemoveHeld),
            2 => any::<usize>().prop_map(Op::RemoveHeldIfEven),
            1 => Just(Op::RetainOdd),
            1 => (0usize..8).prop_map(Op::RemoveFirst),
            1 => Just(Op::Clear),
        ]
    }

    /// Every entry reachable from its home with no empty bucket between, no digest twice,
    /// the count exact, at most half the buckets used.
    fn check_invariants<V>(table: &Table<V>) {
        let n = table.buckets.len();
        let mut seen = HashSet::new();
        for (i, bucket) in table.buckets.iter().enumerate() {
            if let Some((digest, _)) = &bucket.0 {
                assert!(seen.insert(*digest.as_bytes()), "a digest held twice");
                let mut j = home(digest, n);
                while j != i {
                    assert!(
                        table.buckets[j].0.is_some(),
                        "an empty bucket on the probe path"
                    );
                    j = table.next(j);
                }
            }
        }
        assert_eq!(seen.len(), table.len());
        assert!(n == 0 || table.len() * 2 <= n, "at most half full");
    }

    /// Runs `ops` against the table and a model, checking both agree after every step.
    fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut table = Table::default();
        let mut model = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(lead, tag, value) => {
                    let d = digest(lead, tag);
                    prop_assert_eq!(table.insert(d, value), model.insert(*d.as_bytes(), value));
                }
                Op::Remove(lead, tag) => {
                    let d = digest(lead, tag);
                    prop_assert_eq!(table.remove_if(&d, |_| true), model.remove(d.as_bytes()));
                }
                Op::RemoveHeld(n) | Op::RemoveHeldIfEven(n) if !model.is_empty() => {
                    let even_only = matches!(op, Op::RemoveHeldIfEven(_));
                    let (&bytes, &value) = model.iter().nth(n % model.len()).expect("held");
                    let doomed = !even_only || value % 2 == 0;
                    let removed =
                        table.remove_if(&Digest::from_bytes(bytes), |&v| !even_only || v % 2 == 0);
                    prop_assert_eq!(removed, doomed.then_some(value));
                    if doomed {
                        model.remove(&bytes);
                    }
                }
                Op::RemoveHeld(_) | Op::RemoveHeldIfEven(_) => {}
                Op::RetainOdd => {
                    let mut visited = HashSet::new();
                    let removed = table.retain(|d, v| {
                        assert!(visited.insert(*d.as_bytes()), "visited twice");
                        if v % 2 == 1 {
                            Visit::Keep
                        } else {
                            Visit::Remove
                        }
                    });
                    prop_assert_eq!(visited.len(), model.len(), "every entry visited");
                    let mut expected: Vec<u32> =
                        model.values().copied().filter(|v| v % 2 == 0).collect();
                    let mut removed = removed;
                    expected.sort_unstable();
                    removed.sort_unstable();
                    prop_assert_eq!(removed, expected, "the removed values handed back");
                    model.retain(|_, v| *v % 2 == 1);
                }
                Op::RemoveFirst(k) => {
                    let mut removed = Vec::new();
                    let mut visited = HashSet::new();
                    let values = table.retain(|d, _| {
                        assert!(visited.insert(*d.as_bytes()), "visited twice");
                        if removed.len() == k {
                            return Visit::Stop;
                        }
                        removed.push(*d.as_bytes());
                        Visit::Remove
                    });
                    prop_assert_eq!(removed.len(), k.min(model.len()));
                    prop_assert_eq!(values.len(), removed.len());
                    for bytes in &removed {
                        prop_assert!(model.remove(bytes).is_some());
                    }
                }
                Op::Clear => {
                    prop_assert_eq!(table.clear().len(), model.len());
                    model.clear();
                }
            }
            check_invariants(&table);
            prop_assert_eq!(table.len(), model.len());
            for (bytes, value) in &model {
                prop_assert_eq!(table.get(&Digest::from_bytes(*bytes)), Some(value));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_table_behaves_as_a_map(ops in proptest::collection::vec(op(), 1..600)) {
            run(ops)?;
        }
    }

    /// The digest whose home among 16 buckets is `home`, told apart by `tag`.
    fn homed(home: u8, tag: u16) -> Digest {
        digest(home * 16, tag)
    }

    #[test]
    fn removal_keeps_wrapping_clusters_reachable() {
        // Clusters homed at 14, 15, 0 and 1 in a 16-bucket table, wrapping past the end;
        // every entry removed in turn, from a fresh table each time.
        let homes = [14u8, 15, 15, 0, 14, 1, 0];
        for victim in 0..homes.len() {
            let mut table = Table::default();
            for (tag, &h) in homes.iter().enumerate() {
                table.insert(homed(h, tag as u16), tag);
            }
            assert_eq!(table.buckets.len(), MIN_BUCKETS);
            check_invariants(&table);
            let gone = homed(homes[victim], victim as u16);
            assert_eq!(table.remove_if(&gone, |_| true), Some(victim));
            check_invariants(&table);
            for (tag, &h) in homes.iter().enumerate() {
                let held = table.get(&homed(h, tag as u16)).copied();
                assert_eq!(held, (tag != victim).then_some(tag), "{victim}: {tag}");
            }
        }
    }

    /// The `i`th of digests whose homes are spread as HMAC outputs' would be.
    fn spread(i: u32) -> Digest {
        let mut bytes = [0u8; 32];
        let hash = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        bytes[..8].copy_from_slice(&hash.to_le_bytes());
        bytes[8..12].copy_from_slice(&i.to_le_bytes());
        Digest::from_bytes(bytes)
    }

    #[test]
    fn sweeps_that_stop_early_go_round_the_table() {
        let mut table = Table::default();
        for i in 0..1_000u32 {
            table.insert(spread(i), i);
        }
        // Sweeps that give every entry a second chance, as eviction does: an entry met for
        // the first time is kept (its flag cleared), one met again goes; each sweep stops
        // after twenty entries. Going on where the last stopped, thirty sweeps meet 600
        // different entries and remove none; starting over at the table's start, the second
        // sweep would meet the first one's twenty again and remove them.
        let mut met = HashSet::new();
        let mut removed = 0;
        for _ in 0..30 {
            let mut visited = 0;
            removed += table
                .retain(|digest, _| {
                    if visited == 20 {
                        return Visit::Stop;
                    }
                    visited += 1;
                    if met.insert(*digest.as_bytes()) {
                        Visit::Keep
                    } else {
                        Visit::Remove
                    }
                })
                .len();
        }
        check_invariants(&table);
        assert_eq!((met.len(), removed), (600, 0));
    }

    #[test]
    fn remove_if_keeps_what_it_is_told_to() {
        let mut table = Table::default();
        table.insert(digest(3, 1), 10);
        assert_eq!(table.remove_if(&digest(3, 1), |&v| v == 11), None);
        assert_eq!(table.get(&digest(3, 1)), Some(&10));
        assert_eq!(table.remove_if(&digest(3, 2), |_| true), None, "absent");
        assert_eq!(table.remove_if(&digest(3, 1), |&v| v == 10), Some(10));
        assert_eq!(table.len(), 0);
        assert_eq!(table.get(&digest(3, 1)), None);
    }

    #[test]
    fn a_bucket_is_one_cache_line() {
        assert_eq!(bucket_size::<[usize; 2]>(), 64);
        assert_eq!(std::mem::align_of::<Bucket<[usize; 2]>>(), 64);
    }

    #[test]
    fn growth_keeps_the_table_a_third_to_a_half_full() {
        let mut table = Table::default();
        for i in 0..10_000u32 {
            table.insert(spread(i), i);
            let n = table.buckets.len();
            assert!(table.len() * 2 <= n);
            assert!(
                n <= MIN_BUCKETS || table.len() * 3 >= n - 3,
                "{} in {n}",
                table.len()
            );
        }
        check_invariants(&table);
    }
}
