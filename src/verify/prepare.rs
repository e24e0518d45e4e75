//! Credential preparation: the synchronous first step of every request. Extracts the
//! credential, checks its format and digests it; no allocation, no I/O.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;

use crate::credential::{
    Credential, CredentialError, CredentialExtractor, CredentialSource, HeaderSources,
};
use crate::key::{validate_opaque, KeyError, KeyFormat};
use crate::ratelimit::RateLimitPolicy;
use crate::rejection::{AuthRejection, RejectionKind};
use crate::secret::{Digest, SecretId, SecretRing};
use crate::store::ForeignDigest;

use super::resolve::ForeignCollection;

/// A configured collection, as the request path needs it.
pub(crate) struct CollectionConfig {
    pub(crate) slug: Box<str>,
    /// Accepts keys outside keywarden's format (opaque and foreign collections).
    pub(crate) opaque: bool,
    /// The budget all the keys of one owner share, if any.
    pub(crate) owner_rate_limit: Option<RateLimitPolicy>,
}

/// What a request presented, decided before any I/O.
pub(crate) enum Presented {
    /// A credential that is wrong whatever the store says.
    Reject(AuthRejection),
    /// No credential at all.
    Nothing,
    /// A well-formed key, digested.
    Key(PresentedKey),
}

/// A well-formed key, digested. Owns no request data.
pub(crate) struct PresentedKey {
    pub(crate) digest: Digest,
    /// The collection the `Authorization: <slug> API-Key` form named.
    pub(crate) binding: Option<usize>,
    /// Accepted as a foreign (opaque) format: only opaque collections may own it.
    pub(crate) opaque: bool,
    pub(crate) from_authorization: bool,
    /// Which configured API-key headers carried it.
    pub(crate) headers: HeaderSources,
    /// The headers that carried it are already marked sensitive
    /// ([`CredentialCheck::prepare_marking`]).
    pub(crate) marked: bool,
}

/// What a cache miss needs beyond the current digest: digests under previous secrets (lazy
/// migration) and, for keys not in keywarden's format, each foreign scheme's digests.
/// Computed only on a miss, from the key re-read from the request.
#[derive(Debug, Default)]
pub(crate) struct MissDigests {
    pub(crate) previous: Vec<(SecretId, Digest)>,
    /// Per foreign collection (by index), the digests its issuer may have stored.
    pub(crate) foreign: Vec<(usize, Vec<ForeignDigest>)>,
}

/// Turns request headers into a [`Presented`] key: extraction, format, digest.
pub(crate) struct CredentialCheck {
    /// For a required layer: a `Bearer` token that is not a keywarden key is the credential
    /// only when there is no other.
    pub(crate) required: CredentialExtractor,
    /// For an optional layer: such a token is always left to another layer.
    pub(crate) optional: CredentialExtractor,
    pub(crate) format: KeyFormat,
    pub(crate) ring: SecretRing,
    pub(crate) collections: Arc<[CollectionConfig]>,
    pub(crate) any_opaque: bool,
    /// Remove the credential headers before the inner service (else only mark them sensitive).
    pub(crate) strip: bool,
}

impl CredentialCheck {
    fn extractor(&self, optional: bool) -> &CredentialExtractor {
        if optional {
            &self.optional
        } else {
            &self.required
        }
    }

    /// Extracts, format-checks and digests the credential. No allocation, no I/O.
    pub(crate) fn prepare(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        optional: bool,
    ) -> Presented {
        self.present(self.extractor(optional).extract(headers, query))
    }

    /// [`prepare`](Self::prepare) for a request the layer admits: when one pass over the
    /// headers can find the credential, it also marks the headers that carried it sensitive
    /// ([`PresentedKey::marked`]), so admission need not look them up again. `None`: that
    /// pass does not apply (see `CredentialExtractor::extract_marking`); call `prepare`.
    pub(crate) fn prepare_marking(
        &self,
        headers: &mut HeaderMap,
        optional: bool,
    ) -> Option<Presented> {
        let mut presented = self
            .extractor(optional)
            .extract_marking(headers, |extracted| self.present(extracted))?;
        if let Presented::Key(key) = &mut presented {
            key.marked = true;
        }
        Some(presented)
    }

