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

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use http::request::Parts;
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::net::IpNetwork;
use crate::ratelimit::RateLimitPolicy;
use crate::rejection::{AuthRejection, RejectionKind};
use crate::store::{KeyRecord, OwnerKind};

/// The namespace of the scopes that manage keywarden itself.
const MANAGEMENT_NAMESPACE: &str = "keys:";

/// Whether `scope` manages keywarden itself (the `keys:` namespace): such a scope is granted
/// only by its exact name, and never to a foreign principal.
pub(crate) fn is_management_scope(scope: &str) -> bool {
    scope.starts_with(MANAGEMENT_NAMESPACE)
}

/// The identity behind a verified key. Cheap to clone (one `Arc`).
#[derive(Clone, PartialEq)]
pub struct Principal(Arc<Compact>);

/// One per cached key, so it is kept small: the fields keys have in common live in a shared
/// [`Profile`], the two per-key strings in one allocation, and the usual metadata (`null` or
/// `{}`) in none.
///
/// `repr(C)`, in this order: what every request reads (the id, the expiry, the profile) comes
/// right after the reference count that every request moves, so one cache line holds it all
/// (Rust's own order put the id and the expiry in the allocation's second line).
#[derive(PartialEq)]
#[repr(C)]
struct Compact {
    key_id: Uuid,
    expires_at: Option<OffsetDateTime>,
    profile: Arc<Profile>,
    /// `None` is JSON `null`.
    metadata: Option<Arc<serde_json::Value>>,
    /// The key's name followed by the subject.
    names: Box<str>,
    name_len: usize,
}

/// The fields with few distinct values across keys, shared through the layer's [`Interner`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Profile {
    collection: Box<str>,
    environment: Box<str>,
    scopes: Box<[String]>,
    owner_kind: OwnerKind,
    read_only: bool,
    rate_limit: Option<RateLimitPolicy>,
    /// Empty: any address.
    allowed_ips: Box<[IpNetwork]>,
    /// Verified from another system's store (a Payload or Strapi collection): never holds a
    /// management scope.
    foreign: bool,
}

impl Profile {
    /// The bytes an interned copy keeps alive, roughly.
    fn weight(&self) -> usize {
        self.collection.len()
            + self.environment.len()
            + self
                .scopes
                .iter()
                .map(|s| s.len() + std::mem::size_of::<String>())
                .sum::<usize>()
            + self.allowed_ips.len() * std::mem::size_of::<IpNetwork>()
    }
}

/// A profile heavier than this is not interned (each key owns its copy).
const MAX_INTERNED_WEIGHT: usize = 1024;
/// Distinct profiles interned per layer; beyond this, new profiles are owned per key. With
/// [`MAX_INTERNED_WEIGHT`] this bounds the table to a few MiB, dropped with the layer.
pub(crate) const MAX_INTERNED_PROFILES: usize = 2048;

/// A bounded set of shared profiles, owned by a layer's resolver and dropped with it. Entries
/// are never evicted: the bound keeps that cheap, and a profile in use by a cached key is kept
/// alive by the key anyway.
pub(crate) struct Interner {
    table: Mutex<HashSet<Arc<Profile>>>,
    capacity: usize,
}

impl fmt::Debug for Interner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interner")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Interner {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            table: Mutex::new(HashSet::new()),
            capacity,
        }
    }

    fn intern(&self, profile: Profile) -> Arc<Profile> {
        if profile.weight() > MAX_INTERNED_WEIGHT {
            return Arc::new(profile);
        }
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shared) = table.get(&profile) {
            return Arc::clone(shared);
        }
        let shared = Arc::new(profile);
        if table.len() < self.capacity {
            table.insert(Arc::clone(&shared));
        }
        shared
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// `{}` is the default metadata; its keys share one copy.
static EMPTY_OBJECT: LazyLock<Arc<serde_json::Value>> =
    LazyLock::new(|| Arc::new(serde_json::Value::Object(serde_json::Map::new())));

static NULL: serde_json::Value = serde_json::Value::Null;

fn compact_metadata(metadata: &serde_json::Value) -> Option<Arc<serde_json::Value>> {
    match metadata {
        serde_json::Value::Null => None,
        serde_json::Value::Object(map) if map.is_empty() => Some(Arc::clone(&EMPTY_OBJECT)),
        other => Some(Arc::new(other.clone())),
    }
}

