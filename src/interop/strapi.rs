//! Strapi API tokens: the digest scheme, the table layout, and the read-only store.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha512;
use time::OffsetDateTime;

use super::sql::Pool;
use super::{no_digest, text, Row};
use crate::secret::SecretId;
use crate::store::{ForeignDigest, ForeignScheme, StoreError, StoreErrorKind};
use crate::store::{KeyRecord, OwnerKind};

/// The scopes of full-access and read-only tokens: every Strapi action (`api::…`, `plugin::…`).
const STRAPI_WILDCARDS: [&str; 2] = ["api::*", "plugin::*"];

/// Whether `token` has the shape of a Strapi API token: 256 lowercase hex characters
/// (`crypto.randomBytes(128).toString('hex')`). Strapi stores no other kind.
pub fn is_strapi_token(token: &[u8]) -> bool {
    token.len() == 256 && token.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A `StrapiScheme` could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the Strapi API-token salt is empty (Strapi refuses to start without one)")]
pub struct StrapiSchemeError;

/// How Strapi (v4 and v5) stores API tokens: `access_key` = lowercase hex HMAC-SHA512 of the
/// token, keyed with the `admin.apiToken.salt` setting (`API_TOKEN_SALT`) as UTF-8 text.
///
/// Only tokens of Strapi's shape ([`is_strapi_token`]) are looked up; anything else (a JWT of
/// Strapi's users-permissions plugin, say) costs no HMAC and no query. `Debug` never shows the
/// salt.
///
/// ```
/// use keywarden::interop::StrapiScheme;
///
/// let scheme = StrapiScheme::new("keywarden-strapi-salt==").unwrap();
/// let token = "0123456789abcdef".repeat(16);
/// assert_eq!(
///     &scheme.digests(token.as_bytes())[0].as_str()[..16],
///     "1e848c3f08b2d4d7"
/// );
/// ```
#[derive(Clone)]
pub struct StrapiScheme {
    mac: Box<Hmac<Sha512>>,
}

impl StrapiScheme {
    /// A scheme for the deployment's API-token salt.
    ///
    /// # Errors
    /// [`StrapiSchemeError`] for an empty salt.
    pub fn new(salt: impl AsRef<[u8]>) -> Result<Self, StrapiSchemeError> {
        let salt = salt.as_ref();
        if salt.is_empty() {
            return Err(StrapiSchemeError);
        }
        Ok(Self {
            mac: Box::new(Hmac::new_from_slice(salt).expect("HMAC accepts any key length")),
        })
    }

    /// The `access_key` the token is stored under, or nothing for a string that cannot be a
    /// Strapi token.
    pub fn digests(&self, token: &[u8]) -> Vec<ForeignDigest> {
        if !is_strapi_token(token) {
            return Vec::new();
        }
        let mut mac = Hmac::clone(&self.mac);
        mac.update(token);
        vec![ForeignDigest::from_mac(
            "hmac-sha512",
            &mac.finalize().into_bytes(),
        )]
    }
}

impl ForeignScheme for StrapiScheme {
    fn issuer(&self) -> &'static str {
        "strapi"
    }

    fn digests(&self, key: &[u8]) -> Vec<ForeignDigest> {
        StrapiScheme::digests(self, key)
    }

    /// Strapi's tokens ([`is_strapi_token`]) are claimed from `Bearer` in optional mode.
    fn claims_bearer(&self, token: &[u8]) -> bool {
        is_strapi_token(token)
    }
}

impl fmt::Debug for StrapiScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StrapiScheme([redacted])")
    }
}

/// Strapi 5's permission link table.
const LINKS_V5: &str = "strapi_api_token_permissions_token_lnk";
/// Strapi 4's permission link table.
const LINKS_V4: &str = "strapi_api_token_permissions_token_links";

