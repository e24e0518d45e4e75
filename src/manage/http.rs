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
//! `"errors": [{"field", "message"}]`. Error bodies never repeat submitted values, so a key
//! pasted into the wrong field is not echoed back.

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
/// Longest field or parameter name repeated in an error.
const MAX_ECHOED_NAME: usize = 64;

/// The management API as an axum `Router` to nest under any path, behind an
/// [`ApiKeyLayer`](crate::ApiKeyLayer).
///
/// | Route | Success | Errors |
/// | --- | --- | --- |
/// | `POST /keys` | 201 `{"key", ...view}` | 400, 401, 403, 409, 422, 503 |
/// | `GET /keys?collection&subject&state&after&limit` | 200 `{"items", "next_cursor"}` | 400, 401, 403, 422, 503 |
/// | `GET /keys/{id}` | 200 view | 401, 403, 404, 422, 503 |
/// | `PATCH /keys/{id}` | 200 view | 400, 401, 403, 404, 422, 503 |
/// | `POST /keys/{id}/revoke` | 200 view | 401, 403, 404, 422, 503 |
/// | `POST /keys/{id}/rotate` (body optional: `{"grace": "24h"}`) | 201 `{"key", ...view}` | 400, 401, 403, 404, 409, 422, 503 |
/// | `DELETE /keys/{id}` | 204 | 401, 403, 404, 422, 503 |
///
/// A view never holds the digest, the secret id or the encrypted key; the plaintext key is
/// only in the 201 responses (sent with `Cache-Control: no-store`).
///
/// Authorization, from the [`Principal`] the layer inserted (none: 401 `missing_credentials`):
/// - `keys:admin` manages every key.
/// - `keys:self` manages the keys of its owner: same `collection` and same `subject` as the
///   calling key. Other keys answer 404 exactly like an unknown id, and listings are limited
///   to the caller's own keys. It may not create a key for another subject, collection or
///   owner kind, nor grant (on create or `PATCH`) a scope it does not hold itself: 403
///   `insufficient_scope`.
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
    caller.load(&manager, id).await?;
    if let Some(scopes) = &body.scopes {
        caller.may_grant(scopes)?;
    }
    let record = manager.update(id, body.into_patch()?).await?;
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
    caller.load(&manager, id).await?;
    let created = manager.rotate(id, grace).await?;
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
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, state)
            .await
            .map_err(ApiError::Auth)?;
        let admin = principal.has_scope(ADMIN_SCOPE);
        if !admin && !principal.has_scope(SELF_SCOPE) {
            return Err(ApiError::Auth(AuthRejection::insufficient_scope(
                ADMIN_SCOPE,
            )));
        }
        Ok(Self { principal, admin })
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

    /// A `keys:self` caller grants only scopes it holds.
    fn may_grant(&self, scopes: &[String]) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        // Malformed scopes are a 422, not a privilege question.
        check_scopes(&mut scopes.to_vec())?;
        match scopes.iter().find(|s| !self.principal.has_scope(s)) {
            Some(scope) => Err(forbidden(format!(
                "a `keys:self` key cannot grant the scope `{scope}`, which it does not hold"
            ))),
            None => Ok(()),
        }
    }

    /// A `keys:self` caller names its own collection, subject and owner kind or none.
    fn may_own(&self, body: &CreateBody) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        let p = &self.principal;
        let mismatch = if body.subject.as_deref().is_some_and(|s| s != p.subject()) {
            Some("subject")
        } else if body
            .collection
            .as_deref()
            .is_some_and(|c| c != p.collection())
        {
            Some("collection")
        } else if body.owner_kind.is_some_and(|k| k != p.owner_kind()) {
            Some("owner_kind")
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

    /// The key to create.
    fn new_key(&self, body: CreateBody, now: OffsetDateTime) -> Result<NewKey, ApiError> {
        self.may_own(&body)?;
        if let Some(scopes) = &body.scopes {
            self.may_grant(scopes)?;
        }
        let p = &self.principal;
        let name = body
            .name
            .ok_or_else(|| ApiError::invalid("name", "name is required"))?;
        let expires_in = match (body.expires_in, body.expires_at) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "expires_at",
                    "give expires_in or expires_at, not both",
                ))
            }
            (Some(text), None) => match parse_duration_or_unlimited(&text) {
                Some(expires_in) => expires_in,
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
                ExpiresIn::At(at)
            }
            (None, None) => ExpiresIn::Unlimited,
        };
        let mut new = NewKey::new(name, body.subject.unwrap_or_else(|| p.subject().to_owned()))
            .collection(body.collection.unwrap_or_else(|| p.collection().to_owned()))
            .owner_kind(body.owner_kind.unwrap_or_else(|| p.owner_kind()))
            .environment(
                body.environment
                    .unwrap_or_else(|| p.environment().to_owned()),
            )
            .read_only(body.read_only.unwrap_or(false))
            .expires_in(expires_in);
        new.description = body.description;
        new.scopes = body.scopes.unwrap_or_default();
        if let Some(metadata) = body.metadata {
            new.metadata = metadata;
        }
        if let Some(text) = body.rate_limit {
            new.rate_limit = Some(parse_rate_limit(&text)?);
        }
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

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_json(req, state)
            .await?
            .map(JsonBody)
            .ok_or_else(|| ApiError::bad_request("a JSON object body is required"))
    }
}

impl<S: Send + Sync, T: DeserializeOwned> OptionalFromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(read_json(req, state).await?.map(JsonBody))
    }
}

/// `None` for an empty body.
async fn read_json<S: Send + Sync, T: DeserializeOwned>(
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
fn from_object<T: DeserializeOwned>(object: Map<String, Value>) -> Result<T, ApiError> {
    if let Ok(value) = serde_json::from_value(Value::Object(object.clone())) {
        return Ok(value);
    }
    let errors = object
        .into_iter()
        .filter_map(|(field, value)| {
            let alone = Map::from_iter([(field.clone(), value)]);
            serde_json::from_value::<T>(Value::Object(alone))
                .err()
                .map(|err| field_error(&field, &err))
        })
        .collect();
    Err(ApiError::validation(errors))
}

/// A field error in our words: serde's messages quote the offending value.
fn field_error(field: &str, err: &serde_json::Error) -> FieldError {
    let text = err.to_string();
    let message = if text.starts_with("unknown field") {
        "unknown field".to_owned()
    } else if let Some((_, expected)) = text.split_once(", expected ") {
        let expected = expected.split(" at line ").next().unwrap_or(expected);
        format!("expected {expected}")
    } else {
        "invalid value".to_owned()
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

impl PatchBody {
    fn into_patch(self) -> Result<KeyPatch, ApiError> {
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
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RotateBody {
    grace: Option<String>,
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
            other => errors.push(FieldError::new(other, "unknown query parameter")),
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

#[derive(Debug, Serialize)]
struct FieldError {
    field: String,
    message: String,
}

impl FieldError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.chars().take(MAX_ECHOED_NAME).collect(),
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

    fn invalid(field: &str, message: impl Into<String>) -> Self {
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
            ManageErrorKind::Conflict | ManageErrorKind::NotRevealable => Self::problem(
                StatusCode::CONFLICT,
                "conflict",
                "Conflict",
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