/// The field-by-field view that `Debug` and `Serialize` print: the layout of the struct before
/// it was compacted, so neither output changed.
#[derive(Debug, Serialize)]
struct PrincipalData<'a> {
    key_id: Uuid,
    key_name: &'a str,
    collection: &'a str,
    subject: &'a str,
    owner_kind: OwnerKind,
    scopes: &'a [String],
    environment: &'a str,
    read_only: bool,
    metadata: &'a serde_json::Value,
    #[serde(with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    rate_limit: Option<RateLimitPolicy>,
    allowed_ips: &'a [IpNetwork],
}

impl Principal {
    /// The principal of a keywarden key (`foreign: false`) or of a key verified from another
    /// system's store (`foreign: true`, which never holds a management scope).
    /// Profiles shared by many keys come from `profiles`.
    pub(crate) fn from_record(record: &KeyRecord, foreign: bool, profiles: &Interner) -> Self {
        Self::from_parts(
            profiles,
            record.id,
            &record.name,
            &record.subject,
            Profile {
                collection: record.collection.as_str().into(),
                environment: record.environment.as_str().into(),
                scopes: record.scopes.as_slice().into(),
                owner_kind: record.owner_kind,
                read_only: record.read_only,
                rate_limit: record.rate_limit,
                allowed_ips: record.allowed_ips.as_slice().into(),
                foreign,
            },
            &record.metadata,
            record.expires_at,
        )
    }

    fn from_parts(
        interner: &Interner,
        key_id: Uuid,
        key_name: &str,
        subject: &str,
        profile: Profile,
        metadata: &serde_json::Value,
        expires_at: Option<OffsetDateTime>,
    ) -> Self {
        let mut names = String::with_capacity(key_name.len() + subject.len());
        names.push_str(key_name);
        names.push_str(subject);
        Self(Arc::new(Compact {
            key_id,
            profile: interner.intern(profile),
            names: names.into_boxed_str(),
            name_len: key_name.len(),
            metadata: compact_metadata(metadata),
            expires_at,
        }))
    }

