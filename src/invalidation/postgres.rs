//! LISTEN/NOTIFY: the keys table's trigger notifies `keywarden_invalidate` with
//! `<schema> key <uuid>` or `<schema> created`.

use sqlx::postgres::{PgListener, PgPool};

use super::{spawn, Backoff, ChangeSource, Invalidation, InvalidationListener, Sink};
use crate::layer::ApiKeyLayer;
use crate::store::{PostgresStore, StoreError, StoreErrorKind};

/// The channel the migration's trigger notifies.
const CHANNEL: &str = "keywarden_invalidate";

impl InvalidationListener {
    /// Listens for changes to `store`'s keys table (in its schema) and drops the changed
    /// keys from `layer`'s cache. The connection shows in `pg_stat_activity` with the
    /// application name `keywarden-listener:<schema>`.
    ///
    /// # Errors
    /// If the first connection or `LISTEN` fails.
    pub async fn postgres(
        layer: &ApiKeyLayer,
        store: &PostgresStore,
    ) -> Result<InvalidationListener, StoreError> {
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
        let listener = listen(&pool, &schema).await.map_err(|e| {
            StoreError::new(StoreErrorKind::Unavailable, "LISTEN failed").with_source(e)
        })?;
        Ok(spawn(layer, ChangeSource::Postgres, move |sink| {
            run(sink, pool, schema, listener)
        }))
    }
}

async fn listen(pool: &PgPool, schema: &str) -> Result<PgListener, sqlx::Error> {
    // sqlx would reconnect by itself inside `recv`; we use `try_recv` and reconnect
    // explicitly, so we know when to flush the cache.
    let mut listener = PgListener::connect_with(pool).await?;
    sqlx::query("SELECT set_config('application_name', $1, false)")
        .bind(format!("keywarden-listener:{schema}"))
        .execute(&mut listener)
        .await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

async fn run(sink: Sink, pool: PgPool, schema: String, mut listener: PgListener) {
    loop {
        let lost: Box<dyn std::fmt::Display + Send> = match listener.try_recv().await {
            Ok(Some(notification)) => {
                if let Some(invalidation) = parse(notification.payload(), &schema) {
                    sink.apply(&invalidation);
                }
                continue;
            }
            Ok(None) => Box::new("the server closed the connection"),
            Err(error) => Box::new(error),
        };
        if pool.is_closed() {
            tracing::debug!(target: "keywarden", "store pool closed; invalidation listener stops");
            return;
        }
        sink.lost(&*lost);
        drop(listener);
        let mut backoff = Backoff::new();
        listener = loop {
            backoff.wait().await;
            if pool.is_closed() {
                return;
            }
            match listen(&pool, &schema).await {
                Ok(listener) => break listener,
                Err(error) => {
                    tracing::debug!(target: "keywarden", %error, "LISTEN reconnect failed")
                }
            }
        };
        sink.reconnected();
    }
}

/// `<schema> key <uuid>` / `<schema> created`, for our schema only.
fn parse(payload: &str, schema: &str) -> Option<Invalidation> {
    let (from, message) = payload.split_once(' ')?;
    (from == schema)
        .then(|| Invalidation::decode(message))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_schema_counts() {
        let id = uuid::Uuid::now_v7();
        assert_eq!(
            parse(&format!("app key {id}"), "app"),
            Some(Invalidation::Key(id))
        );
        assert_eq!(parse("app created", "app"), Some(Invalidation::Created));
        assert_eq!(parse(&format!("other key {id}"), "app"), None);
        assert_eq!(parse("app", "app"), None);
        assert_eq!(parse("app bogus", "app"), None);
    }
}
