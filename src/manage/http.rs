//! The management HTTP API: an axum `Router` over a [`KeyManager`], to nest behind an
//! [`ApiKeyLayer`](crate::ApiKeyLayer).
//!
//! ```
//! use std::sync::Arc;
//! use axum::Router;
//! use keywarden::{management_router, ApiKeyLayer, Collection, KeyManager, MemoryStore, SecretRing};
//!
//! let secrets = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
//! let layer = ApiKeyLayer::builder()
//!     .store(Arc::new(MemoryStore::new()))
//!     .secrets(secrets)
//!     .collection(Collection::new("users"))
//!     .build()
//!     .unwrap();
//! let manager = Arc::new(KeyManager::for_layer(&layer));
//! // The layer goes outside: every management route needs a key with `keys:admin` or `keys:self`.
//! let app: Router = Router::new()
//!     .nest("/admin", management_router(manager))
//!     .layer(layer);
//! # let _ = app;
//! ```
//!
//! Every error is `application/problem+json` with the layer's shape
//! (`{"status", "code", "title", "detail"}`); validation errors add
//! `"errors": [{"field", "message"}]`. Error bodies never repeat submitted values or names,
//! so a key pasted into the wrong field, member or query parameter is not echoed back: an
//! unknown body member is reported as field `body`, an unknown query parameter as `query`.
//! Control characters (NUL included) in `description` or in any metadata string, key or
//! value, are a 422: Postgres cannot store NUL.
//!
//! # Authorization
//!
//! Only the exact scope names count here: `*` and `prefix:*` wildcards (`keys:*` included)
//! never grant `keys:admin` or `keys:self`, and a key of a foreign collection (Payload CMS,
//! Strapi) never manages keys, whatever its scopes (see [`Principal::has_scope`]).
//!
//! `keys:admin` manages every key, without limits. `keys:self` manages the keys of its owner
//! (same collection and subject); other keys answer 404 exactly like unknown ids. A
//! `keys:self` caller may never obtain or create a key more powerful than itself, and may
//! only tighten its own keys; anything else is 403 `insufficient_scope`:
//!
//! - **Create**: collection, subject and owner kind are the caller's; `environment` must be
//!   the caller's (the default); every scope must be one the caller holds; the expiry must be
//!   no later than the caller's own (when the body gives none, the key inherits the
//!   caller's `expires_at`); the rate limit must be within the caller's
//!   ([`RateLimitPolicy::is_within`]; when the body gives none, the key inherits it).
//!   Rate limits are compared as they apply: a key's own policy, else the default of each
//!   layer the manager invalidates (and [`KeyManager::with_default_rate_limit`]), one
//!   comparison per layer; unlimited only without any.
//! - **Rotate**: only a key no more powerful than the caller, as the new key's plaintext is
//!   the caller's: not disabled, all its scopes held by the caller, same environment, expiry
//!   no later than the caller's, rate limit within the caller's. The new key (which gets
//!   the old key's lifetime from now) is cut back to the caller's expiry.
//!   A key that changed after these checks read it (or while it was copied, for any
//!   caller) is a 409 `conflict`, and no new key is left behind.
//! - **Update**: only tightening, relative to the key's current values: no `disabled: false`
//!   on a disabled key, no `read_only: false` on a read-only key, no `expires_at` later than
//!   the current expiry or than the caller's own (`null` is never: later than any instant),
//!   no `rate_limit` looser than the current one (`null` means the layer's default, and is
//!   a loosening when there is none or it is looser); `scopes` only ones the caller holds,
//!   and adding a scope the key lacks only to a key that, after the update, is no more
//!   powerful than the caller (the checks of a rotation).
//!   Values equal to the current ones are left out of the update. `name`, `description`
//!   and `metadata` are free. The update is written only if the key is still the version
//!   these checks read: a concurrent change makes it a 409 `conflict`, and nothing is
//!   written (read the key again and retry).
//! - **Get, list, revoke, delete**: allowed on own keys.
//!
//! A read-only key never gets this far on the unsafe methods: the layer refuses it first.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{
    FromRequest, FromRequestParts, OptionalFromRequest, Path, Query, Request, State,
};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime, UtcOffset};
use uuid::Uuid;

use super::{
    check_scopes, parse_duration, CreatedKey, ExpiresIn, KeyManager, ManageError, ManageErrorKind,
    NewKey,
};
use crate::principal::Principal;
use crate::ratelimit::RateLimitPolicy;
use crate::rejection::{AuthRejection, RejectionKind};
use crate::store::{KeyPatch, KeyQuery, KeyRecord, KeyState, OwnerKind};

/// Manages every key.
const ADMIN_SCOPE: &str = "keys:admin";
/// Manages the caller's own keys.
const SELF_SCOPE: &str = "keys:self";
/// How long the old key keeps working after a rotation without a `grace`.
const DEFAULT_GRACE: Duration = Duration::hours(24);

/// The management API as an axum `Router` to nest under any path, behind an
/// [`ApiKeyLayer`](crate::ApiKeyLayer).
///
/// | Route | Success | Errors |
/// | --- | --- | --- |
/// | `POST /keys` | 201 `{"key", ...view}` | 400, 401, 403, 409, 422, 503 |
/// | `GET /keys?collection&subject&state&after&limit` | 200 `{"items", "next_cursor"}` | 400, 401, 403, 422, 503 |
/// | `GET /keys/{id}` | 200 view | 401, 403, 404, 422, 503 |
/// | `PATCH /keys/{id}` | 200 view | 400, 401, 403, 404, 409, 422, 503 |
/// | `POST /keys/{id}/revoke` | 200 view | 401, 403, 404, 422, 503 |
/// | `POST /keys/{id}/rotate` (body optional: `{"grace": "24h"}`) | 201 `{"key", ...view}` | 400, 401, 403, 404, 409, 422, 503 |
/// | `DELETE /keys/{id}` | 204 | 401, 403, 404, 422, 503 |
///
/// A view never holds the digest, the secret id or the encrypted key; the plaintext key is
/// only in the 201 responses (sent with `Cache-Control: no-store`).
///
/// Authorization, from the [`Principal`] the layer inserted (none: 401 `missing_credentials`).
/// Management scopes count only by exact name (`*`, `keys:*` and other wildcards never grant
/// them), and never for a key of a foreign (Payload CMS, Strapi) collection:
/// - `keys:admin` manages every key.
/// - `keys:self` manages the keys of its owner: same `collection` and same `subject` as the
///   calling key. Other keys answer 404 exactly like an unknown id, and listings are limited
///   to the caller's own keys. It never obtains or creates a key more powerful than itself
///   and only tightens its own keys (403 `insufficient_scope` otherwise):
///   - create: its own collection, subject, owner kind and environment; only scopes it
///     holds; an expiry no later than its own and a rate limit within its own (both
///     inherited from the caller when omitted; rate limits compared as they apply, a
///     key's own or else the manager's default rate limit);
///   - rotate: only keys that are not disabled and hold no scope, environment, expiry or
///     rate limit beyond the caller's; the new key expires no later than the caller;
///   - update: `disabled`, `read_only`, `expires_at` and `rate_limit` may only tighten the
///     key (and `expires_at` never passes the caller's own); `scopes` only ones it holds.
///     It is written only if the key did not change since it was checked: otherwise 409
///     `conflict`, nothing written.
/// - Neither scope: 403 `insufficient_scope`.
///
/// A new key's `collection`, `subject`, `owner_kind` and `environment` default to the caller's.
/// A rotation's `grace` defaults to 24 hours; `"0s"` ends the old key at once.
pub fn management_router(manager: Arc<KeyManager>) -> Router {
    Router::new()
        .route("/keys", get(list_keys).post(create_key))
        .route(
            "/keys/{id}",
            get(get_key).patch(update_key).delete(delete_key),
        )
        .route("/keys/{id}/revoke", post(revoke_key))
        .route("/keys/{id}/rotate", post(rotate_key))
        .with_state(manager)
}

