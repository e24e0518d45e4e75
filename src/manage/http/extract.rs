//! Reading requests: the `{id}` segment, JSON object bodies (only under a JSON content type)
//! and the listing's query parameters, each refused as problem+json that never repeats
//! submitted text.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Path, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::{ApiError, FieldError};
use crate::audit::{AuditAction, AuditQuery};
use crate::manage::policy::{CreateRequest, PatchRequest};
use crate::store::{KeyQuery, KeyState};

/// The `{id}` path segment as a key id.
pub(super) struct KeyId(pub(super) Uuid);

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
pub(crate) struct JsonBody<T>(pub(crate) T);

/// A request body type and the names of its members: errors name only these, never a member
/// name the client sent.
pub(crate) trait BodyFields: DeserializeOwned {
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

/// A rotation's options; the body may also be left out.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RotateKeyRequest)]
pub(super) struct RotateBody {
    /// How long the old key keeps working, e.g. `24h` (the default), `15m`, or `0s` to end
    /// it at once.
    #[schema(nullable = false, examples("24h"))]
    pub(super) grace: Option<String>,
}

impl BodyFields for RotateBody {
    const FIELDS: &'static [&'static str] = &["grace"];
}

impl BodyFields for CreateRequest {
    const FIELDS: &'static [&'static str] = CreateRequest::FIELDS;
}

impl BodyFields for PatchRequest {
    const FIELDS: &'static [&'static str] = PatchRequest::FIELDS;
}

