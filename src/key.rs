//! The key format: generation, checksum and parsing.
//!
//! A keywarden key is `<prefix>_<body><checksum>`: the body is 256 bits from the OS CSPRNG
//! written as 43 base62 characters, the checksum is the CRC32 (IEEE) of everything before it
//! written as 6 base62 characters. With the default prefixes a key is 57 characters and a secret
//! scanner finds leaked keys with [`KEY_REGEX`].
//!
//! ```
//! use keywarden::{key::KeyFormat, key::KeyPrefix};
//!
//! let prefix = KeyPrefix::new("kw_live").unwrap();
//! let key = prefix.generate();
//! assert_eq!(key.expose().len(), 57);
//!
//! let format = KeyFormat::default();
//! let parsed = format.parse(key.expose().as_bytes()).unwrap();
//! assert_eq!(parsed.environment(), "live");
//!
//! // One changed character breaks the checksum: rejected before any crypto or storage work.
//! let mut tampered = key.expose().to_owned();
//! tampered.replace_range(10..11, if &tampered[10..11] == "a" { "b" } else { "a" });
//! assert!(format.parse(tampered.as_bytes()).is_err());
//! ```

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Width of the random body in base62 characters (256 bits).
pub const BODY_LEN: usize = 43;
/// Width of the CRC32 checksum in base62 characters.
pub const CHECKSUM_LEN: usize = 6;
/// Longest key accepted in any format, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// A regular expression that finds keys with the default prefixes in text (for secret scanners).
pub const KEY_REGEX: &str = r"\bkw_(live|test)_[0-9A-Za-z]{49}\b";

const TAIL_LEN: usize = BODY_LEN + CHECKSUM_LEN;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Characters of a key shown in listings: the prefix, `_` and this many body characters.
const DISPLAY_BODY_CHARS: usize = 4;

/// A plaintext API key.
///
/// It exists only between generation and the moment it is shown to its owner: `Debug` prints a
/// redaction and the bytes are zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ApiKey(String);

impl PartialEq for ApiKey {
    /// Constant-time in the contents (the length is not secret: the format fixes it).
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for ApiKey {}

impl ApiKey {
    /// Wraps a key string (for example one read from a client configuration).
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The plaintext. Show it once to its owner; never log or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The prefix and the first characters of the body, safe to show in listings
    /// (`kw_live_AbC1`). For keys in an opaque format, the first four characters.
    pub fn display_start(&self) -> String {
        display_start(self.0.as_bytes())
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

pub(crate) fn display_start(key: &[u8]) -> String {
    let end = match key.iter().rposition(|&b| b == b'_') {
        Some(underscore) if key.len() - underscore - 1 == TAIL_LEN => {
            underscore + 1 + DISPLAY_BODY_CHARS
        }
        _ => DISPLAY_BODY_CHARS.min(key.len()),
    };
    String::from_utf8_lossy(&key[..end]).into_owned()
}

/// Why a string is not a valid key or prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The prefix is not one this deployment accepts.
    #[error("unknown key prefix")]
    WrongPrefix,
    /// The key has the wrong length.
    #[error("wrong key length")]
    WrongLength,
    /// The key holds a character outside its alphabet.
    #[error("invalid character in key")]
    BadAlphabet,
    /// The checksum does not match: a typo or a truncated key.
    #[error("key checksum mismatch")]
    BadChecksum,
    /// A configured prefix is not lowercase `[a-z][a-z0-9]*` segments joined by `_` with at
    /// least two segments (the last one is the environment).
    #[error("invalid key prefix: expected segments like `kw_live`")]
    InvalidPrefix,
}

/// A key prefix such as `kw_live`: lowercase segments joined by `_`, the environment last.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyPrefix {
    text: Box<str>,
    env_start: usize,
}

impl KeyPrefix {
    /// Validates a prefix.
    ///
    /// # Errors
    /// [`KeyError::InvalidPrefix`] unless the prefix is at least two `[a-z][a-z0-9]*` segments
    /// joined by `_`.
    pub fn new(prefix: &str) -> Result<Self, KeyError> {
        let segments: Vec<&str> = prefix.split('_').collect();
        let valid_segment = |s: &&str| {
            let b = s.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_lowercase()
                && b[1..]
                    .iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        };
        if segments.len() < 2 || !segments.iter().all(valid_segment) || prefix.len() > 64 {
            return Err(KeyError::InvalidPrefix);
        }
        let env_start = prefix.rfind('_').map_or(0, |i| i + 1);
        Ok(Self {
            text: prefix.into(),
            env_start,
        })
    }

