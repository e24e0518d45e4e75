//! Credits on the request path: each cached key with credits has an account holding the
//! credits this instance leased from the store; requests spend from it with one atomic
//! subtraction, and only an empty (or void) account asks the store for another lease.
//!
//! Conservation: at every moment a key's credits are in the store, in some instance's account,
//! or spent. A lease moves credits from the store into an account in one atomic statement;
//! an account gives back what it holds (one atomic swap, so nothing is both spent and given
//! back) when its key leaves the cache, after sitting idle, or at shutdown. A lease of an
//! earlier generation (the credits were set since) or of a finished refill period is void: its
//! credits are dropped, neither spent nor given back. So all instances together never accept
//! more than the balance; a crashed instance loses at most what it held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::clock::Clock;
use crate::rejection::AuthRejection;
use crate::store::{unix_millis, CreditLease, KeyStore, StoreError};

/// How leases are sized and kept: see
/// [`ApiKeyLayerBuilder::credit_leases`](crate::ApiKeyLayerBuilder::credit_leases).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseConfig {
    /// The most credits one lease takes (it takes less when the balance is low: an eighth of
    /// what is left, at least what the request needs).
    pub(crate) max_block: u64,
    /// A lease unused this long goes back to the store.
    pub(crate) idle: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            max_block: 100,
            idle: Duration::from_secs(10),
        }
    }
}

/// How long a key whose lease came back empty is refused from memory before the store is
/// asked again (other instances may give credits back meanwhile).
const EMPTY_BACKOFF_MS: i64 = 1_000;

/// Counters of the ledger's store round trips.
#[derive(Debug, Default)]
pub(crate) struct LedgerCounters {
    pub(crate) leases: AtomicU64,
    pub(crate) returns: AtomicU64,
    pub(crate) failures: AtomicU64,
}

/// One layer's credit accounts and their traffic with the store.
pub(crate) struct CreditLedger {
    store: Arc<dyn KeyStore>,
    clock: Arc<dyn Clock>,
    config: LeaseConfig,
    /// Whether the layer caches keys: an uncached layer's account lives for one request, so
    /// it leases exactly what the request costs.
    cached: bool,
    store_timeout: Duration,
    /// Unspent credits of dropped accounts, to the returner task.
    returns: Mutex<Option<mpsc::UnboundedSender<Returned>>>,
    /// Every live account, for the idle sweep and shutdown.
    accounts: Mutex<Vec<Weak<AccountState>>>,
    /// The live accounts of owners' shared credits, by pool and generation: all the cached
    /// keys of one owner spend from one account, until its credits are set again (keys read
    /// after that get a new account; the old one's credits are void, as a key's would be).
    owners: Mutex<HashMap<(Uuid, u64), Weak<CreditAccount>>>,
    pub(crate) counters: LedgerCounters,
}

impl std::fmt::Debug for CreditLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreditLedger")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Whose balance an account draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pool {
    /// A key's own credits.
    Key(Uuid),
    /// The credits all the keys of an owner share.
    Owner(Uuid),
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key(id) => write!(f, "key {id}"),
            Self::Owner(pool) => write!(f, "owner pool {pool}"),
        }
    }
}

/// Credits given back.
#[derive(Debug, Clone, Copy)]
struct Returned {
    key: Pool,
    amount: u64,
    generation: u64,
    period: u64,
}

/// The lease an account's credits came from.
#[derive(Debug, Clone, Copy, Default)]
struct LeaseTag {
    generation: u64,
    period: u64,
}

/// What an account holds, shared between the cached key (which owns it) and the ledger's
/// registry (which only looks).
#[derive(Debug)]
pub(crate) struct AccountState {
    key: Pool,
    /// Credits this instance may spend now.
    local: AtomicU64,
    /// The store's balance after the last lease (for `Credits-Remaining`).
    store_left: AtomicU64,
    /// Unix ms at which the held credits' refill period ends; `i64::MAX` without a refill.
    void_at_ms: AtomicI64,
    /// Spent from since the last idle sweep.
    used: AtomicBool,
    /// Unix ms until which the store is known to have too few credits for this key (its last
    /// lease granted none): requests are refused from memory meanwhile, so a spent key does not
    /// cost a store write per request. 0: not known.
    empty_until_ms: AtomicI64,
    tag: Mutex<LeaseTag>,
    /// One lease at a time per account.
    refresh: tokio::sync::Mutex<()>,
}

/// A cached key's credits on this instance. Dropping it (the key left the cache) gives its
/// unspent credits back.
#[derive(Debug)]
pub(crate) struct CreditAccount {
    state: Arc<AccountState>,
    ledger: Weak<CreditLedger>,
}

impl Drop for CreditAccount {
    fn drop(&mut self) {
        if let Some(ledger) = self.ledger.upgrade() {
            if let Some(returned) = self.state.take_back(ledger.now_ms()) {
                ledger.send_back(returned);
            }
        }
    }
}

