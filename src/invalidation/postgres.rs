//! LISTEN/NOTIFY: the feed trigger notifies `keywarden_feed` with `<schema> <seq> key <uuid>`
//! or `<schema> <seq> created` for every change it writes to the change feed.
//!
//! Behind a pooler in transaction mode `LISTEN` is accepted but its notifications never
//! arrive. After every `LISTEN` the listener sends itself a probe notification and waits for
//! it; when it does not come, `LISTEN` is reported unusable and the change feed alone carries
//! the changes.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use uuid::Uuid;

use super::{Backoff, Heard, Invalidation, Link};
use crate::store::{PostgresStore, StoreError, StoreErrorKind};

/// The channel the feed trigger notifies.
const CHANNEL: &str = "keywarden_feed";
/// How long the probe notification may take to come back.
const PROBE_WITHIN: Duration = Duration::from_secs(2);

/// Why a `LISTEN` did not give a working connection.
enum Failure {
    Error(sqlx::Error),
    /// Accepted, but the probe never arrived.
    Unusable(String),
}

/// Listens now. A first failure is an error only when there is no feed to fall back on (`!has_feed`);
/// otherwise it is reported and retried in the background. `None`: no task (unusable).
pub(super) async fn start(
    store: &PostgresStore,
    link: Link,
    has_feed: bool,
) -> Result<Option<tokio::task::JoinHandle<()>>, StoreError> {
    let pool = store.pool().clone();
    let schema = match store.schema() {
        Some(schema) => schema.to_owned(),
        None => sqlx::query_scalar::<_, String>("SELECT current_schema()")
            .fetch_one(&pool)
            .await
            .map_err(|e| {
                StoreError::new(StoreErrorKind::Unavailable, "reading the schema failed")
                    .with_source(e)
            })?,
    };
    match listen(&pool, &schema, &link).await {
        Ok(listener) => {
            link.set(super::UP);
            Ok(Some(tokio::spawn(run(link, pool, schema, Some(listener)))))
        }
        Err(Failure::Error(error)) if !has_feed => {
            Err(StoreError::new(StoreErrorKind::Unavailable, "LISTEN failed").with_source(error))
        }
        Err(Failure::Unusable(reason)) if !has_feed => Err(StoreError::new(
            StoreErrorKind::Unavailable,
            format!("LISTEN is unusable: {reason}"),
        )),
        Err(Failure::Error(error)) => {
            link.report(Heard::Lost(link.source, error.to_string()))
                .await;
            Ok(Some(tokio::spawn(run(link, pool, schema, None))))
        }
        Err(Failure::Unusable(reason)) => {
            link.report(Heard::Unusable(link.source, reason)).await;
            Ok(None)
        }
    }
}

/// Connects, listens, and checks with a probe that notifications arrive. Changes heard while
/// waiting for the probe are reported.
async fn listen(pool: &PgPool, schema: &str, link: &Link) -> Result<PgListener, Failure> {
    // sqlx would reconnect by itself inside `recv`; we use `try_recv` and reconnect
    // explicitly, so we know when to replay.
    let mut listener = PgListener::connect_with(pool)
        .await
        .map_err(Failure::Error)?;
    sqlx::query("SELECT set_config('application_name', $1, false)")
        .bind(format!("keywarden-listener:{schema}"))
        .execute(&mut listener)
        .await
        .map_err(Failure::Error)?;
    listener.listen(CHANNEL).await.map_err(Failure::Error)?;
    let probe = format!("{schema} probe {}", Uuid::new_v4());
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(&probe)
        .execute(pool)
        .await
        .map_err(Failure::Error)?;
    let deadline = tokio::time::Instant::now() + PROBE_WITHIN;
    loop {
        let next = tokio::time::timeout_at(deadline, listener.try_recv()).await;
        match next {
            Ok(Ok(Some(notification))) if notification.payload() == probe => return Ok(listener),
            Ok(Ok(Some(notification))) => {
                if let Some((seq, invalidation)) = parse(notification.payload(), schema) {
                    link.try_change(seq, invalidation);
                }
            }
            Ok(Ok(None)) => {
                return Err(Failure::Unusable(
                    "the connection closed before the probe notification arrived".into(),
                ))
            }
            Ok(Err(error)) => return Err(Failure::Error(error)),
            Err(_) => {
                return Err(Failure::Unusable(format!(
                    "LISTEN was accepted, but a probe notification did not arrive within \
                     {PROBE_WITHIN:?} (a connection pooler in transaction mode?)"
                )))
            }
        }
    }
}

async fn run(link: Link, pool: PgPool, schema: String, mut listener: Option<PgListener>) {
    loop {
        if let Some(connected) = listener.as_mut() {
            let lost = match connected.try_recv().await {
                Ok(Some(notification)) => {
                    if let Some((seq, invalidation)) = parse(notification.payload(), &schema) {
                        if !link.change(Some(seq), invalidation).await {
                            return;
                        }
                    }
                    continue;
                }
                Ok(None) => "the server closed the connection".to_owned(),
                Err(error) => error.to_string(),
            };
            if pool.is_closed() {
                tracing::debug!(target: "keywarden", "store pool closed; invalidation listener stops");
                return;
            }
            drop(listener.take());
            if !link.report(Heard::Lost(link.source, lost)).await {
                return;
            }
        }
        let mut backoff = Backoff::new();
        let connected = loop {
            backoff.wait().await;
            if pool.is_closed() {
                return;
            }
            match listen(&pool, &schema, &link).await {
                Ok(connected) => break connected,
                Err(Failure::Unusable(reason)) => {
                    link.report(Heard::Unusable(link.source, reason)).await;
                    return;
                }
                Err(Failure::Error(error)) => {
                    tracing::debug!(target: "keywarden", %error, "LISTEN reconnect failed");
                }
            }
        };
        listener = Some(connected);
        if !link.report(Heard::Restored(link.source)).await {
            return;
        }
    }
}

/// `<schema> <seq> key <uuid>` / `<schema> <seq> created`, for our schema only.
fn parse(payload: &str, schema: &str) -> Option<(u64, Invalidation)> {
    let (from, rest) = payload.split_once(' ')?;
    if from != schema {
        return None;
    }
    let (seq, message) = rest.split_once(' ')?;
    let seq = seq.parse().ok()?;
    // `all` (a TRUNCATE) is a reason to poll like any other: the feed says what to drop.
    Some((seq, Invalidation::decode(message)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_schema_and_numbered_changes_count() {
        let id = Uuid::now_v7();
        assert_eq!(
            parse(&format!("app 7 key {id}"), "app"),
            Some((7, Invalidation::Key(id)))
        );
        assert_eq!(
            parse("app 8 created", "app"),
            Some((8, Invalidation::Created))
        );
        assert_eq!(parse(&format!("other 7 key {id}"), "app"), None);
        assert_eq!(parse(&format!("app key {id}"), "app"), None);
        assert_eq!(parse("app probe 1234", "app"), None);
        assert_eq!(parse("app 9 all", "app"), Some((9, Invalidation::All)));
        assert_eq!(parse("app -1 created", "app"), None);
        assert_eq!(parse("app", "app"), None);
        assert_eq!(parse("app 1 bogus", "app"), None);
    }
}