    /// The prefix text, e.g. `kw_live`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The environment: the last segment, e.g. `live`.
    pub fn environment(&self) -> &str {
        &self.text[self.env_start..]
    }

    /// Generates a new key with this prefix from the operating system's CSPRNG.
    ///
    /// # Panics
    /// If the operating system cannot provide randomness, which no key should be made without.
    pub fn generate(&self) -> ApiKey {
        let mut random = [0u8; 32];
        getrandom::fill(&mut random).expect("the OS random number generator failed");
        let key = self.key_from_random(&random);
        random.zeroize();
        key
    }

    pub(crate) fn key_from_random(&self, random: &[u8; 32]) -> ApiKey {
        let mut out = String::with_capacity(self.text.len() + 1 + TAIL_LEN);
        out.push_str(&self.text);
        out.push('_');
        let mut body = [0u8; BODY_LEN];
        encode_256(random, &mut body);
        out.push_str(std::str::from_utf8(&body).expect("base62 is ASCII"));
        body.zeroize();
        let mut checksum = [0u8; CHECKSUM_LEN];
        encode_checksum(crc32fast::hash(out.as_bytes()), &mut checksum);
        out.push_str(std::str::from_utf8(&checksum).expect("base62 is ASCII"));
        ApiKey(out)
    }
}

impl fmt::Debug for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("KeyPrefix").field(&self.as_str()).finish()
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for KeyPrefix {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The set of prefixes a deployment accepts; parses and validates keys.
///
/// One prefix may extend another (`kw_live` and `kw_live_eu`): a key is matched against the
/// longest prefix first. That is exact, not a heuristic: the body alphabet has no `_`, so a
/// key of the shorter prefix can never start with the longer prefix followed by `_`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFormat {
    /// In configuration order.
    prefixes: Vec<KeyPrefix>,
    /// The same prefixes, longest first: the order keys are matched in.
    longest_first: Box<[KeyPrefix]>,
    /// The first eight bytes of each of `longest_first` followed by `_`, as a word: a key's
    /// prefix is matched with a masked compare, not a byte-slice compare (a call into libc
    /// on every request) of text in an allocation of its own.
    heads: Box<[PrefixHead]>,
    /// A CRC-32 hasher made once: `crc32fast::hash` makes one per call, and so checks the
    /// CPU's features on every request.
    crc: Crc32,
}

impl fmt::Debug for KeyFormat {
    /// The prefixes; the derived matching state is left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFormat")
            .field("prefixes", &self.prefixes)
            .field("longest_first", &self.longest_first)
            .finish_non_exhaustive()
    }
}

/// An empty CRC-32 hasher, cloned for each checksum. All are equal (they hold no data).
#[derive(Clone)]
struct Crc32(crc32fast::Hasher);

impl Crc32 {
    #[inline]
    fn checksum(&self, bytes: &[u8]) -> u32 {
        let mut hasher = self.0.clone();
        hasher.update(bytes);
        hasher.finalize()
    }
}

impl PartialEq for Crc32 {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Crc32 {}

impl fmt::Debug for Crc32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Crc32")
    }
}

/// The start of a prefix followed by `_`: its first eight bytes (fewer if it is shorter,
/// zero-padded) and the mask of those bytes, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PrefixHead {
    word: u64,
    mask: u64,
}

impl PrefixHead {
    fn of(prefix: &KeyPrefix) -> Self {
        let text = prefix.text.as_bytes();
        let mut word = [0u8; 8];
        let mut mask = [0u8; 8];
        for (i, byte) in text.iter().chain(b"_").take(8).enumerate() {
            word[i] = *byte;
            mask[i] = 0xFF;
        }
        Self {
            word: u64::from_le_bytes(word),
            mask: u64::from_le_bytes(mask),
        }
    }
}

