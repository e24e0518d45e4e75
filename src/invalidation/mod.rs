//! Cross-instance cache invalidation: how a revocation on one instance reaches the others, and
//! how long an instance that cannot hear of changes keeps trusting what it cached.
//!
//! Every instance caches keys for the cache TTL. An [`InvalidationListener`] drops what
//! changed elsewhere, along two paths that back each other up:
//!
//! - **The change feed** (the safety net): the built-in stores number every change that matters
//!   for verification ([`KeyStore::change_feed`]), in the same transaction as the change,
//!   whoever made it (an instance, the CLI, plain SQL). The listener polls it from the last
//!   sequence it applied, every 2 s by default: one indexed query. A change missed on the fast
//!   path is applied at the next poll, and after a lost connection the listener replays what it
//!   missed instead of dropping the whole cache, so store reads after a network blip are the
//!   changed keys, not every hot key at once.
//! - **Notifications** (the fast path): PostgreSQL `NOTIFY` ([`ListenerBuilder::postgres`][pg],
//!   on by default with [`InvalidationListener::postgres`][pgl]) and Redis pub/sub
//!   ([`ListenerBuilder::redis`][rd]; a [`KeyManager`](crate::KeyManager) publishes there with
//!   [`publishes_to`](crate::KeyManager::publishes_to)) make a change arrive within
//!   milliseconds. A PostgreSQL notification only makes the listener poll the feed at once
//!   (at most every 10 ms): any database user can send one, so what is dropped, and where the
//!   listener stands, come from the feed alone. Where `LISTEN` cannot work (PgBouncer in transaction mode, some managed
//!   poolers) the listener finds out at connect (a probe notification never arrives), logs a
//!   warning and relies on the feed.
//!
//! **The bound.** A change reaches every listening instance within the poll interval (plus
//! one query), whatever happened to the notification connections. An instance that has heard
//! nothing, from the feed or a transport, for `max_blind` (default 30 s) is *blind*: from then
//! on it serves no cached entry read more than `max_blind` ago; such keys are re-read, and
//! while the store stays out of reach that answer is `503 store_unavailable` (so is any key it
//! has not cached). A revoked key is therefore accepted for at most `max_blind` (plus a poll
//! timeout) after the instance lost the store, never for the whole TTL and stale window.
//! [`ListenerBuilder::prefer_availability`] turns that off: the instance keeps answering from
//! its cache, up to the TTL and stale window, at the cost of accepting a key revoked during
//! the partition for that long. Blindness shows in
//! [`LayerStats::blind_since`](crate::layer::LayerStats::blind_since), the
//! `keywarden_revocation_blind` gauge and [`InvalidationListener::blind_since`]. A layer with
//! no listener has only the cache TTL as its bound.
//!
//! ```no_run
//! # async fn run(layer: keywarden::ApiKeyLayer) -> Result<(), keywarden::StoreError> {
//! use std::time::Duration;
//! use keywarden::invalidation::InvalidationListener;
//!
//! // Polls the layer's own store's feed; keep the listener alive as long as the layer serves.
//! let listener = InvalidationListener::builder(&layer)
//!     .poll_every(Duration::from_secs(2))
//!     .max_blind(Duration::from_secs(30))
//!     .start()
//!     .await?;
//! println!("revocations arrive by {}", listener.path());
//! # Ok(()) }
//! ```

#![cfg_attr(feature = "postgres", doc = "[pg]: ListenerBuilder::postgres")]
#![cfg_attr(feature = "postgres", doc = "[pgl]: InvalidationListener::postgres")]
#![cfg_attr(
    not(feature = "postgres"),
    doc = "[pg]: https://docs.rs/keywarden/latest/keywarden/invalidation/struct.ListenerBuilder.html#method.postgres"
)]
#![cfg_attr(
    not(feature = "postgres"),
    doc = "[pgl]: https://docs.rs/keywarden/latest/keywarden/invalidation/struct.InvalidationListener.html#method.postgres"
)]
#![cfg_attr(feature = "redis", doc = "[rd]: ListenerBuilder::redis")]
#![cfg_attr(
    not(feature = "redis"),
    doc = "[rd]: https://docs.rs/keywarden/latest/keywarden/invalidation/struct.ListenerBuilder.html#method.redis"
)]

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::layer::ApiKeyLayer;
use crate::stats::{ChangeKind, ChangeSource};
use crate::store::{KeyStore, StoreChange, StoreError};

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;

