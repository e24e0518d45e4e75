//! Keys issued by other systems: Payload CMS API keys and Strapi API tokens, verified bit-exactly
//! from those systems' own tables, through the same [`ApiKeyLayer`](crate::ApiKeyLayer).
//!
//! A collection is verified either with keywarden's own scheme ([`Collection::new`]: HMAC-SHA256
//! under the layer's [`SecretRing`](crate::SecretRing), keys in the store given to the builder)
//! or with a foreign [`DigestScheme`] against a read-only store over the issuer's table
//! ([`Collection::foreign`]). Foreign keys are opaque strings to keywarden; the request path is
//! the same for both (cache, negative cache, coalesced misses, expiry, read-only keys), except
//! that a foreign store is never written to: no usage write-behind, no lazy migration, and
//! [`KeyManager`](crate::KeyManager) refuses to manage it.
//!
//! What each peer verifies, version by version, and what is not supported, is documented on
//! [`PayloadScheme`], [`PayloadStore`](crate::PayloadStore), [`StrapiScheme`] and
//! [`StrapiStore`](crate::StrapiStore), and in `docs/interop.md`.
//!
//! ```
//! use keywarden::{DigestScheme, PayloadHash, PayloadScheme, StrapiScheme};
//!
//! // Payload 3.47–3.90 writes HMAC-SHA256 indexes and still finds older HMAC-SHA1 ones.
//! let payload = PayloadScheme::new("the PAYLOAD_SECRET").unwrap().hash(PayloadHash::Both);
//! let digests = DigestScheme::from(payload).digests(b"0f8b4a7c-3d2e-4b1a-9c5d-6e7f8a9b0c1d");
//! assert_eq!(digests.len(), 2);
//!
//! // Strapi: HMAC-SHA512 keyed with the configured salt; tokens are 256 hex characters.
//! let strapi = DigestScheme::from(StrapiScheme::new("the API_TOKEN_SALT").unwrap());
//! assert!(strapi.digests(b"not-a-strapi-token").is_empty());
//! assert_eq!(strapi.digests(&[b'a'; 256])[0].as_str().len(), 128);
//! ```

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::cache::Lookup;
use crate::secret::{Digest, SecretId};
use crate::store::{
    KeyPage, KeyPatch, KeyQuery, KeyRecord, KeyStore, KeyUsage, StoreError, StoreErrorKind,
};
use crate::verify::Shared;

mod payload;
#[cfg(feature = "interop")]
mod sql;
mod strapi;

#[cfg(feature = "interop")]
pub use payload::PayloadStore;
pub use payload::{PayloadHash, PayloadScheme, PayloadSchemeError, PayloadTable};
#[cfg(feature = "interop")]
pub use strapi::StrapiStore;
pub use strapi::{is_strapi_token, StrapiScheme, StrapiSchemeError, StrapiTables};

#[cfg(doc)]
use crate::layer::Collection;

/// How a foreign system digests its keys for lookup. keywarden's own scheme is the layer's
/// [`SecretRing`](crate::SecretRing), used by every [`Collection::new`] collection.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum DigestScheme {
    /// Payload CMS: lowercase hex HMAC-SHA1 and/or HMAC-SHA256 under a derived secret.
    Payload(PayloadScheme),
    /// Strapi: lowercase hex HMAC-SHA512 keyed with the API-token salt.
    Strapi(StrapiScheme),
}

impl DigestScheme {
    /// The indexes under which the issuer may have stored `key`, most likely first. Empty
    /// when the issuer cannot have issued this key (a Strapi token is 256 lowercase hex
    /// characters), so no store query is made for it.
    pub fn digests(&self, key: &[u8]) -> Vec<ForeignDigest> {
        match self {
            DigestScheme::Payload(scheme) => scheme.digests(key),
            DigestScheme::Strapi(scheme) => scheme.digests(key),
        }
    }

    /// `payload` or `strapi`: the environment of principals verified with this scheme.
    pub fn issuer(&self) -> &'static str {
        match self {
            DigestScheme::Payload(_) => "payload",
            DigestScheme::Strapi(_) => "strapi",
        }
    }
}