type Manager = State<Arc<KeyManager>>;

/// `expires_in` is a lifetime only; an absolute instant belongs in `expires_at`.
fn parse_duration_or_unlimited(text: &str) -> Option<ExpiresIn> {
    match text.parse::<ExpiresIn>() {
        Ok(ExpiresIn::At(_)) | Err(_) => None,
        Ok(lifetime) => Some(lifetime),
    }
}

async fn create_key(
    State(manager): Manager,
    caller: Caller,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    let now = manager.now();
    let new = caller.new_key(body, now)?;
    let created = manager.create(new).await?;
    Ok(created_response(&created, now))
}

async fn list_keys(
    State(manager): Manager,
    caller: Caller,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|_| ApiError::bad_request("malformed query string"))?;
    let now = manager.now();
    let Some(query) = caller.restrict(list_query(params, now)?) else {
        return Ok(Json(KeyList {
            items: Vec::new(),
            next_cursor: None,
        })
        .into_response());
    };
    let page = manager.list(&query).await?;
    Ok(Json(KeyList {
        items: page
            .items
            .iter()
            .map(|record| KeyView::new(record, now))
            .collect(),
        next_cursor: page.next_cursor,
    })
    .into_response())
}

async fn get_key(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
) -> Result<Response, ApiError> {
    let record = caller.load(&manager, id).await?;
    Ok(Json(KeyView::new(&record, manager.now())).into_response())
}

async fn update_key(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
    JsonBody(body): JsonBody<PatchBody>,
) -> Result<Response, ApiError> {
    let current = caller.load(&manager, id).await?;
    let mut patch = body.into_patch()?;
    caller.may_patch(&current, &mut patch)?;
    if !caller.admin {
        // `may_patch` judged `current`: write only if the key is still that version, so a
        // concurrent change (an admin tightening it) is never undone. A lost race is a 409.
        patch.expected_updated_at = Some(current.updated_at);
    }
    let record = manager.update(id, patch).await?;
    Ok(Json(KeyView::new(&record, manager.now())).into_response())
}

async fn revoke_key(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
) -> Result<Response, ApiError> {
    caller.load(&manager, id).await?;
    let record = manager.revoke(id).await?;
    Ok(Json(KeyView::new(&record, manager.now())).into_response())
}

async fn rotate_key(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
    body: Option<JsonBody<RotateBody>>,
) -> Result<Response, ApiError> {
    let grace = parse_grace(body.and_then(|JsonBody(b)| b.grace).as_deref())?;
    let old = caller.load(&manager, id).await?;
    caller.may_rotate(&old)?;
    // The new key lives the old key's lifetime from now, which could pass the caller's own
    // expiry: cap it in the same step. `may_rotate` judged `old`: a key changed since (an
    // admin giving it more power) is a 409, not a new key with powers the caller lacks.
    let checked = (!caller.admin).then_some(old.updated_at);
    let created = manager
        .rotate_checked(id, grace, caller.max_expiry(), checked)
        .await?;
    Ok(created_response(&created, manager.now()))
}

async fn delete_key(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
) -> Result<StatusCode, ApiError> {
    caller.load(&manager, id).await?;
    manager.delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn created_response(created: &CreatedKey, now: OffsetDateTime) -> Response {
    let body = Created {
        key: created.key.expose(),
        view: KeyView::new(&created.record, now),
    };
    (
        StatusCode::CREATED,
        [(CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(body),
    )
        .into_response()
}

/// The authenticated caller and how far its management rights reach.
struct Caller {
    principal: Principal,
    admin: bool,
    /// The rate limits of keys without their own, one per layer where keys are verified
    /// (never empty; `None`: unlimited there).
    default_rate_limits: Vec<Option<RateLimitPolicy>>,
}

impl FromRequestParts<Arc<KeyManager>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        manager: &Arc<KeyManager>,
    ) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, manager)
            .await
            .map_err(ApiError::Auth)?;
        // Management scopes are granted only by name (`*`, `keys:*` never grant them), and
        // never to a key another system issued, whatever scopes that system gave it:
        // `has_scope` already refuses a foreign principal; the manager's own view of its
        // layers' foreign collections is checked too.
        let foreign =
            principal.is_foreign() || manager.is_foreign_collection(principal.collection());
        let admin = !foreign && principal.has_scope(ADMIN_SCOPE);
        if !admin && (foreign || !principal.has_scope(SELF_SCOPE)) {
            return Err(ApiError::Auth(AuthRejection::insufficient_scope(
                ADMIN_SCOPE,
            )));
        }
        Ok(Self {
            principal,
            admin,
            default_rate_limits: manager.default_rate_limits(),
        })
    }
}

impl Caller {
    fn owns(&self, record: &KeyRecord) -> bool {
        self.admin
            || (record.subject == self.principal.subject()
                && record.collection == self.principal.collection())
    }

    /// The key, if the caller may manage it; someone else's key is as unknown as a missing
    /// one, so ids do not reveal which keys exist.
    async fn load(&self, manager: &KeyManager, id: Uuid) -> Result<KeyRecord, ApiError> {
        let record = manager.get(id).await?;
        if self.owns(&record) {
            Ok(record)
        } else {
            Err(ManageError::not_found(id).into())
        }
    }

