//! The application secret ring and HMAC-SHA256 key digests.
//!
//! Keys are stored only as `HMAC-SHA256(secret, key)`. The ring holds one current secret and any
//! number of previous ones, so the application secret can be rotated without invalidating a
//! single key: lookups try the current secret first, then the previous ones, and a key found
//! under a previous secret is re-digested under the current one.
//!
//! [`Digest`] equality is constant-time. Stores and caches use the digest as a lookup key (a
//! hash map, a B-tree index), which is not constant-time; that is no timing oracle on the key,
//! because the attacker cannot steer the digest of a guess towards a stored one: see
//! `SECURITY.md` at the repository root.
//!
//! ```
//! use keywarden::{Secret, SecretRing};
//!
//! let old = Secret::new("an-old-secret-of-at-least-32-bytes!!").unwrap();
//! let new = Secret::new("the-new-secret-of-at-least-32-bytes!").unwrap();
//! let before = SecretRing::new(old.clone());
//! let after = SecretRing::new(new).with_previous(old);
//!
//! let key = b"kw_live_example";
//! let stored = before.digest(key);
//! // After rotation the key is still found under the previous secret.
//! assert!(after.previous_digests(key).any(|(_, d)| d == stored));
//! assert_ne!(after.digest(key), stored);
//! ```

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

type HmacSha256 = Hmac<Sha256>;

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// Environment variable holding the current secret.
pub const SECRET_ENV: &str = "KEYWARDEN_SECRET";
/// Environment variable holding previous secrets, comma-separated.
pub const PREVIOUS_SECRETS_ENV: &str = "KEYWARDEN_PREVIOUS_SECRETS";

/// Why a secret or secret ring could not be built. Never contains secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The secret is shorter than [`MIN_SECRET_LEN`] bytes.
    #[error("secret is {len} bytes; at least {MIN_SECRET_LEN} are required")]
    TooShort {
        /// The length that was given.
        len: usize,
    },
    /// The environment variable is not set.
    #[error("environment variable {0} is not set (generate one with `keywarden secret generate`)")]
    Missing(&'static str),
    /// The environment variable is not valid Unicode.
    #[error("environment variable {0} is not valid UTF-8")]
    NotUnicode(&'static str),
}

/// An application secret. `Debug` prints a redaction; the bytes are zeroized on drop.
#[derive(Clone)]
pub struct Secret {
    bytes: Zeroizing<Vec<u8>>,
}

impl Secret {
    /// Wraps secret bytes (the UTF-8 bytes of a string secret are used as they are).
    ///
    /// # Errors
    /// [`SecretError::TooShort`] below [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, SecretError> {
        let bytes = Zeroizing::new(bytes.into());
        if bytes.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort { len: bytes.len() });
        }
        Ok(Self { bytes })
    }

    /// Generates a secret of 256 random bits written as 43 base62 characters, suitable for
    /// `KEYWARDEN_SECRET`.
    ///
    /// # Panics
    /// If the operating system cannot provide randomness.
    pub fn generate() -> Self {
        let mut random = [0u8; 32];
        getrandom::fill(&mut random).expect("the OS random number generator failed");
        let mut text = [0u8; crate::key::BODY_LEN];
        crate::key::encode_256(&random, &mut text);
        random.zeroize();
        let secret = Self {
            bytes: Zeroizing::new(text.to_vec()),
        };
        text.zeroize();
        secret
    }

    /// The secret's bytes. Only for writing a freshly generated secret to its configuration.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    /// The fingerprint stored beside each digest made with this secret.
    pub fn id(&self) -> SecretId {
        PreparedSecret::new(self).id
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A short public fingerprint of a secret: the first 8 bytes of
/// `HMAC-SHA256(secret, "keywarden secret id v1")`, shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretId([u8; 8]);

impl SecretId {
    /// The fingerprint's bytes.
    pub fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }

    /// Rebuilds an id from its bytes (as read from storage).
    pub fn from_bytes(bytes: [u8; 8]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for SecretId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for SecretId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretId({self})")
    }
}

impl std::str::FromStr for SecretId {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 8];
        decode_hex(s, &mut out)?;
        Ok(Self(out))
    }
}

/// A 32-byte HMAC-SHA256 digest of a key. Equality is constant-time.
#[derive(Clone, Copy, Eq)]
pub struct Digest([u8; 32]);

impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The first 8 bytes of an HMAC output are already uniformly distributed, and nobody
        // without the secret can choose digests that collide in them, so hashing those alone
        // (one `write_u64` instead of 32 bytes plus a length) loses nothing and runs the
        // cache's SipHash over a fifth of the input. Consistent with `eq`: equal digests have
        // equal bytes.
        state.write_u64(u64::from_le_bytes(
            self.0[..8].try_into().expect("8 of 32 bytes"),
        ));
    }
}