/// Where Strapi keeps API tokens and their custom permissions.
///
/// Defaults: tokens in `strapi_api_tokens` (hash `access_key`, type `type`, expiry
/// `expires_at`, kind `kind`), permissions in `strapi_api_token_permissions` (`action`) linked
/// through Strapi 5's `strapi_api_token_permissions_token_lnk` or Strapi 4's
/// `strapi_api_token_permissions_token_links` (`api_token_permission_id`, `api_token_id`).
/// Unqualified default tables are looked up in the tokens table's schema.
///
/// [`StrapiStore`] reads the tables' columns when it is built and adapts: the link table is
/// whichever of the two exists (both or neither is an error); without a `kind` column (before
/// Strapi 5.45) every token is a content-API token; without `expires_at` tokens never expire.
/// A table or column named here explicitly must exist, or building the store fails with an
/// error naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrapiTables {
    pub(crate) tokens: String,
    pub(crate) access_key_column: String,
    pub(crate) type_column: String,
    pub(crate) expires_at_column: Option<String>,
    pub(crate) kind_column: Option<String>,
    pub(crate) permissions: Option<String>,
    pub(crate) action_column: String,
    pub(crate) links: Option<String>,
    pub(crate) link_permission_column: String,
    pub(crate) link_token_column: String,
    explicit: Explicit,
}

/// Which optional columns the configuration named explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Explicit {
    expires_at: bool,
    kind: bool,
}

impl Default for StrapiTables {
    fn default() -> Self {
        Self {
            tokens: "strapi_api_tokens".into(),
            access_key_column: "access_key".into(),
            type_column: "type".into(),
            expires_at_column: Some("expires_at".into()),
            kind_column: Some("kind".into()),
            permissions: None,
            action_column: "action".into(),
            links: None,
            link_permission_column: "api_token_permission_id".into(),
            link_token_column: "api_token_id".into(),
            explicit: Explicit::default(),
        }
    }
}

impl StrapiTables {
    /// Strapi's layout, the version (4 or 5, with or without `kind`) detected when the store
    /// is built.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tokens table (default `strapi_api_tokens`; `schema.table` accepted on PostgreSQL).
    #[must_use]
    pub fn tokens(mut self, table: impl Into<String>) -> Self {
        self.tokens = table.into();
        self
    }

    /// The hashed token column (default `access_key`).
    #[must_use]
    pub fn access_key_column(mut self, column: impl Into<String>) -> Self {
        self.access_key_column = column.into();
        self
    }

    /// The token type column (default `type`).
    #[must_use]
    pub fn type_column(mut self, column: impl Into<String>) -> Self {
        self.type_column = column.into();
        self
    }

    /// The expiry column (default `expires_at` when the table has it). A column named here
    /// must exist.
    #[must_use]
    pub fn expires_at_column(mut self, column: impl Into<String>) -> Self {
        self.expires_at_column = Some(column.into());
        self.explicit.expires_at = true;
        self
    }

    /// The token kind column of Strapi 5.45+ (default `kind` when the table has it; older
    /// schemas have none, and every token is a content-API token). A column named here must
    /// exist.
    #[must_use]
    pub fn kind_column(mut self, column: impl Into<String>) -> Self {
        self.kind_column = Some(column.into());
        self.explicit.kind = true;
        self
    }

    /// The permissions table (default `strapi_api_token_permissions`).
    #[must_use]
    pub fn permissions(mut self, table: impl Into<String>) -> Self {
        self.permissions = Some(table.into());
        self
    }

    /// The permission link table (default: Strapi 5's or Strapi 4's, whichever exists).
    #[must_use]
    pub fn links(mut self, table: impl Into<String>) -> Self {
        self.links = Some(table.into());
        self
    }

    /// The tokens table name.
    pub fn tokens_table(&self) -> &str {
        &self.tokens
    }

    /// `name` in the tokens table's schema, for the default tables.
    fn beside_tokens(&self, name: &str) -> String {
        match self.tokens.rsplit_once('.') {
            Some((schema, _)) => format!("{schema}.{name}"),
            None => name.to_owned(),
        }
    }

