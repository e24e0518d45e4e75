//! keywarden as a service for other stacks: a verification API (`POST /v1/keys/verify`) and
//! forward auth for gateways (`/v1/auth`: nginx `auth_request`, Traefik `ForwardAuth`, Caddy
//! `forward_auth`, Envoy `ext_authz`), both answering through an [`ApiKeyLayer`]'s own request
//! path (cache, negative cache, coalesced misses, rate limits, failed-attempt limiting), with
//! its error codes (feature `manage-api`).
//!
//! ```
//! use std::sync::Arc;
//! use axum::Router;
//! use keywarden::{server::AuthServer, ApiKeyLayer, Collection, MemoryStore, SecretRing};
//! use keywarden::ratelimit::ClientAddressSource;
//!
//! let secrets = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
//! let layer = ApiKeyLayer::builder()
//!     .store(Arc::new(MemoryStore::new()))
//!     .secrets(secrets)
//!     .collection(Collection::new("users"))
//!     .build()
//!     .unwrap();
//! // Not behind the layer: each route checks its own credentials through it.
//! let app: Router = AuthServer::new(layer)
//!     // The gateway in front sets `X-Real-IP` to the client's address.
//!     .client_address(ClientAddressSource::TrustedHeader("x-real-ip".parse().unwrap()))
//!     .router();
//! # let _ = app;
//! ```
//!
//! Serve the router with `into_make_service_with_connect_info::<SocketAddr>()` so the
//! connection's address is known (failed-attempt limiting, the loopback option).
//!
//! # `POST /v1/keys/verify`
//!
//! The body is a JSON object `{"key": "...", "scopes": ["..."], "cost": 1}`; `scopes` and
//! `cost` are optional. `cost` accepts only `1` for now (credits do not exist yet): any other
//! value is a 422. A body that is not a JSON object under a JSON content type is a 400, a
//! missing or mistyped member a 422, both `application/problem+json` like the management API
//! (never repeating the submitted text).
//!
//! The answer is `200` either way:
//! - `{"valid": true, "principal": {...}, "ratelimit": {"limit", "remaining", "reset"}}`
//!   (`ratelimit` is `null` for a key without a rate limit; `reset` in seconds);
//! - `{"valid": false, "code": "revoked_key", "detail": "..."}` with the layer's code
//!   (`missing_credentials` never: an empty key is a 422). A `rate_limited` answer adds
//!   `ratelimit` and `retry_after` (seconds). A key that lacks one of `scopes` is
//!   `insufficient_scope` (scopes are judged by [`Principal::has_scope`](crate::Principal::has_scope)). `store_unavailable`
//!   is also an answer, not an error status: retry later.
//!
//! The method of the request the key came with is not known here, so a read-only key is valid
//! (forward auth knows the method, and refuses it on unsafe ones).
//!
//! A verification counts as one use of the key and one request against its rate limit; a
//! rejected key counts against the client address of the verify request (see
//! [`AuthServer::client_address`]: the calling service can forward its own client's address
//! in a trusted header).
//!
//! **The caller** authenticates with its own key (any header the layer reads), which must
//! hold the scope `keys:verify`. It is a management scope: granted only by its exact name
//! (`*` and `keys:*` never grant it), and never held by a key of a foreign (Payload, Strapi)
//! collection. Without a valid caller key the route answers the layer's own rejection
//! (401, 403 `insufficient_scope`, 429, 503), never a verdict.
//!
//! [`AuthServer::verify_without_caller_key_from_loopback`] lets requests whose connection
//! comes from a loopback address verify without a caller key. Off by default. **Risk**: every
//! process on the host (and anything a local reverse proxy forwards, since its connections
//! come from loopback) can then test keys, i.e. use the endpoint as a key oracle limited only
//! by failed-attempt limiting. Enable it only when the server listens on loopback, nothing
//! on the host forwards outside traffic to it, and every local process is trusted.
//!
//! # `/v1/auth` (any method, also `/v1/auth/<path>` for Envoy's path prefix)
//!
//! The forwarded request's headers carry the credential, read as the layer reads it
//! (`Authorization: Bearer`, `Authorization: <collection> API-Key`, `X-Api-Key`, the configured
//! extra headers). The original method comes from `X-Forwarded-Method` (Traefik, Caddy) or
//! `X-Original-Method` (nginx configs), else the request's own method (Envoy keeps it): a
//! read-only key is refused on unsafe methods. The client address comes from
//! [`AuthServer::client_address`]: only set a trusted header that the gateway always
//! overwrites.
//!
//! - Success: `200`, empty body, with `X-Keywarden-Subject`, `X-Keywarden-Key-Id`,
//!   `X-Keywarden-Collection` and `X-Keywarden-Scopes` (scopes joined by `,`) for the gateway
//!   to pass upstream, and the `RateLimit-*` headers when the key is limited. Bytes of the
//!   subject, collection or each scope outside visible ASCII (space included), `%` and `,`
//!   are percent-encoded: split the scopes on `,`, then decode each. The forwarded method
//!   headers (`X-Forwarded-Method`, `X-Original-Method`) must agree, else 400.
//! - Rejection: the layer's status, headers (`WWW-Authenticate`, `Retry-After`,
//!   `RateLimit-*`) and problem+json body, plus `X-Keywarden-Code: <code>` for gateways that
//!   render their own body (nginx: see `docs/gateways.md`).
//!
//! The gateway must drop or overwrite any `X-Keywarden-*` header the client sent, or the
//! upstream cannot tell them from ours: `docs/gateways.md` shows how for each gateway.