    fn fields(&self) -> PrincipalData<'_> {
        PrincipalData {
            key_id: self.key_id(),
            key_name: self.key_name(),
            collection: self.collection(),
            subject: self.subject(),
            owner_kind: self.owner_kind(),
            scopes: self.scopes(),
            environment: self.environment(),
            read_only: self.is_read_only(),
            metadata: self.metadata(),
            expires_at: self.expires_at(),
            rate_limit: self.rate_limit(),
            allowed_ips: self.allowed_ips(),
        }
    }

    /// The key's id.
    pub fn key_id(&self) -> Uuid {
        self.0.key_id
    }

    /// The key's name.
    pub fn key_name(&self) -> &str {
        &self.0.names[..self.0.name_len]
    }

    /// The collection the key belongs to (`users`, `teams`, ...).
    pub fn collection(&self) -> &str {
        &self.0.profile.collection
    }

    /// The owner's id.
    pub fn subject(&self) -> &str {
        &self.0.names[self.0.name_len..]
    }

    /// The owner's kind.
    pub fn owner_kind(&self) -> OwnerKind {
        self.0.profile.owner_kind
    }

    /// The granted scopes.
    pub fn scopes(&self) -> &[String] {
        &self.0.profile.scopes
    }

    /// The environment of the key's prefix (`live`, `test`, ...).
    pub fn environment(&self) -> &str {
        &self.0.profile.environment
    }

    /// Whether the key may only use safe methods.
    pub fn is_read_only(&self) -> bool {
        self.0.profile.read_only
    }

    /// The key's metadata.
    pub fn metadata(&self) -> &serde_json::Value {
        self.0.metadata.as_deref().unwrap_or(&NULL)
    }

    /// The key's expiry.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.0.expires_at
    }

    /// The key's own rate limit, if any.
    pub fn rate_limit(&self) -> Option<RateLimitPolicy> {
        self.0.profile.rate_limit
    }

    /// The networks the key may be used from; empty: anywhere.
    pub fn allowed_ips(&self) -> &[IpNetwork] {
        &self.0.profile.allowed_ips
    }

    /// Whether a request from `client` may use the key: always when the key names no
    /// networks; else only from an address inside one of them (an unknown address never).
    pub fn allows_address(&self, client: Option<IpAddr>) -> bool {
        let networks = self.allowed_ips();
        networks.is_empty()
            || client.is_some_and(|ip| networks.iter().any(|network| network.contains(ip)))
    }

    /// Whether the key was verified from another system's store (a Payload CMS or Strapi
    /// collection, see [`Collection::foreign`](crate::Collection::foreign)). Such a principal
    /// never holds a management scope.
    pub fn is_foreign(&self) -> bool {
        self.0.profile.foreign
    }

    /// Whether the key grants `scope`: an exact match, `*`, or `prefix:*` for any scope
    /// starting with `prefix:`.
    ///
    /// Management scopes, the `keys:` namespace (`keys:admin`, `keys:self`, and any later
    /// one such as `keys:verify`), are the exception: only the exact name grants them. `*`
    /// does not, and neither does any `prefix:*`, **`keys:*` included**. A principal of a
    /// foreign collection ([`is_foreign`](Self::is_foreign): Payload CMS, Strapi) never
    /// holds a management scope, whatever its scopes say.
    ///
    /// ```
    /// # #[cfg(feature = "testing")] {
    /// use keywarden::testing::PrincipalBuilder; // feature `testing`
    ///
    /// let principal = PrincipalBuilder::new("alice").scopes(["*"]).build();
    /// assert!(principal.has_scope("read"));
    /// assert!(principal.has_scope("invoices:write"));
    /// // A wildcard is not a key-management grant.
    /// assert!(!principal.has_scope("keys:admin"));
    ///
    /// // `keys:self` by its exact name; `keys:*` grants nothing else of the namespace.
    /// let principal = PrincipalBuilder::new("bob")
    ///     .scopes(["keys:*", "keys:self", "read"])
    ///     .build();
    /// assert!(principal.has_scope("keys:self"));
    /// assert!(!principal.has_scope("keys:admin"));
    /// assert!(!principal.has_scope("write"));
    /// # }
    /// ```
    pub fn has_scope(&self, scope: &str) -> bool {
        if self.is_foreign() && is_management_scope(scope) {
            return false;
        }
        self.scopes()
            .iter()
            .any(|granted| scope_grants(granted, scope))
    }

    /// A principal with the given scopes and placeholder fields, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(scopes: &[&str]) -> Self {
        Self::test_principal(scopes, false)
    }

    /// Like [`for_tests`](Self::for_tests), of a read-only key.
    #[cfg(test)]
    pub(crate) fn read_only_for_tests(scopes: &[&str]) -> Self {
        Self::test_principal(scopes, true)
    }

    #[cfg(test)]
    fn test_principal(scopes: &[&str], read_only: bool) -> Self {
        Self::from_parts(
            &Interner::new(0),
            Uuid::nil(),
            "test",
            "test",
            Profile {
                collection: "users".into(),
                environment: "test".into(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                owner_kind: OwnerKind::User,
                read_only,
                rate_limit: None,
                allowed_ips: Box::new([]),
                foreign: false,
            },
            &serde_json::Value::Null,
            None,
        )
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Principal").field(&self.fields()).finish()
    }
}

/// Whether the scope `granted` grants `wanted`. A management scope (`keys:` namespace) only
/// by its exact name; anything else also by `*` or a `prefix:*` wildcard.
pub(crate) fn scope_grants(granted: &str, wanted: &str) -> bool {
    if granted == wanted {
        return true;
    }
    if is_management_scope(wanted) {
        return false;
    }
    if granted == "*" {
        return true;
    }
    match granted.strip_suffix('*') {
        Some(prefix) if prefix.ends_with(':') => wanted.starts_with(prefix),
        _ => false,
    }
}

impl Serialize for Principal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.fields().serialize(serializer)
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

/// Builds a [`Principal`] by hand, for unit tests of code that takes one (an identity mapping,
/// a handler, an authorization rule) and for tools. A principal built here was verified by
/// nothing: never put one into a request that a real layer should have authenticated (only
/// the layer puts principals into requests; holding one grants nothing by itself).
///
/// ```
/// use keywarden::testing::PrincipalBuilder;
///
/// let principal = PrincipalBuilder::new("alice")
///     .collection("customers")
///     .scopes(["articles:read", "articles:write"])
///     .build();
/// assert_eq!(principal.subject(), "alice");
/// assert!(principal.has_scope("articles:read"));
/// assert!(!principal.has_scope("keys:admin"));
/// ```
#[cfg(feature = "testing")]
#[derive(Debug, Clone)]
#[must_use]
pub struct PrincipalBuilder {
    key_id: Uuid,
    key_name: String,
    subject: String,
    profile: Profile,
    metadata: serde_json::Value,
    expires_at: Option<OffsetDateTime>,
}