/// How often the change feed is polled unless configured.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long an instance may hear nothing before it stops trusting old cache entries.
pub const DEFAULT_MAX_BLIND: Duration = Duration::from_secs(30);
/// The shortest `max_blind` a listener accepts (it must also be twice the poll interval).
pub const MIN_MAX_BLIND: Duration = Duration::from_secs(1);
/// Feed entries read per query.
const PAGE: u32 = 1_000;
/// Behind by more changes than this, dropping the whole cache is cheaper than replaying.
const MAX_REPLAY: u64 = 10_000;
/// Feed entries older than this are pruned (by any listener, about once an hour).
const FEED_RETENTION: Duration = Duration::from_secs(24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
const PRUNE_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed poll, the next comes this soon (at most the poll interval).
const RETRY_FAILED_POLL: Duration = Duration::from_millis(250);
/// A notification makes the feed be polled at once, at most this often.
const GAP_POLL: Duration = Duration::from_millis(10);

/// What another instance must drop from its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// Every cached digest of this key (revoked, updated, rotated, deleted).
    Key(Uuid),
    /// A key was created: cached "not found" entries may be wrong now.
    Created,
    /// Everything.
    All,
}

impl Invalidation {
    /// The wire form: `key <uuid>`, `created` or `all`.
    pub fn encode(&self) -> String {
        match self {
            Invalidation::Key(id) => format!("key {id}"),
            Invalidation::Created => "created".to_owned(),
            Invalidation::All => "all".to_owned(),
        }
    }

    /// Parses the wire form; `None` for anything else.
    pub fn decode(text: &str) -> Option<Self> {
        match text {
            "created" => Some(Invalidation::Created),
            "all" => Some(Invalidation::All),
            _ => text
                .strip_prefix("key ")
                .and_then(|id| Uuid::parse_str(id).ok())
                .map(Invalidation::Key),
        }
    }

    fn of(change: StoreChange) -> Self {
        match change {
            StoreChange::Key(id) => Invalidation::Key(id),
            StoreChange::Created => Invalidation::Created,
            _ => Invalidation::All,
        }
    }
}

/// An invalidation could not be published. The change itself succeeded; other instances
/// see it at their next poll of the change feed, or when their cache entries expire.
#[derive(Debug, thiserror::Error)]
#[error("publishing an invalidation failed: {0}")]
pub struct PublishError(pub(crate) String);

/// Sends invalidations to other instances (implemented by `RedisBackend`, feature `redis`).
#[async_trait]
pub trait InvalidationPublisher: Send + Sync + fmt::Debug + 'static {
    /// Publishes one invalidation.
    ///
    /// # Errors
    /// If the transport fails.
    async fn publish(&self, invalidation: &Invalidation) -> Result<(), PublishError>;
}

/// A transport's connection state.
const OFF: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;
/// Connected, but its notifications never arrive (LISTEN behind a transaction pooler).
const UNUSABLE: u8 = 3;

#[derive(Debug)]
struct ListenerState {
    origin: Instant,
    /// Nanoseconds since `origin` when the feed or a transport last answered.
    heard: AtomicU64,
    blind: AtomicBool,
    feed: AtomicBool,
    cursor: AtomicU64,
    received: AtomicU64,
    replayed: AtomicU64,
    reconnects: AtomicU64,
    flushes: AtomicU64,
    failed_polls: AtomicU64,
    postgres: AtomicU8,
    redis: AtomicU8,
}