/// A key's first eight bytes as a word, zero-padded when it is shorter.
#[inline]
fn head_word(key: &[u8]) -> u64 {
    match key.first_chunk::<8>() {
        Some(head) => u64::from_le_bytes(*head),
        None => {
            let mut word = [0u8; 8];
            word[..key.len()].copy_from_slice(key);
            u64::from_le_bytes(word)
        }
    }
}

impl Default for KeyFormat {
    /// Accepts `kw_live` and `kw_test`.
    fn default() -> Self {
        Self::from_prefixes(vec![
            KeyPrefix::new("kw_live").expect("valid"),
            KeyPrefix::new("kw_test").expect("valid"),
        ])
    }
}

/// A key that passed the format check; borrows the request's bytes.
#[derive(Debug, Clone, Copy)]
pub struct ParsedKey<'a> {
    prefix: &'a KeyPrefix,
}

impl<'a> ParsedKey<'a> {
    /// The key's prefix.
    pub fn prefix(&self) -> &'a KeyPrefix {
        self.prefix
    }

    /// The environment named by the prefix (`live`, `test`, ...).
    pub fn environment(&self) -> &'a str {
        self.prefix.environment()
    }
}

impl KeyFormat {
    /// A format accepting exactly these prefixes.
    ///
    /// # Errors
    /// [`KeyError::InvalidPrefix`] if the list is empty or holds an invalid prefix.
    pub fn new<I, P>(prefixes: I) -> Result<Self, KeyError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<str>,
    {
        let prefixes = prefixes
            .into_iter()
            .map(|p| KeyPrefix::new(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if prefixes.is_empty() {
            return Err(KeyError::InvalidPrefix);
        }
        Ok(Self::from_prefixes(prefixes))
    }

    fn from_prefixes(prefixes: Vec<KeyPrefix>) -> Self {
        let mut longest_first = prefixes.clone();
        // Stable: prefixes of one length keep their configuration order.
        longest_first.sort_by_key(|p| std::cmp::Reverse(p.text.len()));
        let heads = longest_first.iter().map(PrefixHead::of).collect();
        Self {
            prefixes,
            longest_first: longest_first.into_boxed_slice(),
            heads,
            crc: Crc32(crc32fast::Hasher::new()),
        }
    }

    /// The accepted prefixes, in configuration order.
    pub fn prefixes(&self) -> &[KeyPrefix] {
        &self.prefixes
    }

    /// The accepted prefix whose environment is `env`, if any.
    pub fn prefix_for_env(&self, env: &str) -> Option<&KeyPrefix> {
        self.prefixes.iter().find(|p| p.environment() == env)
    }

    /// Checks prefix, length, alphabet and checksum. Does no allocation and no cryptography.
    ///
    /// # Errors
    /// The first [`KeyError`] found, in that order.
    pub fn parse<'s>(&'s self, key: &[u8]) -> Result<ParsedKey<'s>, KeyError> {
        let prefix = self.matching_prefix(key).ok_or(KeyError::WrongPrefix)?;
        let tail = &key[prefix.text.len() + 1..];
        if tail.len() != TAIL_LEN {
            return Err(KeyError::WrongLength);
        }
        if !all_base62(tail) {
            return Err(KeyError::BadAlphabet);
        }
        let (signed, checksum) = key.split_at(key.len() - CHECKSUM_LEN);
        if decode_checksum(checksum) != Some(self.crc.checksum(signed)) {
            return Err(KeyError::BadChecksum);
        }
        Ok(ParsedKey { prefix })
    }

    /// Whether the key starts with one of our prefixes and `_`: such a key is ours to judge,
    /// malformed or not, and is never handed to another authentication layer.
    pub fn claims(&self, key: &[u8]) -> bool {
        self.matching_prefix(key).is_some()
    }

