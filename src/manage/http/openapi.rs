//! The OpenAPI 3.1 document of the management API, generated from the handlers' `#[utoipa::path]`
//! attributes and the schemas of the request and view types themselves.

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::response::{Response as ResponseDoc, ResponseBuilder};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToResponse, ToSchema};

use super::error::{FieldError, Problem};
use super::extract::RotateBody;
use super::routes;

/// The document's description: what every route shares.
const DESCRIPTION: &str = "\
Create, list, inspect, update, revoke, rotate and delete API keys.

The paths are relative to where the router is nested (`/admin/keys` under `/admin`). Every \
route, `/openapi.json` included, sits behind the keywarden layer and needs an API key; the \
key routes also need the scope `keys:admin` (every key) or `keys:self` (the keys of the \
caller's own collection and subject, which it may only tighten). Wildcard scopes never grant \
them.

Request bodies are JSON objects (`Content-Type: application/json`); unknown members are \
refused. Every error is `application/problem+json` with `status`, `code`, `title` and \
`detail`, plus `errors` on a 422.";

#[derive(OpenApi)]
#[openapi(
    info(title = "keywarden management API", description = DESCRIPTION),
    paths(
        routes::create_key,
        routes::list_keys,
        routes::get_key,
        routes::update_key,
        routes::delete_key,
        routes::revoke_key,
        routes::rotate_key,
        routes::key_usage,
        routes::collection_usage,
        routes::list_audit,
        super::owners::list_owners,
        super::owners::get_owner,
        super::owners::set_owner,
        super::owners::delete_owner,
        serve,
    ),
    components(schemas(RotateBody, Problem, FieldError), responses(
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        ValidationFailed,
        TooManyRequests,
        Unavailable
    )),
    modifiers(&SecuritySchemes),
    security(("bearer" = []), ("x_api_key" = []), ("collection_api_key" = [])),
    tags(
        (name = "keys", description = "API keys; needs `keys:admin` or `keys:self`."),
        (name = "audit", description = "The audit log of key management; `keys:admin` reads all, `keys:self` its own keys' events."),
        (name = "owners", description = "Policies all of an owner's keys share (a rate limit and/or credits); set by `keys:admin`, read by the owner's own `keys:self` keys too."),
        (name = "meta", description = "This document."),
    )
)]
struct ManagementApi;

/// The OpenAPI 3.1 document of [`management_router`](crate::manage::management_router), with
/// its paths relative to where the router is nested.
///
/// The router serves the same document at `/openapi.json`. Merge it into your own under the
/// path you nest the router at:
///
/// ```
/// use utoipa::openapi::OpenApiBuilder;
///
/// let mine = OpenApiBuilder::new().build().nest("/admin", keywarden::manage::openapi());
/// assert!(mine.paths.paths.contains_key("/admin/keys/{id}"));
/// ```
pub fn openapi() -> utoipa::openapi::OpenApi {
    let document = ManagementApi::openapi();
    #[cfg(feature = "webhooks")]
    let document = document.merge_from(WebhooksApi::openapi());
    document
}

/// The `/webhooks` paths (feature `webhooks`).
#[cfg(feature = "webhooks")]
#[derive(OpenApi)]
#[openapi(
    paths(
        super::webhooks::create_webhook,
        super::webhooks::list_webhooks,
        super::webhooks::get_webhook,
        super::webhooks::update_webhook,
        super::webhooks::delete_webhook,
    ),
    tags((name = "webhooks", description = "Signed event deliveries (Standard Webhooks); `keys:admin` only.")),
)]
struct WebhooksApi;

/// The document as served: pretty-printed JSON, built once per router.
pub(super) fn document() -> Bytes {
    // Serializing a document of maps and strings cannot fail.
    Bytes::from(openapi().to_pretty_json().unwrap_or_default())
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    description = "Any key the layer admits may read it: it holds no key data.",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API",
            content_type = "application/json", body = Object),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(crate) async fn serve(document: Bytes) -> Response {
    (
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        document,
    )
        .into_response()
}

/// The three ways the layer reads a key (also the verification API's document).
pub(crate) struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("keywarden key")
                    .description(Some("`Authorization: Bearer <key>`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "x_api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Api-Key",
                "`X-Api-Key: <key>` (and any header names the layer adds)",
            ))),
        );
        components.add_security_scheme(
            "collection_api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "`Authorization: <collection> API-Key <key>` (Payload CMS's form), e.g. \
                 `users API-Key kw_live_...`; the collection must be one the layer serves",
            ))),
        );
    }
}

/// A reusable problem+json response.
pub(crate) fn problem(description: &str, example: serde_json::Value) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/problem+json",
        ContentBuilder::new()
            .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                Problem::name(),
            ))))
            .example(Some(example))
            .build(),
    )
}

/// A `Retry-After` header, in seconds.
fn retry_after(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(u32::schema())
        .description(Some(description))
        .build()
}

