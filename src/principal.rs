//! The authenticated caller, as handlers see it.
//!
//! The layer inserts a [`Principal`] into the request extensions. In axum, extract it directly
//! (`Principal`, or `Option<Principal>` on routes behind an optional layer):
//!
//! ```
//! use axum::{routing::get, Router};
//! use keywarden::Principal;
//!
//! async fn whoami(principal: Principal) -> String {
//!     format!("{} ({})", principal.subject(), principal.key_name())
//! }
//!
//! async fn maybe(principal: Option<Principal>) -> &'static str {
//!     if principal.is_some() { "hello, key holder" } else { "hello, stranger" }
//! }
//!
//! let app: Router = Router::new().route("/whoami", get(whoami)).route("/", get(maybe));
//! # let _ = app;
//! ```

use std::sync::Arc;

use http::request::Parts;
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::ratelimit::RateLimitPolicy;
use crate::rejection::{AuthRejection, RejectionKind};
use crate::store::{KeyRecord, OwnerKind};

/// The identity behind a verified key. Cheap to clone (one `Arc`).
#[derive(Clone, Debug, PartialEq)]
pub struct Principal(Arc<PrincipalData>);

#[derive(Debug, PartialEq, Serialize)]
struct PrincipalData {
    key_id: Uuid,
    key_name: String,
    collection: String,
    subject: String,
    owner_kind: OwnerKind,
    scopes: Vec<String>,
    environment: String,
    read_only: bool,
    metadata: serde_json::Value,
    #[serde(with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    rate_limit: Option<RateLimitPolicy>,
}

impl Principal {
    pub(crate) fn from_record(record: &KeyRecord) -> Self {
        Self(Arc::new(PrincipalData {
            key_id: record.id,
            key_name: record.name.clone(),
            collection: record.collection.clone(),
            subject: record.subject.clone(),
            owner_kind: record.owner_kind,
            scopes: record.scopes.clone(),
            environment: record.environment.clone(),
            read_only: record.read_only,
            metadata: record.metadata.clone(),
            expires_at: record.expires_at,
            rate_limit: record.rate_limit,
        }))
    }

    /// The key's id.
    pub fn key_id(&self) -> Uuid {
        self.0.key_id
    }

    /// The key's name.
    pub fn key_name(&self) -> &str {
        &self.0.key_name
    }

    /// The collection the key belongs to (`users`, `teams`, ...).
    pub fn collection(&self) -> &str {
        &self.0.collection
    }

    /// The owner's id.
    pub fn subject(&self) -> &str {
        &self.0.subject
    }

    /// The owner's kind.
    pub fn owner_kind(&self) -> OwnerKind {
        self.0.owner_kind
    }

    /// The granted scopes.
    pub fn scopes(&self) -> &[String] {
        &self.0.scopes
    }

    /// The environment of the key's prefix (`live`, `test`, ...).
    pub fn environment(&self) -> &str {
        &self.0.environment
    }

    /// Whether the key may only use safe methods.
    pub fn is_read_only(&self) -> bool {
        self.0.read_only
    }

    /// The key's metadata.
    pub fn metadata(&self) -> &serde_json::Value {
        &self.0.metadata
    }

    /// The key's expiry.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.0.expires_at
    }

    /// The key's own rate limit, if any.
    pub fn rate_limit(&self) -> Option<RateLimitPolicy> {
        self.0.rate_limit
    }

    /// Whether the key grants `scope`: an exact match, `*`, or `prefix:*` for any scope
    /// starting with `prefix:`.
    ///
    /// ```
    /// # let principal = keywarden::Principal::for_tests(&["keys:*", "read"]);
    /// assert!(principal.has_scope("read"));
    /// assert!(principal.has_scope("keys:admin"));
    /// assert!(!principal.has_scope("write"));
    /// ```
    pub fn has_scope(&self, scope: &str) -> bool {
        self.0
            .scopes
            .iter()
            .any(|granted| scope_grants(granted, scope))
    }

    /// A principal with the given scopes and placeholder fields, for tests and doc examples.
    #[doc(hidden)]
    pub fn for_tests(scopes: &[&str]) -> Self {
        Self(Arc::new(PrincipalData {
            key_id: Uuid::nil(),
            key_name: "test".into(),
            collection: "users".into(),
            subject: "test".into(),
            owner_kind: OwnerKind::User,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            environment: "test".into(),
            read_only: false,
            metadata: serde_json::Value::Null,
            expires_at: None,
            rate_limit: None,
        }))
    }
}

pub(crate) fn scope_grants(granted: &str, wanted: &str) -> bool {
    if granted == "*" || granted == wanted {
        return true;
    }
    match granted.strip_suffix('*') {
        Some(prefix) if prefix.ends_with(':') => wanted.starts_with(prefix),
        _ => false,
    }
}

impl Serialize for Principal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<S: Send + Sync> axum_core::extract::FromRequestParts<S> for Principal {
    type Rejection = AuthRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Principal>().cloned().ok_or_else(|| {
            AuthRejection::new(
                RejectionKind::MissingCredentials,
                "this route requires an API key",
            )
        })
    }
}

impl<S: Send + Sync> axum_core::extract::OptionalFromRequestParts<S> for Principal {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Principal>().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_matching_rules() {
        assert!(scope_grants("*", "anything"));
        assert!(scope_grants("read", "read"));
        assert!(!scope_grants("read", "reader"));
        assert!(scope_grants("keys:*", "keys:admin"));
        assert!(!scope_grants("keys:*", "keysX"));
        assert!(
            !scope_grants("keys*", "keys:admin"),
            "only `prefix:*` is a wildcard"
        );
        assert!(!scope_grants("", "read"));
    }

    #[test]
    fn serializes_for_whoami() {
        let p = Principal::for_tests(&["a"]);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["scopes"], serde_json::json!(["a"]));
        assert_eq!(json["owner_kind"], "user");
        assert!(json["expires_at"].is_null());
    }
}
