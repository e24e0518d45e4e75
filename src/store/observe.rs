//! In-process change notices: every layer built over a store hears of every change made
//! through that store handle, so two layers over one store never disagree about a revoked key,
//! however the change was made (either layer's `KeyManager`, a manager of its own, a direct
//! store call).

use std::sync::{Arc, Mutex, PoisonError, Weak};

use uuid::Uuid;

/// A change a store made that cached answers may not survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreChange {
    /// This key changed or is gone (updated, revoked, rotated, deleted, re-digested).
    Key(Uuid),
    /// A key was created: a digest cached as unknown may now be its.
    Created,
    /// Anything may have changed (a secret was retired).
    All,
}

/// Hears of a store's changes. Layers implement it; register with [`KeyStore::observe`].
///
/// [`KeyStore::observe`]: super::KeyStore::observe
pub trait StoreObserver: Send + Sync {
    /// Called after the change is stored.
    fn changed(&self, change: StoreChange);
}

/// The observers of one store (shared by its clones). Dropped observers are pruned as they are
/// found.
#[derive(Clone, Default)]
pub(crate) struct Observers(Arc<Mutex<Vec<Weak<dyn StoreObserver>>>>);

impl Observers {
    pub(crate) fn add(&self, observer: Weak<dyn StoreObserver>) {
        let mut list = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        list.retain(|o| o.strong_count() > 0);
        list.push(observer);
    }

    /// `result` of an insert, announced as [`StoreChange::Created`] when it succeeded.
    pub(crate) fn created<T, E>(&self, result: Result<T, E>) -> Result<T, E> {
        if result.is_ok() {
            self.notify(StoreChange::Created);
        }
        result
    }

    /// `result` of a write that returns the key it changed, announced for that key.
    pub(crate) fn changed<E>(
        &self,
        result: Result<Option<super::KeyRecord>, E>,
    ) -> Result<Option<super::KeyRecord>, E> {
        if let Ok(Some(record)) = &result {
            self.notify(StoreChange::Key(record.id));
        }
        result
    }

    /// `result` of a write to key `id` that says whether it changed anything.
    pub(crate) fn changed_if<E>(&self, id: Uuid, result: Result<bool, E>) -> Result<bool, E> {
        if let Ok(true) = result {
            self.notify(StoreChange::Key(id));
        }
        result
    }

    /// `result` of a write that may have changed any key.
    pub(crate) fn changed_all<T, E>(&self, result: Result<T, E>) -> Result<T, E> {
        if result.is_ok() {
            self.notify(StoreChange::All);
        }
        result
    }

    pub(crate) fn notify(&self, change: StoreChange) {
        let live: Vec<Arc<dyn StoreObserver>> = {
            let mut list = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            list.retain(|o| o.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        // Called outside the lock: an observer may take its own locks.
        for observer in live {
            observer.changed(change);
        }
    }
}

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.0.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("Observers").field("count", &count).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl StoreObserver for Count {
        fn changed(&self, _: StoreChange) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn live_observers_hear_and_dropped_ones_are_pruned() {
        let observers = Observers::default();
        let kept = Arc::new(Count::default());
        let dropped = Arc::new(Count::default());
        observers.add(Arc::downgrade(&kept) as Weak<dyn StoreObserver>);
        observers.add(Arc::downgrade(&dropped) as Weak<dyn StoreObserver>);
        drop(dropped);
        observers.clone().notify(StoreChange::Created);
        assert_eq!(kept.0.load(Ordering::SeqCst), 1);
        assert_eq!(observers.0.lock().unwrap().len(), 1);
    }
}
