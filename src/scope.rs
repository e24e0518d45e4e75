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

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::AuthBody;
use crate::principal::Principal;
use crate::rejection::{is_grpc, AuthRejection, RejectionKind};
use crate::service::ResponseFuture;

/// Requires a scope (`*` and `prefix:*` grants count; see [`Principal::has_scope`]).
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
