//! Rejections: the documented error codes, as HTTP problem+json or trailers-only gRPC responses.
//!
//! | code | HTTP | gRPC |
//! | --- | --- | --- |
//! | `missing_credentials` | 401 | 16 unauthenticated |
//! | `malformed_key` | 401 | 16 |
//! | `invalid_key` | 401 | 16 |
//! | `expired_key` | 401 | 16 |
//! | `revoked_key` | 401 | 16 |
//! | `ambiguous_credentials` | 400 | 3 invalid argument |
//! | `insufficient_scope` | 403 | 7 permission denied |
//! | `rate_limited` | 429 | 8 resource exhausted |
//! | `store_unavailable` | 503 | 14 unavailable |
//!
//! ```
//! use keywarden::{AuthRejection, RejectionKind};
//!
//! let rejection = AuthRejection::new(RejectionKind::ExpiredKey, "the key has expired");
//! let response = rejection.to_response::<String>(false);
//! assert_eq!(response.status(), 401);
//! assert_eq!(response.headers()["content-type"], "application/problem+json");
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::body::AuthBody;

/// The realm named in `WWW-Authenticate` challenges.
const REALM: &str = "api";

/// Why a request was rejected. The string codes are a stable contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionKind {
    /// No credential on a route that requires one.
    MissingCredentials,
    /// A credential that is not a well-formed key (wrong prefix, length, alphabet or checksum,
    /// a malformed `Authorization` value, an oversized or non-ASCII value).
    MalformedKey,
    /// A well-formed key that is unknown, or belongs to another collection.
    InvalidKey,
    /// A key past its expiry.
    ExpiredKey,
    /// A revoked or disabled key.
    RevokedKey,
    /// Several credentials that disagree, or a repeated credential header.
    AmbiguousCredentials,
    /// The key lacks a required scope, or is read-only and the method is not safe.
    InsufficientScope,
    /// The key may only be used from listed networks, and the request came from elsewhere
    /// (or from an address the layer could not determine).
    IpNotAllowed,
    /// A rate limit was exceeded.
    RateLimited,
    /// The key has no credits left (or fewer than the request costs).
    UsageExceeded,
    /// The key store could not be reached and the key is not cached.
    StoreUnavailable,
}

impl RejectionKind {
    /// Every kind, in table order.
    pub const ALL: [RejectionKind; 11] = [
        RejectionKind::MissingCredentials,
        RejectionKind::MalformedKey,
        RejectionKind::InvalidKey,
        RejectionKind::ExpiredKey,
        RejectionKind::RevokedKey,
        RejectionKind::AmbiguousCredentials,
        RejectionKind::InsufficientScope,
        RejectionKind::IpNotAllowed,
        RejectionKind::RateLimited,
        RejectionKind::UsageExceeded,
        RejectionKind::StoreUnavailable,
    ];

