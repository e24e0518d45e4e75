use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::error::DatabaseError;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Connection, Executor, Postgres, QueryBuilder, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::feed::{page_from_rows, FEED_SQL};
use super::sql::{
    aggregate_usage, clamp_i64, in_rfc3339_range, page_skipping_corrupt, USAGE_CHUNK_ROWS,
};
use super::sql::{
    decode_credits, decode_lease, decode_owner, generation_floor, lease_statement, refill_text,
    return_statement, set_credits_statement, CreditTable, Dialect, CREDIT_COLUMNS,
    KEY_CREDIT_COLUMNS,
};
use super::{owner_pool, unix_millis, CreditLease, Credits, OwnerPolicy, OwnerPolicyUpdate};
use super::{
    Applied, AuditWrite, ChangeOutcome, FeedPage, HourlyUsage, KeyChange, KeyPage, KeyPatch,
    KeyQuery, KeyRecord, KeyState, KeyStore, KeyUsage, Observers, OwnerKind, SecretRetirement,
    StoreChange, StoreError, StoreErrorKind, StoreObserver, UnmigratedKeys, UsageCount,
    UsageOutcome, UsageSubject, WebhookPatch, WebhookProgress, WebhookRecord, WebhookStore,
};
use crate::audit::{
    Actor, AuditCheckpoint, AuditEntry, AuditEvent, AuditMac, AuditPage, AuditQuery, AuditSealer,
    ChainHead, ChangeContext,
};
use crate::net::IpNetwork;
use crate::ratelimit::RateLimitPolicy;
use crate::secret::{Digest, SecretId};

const COLUMNS: &str = "id, digest, secret_id, display_start, name, description, collection, \
    subject, owner_kind, scopes, environment, read_only, metadata, rate_limit, created_at, \
    updated_at, expires_at, last_used_at, use_count, revoked_at, disabled, rotated_from, \
    encrypted_key, allowed_ips";

/// [`COLUMNS`] of the keys table aliased `k`.
const KEY_COLUMNS: &str = "k.id, k.digest, k.secret_id, k.display_start, k.name, \
    k.description, k.collection, k.subject, k.owner_kind, k.scopes, k.environment, k.read_only, \
    k.metadata, k.rate_limit, k.created_at, k.updated_at, k.expires_at, k.last_used_at, \
    k.use_count, k.revoked_at, k.disabled, k.rotated_from, k.encrypted_key, k.allowed_ips";

/// The longest identifier PostgreSQL keeps without truncating.
const MAX_SCHEMA_LEN: usize = 63;