impl ListenerState {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            heard: AtomicU64::new(0),
            blind: AtomicBool::new(false),
            feed: AtomicBool::new(false),
            cursor: AtomicU64::new(0),
            received: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            failed_polls: AtomicU64::new(0),
            postgres: AtomicU8::new(OFF),
            redis: AtomicU8::new(OFF),
        }
    }

    fn heard_now(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.heard.fetch_max(nanos, Ordering::AcqRel);
    }

    /// How long since the feed or a transport last answered.
    fn silent_for(&self) -> Duration {
        let heard = Duration::from_nanos(self.heard.load(Ordering::Acquire));
        self.origin.elapsed().saturating_sub(heard)
    }
}

/// A background task that applies other instances' changes to a layer's cache, from the
/// store's change feed and from notification transports, and bounds how long the layer
/// trusts its cache while it hears nothing (see the [module docs](self)). Dropping it stops
/// the tasks (and ends any blindness it declared).
pub struct InvalidationListener {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    state: Arc<ListenerState>,
    layer: ApiKeyLayer,
}

/// Configures an [`InvalidationListener`]; from [`InvalidationListener::builder`].
#[must_use]
pub struct ListenerBuilder {
    layer: ApiKeyLayer,
    feed: Option<Arc<dyn KeyStore>>,
    poll_every: Duration,
    max_blind: Duration,
    enforce_blind: bool,
    #[cfg(feature = "postgres")]
    postgres: Option<crate::store::PostgresStore>,
    #[cfg(feature = "redis")]
    redis: Option<crate::redis::RedisBackend>,
}

impl fmt::Debug for ListenerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerBuilder")
            .field("feed", &self.feed.is_some())
            .field("poll_every", &self.poll_every)
            .field("max_blind", &self.max_blind)
            .field("enforce_blind", &self.enforce_blind)
            .finish_non_exhaustive()
    }
}

impl ListenerBuilder {
    /// Polls this store's change feed instead of the layer's own store (the default).
    pub fn feed(mut self, store: Arc<dyn KeyStore>) -> Self {
        self.feed = Some(store);
        self
    }

    /// Polls no change feed: changes arrive only by notification, and a lost connection
    /// drops the whole cache when it comes back.
    pub fn without_feed(mut self) -> Self {
        self.feed = None;
        self
    }

    /// How often the change feed is polled (default 2 s; at least 10 ms). Also bounds how
    /// late a change whose notification was lost arrives.
    pub fn poll_every(mut self, every: Duration) -> Self {
        self.poll_every = every.max(Duration::from_millis(10));
        self
    }

    /// How long the listener may hear nothing (no answer from the feed, or without a feed
    /// from a transport) before the layer stops serving cache entries read longer ago than
    /// that (default 30 s). [`ListenerBuilder::start`] refuses less than twice the poll
    /// interval or less than [`MIN_MAX_BLIND`].
    pub fn max_blind(mut self, max_blind: Duration) -> Self {
        self.max_blind = max_blind;
        self
    }

    /// Keeps serving cached entries (up to the TTL and stale window) while blind: blindness is
    /// reported but not enforced. Availability over revocation: a key revoked while this
    /// instance cannot reach the store is accepted here until its entry expires.
    pub fn prefer_availability(mut self) -> Self {
        self.enforce_blind = false;
        self
    }

    /// Also listens on PostgreSQL `NOTIFY` (the fast path); the store's keys-table triggers
    /// notify on every change, whoever makes it. The connection shows in
    /// `pg_stat_activity` with the application name `keywarden-listener:<schema>`.
    #[cfg(feature = "postgres")]
    pub fn postgres(mut self, store: &crate::store::PostgresStore) -> Self {
        self.postgres = Some(store.clone());
        self
    }

    /// Also subscribes to the backend's Redis invalidation channel (the fast path for changes
    /// published with [`KeyManager::publishes_to`](crate::KeyManager::publishes_to)).
    #[cfg(feature = "redis")]
    pub fn redis(mut self, backend: &crate::redis::RedisBackend) -> Self {
        self.redis = Some(backend.clone());
        self
    }

