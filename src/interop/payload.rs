//! Payload CMS API keys: the digest scheme, the table layout, and the read-only store.

use std::fmt;

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::sql::Columns;
use super::{no_digest, text, Row};
use crate::secret::SecretId;
use crate::store::{ForeignDigest, ForeignScheme, StoreError};
use crate::store::{KeyRecord, OwnerKind};

/// Payload's `toSnakeCase` (the `to-snake-case` npm package), reimplemented from its documented
/// behaviour: see [`PayloadTable::table_name_for_slug`].
fn to_snake_case(slug: &str) -> String {
    let no_case = if slug.chars().any(char::is_whitespace) {
        slug.to_lowercase()
    } else if slug.contains(['_', '-', '.', ':']) {
        let joined = collapse_separators(slug);
        (if joined.is_empty() { slug } else { &joined }).to_lowercase()
    } else if has_camel(slug) {
        split_camel(slug).to_lowercase()
    } else {
        slug.to_lowercase()
    };
    collapse_separators(&no_case)
        .trim()
        .replace(char::is_whitespace, "_")
}

/// Each run of characters other than ASCII letters and digits becomes one space before the
/// character that follows it, or nothing at the end.
fn collapse_separators(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_run = false;
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            if in_run {
                out.push(' ');
                in_run = false;
            }
            out.push(c);
        } else {
            in_run = true;
        }
    }
    out
}

/// A lowercase letter next to a capital, in either order.
fn has_camel(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.windows(2).any(|pair| {
        (pair[0].is_ascii_lowercase() && pair[1].is_ascii_uppercase())
            || (pair[0].is_ascii_uppercase() && pair[1].is_ascii_lowercase())
    })
}

/// A space before each run of capitals that follows a character, and between the capitals.
fn split_camel(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len() * 2);
    let mut i = 0;
    while i < chars.len() {
        out.push(chars[i]);
        i += 1;
        while i < chars.len() && chars[i].is_ascii_uppercase() {
            out.push(' ');
            out.push(chars[i].to_ascii_lowercase());
            i += 1;
        }
    }
    out
}

/// Which HMAC a Payload deployment indexes API keys with.
///
/// | Payload | writes | looks up | use |
/// | --- | --- | --- | --- |
/// | 2.x, 3.0–3.46 | HMAC-SHA1 | SHA-1 | [`Sha1`](Self::Sha1) (or `Both`) |
/// | 3.47–3.90 | HMAC-SHA256 | SHA-1 or SHA-256 | [`Both`](Self::Both) |
/// | 4.0 (pre-release) | HMAC-SHA256 | SHA-256 | [`Sha256`](Self::Sha256) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadHash {
    /// HMAC-SHA1 only (40 hex characters).
    Sha1,
    /// HMAC-SHA256 only (64 hex characters).
    Sha256,
    /// Either (the default): finds keys written by any Payload version since 2.0.
    #[default]
    Both,
}

/// A `PayloadScheme` could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the Payload secret is empty (Payload refuses to start without one)")]
pub struct PayloadSchemeError;

/// The HMAC keys derived from one `PAYLOAD_SECRET`, prepared once.
#[derive(Clone)]
struct PayloadSecret {
    sha1: Hmac<Sha1>,
    sha256: Hmac<Sha256>,
}

impl PayloadSecret {
    fn new(secret: &[u8]) -> Result<Self, PayloadSchemeError> {
        if secret.is_empty() {
            return Err(PayloadSchemeError);
        }
        let derived = derive_secret(secret);
        Ok(Self {
            sha1: Hmac::new_from_slice(derived.as_bytes()).expect("HMAC accepts any key length"),
            sha256: Hmac::new_from_slice(derived.as_bytes()).expect("HMAC accepts any key length"),
        })
    }
}

/// Payload's `payload.secret`: the first 32 characters of the lowercase hex SHA-256 of the
/// configured secret. The HMAC key is those 32 ASCII characters, not the bytes they encode.
fn derive_secret(secret: &[u8]) -> Zeroizing<String> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash: Zeroizing<[u8; 32]> = Zeroizing::new(Sha256::digest(secret).into());
    let mut derived = Zeroizing::new(String::with_capacity(32));
    for b in &hash[..16] {
        derived.push(HEX[usize::from(b >> 4)] as char);
        derived.push(HEX[usize::from(b & 0x0f)] as char);
    }
    derived
}

