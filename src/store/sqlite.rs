use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::error::DatabaseError;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
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
    Actor, AuditCheckpoint, AuditEvent, AuditMac, AuditPage, AuditQuery, AuditSealer, ChainHead,
};
use crate::ratelimit::RateLimitPolicy;
use crate::secret::{Digest, SecretId};

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const COLUMNS: &str = "id, digest, secret_id, display_start, name, description, collection, \
    subject, owner_kind, scopes, environment, read_only, metadata, rate_limit, created_at, \
    updated_at, expires_at, last_used_at, use_count, revoked_at, disabled, rotated_from, \
    encrypted_key, allowed_ips";

/// [`COLUMNS`] of the keys table aliased `k`.
const KEY_COLUMNS: &str = "k.id, k.digest, k.secret_id, k.display_start, k.name, \
    k.description, k.collection, k.subject, k.owner_kind, k.scopes, k.environment, k.read_only, \
    k.metadata, k.rate_limit, k.created_at, k.updated_at, k.expires_at, k.last_used_at, \
    k.use_count, k.revoked_at, k.disabled, k.rotated_from, k.encrypted_key, k.allowed_ips";

/// A [`KeyStore`] in a SQLite database: the embedded default.
///
/// Ids are stored as 16-byte blobs (so byte order is id order) and timestamps as UTC unix
/// microseconds; timestamps read back are UTC and truncated to the microsecond.
///
/// Rows written by hand are read defensively: a timestamp that is not an integer (a real,
/// text such as `'infinity'`, a blob) or that lies outside years 0000 to 9999 (what RFC 3339,
/// and so the management API, can write) makes the row
/// corrupt ([`StoreErrorKind::Corrupt`]); a key that never expires has `expires_at` `NULL`.
/// Reading a corrupt row by id or by digest fails (the request path answers 503
/// `store_unavailable` for that key alone), and [`list`](KeyStore::list) skips it with a
/// warning naming its id, so one bad row never hides the rest of its page.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use keywarden::{store::KeyQuery, KeyStore, SqliteStore};
///
/// let store = SqliteStore::connect("sqlite::memory:").await?;
/// let page = store.list(&KeyQuery::new()).await?;
/// assert!(page.items.is_empty());
/// # Ok::<_, keywarden::StoreError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    observers: Observers,
}

