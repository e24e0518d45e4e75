//! [`RequireScope`]: a route-level layer that requires a scope of the principal.
//!
//! ```
//! use axum::{routing::post, Router};
//! use keywarden::RequireScope;
//!
//! let admin: Router = Router::new()
//!     .route("/keys", post(|| async { "created" }))
//!     .route_layer(RequireScope::new("keys:admin"));
//! # let _ = admin;
//! ```
//! Place it inside (after) an [`ApiKeyLayer`](crate::ApiKeyLayer): it reads the principal the
//! layer inserted. No principal → 401 `missing_credentials`; scope missing → 403
//! `insufficient_scope`.
//!
//! # Management scopes are granted only by name
//!
//! Scopes in the `keys:` namespace (`keys:admin`, `keys:self`, and any later one such as
//! `keys:verify`) manage keywarden itself. They are granted only by holding exactly that
//! scope: neither `*` nor any `prefix:*` wildcard grants them, `keys:*` included (a key with
//! `keys:*` holds the literal scope `keys:*` and nothing else of the namespace). A principal
//! of a foreign collection (Payload CMS, Strapi) never holds one, whatever its scopes say,
//! so a Strapi `full-access` token (scope `*`) is not a keywarden admin. See
//! [`Principal::has_scope`].

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::AuthBody;
use crate::principal::Principal;
use crate::rejection::{is_grpc, AuthRejection, RejectionKind};
use crate::service::ResponseFuture;

/// The namespace of the scopes that manage keywarden itself.
const MANAGEMENT_NAMESPACE: &str = "keys:";

/// Whether `scope` manages keywarden itself (the `keys:` namespace): such a scope is granted
/// only by its exact name, and never to a foreign principal.
pub(crate) fn is_management_scope(scope: &str) -> bool {
    scope.starts_with(MANAGEMENT_NAMESPACE)
}

/// Requires a scope (`*` and `prefix:*` grants count, except for the management scopes of
/// the `keys:` namespace, which only their exact name grants; see [`Principal::has_scope`]).
#[derive(Debug, Clone)]
pub struct RequireScope {
    scope: Arc<str>,
}

impl RequireScope {
    /// Requires `scope`.
    pub fn new(scope: impl Into<Arc<str>>) -> Self {
        Self {
            scope: scope.into(),
        }
    }
}

impl<S> Layer<S> for RequireScope {
    type Service = RequireScopeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireScopeService {
            inner,
            scope: self.scope.clone(),
        }
    }
}

/// The service of [`RequireScope`].
#[derive(Debug, Clone)]
pub struct RequireScopeService<S> {
    inner: S,
    scope: Arc<str>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequireScopeService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<AuthBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let grpc = is_grpc(req.headers());
        let verdict = match req.extensions().get::<Principal>() {
            None => Some(AuthRejection::new(
                RejectionKind::MissingCredentials,
                "this route requires an API key",
            )),
            Some(principal) if !principal.has_scope(&self.scope) => {
                Some(AuthRejection::insufficient_scope(self.scope.to_string()))
            }
            Some(_) => None,
        };
        if let Some(rejection) = verdict {
            return ResponseFuture::reject(&rejection, grpc);
        }
        ResponseFuture::inner(self.inner.call(req), None)
    }
}
