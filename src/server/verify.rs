//! `POST /v1/keys/verify`: another service asks whether a key is valid.

use std::time::Duration;

use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::Method;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{AuthServer, VERIFY_SCOPE};
use crate::manage::http::error::ApiError;
use crate::manage::http::extract::{BodyFields, JsonBody};
use crate::principal::Principal;
use crate::ratelimit::{ClientAddressSource, ClientAddresses};
use crate::rejection::{AuthRejection, RateLimitStatus};

/// The request body. Every member is optional to serde, so each bad one can be named; `key`
/// is then required by hand. No `Debug`, and this copy of the key is wiped on drop (best
/// effort: the raw body and the parsed JSON it came from are freed without wiping).
#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
pub(super) struct VerifyRequest {
    key: Option<String>,
    scopes: Option<Vec<String>>,
    /// Any JSON value, judged by hand so a bad one gets the rule, not serde's wording.
    #[zeroize(skip)]
    cost: Option<serde_json::Value>,
}

/// The most credits one verification may cost.
const MAX_COST: u64 = u32::MAX as u64;

impl BodyFields for VerifyRequest {
    const FIELDS: &'static [&'static str] = &["key", "scopes", "cost"];
}

#[derive(Serialize)]
struct RateLimitView {
    limit: u32,
    remaining: u32,
    /// Seconds until the budget is full again, rounded up.
    reset: u64,
}

impl From<RateLimitStatus> for RateLimitView {
    fn from(status: RateLimitStatus) -> Self {
        Self {
            limit: status.limit,
            remaining: status.remaining,
            reset: ceil_secs(status.reset),
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[derive(Serialize)]
#[serde(untagged)]
enum Verdict {
    Valid {
        valid: bool,
        principal: Principal,
        ratelimit: Option<RateLimitView>,
        /// Credits left after this verification, for a key with credits.
        #[serde(skip_serializing_if = "Option::is_none")]
        credits_remaining: Option<u64>,
    },
    Invalid {
        valid: bool,
        code: &'static str,
        detail: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        ratelimit: Option<RateLimitView>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
    },
}

impl From<AuthRejection> for Verdict {
    fn from(rejection: AuthRejection) -> Self {
        Self::Invalid {
            valid: false,
            code: rejection.kind().code(),
            detail: rejection.detail().to_owned(),
            ratelimit: rejection.rate_limit().map(Into::into),
            retry_after: rejection.retry_after().map(ceil_secs),
        }
    }
}

pub(super) async fn verify(State(server): State<AuthServer>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let client = server.addresses(&parts.headers, &parts.extensions);
    if let Err(refused) = authorize_caller(&server, &parts).await {
        return refused;
    }
    let req = Request::from_parts(parts, body);
    let JsonBody(body) = match JsonBody::<VerifyRequest>::from_request(req, &()).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    match check(&server, body, client).await {
        Ok(verdict) => Json(verdict).into_response(),
        Err(error) => error.into_response(),
    }
}

/// The caller's own key, with `keys:verify`; or, when allowed, a loopback connection.
async fn authorize_caller(
    server: &AuthServer,
    parts: &http::request::Parts,
) -> Result<(), Response> {
    // The caller's own address is its connection's, for everything (failed-attempt limiting,
    // the loopback option, its key's IP allowlist): a forwarded header names the client of the
    // key being verified, never the caller.
    let peer = ClientAddressSource::Connection.address(&parts.headers, &parts.extensions);
    if server.loopback_without_key && peer.is_some_and(|ip| ip.is_loopback()) {
        return Ok(());
    }
    let (caller, _) = server
        .layer
        .check_headers_from(
            &parts.headers,
            &Method::POST,
            ClientAddresses::same(peer),
            // Verifying spends the verified key's credits, not the caller's.
            0,
        )
        .await
        .map_err(IntoResponse::into_response)?;
    if !caller.has_scope(VERIFY_SCOPE) {
        return Err(AuthRejection::insufficient_scope(VERIFY_SCOPE).into_response());
    }
    Ok(())
}

async fn check(
    server: &AuthServer,
    body: VerifyRequest,
    client: ClientAddresses,
) -> Result<Verdict, ApiError> {
    let cost = match body.cost.as_ref().map(serde_json::Value::as_u64) {
        None => 1,
        Some(Some(cost)) if cost <= MAX_COST => cost,
        Some(_) => {
            return Err(ApiError::invalid(
                "cost",
                format!("cost must be a whole number from 0 to {MAX_COST}"),
            ))
        }
    };
    let key = match body.key.as_deref() {
        Some(key) if !key.is_empty() => key,
        _ => return Err(ApiError::invalid("key", "the key is required")),
    };
    // The verification stands for a request of the caller's client: the method decides only
    // the read-only check, and a verified key may be read-only.
    let scopes = body.scopes.as_deref().unwrap_or_default();
    let checked = server
        .layer
        .check_from(key, &Method::GET, client, cost, scopes)
        .await;
    let (principal, quota) = match checked {
        Ok(accepted) => accepted,
        Err(rejection) => return Ok(rejection.into()),
    };
    Ok(Verdict::Valid {
        valid: true,
        principal,
        ratelimit: quota.rate.map(Into::into),
        credits_remaining: quota.credits,
    })
}
