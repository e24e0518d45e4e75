//! [`RedisBackend`]: one Redis connection shared by the distributed rate limiter, the
//! invalidation publisher and the invalidation listener.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use keywarden::RedisBackend;
//!
//! // Every instance of one deployment uses the same namespace; tests use one each.
//! let redis = RedisBackend::connect("redis://127.0.0.1:6379", "myapp").await?;
//! # let _ = redis;
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Why Redis could not be used.
#[derive(Debug, thiserror::Error)]
#[error("redis: {message}")]
pub struct RedisBackendError {
    message: String,
    #[source]
    source: Option<redis::RedisError>,
}

impl RedisBackendError {
    pub(crate) fn new(message: impl Into<String>, source: redis::RedisError) -> Self {
        Self {
            message: message.into(),
            source: Some(source),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }
}

/// A Redis server shared by the instances of one deployment, under a key namespace.
///
/// Cloning is cheap: clones share one auto-reconnecting connection. Commands time out after
/// [`command_timeout`](Self::with_command_timeout) (default 250 ms) so a slow Redis cannot
/// stall requests.
#[derive(Clone)]
pub struct RedisBackend {
    client: redis::Client,
    connection: ConnectionManager,
    namespace: Arc<str>,
    timeout: Duration,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

impl RedisBackend {
    /// Connects to `url` (`redis://host:port[/db]`). `namespace` prefixes every key and
    /// channel keywarden uses: `<namespace>:rl:<key id>` and `<namespace>:invalidate`.
    ///
    /// # Errors
    /// If the URL is invalid, the namespace is empty or holds whitespace, or the first
    /// connection fails.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, RedisBackendError> {
        if namespace.is_empty()
            || namespace.len() > 128
            || !namespace.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(RedisBackendError::invalid(
                "the namespace must be 1 to 128 visible ASCII characters",
            ));
        }
        let client =
            redis::Client::open(url).map_err(|e| RedisBackendError::new("invalid Redis URL", e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(DEFAULT_TIMEOUT)
            .set_number_of_retries(2)
            .set_max_delay(1_000);
        let connection = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| RedisBackendError::new("connecting failed", e))?;
        Ok(Self {
            client,
            connection,
            namespace: namespace.into(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// How long one command may take before it counts as a Redis failure (default 250 ms).
    #[must_use]
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    pub(crate) fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    pub(crate) fn channel(&self) -> String {
        format!("{}:invalidate", self.namespace)
    }

    pub(crate) fn rate_key(&self, id: uuid::Uuid) -> String {
        format!("{}:rl:{}", self.namespace, id)
    }

    /// Runs one command under the timeout.
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        future: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisBackendError> {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(result) => result.map_err(|e| RedisBackendError::new("command failed", e)),
            Err(_) => Err(RedisBackendError::invalid("command timed out")),
        }
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection info may hold a password: never print it.
        f.debug_struct("RedisBackend")
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