impl SqliteStore {
    /// Opens the database at `url` and runs the migrations.
    ///
    /// `sqlite://path/to/keys.db` opens (creating if missing) a file in WAL mode;
    /// `sqlite::memory:` opens a private in-memory database held by a single pooled
    /// connection, so every operation sees the same data. Every connection waits up to 5 s for
    /// a locked database and enforces foreign keys.
    ///
    /// # Errors
    /// [`StoreErrorKind::Unavailable`] if the database cannot be opened,
    /// [`StoreErrorKind::Schema`] if the migrations fail, [`StoreErrorKind::Other`] for a URL
    /// that does not parse.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url).map_err(|e| {
            StoreError::new(StoreErrorKind::Other, "invalid SQLite URL").with_source(e)
        })?;
        let options = options.busy_timeout(BUSY_TIMEOUT).foreign_keys(true);
        let pool = if is_memory_url(url) {
            // An in-memory database lives as long as its last connection: keep exactly one,
            // forever, so the data is neither split across connections nor dropped when idle.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await
        } else {
            SqlitePoolOptions::new()
                .connect_with(
                    options
                        .create_if_missing(true)
                        .journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal),
                )
                .await
        }
        .map_err(|e| store_error("cannot open the SQLite database", e))?;
        let store = Self::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Wraps an existing pool. Does not run the migrations: call [`SqliteStore::migrate`].
    /// Give the pool's connections a busy timeout (as [`SqliteStore::connect`] does), or
    /// concurrent writers fail with [`StoreErrorKind::Timeout`] instead of waiting.
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self {
            pool,
            observers: Observers::default(),
        }
    }

    /// Applies any migrations the database lacks. Safe to run repeatedly.
    ///
    /// # Errors
    /// [`StoreErrorKind::Schema`] if a migration fails or the database holds a migration this
    /// version does not know with a conflicting checksum.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        // The application may keep its own sqlx migrations in the same database.
        migrator.set_ignore_missing(true);
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| store_error("migrating the SQLite database failed", e.into()))
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
                    e => store_error("checking the SQLite schema failed", e),
                })?;
        Ok(sqlx::migrate!("./migrations/sqlite")
            .iter()
            .filter(|migration| !applied.contains(&migration.version))
            .count())
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("filename", &self.pool.connect_options().get_filename())
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.observers.created(self.insert_unobserved(record).await)
    }

    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        // The record's digest, else an added one: one statement; a record digest (every key
        // not re-digested since a rotation) is found by one index lookup, as before.
        sqlx::query(&format!(
            "SELECT {COLUMNS}, {CREDIT_COLUMNS} FROM keywarden_keys WHERE digest = ?1 \
             UNION ALL SELECT {KEY_COLUMNS}, {KEY_CREDIT_COLUMNS} FROM keywarden_key_digests AS d \
             JOIN keywarden_keys AS k ON k.id = d.key_id WHERE d.digest = ?1 LIMIT 1"
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
            "SELECT {COLUMNS}, {CREDIT_COLUMNS} FROM keywarden_keys WHERE id = ?"
        ))
        .bind(id.as_bytes().as_slice())
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
            "UPDATE keywarden_keys SET encrypted_key = ? WHERE id = ? AND encrypted_key = ?",
        )
        .bind(new)
        .bind(id.as_bytes().as_slice())
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
        let mut sql = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {COLUMNS}, {CREDIT_COLUMNS} FROM keywarden_keys WHERE 1 = 1"
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
            sql.push(" AND id > ").push_bind(after.as_bytes().to_vec());
        }
        if let Some(state) = query.state {
            push_state_filter(&mut sql, state, to_micros(query.now));
        }
        if let Some((after, until)) = query.expires_between {
            sql.push(" AND expires_at > ")
                .push_bind(to_micros(after))
                .push(" AND expires_at <= ")
                .push_bind(to_micros(until));
        }
        sql.push(" ORDER BY id LIMIT ").push_bind(limit as i64 + 1);
        let rows = sql
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(|e| store_error("listing keys failed", e))?;
        page_skipping_corrupt(
            &rows,
            limit,
            |row| uuid(column(row, "id")?, "id"),
            decode_row,
        )
    }

    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        let totals: Vec<_> = aggregate_usage(usage).into_iter().collect();
        if totals.is_empty() {
            return Ok(());
        }
        let context = "recording key usage failed";
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| store_error(context, e))?;
        // One statement per chunk, the rows as one JSON parameter `[[hex id, uses, micros]]`:
        // a single prepared statement whatever the batch size, and no parameter limit.
        let mut batch = String::new();
        for chunk in totals.chunks(USAGE_CHUNK_ROWS) {
            usage_json(chunk, &mut batch);
            sqlx::query(
                "UPDATE keywarden_keys SET \
                 use_count = CASE WHEN use_count > 9223372036854775807 - u.uses \
                     THEN 9223372036854775807 ELSE use_count + u.uses END, \
                 last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < u.at THEN u.at \
                     ELSE last_used_at END \
                 FROM (SELECT unhex(value ->> 0) AS id, value ->> 1 AS uses, value ->> 2 AS at \
                     FROM json_each(?)) AS u \
                 WHERE keywarden_keys.id = u.id",
            )
            .bind(batch.as_str())
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
        read_owner(&self.pool, collection, subject).await
    }

    async fn list_owner_policies(
        &self,
        collection: Option<&str>,
    ) -> Result<Vec<OwnerPolicy>, StoreError> {
        let rows = sqlx::query(&format!(
            "{OWNER_SELECT} WHERE ?1 IS NULL OR o.collection = ?1 ORDER BY o.collection, o.subject"
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map)?;
        let before = read_owner(&mut *tx, collection, subject).await?;
        let old_generation: Option<i64> =
            sqlx::query_scalar("SELECT generation FROM keywarden_owner_credits WHERE pool = ?")
                .bind(pool.as_bytes().as_slice())
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
             VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (collection, subject) DO UPDATE SET rate_limit = excluded.rate_limit, \
             credits_refill = excluded.credits_refill, \
             credits_generation = excluded.credits_generation, updated_at = excluded.updated_at",
        )
        .bind(collection)
        .bind(subject)
        .bind(pool.as_bytes().as_slice())
        .bind(rate_limit.map(|r| r.to_string()))
        .bind(credits.and_then(|c| c.refill).map(|r| r.to_string()))
        .bind(stored_generation)
        .bind(to_micros(now))
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        match (update.changes_credits(), credits) {
            (true, Some(credits)) => {
                sqlx::query_scalar::<_, i64>(&set_credits_statement(
                    Dialect::Sqlite,
                    CreditTable::Owner,
                ))
                .bind(pool.as_bytes().as_slice())
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
                sqlx::query("DELETE FROM keywarden_owner_credits WHERE pool = ?")
                    .bind(pool.as_bytes().as_slice())
                    .execute(&mut *tx)
                    .await
                    .map_err(map)?;
            }
            (false, _) => {}
        }
        let keys = owner_keys(&mut tx, collection, subject).await?;
        let after = read_owner(&mut *tx, collection, subject)
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map)?;
        let Some(before) = read_owner(&mut *tx, collection, subject).await? else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM keywarden_owners WHERE collection = ? AND subject = ?")
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
        let context = "writing a change and its audit event failed";
        let map = |e| store_error(context, e);
        // IMMEDIATE: the write lock from the start, so the head read below is the last event.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map)?;
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
        let mut sql = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {AUDIT_COLUMNS} FROM keywarden_audit WHERE seq > "
        ));
        sql.push_bind(clamp_i64(query.after.unwrap_or(0)));
        if let Some(id) = query.key_id {
            sql.push(" AND key_id = ").push_bind(id.as_bytes().to_vec());
        }
        // The sealed columns, not the display column `actor`: a filter sees what `verify`
        // checks.
        if let Some(filter) = query.actor_filter() {
            sql.push(" AND actor_kind = ").push_bind(filter.kind);
            if let Some(id) = filter.key_id {
                sql.push(" AND actor_key_id = ")
                    .push_bind(id.as_bytes().to_vec());
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
            sql.push(" AND at >= ").push_bind(to_micros(since));
        }
        if let Some(until) = query.until {
            sql.push(" AND at < ").push_bind(to_micros(until));
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
        if counts.is_empty() {
            return Ok(());
        }
        let map = |e| store_error("recording usage analytics failed", e);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map)?;
        for c in counts {
            let (sql, key): (&str, Vec<u8>) = match &c.subject {
                UsageSubject::Key(id) => (
                    "INSERT INTO keywarden_usage_hourly (key_id, hour, outcome, count) \
                     VALUES (?, ?, ?, ?) ON CONFLICT (key_id, hour, outcome) \
                     DO UPDATE SET count = count + excluded.count",
                    id.as_bytes().to_vec(),
                ),
                UsageSubject::Collection(_) => (
                    "INSERT INTO keywarden_collection_usage_hourly \
                     (collection, hour, outcome, count) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (collection, hour, outcome) \
                     DO UPDATE SET count = count + excluded.count",
                    Vec::new(),
                ),
            };
            let query = sqlx::query(sql);
            let query = match &c.subject {
                UsageSubject::Key(_) => query.bind(key),
                UsageSubject::Collection(slug) => query.bind(slug.as_str()),
            };
            query
                .bind(to_micros(c.hour))
                .bind(c.outcome.as_str())
                .bind(clamp_i64(c.count))
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
        let query = match subject {
            UsageSubject::Key(id) => sqlx::query_as::<_, (i64, String, i64)>(
                "SELECT hour, outcome, count FROM keywarden_usage_hourly \
                 WHERE key_id = ? AND hour >= ? AND hour < ? ORDER BY hour, outcome",
            )
            .bind(id.as_bytes().to_vec()),
            UsageSubject::Collection(slug) => sqlx::query_as::<_, (i64, String, i64)>(
                "SELECT hour, outcome, count FROM keywarden_collection_usage_hourly \
                 WHERE collection = CAST(? AS TEXT) AND hour >= ? AND hour < ? \
                 ORDER BY hour, outcome",
            )
            .bind(slug.clone()),
        };
        let rows = query
            .bind(to_micros(since))
            .bind(to_micros(until))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| store_error("reading usage analytics failed", e))?;
        rows.into_iter()
            .map(|(hour, outcome, count)| {
                Ok(HourlyUsage {
                    hour: from_micros(hour, "hour")?,
                    outcome: UsageOutcome::parse(&outcome)
                        .ok_or_else(|| corrupt("outcome", "unknown outcome"))?,
                    count: u64::try_from(count).map_err(|_| corrupt("count", "negative"))?,
                })
            })
            .collect()
    }

    async fn change_feed(&self, after: u64, limit: u32) -> Result<Option<FeedPage>, StoreError> {
        let rows: Vec<(i32, i64, Option<Vec<u8>>)> = sqlx::query_as(FEED_SQL)
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| store_error("reading the change feed failed", e))?;
        let rows = rows
            .into_iter()
            .map(|(kind, seq, key)| match key {
                None => Ok((kind, seq, None)),
                Some(bytes) => Uuid::from_slice(&bytes)
                    .map(|id| (kind, seq, Some(id)))
                    .map_err(|_| corrupt("key_id", "not a 16-byte id")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        page_from_rows(rows).map(Some)
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        sqlx::query(
            "DELETE FROM keywarden_changes WHERE at < ? \
             AND seq < (SELECT MAX(seq) FROM keywarden_changes)",
        )
        .bind(to_micros(before))
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
            deleted += sqlx::query(&format!("DELETE FROM {table} WHERE hour < ?"))
                .bind(to_micros(before))
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map)?;
        let last: Option<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, mac FROM keywarden_audit WHERE seq = \
             (SELECT max(seq) FROM keywarden_audit WHERE at < ?)",
        )
        .bind(to_micros(before))
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
            "SELECT {AUDIT_COLUMNS} FROM keywarden_audit WHERE seq <= ? ORDER BY seq"
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
        let deleted = sqlx::query("DELETE FROM keywarden_audit WHERE seq <= ?")
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(map)?
            .rows_affected();
        sqlx::query(
            "INSERT INTO keywarden_audit_checkpoint (id, seq, mac, sealed_by, seal) \
             VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, \
             mac = excluded.mac, sealed_by = excluded.sealed_by, seal = excluded.seal",
        )
        .bind(seq)
        .bind(checkpoint.head.mac.as_bytes().as_slice())
        .bind(checkpoint.sealed_by.as_bytes().as_slice())
        .bind(checkpoint.seal.as_bytes().as_slice())
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        tx.commit().await.map_err(map)?;
        Ok(deleted)
    }

    fn observe(&self, observer: std::sync::Weak<dyn StoreObserver>) {
        self.observers.add(observer);
    }
}

