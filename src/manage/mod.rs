//! Key management: create, list, get, update, revoke, rotate and delete keys.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//! use keywarden::{KeyManager, MemoryStore, NewKey, SecretRing, ExpiresIn};
//!
//! let secrets = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
//! let manager = KeyManager::new(Arc::new(MemoryStore::new()), secrets);
//! let created = manager
//!     .create(NewKey::new("ci deploys", "user-42").scope("deploy").expires_in(ExpiresIn::DAYS_30))
//!     .await
//!     .unwrap();
//! // The plaintext exists only here: show it once.
//! assert!(created.key.expose().starts_with("kw_live_"));
//! assert!(created.record.expires_at.is_some());
//! # }
//! ```

mod actor;
mod error;
#[cfg(feature = "manage-api")]
pub(crate) mod http;
mod manager;
mod owners;
mod policy;
mod reveal;
#[cfg(feature = "admin-ui")]
mod ui;
mod usage;
#[cfg(feature = "webhooks")]
mod webhooks;

pub use crate::audit::Actor;
pub use error::{ManageError, ManageErrorKind};
#[cfg(feature = "manage-api")]
pub use http::{management_router, openapi};
pub use manager::{CreatedKey, KeyManager, NewKey};
pub use policy::{
    parse_duration, parse_grace, CreatedKeyView, DurationParseError, ExpiresIn, GraceParseError,
    KeyPageView, KeyView, DEFAULT_GRACE,
};
pub use reveal::{
    RevealKey, RevealKeyError, RevealKeyErrorKind, RevealKeyId, RevealKeyRing, RevealKeyWarning,
    RevealOptions, PREVIOUS_REVEAL_KEYS_ENV, PREVIOUS_REVEAL_KEYS_FILE_ENV, REVEAL_KEY_ENV,
    REVEAL_KEY_FILE_ENV,
};
#[cfg(feature = "admin-ui")]
pub use ui::admin_ui;
pub use usage::{Granularity, UsageBucket, UsageQuery, UsageReport};
#[cfg(feature = "webhooks")]
pub use webhooks::NewWebhook;