impl AccountState {
    /// Spends `cost` from what this instance holds, if it holds enough of a live lease:
    /// the credits left afterwards (this instance's and the store's), else `None`.
    fn try_spend(&self, cost: u64, now_ms: impl FnOnce() -> i64) -> Option<u64> {
        let void_at = self.void_at_ms.load(Ordering::Acquire);
        if void_at != i64::MAX && now_ms() >= void_at {
            return None;
        }
        let before = self
            .local
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_sub(cost)
            })
            .ok()?;
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        Some((before - cost).saturating_add(self.store_left.load(Ordering::Relaxed)))
    }

    /// Takes every held credit for giving back (`None` when none are held, or the lease's
    /// period ended at `now_ms` — its credits are void then and simply dropped).
    fn take_back(&self, now_ms: i64) -> Option<Returned> {
        // The tag first, held across the swap: a lease absorbed meanwhile (which takes the
        // lock) cannot pass its credits off under the old tag, or the old ones under its.
        let tag = self.tag.lock().unwrap_or_else(|e| e.into_inner());
        let amount = self.local.swap(0, Ordering::AcqRel);
        if amount == 0 || now_ms >= self.void_at_ms.load(Ordering::Acquire) {
            return None;
        }
        let tag = *tag;
        Some(Returned {
            key: self.key,
            amount,
            generation: tag.generation,
            period: tag.period,
        })
    }
}

