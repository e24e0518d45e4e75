//! Redis pub/sub on `<namespace>:invalidate`, with a ping every few seconds so a silently
//! dead connection is noticed.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};

use super::{Backoff, Heard, Invalidation, InvalidationPublisher, Link, PublishError};
use crate::redis::RedisBackend;
use crate::store::{StoreError, StoreErrorKind};

/// How often the subscription connection is pinged at most (more often with a short
/// `max_blind`, so a silent connection is noticed in time).
pub(super) const PING_EVERY: Duration = Duration::from_secs(5);

/// Subscribes now (an error if that fails) and spawns the task that forwards messages.
pub(super) async fn start(
    backend: &RedisBackend,
    link: Link,
    ping: Duration,
) -> Result<tokio::task::JoinHandle<()>, StoreError> {
    let connection = subscribe(backend).await.map_err(|e| {
        StoreError::new(
            StoreErrorKind::Unavailable,
            format!("subscribing to Redis failed: {e}"),
        )
    })?;
    link.set(super::UP);
    let backend = backend.clone();
    Ok(tokio::spawn(run(link, backend, connection, ping)))
}

async fn subscribe(
    backend: &RedisBackend,
) -> Result<(PubSubSink, PubSubStream), crate::redis::RedisBackendError> {
    let connect = async {
        let (mut sink, stream) = backend.client().get_async_pubsub().await?.split();
        sink.subscribe(backend.channel()).await?;
        Ok::<_, redis::RedisError>((sink, stream))
    };
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(result) => {
            result.map_err(|e| crate::redis::RedisBackendError::new("subscribing failed", e))
        }
        Err(_) => Err(crate::redis::RedisBackendError::invalid(
            "subscribing timed out",
        )),
    }
}

async fn run(
    link: Link,
    backend: RedisBackend,
    connection: (PubSubSink, PubSubStream),
    every: Duration,
) {
    let (mut commands, mut messages) = connection;
    loop {
        let mut ping = tokio::time::interval(every);
        ping.tick().await;
        let reason: String = loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => {
                        let decoded = message
                            .get_payload::<String>()
                            .ok()
                            .and_then(|text| Invalidation::decode(&text));
                        if let Some(invalidation) = decoded {
                            if !link.change(None, invalidation).await {
                                return;
                            }
                        }
                    }
                    None => break "the server closed the connection".to_owned(),
                },
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(
                        Duration::from_secs(2).min(every * 2),
                        commands.ping::<redis::Value>(),
                    )
                    .await;
                    match pong {
                        Ok(Ok(_)) => {
                            if !link.report(Heard::Alive).await {
                                return;
                            }
                        }
                        Ok(Err(error)) => break error.to_string(),
                        Err(_) => break "ping timed out".to_owned(),
                    }
                }
            }
        };
        if !link.report(Heard::Lost(link.source, reason)).await {
            return;
        }
        let mut backoff = Backoff::new();
        (commands, messages) = loop {
            backoff.wait().await;
            if link.tx.is_closed() {
                return;
            }
            match subscribe(&backend).await {
                Ok(connection) => break connection,
                Err(error) => {
                    tracing::debug!(target: "keywarden", %error, "SUBSCRIBE reconnect failed");
                }
            }
        };
        if !link.report(Heard::Restored(link.source)).await {
            return;
        }
    }
}

#[async_trait]
impl InvalidationPublisher for RedisBackend {
    async fn publish(&self, invalidation: &Invalidation) -> Result<(), PublishError> {
        let mut connection = self.connection();
        let mut command = redis::cmd("PUBLISH");
        command.arg(self.channel()).arg(invalidation.encode());
        self.run::<i64>(command.query_async(&mut connection))
            .await
            .map(|_| ())
            .map_err(|e| PublishError(e.to_string()))
    }
}