impl Digest {
    /// Wraps digest bytes (as read from storage).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl PartialEq for Digest {
    /// Constant-time: the four 64-bit words are XORed and ORed together with no early exit,
    /// and only the final word goes through `subtle` (one `black_box` instead of 32).
    fn eq(&self, other: &Self) -> bool {
        let word = |d: &[u8; 32], i: usize| {
            u64::from_ne_bytes(d[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        let diff = (0..4).fold(0u64, |acc, i| acc | (word(&self.0, i) ^ word(&other.0, i)));
        diff.ct_eq(&0).into()
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Enough to tell digests apart in logs, not enough to be useful to anyone else.
        write!(
            f,
            "Digest({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        decode_hex(s, &mut out)?;
        Ok(Self(out))
    }
}

/// A hex digest or secret id of the wrong length or alphabet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid hex value")]
pub struct DigestParseError;

fn decode_hex(s: &str, out: &mut [u8]) -> Result<(), DigestParseError> {
    let s = s.as_bytes();
    if s.len() != out.len() * 2 {
        return Err(DigestParseError);
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(DigestParseError),
    };
    for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Ok(())
}

/// A secret whose HMAC key schedule has been computed once; the raw secret is not kept.
#[derive(Clone)]
struct PreparedSecret {
    id: SecretId,
    mac: HmacSha256,
}

impl PreparedSecret {
    fn new(secret: &Secret) -> Self {
        let mac = HmacSha256::new_from_slice(&secret.bytes).expect("HMAC accepts any key length");
        let mut id_mac = mac.clone();
        id_mac.update(b"keywarden secret id v1");
        let full = id_mac.finalize().into_bytes();
        let mut id = [0u8; 8];
        id.copy_from_slice(&full[..8]);
        Self {
            id: SecretId(id),
            mac,
        }
    }

    fn digest(&self, key: &[u8]) -> Digest {
        let mut mac = self.mac.clone();
        mac.update(key);
        Digest(mac.finalize().into_bytes().into())
    }
}

/// The current secret and any previous ones, each with its HMAC state prepared once.
#[derive(Clone)]
pub struct SecretRing {
    current: PreparedSecret,
    previous: Vec<PreparedSecret>,
}

impl SecretRing {
    /// A ring with only a current secret.
    pub fn new(current: Secret) -> Self {
        Self {
            current: PreparedSecret::new(&current),
            previous: Vec::new(),
        }
    }

    /// Adds a previous secret: keys digested under it still verify and are re-digested under
    /// the current secret on first use. A secret equal to the current one is ignored.
    #[must_use]
    pub fn with_previous(mut self, previous: Secret) -> Self {
        let prepared = PreparedSecret::new(&previous);
        if prepared.id != self.current.id && !self.previous.iter().any(|p| p.id == prepared.id) {
            self.previous.push(prepared);
        }
        self
    }

    /// Reads `KEYWARDEN_SECRET` and the optional comma-separated `KEYWARDEN_PREVIOUS_SECRETS`.
    ///
    /// # Errors
    /// [`SecretError::Missing`] if `KEYWARDEN_SECRET` is unset, [`SecretError::TooShort`] for
    /// any secret under 32 bytes, [`SecretError::NotUnicode`] for non-UTF-8 values.
    pub fn from_env() -> Result<Self, SecretError> {
        let read = |name: &'static str| match std::env::var(name) {
            Ok(v) => Ok(Some(Zeroizing::new(v))),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(SecretError::NotUnicode(name)),
        };
        let current = read(SECRET_ENV)?.ok_or(SecretError::Missing(SECRET_ENV))?;
        let previous = read(PREVIOUS_SECRETS_ENV)?;
        Self::from_strs(&current, previous.as_deref().map(|s| s.as_str()))
    }

    /// Builds a ring from a current secret and an optional comma-separated list of previous
    /// ones, as they appear in the environment. Empty list items are ignored.
    ///
    /// # Errors
    /// [`SecretError::TooShort`] for any secret under 32 bytes.
    pub fn from_strs(current: &str, previous: Option<&str>) -> Result<Self, SecretError> {
        let mut ring = Self::new(Secret::new(current.as_bytes())?);
        for item in previous.unwrap_or("").split(',').map(str::trim) {
            if !item.is_empty() {
                ring = ring.with_previous(Secret::new(item.as_bytes())?);
            }
        }
        Ok(ring)
    }

    /// The current secret's id.
    pub fn current_id(&self) -> SecretId {
        self.current.id
    }

    /// The ids of the previous secrets, most recent first.
    pub fn previous_ids(&self) -> impl Iterator<Item = SecretId> + '_ {
        self.previous.iter().map(|p| p.id)
    }

    /// The key's digest under the current secret: one HMAC from the prepared state.
    pub fn digest(&self, key: &[u8]) -> Digest {
        self.current.digest(key)
    }

    /// The key's digests under each previous secret, with the secret's id.
    pub fn previous_digests<'a>(
        &'a self,
        key: &'a [u8],
    ) -> impl Iterator<Item = (SecretId, Digest)> + 'a {
        self.previous.iter().map(move |p| (p.id, p.digest(key)))
    }