impl CreditLedger {
    /// A ledger over `store`. Its worker (returns, idle sweep) starts with the first account,
    /// on that runtime (without one, unspent credits of dropped accounts are lost: fewer
    /// accepted, never more).
    pub(crate) fn new(
        store: Arc<dyn KeyStore>,
        clock: Arc<dyn Clock>,
        config: LeaseConfig,
        cached: bool,
        store_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            clock,
            config,
            cached,
            store_timeout,
            returns: Mutex::new(None),
            accounts: Mutex::new(Vec::new()),
            owners: Mutex::new(HashMap::new()),
            counters: LedgerCounters::default(),
        })
    }

    /// Starts the worker (returns and the idle sweep) on the current runtime, with the first
    /// account: a layer whose keys have no credits runs none. It ends when the ledger goes.
    fn start_worker(self: &Arc<Self>) {
        let mut returns = self.returns.lock().unwrap_or_else(|e| e.into_inner());
        if returns.is_some() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (sender, receiver) = mpsc::unbounded_channel();
            *returns = Some(sender);
            runtime.spawn(worker(Arc::downgrade(self), receiver, self.config.idle));
        }
    }

    /// The account of an owner's shared credits of `generation`: the live one, if another
    /// cached key of the owner has it, else a new, empty one.
    pub(crate) fn owner_account(
        self: &Arc<Self>,
        pool: Uuid,
        generation: u64,
    ) -> Arc<CreditAccount> {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(account) = owners.get(&(pool, generation)).and_then(Weak::upgrade) {
            return account;
        }
        if owners.len() >= 64 && owners.len().is_power_of_two() {
            owners.retain(|_, a| a.strong_count() > 0);
        }
        let account = Arc::new(self.new_account(Pool::Owner(pool)));
        owners.insert((pool, generation), Arc::downgrade(&account));
        account
    }

    /// A new, empty account for key `key`.
    pub(crate) fn account(self: &Arc<Self>, key: Uuid) -> CreditAccount {
        self.new_account(Pool::Key(key))
    }

    fn new_account(self: &Arc<Self>, key: Pool) -> CreditAccount {
        self.start_worker();
        let state = Arc::new(AccountState {
            key,
            local: AtomicU64::new(0),
            store_left: AtomicU64::new(0),
            void_at_ms: AtomicI64::new(i64::MAX),
            used: AtomicBool::new(false),
            empty_until_ms: AtomicI64::new(0),
            tag: Mutex::new(LeaseTag::default()),
            refresh: tokio::sync::Mutex::new(()),
        });
        if self.cached {
            let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
            if accounts.len() >= 64 && accounts.len().is_power_of_two() {
                accounts.retain(|a| a.strong_count() > 0);
            }
            accounts.push(Arc::downgrade(&state));
        }
        CreditAccount {
            state,
            ledger: Arc::downgrade(self),
        }
    }

    fn now_ms(&self) -> i64 {
        unix_millis(self.clock.now())
    }

    /// The hit path: spends `cost` from what the account holds, without waiting. `None`: the
    /// store must be asked ([`charge`](Self::charge)).
    pub(crate) fn spend_now(&self, account: &CreditAccount, cost: u64) -> Option<u64> {
        account.state.try_spend(cost, || self.now_ms())
    }

    /// The credits this instance knows are left: what it holds plus the store's balance at
    /// its last lease.
    pub(crate) fn known_left(&self, account: &CreditAccount) -> u64 {
        let state = &account.state;
        state
            .local
            .load(Ordering::Acquire)
            .saturating_add(state.store_left.load(Ordering::Relaxed))
    }

    /// Gives `amount` spent credits back to what the account holds: a request charged more
    /// than its route costs, or refused after it was charged.
    pub(crate) fn refund(&self, account: &CreditAccount, amount: u64) {
        if amount > 0 {
            account.state.local.fetch_add(amount, Ordering::AcqRel);
        }
    }

    /// Spends `cost` credits of `account`'s key, leasing from the store when the account
    /// holds too few: the credits left, or `usage_exceeded` (with `Retry-After` when a
    /// refill is scheduled). `Ok(None)`: the key has no credits in the store any more.
    /// `unavailable` answers a store that fails or times out.
    pub(crate) async fn charge(
        &self,
        account: &CreditAccount,
        cost: u64,
        unavailable: impl Fn() -> AuthRejection,
    ) -> Result<Option<u64>, AuthRejection> {
        let state = &account.state;
        let now_ms = self.now_ms();
        if let Some(left) = state.try_spend(cost, || now_ms) {
            return Ok(Some(left));
        }
        if let Some(rejection) = self.known_empty(state, cost, now_ms) {
            return Err(rejection);
        }
        let Ok(_turn) = tokio::time::timeout(self.store_timeout, state.refresh.lock()).await else {
            return Err(unavailable());
        };
        // Two rounds: a lease of a new generation voids what was held, and the request may
        // then need a second lease for its full cost.
        for _ in 0..2 {
            let now = self.clock.now();
            let now_ms = unix_millis(now);
            if let Some(left) = state.try_spend(cost, || now_ms) {
                return Ok(Some(left));
            }
            // Queued behind a lease that found the store empty: refused from memory.
            if let Some(rejection) = self.known_empty(state, cost, now_ms) {
                return Err(rejection);
            }
            if now_ms >= state.void_at_ms.load(Ordering::Acquire) {
                // The held credits' period is over: a refill set the balance anew.
                state.local.store(0, Ordering::Release);
            }
            let held = state.local.load(Ordering::Acquire);
            let need = cost.saturating_sub(held).max(1);
            let want = if self.cached {
                self.config.max_block.max(need)
            } else {
                need
            };
            let lease = match self.lease(state.key, need, want, now).await {
                Ok(Some(lease)) => lease,
                // The key's credits were removed (its cache entry is about to be dropped):
                // nothing to count.
                Ok(None) => return Ok(None),
                Err(error) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "keywarden", credits = %state.key, error = %error, "leasing credits failed; the request is refused");
                    return Err(unavailable());
                }
            };
            self.absorb(state, &lease);
            if let Some(left) = state.try_spend(cost, || now_ms) {
                return Ok(Some(left));
            }
            if lease.granted == 0 {
                // Remembered for a moment (never past the next refill): until then requests
                // are refused from memory, not with a store write each.
                let until = now_ms.saturating_add(EMPTY_BACKOFF_MS);
                let until = lease
                    .period_ends_at
                    .map_or(until, |end| until.min(unix_millis(end)));
                state.empty_until_ms.store(until, Ordering::Release);
                return Err(self.exceeded(state, now_ms));
            }
        }
        Err(AuthRejection::usage_exceeded(None))
    }

    /// The hit path for a key and its owner (either account may be absent, not both):
    /// spends `cost` from each without waiting, and answers the fewer credits left. `None`:
    /// one of them must lease first ([`charge_both`](Self::charge_both)); nothing stays spent.
    pub(crate) fn spend_now_both(
        &self,
        key: Option<&CreditAccount>,
        owner: Option<&CreditAccount>,
        cost: u64,
    ) -> Option<u64> {
        let key_left = match key {
            Some(account) => Some(self.spend_now(account, cost)?),
            None => None,
        };
        let owner_left = match owner {
            Some(account) => match self.spend_now(account, cost) {
                Some(left) => Some(left),
                None => {
                    if let Some(account) = key {
                        self.refund(account, cost);
                    }
                    return None;
                }
            },
            None => None,
        };
        fewer(key_left, owner_left)
    }

    /// [`charge`](Self::charge) for a key and its owner: the key's credits first, then the
    /// owner's; a request the owner cannot pay for gets its key's back. The fewer credits
    /// left (`None`: neither has credits in the store any more).
    pub(crate) async fn charge_both(
        &self,
        key: Option<&CreditAccount>,
        owner: Option<&CreditAccount>,
        cost: u64,
        unavailable: impl Fn() -> AuthRejection,
    ) -> Result<Option<u64>, AuthRejection> {
        let key_left = match key {
            Some(account) => self.charge(account, cost, &unavailable).await?,
            None => None,
        };
        let owner_left = match owner {
            Some(account) => match self.charge(account, cost, &unavailable).await {
                Ok(left) => left,
                Err(rejection) => {
                    if let (Some(account), Some(_)) = (key, key_left) {
                        self.refund(account, cost);
                    }
                    return Err(
                        if rejection.kind() == crate::rejection::RejectionKind::UsageExceeded {
                            rejection.with_detail(
                                "the credits this key's owner shares with its other keys are used up",
                            )
                        } else {
                            rejection
                        },
                    );
                }
            },
            None => None,
        };
        Ok(fewer(key_left, owner_left))
    }

    /// [`known_left`](Self::known_left) of a key and its owner: the fewer.
    pub(crate) fn known_left_both(
        &self,
        key: Option<&CreditAccount>,
        owner: Option<&CreditAccount>,
    ) -> Option<u64> {
        fewer(
            key.map(|a| self.known_left(a)),
            owner.map(|a| self.known_left(a)),
        )
    }

    /// [`refund`](Self::refund) to a key and its owner.
    pub(crate) fn refund_both(
        &self,
        key: Option<&CreditAccount>,
        owner: Option<&CreditAccount>,
        amount: u64,
    ) {
        for account in [key, owner].into_iter().flatten() {
            self.refund(account, amount);
        }
    }

    /// `usage_exceeded`, if the store was found a moment ago to hold fewer credits for this
    /// key than `cost` needs beyond what the account holds (a cheaper request still asks).
    fn known_empty(&self, state: &AccountState, cost: u64, now_ms: i64) -> Option<AuthRejection> {
        let recent = now_ms < state.empty_until_ms.load(Ordering::Acquire);
        let short = cost
            > state
                .local
                .load(Ordering::Acquire)
                .saturating_add(state.store_left.load(Ordering::Relaxed));
        (recent && short).then(|| self.exceeded(state, now_ms))
    }

    /// `usage_exceeded`, with `Retry-After` until the held lease's period ends (the next
    /// refill) when the key has a refill.
    fn exceeded(&self, state: &AccountState, now_ms: i64) -> AuthRejection {
        let void_at = state.void_at_ms.load(Ordering::Acquire);
        let retry = (void_at != i64::MAX).then(|| {
            let millis = u64::try_from(void_at.saturating_sub(now_ms)).unwrap_or(0);
            Duration::from_millis(millis).max(Duration::from_secs(1))
        });
        AuthRejection::usage_exceeded(retry)
    }

    /// Puts a lease's credits into the account: a lease of another generation or period
    /// first voids what the account held.
    fn absorb(&self, state: &AccountState, lease: &CreditLease) {
        let mut tag = state.tag.lock().unwrap_or_else(|e| e.into_inner());
        if tag.generation != lease.generation || tag.period != lease.period {
            state.local.store(0, Ordering::Release);
            *tag = LeaseTag {
                generation: lease.generation,
                period: lease.period,
            };
        }
        let void_at = lease.period_ends_at.map_or(i64::MAX, unix_millis);
        state.void_at_ms.store(void_at, Ordering::Release);
        state.store_left.store(lease.remaining, Ordering::Relaxed);
        state.local.fetch_add(lease.granted, Ordering::AcqRel);
        if lease.granted > 0 {
            state.empty_until_ms.store(0, Ordering::Release);
        }
    }

    async fn lease(
        &self,
        key: Pool,
        need: u64,
        want: u64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditLease>, StoreError> {
        self.counters.leases.fetch_add(1, Ordering::Relaxed);
        let leasing = async {
            match key {
                Pool::Key(id) => self.store.lease_credits(id, need, want, now).await,
                Pool::Owner(pool) => self.store.lease_owner_credits(pool, need, want, now).await,
            }
        };
        let leased = tokio::time::timeout(self.store_timeout, leasing).await;
        leased.unwrap_or_else(|_| {
            Err(StoreError::new(
                crate::store::StoreErrorKind::Timeout,
                "leasing credits timed out",
            ))
        })
    }

    fn send_back(&self, returned: Returned) {
        let sender = self.returns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = sender.as_ref() {
            let _ = sender.send(returned);
        }
    }

    async fn give_back(&self, returned: Returned) {
        self.counters.returns.fetch_add(1, Ordering::Relaxed);
        let (amount, generation, period) = (returned.amount, returned.generation, returned.period);
        let done = match returned.key {
            Pool::Key(id) => {
                self.store
                    .return_credits(id, amount, generation, period)
                    .await
            }
            Pool::Owner(pool) => {
                self.store
                    .return_owner_credits(pool, amount, generation, period)
                    .await
            }
        };
        if let Err(error) = done {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "keywarden", credits = %returned.key, error = %error, "returning unspent credits failed; they are lost (the key accepts fewer requests, never more)");
        }
    }

    /// Gives back every account's unspent credits now: at shutdown, or to hand an idle
    /// instance's credits to the others. Accounts lease again on their next request.
    pub(crate) async fn return_all(&self) {
        let now_ms = self.now_ms();
        let accounts: Vec<Arc<AccountState>> = self
            .accounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let (mut accounts_returned, mut credits) = (0_usize, 0_u64);
        for state in accounts {
            if let Some(returned) = state.take_back(now_ms) {
                accounts_returned += 1;
                credits = credits.saturating_add(returned.amount);
                self.give_back(returned).await;
            }
        }
        if accounts_returned > 0 {
            tracing::info!(target: "keywarden", accounts = accounts_returned, credits, "gave back the credits leased and not spent (keys' and owners')");
        }
    }

    /// Gives back the credits of accounts not spent from since the last sweep.
    async fn sweep_idle(&self) {
        let now_ms = self.now_ms();
        let mut idle = Vec::new();
        {
            let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
            accounts.retain(|account| match account.upgrade() {
                Some(state) => {
                    if !state.used.swap(false, Ordering::Relaxed)
                        && state.local.load(Ordering::Relaxed) > 0
                    {
                        idle.push(state);
                    }
                    true
                }
                None => false,
            });
        }
        for state in idle {
            if let Some(returned) = state.take_back(now_ms) {
                self.give_back(returned).await;
            }
        }
    }
}