    /// Reads where the feed stands, connects the transports and starts the tasks. With a
    /// feed, the layer's cache is dropped once here (an entry read before the feed's current
    /// position could predate a change).
    ///
    /// # Errors
    /// [`StoreErrorKind::Other`](crate::store::StoreErrorKind::Other) if `max_blind` is below
    /// twice the poll interval or [`MIN_MAX_BLIND`]. If the feed cannot be read, or Redis
    /// cannot be subscribed to; also if PostgreSQL's
    /// `LISTEN` fails while there is no feed to fall back on. (With a feed, a failed or unusable
    /// `LISTEN` is logged and retried, and the feed carries the changes meanwhile.)
    pub async fn start(self) -> Result<InvalidationListener, StoreError> {
        let floor = (self.poll_every * 2).max(MIN_MAX_BLIND);
        if self.max_blind < floor {
            return Err(StoreError::new(
                crate::store::StoreErrorKind::Other,
                format!(
                    "max_blind {:?} is below {floor:?}: it must be at least twice the poll \
                     interval ({:?}) and at least {MIN_MAX_BLIND:?}, or the listener would \
                     count itself blind between two polls",
                    self.max_blind, self.poll_every
                ),
            ));
        }
        let state = Arc::new(ListenerState::new());
        let (tx, rx) = mpsc::channel(1024);
        let mut tasks = Vec::new();
        let mut feed = None;
        if let Some(store) = self.feed {
            match store.change_feed(u64::MAX, 0).await? {
                Some(page) => {
                    state.cursor.store(page.head, Ordering::Release);
                    state.feed.store(true, Ordering::Release);
                    feed = Some(store);
                }
                None => tracing::warn!(
                    target: "keywarden",
                    "the store keeps no change feed: changes made elsewhere reach this instance \
                     only by notification, or when cache entries expire"
                ),
            }
        }
        let has_feed = feed.is_some();
        #[cfg(feature = "postgres")]
        if let Some(store) = &self.postgres {
            let link = Link::new(tx.clone(), &state, ChangeSource::Postgres);
            if let Some(task) = postgres::start(store, link, has_feed).await? {
                tasks.push(task);
            }
        }
        #[cfg(feature = "redis")]
        if let Some(backend) = &self.redis {
            let link = Link::new(tx.clone(), &state, ChangeSource::Redis);
            let ping = (self.max_blind / 3).clamp(Duration::from_millis(50), redis::PING_EVERY);
            tasks.push(redis::start(backend, link, ping).await?);
        }
        drop(tx);
        if has_feed {
            self.layer.invalidate_all();
        }
        state.heard_now();
        let core = Core {
            layer: self.layer.clone(),
            state: state.clone(),
            feed,
            poll_every: self.poll_every,
            last_poll: None,
            last_prune: None,
        };
        // With neither a feed nor a transport nothing can ever be heard: the cache TTL is the
        // only bound, and declaring the layer blind would only make it re-read every key.
        let watched = has_feed || !tasks.is_empty();
        tasks.push(tokio::spawn(core.run(rx)));
        if watched {
            tasks.push(tokio::spawn(watch(
                self.layer.clone(),
                state.clone(),
                self.max_blind,
                self.enforce_blind,
            )));
        }
        Ok(InvalidationListener {
            tasks,
            state,
            layer: self.layer,
        })
    }
}

impl InvalidationListener {
    /// A listener for `layer`, polling its store's change feed unless configured otherwise.
    pub fn builder(layer: &ApiKeyLayer) -> ListenerBuilder {
        ListenerBuilder {
            layer: layer.clone(),
            feed: Some(layer.store().clone()),
            poll_every: DEFAULT_POLL_INTERVAL,
            max_blind: DEFAULT_MAX_BLIND,
            enforce_blind: true,
            #[cfg(feature = "postgres")]
            postgres: None,
            #[cfg(feature = "redis")]
            redis: None,
        }
    }

    /// Listens for changes to `store`'s keys (in its schema) with `NOTIFY`, backed by
    /// `store`'s change feed (polled every 2 s, replayed after a lost connection), with the
    /// default `max_blind`: `builder(layer).feed(store).postgres(store).start()`.
    ///
    /// # Errors
    /// As [`ListenerBuilder::start`].
    #[cfg(feature = "postgres")]
    pub async fn postgres(
        layer: &ApiKeyLayer,
        store: &crate::store::PostgresStore,
    ) -> Result<InvalidationListener, StoreError> {
        Self::builder(layer)
            .feed(Arc::new(store.clone()))
            .postgres(store)
            .start()
            .await
    }