impl From<PayloadScheme> for DigestScheme {
    fn from(scheme: PayloadScheme) -> Self {
        DigestScheme::Payload(scheme)
    }
}

impl From<StrapiScheme> for DigestScheme {
    fn from(scheme: StrapiScheme) -> Self {
        DigestScheme::Strapi(scheme)
    }
}

/// The HMAC that made a [`ForeignDigest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ForeignAlgorithm {
    /// HMAC-SHA1 (Payload 2.x to 3.46): 40 hex characters.
    HmacSha1,
    /// HMAC-SHA256 (Payload 3.47 and later): 64 hex characters.
    HmacSha256,
    /// HMAC-SHA512 (Strapi): 128 hex characters.
    HmacSha512,
}

/// A key's digest as another system stores it: lowercase hex. Equality is constant-time;
/// `Debug` shows only the algorithm and the first 8 characters.
#[derive(Clone, Eq)]
pub struct ForeignDigest {
    algorithm: ForeignAlgorithm,
    hex: Box<str>,
}

impl ForeignDigest {
    pub(crate) fn from_mac(algorithm: ForeignAlgorithm, bytes: &[u8]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            hex.push(HEX[usize::from(b >> 4)] as char);
            hex.push(HEX[usize::from(b & 0x0f)] as char);
        }
        Self {
            algorithm,
            hex: hex.into_boxed_str(),
        }
    }

    /// The HMAC that made it.
    pub fn algorithm(&self) -> ForeignAlgorithm {
        self.algorithm
    }

    /// The lowercase hex digest, as stored by the issuer.
    pub fn as_str(&self) -> &str {
        &self.hex
    }
}

impl PartialEq for ForeignDigest {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.algorithm == other.algorithm
            && bool::from(self.hex.as_bytes().ct_eq(other.hex.as_bytes()))
    }
}

impl std::hash::Hash for ForeignDigest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.algorithm.hash(state);
        self.hex.hash(state);
    }
}

impl fmt::Debug for ForeignDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ForeignDigest({:?}, {}…)",
            self.algorithm,
            &self.hex[..8]
        )
    }
}

/// A collection verified by a foreign scheme against a foreign store.
#[derive(Clone)]
pub(crate) struct ForeignSource {
    pub(crate) slug: Box<str>,
    pub(crate) scheme: DigestScheme,
    pub(crate) store: Arc<dyn KeyStore>,
}

impl fmt::Debug for ForeignSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForeignSource")
            .field("slug", &self.slug)
            .field("issuer", &self.scheme.issuer())
            .field("store", &self.store)
            .finish()
    }
}

/// The layer's foreign collections, in configuration order.
#[derive(Debug, Default)]
pub(crate) struct ForeignSources(Vec<ForeignSource>);

impl ForeignSources {
    pub(crate) fn new(sources: Vec<ForeignSource>) -> Self {
        Self(sources)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The foreign source of this collection, if it is foreign.
    pub(crate) fn get(&self, collection: &str) -> Option<&ForeignSource> {
        self.0.iter().find(|s| *s.slug == *collection)
    }

    /// Whether this collection is verified by a foreign scheme (so its keys live only in
    /// the foreign store, and its uses are never written).
    pub(crate) fn owns(&self, collection: &str) -> bool {
        !self.0.is_empty() && self.get(collection).is_some()
    }
}

/// What a cache miss needs beyond the current digest: digests under previous secrets (lazy
/// migration) and, for keys not in keywarden's format, each foreign scheme's indexes. Computed
/// only on a miss, from the key re-read from the request.
#[derive(Debug, Default)]
pub(crate) struct MissKeys {
    pub(crate) previous: Vec<(SecretId, Digest)>,
    foreign: Vec<(usize, Vec<ForeignDigest>)>,
}

impl MissKeys {
    pub(crate) fn new(shared: &Shared, key: &[u8]) -> Self {
        let previous = if shared.ring.has_previous() {
            shared.ring.previous_digests(key).collect()
        } else {
            Vec::new()
        };
        // A key in keywarden's format is never looked up in a foreign store.
        let foreign = if shared.foreign.is_empty() || shared.format.parse(key).is_ok() {
            Vec::new()
        } else {
            shared
                .foreign
                .0
                .iter()
                .enumerate()
                .map(|(index, source)| (index, source.scheme.digests(key)))
                .filter(|(_, digests)| !digests.is_empty())
                .collect()
        };
        Self { previous, foreign }
    }
}

impl Shared {
    /// After the native store found nothing: each foreign store the key could belong to, in
    /// configuration order. The record is always filed under the collection that found it.
    pub(crate) async fn load_foreign(&self, keys: &MissKeys) -> Result<Lookup, StoreError> {
        for (index, digests) in &keys.foreign {
            let source = &self.foreign.0[*index];
            let found = self.store_call(source.store.find_by_foreign_digest(digests));
            if let Some(mut record) = found.await? {
                record.collection = source.slug.to_string();
                return Ok(Lookup::Found(self.resolved(&record)));
            }
        }
        Ok(Lookup::Missing)
    }
}

#[cfg_attr(not(feature = "interop"), allow(dead_code))] // used by the SQL stores
/// A stable key id for a foreign row: a UUIDv8 from SHA-256 over the issuer, the table and
/// the row id, so cache invalidation by key id works for foreign keys too.
pub(crate) fn foreign_key_id(issuer: &str, table: &str, id: &str) -> Uuid {
    use sha2::{Digest as _, Sha256};
    let mut hash = Sha256::new();
    for part in ["keywarden foreign key id v1", issuer, table, id] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let full = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&full[..16]);
    Uuid::new_v8(bytes)
}