/// Credit balances: a key's or an owner's.
impl SqliteStore {
    async fn lease_from(
        &self,
        table: CreditTable,
        id: Uuid,
        need: u64,
        want: u64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditLease>, StoreError> {
        let row = sqlx::query(&lease_statement(Dialect::Sqlite, table))
            .bind(id.as_bytes().as_slice())
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
        let done = sqlx::query(&return_statement(Dialect::Sqlite, table))
            .bind(id.as_bytes().as_slice())
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

/// An owner's policy with its balance, if it has one.
async fn read_owner<'e, E>(
    conn: E,
    collection: &str,
    subject: &str,
) -> Result<Option<OwnerPolicy>, StoreError>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let row = sqlx::query(&format!(
        "{OWNER_SELECT} WHERE o.collection = ? AND o.subject = ?"
    ))
    .bind(collection)
    .bind(subject)
    .fetch_optional(conn)
    .await
    .map_err(|e| store_error("reading an owner policy failed", e))?;
    row.as_ref().map(decode_owner_row).transpose()
}

fn decode_owner_row(row: &SqliteRow) -> Result<OwnerPolicy, StoreError> {
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
        updated_at: from_micros(column(row, "updated_at")?, "updated_at")?,
    })
}

/// The ids of an owner's keys (fed by the owners' trigger; the in-process observers hear of
/// them from the store).
async fn owner_keys(
    conn: &mut SqliteConnection,
    collection: &str,
    subject: &str,
) -> Result<Vec<Uuid>, StoreError> {
    let ids: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT id FROM keywarden_keys WHERE collection = ? AND subject = ?")
            .bind(collection)
            .bind(subject)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| store_error("reading an owner's keys failed", e))?;
    ids.into_iter().map(|id| uuid(id, "id")).collect()
}

/// The writes themselves; the `KeyStore` methods add the in-process change notices.
impl SqliteStore {
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
        let context = "updating a key failed";
        // IMMEDIATE takes the write lock up front: a deferred transaction that read first
        // could fail to upgrade (SQLITE_BUSY without waiting) under concurrent writers.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| store_error(context, e))?;
        let updated = update_in(&mut tx, id, patch, now).await?;
        tx.commit().await.map_err(|e| store_error(context, e))?;
        Ok(updated.map(|(_, after)| after))
    }

    async fn retire_secret_unobserved(
        &self,
        secret_id: SecretId,
        unmigrated: UnmigratedKeys,
        now: OffsetDateTime,
    ) -> Result<SecretRetirement, StoreError> {
        let map = |e| store_error("retiring a secret failed", e);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map)?;
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
}

