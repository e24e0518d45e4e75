//! [`RedisBackend`]: one Redis connection shared by the distributed rate limiter, the
//! invalidation publisher and the invalidation listener.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use keywarden::redis::RedisBackend;
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

/// What kind of trouble a [`RedisBackendError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisBackendErrorKind {
    /// The URL or the namespace is invalid.
    InvalidConfig,
    /// The server is older than Redis 5, which the rate-limit script needs.
    UnsupportedVersion,
    /// Connecting, a command or a subscription failed or timed out.
    Unavailable,
}

/// Why Redis could not be used.
#[derive(Debug, thiserror::Error)]
#[error("redis: {message}")]
pub struct RedisBackendError {
    kind: RedisBackendErrorKind,
    message: String,
    #[source]
    source: Option<redis::RedisError>,
}

impl RedisBackendError {
    pub(crate) fn new(message: impl Into<String>, source: redis::RedisError) -> Self {
        Self {
            kind: RedisBackendErrorKind::Unavailable,
            message: message.into(),
            source: Some(source),
        }
    }

    /// Redis did not answer in time (no underlying error).
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::of_kind(RedisBackendErrorKind::Unavailable, message)
    }

    fn of_kind(kind: RedisBackendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// What kind of trouble this is.
    pub fn kind(&self) -> RedisBackendErrorKind {
        self.kind
    }
}

/// The oldest Redis major version the rate-limit script runs on: it reads `TIME` and then
/// writes, which Redis before 5 refuses unless scripts replicate their effects.
const MIN_REDIS_MAJOR: u32 = 5;

/// Checks the `redis_version` field of `INFO server` output. `Ok(None)`: no version found.
fn check_version(info: &str) -> Result<Option<u32>, RedisBackendError> {
    let Some(version) = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))
    else {
        return Ok(None);
    };
    let major = version
        .split('.')
        .next()
        .and_then(|major| major.trim().parse::<u32>().ok());
    match major {
        Some(major) if major >= MIN_REDIS_MAJOR => Ok(Some(major)),
        _ => Err(RedisBackendError::of_kind(
            RedisBackendErrorKind::UnsupportedVersion,
            format!(
                "Redis {} found; keywarden needs Redis {MIN_REDIS_MAJOR} or later",
                version.trim().chars().take(32).collect::<String>()
            ),
        )),
    }
}

/// A Redis server shared by the instances of one deployment, under a key namespace.
///
/// Cloning is cheap: clones share one auto-reconnecting connection. Commands time out after
/// [`command_timeout`](Self::with_command_timeout) (default 250 ms) so a slow Redis cannot
/// stall requests.
///
/// Needs Redis 5 or later: the distributed rate limiter is a Lua script that reads the
/// server's clock (`TIME`) and then writes.
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
    /// [`InvalidConfig`](RedisBackendErrorKind::InvalidConfig) if the URL is invalid or the
    /// namespace is empty or holds whitespace;
    /// [`Unavailable`](RedisBackendErrorKind::Unavailable) if the first connection fails;
    /// [`UnsupportedVersion`](RedisBackendErrorKind::UnsupportedVersion) if the server
    /// reports a version older than Redis 5. A server that does not answer `INFO server`
    /// (an ACL without `INFO`) is accepted with a warning.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, RedisBackendError> {
        if namespace.is_empty()
            || namespace.len() > 128
            || !namespace.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(RedisBackendError::of_kind(
                RedisBackendErrorKind::InvalidConfig,
                "the namespace must be 1 to 128 visible ASCII characters",
            ));
        }
        let client = redis::Client::open(url).map_err(|e| RedisBackendError {
            kind: RedisBackendErrorKind::InvalidConfig,
            ..RedisBackendError::new("invalid Redis URL", e)
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(DEFAULT_TIMEOUT)
            .set_number_of_retries(2)
            .set_max_delay(1_000);
        let connection = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| RedisBackendError::new("connecting failed", e))?;
        let backend = Self {
            client,
            connection,
            namespace: namespace.into(),
            timeout: DEFAULT_TIMEOUT,
        };
        let mut connection = backend.connection();
        let info = backend
            .run(
                redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut connection),
            )
            .await;
        match info.map(|info| check_version(&info)) {
            Ok(Ok(Some(_))) => {}
            Ok(Err(too_old)) => return Err(too_old),
            Ok(Ok(None)) | Err(_) => tracing::warn!(
                target: "keywarden",
                "could not read the Redis version; the rate limiter needs Redis 5 or later"
            ),
        }
        Ok(backend)
    }

    /// How long one command may take before it counts as a Redis failure (default 250 ms).
    #[must_use]
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Asks the server for a `PONG`, within the command timeout: a readiness probe.
    ///
    /// # Errors
    /// [`Unavailable`](RedisBackendErrorKind::Unavailable) when the server does not answer in
    /// time or the command fails.
    pub async fn ping(&self) -> Result<(), RedisBackendError> {
        let mut connection = self.connection();
        self.run(redis::cmd("PING").query_async::<String>(&mut connection))
            .await
            .map(drop)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before_redis_5_are_refused() {
        let info = |v: &str| format!("# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n");
        assert_eq!(check_version(&info("7.0.15")).unwrap(), Some(7));
        assert_eq!(check_version(&info("5.0.0")).unwrap(), Some(5));
        for old in ["4.0.14", "3.2.12", "2.8", "", "x.y"] {
            let error = check_version(&info(old)).unwrap_err();
            assert_eq!(
                error.kind(),
                RedisBackendErrorKind::UnsupportedVersion,
                "{old}"
            );
        }
        assert_eq!(check_version("# Server\r\nuptime:1\r\n").unwrap(), None);
    }

    #[tokio::test]
    async fn invalid_configuration_is_its_own_kind() {
        let error = RedisBackend::connect("redis://127.0.0.1:1", "has space")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), RedisBackendErrorKind::InvalidConfig);
        let error = RedisBackend::connect("not a url", "ns").await.unwrap_err();
        assert_eq!(error.kind(), RedisBackendErrorKind::InvalidConfig);
    }
}