/// Declares a unit type per reusable error response.
macro_rules! problem_responses {
    ($($name:ident => $build:expr;)*) => {$(
        pub(crate) struct $name;

        impl<'s> ToResponse<'s> for $name {
            fn response() -> (&'s str, RefOr<ResponseDoc>) {
                (stringify!($name), $build.build().into())
            }
        }
    )*};
}

problem_responses! {
    BadRequest => problem(
        "`invalid_request`: the body is not a JSON object under a JSON content type, or the \
         query string is malformed; `ambiguous_credentials` (from the layer): more than one key",
        serde_json::json!({"status": 400, "code": "invalid_request", "title": "Invalid request",
            "detail": "the body must be a JSON object"}),
    );
    Unauthorized => problem(
        "From the layer: no key (`missing_credentials`), or a malformed, unknown, expired or \
         revoked one",
        serde_json::json!({"status": 401, "code": "missing_credentials",
            "title": "API key required", "detail": "an API key is required"}),
    )
    .header("WWW-Authenticate", HeaderBuilder::new().schema(String::schema()).build());
    Forbidden => problem(
        "`insufficient_scope`: the key has neither `keys:admin` nor `keys:self`, a `keys:self` \
         key asked for more than its own powers, or a read-only key made an unsafe request",
        serde_json::json!({"status": 403, "code": "insufficient_scope",
            "title": "Insufficient scope", "detail": "this request needs the scope `keys:admin`"}),
    );
    NotFound => problem(
        "`not_found`: no such key (for a `keys:self` caller: none of its own), or no policy \
         for this owner (`/owners/...`, title `No owner policy`)",
        serde_json::json!({"status": 404, "code": "not_found", "title": "Key not found",
            "detail": "no key with this id"}),
    );
    Conflict => problem(
        "`conflict`: the key changed while the request was checked (read it again and \
         retry); `read_only`: a key issued by another system; `inactive_key`: the key is not \
         active",
        serde_json::json!({"status": 409, "code": "conflict", "title": "Conflict",
            "detail": "the key changed concurrently; read it again and retry"}),
    );
    ValidationFailed => problem(
        "`validation_failed`: invalid fields, each named in `errors` (an unknown member is \
         `body`, an unknown query parameter `query`)",
        serde_json::json!({"status": 422, "code": "validation_failed",
            "title": "Validation failed", "detail": "name: expected a string",
            "errors": [{"field": "name", "message": "expected a string"}]}),
    );
    TooManyRequests => problem(
        "`rate_limited`: the calling key's rate limit, or its owner's (from the layer); \
         `usage_exceeded`: the calling key's credits, or its owner's, are spent",
        serde_json::json!({"status": 429, "code": "rate_limited",
            "title": "Rate limit exceeded", "detail": "rate limit exceeded; retry later"}),
    )
    .header("Retry-After", retry_after("Seconds until a request may succeed"));
    Unavailable => problem(
        "`store_unavailable`: the key store cannot be reached; retry later",
        serde_json::json!({"status": 503, "code": "store_unavailable",
            "title": "Key store unavailable",
            "detail": "the key store is unavailable; retry later"}),
    )
    .header("Retry-After", retry_after("Seconds to wait before retrying"));
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use time::OffsetDateTime;

    use super::super::extract::list_query;
    use crate::store::KeyQuery;

    /// The listing's documented query parameters are the ones `list_query` reads.
    #[test]
    fn the_documented_query_parameters_are_the_ones_read() {
        let doc = serde_json::to_value(super::openapi()).unwrap();
        let params = doc["paths"]["/keys"]["get"]["parameters"]
            .as_array()
            .unwrap();
        assert_eq!(params.len(), 6, "{params:?}");
        for param in params {
            let name = param["name"].as_str().unwrap().to_owned();
            let schema = &param["schema"];
            let value = match (schema["type"].as_str(), schema["format"].as_str()) {
                (Some("integer"), _) => {
                    assert_eq!(schema["maximum"], KeyQuery::MAX_LIMIT, "{name}");
                    assert_eq!(schema["minimum"], 1, "{name}");
                    KeyQuery::MAX_LIMIT.to_string()
                }
                (Some("string"), Some("uuid")) => uuid::Uuid::nil().to_string(),
                (Some("string"), None) => "x".to_owned(),
                _ => {
                    assert_eq!(schema["$ref"], "#/components/schemas/KeyState", "{name}");
                    let states = &doc["components"]["schemas"]["KeyState"]["enum"];
                    for state in states.as_array().unwrap() {
                        let state = state.as_str().unwrap().to_owned();
                        assert!(list_query(vec![(name.clone(), state)], now()).is_ok());
                    }
                    continue;
                }
            };
            assert!(
                list_query(vec![(name.clone(), value)], now()).is_ok(),
                "{name}"
            );
            assert_eq!(param["in"], Value::from("query"));
        }
        assert!(list_query(vec![("cursor".into(), "x".into())], now()).is_err());
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}
