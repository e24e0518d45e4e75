//! The application secret ring and HMAC-SHA256 key digests.
//!
//! Keys are stored only as `HMAC-SHA256(secret, key)`. The ring holds one current secret and any
//! number of previous ones, so the application secret can be rotated without invalidating a
//! single key: lookups try the current secret first, then the previous ones, and a key found
//! under a previous secret also gets a digest under the current one. Its old digest stays valid
//! until the secret is retired ([`KeyManager::retire_secret`](crate::KeyManager::retire_secret)),
//! so instances still on the old secret keep verifying it.
//!
//! Deployments configure the ring through the environment ([`SecretRing::from_env`], or
//! [`SecretRing::load`] with any lookup): `KEYWARDEN_SECRET` or `KEYWARDEN_SECRET_FILE` for the
//! current secret, `KEYWARDEN_PREVIOUS_SECRETS` (comma-separated) or
//! `KEYWARDEN_PREVIOUS_SECRETS_FILE` (one per line) for previous ones. Every secret is read by
//! the same rule ([`Secret::parse`]: one final line break is dropped, other surrounding
//! whitespace is refused), so a value keeps its identity when it moves from one to another.
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

use zeroize::{Zeroize, Zeroizing};

mod prepared;
use prepared::PreparedHmac;

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// Environment variable holding the current secret.
pub const SECRET_ENV: &str = "KEYWARDEN_SECRET";
/// Environment variable holding previous secrets, comma-separated.
pub const PREVIOUS_SECRETS_ENV: &str = "KEYWARDEN_PREVIOUS_SECRETS";
/// Environment variable naming a file that holds the current secret (instead of
/// [`SECRET_ENV`]): the container secret-mount convention.
pub const SECRET_FILE_ENV: &str = "KEYWARDEN_SECRET_FILE";
/// Environment variable naming a file of previous secrets, one per line (instead of
/// [`PREVIOUS_SECRETS_ENV`]).
pub const PREVIOUS_SECRETS_FILE_ENV: &str = "KEYWARDEN_PREVIOUS_SECRETS_FILE";