    /// The machine-readable code, e.g. `invalid_key`.
    pub fn code(self) -> &'static str {
        match self {
            RejectionKind::MissingCredentials => "missing_credentials",
            RejectionKind::MalformedKey => "malformed_key",
            RejectionKind::InvalidKey => "invalid_key",
            RejectionKind::ExpiredKey => "expired_key",
            RejectionKind::RevokedKey => "revoked_key",
            RejectionKind::AmbiguousCredentials => "ambiguous_credentials",
            RejectionKind::InsufficientScope => "insufficient_scope",
            RejectionKind::IpNotAllowed => "ip_not_allowed",
            RejectionKind::RateLimited => "rate_limited",
            RejectionKind::UsageExceeded => "usage_exceeded",
            RejectionKind::StoreUnavailable => "store_unavailable",
        }
    }

    /// A short human-readable title.
    pub fn title(self) -> &'static str {
        match self {
            RejectionKind::MissingCredentials => "API key required",
            RejectionKind::MalformedKey => "Malformed API key",
            RejectionKind::InvalidKey => "Invalid API key",
            RejectionKind::ExpiredKey => "Expired API key",
            RejectionKind::RevokedKey => "Revoked API key",
            RejectionKind::AmbiguousCredentials => "Ambiguous credentials",
            RejectionKind::InsufficientScope => "Insufficient scope",
            RejectionKind::IpNotAllowed => "Address not allowed",
            RejectionKind::RateLimited => "Rate limit exceeded",
            RejectionKind::UsageExceeded => "Usage limit exceeded",
            RejectionKind::StoreUnavailable => "Key store unavailable",
        }
    }

    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            RejectionKind::MissingCredentials
            | RejectionKind::MalformedKey
            | RejectionKind::InvalidKey
            | RejectionKind::ExpiredKey
            | RejectionKind::RevokedKey => StatusCode::UNAUTHORIZED,
            RejectionKind::AmbiguousCredentials => StatusCode::BAD_REQUEST,
            RejectionKind::InsufficientScope | RejectionKind::IpNotAllowed => StatusCode::FORBIDDEN,
            RejectionKind::RateLimited | RejectionKind::UsageExceeded => {
                StatusCode::TOO_MANY_REQUESTS
            }
            RejectionKind::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The gRPC status code.
    pub fn grpc_code(self) -> u8 {
        match self {
            RejectionKind::MissingCredentials
            | RejectionKind::MalformedKey
            | RejectionKind::InvalidKey
            | RejectionKind::ExpiredKey
            | RejectionKind::RevokedKey => 16,
            RejectionKind::AmbiguousCredentials => 3,
            RejectionKind::InsufficientScope | RejectionKind::IpNotAllowed => 7,
            RejectionKind::RateLimited | RejectionKind::UsageExceeded => 8,
            RejectionKind::StoreUnavailable => 14,
        }
    }
}

impl fmt::Display for RejectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The response header that reports a key's credits left after an accepted request.
pub const CREDITS_REMAINING: &str = "credits-remaining";

/// What an accepted request's response reports about its key's budgets: the rate limit and
/// the credits left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Quota {
    pub(crate) rate: Option<RateLimitStatus>,
    /// Credits left, for a key with credits.
    pub(crate) credits: Option<u64>,
    /// Credits the request was charged.
    pub(crate) charged: u64,
}

impl Quota {
    /// Writes the `RateLimit-*` headers and `Credits-Remaining`. A `Credits-Remaining` already
    /// present is kept: an inner [`Cost`](crate::Cost) layer that charged more wrote a newer
    /// count.
    #[inline]
    pub(crate) fn write_headers(&self, headers: &mut HeaderMap) {
        // Most keys have neither: no call then.
        if self.rate.is_some() || self.credits.is_some() {
            self.write_present(headers);
        }
    }

    fn write_present(&self, headers: &mut HeaderMap) {
        if let Some(rate) = &self.rate {
            rate.write_headers(headers);
        }
        if let Some(credits) = self.credits {
            const NAME: HeaderName = HeaderName::from_static(CREDITS_REMAINING);
            headers
                .entry(NAME)
                .or_insert_with(|| HeaderValue::from(credits));
        }
    }
}

/// Rate-limit state reported in `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitStatus {
    /// Requests allowed per period.
    pub limit: u32,
    /// Requests left now.
    pub remaining: u32,
    /// Time until the budget is full again.
    pub reset: Duration,
}

/// A rejected request. Rendered as a response, never returned as a service error.
/// Its detail is written by keywarden and never contains the key.
#[derive(Debug, Clone)]
pub struct AuthRejection {
    kind: RejectionKind,
    detail: Cow<'static, str>,
    /// What only some rejections carry, boxed: every request's decision carries room for a
    /// rejection, and this keeps that room at 40 bytes instead of 96 (the hit path moves
    /// its decision between functions; BENCHMARKS.md, section 22).
    extra: Option<Box<Extra>>,
}