/// A [`KeyStore`] in a PostgreSQL database.
///
/// Timestamps are `TIMESTAMPTZ` (microsecond precision, read back in UTC), scopes `TEXT[]`
/// and metadata `JSONB`. Updates lock the row (`SELECT … FOR UPDATE`) for their
/// read-modify-write, so concurrent patches are never lost.
///
/// Rows written by hand are read defensively: `expires_at = 'infinity'` means the key never
/// expires (like `NULL`; an update through the store writes it back as `NULL`). Any other
/// timestamp keywarden cannot represent — `-infinity`, `infinity` in another column, a year
/// outside 0000 to 9999 (what RFC 3339, and so the management API, can write) — makes the row corrupt ([`StoreErrorKind::Corrupt`]): reading it by id or by
/// digest fails (the request path answers 503 `store_unavailable` for that key alone), and
/// [`list`](KeyStore::list) skips it with a warning naming its id, as it skips any corrupt
/// row, so one bad row never hides the rest of its page.
///
/// ```no_run
/// # async fn demo() -> Result<(), keywarden::StoreError> {
/// use keywarden::{store::KeyQuery, KeyStore, PostgresStore};
///
/// let store = PostgresStore::connect("postgres://keywarden@localhost/keywarden").await?;
/// let page = store.list(&KeyQuery::new()).await?;
/// # let _ = page;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    schema: Option<Arc<str>>,
    observers: Observers,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host/database`) and runs the migrations.
    ///
    /// # Errors
    /// [`StoreErrorKind::Unavailable`] if the server cannot be reached,
    /// [`StoreErrorKind::Schema`] if the migrations fail, [`StoreErrorKind::Other`] for a URL
    /// that does not parse.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .connect_with(parse_url(url)?)
            .await
            .map_err(|e| store_error("cannot connect to PostgreSQL", e))?;
        let store = Self::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Connects to `url` with every pooled connection's `search_path` set to `schema`
    /// (created if missing), and runs the migrations inside it. Keeps keywarden's tables, or
    /// each test's, apart from everything else in the database.
    ///
    /// # Errors
    /// [`StoreErrorKind::Other`] if `schema` is not a lowercase identifier
    /// (`[a-z_][a-z0-9_]*`, at most 63 bytes) or the URL does not parse; otherwise as
    /// [`PostgresStore::connect`].
    pub async fn connect_with_schema(url: &str, schema: &str) -> Result<Self, StoreError> {
        if !is_valid_schema_name(schema) {
            return Err(StoreError::new(
                StoreErrorKind::Other,
                "invalid schema name (expected [a-z_][a-z0-9_]*, at most 63 bytes)",
            ));
        }
        let options = parse_url(url)?;
        let context = "cannot connect to PostgreSQL";
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(|e| store_error(context, e))?;
        // The name was validated above, so quoting it is enough to make it safe to splice.
        let created = conn
            .execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
            .await;
        // Two processes creating the same schema at once can still collide on the catalog.
        if let Err(e) = created {
            if !is_duplicate_schema(&e) {
                return Err(store_error("creating the schema failed", e));
            }
        }
        conn.close().await.map_err(|e| store_error(context, e))?;

        let set_path: Arc<str> = format!("SET search_path TO \"{schema}\"").into();
        let pool = PgPoolOptions::new()
            .after_connect(move |conn, _meta| {
                let set_path = Arc::clone(&set_path);
                Box::pin(async move {
                    conn.execute(&*set_path).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| store_error(context, e))?;
        let store = Self {
            pool,
            schema: Some(schema.into()),
            observers: Observers::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Wraps an existing pool. Does not run the migrations: call [`PostgresStore::migrate`].
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            schema: None,
            observers: Observers::default(),
        }
    }

    /// Applies any migrations the database lacks. Safe to run repeatedly and concurrently
    /// (sqlx takes an advisory lock).
    ///
    /// # Errors
    /// [`StoreErrorKind::Schema`] if a migration fails or the database holds a migration this
    /// version does not know with a conflicting checksum.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        // The application may keep its own sqlx migrations in the same schema.
        migrator.set_ignore_missing(true);
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| store_error("migrating the PostgreSQL database failed", e.into()))
    }

    /// How many of this version's migrations the database has not applied (successfully).
    async fn pending_migrations(&self) -> Result<usize, StoreError> {
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| match e {
                    // No migrations table: none applied.
                    sqlx::Error::Database(db) if db.message().contains("_sqlx_migrations") => {
                        StoreError::new(
                            StoreErrorKind::Schema,
                            "the database has no keywarden schema; run `keywarden migrate`",
                        )
                    }
                    e => store_error("checking the PostgreSQL schema failed", e),
                })?;
        Ok(sqlx::migrate!("./migrations/postgres")
            .iter()
            .filter(|migration| !applied.contains(&migration.version))
            .count())
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema given to [`connect_with_schema`](Self::connect_with_schema), if any.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL or the options: they hold the password.
        let options = self.pool.connect_options();
        f.debug_struct("PostgresStore")
            .field("host", &options.get_host())
            .field("port", &options.get_port())
            .field("database", &options.get_database())
            .field("username", &options.get_username())
            .field("schema", &self.schema)
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.observers.created(self.insert_unobserved(record).await)
    }

    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        // The record's digest, else an added one: one statement; a record digest (every key
        // not re-digested since a rotation) is found by one index lookup, as before.
        sqlx::query(&format!(
            "SELECT {COLUMNS}, {CREDIT_COLUMNS} FROM keywarden_keys WHERE digest = $1 \
             UNION ALL SELECT {KEY_COLUMNS}, {KEY_CREDIT_COLUMNS} FROM keywarden_key_digests AS d \
             JOIN keywarden_keys AS k ON k.id = d.key_id WHERE d.digest = $1 LIMIT 1"
        ))
        .bind(digest.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| store_error("looking up a key by digest failed", e))?
        .map(|row| decode_row(&row))
        .transpose()
    }

    async fn get(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {COLUMNS}, {CREDIT_COLUMNS} FROM keywarden_keys WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| store_error("reading a key failed", e))?
        .map(|row| decode_row(&row))
        .transpose()
    }

    async fn update(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        now: OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.observers
            .changed(self.update_unobserved(id, patch, now).await)
    }

    async fn add_digest(
        &self,
        id: Uuid,
        found_by: &Digest,
        new: &Digest,
        secret_id: SecretId,
    ) -> Result<bool, StoreError> {
        self.observers.changed_if(
            id,
            self.add_digest_unobserved(id, found_by, new, secret_id)
                .await,
        )
    }

    async fn retire_secret(
        &self,
        secret_id: SecretId,
        unmigrated: UnmigratedKeys,
        now: OffsetDateTime,
    ) -> Result<SecretRetirement, StoreError> {
        self.observers.changed_all(
            self.retire_secret_unobserved(secret_id, unmigrated, now)
                .await,
        )
    }

    async fn reseal(&self, id: Uuid, old: &[u8], new: &[u8]) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE keywarden_keys SET encrypted_key = $1 WHERE id = $2 AND encrypted_key = $3",
        )
        .bind(new)
        .bind(id)
        .bind(old)
        .execute(&self.pool)
        .await
        .map_err(|e| store_error("re-sealing a viewable key failed", e))?;
        Ok(result.rows_affected() > 0)
    }

    async fn delete(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.observers.changed(self.delete_unobserved(id).await)
    }

    async fn list(&self, query: &KeyQuery) -> Result<KeyPage, StoreError> {
        let limit = query.effective_limit();
        let mut sql = QueryBuilder::<Postgres>::new(format!(
            "SELECT {COLUMNS}, {CREDIT_COLUMNS} FROM keywarden_keys WHERE TRUE"
        ));
        if let Some(collection) = &query.collection {
            sql.push(" AND collection = ")
                .push_bind(collection.as_str());
        }
        if let Some(subject) = &query.subject {
            sql.push(" AND subject = ").push_bind(subject.as_str());
        }
        if let Some(environment) = &query.environment {
            sql.push(" AND environment = ")
                .push_bind(environment.as_str());
        }
        if let Some(after) = query.after {
            sql.push(" AND id > ").push_bind(after);
        }
        if let Some(state) = query.state {
            push_state_filter(&mut sql, state, micros(query.now));
        }
        if let Some((after, until)) = query.expires_between {
            sql.push(" AND expires_at > ")
                .push_bind(micros(after))
                .push(" AND expires_at <= ")
                .push_bind(micros(until));
        }
        sql.push(" ORDER BY id LIMIT ").push_bind(limit as i64 + 1);
        let rows = sql
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(|e| store_error("listing keys failed", e))?;
        page_skipping_corrupt(&rows, limit, |row| column(row, "id"), decode_row)
    }

    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        let totals: Vec<_> = aggregate_usage(usage).into_iter().collect();
        if totals.is_empty() {
            return Ok(());
        }
        let context = "recording key usage failed";
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| store_error(context, e))?;
        for chunk in totals.chunks(USAGE_CHUNK_ROWS) {
            let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
            let uses: Vec<i64> = chunk
                .iter()
                .map(|(_, (uses, _))| clamp_i64(*uses))
                .collect();
            let last_used: Vec<OffsetDateTime> =
                chunk.iter().map(|(_, (_, at))| micros(*at)).collect();
            // Rows are locked in id order (chunks are in id order too), whatever plan the
            // update gets: concurrent batches take their locks in one order, so they cannot
            // deadlock each other.
            sqlx::query(
                "SELECT 1 FROM keywarden_keys WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(|e| store_error(context, e))?;
            sqlx::query(
                "UPDATE keywarden_keys AS k SET \
                 use_count = CASE WHEN k.use_count > 9223372036854775807 - u.uses \
                     THEN 9223372036854775807 ELSE k.use_count + u.uses END, \
                 last_used_at = GREATEST(k.last_used_at, u.at) \
                 FROM UNNEST($1::uuid[], $2::bigint[], $3::timestamptz[]) AS u(id, uses, at) \
                 WHERE k.id = u.id",
            )
            .bind(&ids)
            .bind(&uses)
            .bind(&last_used)
            .execute(&mut *tx)
            .await
            .map_err(|e| store_error(context, e))?;
        }
        tx.commit().await.map_err(|e| store_error(context, e))
    }

    async fn lease_credits(
        &self,
        id: Uuid,
        need: u64,
        want: u64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditLease>, StoreError> {
        self.lease_from(CreditTable::Key, id, need, want, now).await
    }

    async fn return_credits(
        &self,
        id: Uuid,
        amount: u64,
        generation: u64,
        period: u64,
    ) -> Result<bool, StoreError> {
        self.return_to(CreditTable::Key, id, amount, generation, period)
            .await
    }

    async fn owner_policy(
        &self,
        collection: &str,
        subject: &str,
    ) -> Result<Option<OwnerPolicy>, StoreError> {
        read_owner(&self.pool, collection, subject, "").await
    }

    async fn list_owner_policies(
        &self,
        collection: Option<&str>,
    ) -> Result<Vec<OwnerPolicy>, StoreError> {
        let rows = sqlx::query(&format!(
            "{OWNER_SELECT} WHERE $1::text IS NULL OR o.collection = $1 ORDER BY o.collection, o.subject"
        ))
        .bind(collection)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| store_error("listing owner policies failed", e))?;
        rows.iter().map(decode_owner_row).collect()
    }

    async fn set_owner_policy(
        &self,
        collection: &str,
        subject: &str,
        update: &OwnerPolicyUpdate,
        now: OffsetDateTime,
    ) -> Result<OwnerPolicy, StoreError> {
        let map = |e| store_error("setting an owner policy failed", e);
        let pool = owner_pool(collection, subject);
        let mut tx = self.pool.begin().await.map_err(map)?;
        // One writer per owner until commit, also when it has no row yet to lock (two first
        // writes would otherwise both start from nothing, and the second undo the first).
        lock_owner(&mut tx, pool).await?;
        let before = read_owner(&mut *tx, collection, subject, " FOR UPDATE OF o").await?;
        let old_generation: Option<i64> = sqlx::query_scalar(
            "SELECT generation FROM keywarden_owner_credits WHERE pool = $1 FOR UPDATE",
        )
        .bind(pool)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map)?;
        let rate_limit = match update.rate_limit {
            Some(rate_limit) => rate_limit,
            None => before.as_ref().and_then(|b| b.rate_limit),
        };
        let before_credits = before.as_ref().and_then(|b| b.credits);
        let credits = if update.changes_credits() {
            update.apply_credits(before_credits)
        } else {
            before_credits
        };
        // A new generation voids every lease of the old credits; never one reused.
        let generation = old_generation
            .map_or(0, |g| g.saturating_add(1))
            .max(generation_floor(now));
        let stored_generation: Option<i64> = match (update.changes_credits(), credits) {
            (_, None) => None,
            (true, Some(_)) => Some(generation),
            (false, Some(_)) => old_generation,
        };
        sqlx::query(
            "INSERT INTO keywarden_owners \
             (collection, subject, pool, rate_limit, credits_refill, credits_generation, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (collection, subject) DO UPDATE SET rate_limit = excluded.rate_limit, \
             credits_refill = excluded.credits_refill, \
             credits_generation = excluded.credits_generation, updated_at = excluded.updated_at",
        )
        .bind(collection)
        .bind(subject)
        .bind(pool)
        .bind(rate_limit.map(|r| r.to_string()))
        .bind(credits.and_then(|c| c.refill).map(|r| r.to_string()))
        .bind(stored_generation)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        match (update.changes_credits(), credits) {
            (true, Some(credits)) => {
                sqlx::query_scalar::<_, i64>(&set_credits_statement(
                    Dialect::Postgres,
                    CreditTable::Owner,
                ))
                .bind(pool)
                .bind(clamp_i64(credits.remaining))
                .bind(credits.refill.map(|r| clamp_i64(r.amount())))
                .bind(credits.refill.map(|r| clamp_i64(r.interval_millis())))
                .bind(unix_millis(now))
                .bind(update.credits.is_some() || before_credits.is_none())
                .bind(generation)
                .fetch_one(&mut *tx)
                .await
                .map_err(map)?;
            }
            (true, None) => {
                sqlx::query("DELETE FROM keywarden_owner_credits WHERE pool = $1")
                    .bind(pool)
                    .execute(&mut *tx)
                    .await
                    .map_err(map)?;
            }
            (false, _) => {}
        }
        let keys = owner_keys(&mut tx, collection, subject).await?;
        let after = read_owner(&mut *tx, collection, subject, "")
            .await?
            .ok_or_else(|| corrupt("keywarden_owners", "the row just written is gone"))?;
        tx.commit().await.map_err(map)?;
        for id in keys {
            self.observers.notify(StoreChange::Key(id));
        }
        Ok(after)
    }

    async fn delete_owner_policy(
        &self,
        collection: &str,
        subject: &str,
    ) -> Result<Option<OwnerPolicy>, StoreError> {
        let map = |e| store_error("deleting an owner policy failed", e);
        let mut tx = self.pool.begin().await.map_err(map)?;
        lock_owner(&mut tx, owner_pool(collection, subject)).await?;
        let Some(before) = read_owner(&mut *tx, collection, subject, " FOR UPDATE OF o").await?
        else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM keywarden_owners WHERE collection = $1 AND subject = $2")
            .bind(collection)
            .bind(subject)
            .execute(&mut *tx)
            .await
            .map_err(map)?;
        let keys = owner_keys(&mut tx, collection, subject).await?;
        tx.commit().await.map_err(map)?;
        for id in keys {
            self.observers.notify(StoreChange::Key(id));
        }
        Ok(Some(before))
    }

    async fn lease_owner_credits(
        &self,
        pool: Uuid,
        need: u64,
        want: u64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditLease>, StoreError> {
        self.lease_from(CreditTable::Owner, pool, need, want, now)
            .await
    }

    async fn return_owner_credits(
        &self,
        pool: Uuid,
        amount: u64,
        generation: u64,
        period: u64,
    ) -> Result<bool, StoreError> {
        self.return_to(CreditTable::Owner, pool, amount, generation, period)
            .await
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        match self.pending_migrations().await? {
            0 => Ok(()),
            pending => Err(StoreError::new(
                StoreErrorKind::Schema,
                format!("{pending} migration(s) not applied; run `keywarden migrate`"),
            )),
        }
    }

    async fn apply_audited(
        &self,
        change: KeyChange<'_>,
        audit: &AuditWrite<'_>,
    ) -> Result<Applied, StoreError> {
        let map = |e| store_error("writing a change and its audit event failed", e);
        let mut tx = self.pool.begin().await.map_err(map)?;
        begin_audited(&mut tx).await?;
        seal_pending(&mut tx, audit.sealer).await?;
        let (outcome, entry) = match change {
            KeyChange::Insert(record) => {
                insert_in(&mut tx, record).await?;
                (ChangeOutcome::Inserted, Some(audit.created(record)))
            }
            KeyChange::Update { id, patch, now } => {
                let updated = update_in(&mut tx, id, patch, now).await?;
                let entry = updated.as_ref().map(|(b, a)| audit.updated(b, a));
                (ChangeOutcome::Updated(updated.map(|(_, a)| a)), entry)
            }
            KeyChange::Delete(id) => {
                let gone = delete_in(&mut tx, id).await?;
                let entry = gone.as_ref().map(|r| audit.deleted(r));
                (ChangeOutcome::Deleted(gone), entry)
            }
            KeyChange::RetireSecret {
                secret_id,
                unmigrated,
                now,
            } => {
                let outcome = retire_secret_in(&mut tx, secret_id, unmigrated, now).await?;
                let entry = outcome.retired.then(|| audit.retired(secret_id, &outcome));
                (ChangeOutcome::Retired(outcome), entry)
            }
            KeyChange::Note(record) => (ChangeOutcome::Noted, Some(audit.noted(record))),
            KeyChange::Event if audit.action.is_none() => {
                return Err(StoreError::new(
                    StoreErrorKind::Other,
                    "an event without a key needs an action",
                ))
            }
            KeyChange::Event => (ChangeOutcome::Noted, Some(audit.event())),
        };
        let event = match entry {
            Some(entry) => {
                let head = audit_head(&mut tx).await?;
                let event = audit.sealer.seal(head, &entry);
                insert_event(&mut tx, &event).await?;
                Some(event)
            }
            None => None,
        };
        end_audited(&mut tx).await?;
        tx.commit().await.map_err(map)?;
        match &outcome {
            ChangeOutcome::Inserted => self.observers.notify(StoreChange::Created),
            ChangeOutcome::Updated(Some(r)) | ChangeOutcome::Deleted(Some(r)) => {
                self.observers.notify(StoreChange::Key(r.id));
            }
            ChangeOutcome::Retired(r) if r.retired => self.observers.notify(StoreChange::All),
            _ => {}
        }
        Ok(Applied { outcome, event })
    }

    async fn audit_events(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        let limit = query.effective_limit();
        let mut sql = QueryBuilder::<Postgres>::new(format!(
            "SELECT {AUDIT_COLUMNS} FROM keywarden_audit WHERE seq > "
        ));
        sql.push_bind(clamp_i64(query.after.unwrap_or(0)));
        if let Some(id) = query.key_id {
            sql.push(" AND key_id = ").push_bind(id);
        }
        // The sealed columns, not the display column `actor`: a filter sees what `verify`
        // checks.
        if let Some(filter) = query.actor_filter() {
            sql.push(" AND actor_kind = ").push_bind(filter.kind);
            if let Some(id) = filter.key_id {
                sql.push(" AND actor_key_id = ").push_bind(id);
            }
            if let Some(name) = filter.name {
                sql.push(" AND actor_name = ").push_bind(name);
            }
        }
        if let Some(action) = query.action {
            sql.push(" AND action = ").push_bind(action.as_str());
        }
        if let Some(collection) = &query.collection {
            sql.push(" AND collection = ")
                .push_bind(collection.as_str());
        }
        if let Some(subject) = &query.subject {
            sql.push(" AND subject = ").push_bind(subject.as_str());
        }
        if let Some(since) = query.since {
            sql.push(" AND at >= ").push_bind(micros(since));
        }
        if let Some(until) = query.until {
            sql.push(" AND at < ").push_bind(micros(until));
        }
        sql.push(" ORDER BY seq LIMIT ").push_bind(limit as i64 + 1);
        let rows = sql
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(|e| store_error("reading the audit log failed", e))?;
        let items = rows
            .iter()
            .map(decode_event)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AuditPage::from_overfetch(items, limit))
    }

    async fn audit_head(&self) -> Result<ChainHead, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| store_error("reading the audit log's head failed", e))?;
        audit_head(&mut conn).await
    }

    fn webhooks(&self) -> Option<&dyn WebhookStore> {
        Some(self)
    }

    async fn record_usage_counts(&self, counts: &[UsageCount]) -> Result<(), StoreError> {
        // One statement per table: the counts as arrays, summed per row first (an upsert may
        // touch a row once).
        let mut keys: std::collections::BTreeMap<(Uuid, OffsetDateTime, &str), i64> =
            std::collections::BTreeMap::new();
        let mut collections: std::collections::BTreeMap<(&str, OffsetDateTime, &str), i64> =
            std::collections::BTreeMap::new();
        for c in counts {
            let n = clamp_i64(c.count);
            match &c.subject {
                UsageSubject::Key(id) => {
                    let slot = keys.entry((*id, c.hour, c.outcome.as_str())).or_default();
                    *slot = slot.saturating_add(n);
                }
                UsageSubject::Collection(slug) => {
                    let slot = collections
                        .entry((slug.as_str(), c.hour, c.outcome.as_str()))
                        .or_default();
                    *slot = slot.saturating_add(n);
                }
            }
        }
        let map = |e| store_error("recording usage analytics failed", e);
        // One transaction: a retry after a failure must not add the first table's counts twice.
        let mut tx = self.pool.begin().await.map_err(map)?;
        if !keys.is_empty() {
            let (ids, hours, outcomes, ns) =
                unzip4(keys.iter().map(|((id, h, o), n)| (*id, micros(*h), *o, *n)));
            sqlx::query(
                "INSERT INTO keywarden_usage_hourly (key_id, hour, outcome, count) \
                 SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::bigint[]) \
                 ON CONFLICT (key_id, hour, outcome) \
                 DO UPDATE SET count = keywarden_usage_hourly.count + excluded.count",
            )
            .bind(ids)
            .bind(hours)
            .bind(outcomes)
            .bind(ns)
            .execute(&mut *tx)
            .await
            .map_err(map)?;
        }
        if !collections.is_empty() {
            let (slugs, hours, outcomes, ns) = unzip4(
                collections
                    .iter()
                    .map(|((s, h, o), n)| (*s, micros(*h), *o, *n)),
            );
            sqlx::query(
                "INSERT INTO keywarden_collection_usage_hourly (collection, hour, outcome, count) \
                 SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::bigint[]) \
                 ON CONFLICT (collection, hour, outcome) \
                 DO UPDATE SET count = keywarden_collection_usage_hourly.count + excluded.count",
            )
            .bind(slugs)
            .bind(hours)
            .bind(outcomes)
            .bind(ns)
            .execute(&mut *tx)
            .await
            .map_err(map)?;
        }
        tx.commit().await.map_err(map)
    }

    async fn usage_counts(
        &self,
        subject: &UsageSubject,
        since: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Vec<HourlyUsage>, StoreError> {
        let sql = match subject {
            UsageSubject::Key(_) => {
                "SELECT hour, outcome, count FROM keywarden_usage_hourly \
                 WHERE key_id = $1::uuid AND hour >= $2 AND hour < $3 ORDER BY hour, outcome"
            }
            UsageSubject::Collection(_) => {
                "SELECT hour, outcome, count FROM keywarden_collection_usage_hourly \
                 WHERE collection = $1 AND hour >= $2 AND hour < $3 ORDER BY hour, outcome"
            }
        };
        let name = match subject {
            UsageSubject::Key(id) => id.to_string(),
            UsageSubject::Collection(slug) => slug.clone(),
        };
        let rows: Vec<(PgTimestamp, String, i64)> = sqlx::query_as(sql)
            .bind(name)
            .bind(micros(since))
            .bind(micros(until))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| store_error("reading usage analytics failed", e))?;
        rows.into_iter()
            .map(|(hour, outcome, count)| {
                Ok(HourlyUsage {
                    hour: instant(hour, "hour")?,
                    outcome: UsageOutcome::parse(&outcome)
                        .ok_or_else(|| corrupt("outcome", "unknown outcome"))?,
                    count: u64::try_from(count).map_err(|_| corrupt("count", "negative"))?,
                })
            })
            .collect()
    }

    async fn change_feed(&self, after: u64, limit: u32) -> Result<Option<FeedPage>, StoreError> {
        let rows: Vec<(i32, i64, Option<Uuid>)> = sqlx::query_as(FEED_SQL)
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| store_error("reading the change feed failed", e))?;
        page_from_rows(rows).map(Some)
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        sqlx::query(
            "DELETE FROM keywarden_changes WHERE at < $1 \
             AND seq < (SELECT MAX(seq) FROM keywarden_changes)",
        )
        .bind(micros(before))
        .execute(&self.pool)
        .await
        .map(|done| done.rows_affected())
        .map_err(|e| store_error("pruning the change feed failed", e))
    }

    async fn prune_usage_counts(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let map = |e| store_error("pruning usage analytics failed", e);
        let mut deleted = 0;
        for table in [
            "keywarden_usage_hourly",
            "keywarden_collection_usage_hourly",
        ] {
            deleted += sqlx::query(&format!("DELETE FROM {table} WHERE hour < $1"))
                .bind(micros(before))
                .execute(&self.pool)
                .await
                .map_err(map)?
                .rows_affected();
        }
        Ok(deleted)
    }

    async fn audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| store_error("reading the audit checkpoint failed", e))?;
        read_checkpoint(&mut conn).await
    }

    async fn prune_audit(
        &self,
        before: OffsetDateTime,
        sealer: &AuditSealer,
    ) -> Result<u64, StoreError> {
        let map = |e| store_error("pruning the audit log failed", e);
        let mut tx = self.pool.begin().await.map_err(map)?;
        begin_audited(&mut tx).await?;
        let last: Option<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, mac FROM keywarden_audit WHERE seq = \
             (SELECT max(seq) FROM keywarden_audit WHERE at < $1)",
        )
        .bind(micros(before))
        .fetch_optional(&mut *tx)
        .await
        .map_err(map)?;
        let Some((seq, mac)) = last else {
            return Ok(0);
        };
        let head = ChainHead {
            seq: u64::try_from(seq).map_err(|_| corrupt("seq", "negative"))?,
            mac: AuditMac::from_bytes(bytes(mac, "mac")?),
        };
        // Under the lock (no event can change meanwhile): what is deleted must verify, or
        // an edited time could have chosen the cut.
        let previous = read_checkpoint(&mut tx).await?;
        let doomed = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM keywarden_audit WHERE seq <= $1 ORDER BY seq"
        ))
        .bind(seq)
        .fetch_all(&mut *tx)
        .await
        .map_err(map)?
        .iter()
        .map(decode_event)
        .collect::<Result<Vec<_>, _>>()?;
        crate::audit::verify_prefix(sealer, previous.as_ref(), &doomed)
            .map_err(super::unverified_prune)?;
        let checkpoint = sealer.checkpoint(head);
        let deleted = sqlx::query("DELETE FROM keywarden_audit WHERE seq <= $1")
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(map)?
            .rows_affected();
        sqlx::query(
            "INSERT INTO keywarden_audit_checkpoint (id, seq, mac, sealed_by, seal) \
             VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, \
             mac = excluded.mac, sealed_by = excluded.sealed_by, seal = excluded.seal",
        )
        .bind(seq)
        .bind(checkpoint.head.mac.as_bytes().as_slice())
        .bind(checkpoint.sealed_by.as_bytes().as_slice())
        .bind(checkpoint.seal.as_bytes().as_slice())
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        end_audited(&mut tx).await?;
        tx.commit().await.map_err(map)?;
        Ok(deleted)
    }

    async fn seal_pending_audit(&self, sealer: &AuditSealer) -> Result<u64, StoreError> {
        let map = |e| store_error("sealing plain-SQL changes into the audit log failed", e);
        // Cheap when there is nothing: no lock taken.
        let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM keywarden_audit_pending)")
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
        if !any {
            return Ok(0);
        }
        // Batch by batch, each in its own transaction, until none is left.
        let mut sealed = 0;
        loop {
            let mut tx = self.pool.begin().await.map_err(map)?;
            begin_audited(&mut tx).await?;
            let batch = seal_pending(&mut tx, sealer).await?;
            end_audited(&mut tx).await?;
            tx.commit().await.map_err(map)?;
            sealed += batch;
            if batch == 0 {
                return Ok(sealed);
            }
        }
    }

    fn observe(&self, observer: std::sync::Weak<dyn StoreObserver>) {
        self.observers.add(observer);
    }
}

/// Credit balances: a key's or an owner's.
impl PostgresStore {
    async fn lease_from(
        &self,
        table: CreditTable,
        id: Uuid,
        need: u64,
        want: u64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditLease>, StoreError> {
        let row = sqlx::query(&lease_statement(Dialect::Postgres, table))
            .bind(id)
            .bind(unix_millis(now))
            .bind(clamp_i64(need))
            .bind(clamp_i64(want))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| store_error("leasing credits failed", e))?;
        let Some(row) = row else { return Ok(None) };
        decode_lease(
            column(&row, "granted")?,
            column(&row, "remaining")?,
            column(&row, "period")?,
            column(&row, "generation")?,
            column(&row, "anchor_ms")?,
            column(&row, "refill_ms")?,
        )
        .map(Some)
    }

    async fn return_to(
        &self,
        table: CreditTable,
        id: Uuid,
        amount: u64,
        generation: u64,
        period: u64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&return_statement(Dialect::Postgres, table))
            .bind(id)
            .bind(clamp_i64(amount))
            .bind(clamp_i64(generation))
            .bind(clamp_i64(period))
            .execute(&self.pool)
            .await
            .map_err(|e| store_error("returning credits failed", e))?;
        Ok(done.rows_affected() > 0)
    }
}

/// An owner policy with its balance.
const OWNER_SELECT: &str = "SELECT o.collection, o.subject, o.rate_limit, o.credits_refill, \
    o.credits_generation, o.updated_at, c.remaining FROM keywarden_owners AS o \
    LEFT JOIN keywarden_owner_credits AS c ON c.pool = o.pool";

/// An owner's policy with its balance, if it has one; `lock`: `""` or `" FOR UPDATE OF o"`.
async fn read_owner<'e, E>(
    conn: E,
    collection: &str,
    subject: &str,
    lock: &str,
) -> Result<Option<OwnerPolicy>, StoreError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let row = sqlx::query(&format!(
        "{OWNER_SELECT} WHERE o.collection = $1 AND o.subject = $2{lock}"
    ))
    .bind(collection)
    .bind(subject)
    .fetch_optional(conn)
    .await
    .map_err(|e| store_error("reading an owner policy failed", e))?;
    row.as_ref().map(decode_owner_row).transpose()
}

fn decode_owner_row(row: &PgRow) -> Result<OwnerPolicy, StoreError> {
    let limits = decode_owner(
        column(row, "rate_limit")?,
        column(row, "credits_refill")?,
        column(row, "credits_generation")?,
    )?;
    let remaining: Option<i64> = column(row, "remaining")?;
    let credits = match (limits.credits, remaining) {
        (Some(refill), Some(remaining)) => Some(Credits {
            remaining: u64::try_from(remaining).map_err(|_| corrupt("remaining", "negative"))?,
            refill,
        }),
        _ => None,
    };
    Ok(OwnerPolicy {
        collection: column(row, "collection")?,
        subject: column(row, "subject")?,
        rate_limit: limits.rate_limit,
        credits,
        updated_at: column(row, "updated_at")?,
    })
}

/// Serialises the policy writes of one owner: a transaction-scoped advisory lock on the first
/// 8 bytes of its pool id (an unrelated owner sharing them only waits its turn).
async fn lock_owner(conn: &mut PgConnection, pool: Uuid) -> Result<(), StoreError> {
    let mut id = [0u8; 8];
    id.copy_from_slice(&pool.as_bytes()[..8]);
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(i64::from_be_bytes(id))
        .execute(&mut *conn)
        .await
        .map_err(|e| store_error("locking an owner policy failed", e))?;
    Ok(())
}

/// The ids of an owner's keys (fed by the owners' trigger; the in-process observers hear of
/// them from the store).
async fn owner_keys(
    conn: &mut PgConnection,
    collection: &str,
    subject: &str,
) -> Result<Vec<Uuid>, StoreError> {
    sqlx::query_scalar("SELECT id FROM keywarden_keys WHERE collection = $1 AND subject = $2")
        .bind(collection)
        .bind(subject)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| store_error("reading an owner's keys failed", e))
}

/// The writes themselves; the `KeyStore` methods add the in-process change notices.
impl PostgresStore {
    async fn insert_unobserved(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| store_error("inserting a key failed", e))?;
        insert_in(&mut conn, record).await
    }

    async fn update_unobserved(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        now: OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let map = |e| store_error("updating a key failed", e);
        let mut tx = self.pool.begin().await.map_err(map)?;
        let updated = update_in(&mut tx, id, patch, now).await?;
        tx.commit().await.map_err(map)?;
        Ok(updated.map(|(_, after)| after))
    }

    async fn retire_secret_unobserved(
        &self,
        secret_id: SecretId,
        unmigrated: UnmigratedKeys,
        now: OffsetDateTime,
    ) -> Result<SecretRetirement, StoreError> {
        let map = |e| store_error("retiring a secret failed", e);
        let mut tx = self.pool.begin().await.map_err(map)?;
        let outcome = retire_secret_in(&mut tx, secret_id, unmigrated, now).await?;
        tx.commit().await.map_err(map)?;
        Ok(outcome)
    }

    async fn delete_unobserved(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| store_error("deleting a key failed", e))?;
        delete_in(&mut conn, id).await
    }
    async fn add_digest_unobserved(
        &self,
        id: Uuid,
        found_by: &Digest,
        new: &Digest,
        secret_id: SecretId,
    ) -> Result<bool, StoreError> {
        let context = "adding a digest to a key failed";
        // One statement: the key must still have `found_by`, and no digest under the secret.
        let added = sqlx::query(
            "INSERT INTO keywarden_key_digests (digest, key_id, secret_id) \
             SELECT $1, k.id, $3 FROM keywarden_keys AS k WHERE k.id = $2 AND k.secret_id <> $3 \
               AND (k.digest = $4 OR EXISTS (SELECT 1 FROM keywarden_key_digests AS d \
                    WHERE d.digest = $4 AND d.key_id = k.id)) \
               AND NOT EXISTS (SELECT 1 FROM keywarden_keys WHERE digest = $1) \
             ON CONFLICT DO NOTHING",
        )
        .bind(new.as_bytes().as_slice())
        .bind(id)
        .bind(secret_id.as_bytes().as_slice())
        .bind(found_by.as_bytes().as_slice())
        .execute(&self.pool)
        .await
        .map_err(|e| store_error(context, e))?
        .rows_affected()
            > 0;
        if added {
            return Ok(true);
        }
        let owner: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM keywarden_keys WHERE digest = $1 \
             UNION ALL SELECT key_id FROM keywarden_key_digests WHERE digest = $1 LIMIT 1",
        )
        .bind(new.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| store_error(context, e))?;
        match owner {
            Some(owner) if owner != id => Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!("{context}: another key has this digest"),
            )),
            _ => Ok(false),
        }
    }
}

/// The writes, on a connection (in a transaction where they need one).
async fn insert_in(conn: &mut PgConnection, record: &KeyRecord) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "INSERT INTO keywarden_keys ({COLUMNS}, credits_refill, credits_generation) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
             $17, $18, $19, $20, $21, $22, $23, $24, $25, $26)"
    ))
    .bind(record.id)
    .bind(record.digest.as_bytes().as_slice())
    .bind(record.secret_id.as_bytes().as_slice())
    .bind(&record.display_start)
    .bind(&record.name)
    .bind(&record.description)
    .bind(&record.collection)
    .bind(&record.subject)
    .bind(record.owner_kind.as_str())
    .bind(record.scopes.as_slice())
    .bind(&record.environment)
    .bind(record.read_only)
    .bind(Json(&record.metadata))
    .bind(record.rate_limit.map(|p| p.to_string()))
    .bind(micros(record.created_at))
    .bind(micros(record.updated_at))
    .bind(record.expires_at.map(micros))
    .bind(record.last_used_at.map(micros))
    .bind(clamp_i64(record.use_count))
    .bind(record.revoked_at.map(micros))
    .bind(record.disabled)
    .bind(record.rotated_from)
    .bind(record.encrypted_key.as_deref())
    .bind(networks_text(&record.allowed_ips))
    .bind(refill_text(record))
    .bind(record.credits.map(|_| 1_i64))
    .execute(&mut *conn)
    .await
    .map_err(|e| store_error("inserting a key failed", e))?;
    if let Some(credits) = record.credits {
        set_credits_in(conn, record.id, credits, true, record.created_at).await?;
    }
    Ok(())
}

/// Writes a key's credits (a new balance when `set_balance`, else the balance stays) and
/// returns their new generation.
async fn set_credits_in(
    conn: &mut PgConnection,
    id: Uuid,
    credits: Credits,
    set_balance: bool,
    now: OffsetDateTime,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(&set_credits_statement(Dialect::Postgres, CreditTable::Key))
        .bind(id)
        .bind(clamp_i64(credits.remaining))
        .bind(credits.refill.map(|r| clamp_i64(r.amount())))
        .bind(credits.refill.map(|r| clamp_i64(r.interval_millis())))
        .bind(unix_millis(now))
        .bind(set_balance)
        .bind(generation_floor(now))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| store_error("setting a key's credits failed", e))
}

/// The record before and after, or `None` for an unknown id. In a transaction.
async fn update_in(
    conn: &mut PgConnection,
    id: Uuid,
    patch: &KeyPatch,
    now: OffsetDateTime,
) -> Result<Option<(KeyRecord, KeyRecord)>, StoreError> {
    let context = "updating a key failed";
    let Some(row) = sqlx::query(&format!(
        "SELECT {COLUMNS}, {CREDIT_COLUMNS} FROM keywarden_keys WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| store_error(context, e))?
    else {
        return Ok(None);
    };
    let mut record = decode_row(&row)?;
    let before = record.clone();
    // No other write lands between this read and the write below (the transaction holds
    // the lock), so the version checked is the one overwritten.
    patch.check_expected(&record)?;
    patch.apply_to(&mut record, now);
    // Credits first, so the row read back below carries the new balance.
    let generation = match (patch.changes_credits(), record.credits) {
        (false, _) => None,
        (true, Some(credits)) => {
            let set = patch.credits.is_some();
            Some(set_credits_in(conn, id, credits, set, now).await?)
        }
        (true, None) => {
            sqlx::query("DELETE FROM keywarden_credits WHERE key_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(|e| store_error(context, e))?;
            None
        }
    };
    let row = sqlx::query(&format!(
        "UPDATE keywarden_keys SET name = $1, description = $2, scopes = $3, \
             read_only = $4, metadata = $5, rate_limit = $6, expires_at = $7, revoked_at = $8, \
             disabled = $9, updated_at = $10, allowed_ips = $11, credits_refill = $12, \
             credits_generation = CASE WHEN $13 THEN $14 ELSE credits_generation END \
             WHERE id = $15 RETURNING {COLUMNS}, {CREDIT_COLUMNS}"
    ))
    .bind(&record.name)
    .bind(&record.description)
    .bind(record.scopes.as_slice())
    .bind(record.read_only)
    .bind(Json(&record.metadata))
    .bind(record.rate_limit.map(|p| p.to_string()))
    .bind(record.expires_at.map(micros))
    .bind(record.revoked_at.map(micros))
    .bind(record.disabled)
    .bind(micros(record.updated_at))
    .bind(networks_text(&record.allowed_ips))
    .bind(refill_text(&record))
    .bind(patch.changes_credits())
    .bind(generation)
    .bind(id)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| store_error(context, e))?;
    let mut updated = decode_row(&row)?;
    if !patch.changes_credits() {
        // Leases move the balance at any time, outside this transaction: a patch that leaves
        // the credits alone reports the balance it read, so the change shows no credit change.
        updated.credits = before.credits;
    }
    Ok(Some((before, updated)))
}

/// In a transaction.
async fn retire_secret_in(
    conn: &mut PgConnection,
    secret_id: SecretId,
    unmigrated: UnmigratedKeys,
    now: OffsetDateTime,
) -> Result<SecretRetirement, StoreError> {
    let context = "retiring a secret failed";
    let secret = secret_id.as_bytes().as_slice();
    let map = |e| store_error(context, e);
    // No digest may be added while the retirement decides which keys have one: adding
    // waits, then finds its `found_by` digest gone. Lookups are not blocked.
    sqlx::query("LOCK TABLE keywarden_key_digests IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *conn)
        .await
        .map_err(map)?;
    let stranded: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM keywarden_keys AS k WHERE k.secret_id = $1 AND k.revoked_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM keywarden_key_digests AS d \
                 WHERE d.key_id = k.id AND d.secret_id <> $1) ORDER BY id FOR UPDATE",
    )
    .bind(secret)
    .fetch_all(&mut *conn)
    .await
    .map_err(map)?;
    if unmigrated == UnmigratedKeys::Refuse && !stranded.is_empty() {
        return Ok(SecretRetirement {
            retired: false,
            unmigrated: stranded,
            ..SecretRetirement::default()
        });
    }
    // The lowest other digest becomes the record's; then it is no longer an added one.
    let promoted: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE keywarden_keys AS k SET digest = p.digest, secret_id = p.secret_id \
             FROM (SELECT DISTINCT ON (d.key_id) d.key_id, d.digest, d.secret_id \
                   FROM keywarden_key_digests AS d JOIN keywarden_keys AS o ON o.id = d.key_id \
                   WHERE o.secret_id = $1 AND d.secret_id <> $1 \
                   ORDER BY d.key_id, d.digest) AS p \
             WHERE k.id = p.key_id RETURNING k.id",
    )
    .bind(secret)
    .fetch_all(&mut *conn)
    .await
    .map_err(map)?;
    sqlx::query(
        "DELETE FROM keywarden_key_digests AS d USING keywarden_keys AS k \
             WHERE k.id = d.key_id AND k.digest = d.digest",
    )
    .execute(&mut *conn)
    .await
    .map_err(map)?;
    let dropped: Vec<Uuid> = sqlx::query_scalar(
        "DELETE FROM keywarden_key_digests WHERE secret_id = $1 RETURNING key_id",
    )
    .bind(secret)
    .fetch_all(&mut *conn)
    .await
    .map_err(map)?;
    // What is left under the secret had no other digest: a placeholder, and revoked.
    let placeholders: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE keywarden_keys SET \
             digest = '\\x00000000000000000000000000000000'::bytea || uuid_send(id), \
             secret_id = '\\x0000000000000000'::bytea, \
             revoked_at = coalesce(revoked_at, $2), updated_at = $2 \
             WHERE secret_id = $1 RETURNING id",
    )
    .bind(secret)
    .bind(micros(now))
    .fetch_all(&mut *conn)
    .await
    .map_err(map)?;
    let dropped_count = promoted.len() + dropped.len() + placeholders.len();
    let mut affected: Vec<Uuid> = promoted
        .into_iter()
        .chain(dropped)
        .chain(placeholders)
        .collect();
    affected.sort();
    affected.dedup();
    Ok(SecretRetirement {
        retired: true,
        dropped: dropped_count as u64,
        unmigrated: stranded,
        affected,
    })
}

async fn delete_in(conn: &mut PgConnection, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
    sqlx::query(&format!(
        "DELETE FROM keywarden_keys WHERE id = $1 RETURNING {COLUMNS}, {CREDIT_COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| store_error("deleting a key failed", e))?
    .map(|row| decode_row(&row))
    .transpose()
}

/// A checkpoint as stored: seq, MAC, sealing secret id, seal.
type CheckpointRow = (i64, Vec<u8>, Vec<u8>, Vec<u8>);

const AUDIT_COLUMNS: &str = "seq, at, action, actor_kind, actor_key_id, actor_name, key_id, \
    collection, subject, changes, client_address, request_id, sealed_by, mac";

/// Makes the transaction the log's only writer (readers go on) and marks it, for the
/// plain-SQL trigger, as audited here: a row with its txid in `keywarden_audit_tx` (which
/// roles that only change keys cannot write), removed by [`end_audited`] before the commit.
async fn begin_audited(conn: &mut PgConnection) -> Result<(), StoreError> {
    let map = |e| store_error("locking the audit log failed", e);
    sqlx::query("LOCK TABLE keywarden_audit IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *conn)
        .await
        .map_err(map)?;
    sqlx::query("INSERT INTO keywarden_audit_tx (txid) VALUES (txid_current())")
        .execute(&mut *conn)
        .await
        .map_err(map)?;
    Ok(())
}

/// Removes [`begin_audited`]'s mark; call right before the commit.
async fn end_audited(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM keywarden_audit_tx WHERE txid = txid_current()")
        .execute(&mut *conn)
        .await
        .map_err(|e| store_error("unmarking an audited transaction failed", e))?;
    Ok(())
}

/// Seals the changes the plain-SQL trigger recorded into the chain, oldest first. In a
/// transaction that called [`begin_audited`].
async fn seal_pending(conn: &mut PgConnection, sealer: &AuditSealer) -> Result<u64, StoreError> {
    let map = |e| store_error("sealing plain-SQL changes into the audit log failed", e);
    // A batch at a time, oldest first: a mass UPDATE's million pending rows must not make one
    // management write seal them all in its transaction.
    let rows = sqlx::query(
        "DELETE FROM keywarden_audit_pending WHERE id IN \
         (SELECT id FROM keywarden_audit_pending ORDER BY id LIMIT 1000) \
         RETURNING id, at, action, key_id, collection, subject, changes::text AS changes, \
         db_role",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(map)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut pending = Vec::with_capacity(rows.len());
    // Sealed now, whatever the row says: a row's own time and role are data (whoever can
    // write the pending table could choose them), and a row that does not parse is sealed as
    // it is rather than blocking every management write.
    let sealed_at = OffsetDateTime::now_utc();
    for row in &rows {
        let id: i64 = column(row, "id")?;
        let action: Option<String> = row.try_get("action").ok();
        let changes: Option<String> = row.try_get("changes").ok();
        let recorded_at: Option<PgTimestamp> = row.try_get("at").ok();
        let role: Option<String> = row.try_get("db_role").ok();
        let mut entry_changes = changes
            .as_deref()
            .and_then(|text| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).ok()
            })
            .unwrap_or_else(|| {
                let mut raw = serde_json::Map::new();
                raw.insert(
                    "unparsed".into(),
                    changes
                        .clone()
                        .unwrap_or_default()
                        .chars()
                        .take(4096)
                        .collect::<String>()
                        .into(),
                );
                raw
            });
        if let Some(PgTimestamp::At(at)) = recorded_at {
            entry_changes.insert(
                "recorded_at".into(),
                at.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
                    .into(),
            );
        }
        let parsed_action = action.as_deref().and_then(|a| a.parse().ok());
        if parsed_action.is_none() {
            entry_changes.insert(
                "unparsed_action".into(),
                action
                    .unwrap_or_default()
                    .chars()
                    .take(256)
                    .collect::<String>()
                    .into(),
            );
        }
        let entry = AuditEntry {
            at: sealed_at,
            action: parsed_action.unwrap_or(crate::audit::AuditAction::Updated),
            context: ChangeContext::new(Actor::Sql(role.unwrap_or_else(|| "unknown".into()))),
            key_id: row.try_get("key_id").ok().flatten(),
            collection: row.try_get("collection").ok().flatten(),
            subject: row.try_get("subject").ok().flatten(),
            changes: entry_changes,
        };
        pending.push((id, entry));
    }
    pending.sort_by_key(|(id, _)| *id);
    let mut head = audit_head(conn).await?;
    for (_, entry) in &pending {
        let event = sealer.seal(head, entry);
        insert_event(conn, &event).await?;
        head = event.head();
    }
    Ok(pending.len() as u64)
}

/// The last event's number and MAC: the last event's, else the checkpoint's, else genesis.
async fn audit_head(conn: &mut PgConnection) -> Result<ChainHead, StoreError> {
    let last: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT seq, mac FROM keywarden_audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| store_error("reading the audit log's head failed", e))?;
    match last {
        Some((seq, mac)) => Ok(ChainHead {
            seq: u64::try_from(seq).map_err(|_| corrupt("seq", "negative"))?,
            mac: AuditMac::from_bytes(bytes(mac, "mac")?),
        }),
        None => Ok(read_checkpoint(conn)
            .await?
            .map_or(ChainHead::GENESIS, |c| c.head)),
    }
}

async fn read_checkpoint(conn: &mut PgConnection) -> Result<Option<AuditCheckpoint>, StoreError> {
    let row: Option<CheckpointRow> = sqlx::query_as(
        "SELECT seq, mac, sealed_by, seal FROM keywarden_audit_checkpoint WHERE id = 1",
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| store_error("reading the audit checkpoint failed", e))?;
    row.map(|(seq, mac, sealed_by, seal)| {
        Ok(AuditCheckpoint {
            head: ChainHead {
                seq: u64::try_from(seq).map_err(|_| corrupt("seq", "negative"))?,
                mac: AuditMac::from_bytes(bytes(mac, "mac")?),
            },
            sealed_by: SecretId::from_bytes(bytes(sealed_by, "sealed_by")?),
            seal: AuditMac::from_bytes(bytes(seal, "seal")?),
        })
    })
    .transpose()
}

async fn insert_event(conn: &mut PgConnection, event: &AuditEvent) -> Result<(), StoreError> {
    let changes = serde_json::to_string(&event.changes)
        .map_err(|_| StoreError::new(StoreErrorKind::Other, "changes do not serialize"))?;
    sqlx::query(&format!(
        "INSERT INTO keywarden_audit ({AUDIT_COLUMNS}, actor) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
    ))
    .bind(clamp_i64(event.seq))
    .bind(micros(event.at))
    .bind(event.action.as_str())
    .bind(event.actor.kind())
    .bind(event.actor.key_id())
    .bind(event.actor.name())
    .bind(event.key_id)
    .bind(&event.collection)
    .bind(&event.subject)
    .bind(changes)
    .bind(event.client_address.map(|a| a.to_string()))
    .bind(&event.request_id)
    .bind(event.sealed_by.as_bytes().as_slice())
    .bind(event.mac.as_bytes().as_slice())
    .bind(event.actor.to_string())
    .execute(&mut *conn)
    .await
    .map_err(|e| store_error("writing an audit event failed", e))?;
    Ok(())
}

fn decode_event(row: &PgRow) -> Result<AuditEvent, StoreError> {
    let seq: i64 = column(row, "seq")?;
    let action: String = column(row, "action")?;
    let changes: String = column(row, "changes")?;
    let client_address: Option<String> = column(row, "client_address")?;
    let actor_kind: String = column(row, "actor_kind")?;
    Ok(AuditEvent {
        seq: u64::try_from(seq).map_err(|_| corrupt("seq", "negative"))?,
        at: instant(column(row, "at")?, "at")?,
        action: action
            .parse()
            .map_err(|_| corrupt("action", "unknown action"))?,
        actor: Actor::from_parts(
            &actor_kind,
            column(row, "actor_key_id")?,
            column(row, "actor_name")?,
        )
        .ok_or_else(|| corrupt("actor_kind", "not an actor"))?,
        key_id: column(row, "key_id")?,
        collection: column(row, "collection")?,
        subject: column(row, "subject")?,
        changes: serde_json::from_str(&changes)
            .map_err(|_| corrupt("changes", "not a JSON object"))?,
        client_address: client_address
            .map(|a| a.parse())
            .transpose()
            .map_err(|_| corrupt("client_address", "not an IP address"))?,
        request_id: column(row, "request_id")?,
        sealed_by: SecretId::from_bytes(bytes(column(row, "sealed_by")?, "sealed_by")?),
        mac: AuditMac::from_bytes(bytes(column(row, "mac")?, "mac")?),
    })
}

/// Appends the SQL form of [`KeyRecord::state`] at `now`.
fn push_state_filter(sql: &mut QueryBuilder<'_, Postgres>, state: KeyState, now: OffsetDateTime) {
    match state {
        KeyState::Revoked => {
            sql.push(" AND revoked_at IS NOT NULL");
        }
        KeyState::Disabled => {
            sql.push(" AND revoked_at IS NULL AND disabled");
        }
        KeyState::Expired => {
            sql.push(" AND revoked_at IS NULL AND NOT disabled AND expires_at <= ")
                .push_bind(now);
        }
        KeyState::Active => {
            sql.push(
                " AND revoked_at IS NULL AND NOT disabled AND (expires_at IS NULL OR expires_at > ",
            )
            .push_bind(now)
            .push(")");
        }
    }
}

/// The instant floored to the microsecond (PostgreSQL's precision), in UTC.
fn micros(at: OffsetDateTime) -> OffsetDateTime {
    let at = at.checked_to_offset(time::UtcOffset::UTC).unwrap_or(at);
    // Cannot fail: the floored value is a valid nanosecond of the same second.
    at.replace_nanosecond(at.microsecond() * 1_000)
        .unwrap_or(at)
}

fn parse_url(url: &str) -> Result<PgConnectOptions, StoreError> {
    // The parse error is not attached: it could quote the URL, password included.
    PgConnectOptions::from_str(url)
        .map_err(|_| StoreError::new(StoreErrorKind::Other, "invalid PostgreSQL URL"))
}

/// `[a-z_][a-z0-9_]*`, at most 63 bytes: safe to splice into SQL as a quoted identifier.
fn is_valid_schema_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_SCHEMA_LEN
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn is_duplicate_schema(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "42P06" || code == "23505")
}

fn corrupt(column: &'static str, problem: &str) -> StoreError {
    // Name the column, never its value: rows are not echoed into errors or logs.
    StoreError::new(
        StoreErrorKind::Corrupt,
        format!("stored key has an invalid {column} column: {problem}"),
    )
}

fn column<'r, T>(row: &'r PgRow, name: &'static str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(name)
        .map_err(|e| store_error("decoding a stored key failed", e))
}

fn bytes<const N: usize>(value: Vec<u8>, name: &'static str) -> Result<[u8; N], StoreError> {
    <[u8; N]>::try_from(value.as_slice()).map_err(|_| corrupt(name, &format!("expected {N} bytes")))
}

/// A `TIMESTAMPTZ` value exactly as PostgreSQL holds it, decoded without panicking.
///
/// PostgreSQL's range (4713 BC to 294276 AD, plus `infinity` and `-infinity`) is far wider
/// than [`OffsetDateTime`]'s (years -9999 to 9999), and sqlx's own `OffsetDateTime` decoding
/// panics on a value outside the latter. This reads the raw microseconds instead and leaves
/// the decision to [`instant`] and [`expiry`], so no stored value can abort a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgTimestamp {
    /// An instant `OffsetDateTime` can hold (in UTC).
    At(OffsetDateTime),
    /// `infinity`.
    Infinity,
    /// `-infinity`.
    NegativeInfinity,
    /// A finite instant outside years 0000 to 9999.
    OutOfRange,
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00 UTC).
const PG_EPOCH_UNIX_MICROS: i128 = 946_684_800_000_000;

impl PgTimestamp {
    /// The binary wire value: microseconds since 2000-01-01 UTC, with `i64::MAX` and
    /// `i64::MIN` standing for `infinity` and `-infinity`.
    fn from_pg_micros(micros: i64) -> Self {
        match micros {
            i64::MAX => Self::Infinity,
            i64::MIN => Self::NegativeInfinity,
            _ => {
                // i128: PostgreSQL's latest instant overflows i64 nanoseconds, and even
                // i64 microseconds once moved to the Unix epoch.
                let unix_nanos = (i128::from(micros) + PG_EPOCH_UNIX_MICROS) * 1_000;
                OffsetDateTime::from_unix_timestamp_nanos(unix_nanos)
                    .ok()
                    .filter(in_rfc3339_range)
                    .map_or(Self::OutOfRange, Self::At)
            }
        }
    }
}

impl sqlx::Type<Postgres> for PgTimestamp {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <OffsetDateTime as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <OffsetDateTime as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for PgTimestamp {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match value.format() {
            sqlx::postgres::PgValueFormat::Binary => Ok(Self::from_pg_micros(
                <i64 as sqlx::Decode<Postgres>>::decode(value)?,
            )),
            // Only simple (unprepared) queries answer in text; the store prepares every
            // statement. sqlx's text parsing fails rather than panics on odd values.
            sqlx::postgres::PgValueFormat::Text => match value.as_str()? {
                "infinity" => Ok(Self::Infinity),
                "-infinity" => Ok(Self::NegativeInfinity),
                _ => Ok(<OffsetDateTime as sqlx::Decode<Postgres>>::decode(value)
                    .ok()
                    .filter(in_rfc3339_range)
                    .map_or(Self::OutOfRange, Self::At)),
            },
        }
    }
}

/// A timestamp that must be a finite instant (`created_at`, `updated_at`, `last_used_at`,
/// `revoked_at`): anything else makes the row corrupt.
fn instant(at: PgTimestamp, name: &'static str) -> Result<OffsetDateTime, StoreError> {
    match at {
        PgTimestamp::At(at) => Ok(at),
        PgTimestamp::Infinity | PgTimestamp::NegativeInfinity => {
            Err(corrupt(name, "infinite timestamp"))
        }
        PgTimestamp::OutOfRange => Err(corrupt(name, "timestamp out of range")),
    }
}

/// `expires_at`: `NULL` and `infinity` both mean the key never expires; `-infinity` and
/// instants outside years 0000 to 9999 make the row corrupt.
fn expiry(at: Option<PgTimestamp>) -> Result<Option<OffsetDateTime>, StoreError> {
    match at {
        None | Some(PgTimestamp::Infinity) => Ok(None),
        Some(at) => instant(at, "expires_at").map(Some),
    }
}

fn decode_row(row: &PgRow) -> Result<KeyRecord, StoreError> {
    let owner_kind: String = column(row, "owner_kind")?;
    let rate_limit: Option<String> = column(row, "rate_limit")?;
    let Json(metadata) = column::<Json<serde_json::Value>>(row, "metadata")?;
    let allowed_ips: Vec<String> = column(row, "allowed_ips")?;
    let credits = decode_credits(
        column(row, "credits_remaining")?,
        column(row, "credits_refill")?,
    )?;
    Ok(KeyRecord {
        id: column(row, "id")?,
        digest: Digest::from_bytes(bytes(column(row, "digest")?, "digest")?),
        secret_id: SecretId::from_bytes(bytes(column(row, "secret_id")?, "secret_id")?),
        display_start: column(row, "display_start")?,
        name: column(row, "name")?,
        description: column(row, "description")?,
        collection: column(row, "collection")?,
        subject: column(row, "subject")?,
        owner_kind: OwnerKind::from_str(&owner_kind)
            .map_err(|_| corrupt("owner_kind", "unknown owner kind"))?,
        scopes: column(row, "scopes")?,
        environment: column(row, "environment")?,
        read_only: column(row, "read_only")?,
        metadata,
        rate_limit: rate_limit
            .map(|p| RateLimitPolicy::from_str(&p))
            .transpose()
            .map_err(|_| corrupt("rate_limit", "not a rate-limit policy"))?,
        created_at: instant(column(row, "created_at")?, "created_at")?,
        updated_at: instant(column(row, "updated_at")?, "updated_at")?,
        expires_at: expiry(column(row, "expires_at")?)?,
        last_used_at: column::<Option<PgTimestamp>>(row, "last_used_at")?
            .map(|at| instant(at, "last_used_at"))
            .transpose()?,
        use_count: u64::try_from(column::<i64>(row, "use_count")?)
            .map_err(|_| corrupt("use_count", "negative"))?,
        revoked_at: column::<Option<PgTimestamp>>(row, "revoked_at")?
            .map(|at| instant(at, "revoked_at"))
            .transpose()?,
        disabled: column(row, "disabled")?,
        rotated_from: column(row, "rotated_from")?,
        encrypted_key: column(row, "encrypted_key")?,
        allowed_ips: allowed_ips
            .iter()
            .map(|n| n.parse())
            .collect::<Result<_, _>>()
            .map_err(|_| corrupt("allowed_ips", "not an array of IP networks"))?,
        credits,
        owner: decode_owner(
            column(row, "owner_rate_limit")?,
            column(row, "owner_credits_refill")?,
            column(row, "owner_credits_generation")?,
        )?,
    })
}

/// Networks as the text array they are stored as.
fn networks_text(networks: &[IpNetwork]) -> Vec<String> {
    networks.iter().map(ToString::to_string).collect()
}

/// Maps a sqlx error to a [`StoreError`] without echoing row contents.
fn store_error(context: &str, err: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    let kind = match &err {
        E::Database(db) => return database_error(context, db.as_ref()),
        E::Io(_) | E::Tls(_) | E::Protocol(_) | E::PoolClosed | E::WorkerCrashed => {
            StoreErrorKind::Unavailable
        }
        E::PoolTimedOut => StoreErrorKind::Timeout,
        E::Decode(_)
        | E::ColumnDecode { .. }
        | E::ColumnIndexOutOfBounds { .. }
        | E::TypeNotFound { .. } => StoreErrorKind::Corrupt,
        E::ColumnNotFound(_) | E::Migrate(_) => StoreErrorKind::Schema,
        _ => StoreErrorKind::Other,
    };
    if let E::Encode(_) | E::Configuration(_) = err {
        // These may quote the value that failed to encode, or the connection URL.
        return StoreError::new(kind, format!("{context}: invalid value or configuration"));
    }
    StoreError::new(kind, format!("{context}: {err}")).with_source(err)
}

/// Database errors carry the SQLSTATE and primary message only: the source's detail field
/// quotes row values (`Key (digest)=(…) already exists`), so it is not attached.
fn database_error(context: &str, db: &dyn DatabaseError) -> StoreError {
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let kind = sqlstate_kind(&code);
    let message = if kind == StoreErrorKind::Conflict {
        format!("{context}: a key with this id or digest exists")
    } else {
        format!("{context}: PostgreSQL error {code}: {}", db.message())
    };
    StoreError::new(kind, message)
}

/// The kind of a PostgreSQL SQLSTATE.
fn sqlstate_kind(code: &str) -> StoreErrorKind {
    match code {
        "23505" => StoreErrorKind::Conflict,
        // query_canceled (statement_timeout), lock_not_available (lock_timeout)
        "57014" | "55P03" => StoreErrorKind::Timeout,
        // undefined_table, undefined_column, invalid_schema_name
        "42P01" | "42703" | "3F000" => StoreErrorKind::Schema,
        // data_corrupted, index_corrupted
        "XX001" | "XX002" => StoreErrorKind::Corrupt,
        // admin_shutdown, crash_shutdown, cannot_connect_now, database_dropped
        "57P01" | "57P02" | "57P03" | "57P04" => StoreErrorKind::Unavailable,
        // connection_exception, insufficient_resources, read-only standby
        _ if code.starts_with("08") || code.starts_with("53") || code == "25006" => {
            StoreErrorKind::Unavailable
        }
        _ => StoreErrorKind::Other,
    }
}

/// Four columns of rows, for `UNNEST`.
fn unzip4<A, B, C, D>(
    rows: impl Iterator<Item = (A, B, C, D)>,
) -> (Vec<A>, Vec<B>, Vec<C>, Vec<D>) {
    let (mut a, mut b, mut c, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (w, x, y, z) in rows {
        a.push(w);
        b.push(x);
        c.push(y);
        d.push(z);
    }
    (a, b, c, d)
}

const WEBHOOK_COLUMNS: &str = "id, url, events, description, sealed_secret, disabled, \
    created_at, cursor, expiring_cursor, attempts, next_attempt_at, last_error, failing_since, \
    lease_owner, lease_until";

fn decode_webhook(row: &PgRow) -> Result<WebhookRecord, StoreError> {
    let optional = |name: &'static str| -> Result<Option<OffsetDateTime>, StoreError> {
        column::<Option<PgTimestamp>>(row, name)?
            .map(|at| instant(at, name))
            .transpose()
    };
    Ok(WebhookRecord {
        id: column(row, "id")?,
        url: column(row, "url")?,
        events: column(row, "events")?,
        description: column(row, "description")?,
        sealed_secret: column(row, "sealed_secret")?,
        disabled: column(row, "disabled")?,
        created_at: instant(column(row, "created_at")?, "created_at")?,
        cursor: u64::try_from(column::<i64>(row, "cursor")?)
            .map_err(|_| corrupt("cursor", "negative"))?,
        expiring_cursor: instant(column(row, "expiring_cursor")?, "expiring_cursor")?,
        attempts: u32::try_from(column::<i32>(row, "attempts")?)
            .map_err(|_| corrupt("attempts", "out of range"))?,
        next_attempt_at: optional("next_attempt_at")?,
        last_error: column(row, "last_error")?,
        failing_since: optional("failing_since")?,
        lease_owner: column(row, "lease_owner")?,
        lease_until: optional("lease_until")?,
    })
}

#[async_trait]
impl WebhookStore for PostgresStore {
    async fn insert_webhook(&self, record: &WebhookRecord) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO keywarden_webhooks ({WEBHOOK_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        ))
        .bind(record.id)
        .bind(&record.url)
        .bind(record.events.as_slice())
        .bind(&record.description)
        .bind(record.sealed_secret.as_slice())
        .bind(record.disabled)
        .bind(micros(record.created_at))
        .bind(clamp_i64(record.cursor))
        .bind(micros(record.expiring_cursor))
        .bind(i32::try_from(record.attempts).unwrap_or(i32::MAX))
        .bind(record.next_attempt_at.map(micros))
        .bind(&record.last_error)
        .bind(record.failing_since.map(micros))
        .bind(record.lease_owner)
        .bind(record.lease_until.map(micros))
        .execute(&self.pool)
        .await
        .map_err(|e| store_error("inserting a webhook failed", e))?;
        Ok(())
    }

    async fn list_webhooks(&self) -> Result<Vec<WebhookRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM keywarden_webhooks ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| store_error("listing webhooks failed", e))?
        .iter()
        .map(decode_webhook)
        .collect()
    }

    async fn get_webhook(&self, id: Uuid) -> Result<Option<WebhookRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM keywarden_webhooks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| store_error("reading a webhook failed", e))?
        .map(|row| decode_webhook(&row))
        .transpose()
    }

    async fn update_webhook(
        &self,
        id: Uuid,
        patch: &WebhookPatch,
    ) -> Result<Option<WebhookRecord>, StoreError> {
        let map = |e| store_error("updating a webhook failed", e);
        let mut tx = self.pool.begin().await.map_err(map)?;
        let Some(row) = sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM keywarden_webhooks WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map)?
        else {
            return Ok(None);
        };
        let mut record = decode_webhook(&row)?;
        patch.apply_to(&mut record);
        sqlx::query(
            "UPDATE keywarden_webhooks SET url = $1, events = $2, description = $3, \
             disabled = $4, attempts = $5, next_attempt_at = $6 WHERE id = $7",
        )
        .bind(&record.url)
        .bind(record.events.as_slice())
        .bind(&record.description)
        .bind(record.disabled)
        .bind(i32::try_from(record.attempts).unwrap_or(i32::MAX))
        .bind(record.next_attempt_at.map(micros))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        tx.commit().await.map_err(map)?;
        Ok(Some(record))
    }

    async fn delete_webhook(&self, id: Uuid) -> Result<Option<WebhookRecord>, StoreError> {
        sqlx::query(&format!(
            "DELETE FROM keywarden_webhooks WHERE id = $1 RETURNING {WEBHOOK_COLUMNS}"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| store_error("deleting a webhook failed", e))?
        .map(|row| decode_webhook(&row))
        .transpose()
    }

    async fn lease_webhook(
        &self,
        id: Uuid,
        owner: Uuid,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Option<WebhookRecord>, StoreError> {
        sqlx::query(&format!(
            "UPDATE keywarden_webhooks SET lease_owner = $1, lease_until = $2 WHERE id = $3 \
             AND (lease_owner = $1 OR lease_until IS NULL OR lease_until <= $4) \
             RETURNING {WEBHOOK_COLUMNS}"
        ))
        .bind(owner)
        .bind(micros(until))
        .bind(id)
        .bind(micros(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| store_error("leasing a webhook failed", e))?
        .map(|row| decode_webhook(&row))
        .transpose()
    }

    async fn record_webhook_progress(
        &self,
        id: Uuid,
        owner: Uuid,
        progress: &WebhookProgress,
    ) -> Result<bool, StoreError> {
        let written = sqlx::query(
            "UPDATE keywarden_webhooks SET cursor = $1, expiring_cursor = $2, attempts = $3, \
             next_attempt_at = $4, last_error = $5, failing_since = $6, lease_until = $9 \
             WHERE id = $7 AND lease_owner = $8",
        )
        .bind(clamp_i64(progress.cursor))
        .bind(micros(progress.expiring_cursor))
        .bind(i32::try_from(progress.attempts).unwrap_or(i32::MAX))
        .bind(progress.next_attempt_at.map(micros))
        .bind(&progress.last_error)
        .bind(progress.failing_since.map(micros))
        .bind(id)
        .bind(owner)
        .bind(micros(progress.lease_until))
        .execute(&self.pool)
        .await
        .map_err(|e| store_error("recording webhook progress failed", e))?;
        Ok(written.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_columns_are_the_columns_aliased() {
        let aliased: Vec<String> = COLUMNS.split(", ").map(|c| format!("k.{c}")).collect();
        assert_eq!(KEY_COLUMNS, aliased.join(", "));
    }
    use time::macros::datetime;

    #[test]
    fn schema_names_are_validated() {
        for good in ["kw", "_x", "kw_0123abcd", &"a".repeat(63)] {
            assert!(is_valid_schema_name(good), "{good}");
        }
        for bad in [
            "",
            "0kw",
            "Kw",
            "kw-1",
            "kw\"; DROP TABLE x; --",
            "kw ",
            "ké",
            &"a".repeat(64),
        ] {
            assert!(!is_valid_schema_name(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps_are_floored_to_micros_in_utc() {
        let at = datetime!(2030-02-03 04:05:06.123_456_789 +02:00);
        let floored = micros(at);
        assert_eq!(floored, datetime!(2030-02-03 02:05:06.123_456 UTC));
        assert_eq!(floored.offset(), time::UtcOffset::UTC);
    }

    #[test]
    fn every_stored_timestamp_decodes_without_panicking() {
        use PgTimestamp::*;
        assert_eq!(PgTimestamp::from_pg_micros(i64::MAX), Infinity);
        assert_eq!(PgTimestamp::from_pg_micros(i64::MIN), NegativeInfinity);
        assert_eq!(
            PgTimestamp::from_pg_micros(0),
            At(datetime!(2000-01-01 0:00 UTC))
        );
        assert_eq!(
            PgTimestamp::from_pg_micros(-1),
            At(datetime!(1999-12-31 23:59:59.999_999 UTC))
        );
        // Both ends of years 0000 to 9999, and one microsecond past each.
        let first = datetime!(0000-01-01 0:00 UTC);
        let last = datetime!(9999-12-31 23:59:59.999_999 UTC);
        let pg = |at: OffsetDateTime| {
            i64::try_from((at - datetime!(2000-01-01 0:00 UTC)).whole_microseconds()).unwrap()
        };
        assert_eq!(PgTimestamp::from_pg_micros(pg(first)), At(first));
        assert_eq!(PgTimestamp::from_pg_micros(pg(last)), At(last));
        assert_eq!(PgTimestamp::from_pg_micros(pg(first) - 1), OutOfRange);
        assert_eq!(PgTimestamp::from_pg_micros(pg(last) + 1), OutOfRange);
        for micros in [i64::MAX - 1, i64::MIN + 1, 9_223_371_331_200_000_000] {
            assert_eq!(PgTimestamp::from_pg_micros(micros), OutOfRange, "{micros}");
        }

        assert_eq!(expiry(None).unwrap(), None);
        assert_eq!(expiry(Some(Infinity)).unwrap(), None);
        assert_eq!(expiry(Some(At(last))).unwrap(), Some(last));
        for odd in [NegativeInfinity, OutOfRange] {
            let err = expiry(Some(odd)).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt);
            assert!(err.to_string().contains("expires_at"), "{err}");
        }
        for odd in [Infinity, NegativeInfinity, OutOfRange] {
            let err = instant(odd, "created_at").unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt);
        }
    }

    #[test]
    fn sqlstates_map_to_kinds() {
        assert_eq!(sqlstate_kind("23505"), StoreErrorKind::Conflict);
        assert_eq!(sqlstate_kind("08006"), StoreErrorKind::Unavailable);
        assert_eq!(sqlstate_kind("53300"), StoreErrorKind::Unavailable);
        assert_eq!(sqlstate_kind("57P01"), StoreErrorKind::Unavailable);
        assert_eq!(sqlstate_kind("57014"), StoreErrorKind::Timeout);
        assert_eq!(sqlstate_kind("42P01"), StoreErrorKind::Schema);
        assert_eq!(sqlstate_kind("XX001"), StoreErrorKind::Corrupt);
        assert_eq!(sqlstate_kind("22P02"), StoreErrorKind::Other);
        // Every code of each arm: a 503 or a 409 is what a caller is told.
        for (code, kind) in [
            ("55P03", StoreErrorKind::Timeout),
            ("42703", StoreErrorKind::Schema),
            ("3F000", StoreErrorKind::Schema),
            ("XX002", StoreErrorKind::Corrupt),
            ("57P02", StoreErrorKind::Unavailable),
            ("57P03", StoreErrorKind::Unavailable),
            ("57P04", StoreErrorKind::Unavailable),
            ("25006", StoreErrorKind::Unavailable),
            ("25001", StoreErrorKind::Other),
            ("23503", StoreErrorKind::Other),
        ] {
            assert_eq!(sqlstate_kind(code), kind, "{code}");
        }
        assert_eq!(
            store_error("x", sqlx::Error::PoolTimedOut).kind(),
            StoreErrorKind::Timeout
        );
        assert_eq!(
            store_error("x", sqlx::Error::PoolClosed).kind(),
            StoreErrorKind::Unavailable
        );
        let io = std::io::Error::other("boom");
        assert_eq!(
            store_error("x", io.into()).kind(),
            StoreErrorKind::Unavailable
        );
        assert_eq!(
            store_error("x", sqlx::Error::Decode("bad".into())).kind(),
            StoreErrorKind::Corrupt
        );
        assert_eq!(
            store_error("x", sqlx::Error::ColumnNotFound("c".into())).kind(),
            StoreErrorKind::Schema
        );
        assert_eq!(
            store_error("x", sqlx::Error::RowNotFound).kind(),
            StoreErrorKind::Other
        );
    }

    #[test]
    fn usage_is_aggregated_per_key() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let t1 = datetime!(2030-01-01 0:00 UTC);
        let t2 = datetime!(2030-01-02 0:00 UTC);
        let totals = aggregate_usage(&[
            KeyUsage {
                id: b,
                last_used_at: t1,
                uses: 2,
            },
            KeyUsage {
                id: a,
                last_used_at: t1,
                uses: 3,
            },
            KeyUsage {
                id: b,
                last_used_at: t2,
                uses: u64::MAX,
            },
        ]);
        assert_eq!(
            totals.into_iter().collect::<Vec<_>>(),
            [(a, (3, t1)), (b, (u64::MAX, t2))]
        );
        assert_eq!(clamp_i64(u64::MAX), i64::MAX);
    }

    #[tokio::test]
    async fn debug_and_url_errors_never_show_the_password() {
        let url = "postgres://kw:hunter2-secret@db.invalid:5433/keys";
        let pool = PgPoolOptions::new().connect_lazy_with(parse_url(url).unwrap());
        let store = PostgresStore::from_pool(pool);
        let text = format!("{store:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("db.invalid"), "{text}");

        let err = PostgresStore::connect("postgres://kw:hunter2-secret@[bad/keys")
            .await
            .unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");

        let err = PostgresStore::connect_with_schema(url, "bad-name")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other);
    }
}
