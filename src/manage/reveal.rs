//! Viewable keys: the plaintext also kept AES-256-GCM-encrypted so an admin can reveal it later
//! (Strapi/Payload parity). Off unless a reveal key is configured.
//!
//! Reveal keys form a ring, like application secrets: one current key that seals new keys and
//! any number of previous ones that still open what they sealed. Each ciphertext names the
//! reveal key that sealed it, so rotating the reveal key loses nothing: move the old value to
//! `KEYWARDEN_PREVIOUS_REVEAL_KEYS`, and each key is re-sealed under the new one the next time
//! it is revealed.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//! use keywarden::{manage::Actor, KeyManager, MemoryStore, NewKey, manage::RevealKeyRing, SecretRing};
//!
//! let secrets = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
//! let store = Arc::new(MemoryStore::new());
//! let old = RevealKeyRing::from_strs("the-first-reveal-key-of-32-bytes-or-more", None).unwrap();
//! let manager = KeyManager::new(store.clone(), secrets.clone()).with_reveal_keys(old);
//! let created = manager.create(NewKey::new("ci", "user-42")).await.unwrap();
//!
//! // Rotate the reveal key: the old one moves to the previous keys.
//! let ring = RevealKeyRing::from_strs(
//!     "the-second-reveal-key-of-32-bytes-or-more",
//!     Some("the-first-reveal-key-of-32-bytes-or-more"),
//! )
//! .unwrap();
//! let manager = KeyManager::new(store, secrets).with_reveal_keys(ring);
//! let shown = manager.reveal(created.record.id, &Actor::Cli).await.unwrap();
//! assert_eq!(shown, created.key);
//! # }
//! ```
//!
//! # Format
//! An encrypted key is an envelope: the version byte `1`, the 8-byte [`RevealKeyId`] of the
//! reveal key that sealed it, a random 96-bit nonce, then the AES-256-GCM ciphertext and tag.
//! The associated data is the envelope header followed by the key's id, so a ciphertext copied
//! onto another row, or whose reveal key id was rewritten, does not open. Ciphertexts written
//! before the envelope existed (nonce, ciphertext and tag; the key's id as associated data)
//! still open: every reveal key of the ring is tried, the current one first.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::digest::FixedOutput;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use super::{Actor, KeyManager, ManageError, ManageErrorKind};
use crate::audit::ChangeContext;
use crate::clock::Clock;
use crate::key::ApiKey;
use crate::ratelimit::{LocalLimiter, RateLimitPolicy};
use crate::secret::{
    read_ring, weakness, LoadError, RingVars, Secret, SecretError, MIN_SECRET_LEN,
};
use crate::store::{KeyChange, KeyState};

/// Environment variable holding the current reveal key (at least 32 bytes, like the secret).
pub const REVEAL_KEY_ENV: &str = "KEYWARDEN_REVEAL_KEY";
/// Environment variable holding previous reveal keys, comma-separated.
pub const PREVIOUS_REVEAL_KEYS_ENV: &str = "KEYWARDEN_PREVIOUS_REVEAL_KEYS";
/// Environment variable naming a file that holds the current reveal key (instead of
/// [`REVEAL_KEY_ENV`]).
pub const REVEAL_KEY_FILE_ENV: &str = "KEYWARDEN_REVEAL_KEY_FILE";
/// Environment variable naming a file of previous reveal keys, one per line (instead of
/// [`PREVIOUS_REVEAL_KEYS_ENV`]).
pub const PREVIOUS_REVEAL_KEYS_FILE_ENV: &str = "KEYWARDEN_PREVIOUS_REVEAL_KEYS_FILE";

/// The reveal keys' variables, read by the application secrets' rules.
const REVEAL_VARS: RingVars = RingVars {
    current: REVEAL_KEY_ENV,
    current_file: REVEAL_KEY_FILE_ENV,
    previous: PREVIOUS_REVEAL_KEYS_ENV,
    previous_file: PREVIOUS_REVEAL_KEYS_FILE_ENV,
    comma: "it holds a comma, so it could not be moved to KEYWARDEN_PREVIOUS_REVEAL_KEYS \
            unchanged; write it in the file named by KEYWARDEN_REVEAL_KEY_FILE instead",
};

const VERSION_1: u8 = 1;
const ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + ID_LEN;
/// Labels of the HMAC derivations from the configured secret. The AES key's label predates
/// the envelope: changing it would make every existing ciphertext unreadable.
const CIPHER_KEY_LABEL: &[u8] = b"keywarden reveal key v1";
const ID_LABEL: &[u8] = b"keywarden reveal key id v1";

/// A short public fingerprint of a reveal key, stored in each ciphertext it seals: the first
/// 8 bytes of `HMAC-SHA256(reveal key, "keywarden reveal key id v1")`, shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevealKeyId([u8; ID_LEN]);

impl RevealKeyId {
    /// The fingerprint's bytes.
    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    /// The reveal key id an encrypted key ([`KeyRecord::encrypted_key`]) names in its
    /// envelope; `None` for the older format, which names none. Read from the unauthenticated
    /// header: a claim that only opening the ciphertext confirms (about one older ciphertext
    /// in 256 even starts like an envelope).
    ///
    /// [`KeyRecord::encrypted_key`]: crate::store::KeyRecord::encrypted_key
    pub fn of_encrypted(encrypted: &[u8]) -> Option<Self> {
        Envelope::parse(encrypted).map(|envelope| envelope.key_id)
    }
}

impl fmt::Display for RevealKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for RevealKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RevealKeyId({self})")
    }
}

/// The key that encrypts viewable keys. `Debug` prints its id only; the derived AES key is
/// zeroized when the last copy is dropped.
///
/// The AES-256 key is derived from the configured secret with HMAC-SHA256 (domain-separated),
/// and each ciphertext is bound to its key's id as associated data, so a ciphertext copied
/// onto another row does not decrypt.
#[derive(Clone)]
pub struct RevealKey {
    id: RevealKeyId,
    cipher: Aes256Gcm,
}

impl RevealKey {
    /// Derives a reveal key from a secret of at least 32 bytes.
    pub fn new(secret: &Secret) -> Self {
        let mut derived = aes_gcm::Key::<Aes256Gcm>::default();
        hmac_into(secret, CIPHER_KEY_LABEL, &mut derived);
        let cipher = Aes256Gcm::new(&derived);
        derived.as_mut_slice().zeroize();
        let mut full = aes_gcm::Key::<Aes256Gcm>::default();
        hmac_into(secret, ID_LABEL, &mut full);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&full[..ID_LEN]);
        full.as_mut_slice().zeroize();
        Self {
            id: RevealKeyId(id),
            cipher,
        }
    }

    /// The key's public fingerprint.
    pub fn id(&self) -> RevealKeyId {
        self.id
    }

    /// Seals `key` for the row `row` in the current envelope format.
    fn seal(&self, row: Uuid, key: &ApiKey) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random number generator failed");
        let header = header(self.id);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key.expose().as_bytes(),
                    aad: &aad(&header, row),
                },
            )
            .expect("AES-GCM encryption of a short message cannot fail");
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + sealed.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    fn open_envelope(&self, row: Uuid, envelope: &Envelope<'_>) -> Option<ApiKey> {
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(envelope.nonce),
                Payload {
                    msg: envelope.sealed,
                    aad: &aad(&envelope.header, row),
                },
            )
            .ok()?;
        to_key(Zeroizing::new(plain))
    }

    /// Opens the format written before the envelope: nonce, then ciphertext and tag, with the
    /// row id as associated data.
    fn open_legacy(&self, row: Uuid, data: &[u8]) -> Option<ApiKey> {
        if data.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: row.as_bytes(),
                },
            )
            .ok()?;
        to_key(Zeroizing::new(plain))
    }
}

