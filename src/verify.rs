//! The verification pipeline shared by every clone of the layer and service.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderMap, Method};
use time::OffsetDateTime;

use crate::cache::{Identity, KeyCache, Lookup, Resolved};
use crate::clock::Clock;
use crate::credential::{CredentialError, CredentialExtractor, CredentialSource};
use crate::interop::{ForeignSources, MissKeys};
use crate::key::{validate_opaque, KeyError, KeyFormat};
use crate::principal::Principal;
use crate::rejection::{AuthRejection, RejectionKind};
use crate::secret::{Digest, SecretRing};
use crate::store::{KeyRecord, KeyStore, StoreError};
use crate::usage::UsageRecorder;

/// Whether requests without a credential are rejected or passed through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// No credential → 401 `missing_credentials`.
    #[default]
    Required,
    /// No credential → the request passes with no principal; a `Bearer` token without a
    /// keywarden prefix is left to another authentication layer. A credential that is ours but
    /// invalid is still rejected.
    Optional,
}

pub(crate) type IdentityMapper = Arc<dyn Fn(&Principal) -> Arc<dyn Identity> + Send + Sync>;

pub(crate) struct CollectionConfig {
    pub(crate) slug: Box<str>,
    pub(crate) opaque: bool,
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) ring: SecretRing,
    pub(crate) format: KeyFormat,
    pub(crate) extractor: CredentialExtractor,
    pub(crate) collections: Vec<CollectionConfig>,
    pub(crate) any_opaque: bool,
    pub(crate) mode: Mode,
    pub(crate) strip: bool,
    pub(crate) cache: KeyCache,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) identity: Option<IdentityMapper>,
    pub(crate) usage: Option<Arc<UsageRecorder>>,
    /// Collections verified by a foreign scheme against a read-only store.
    pub(crate) foreign: ForeignSources,
}

/// The synchronous first half of a request: what to do before any I/O.
pub(crate) enum Prepared {
    Reject(AuthRejection),
    Anonymous,
    Lookup(Lookup1),
}

/// A well-formed credential, digested. Owns no request data.
pub(crate) struct Lookup1 {
    pub(crate) digest: Digest,
    pub(crate) binding: Option<usize>,
    /// Accepted as a foreign (opaque) format: only opaque collections may own it.
    pub(crate) opaque: bool,
    pub(crate) from_authorization: bool,
}