    /// Whether the ring holds previous secrets.
    pub fn has_previous(&self) -> bool {
        !self.previous.is_empty()
    }
}

impl fmt::Debug for SecretRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretRing")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|p| p.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(
            Secret::new("short").unwrap_err(),
            SecretError::TooShort { len: 5 }
        );
        assert!(Secret::new(&A.as_bytes()[..31]).is_err());
        assert!(Secret::new(A).is_ok());
        assert!(SecretRing::from_strs(A, Some("tooshort")).is_err());
    }

    #[test]
    fn digest_matches_an_independent_reference() {
        // HMAC-SHA256(key = A, message = "kw_live_x"), computed with Python's hmac module.
        let ring = SecretRing::new(Secret::new(A).unwrap());
        assert_eq!(
            ring.digest(b"kw_live_x").to_hex(),
            "f5a4c6f31c39df09e5cbaa2a615ee339f89d6baf7ea55412dfd17728ece8b3e6"
        );
    }

    #[test]
    fn prepared_state_is_reused_without_drift() {
        let ring = SecretRing::new(Secret::new(A).unwrap());
        let first = ring.digest(b"key-one");
        let _ = ring.digest(b"something else");
        assert_eq!(first, ring.digest(b"key-one"));
        assert_ne!(first, ring.digest(b"key-two"));
    }

    #[test]
    fn ring_orders_current_then_previous_and_ignores_duplicates() {
        let ring = SecretRing::from_strs(B, Some(&format!("{A}, ,{B},{A}"))).unwrap();
        let b_id = Secret::new(B).unwrap().id();
        let a_id = Secret::new(A).unwrap().id();
        assert_eq!(ring.current_id(), b_id);
        assert_eq!(ring.previous_ids().collect::<Vec<_>>(), vec![a_id]);
        let old = SecretRing::new(Secret::new(A).unwrap()).digest(b"k");
        assert_eq!(
            ring.previous_digests(b"k").collect::<Vec<_>>(),
            vec![(a_id, old)]
        );
    }

    #[test]
    fn debug_output_never_contains_secret_material() {
        let secret = Secret::new(A).unwrap();
        let ring = SecretRing::new(secret.clone()).with_previous(Secret::new(B).unwrap());
        for text in [format!("{secret:?}"), format!("{ring:?}")] {
            assert!(!text.contains(A) && !text.contains(B), "{text}");
            assert!(!text.contains("0123456789"), "{text}");
        }
        assert_eq!(secret.id().to_string().len(), 16);
    }

    #[test]
    fn generated_secrets_are_long_enough_and_distinct() {
        let a = Secret::generate();
        let b = Secret::generate();
        assert_eq!(a.expose().len(), 43);
        assert!(Secret::new(a.expose().to_vec()).is_ok());
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn digest_equality_sees_every_byte_and_hash_agrees_with_it() {
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        let a = SecretRing::new(Secret::new(A).unwrap()).digest(b"x");
        assert_eq!(a, Digest::from_bytes(*a.as_bytes()));
        assert_eq!(
            state.hash_one(a),
            state.hash_one(Digest::from_bytes(*a.as_bytes()))
        );
        for i in 0..32 {
            for bit in [0x01u8, 0x80] {
                let mut b = *a.as_bytes();
                b[i] ^= bit;
                assert_ne!(a, Digest::from_bytes(b), "byte {i} bit {bit:#x}");
            }
        }
        let b = SecretRing::new(Secret::new(A).unwrap()).digest(b"y");
        assert_ne!(state.hash_one(a), state.hash_one(b));
    }

    #[test]
    fn hex_roundtrips() {
        let d = SecretRing::new(Secret::new(A).unwrap()).digest(b"x");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!("zz".parse::<Digest>().is_err());
        let id = Secret::new(A).unwrap().id();
        assert_eq!(id.to_string().parse::<SecretId>().unwrap(), id);
    }

    /// Two words that differ by the same XOR pattern cancel out if the words' differences are
    /// combined with `^` instead of `|`: the compare must still see them.
    #[test]
    fn equal_differences_in_two_words_do_not_cancel() {
        let a = SecretRing::new(Secret::new(A).unwrap()).digest(b"x");
        for (first, second) in [(0, 8), (0, 24), (8, 16), (16, 24), (7, 31)] {
            for bit in [0x01u8, 0x10, 0x80] {
                let mut b = *a.as_bytes();
                b[first] ^= bit;
                b[second] ^= bit;
                assert_ne!(a, Digest::from_bytes(b), "bytes {first} and {second}");
            }
        }
        // Four words with the same difference cancel under `^` too.
        let mut b = *a.as_bytes();
        for word in 0..4 {
            b[word * 8 + 3] ^= 0x5a;
        }
        assert_ne!(a, Digest::from_bytes(b));
    }

    /// Uppercase hex (as a database or an operator may write it) parses to the same value.
    #[test]
    fn hex_parsing_accepts_either_case_and_nothing_else() {
        let d = SecretRing::new(Secret::new(A).unwrap()).digest(b"x");
        let upper = d.to_hex().to_ascii_uppercase();
        assert_ne!(upper, d.to_hex(), "the digest has letters");
        assert_eq!(upper.parse::<Digest>().unwrap(), d);
        let every_nibble = "0123456789abcdefABCDEF0123456789fedcbaFEDCBA0123456789aAbBcCdDeE";
        let parsed = every_nibble.parse::<Digest>().unwrap();
        assert_eq!(parsed.to_hex(), every_nibble.to_ascii_lowercase());
        let id = Secret::new(A).unwrap().id();
        assert_eq!(
            id.to_string()
                .to_ascii_uppercase()
                .parse::<SecretId>()
                .unwrap(),
            id
        );
        assert_eq!(
            "ABCDEF0123456789".parse::<SecretId>().unwrap().as_bytes(),
            &[0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89]
        );
        for bad in [
            "0123456789abcdeg",
            "0123456789abcdeG",
            "0123456789abcde",
            "0123456789abcdef0",
            "0123456789abcde/",
            "0123456789abcde:",
            "0123456789abcde@",
            "0123456789abcde`",
        ] {
            assert!(bad.parse::<SecretId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_and_display_show_fingerprints_only() {
        let d = Digest::from_bytes([0xab; 32]);
        assert_eq!(format!("{d:?}"), "Digest(abababab…)");
        assert_eq!(d.to_hex(), "ab".repeat(32));
        let id = SecretId::from_bytes([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(id.to_string(), "0123456789abcdef");
        assert_eq!(format!("{id:?}"), "SecretId(0123456789abcdef)");
        assert_eq!(
            id.as_bytes(),
            &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]
        );

        let (a, b) = (Secret::new(A).unwrap(), Secret::new(B).unwrap());
        let alone = SecretRing::new(a.clone());
        assert!(!alone.has_previous());
        assert_eq!(alone.current_id(), a.id());
        let ring = alone.with_previous(b.clone());
        assert!(ring.has_previous());
        assert_eq!(
            format!("{ring:?}"),
            format!(
                "SecretRing {{ current: {:?}, previous: [{:?}] }}",
                a.id(),
                b.id()
            )
        );
        assert!(!SecretRing::new(a.clone()).with_previous(a).has_previous());
    }

    proptest::proptest! {
        /// Digest equality holds exactly when the bytes are equal, also for inputs that
        /// differ in several words at once.
        #[test]
        fn digests_are_equal_exactly_when_their_bytes_are(
            a in proptest::array::uniform32(proptest::prelude::any::<u8>()),
            flips in proptest::collection::vec((0usize..32, 1u8..=255), 0..4),
        ) {
            let mut b = a;
            for (i, bit) in flips {
                b[i] ^= bit;
            }
            proptest::prop_assert_eq!(Digest::from_bytes(a) == Digest::from_bytes(b), a == b);
            proptest::prop_assert_eq!(Digest::from_bytes(b) == Digest::from_bytes(a), a == b);
        }

        #[test]
        fn hex_roundtrips_in_either_case(a in proptest::array::uniform32(proptest::prelude::any::<u8>())) {
            let d = Digest::from_bytes(a);
            proptest::prop_assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
            proptest::prop_assert_eq!(d.to_hex().to_ascii_uppercase().parse::<Digest>().unwrap(), d);
        }
    }
}