/// How Payload CMS indexes API keys: `apiKeyIndex` = lowercase hex HMAC of the UTF-8 key, keyed
/// with the first 32 hex characters of SHA-256(`PAYLOAD_SECRET`) as ASCII bytes.
///
/// Holds a current secret and any previous ones (Payload 4.0's keyring); a key is looked up
/// under every secret and every configured algorithm in one query. Payload keys are any
/// string (the admin UI generates UUIDv4s); keywarden accepts those of 1 to 512 visible ASCII
/// characters. `Debug` never shows a secret.
///
/// ```
/// use keywarden::{interop::PayloadHash, interop::PayloadScheme};
///
/// let scheme = PayloadScheme::new("keywarden-payload-test-secret").unwrap().hash(PayloadHash::Sha256);
/// let index = scheme.digests(b"0f8b4a7c-3d2e-4b1a-9c5d-6e7f8a9b0c1d");
/// assert_eq!(
///     index[0].as_str(),
///     "3e22257417e566a5847df3dea458a0ad2342aab92834d6676f5a55af96c1c726"
/// );
/// ```
#[derive(Clone)]
pub struct PayloadScheme {
    secrets: Vec<PayloadSecret>,
    hash: PayloadHash,
}

impl PayloadScheme {
    /// A scheme for the deployment's `PAYLOAD_SECRET` (the configured value, before Payload
    /// derives its key from it), looking up both SHA-1 and SHA-256 indexes.
    ///
    /// # Errors
    /// [`PayloadSchemeError`] for an empty secret.
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, PayloadSchemeError> {
        Ok(Self {
            secrets: vec![PayloadSecret::new(secret.as_ref())?],
            hash: PayloadHash::Both,
        })
    }

    /// Also looks keys up under a previous secret (Payload 4.0's keyring). Unlike keywarden's
    /// own keys, a key found this way is not re-indexed: the store is read-only.
    ///
    /// # Errors
    /// [`PayloadSchemeError`] for an empty secret.
    pub fn with_previous(mut self, secret: impl AsRef<[u8]>) -> Result<Self, PayloadSchemeError> {
        self.secrets.push(PayloadSecret::new(secret.as_ref())?);
        Ok(self)
    }

    /// Which HMACs to look up (default [`PayloadHash::Both`]).
    #[must_use]
    pub fn hash(mut self, hash: PayloadHash) -> Self {
        self.hash = hash;
        self
    }

    /// The `apiKeyIndex` values `key` may be stored under: per secret (current first),
    /// SHA-256 before SHA-1.
    pub fn digests(&self, key: &[u8]) -> Vec<ForeignDigest> {
        let mut out = Vec::with_capacity(self.secrets.len() * 2);
        for secret in &self.secrets {
            if self.hash != PayloadHash::Sha1 {
                let mut mac = secret.sha256.clone();
                mac.update(key);
                out.push(ForeignDigest::from_mac(
                    "hmac-sha256",
                    &mac.finalize().into_bytes(),
                ));
            }
            if self.hash != PayloadHash::Sha256 {
                let mut mac = secret.sha1.clone();
                mac.update(key);
                out.push(ForeignDigest::from_mac(
                    "hmac-sha1",
                    &mac.finalize().into_bytes(),
                ));
            }
        }
        out
    }
}

impl ForeignScheme for PayloadScheme {
    fn issuer(&self) -> &'static str {
        "payload"
    }

    fn digests(&self, key: &[u8]) -> Vec<ForeignDigest> {
        PayloadScheme::digests(self, key)
    }

    /// Payload matches `<slug> API-Key <key>` byte-exactly.
    fn exact_api_key_form(&self) -> bool {
        true
    }
}

impl fmt::Debug for PayloadScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayloadScheme")
            .field("secrets", &self.secrets.len())
            .field("hash", &self.hash)
            .finish()
    }
}

