//! The handlers: extract, ask the [`Caller`] policy, call the [`KeyManager`], answer with the
//! key views.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use time::OffsetDateTime;

use super::error::ApiError;
use super::extract::{audit_query, list_query, usage_query, JsonBody, KeyId, RotateBody};
use super::openapi::{
    BadRequest, Conflict, Forbidden, NotFound, TooManyRequests, Unauthorized, Unavailable,
    ValidationFailed,
};
use crate::audit::{Actor, AuditEvent, AuditPage};
use crate::manage::policy::{
    parse_grace, Caller, CallerError, CreateRequest, CreatedKeyView, KeyPageView, KeyView,
    PatchRequest,
};
use crate::manage::{CreatedKey, KeyManager, ManageError};
use crate::store::{KeyPage, KeyState};

type Manager = State<Arc<KeyManager>>;

#[utoipa::path(
    post,
    path = "/keys",
    tag = "keys",
    summary = "Create a key",
    request_body = CreateRequest,
    responses(
        (status = 201, description = "The new key, its plaintext shown this once",
            body = CreatedKeyView,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, response = Conflict),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn create_key(
    State(manager): Manager,
    caller: Caller,
    JsonBody(body): JsonBody<CreateRequest>,
) -> Result<Response, ApiError> {
    let now = manager.now();
    let new = caller.new_key(body, now)?;
    // A `keys:self` caller with credits gives the new key credits out of its own balance.
    let moved = match caller.credits_to_move(&new) {
        Some(amount) => match manager.take_credits(caller.key_id(), amount).await? {
            Some(lease) if lease.granted == amount => Some(lease),
            lease => {
                if let Some(lease) = lease.filter(|l| l.granted > 0) {
                    manager.untake_credits(caller.key_id(), &lease).await;
                }
                return Err(CallerError::Forbidden(format!(
                    "a `keys:self` key cannot give a key more credits than it has itself ({amount} asked)"
                ))
                .into());
            }
        },
        None => None,
    };
    let created = match caller.manager(&manager).create(new).await {
        Ok(created) => created,
        Err(error) => {
            if let Some(lease) = &moved {
                manager.untake_credits(caller.key_id(), lease).await;
            }
            return Err(error.into());
        }
    };
    Ok(created_response(&created, now))
}

#[utoipa::path(
    get,
    path = "/keys",
    tag = "keys",
    summary = "List keys, a page at a time",
    description = "A `keys:self` caller sees only its own keys.",
    params(
        ("collection" = Option<String>, Query, description = "Only keys of this collection"),
        ("subject" = Option<String>, Query, description = "Only keys of this subject"),
        ("environment" = Option<String>, Query,
            description = "Only keys of this environment (e.g. `live`, `test`)"),
        ("state" = Option<KeyState>, Query, description = "Only keys in this state now"),
        ("after" = Option<uuid::Uuid>, Query,
            description = "The previous page's `next_cursor`: only keys created after it"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500,
            description = "Page size (default 100)"),
    ),
    responses(
        (status = 200, description = "One page of keys", body = KeyPageView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn list_keys(
    State(manager): Manager,
    caller: Caller,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|_| ApiError::bad_request("malformed query string"))?;
    let now = manager.now();
    let page = match caller.restrict(list_query(params, now)?) {
        Some(query) => manager.list(&query).await?,
        // The filters can only match other owners' keys.
        None => KeyPage {
            items: Vec::new(),
            next_cursor: None,
        },
    };
    Ok(Json(KeyPageView::new(&page, now)).into_response())
}

#[utoipa::path(
    get,
    path = "/keys/{id}",
    tag = "keys",
    summary = "Get a key",
    params(("id" = uuid::Uuid, Path, description = "The key id")),
    responses(
        (status = 200, description = "The key", body = KeyView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn get_key(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
) -> Result<Response, ApiError> {
    let record = caller.load(&manager, id).await?;
    Ok(Json(KeyView::new(&record, manager.now())).into_response())
}

#[utoipa::path(
    patch,
    path = "/keys/{id}",
    tag = "keys",
    summary = "Update a key",
    description = "Members left out are left unchanged; `null` clears the nullable ones. A \
        `keys:self` caller may only tighten a key.",
    params(("id" = uuid::Uuid, Path, description = "The key id")),
    request_body = PatchRequest,
    responses(
        (status = 200, description = "The key as updated", body = KeyView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn update_key(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
    JsonBody(body): JsonBody<PatchRequest>,
) -> Result<Response, ApiError> {
    let current = caller.load(&manager, id).await?;
    let mut patch = body.into_patch()?;
    caller.may_patch(&current, &mut patch)?;
    if !caller.is_admin() {
        // `may_patch` judged `current`: write only if the key is still that version, so a
        // concurrent change (an admin tightening it) is never undone. A lost race is a 409.
        patch.expected_updated_at = Some(current.updated_at);
    }
    let record = caller.manager(&manager).update(id, patch).await?;
    Ok(Json(KeyView::new(&record, manager.now())).into_response())
}

#[utoipa::path(
    post,
    path = "/keys/{id}/revoke",
    tag = "keys",
    summary = "Revoke a key, for good",
    params(("id" = uuid::Uuid, Path, description = "The key id")),
    responses(
        (status = 200, description = "The revoked key", body = KeyView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn revoke_key(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
) -> Result<Response, ApiError> {
    caller.load(&manager, id).await?;
    let record = caller.manager(&manager).revoke(id).await?;
    Ok(Json(KeyView::new(&record, manager.now())).into_response())
}

#[utoipa::path(
    post,
    path = "/keys/{id}/rotate",
    tag = "keys",
    summary = "Replace a key with a new one",
    description = "The new key has the old one's settings and lifetime from now; the old key \
        keeps working for the grace period.",
    params(("id" = uuid::Uuid, Path, description = "The key id")),
    // A `ref`, not `Option<RotateBody>`: the body may be left out, but is never `null`.
    request_body(content = ref("#/components/schemas/RotateKeyRequest"),
        description = "Optional: leave the body out for the defaults"),
    responses(
        (status = 201, description = "The new key, its plaintext shown this once",
            body = CreatedKeyView,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn rotate_key(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
    body: Option<JsonBody<RotateBody>>,
) -> Result<Response, ApiError> {
    let grace = parse_grace(body.and_then(|JsonBody(b)| b.grace).as_deref())
        .map_err(|error| ManageError::invalid("grace", error.to_string()))?;
    let old = caller.load(&manager, id).await?;
    caller.may_rotate(&old)?;
    // The new key lives the old key's lifetime from now, which could pass the caller's own
    // expiry: cap it in the same step. `may_rotate` judged `old`: a key changed since (an
    // admin giving it more power) is a 409, not a new key with powers the caller lacks.
    let checked = (!caller.is_admin()).then_some(old.updated_at);
    let created = caller
        .manager(&manager)
        .rotate_checked(id, grace, caller.max_expiry(), checked)
        .await?;
    Ok(created_response(&created, manager.now()))
}

#[utoipa::path(
    delete,
    path = "/keys/{id}",
    tag = "keys",
    summary = "Delete a key and its record",
    params(("id" = uuid::Uuid, Path, description = "The key id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn delete_key(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
) -> Result<StatusCode, ApiError> {
    caller.load(&manager, id).await?;
    caller.manager(&manager).delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/keys/{id}/usage",
    tag = "keys",
    summary = "A key's requests per hour or day, by outcome",
    description = "Written behind by the layers' usage flush (up to one flush interval late). \
        Every bucket of the span is present, zeros included. Same authorization as the key.",
    params(
        ("id" = uuid::Uuid, Path, description = "The key id"),
        ("since" = Option<String>, Query, description = "RFC 3339 (default: 7 days, or 30 by day, before `until`)"),
        ("until" = Option<String>, Query, description = "RFC 3339, exclusive (default: now)"),
        ("granularity" = Option<String>, Query, description = "`hour` (default, at most 31 days) or `day` (at most 400)"),
    ),
    responses(
        (status = 200, description = "The report", body = crate::manage::UsageReport),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn key_usage(
    State(manager): Manager,
    caller: Caller,
    KeyId(id): KeyId,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|_| ApiError::bad_request("malformed query string"))?;
    let (query, _) = usage_query(params, manager.now(), false)?;
    caller.load(&manager, id).await?;
    Ok(Json(manager.usage(id, &query).await?).into_response())
}

#[utoipa::path(
    get,
    path = "/usage",
    tag = "keys",
    summary = "Rejections no key could be blamed for, per hour or day",
    description = "Unknown and malformed keys, counted per the collection the credential named \
        (`collection=` empty for `Bearer` and `X-Api-Key`). `keys:admin` only.",
    params(
        ("collection" = String, Query, description = "The collection slug, or empty"),
        ("since" = Option<String>, Query, description = "RFC 3339"),
        ("until" = Option<String>, Query, description = "RFC 3339, exclusive (default: now)"),
        ("granularity" = Option<String>, Query, description = "`hour` (default) or `day`"),
    ),
    responses(
        (status = 200, description = "The report", body = crate::manage::UsageReport),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn collection_usage(
    State(manager): Manager,
    caller: Caller,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    if !caller.is_admin() {
        return Err(crate::manage::policy::CallerError::Forbidden(
            "counts no key is blamed for need keys:admin".into(),
        )
        .into());
    }
    let Query(params) = query.map_err(|_| ApiError::bad_request("malformed query string"))?;
    let (query, collection) = usage_query(params, manager.now(), true)?;
    let collection = collection.unwrap_or_default();
    Ok(Json(manager.collection_usage(&collection, &query).await?).into_response())
}

/// One page of the audit log.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct AuditPageView {
    /// The events, oldest first.
    items: Vec<AuditEvent>,
    /// Pass as `after` for the next page; `null` on the last page.
    next_cursor: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/audit",
    tag = "audit",
    summary = "Read the audit log, a page at a time",
    description = "Every management change, oldest first, with who made it. A `keys:self` \
        caller sees only the events about its owner's keys, and of other actors only their \
        kind (no key id, subject, name, client address or request id). The `mac` of a \
        redacted event is the stored one: check the chain with `keywarden audit verify`.",
    params(
        ("key_id" = Option<uuid::Uuid>, Query, description = "Only events about this key"),
        ("actor" = Option<String>, Query,
            description = "Only events by this actor: a kind (`cli`, `key`, `sql`, `other`) \
                or one actor (`key:<id>`, `sql:<role>`, `other:<name>`)"),
        ("action" = Option<String>, Query, description = "Only this action, e.g. `key.revoked`"),
        ("collection" = Option<String>, Query, description = "Only events about keys of this collection"),
        ("subject" = Option<String>, Query, description = "Only events about keys of this subject"),
        ("since" = Option<String>, Query, description = "Only events at or after this RFC 3339 instant"),
        ("until" = Option<String>, Query, description = "Only events before this RFC 3339 instant"),
        ("after" = Option<u64>, Query, description = "The previous page's `next_cursor`"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000,
            description = "Page size (default 100)"),
    ),
    responses(
        (status = 200, description = "One page of events", body = AuditPageView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn list_audit(
    State(manager): Manager,
    caller: Caller,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|_| ApiError::bad_request("malformed query string"))?;
    let page = match caller.restrict_audit(audit_query(params)?) {
        Some(query) => manager.audit(&query).await?,
        // The filters can only match other owners' keys.
        None => AuditPage {
            items: Vec::new(),
            next_cursor: None,
        },
    };
    let mut items = page.items;
    if !caller.is_admin() {
        // An owner sees what happened to its keys, not who else (an admin's key, address or
        // request) did it: other actors are shown by kind only.
        for event in &mut items {
            if event.actor.key_id() != Some(caller.key_id()) {
                event.actor = Actor::redacted(event.actor.kind());
                event.client_address = None;
                event.request_id = None;
            }
        }
    }
    Ok(Json(AuditPageView {
        items,
        next_cursor: page.next_cursor,
    })
    .into_response())
}

/// A 201 with the plaintext: never cached.
fn created_response(created: &CreatedKey, now: OffsetDateTime) -> Response {
    (
        StatusCode::CREATED,
        [(CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(CreatedKeyView::new(created, now)),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use serde_json::Value;
    use time::macros::datetime;
    use tower::ServiceExt;

    use crate::manage::{management_router, ExpiresIn, NewKey};
    use crate::{KeyManager, MemoryStore, Principal, SecretRing};
    use std::sync::Arc;

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
}