    /// The longest accepted prefix the key starts with, followed by `_`.
    fn matching_prefix(&self, key: &[u8]) -> Option<&KeyPrefix> {
        let head = head_word(key);
        self.longest_first
            .iter()
            .zip(self.heads.iter())
            .find(|(prefix, start)| {
                let p = prefix.text.as_bytes();
                // The first eight bytes of `prefix_` in one compare; the rest of a longer
                // prefix byte by byte.
                key.len() > p.len()
                    && head & start.mask == start.word
                    && (p.len() < 8 || (key[8..p.len()] == p[8..] && key[p.len()] == b'_'))
            })
            .map(|(prefix, _)| prefix)
    }
}

/// Whether every byte is visible ASCII (`0x21..=0x7E`), like `iter().all(is_ascii_graphic)`
/// but eight bytes per step and one test at the end: this runs on every request, over the
/// whole key (extraction checks every credential with it, and [`validate_opaque`] every
/// opaque key).
pub(crate) fn all_visible_ascii(bytes: &[u8]) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const ONES: u64 = 0x0101_0101_0101_0101;
    // The high bit of each byte of the result is set if that byte is not visible ASCII.
    // With every byte below 0x80 no addition carries into the next byte: b + 0x5F sets the
    // high bit iff b >= 0x21, and b + 1 sets it iff b == 0x7F. A byte of 0x80 or more sets
    // its own high bit in `x` (what carries do to the other bytes then does not matter).
    let flags = |x: u64| x | !x.wrapping_add(0x5F * ONES) | x.wrapping_add(ONES);
    let word = |chunk: &[u8]| u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    if bytes.len() < 8 {
        return bytes.iter().all(u8::is_ascii_graphic);
    }
    let mut bad = bytes
        .chunks_exact(8)
        .fold(0, |bad, chunk| bad | flags(word(chunk)));
    // The last eight bytes, overlapping what the words read: the remainder, without a loop.
    bad |= flags(word(&bytes[bytes.len() - 8..]));
    bad & HIGH == 0
}

/// Validates a key of an opaque (foreign) format: 1 to [`MAX_KEY_LEN`] visible ASCII characters.
///
/// # Errors
/// [`KeyError::WrongLength`] or [`KeyError::BadAlphabet`].
pub fn validate_opaque(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(KeyError::WrongLength);
    }
    if !all_visible_ascii(key) {
        return Err(KeyError::BadAlphabet);
    }
    Ok(())
}

/// Whether every byte is in the base62 alphabet (`[0-9A-Za-z]`, which is exactly
/// `is_ascii_alphanumeric`). Folded without an early exit, so the compiler checks 16 bytes per
/// step instead of looking each byte up in a table: this runs on every request, and a key
/// with a bad byte is rare.
fn all_base62(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .fold(true, |ok, b| ok & b.is_ascii_alphanumeric())
}

/// The value of a base62 digit (`0-9A-Za-z` → 0..62) that is known to be one ([`parse`]
/// checks the whole tail first): arithmetic rather than a table, so a request reads no table
/// line for its checksum.
///
/// [`parse`]: KeyFormat::parse
#[inline]
fn base62_digit(b: u8) -> u64 {
    debug_assert!(b.is_ascii_alphanumeric());
    u64::from(b.wrapping_sub(b'0')) - 7 * u64::from(b > b'9') - 6 * u64::from(b > b'Z')
}

/// Writes a 256-bit big-endian number as exactly 43 base62 digits (62^43 > 2^256).
pub(crate) fn encode_256(bytes: &[u8; 32], out: &mut [u8; BODY_LEN]) {
    let mut limbs = [0u32; 8];
    for (limb, chunk) in limbs.iter_mut().zip(bytes.chunks_exact(4)) {
        *limb = u32::from_be_bytes(chunk.try_into().expect("4 bytes"));
    }
    for slot in out.iter_mut().rev() {
        let mut rem: u64 = 0;
        for limb in limbs.iter_mut() {
            let acc = (rem << 32) | u64::from(*limb);
            *limb = (acc / 62) as u32;
            rem = acc % 62;
        }
        *slot = ALPHABET[rem as usize];
    }
    limbs.zeroize();
}

