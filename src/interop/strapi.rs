//! Strapi API tokens: the digest scheme, the table layout, and the read-only store.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha512;
use time::OffsetDateTime;

use super::{no_digest, text, Row};
use crate::secret::SecretId;
use crate::store::{ForeignDigest, ForeignScheme};
use crate::store::{KeyRecord, OwnerKind};

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

/// Where Strapi keeps API tokens and their custom permissions.
///
/// Defaults (Strapi 5): tokens in `strapi_api_tokens` (hash `access_key`, type `type`, expiry
/// `expires_at`, kind `kind`), permissions in `strapi_api_token_permissions` (`action`) linked
/// through `strapi_api_token_permissions_token_lnk` (`api_token_permission_id`,
/// `api_token_id`). [`StrapiTables::v4`] has Strapi 4's link table
/// (`strapi_api_token_permissions_token_links`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrapiTables {
    pub(crate) tokens: String,
    pub(crate) access_key_column: String,
    pub(crate) type_column: String,
    pub(crate) expires_at_column: String,
    pub(crate) kind_column: String,
    pub(crate) permissions: String,
    pub(crate) action_column: String,
    pub(crate) links: String,
    pub(crate) link_permission_column: String,
    pub(crate) link_token_column: String,
}

impl Default for StrapiTables {
    fn default() -> Self {
        Self {
            tokens: "strapi_api_tokens".into(),
            access_key_column: "access_key".into(),
            type_column: "type".into(),
            expires_at_column: "expires_at".into(),
            kind_column: "kind".into(),
            permissions: "strapi_api_token_permissions".into(),
            action_column: "action".into(),
            links: "strapi_api_token_permissions_token_lnk".into(),
            link_permission_column: "api_token_permission_id".into(),
            link_token_column: "api_token_id".into(),
        }
    }
}

impl StrapiTables {
    /// Strapi 5's layout (the default).
    pub fn v5() -> Self {
        Self::default()
    }

    /// Strapi 4's layout: the permission link table is `…_token_links`.
    pub fn v4() -> Self {
        Self::default().links("strapi_api_token_permissions_token_links")
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

    /// The expiry column (default `expires_at`).
    #[must_use]
    pub fn expires_at_column(mut self, column: impl Into<String>) -> Self {
        self.expires_at_column = column.into();
        self
    }

    /// The token kind column of Strapi 5.45+ (default `kind`; absent in older schemas, where
    /// every token is a content-API token).
    #[must_use]
    pub fn kind_column(mut self, column: impl Into<String>) -> Self {
        self.kind_column = column.into();
        self
    }

    /// The permissions table (default `strapi_api_token_permissions`).
    #[must_use]
    pub fn permissions(mut self, table: impl Into<String>) -> Self {
        self.permissions = table.into();
        self
    }

    /// The permission link table.
    #[must_use]
    pub fn links(mut self, table: impl Into<String>) -> Self {
        self.links = table.into();
        self
    }

    /// The tokens table name.
    pub fn tokens_table(&self) -> &str {
        &self.tokens
    }

    /// Maps a token row. `None` for a token this layer must not accept at all: an admin token
    /// (Strapi 5.45+ `kind` other than `content-api`; null is a pre-5.45 content-API token).
    /// `Err` for a row that cannot be read (an unparseable expiry): fail closed.
    pub(crate) fn record(&self, row: &Row) -> Result<Option<(KeyRecord, TokenType)>, &'static str> {
        let Some(id) = text(row, "id") else {
            return Err("a token row has no id");
        };
        match text(row, &self.kind_column).as_deref() {
            None | Some("content-api") => {}
            Some(_) => return Ok(None),
        }
        let token_type = match text(row, &self.type_column).as_deref() {
            Some("read-only") => TokenType::ReadOnly,
            Some("full-access") => TokenType::FullAccess,
            Some("custom") => TokenType::Custom,
            _ => TokenType::Unknown,
        };
        let expires_at = super::timestamp(row, &self.expires_at_column)
            .map_err(|()| "a token's expiry cannot be read")?;
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
                TokenType::ReadOnly | TokenType::FullAccess => vec!["*".into()],
                TokenType::Custom | TokenType::Unknown => Vec::new(),
            },
            environment: "strapi".into(),
            read_only: token_type == TokenType::ReadOnly,
            metadata: serde_json::Value::Object(metadata),
            rate_limit: None,
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
    /// - `full-access`: scope `*`;
    /// - `read-only`: scope `*` and read-only (only GET, HEAD, OPTIONS, TRACE; Strapi allows
    ///   only `find` and `findOne`);
    /// - `custom`: one scope per permission, the Strapi action UID verbatim
    ///   (`api::article.article.find`); protect routes with
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
        /// Opens `url` (`postgres://…` or `sqlite://…`) read-only.
        ///
        /// # Errors
        /// [`StoreErrorKind::Unavailable`] if the database cannot be opened,
        /// [`StoreErrorKind::Schema`] for a table or column name that is not an identifier.
        pub async fn connect(url: &str, tables: StrapiTables) -> Result<Self, StoreError> {
            Self::new(Pool::connect_read_only(url).await?, tables)
        }

        /// Over an existing SQLite pool.
        ///
        /// # Errors
        /// [`StoreErrorKind::Schema`] for a table or column name that is not an identifier.
        #[cfg(feature = "sqlite")]
        pub fn sqlite(pool: sqlx::SqlitePool, tables: StrapiTables) -> Result<Self, StoreError> {
            Self::new(Pool::Sqlite(pool), tables)
        }

        /// Over an existing PostgreSQL pool.
        ///
        /// # Errors
        /// [`StoreErrorKind::Schema`] for a table or column name that is not an identifier.
        #[cfg(feature = "postgres")]
        pub fn postgres(pool: sqlx::PgPool, tables: StrapiTables) -> Result<Self, StoreError> {
            Self::new(Pool::Postgres(pool), tables)
        }

        fn new(pool: Pool, tables: StrapiTables) -> Result<Self, StoreError> {
            Ident::column(&tables.type_column)?;
            Ident::column(&tables.expires_at_column)?;
            Ident::column(&tables.kind_column)?;
            let permissions_sql = format!(
                "SELECT p.{action} FROM {permissions} AS p JOIN {links} AS l \
                 ON l.{link_permission} = p.\"id\" WHERE l.{link_token} = {bind} \
                 ORDER BY p.{action}",
                action = Ident::column(&tables.action_column)?,
                permissions = Ident::table(&tables.permissions)?,
                links = Ident::table(&tables.links)?,
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
                record.scopes = self.pool.strings(&self.permissions_sql, id).await?;
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
            (vec!["*".to_owned()], false, TokenType::FullAccess)
        );
        let (read, _) = tables
            .record(&token(json!(null), false, "read-only"))
            .unwrap()
            .unwrap();
        assert!(read.read_only && read.scopes == vec!["*"]);
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