impl fmt::Debug for RevealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RevealKey({}, [redacted])", self.id)
    }
}

fn hmac_into(secret: &Secret, label: &[u8], out: &mut aes_gcm::Key<Aes256Gcm>) {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret.expose()).expect("HMAC accepts any length");
    mac.update(label);
    mac.finalize_into(out);
}

fn header(id: RevealKeyId) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0] = VERSION_1;
    header[1..].copy_from_slice(&id.0);
    header
}

fn aad(header: &[u8; HEADER_LEN], row: Uuid) -> [u8; HEADER_LEN + 16] {
    let mut aad = [0u8; HEADER_LEN + 16];
    aad[..HEADER_LEN].copy_from_slice(header);
    aad[HEADER_LEN..].copy_from_slice(row.as_bytes());
    aad
}

/// The plaintext as a key; the decrypted buffer is zeroized whatever happens.
fn to_key(plain: Zeroizing<Vec<u8>>) -> Option<ApiKey> {
    std::str::from_utf8(&plain).ok().map(ApiKey::new)
}

/// A parsed envelope, borrowing the stored bytes.
struct Envelope<'a> {
    header: [u8; HEADER_LEN],
    key_id: RevealKeyId,
    nonce: &'a [u8],
    sealed: &'a [u8],
}

impl<'a> Envelope<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        if data.len() < HEADER_LEN + NONCE_LEN + TAG_LEN || data[0] != VERSION_1 {
            return None;
        }
        let (head, rest) = data.split_at(HEADER_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(head);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&head[1..]);
        Some(Self {
            header,
            key_id: RevealKeyId(id),
            nonce,
            sealed,
        })
    }
}

/// The current reveal key and any previous ones. `Debug` prints their ids only.
///
/// New keys are sealed under the current reveal key; a ciphertext opens under whichever key
/// of the ring sealed it.
#[derive(Clone)]
pub struct RevealKeyRing {
    current: RevealKey,
    previous: Vec<RevealKey>,
}

impl RevealKeyRing {
    /// A ring with only a current reveal key.
    pub fn new(current: RevealKey) -> Self {
        Self {
            current,
            previous: Vec::new(),
        }
    }

    /// Adds a previous reveal key: what it sealed still opens, and is re-sealed under the
    /// current key when revealed. A key equal to one already in the ring is ignored.
    #[must_use]
    pub fn with_previous(mut self, previous: RevealKey) -> Self {
        if previous.id != self.current.id && !self.previous.iter().any(|p| p.id == previous.id) {
            self.previous.push(previous);
        }
        self
    }

    /// Builds a ring from a current reveal key and an optional comma-separated list of previous
    /// ones, read exactly as `KEYWARDEN_REVEAL_KEY` and `KEYWARDEN_PREVIOUS_REVEAL_KEYS` are by
    /// [`RevealKeyRing::load`] (warnings are logged).
    ///
    /// # Errors
    /// As [`RevealKeyRing::load`]; an empty `current` is [`RevealKeyErrorKind::TooShort`].
    pub fn from_strs(current: &str, previous: Option<&str>) -> Result<Self, RevealKeyError> {
        let (ring, warnings) = Self::load(|name| match name {
            REVEAL_KEY_ENV => Some(current.into()),
            PREVIOUS_REVEAL_KEYS_ENV => previous.map(Into::into),
            _ => None,
        })?
        .ok_or_else(|| {
            RevealKeyError::from(LoadError {
                error: SecretError::TooShort { len: 0 },
                variable: REVEAL_KEY_ENV,
                origin: REVEAL_KEY_ENV.to_owned(),
            })
        })?;
        for warning in &warnings {
            tracing::warn!(target: "keywarden", "{warning}");
        }
        Ok(ring)
    }

    /// Reads the ring from the process environment with [`RevealKeyRing::load`] and logs its
    /// warnings (`tracing::warn!`, never key material); `Ok(None)` when no reveal key is
    /// configured.
    ///
    /// # Errors
    /// As [`RevealKeyRing::load`].
    pub fn from_env() -> Result<Option<Self>, RevealKeyError> {
        let Some((ring, warnings)) = Self::load(std::env::var_os)? else {
            return Ok(None);
        };
        for warning in &warnings {
            tracing::warn!(target: "keywarden", "{warning}");
        }
        Ok(Some(ring))
    }

    /// Reads the ring from variables looked up through `var` (the process environment in
    /// [`RevealKeyRing::from_env`]; a map in tests); `Ok(None)` when no reveal key is
    /// configured (an empty variable counts as unset):
    ///
    /// - the current reveal key from [`REVEAL_KEY_ENV`] (`KEYWARDEN_REVEAL_KEY`), or from the
    ///   file named by [`REVEAL_KEY_FILE_ENV`] (`KEYWARDEN_REVEAL_KEY_FILE`);
    /// - previous reveal keys, optionally, from [`PREVIOUS_REVEAL_KEYS_ENV`]
    ///   (`KEYWARDEN_PREVIOUS_REVEAL_KEYS`, comma-separated) or from the file named by
    ///   [`PREVIOUS_REVEAL_KEYS_FILE_ENV`] (`KEYWARDEN_PREVIOUS_REVEAL_KEYS_FILE`, one per
    ///   line).
    ///
    /// These are exactly the rules of the application secrets ([`SecretRing::load`], one
    /// implementation): each value is read by [`Secret::parse`] (one final line break is
    /// dropped, other surrounding whitespace is refused), so a reveal key moved from
    /// `KEYWARDEN_REVEAL_KEY` to the previous keys keeps its [`RevealKeyId`] and still opens
    /// what it sealed. When `KEYWARDEN_REVEAL_KEY` ends in a line break, its bytes as
    /// keywarden 0.1 used them are also kept as a previous reveal key, so what they sealed
    /// still opens (and is re-sealed when revealed); a warning says so.
    ///
    /// The warnings returned name reveal keys that look weak and the line-break case above;
    /// they never contain key material.
    ///
    /// [`SecretRing::load`]: crate::SecretRing::load
    ///
    /// # Errors
    /// A [`RevealKeyError`] naming the variable, never the value: a key under 32 bytes, an
    /// ambiguous value, a value that is not UTF-8, an unreadable file, a variable set both
    /// directly and as `_FILE`, or previous keys without a current one.
    pub fn load(
        var: impl FnMut(&'static str) -> Option<std::ffi::OsString>,
    ) -> Result<Option<(Self, Vec<RevealKeyWarning>)>, RevealKeyError> {
        let Some(values) = read_ring(var, &REVEAL_VARS)? else {
            return Ok(None);
        };
        let mut warnings = Vec::new();
        let mut add = |ring: Option<Self>, named: crate::secret::Named| {
            let key = RevealKey::new(&named.secret);
            if let Some(reason) = weakness(named.secret.expose()) {
                warnings.push(RevealKeyWarning::Weak {
                    source: named.source,
                    id: key.id,
                    reason,
                });
            }
            match ring {
                None => Self::new(key),
                Some(ring) => ring.with_previous(key),
            }
        };
        let mut ring = add(None, values.current);
        for previous in values.previous {
            ring = add(Some(ring), previous);
        }
        if let Some(legacy) = values.legacy {
            let legacy = RevealKey::new(&legacy);
            warnings.push(RevealKeyWarning::LineBreakDropped {
                current: ring.current_id(),
                legacy: legacy.id,
            });
            ring = ring.with_previous(legacy);
        }
        Ok(Some((ring, warnings)))
    }

    /// The current reveal key's id: the one new ciphertexts name.
    pub fn current_id(&self) -> RevealKeyId {
        self.current.id
    }

    /// The ids of the previous reveal keys, in the order given.
    pub fn previous_ids(&self) -> impl Iterator<Item = RevealKeyId> + '_ {
        self.previous.iter().map(|key| key.id)
    }