impl Shared {
    /// Extracts, format-checks and digests the credential. No allocation, no I/O.
    pub(crate) fn prepare(&self, headers: &HeaderMap, query: Option<&str>) -> Prepared {
        let credential = match self.extractor.extract(headers, query) {
            Ok(Some(credential)) => credential,
            Ok(None) => return Prepared::Anonymous,
            Err(error) => return Prepared::Reject(credential_rejection(error)),
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
                return Prepared::Reject(AuthRejection::new(
                    RejectionKind::MalformedKey,
                    key_error_detail(error),
                ));
            }
            opaque = true;
        }
        Prepared::Lookup(Lookup1 {
            digest: self.ring.digest(key),
            binding,
            opaque,
            from_authorization: credential.from_authorization(),
        })
    }

    /// Digests of the key under previous secrets and foreign schemes, for a cache miss.
    /// Re-extracts the key from the request rather than copying it on the hit path.
    pub(crate) fn previous_digests(&self, headers: &HeaderMap, query: Option<&str>) -> MissKeys {
        if !self.ring.has_previous() && self.foreign.is_empty() {
            return MissKeys::default();
        }
        match self.extractor.extract(headers, query) {
            Ok(Some(credential)) => MissKeys::new(self, credential.key()),
            _ => MissKeys::default(),
        }
    }

    /// The cached lookup, if any: the hit path.
    pub(crate) async fn resolve_cached(
        &self,
        digest: &Digest,
    ) -> Option<Result<Arc<Resolved>, AuthRejection>> {
        self.cache.get(digest).await.map(found)
    }

    /// A cache miss: one store query, shared by concurrent misses of the same digest.
    pub(crate) async fn resolve_miss(
        &self,
        digest: Digest,
        previous: MissKeys,
    ) -> Result<Arc<Resolved>, AuthRejection> {
        let lookup = self
            .cache
            .get_or_load(digest, || self.load(digest, &previous))
            .await
            .map_err(|error| {
                tracing::warn!(target: "keywarden", error = %error, "key store lookup failed");
                AuthRejection::new(
                    RejectionKind::StoreUnavailable,
                    "the key store is unavailable; retry shortly",
                )
            })?;
        found(lookup)
    }

    async fn load(&self, digest: Digest, keys: &MissKeys) -> Result<Lookup, StoreError> {
        // A collection has one source: native rows filed under a foreign collection are ignored.
        if let Some(record) = (self.store.find_by_digest(&digest).await?)
            .filter(|r| !self.foreign.owns(&r.collection))
        {
            return Ok(Lookup::Found(self.resolved(&record)));
        }
        for &(secret_id, old) in &keys.previous {
            let Some(record) = self.store.find_by_digest(&old).await? else {
                continue;
            };
            // Lazy migration: from now on the key is found under the current secret.
            match self
                .store
                .redigest(record.id, &old, &digest, self.ring.current_id())
                .await
            {
                Ok(_) => tracing::info!(
                    target: "keywarden",
                    key_id = %record.id,
                    from_secret = %secret_id,
                    to_secret = %self.ring.current_id(),
                    "re-digested key under the current secret"
                ),
                Err(error) => tracing::warn!(
                    target: "keywarden",
                    key_id = %record.id,
                    error = %error,
                    "could not re-digest key; it stays valid under the previous secret"
                ),
            }
            return Ok(Lookup::Found(self.resolved(&record)));
        }
        self.load_foreign(keys).await
    }

    pub(crate) fn resolved(&self, record: &KeyRecord) -> Arc<Resolved> {
        Arc::new(Resolved::new(record, |principal| {
            self.identity.as_ref().map(|map| map(principal))
        }))
    }

    /// Checks a resolved key against the request. The collection is checked first so a key of
    /// another collection is indistinguishable from an unknown one.
    pub(crate) fn check(
        &self,
        resolved: &Resolved,
        lookup: &Lookup1,
        method: &Method,
        now: OffsetDateTime,
    ) -> Result<(), AuthRejection> {
        let collection = resolved.principal.collection();
        let configured = self.collections.iter().find(|c| *c.slug == *collection);
        let collection_ok = match lookup.binding {
            Some(index) => *self.collections[index].slug == *collection,
            None => self.collections.is_empty() || configured.is_some(),
        } && (!lookup.opaque || configured.is_some_and(|c| c.opaque));
        if !collection_ok {
            return Err(AuthRejection::new(
                RejectionKind::InvalidKey,
                "the key is not recognised",
            ));
        }
        if resolved.revoked {
            return Err(AuthRejection::new(
                RejectionKind::RevokedKey,
                "the key has been revoked",
            ));
        }
        if resolved.disabled {
            return Err(AuthRejection::new(
                RejectionKind::RevokedKey,
                "the key is disabled",
            ));
        }
        if resolved.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthRejection::new(
                RejectionKind::ExpiredKey,
                "the key has expired",
            ));
        }
        if resolved.read_only && !method.is_safe() {
            return Err(AuthRejection::new(
                RejectionKind::InsufficientScope,
                "the key is read-only; only GET, HEAD, OPTIONS and TRACE are allowed",
            ));
        }
        Ok(())
    }

    /// Notes a successful use, written behind in batches.
    pub(crate) fn record_use(&self, resolved: &Resolved, now: OffsetDateTime) {
        if let Some(usage) = &self.usage {
            if self.foreign.owns(resolved.principal.collection()) {
                return; // a foreign store is never written to
            }
            usage.record(resolved.principal.key_id(), now);
        }
    }

    /// Marks the credential headers sensitive, and strips them if configured.
    pub(crate) fn protect_headers(&self, headers: &mut HeaderMap, from_authorization: bool) {
        if self.strip {
            if from_authorization {
                headers.remove(AUTHORIZATION);
            }
            for name in self.extractor.header_names() {
                headers.remove(name);
            }
            return;
        }
        if from_authorization {
            if let Some(value) = headers.get_mut(AUTHORIZATION) {
                value.set_sensitive(true);
            }
        }
        for name in self.extractor.header_names() {
            if let Some(value) = headers.get_mut(name) {
                value.set_sensitive(true);
            }
        }
    }
}

fn found(lookup: Lookup) -> Result<Arc<Resolved>, AuthRejection> {
    match lookup {
        Lookup::Found(resolved) => Ok(resolved),
        Lookup::Missing => Err(AuthRejection::new(
            RejectionKind::InvalidKey,
            "the key is not recognised",
        )),
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
