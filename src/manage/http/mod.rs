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
//!   and `metadata` are free: **metadata is the key owner's to write** (on create, update and
//!   rotate, which copies it with the owner kind), so never base an authorization decision
//!   (e.g. in an identity mapping) on a key's metadata; look the owner up instead. The update is written only if the key is still the version
//!   these checks read: a concurrent change makes it a 409 `conflict`, and nothing is
//!   written (read the key again and retry).
//! - **Get, list, revoke, delete**: allowed on every key of the owner, including keys more
//!   powerful than the caller: taking a key away never gives the caller anything, and an owner
//!   must be able to kill a leaked sibling with any of its `keys:self` keys. The flip side: a
//!   leaked `keys:self` key can revoke or delete its owner's other keys, so give `keys:self`
//!   only to keys that are as well kept as the keys they manage.
//!
//! A read-only key never gets this far on the unsafe methods: the layer refuses it first.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use super::KeyManager;

mod auth;
pub(crate) mod error;
pub(crate) mod extract;
pub(crate) mod openapi;
mod owners;
mod routes;
#[cfg(feature = "webhooks")]
mod webhooks;

pub use openapi::openapi;

/// The management API as an axum `Router` to nest under any path, behind an
/// [`ApiKeyLayer`](crate::ApiKeyLayer).
///
/// | Route | Success | Errors |
/// | --- | --- | --- |
/// | `POST /keys` | 201 `{"key", ...view}` | 400, 401, 403, 409, 422, 503 |
/// | `GET /keys?collection&subject&environment&state&after&limit` | 200 `{"items", "next_cursor"}` | 400, 401, 403, 422, 503 |
/// | `GET /keys/{id}` | 200 view | 401, 403, 404, 422, 503 |
/// | `PATCH /keys/{id}` | 200 view | 400, 401, 403, 404, 409, 422, 503 |
/// | `POST /keys/{id}/revoke` | 200 view | 401, 403, 404, 422, 503 |
/// | `POST /keys/{id}/rotate` (body optional: `{"grace": "24h"}`) | 201 `{"key", ...view}` | 400, 401, 403, 404, 409, 422, 503 |
/// | `DELETE /keys/{id}` | 204 | 401, 403, 404, 422, 503 |
/// | `GET /keys/{id}/usage?since&until&granularity=hour\|day` | 200 a usage report (requests per bucket by outcome) | 401, 403, 404, 422, 503 |
/// | `GET /usage?collection&since&until&granularity` (`keys:admin`) | 200 the rejections no key is blamed for | 401, 403, 422, 503 |
/// | `GET /audit?key_id&actor&action&collection&subject&since&until&after&limit` | 200 `{"items", "next_cursor"}` (the [audit log](crate::audit), oldest first) | 400, 401, 403, 422, 503 |
/// | `GET /owners?collection` (`keys:admin`) | 200 every owner policy | 400, 401, 403, 422, 503 |
/// | `GET /owners/{collection}/{subject}` (`keys:admin`, or a `keys:self` key of that owner) | 200 the policy | 400, 401, 403, 404, 503 |
/// | `PATCH /owners/{collection}/{subject}` (`keys:admin`; creates the policy) | 200 the policy | 400, 401, 403, 422, 503 |
/// | `DELETE /owners/{collection}/{subject}` (`keys:admin`) | 204 | 400, 401, 403, 404, 503 |
/// | `POST /webhooks`, `GET /webhooks`, `GET`/`PATCH`/`DELETE /webhooks/{id}` (feature `webhooks`; `keys:admin` only) | 201 with the signing secret once / 200 / 204 (`keywarden::webhooks`) | 400, 401, 403, 404, 422, 503 |
/// | `GET /openapi.json` | 200 the OpenAPI 3.1 document ([`openapi()`]) | 401, 503 |
///
/// A view never holds the digest, the secret id or the encrypted key; the plaintext key is
/// only in the 201 responses (sent with `Cache-Control: no-store`).
///
/// Authorization, from the [`Principal`](crate::Principal) the layer inserted (none: 401
/// `missing_credentials`).
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
/// - Owner policies ([`KeyManager::set_owner_policy`](crate::KeyManager::set_owner_policy)):
///   only `keys:admin` sets or removes them; a `keys:self` key may read its own owner's.
/// - The audit log: `keys:admin` reads every event; `keys:self` only the events about its
///   owner's keys (same collection and subject).
/// - Neither scope: 403 `insufficient_scope`.
///
/// A new key's `collection`, `subject`, `owner_kind` and `environment` default to the caller's.
/// A `collection` that none of the manager's layers serves is a 422 naming `collection`
/// (its keys would never verify).
/// A rotation's `grace` defaults to 24 hours; `"0s"` ends the old key at once.
///
/// `/openapi.json` is behind the layer like every route, but needs no management scope: any
/// key the layer admits may read it. Its paths are relative to where the router is nested.
///
/// The router needs no state of the app it is nested in: like axum's own routers it is a
/// `Router<S>` for any app state `S`.
pub fn management_router<S>(manager: Arc<KeyManager>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let document = openapi::document();
    Router::new()
        .route("/keys", get(routes::list_keys).post(routes::create_key))
        .route(
            "/keys/{id}",
            get(routes::get_key)
                .patch(routes::update_key)
                .delete(routes::delete_key),
        )
        .route("/keys/{id}/revoke", post(routes::revoke_key))
        .route("/keys/{id}/rotate", post(routes::rotate_key))
        .route("/keys/{id}/usage", get(routes::key_usage))
        .route("/usage", get(routes::collection_usage))
        .route("/audit", get(routes::list_audit))
        .route("/owners", get(owners::list_owners))
        .route(
            "/owners/{collection}/{subject}",
            get(owners::get_owner)
                .patch(owners::set_owner)
                .delete(owners::delete_owner),
        )
        .route(
            "/openapi.json",
            get(move || openapi::serve(document.clone())),
        )
        .merge(webhook_routes())
        .with_state(manager)
}

/// `/webhooks` and `/webhooks/{id}` (feature `webhooks`).
#[cfg(feature = "webhooks")]
fn webhook_routes() -> Router<Arc<KeyManager>> {
    Router::new()
        .route(
            "/webhooks",
            get(webhooks::list_webhooks).post(webhooks::create_webhook),
        )
        .route(
            "/webhooks/{id}",
            get(webhooks::get_webhook)
                .patch(webhooks::update_webhook)
                .delete(webhooks::delete_webhook),
        )
}

#[cfg(not(feature = "webhooks"))]
fn webhook_routes() -> Router<Arc<KeyManager>> {
    Router::new()
}
