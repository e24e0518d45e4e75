//! Every error of the management API, rendered as `application/problem+json`.

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::manage::policy::{CallerError, ADMIN_SCOPE};
use crate::manage::{ManageError, ManageErrorKind};
use crate::rejection::{AuthRejection, RejectionKind};

/// One invalid field. The name is always one of ours, never one the client sent.
#[derive(Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub(crate) struct FieldError {
    /// The member or query parameter: one of the API's own names, `body` for an unknown
    /// member, `query` for an unknown parameter.
    #[schema(value_type = String, examples("expires_at"))]
    field: &'static str,
    /// What is wrong, never repeating the submitted value.
    message: String,
}

/// An error as `application/problem+json` (RFC 9457): every error of the API and of the
/// key layer in front of it has this shape.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Problem<'a> {
    /// The HTTP status code.
    #[schema(examples(422))]
    status: u16,
    /// A stable machine-readable code: `invalid_request`, `validation_failed`,
    /// `not_found`, `conflict`, `read_only`, `inactive_key`, or one of the key layer's
    /// (`missing_credentials`, `invalid_key`, `insufficient_scope`, `rate_limited`,
    /// `store_unavailable`, ...).
    #[schema(examples("validation_failed"))]
    code: &'a str,
    /// A short summary of the code.
    #[schema(examples("Validation failed"))]
    title: &'a str,
    /// What happened, never repeating submitted text.
    #[schema(examples("expires_at: expires_at must be in the future"))]
    detail: &'a str,
    /// The invalid fields (422 `validation_failed` only).
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    #[schema(value_type = Vec<FieldError>)]
    errors: &'a [FieldError],
}

impl FieldError {
    pub(super) fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Every error of the API; rendered as problem+json.
#[derive(Debug)]
pub(crate) enum ApiError {
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
    pub(crate) fn problem(
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

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::problem(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Invalid request",
            detail,
        )
    }

    pub(super) fn validation(errors: Vec<FieldError>) -> Self {
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

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
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
            // A collection no layer serves is a field the client must change, like any
            // invalid one.
            ManageErrorKind::Invalid | ManageErrorKind::UnknownCollection => {
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

/// The one place a [`CallerError`] becomes a response: a caller without a management scope
/// gets the layer's own `insufficient_scope` naming `keys:admin`.
impl From<CallerError> for ApiError {
    fn from(err: CallerError) -> Self {
        match err {
            CallerError::NotManager => Self::Auth(AuthRejection::insufficient_scope(ADMIN_SCOPE)),
            CallerError::Forbidden(detail) => {
                Self::Auth(AuthRejection::new(RejectionKind::InsufficientScope, detail))
            }
            CallerError::Manage(err) => err.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
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
impl ApiError {
    /// The status and code this error answers with.
    pub(super) fn status_and_code(&self) -> (u16, String) {
        match self {
            Self::Auth(rejection) => (
                rejection.kind().status().as_u16(),
                rejection.kind().code().to_owned(),
            ),
            Self::Problem { status, code, .. } => (status.as_u16(), (*code).to_owned()),
        }
    }
}