fn encode_checksum(mut value: u32, out: &mut [u8; CHECKSUM_LEN]) {
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
}

/// The checksum's value; `digits` are base62 (checked by the caller). `None` above `u32::MAX`.
fn decode_checksum(digits: &[u8]) -> Option<u32> {
    let value = digits
        .iter()
        .fold(0u64, |value, &b| value * 62 + base62_digit(b));
    u32::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn live() -> KeyPrefix {
        KeyPrefix::new("kw_live").unwrap()
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let key = live().generate();
        let s = key.expose();
        assert_eq!(s.len(), 8 + BODY_LEN + CHECKSUM_LEN);
        assert!(s.starts_with("kw_live_"));
        assert!(s[8..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(
            KeyFormat::default()
                .parse(s.as_bytes())
                .unwrap()
                .environment(),
            "live"
        );
        assert_ne!(
            key,
            live().generate(),
            "two keys from the CSPRNG must differ"
        );
    }

    #[test]
    fn base62_body_is_fixed_width_at_both_extremes() {
        let mut out = [0u8; BODY_LEN];
        encode_256(&[0u8; 32], &mut out);
        assert_eq!(&out, &[b'0'; BODY_LEN]);
        encode_256(&[0xff; 32], &mut out);
        // 2^256 - 1 in base62, computed independently with Python's arbitrary-precision ints.
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "yhjskwdA6OZ1AL1YmHWZWm8LLG7HjnuCA2j5rOw8Xp1"
        );
        let mut one = [0u8; 32];
        one[31] = 61;
        encode_256(&one, &mut out);
        assert_eq!(out[BODY_LEN - 1], b'z');
        assert!(out[..BODY_LEN - 1].iter().all(|&b| b == b'0'));
    }

    /// The tests' reference: a byte's place in the alphabet, if it has one.
    fn base62_value(b: u8) -> Option<u8> {
        ALPHABET.iter().position(|&a| a == b).map(|i| i as u8)
    }

    #[test]
    fn every_base62_digit_has_its_place_in_the_alphabet() {
        for b in 0..=u8::MAX {
            if let Some(value) = base62_value(b) {
                assert_eq!(base62_digit(b), u64::from(value), "byte {b}");
            }
        }
        for (value, &b) in ALPHABET.iter().enumerate() {
            assert_eq!(base62_digit(b), value as u64);
        }
    }

    #[test]
    fn the_alphabet_check_agrees_with_the_table_at_every_byte_and_position() {
        let key = ALPHABET.repeat(2);
        assert!(all_base62(&key));
        for position in 0..key.len() {
            for b in 0..=u8::MAX {
                let mut bytes = key.clone();
                bytes[position] = b;
                assert_eq!(
                    all_base62(&bytes),
                    base62_value(b).is_some(),
                    "byte {b} at {position}"
                );
            }
        }
        assert!(all_base62(b""));
    }

    #[test]
    fn checksum_roundtrips_through_base62() {
        for value in [0u32, 1, 61, 62, u32::MAX, 0xDEAD_BEEF] {
            let mut out = [0u8; CHECKSUM_LEN];
            encode_checksum(value, &mut out);
            assert_eq!(decode_checksum(&out), Some(value));
        }
        assert_eq!(decode_checksum(b"zzzzzz"), None, "above u32 range");
    }

    #[test]
    fn known_answer_key_from_fixed_randomness() {
        let key = live().key_from_random(&[0u8; 32]);
        let crc = crc32fast::hash(format!("kw_live_{}", "0".repeat(43)).as_bytes());
        let mut cs = [0u8; CHECKSUM_LEN];
        encode_checksum(crc, &mut cs);
        assert_eq!(
            key.expose(),
            format!(
                "kw_live_{}{}",
                "0".repeat(43),
                std::str::from_utf8(&cs).unwrap()
            )
        );
    }

    #[test]
    fn parse_rejects_each_defect_with_its_own_error() {
        let format = KeyFormat::default();
        let key = live().generate();
        let s = key.expose();
        assert_eq!(
            format.parse(b"kw_prod_abc").unwrap_err(),
            KeyError::WrongPrefix
        );
        assert_eq!(format.parse(b"kw_live").unwrap_err(), KeyError::WrongPrefix);
        assert_eq!(
            format.parse(b"kw_livex_abc").unwrap_err(),
            KeyError::WrongPrefix
        );
        assert_eq!(
            format.parse(&s.as_bytes()[..s.len() - 1]).unwrap_err(),
            KeyError::WrongLength
        );
        let mut bad = s.as_bytes().to_vec();
        bad[12] = b'-';
        assert_eq!(format.parse(&bad).unwrap_err(), KeyError::BadAlphabet);
        let mut bad = s.as_bytes().to_vec();
        bad[12] = if bad[12] == b'a' { b'b' } else { b'a' };
        assert_eq!(format.parse(&bad).unwrap_err(), KeyError::BadChecksum);
        assert!(format.claims(s.as_bytes()));
        assert!(!format.claims(b"eyJhbGciOiJIUzI1NiJ9.e30.x"));
        assert!(!format.claims(b"kw_live"));
    }

    #[test]
    fn prefixes_are_validated() {
        for bad in [
            "", "kw", "KW_live", "kw__live", "kw_live_", "1kw_live", "kw-live", "kw_lïve",
        ] {
            assert_eq!(
                KeyPrefix::new(bad).unwrap_err(),
                KeyError::InvalidPrefix,
                "{bad}"
            );
        }
        let p = KeyPrefix::new("acme_billing_staging2").unwrap();
        assert_eq!(p.environment(), "staging2");
        assert!(KeyFormat::new(Vec::<&str>::new()).is_err());
        let custom = KeyFormat::new(["acme_prod"]).unwrap();
        let key = custom.prefixes()[0].generate();
        assert!(custom.parse(key.expose().as_bytes()).is_ok());
        assert!(KeyFormat::default().parse(key.expose().as_bytes()).is_err());
    }

    #[test]
    fn display_start_and_debug_never_reveal_the_body() {
        let key = live().generate();
        let start = key.display_start();
        assert_eq!(start.len(), "kw_live_".len() + 4);
        assert!(key.expose().starts_with(&start));
        assert_eq!(format!("{key:?}"), "ApiKey([redacted])");
        assert_eq!(display_start(b"0b9a8f2e-opaque"), "0b9a");
        assert_eq!(display_start(b"ab"), "ab");
    }

    #[test]
    fn opaque_keys_are_visible_ascii_up_to_512_bytes() {
        assert!(validate_opaque(b"0b9a8f2e-5b1c-4d0e-9b7a-1c2d3e4f5a6b").is_ok());
        assert_eq!(validate_opaque(b"").unwrap_err(), KeyError::WrongLength);
        assert!(validate_opaque(&[b'a'; 512]).is_ok());
        assert_eq!(
            validate_opaque(&[b'a'; 513]).unwrap_err(),
            KeyError::WrongLength
        );
        assert_eq!(
            validate_opaque(b"has space").unwrap_err(),
            KeyError::BadAlphabet
        );
        assert_eq!(
            validate_opaque("é".as_bytes()).unwrap_err(),
            KeyError::BadAlphabet
        );
    }

    #[test]
    fn a_prefix_that_extends_another_is_not_hidden_by_it() {
        for order in [["kw_live", "kw_live_eu"], ["kw_live_eu", "kw_live"]] {
            let format = KeyFormat::new(order).unwrap();
            for prefix in format.prefixes() {
                let key = prefix.generate();
                let parsed = format.parse(key.expose().as_bytes()).unwrap();
                assert_eq!(parsed.prefix(), prefix, "{order:?}");
                assert!(format.claims(key.expose().as_bytes()));
            }
            assert_eq!(
                format.prefixes()[0].as_str(),
                order[0],
                "configuration order kept"
            );
            assert_eq!(
                format.parse(b"kw_live_eu_x").unwrap_err(),
                KeyError::WrongLength
            );
        }
    }

    /// Prefix sets where prefixes extend each other (`a_b`, `a_b_c`, `a_b_c_d`), in any order,
    /// with unrelated ones mixed in.
    fn prefix_sets() -> impl Strategy<Value = Vec<String>> {
        let segment = "[a-z][a-z0-9]{0,3}";
        (
            proptest::collection::vec(segment, 2..6),
            proptest::collection::vec(proptest::collection::vec(segment, 2..4), 0..3),
        )
            .prop_map(|(chain, others)| {
                let mut prefixes: Vec<String> =
                    (2..=chain.len()).map(|n| chain[..n].join("_")).collect();
                prefixes.extend(others.iter().map(|segments| segments.join("_")));
                let mut seen = std::collections::HashSet::new();
                prefixes.retain(|p| seen.insert(p.clone()));
                prefixes
            })
            .prop_shuffle()
    }

    proptest! {
        #[test]
        fn every_key_of_every_prefix_parses_back_to_that_prefix(
            prefixes in prefix_sets(),
            random in proptest::array::uniform32(any::<u8>()),
        ) {
            let format = KeyFormat::new(&prefixes).unwrap();
            for prefix in format.prefixes() {
                let key = prefix.key_from_random(&random);
                let parsed = format.parse(key.expose().as_bytes());
                prop_assert_eq!(parsed.map(|p| p.prefix().as_str()), Ok(prefix.as_str()));
            }
        }

        #[test]
        fn prefix_matching_agrees_with_a_byte_slice_compare(
            prefixes in prefix_sets(),
            pick in any::<proptest::sample::Index>(),
            cut in 0usize..32,
            tail in "[_a-z0-9]{0,12}",
        ) {
            // Keys around the prefixes' boundaries: a prefix cut anywhere, then `_`, letters
            // or nothing; shorter than eight bytes as well as longer.
            let format = KeyFormat::new(&prefixes).unwrap();
            let base = pick.get(&prefixes);
            let key = format!("{}{tail}", &base[..cut.min(base.len())]);
            let key = key.as_bytes();
            let reference = format.longest_first.iter().find(|p| {
                let p = p.text.as_bytes();
                key.len() > p.len() && key.starts_with(p) && key[p.len()] == b'_'
            });
            prop_assert_eq!(
                format.matching_prefix(key).map(KeyPrefix::as_str),
                reference.map(KeyPrefix::as_str)
            );
        }

        #[test]
        fn every_generated_key_parses(random in proptest::array::uniform32(any::<u8>())) {
            let key = live().key_from_random(&random);
            prop_assert!(KeyFormat::default().parse(key.expose().as_bytes()).is_ok());
        }

        #[test]
        fn any_single_substitution_is_rejected(
            random in proptest::array::uniform32(any::<u8>()),
            pos in 8usize..57,
            replacement in proptest::sample::select(ALPHABET.to_vec()),
        ) {
            let key = live().key_from_random(&random);
            let mut bytes = key.expose().as_bytes().to_vec();
            prop_assume!(bytes[pos] != replacement);
            bytes[pos] = replacement;
            // CRC32 detects every single-character change.
            prop_assert!(KeyFormat::default().parse(&bytes).is_err());
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = KeyFormat::default().parse(&bytes);
            let _ = validate_opaque(&bytes);
            let _ = display_start(&bytes);
        }
    }

    #[test]
    fn a_prefix_shows_its_text_and_splits_off_its_environment() {
        for (text, env) in [("kw_live", "live"), ("acme_api_test2", "test2")] {
            let prefix = KeyPrefix::new(text).unwrap();
            assert_eq!(prefix.as_str(), text);
            assert_eq!(prefix.to_string(), text);
            assert_eq!(format!("{prefix:?}"), format!("KeyPrefix({text:?})"));
            assert_eq!(prefix.environment(), env);
            assert_eq!(text.parse::<KeyPrefix>().unwrap(), prefix);
            let key = prefix.generate();
            assert!(key.expose().starts_with(&format!("{text}_")));
        }
    }
}