    /// Subscribes to the backend's invalidation channel, without a change feed: a lost
    /// subscription drops the whole cache when it comes back. Use [`Self::builder`] with
    /// [`ListenerBuilder::redis`] to add the layer's store's feed.
    ///
    /// # Errors
    /// If the first connection or `SUBSCRIBE` fails.
    #[cfg(feature = "redis")]
    pub async fn redis(
        layer: &ApiKeyLayer,
        backend: &crate::redis::RedisBackend,
    ) -> Result<InvalidationListener, StoreError> {
        Self::builder(layer)
            .without_feed()
            .redis(backend)
            .start()
            .await
    }

    /// Whether a notification connection is up now.
    pub fn is_connected(&self) -> bool {
        self.state.postgres.load(Ordering::Acquire) == UP
            || self.state.redis.load(Ordering::Acquire) == UP
    }

    /// Changes applied so far, from notifications and the feed.
    pub fn received(&self) -> u64 {
        self.state.received.load(Ordering::Acquire)
    }

    /// Of [`Self::received`], those applied from the feed (missed or not yet notified).
    pub fn replayed(&self) -> u64 {
        self.state.replayed.load(Ordering::Acquire)
    }

    /// Reconnections of a notification transport so far.
    pub fn reconnects(&self) -> u64 {
        self.state.reconnects.load(Ordering::Acquire)
    }

    /// Whole-cache flushes so far: a transport came back with no feed to replay from, or the
    /// feed was pruned (or reset) past what this listener had applied.
    pub fn flushes(&self) -> u64 {
        self.state.flushes.load(Ordering::Acquire)
    }

    /// Feed polls that failed or timed out so far.
    pub fn failed_polls(&self) -> u64 {
        self.state.failed_polls.load(Ordering::Acquire)
    }

    /// The last feed sequence applied (0 without a feed).
    pub fn cursor(&self) -> u64 {
        self.state.cursor.load(Ordering::Acquire)
    }

    /// How changes reach this instance now: the working paths joined with `+` — `listen`
    /// (PostgreSQL NOTIFY), `redis` (pub/sub), `poll` (the change feed) — or `ttl` when none
    /// works (cache entries then live out their TTL).
    pub fn path(&self) -> String {
        let mut paths = Vec::new();
        if self.state.postgres.load(Ordering::Acquire) == UP {
            paths.push("listen");
        }
        if self.state.redis.load(Ordering::Acquire) == UP {
            paths.push("redis");
        }
        if self.state.feed.load(Ordering::Acquire) {
            paths.push("poll");
        }
        if paths.is_empty() {
            "ttl".to_owned()
        } else {
            paths.join("+")
        }
    }

    /// Whether PostgreSQL `LISTEN` was found unusable (connected, but notifications never
    /// arrive: a pooler in transaction mode). The feed carries the changes instead.
    pub fn listen_unusable(&self) -> bool {
        self.state.postgres.load(Ordering::Acquire) == UNUSABLE
    }

    /// When the listener last heard from the feed or a transport, while it has heard
    /// nothing for `max_blind`; `None` otherwise.
    pub fn blind_since(&self) -> Option<SystemTime> {
        // Kept once, by the layer's cache, which the watchdog tells.
        self.state
            .blind
            .load(Ordering::Acquire)
            .then(|| self.layer.stats().blind_since)
            .flatten()
    }
}

impl Drop for InvalidationListener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if self.state.blind.load(Ordering::Acquire) {
            self.layer.set_blind(None, Duration::ZERO, false);
        }
    }
}

impl fmt::Debug for InvalidationListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidationListener")
            .field("path", &self.path())
            .field("cursor", &self.cursor())
            .field("received", &self.received())
            .field("reconnects", &self.reconnects())
            .field("blind_since", &self.blind_since())
            .finish()
    }
}