/// The parts of an [`AuthRejection`] only some kinds have.
#[derive(Debug, Clone, Default)]
struct Extra {
    retry_after: Option<Duration>,
    rate_limit: Option<RateLimitStatus>,
    scope: Option<Cow<'static, str>>,
}

impl AuthRejection {
    /// A rejection of `kind` with a human-readable detail.
    pub fn new(kind: RejectionKind, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            extra: None,
        }
    }

    /// The extra parts, made on first use.
    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// A `usage_exceeded` rejection: the key's credits are spent; `retry_after` when a
    /// refill is scheduled.
    pub fn usage_exceeded(retry_after: Option<Duration>) -> Self {
        let rejection = Self::new(
            RejectionKind::UsageExceeded,
            "the key has fewer credits left than this request costs",
        );
        match retry_after {
            Some(after) => rejection.with_retry_after(after),
            None => rejection,
        }
    }

    /// A `rate_limited` rejection.
    pub fn rate_limited(status: RateLimitStatus, retry_after: Duration) -> Self {
        Self {
            extra: Some(Box::new(Extra {
                retry_after: Some(retry_after),
                rate_limit: Some(status),
                ..Extra::default()
            })),
            ..Self::new(RejectionKind::RateLimited, "too many requests for this key")
        }
    }

    /// An `insufficient_scope` rejection naming the scope that was required.
    pub fn insufficient_scope(scope: impl Into<Cow<'static, str>>) -> Self {
        let scope = scope.into();
        Self {
            detail: format!("this route requires the scope `{scope}`").into(),
            extra: Some(Box::new(Extra {
                scope: Some(scope),
                ..Extra::default()
            })),
            ..Self::new(RejectionKind::InsufficientScope, "")
        }
    }

    /// Replaces the detail.
    #[must_use]
    pub(crate) fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = detail.into();
        self
    }

    /// Sets `Retry-After`.
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.extra_mut().retry_after = Some(after);
        self
    }

    /// The kind.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// The detail.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// How long the client should wait before retrying (`Retry-After`), if said.
    pub fn retry_after(&self) -> Option<Duration> {
        self.extra.as_ref().and_then(|extra| extra.retry_after)
    }

    /// The rate-limit state of a `rate_limited` rejection (`RateLimit-*` headers).
    pub fn rate_limit(&self) -> Option<RateLimitStatus> {
        self.extra.as_ref().and_then(|extra| extra.rate_limit)
    }

    /// The scope an `insufficient_scope` rejection names.
    fn scope(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|extra| extra.scope.as_deref())
    }

    /// The problem+json body.
    pub fn body(&self) -> Bytes {
        match self.detail {
            // Nearly every rejection has a literal detail: render it once, then share it.
            Cow::Borrowed(detail) => match static_body(self.kind, detail) {
                Some(body) => body,
                None => self.render_body(),
            },
            Cow::Owned(_) => self.render_body(),
        }
    }

    fn render_body(&self) -> Bytes {
        // The constant part of each kind's body is rendered at compile time; only the detail is
        // copied in, escaped by serde_json when (rarely) it needs escaping. Byte-for-byte what
        // serde_json renders for the whole `Problem` (tested).
        let prefix = problem_prefix(self.kind).as_bytes();
        let detail = self.detail.as_bytes();
        let mut body = Vec::with_capacity(prefix.len() + detail.len() + 2);
        body.extend_from_slice(prefix);
        if detail.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
            serde_json::to_writer(&mut body, &*self.detail)
                .expect("serializing a plain string cannot fail");
            // `to_writer` wrote the quotes; the prefix already has the opening one.
            body.remove(prefix.len());
            body.pop();
        } else {
            body.extend_from_slice(detail);
        }
        body.extend_from_slice(b"\"}");
        body.into()
    }

    /// The response: problem+json over HTTP, or a trailers-only gRPC response. Its
    /// extensions hold the [`RejectionKind`], so an outer middleware (an access log, metrics)
    /// can tell keywarden's rejections and their codes from the application's responses.
    pub fn to_response<B>(&self, grpc: bool) -> Response<AuthBody<B>> {
        let mut headers = HeaderMap::new();
        let (status, body) = if grpc {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert(
                HeaderName::from_static("grpc-status"),
                HeaderValue::from(u16::from(self.kind.grpc_code())),
            );
            headers.insert(
                HeaderName::from_static("grpc-message"),
                HeaderValue::from_static(self.kind.code()),
            );
            (StatusCode::OK, Bytes::new())
        } else {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
            (self.kind.status(), self.body())
        };
        self.challenge_headers(&mut headers);
        let mut response = Response::new(AuthBody::rejection(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response.extensions_mut().insert(self.kind);
        response
    }

    fn challenge_headers(&self, headers: &mut HeaderMap) {
        let challenge = match self.kind {
            RejectionKind::InsufficientScope => {
                let mut value = format!("Bearer realm=\"{REALM}\", error=\"insufficient_scope\"");
                if let Some(scope) = self.scope() {
                    let safe: String = scope
                        .chars()
                        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
                        .collect();
                    value.push_str(&format!(", scope=\"{safe}\""));
                }
                HeaderValue::from_str(&value).ok()
            }
            kind => static_challenge(kind),
        };
        if let Some(value) = challenge {
            headers.insert(WWW_AUTHENTICATE, value);
        }
        let retry_after = match (self.kind, self.retry_after()) {
            (_, Some(after)) => Some(after),
            (RejectionKind::StoreUnavailable, None) => Some(Duration::from_secs(1)),
            _ => None,
        };
        if let Some(after) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(after)));
        }
        if let Some(rl) = self.rate_limit() {
            rl.write_headers(headers);
        }
    }
}

