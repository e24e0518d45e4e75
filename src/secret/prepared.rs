//! HMAC-SHA256 (RFC 2104) from a key schedule computed once: the SHA-256 states after the
//! key's inner and outer pad blocks. The hit path digests every presented key with it.
//!
//! Written over `sha2`'s compression function rather than through `hmac`'s buffered
//! `Mac` API: a key of our format (57 bytes) is absorbed in one call over its two padded
//! blocks and the outer hash in one more, with no state clone, buffer bookkeeping or copy
//! in between. And unlike `hmac` 0.12's state, this one is wiped when dropped. The tests
//! check it against the `hmac` crate and RFC 4231.

use sha2::compress256;
use sha2::digest::consts::U64;
use sha2::digest::generic_array::GenericArray;
use sha2::{Digest as _, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// SHA-256's block.
type Block = GenericArray<u8, U64>;

const BLOCK_LEN: usize = 64;

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// The SHA-256 states after absorbing `key ^ ipad` and `key ^ opad`: everything HMAC needs
/// of the key. Derived from the secret, so wiped on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(super) struct PreparedHmac {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl PreparedHmac {
    pub(super) fn new(key: &[u8]) -> Self {
        // A key longer than a block is hashed first (RFC 2104, section 2). (`sha2` keeps
        // no state past `digest`, but cannot wipe the stack it used: as with `hmac`.)
        let mut block = Zeroizing::new([0u8; BLOCK_LEN]);
        if key.len() > BLOCK_LEN {
            let mut hashed = Sha256::digest(key);
            block[..hashed.len()].copy_from_slice(&hashed);
            hashed.as_mut_slice().zeroize();
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let pad_state = |pad: u8| {
            let mut padded = Block::default();
            for (out, byte) in padded.iter_mut().zip(block.iter()) {
                *out = byte ^ pad;
            }
            let mut state = IV;
            compress256(&mut state, std::slice::from_ref(&padded));
            padded.as_mut_slice().zeroize();
            state
        };
        Self {
            inner: pad_state(0x36),
            outer: pad_state(0x5c),
        }
    }

    /// `HMAC-SHA256(key, message)`.
    pub(super) fn mac(&self, message: &[u8]) -> [u8; 32] {
        let mut state = self.inner;
        // Whole blocks straight from the message (only messages, API keys, longer than 64
        // bytes have any: opaque keys of other systems).
        let whole = message.len() - message.len() % BLOCK_LEN;
        let (blocks, tail) = message.split_at(whole);
        for block in blocks.chunks_exact(BLOCK_LEN) {
            compress256(&mut state, std::slice::from_ref(Block::from_slice(block)));
        }
        // The tail, `0x80`, zeros and the length in bits of the pad block and the message:
        // one block if they fit, else two (a 57-byte key of our format takes two).
        // The buffer holds key bytes, as the request's own buffers do for as long as the
        // request lives; it is not wiped (a volatile wipe would cost as much as the rest).
        let mut padded = [Block::default(), Block::default()];
        let used = if tail.len() + 9 <= BLOCK_LEN { 1 } else { 2 };
        // The tail is shorter than a block: its `0x80` always lands in the first.
        padded[0][..tail.len()].copy_from_slice(tail);
        padded[0][tail.len()] = 0x80;
        let bits = ((BLOCK_LEN + message.len()) as u64) * 8;
        padded[used - 1][BLOCK_LEN - 8..].copy_from_slice(&bits.to_be_bytes());
        compress256(&mut state, &padded[..used]);

        // The outer hash: the pad block's state, then the inner digest with its padding.
        let mut block = Block::default();
        block[..32].copy_from_slice(&state_bytes(state));
        block[32] = 0x80;
        block[BLOCK_LEN - 8..].copy_from_slice(&(((BLOCK_LEN + 32) as u64) * 8).to_be_bytes());
        let mut outer = self.outer;
        compress256(&mut outer, std::slice::from_ref(&block));
        state_bytes(outer)
    }
}

/// A SHA-256 state as its digest: the eight words big-endian.
#[inline]
fn state_bytes(state: [u32; 8]) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    for (out, word) in bytes.chunks_exact_mut(4).zip(state) {
        out.copy_from_slice(&word.to_be_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use proptest::prelude::*;

    fn reference(key: &[u8], message: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256>>::new_from_slice(key).unwrap();
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc_4231_test_vectors() {
        // Test cases 1, 2, 3, 4, 6 and 7 (5 truncates its output).
        let cases: [(Vec<u8>, Vec<u8>, &str); 6] = [
            (
                vec![0x0b; 20],
                b"Hi There".to_vec(),
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?".to_vec(),
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                vec![0xaa; 20],
                vec![0xdd; 50],
                "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
            ),
            (
                hex("0102030405060708090a0b0c0d0e0f10111213141516171819"),
                vec![0xcd; 50],
                "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
            ),
            (
                vec![0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
            (
                vec![0xaa; 131],
                b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.".to_vec(),
                "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            ),
        ];
        for (key, message, expected) in cases {
            assert_eq!(
                PreparedHmac::new(&key).mac(&message).to_vec(),
                hex(expected),
                "key of {} bytes, message of {}",
                key.len(),
                message.len()
            );
        }
    }

    #[test]
    fn every_message_length_around_the_block_boundaries() {
        // The padding's branches: tails of 0..=63 bytes, one or two padded blocks, with and
        // without whole blocks before them.
        let key = [0x42u8; 32];
        let prepared = PreparedHmac::new(&key);
        let message: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        for len in 0..=message.len() {
            assert_eq!(
                prepared.mac(&message[..len]),
                reference(&key, &message[..len]),
                "message of {len} bytes"
            );
        }
    }

    #[test]
    fn every_key_length_around_the_block_size() {
        let message = b"kw_live_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij012345";
        for len in 0..=130 {
            let key: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            assert_eq!(
                PreparedHmac::new(&key).mac(message),
                reference(&key, message),
                "key of {len} bytes"
            );
        }
    }

    proptest! {
        #[test]
        fn matches_the_hmac_crate(
            key in proptest::collection::vec(any::<u8>(), 0..200),
            message in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            prop_assert_eq!(PreparedHmac::new(&key).mac(&message), reference(&key, &message));
        }
    }
}