    /// A `keys:self` caller grants only scopes it holds, by the rules of
    /// [`Principal::has_scope`]: holding `*` does not let it grant `keys:admin`.
    fn may_grant(&self, scopes: &[String]) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        // Malformed scopes are a 422, not a privilege question.
        check_scopes(&mut scopes.to_vec())?;
        // By position: the scope itself is submitted text, maybe a key pasted by mistake.
        match scopes.iter().position(|s| !self.principal.has_scope(s)) {
            Some(index) => Err(forbidden(format!(
                "a `keys:self` key cannot grant scopes[{index}], a scope it does not hold"
            ))),
            None => Ok(()),
        }
    }

    /// A `keys:self` caller names its own collection, subject, owner kind and environment
    /// or none.
    fn may_own(&self, body: &CreateBody) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        let p = &self.principal;
        let differs = |given: Option<&str>, own: &str| given.is_some_and(|g| g != own);
        let mismatch = if differs(body.subject.as_deref(), p.subject()) {
            Some("subject")
        } else if differs(body.collection.as_deref(), p.collection()) {
            Some("collection")
        } else if body.owner_kind.is_some_and(|k| k != p.owner_kind()) {
            Some("owner_kind")
        } else if differs(body.environment.as_deref(), p.environment()) {
            Some("environment")
        } else {
            None
        };
        match mismatch {
            Some(field) => Err(forbidden(format!(
                "a `keys:self` key can only create keys for its own {field}; that needs `{ADMIN_SCOPE}`"
            ))),
            None => Ok(()),
        }
    }

    /// The latest expiry the caller may give a key: its own, unless it is an admin.
    fn max_expiry(&self) -> Option<OffsetDateTime> {
        if self.admin {
            None
        } else {
            self.principal.expires_at()
        }
    }

    /// Whether a key with limit `policy` is held at least as tightly as one with limit
    /// `limit`, wherever keys are verified: each compared as it applies there (its own, else
    /// that layer's default; `None` there: unlimited). With several layers, one comparison
    /// per layer default, so neither the tightest nor the loosest default hides an escape.
    fn effectively_within(
        &self,
        policy: Option<RateLimitPolicy>,
        limit: Option<RateLimitPolicy>,
    ) -> bool {
        self.default_rate_limits
            .iter()
            .all(|default| within(policy.or(*default), limit.or(*default)))
    }

    /// A new key's lifetime: what was asked (`None`: nothing), within the caller's expiry.
    fn bound_expiry(
        &self,
        asked: Option<ExpiresIn>,
        now: OffsetDateTime,
    ) -> Result<ExpiresIn, ApiError> {
        let Some(limit) = self.max_expiry() else {
            return Ok(asked.unwrap_or_default());
        };
        let Some(asked) = asked else {
            return Ok(ExpiresIn::At(limit));
        };
        match asked.expires_at(now) {
            // Absolute, so the stored expiry is exactly the one checked here.
            Some(at) if at <= limit => Ok(ExpiresIn::At(at)),
            _ => Err(forbidden(format!(
                "a `keys:self` key cannot create a key that outlives it: give an expiry no later than {}",
                limit.format(&Rfc3339).unwrap_or_default()
            ))),
        }
    }

    /// A new key's rate limit: what was asked, within the caller's effective limit. Nothing
    /// asked inherits the caller's own policy (none: the default, like the caller).
    fn bound_rate_limit(
        &self,
        asked: Option<RateLimitPolicy>,
    ) -> Result<Option<RateLimitPolicy>, ApiError> {
        if self.admin {
            return Ok(asked);
        }
        let own = self.principal.rate_limit();
        match asked {
            // Inheriting the caller's own policy is as tight as the caller on every layer.
            None => Ok(own),
            Some(asked) if self.effectively_within(Some(asked), own) => Ok(Some(asked)),
            Some(_) => Err(forbidden(match own {
                Some(own) => format!(
                    "a `keys:self` key cannot create a key with a rate limit looser than its own ({own})"
                ),
                None => "a `keys:self` key cannot create a key with a rate limit looser than its own (the layer's default)".to_owned(),
            })),
        }
    }

    /// A `keys:self` caller rotates only keys no more powerful than itself: the new key's
    /// plaintext is the caller's to use.
    fn may_rotate(&self, key: &KeyRecord) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        match self.more_powerful(key) {
            Some(reason) => Err(forbidden(format!(
                "a `keys:self` key cannot rotate this key: {reason}; that needs `{ADMIN_SCOPE}`"
            ))),
            None => Ok(()),
        }
    }

    /// Why `key` is more powerful than the caller (`None`: it is not): disabled, a scope the
    /// caller lacks, another environment, a later expiry or a looser effective rate limit.
    fn more_powerful(&self, key: &KeyRecord) -> Option<&'static str> {
        let p = &self.principal;
        if key.disabled {
            Some("it is disabled")
        } else if !key.scopes.iter().all(|s| p.has_scope(s)) {
            Some("it has a scope the caller does not hold")
        } else if key.environment != p.environment() {
            Some("it belongs to another environment")
        } else if !ends_by(key.expires_at, p.expires_at()) {
            Some("it expires later than the caller")
        } else if !self.effectively_within(key.rate_limit, p.rate_limit()) {
            Some("its rate limit is looser than the caller's")
        } else {
            None
        }
    }

    /// A `keys:self` caller only tightens a key, relative to its current values and never
    /// past the caller's own expiry. Values equal to the current ones are then dropped from
    /// the patch, so a harmless `"disabled": false` cannot undo an admin's concurrent disable.
    fn may_patch(&self, key: &KeyRecord, patch: &mut KeyPatch) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        if let Some(scopes) = &patch.scopes {
            self.may_grant(scopes)?;
            // Granting a scope the key lacks hands the caller's powers to that key: only to a
            // key no more powerful than the caller, as judged after the patch (the checks of
            // a rotation). Narrowing or keeping scopes needs no such check.
            if scopes.iter().any(|s| !key.scopes.contains(s)) {
                let mut after = key.clone();
                patch.apply_to(&mut after, key.updated_at);
                if let Some(why) = self.more_powerful(&after) {
                    return Err(forbidden(format!(
                        "a `keys:self` key can add scopes only to a key no more powerful than itself, and {why}; that needs `{ADMIN_SCOPE}`"
                    )));
                }
            }
        }
        let loosened = if patch.disabled == Some(false) && key.disabled {
            Some("re-enable a disabled key")
        } else if patch.read_only == Some(false) && key.read_only {
            Some("make a read-only key writable")
        } else if patch.expires_at.is_some_and(|at| {
            !ends_by(at, key.expires_at) || !ends_by(at, self.principal.expires_at())
        }) {
            Some("remove or extend an expiry, or set one later than its own")
        } else if patch.rate_limit.is_some_and(|limit| {
            // Effective limits: `null` puts the key under the default (unlimited without
            // one), which loosens a key whose own limit is tighter.
            !self.effectively_within(limit, key.rate_limit)
        }) {
            Some("remove or loosen a rate limit")
        } else {
            None
        };
        if let Some(what) = loosened {
            return Err(forbidden(format!(
                "a `keys:self` key can only tighten keys and cannot {what}; that needs `{ADMIN_SCOPE}`"
            )));
        }
        if patch.disabled == Some(key.disabled) {
            patch.disabled = None;
        }
        if patch.read_only == Some(key.read_only) {
            patch.read_only = None;
        }
        if patch.expires_at == Some(key.expires_at) {
            patch.expires_at = None;
        }
        if patch.rate_limit == Some(key.rate_limit) {
            patch.rate_limit = None;
        }
        Ok(())
    }

    /// The key to create.
    fn new_key(&self, body: CreateBody, now: OffsetDateTime) -> Result<NewKey, ApiError> {
        self.may_own(&body)?;
        if let Some(scopes) = &body.scopes {
            self.may_grant(scopes)?;
        }
        reject_control_chars(body.description.as_deref(), body.metadata.as_ref())?;
        let p = &self.principal;
        let name = body
            .name
            .ok_or_else(|| ApiError::invalid("name", "name is required"))?;
        let asked = match (body.expires_in, body.expires_at) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "expires_at",
                    "give expires_in or expires_at, not both",
                ))
            }
            (Some(text), None) => match parse_duration_or_unlimited(&text) {
                Some(expires_in) => Some(expires_in),
                None => {
                    return Err(ApiError::invalid(
                        "expires_in",
                        "expected a lifetime such as 7d, 30d, 90d, 24h or `unlimited`",
                    ))
                }
            },
            (None, Some(text)) => {
                let at = parse_time("expires_at", &text)?;
                if at <= now {
                    return Err(ApiError::invalid(
                        "expires_at",
                        "expires_at must be in the future",
                    ));
                }
                Some(ExpiresIn::At(at))
            }
            (None, None) => None,
        };
        let rate_limit = body
            .rate_limit
            .as_deref()
            .map(parse_rate_limit)
            .transpose()?;
        let mut new = NewKey::new(name, body.subject.unwrap_or_else(|| p.subject().to_owned()))
            .collection(body.collection.unwrap_or_else(|| p.collection().to_owned()))
            .owner_kind(body.owner_kind.unwrap_or_else(|| p.owner_kind()))
            .environment(
                body.environment
                    .unwrap_or_else(|| p.environment().to_owned()),
            )
            .read_only(body.read_only.unwrap_or(false))
            .expires_in(self.bound_expiry(asked, now)?);
        new.description = body.description;
        new.scopes = body.scopes.unwrap_or_default();
        if let Some(metadata) = body.metadata {
            new.metadata = metadata;
        }
        new.rate_limit = self.bound_rate_limit(rate_limit)?;
        Ok(new)
    }

    /// Limits a `keys:self` listing to the caller's keys; `None` when the filters the caller
    /// gave can only match other owners' keys.
    fn restrict(&self, mut query: KeyQuery) -> Option<KeyQuery> {
        if self.admin {
            return Some(query);
        }
        let p = &self.principal;
        if query.subject.as_deref().is_some_and(|s| s != p.subject())
            || query
                .collection
                .as_deref()
                .is_some_and(|c| c != p.collection())
        {
            return None;
        }
        query.subject = Some(p.subject().to_owned());
        query.collection = Some(p.collection().to_owned());
        Some(query)
    }
}