#[cfg(feature = "testing")]
impl PrincipalBuilder {
    /// A principal of `subject`: collection `users`, owner kind `user`, environment `test`,
    /// no scopes, a random key id, key name `test`, no metadata, no expiry.
    pub fn new(subject: impl Into<String>) -> Self {
        Self {
            key_id: Uuid::now_v7(),
            key_name: "test".to_owned(),
            subject: subject.into(),
            profile: Profile {
                collection: "users".into(),
                environment: "test".into(),
                scopes: Box::new([]),
                owner_kind: OwnerKind::User,
                read_only: false,
                rate_limit: None,
                allowed_ips: Box::new([]),
                foreign: false,
            },
            metadata: serde_json::Value::Null,
            expires_at: None,
        }
    }

    /// The key id.
    pub fn key_id(mut self, id: Uuid) -> Self {
        self.key_id = id;
        self
    }

    /// The key's name.
    pub fn key_name(mut self, name: impl Into<String>) -> Self {
        self.key_name = name.into();
        self
    }

    /// The collection.
    pub fn collection(mut self, collection: &str) -> Self {
        self.profile.collection = collection.into();
        self
    }

    /// The environment (`live`, `test`, ...).
    pub fn environment(mut self, environment: &str) -> Self {
        self.profile.environment = environment.into();
        self
    }

    /// The scopes, replacing any given before.
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.profile.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Who owns the key.
    pub fn owner_kind(mut self, kind: OwnerKind) -> Self {
        self.profile.owner_kind = kind;
        self
    }

    /// A read-only key.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.profile.read_only = read_only;
        self
    }

    /// The key's own rate limit.
    pub fn rate_limit(mut self, policy: RateLimitPolicy) -> Self {
        self.profile.rate_limit = Some(policy);
        self
    }

    /// The networks the key may be used from (empty: anywhere).
    pub fn allowed_ips(mut self, networks: impl IntoIterator<Item = IpNetwork>) -> Self {
        self.profile.allowed_ips = networks.into_iter().collect();
        self
    }

    /// The key's metadata.
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }

    /// When the key expires.
    pub fn expires_at(mut self, at: OffsetDateTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// A principal of another system's key (Payload, Strapi): it never holds a management
    /// scope, whatever its scopes say.
    pub fn foreign(mut self, foreign: bool) -> Self {
        self.profile.foreign = foreign;
        self
    }

    /// The principal.
    pub fn build(self) -> Principal {
        Principal::from_parts(
            &Interner::new(0),
            self.key_id,
            &self.key_name,
            &self.subject,
            self.profile,
            &self.metadata,
            self.expires_at,
        )
    }
}

/// Put into the extensions of a request an optional layer passed without a credential: a
/// scope check that finds neither this nor a principal knows no key layer ran before it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PassedWithoutKey;

/// The application's own identity type, as the layer's
/// [`map_identity`](crate::ApiKeyLayerBuilder::map_identity) or
/// [`try_map_identity`](crate::ApiKeyLayerBuilder::try_map_identity) made it: an axum extractor
/// that answers keywarden's 401 `missing_credentials` when the request has no principal (an
/// optional layer let it through without a key), so handlers written for `T` run unchanged
/// behind either mode. `Option<Identity<T>>` takes it when present. A request that has a
/// principal but no `T` (no mapping of this type is configured) is a configuration error: it
/// is answered 401 with a detail that says so, and logged as an error.
///
/// ```
/// use keywarden::Identity;
///
/// #[derive(Clone)]
/// struct Caller { tenant: String }
///
/// async fn handler(Identity(caller): Identity<Caller>) -> String {
///     caller.tenant
/// }
/// # let _ = handler;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity<T>(pub T);

impl<S: Send + Sync, T: Clone + Send + Sync + 'static> axum_core::extract::FromRequestParts<S>
    for Identity<T>
{
    type Rejection = AuthRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(identity) = parts.extensions.get::<T>() {
            return Ok(Identity(identity.clone()));
        }
        if parts.extensions.get::<Principal>().is_none() {
            return Err(AuthRejection::new(
                RejectionKind::MissingCredentials,
                "this route requires an API key",
            ));
        }
        // A key was accepted, but the layer maps no identity of this type: a wiring mistake.
        tracing::error!(
            target: "keywarden",
            identity = std::any::type_name::<T>(),
            "Identity<T> found a principal but no identity of this type: configure map_identity or try_map_identity on the layer with this type"
        );
        Err(AuthRejection::new(
            RejectionKind::MissingCredentials,
            "the key was accepted, but the server maps no identity of the type this route takes (a configuration error)",
        ))
    }
}

impl<S: Send + Sync, T: Clone + Send + Sync + 'static>
    axum_core::extract::OptionalFromRequestParts<S> for Identity<T>
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<T>().cloned().map(Identity))
    }
}