/// The writes, on a connection (in a transaction where they need one).
async fn insert_in(conn: &mut SqliteConnection, record: &KeyRecord) -> Result<(), StoreError> {
    let scopes = to_json(&record.scopes)?;
    let metadata = to_json(&record.metadata)?;
    sqlx::query(&format!(
        "INSERT INTO keywarden_keys ({COLUMNS}, credits_refill, credits_generation) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ))
    .bind(record.id.as_bytes().as_slice())
    .bind(record.digest.as_bytes().as_slice())
    .bind(record.secret_id.as_bytes().as_slice())
    .bind(&record.display_start)
    .bind(&record.name)
    .bind(&record.description)
    .bind(&record.collection)
    .bind(&record.subject)
    .bind(record.owner_kind.as_str())
    .bind(scopes)
    .bind(&record.environment)
    .bind(record.read_only)
    .bind(metadata)
    .bind(record.rate_limit.map(|p| p.to_string()))
    .bind(to_micros(record.created_at))
    .bind(to_micros(record.updated_at))
    .bind(record.expires_at.map(to_micros))
    .bind(record.last_used_at.map(to_micros))
    .bind(clamp_i64(record.use_count))
    .bind(record.revoked_at.map(to_micros))
    .bind(record.disabled)
    .bind(record.rotated_from.map(|id| id.as_bytes().to_vec()))
    .bind(record.encrypted_key.as_deref())
    .bind(to_json(&record.allowed_ips)?)
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
    conn: &mut SqliteConnection,
    id: Uuid,
    credits: Credits,
    set_balance: bool,
    now: OffsetDateTime,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(&set_credits_statement(Dialect::Sqlite, CreditTable::Key))
        .bind(id.as_bytes().as_slice())
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

/// The record before and after, or `None` for an unknown id. In a write transaction.
async fn update_in(
    conn: &mut SqliteConnection,
    id: Uuid,
    patch: &KeyPatch,
    now: OffsetDateTime,
) -> Result<Option<(KeyRecord, KeyRecord)>, StoreError> {
    let context = "updating a key failed";
    let Some(row) = sqlx::query(&format!(
        "SELECT {COLUMNS}, {CREDIT_COLUMNS} FROM keywarden_keys WHERE id = ?"
    ))
    .bind(id.as_bytes().as_slice())
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
            sqlx::query("DELETE FROM keywarden_credits WHERE key_id = ?")
                .bind(id.as_bytes().as_slice())
                .execute(&mut *conn)
                .await
                .map_err(|e| store_error(context, e))?;
            None
        }
    };
    let row = sqlx::query(&format!(
        "UPDATE keywarden_keys SET name = ?, description = ?, scopes = ?, read_only = ?, \
             metadata = ?, rate_limit = ?, expires_at = ?, revoked_at = ?, disabled = ?, \
             updated_at = ?, allowed_ips = ?, credits_refill = ?, \
             credits_generation = CASE WHEN ? THEN ? ELSE credits_generation END \
             WHERE id = ? RETURNING {COLUMNS}, {CREDIT_COLUMNS}"
    ))
    .bind(&record.name)
    .bind(&record.description)
    .bind(to_json(&record.scopes)?)
    .bind(record.read_only)
    .bind(to_json(&record.metadata)?)
    .bind(record.rate_limit.map(|p| p.to_string()))
    .bind(record.expires_at.map(to_micros))
    .bind(record.revoked_at.map(to_micros))
    .bind(record.disabled)
    .bind(to_micros(record.updated_at))
    .bind(to_json(&record.allowed_ips)?)
    .bind(refill_text(&record))
    .bind(patch.changes_credits())
    .bind(generation)
    .bind(id.as_bytes().as_slice())
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

/// In a write transaction.
async fn retire_secret_in(
    conn: &mut SqliteConnection,
    secret_id: SecretId,
    unmigrated: UnmigratedKeys,
    now: OffsetDateTime,
) -> Result<SecretRetirement, StoreError> {
    let context = "retiring a secret failed";
    let secret = secret_id.as_bytes().as_slice();
    let map = |e| store_error(context, e);
    let stranded: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT id FROM keywarden_keys AS k WHERE k.secret_id = ?1 AND k.revoked_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM keywarden_key_digests AS d \
                 WHERE d.key_id = k.id AND d.secret_id <> ?1) ORDER BY id",
    )
    .bind(secret)
    .fetch_all(&mut *conn)
    .await
    .map_err(map)?;
    let stranded = stranded
        .into_iter()
        .map(|id| uuid(id, "id"))
        .collect::<Result<Vec<_>, _>>()?;
    if unmigrated == UnmigratedKeys::Refuse && !stranded.is_empty() {
        return Ok(SecretRetirement {
            retired: false,
            unmigrated: stranded,
            ..SecretRetirement::default()
        });
    }
    // The lowest other digest becomes the record's; then it is no longer an added one.
    let promoted: Vec<Vec<u8>> = sqlx::query_scalar(
        "UPDATE keywarden_keys AS k SET digest = p.digest, secret_id = p.secret_id \
             FROM (SELECT d.key_id, d.digest, d.secret_id FROM keywarden_key_digests AS d \
                   JOIN keywarden_keys AS o ON o.id = d.key_id \
                   WHERE o.secret_id = ?1 AND d.secret_id <> ?1 \
                     AND d.digest = (SELECT min(e.digest) FROM keywarden_key_digests AS e \
                                     WHERE e.key_id = d.key_id AND e.secret_id <> ?1)) AS p \
             WHERE k.id = p.key_id RETURNING id",
    )
    .bind(secret)
    .fetch_all(&mut *conn)
    .await
    .map_err(map)?;
    sqlx::query(
            "DELETE FROM keywarden_key_digests WHERE EXISTS (SELECT 1 FROM keywarden_keys AS k \
             WHERE k.id = keywarden_key_digests.key_id AND k.digest = keywarden_key_digests.digest)",
        )
        .execute(&mut *conn)
        .await
        .map_err(map)?;
    let dropped: Vec<Vec<u8>> = sqlx::query_scalar(
        "DELETE FROM keywarden_key_digests WHERE secret_id = ?1 RETURNING key_id",
    )
    .bind(secret)
    .fetch_all(&mut *conn)
    .await
    .map_err(map)?;
    // What is left under the secret had no other digest: a placeholder, and revoked.
    let placeholders: Vec<Vec<u8>> = sqlx::query_scalar(
        "UPDATE keywarden_keys SET \
             digest = unhex('00000000000000000000000000000000' || hex(id)), \
             secret_id = zeroblob(8), revoked_at = coalesce(revoked_at, ?2), updated_at = ?2 \
             WHERE secret_id = ?1 RETURNING id",
    )
    .bind(secret)
    .bind(to_micros(now))
    .fetch_all(&mut *conn)
    .await
    .map_err(map)?;
    let dropped_count = promoted.len() + dropped.len() + placeholders.len();
    let mut affected = promoted
        .into_iter()
        .chain(dropped)
        .chain(placeholders)
        .map(|id| uuid(id, "id"))
        .collect::<Result<Vec<_>, _>>()?;
    affected.sort();
    affected.dedup();
    Ok(SecretRetirement {
        retired: true,
        dropped: dropped_count as u64,
        unmigrated: stranded,
        affected,
    })
}

