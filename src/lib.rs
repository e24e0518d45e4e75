#![cfg_attr(feature = "sqlite", doc = include_str!("../README.md"))]
#![cfg_attr(
    not(feature = "sqlite"),
    doc = "keywarden: API-key authentication for tower services. See README.md."
)]
#![deny(missing_docs, unsafe_code)]
#![warn(unreachable_pub, missing_debug_implementations)]

mod body;
mod cache;
mod clock;
mod credential;
mod interop;
mod invalidation;
mod key;
mod layer;
mod manage;
mod principal;
mod ratelimit;
#[cfg(feature = "redis")]
mod redis_backend;
mod rejection;
mod scope;
mod secret;
mod service;
mod stats;
mod store;
mod usage;
mod verify;

pub use body::AuthBody;
pub use clock::{Clock, ManualClock, SystemClock};
pub use credential::{
    Credential, CredentialError, CredentialExtractor, CredentialSource, X_API_KEY,
};
pub use interop::{
    is_strapi_token, DigestScheme, ForeignAlgorithm, ForeignDigest, PayloadHash, PayloadScheme,
    PayloadSchemeError, PayloadTable, StrapiScheme, StrapiSchemeError, StrapiTables,
};
#[cfg(feature = "interop")]
pub use interop::{PayloadStore, StrapiStore};
pub use invalidation::{Invalidation, InvalidationListener, InvalidationPublisher, PublishError};
pub use key::{
    validate_opaque, ApiKey, KeyError, KeyFormat, KeyPrefix, ParsedKey, BODY_LEN, CHECKSUM_LEN,
    KEY_REGEX, MAX_KEY_LEN,
};
pub use layer::{ApiKeyLayer, ApiKeyLayerBuilder, BuildError, BuildErrorKind, Collection};
#[cfg(feature = "manage-api")]
pub use manage::management_router;
pub use manage::{
    parse_duration, parse_grace, Actor, CreatedKey, CreatedKeyView, DurationParseError, ExpiresIn,
    GraceParseError, KeyManager, KeyPageView, KeyView, ManageError, ManageErrorKind, NewKey,
    RevealKey, RevealKeyError, RevealKeyErrorKind, RevealKeyId, RevealKeyRing, RevealKeyWarning,
    RevealOptions, DEFAULT_GRACE, PREVIOUS_REVEAL_KEYS_ENV, PREVIOUS_REVEAL_KEYS_FILE_ENV,
    REVEAL_KEY_ENV, REVEAL_KEY_FILE_ENV,
};
pub use principal::Principal;
pub use ratelimit::{
    BlockedClients, ClientAddr, ClientAddress, FailedAttemptLimit, RateLimitParseError,
    RateLimitPolicy, RateLimiter,
};
#[cfg(feature = "redis")]
pub use redis_backend::{RedisBackend, RedisBackendError, RedisBackendErrorKind};
pub use rejection::{AuthRejection, RateLimitStatus, RejectionKind};
pub use scope::{RequireScope, RequireScopeService};
pub use secret::{
    Digest, DigestParseError, Secret, SecretError, SecretId, SecretRing, SecretWarning,
    MIN_SECRET_LEN, PREVIOUS_SECRETS_ENV, PREVIOUS_SECRETS_FILE_ENV, SECRET_ENV, SECRET_FILE_ENV,
};
pub use service::{ApiKeyService, ResponseFuture};
pub use stats::LayerStats;
#[cfg(feature = "postgres")]
pub use store::PostgresStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{
    KeyPage, KeyPatch, KeyQuery, KeyRecord, KeyState, KeyStateParseError, KeyStore, KeyUsage,
    MemoryStore, OwnerKind, OwnerKindParseError, SecretRetirement, StoreError, StoreErrorKind,
    UnmigratedKeys,
};
pub use verify::Mode;