/// A rendered body for a static detail, shared by every rejection of that kind and detail.
struct StaticBody {
    kind: RejectionKind,
    detail: &'static str,
    body: Bytes,
}

/// A memo of rendered bodies for static details: a pure function's results, shared by every
/// layer and by `RequireScopeLayer` (which has no layer state). Details are literals, a few dozen
/// in all, so this fills once and is then only read (one atomic load per slot probed); each
/// body is one reference-counted buffer, cloned (not copied) into responses.
static STATIC_BODIES: [OnceLock<StaticBody>; 256] = [const { OnceLock::new() }; 256];

/// How many slots one detail may probe before it is rendered per call instead: bounds the
/// table if an application passes ever new `&'static` details.
const STATIC_BODY_PROBES: usize = 16;

fn static_body(kind: RejectionKind, detail: &'static str) -> Option<Bytes> {
    let start = (detail.as_ptr() as usize >> 3) ^ (detail.len() << 2) ^ kind as usize;
    for probe in 0..STATIC_BODY_PROBES {
        let slot = &STATIC_BODIES[(start + probe) % STATIC_BODIES.len()];
        let held = slot.get_or_init(|| StaticBody {
            kind,
            detail,
            body: AuthRejection::new(kind, detail).render_body(),
        });
        if held.kind == kind && std::ptr::eq(held.detail, detail) {
            return Some(held.body.clone());
        }
    }
    None
}

/// The problem+json body of `kind` up to and including the opening quote of the detail.
/// Field order and spelling are what serde_json renders for the `Problem` struct.
fn problem_prefix(kind: RejectionKind) -> &'static str {
    macro_rules! prefix {
        ($status:literal, $code:literal, $title:literal) => {
            concat!(
                "{\"status\":",
                $status,
                ",\"code\":\"",
                $code,
                "\",\"title\":\"",
                $title,
                "\",\"detail\":\""
            )
        };
    }
    match kind {
        RejectionKind::MissingCredentials => {
            prefix!("401", "missing_credentials", "API key required")
        }
        RejectionKind::MalformedKey => prefix!("401", "malformed_key", "Malformed API key"),
        RejectionKind::InvalidKey => prefix!("401", "invalid_key", "Invalid API key"),
        RejectionKind::ExpiredKey => prefix!("401", "expired_key", "Expired API key"),
        RejectionKind::RevokedKey => prefix!("401", "revoked_key", "Revoked API key"),
        RejectionKind::AmbiguousCredentials => {
            prefix!("400", "ambiguous_credentials", "Ambiguous credentials")
        }
        RejectionKind::InsufficientScope => {
            prefix!("403", "insufficient_scope", "Insufficient scope")
        }
        RejectionKind::IpNotAllowed => prefix!("403", "ip_not_allowed", "Address not allowed"),
        RejectionKind::RateLimited => prefix!("429", "rate_limited", "Rate limit exceeded"),
        RejectionKind::UsageExceeded => prefix!("429", "usage_exceeded", "Usage limit exceeded"),
        RejectionKind::StoreUnavailable => {
            prefix!("503", "store_unavailable", "Key store unavailable")
        }
    }
}