async fn delete_in(conn: &mut SqliteConnection, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
    // Read first: the credits row goes with the key (ON DELETE CASCADE) before a RETURNING
    // clause could read it.
    let context = "deleting a key failed";
    let Some(row) = sqlx::query(&format!(
        "SELECT {COLUMNS}, {CREDIT_COLUMNS} FROM keywarden_keys WHERE id = ?"
    ))
    .bind(id.as_bytes().as_slice())
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| store_error(context, e))?
    else {
        return Ok(None);
    };
    let record = decode_row(&row)?;
    sqlx::query("DELETE FROM keywarden_keys WHERE id = ?")
        .bind(id.as_bytes().as_slice())
        .execute(&mut *conn)
        .await
        .map_err(|e| store_error(context, e))?;
    Ok(Some(record))
}

/// The lazy digest migration (no audit event: not a management change).
impl SqliteStore {
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
             SELECT ?1, k.id, ?3 FROM keywarden_keys AS k WHERE k.id = ?2 AND k.secret_id <> ?3 \
               AND (k.digest = ?4 OR EXISTS (SELECT 1 FROM keywarden_key_digests AS d \
                    WHERE d.digest = ?4 AND d.key_id = k.id)) \
               AND NOT EXISTS (SELECT 1 FROM keywarden_keys WHERE digest = ?1) \
             ON CONFLICT DO NOTHING",
        )
        .bind(new.as_bytes().as_slice())
        .bind(id.as_bytes().as_slice())
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
        let owner: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT id FROM keywarden_keys WHERE digest = ?1 \
             UNION ALL SELECT key_id FROM keywarden_key_digests WHERE digest = ?1 LIMIT 1",
        )
        .bind(new.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| store_error(context, e))?;
        match owner {
            Some(owner) if owner.as_slice() != id.as_bytes().as_slice() => Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!("{context}: another key has this digest"),
            )),
            _ => Ok(false),
        }
    }
}

/// A checkpoint as stored: seq, MAC, sealing secret id, seal.
type CheckpointRow = (i64, Vec<u8>, Vec<u8>, Vec<u8>);

const AUDIT_COLUMNS: &str = "seq, at, action, actor_kind, actor_key_id, actor_name, key_id, \
    collection, subject, changes, client_address, request_id, sealed_by, mac";

/// The last event's number and MAC: the last event's, else the checkpoint's, else genesis.
async fn audit_head(conn: &mut SqliteConnection) -> Result<ChainHead, StoreError> {
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

async fn read_checkpoint(
    conn: &mut SqliteConnection,
) -> Result<Option<AuditCheckpoint>, StoreError> {
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

async fn insert_event(conn: &mut SqliteConnection, event: &AuditEvent) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "INSERT INTO keywarden_audit ({AUDIT_COLUMNS}, actor) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ))
    .bind(clamp_i64(event.seq))
    .bind(to_micros(event.at))
    .bind(event.action.as_str())
    .bind(event.actor.kind())
    .bind(event.actor.key_id().map(|id| id.as_bytes().to_vec()))
    .bind(event.actor.name())
    .bind(event.key_id.map(|id| id.as_bytes().to_vec()))
    .bind(&event.collection)
    .bind(&event.subject)
    .bind(to_json(&event.changes)?)
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

fn decode_event(row: &SqliteRow) -> Result<AuditEvent, StoreError> {
    let optional_uuid = |name: &'static str| -> Result<Option<Uuid>, StoreError> {
        column::<Option<Vec<u8>>>(row, name)?
            .map(|v| uuid(v, name))
            .transpose()
    };
    let seq: i64 = column(row, "seq")?;
    let action: String = column(row, "action")?;
    let changes: String = column(row, "changes")?;
    let client_address: Option<String> = column(row, "client_address")?;
    let actor_kind: String = column(row, "actor_kind")?;
    Ok(AuditEvent {
        seq: u64::try_from(seq).map_err(|_| corrupt("seq", "negative"))?,
        at: from_micros(column(row, "at")?, "at")?,
        action: action
            .parse()
            .map_err(|_| corrupt("action", "unknown action"))?,
        actor: Actor::from_parts(
            &actor_kind,
            optional_uuid("actor_key_id")?,
            column(row, "actor_name")?,
        )
        .ok_or_else(|| corrupt("actor_kind", "not an actor"))?,
        key_id: optional_uuid("key_id")?,
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

/// Writes `rows` as the JSON array the usage update reads: `[["<32 hex digits>",uses,micros],…]`,
/// ids as hex because JSON has no bytes (`unhex` turns them back into the 16-byte blob).
fn usage_json(rows: &[(Uuid, (u64, OffsetDateTime))], out: &mut String) {
    use std::fmt::Write as _;
    out.clear();
    out.push('[');
    for (i, (id, (uses, last_used_at))) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "[\"{}\",{},{}]",
            id.simple(),
            clamp_i64(*uses),
            to_micros(*last_used_at)
        );
    }
    out.push(']');
}

/// Appends the SQL form of [`KeyRecord::state`] at `now` (unix microseconds).
fn push_state_filter(sql: &mut QueryBuilder<'_, Sqlite>, state: KeyState, now: i64) {
    match state {
        KeyState::Revoked => {
            sql.push(" AND revoked_at IS NOT NULL");
        }
        KeyState::Disabled => {
            sql.push(" AND revoked_at IS NULL AND disabled <> 0");
        }
        KeyState::Expired => {
            sql.push(" AND revoked_at IS NULL AND disabled = 0 AND expires_at <= ")
                .push_bind(now);
        }
        KeyState::Active => {
            sql.push(
                " AND revoked_at IS NULL AND disabled = 0 AND (expires_at IS NULL OR expires_at > ",
            )
            .push_bind(now)
            .push(")");
        }
    }
}

/// Unix microseconds (floored) of an instant.
fn to_micros(at: OffsetDateTime) -> i64 {
    at.unix_timestamp() * 1_000_000 + i64::from(at.microsecond())
}

/// The UTC instant of unix microseconds.
fn from_micros(micros: i64, column: &'static str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .ok()
        .filter(in_rfc3339_range)
        .ok_or_else(|| corrupt(column, "timestamp out of range"))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|_| StoreError::new(StoreErrorKind::Other, "cannot encode a JSON column"))
}

/// Whether a SQLite URL names an in-memory database.
fn is_memory_url(url: &str) -> bool {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
    database == ":memory:" || params.split('&').any(|p| p == "mode=memory")
}

fn corrupt(column: &'static str, problem: &str) -> StoreError {
    // Name the column, never its value: rows are not echoed into errors or logs.
    StoreError::new(
        StoreErrorKind::Corrupt,
        format!("stored key has an invalid {column} column: {problem}"),
    )
}

fn column<'r, T>(row: &'r SqliteRow, name: &'static str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(name)
        .map_err(|e| store_error("decoding a stored key failed", e))
}

