//! `/owners`: the policies all of an owner's keys share (a rate limit and/or credits). Set and
//! removed with `keys:admin`; an owner's own `keys:self` keys may read its policy.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::Query;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;

use super::error::ApiError;
use super::extract::{BodyFields, JsonBody};
use super::openapi::{
    BadRequest, Forbidden, NotFound, TooManyRequests, Unauthorized, Unavailable, ValidationFailed,
};
use crate::manage::policy::{parse_credits, parse_rate_limit, parse_refill, Caller, CallerError};
use crate::manage::KeyManager;
use crate::ratelimit::RateLimitPolicy;
use crate::store::{OwnerPolicy, OwnerPolicyUpdate, Refill};

type Manager = State<Arc<KeyManager>>;

/// What all of an owner's keys share.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(as = OwnerPolicy)]
pub(super) struct OwnerPolicyView {
    /// The collection of the owner's keys.
    collection: String,
    /// The owner: the keys' subject.
    subject: String,
    /// The rate limit all the owner's keys share, on top of each key's own; `null`: the
    /// collection's owner rate limit, if the server sets one.
    #[schema(value_type = Option<RateLimitPolicy>)]
    rate_limit: Option<String>,
    /// Credits left to all the owner's keys together (not counting what instances hold
    /// leased, which is spent or given back within the lease idle time); `null`: no shared
    /// credits.
    credits: Option<u64>,
    /// The shared credits' refill (the balance is set to its amount each period); `null`:
    /// none.
    #[schema(value_type = Option<Refill>)]
    refill: Option<String>,
    /// When the policy last changed.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    updated_at: OffsetDateTime,
}

impl From<&OwnerPolicy> for OwnerPolicyView {
    fn from(policy: &OwnerPolicy) -> Self {
        Self {
            collection: policy.collection.clone(),
            subject: policy.subject.clone(),
            rate_limit: policy.rate_limit.map(|r| r.to_string()),
            credits: policy.credits.map(|c| c.remaining),
            refill: policy.credits.and_then(|c| c.refill).map(|r| r.to_string()),
            updated_at: policy.updated_at,
        }
    }
}

/// A change to an owner's policy: members left out stay as they are, `null` removes. An owner
/// without a policy gets one. Unknown members are refused (422, field `body`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = OwnerPolicyRequest)]
pub(super) struct OwnerBody {
    /// A rate limit such as `600/min` or `600/min,burst=50`, shared by all the owner's keys;
    /// `null`: none of its own.
    #[serde(default, deserialize_with = "crate::manage::policy::nullable")]
    #[schema(value_type = Option<RateLimitPolicy>)]
    rate_limit: Option<Option<String>>,
    /// The shared credit balance (voids what instances hold leased, and restarts the refill
    /// schedule from now); `null`: no shared credits (drops the refill too).
    #[serde(default, deserialize_with = "crate::manage::policy::nullable")]
    #[schema(value_type = Option<u64>, minimum = 0, maximum = 9007199254740991_u64)]
    credits: Option<Option<Value>>,
    /// A refill such as `10000/month` (an owner without credits starts with its amount);
    /// `null`: no refill.
    #[serde(default, deserialize_with = "crate::manage::policy::nullable")]
    #[schema(value_type = Option<Refill>)]
    refill: Option<Option<String>>,
}

impl BodyFields for OwnerBody {
    const FIELDS: &'static [&'static str] = &["rate_limit", "credits", "refill"];
}

impl OwnerBody {
    fn into_update(self) -> Result<OwnerPolicyUpdate, ApiError> {
        let mut update = OwnerPolicyUpdate::default();
        match self.rate_limit {
            Some(Some(text)) => update = update.rate_limit(Some(parse_rate_limit(&text)?)),
            Some(None) => update = update.rate_limit(None),
            None => {}
        }
        match self.credits {
            Some(Some(credits)) => update = update.credits(Some(parse_credits(&credits)?)),
            Some(None) => update = update.credits(None),
            None => {}
        }
        match self.refill {
            Some(Some(text)) => update = update.refill(Some(parse_refill(&text)?)),
            Some(None) => update = update.refill(None),
            None => {}
        }
        Ok(update)
    }
}