/// The `WWW-Authenticate` challenge of every kind but `insufficient_scope` (whose challenge
/// names the scope), built at compile time.
fn static_challenge(kind: RejectionKind) -> Option<HeaderValue> {
    macro_rules! invalid_token {
        ($title:literal) => {
            const {
                HeaderValue::from_static(concat!(
                    "Bearer realm=\"api\", error=\"invalid_token\", error_description=\"",
                    $title,
                    "\""
                ))
            }
        };
    }
    Some(match kind {
        RejectionKind::MissingCredentials => {
            const { HeaderValue::from_static("Bearer realm=\"api\"") }
        }
        RejectionKind::MalformedKey => invalid_token!("Malformed API key"),
        RejectionKind::InvalidKey => invalid_token!("Invalid API key"),
        RejectionKind::ExpiredKey => invalid_token!("Expired API key"),
        RejectionKind::RevokedKey => invalid_token!("Revoked API key"),
        _ => return None,
    })
}

impl RateLimitStatus {
    /// Writes `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert(
            HeaderName::from_static("ratelimit-limit"),
            HeaderValue::from(self.limit),
        );
        headers.insert(
            HeaderName::from_static("ratelimit-remaining"),
            HeaderValue::from(self.remaining),
        );
        headers.insert(
            HeaderName::from_static("ratelimit-reset"),
            HeaderValue::from(ceil_secs(self.reset)),
        );
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl fmt::Display for AuthRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.detail)
    }
}

impl std::error::Error for AuthRejection {}

impl axum_core::response::IntoResponse for AuthRejection {
    fn into_response(self) -> axum_core::response::Response {
        self.to_response::<axum_core::body::Body>(false)
            .map(axum_core::body::Body::new)
    }
}