fn bytes<const N: usize>(value: Vec<u8>, name: &'static str) -> Result<[u8; N], StoreError> {
    <[u8; N]>::try_from(value.as_slice()).map_err(|_| corrupt(name, &format!("expected {N} bytes")))
}

fn uuid(value: Vec<u8>, name: &'static str) -> Result<Uuid, StoreError> {
    bytes::<16>(value, name).map(Uuid::from_bytes)
}

fn optional_time(
    value: Option<i64>,
    name: &'static str,
) -> Result<Option<OffsetDateTime>, StoreError> {
    value.map(|v| from_micros(v, name)).transpose()
}

fn decode_row(row: &SqliteRow) -> Result<KeyRecord, StoreError> {
    let scopes: String = column(row, "scopes")?;
    let metadata: String = column(row, "metadata")?;
    let owner_kind: String = column(row, "owner_kind")?;
    let rate_limit: Option<String> = column(row, "rate_limit")?;
    let allowed_ips: String = column(row, "allowed_ips")?;
    let credits = decode_credits(
        column(row, "credits_remaining")?,
        column(row, "credits_refill")?,
    )?;
    Ok(KeyRecord {
        id: uuid(column(row, "id")?, "id")?,
        digest: Digest::from_bytes(bytes(column(row, "digest")?, "digest")?),
        secret_id: SecretId::from_bytes(bytes(column(row, "secret_id")?, "secret_id")?),
        display_start: column(row, "display_start")?,
        name: column(row, "name")?,
        description: column(row, "description")?,
        collection: column(row, "collection")?,
        subject: column(row, "subject")?,
        owner_kind: OwnerKind::from_str(&owner_kind)
            .map_err(|_| corrupt("owner_kind", "unknown owner kind"))?,
        scopes: serde_json::from_str(&scopes)
            .map_err(|_| corrupt("scopes", "not a JSON array of strings"))?,
        environment: column(row, "environment")?,
        read_only: column(row, "read_only")?,
        metadata: serde_json::from_str(&metadata)
            .map_err(|_| corrupt("metadata", "not valid JSON"))?,
        rate_limit: rate_limit
            .map(|p| RateLimitPolicy::from_str(&p))
            .transpose()
            .map_err(|_| corrupt("rate_limit", "not a rate-limit policy"))?,
        created_at: from_micros(column(row, "created_at")?, "created_at")?,
        updated_at: from_micros(column(row, "updated_at")?, "updated_at")?,
        expires_at: optional_time(column(row, "expires_at")?, "expires_at")?,
        last_used_at: optional_time(column(row, "last_used_at")?, "last_used_at")?,
        use_count: u64::try_from(column::<i64>(row, "use_count")?)
            .map_err(|_| corrupt("use_count", "negative"))?,
        revoked_at: optional_time(column(row, "revoked_at")?, "revoked_at")?,
        disabled: column(row, "disabled")?,
        rotated_from: column::<Option<Vec<u8>>>(row, "rotated_from")?
            .map(|v| uuid(v, "rotated_from"))
            .transpose()?,
        encrypted_key: column(row, "encrypted_key")?,
        allowed_ips: serde_json::from_str(&allowed_ips)
            .map_err(|_| corrupt("allowed_ips", "not a JSON array of IP networks"))?,
        credits,
        owner: decode_owner(
            column(row, "owner_rate_limit")?,
            column(row, "owner_credits_refill")?,
            column(row, "owner_credits_generation")?,
        )?,
    })
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
    if let E::Encode(_) = err {
        // Encoding errors may quote the value that failed to encode.
        return StoreError::new(kind, format!("{context}: a value could not be encoded"));
    }
    StoreError::new(kind, format!("{context}: {err}")).with_source(err)
}

