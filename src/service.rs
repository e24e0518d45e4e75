//! [`ApiKeyService`]: the middleware service, and its response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::body::AuthBody;
use crate::rejection::{is_grpc, AuthRejection, RejectionKind};
use crate::verify::{Mode, Prepared, Shared};

/// Authenticates requests, then calls the inner service with the [`Principal`](crate::Principal)
/// in the request extensions. Created by [`ApiKeyLayer`](crate::ApiKeyLayer).
pub struct ApiKeyService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> ApiKeyService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

impl<S: Clone> Clone for ApiKeyService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for ApiKeyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

type BoxedResponse<B, E> = Pin<Box<dyn Future<Output = Result<Response<AuthBody<B>>, E>> + Send>>;

/// The response future of [`ApiKeyService`] and [`RequireScopeService`](crate::RequireScopeService).
pub struct ResponseFuture<B, E> {
    inner: BoxedResponse<B, E>,
}

impl<B, E> ResponseFuture<B, E> {
    pub(crate) fn new(
        future: impl Future<Output = Result<Response<AuthBody<B>>, E>> + Send + 'static,
    ) -> Self {
        Self {
            inner: Box::pin(future),
        }
    }

    pub(crate) fn reject(rejection: &AuthRejection, grpc: bool) -> Self
    where
        B: Send + 'static,
        E: Send + 'static,
    {
        log_rejection(rejection);
        let response = rejection.to_response(grpc);
        Self::new(std::future::ready(Ok(response)))
    }
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<AuthBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

pub(crate) fn log_rejection(rejection: &AuthRejection) {
    tracing::debug!(
        target: "keywarden",
        code = rejection.kind().code(),
        detail = rejection.detail(),
        "request rejected"
    );
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ApiKeyService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<AuthBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // The clone may not be ready; keep the one that was polled ready for this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = &self.shared;
        let prepared = shared.prepare(req.headers(), req.uri().query());
        let client = match prepared {
            Prepared::Anonymous => None,
            _ => shared.client_address(req.headers(), req.extensions()),
        };
        let blocked = shared.blocked(client);
        let lookup = match prepared {
            Prepared::Reject(rejection) => {
                if let Some(blocked) = &blocked {
                    return ResponseFuture::reject(
                        &shared.blocked_rejection(blocked),
                        is_grpc(req.headers()),
                    );
                }
                shared.note_failure(client, rejection.kind());
                return ResponseFuture::reject(&rejection, is_grpc(req.headers()));
            }
            Prepared::Anonymous => {
                if shared.mode == Mode::Required {
                    let rejection = AuthRejection::new(
                        RejectionKind::MissingCredentials,
                        "send an API key in the Authorization or X-Api-Key header",
                    );
                    return ResponseFuture::reject(&rejection, is_grpc(req.headers()));
                }
                return ResponseFuture::new(async move {
                    inner.call(req).await.map(|res| res.map(AuthBody::inner))
                });
            }
            Prepared::Lookup(lookup) => lookup,
        };
        if let Some(blocked) = blocked.as_ref().filter(|b| !b.allow_cached) {
            return ResponseFuture::reject(
                &shared.blocked_rejection(blocked),
                is_grpc(req.headers()),
            );
        }
        let shared = self.shared.clone();
        ResponseFuture::new(async move {
            let resolved = shared
                .resolve(
                    lookup.digest,
                    req.headers(),
                    req.uri().query(),
                    blocked.as_ref(),
                )
                .await;
            let checked = resolved.and_then(|resolved| {
                shared.check(&resolved, &lookup, req.method(), &*shared.clock)?;
                Ok(resolved)
            });
            let outcome = match checked {
                Ok(resolved) => shared
                    .rate_limit(&resolved)
                    .await
                    .map(|status| (resolved, status)),
                Err(rejection) => {
                    shared.note_failure(client, rejection.kind());
                    Err(rejection)
                }
            };
            let (resolved, rate_status) = match outcome {
                Ok(accepted) => accepted,
                Err(rejection) => {
                    log_rejection(&rejection);
                    return Ok(rejection.to_response(is_grpc(req.headers())));
                }
            };
            tracing::trace!(
                target: "keywarden",
                key_id = %resolved.principal.key_id(),
                "request authenticated"
            );
            shared.record_use(&resolved);
            shared.protect_headers(req.headers_mut(), &lookup);
            let extensions = req.extensions_mut();
            if let Some(identity) = &resolved.identity {
                identity.insert_into(extensions);
            }
            extensions.insert(resolved.principal.clone());
            let response = inner.call(req).await?;
            let mut response = response.map(AuthBody::inner);
            if let Some(status) = rate_status {
                status.write_headers(response.headers_mut());
            }
            Ok(response)
        })
    }
}