#[cfg_attr(not(feature = "interop"), allow(dead_code))] // used by the SQL stores
/// The placeholder digest of a foreign record: foreign rows carry no keywarden digest.
pub(crate) fn no_digest() -> Digest {
    Digest::from_bytes([0; 32])
}

/// The native store of a layer whose collections are all foreign: finds nothing, refuses
/// every write.
#[derive(Debug, Default)]
pub(crate) struct NoNativeStore;

pub(crate) fn read_only_error(what: &str) -> StoreError {
    StoreError::new(
        StoreErrorKind::ReadOnly,
        format!("{what} is read-only; manage these keys in the system that issued them"),
    )
}

#[async_trait]
impl KeyStore for NoNativeStore {
    async fn insert(&self, _: &KeyRecord) -> Result<(), StoreError> {
        Err(read_only_error("this layer has no keywarden key store: it"))
    }
    async fn find_by_digest(&self, _: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn get(&self, _: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn update(
        &self,
        _: Uuid,
        _: &KeyPatch,
        _: OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        Err(read_only_error("this layer has no keywarden key store: it"))
    }
    async fn add_digest(
        &self,
        _: Uuid,
        _: &Digest,
        _: &Digest,
        _: SecretId,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn delete(&self, _: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        Err(read_only_error("this layer has no keywarden key store: it"))
    }
    async fn list(&self, _: &KeyQuery) -> Result<KeyPage, StoreError> {
        Ok(KeyPage {
            items: Vec::new(),
            next_cursor: None,
        })
    }
    async fn record_usage(&self, _: &[KeyUsage]) -> Result<(), StoreError> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

#[cfg_attr(not(feature = "interop"), allow(dead_code))] // used by the SQL stores
/// A row of a foreign table as a JSON object (column name → value).
pub(crate) type Row = serde_json::Map<String, serde_json::Value>;

#[cfg_attr(not(feature = "interop"), allow(dead_code))] // used by the SQL stores
/// A column as text: strings as they are, numbers written out; `None` for null or absent.
pub(crate) fn text(row: &Row, column: &str) -> Option<String> {
    match row.get(column)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg_attr(not(feature = "interop"), allow(dead_code))] // used by the SQL stores
/// A boolean column as PostgreSQL (`true`/`false`) or SQLite (`1`/`0`) stores it; `None` for
/// null, absent or anything else.
pub(crate) fn boolean(row: &Row, column: &str) -> Option<bool> {
    match row.get(column)? {
        serde_json::Value::Bool(b) => Some(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
        serde_json::Value::String(s) => match s.as_str() {
            "1" | "true" | "t" => Some(true),
            "0" | "false" | "f" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

#[cfg_attr(not(feature = "interop"), allow(dead_code))] // used by the SQL stores
/// A timestamp column: RFC 3339 (PostgreSQL `timestamptz` through `to_jsonb`), an ISO 8601
/// or SQL date-time without offset (read as UTC: PostgreSQL `timestamp`, Payload's SQLite
/// text), or an integer of milliseconds since the epoch (Strapi on SQLite stores dates this
/// way). `Ok(None)` for null or absent; `Err` for anything else.
pub(crate) fn timestamp(row: &Row, column: &str) -> Result<Option<OffsetDateTime>, ()> {
    use time::format_description::well_known::Rfc3339;
    use time::macros::format_description;
    match row.get(column) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => {
            let ms = n.as_i64().ok_or(())?;
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .map(Some)
                .map_err(|_| ())
        }
        Some(serde_json::Value::String(s)) => {
            if let Ok(at) = OffsetDateTime::parse(s, &Rfc3339) {
                return Ok(Some(at));
            }
            // PostgreSQL's `to_jsonb` writes `+00:00`-less values for `timestamp`, SQLite
            // text may use a space; both without an offset mean UTC here.
            let normalized = s.trim_end_matches('Z').replacen(' ', "T", 1);
            let without = format_description!(
                version = 2,
                "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
            );
            time::PrimitiveDateTime::parse(&normalized, &without)
                .map(|at| Some(at.assume_utc()))
                .map_err(|_| ())
        }
        Some(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(value: serde_json::Value) -> Row {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn timestamps_in_every_stored_form() {
        let expected = time::macros::datetime!(2030-01-02 03:04:05.123 UTC);
        for value in [
            json!("2030-01-02T03:04:05.123+00:00"),
            json!("2030-01-02T05:04:05.123+02:00"),
            json!("2030-01-02T03:04:05.123Z"),
            json!("2030-01-02T03:04:05.123"),
            json!("2030-01-02 03:04:05.123"),
            json!(1_893_553_445_123_i64),
        ] {
            let r = row(json!({ "at": value.clone() }));
            assert_eq!(timestamp(&r, "at"), Ok(Some(expected)), "{value}");
        }
        assert_eq!(timestamp(&row(json!({ "at": null })), "at"), Ok(None));
        assert_eq!(timestamp(&row(json!({})), "at"), Ok(None));
        for bad in [json!("tomorrow"), json!(true), json!(1.5), json!([1])] {
            assert_eq!(
                timestamp(&row(json!({ "at": bad.clone() })), "at"),
                Err(()),
                "{bad}"
            );
        }
    }

    #[test]
    fn booleans_as_either_database_stores_them() {
        let r = row(json!({ "a": true, "b": 0, "c": 1, "d": null, "e": 2, "f": "t" }));
        assert_eq!(boolean(&r, "a"), Some(true));
        assert_eq!(boolean(&r, "b"), Some(false));
        assert_eq!(boolean(&r, "c"), Some(true));
        assert_eq!(boolean(&r, "d"), None);
        assert_eq!(boolean(&r, "e"), None);
        assert_eq!(boolean(&r, "f"), Some(true));
        assert_eq!(boolean(&r, "missing"), None);
    }

    #[test]
    fn foreign_key_ids_are_stable_and_distinct() {
        let a = foreign_key_id("payload", "users", "1");
        assert_eq!(a, foreign_key_id("payload", "users", "1"));
        assert_eq!(a.get_version_num(), 8);
        assert_ne!(a, foreign_key_id("strapi", "users", "1"));
        assert_ne!(a, foreign_key_id("payload", "users", "11"));
        // Length-prefixed parts: moving a boundary changes the id.
        assert_ne!(
            foreign_key_id("payload", "users1", ""),
            foreign_key_id("payload", "users", "1")
        );
    }

    #[test]
    fn foreign_digest_debug_is_truncated() {
        let d = ForeignDigest::from_mac(ForeignAlgorithm::HmacSha1, &[0xab; 20]);
        assert_eq!(d.as_str(), "ab".repeat(20));
        let text = format!("{d:?}");
        assert!(
            text.contains("abababab…") && !text.contains(&"ab".repeat(5)),
            "{text}"
        );
    }
}
