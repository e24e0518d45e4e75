//! Viewable keys: the plaintext also kept AES-256-GCM-encrypted so an admin can reveal it later
//! (Strapi/Payload parity). Off unless a reveal key is configured.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

use crate::key::ApiKey;
use crate::secret::{Secret, SecretError};

/// Environment variable holding the reveal key (at least 32 bytes, like the secret).
pub const REVEAL_KEY_ENV: &str = "KEYWARDEN_REVEAL_KEY";

const NONCE_LEN: usize = 12;

/// The key that encrypts viewable keys. `Debug` prints a redaction.
///
/// The AES-256 key is derived from the configured secret with HMAC-SHA256 (domain-separated),
/// and each ciphertext is bound to its key id as associated data, so a ciphertext copied onto
/// another row does not decrypt.
#[derive(Clone)]
pub struct RevealKey {
    cipher: Aes256Gcm,
}

impl RevealKey {
    /// Derives a reveal key from a secret of at least 32 bytes.
    pub fn new(secret: &Secret) -> Self {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(secret.expose()).expect("any key length");
        mac.update(b"keywarden reveal key v1");
        let derived = mac.finalize().into_bytes();
        Self {
            cipher: Aes256Gcm::new(&derived),
        }
    }

    /// Reads `KEYWARDEN_REVEAL_KEY`; `Ok(None)` when unset.
    ///
    /// # Errors
    /// [`SecretError::TooShort`] or [`SecretError::NotUnicode`].
    pub fn from_env() -> Result<Option<Self>, SecretError> {
        match std::env::var(REVEAL_KEY_ENV) {
            Ok(value) => Ok(Some(Self::new(&Secret::new(value.into_bytes())?))),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(SecretError::NotUnicode(REVEAL_KEY_ENV)),
        }
    }

    pub(crate) fn seal(&self, id: Uuid, key: &ApiKey) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random number generator failed");
        let payload = Payload {
            msg: key.expose().as_bytes(),
            aad: id.as_bytes(),
        };
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), payload)
            .expect("AES-GCM encryption of a short message cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    pub(crate) fn open(&self, id: Uuid, data: &[u8]) -> Option<ApiKey> {
        if data.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let payload = Payload {
            msg: sealed,
            aad: id.as_bytes(),
        };
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), payload)
            .ok()?;
        String::from_utf8(plain).ok().map(ApiKey::new)
    }
}

impl fmt::Debug for RevealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RevealKey([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reveal_key(s: &str) -> RevealKey {
        RevealKey::new(&Secret::new(s).unwrap())
    }

    #[test]
    fn seals_and_opens_bound_to_the_id() {
        let rk = reveal_key("reveal-key-0123456789abcdef0123456789");
        let id = Uuid::now_v7();
        let key = ApiKey::new("kw_live_example");
        let sealed = rk.seal(id, &key);
        assert!(
            !sealed.windows(8).any(|w| w == b"kw_live_"),
            "ciphertext only"
        );
        assert_eq!(rk.open(id, &sealed), Some(key.clone()));
        assert_eq!(
            rk.open(Uuid::now_v7(), &sealed),
            None,
            "moved to another row"
        );
        assert_eq!(
            reveal_key("another-reveal-key-0123456789abcdef").open(id, &sealed),
            None
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(rk.open(id, &tampered), None);
        assert_eq!(rk.open(id, &sealed[..5]), None);
        assert_ne!(rk.seal(id, &key), sealed, "random nonce per seal");
        assert_eq!(format!("{rk:?}"), "RevealKey([redacted])");
    }
}