/// Columns never copied into a principal's metadata: the key material, the password hash and
/// every reset or verification token Payload keeps on an auth collection.
const SECRET_COLUMNS: &[&str] = &[
    "api_key",
    "api_key_index",
    "hash",
    "salt",
    "reset_password_token",
    "reset_password_expiration",
    "_verificationtoken",
    "_verification_token",
    "login_attempts",
    "lock_until",
];

/// Where a Payload auth collection keeps its users, as Payload's SQL adapters
/// (`@payloadcms/db-postgres`, `@payloadcms/db-sqlite`) lay it out: one table named after the
/// collection slug, snake_case columns.
///
/// Defaults: table `users`, id `id`, index `api_key_index`, enabled flag `enable_a_p_i_key`
/// when the table has it, no verification column (set [`verify`](Self::verify) when the
/// collection has `auth.verify`), name `email` when the table has it.
///
/// [`PayloadStore`] reads the table's columns when it is built and adapts to them: a table
/// without `enable_a_p_i_key` (Payload 4.0 makes the field optional) authenticates every key whose index
/// is set, as Payload 4.0 does. A column this configuration names explicitly (any setter below)
/// must exist, or building the store fails with an error naming the table and the column.
///
/// ```
/// use keywarden::interop::PayloadTable;
///
/// // The slug in `Authorization: api-keys API-Key …`; the table Payload created for it.
/// let table = PayloadTable::from_slug("api-keys");
/// assert_eq!(table.table(), "api_keys");
/// assert_eq!(table.slug(), "api-keys");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadTable {
    pub(crate) slug: Option<String>,
    pub(crate) table: String,
    pub(crate) id_column: String,
    pub(crate) index_column: String,
    pub(crate) enabled_column: Option<String>,
    pub(crate) verified_column: Option<String>,
    pub(crate) name_column: String,
    pub(crate) hidden_columns: Vec<String>,
    pub(crate) scopes: Vec<String>,
    /// Columns set explicitly, which must exist (the defaults are detected).
    pub(crate) explicit: Explicit,
}

/// Which optional columns the configuration named explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Explicit {
    pub(crate) enabled: bool,
    pub(crate) name: bool,
}

impl Default for PayloadTable {
    fn default() -> Self {
        Self::new("users")
    }
}