    fn keys(&self) -> impl Iterator<Item = &RevealKey> {
        std::iter::once(&self.current).chain(&self.previous)
    }

    /// Seals `key` for the row `row` under the current reveal key.
    pub(crate) fn seal(&self, row: Uuid, key: &ApiKey) -> Vec<u8> {
        self.current.seal(row, key)
    }

    /// Opens an envelope with the key it names; failing that (or for the older format), tries
    /// every key on the older format. Fails closed: only an authenticated decryption counts.
    /// The plaintext sealed for the row `row`, under any key of the ring.
    pub(crate) fn open(&self, row: Uuid, data: &[u8]) -> Option<ApiKey> {
        self.unseal(row, data).ok().map(|unsealed| unsealed.key)
    }

    fn unseal(&self, row: Uuid, data: &[u8]) -> Result<Unsealed, UnsealError> {
        let envelope = Envelope::parse(data);
        if let Some(envelope) = &envelope {
            if let Some(key) = self.keys().find(|key| key.id == envelope.key_id) {
                if let Some(plain) = key.open_envelope(row, envelope) {
                    return Ok(Unsealed {
                        key: plain,
                        sealed_by: key.id,
                        current: key.id == self.current.id,
                    });
                }
            }
        }
        for key in self.keys() {
            if let Some(plain) = key.open_legacy(row, data) {
                return Ok(Unsealed {
                    key: plain,
                    sealed_by: key.id,
                    current: false,
                });
            }
        }
        match envelope {
            Some(envelope) if !self.keys().any(|key| key.id == envelope.key_id) => {
                Err(UnsealError::UnknownKey(envelope.key_id))
            }
            _ => Err(UnsealError::Invalid),
        }
    }
}

impl From<RevealKey> for RevealKeyRing {
    fn from(key: RevealKey) -> Self {
        Self::new(key)
    }
}

impl fmt::Debug for RevealKeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevealKeyRing")
            .field("current", &self.current.id)
            .field("previous", &self.previous_ids().collect::<Vec<_>>())
            .finish()
    }
}

struct Unsealed {
    key: ApiKey,
    /// The ring key that opened it.
    sealed_by: RevealKeyId,
    /// Whether it is an envelope under the current key (nothing to re-seal).
    current: bool,
}

enum UnsealError {
    /// An envelope naming a reveal key the ring lacks.
    UnknownKey(RevealKeyId),
    /// Altered, moved from another row, or sealed under a key the ring lacks.
    Invalid,
}

/// Something worth an operator's attention in a loaded reveal key ring
/// ([`RevealKeyRing::load`]). Never holds key material: keys are named by where they came
/// from and by their [`RevealKeyId`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevealKeyWarning {
    /// The reveal key looks weak: replace it with one from `keywarden secret generate` (and
    /// move it to the previous reveal keys).
    Weak {
        /// Where it came from: a variable, or a list's variable and entry.
        source: String,
        /// Its id.
        id: RevealKeyId,
        /// Why it looks weak.
        reason: &'static str,
    },
    /// `KEYWARDEN_REVEAL_KEY` ends in a line break, which is not part of the key; keywarden
    /// 0.1 read it as part of it, so those bytes are kept as a previous reveal key.
    LineBreakDropped {
        /// The current reveal key's id (without the line break).
        current: RevealKeyId,
        /// The id of the value with its line break, as keywarden 0.1 read it.
        legacy: RevealKeyId,
    },
}

impl fmt::Display for RevealKeyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Weak { source, id, reason } => write!(
                f,
                "the reveal key in {source} (id {id}) looks weak: {reason}; replace it with one \
                 from `keywarden secret generate` and move it to {PREVIOUS_REVEAL_KEYS_ENV}"
            ),
            Self::LineBreakDropped { current, legacy } => write!(
                f,
                "{REVEAL_KEY_ENV} ends with a line break, which is not part of the reveal key \
                 (id {current}); keywarden 0.1 read it as part of it, so that value (id \
                 {legacy}) is kept as a previous reveal key and the keys it sealed are \
                 re-sealed under {current} when next revealed"
            ),
        }
    }
}

/// What is wrong with the configured reveal keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevealKeyErrorKind {
    /// A reveal key is shorter than 32 bytes.
    TooShort,
    /// A value keywarden cannot read as a key without guessing (see [`Secret::parse`]).
    Ambiguous,
    /// A value is not valid UTF-8.
    NotUnicode,
    /// A `_FILE` variable names a file that cannot be read.
    File,
    /// A variable is set both directly and as `_FILE`.
    Conflicting,
    /// Previous reveal keys are set without a current one.
    MissingCurrent,
}

/// The reveal keys in the environment are unusable. Names the variable; never contains key
/// material.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RevealKeyError {
    kind: RevealKeyErrorKind,
    var: &'static str,
    message: String,
}

