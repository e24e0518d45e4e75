#![cfg_attr(feature = "sqlite", doc = include_str!("../README.md"))]
#![cfg_attr(
    not(feature = "sqlite"),
    doc = "keywarden: API-key authentication for tower services. See README.md."
)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(unreachable_pub, missing_debug_implementations)]

/// `get_ref`, `get_mut` and `into_inner` for a middleware service whose inner service is
/// its `inner` field (tower-http's convention).
macro_rules! define_inner_service_accessors {
    () => {
        /// The inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Consumes this service, returning the inner one.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

// The core, in layers (see docs/architecture.md; tests/architecture.rs checks the imports):
// foundation → limits → store → identity → cache → verification → front. Plug-ins beside it.
pub mod audit;
mod body;
mod cache;
pub mod clock;
pub mod credential;
mod credits;
pub mod key;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod net;
mod principal;
pub mod ratelimit;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
pub mod rejection;
pub mod secret;
mod stats;
pub mod store;
mod usage;
mod verify;

pub mod layer;
pub mod scope;

// Plug-ins: each may use the core, never the other way round.
#[cfg(feature = "interop")]
#[cfg_attr(docsrs, doc(cfg(feature = "interop")))]
pub mod interop;
pub mod invalidation;
pub mod manage;
#[cfg(feature = "manage-api")]
#[cfg_attr(docsrs, doc(cfg(feature = "manage-api")))]
pub mod server;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
#[cfg(feature = "webhooks")]
#[cfg_attr(docsrs, doc(cfg(feature = "webhooks")))]
pub mod webhooks;

/// Hooks for the fuzz targets (`fuzz/`) only; not part of the API, may change at any time.
#[doc(hidden)]
pub mod __fuzz {
    use crate::key::{ApiKey, KeyPrefix};

    /// The key `prefix` makes from these 32 random bytes (real keys come from
    /// [`KeyPrefix::generate`]): for round-trip checks.
    pub fn key_from_random(prefix: &KeyPrefix, random: &[u8; 32]) -> ApiKey {
        prefix.key_from_random(random)
    }
}

// What the first README example names.
pub use layer::{
    ApiKeyLayer, ApiKeyLayerBuilder, ApiKeyService, BuildError, Collection, Cost, Mode,
};
#[cfg(feature = "manage-api")]
#[cfg_attr(docsrs, doc(cfg(feature = "manage-api")))]
pub use manage::management_router;
pub use manage::{CreatedKey, ExpiresIn, KeyManager, ManageError, NewKey};
pub use principal::{Identity, Principal};
pub use rejection::{AuthRejection, RejectionKind};
pub use scope::RequireScopeLayer;
pub use secret::{Secret, SecretRing};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::PostgresStore;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use store::SqliteStore;
pub use store::{KeyPatch, KeyQuery, KeyRecord, KeyStore, MemoryStore, OwnerKind, StoreError};