/// What a transport reports to the listener's loop.
#[cfg_attr(not(any(feature = "postgres", feature = "redis")), allow(dead_code))]
enum Heard {
    /// A change, with its feed sequence when the transport carries one.
    Change {
        seq: Option<u64>,
        invalidation: Invalidation,
        source: ChangeSource,
    },
    /// The connection answered (a ping).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Alive,
    /// The connection was lost.
    Lost(ChangeSource, String),
    /// It is back; messages sent meanwhile are lost.
    Restored(ChangeSource),
    /// Connected, but notifications never arrive: the transport gives up.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Unusable(ChangeSource, String),
}

/// A transport's handle on the listener: its reports and its connection state.
#[cfg_attr(not(any(feature = "postgres", feature = "redis")), allow(dead_code))]
struct Link {
    tx: mpsc::Sender<Heard>,
    state: Arc<ListenerState>,
    source: ChangeSource,
}

#[cfg_attr(not(any(feature = "postgres", feature = "redis")), allow(dead_code))]
impl Link {
    fn new(tx: mpsc::Sender<Heard>, state: &Arc<ListenerState>, source: ChangeSource) -> Self {
        Self {
            tx,
            state: state.clone(),
            source,
        }
    }

    fn status(&self) -> &AtomicU8 {
        match self.source {
            #[cfg(feature = "redis")]
            ChangeSource::Redis => &self.state.redis,
            _ => &self.state.postgres,
        }
    }

    fn set(&self, status: u8) {
        self.status().store(status, Ordering::Release);
    }

    /// Reports to the loop; `false` once the listener is gone (the transport then stops).
    async fn report(&self, heard: Heard) -> bool {
        match &heard {
            Heard::Lost(..) => self.set(DOWN),
            Heard::Restored(_) => self.set(UP),
            Heard::Unusable(..) => self.set(UNUSABLE),
            Heard::Change { .. } | Heard::Alive => {}
        }
        self.tx.send(heard).await.is_ok()
    }

    /// Reports a change without waiting (while the loop may not run yet); dropped when the
    /// queue is full — the feed carries it.
    #[cfg(feature = "postgres")]
    fn try_change(&self, seq: u64, invalidation: Invalidation) {
        let _ = self.tx.try_send(Heard::Change {
            seq: Some(seq),
            invalidation,
            source: self.source,
        });
    }

    async fn change(&self, seq: Option<u64>, invalidation: Invalidation) -> bool {
        self.report(Heard::Change {
            seq,
            invalidation,
            source: self.source,
        })
        .await
    }
}

/// The listener's loop: applies what transports report and polls the feed.
struct Core {
    layer: ApiKeyLayer,
    state: Arc<ListenerState>,
    feed: Option<Arc<dyn KeyStore>>,
    poll_every: Duration,
    last_poll: Option<Instant>,
    last_prune: Option<Instant>,
}

impl Core {
    async fn run(mut self, mut rx: mpsc::Receiver<Heard>) {
        let mut open = true;
        let mut next_poll = tokio::time::Instant::now() + self.poll_every;
        // A poll a notification asked for, at most every GAP_POLL.
        let mut urgent: Option<tokio::time::Instant> = None;
        loop {
            let wake = urgent.map_or(next_poll, |at| at.min(next_poll));
            let poll_now = tokio::select! {
                heard = rx.recv(), if open => {
                    match heard {
                        Some(heard) => {
                            if self.hear(heard) {
                                let earliest = self
                                    .last_poll
                                    .map_or_else(tokio::time::Instant::now, |at| {
                                        tokio::time::Instant::from_std(at + GAP_POLL)
                                    });
                                urgent = Some(urgent.map_or(earliest, |at| at.min(earliest)));
                            }
                        }
                        None => open = false,
                    }
                    false
                },
                () = tokio::time::sleep_until(wake), if self.feed.is_some() => true,
            };
            if poll_now {
                let scheduled = tokio::time::Instant::now() >= next_poll;
                urgent = None;
                let answered = self.poll().await;
                let now = tokio::time::Instant::now();
                if !answered {
                    // While the feed is out of reach, try again soon: a healed partition is
                    // then caught up with within a second, whatever the poll interval.
                    next_poll = now + self.poll_every.min(RETRY_FAILED_POLL);
                } else if scheduled {
                    // At a fixed rate, so the time a poll takes does not stretch the bound.
                    next_poll += self.poll_every;
                    if next_poll <= now {
                        next_poll = now + self.poll_every;
                    }
                }
            }
            if !open && self.feed.is_none() {
                return;
            }
        }
    }