impl From<LoadError> for RevealKeyError {
    fn from(
        LoadError {
            error,
            variable,
            origin,
        }: LoadError,
    ) -> Self {
        let hint = "generate one with `keywarden secret generate`";
        let (kind, message) = match error {
            SecretError::TooShort { len } => (
                RevealKeyErrorKind::TooShort,
                format!(
                    "{origin} is {len} bytes; a reveal key needs at least {MIN_SECRET_LEN} \
                     ({hint})"
                ),
            ),
            SecretError::Ambiguous { .. } => (RevealKeyErrorKind::Ambiguous, error.to_string()),
            // The shared reader names the origin itself and never wraps; kept for completeness.
            SecretError::At { .. } => (RevealKeyErrorKind::TooShort, error.to_string()),
            SecretError::NotUnicode(_) => (RevealKeyErrorKind::NotUnicode, error.to_string()),
            SecretError::File { .. } => (RevealKeyErrorKind::File, error.to_string()),
            SecretError::Conflict(..) => (RevealKeyErrorKind::Conflicting, error.to_string()),
            SecretError::Missing(current) => (
                RevealKeyErrorKind::MissingCurrent,
                format!(
                    "{variable} is set but {current} is not: previous reveal keys need a \
                     current one"
                ),
            ),
        };
        Self {
            kind,
            var: variable,
            message,
        }
    }
}

impl RevealKeyError {
    /// What is wrong.
    pub fn kind(&self) -> RevealKeyErrorKind {
        self.kind
    }

    /// The environment variable at fault.
    pub fn var(&self) -> &'static str {
        self.var
    }
}

/// How [`KeyManager::reveal_with`] treats a key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RevealOptions {
    /// Also reveal revoked, disabled and expired keys (default: refuse them).
    pub include_inactive: bool,
}

impl RevealOptions {
    /// The defaults: active keys only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether revoked, disabled and expired keys are revealed too.
    #[must_use]
    pub fn include_inactive(mut self, include: bool) -> Self {
        self.include_inactive = include;
        self
    }
}

/// The default reveal budget of each actor: 10 a minute.
pub(super) fn default_reveal_limit() -> RateLimitPolicy {
    RateLimitPolicy::new(
        NonZeroU32::new(10).expect("10 > 0"),
        Duration::from_secs(60),
    )
}

/// Reveals per actor, in this process.
pub(super) struct RevealLimiter {
    policy: RateLimitPolicy,
    limiter: LocalLimiter<Actor>,
}

impl RevealLimiter {
    pub(super) fn new(policy: RateLimitPolicy, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy,
            limiter: LocalLimiter::new(clock),
        }
    }

    /// Takes one reveal from `actor`'s budget; how long to wait when it is spent.
    fn check(&self, actor: &Actor) -> Result<(), Duration> {
        let decision = self.limiter.check(actor.clone(), &self.policy);
        if decision.allowed {
            Ok(())
        } else {
            Err(decision.retry_after)
        }
    }

    /// The same policy, with fresh budgets read from `clock`.
    pub(super) fn with_clock(&self, clock: Arc<dyn Clock>) -> Self {
        Self::new(self.policy, clock)
    }
}

impl fmt::Debug for RevealLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevealLimiter")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// A successful reveal, for the audit event.
struct Revealed {
    key: ApiKey,
    state: KeyState,
    sealed_by: RevealKeyId,
    resealed: bool,
}

impl KeyManager {
    /// The plaintext of an active viewable key, revealed to `actor`.
    ///
    /// Every attempt is logged with the actor as an audit event (tracing target
    /// `keywarden::audit`, event `key.reveal`), and each actor may reveal at most
    /// [`with_reveal_limit`](Self::with_reveal_limit) keys (default 10 a minute). A key sealed
    /// under a previous reveal key, or in the format written before reveal key ids, is
    /// re-sealed under the current reveal key; if that store write fails the key is still
    /// revealed, and re-sealed on a later reveal.
    ///
    /// # Errors
    /// [`ManageErrorKind::NotRevealable`] when viewable keys are off, the key was created
    /// without them, its reveal key is not in the ring, or the stored ciphertext was altered or
    /// moved from another key; [`ManageErrorKind::Inactive`] for a revoked, disabled or expired
    /// key (see [`reveal_with`](Self::reveal_with)); [`ManageErrorKind::RateLimited`] when
    /// `actor` has spent its budget; also `NotFound` and `Store`.
    pub async fn reveal(&self, id: Uuid, actor: &Actor) -> Result<ApiKey, ManageError> {
        self.reveal_with(id, actor, RevealOptions::default()).await
    }

    /// [`reveal`](Self::reveal), with options: [`RevealOptions::include_inactive`] reveals
    /// revoked, disabled and expired keys too.
    ///
    /// # Errors
    /// As [`reveal`](Self::reveal).
    pub async fn reveal_with(
        &self,
        id: Uuid,
        actor: &Actor,
        options: RevealOptions,
    ) -> Result<ApiKey, ManageError> {
        let result = self.reveal_record(id, actor, options).await;
        match &result {
            Ok(revealed) => tracing::info!(
                target: "keywarden::audit",
                event = "key.reveal",
                outcome = "revealed",
                key_id = %id,
                actor = %actor,
                actor_kind = actor.kind(),
                actor_key_id = actor.key_id().map(tracing::field::display),
                actor_subject = actor.subject(),
                include_inactive = options.include_inactive,
                key_state = revealed.state.as_str(),
                reveal_key_id = %revealed.sealed_by,
                resealed = revealed.resealed,
                "key revealed"
            ),
            Err(error) => tracing::warn!(
                target: "keywarden::audit",
                event = "key.reveal",
                outcome = "refused",
                reason = ?error.kind(),
                key_id = %id,
                actor = %actor,
                actor_kind = actor.kind(),
                actor_key_id = actor.key_id().map(tracing::field::display),
                actor_subject = actor.subject(),
                include_inactive = options.include_inactive,
                %error,
                "key reveal refused"
            ),
        }
        result.map(|revealed| revealed.key)
    }

    async fn reveal_record(
        &self,
        id: Uuid,
        actor: &Actor,
        options: RevealOptions,
    ) -> Result<Revealed, ManageError> {
        let Some(ring) = &self.reveal else {
            return Err(ManageError::not_revealable(
                "viewable keys are not enabled (configure a reveal key)",
            ));
        };
        // Before the lookup: probing ids and states spends the budget too.
        self.reveal_limiter.check(actor).map_err(|wait| {
            ManageError::conflict(format!(
                "too many reveals by {actor}; retry in {} s",
                wait.as_secs_f64().ceil()
            ))
            .with_kind(ManageErrorKind::RateLimited)
        })?;
        let record = self.get(id).await?;
        let state = record.state(self.now());
        if state != KeyState::Active && !options.include_inactive {
            return Err(ManageError::conflict(format!(
                "key {id} is {}: only active keys are revealed unless inactive ones are included",
                state.as_str()
            ))
            .with_kind(ManageErrorKind::Inactive));
        }
        let sealed = record.encrypted_key.as_deref().ok_or_else(|| {
            ManageError::not_revealable("this key was created without viewable keys")
        })?;
        let unsealed = ring.unseal(id, sealed).map_err(|error| match error {
            UnsealError::UnknownKey(key_id) => ManageError::not_revealable(format!(
                "the key was sealed under reveal key {key_id}, which is not configured \
                 (add it to {PREVIOUS_REVEAL_KEYS_ENV})"
            )),
            UnsealError::Invalid => ManageError::not_revealable(
                "the stored ciphertext does not open with the configured reveal keys: it was \
                 altered, moved from another key, or sealed under a reveal key not configured",
            ),
        })?;
        // The event first: a reveal that cannot be recorded does not happen.
        let context = ChangeContext {
            actor: actor.clone(),
            ..self.context().clone()
        };
        self.apply_as(KeyChange::Note(&record), None, None, &context)
            .await?;
        let resealed = !unsealed.current && self.reseal(id, sealed, ring, &unsealed.key).await;
        Ok(Revealed {
            key: unsealed.key,
            state,
            sealed_by: unsealed.sealed_by,
            resealed,
        })
    }