impl PayloadTable {
    /// The table `table` as it is named in the database (a schema-qualified `schema.table` is
    /// accepted on PostgreSQL). For a collection without a custom `dbName`, prefer
    /// [`from_slug`](Self::from_slug).
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            slug: None,
            table: table.into(),
            id_column: "id".into(),
            index_column: "api_key_index".into(),
            enabled_column: Some("enable_a_p_i_key".into()),
            verified_column: None,
            name_column: "email".into(),
            hidden_columns: Vec::new(),
            scopes: Vec::new(),
            explicit: Explicit::default(),
        }
    }

    /// The table of the collection `slug`, named as Payload's SQL adapters name it
    /// ([`table_name_for_slug`](Self::table_name_for_slug)): `api-keys` → `api_keys`. The slug is
    /// kept for [`PayloadStore::into_collection`], so it is stated once.
    ///
    /// A collection with a custom `dbName` is stored under that name instead: use
    /// [`new`](Self::new) with it.
    pub fn from_slug(slug: impl Into<String>) -> Self {
        let slug = slug.into();
        let mut table = Self::new(Self::table_name_for_slug(&slug));
        table.slug = Some(slug);
        table
    }

    /// The table name Payload's drizzle-based adapters (`@payloadcms/db-postgres`,
    /// `@payloadcms/db-sqlite`, `@payloadcms/db-vercel-postgres`, `@payloadcms/db-d1-sqlite`)
    /// give the collection `slug` when it has no `dbName`: the `to-snake-case` npm package's
    /// conversion (`createTableName` in `@payloadcms/drizzle`).
    ///
    /// - With whitespace: lowercased, each run of other characters than ASCII letters and digits
    ///   becomes one `_`, leading and trailing ones dropped.
    /// - Else with `-`, `_`, `.` or `:`: the same, and camelCase is *not* split
    ///   (`my-apiKeys` → `my_apikeys`).
    /// - Else camelCase is split before every run of capitals, one `_` before each capital
    ///   (`apiKeys` → `api_keys`, `enableAPIKey` → `enable_a_p_i_key`, `APIKeys` → `a_p_i_keys`).
    /// - Else lowercased (`users`).
    ///
    /// ```
    /// use keywarden::interop::PayloadTable;
    ///
    /// assert_eq!(PayloadTable::table_name_for_slug("api-keys"), "api_keys");
    /// assert_eq!(PayloadTable::table_name_for_slug("apiKeys"), "api_keys");
    /// ```
    pub fn table_name_for_slug(slug: &str) -> String {
        to_snake_case(slug)
    }

    /// Looks the table up in the PostgreSQL schema `schema` (the adapter's `schemaName`; the
    /// connection's `search_path`, usually `public`, by default).
    #[must_use]
    pub fn schema(mut self, schema: &str) -> Self {
        let name = self
            .table
            .rsplit_once('.')
            .map_or(self.table.as_str(), |(_, name)| name);
        self.table = format!("{schema}.{name}");
        self
    }

    /// The id column (default `id`).
    #[must_use]
    pub fn id_column(mut self, column: impl Into<String>) -> Self {
        self.id_column = column.into();
        self
    }

    /// The `apiKeyIndex` column (default `api_key_index`).
    #[must_use]
    pub fn index_column(mut self, column: impl Into<String>) -> Self {
        self.index_column = column.into();
        self
    }

    /// The `enableAPIKey` column: a row authenticates only when it is true. By default
    /// `enable_a_p_i_key` is read when the table has it, and keys are enabled unless their
    /// index is null when it has not (Payload 4.0 makes the field optional). `Some(name)` requires the
    /// column; `None` never reads one.
    #[must_use]
    pub fn enabled_column(mut self, column: Option<&str>) -> Self {
        self.enabled_column = column.map(str::to_owned);
        self.explicit.enabled = true;
        self
    }

    /// Whether the collection has `auth.verify`: rows whose `_verified` is false do not
    /// authenticate (null does, as in Payload, whose query is `_verified != false`).
    #[must_use]
    pub fn verify(mut self, verify: bool) -> Self {
        self.verified_column = verify.then(|| "_verified".to_owned());
        self
    }

    /// The column shown as the key's name (default `email`; the id when null or absent). A
    /// column named here must exist.
    #[must_use]
    pub fn name_column(mut self, column: impl Into<String>) -> Self {
        self.name_column = column.into();
        self.explicit.name = true;
        self
    }

    /// Keeps one more column out of the principal's metadata (the key, its index, the
    /// password hash and salt and Payload's reset and verification tokens always are). The
    /// column must exist, so a misspelt name cannot leave the real one shown.
    #[must_use]
    pub fn hide_column(mut self, column: impl Into<String>) -> Self {
        self.hidden_columns.push(column.into());
        self
    }

    /// Scopes granted to every key of the collection (default none). Payload's own access
    /// control runs in Payload; keywarden cannot evaluate it.
    #[must_use]
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The collection slug: the one given to [`from_slug`](Self::from_slug), else the table
    /// name without its schema.
    pub fn slug(&self) -> &str {
        self.slug.as_deref().unwrap_or_else(|| {
            self.table
                .rsplit_once('.')
                .map_or(self.table.as_str(), |(_, name)| name)
        })
    }

    /// Checks the configuration against the table's columns and settles the detected ones.
    pub(crate) fn resolve(mut self, columns: &Columns) -> Result<Self, StoreError> {
        columns.require(&self.id_column)?;
        columns.require(&self.index_column)?;
        if let Some(column) = &self.verified_column {
            columns.require(column)?;
        }
        for column in &self.hidden_columns {
            columns.require(column)?;
        }
        if self.explicit.name {
            columns.require(&self.name_column)?;
        }
        match &self.enabled_column {
            Some(column) if self.explicit.enabled => columns.require(column)?,
            Some(column) if !columns.has(column) => self.enabled_column = None,
            _ => {}
        }
        Ok(self)
    }

    fn hidden(&self, column: &str) -> bool {
        SECRET_COLUMNS.contains(&column)
            || column == self.index_column
            || self.hidden_columns.iter().any(|c| c == column)
    }

    /// Maps a user row to a record: the principal is the user, its metadata the row's other
    /// fields. A disabled API key or an unverified user is a disabled record.
    pub(crate) fn record(&self, row: &Row) -> Option<KeyRecord> {
        let id = text(row, &self.id_column)?;
        let enabled = self
            .enabled_column
            .as_ref()
            .is_none_or(|c| super::boolean(row, c) == Some(true));
        let verified = self
            .verified_column
            .as_ref()
            .is_none_or(|c| super::boolean(row, c) != Some(false));
        let metadata: serde_json::Map<_, _> = row
            .iter()
            .filter(|(column, _)| !self.hidden(column))
            .map(|(column, value)| (column.clone(), value.clone()))
            .collect();
        let at = |column: &str| super::timestamp(row, column).ok().flatten();
        let created_at = at("created_at").unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Some(KeyRecord {
            id: super::foreign_key_id("payload", &self.table, &id),
            digest: no_digest(),
            secret_id: SecretId::from_bytes([0; 8]),
            display_start: String::new(),
            name: text(row, &self.name_column).unwrap_or_else(|| id.clone()),
            description: None,
            collection: self.table.clone(),
            subject: id,
            owner_kind: OwnerKind::User,
            scopes: self.scopes.clone(),
            environment: "payload".into(),
            read_only: false,
            metadata: serde_json::Value::Object(metadata),
            rate_limit: None,
            allowed_ips: Vec::new(),
            credits: None,
            owner: crate::store::OwnerLimits::default(),
            created_at,
            updated_at: at("updated_at").unwrap_or(created_at),
            expires_at: None,
            last_used_at: None,
            use_count: 0,
            revoked_at: None,
            disabled: !(enabled && verified),
            rotated_from: None,
            encrypted_key: None,
        })
    }
}

