//! Keys issued by other systems: Payload CMS API keys and Strapi API tokens, verified bit-exactly
//! from those systems' own tables, through the same [`ApiKeyLayer`](crate::ApiKeyLayer).
//!
//! A collection is verified either with keywarden's own scheme ([`Collection::new`]: HMAC-SHA256
//! under the layer's [`SecretRing`](crate::SecretRing), keys in the store given to the builder)
//! or with a foreign scheme against a read-only source over the issuer's table
//! ([`Collection::foreign`]): [`PayloadScheme`] with [`PayloadStore`], [`StrapiScheme`] with
//! [`StrapiStore`]. The core knows them only through the
//! [`ForeignScheme`](crate::store::ForeignScheme) and
//! [`ForeignSource`](crate::store::ForeignSource) traits. Foreign keys are opaque strings to keywarden; the request path is
//! the same for both (cache, negative cache, coalesced misses, expiry, read-only keys), except
//! that a foreign store is never written to: no usage write-behind, no lazy migration, and
//! [`KeyManager`](crate::KeyManager) refuses to manage it.
//!
//! What each peer verifies, version by version, and what is not supported, is documented on
//! [`PayloadScheme`], [`PayloadStore`], [`StrapiScheme`] and [`StrapiStore`], and in
//! `docs/interop.md`.
//!
//! ```
//! use keywarden::interop::{PayloadHash, PayloadScheme, StrapiScheme};
//! use keywarden::store::ForeignScheme;
//!
//! // Payload 3.47–3.90 writes HMAC-SHA256 indexes and still finds older HMAC-SHA1 ones.
//! let payload = PayloadScheme::new("the PAYLOAD_SECRET").unwrap().hash(PayloadHash::Both);
//! let digests = payload.digests(b"0f8b4a7c-3d2e-4b1a-9c5d-6e7f8a9b0c1d");
//! assert_eq!(digests.len(), 2);
//!
//! // Strapi: HMAC-SHA512 keyed with the configured salt; tokens are 256 hex characters.
//! let strapi = StrapiScheme::new("the API_TOKEN_SALT").unwrap();
//! assert!(strapi.digests(b"not-a-strapi-token").is_empty());
//! assert_eq!(strapi.digests(&[b'a'; 256])[0].as_str().len(), 128);
//! ```

use time::OffsetDateTime;
use uuid::Uuid;

use crate::secret::Digest;

mod payload;
mod sql;
mod strapi;
mod strapi_actions;

pub use payload::{PayloadHash, PayloadScheme, PayloadSchemeError, PayloadStore, PayloadTable};
pub use strapi::{is_strapi_token, StrapiScheme, StrapiSchemeError, StrapiStore, StrapiTables};
pub use strapi_actions::StrapiContentApi;

#[cfg(doc)]
use crate::layer::Collection;

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

/// The placeholder digest of a foreign record: foreign rows carry no keywarden digest.
pub(crate) fn no_digest() -> Digest {
    Digest::from_bytes([0; 32])
}

/// A row of a foreign table as a JSON object (column name → value).
pub(crate) type Row = serde_json::Map<String, serde_json::Value>;

/// A column as text: strings as they are, numbers written out; `None` for null or absent.
pub(crate) fn text(row: &Row, column: &str) -> Option<String> {
    match row.get(column)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

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
}
