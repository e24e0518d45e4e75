//! Key parsing and the other decoders of untrusted text (digests, secret ids, prefixes,
//! rate-limit policies, expiries).
//!
//! Invariants:
//! - `KeyFormat::parse` agrees exactly with an independent reference check of DESIGN §1
//!   (prefix, `_`, 49 base62 characters, CRC32 of everything before the checksum), and a
//!   parsed key is always claimed;
//! - the first 32 input bytes, encoded as a key, parse back, decode (by a reference base62
//!   decoder) to the same bytes, and any single-character change is rejected;
//! - every text decoder that accepts its input round-trips through `Display`/`to_hex`.
#![no_main]

use std::str::FromStr;
use std::sync::OnceLock;

use keywarden::{
    secret::Digest, ExpiresIn, key::KeyError, key::KeyFormat, key::KeyPrefix, ratelimit::RateLimitPolicy, secret::SecretId, key::BODY_LEN,
    key::CHECKSUM_LEN};
use libfuzzer_sys::fuzz_target;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const PREFIXES: [&str; 4] = ["kw_live", "kw_test", "acme_billing_prod", "x_y"];

fn digit(b: u8) -> Option<u32> {
    ALPHABET.iter().position(|&a| a == b).map(|p| p as u32)
}

/// Big-endian base-62 digits to a big-endian byte string of `len` bytes; `None` on overflow.
fn decode_base62(digits: &[u8], len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len];
    for &d in digits {
        let mut carry = digit(d)?;
        for byte in out.iter_mut().rev() {
            let acc = u32::from(*byte) * 62 + carry;
            *byte = (acc & 0xff) as u8;
            carry = acc >> 8;
        }
        if carry != 0 {
            return None;
        }
    }
    Some(out)
}

/// DESIGN §1, written independently of `src/key.rs`.
fn reference_valid(prefixes: &[&str], key: &[u8]) -> bool {
    prefixes.iter().any(|p| {
        let Some(rest) = key.strip_prefix(p.as_bytes()) else {
            return false;
        };
        let Some(tail) = rest.strip_prefix(b"_") else {
            return false;
        };
        if tail.len() != BODY_LEN + CHECKSUM_LEN || !tail.iter().all(u8::is_ascii_alphanumeric) {
            return false;
        }
        let (signed, checksum) = key.split_at(key.len() - CHECKSUM_LEN);
        let Some(sum) = decode_base62(checksum, 4) else {
            return false;
        };
        u32::from_be_bytes(sum.try_into().unwrap()) == crc32fast::hash(signed)
    })
}

fn formats() -> &'static [(KeyFormat, Vec<&'static str>); 2] {
    static FORMATS: OnceLock<[(KeyFormat, Vec<&'static str>); 2]> = OnceLock::new();
    FORMATS.get_or_init(|| {
        [
            (KeyFormat::default(), PREFIXES[..2].to_vec()),
            (KeyFormat::new(PREFIXES).unwrap(), PREFIXES.to_vec()),
        ]
    })
}

fn check_parse(data: &[u8]) {
    for (format, prefixes) in formats() {
        let parsed = format.parse(data);
        assert_eq!(
            parsed.is_ok(),
            reference_valid(prefixes, data),
            "{parsed:?}"
        );
        if let Ok(key) = &parsed {
            assert!(format.claims(data));
            assert!(data.starts_with(key.prefix().as_str().as_bytes()));
            assert_eq!(
                key.environment(),
                key.prefix().as_str().rsplit('_').next().unwrap()
            );
        }
        if !format.claims(data) {
            assert_eq!(parsed.unwrap_err(), KeyError::WrongPrefix);
        }
    }
}

fn check_roundtrip(data: &[u8]) {
    let Some(random) = data.get(..32) else {
        return;
    };
    let random: [u8; 32] = random.try_into().unwrap();
    let selector = data.get(32).copied().unwrap_or(0);
    let (format, _) = &formats()[1];
    let prefix = &format.prefixes()[usize::from(selector) % PREFIXES.len()];
    let key = keywarden::__fuzz::key_from_random(&prefix, &random);
    let text = key.expose().as_bytes();
    assert_eq!(
        text.len(),
        prefix.as_str().len() + 1 + BODY_LEN + CHECKSUM_LEN
    );
    assert!(format.parse(text).is_ok(), "parse(encode(x)) must succeed");
    let body = &text[prefix.as_str().len() + 1..text.len() - CHECKSUM_LEN];
    assert_eq!(
        decode_base62(body, 32).as_deref(),
        Some(&random[..]),
        "body roundtrip"
    );
    assert_eq!(format!("{key:?}"), "ApiKey([redacted])");
    assert_eq!(
        key.display_start(),
        String::from_utf8_lossy(&text[..prefix.as_str().len() + 5])
    );

    // Any single-character change after the prefix is caught (CRC32 detects every burst of
    // up to 32 bits; one character is at most 8).
    if let [position, replacement, ..] = data[33.min(data.len())..] {
        let tail_start = prefix.as_str().len() + 1;
        let at = tail_start + usize::from(position) % (text.len() - tail_start);
        let mut tampered = text.to_vec();
        tampered[at] = replacement;
        if replacement != text[at] {
            let error = format.parse(&tampered).unwrap_err();
            if replacement.is_ascii_alphanumeric() {
                assert_eq!(error, KeyError::BadChecksum);
            } else {
                assert_eq!(error, KeyError::BadAlphabet);
            }
        }
    }
}

fn check_text(text: &str) {
    if let Ok(digest) = Digest::from_str(text) {
        assert_eq!(digest.to_hex(), text.to_ascii_lowercase());
    }
    if let Ok(id) = SecretId::from_str(text) {
        assert_eq!(id.to_string(), text.to_ascii_lowercase());
    }
    if let Ok(prefix) = KeyPrefix::new(text) {
        assert_eq!(prefix.as_str(), text);
        let segments: Vec<&str> = text.split('_').collect();
        assert!(segments.len() >= 2);
        for segment in &segments {
            let b = segment.as_bytes();
            assert!(b[0].is_ascii_lowercase());
            assert!(b
                .iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        }
        assert_eq!(prefix.environment(), *segments.last().unwrap());
        // A key of any valid prefix parses under a format of that prefix.
        let format = KeyFormat::new([text]).unwrap();
        let key = keywarden::__fuzz::key_from_random(&prefix, &[7u8; 32]);
        assert!(format.parse(key.expose().as_bytes()).is_ok());
    }
    if let Ok(policy) = RateLimitPolicy::from_str(text) {
        assert!(policy.limit() > 0 && policy.burst() > 0 && !policy.period().is_zero());
        let shown = policy.to_string();
        assert_eq!(RateLimitPolicy::from_str(&shown), Ok(policy), "{shown}");
        assert!(policy.is_within(&policy));
    }
    if let Ok(expiry) = ExpiresIn::from_str(text) {
        let shown = expiry.to_string();
        assert_eq!(ExpiresIn::from_str(&shown), Ok(expiry), "{shown}");
        let now = time::OffsetDateTime::now_utc();
        if let (ExpiresIn::After(_), Some(at)) = (expiry, expiry.expires_at(now)) {
            assert!(at > now);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_parse(data);
    check_roundtrip(data);
    if let Ok(text) = std::str::from_utf8(data) {
        check_text(text);
    }
});
