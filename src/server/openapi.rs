//! The OpenAPI 3.1 document of the verification API and forward auth, so services in other
//! languages can generate a client. Served at `GET /v1/openapi.json`; committed as
//! `docs/openapi-server.json`.

use axum::body::Bytes;
use axum::response::Response;
use utoipa::openapi::response::Response as ResponseDoc;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{HeaderBuilder, RefOr, Schema};
use utoipa::{OpenApi, PartialSchema, ToResponse, ToSchema};

use crate::manage::http::error::{FieldError, Problem};
use crate::manage::http::openapi::{
    self, problem, BadRequest, SecuritySchemes, TooManyRequests, Unauthorized, Unavailable,
    ValidationFailed,
};
use crate::ratelimit::RateLimitPolicy;
use crate::rejection::RejectionKind;
use crate::store::OwnerKind;

const DESCRIPTION: &str = "\
Ask keywarden whether an API key is valid, from any language (`POST /v1/keys/verify`), or let \
a gateway ask before it forwards a request (`/v1/auth`: nginx `auth_request`, Traefik \
`ForwardAuth`, Caddy `forward_auth`, Envoy `ext_authz`). Both answer through the same cache, \
rate limits and checks as keywarden's own layer, with its error codes.

Errors of the endpoint itself are `application/problem+json` with `status`, `code`, `title` \
and `detail` (plus `errors` on a 422).";

#[derive(OpenApi)]
#[openapi(
    info(title = "keywarden verification API", description = DESCRIPTION),
    paths(verify, forward_auth, serve),
    components(
        schemas(VerifyRequest, ValidVerdict, InvalidVerdict, VerifiedPrincipal, RateLimitState,
            VerdictCode, Problem, FieldError),
        responses(BadRequest, Unauthorized, Forbidden, ValidationFailed, TooManyRequests,
            Unavailable, AuthRejected)
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "verify", description = "Key verification for other services and gateways."),
        (name = "meta", description = "This document."),
    )
)]
struct VerificationApi;

/// The OpenAPI 3.1 document of [`AuthServer::router`](super::AuthServer::router): `POST
/// /v1/keys/verify`, `/v1/auth` and `GET /v1/openapi.json`. The router serves it at
/// `/v1/openapi.json`.
///
/// ```
/// let doc = keywarden::server::openapi();
/// assert!(doc.paths.paths.contains_key("/v1/keys/verify"));
/// ```
pub fn openapi() -> utoipa::openapi::OpenApi {
    VerificationApi::openapi()
}

/// The document as served: pretty-printed JSON, built once per router.
pub(super) fn document() -> Bytes {
    // Serializing a document of maps and strings cannot fail.
    Bytes::from(openapi().to_pretty_json().unwrap_or_default())
}

/// The request of `POST /v1/keys/verify`.
#[derive(ToSchema)]
#[schema(as = VerifyRequest)]
#[allow(dead_code)] // a schema, never built
struct VerifyRequest {
    /// The key to verify, as the client presented it.
    #[schema(examples("kw_live_..."))]
    key: String,
    /// Scopes the key must hold (judged as the layer judges them: `*` and `prefix:*` grant,
    /// management scopes only by exact name).
    #[schema(examples(json!(["orders:read"])))]
    scopes: Option<Vec<String>>,
    /// The credits the verification spends of a key with credits (default 1; `null` too);
    /// a key without credits is never charged, and a refused key spends nothing.
    #[schema(minimum = 0, maximum = 4294967295_u64)]
    cost: Option<u64>,
}

/// The key is valid.
#[derive(ToSchema)]
#[allow(dead_code)]
struct ValidVerdict {
    /// Always `true` here.
    #[schema(examples(true))]
    valid: bool,
    principal: VerifiedPrincipal,
    /// The key's rate limit after this verification, `null` for a key without one.
    ratelimit: Option<RateLimitState>,
    /// For a key with credits only: the credits left after this verification, as the
    /// instance knows them (its lease plus the store's balance at its last lease).
    #[schema(required = false, examples(41))]
    credits_remaining: Option<u64>,
}

/// The key is not valid (or cannot be checked now: `store_unavailable`).
#[derive(ToSchema)]
#[allow(dead_code)]
struct InvalidVerdict {
    /// Always `false` here.
    #[schema(examples(false))]
    valid: bool,
    code: VerdictCode,
    /// What is wrong, never repeating the key.
    #[schema(examples("the key has been revoked"))]
    detail: String,
    /// With `rate_limited`: the budget.
    #[schema(required = false)]
    ratelimit: Option<RateLimitState>,
    /// With `rate_limited`, `usage_exceeded` (a key whose credits refill) and
    /// `store_unavailable`: seconds until a retry may succeed.
    #[schema(required = false)]
    retry_after: Option<u64>,
}

/// The verified key's principal: who it belongs to and what it may do.
#[derive(ToSchema)]
#[allow(dead_code)]
struct VerifiedPrincipal {
    key_id: uuid::Uuid,
    key_name: String,
    /// The collection (`users`, ...) the key belongs to.
    collection: String,
    /// The owner's id.
    subject: String,
    owner_kind: OwnerKind,
    scopes: Vec<String>,
    /// `live` or `test`, from the key's prefix.
    environment: String,
    /// Whether the key may only make safe requests (GET, HEAD, OPTIONS, TRACE).
    read_only: bool,
    /// The key's metadata: a JSON object.
    #[schema(value_type = Object)]
    metadata: serde_json::Value,
    /// When the key expires; `null`: never.
    expires_at: Option<time::OffsetDateTime>,
    /// The key's own rate limit, if any.
    rate_limit: Option<RateLimitPolicy>,
}