    /// Checks the configuration against the database's tables and settles the detected ones.
    pub(crate) async fn resolve(mut self, pool: &Pool) -> Result<Self, StoreError> {
        let tokens = pool.require_table(&self.tokens).await?;
        tokens.require("id")?;
        tokens.require(&self.access_key_column)?;
        tokens.require(&self.type_column)?;
        for (column, explicit) in [
            (&mut self.expires_at_column, self.explicit.expires_at),
            (&mut self.kind_column, self.explicit.kind),
        ] {
            match column {
                Some(name) if explicit => tokens.require(name)?,
                Some(name) if !tokens.has(name) => *column = None,
                _ => {}
            }
        }
        let permissions = match self.permissions.take() {
            Some(table) => table,
            None => self.beside_tokens("strapi_api_token_permissions"),
        };
        let columns = pool.require_table(&permissions).await?;
        columns.require("id")?;
        columns.require(&self.action_column)?;
        self.permissions = Some(permissions);
        let (links, columns) = match self.links.take() {
            Some(table) => {
                let columns = pool.require_table(&table).await?;
                (table, columns)
            }
            None => {
                let v5 = self.beside_tokens(LINKS_V5);
                let v4 = self.beside_tokens(LINKS_V4);
                match (pool.columns(&v5).await?, pool.columns(&v4).await?) {
                    (Some(columns), None) => (v5, columns),
                    (None, Some(columns)) => (v4, columns),
                    (found_v5, _) => {
                        let what = if found_v5.is_some() {
                            "both"
                        } else {
                            "neither"
                        };
                        return Err(StoreError::new(
                            StoreErrorKind::Schema,
                            format!(
                                "{what} of the permission link tables `{v5}` (Strapi 5) and `{v4}` \
                                 (Strapi 4) exist; name the one to read with `StrapiTables::links`"
                            ),
                        ));
                    }
                }
            }
        };
        columns.require(&self.link_permission_column)?;
        columns.require(&self.link_token_column)?;
        self.links = Some(links);
        Ok(self)
    }

    /// Maps a token row. `None` for a token this layer must not accept at all: an admin token
    /// (Strapi 5.45+ `kind` other than `content-api`; null is a pre-5.45 content-API token).
    /// `Err` for a row that cannot be read (an unparseable expiry): fail closed.
    pub(crate) fn record(&self, row: &Row) -> Result<Option<(KeyRecord, TokenType)>, &'static str> {
        let Some(id) = text(row, "id") else {
            return Err("a token row has no id");
        };
        let kind = self.kind_column.as_ref().and_then(|c| text(row, c));
        match kind.as_deref() {
            None | Some("content-api") => {}
            Some(_) => return Ok(None),
        }
        let token_type = match text(row, &self.type_column).as_deref() {
            Some("read-only") => TokenType::ReadOnly,
            Some("full-access") => TokenType::FullAccess,
            Some("custom") => TokenType::Custom,
            _ => TokenType::Unknown,
        };
        let expires_at = match &self.expires_at_column {
            Some(column) => {
                super::timestamp(row, column).map_err(|()| "a token's expiry cannot be read")?
            }
            None => None,
        };
        let at = |column: &str| super::timestamp(row, column).ok().flatten();
        let created_at = at("created_at").unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let metadata: serde_json::Map<_, _> = row
            .iter()
            .filter(|(column, _)| {
                **column != self.access_key_column && column.as_str() != "encrypted_key"
            })
            .map(|(column, value)| (column.clone(), value.clone()))
            .collect();
        let record = KeyRecord {
            id: super::foreign_key_id("strapi", &self.tokens, &id),
            digest: no_digest(),
            secret_id: SecretId::from_bytes([0; 8]),
            display_start: String::new(),
            name: text(row, "name").unwrap_or_else(|| id.clone()),
            description: text(row, "description").filter(|d| !d.is_empty()),
            collection: self.tokens.clone(),
            subject: id,
            owner_kind: OwnerKind::Service,
            scopes: match token_type {
                // Every content-API and plugin action, as in Strapi; not `*`, which would
                // also grant the application's own scopes (`billing:admin`) in a layer that
                // serves keywarden keys beside Strapi tokens.
                TokenType::ReadOnly | TokenType::FullAccess => {
                    STRAPI_WILDCARDS.iter().map(|s| (*s).to_owned()).collect()
                }
                TokenType::Custom | TokenType::Unknown => Vec::new(),
            },
            environment: "strapi".into(),
            read_only: token_type == TokenType::ReadOnly,
            metadata: serde_json::Value::Object(metadata),
            rate_limit: None,
            allowed_ips: Vec::new(),
            credits: None,
            owner: crate::store::OwnerLimits::default(),
            created_at,
            updated_at: at("updated_at").unwrap_or(created_at),
            expires_at,
            last_used_at: at("last_used_at"),
            use_count: 0,
            revoked_at: None,
            // Fail closed on a type this version does not know.
            disabled: token_type == TokenType::Unknown,
            rotated_from: None,
            encrypted_key: None,
        };
        Ok(Some((record, token_type)))
    }
}