/// Fewer distinct bytes than this, and a secret is reported as weak at startup.
const MIN_DISTINCT_BYTES: usize = 12;

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
    /// A secret read from the environment is refused; `origin` names where it was read (a
    /// variable, or a list's variable and entry or line), never the value.
    #[error("{origin}: {error}")]
    At {
        /// The variable, or `<variable> entry N` / `<variable> line N`.
        origin: String,
        /// Why it was refused.
        error: Box<SecretError>,
    },
    /// The environment variable is not set.
    #[error(
        "environment variable {0} is not set, nor {0}_FILE (generate a secret with `keywarden \
         secret generate`)"
    )]
    Missing(&'static str),
    /// The environment variable (or the file it names) is not valid Unicode.
    #[error("environment variable {0} is not valid UTF-8")]
    NotUnicode(&'static str),
    /// A value keywarden cannot read as a secret without guessing: whitespace at its start or
    /// end (beyond one final line break), a line break inside it, or, in
    /// [`SECRET_ENV`], a comma. See [`Secret::parse`].
    #[error("{origin} is ambiguous: {reason}")]
    Ambiguous {
        /// Where the value came from: a variable, or a list's variable and entry.
        origin: String,
        /// What is wrong with it (never the value).
        reason: &'static str,
    },
    /// Both a variable and its `_FILE` form are set.
    #[error("both {0} and {1} are set; set only one")]
    Conflict(&'static str, &'static str),
    /// The file named by a `_FILE` variable cannot be read.
    #[error("cannot read the file named by {variable}: {message}")]
    File {
        /// The `_FILE` variable.
        variable: &'static str,
        /// The I/O error.
        message: String,
    },
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

    /// Reads one secret the way every configured secret is read, from any variable or file:
    ///
    /// - one final line break (`\n` or `\r\n`) ends the value and is not part of the secret
    ///   (`echo`, heredocs and `kubectl create secret --from-file` add one);
    /// - what remains must neither begin nor end with whitespace nor hold a line break,
    ///   otherwise the value is refused as [`SecretError::Ambiguous`] rather than silently
    ///   read as some other secret;
    /// - it must be at least [`MIN_SECRET_LEN`] bytes; every other byte counts as it is.
    ///
    /// ```
    /// use keywarden::Secret;
    ///
    /// let secret = Secret::parse("a-secret-of-at-least-thirty-two-bytes\n").unwrap();
    /// assert_eq!(secret.expose(), b"a-secret-of-at-least-thirty-two-bytes");
    /// assert!(Secret::parse("a-secret-of-at-least-thirty-two-bytes \n").is_err());
    /// ```
    ///
    /// # Errors
    /// [`SecretError::Ambiguous`] or [`SecretError::TooShort`].
    pub fn parse(value: &str) -> Result<Self, SecretError> {
        parse_secret(value, || "the secret".to_owned())
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

/// The bytes are held in [`Zeroizing`], so they are wiped when the secret drops.
impl zeroize::ZeroizeOnDrop for Secret {}

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
    /// and the result passes an optimisation barrier before its one comparison, so all four
    /// words are always read and combined. The barrier is `std::hint::black_box`, inlined
    /// (`subtle`'s default is a call to a function of its own, here once per found-map probe
    /// on every request); the branch on its result tells only what `==` answers.
    fn eq(&self, other: &Self) -> bool {
        let word = |d: &[u8; 32], i: usize| {
            u64::from_ne_bytes(d[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        let diff = (0..4).fold(0u64, |acc, i| acc | (word(&self.0, i) ^ word(&other.0, i)));
        std::hint::black_box(diff) == 0
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
/// The schedule is itself derived from the secret: it is wiped when dropped.
#[derive(Clone)]
struct PreparedSecret {
    id: SecretId,
    mac: PreparedHmac,
}

impl PreparedSecret {
    fn new(secret: &Secret) -> Self {
        let mac = PreparedHmac::new(&secret.bytes);
        // Only 8 of the 32 bytes become the public id; the rest is wiped.
        let full = Zeroizing::new(mac.mac(b"keywarden secret id v1"));
        let mut id = [0u8; 8];
        id.copy_from_slice(&full[..8]);
        Self {
            id: SecretId(id),
            mac,
        }
    }

    fn digest(&self, key: &[u8]) -> Digest {
        Digest(self.mac.mac(key))
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

    /// Reads the ring from the process environment with [`SecretRing::load`] and logs its
    /// warnings (`tracing::warn!`, never secret material).
    ///
    /// # Errors
    /// As [`SecretRing::load`].
    pub fn from_env() -> Result<Self, SecretError> {
        let (ring, warnings) = Self::load(std::env::var_os)?;
        for warning in &warnings {
            tracing::warn!(target: "keywarden", "{warning}");
        }
        Ok(ring)
    }

    /// Reads the ring from variables looked up through `var` (the process environment in
    /// [`SecretRing::from_env`]; a map in tests):
    ///
    /// - the current secret from [`SECRET_ENV`] (`KEYWARDEN_SECRET`), or from the file named
    ///   by [`SECRET_FILE_ENV`] (`KEYWARDEN_SECRET_FILE`);
    /// - previous secrets, optionally, from [`PREVIOUS_SECRETS_ENV`]
    ///   (`KEYWARDEN_PREVIOUS_SECRETS`, comma-separated) or from the file named by
    ///   [`PREVIOUS_SECRETS_FILE_ENV`] (`KEYWARDEN_PREVIOUS_SECRETS_FILE`, one per line).
    ///
    /// Every secret is read by the rules of [`Secret::parse`], so a value means the same secret
    /// wherever it is written, and moving the current secret to the previous ones keeps its
    /// [`SecretId`]. An empty variable counts as unset. In the lists, whitespace around an
    /// entry and empty entries (blank lines) are ignored. A
    /// secret holding a comma can only be written in the files: in `KEYWARDEN_SECRET` it is
    /// refused, since it could not be moved to `KEYWARDEN_PREVIOUS_SECRETS` unchanged.
    ///
    /// keywarden 0.1 used `KEYWARDEN_SECRET` byte for byte. When its value ends in a line
    /// break, those exact bytes are also kept as a previous secret, so keys made by 0.1 keep
    /// verifying (and move to the current secret on first use); a warning says so.
    ///
    /// The warnings returned name secrets that look weak (few distinct bytes, a repeated
    /// pattern) and the line-break case above; they never contain secret material.
    ///
    /// # Errors
    /// [`SecretError::Missing`] without a current secret, [`SecretError::Conflict`] when a
    /// variable and its `_FILE` form are both set, [`SecretError::File`] for an unreadable
    /// file, [`SecretError::NotUnicode`], [`SecretError::Ambiguous`] or
    /// [`SecretError::TooShort`] for a value [`Secret::parse`] refuses.
    pub fn load(
        var: impl FnMut(&'static str) -> Option<std::ffi::OsString>,
    ) -> Result<(Self, Vec<SecretWarning>), SecretError> {
        let values = read_ring(var, &SECRET_VARS)
            .map_err(|e| match e.error {
                // The one error whose text does not say where the value came from.
                SecretError::TooShort { .. } => SecretError::At {
                    origin: e.origin,
                    error: Box::new(e.error),
                },
                other => other,
            })?
            .ok_or(SecretError::Missing(SECRET_ENV))?;
        let mut warnings = Vec::new();
        let weak = |named: &Named, warnings: &mut Vec<SecretWarning>| {
            if let Some(reason) = weakness(named.secret.expose()) {
                warnings.push(SecretWarning::Weak {
                    source: named.source.clone(),
                    id: named.secret.id(),
                    reason,
                });
            }
        };
        weak(&values.current, &mut warnings);
        let mut ring = Self::new(values.current.secret);
        if let Some(legacy) = values.legacy {
            warnings.push(SecretWarning::LineBreakDropped {
                current: ring.current_id(),
                legacy: legacy.id(),
            });
            ring = ring.with_previous(legacy);
        }
        for previous in values.previous {
            weak(&previous, &mut warnings);
            ring = ring.with_previous(previous.secret);
        }
        Ok((ring, warnings))
    }

    /// Builds a ring from a current secret and an optional comma-separated list of previous
    /// ones, read exactly as `KEYWARDEN_SECRET` and `KEYWARDEN_PREVIOUS_SECRETS` are by
    /// [`SecretRing::load`] (warnings are logged).
    ///
    /// # Errors
    /// As [`SecretRing::load`].
    pub fn from_strs(current: &str, previous: Option<&str>) -> Result<Self, SecretError> {
        let (ring, warnings) = Self::load(|name| match name {
            SECRET_ENV => Some(current.into()),
            PREVIOUS_SECRETS_ENV => previous.map(Into::into),
            _ => None,
        })?;
        for warning in &warnings {
            tracing::warn!(target: "keywarden", "{warning}");
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

    /// A key derived from each secret of the ring for one purpose, current first:
    /// `HMAC-SHA256(secret, label)`. `label` must not be a possible API key (give it a NUL
    /// byte), so a derived key is never the digest of a key a store could hold.
    pub(crate) fn derived_keys(&self, label: &[u8]) -> Vec<(SecretId, Zeroizing<[u8; 32]>)> {
        debug_assert!(label.contains(&0), "a label no API key can equal");
        std::iter::once(&self.current)
            .chain(&self.previous)
            .map(|p| (p.id, Zeroizing::new(p.mac.mac(label))))
            .collect()
    }

    /// Whether the ring holds previous secrets.
    pub fn has_previous(&self) -> bool {
        !self.previous.is_empty()
    }
}

/// Something worth an operator's attention in a loaded secret ring. Never holds secret
/// material: secrets are named by where they came from and by their [`SecretId`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecretWarning {
    /// The secret looks weak: replace it with one from `keywarden secret generate`.
    Weak {
        /// Where it came from: a variable, or a list's variable and entry.
        source: String,
        /// Its id.
        id: SecretId,
        /// Why it looks weak.
        reason: &'static str,
    },
    /// `KEYWARDEN_SECRET` ends in a line break, which is not part of the secret; keywarden
    /// 0.1 read it as part of it, so those bytes are kept as a previous secret.
    LineBreakDropped {
        /// The current secret's id (without the line break).
        current: SecretId,
        /// The id of the value with its line break, as keywarden 0.1 read it.
        legacy: SecretId,
    },
}

impl fmt::Display for SecretWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Weak { source, id, reason } => write!(
                f,
                "the secret in {source} (id {id}) looks weak: {reason}; replace it with one \
                 from `keywarden secret generate`"
            ),
            Self::LineBreakDropped { current, legacy } => write!(
                f,
                "{SECRET_ENV} ends with a line break, which is not part of the secret (id \
                 {current}); keywarden 0.1 read it as part of it, so that value (id {legacy}) \
                 is kept as a previous secret and the keys made with it move to {current} when \
                 next used"
            ),
        }
    }
}

/// The variables a ring of secrets is configured through. The application secrets and the
/// reveal keys ([`RevealKeyRing`](crate::manage::RevealKeyRing)) are read by the same rules, here,
/// so a value means the same secret in either ring and wherever it is written.
pub(crate) struct RingVars {
    /// The current value.
    pub(crate) current: &'static str,
    /// A file holding the current value.
    pub(crate) current_file: &'static str,
    /// Previous values, comma-separated.
    pub(crate) previous: &'static str,
    /// A file of previous values, one per line.
    pub(crate) previous_file: &'static str,
    /// Why a comma in `current` is refused: it names `previous` and `current_file`.
    pub(crate) comma: &'static str,
}

/// The application secret's variables.
const SECRET_VARS: RingVars = RingVars {
    current: SECRET_ENV,
    current_file: SECRET_FILE_ENV,
    previous: PREVIOUS_SECRETS_ENV,
    previous_file: PREVIOUS_SECRETS_FILE_ENV,
    comma: "it holds a comma, so it could not be moved to KEYWARDEN_PREVIOUS_SECRETS \
            unchanged; write it in the file named by KEYWARDEN_SECRET_FILE instead",
};

/// A configured secret and where it came from (a variable, or a list's variable and entry),
/// for warnings.
pub(crate) struct Named {
    pub(crate) secret: Secret,
    pub(crate) source: String,
}

/// A ring's values as configured, before each ring derives its keys from them.
pub(crate) struct RingValues {
    pub(crate) current: Named,
    /// The current variable's value byte for byte, when it differs from `current` (it ended in
    /// a line break): keywarden 0.1 used it that way, so what was made with it stays usable.
    pub(crate) legacy: Option<Secret>,
    /// Previous values in the order given (duplicates included; the ring drops them).
    pub(crate) previous: Vec<Named>,
}

/// Why a ring's values could not be read: the error, and the variable at fault.
#[derive(Debug)]
pub(crate) struct LoadError {
    pub(crate) error: SecretError,
    /// The variable whose value (or file) is at fault.
    pub(crate) variable: &'static str,
    /// The variable, or a list's variable and entry (`… entry 2`, `… line 3`).
    pub(crate) origin: String,
}

/// Reads a ring's values through `var` by the rules documented on [`SecretRing::load`];
/// `Ok(None)` when neither the current value nor previous ones are configured.
///
/// # Errors
/// [`SecretError::Missing`] (at fault: the previous variable) when previous values are set
/// without a current one; otherwise as [`SecretRing::load`].
pub(crate) fn read_ring(
    mut var: impl FnMut(&'static str) -> Option<std::ffi::OsString>,
    vars: &RingVars,
) -> Result<Option<RingValues>, LoadError> {
    let at = |variable: &'static str| {
        move |error: SecretError| LoadError {
            error,
            variable,
            origin: variable.to_owned(),
        }
    };
    let current = source(&mut var, vars.current, vars.current_file)?;
    let previous = source(&mut var, vars.previous, vars.previous_file)?;
    let (current, legacy) = match current {
        None => {
            return match previous {
                None => Ok(None),
                Some(previous) => Err(at(previous.variable)(SecretError::Missing(vars.current))),
            }
        }
        Some(Source {
            variable,
            text,
            file: true,
        }) => (parse_named(&text, variable.to_owned(), variable)?, None),
        Some(Source { variable, text, .. }) => {
            if text.contains(',') {
                return Err(at(variable)(SecretError::Ambiguous {
                    origin: variable.to_owned(),
                    reason: vars.comma,
                }));
            }
            let current = parse_named(&text, variable.to_owned(), variable)?;
            let legacy = (current.secret.expose() != text.as_bytes())
                .then(|| Secret::new(text.as_bytes()))
                .transpose()
                .map_err(at(variable))?;
            (current, legacy)
        }
    };
    let mut values = RingValues {
        current,
        legacy,
        previous: Vec::new(),
    };
    if let Some(Source {
        variable,
        text,
        file,
    }) = previous
    {
        let (separator, entry) = if file { ('\n', "line") } else { (',', "entry") };
        for (i, item) in text.split(separator).enumerate() {
            // Whitespace around an entry, and blank entries, belong to the list's syntax
            // (`a, b` works): no secret can begin or end with whitespace anyway, since the
            // rule refuses such a value wherever it is written alone.
            let item = item.trim();
            if !item.is_empty() {
                let origin = format!("{variable} {entry} {}", i + 1);
                values.previous.push(parse_named(item, origin, variable)?);
            }
        }
    }
    Ok(Some(values))
}

/// [`parse_secret`], naming the value in the secret and in the error.
fn parse_named(value: &str, origin: String, variable: &'static str) -> Result<Named, LoadError> {
    match parse_secret(value, || origin.clone()) {
        Ok(secret) => Ok(Named {
            secret,
            source: origin,
        }),
        Err(error) => Err(LoadError {
            error,
            variable,
            origin,
        }),
    }
}

/// A value as read from a variable or from the file its `_FILE` form names.
struct Source {
    /// The variable it was read through (the `_FILE` one for a file).
    variable: &'static str,
    text: Zeroizing<String>,
    file: bool,
}

/// The value of `name` or of the file named by `file_name`; both set is an error.
fn source(
    var: &mut impl FnMut(&'static str) -> Option<std::ffi::OsString>,
    name: &'static str,
    file_name: &'static str,
) -> Result<Option<Source>, LoadError> {
    let fail = |variable: &'static str, error: SecretError| LoadError {
        error,
        variable,
        origin: variable.to_owned(),
    };
    // An empty variable counts as unset (`FOO=${OLD:-}` in a compose file).
    let mut get = |name| var(name).filter(|value| !value.is_empty());
    match (get(name), get(file_name)) {
        (Some(_), Some(_)) => Err(fail(name, SecretError::Conflict(name, file_name))),
        (None, None) => Ok(None),
        (Some(value), None) => value
            .into_string()
            .map(|text| {
                Some(Source {
                    variable: name,
                    text: Zeroizing::new(text),
                    file: false,
                })
            })
            .map_err(|value| {
                // The bytes are secret: wipe them before they are dropped.
                value.into_encoded_bytes().zeroize();
                fail(name, SecretError::NotUnicode(name))
            }),
        (None, Some(path)) => {
            let bytes = std::fs::read(&path).map_err(|e| {
                fail(
                    file_name,
                    SecretError::File {
                        variable: file_name,
                        message: e.to_string(),
                    },
                )
            })?;
            String::from_utf8(bytes)
                .map(|text| {
                    Some(Source {
                        variable: file_name,
                        text: Zeroizing::new(text),
                        file: true,
                    })
                })
                .map_err(|e| {
                    // The bytes are secret: wipe them before the error is dropped.
                    e.into_bytes().zeroize();
                    fail(file_name, SecretError::NotUnicode(file_name))
                })
        }
    }
}

/// [`Secret::parse`], naming the value's source in errors.
fn parse_secret(value: &str, source: impl FnOnce() -> String) -> Result<Secret, SecretError> {
    let value = value
        .strip_suffix("\r\n")
        .or_else(|| value.strip_suffix('\n'))
        .unwrap_or(value);
    let reason = if value.starts_with(|c: char| c.is_whitespace())
        || value.ends_with(|c: char| c.is_whitespace())
    {
        Some("it begins or ends with whitespace (other than one final line break)")
    } else if value.contains(['\n', '\r']) {
        Some("it holds a line break")
    } else {
        None
    };
    if let Some(reason) = reason {
        return Err(SecretError::Ambiguous {
            origin: source(),
            reason,
        });
    }
    Secret::new(value.as_bytes())
}

/// Why a secret looks weak, if it does: few distinct bytes, or a pattern repeated (a period
/// of at most half its length). Generated secrets pass.
pub(crate) fn weakness(bytes: &[u8]) -> Option<&'static str> {
    let mut seen = [false; 256];
    let mut distinct = 0;
    for &b in bytes {
        if !std::mem::replace(&mut seen[usize::from(b)], true) {
            distinct += 1;
        }
    }
    if distinct < MIN_DISTINCT_BYTES {
        return Some("it has fewer than 12 distinct bytes");
    }
    let repeats =
        (1..=bytes.len() / 2).any(|period| bytes.iter().zip(&bytes[period..]).all(|(a, b)| a == b));
    repeats.then_some("it repeats a shorter pattern")
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

/// The loader's rules ([`SecretRing::load`]), through a map of variables: no test touches the
/// process environment.
#[cfg(test)]
mod loading_tests {
    use std::collections::HashMap;
    use std::ffi::OsString;

    use super::*;

    const S: &str = "kPz3Vq9LmW2xR7tY5nB8cJ4hF6gD1sA0eUoIiQwZ";

    fn load(
        vars: &[(&'static str, &str)],
    ) -> Result<(SecretRing, Vec<SecretWarning>), SecretError> {
        let map: HashMap<&str, OsString> = vars.iter().map(|(k, v)| (*k, (*v).into())).collect();
        SecretRing::load(|name| map.get(name).cloned())
    }

    fn ring(vars: &[(&'static str, &str)]) -> SecretRing {
        load(vars).unwrap().0
    }

    use super::test_files::TempFile;

    #[test]
    fn a_value_is_one_secret_wherever_it_is_written() {
        let plain = Secret::new(S).unwrap().id();
        let newline = format!("{S}\n");
        let crlf = format!("{S}\r\n");
        for value in [S, newline.as_str(), crlf.as_str()] {
            assert_eq!(
                ring(&[(SECRET_ENV, value)]).current_id(),
                plain,
                "{value:?}"
            );
            let file = TempFile::new(value.as_bytes());
            assert_eq!(
                ring(&[(SECRET_FILE_ENV, file.path())]).current_id(),
                plain,
                "{value:?}"
            );
            // Moved to the previous secrets, as a variable or a file, it keeps its id.
            let other = Secret::generate();
            let other = std::str::from_utf8(other.expose()).unwrap();
            let moved = ring(&[(SECRET_ENV, other), (PREVIOUS_SECRETS_ENV, value)]);
            assert_eq!(
                moved.previous_ids().collect::<Vec<_>>(),
                [plain],
                "{value:?}"
            );
            let moved = ring(&[
                (SECRET_ENV, other),
                (PREVIOUS_SECRETS_FILE_ENV, file.path()),
            ]);
            assert_eq!(
                moved.previous_ids().collect::<Vec<_>>(),
                [plain],
                "{value:?}"
            );
        }
    }

    #[test]
    fn keys_made_under_a_secret_with_a_newline_verify_after_it_is_moved() {
        let before = ring(&[(SECRET_ENV, &format!("{S}\n"))]);
        let stored = before.digest(b"kw_live_key");
        let next = Secret::generate();
        let next = std::str::from_utf8(next.expose()).unwrap();
        let file = TempFile::new(format!("\n{S}\r\n\n").as_bytes());
        for after in [
            ring(&[
                (SECRET_ENV, next),
                (PREVIOUS_SECRETS_ENV, &format!("{S}\n")),
            ]),
            ring(&[
                (SECRET_ENV, next),
                (PREVIOUS_SECRETS_ENV, &format!(" {S} ,")),
            ]),
            ring(&[(SECRET_ENV, next), (PREVIOUS_SECRETS_FILE_ENV, file.path())]),
        ] {
            assert!(after
                .previous_digests(b"kw_live_key")
                .any(|(id, d)| id == before.current_id() && d == stored));
        }
    }

    #[test]
    fn keys_made_by_0_1_under_a_secret_ending_in_a_newline_keep_verifying() {
        let value = format!("{S}\n");
        // keywarden 0.1 used KEYWARDEN_SECRET byte for byte.
        let old = SecretRing::new(Secret::new(value.as_bytes()).unwrap());
        let stored = old.digest(b"kw_live_key");
        let (now, warnings) = load(&[(SECRET_ENV, &value)]).unwrap();
        assert_eq!(now.current_id(), Secret::new(S).unwrap().id());
        assert!(now
            .previous_digests(b"kw_live_key")
            .any(|(id, d)| id == old.current_id() && d == stored));
        assert_eq!(
            warnings,
            [SecretWarning::LineBreakDropped {
                current: now.current_id(),
                legacy: old.current_id(),
            }]
        );
        // Only KEYWARDEN_SECRET was read byte for byte: the file and the lists add nothing.
        let file = TempFile::new(value.as_bytes());
        let (ring, warnings) = load(&[(SECRET_FILE_ENV, file.path())]).unwrap();
        assert!(!ring.has_previous() && warnings.is_empty());
    }

    #[test]
    fn ambiguous_values_are_refused_without_echoing_them() {
        let cases = [
            format!(" {S}"),
            format!("{S} "),
            format!("{S}\t"),
            format!("{S}\n\n"),
            format!("{S}\r"),
            format!("{S} \n"),
            format!("{}\n{}", &S[..20], &S[20..]),
        ];
        for value in &cases {
            for source in [SECRET_ENV, SECRET_FILE_ENV] {
                let file = TempFile::new(value.as_bytes());
                let given = if source == SECRET_ENV {
                    value.as_str()
                } else {
                    file.path()
                };
                let err = load(&[(source, given)]).unwrap_err();
                assert!(
                    matches!(err, SecretError::Ambiguous { .. }),
                    "{value:?}: {err}"
                );
                assert!(!err.to_string().contains(&S[..20]), "{err}");
            }
            let err = Secret::parse(value).unwrap_err();
            assert!(matches!(err, SecretError::Ambiguous { .. }), "{value:?}");
        }
        // Inside a list, whitespace around an entry is the list's, not the secret's.
        let err = load(&[
            (SECRET_ENV, S),
            (PREVIOUS_SECRETS_ENV, &format!("{}\n{}", &S[..20], &S[20..])),
        ])
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("KEYWARDEN_PREVIOUS_SECRETS entry 1"),
            "{err}"
        );
    }

    #[test]
    fn commas_belong_in_files() {
        let with_comma = format!("{S},tail");
        let err = load(&[(SECRET_ENV, &with_comma)]).unwrap_err();
        assert!(matches!(err, SecretError::Ambiguous { .. }), "{err}");
        assert!(err.to_string().contains(SECRET_FILE_ENV), "{err}");
        assert!(!err.to_string().contains(S), "{err}");

        let current = TempFile::new(format!("{with_comma}\n").as_bytes());
        let id = ring(&[(SECRET_FILE_ENV, current.path())]).current_id();
        assert_eq!(id, Secret::new(with_comma.as_bytes()).unwrap().id());
        let previous = TempFile::new(format!("{with_comma}\n").as_bytes());
        let moved = ring(&[
            (SECRET_ENV, "another-secret-of-at-least-32-bytes-xyz"),
            (PREVIOUS_SECRETS_FILE_ENV, previous.path()),
        ]);
        assert_eq!(moved.previous_ids().collect::<Vec<_>>(), [id]);
    }

    #[test]
    fn a_variable_and_its_file_form_conflict() {
        let file = TempFile::new(S.as_bytes());
        assert_eq!(
            load(&[(SECRET_ENV, S), (SECRET_FILE_ENV, file.path())]).unwrap_err(),
            SecretError::Conflict(SECRET_ENV, SECRET_FILE_ENV)
        );
        assert_eq!(
            load(&[
                (SECRET_ENV, S),
                (PREVIOUS_SECRETS_ENV, S),
                (PREVIOUS_SECRETS_FILE_ENV, file.path())
            ])
            .unwrap_err(),
            SecretError::Conflict(PREVIOUS_SECRETS_ENV, PREVIOUS_SECRETS_FILE_ENV)
        );
        // An empty variable is unset, so it does not conflict with its file form.
        let ring = ring(&[
            (SECRET_ENV, ""),
            (SECRET_FILE_ENV, file.path()),
            (PREVIOUS_SECRETS_ENV, ""),
        ]);
        assert_eq!(ring.current_id(), Secret::new(S).unwrap().id());
        assert!(!ring.has_previous());
        assert_eq!(
            load(&[(SECRET_ENV, "")]).unwrap_err(),
            SecretError::Missing(SECRET_ENV)
        );
    }

    #[test]
    fn missing_unreadable_and_non_utf8_sources_are_errors() {
        assert_eq!(load(&[]).unwrap_err(), SecretError::Missing(SECRET_ENV));
        let gone = std::env::temp_dir().join(format!("keywarden-gone-{}", uuid::Uuid::now_v7()));
        let err = load(&[(SECRET_FILE_ENV, gone.to_str().unwrap())]).unwrap_err();
        assert!(
            matches!(
                err,
                SecretError::File {
                    variable: SECRET_FILE_ENV,
                    ..
                }
            ),
            "{err}"
        );
        let mut bytes = S.as_bytes().to_vec();
        bytes.push(0xff);
        let file = TempFile::new(&bytes);
        assert_eq!(
            load(&[(SECRET_FILE_ENV, file.path())]).unwrap_err(),
            SecretError::NotUnicode(SECRET_FILE_ENV)
        );
        let short = TempFile::new(b"short\n");
        assert_eq!(
            load(&[(SECRET_ENV, S), (PREVIOUS_SECRETS_FILE_ENV, short.path())]).unwrap_err(),
            SecretError::At {
                origin: format!("{PREVIOUS_SECRETS_FILE_ENV} line 1"),
                error: Box::new(SecretError::TooShort { len: 5 }),
            }
        );
        let error = load(&[(SECRET_ENV, "short")]).unwrap_err().to_string();
        assert!(error.starts_with(SECRET_ENV), "{error}");
    }

    #[test]
    fn weak_secrets_are_reported_and_generated_ones_are_not() {
        let repeated = "ab1".repeat(12);
        let pattern = "0123456789abcdef".repeat(2);
        let few = "abcdefghijkkjihgfedcbaacegikbdfhj";
        for weak in [repeated.as_str(), pattern.as_str(), &"x".repeat(40), few] {
            let (ring, warnings) = load(&[(SECRET_ENV, weak)]).unwrap();
            assert!(
                matches!(&warnings[..], [SecretWarning::Weak { id, .. }] if *id == ring.current_id()),
                "{weak}: {warnings:?}"
            );
            let text = warnings[0].to_string();
            assert!(
                text.contains(SECRET_ENV) && !text.contains(&weak[..12]),
                "{text}"
            );
        }
        let (_, warnings) = load(&[(SECRET_ENV, S), (PREVIOUS_SECRETS_ENV, &pattern)]).unwrap();
        assert!(
            matches!(&warnings[..], [SecretWarning::Weak { source, .. }] if source == "KEYWARDEN_PREVIOUS_SECRETS entry 1"),
            "{warnings:?}"
        );
        for _ in 0..2000 {
            let secret = Secret::generate();
            assert_eq!(weakness(secret.expose()), None);
        }
        assert_eq!(weakness(S.as_bytes()), None);
        // Twelve distinct bytes are enough; eleven are not.
        assert_eq!(weakness(b"abcdefghijkllkjihgfedcbaacegikbd"), None);
        assert!(weakness(few.as_bytes()).is_some());
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
        assert_eq!(format!("{secret:?}"), "Secret([redacted])");
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

/// Secret files for the tests of the modules that read them.
#[cfg(test)]
pub(crate) mod test_files {
    /// A file in the temp directory, removed on drop.
    pub(crate) struct TempFile(std::path::PathBuf);

    impl TempFile {
        pub(crate) fn new(contents: &[u8]) -> Self {
            let path = std::env::temp_dir().join(format!(
                "keywarden-secret-{}",
                uuid::Uuid::now_v7().simple()
            ));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }

        pub(crate) fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