    /// Handles one report; `true` when the feed must be polled now.
    fn hear(&mut self, heard: Heard) -> bool {
        match heard {
            Heard::Change {
                seq,
                invalidation,
                source,
            } => {
                let poll = match seq {
                    // With a feed, a notification is only a reason to poll now: what is
                    // applied, and where the cursor stands, come from the feed alone. Any
                    // database user can send one (`pg_notify`); a forged one costs a poll (at
                    // most one every GAP_POLL), never a cache entry, and cannot hide a change.
                    Some(seq) if self.feed.is_some() => {
                        seq > self.state.cursor.load(Ordering::Acquire)
                    }
                    _ => {
                        self.apply(invalidation, source);
                        false
                    }
                };
                // With a feed, only the feed answering counts as hearing: a transport that is
                // up (or a forged notification) says nothing about reaching the store. Heard
                // after the change is applied, so blindness never ends before it.
                if self.feed.is_none() {
                    self.state.heard_now();
                }
                poll
            }
            Heard::Alive => {
                if self.feed.is_none() {
                    self.state.heard_now();
                }
                false
            }
            Heard::Lost(source, reason) => {
                tracing::warn!(target: "keywarden", transport = source.label(), %reason,
                    "invalidation connection lost; reconnecting");
                false
            }
            Heard::Restored(source) => {
                self.state.reconnects.fetch_add(1, Ordering::AcqRel);
                if self.feed.is_some() {
                    tracing::info!(target: "keywarden", transport = source.label(),
                        from = self.state.cursor.load(Ordering::Acquire),
                        "invalidation connection restored; replaying the change feed");
                    true
                } else {
                    // Flushed first: nothing the instance missed while deaf is served once it
                    // counts as hearing again.
                    self.flush(source, "invalidation connection restored; cache flushed");
                    self.state.heard_now();
                    false
                }
            }
            Heard::Unusable(source, reason) => {
                tracing::warn!(target: "keywarden", transport = source.label(), %reason,
                    poll_every = ?self.poll_every,
                    "LISTEN is unusable here; changes reach this instance through the change feed only");
                false
            }
        }
    }

    fn apply(&self, invalidation: Invalidation, source: ChangeSource) {
        let kind = match invalidation {
            Invalidation::Key(id) => {
                self.layer.invalidate_key(id);
                ChangeKind::Key
            }
            Invalidation::Created => {
                self.layer.invalidate_not_found();
                ChangeKind::Created
            }
            Invalidation::All => {
                self.layer.invalidate_all();
                ChangeKind::All
            }
        };
        self.layer.counters().invalidation(source, kind);
        self.state.received.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(target: "keywarden", transport = source.label(), ?invalidation, "applied invalidation");
    }

    fn flush(&self, source: ChangeSource, why: &str) {
        self.layer.invalidate_all();
        self.layer.counters().reconnect_flush(source);
        self.state.flushes.fetch_add(1, Ordering::AcqRel);
        tracing::info!(target: "keywarden", transport = source.label(), "{why}");
    }

