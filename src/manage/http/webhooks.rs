//! `/webhooks`: subscriptions to signed event deliveries (feature `webhooks`). `keys:admin`
//! only: a subscriber sees every key's events.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::{ApiError, FieldError};
use super::extract::{BodyFields, JsonBody};
use super::openapi::{
    BadRequest, Forbidden, NotFound, TooManyRequests, Unauthorized, Unavailable, ValidationFailed,
};
use crate::manage::policy::{Caller, CallerError};
use crate::manage::{KeyManager, NewWebhook};
use crate::store::WebhookPatch;
use crate::webhooks::{CreatedWebhook, WebhookView};

use super::extract::KeyId as WebhookId;

type Manager = State<Arc<KeyManager>>;

/// A new subscription.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateWebhookRequest)]
pub(super) struct CreateWebhookBody {
    /// Required. Where events are POSTed: an `https` URL (within the server's allowed
    /// webhook hosts).
    #[schema(required = true, nullable = false)]
    url: Option<String>,
    /// Required. An array of event types (`key.created`, `key.updated`, `key.revoked`,
    /// `key.disabled`, `key.enabled`, `key.rotated`, `key.deleted`, `key.revealed`,
    /// `secret.retired`, `webhook.created`, `webhook.updated`, `webhook.deleted`,
    /// `owner.updated`, `owner.deleted`, `key.expiring`), or `["*"]` for all.
    #[schema(required = true, nullable = false)]
    events: Option<Vec<String>>,
    /// Optional description.
    description: Option<String>,
}

impl BodyFields for CreateWebhookBody {
    const FIELDS: &'static [&'static str] = &["url", "events", "description"];
}

/// A change to a subscription; members left out stay.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PatchWebhookRequest)]
pub(super) struct PatchWebhookBody {
    /// A new URL.
    #[schema(nullable = false)]
    url: Option<String>,
    /// New event types.
    #[schema(nullable = false)]
    events: Option<Vec<String>>,
    /// A new description; `null` removes it.
    #[serde(default, deserialize_with = "crate::manage::policy::nullable")]
    #[schema(value_type = Option<String>)]
    description: Option<Option<String>>,
    /// `true` pauses deliveries; `false` resumes them (and retries at once).
    #[schema(nullable = false)]
    disabled: Option<bool>,
}

impl BodyFields for PatchWebhookBody {
    const FIELDS: &'static [&'static str] = &["url", "events", "description", "disabled"];
}

fn admin_only(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(CallerError::Forbidden(
            "webhooks need keys:admin: a subscriber receives every key's events".into(),
        )
        .into())
    }
}

#[utoipa::path(
    post,
    path = "/webhooks",
    tag = "webhooks",
    summary = "Subscribe a URL to signed event deliveries",
    description = "`keys:admin` only. The signing secret is in this response only.",
    request_body = CreateWebhookBody,
    responses(
        (status = 201, description = "The subscription and its signing secret, shown once",
            body = CreatedWebhook,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn create_webhook(
    State(manager): Manager,
    caller: Caller,
    JsonBody(body): JsonBody<CreateWebhookBody>,
) -> Result<Response, ApiError> {
    admin_only(&caller)?;
    // Checked here rather than by serde, so a missing member is named alone.
    let missing: Vec<FieldError> = [
        ("url", body.url.is_none()),
        ("events", body.events.is_none()),
    ]
    .into_iter()
    .filter(|(_, missing)| *missing)
    .map(|(field, _)| FieldError::new(field, "required"))
    .collect();
    let (Some(url), Some(events)) = (body.url, body.events) else {
        return Err(ApiError::validation(missing));
    };
    let created = caller
        .manager(&manager)
        .create_webhook(NewWebhook {
            url,
            events,
            description: body.description,
        })
        .await?;
    let mut response = (StatusCode::CREATED, Json(created)).into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/webhooks",
    tag = "webhooks",
    summary = "List subscriptions and their delivery state",
    responses(
        (status = 200, description = "Every subscription", body = Vec<WebhookView>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn list_webhooks(
    State(manager): Manager,
    caller: Caller,
) -> Result<Response, ApiError> {
    admin_only(&caller)?;
    Ok(Json(manager.list_webhooks().await?).into_response())
}

#[utoipa::path(
    get,
    path = "/webhooks/{id}",
    tag = "webhooks",
    summary = "Get a subscription",
    params(("id" = uuid::Uuid, Path, description = "The webhook id")),
    responses(
        (status = 200, description = "The subscription", body = WebhookView),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn get_webhook(
    State(manager): Manager,
    caller: Caller,
    WebhookId(id): WebhookId,
) -> Result<Response, ApiError> {
    admin_only(&caller)?;
    Ok(Json(manager.get_webhook(id).await?).into_response())
}

#[utoipa::path(
    patch,
    path = "/webhooks/{id}",
    tag = "webhooks",
    summary = "Change, pause or resume a subscription",
    params(("id" = uuid::Uuid, Path, description = "The webhook id")),
    request_body = PatchWebhookBody,
    responses(
        (status = 200, description = "The subscription", body = WebhookView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn update_webhook(
    State(manager): Manager,
    caller: Caller,
    WebhookId(id): WebhookId,
    JsonBody(body): JsonBody<PatchWebhookBody>,
) -> Result<Response, ApiError> {
    admin_only(&caller)?;
    let patch = WebhookPatch {
        url: body.url,
        events: body.events,
        description: body.description,
        disabled: body.disabled,
    };
    Ok(Json(caller.manager(&manager).update_webhook(id, patch).await?).into_response())
}

#[utoipa::path(
    delete,
    path = "/webhooks/{id}",
    tag = "webhooks",
    summary = "Delete a subscription",
    params(("id" = uuid::Uuid, Path, description = "The webhook id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = ValidationFailed),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn delete_webhook(
    State(manager): Manager,
    caller: Caller,
    WebhookId(id): WebhookId,
) -> Result<StatusCode, ApiError> {
    admin_only(&caller)?;
    caller.manager(&manager).delete_webhook(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A PATCH tells `description` left out (unchanged) from `null` (cleared) and a string
    /// (set).
    #[test]
    fn a_patch_tells_a_missing_description_from_a_null_one() {
        let description = |body: serde_json::Value| {
            serde_json::from_value::<PatchWebhookBody>(body)
                .unwrap()
                .description
        };
        assert_eq!(description(json!({})), None);
        assert_eq!(description(json!({"description": null})), Some(None));
        assert_eq!(
            description(json!({"description": "billing"})),
            Some(Some("billing".to_owned()))
        );
    }
}