fn forbidden(detail: String) -> ApiError {
    ApiError::Auth(AuthRejection::new(RejectionKind::InsufficientScope, detail))
}

/// Whether an expiry (`None`: never) comes no later than `limit` (`None`: never).
fn ends_by(expires_at: Option<OffsetDateTime>, limit: Option<OffsetDateTime>) -> bool {
    match (expires_at, limit) {
        (_, None) => true,
        (Some(at), Some(limit)) => at <= limit,
        (None, Some(_)) => false,
    }
}

/// Whether a rate limit (`None`: unlimited) is no looser than `limit` (`None`: unlimited).
fn within(policy: Option<RateLimitPolicy>, limit: Option<RateLimitPolicy>) -> bool {
    match (policy, limit) {
        (_, None) => true,
        (Some(policy), Some(limit)) => policy.is_within(&limit),
        (None, Some(_)) => false,
    }
}

/// Control characters in free text are a 422 here rather than a store error later: Postgres
/// refuses NUL in TEXT and JSONB. Metadata is checked at every depth, keys and values.
fn reject_control_chars(
    description: Option<&str>,
    metadata: Option<&Value>,
) -> Result<(), ApiError> {
    fn dirty(text: &str) -> bool {
        text.chars().any(char::is_control)
    }
    // serde_json caps nesting at 128 levels, which bounds the recursion.
    fn dirty_json(value: &Value) -> bool {
        match value {
            Value::String(text) => dirty(text),
            Value::Array(items) => items.iter().any(dirty_json),
            Value::Object(members) => members.iter().any(|(k, v)| dirty(k) || dirty_json(v)),
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        }
    }
    if description.is_some_and(dirty) {
        Err(ApiError::invalid(
            "description",
            "description must not contain control characters",
        ))
    } else if metadata.is_some_and(dirty_json) {
        Err(ApiError::invalid(
            "metadata",
            "metadata must not contain control characters",
        ))
    } else {
        Ok(())
    }
}

/// The `{id}` path segment as a key id.
struct KeyId(Uuid);

impl<S: Send + Sync> FromRequestParts<S> for KeyId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // The segment is never echoed: it may be a key pasted in the wrong place.
        let invalid = || ApiError::invalid("id", "the key id must be a UUID");
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| invalid())?;
        Uuid::try_parse(&raw).map(KeyId).map_err(|_| invalid())
    }
}

/// A JSON object body, read with problem+json rejections.
struct JsonBody<T>(T);

/// A request body type and the names of its members: errors name only these, never a member
/// name the client sent.
trait BodyFields: DeserializeOwned {
    const FIELDS: &'static [&'static str];
}

impl<S: Send + Sync, T: BodyFields> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_json(req, state)
            .await?
            .map(JsonBody)
            .ok_or_else(|| ApiError::bad_request("a JSON object body is required"))
    }
}

impl<S: Send + Sync, T: BodyFields> OptionalFromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(read_json(req, state).await?.map(JsonBody))
    }
}

/// `None` for an empty body.
async fn read_json<S: Send + Sync, T: BodyFields>(
    req: Request,
    state: &S,
) -> Result<Option<T>, ApiError> {
    let json = is_json(req.headers());
    let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
        ApiError::problem(
            rejection.status(),
            "invalid_request",
            "Invalid request",
            "the request body could not be read",
        )
    })?;
    if bytes.trim_ascii().is_empty() {
        return Ok(None);
    }
    if !json {
        return Err(ApiError::bad_request(
            "expected a body with `Content-Type: application/json`",
        ));
    }
    let value: Value = serde_json::from_slice(&bytes).map_err(|err| {
        // Syntax errors name a position, never the input.
        ApiError::bad_request(format!("the body is not valid JSON: {err}"))
    })?;
    let Value::Object(object) = value else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    from_object(object).map(Some)
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let lower = essence.to_ascii_lowercase();
    lower == "application/json" || (lower.starts_with("application/") && lower.ends_with("+json"))
}

/// Deserializes a body whose fields are all optional. serde stops at the first problem and
/// does not say where, so on failure each member is tried alone to name every bad field.
fn from_object<T: BodyFields>(object: Map<String, Value>) -> Result<T, ApiError> {
    if let Ok(value) = serde_json::from_value(Value::Object(object.clone())) {
        return Ok(value);
    }
    let mut errors: Vec<FieldError> = Vec::new();
    for (field, value) in object {
        let known = T::FIELDS.iter().copied().find(|known| *known == field);
        let alone = Map::from_iter([(field, value)]);
        if let Err(err) = serde_json::from_value::<T>(Value::Object(alone)) {
            let error = field_error(known, &err);
            if !errors.contains(&error) {
                errors.push(error);
            }
        }
    }
    Err(ApiError::validation(errors))
}