/// Database errors carry the message and code only: the source (and its details) may quote
/// row values, so it is not attached.
fn database_error(context: &str, db: &dyn DatabaseError) -> StoreError {
    let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
    let kind = if db.is_unique_violation() {
        StoreErrorKind::Conflict
    } else {
        sqlite_kind(code, db.message())
    };
    let message = if kind == StoreErrorKind::Conflict {
        format!("{context}: a key with this id or digest exists")
    } else {
        format!("{context}: SQLite error {code}: {}", db.message())
    };
    StoreError::new(kind, message)
}

/// The kind of a SQLite (extended) result code.
fn sqlite_kind(code: i32, message: &str) -> StoreErrorKind {
    match code & 0xff {
        // BUSY, LOCKED: another connection held the lock past the busy timeout.
        5 | 6 => StoreErrorKind::Timeout,
        // READONLY, IOERR, FULL, CANTOPEN, PROTOCOL, NOLFS, AUTH
        8 | 10 | 13 | 14 | 15 | 22 | 23 => StoreErrorKind::Unavailable,
        // CORRUPT, NOTADB
        11 | 26 => StoreErrorKind::Corrupt,
        // SCHEMA
        17 => StoreErrorKind::Schema,
        // ERROR: the generic code also covers a missing or outdated table.
        1 if message.starts_with("no such table") || message.starts_with("no such column") => {
            StoreErrorKind::Schema
        }
        _ => StoreErrorKind::Other,
    }
}

const WEBHOOK_COLUMNS: &str = "id, url, events, description, sealed_secret, disabled, \
    created_at, cursor, expiring_cursor, attempts, next_attempt_at, last_error, failing_since, \
    lease_owner, lease_until";

fn decode_webhook(row: &SqliteRow) -> Result<WebhookRecord, StoreError> {
    let events: String = column(row, "events")?;
    let optional = |name: &'static str| -> Result<Option<OffsetDateTime>, StoreError> {
        column::<Option<i64>>(row, name)?
            .map(|m| from_micros(m, name))
            .transpose()
    };
    Ok(WebhookRecord {
        id: uuid(column(row, "id")?, "id")?,
        url: column(row, "url")?,
        events: serde_json::from_str(&events).map_err(|_| corrupt("events", "not a list"))?,
        description: column(row, "description")?,
        sealed_secret: column(row, "sealed_secret")?,
        disabled: column(row, "disabled")?,
        created_at: from_micros(column(row, "created_at")?, "created_at")?,
        cursor: u64::try_from(column::<i64>(row, "cursor")?)
            .map_err(|_| corrupt("cursor", "negative"))?,
        expiring_cursor: from_micros(column(row, "expiring_cursor")?, "expiring_cursor")?,
        attempts: u32::try_from(column::<i64>(row, "attempts")?)
            .map_err(|_| corrupt("attempts", "out of range"))?,
        next_attempt_at: optional("next_attempt_at")?,
        last_error: column(row, "last_error")?,
        failing_since: optional("failing_since")?,
        lease_owner: column::<Option<Vec<u8>>>(row, "lease_owner")?
            .map(|v| uuid(v, "lease_owner"))
            .transpose()?,
        lease_until: optional("lease_until")?,
    })
}

