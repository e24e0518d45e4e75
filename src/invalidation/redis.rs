//! Redis pub/sub on `<namespace>:invalidate`, with a ping every few seconds so a silently
//! dead connection is noticed.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};

use super::{
    spawn, Backoff, ChangeSource, Invalidation, InvalidationListener, InvalidationPublisher,
    PublishError, Sink,
};
use crate::layer::ApiKeyLayer;
use crate::redis::{RedisBackend, RedisBackendError};

/// How often the subscription connection is pinged.
const PING_EVERY: Duration = Duration::from_secs(5);

impl InvalidationListener {
    /// Subscribes to the backend's invalidation channel and applies what other instances
    /// publish to `layer`'s cache.
    ///
    /// # Errors
    /// If the first connection or `SUBSCRIBE` fails.
    pub async fn redis(
        layer: &ApiKeyLayer,
        backend: &RedisBackend,
    ) -> Result<InvalidationListener, RedisBackendError> {
        let connection = subscribe(backend).await?;
        let backend = backend.clone();
        Ok(spawn(layer, ChangeSource::Redis, move |sink| {
            run(sink, backend, connection)
        }))
    }
}

async fn subscribe(
    backend: &RedisBackend,
) -> Result<(PubSubSink, PubSubStream), RedisBackendError> {
    let connect = async {
        let (mut sink, stream) = backend.client().get_async_pubsub().await?.split();
        sink.subscribe(backend.channel()).await?;
        Ok::<_, redis::RedisError>((sink, stream))
    };
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(result) => result.map_err(|e| RedisBackendError::new("subscribing failed", e)),
        Err(_) => Err(RedisBackendError::invalid("subscribing timed out")),
    }
}

async fn run(sink: Sink, backend: RedisBackend, connection: (PubSubSink, PubSubStream)) {
    let (mut commands, mut messages) = connection;
    loop {
        let mut ping = tokio::time::interval(PING_EVERY);
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
                            sink.apply(&invalidation);
                        }
                    }
                    None => break "the server closed the connection".to_owned(),
                },
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(
                        Duration::from_secs(2),
                        commands.ping::<redis::Value>(),
                    )
                    .await;
                    match pong {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => break error.to_string(),
                        Err(_) => break "ping timed out".to_owned(),
                    }
                }
            }
        };
        sink.lost(&reason);
        let mut backoff = Backoff::new();
        (commands, messages) = loop {
            backoff.wait().await;
            match subscribe(&backend).await {
                Ok(connection) => break connection,
                Err(error) => {
                    tracing::debug!(target: "keywarden", %error, "SUBSCRIBE reconnect failed");
                }
            }
        };
        sink.reconnected();
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