/// A field error in our words: serde's messages quote the offending value, and an unknown
/// member's name is submitted text too (maybe a key), so it becomes `body`.
fn field_error(known: Option<&'static str>, err: &serde_json::Error) -> FieldError {
    let text = err.to_string();
    let Some(field) = known.filter(|_| !text.starts_with("unknown field")) else {
        return FieldError::new("body", "unknown field");
    };
    // serde puts the submitted value first and the expectation last:
    // `invalid type: string "...", expected a boolean`.
    let message = match text.rsplit_once(", expected ") {
        Some((_, expected)) => {
            let expected = expected.split(" at line ").next().unwrap_or(expected);
            format!("expected {expected}")
        }
        None => "invalid value".to_owned(),
    };
    FieldError::new(field, message)
}

fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CreateBody {
    name: Option<String>,
    description: Option<String>,
    collection: Option<String>,
    subject: Option<String>,
    owner_kind: Option<OwnerKind>,
    scopes: Option<Vec<String>>,
    read_only: Option<bool>,
    environment: Option<String>,
    expires_in: Option<String>,
    expires_at: Option<String>,
    metadata: Option<Value>,
    rate_limit: Option<String>,
}

impl BodyFields for CreateBody {
    const FIELDS: &'static [&'static str] = &[
        "name",
        "description",
        "collection",
        "subject",
        "owner_kind",
        "scopes",
        "read_only",
        "environment",
        "expires_in",
        "expires_at",
        "metadata",
        "rate_limit",
    ];
}

/// Absent leaves a field alone; `null` clears the nullable ones.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PatchBody {
    name: Option<String>,
    #[serde(deserialize_with = "nullable")]
    description: Option<Option<String>>,
    scopes: Option<Vec<String>>,
    read_only: Option<bool>,
    #[serde(deserialize_with = "nullable")]
    metadata: Option<Option<Value>>,
    #[serde(deserialize_with = "nullable")]
    rate_limit: Option<Option<String>>,
    #[serde(deserialize_with = "nullable")]
    expires_at: Option<Option<String>>,
    disabled: Option<bool>,
}

impl BodyFields for PatchBody {
    const FIELDS: &'static [&'static str] = &[
        "name",
        "description",
        "scopes",
        "read_only",
        "metadata",
        "rate_limit",
        "expires_at",
        "disabled",
    ];
}

impl PatchBody {
    fn into_patch(self) -> Result<KeyPatch, ApiError> {
        reject_control_chars(
            self.description.as_ref().and_then(Option::as_deref),
            self.metadata.as_ref().and_then(Option::as_ref),
        )?;
        let rate_limit = match self.rate_limit {
            Some(Some(text)) => Some(Some(parse_rate_limit(&text)?)),
            Some(None) => Some(None),
            None => None,
        };
        let expires_at = match self.expires_at {
            Some(Some(text)) => Some(Some(parse_time("expires_at", &text)?)),
            Some(None) => Some(None),
            None => None,
        };
        Ok(KeyPatch {
            name: self.name,
            description: self.description,
            scopes: self.scopes,
            read_only: self.read_only,
            metadata: self
                .metadata
                .map(|m| m.unwrap_or_else(|| Value::Object(Map::new()))),
            rate_limit,
            expires_at,
            revoked_at: None,
            disabled: self.disabled,
            expected_updated_at: None,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RotateBody {
    grace: Option<String>,
}

impl BodyFields for RotateBody {
    const FIELDS: &'static [&'static str] = &["grace"];
}

fn parse_time(field: &'static str, text: &str) -> Result<OffsetDateTime, ApiError> {
    let at = OffsetDateTime::parse(text.trim(), &Rfc3339)
        .map_err(|_| {
            ApiError::invalid(
                field,
                "expected an RFC 3339 timestamp such as 2030-01-31T12:00:00Z",
            )
        })?
        .to_offset(UtcOffset::UTC);
    // Stores keep microseconds; truncate so the response matches what is stored.
    Ok(at
        .replace_nanosecond(at.nanosecond() / 1_000 * 1_000)
        .unwrap_or(at))
}

fn parse_rate_limit(text: &str) -> Result<RateLimitPolicy, ApiError> {
    text.parse().map_err(|_| {
        ApiError::invalid(
            "rate_limit",
            "expected a rate limit such as 100/min or 100/min,burst=20",
        )
    })
}

/// `None` is the default grace; any zero (`0`, `0s`, `0h`...) ends the old key now.
fn parse_grace(text: Option<&str>) -> Result<Duration, ApiError> {
    let Some(text) = text.map(str::trim) else {
        return Ok(DEFAULT_GRACE);
    };
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    if !number.is_empty()
        && number.bytes().all(|b| b == b'0')
        && matches!(unit, "" | "s" | "m" | "min" | "h" | "d" | "w")
    {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
        .map_err(|_| ApiError::invalid("grace", "expected a duration such as 24h, 15m or 0s"))
}

fn list_query(params: Vec<(String, String)>, now: OffsetDateTime) -> Result<KeyQuery, ApiError> {
    let mut query = KeyQuery {
        now,
        ..KeyQuery::new()
    };
    let mut errors = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "collection" => query.collection = Some(value),
            "subject" => query.subject = Some(value),
            "state" => match value.parse::<KeyState>() {
                Ok(state) => query.state = Some(state),
                Err(_) => errors.push(FieldError::new(
                    "state",
                    "expected active, expired, revoked or disabled",
                )),
            },
            "after" => match Uuid::try_parse(&value) {
                Ok(id) => query.after = Some(id),
                Err(_) => errors.push(FieldError::new(
                    "after",
                    "expected a key id (the previous page's next_cursor)",
                )),
            },
            "limit" => match value.parse::<u32>() {
                Ok(limit) if (1..=KeyQuery::MAX_LIMIT).contains(&limit) => query.limit = limit,
                _ => errors.push(FieldError::new(
                    "limit",
                    format!("expected a number from 1 to {}", KeyQuery::MAX_LIMIT),
                )),
            },
            // The name is submitted text (maybe a key): never repeat it.
            _ => {
                let error = FieldError::new("query", "unknown parameter");
                if !errors.contains(&error) {
                    errors.push(error);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(query)
    } else {
        Err(ApiError::validation(errors))
    }
}

/// A key as the API shows it: everything but the digest, the secret id and the encrypted key.
#[derive(Debug, Serialize)]
struct KeyView<'a> {
    id: Uuid,
    name: &'a str,
    description: Option<&'a str>,
    display_start: &'a str,
    collection: &'a str,
    subject: &'a str,
    owner_kind: OwnerKind,
    scopes: &'a [String],
    environment: &'a str,
    read_only: bool,
    metadata: &'a Value,
    rate_limit: Option<RateLimitPolicy>,
    state: KeyState,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    last_used_at: Option<OffsetDateTime>,
    use_count: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    revoked_at: Option<OffsetDateTime>,
    disabled: bool,
    rotated_from: Option<Uuid>,
}

impl<'a> KeyView<'a> {
    fn new(record: &'a KeyRecord, now: OffsetDateTime) -> Self {
        Self {
            id: record.id,
            name: &record.name,
            description: record.description.as_deref(),
            display_start: &record.display_start,
            collection: &record.collection,
            subject: &record.subject,
            owner_kind: record.owner_kind,
            scopes: &record.scopes,
            environment: &record.environment,
            read_only: record.read_only,
            metadata: &record.metadata,
            rate_limit: record.rate_limit,
            state: record.state(now),
            created_at: record.created_at,
            updated_at: record.updated_at,
            expires_at: record.expires_at,
            last_used_at: record.last_used_at,
            use_count: record.use_count,
            revoked_at: record.revoked_at,
            disabled: record.disabled,
            rotated_from: record.rotated_from,
        }
    }
}

/// A created or rotated key: the only response that carries the plaintext.
#[derive(Serialize)]
struct Created<'a> {
    key: &'a str,
    #[serde(flatten)]
    view: KeyView<'a>,
}

#[derive(Debug, Serialize)]
struct KeyList<'a> {
    items: Vec<KeyView<'a>>,
    next_cursor: Option<Uuid>,
}

/// One invalid field. The name is always one of ours, never one the client sent.
#[derive(Debug, PartialEq, Serialize)]
struct FieldError {
    field: &'static str,
    message: String,
}

impl FieldError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Every error of the API; rendered as problem+json.
#[derive(Debug)]
enum ApiError {
    /// One of the layer's rejections (401, 403, 503), rendered exactly as the layer does.
    Auth(AuthRejection),
    Problem {
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: String,
        errors: Vec<FieldError>,
    },
}

impl ApiError {
    fn problem(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self::Problem {
            status,
            code,
            title,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    fn bad_request(detail: impl Into<String>) -> Self {
        Self::problem(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Invalid request",
            detail,
        )
    }

    fn validation(errors: Vec<FieldError>) -> Self {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => "the request has invalid fields".to_owned(),
        };
        Self::Problem {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "validation_failed",
            title: "Validation failed",
            detail,
            errors,
        }
    }

    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError::new(field, message)])
    }
}

