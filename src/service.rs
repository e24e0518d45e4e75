//! [`ApiKeyService`]: the middleware service, and its response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::AuthBody;
use crate::rejection::{is_grpc, AuthRejection, RateLimitStatus, RejectionKind};
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

pin_project! {
    /// The response future of [`ApiKeyService`] and [`RequireScopeService`](crate::RequireScopeService).
    ///
    /// A request answered from the cache, and every rejection, is decided inside `call`: the
    /// future is then just the inner service's future, or the ready rejection. Only a request
    /// that must wait for the store (a cache miss, a stale entry, a remote rate limiter) is
    /// boxed.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        state: State<F, B, E>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B, E> {
        Inner {
            #[pin]
            future: F,
            rate: Option<RateLimitStatus>,
        },
        Ready {
            response: Option<Response<AuthBody<B>>>,
        },
        Boxed {
            future: BoxedResponse<B, E>,
        },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    /// The inner service's response, with the rate-limit headers of `rate` added.
    pub(crate) fn inner(future: F, rate: Option<RateLimitStatus>) -> Self {
        Self {
            state: State::Inner { future, rate },
        }
    }

    pub(crate) fn boxed(
        future: impl Future<Output = Result<Response<AuthBody<B>>, E>> + Send + 'static,
    ) -> Self {
        Self {
            state: State::Boxed {
                future: Box::pin(future),
            },
        }
    }

    pub(crate) fn reject(rejection: &AuthRejection, grpc: bool) -> Self {
        log_rejection(rejection);
        Self {
            state: State::Ready {
                response: Some(rejection.to_response(grpc)),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<AuthBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { future, rate } => {
                let mut response = ready!(future.poll(cx))?.map(AuthBody::inner);
                if let Some(status) = rate.take() {
                    status.write_headers(response.headers_mut());
                }
                Poll::Ready(Ok(response))
            }
            StateProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            StateProj::Boxed { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
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
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
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
                return ResponseFuture::inner(self.inner.call(req), None);
            }
            Prepared::Lookup(lookup) => lookup,
        };
        if let Some(blocked) = blocked.as_ref().filter(|b| !b.allow_cached) {
            return ResponseFuture::reject(
                &shared.blocked_rejection(blocked),
                is_grpc(req.headers()),
            );
        }
        // The hit path: the cache answers, the limiter is in memory; nothing to wait for.
        if !shared.limiters.is_remote() {
            if let Some(resolved) = shared.resolve_cached(&lookup.digest, blocked.as_ref()) {
                let outcome = resolved.and_then(|resolved| {
                    shared.check(&resolved, &lookup, req.method(), &*shared.clock)?;
                    Ok((shared.rate_limit_local(&resolved)?, resolved))
                });
                return match outcome {
                    Ok((rate, resolved)) => {
                        shared.admit(&mut req, &resolved, &lookup);
                        ResponseFuture::inner(self.inner.call(req), rate)
                    }
                    Err(rejection) => {
                        shared.note_failure(client, rejection.kind());
                        ResponseFuture::reject(&rejection, is_grpc(req.headers()))
                    }
                };
            }
        }
        // The request waits for the store: the service polled ready goes with it, and a
        // clone (maybe not ready) stays for the next request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::boxed(async move {
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
            shared.admit(&mut req, &resolved, &lookup);
            let response = inner.call(req).await?;
            let mut response = response.map(AuthBody::inner);
            if let Some(status) = rate_status {
                status.write_headers(response.headers_mut());
            }
            Ok(response)
        })
    }
}