use std::net::IpAddr;

use axum::routing::{any, get, post};
use axum::Router;
use http::{Extensions, HeaderMap};

use crate::layer::ApiKeyLayer;
use crate::ratelimit::{ClientAddressSource, ClientAddresses};

mod forward;
mod openapi;
mod verify;

pub use openapi::openapi;

/// The scope a caller of `POST /v1/keys/verify` must hold, by exact name.
pub const VERIFY_SCOPE: &str = "keys:verify";

/// The verification API and forward-auth endpoint over one [`ApiKeyLayer`]; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct AuthServer {
    layer: ApiKeyLayer,
    client_address: Option<ClientAddressSource>,
    loopback_without_key: bool,
}

impl AuthServer {
    /// Both endpoints over `layer` (and its cache, limits and invalidations); the verify API
    /// requires a caller key with `keys:verify`. Verified keys' failures count against no
    /// address until [`client_address`](Self::client_address) names one.
    pub fn new(layer: ApiKeyLayer) -> Self {
        Self {
            layer: layer.required(),
            client_address: None,
            loopback_without_key: false,
        }
    }

    /// Where the address of the client a verified key came from is found, for the layer's
    /// failed-attempt limiting. Default: nowhere, so no address is blamed: the connection is a
    /// calling service or a gateway answering for many clients, and blaming it would let one
    /// client's bad keys block everybody (the calling service's own key included). Behind a
    /// gateway, name the header it sets to the client's address, e.g. `X-Real-IP` (its last
    /// entry is used; a request without it blames no one) — and make sure the gateway always
    /// overwrites it, or clients choose their own address. Better, name the gateways'
    /// addresses with `ClientAddressSource::TrustedProxies`: their header is then believed
    /// only on their connections, and a client calling directly is blamed itself.
    /// `ClientAddressSource::Connection` blames the connection's address: only when each
    /// client connects directly.
    #[must_use]
    pub fn client_address(mut self, source: ClientAddressSource) -> Self {
        self.client_address = Some(source);
        self
    }

    /// Lets `POST /v1/keys/verify` requests whose **connection** comes from a loopback
    /// address (`127.0.0.0/8`, `::1`) verify keys without a caller key; other requests still
    /// need one with `keys:verify`. Requests without a known connection address (a server not
    /// serving connect info) still need one. Off unless called.
    ///
    /// Read the risk in the [module docs](self) first: with a reverse proxy on the same host,
    /// every forwarded request comes from loopback.
    #[must_use]
    pub fn verify_without_caller_key_from_loopback(mut self) -> Self {
        self.loopback_without_key = true;
        self
    }

    /// The routes: `POST /v1/keys/verify`, and `/v1/auth`, `/v1/auth/` and `/v1/auth/{*path}`
    /// for any method. Not to be put behind the layer: each route authenticates through it itself.
    ///
    /// Like [`management_router`](crate::manage::management_router) it is a `Router<S>` for
    /// any app state `S`.
    pub fn router<S>(self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let document = openapi::document();
        Router::new()
            .route(
                "/v1/openapi.json",
                get(move || openapi::serve(document.clone())),
            )
            .route("/v1/keys/verify", post(verify::verify))
            .route("/v1/auth", any(forward::forward_auth))
            .route("/v1/auth/", any(forward::forward_auth))
            .route("/v1/auth/{*path}", any(forward::forward_auth))
            .with_state(self)
    }

    /// The verified key's client: the address blamed for a rejected key ([`client`]) and the
    /// one its IP allowlist is checked against. The latter is only ever the address a gateway
    /// forwards (or, with [`ClientAddressSource::Connection`], the connection's): a caller that
    /// is not a trusted proxy, or a proxy that forwarded nothing usable, leaves it unknown, so
    /// a key with an allowlist is refused rather than judged by the caller's own address.
    ///
    /// [`client`]: Self::client
    fn addresses(&self, headers: &HeaderMap, extensions: &Extensions) -> ClientAddresses {
        let origin = match self.client_address.as_ref() {
            None => None,
            Some(ClientAddressSource::TrustedProxies(proxies)) => ClientAddressSource::Connection
                .address(headers, extensions)
                .filter(|peer| proxies.is_trusted(*peer))
                .and_then(|peer| proxies.origin(headers, peer)),
            Some(source) => source.origin_address(headers, extensions),
        };
        ClientAddresses {
            blamed: self.client(headers, extensions),
            origin,
        }
    }

    fn client(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
        match self.client_address.as_ref()? {
            // A connection from a trusted proxy blames the address it forwards; any other
            // connection is a client calling directly.
            source @ ClientAddressSource::Connection => source.address(headers, extensions),
            // A proxy that forwarded no client is not blamed: it answers for many clients.
            // Anyone else is: a client calling directly, or one inside the trusted networks.
            ClientAddressSource::TrustedProxies(proxies) => {
                let peer = ClientAddressSource::Connection.address(headers, extensions)?;
                proxies.forwarded_client(headers, peer)
            }
            source => source.forwarded_address(headers),
        }
    }
}