/// A Strapi token type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenType {
    ReadOnly,
    FullAccess,
    Custom,
    Unknown,
}

pub use store::StrapiStore;

mod store {
    use std::fmt;

    use async_trait::async_trait;
    use uuid::Uuid;

    use super::{StrapiTables, TokenType};
    use crate::interop::sql::{Ident, Pool};
    use crate::store::{ForeignDigest, ForeignSource, KeyRecord, StoreError, StoreErrorKind};

    /// A read-only [`ForeignSource`] over Strapi's API-token tables, on PostgreSQL or SQLite.
    /// Use it with [`Collection::foreign`](crate::Collection::foreign) and a
    /// [`StrapiScheme`](super::StrapiScheme).
    ///
    /// The token whose `access_key` matches becomes a principal: key id a UUIDv8 derived from
    /// the token id ([`key_id`](Self::key_id)), subject the token id, name and description the
    /// token's, owner kind `service`, environment `strapi`, metadata the row without
    /// `access_key` and `encrypted_key`, expiry `expires_at` (judged at request time: an
    /// expired token is `expired_key`). Types:
    /// - `full-access`: scopes `api::*` and `plugin::*` (every Strapi action, but none of the
    ///   application's own scopes, as `*` would);
    /// - `read-only`: the same and read-only (only GET, HEAD, OPTIONS, TRACE; Strapi allows
    ///   only `find` and `findOne`);
    /// - `custom`: one scope per permission, the Strapi action UID verbatim
    ///   (`api::article.article.find`; a permission holding `*` is ignored); protect routes with
    ///   [`RequireScopeLayer`](crate::RequireScopeLayer) naming those actions;
    /// - any other type: disabled (fail closed).
    ///
    /// With Strapi 5.45+'s `kind` column, only content-API tokens (`content-api`, or null for
    /// tokens created before the column) are accepted; admin tokens are `invalid_key`.
    ///
    /// keywarden never writes to it: `last_used_at` is not updated
    /// (Strapi updates it at most hourly itself); [`connect`](Self::connect) opens the
    /// database read-only. A token revoked or regenerated in Strapi stops working when the
    /// layer's cache entry expires (`cache_ttl`, 60 s by default) or at once with
    /// [`ApiKeyLayer::invalidate_key`](crate::ApiKeyLayer::invalidate_key).
    #[derive(Clone)]
    pub struct StrapiStore {
        pool: Pool,
        tables: StrapiTables,
        tokens: Ident,
        access_key: Ident,
        permissions_sql: String,
    }

    impl StrapiStore {
        /// Opens `url` (`postgres://…` or `sqlite://…`) read-only and reads the tables' columns
        /// (see [`StrapiTables`] for what is detected).
        ///
        /// # Errors
        /// [`StoreErrorKind::Unavailable`] if the database cannot be opened;
        /// [`StoreErrorKind::Schema`] for a table or column name that is not an identifier, a
        /// table that does not exist, a column the configuration names that its table lacks
        /// (the message names both), or a database with both or neither link tables.
        pub async fn connect(url: &str, tables: StrapiTables) -> Result<Self, StoreError> {
            Self::new(Pool::connect_read_only(url).await?, tables).await
        }

        /// Over an existing SQLite pool.
        ///
        /// # Errors
        /// As [`connect`](Self::connect), but for opening the database.
        #[cfg(feature = "sqlite")]
        pub async fn sqlite(
            pool: sqlx::SqlitePool,
            tables: StrapiTables,
        ) -> Result<Self, StoreError> {
            Self::new(Pool::Sqlite(pool), tables).await
        }

        /// Over an existing PostgreSQL pool.
        ///
        /// # Errors
        /// As [`connect`](Self::connect), but for opening the database.
        #[cfg(feature = "postgres")]
        pub async fn postgres(
            pool: sqlx::PgPool,
            tables: StrapiTables,
        ) -> Result<Self, StoreError> {
            Self::new(Pool::Postgres(pool), tables).await
        }

