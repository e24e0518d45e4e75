//! [`ResponseFuture`]: the response future of the layer's service and of
//! [`RequireScope`](crate::scope::RequireScope).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::body::AuthBody;
use crate::rejection::{AuthRejection, Quota};

type BoxedResponse<B, E> = Pin<Box<dyn Future<Output = Result<Response<AuthBody<B>>, E>> + Send>>;

pin_project! {
    /// The response future of [`ApiKeyService`](super::ApiKeyService) and
    /// [`RequireScope`](crate::scope::RequireScope).
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
            quota: Quota,
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
    /// The inner service's response, with the rate-limit and credits headers of `quota`.
    pub(crate) fn inner(future: F, quota: Quota) -> Self {
        Self {
            state: State::Inner { future, quota },
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
            StateProj::Inner { future, quota } => {
                let mut response = ready!(future.poll(cx))?.map(AuthBody::inner);
                std::mem::take(quota).write_headers(response.headers_mut());
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