    /// Applies the feed from the cursor on, page by page; `false` if the store did not answer.
    async fn poll(&mut self) -> bool {
        let Some(store) = self.feed.clone() else {
            return false;
        };
        self.last_poll = Some(Instant::now());
        // One indexed query normally answers in a millisecond; a hung connection (a cut
        // network) must not hold up the retry for long.
        let timeout =
            (self.poll_every / 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
        loop {
            let cursor = self.state.cursor.load(Ordering::Acquire);
            let page = match tokio::time::timeout(timeout, store.change_feed(cursor, PAGE)).await {
                Ok(Ok(Some(page))) => page,
                Ok(Ok(None)) => return false,
                failed => {
                    let failures = self.state.failed_polls.fetch_add(1, Ordering::AcqRel) + 1;
                    let reason = match failed {
                        Ok(Err(error)) => error.to_string(),
                        _ => format!("no answer within {timeout:?}"),
                    };
                    if failures.is_power_of_two() {
                        tracing::warn!(target: "keywarden", %reason, failures,
                            "polling the change feed failed");
                    }
                    return false;
                }
            };
            // The instance counts as hearing again only once the page is applied: bounded
            // blindness ends then, and entries it withheld may be served again, so the
            // invalidations they missed must be in first.
            let first = page.changes.first().map(|c| c.seq);
            let pruned_past =
                first.is_some_and(|first| first > cursor + 1) && page.oldest > cursor + 1;
            if page.head < cursor || page.head - cursor > MAX_REPLAY || pruned_past {
                self.state.cursor.store(page.head, Ordering::Release);
                self.flush(
                    ChangeSource::Feed,
                    "the change feed cannot be replayed from where this instance stood \
                     (reset, pruned, or too far behind); cache flushed",
                );
                self.state.heard_now();
                break;
            }
            let full = page.changes.len() >= PAGE as usize;
            for change in page.changes {
                self.apply(Invalidation::of(change.change), ChangeSource::Feed);
                self.state.replayed.fetch_add(1, Ordering::AcqRel);
                self.state.cursor.store(change.seq, Ordering::Release);
            }
            self.state.heard_now();
            if !full {
                break;
            }
        }
        if self.last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            // In a task of its own: a DELETE held up by a lock must not delay the next poll.
            self.last_prune = Some(Instant::now());
            let before = time::OffsetDateTime::now_utc() - FEED_RETENTION;
            tokio::spawn(async move {
                match tokio::time::timeout(PRUNE_TIMEOUT, store.prune_changes(before)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(target: "keywarden", %error, "pruning the change feed failed");
                    }
                    Err(_) => {
                        tracing::debug!(target: "keywarden", "pruning the change feed timed out");
                    }
                }
            });
        }
        true
    }
}

/// Declares the layer blind when nothing was heard for `max_blind`, and sighted again when
/// something is.
async fn watch(layer: ApiKeyLayer, state: Arc<ListenerState>, max_blind: Duration, enforce: bool) {
    let mut tick = tokio::time::interval((max_blind / 10).min(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let silent = state.silent_for();
        let blind = silent >= max_blind;
        if blind == state.blind.load(Ordering::Acquire) {
            continue;
        }
        state.blind.store(blind, Ordering::Release);
        layer.counters().blind(blind);
        if blind {
            let since = SystemTime::now() - silent;
            layer.set_blind(Some(since), max_blind, enforce);
            if enforce {
                tracing::warn!(target: "keywarden", ?silent, ?max_blind,
                    "no answer from the change feed or a notification transport: cached keys \
                     read before the last answer are re-checked (503 while the store is out of reach)");
            } else {
                tracing::warn!(target: "keywarden", ?silent, ?max_blind,
                    "no answer from the change feed or a notification transport; serving from \
                     the cache anyway (availability preferred): revocations made meanwhile are not seen");
            }
        } else {
            layer.set_blind(None, max_blind, enforce);
            tracing::info!(target: "keywarden", "hearing of changes again");
        }
    }
}

/// Reconnect delays: immediately, then doubling up to 5 s.
#[cfg(any(feature = "postgres", feature = "redis"))]
struct Backoff(Duration);

#[cfg(any(feature = "postgres", feature = "redis"))]
impl Backoff {
    fn new() -> Self {
        Self(Duration::ZERO)
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2)
            .max(Duration::from_millis(50))
            .min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_round_trips() {
        let id = Uuid::now_v7();
        for inv in [
            Invalidation::Key(id),
            Invalidation::Created,
            Invalidation::All,
        ] {
            assert_eq!(Invalidation::decode(&inv.encode()), Some(inv));
        }
        for bad in ["", "key", "key nonsense", "KEY 0", "all ", "created\n"] {
            assert_eq!(Invalidation::decode(bad), None, "{bad:?}");
        }
    }
}
