//! Cross-instance cache invalidation.
//!
//! Every instance caches keys for the cache TTL. When a key is revoked, updated, rotated or
//! deleted on one instance (or by the CLI), the others must drop it within a second:
//!
//! - **PostgreSQL**: a trigger on the keys table sends `NOTIFY` on every change that matters
//!   for verification (not for usage updates); [`InvalidationListener::postgres`][pg] listens.
//!   Every writer is covered, including the CLI and plain SQL.
//! - **Redis** (any store): [`KeyManager::publishes_to`](crate::KeyManager::publishes_to) a
//!   [`RedisBackend`] publishes each change, and [`InvalidationListener::redis`][rd]
//!   subscribes.
//!
//! A listener that loses its connection reconnects with backoff and then drops the whole
//! cache, since it may have missed messages. The cache TTL stays the last line of defence.
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn run(layer: keywarden::ApiKeyLayer, store: keywarden::PostgresStore) -> Result<(), keywarden::StoreError> {
//! use keywarden::invalidation::InvalidationListener;
//!
//! // Keep the listener alive as long as the layer serves; dropping it stops listening.
//! let listener = InvalidationListener::postgres(&layer, &store).await?;
//! # let _ = listener;
//! # Ok(()) }
//! ```

#![cfg_attr(feature = "postgres", doc = "[pg]: InvalidationListener::postgres")]
#![cfg_attr(
    not(feature = "postgres"),
    doc = "[pg]: https://docs.rs/keywarden/latest/keywarden/invalidation/struct.InvalidationListener.html#method.postgres"
)]
#![cfg_attr(feature = "redis", doc = "[rd]: InvalidationListener::redis")]
#![cfg_attr(
    not(feature = "redis"),
    doc = "[rd]: https://docs.rs/keywarden/latest/keywarden/invalidation/struct.InvalidationListener.html#method.redis"
)]
#![cfg_attr(
    feature = "redis",
    doc = "[`RedisBackend`]: crate::redis::RedisBackend"
)]
#![cfg_attr(
    not(feature = "redis"),
    doc = "[`RedisBackend`]: https://docs.rs/keywarden/latest/keywarden/redis/struct.RedisBackend.html"
)]

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
#[cfg(any(feature = "postgres", feature = "redis"))]
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

#[cfg(any(feature = "postgres", feature = "redis"))]
use crate::layer::ApiKeyLayer;
#[cfg(any(feature = "postgres", feature = "redis"))]
use crate::stats::{ChangeKind, ChangeSource};

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;

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
}

/// An invalidation could not be published. The change itself succeeded; other instances
/// see it when their cache entries expire.
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

#[derive(Debug, Default)]
struct ListenerState {
    connected: AtomicBool,
    received: AtomicU64,
    reconnects: AtomicU64,
}

/// A background task that applies other instances' invalidations to a layer's cache.
/// Dropping it stops the task.
pub struct InvalidationListener {
    task: tokio::task::JoinHandle<()>,
    state: Arc<ListenerState>,
    transport: &'static str,
}

impl InvalidationListener {
    /// Whether the notification connection is up now.
    pub fn is_connected(&self) -> bool {
        self.state.connected.load(Ordering::Acquire)
    }

    /// Invalidations applied so far.
    pub fn received(&self) -> u64 {
        self.state.received.load(Ordering::Acquire)
    }

    /// Reconnections so far; each one dropped the whole cache.
    pub fn reconnects(&self) -> u64 {
        self.state.reconnects.load(Ordering::Acquire)
    }
}

impl Drop for InvalidationListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for InvalidationListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidationListener")
            .field("transport", &self.transport)
            .field("connected", &self.is_connected())
            .field("received", &self.received())
            .field("reconnects", &self.reconnects())
            .finish()
    }
}

#[cfg(any(feature = "postgres", feature = "redis"))]
/// What a transport's task reports to the shared bookkeeping.
struct Sink {
    layer: ApiKeyLayer,
    state: Arc<ListenerState>,
    source: ChangeSource,
    transport: &'static str,
}

#[cfg(any(feature = "postgres", feature = "redis"))]
impl Sink {
    fn apply(&self, invalidation: &Invalidation) {
        let kind = match invalidation {
            Invalidation::Key(id) => {
                self.layer.invalidate_key(*id);
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
        self.layer.counters().invalidation(self.source, kind);
        self.state.received.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(target: "keywarden", transport = self.transport, ?invalidation, "applied invalidation");
    }

    fn lost(&self, reason: &dyn fmt::Display) {
        self.state.connected.store(false, Ordering::Release);
        tracing::warn!(target: "keywarden", transport = self.transport, %reason, "invalidation connection lost; reconnecting");
    }

    fn reconnected(&self) {
        // Messages sent while we were away are lost: nothing cached can be trusted.
        self.layer.invalidate_all();
        self.layer.counters().reconnect_flush(self.source);
        self.state.reconnects.fetch_add(1, Ordering::AcqRel);
        self.state.connected.store(true, Ordering::Release);
        tracing::info!(target: "keywarden", transport = self.transport, "invalidation connection restored; cache flushed");
    }
}

#[cfg(any(feature = "postgres", feature = "redis"))]
/// Reconnect delays: immediately, then doubling up to 5 s.
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

#[cfg(any(feature = "postgres", feature = "redis"))]
fn spawn<F>(
    layer: &ApiKeyLayer,
    source: ChangeSource,
    run: impl FnOnce(Sink) -> F,
) -> InvalidationListener
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let state = Arc::new(ListenerState::default());
    state.connected.store(true, Ordering::Release);
    let transport = source.label();
    let sink = Sink {
        layer: layer.clone(),
        state: state.clone(),
        source,
        transport,
    };
    InvalidationListener {
        task: tokio::spawn(run(sink)),
        state,
        transport,
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