    /// Re-seals under the current reveal key (lazy migration after a reveal key rotation).
    /// Best effort: a failure leaves the old ciphertext, which still opens.
    async fn reseal(&self, id: Uuid, old: &[u8], ring: &RevealKeyRing, key: &ApiKey) -> bool {
        let new = ring.seal(id, key);
        match self.store().reseal(id, old, &new).await {
            Ok(changed) => changed,
            Err(error) => {
                tracing::warn!(
                    target: "keywarden",
                    key_id = %id,
                    %error,
                    "could not re-seal a viewable key under the current reveal key; a later reveal retries"
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::ffi::OsString;

    use super::*;
    use crate::clock::ManualClock;
    use crate::manage::{ExpiresIn, NewKey};
    use crate::secret::SecretRing;
    use crate::store::{KeyPatch, KeyStore, MemoryStore};

    const A: &str = "reveal-key-a-0123456789abcdefghijklmnop";
    const B: &str = "reveal-key-b-0123456789abcdefghijklmnop";
    const C: &str = "reveal-key-c-0123456789abcdefghijklmnop";

    /// Made with Python's `cryptography` from the documented format, not with this code:
    /// reveal secret, key id, plaintext, and the two formats for that row.
    const VECTOR_SECRET: &str = "legacy-reveal-key-0123456789abcdefghij";
    const VECTOR_ROW: &str = "0191e2a4-7b3c-7d4e-8f00-112233445566";
    const VECTOR_KEY: &str = "kw_live_LegacyVector0123456789abcdefghijklmnopqrstuv";
    const VECTOR_ID: &str = "0cd5c87be0d32a53";
    /// Before reveal key ids: nonce ‖ ciphertext ‖ tag, associated data = the row id.
    const LEGACY: &str = "a1b2c3d4e5f60718293a4b5c4fa28191f5c80c6fc69e78f3683fed6c852e0391ddfceadd1ead5c618775b309da67e155dcd267a31fcfac9ab4bac223087bfca307405451045b50329dffb192c1303047";
    /// The same format with a nonce starting with byte 1, so it looks like an envelope.
    const LEGACY_01: &str = "01b2c3d4e5f60718293a4b5c75b30a6253f8cd0dafb681bc38d3ddf180eeb52ad3902d2bafc18b72958d599c72b36cc95ce5e2c1136d114d90f5abe480629f84ab168e89306dbdeefb3cc8cb69ac1f44";
    /// The envelope: 1 ‖ key id ‖ nonce ‖ ciphertext ‖ tag, associated data = 1 ‖ key id ‖ row.
    const ENVELOPE: &str = "010cd5c87be0d32a53a1b2c3d4e5f60718293a4b5c4fa28191f5c80c6fc69e78f3683fed6c852e0391ddfceadd1ead5c618775b309da67e155dcd267a31fcfac9ab4bac223087bfca3a0c91c99c017d3a410d2ab0d2a3ee5fb";

    fn key(secret: &str) -> RevealKey {
        RevealKey::new(&Secret::new(secret).unwrap())
    }

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn opened(ring: &RevealKeyRing, row: Uuid, data: &[u8]) -> Option<(String, RevealKeyId, bool)> {
        ring.unseal(row, data)
            .ok()
            .map(|u| (u.key.expose().to_owned(), u.sealed_by, u.current))
    }

    #[test]
    fn independent_vectors_open_in_both_formats() {
        let row = Uuid::parse_str(VECTOR_ROW).unwrap();
        let vector_key = key(VECTOR_SECRET);
        assert_eq!(vector_key.id().to_string(), VECTOR_ID);
        let alone = RevealKeyRing::new(vector_key.clone());
        let behind = RevealKeyRing::new(key(A)).with_previous(vector_key.clone());
        let expected = Some((VECTOR_KEY.to_owned(), vector_key.id(), true));
        assert_eq!(opened(&alone, row, &unhex(ENVELOPE)), expected);
        assert_eq!(
            RevealKeyId::of_encrypted(&unhex(ENVELOPE)),
            Some(vector_key.id())
        );
        let legacy = Some((VECTOR_KEY.to_owned(), vector_key.id(), false));
        for data in [LEGACY, LEGACY_01] {
            assert_eq!(opened(&alone, row, &unhex(data)), legacy, "current key");
            assert_eq!(opened(&behind, row, &unhex(data)), legacy, "previous key");
        }
        assert_eq!(RevealKeyId::of_encrypted(&unhex(LEGACY)), None);
        let previous = Some((VECTOR_KEY.to_owned(), vector_key.id(), false));
        assert_eq!(opened(&behind, row, &unhex(ENVELOPE)), previous);
    }

    #[test]
    fn envelopes_fail_closed_when_altered_or_moved() {
        let ring = RevealKeyRing::new(key(A)).with_previous(key(B));
        let row = Uuid::now_v7();
        let sealed = ring.seal(row, &ApiKey::new("kw_live_example"));
        assert!(
            !sealed.windows(8).any(|w| w == b"kw_live_"),
            "ciphertext only"
        );
        assert_eq!(RevealKeyId::of_encrypted(&sealed), Some(key(A).id()));
        assert_ne!(
            ring.seal(row, &ApiKey::new("kw_live_example")),
            sealed,
            "random nonce"
        );
        assert!(opened(&ring, row, &sealed).is_some());
        assert!(matches!(
            ring.unseal(Uuid::now_v7(), &sealed),
            Err(UnsealError::Invalid)
        ));
        // Relabelled as sealed by another key of the ring, or by an unknown key.
        let mut relabelled = sealed.clone();
        relabelled[1..HEADER_LEN].copy_from_slice(key(B).id().as_bytes());
        assert!(matches!(
            ring.unseal(row, &relabelled),
            Err(UnsealError::Invalid)
        ));
        relabelled[1..HEADER_LEN].copy_from_slice(key(C).id().as_bytes());
        assert!(matches!(
            ring.unseal(row, &relabelled),
            Err(UnsealError::UnknownKey(id)) if id == key(C).id()
        ));
        for i in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 0x40;
            assert!(ring.unseal(row, &tampered).is_err(), "byte {i}");
        }
        for len in 0..sealed.len() {
            assert!(ring.unseal(row, &sealed[..len]).is_err(), "length {len}");
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(ring.unseal(row, &longer).is_err());
    }

    #[test]
    fn a_rotated_ring_opens_what_the_old_key_sealed() {
        let row = Uuid::now_v7();
        let before = RevealKeyRing::new(key(A));
        let sealed = before.seal(row, &ApiKey::new("kw_live_x"));
        assert_eq!(
            opened(&before, row, &sealed),
            Some(("kw_live_x".into(), key(A).id(), true))
        );
        let after = RevealKeyRing::from_strs(B, Some(&format!(" {A} ,,{B},{A}\n"))).unwrap();
        assert_eq!(after.current_id(), key(B).id());
        assert_eq!(after.previous_ids().collect::<Vec<_>>(), vec![key(A).id()]);
        assert_eq!(
            opened(&after, row, &sealed),
            Some(("kw_live_x".into(), key(A).id(), false))
        );
        let resealed = after.seal(row, &ApiKey::new("kw_live_x"));
        assert_eq!(RevealKeyId::of_encrypted(&resealed), Some(key(B).id()));
        assert!(matches!(
            RevealKeyRing::new(key(B)).unseal(row, &sealed),
            Err(UnsealError::UnknownKey(id)) if id == key(A).id()
        ));
    }

    #[test]
    fn short_keys_are_refused_and_debug_shows_ids_only() {
        assert!(RevealKeyRing::from_strs("short", None).is_err());
        assert!(RevealKeyRing::from_strs(A, Some("short")).is_err());
        let ring = RevealKeyRing::from_strs(A, Some(B)).unwrap();
        for text in [format!("{ring:?}"), format!("{:?}", key(A))] {
            assert!(text.contains(&key(A).id().to_string()), "{text}");
            assert!(!text.contains("0123456789"), "{text}");
        }
    }

    fn load(vars: &[(&'static str, &str)]) -> Result<Option<Loaded>, RevealKeyError> {
        let map: HashMap<&str, OsString> = vars.iter().map(|(k, v)| (*k, (*v).into())).collect();
        RevealKeyRing::load(|name| map.get(name).cloned())
    }

    type Loaded = (RevealKeyRing, Vec<RevealKeyWarning>);

    fn ring(vars: &[(&'static str, &str)]) -> RevealKeyRing {
        load(vars).unwrap().unwrap().0
    }

    use crate::secret::test_files::TempFile;

    #[test]
    fn a_reveal_key_moved_to_the_previous_keys_keeps_its_id_and_opens_what_it_sealed() {
        let row = Uuid::now_v7();
        let with_newline = format!("{A}\n");
        let file = TempFile::new(format!("{A}\r\n").as_bytes());
        let list = TempFile::new(format!("\n{A}\r\n\n").as_bytes());
        for current in [
            vec![(REVEAL_KEY_ENV, with_newline.as_str())],
            vec![(REVEAL_KEY_FILE_ENV, file.path())],
        ] {
            let before = ring(&current);
            assert_eq!(before.current_id(), key(A).id(), "{current:?}");
            let sealed = before.seal(row, &ApiKey::new("kw_live_x"));
            let spaced = format!(" {A} ,");
            for previous in [
                (PREVIOUS_REVEAL_KEYS_ENV, with_newline.as_str()),
                (PREVIOUS_REVEAL_KEYS_ENV, spaced.as_str()),
                (PREVIOUS_REVEAL_KEYS_FILE_ENV, list.path()),
            ] {
                let after = ring(&[(REVEAL_KEY_ENV, B), previous]);
                assert!(after.previous_ids().any(|id| id == key(A).id()));
                assert_eq!(
                    opened(&after, row, &sealed),
                    Some(("kw_live_x".into(), key(A).id(), false)),
                    "{previous:?}"
                );
            }
        }
    }

    #[test]
    fn what_0_1_sealed_under_a_reveal_key_ending_in_a_newline_still_opens() {
        let row = Uuid::now_v7();
        let value = format!("{A}\n");
        // keywarden 0.1 (and the first reveal key ring) used KEYWARDEN_REVEAL_KEY byte for byte.
        let old = RevealKey::new(&Secret::new(value.as_bytes()).unwrap());
        let sealed = RevealKeyRing::new(old.clone()).seal(row, &ApiKey::new("kw_live_x"));
        let (now, warnings) = load(&[(REVEAL_KEY_ENV, &value)]).unwrap().unwrap();
        assert_eq!(now.current_id(), key(A).id());
        assert_eq!(
            opened(&now, row, &sealed),
            Some(("kw_live_x".into(), old.id(), false))
        );
        assert_eq!(
            warnings,
            [RevealKeyWarning::LineBreakDropped {
                current: key(A).id(),
                legacy: old.id(),
            }]
        );
        assert!(!warnings[0].to_string().contains(A));
        // Only KEYWARDEN_REVEAL_KEY was read byte for byte.
        let file = TempFile::new(value.as_bytes());
        let (ring, warnings) = load(&[(REVEAL_KEY_FILE_ENV, file.path())])
            .unwrap()
            .unwrap();
        assert!(ring.previous_ids().next().is_none() && warnings.is_empty());
    }

    #[test]
    fn ambiguous_reveal_keys_are_refused_without_echoing_them() {
        let cases = [
            format!(" {A}"),
            format!("{A} "),
            format!("{A}\t"),
            format!("{A}\n\n"),
            format!("{A}\r"),
            format!("{A} \n"),
            format!("{}\n{}", &A[..20], &A[20..]),
        ];
        for value in &cases {
            let file = TempFile::new(value.as_bytes());
            for (var, given) in [
                (REVEAL_KEY_ENV, value.as_str()),
                (REVEAL_KEY_FILE_ENV, file.path()),
            ] {
                let err = load(&[(var, given)]).unwrap_err();
                assert_eq!(
                    (err.kind(), err.var()),
                    (RevealKeyErrorKind::Ambiguous, var),
                    "{value:?}: {err}"
                );
                assert!(!err.to_string().contains(&A[..20]), "{err}");
            }
        }
        let err = load(&[
            (REVEAL_KEY_ENV, B),
            (
                PREVIOUS_REVEAL_KEYS_ENV,
                &format!("{C},{}\n{}", &A[..20], &A[20..]),
            ),
        ])
        .unwrap_err();
        assert_eq!(err.kind(), RevealKeyErrorKind::Ambiguous);
        assert_eq!(err.var(), PREVIOUS_REVEAL_KEYS_ENV);
        assert!(err.to_string().contains("entry 2"), "{err}");
        // A comma in the current key could not move to the list unchanged: files only.
        let err = load(&[(REVEAL_KEY_ENV, &format!("{A},{B}"))]).unwrap_err();
        assert_eq!(err.kind(), RevealKeyErrorKind::Ambiguous);
        assert!(err.to_string().contains(REVEAL_KEY_FILE_ENV), "{err}");
        assert!(!err.to_string().contains(A), "{err}");
        let file = TempFile::new(format!("{A},{B}\n").as_bytes());
        let id = ring(&[(REVEAL_KEY_FILE_ENV, file.path())]).current_id();
        assert_eq!(id, key(&format!("{A},{B}")).id());
    }

    #[test]
    fn a_variable_and_its_file_form_conflict() {
        let file = TempFile::new(A.as_bytes());
        for (var, file_var, base) in [
            (REVEAL_KEY_ENV, REVEAL_KEY_FILE_ENV, None),
            (
                PREVIOUS_REVEAL_KEYS_ENV,
                PREVIOUS_REVEAL_KEYS_FILE_ENV,
                Some((REVEAL_KEY_ENV, B)),
            ),
        ] {
            let mut vars = vec![(var, A), (file_var, file.path())];
            vars.extend(base);
            let err = load(&vars).unwrap_err();
            assert_eq!(
                (err.kind(), err.var()),
                (RevealKeyErrorKind::Conflicting, var)
            );
            assert!(err.to_string().contains(file_var), "{err}");
            assert!(!err.to_string().contains(A), "{err}");
        }
        // An empty variable is unset: no conflict, and alone it leaves viewable keys off.
        let ring = ring(&[(REVEAL_KEY_ENV, ""), (REVEAL_KEY_FILE_ENV, file.path())]);
        assert_eq!(ring.current_id(), key(A).id());
        assert!(load(&[(REVEAL_KEY_ENV, "")]).unwrap().is_none());
        assert!(load(&[]).unwrap().is_none());
    }

    #[test]
    fn a_file_holds_one_previous_reveal_key_per_line() {
        let file = TempFile::new(format!("{A}\n\n  {C}\r\n{B}\n{A}").as_bytes());
        let ring = ring(&[
            (REVEAL_KEY_ENV, B),
            (PREVIOUS_REVEAL_KEYS_FILE_ENV, file.path()),
        ]);
        assert_eq!(ring.current_id(), key(B).id());
        assert_eq!(
            ring.previous_ids().collect::<Vec<_>>(),
            [key(A).id(), key(C).id()]
        );
        // Commas separate entries only in the variable: in a file they belong to the key.
        let comma = TempFile::new(format!("{A},{C}\n").as_bytes());
        let ring = self::ring(&[
            (REVEAL_KEY_ENV, B),
            (PREVIOUS_REVEAL_KEYS_FILE_ENV, comma.path()),
        ]);
        assert_eq!(
            ring.previous_ids().collect::<Vec<_>>(),
            [key(&format!("{A},{C}")).id()]
        );
        let short = TempFile::new(format!("{A}\n\ntooshort\n").as_bytes());
        let err = load(&[
            (REVEAL_KEY_ENV, B),
            (PREVIOUS_REVEAL_KEYS_FILE_ENV, short.path()),
        ])
        .unwrap_err();
        assert_eq!(
            (err.kind(), err.var()),
            (RevealKeyErrorKind::TooShort, PREVIOUS_REVEAL_KEYS_FILE_ENV)
        );
        assert!(err.to_string().contains("line 3"), "{err}");
        assert!(!err.to_string().contains("tooshort"), "{err}");
    }

    #[test]
    fn missing_short_unreadable_and_non_utf8_values_are_named_errors() {
        let err = load(&[(PREVIOUS_REVEAL_KEYS_ENV, A)]).unwrap_err();
        assert_eq!(
            (err.kind(), err.var()),
            (RevealKeyErrorKind::MissingCurrent, PREVIOUS_REVEAL_KEYS_ENV)
        );
        assert!(!err.to_string().contains(A), "{err}");

        let err = load(&[
            (REVEAL_KEY_ENV, B),
            (PREVIOUS_REVEAL_KEYS_ENV, &format!("{C},tooshort")),
        ])
        .unwrap_err();
        assert_eq!(
            (err.kind(), err.var()),
            (RevealKeyErrorKind::TooShort, PREVIOUS_REVEAL_KEYS_ENV)
        );
        assert!(err.to_string().contains("entry 2"), "{err}");
        assert!(!err.to_string().contains("tooshort") && !err.to_string().contains(B));

        let gone = std::env::temp_dir().join(format!("keywarden-gone-{}", Uuid::now_v7()));
        let err = load(&[(REVEAL_KEY_FILE_ENV, gone.to_str().unwrap())]).unwrap_err();
        assert_eq!(
            (err.kind(), err.var()),
            (RevealKeyErrorKind::File, REVEAL_KEY_FILE_ENV)
        );

        let mut bytes = A.as_bytes().to_vec();
        bytes.push(0xff);
        let file = TempFile::new(&bytes);
        let err = load(&[(REVEAL_KEY_FILE_ENV, file.path())]).unwrap_err();
        assert_eq!(
            (err.kind(), err.var()),
            (RevealKeyErrorKind::NotUnicode, REVEAL_KEY_FILE_ENV)
        );
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let err = RevealKeyRing::load(|name| {
                (name == REVEAL_KEY_ENV).then(|| OsString::from_vec(bytes.clone()))
            })
            .unwrap_err();
            assert_eq!(
                (err.kind(), err.var()),
                (RevealKeyErrorKind::NotUnicode, REVEAL_KEY_ENV)
            );
        }
    }

    #[test]
    fn weak_reveal_keys_are_reported_by_id_and_source() {
        let weak = "ab1".repeat(12);
        let (ring, warnings) = load(&[(REVEAL_KEY_ENV, &weak)]).unwrap().unwrap();
        assert!(
            matches!(&warnings[..], [RevealKeyWarning::Weak { id, source, .. }]
                if *id == ring.current_id() && source == REVEAL_KEY_ENV),
            "{warnings:?}"
        );
        let text = warnings[0].to_string();
        assert!(
            text.contains(REVEAL_KEY_ENV) && !text.contains(&weak[..12]),
            "{text}"
        );
        let file = TempFile::new(format!("{A}\n{weak}\n").as_bytes());
        let (ring, warnings) = load(&[
            (REVEAL_KEY_ENV, B),
            (PREVIOUS_REVEAL_KEYS_FILE_ENV, file.path()),
        ])
        .unwrap()
        .unwrap();
        let weak_id = ring.previous_ids().nth(1).unwrap();
        assert_eq!(
            warnings,
            [RevealKeyWarning::Weak {
                source: format!("{PREVIOUS_REVEAL_KEYS_FILE_ENV} line 2"),
                id: weak_id,
                reason: "it has fewer than 12 distinct bytes",
            }]
        );
        let (_, warnings) = load(&[(REVEAL_KEY_ENV, A), (PREVIOUS_REVEAL_KEYS_ENV, C)])
            .unwrap()
            .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    /// `from_env` is `load` over the process environment; the one case needing no variable
    /// set runs here (the rules are tested through `load`, which touches no process state).
    #[test]
    fn from_strs_reads_as_the_environment_does() {
        assert_eq!(
            RevealKeyRing::from_strs(&format!("{A}\n"), Some(&format!("{B}\n,{C}")))
                .unwrap()
                .previous_ids()
                .collect::<Vec<_>>(),
            [
                key(B).id(),
                key(C).id(),
                RevealKey::new(&Secret::new(format!("{A}\n")).unwrap()).id()
            ]
        );
        assert_eq!(
            RevealKeyRing::from_strs("", None).unwrap_err().kind(),
            RevealKeyErrorKind::TooShort
        );
        assert_eq!(
            RevealKeyRing::from_strs(&format!(" {A}"), None)
                .unwrap_err()
                .kind(),
            RevealKeyErrorKind::Ambiguous
        );
    }

    fn manager(ring: Option<RevealKeyRing>) -> (KeyManager, ManualClock, Arc<MemoryStore>) {
        let clock = ManualClock::new(OffsetDateTime::now_utc());
        let store = Arc::new(MemoryStore::new());
        let secrets = SecretRing::from_strs("reveal-test-secret-0123456789abcdef", None).unwrap();
        let mut manager =
            KeyManager::new(store.clone(), secrets).with_clock(Arc::new(clock.clone()));
        if let Some(ring) = ring {
            manager = manager.with_reveal_keys(ring);
        }
        (manager, clock, store)
    }

    use time::OffsetDateTime;

    #[tokio::test]
    async fn rotating_the_reveal_key_loses_nothing_and_reseals_lazily() {
        let (old, _, store) = manager(Some(RevealKeyRing::from_strs(A, None).unwrap()));
        let created = old.create(NewKey::new("k", "u")).await.unwrap();
        let id = created.record.id;
        let sealed = |store: &Arc<MemoryStore>| {
            let store = store.clone();
            async move { store.get(id).await.unwrap().unwrap().encrypted_key.unwrap() }
        };
        let before = sealed(&store).await;
        assert_eq!(RevealKeyId::of_encrypted(&before), Some(key(A).id()));

        let rotated = KeyManager::new(store.clone(), old.ring.clone())
            .with_reveal_keys(RevealKeyRing::from_strs(B, Some(A)).unwrap());
        assert_eq!(rotated.reveal(id, &Actor::Cli).await.unwrap(), created.key);
        let after = sealed(&store).await;
        assert_eq!(
            RevealKeyId::of_encrypted(&after),
            Some(key(B).id()),
            "re-sealed"
        );
        assert_eq!(
            store.get(id).await.unwrap().unwrap().updated_at,
            created.record.updated_at
        );
        // Once re-sealed, the old reveal key can leave the ring.
        let new_only = KeyManager::new(store.clone(), old.ring.clone())
            .with_reveal_keys(RevealKeyRing::from_strs(B, None).unwrap());
        assert_eq!(new_only.reveal(id, &Actor::Cli).await.unwrap(), created.key);
        assert_eq!(sealed(&store).await, after, "nothing to re-seal");
        // The old key alone no longer opens it: the manager says which key it needs.
        let err = old.reveal(id, &Actor::Cli).await.unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::NotRevealable);
        assert!(err.to_string().contains(&key(B).id().to_string()), "{err}");
    }

    #[tokio::test]
    async fn inactive_keys_are_refused_unless_included() {
        let (m, clock, _) = manager(Some(RevealKeyRing::from_strs(A, None).unwrap()));
        let revoked = m.create(NewKey::new("r", "u")).await.unwrap();
        m.revoke(revoked.record.id).await.unwrap();
        let disabled = m.create(NewKey::new("d", "u")).await.unwrap();
        let patch = KeyPatch {
            disabled: Some(true),
            ..KeyPatch::default()
        };
        m.update(disabled.record.id, patch).await.unwrap();
        let expiring = m
            .create(NewKey::new("e", "u").expires_in(ExpiresIn::DAYS_7))
            .await
            .unwrap();
        assert_eq!(
            m.reveal(expiring.record.id, &Actor::Cli).await.unwrap(),
            expiring.key,
            "active until it expires"
        );
        clock.advance(time::Duration::days(8));
        for (created, state) in [
            (&revoked, "revoked"),
            (&disabled, "disabled"),
            (&expiring, "expired"),
        ] {
            let err = m.reveal(created.record.id, &Actor::Cli).await.unwrap_err();
            assert_eq!(err.kind(), ManageErrorKind::Inactive, "{state}");
            assert!(err.to_string().contains(state), "{err}");
            let shown = m
                .reveal_with(
                    created.record.id,
                    &Actor::Cli,
                    RevealOptions::new().include_inactive(true),
                )
                .await
                .unwrap();
            assert_eq!(shown, created.key, "{state}");
        }
    }

    #[tokio::test]
    async fn reveals_are_limited_per_actor() {
        let (m, clock, _) = manager(Some(RevealKeyRing::from_strs(A, None).unwrap()));
        let created = m.create(NewKey::new("k", "u")).await.unwrap();
        let id = created.record.id;
        let alice = Actor::Other("alice".into());
        for n in 0..10 {
            assert!(m.reveal(id, &alice).await.is_ok(), "reveal {n}");
        }
        let err = m.reveal(id, &alice).await.unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::RateLimited);
        assert!(err.to_string().contains("retry in 6 s"), "{err}");
        // Unknown ids spend the budget too, so ids cannot be probed past it.
        assert_eq!(
            m.reveal(Uuid::now_v7(), &alice).await.unwrap_err().kind(),
            ManageErrorKind::RateLimited
        );
        let caller = Actor::Key {
            id: Uuid::now_v7(),
            subject: "bob".into(),
        };
        assert!(
            m.reveal(id, &caller).await.is_ok(),
            "another actor's budget"
        );
        assert!(m.reveal(id, &Actor::Cli).await.is_ok());
        clock.advance(time::Duration::seconds(6));
        assert!(m.reveal(id, &alice).await.is_ok(), "one back per 6 s");
        assert!(m.reveal(id, &alice).await.is_err());

        let strict = manager(Some(RevealKeyRing::from_strs(A, None).unwrap()))
            .0
            .with_reveal_limit("1/h".parse().unwrap());
        let created = strict.create(NewKey::new("k", "u")).await.unwrap();
        assert!(strict.reveal(created.record.id, &alice).await.is_ok());
        assert_eq!(
            strict
                .reveal(created.record.id, &alice)
                .await
                .unwrap_err()
                .kind(),
            ManageErrorKind::RateLimited
        );
    }

    #[tokio::test]
    async fn a_ciphertext_moved_to_another_key_is_refused() {
        let (m, _, store) = manager(Some(RevealKeyRing::from_strs(A, None).unwrap()));
        let a = m.create(NewKey::new("a", "u")).await.unwrap();
        let b = m.create(NewKey::new("b", "u")).await.unwrap();
        let a_sealed = store
            .get(a.record.id)
            .await
            .unwrap()
            .unwrap()
            .encrypted_key
            .unwrap();
        let b_sealed = store
            .get(b.record.id)
            .await
            .unwrap()
            .unwrap()
            .encrypted_key
            .unwrap();
        assert!(store
            .reseal(b.record.id, &b_sealed, &a_sealed)
            .await
            .unwrap());
        let err = m.reveal(b.record.id, &Actor::Cli).await.unwrap_err();
        assert_eq!(err.kind(), ManageErrorKind::NotRevealable);
        assert_eq!(
            store.get(b.record.id).await.unwrap().unwrap().encrypted_key,
            Some(a_sealed),
            "nothing re-sealed"
        );
    }
}