/// Whether a request is gRPC (`content-type: application/grpc*`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    fn body_json(response: &Response<AuthBody<String>>) -> serde_json::Value {
        serde_json::from_slice(response.body().rejection_bytes().expect("a rejection")).unwrap()
    }

    /// The body as it was rendered before the pre-rendered prefixes: serde_json of the whole
    /// problem. The fast path must match it byte for byte.
    fn reference_body(kind: RejectionKind, detail: &str) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Problem<'a> {
            status: u16,
            code: &'a str,
            title: &'a str,
            detail: &'a str,
        }
        serde_json::to_vec(&Problem {
            status: kind.status().as_u16(),
            code: kind.code(),
            title: kind.title(),
            detail,
        })
        .unwrap()
    }

    /// The challenge as it was formatted before it was built at compile time.
    fn reference_challenge(kind: RejectionKind) -> Option<String> {
        match kind {
            RejectionKind::MissingCredentials => Some(format!("Bearer realm=\"{REALM}\"")),
            RejectionKind::MalformedKey
            | RejectionKind::InvalidKey
            | RejectionKind::ExpiredKey
            | RejectionKind::RevokedKey => Some(format!(
                "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
                kind.title()
            )),
            RejectionKind::InsufficientScope => Some(format!(
                "Bearer realm=\"{REALM}\", error=\"insufficient_scope\""
            )),
            _ => None,
        }
    }

    #[test]
    fn the_parts_only_some_rejections_have_are_kept_and_rendered() {
        // Every request's decision carries room for a rejection: it stays small.
        assert!(std::mem::size_of::<AuthRejection>() <= 40);
        let plain = AuthRejection::new(RejectionKind::InvalidKey, "no such key");
        assert!(plain.extra.is_none());
        assert_eq!((plain.retry_after(), plain.rate_limit()), (None, None));
        let response = plain.to_response::<String>(false);
        assert!(response.headers().get(RETRY_AFTER).is_none());

        let status = RateLimitStatus {
            limit: 10,
            remaining: 0,
            reset: Duration::from_secs(7),
        };
        let limited = AuthRejection::rate_limited(status, Duration::from_millis(6_500));
        assert_eq!(limited.rate_limit(), Some(status));
        assert_eq!(limited.retry_after(), Some(Duration::from_millis(6_500)));
        let response = limited.clone().to_response::<String>(false);
        assert_eq!(response.headers()[RETRY_AFTER], "7");
        assert!(response.headers().contains_key("ratelimit-limit"));
        // A new detail keeps them.
        let detailed = limited.with_detail("too many rejected keys");
        assert_eq!(detailed.rate_limit(), Some(status));
        assert_eq!(detailed.retry_after(), Some(Duration::from_millis(6_500)));

        let spent = AuthRejection::usage_exceeded(None);
        assert_eq!((spent.retry_after(), spent.rate_limit()), (None, None));
        let refill = AuthRejection::usage_exceeded(Some(Duration::from_secs(60)));
        assert_eq!(refill.retry_after(), Some(Duration::from_secs(60)));
        assert_eq!(
            refill.to_response::<String>(false).headers()[RETRY_AFTER],
            "60"
        );

        let retry = AuthRejection::new(RejectionKind::StoreUnavailable, "down")
            .with_retry_after(Duration::from_secs(3));
        assert_eq!(
            retry.to_response::<String>(false).headers()[RETRY_AFTER],
            "3"
        );

        let scope = AuthRejection::insufficient_scope("billing:write");
        assert_eq!(scope.rate_limit(), None);
        let challenge = scope.to_response::<String>(false).headers()[WWW_AUTHENTICATE].clone();
        assert!(
            challenge
                .to_str()
                .unwrap()
                .ends_with(", scope=\"billing:write\""),
            "{challenge:?}"
        );
    }

    #[test]
    fn pre_rendered_bodies_and_challenges_are_byte_identical() {
        let details = [
            "",
            "why",
            "the key's checksum does not match (typo or truncated key?)",
            "send an API key in the Authorization or X-Api-Key header",
            "a \"quoted\" back\\slash",
            "tab\tnewline\ncr\r nul\u{0} unit\u{1f} del\u{7f}",
            "unicode é ✓ 🔑 \u{2028}",
        ];
        for kind in RejectionKind::ALL {
            for detail in details {
                let rejection = AuthRejection::new(kind, detail);
                assert_eq!(
                    rejection.body().as_ref(),
                    reference_body(kind, detail).as_slice(),
                    "{kind} {detail:?}"
                );
                let response = rejection.to_response::<String>(false);
                assert_eq!(
                    response.body().rejection_bytes().unwrap(),
                    reference_body(kind, detail).as_slice()
                );
                assert_eq!(
                    response
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .map(|v| v.to_str().unwrap().to_owned()),
                    reference_challenge(kind),
                    "{kind}"
                );
            }
        }
    }

    #[test]
    fn static_details_render_once_and_owned_ones_every_time() {
        const DETAIL: &str = "the key has the wrong length";
        let first = AuthRejection::new(RejectionKind::MalformedKey, DETAIL);
        let again = AuthRejection::new(RejectionKind::MalformedKey, DETAIL);
        assert_eq!(
            first.body().as_ptr(),
            again.body().as_ptr(),
            "one shared rendering"
        );
        // Same text, another kind: its own body.
        let other = AuthRejection::new(RejectionKind::InvalidKey, "the key has the wrong length");
        assert_eq!(
            other.body().as_ref(),
            reference_body(RejectionKind::InvalidKey, "the key has the wrong length").as_slice()
        );
        let owned = AuthRejection::new(RejectionKind::MalformedKey, String::from("owned"));
        assert_ne!(
            owned.body().as_ptr(),
            owned.body().as_ptr(),
            "rendered per call"
        );
        // More static details than the table holds still render correctly.
        for n in 0..200 {
            let detail: &'static str = Box::leak(format!("detail {n}").into_boxed_str());
            let body = AuthRejection::new(RejectionKind::ExpiredKey, detail).body();
            assert_eq!(
                body.as_ref(),
                reference_body(RejectionKind::ExpiredKey, detail).as_slice()
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_detail_renders_as_serde_json_does(detail in ".*", index in 0usize..9) {
            let kind = RejectionKind::ALL[index];
            let body = AuthRejection::new(kind, detail.clone()).body();
            let expected = reference_body(kind, &detail);
            proptest::prop_assert_eq!(body.as_ref(), expected.as_slice());
        }
    }

    #[test]
    fn every_kind_renders_the_contract() {
        for kind in RejectionKind::ALL {
            let response = AuthRejection::new(kind, "why").to_response::<String>(false);
            assert_eq!(response.status(), kind.status(), "{kind}");
            let json = body_json(&response);
            assert_eq!(json["code"], kind.code());
            assert_eq!(json["status"], kind.status().as_u16());
            assert_eq!(json["detail"], "why");
            assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
            let challenge = response.headers().get(WWW_AUTHENTICATE);
            match kind.status().as_u16() {
                401 => assert!(challenge.is_some(), "{kind}"),
                _ if kind == RejectionKind::InsufficientScope => {
                    assert!(challenge
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .contains("insufficient_scope"))
                }
                _ => assert!(challenge.is_none(), "{kind}"),
            }
        }
    }

    #[test]
    fn invalid_token_challenge_only_for_bad_keys() {
        let missing =
            AuthRejection::new(RejectionKind::MissingCredentials, "").to_response::<String>(false);
        assert!(!missing.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("error="));
        let bad = AuthRejection::new(RejectionKind::RevokedKey, "").to_response::<String>(false);
        assert!(bad.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\""));
    }

    #[test]
    fn rate_limited_and_unavailable_headers() {
        let status = RateLimitStatus {
            limit: 100,
            remaining: 0,
            reset: Duration::from_millis(1500),
        };
        let r = AuthRejection::rate_limited(status, Duration::from_millis(200))
            .to_response::<String>(false);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        assert_eq!(r.headers()["ratelimit-limit"], "100");
        assert_eq!(r.headers()["ratelimit-remaining"], "0");
        assert_eq!(r.headers()["ratelimit-reset"], "2");
        let r = AuthRejection::new(RejectionKind::StoreUnavailable, "down")
            .to_response::<String>(false);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn grpc_rejections_are_trailers_only() {
        for kind in RejectionKind::ALL {
            let r = AuthRejection::new(kind, "d").to_response::<String>(true);
            assert_eq!(r.status(), 200);
            assert_eq!(
                r.headers()["grpc-status"],
                kind.grpc_code().to_string().as_str()
            );
            assert_eq!(r.headers()["grpc-message"], kind.code());
            assert_eq!(r.headers()[CONTENT_TYPE], "application/grpc");
            assert!(r.body().is_end_stream());
        }
    }

    #[test]
    fn scope_names_are_sanitized_in_the_challenge() {
        let r = AuthRejection::insufficient_scope("a\"b\\c d").to_response::<String>(false);
        let value = r.headers()[WWW_AUTHENTICATE].to_str().unwrap().to_owned();
        assert!(value.ends_with("scope=\"abcd\""), "{value}");
    }

    #[test]
    fn grpc_detection() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_grpc(&h));
    }
}