/// The smaller of two counts, either of which may be absent.
fn fewer(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Writes the credits of dropped accounts back, and every `idle` gives back the leases that
/// sat unused since the last round; ends when the ledger goes (its sender with it).
async fn worker(
    ledger: Weak<CreditLedger>,
    mut receiver: mpsc::UnboundedReceiver<Returned>,
    idle: Duration,
) {
    let mut ticks = tokio::time::interval(idle.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            returned = receiver.recv() => {
                let (Some(returned), Some(ledger)) = (returned, ledger.upgrade()) else {
                    return;
                };
                ledger.give_back(returned).await;
            }
            _ = ticks.tick() => {
                let Some(ledger) = ledger.upgrade() else {
                    return;
                };
                ledger.sweep_idle().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::MemoryStore;

    fn ledger(cached: bool) -> (Arc<CreditLedger>, ManualClock) {
        let clock = ManualClock::new(OffsetDateTime::UNIX_EPOCH + time::Duration::days(1));
        let ledger = CreditLedger::new(
            Arc::new(MemoryStore::new()),
            Arc::new(clock.clone()),
            LeaseConfig::default(),
            cached,
            Duration::from_secs(1),
        );
        (ledger, clock)
    }

    fn lease(granted: u64, remaining: u64, generation: u64, ends_ms: Option<i64>) -> CreditLease {
        CreditLease {
            granted,
            remaining,
            period: 0,
            generation,
            period_ends_at: ends_ms.map(|ms| {
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap()
            }),
        }
    }

    #[tokio::test]
    async fn an_account_spends_what_it_holds_and_nothing_more() {
        let (ledger, _clock) = ledger(true);
        let account = ledger.account(Uuid::now_v7());
        assert_eq!(ledger.spend_now(&account, 1), None, "holds nothing yet");
        ledger.absorb(&account.state, &lease(10, 90, 1, None));
        assert_eq!(ledger.spend_now(&account, 3), Some(7 + 90));
        assert_eq!(ledger.spend_now(&account, 8), None, "only 7 held");
        assert_eq!(ledger.spend_now(&account, 7), Some(90));
        assert_eq!(ledger.known_left(&account), 90);
        ledger.refund(&account, 2);
        assert_eq!(ledger.known_left(&account), 92);
    }

    #[tokio::test]
    async fn a_lease_of_another_generation_voids_what_was_held() {
        let (ledger, _clock) = ledger(true);
        let account = ledger.account(Uuid::now_v7());
        ledger.absorb(&account.state, &lease(10, 0, 1, None));
        ledger.absorb(&account.state, &lease(2, 0, 2, None));
        assert_eq!(
            ledger.known_left(&account),
            2,
            "the 10 of generation 1 are void"
        );
        let back = account.state.take_back(0).unwrap();
        assert_eq!((back.amount, back.generation), (2, 2));
        assert_eq!(
            account.state.take_back(0).map(|r| r.amount),
            None,
            "given back once"
        );
    }

    #[tokio::test]
    async fn a_finished_period_voids_the_lease() {
        let (ledger, clock) = ledger(true);
        let now = unix_millis(clock.now());
        let account = ledger.account(Uuid::now_v7());
        ledger.absorb(&account.state, &lease(10, 0, 1, Some(now + 1_000)));
        assert!(ledger.spend_now(&account, 1).is_some());
        clock.advance(time::Duration::seconds(1));
        assert_eq!(ledger.spend_now(&account, 1), None, "the period is over");
        assert!(
            account.state.take_back(unix_millis(clock.now())).is_none(),
            "void credits are not given back"
        );
    }

    /// A ledger over a memory store holding one key with `credits`.
    async fn ledger_with(
        credits: crate::store::Credits,
        config: LeaseConfig,
    ) -> (Arc<CreditLedger>, ManualClock, Arc<MemoryStore>, Uuid) {
        // The memory store anchors refills at the real time of the insert.
        let clock = ManualClock::new(OffsetDateTime::now_utc());
        let store = Arc::new(MemoryStore::new());
        let mut record = crate::store::test_support::record(1);
        record.credits = Some(credits);
        store.insert(&record).await.unwrap();
        let ledger = CreditLedger::new(
            store.clone(),
            Arc::new(clock.clone()),
            config,
            true,
            Duration::from_secs(1),
        );
        (ledger, clock, store, record.id)
    }

    async fn balance(store: &MemoryStore, id: Uuid) -> u64 {
        let record = store.get(id).await.unwrap().unwrap();
        record.credits.unwrap().remaining
    }

    fn refused(result: Result<Option<u64>, AuthRejection>) -> AuthRejection {
        let rejection = result.expect_err("refused");
        assert_eq!(
            rejection.kind(),
            crate::rejection::RejectionKind::UsageExceeded
        );
        rejection
    }

    #[tokio::test]
    async fn charges_accept_exactly_the_balance_then_refuse_from_memory() {
        let (ledger, _clock, store, id) =
            ledger_with(crate::store::Credits::new(250), LeaseConfig::default()).await;
        let account = ledger.account(id);
        let unavailable = || AuthRejection::usage_exceeded(None).with_detail("store down");
        let mut accepted = 0;
        let mut last_left = u64::MAX;
        loop {
            match ledger.charge(&account, 1, unavailable).await {
                Ok(Some(left)) => {
                    assert!(left < last_left, "the credits left go down");
                    last_left = left;
                    accepted += 1;
                }
                Ok(None) => panic!("the key has credits"),
                Err(rejection) => {
                    assert_eq!(
                        rejection.detail(),
                        AuthRejection::usage_exceeded(None).detail()
                    );
                    break;
                }
            }
            assert!(accepted <= 250);
        }
        assert_eq!(accepted, 250, "exactly the balance");
        assert_eq!(last_left, 0);
        assert_eq!(balance(&store, id).await, 0);
        assert_eq!(ledger.known_left(&account), 0);
        // Refused again without asking the store, for a moment.
        let leases = ledger.counters.leases.load(Ordering::Relaxed);
        let rejection = refused(ledger.charge(&account, 1, unavailable).await);
        assert_eq!(rejection.retry_after(), None, "no refill, no Retry-After");
        assert_eq!(ledger.counters.leases.load(Ordering::Relaxed), leases);
    }

    /// A lease that found too few credits is remembered for a second (never past the next
    /// refill): requests costing more than the store was found to hold are refused from
    /// memory; a cheaper one still asks.
    #[tokio::test]
    async fn an_empty_lease_is_remembered_only_for_what_it_could_not_pay() {
        let (ledger, clock, _store, id) =
            ledger_with(crate::store::Credits::new(5), LeaseConfig::default()).await;
        let account = ledger.account(id);
        let unavailable = || AuthRejection::usage_exceeded(None).with_detail("store down");
        let leases = || ledger.counters.leases.load(Ordering::Relaxed);
        refused(ledger.charge(&account, 10, unavailable).await);
        assert_eq!(leases(), 1);
        assert_eq!(
            ledger.known_left(&account),
            5,
            "the store's balance is known"
        );
        refused(ledger.charge(&account, 10, unavailable).await);
        assert_eq!(leases(), 1, "refused from memory");
        clock.advance(time::Duration::milliseconds(999));
        refused(ledger.charge(&account, 6, unavailable).await);
        assert_eq!(leases(), 1, "still refused from memory");
        clock.advance(time::Duration::milliseconds(1));
        refused(ledger.charge(&account, 10, unavailable).await);
        assert_eq!(leases(), 2, "a second later the store is asked again");
        assert_eq!(
            ledger.charge(&account, 5, unavailable).await.unwrap(),
            Some(0),
            "a request the store can pay asks, and is paid"
        );
        assert_eq!(leases(), 3);
    }

    #[tokio::test]
    async fn a_refilled_key_is_refused_until_its_next_refill() {
        let refill = crate::store::Refill::new(3, Duration::from_secs(60)).unwrap();
        let (ledger, clock, _store, id) = ledger_with(
            crate::store::Credits::new(3).with_refill(refill),
            LeaseConfig::default(),
        )
        .await;
        let account = ledger.account(id);
        let unavailable = || AuthRejection::usage_exceeded(None).with_detail("store down");
        for _ in 0..3 {
            assert!(ledger
                .charge(&account, 1, unavailable)
                .await
                .unwrap()
                .is_some());
        }
        clock.advance(time::Duration::seconds(20));
        let rejection = refused(ledger.charge(&account, 1, unavailable).await);
        let retry = rejection
            .retry_after()
            .expect("Retry-After until the refill");
        assert!(
            retry > Duration::from_secs(35) && retry <= Duration::from_secs(40),
            "{retry:?}"
        );
        clock.advance(time::Duration::seconds(40));
        assert!(
            ledger
                .charge(&account, 1, unavailable)
                .await
                .unwrap()
                .is_some(),
            "refilled"
        );
    }

    #[tokio::test]
    async fn a_lease_of_another_period_voids_what_was_held_and_a_paying_one_clears_empty() {
        let (ledger, _clock) = ledger(true);
        let account = ledger.account(Uuid::now_v7());
        ledger.absorb(&account.state, &lease(10, 0, 1, None));
        let mut next = lease(2, 0, 1, None);
        next.period = 1;
        ledger.absorb(&account.state, &next);
        assert_eq!(
            ledger.known_left(&account),
            2,
            "the 10 of period 0 are void"
        );
        account.state.empty_until_ms.store(77, Ordering::Release);
        ledger.absorb(&account.state, &lease(0, 0, 1, None));
        assert_eq!(
            account.state.empty_until_ms.load(Ordering::Acquire),
            77,
            "an empty lease leaves it"
        );
        ledger.absorb(&account.state, &lease(1, 0, 1, None));
        assert_eq!(account.state.empty_until_ms.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_key_and_its_owner_are_spent_together_and_answer_the_fewer() {
        let (ledger, _clock) = ledger(true);
        let key = ledger.account(Uuid::now_v7());
        let owner = ledger.account(Uuid::now_v7());
        ledger.absorb(&key.state, &lease(10, 100, 1, None));
        ledger.absorb(&owner.state, &lease(4, 0, 1, None));
        assert_eq!(ledger.known_left_both(Some(&key), Some(&owner)), Some(4));
        assert_eq!(ledger.known_left_both(Some(&key), None), Some(110));
        assert_eq!(ledger.known_left_both(None, Some(&owner)), Some(4));
        assert_eq!(ledger.known_left_both(None, None), None);
        assert_eq!(ledger.spend_now_both(Some(&key), Some(&owner), 3), Some(1));
        assert_eq!(ledger.known_left(&key), 107);
        // The owner cannot pay: nothing stays spent from the key.
        assert_eq!(ledger.spend_now_both(Some(&key), Some(&owner), 2), None);
        assert_eq!(ledger.known_left(&key), 107, "the key's refunded");
        assert_eq!(ledger.known_left(&owner), 1);
        assert_eq!(ledger.spend_now_both(Some(&key), None, 7), Some(100));
        assert_eq!(ledger.spend_now_both(None, Some(&owner), 1), Some(0));
        assert_eq!(ledger.spend_now_both(None, None, 1), None);
        ledger.refund_both(Some(&key), Some(&owner), 2);
        assert_eq!(
            (ledger.known_left(&key), ledger.known_left(&owner)),
            (102, 2)
        );
        ledger.refund_both(None, Some(&owner), 1);
        assert_eq!(ledger.known_left(&owner), 3);
        assert_eq!(fewer(Some(3), Some(2)), Some(2));
        assert_eq!(fewer(Some(2), Some(3)), Some(2));
        assert_eq!(fewer(None, Some(3)), Some(3));
        assert_eq!(fewer(Some(3), None), Some(3));
        assert_eq!(fewer(None, None), None);
    }

    #[tokio::test]
    async fn an_owner_that_cannot_pay_refunds_the_key_and_says_so() {
        let (ledger, _clock, store, id) =
            ledger_with(crate::store::Credits::new(50), LeaseConfig::default()).await;
        let mut empty = crate::store::test_support::record(2);
        empty.credits = Some(crate::store::Credits::new(0));
        store.insert(&empty).await.unwrap();
        let key = ledger.account(id);
        let owner = ledger.account(empty.id);
        let unavailable = || AuthRejection::usage_exceeded(None).with_detail("store down");
        let rejection = refused(
            ledger
                .charge_both(Some(&key), Some(&owner), 1, unavailable)
                .await,
        );
        assert!(
            rejection.detail().contains("owner"),
            "{}",
            rejection.detail()
        );
        assert_eq!(ledger.known_left(&key), 50, "the key's credit came back");
        // Credits the store no longer has (removed): the key's alone count.
        let gone = ledger.account(Uuid::now_v7());
        assert_eq!(
            ledger
                .charge_both(Some(&key), Some(&gone), 1, unavailable)
                .await
                .unwrap(),
            Some(49)
        );
        // Both can pay: the fewer left.
        let (ledger, _clock, store, id) =
            ledger_with(crate::store::Credits::new(50), LeaseConfig::default()).await;
        let mut rich = crate::store::test_support::record(3);
        rich.credits = Some(crate::store::Credits::new(8));
        store.insert(&rich).await.unwrap();
        let (key, owner) = (ledger.account(id), ledger.account(rich.id));
        assert_eq!(
            ledger
                .charge_both(Some(&key), Some(&owner), 2, unavailable)
                .await
                .unwrap(),
            Some(6)
        );
        assert_eq!(
            ledger
                .charge_both(Some(&key), None, 1, unavailable)
                .await
                .unwrap(),
            Some(47)
        );
        assert_eq!(
            ledger
                .charge_both(None, None, 1, unavailable)
                .await
                .unwrap(),
            None
        );
    }

    /// Credits held by an account go back to the store when its key leaves the cache, after
    /// sitting idle, or at shutdown; an account in use keeps them through the idle sweep.
    #[tokio::test]
    async fn unspent_credits_go_back_when_dropped_idle_or_at_shutdown() {
        let config = LeaseConfig {
            max_block: 100,
            idle: Duration::from_secs(3600),
        };
        let (ledger, _clock, store, id) =
            ledger_with(crate::store::Credits::new(1_000), config).await;
        let unavailable = || AuthRejection::usage_exceeded(None).with_detail("store down");
        let account = ledger.account(id);
        ledger.charge(&account, 1, unavailable).await.unwrap();
        let held = ledger.known_left(&account) - balance(&store, id).await;
        assert!(held > 0);
        // Dropped: given back by the worker.
        drop(account);
        let start = std::time::Instant::now();
        while balance(&store, id).await != 999 {
            assert!(start.elapsed() < Duration::from_secs(5), "never given back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Idle: the sweep gives back what an unused account holds, not a used one's.
        let (idle, busy) = (ledger.account(id), ledger.account(id));
        ledger.charge(&idle, 1, unavailable).await.unwrap();
        ledger.charge(&busy, 1, unavailable).await.unwrap();
        ledger.sweep_idle().await;
        assert!(ledger.known_left(&idle) > 0, "used since the last sweep");
        ledger.spend_now(&busy, 1).unwrap();
        let before = balance(&store, id).await;
        ledger.sweep_idle().await;
        assert_eq!(
            idle.state.local.load(Ordering::Acquire),
            0,
            "idle: given back"
        );
        assert!(busy.state.local.load(Ordering::Acquire) > 0, "in use: kept");
        assert!(balance(&store, id).await > before);
        // Shutdown: everything held goes back.
        ledger.return_all().await;
        assert_eq!(busy.state.local.load(Ordering::Acquire), 0);
        assert_eq!(balance(&store, id).await, 1_000 - 4, "all but the 4 spent");
    }

    /// The registries of live accounts stay bounded as accounts come and go, and never lose
    /// a live one; an owner's cached keys share one account per generation.
    #[tokio::test]
    async fn the_account_registries_stay_bounded_and_keep_live_accounts() {
        let (ledger, _clock) = ledger(true);
        // More live accounts than the first pruning point, then many that come and go.
        let kept: Vec<CreditAccount> = (0..70).map(|_| ledger.account(Uuid::now_v7())).collect();
        for _ in 0..1_000 {
            drop(ledger.account(Uuid::now_v7()));
        }
        let registered = ledger.accounts.lock().unwrap().len();
        assert!(registered <= 256, "{registered} registered");
        for account in &kept {
            ledger.absorb(&account.state, &lease(1, 0, 1, None));
        }
        let live = ledger
            .accounts
            .lock()
            .unwrap()
            .iter()
            .filter_map(Weak::upgrade)
            .count();
        assert_eq!(live, kept.len(), "every live account is still registered");

        let pool = Uuid::now_v7();
        let first = ledger.owner_account(pool, 1);
        assert!(Arc::ptr_eq(&first, &ledger.owner_account(pool, 1)));
        assert!(!Arc::ptr_eq(&first, &ledger.owner_account(pool, 2)));
        // More live owners than the first pruning point, then many that come and go.
        let live: Vec<_> = (0..70)
            .map(|_| {
                let pool = Uuid::now_v7();
                (pool, ledger.owner_account(pool, 1))
            })
            .collect();
        for _ in 0..1_000 {
            drop(ledger.owner_account(Uuid::now_v7(), 1));
        }
        let owners = ledger.owners.lock().unwrap().len();
        assert!(owners <= 256, "{owners} owners registered");
        for (pool, account) in &live {
            assert!(
                Arc::ptr_eq(account, &ledger.owner_account(*pool, 1)),
                "a live owner account survived the pruning"
            );
        }
        assert!(
            Arc::ptr_eq(&first, &ledger.owner_account(pool, 1)),
            "the live owner account survived the pruning"
        );
    }

    #[test]
    fn pools_and_ledgers_print_without_secrets() {
        let id = Uuid::from_u128(7);
        assert_eq!(Pool::Key(id).to_string(), format!("key {id}"));
        assert_eq!(Pool::Owner(id).to_string(), format!("owner pool {id}"));
        let (ledger, _clock) = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async { ledger(true) });
        let debug = format!("{ledger:?}");
        assert!(
            debug.starts_with("CreditLedger { config: LeaseConfig"),
            "{debug}"
        );
    }
}