/// One interner shared by the unit tests that build principals outside a layer.
#[cfg(test)]
pub(crate) static TEST_PROFILES: LazyLock<Interner> =
    LazyLock::new(|| Interner::new(MAX_INTERNED_PROFILES));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::record;

    #[test]
    fn scope_matching_rules() {
        assert!(scope_grants("*", "anything"));
        assert!(scope_grants("read", "read"));
        assert!(!scope_grants("read", "reader"));
        assert!(scope_grants("invoices:*", "invoices:read"));
        assert!(!scope_grants("keys:*", "keysX"));
        assert!(
            !scope_grants("keys*", "keys:admin"),
            "only `prefix:*` is a wildcard"
        );
        assert!(!scope_grants("", "read"));
    }

    /// Issue 12, item 1: a wildcard is not a key-management grant.
    #[test]
    fn management_scopes_are_granted_only_by_name() {
        for wanted in [
            "keys:admin",
            "keys:self",
            "keys:verify",
            "keys:anything-later",
        ] {
            for wildcard in ["*", "keys:*", "k:*"] {
                assert!(
                    !scope_grants(wildcard, wanted),
                    "{wildcard} must not grant {wanted}"
                );
            }
            assert!(scope_grants(wanted, wanted));
        }
        assert!(
            !scope_grants("keys:admin", "keys:self"),
            "no implied scopes"
        );
        assert!(!scope_grants("keys:self", "keys:admin"));
        assert!(!scope_grants("KEYS:admin", "keys:admin"), "case-sensitive");
        // Other namespaces keep their wildcards.
        assert!(scope_grants("*", "keysX"));
        assert!(scope_grants("*", "invoices:write"));
        assert!(scope_grants("invoices:*", "invoices:write"));
    }

    #[test]
    fn has_scope_never_makes_a_wildcard_a_manager() {
        for scopes in [&["*"][..], &["keys:*"], &["*", "keys:*", "read"]] {
            let p = Principal::for_tests(scopes);
            assert!(!p.has_scope("keys:admin"), "{scopes:?}");
            assert!(!p.has_scope("keys:self"), "{scopes:?}");
            assert!(!p.has_scope("keys:verify"), "{scopes:?}");
        }
        let star = Principal::for_tests(&["*"]);
        assert!(star.has_scope("read") && star.has_scope("anything:else"));
        let admin = Principal::for_tests(&["keys:admin"]);
        assert!(admin.has_scope("keys:admin"));
        assert!(!admin.has_scope("keys:self"));
    }

    #[test]
    fn a_foreign_principal_never_holds_a_management_scope() {
        let mut r = record(9);
        r.scopes = vec![
            "keys:admin".into(),
            "keys:self".into(),
            "keys:verify".into(),
            "*".into(),
        ];
        let native = Principal::from_record(&r, false, &TEST_PROFILES);
        assert!(!native.is_foreign());
        assert!(native.has_scope("keys:admin") && native.has_scope("keys:self"));
        let foreign = Principal::from_record(&r, true, &TEST_PROFILES);
        assert!(foreign.is_foreign());
        for scope in ["keys:admin", "keys:self", "keys:verify"] {
            assert!(!foreign.has_scope(scope), "{scope}");
        }
        assert!(foreign.has_scope("read"), "other scopes are unaffected");
        assert_ne!(native, foreign);
        assert!(
            !Arc::ptr_eq(&native.0.profile, &foreign.0.profile),
            "the origin is part of the interned profile"
        );
    }

    /// The struct as it was before compaction: `Debug` and `Serialize` must print the same.
    mod uncompacted {
        use super::*;

        #[derive(Debug, Serialize)]
        pub(super) struct PrincipalData {
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
            allowed_ips: Vec<IpNetwork>,
        }

        #[derive(Debug)]
        pub(super) struct Principal(pub(super) PrincipalData);

        pub(super) fn from_record(record: &KeyRecord) -> Principal {
            Principal(PrincipalData {
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
                allowed_ips: record.allowed_ips.clone(),
            })
        }
    }

    fn records() -> Vec<KeyRecord> {
        let mut full = record(1);
        full.name = "deploy bot ünicode".into();
        full.collection = "teams".into();
        full.subject = "team-42".into();
        full.owner_kind = OwnerKind::Team;
        full.scopes = vec!["keys:*".into(), "read".into(), "write".into()];
        full.environment = "test".into();
        full.read_only = true;
        full.metadata = serde_json::json!({"plan": "pro", "seats": [1, 2]});
        full.expires_at = Some(time::macros::datetime!(2031-02-03 04:05:06.789 +02:00));
        full.rate_limit = Some("100/min,burst=20".parse().unwrap());
        full.allowed_ips = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let mut bare = record(2);
        bare.name = String::new();
        bare.subject = String::new();
        bare.scopes = Vec::new();
        bare.metadata = serde_json::Value::Null;
        let mut scalar = record(3);
        scalar.metadata = serde_json::json!("just a string");
        vec![full, bare, scalar, record(4)]
    }

    #[test]
    fn every_accessor_round_trips() {
        for record in records() {
            let p = Principal::from_record(&record, false, &TEST_PROFILES);
            assert_eq!(p.key_id(), record.id);
            assert_eq!(p.key_name(), record.name);
            assert_eq!(p.collection(), record.collection);
            assert_eq!(p.subject(), record.subject);
            assert_eq!(p.owner_kind(), record.owner_kind);
            assert_eq!(p.scopes(), record.scopes.as_slice());
            assert_eq!(p.environment(), record.environment);
            assert_eq!(p.is_read_only(), record.read_only);
            assert_eq!(p.metadata(), &record.metadata);
            assert_eq!(p.expires_at(), record.expires_at);
            assert_eq!(p.rate_limit(), record.rate_limit);
            assert_eq!(p.allowed_ips(), record.allowed_ips.as_slice());
            assert_eq!(p, p.clone());
        }
    }

    #[test]
    fn an_allowlist_admits_only_its_networks_and_never_an_unknown_address() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let anywhere = Principal::from_record(&record(7), false, &TEST_PROFILES);
        assert!(anywhere.allows_address(None));
        assert!(anywhere.allows_address(ip("203.0.113.9")));
        let mut listed = record(8);
        listed.allowed_ips = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let p = Principal::from_record(&listed, false, &TEST_PROFILES);
        assert!(p.allows_address(ip("10.200.0.1")));
        assert!(p.allows_address(ip("::ffff:10.0.0.1")));
        assert!(p.allows_address(ip("2001:db8::7")));
        assert!(!p.allows_address(ip("11.0.0.1")));
        assert!(!p.allows_address(ip("2001:db9::1")));
        assert!(!p.allows_address(None));
    }

    #[test]
    fn debug_and_json_match_the_uncompacted_struct() {
        for record in records() {
            let p = Principal::from_record(&record, false, &TEST_PROFILES);
            let old = uncompacted::from_record(&record);
            assert_eq!(format!("{p:?}"), format!("{old:?}"));
            assert_eq!(format!("{p:#?}"), format!("{old:#?}"));
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                serde_json::to_string(&old.0).unwrap()
            );
        }
    }

    #[test]
    fn equality_is_by_value() {
        let [a, b, ..] = &records()[..] else {
            unreachable!()
        };
        assert_eq!(
            Principal::from_record(a, false, &TEST_PROFILES),
            Principal::from_record(a, false, &TEST_PROFILES)
        );
        assert_ne!(
            Principal::from_record(a, false, &TEST_PROFILES),
            Principal::from_record(b, false, &TEST_PROFILES)
        );
        // The name/subject split is part of the value, not just the joined text.
        let mut ab = record(5);
        (ab.name, ab.subject) = ("ab".into(), "c".into());
        let mut a_bc = ab.clone();
        (a_bc.name, a_bc.subject) = ("a".into(), "bc".into());
        assert_ne!(
            Principal::from_record(&ab, false, &TEST_PROFILES),
            Principal::from_record(&a_bc, false, &TEST_PROFILES)
        );
    }

    #[test]
    fn keys_of_one_profile_share_it() {
        let (mut a, mut b) = (record(6), record(7));
        a.scopes = vec!["profile-test-scope".into()];
        b.scopes = a.scopes.clone();
        let (pa, pb) = (
            Principal::from_record(&a, false, &TEST_PROFILES),
            Principal::from_record(&b, false, &TEST_PROFILES),
        );
        assert!(Arc::ptr_eq(&pa.0.profile, &pb.0.profile));
        assert!(Arc::ptr_eq(
            pa.0.metadata.as_ref().unwrap(),
            pb.0.metadata.as_ref().unwrap()
        ));
        assert_ne!(pa, pb, "different ids and names");
    }

    fn profile(collection: &str, scopes: &[&str]) -> Profile {
        Profile {
            collection: collection.into(),
            environment: "live".into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            owner_kind: OwnerKind::User,
            read_only: false,
            rate_limit: None,
            allowed_ips: Box::new([]),
            foreign: false,
        }
    }

    #[test]
    fn interner_is_bounded() {
        let interner = Interner::new(2);
        let a = interner.intern(profile("a", &["read"]));
        let b = interner.intern(profile("b", &["read"]));
        assert!(Arc::ptr_eq(&a, &interner.intern(profile("a", &["read"]))));
        assert_eq!(interner.len(), 2);

        // Full: a new profile is still returned, owned by its caller and not kept.
        let c1 = interner.intern(profile("c", &["read"]));
        let c2 = interner.intern(profile("c", &["read"]));
        assert_eq!(c1, c2);
        assert!(!Arc::ptr_eq(&c1, &c2));
        assert_eq!(interner.len(), 2);
        assert!(Arc::ptr_eq(&b, &interner.intern(profile("b", &["read"]))));
    }

    #[test]
    fn heavy_profiles_are_not_interned() {
        let interner = Interner::new(8);
        let long = "x".repeat(MAX_INTERNED_WEIGHT);
        let a = interner.intern(profile(&long, &[]));
        let b = interner.intern(profile(&long, &[]));
        assert_eq!(a, b);
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(interner.len(), 0);

        let many: Vec<&str> = vec!["s"; MAX_INTERNED_WEIGHT / std::mem::size_of::<String>()];
        interner.intern(profile("users", &many));
        assert_eq!(interner.len(), 0, "scope headers count toward the weight");
        interner.intern(profile("users", &many[..4]));
        assert_eq!(interner.len(), 1);
    }

    #[test]
    fn per_key_data_stays_small() {
        // Uuid, Arc, Box<str>, usize, Option<Arc>, Option<OffsetDateTime>.
        assert!(
            std::mem::size_of::<Compact>() <= 72,
            "{} bytes",
            std::mem::size_of::<Compact>()
        );
        println!(
            "size_of: uncompacted {} bytes, compact {} bytes",
            std::mem::size_of::<uncompacted::PrincipalData>(),
            std::mem::size_of::<Compact>()
        );
    }

    #[test]
    fn serializes_for_whoami() {
        let p = Principal::for_tests(&["a"]);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["scopes"], serde_json::json!(["a"]));
        assert_eq!(json["owner_kind"], "user");
        assert!(json["expires_at"].is_null());
    }

    /// The authorization decision itself, for scopes outside the management namespace (whose
    /// wildcard rules are pinned beside the management API).
    #[test]
    fn has_scope_grants_exact_names_star_and_prefix_wildcards_only() {
        let p = |scopes: &[&str]| Principal::for_tests(scopes);
        let reader = p(&["read", "write"]);
        assert!(reader.has_scope("read"));
        assert!(reader.has_scope("write"), "any granted scope counts");
        for refused in ["reader", "rea", "Read", "", "*", "admin", "read:all"] {
            assert!(!reader.has_scope(refused), "{refused}");
        }

        let star = p(&["*"]);
        for granted in ["articles:read", "read", "billing:invoices:write"] {
            assert!(star.has_scope(granted), "{granted}");
        }

        let articles = p(&["articles:*"]);
        assert!(articles.has_scope("articles:read"));
        assert!(articles.has_scope("articles:comments:write"));
        for refused in [
            "articles",
            "articlesX",
            "article:read",
            "other:read",
            "read",
        ] {
            assert!(!articles.has_scope(refused), "{refused}");
        }

        let admin = p(&["keys:admin"]);
        assert!(admin.has_scope("keys:admin"));
        assert!(!admin.has_scope("keys:self"));
        assert!(!admin.has_scope("articles:read"));

        let nothing = p(&[]);
        for refused in ["read", "*", "keys:admin", ""] {
            assert!(!nothing.has_scope(refused), "{refused}");
        }
    }

    #[test]
    fn a_profile_weighs_its_strings_and_one_string_header_per_scope() {
        let header = std::mem::size_of::<String>();
        assert_eq!(profile("users", &[]).weight(), 5 + 4);
        assert_eq!(profile("users", &["read"]).weight(), 5 + 4 + 4 + header);
        assert_eq!(
            profile("teams", &["read", "keys:admin"]).weight(),
            5 + 4 + (4 + header) + (10 + header)
        );
        let mut p = profile("", &[]);
        p.environment = "production".into();
        assert_eq!(p.weight(), 10);
    }

    #[tokio::test]
    async fn handlers_extract_the_principal_the_layer_inserted() {
        use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
        let principal = Principal::for_tests(&["read"]);
        let (mut with, ()) = http::Request::new(()).into_parts();
        with.extensions.insert(principal.clone());
        let (mut without, ()) = http::Request::new(()).into_parts();

        let got = <Principal as FromRequestParts<()>>::from_request_parts(&mut with, &()).await;
        assert_eq!(got.unwrap(), principal);
        let got =
            <Principal as OptionalFromRequestParts<()>>::from_request_parts(&mut with, &()).await;
        assert_eq!(got.unwrap(), Some(principal));

        let err = <Principal as FromRequestParts<()>>::from_request_parts(&mut without, &())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RejectionKind::MissingCredentials);
        let got =
            <Principal as OptionalFromRequestParts<()>>::from_request_parts(&mut without, &())
                .await;
        assert_eq!(got.unwrap(), None);
    }

    #[test]
    fn an_interner_shows_its_bound_and_not_its_profiles() {
        let interner = Interner::new(3);
        interner.intern(profile("secret-collection", &["read"]));
        assert_eq!(format!("{interner:?}"), "Interner { capacity: 3, .. }");
    }

    /// Only `prefix:*` is a wildcard: a trailing `*` without the colon is a plain name, or
    /// `read*` would grant `reader` and `invoices*` every `invoices:` scope.
    #[test]
    fn a_star_without_a_colon_is_not_a_wildcard() {
        for (granted, wanted) in [
            ("read*", "reader"),
            ("read*", "read"),
            ("invoices*", "invoices:read"),
            ("a*", "a:b"),
        ] {
            assert!(
                !scope_grants(granted, wanted),
                "{granted} must not grant {wanted}"
            );
            assert!(
                !Principal::for_tests(&[granted]).has_scope(wanted),
                "{granted}"
            );
        }
        assert!(
            scope_grants("read*", "read*"),
            "still granted by its exact name"
        );
        assert!(scope_grants("a:*", "a:b"));
    }

    #[tokio::test]
    async fn handlers_extract_the_identity_the_layer_mapped() {
        use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
        #[derive(Clone, Debug, PartialEq)]
        struct Tenant(&'static str);
        type Id = Identity<Tenant>;

        let (mut mapped, ()) = http::Request::new(()).into_parts();
        mapped.extensions.insert(Principal::for_tests(&[]));
        mapped.extensions.insert(Tenant("acme"));
        let got = <Id as FromRequestParts<()>>::from_request_parts(&mut mapped, &()).await;
        assert_eq!(got.unwrap(), Identity(Tenant("acme")));
        let got = <Id as OptionalFromRequestParts<()>>::from_request_parts(&mut mapped, &()).await;
        assert_eq!(got.unwrap(), Some(Identity(Tenant("acme"))));

        let (mut anonymous, ()) = http::Request::new(()).into_parts();
        let err = <Id as FromRequestParts<()>>::from_request_parts(&mut anonymous, &())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RejectionKind::MissingCredentials);
        assert_eq!(err.detail(), "this route requires an API key");
        let got =
            <Id as OptionalFromRequestParts<()>>::from_request_parts(&mut anonymous, &()).await;
        assert_eq!(got.unwrap(), None);

        // A key was accepted but nothing maps it to this type: said so, not "send a key".
        let (mut unmapped, ()) = http::Request::new(()).into_parts();
        unmapped.extensions.insert(Principal::for_tests(&[]));
        let err = <Id as FromRequestParts<()>>::from_request_parts(&mut unmapped, &())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RejectionKind::MissingCredentials);
        assert!(
            err.detail().contains("configuration error"),
            "{}",
            err.detail()
        );
        let got =
            <Id as OptionalFromRequestParts<()>>::from_request_parts(&mut unmapped, &()).await;
        assert_eq!(got.unwrap(), None);
    }

    /// A profile of exactly the limit is still shared; one byte more is not.
    #[test]
    fn profiles_up_to_the_weight_limit_are_shared() {
        let interner = Interner::new(8);
        let base = profile("", &[]).weight();
        let at_limit = "x".repeat(MAX_INTERNED_WEIGHT - base);
        let a = interner.intern(profile(&at_limit, &[]));
        let b = interner.intern(profile(&at_limit, &[]));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(interner.len(), 1);

        let over = "y".repeat(MAX_INTERNED_WEIGHT - base + 1);
        let c = interner.intern(profile(&over, &[]));
        let d = interner.intern(profile(&over, &[]));
        assert!(!Arc::ptr_eq(&c, &d));
        assert_eq!(interner.len(), 1);
    }
}