#[async_trait]
impl WebhookStore for SqliteStore {
    async fn insert_webhook(&self, record: &WebhookRecord) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO keywarden_webhooks ({WEBHOOK_COLUMNS}) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(record.id.as_bytes().as_slice())
        .bind(&record.url)
        .bind(to_json(&record.events)?)
        .bind(&record.description)
        .bind(record.sealed_secret.as_slice())
        .bind(record.disabled)
        .bind(to_micros(record.created_at))
        .bind(clamp_i64(record.cursor))
        .bind(to_micros(record.expiring_cursor))
        .bind(i64::from(record.attempts))
        .bind(record.next_attempt_at.map(to_micros))
        .bind(&record.last_error)
        .bind(record.failing_since.map(to_micros))
        .bind(record.lease_owner.map(|id| id.as_bytes().to_vec()))
        .bind(record.lease_until.map(to_micros))
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
            "SELECT {WEBHOOK_COLUMNS} FROM keywarden_webhooks WHERE id = ?"
        ))
        .bind(id.as_bytes().as_slice())
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map)?;
        let Some(row) = sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM keywarden_webhooks WHERE id = ?"
        ))
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map)?
        else {
            return Ok(None);
        };
        let mut record = decode_webhook(&row)?;
        patch.apply_to(&mut record);
        sqlx::query(
            "UPDATE keywarden_webhooks SET url = ?, events = ?, description = ?, disabled = ?, \
             attempts = ?, next_attempt_at = ? WHERE id = ?",
        )
        .bind(&record.url)
        .bind(to_json(&record.events)?)
        .bind(&record.description)
        .bind(record.disabled)
        .bind(i64::from(record.attempts))
        .bind(record.next_attempt_at.map(to_micros))
        .bind(id.as_bytes().as_slice())
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        tx.commit().await.map_err(map)?;
        Ok(Some(record))
    }

    async fn delete_webhook(&self, id: Uuid) -> Result<Option<WebhookRecord>, StoreError> {
        sqlx::query(&format!(
            "DELETE FROM keywarden_webhooks WHERE id = ? RETURNING {WEBHOOK_COLUMNS}"
        ))
        .bind(id.as_bytes().as_slice())
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
        let owner = owner.as_bytes().as_slice();
        sqlx::query(&format!(
            "UPDATE keywarden_webhooks SET lease_owner = ?1, lease_until = ?2 WHERE id = ?3 \
             AND (lease_owner = ?1 OR lease_until IS NULL OR lease_until <= ?4) \
             RETURNING {WEBHOOK_COLUMNS}"
        ))
        .bind(owner)
        .bind(to_micros(until))
        .bind(id.as_bytes().as_slice())
        .bind(to_micros(now))
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
            "UPDATE keywarden_webhooks SET cursor = ?, expiring_cursor = ?, attempts = ?, \
             next_attempt_at = ?, last_error = ?, failing_since = ?, lease_until = ? \
             WHERE id = ? AND lease_owner = ?",
        )
        .bind(clamp_i64(progress.cursor))
        .bind(to_micros(progress.expiring_cursor))
        .bind(i64::from(progress.attempts))
        .bind(progress.next_attempt_at.map(to_micros))
        .bind(&progress.last_error)
        .bind(progress.failing_since.map(to_micros))
        .bind(to_micros(progress.lease_until))
        .bind(id.as_bytes().as_slice())
        .bind(owner.as_bytes().as_slice())
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
    fn micros_roundtrip_in_utc_and_floor() {
        let at = datetime!(2030-02-03 04:05:06.123_456_789 +02:00);
        let micros = to_micros(at);
        let back = from_micros(micros, "t").unwrap();
        assert_eq!(back, datetime!(2030-02-03 02:05:06.123_456 UTC));
        assert_eq!(back.offset(), time::UtcOffset::UTC);

        let before_epoch = datetime!(1969-12-31 23:59:59.999_999_5 UTC);
        assert_eq!(to_micros(before_epoch), -1);
        assert_eq!(
            from_micros(-1, "t").unwrap(),
            datetime!(1969-12-31 23:59:59.999_999 UTC)
        );
        assert!(from_micros(i64::MAX, "t").is_err());
    }

    #[test]
    fn memory_urls_are_recognised() {
        assert!(is_memory_url("sqlite::memory:"));
        assert!(is_memory_url("sqlite://:memory:"));
        assert!(is_memory_url("sqlite://?mode=memory"));
        assert!(is_memory_url("sqlite://shared?cache=shared&mode=memory"));
        assert!(!is_memory_url("sqlite://keys.db"));
        assert!(!is_memory_url("sqlite:///var/lib/memory.db?mode=rwc"));
    }

    #[test]
    fn usage_is_aggregated_per_key() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let t1 = datetime!(2030-01-01 0:00 UTC);
        let t2 = datetime!(2030-01-02 0:00 UTC);
        let totals = aggregate_usage(&[
            KeyUsage {
                id: b,
                last_used_at: t2,
                uses: 1,
            },
            KeyUsage {
                id: a,
                last_used_at: t2,
                uses: u64::MAX,
            },
            KeyUsage {
                id: a,
                last_used_at: t1,
                uses: 3,
            },
        ]);
        assert_eq!(
            totals.into_iter().collect::<Vec<_>>(),
            [(a, (u64::MAX, t2)), (b, (1, t2))]
        );
        assert_eq!(clamp_i64(u64::MAX), i64::MAX);
        assert_eq!(clamp_i64(7), 7);
    }

    #[test]
    fn errors_map_to_kinds() {
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
        assert_eq!(sqlite_kind(5, ""), StoreErrorKind::Timeout);
        assert_eq!(sqlite_kind(261, ""), StoreErrorKind::Timeout); // BUSY_RECOVERY
        assert_eq!(sqlite_kind(11, ""), StoreErrorKind::Corrupt);
        assert_eq!(
            sqlite_kind(1, "no such table: keywarden_keys"),
            StoreErrorKind::Schema
        );
        assert_eq!(
            sqlite_kind(1, "near \"x\": syntax error"),
            StoreErrorKind::Other
        );
        // Every code of each arm, extended codes by their primary code (the low byte).
        for (code, kind) in [
            (6, StoreErrorKind::Timeout),
            (8, StoreErrorKind::Unavailable),
            (10, StoreErrorKind::Unavailable),
            (266, StoreErrorKind::Unavailable), // IOERR_READ
            (13, StoreErrorKind::Unavailable),
            (14, StoreErrorKind::Unavailable),
            (15, StoreErrorKind::Unavailable),
            (22, StoreErrorKind::Unavailable),
            (23, StoreErrorKind::Unavailable),
            (26, StoreErrorKind::Corrupt),
            (17, StoreErrorKind::Schema),
            (2067, StoreErrorKind::Other), // CONSTRAINT_UNIQUE, mapped by is_unique_violation
            (0, StoreErrorKind::Other),
        ] {
            assert_eq!(sqlite_kind(code, ""), kind, "{code}");
        }
        assert_eq!(
            sqlite_kind(1, "no such column: scopes"),
            StoreErrorKind::Schema
        );
        assert_eq!(
            sqlite_kind(17, "no such table: keywarden_keys"),
            StoreErrorKind::Schema
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

    /// A database without the schema is not ready, and the error says what to run (not
    /// SQLite's "no such table"); once migrated, it is.
    #[tokio::test]
    async fn an_unmigrated_database_is_not_ready_and_says_how_to_fix_it() {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let store = SqliteStore::from_pool(pool);
        let err = store.check_ready().await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Schema);
        assert!(
            err.to_string()
                .contains("the database has no keywarden schema; run `keywarden migrate`"),
            "{err}"
        );
        store.migrate().await.unwrap();
        store.check_ready().await.unwrap();

        // Another database error is reported as SQLite's, not as a missing schema.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query("CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        let err = SqliteStore::from_pool(pool)
            .check_ready()
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("checking the SQLite schema failed: SQLite error 1: no such column"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn file_databases_use_wal_and_a_busy_timeout() {
        let path =
            std::env::temp_dir().join(format!("keywarden-unit-{}.db", Uuid::now_v7().simple()));
        let store = SqliteStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(store.pool())
            .await
            .unwrap();
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(store.pool())
            .await
            .unwrap();
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!((mode.as_str(), busy, fk), ("wal", 5000, 1));
        store.migrate().await.expect("migrations are idempotent");
        assert!(format!("{store:?}").contains("keywarden-unit-"));
        store.pool().close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_without_their_values() {
        let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
        let mut record = crate::store::test_support::record(9);
        record.name = "visible-name".into();
        store.insert(&record).await.unwrap();
        sqlx::query("UPDATE keywarden_keys SET scopes = 'not-json-visible-name'")
            .execute(store.pool())
            .await
            .unwrap();
        let err = store.get(record.id).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt);
        assert!(!err.to_string().contains("visible-name"), "{err}");
    }
}