pub(super) fn list_query(
    params: Vec<(String, String)>,
    now: OffsetDateTime,
) -> Result<KeyQuery, ApiError> {
    let mut query = KeyQuery {
        now,
        ..KeyQuery::new()
    };
    let mut errors = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "collection" => query.collection = Some(value),
            "subject" => query.subject = Some(value),
            "environment" => query.environment = Some(value),
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

/// An RFC 3339 query parameter; a bad one is noted in `errors`.
fn time(field: &'static str, value: &str, errors: &mut Vec<FieldError>) -> Option<OffsetDateTime> {
    crate::manage::policy::parse_time(field, value)
        .map_err(|_| {
            errors.push(FieldError::new(
                field,
                "expected an RFC 3339 timestamp such as 2030-01-31T12:00:00Z",
            ));
        })
        .ok()
}

/// The usage report's query parameters (`collection` only where `with_collection`):
/// `since`/`until` RFC 3339 (default: the last 7 days by hour, 30 by day, up to now),
/// `granularity` `hour` (default) or `day`.
pub(super) fn usage_query(
    params: Vec<(String, String)>,
    now: OffsetDateTime,
    with_collection: bool,
) -> Result<(crate::manage::UsageQuery, Option<String>), ApiError> {
    use crate::manage::Granularity;
    let mut errors = Vec::new();
    let (mut since, mut until, mut granularity, mut collection) =
        (None, None, Granularity::Hour, None);
    for (name, value) in params {
        match name.as_str() {
            "since" => since = time("since", &value, &mut errors),
            "until" => until = time("until", &value, &mut errors),
            "granularity" => match Granularity::parse(&value) {
                Some(g) => granularity = g,
                None => errors.push(FieldError::new("granularity", "expected hour or day")),
            },
            "collection" if with_collection => collection = Some(value),
            _ => {
                let error = FieldError::new("query", "unknown parameter");
                if !errors.contains(&error) {
                    errors.push(error);
                }
            }
        }
    }
    if with_collection && collection.is_none() {
        errors.push(FieldError::new(
            "collection",
            "name the collection (empty for credentials naming none)",
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let until = until.unwrap_or(now);
    let default_span = match granularity {
        Granularity::Hour => time::Duration::days(7),
        Granularity::Day => time::Duration::days(30),
    };
    let since = since.unwrap_or_else(|| until.checked_sub(default_span).unwrap_or(until));
    Ok((
        crate::manage::UsageQuery {
            since,
            until,
            granularity,
        },
        collection,
    ))
}

/// The audit log's query parameters.
pub(super) fn audit_query(params: Vec<(String, String)>) -> Result<AuditQuery, ApiError> {
    let mut query = AuditQuery::default();
    let mut errors = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "key_id" => match Uuid::try_parse(&value) {
                Ok(id) => query.key_id = Some(id),
                Err(_) => errors.push(FieldError::new("key_id", "expected a key id")),
            },
            "actor" => match crate::audit::check_actor_filter(&value) {
                Ok(()) => query.actor = Some(value),
                Err(message) => errors.push(FieldError::new("actor", message)),
            },
            "action" => match value.parse::<AuditAction>() {
                Ok(action) => query.action = Some(action),
                Err(error) => errors.push(FieldError::new("action", error.to_string())),
            },
            "collection" => query.collection = Some(value),
            "subject" => query.subject = Some(value),
            "since" => query.since = time("since", &value, &mut errors),
            "until" => query.until = time("until", &value, &mut errors),
            "after" => match value.parse::<u64>() {
                Ok(seq) => query.after = Some(seq),
                Err(_) => errors.push(FieldError::new(
                    "after",
                    "expected an event number (the previous page's next_cursor)",
                )),
            },
            "limit" => match value.parse::<u32>() {
                Ok(limit) if (1..=AuditQuery::MAX_LIMIT).contains(&limit) => query.limit = limit,
                _ => errors.push(FieldError::new(
                    "limit",
                    format!("expected a number from 1 to {}", AuditQuery::MAX_LIMIT),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::HeaderValue;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::manage::management_router;
    use crate::{KeyManager, MemoryStore, Principal, SecretRing};

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

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    /// The field errors of a 422, in order.
    fn field_errors<T: std::fmt::Debug>(result: Result<T, ApiError>) -> Vec<FieldError> {
        match result {
            Err(ApiError::Problem { status, errors, .. })
                if status == axum::http::StatusCode::UNPROCESSABLE_ENTITY =>
            {
                errors
            }
            other => panic!("not a 422: {other:?}"),
        }
    }

    const NOW: OffsetDateTime = time::macros::datetime!(2031-05-06 07:08:09 UTC);

    /// Every listing parameter is read into its own filter; the limit's bounds are
    /// inclusive; bad values and unknown names are 422s naming only our fields.
    #[test]
    fn list_query_reads_each_parameter_into_its_filter() {
        let id = Uuid::from_u128(7);
        let query = list_query(
            params(&[
                ("collection", "users"),
                ("subject", "alice"),
                ("environment", "live"),
                ("state", "revoked"),
                ("after", &id.to_string()),
                ("limit", "500"),
            ]),
            NOW,
        )
        .unwrap();
        let expected = KeyQuery {
            collection: Some("users".into()),
            subject: Some("alice".into()),
            environment: Some("live".into()),
            state: Some(KeyState::Revoked),
            after: Some(id),
            limit: 500,
            now: NOW,
            ..KeyQuery::new()
        };
        assert_eq!(query, expected);
        let defaults = KeyQuery {
            now: NOW,
            ..KeyQuery::new()
        };
        assert_eq!(list_query(Vec::new(), NOW).unwrap(), defaults);
        assert_eq!(list_query(params(&[("limit", "1")]), NOW).unwrap().limit, 1);
        for bad in ["0", "501", "-1", "ten"] {
            assert_eq!(
                field_errors(list_query(params(&[("limit", bad)]), NOW)),
                [FieldError::new("limit", "expected a number from 1 to 500")],
                "{bad}"
            );
        }
        assert_eq!(
            field_errors(list_query(
                params(&[
                    ("state", "gone"),
                    ("after", "not-a-uuid"),
                    ("kw_live_pasted", "1"),
                    ("other", "2"),
                ]),
                NOW
            )),
            [
                FieldError::new("state", "expected active, expired, revoked or disabled"),
                FieldError::new(
                    "after",
                    "expected a key id (the previous page's next_cursor)"
                ),
                FieldError::new("query", "unknown parameter"),
            ]
        );
    }

    /// `since`, `until` and `granularity` are read; the span defaults to 7 days by hour and
    /// 30 by day up to now; `collection` is required by the collection report (empty is a
    /// value) and unknown to a key's.
    #[test]
    fn usage_query_reads_each_parameter_and_defaults_the_span() {
        use crate::manage::{Granularity, UsageQuery};
        use time::macros::datetime;

        let (query, collection) = usage_query(
            params(&[
                ("since", "2031-05-01T00:00:00Z"),
                ("until", "2031-05-03T00:00:00Z"),
                ("granularity", "day"),
                ("collection", "users"),
            ]),
            NOW,
            true,
        )
        .unwrap();
        assert_eq!(
            query,
            UsageQuery {
                since: datetime!(2031-05-01 00:00 UTC),
                until: datetime!(2031-05-03 00:00 UTC),
                granularity: Granularity::Day,
            }
        );
        assert_eq!(collection.as_deref(), Some("users"));
        assert_eq!(
            usage_query(Vec::new(), NOW, false).unwrap(),
            (
                UsageQuery {
                    since: NOW - time::Duration::days(7),
                    until: NOW,
                    granularity: Granularity::Hour,
                },
                None
            )
        );
        let (by_day, _) = usage_query(params(&[("granularity", "day")]), NOW, false).unwrap();
        assert_eq!(by_day.since, NOW - time::Duration::days(30));
        let (collection_wide, collection) =
            usage_query(params(&[("collection", "")]), NOW, true).unwrap();
        assert_eq!(collection.as_deref(), Some(""));
        assert_eq!(collection_wide.until, NOW);

        let unknown = FieldError::new("query", "unknown parameter");
        assert_eq!(
            field_errors(usage_query(params(&[("collection", "users")]), NOW, false)),
            [FieldError::new("query", "unknown parameter")]
        );
        assert_eq!(
            field_errors(usage_query(Vec::new(), NOW, true)),
            [FieldError::new(
                "collection",
                "name the collection (empty for credentials naming none)"
            )]
        );
        let rfc3339 = "expected an RFC 3339 timestamp such as 2030-01-31T12:00:00Z";
        assert_eq!(
            field_errors(usage_query(
                params(&[
                    ("since", "yesterday"),
                    ("until", "2031-13-01T00:00:00Z"),
                    ("granularity", "week"),
                    ("kw_live_pasted", "1"),
                    ("other", "2"),
                ]),
                NOW,
                false
            )),
            [
                FieldError::new("since", rfc3339),
                FieldError::new("until", rfc3339),
                FieldError::new("granularity", "expected hour or day"),
                unknown,
            ]
        );
    }

    /// Every audit filter is read into its own field; the limit's bounds are inclusive; bad
    /// values and unknown names are 422s naming only our fields.
    #[test]
    fn audit_query_reads_each_parameter_into_its_filter() {
        use time::macros::datetime;

        let id = Uuid::from_u128(9);
        let action: AuditAction = "key.revoked".parse().unwrap();
        let query = audit_query(params(&[
            ("key_id", &id.to_string()),
            ("actor", "sql:app"),
            ("action", "key.revoked"),
            ("collection", "users"),
            ("subject", "alice"),
            ("since", "2031-05-01T00:00:00Z"),
            ("until", "2031-05-03T00:00:00Z"),
            ("after", "41"),
            ("limit", "1000"),
        ]))
        .unwrap();
        assert_eq!(
            query,
            AuditQuery {
                key_id: Some(id),
                actor: Some("sql:app".into()),
                action: Some(action),
                collection: Some("users".into()),
                subject: Some("alice".into()),
                since: Some(datetime!(2031-05-01 00:00 UTC)),
                until: Some(datetime!(2031-05-03 00:00 UTC)),
                after: Some(41),
                limit: 1000,
            }
        );
        assert_eq!(audit_query(Vec::new()).unwrap(), AuditQuery::default());
        assert_eq!(audit_query(params(&[("limit", "1")])).unwrap().limit, 1);
        for bad in ["0", "1001", "-1", "ten"] {
            assert_eq!(
                field_errors(audit_query(params(&[("limit", bad)]))),
                [FieldError::new("limit", "expected a number from 1 to 1000")],
                "{bad}"
            );
        }
        let action_error = "key.stolen".parse::<AuditAction>().unwrap_err().to_string();
        let actor_error = crate::audit::check_actor_filter("root").unwrap_err();
        let rfc3339 = "expected an RFC 3339 timestamp such as 2030-01-31T12:00:00Z";
        assert_eq!(
            field_errors(audit_query(params(&[
                ("key_id", "kw_live_pasted"),
                ("actor", "root"),
                ("action", "key.stolen"),
                ("since", "yesterday"),
                ("until", "tomorrow"),
                ("after", "-1"),
                ("kw_live_pasted", "1"),
                ("other", "2"),
            ]))),
            [
                FieldError::new("key_id", "expected a key id"),
                FieldError::new("actor", actor_error),
                FieldError::new("action", action_error),
                FieldError::new("since", rfc3339),
                FieldError::new("until", rfc3339),
                FieldError::new(
                    "after",
                    "expected an event number (the previous page's next_cursor)"
                ),
                FieldError::new("query", "unknown parameter"),
            ]
        );
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