/// The owner named by the path: a collection and a subject, each one percent-encoded UTF-8
/// segment (a `/` in a subject is sent as `%2F`).
fn owner_path(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, String), ApiError> {
    path.map(|Path(owner)| owner).map_err(|_| {
        ApiError::bad_request(
            "the path must be /owners/{collection}/{subject}: two segments of percent-encoded \
             UTF-8 (write a `/` in a subject as %2F)",
        )
    })
}

fn no_policy() -> ApiError {
    ApiError::problem(
        StatusCode::NOT_FOUND,
        "not_found",
        "No owner policy",
        "this owner has no policy",
    )
}

fn admin_only(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(CallerError::Forbidden(
            "owner policies are set by keys:admin: they limit every key of an owner".into(),
        )
        .into())
    }
}

#[utoipa::path(
    get,
    path = "/owners",
    tag = "owners",
    summary = "List owner policies",
    description = "`keys:admin` only. Ordered by collection and subject.",
    params(("collection" = Option<String>, Query, description = "Only this collection's owners")),
    responses(
        (status = 200, description = "The policies", body = Vec<OwnerPolicyView>),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn list_owners(
    State(manager): Manager,
    caller: Caller,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    admin_only(&caller)?;
    let Query(params) = query.map_err(|_| ApiError::bad_request("malformed query string"))?;
    let mut collection = None;
    for (name, value) in params {
        match name.as_str() {
            "collection" if collection.is_none() => collection = Some(value),
            "collection" => return Err(ApiError::invalid("collection", "given twice")),
            _ => {
                return Err(ApiError::invalid(
                    "query",
                    "unknown query parameter (expected collection)",
                ))
            }
        }
    }
    let policies = manager.owner_policies(collection.as_deref()).await?;
    let views: Vec<OwnerPolicyView> = policies.iter().map(OwnerPolicyView::from).collect();
    Ok(Json(views).into_response())
}

#[utoipa::path(
    get,
    path = "/owners/{collection}/{subject}",
    tag = "owners",
    summary = "Get an owner's policy",
    description = "`keys:admin`, or a `keys:self` key of that owner.",
    params(
        ("collection" = String, Path, description = "The collection"),
        ("subject" = String, Path, description = "The owner (percent-encoded)"),
    ),
    responses(
        (status = 200, description = "The policy", body = OwnerPolicyView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn get_owner(
    State(manager): Manager,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (collection, subject) = owner_path(path)?;
    if !caller.is_admin() && !caller.is_owner(&collection, &subject) {
        return Err(CallerError::Forbidden(
            "an owner's policy is shown to keys:admin and to the owner's own keys:self keys".into(),
        )
        .into());
    }
    match manager.owner_policy(&collection, &subject).await? {
        Some(policy) => Ok(Json(OwnerPolicyView::from(&policy)).into_response()),
        None => Err(no_policy()),
    }
}

#[utoipa::path(
    patch,
    path = "/owners/{collection}/{subject}",
    tag = "owners",
    summary = "Create or change an owner's policy",
    description = "`keys:admin` only. Members left out stay as they are; `null` removes. \
        Every instance re-reads the owner's keys, as after a key change.",
    params(
        ("collection" = String, Path, description = "The collection"),
        ("subject" = String, Path, description = "The owner (percent-encoded)"),
    ),
    request_body = OwnerBody,
    responses(
        (status = 200, description = "The policy as it is now", body = OwnerPolicyView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn set_owner(
    State(manager): Manager,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    JsonBody(body): JsonBody<OwnerBody>,
) -> Result<Response, ApiError> {
    admin_only(&caller)?;
    let (collection, subject) = owner_path(path)?;
    let update = body.into_update()?;
    let policy = caller
        .manager(&manager)
        .set_owner_policy(&collection, &subject, update)
        .await?;
    Ok(Json(OwnerPolicyView::from(&policy)).into_response())
}

#[utoipa::path(
    delete,
    path = "/owners/{collection}/{subject}",
    tag = "owners",
    summary = "Remove an owner's policy and its shared credits",
    description = "`keys:admin` only.",
    params(
        ("collection" = String, Path, description = "The collection"),
        ("subject" = String, Path, description = "The owner (percent-encoded)"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn delete_owner(
    State(manager): Manager,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    admin_only(&caller)?;
    let (collection, subject) = owner_path(path)?;
    match caller
        .manager(&manager)
        .delete_owner_policy(&collection, &subject)
        .await
    {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(error) if error.kind() == crate::manage::ManageErrorKind::NotFound => Err(no_policy()),
        Err(error) => Err(error.into()),
    }
}