        async fn new(pool: Pool, tables: StrapiTables) -> Result<Self, StoreError> {
            Ident::column(&tables.type_column)?;
            for column in tables.expires_at_column.iter().chain(&tables.kind_column) {
                Ident::column(column)?;
            }
            for table in tables.permissions.iter().chain(&tables.links) {
                Ident::table(table)?;
            }
            Ident::table(&tables.tokens)?;
            Ident::column(&tables.access_key_column)?;
            let tables = tables.resolve(&pool).await?;
            // `resolve` settles both tables.
            let permissions = tables.permissions.as_deref().unwrap_or_default();
            let links = tables.links.as_deref().unwrap_or_default();
            let permissions_sql = format!(
                "SELECT p.{action} FROM {permissions} AS p JOIN {links} AS l \
                 ON l.{link_permission} = p.\"id\" WHERE l.{link_token} = {bind} \
                 ORDER BY p.{action}",
                action = Ident::column(&tables.action_column)?,
                permissions = Ident::table(permissions)?,
                links = Ident::table(links)?,
                link_permission = Ident::column(&tables.link_permission_column)?,
                link_token = Ident::column(&tables.link_token_column)?,
                bind = pool.placeholder(1),
            );
            Ok(Self {
                tokens: Ident::table(&tables.tokens)?,
                access_key: Ident::column(&tables.access_key_column)?,
                permissions_sql,
                pool,
                tables,
            })
        }

        /// The permission link table read, as detected (Strapi 5's `…_token_lnk` or Strapi 4's
        /// `…_token_links`) or configured.
        pub fn links_table(&self) -> &str {
            self.tables.links.as_deref().unwrap_or_default()
        }

        /// The `kind` column read, as detected (Strapi 5.45+) or configured; `None` when the
        /// table has none and every token is a content-API token.
        pub fn kind_column(&self) -> Option<&str> {
            self.tables.kind_column.as_deref()
        }

        /// The key id of the principals of this Strapi token.
        pub fn key_id(&self, token_id: &str) -> Uuid {
            crate::interop::foreign_key_id("strapi", &self.tables.tokens, token_id)
        }
    }