/// The one place a [`ManageError`] becomes a response.
impl From<ManageError> for ApiError {
    fn from(err: ManageError) -> Self {
        match err.kind() {
            ManageErrorKind::NotFound => Self::problem(
                StatusCode::NOT_FOUND,
                "not_found",
                "Key not found",
                err.to_string(),
            ),
            ManageErrorKind::Invalid => {
                Self::invalid(err.field().unwrap_or("body"), err.to_string())
            }
            ManageErrorKind::Conflict
            | ManageErrorKind::NotRevealable
            | ManageErrorKind::CurrentSecret
            | ManageErrorKind::UnmigratedKeys => Self::problem(
                StatusCode::CONFLICT,
                "conflict",
                "Conflict",
                err.to_string(),
            ),
            ManageErrorKind::ReadOnly => Self::problem(
                StatusCode::CONFLICT,
                "read_only",
                "Keys issued by another system",
                err.to_string(),
            ),
            ManageErrorKind::Inactive => Self::problem(
                StatusCode::CONFLICT,
                "inactive_key",
                "Key not active",
                err.to_string(),
            ),
            ManageErrorKind::RateLimited => Self::problem(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many requests",
                err.to_string(),
            ),
            ManageErrorKind::Store => {
                tracing::warn!(target: "keywarden", error = %err, "management request failed: key store error");
                Self::Auth(AuthRejection::new(
                    RejectionKind::StoreUnavailable,
                    "the key store is unavailable; retry later",
                ))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Problem<'a> {
            status: u16,
            code: &'a str,
            title: &'a str,
            detail: &'a str,
            #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
            errors: &'a [FieldError],
        }
        match self {
            Self::Auth(rejection) => rejection.into_response(),
            Self::Problem {
                status,
                code,
                title,
                detail,
                errors,
            } => {
                let body = Problem {
                    status: status.as_u16(),
                    code,
                    title,
                    detail: &detail,
                    errors: &errors,
                };
                (
                    status,
                    [(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/problem+json"),
                    )],
                    serde_json::to_vec(&body).unwrap_or_default(),
                )
                    .into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use time::macros::datetime;
    use tower::ServiceExt;

    use super::*;
    use crate::store::test_support::record;
    use crate::{MemoryStore, SecretRing};

    fn test_manager() -> Arc<KeyManager> {
        let secrets =
            SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
        Arc::new(KeyManager::new(Arc::new(MemoryStore::new()), secrets))
    }

    /// The caller a request with this key's principal becomes.
    async fn caller(key: &KeyRecord) -> Caller {
        let (mut parts, ()) = axum::http::Request::new(()).into_parts();
        parts.extensions.insert(Principal::from_record(
            key,
            false,
            &crate::principal::TEST_PROFILES,
        ));
        match Caller::from_request_parts(&mut parts, &test_manager()).await {
            Ok(caller) => caller,
            Err(err) => panic!("not a caller: {err:?}"),
        }
    }

    fn key(scopes: &[&str]) -> KeyRecord {
        let mut key = record(1);
        key.collection = "users".into();
        key.subject = "alice".into();
        key.environment = "live".into();
        key.scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        key
    }

    fn self_caller_key() -> KeyRecord {
        let mut key = key(&["keys:self", "read", "articles:*"]);
        key.expires_at = Some(datetime!(2040-01-01 00:00 UTC));
        key
    }

    /// The status and code an error answers with.
    fn answer(result: Result<(), ApiError>) -> (u16, String) {
        match result {
            Ok(()) => (200, String::new()),
            Err(ApiError::Auth(rejection)) => (
                rejection.kind().status().as_u16(),
                rejection.kind().code().to_owned(),
            ),
            Err(ApiError::Problem { status, code, .. }) => (status.as_u16(), code.to_owned()),
        }
    }

    fn forbidden() -> (u16, String) {
        (403, "insufficient_scope".to_owned())
    }

    fn allowed() -> (u16, String) {
        (200, String::new())
    }

    #[tokio::test]
    async fn a_caller_needs_a_management_scope_by_name() {
        let (mut parts, ()) = axum::http::Request::new(()).into_parts();
        let err = Caller::from_request_parts(&mut parts, &test_manager())
            .await
            .err();
        assert_eq!(answer(Err(err.unwrap())).0, 401, "no principal");
        for scopes in [&["read"][..], &["articles:*"], &[], &["keys:selfish"]] {
            let (mut parts, ()) = axum::http::Request::new(()).into_parts();
            parts.extensions.insert(Principal::for_tests(scopes));
            let err = Caller::from_request_parts(&mut parts, &test_manager())
                .await
                .err();
            assert_eq!(answer(Err(err.unwrap())), forbidden(), "{scopes:?}");
        }
        assert!(caller(&key(&["keys:admin"])).await.admin);
        assert!(!caller(&key(&["keys:self"])).await.admin);
        assert!(caller(&key(&["read", "keys:admin"])).await.admin);
    }

    #[tokio::test]
    async fn a_self_caller_owns_the_keys_of_its_subject_in_its_collection() {
        let me = caller(&key(&["keys:self"])).await;
        let admin = caller(&key(&["keys:admin"])).await;
        let mut mine = record(2);
        (mine.collection, mine.subject) = ("users".into(), "alice".into());
        let mut other_subject = mine.clone();
        other_subject.subject = "bob".into();
        let mut other_collection = mine.clone();
        other_collection.collection = "teams".into();
        let mut prefix_only = mine.clone();
        prefix_only.subject = "alice2".into();
        assert!(me.owns(&mine));
        for theirs in [&other_subject, &other_collection, &prefix_only] {
            assert!(!me.owns(theirs), "{}/{}", theirs.collection, theirs.subject);
            assert!(admin.owns(theirs));
        }
    }

    #[tokio::test]
    async fn a_self_caller_grants_only_scopes_it_holds() {
        let me = caller(&self_caller_key()).await;
        let scopes = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        for held in [
            &[][..],
            &["read"],
            &["keys:self"],
            &["articles:read", "articles:write"],
            &["read", "keys:self"],
        ] {
            assert_eq!(answer(me.may_grant(&scopes(held))), allowed(), "{held:?}");
        }
        for not_held in [&["write"][..], &["read", "write"], &["keys:admin"], &["*"]] {
            assert_eq!(
                answer(me.may_grant(&scopes(not_held))),
                forbidden(),
                "{not_held:?}"
            );
        }
        // The refused scope is named by position, never echoed.
        let Err(ApiError::Auth(rejection)) = me.may_grant(&scopes(&["read", "secret-ish"])) else {
            panic!("granted a scope the caller does not hold");
        };
        assert!(
            rejection.detail().contains("scopes[1]"),
            "{}",
            rejection.detail()
        );
        assert!(!rejection.detail().contains("secret-ish"));
        // Malformed scopes are a validation error, not a privilege question.
        assert_eq!(answer(me.may_grant(&scopes(&[""]))).0, 422);

        let admin = caller(&key(&["keys:admin"])).await;
        assert_eq!(
            answer(admin.may_grant(&scopes(&["write", "keys:admin", "*"]))),
            allowed()
        );
    }

    #[tokio::test]
    async fn a_self_caller_creates_keys_only_for_itself() {
        let me = caller(&self_caller_key()).await;
        let admin = caller(&key(&["keys:admin"])).await;
        let body = |f: fn(&mut CreateBody)| {
            let mut body = CreateBody::default();
            f(&mut body);
            body
        };
        let own = [
            body(|_| {}),
            body(|b| b.subject = Some("alice".into())),
            body(|b| b.collection = Some("users".into())),
            body(|b| b.owner_kind = Some(OwnerKind::User)),
            body(|b| b.environment = Some("live".into())),
        ];
        for body in &own {
            assert_eq!(answer(me.may_own(body)), allowed(), "{body:?}");
        }
        let foreign = [
            (body(|b| b.subject = Some("bob".into())), "subject"),
            (body(|b| b.collection = Some("teams".into())), "collection"),
            (body(|b| b.owner_kind = Some(OwnerKind::Team)), "owner_kind"),
            (body(|b| b.environment = Some("test".into())), "environment"),
        ];
        for (body, field) in &foreign {
            let Err(ApiError::Auth(rejection)) = me.may_own(body) else {
                panic!("created a key for another {field}");
            };
            assert_eq!(rejection.kind(), RejectionKind::InsufficientScope);
            assert!(rejection.detail().contains(field), "{}", rejection.detail());
            assert_eq!(answer(admin.may_own(body)), allowed());
        }
    }

    #[tokio::test]
    async fn a_self_caller_rotates_only_keys_no_more_powerful_than_itself() {
        let me = caller(&self_caller_key()).await;
        let admin = caller(&key(&["keys:admin"])).await;
        let mut weaker = key(&["read", "articles:read"]);
        weaker.expires_at = Some(datetime!(2039-01-01 00:00 UTC));
        assert_eq!(answer(me.may_rotate(&weaker)), allowed());
        let mut same_expiry = weaker.clone();
        same_expiry.expires_at = Some(datetime!(2040-01-01 00:00 UTC));
        assert_eq!(answer(me.may_rotate(&same_expiry)), allowed());

        let mut disabled = weaker.clone();
        disabled.disabled = true;
        let mut broader = weaker.clone();
        broader.scopes.push("write".into());
        let mut elsewhere = weaker.clone();
        elsewhere.environment = "test".into();
        let mut later = weaker.clone();
        later.expires_at = Some(datetime!(2040-01-01 00:00:01 UTC));
        let mut never = weaker.clone();
        never.expires_at = None;
        for stronger in [&disabled, &broader, &elsewhere, &later, &never] {
            assert_eq!(answer(me.may_rotate(stronger)), forbidden(), "{stronger:?}");
            assert_eq!(answer(admin.may_rotate(stronger)), allowed());
        }
    }

    #[tokio::test]
    async fn a_self_caller_only_tightens_keys() {
        let me = caller(&self_caller_key()).await;
        let admin = caller(&key(&["keys:admin"])).await;
        let mut current = key(&["read"]);
        current.expires_at = Some(datetime!(2035-01-01 00:00 UTC));
        current.rate_limit = Some("10/min".parse().unwrap());
        let mut disabled = current.clone();
        disabled.disabled = true;
        let mut read_only = current.clone();
        read_only.read_only = true;
        let patch = |f: fn(&mut KeyPatch)| {
            let mut patch = KeyPatch::default();
            f(&mut patch);
            patch
        };

        let tighter = [
            patch(|p| p.expires_at = Some(Some(datetime!(2034-01-01 00:00 UTC)))),
            patch(|p| p.disabled = Some(true)),
            patch(|p| p.read_only = Some(true)),
            patch(|p| p.rate_limit = Some(Some("5/min".parse().unwrap()))),
            patch(|p| p.scopes = Some(vec!["read".into(), "articles:read".into()])),
            patch(|p| p.name = Some("renamed".into())),
        ];
        for mut tighter in tighter {
            let before = tighter.clone();
            assert_eq!(
                answer(me.may_patch(&current, &mut tighter)),
                allowed(),
                "{before:?}"
            );
            assert_eq!(tighter, before, "a real change is kept");
        }

        let looser = [
            (
                &current,
                patch(|p| p.expires_at = Some(Some(datetime!(2035-01-01 00:00:01 UTC)))),
            ),
            (&current, patch(|p| p.expires_at = Some(None))),
            (
                &current,
                patch(|p| p.rate_limit = Some(Some("11/min".parse().unwrap()))),
            ),
            (&current, patch(|p| p.rate_limit = Some(None))),
            (&current, patch(|p| p.scopes = Some(vec!["write".into()]))),
            (&disabled, patch(|p| p.disabled = Some(false))),
            (&read_only, patch(|p| p.read_only = Some(false))),
        ];
        for (key, mut looser) in looser {
            let before = looser.clone();
            assert_eq!(
                answer(me.may_patch(key, &mut looser)),
                forbidden(),
                "{before:?}"
            );
            assert_eq!(answer(admin.may_patch(key, &mut before.clone())), allowed());
        }

        // Never past the caller's own expiry, even on a key that has none.
        let mut unlimited = current.clone();
        unlimited.expires_at = None;
        let mut past_caller = patch(|p| p.expires_at = Some(Some(datetime!(2041-01-01 00:00 UTC))));
        assert_eq!(
            answer(me.may_patch(&unlimited, &mut past_caller)),
            forbidden()
        );
        let mut within_caller =
            patch(|p| p.expires_at = Some(Some(datetime!(2039-01-01 00:00 UTC))));
        assert_eq!(
            answer(me.may_patch(&unlimited, &mut within_caller)),
            allowed()
        );

        // Values equal to the current ones are dropped, so they cannot undo a concurrent change.
        let mut same = KeyPatch {
            disabled: Some(false),
            read_only: Some(false),
            expires_at: Some(current.expires_at),
            rate_limit: Some(current.rate_limit),
            name: Some("kept".into()),
            ..KeyPatch::default()
        };
        assert_eq!(answer(me.may_patch(&current, &mut same)), allowed());
        assert_eq!(
            same,
            KeyPatch {
                name: Some("kept".into()),
                ..KeyPatch::default()
            }
        );
    }

    /// A `keys:self` caller's new key gets at most the caller's own rate limit.
    #[tokio::test]
    async fn a_self_caller_creates_keys_within_its_own_rate_limit() {
        let mut own = self_caller_key();
        own.rate_limit = Some("10/min".parse().unwrap());
        let me = caller(&own).await;
        let now = datetime!(2030-01-01 00:00 UTC);
        let body = |rate_limit: Option<&str>| CreateBody {
            name: Some("k".into()),
            rate_limit: rate_limit.map(str::to_owned),
            ..CreateBody::default()
        };
        for looser in ["11/min", "1/s", "10/min,burst=20"] {
            let result = me.new_key(body(Some(looser)), now).map(|_| ());
            assert_eq!(answer(result), forbidden(), "{looser}");
        }
        let tighter = me.new_key(body(Some("5/min")), now).unwrap();
        assert_eq!(tighter.rate_limit, Some("5/min".parse().unwrap()));
        let inherited = me.new_key(body(None), now).unwrap();
        assert_eq!(inherited.rate_limit, own.rate_limit);

        let admin = caller(&key(&["keys:admin"])).await;
        let any = admin.new_key(body(Some("1000/s")), now).unwrap();
        assert_eq!(any.rate_limit, Some("1000/s".parse().unwrap()));
    }

    /// Listings judge a key's state by the manager's clock, not the system's.
    #[tokio::test]
    async fn listing_states_follow_the_managers_clock() {
        let clock = crate::clock::ManualClock::new(datetime!(2030-01-01 00:00 UTC));
        let secrets =
            SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
        let manager = Arc::new(
            KeyManager::new(Arc::new(MemoryStore::new()), secrets)
                .with_clock(Arc::new(clock.clone())),
        );
        let created = manager
            .create(
                NewKey::new("k", "test").expires_in(ExpiresIn::At(datetime!(2030-01-02 00:00 UTC))),
            )
            .await
            .unwrap();
        clock.advance(time::Duration::days(2));
        let mut request = axum::http::Request::get("/keys?state=expired")
            .body(Body::empty())
            .unwrap();
        request
            .extensions_mut()
            .insert(Principal::for_tests(&["keys:admin"]));
        let response = management_router(manager).oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let list: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            list["items"][0]["id"],
            created.record.id.to_string(),
            "{list}"
        );
        assert_eq!(list["items"][0]["state"], "expired");
    }

    #[test]
    fn only_json_media_types_are_read_as_json() {
        let is = |value: Option<&[u8]>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(CONTENT_TYPE, HeaderValue::from_bytes(value).unwrap());
            }
            is_json(&headers)
        };
        for json in [
            "application/json",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "APPLICATION/JSON",
            "Application/Json ; charset=utf-8",
            "application/problem+json",
            "application/merge-patch+json",
            "application/vnd.api+json; ext=bulk",
            "APPLICATION/VND.API+JSON",
        ] {
            assert!(is(Some(json.as_bytes())), "{json}");
        }
        for not_json in [
            "application/x-www-form-urlencoded",
            "application/xml",
            "application/jsonp",
            "application/json-seq",
            "application/octet-stream",
            "text/json",
            "text/plain",
            "text/plain+json",
            "multipart/form-data; boundary=x",
            "json",
            "+json",
            "",
            "; application/json",
        ] {
            assert!(!is(Some(not_json.as_bytes())), "{not_json}");
        }
        assert!(!is(None));
        assert!(!is(Some(b"application/json\xff")), "not visible ASCII");
    }

    async fn post_keys(content_type: Option<&str>, body: &'static str) -> (u16, Value) {
        let secrets =
            SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
        let manager = Arc::new(KeyManager::new(Arc::new(MemoryStore::new()), secrets));
        let mut request = axum::http::Request::post("/keys");
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        let mut request = request.body(Body::from(body)).unwrap();
        request
            .extensions_mut()
            .insert(Principal::for_tests(&["keys:admin"]));
        let response = management_router(manager).oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    /// A body is parsed only under a JSON content type; anything else is a 400 that says
    /// which type is expected, before the body is looked at.
    #[tokio::test]
    async fn a_body_that_is_not_declared_json_is_a_400() {
        // `name` of the wrong type: a 422 once the body is read as JSON.
        let body = r#"{"name": 5}"#;
        for json in [
            "application/json",
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            "application/problem+json",
            "application/merge-patch+json",
        ] {
            let (status, problem) = post_keys(Some(json), body).await;
            assert_eq!(status, 422, "{json}: {problem}");
            assert_eq!(problem["code"], "validation_failed");
        }
        for not_json in [
            Some("application/x-www-form-urlencoded"),
            Some("application/xml"),
            Some("text/plain"),
            Some("text/plain+json"),
            Some("text/json"),
            Some("application/jsonp"),
            Some(""),
            None,
        ] {
            let (status, problem) = post_keys(not_json, body).await;
            assert_eq!(status, 400, "{not_json:?}: {problem}");
            assert_eq!(
                problem,
                serde_json::json!({
                    "status": 400,
                    "code": "invalid_request",
                    "title": "Invalid request",
                    "detail": "expected a body with `Content-Type: application/json`",
                }),
                "{not_json:?}"
            );
        }
    }

    /// One invalid field: the detail names it and its message; several: a summary.
    #[tokio::test]
    async fn validation_details_name_the_field_and_message() {
        let (status, problem) = post_keys(Some("application/json"), r#"{"name": 5}"#).await;
        assert_eq!(status, 422);
        assert_eq!(problem["detail"], "name: expected a string");
        assert_eq!(
            problem["errors"],
            serde_json::json!([{"field": "name", "message": "expected a string"}])
        );
        let (status, problem) = post_keys(
            Some("application/json"),
            r#"{"name": 5, "read_only": "yes"}"#,
        )
        .await;
        assert_eq!(status, 422);
        assert_eq!(problem["detail"], "the request has invalid fields");
        assert_eq!(problem["errors"].as_array().unwrap().len(), 2, "{problem}");
        let (status, problem) = post_keys(Some("application/json"), "[1]").await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (400, Some("invalid_request"))
        );
        assert_eq!(problem["detail"], "the body must be a JSON object");
    }
}