pub use store::PayloadStore;

mod store {
    use std::fmt;
    use std::sync::Arc;

    use async_trait::async_trait;
    use uuid::Uuid;

    use super::{PayloadScheme, PayloadTable};
    use crate::interop::sql::{Ident, Pool};
    use crate::layer::Collection;
    use crate::store::{ForeignDigest, ForeignSource, KeyRecord, StoreError, StoreErrorKind};

    /// A read-only [`ForeignSource`] over a Payload auth collection's table, on PostgreSQL
    /// or SQLite. Use it with [`Collection::foreign`](crate::Collection::foreign) and a
    /// [`PayloadScheme`](super::PayloadScheme).
    ///
    /// A key verifies when exactly one row has its `api_key_index`; that row's
    /// `enable_a_p_i_key` must be true (when the table has the column; Payload 4.0 may leave it out)
    /// and, with [`PayloadTable::verify`], its `_verified` must not be false (otherwise
    /// `revoked_key`, "the key is disabled"). Two rows with one
    /// index are refused (logged). The principal: key id a UUIDv8 derived from the table and
    /// user id ([`key_id`](Self::key_id)), subject the user id, name the email, owner kind
    /// `user`, environment `payload`, metadata the row without its secrets, no expiry.
    ///
    /// keywarden never writes to it; [`connect`](Self::connect) also opens the database
    /// read-only. Changes made in Payload (a regenerated or disabled key)
    /// reach a layer when its cache entry expires (the layer's `cache_ttl`, 60 s by default),
    /// or at once with [`ApiKeyLayer::invalidate_key`](crate::ApiKeyLayer::invalidate_key).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use keywarden::{ApiKeyLayer, interop::PayloadScheme, interop::PayloadStore, interop::PayloadTable};
    ///
    /// let store = PayloadStore::connect("postgres://payload@localhost/payload", PayloadTable::from_slug("users")).await?;
    /// let scheme = PayloadScheme::new(std::env::var("PAYLOAD_SECRET")?)?;
    /// let layer = ApiKeyLayer::builder()
    ///     .collection(store.into_collection(scheme))
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Clone)]
    pub struct PayloadStore {
        pool: Pool,
        table: PayloadTable,
        table_ident: Ident,
        index_ident: Ident,
    }

    impl PayloadStore {
        /// Opens `url` (`postgres://…` or `sqlite://…`) read-only and reads the table's columns
        /// (see [`PayloadTable`] for what is detected).
        ///
        /// # Errors
        /// [`StoreErrorKind::Unavailable`] if the database cannot be opened;
        /// [`StoreErrorKind::Schema`] for a table or column name that is not an identifier, a
        /// table that does not exist, or a column the configuration names that the table
        /// lacks (the message names the table and the column).
        pub async fn connect(url: &str, table: PayloadTable) -> Result<Self, StoreError> {
            Self::new(Pool::connect_read_only(url).await?, table).await
        }

        /// Over an existing SQLite pool (Payload's `@payloadcms/db-sqlite` database).
        ///
        /// # Errors
        /// As [`connect`](Self::connect), but for opening the database.
        #[cfg(feature = "sqlite")]
        pub async fn sqlite(
            pool: sqlx::SqlitePool,
            table: PayloadTable,
        ) -> Result<Self, StoreError> {
            Self::new(Pool::Sqlite(pool), table).await
        }

        /// Over an existing PostgreSQL pool (Payload's `@payloadcms/db-postgres` database).
        ///
        /// # Errors
        /// As [`connect`](Self::connect), but for opening the database.
        #[cfg(feature = "postgres")]
        pub async fn postgres(pool: sqlx::PgPool, table: PayloadTable) -> Result<Self, StoreError> {
            Self::new(Pool::Postgres(pool), table).await
        }

        async fn new(pool: Pool, table: PayloadTable) -> Result<Self, StoreError> {
            for column in [&table.id_column, &table.name_column]
                .into_iter()
                .chain(&table.enabled_column)
                .chain(&table.verified_column)
                .chain(&table.hidden_columns)
            {
                Ident::column(column)?;
            }
            let table_ident = Ident::table(&table.table)?;
            let index_ident = Ident::column(&table.index_column)?;
            let columns = pool.require_table(&table.table).await?;
            Ok(Self {
                pool,
                table_ident,
                index_ident,
                table: table.resolve(&columns)?,
            })
        }

        /// The flag column read for `enableAPIKey`, as settled when the store was built:
        /// `None` when the table has none (a Payload 4.0 collection without it) or the configuration turned it off.
        pub fn enabled_column(&self) -> Option<&str> {
            self.table.enabled_column.as_deref()
        }

        /// A foreign collection of this store's slug ([`PayloadTable::slug`]) verified with
        /// `scheme`: the slug is stated once, in the [`PayloadTable`].
        pub fn into_collection(self, scheme: PayloadScheme) -> Collection {
            let slug = self.table.slug().to_owned();
            Collection::foreign(slug, scheme, Arc::new(self))
        }

        /// The key id of the principals of this Payload user.
        pub fn key_id(&self, user_id: &str) -> Uuid {
            crate::interop::foreign_key_id("payload", &self.table.table, user_id)
        }
    }

    impl fmt::Debug for PayloadStore {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("PayloadStore")
                .field("backend", &self.pool.backend())
                .field("table", &self.table.table)
                .field("enabled_column", &self.table.enabled_column)
                .finish_non_exhaustive()
        }
    }

    #[async_trait]
    impl ForeignSource for PayloadStore {
        async fn find(&self, digests: &[ForeignDigest]) -> Result<Option<KeyRecord>, StoreError> {
            if digests.is_empty() {
                return Ok(None);
            }
            let values: Vec<&str> = digests.iter().map(ForeignDigest::as_str).collect();
            let rows = self
                .pool
                .rows_where_in(&self.table_ident, &self.index_ident, &values, 2)
                .await?;
            match rows.as_slice() {
                [] => Ok(None),
                [row] => self.table.record(row).map(Some).ok_or_else(|| {
                    StoreError::new(
                        StoreErrorKind::Corrupt,
                        format!(
                            "a row of `{}` has no `{}`",
                            self.table.table, self.table.id_column
                        ),
                    )
                }),
                _ => {
                    tracing::warn!(
                        target: "keywarden",
                        table = %self.table.table,
                        "several Payload users share one API-key index; refusing the key"
                    );
                    Ok(None)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "keywarden-payload-test-secret";
    const PREVIOUS: &str = "previous-payload-secret";
    const UUID_KEY: &str = "0f8b4a7c-3d2e-4b1a-9c5d-6e7f8a9b0c1d";
    const ANY_KEY: &str = "any string key!";

    // Vectors computed independently with Python's hashlib/hmac and cross-checked with
    // Node's crypto (the runtime Payload uses):
    //   d = hashlib.sha256(secret.encode()).hexdigest()[:32]
    //   hmac.new(d.encode(), key.encode(), hashlib.sha1 / hashlib.sha256).hexdigest()
    const KAT: &[(&str, &str, &str, &str, &str)] = &[
        (
            SECRET,
            "ce557bf55941d710f1047c8353f730e3",
            UUID_KEY,
            "596fc9b22e006464366d4a95a53cd83f875972dc",
            "3e22257417e566a5847df3dea458a0ad2342aab92834d6676f5a55af96c1c726",
        ),
        (
            SECRET,
            "ce557bf55941d710f1047c8353f730e3",
            ANY_KEY,
            "65c2ce556b17d2fb19da5bf27e20595b9e19149a",
            "ba40f34f9a546afd5c9314f0d0751d55fd3ff1cc23712389e8e4daa420a2575e",
        ),
        (
            PREVIOUS,
            "1ffe527349d22b65ec22ab2cb60c24cd",
            UUID_KEY,
            "dc7267fe9207f181768d4cac3efae69976d7852e",
            "a86fd7437f6c29687facafd0ad8f42b277e5b8dd73c2876aed04b71027116ea0",
        ),
    ];

    #[test]
    fn derived_secret_matches_payload() {
        for (secret, derived, ..) in KAT {
            assert_eq!(derive_secret(secret.as_bytes()).as_str(), *derived);
        }
    }

    #[test]
    fn known_answers_for_each_hash() {
        for (secret, _, key, sha1, sha256) in KAT {
            let scheme = PayloadScheme::new(secret).unwrap();
            let got: Vec<_> = scheme
                .clone()
                .hash(PayloadHash::Sha1)
                .digests(key.as_bytes())
                .iter()
                .map(|d| d.as_str().to_owned())
                .collect();
            assert_eq!(got, vec![*sha1]);
            let got = scheme
                .clone()
                .hash(PayloadHash::Sha256)
                .digests(key.as_bytes());
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].as_str(), *sha256);
            assert_eq!(got[0].algorithm(), "hmac-sha256");
            let both: Vec<_> = scheme
                .digests(key.as_bytes())
                .iter()
                .map(|d| d.as_str().to_owned())
                .collect();
            assert_eq!(both, vec![*sha256, *sha1]);
        }
    }

    #[test]
    fn keyring_looks_up_every_secret_current_first() {
        let scheme = PayloadScheme::new(SECRET)
            .unwrap()
            .with_previous(PREVIOUS)
            .unwrap()
            .hash(PayloadHash::Sha256);
        let got: Vec<_> = scheme
            .digests(UUID_KEY.as_bytes())
            .iter()
            .map(|d| d.as_str().to_owned())
            .collect();
        assert_eq!(got, vec![KAT[0].4, KAT[2].4]);
    }

    #[test]
    fn empty_secret_is_refused_and_debug_is_redacted() {
        assert_eq!(PayloadScheme::new("").unwrap_err(), PayloadSchemeError);
        let scheme = PayloadScheme::new(SECRET).unwrap();
        let text = format!("{scheme:?}");
        assert!(
            !text.contains(SECRET) && !text.contains("ce557bf5"),
            "{text}"
        );
    }

    /// Table names as `@payloadcms/drizzle`'s `createTableName` derives them from a slug with
    /// `to-snake-case`; the expected values follow that package's rules (and `enableAPIKey` →
    /// `enable_a_p_i_key` is a column name Payload's adapters really create).
    #[test]
    fn table_names_follow_payloads_to_snake_case() {
        for (slug, table) in [
            // kebab-case, the slugs of Payload's docs and templates
            ("users", "users"),
            ("api-keys", "api_keys"),
            ("service-accounts-v2", "service_accounts_v2"),
            // camelCase: a `_` before each capital of a run
            ("apiKeys", "api_keys"),
            ("enableAPIKey", "enable_a_p_i_key"),
            ("APIKeys", "a_p_i_keys"),
            ("v2Keys", "v2_keys"),
            ("Users", "users"),
            // snake_case and other separators; with one, camelCase is not split
            ("api_keys", "api_keys"),
            ("service.accounts", "service_accounts"),
            ("my-apiKeys", "my_apikeys"),
            ("-api--keys-", "api_keys"),
            ("_internal", "internal"),
            ("api keys", "api_keys"),
        ] {
            assert_eq!(PayloadTable::table_name_for_slug(slug), table, "{slug}");
        }
    }

    #[test]
    fn slug_constructor_keeps_the_slug_and_takes_a_schema() {
        let table = PayloadTable::from_slug("api-keys");
        assert_eq!((table.table(), table.slug()), ("api_keys", "api-keys"));
        // `@payloadcms/db-postgres`'s `schemaName`.
        let table = table.schema("payload");
        assert_eq!(
            (table.table(), table.slug()),
            ("payload.api_keys", "api-keys")
        );
        assert_eq!(table.schema("other").table(), "other.api_keys");
        // A custom `dbName`: the table as named; the slug defaults to it, schema left off.
        let table = PayloadTable::new("payload.members");
        assert_eq!(
            (table.table(), table.slug()),
            ("payload.members", "members")
        );
    }

    fn user(enabled: serde_json::Value, verified: serde_json::Value) -> Row {
        json!({
            "id": 7,
            "email": "ada@example.com",
            "enable_a_p_i_key": enabled,
            "_verified": verified,
            "api_key": "0011aabb-encrypted",
            "api_key_index": KAT[0].4,
            "hash": "pbkdf2-hash",
            "salt": "salt",
            "reset_password_token": "reset",
            "role": "editor",
            "created_at": "2024-05-01T10:00:00.000Z",
        })
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn rows_map_to_principals_without_secrets() {
        let table = PayloadTable::new("users").scopes(["content:read"]);
        let record = table.record(&user(json!(true), json!(null))).unwrap();
        assert_eq!(record.subject, "7");
        assert_eq!(record.name, "ada@example.com");
        assert_eq!(record.environment, "payload");
        assert_eq!(record.scopes, vec!["content:read"]);
        assert!(!record.disabled);
        assert_eq!(
            record.id,
            super::super::foreign_key_id("payload", "users", "7")
        );
        assert_eq!(record.metadata["role"], "editor");
        assert_eq!(record.metadata["email"], "ada@example.com");
        for hidden in [
            "api_key",
            "api_key_index",
            "hash",
            "salt",
            "reset_password_token",
        ] {
            assert!(record.metadata.get(hidden).is_none(), "{hidden}");
        }
        let text = record.metadata.to_string();
        assert!(
            !text.contains("encrypted") && !text.contains(KAT[0].4),
            "{text}"
        );
    }

    #[test]
    fn disabled_keys_and_unverified_users_are_disabled() {
        let plain = PayloadTable::new("users");
        let verify = PayloadTable::new("users").verify(true);
        let cases = [
            (json!(true), json!(null), false, false),
            (json!(1), json!(1), false, false),
            (json!(false), json!(true), true, true),
            (json!(0), json!(true), true, true),
            (json!(null), json!(true), true, true),
            (json!(true), json!(false), false, true),
            (json!(true), json!(0), false, true),
        ];
        for (enabled, verified, plain_disabled, verify_disabled) in cases {
            let row = user(enabled.clone(), verified.clone());
            assert_eq!(
                plain.record(&row).unwrap().disabled,
                plain_disabled,
                "{enabled} {verified}"
            );
            assert_eq!(
                verify.record(&row).unwrap().disabled,
                verify_disabled,
                "{enabled} {verified}"
            );
        }
        let no_flag = PayloadTable::new("users").enabled_column(None);
        assert!(
            !no_flag
                .record(&user(json!(false), json!(null)))
                .unwrap()
                .disabled
        );
    }
}