    impl fmt::Debug for StrapiStore {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("StrapiStore")
                .field("backend", &self.pool.backend())
                .field("tokens", &self.tables.tokens)
                .field("links", &self.tables.links)
                .field("kind_column", &self.tables.kind_column)
                .finish_non_exhaustive()
        }
    }

    #[async_trait]
    impl ForeignSource for StrapiStore {
        async fn find(&self, digests: &[ForeignDigest]) -> Result<Option<KeyRecord>, StoreError> {
            if digests.is_empty() {
                return Ok(None);
            }
            let values: Vec<&str> = digests.iter().map(ForeignDigest::as_str).collect();
            let rows = self
                .pool
                .rows_where_in(&self.tokens, &self.access_key, &values, 2)
                .await?;
            let row = match rows.as_slice() {
                [] => return Ok(None),
                [row] => row,
                _ => {
                    tracing::warn!(
                        target: "keywarden",
                        table = %self.tables.tokens,
                        "several Strapi tokens share one access key; refusing the token"
                    );
                    return Ok(None);
                }
            };
            let corrupt = |message: &str| StoreError::new(StoreErrorKind::Corrupt, message);
            let Some((mut record, token_type)) = self.tables.record(row).map_err(corrupt)? else {
                return Ok(None);
            };
            if token_type == TokenType::Custom {
                let id: i64 = record
                    .subject
                    .parse()
                    .map_err(|_| corrupt("a custom token's id is not an integer"))?;
                // Strapi's action UIDs never hold `*`: a row that does was not written by
                // Strapi, and must not become a keywarden wildcard.
                let mut scopes = self.pool.strings(&self.permissions_sql, id).await?;
                let before = scopes.len();
                scopes.retain(|action| !action.contains('*'));
                if scopes.len() < before {
                    tracing::warn!(
                        target: "keywarden",
                        token = id,
                        "a Strapi token's permission holds `*`, which no Strapi action does: ignored"
                    );
                }
                record.scopes = scopes;
            }
            Ok(Some(record))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SALT: &str = "keywarden-strapi-salt==";

    // Computed independently with Python:
    //   hmac.new(salt.encode(), token.encode(), hashlib.sha512).hexdigest()
    const KAT: &[(&str, &str)] = &[
        (
            "0123456789abcdef",
            "1e848c3f08b2d4d77ba5df2789905ff304f6b66528c16865c11742cc26ed41d0\
             c851bae5262b905fa75b86dd4b40a40325295e523f0061fbdecf6551dae0d4ba",
        ),
        (
            "ffffffffffffffff",
            "87daa535d29e1e950fd5ac80ab5375a1714a448ba72fdc71dcc0f0fe011b2889\
             dd30fc6b41c7a0a5153515b37f33ffc597aef18f75654e9a3097963bf835a4bd",
        ),
    ];

    #[test]
    fn known_answers() {
        let scheme = StrapiScheme::new(SALT).unwrap();
        for (unit, access_key) in KAT {
            let token = unit.repeat(16);
            let got = scheme.digests(token.as_bytes());
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].as_str(), *access_key);
            assert_eq!(got[0].algorithm(), "hmac-sha512");
        }
    }

    #[test]
    fn only_strapi_shaped_tokens_are_digested() {
        let scheme = StrapiScheme::new(SALT).unwrap();
        let good = "ab".repeat(128);
        assert!(is_strapi_token(good.as_bytes()));
        for bad in [
            "ab".repeat(127),
            "ab".repeat(129),
            "AB".repeat(128),
            format!("{}g", "a".repeat(255)),
            "eyJhbGciOiJIUzI1NiJ9.e30.sig".to_owned(),
        ] {
            assert!(!is_strapi_token(bad.as_bytes()), "{bad}");
            assert!(scheme.digests(bad.as_bytes()).is_empty());
        }
        assert_eq!(StrapiScheme::new("").unwrap_err(), StrapiSchemeError);
        assert_eq!(format!("{scheme:?}"), "StrapiScheme([redacted])");
    }

    fn token(kind: serde_json::Value, kind_present: bool, token_type: &str) -> Row {
        let mut row = json!({
            "id": 3,
            "document_id": "x1y2",
            "name": "ci",
            "description": "",
            "type": token_type,
            "access_key": KAT[0].1,
            "encrypted_key": "v1:encrypted",
            "expires_at": 1_893_553_445_123_i64,
            "lifespan": 604_800_000,
            "created_at": 1_700_000_000_000_i64,
        })
        .as_object()
        .unwrap()
        .clone();
        if kind_present {
            row.insert("kind".into(), kind);
        }
        row
    }

    #[test]
    fn types_map_to_scopes_and_read_only() {
        let tables = StrapiTables::default();
        let (full, t) = tables
            .record(&token(json!(null), false, "full-access"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (full.scopes.clone(), full.read_only, t),
            (
                vec!["api::*".to_owned(), "plugin::*".to_owned()],
                false,
                TokenType::FullAccess
            )
        );
        let (read, _) = tables
            .record(&token(json!(null), false, "read-only"))
            .unwrap()
            .unwrap();
        assert!(read.read_only && read.scopes == vec!["api::*", "plugin::*"]);
        let (custom, t) = tables
            .record(&token(json!(null), false, "custom"))
            .unwrap()
            .unwrap();
        assert!(custom.scopes.is_empty() && t == TokenType::Custom && !custom.disabled);
        let (odd, _) = tables
            .record(&token(json!(null), false, "super-admin"))
            .unwrap()
            .unwrap();
        assert!(odd.disabled, "unknown types fail closed");
        assert_eq!(full.subject, "3");
        assert_eq!(full.name, "ci");
        assert_eq!(full.description, None);
        assert_eq!(full.environment, "strapi");
        assert_eq!(
            full.expires_at,
            Some(time::macros::datetime!(2030-01-02 03:04:05.123 UTC))
        );
        assert!(full.metadata.get("access_key").is_none());
        assert!(full.metadata.get("encrypted_key").is_none());
        assert_eq!(full.metadata["document_id"], "x1y2");
    }

    #[test]
    fn only_content_api_tokens_are_accepted() {
        let tables = StrapiTables::default();
        for (kind, present, accepted) in [
            (json!(null), false, true),
            (json!(null), true, true),
            (json!("content-api"), true, true),
            (json!("admin"), true, false),
            (json!("something-else"), true, false),
        ] {
            let got = tables
                .record(&token(kind.clone(), present, "full-access"))
                .unwrap();
            assert_eq!(got.is_some(), accepted, "{kind} {present}");
        }
    }

    #[test]
    fn unreadable_expiry_fails_closed() {
        let mut row = token(json!(null), false, "full-access");
        row.insert("expires_at".into(), json!("next tuesday"));
        assert!(StrapiTables::default().record(&row).is_err());
    }
}
