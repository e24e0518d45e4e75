//! Keys another system issued and keeps in its own tables: the two small traits through which
//! the core verifies them, without knowing the system.
//!
//! A [`ForeignScheme`] turns a presented key into the digests the issuer stores (no I/O); a
//! [`ForeignSource`] finds the issuer's row for one of those digests. The layer pairs them in
//! [`Collection::foreign`](crate::Collection::foreign); the `interop` feature implements both
//! for Payload CMS and Strapi.

use std::fmt;

use async_trait::async_trait;

use super::{KeyRecord, StoreError};

/// A key's digest as another system stores it: lowercase hex, labelled with the algorithm that
/// made it. Equality is constant-time; `Debug` shows only the label and the first 8 characters.
#[derive(Clone, Eq)]
pub struct ForeignDigest {
    algorithm: &'static str,
    hex: Box<str>,
}

impl ForeignDigest {
    /// The lowercase hex form of `mac`, labelled `algorithm` (e.g. `hmac-sha256`).
    pub fn from_mac(algorithm: &'static str, mac: &[u8]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(mac.len() * 2);
        for byte in mac {
            hex.push(char::from(HEX[usize::from(byte >> 4)]));
            hex.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
        Self {
            algorithm,
            hex: hex.into_boxed_str(),
        }
    }

    /// The label of the algorithm that made it.
    pub fn algorithm(&self) -> &'static str {
        self.algorithm
    }

    /// The lowercase hex form, as the issuer stores it.
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
        let shown = self.hex.get(..8).unwrap_or("");
        write!(f, "ForeignDigest({}, {shown}…)", self.algorithm)
    }
}

/// How another system digests its keys. Computing digests does no I/O.
pub trait ForeignScheme: Send + Sync + fmt::Debug + 'static {
    /// The issuer's name (`payload`, `strapi`): the environment of its principals, and what
    /// the management API names when it refuses to manage them.
    fn issuer(&self) -> &'static str;

    /// The digests under which the issuer may have stored `key`, most likely first. Empty
    /// when the issuer cannot have issued this key, so no store query is made for it.
    fn digests(&self, key: &[u8]) -> Vec<ForeignDigest>;

    /// Whether `Authorization: <slug> API-Key <key>` must be matched as the issuer does:
    /// byte-exactly (Payload). Default: no, keywarden's lenient match.
    fn exact_api_key_form(&self) -> bool {
        false
    }

    /// Whether a `Bearer` token without keywarden's prefix is one of the issuer's keys, so an
    /// optional layer verifies it rather than leaving it to another layer. Default: never.
    fn claims_bearer(&self, token: &[u8]) -> bool {
        let _ = token;
        false
    }
}

/// Where another system keeps its keys: finds the row of one of a key's foreign digests.
/// Read-only: keywarden never writes to it (no usage, no migration, no management).
#[async_trait]
pub trait ForeignSource: Send + Sync + fmt::Debug + 'static {
    /// The record whose stored digest is one of `digests`, if exactly one row has it.
    ///
    /// # Errors
    /// [`StoreErrorKind::Unavailable`](super::StoreErrorKind::Unavailable) and the like, as
    /// [`KeyStore::find_by_digest`](super::KeyStore::find_by_digest).
    async fn find(&self, digests: &[ForeignDigest]) -> Result<Option<KeyRecord>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_truncated_and_equality_compares_both_parts() {
        let d = ForeignDigest::from_mac("hmac-sha1", &[0xab; 20]);
        assert_eq!(d.as_str(), "ab".repeat(20));
        let text = format!("{d:?}");
        assert!(
            text.contains("abababab…") && !text.contains(&"ab".repeat(5)),
            "{text}"
        );
        assert_eq!(d, ForeignDigest::from_mac("hmac-sha1", &[0xab; 20]));
        assert_ne!(d, ForeignDigest::from_mac("hmac-sha256", &[0xab; 20]));
        assert_ne!(d, ForeignDigest::from_mac("hmac-sha1", &[0xac; 20]));
    }
}