    /// Format-checks and digests an extracted credential.
    fn present(&self, extracted: Result<Option<Credential<'_>>, CredentialError>) -> Presented {
        let credential = match extracted {
            Ok(Some(credential)) => credential,
            Ok(None) => return Presented::Nothing,
            Err(error) => return Presented::Reject(credential_rejection(error)),
        };
        let key = credential.key();
        let binding = match credential.source() {
            CredentialSource::Collection(index) => Some(index),
            _ => None,
        };
        let mut opaque = false;
        if let Err(error) = self.format.parse(key) {
            // A key with our prefix is ours to judge: a bad one is malformed, never "opaque".
            let opaque_allowed = !self.format.claims(key)
                && match binding {
                    Some(index) => self.collections[index].opaque,
                    None => self.any_opaque,
                };
            if !opaque_allowed || validate_opaque(key).is_err() {
                return Presented::Reject(AuthRejection::new(
                    RejectionKind::MalformedKey,
                    key_error_detail(error),
                ));
            }
            opaque = true;
        }
        Presented::Key(PresentedKey {
            digest: self.ring.digest(key),
            binding,
            opaque,
            from_authorization: credential.from_authorization(),
            headers: credential.header_sources(),
            marked: false,
        })
    }

    /// Digests of the key under previous secrets and foreign schemes, for a cache miss.
    /// Re-extracts the key from the request rather than copying it on the hit path.
    pub(crate) fn miss_digests(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        foreign: &[ForeignCollection],
        optional: bool,
    ) -> MissDigests {
        if !self.ring.has_previous() && foreign.is_empty() {
            return MissDigests::default();
        }
        let Ok(Some(credential)) = self.extractor(optional).extract(headers, query) else {
            return MissDigests::default();
        };
        let key = credential.key();
        let previous = if self.ring.has_previous() {
            self.ring.previous_digests(key).collect()
        } else {
            Vec::new()
        };
        // A key in keywarden's format is never looked up in a foreign store.
        let foreign = if foreign.is_empty() || self.format.parse(key).is_ok() {
            Vec::new()
        } else {
            foreign
                .iter()
                .enumerate()
                .map(|(index, collection)| (index, collection.scheme.digests(key)))
                .filter(|(_, digests)| !digests.is_empty())
                .collect()
        };
        MissDigests { previous, foreign }
    }

    /// Marks the credential headers sensitive, and strips them if configured. Only the headers
    /// that carried the credential are touched: a configured API-key header that is present
    /// always carried it (extraction fails otherwise), so this is every credential header.
    #[inline]
    pub(crate) fn protect_headers(&self, headers: &mut HeaderMap, key: &PresentedKey) {
        // The hit path's usual case, inlined: the one pass over the headers marked them.
        if key.marked && !self.strip {
            return;
        }
        self.protect_unmarked(headers, key);
    }

    fn protect_unmarked(&self, headers: &mut HeaderMap, key: &PresentedKey) {
        let names = self.required.header_names();
        let names = match key.headers {
            HeaderSources::None => &[][..],
            HeaderSources::One(index) => &names[index..=index],
            HeaderSources::Several => names,
        };
        if self.strip {
            if key.from_authorization {
                headers.remove(AUTHORIZATION);
            }
            for name in names {
                headers.remove(name);
            }
            return;
        }
        // Not stripping, so not marked yet (`protect_headers` returned for that).
        if key.from_authorization {
            if let Some(value) = headers.get_mut(AUTHORIZATION) {
                value.set_sensitive(true);
            }
        }
        for name in names {
            if let Some(value) = headers.get_mut(name) {
                value.set_sensitive(true);
            }
        }
    }
}

fn credential_rejection(error: CredentialError) -> AuthRejection {
    match error {
        CredentialError::Ambiguous => AuthRejection::new(
            RejectionKind::AmbiguousCredentials,
            "send exactly one API key, in one header",
        ),
        CredentialError::UnknownCollection => AuthRejection::new(
            RejectionKind::InvalidKey,
            "the Authorization header names an unknown collection",
        ),
        CredentialError::Malformed(detail) => {
            AuthRejection::new(RejectionKind::MalformedKey, detail)
        }
    }
}

fn key_error_detail(error: KeyError) -> &'static str {
    match error {
        KeyError::WrongPrefix => "the key does not have a recognised prefix",
        KeyError::WrongLength => "the key has the wrong length",
        KeyError::BadAlphabet => "the key contains an invalid character",
        KeyError::BadChecksum => "the key's checksum does not match (typo or truncated key?)",
        KeyError::InvalidPrefix => "the key is malformed",
    }
}