/// A key's rate-limit budget.
#[derive(ToSchema)]
#[allow(dead_code)]
struct RateLimitState {
    /// Requests per period.
    limit: u32,
    /// Requests left now.
    remaining: u32,
    /// Seconds until the budget is full again, rounded up.
    reset: u64,
}

/// Why a key is not valid: the layer's codes (never `missing_credentials`: an empty key is a
/// 422).
struct VerdictCode;

impl PartialSchema for VerdictCode {
    fn schema() -> RefOr<Schema> {
        let codes = RejectionKind::ALL
            .iter()
            .map(|kind| kind.code())
            .filter(|code| *code != RejectionKind::MissingCredentials.code());
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(codes))
            .description(Some(
                "The layer's rejection code (see the README's table of codes).",
            ))
            .into()
    }
}

impl ToSchema for VerdictCode {}

/// `POST /v1/keys/verify`.
#[utoipa::path(
    post,
    path = "/v1/keys/verify",
    tag = "verify",
    operation_id = "verify_key",
    description = "Verifies the key in the body. The answer is 200 either way: `valid: true` \
        with the principal, or `valid: false` with the layer's code. The caller authenticates \
        with its own key, which must hold the scope `keys:verify` (granted only by that exact \
        name). A verification counts as one use of the key and one request against its rate \
        limit.",
    request_body(content = VerifyRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The verdict", content_type = "application/json",
            body = inline(VerdictDoc)),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ("x_api_key" = []), ("collection_api_key" = []))
)]
#[allow(dead_code)] // documents super::verify::verify
async fn verify() {}

/// The 200 body of `POST /v1/keys/verify`: one of the two verdicts.
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum VerdictDoc {
    Valid(ValidVerdict),
    Invalid(InvalidVerdict),
}

/// `/v1/auth`, documented as GET; every method is answered alike.
#[utoipa::path(
    get,
    path = "/v1/auth",
    tag = "verify",
    operation_id = "forward_auth",
    description = "Forward auth for gateways. Any method, and any path below `/v1/auth/` \
        (Envoy's path prefix). The forwarded request's headers carry the credential; its \
        method comes from `X-Forwarded-Method` or `X-Original-Method` (which must agree, else \
        400), else this request's own: a read-only key is refused on unsafe methods.",
    params(
        ("X-Forwarded-Method" = Option<String>, Header,
            description = "The original request's method (Traefik, Caddy)"),
        ("X-Original-Method" = Option<String>, Header,
            description = "The original request's method (nginx configurations)"),
    ),
    responses(
        (status = 200, description = "The key is valid; pass these headers upstream",
            headers(
                ("X-Keywarden-Subject" = String, description = "The owner's id (percent-encoded \
                    outside visible ASCII, and `%`, `,`)"),
                ("X-Keywarden-Key-Id" = String, description = "The key's id"),
                ("X-Keywarden-Collection" = String, description = "The key's collection"),
                ("X-Keywarden-Scopes" = String, description = "The scopes, comma-separated, \
                    each percent-encoded like the subject"),
            )),
        (status = 400, response = AuthRejected),
        (status = 401, response = AuthRejected),
        (status = 403, response = AuthRejected),
        (status = 429, response = AuthRejected),
        (status = 503, response = AuthRejected),
    ),
    security(("bearer" = []), ("x_api_key" = []), ("collection_api_key" = []))
)]
#[allow(dead_code)] // documents super::forward::forward_auth
async fn forward_auth() {}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    operation_id = "server_openapi",
    description = "Open: it holds no key data.",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API",
            content_type = "application/json", body = Object),
    )
)]
pub(super) async fn serve(document: Bytes) -> Response {
    openapi::serve(document).await
}

/// `insufficient_scope` for the verify API's caller.
pub(crate) struct Forbidden;

impl<'s> ToResponse<'s> for Forbidden {
    fn response() -> (&'s str, RefOr<ResponseDoc>) {
        (
            "VerifyForbidden",
            problem(
                "`insufficient_scope`: the caller's key lacks `keys:verify`",
                serde_json::json!({"status": 403, "code": "insufficient_scope",
                    "title": "Insufficient scope",
                    "detail": "this request needs the scope `keys:verify`"}),
            )
            .build()
            .into(),
        )
    }
}

/// Any rejection of forward auth: the layer's status, headers and body, plus the code in a
/// header for gateways that render their own body.
pub(crate) struct AuthRejected;

impl<'s> ToResponse<'s> for AuthRejected {
    fn response() -> (&'s str, RefOr<ResponseDoc>) {
        (
            "AuthRejected",
            problem(
                "The layer's rejection (`missing_credentials`, `invalid_key`, `expired_key`, \
                 `revoked_key`, `insufficient_scope`, `rate_limited`, `store_unavailable`, \
                 ...; 400 for contradicting method headers or an ambiguous credential), with `WWW-Authenticate` (401, 403), `Retry-After` (429, 503) and \
                 `RateLimit-*` as the layer sends them",
                serde_json::json!({"status": 401, "code": "revoked_key",
                    "title": "API key revoked", "detail": "the key has been revoked"}),
            )
            .header(
                "X-Keywarden-Code",
                HeaderBuilder::new()
                    .schema(String::schema())
                    .description(Some("The rejection code"))
                    .build(),
            )
            .build()
            .into(),
        )
    }
}
