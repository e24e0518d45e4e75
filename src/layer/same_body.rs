//! [`SameBodyLayer`]: keywarden's layers, with responses in the inner service's own body type.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::ApiKeyLayer;
use crate::body::AuthBody;

/// A keywarden layer `L` ([`ApiKeyLayer`] by default, or a
/// [`RequireScopeLayer`](crate::RequireScopeLayer)) whose responses keep the inner service's
/// body type `B`: the inner service's body passes through untouched, and a rejection's body is
/// built with `B::from(Bytes)`. Created by [`ApiKeyLayer::same_body`] and
/// [`RequireScopeLayer::same_body`](crate::RequireScopeLayer::same_body); it decides exactly
/// as the layer it came from, sharing its state.
///
/// **When to use it.** `.layer(layer)` is always correct. `same_body` is a small saving for
/// axum: axum turns a route's response body into its own `Body`, and boxes any other body type
/// (such as [`AuthBody`]) on the way, one allocation per response. With this layer the body
/// already is axum's, so nothing is boxed: ≈ 260 instructions per request in the load server
/// (≈ 0.9 % of its instructions per request; BENCHMARKS.md, section 15), below what the load
/// harness resolves in time.
///
/// **Limits.** The inner service's body must be `From<Bytes>` (axum's `Body` is;
/// `http_body_util::Empty` is not, and the error then names a trait bound of the service, not
/// `From<Bytes>`; nor is tonic's: under a tonic server, use `.layer(layer)`).
/// [`Cost`](super::Cost), and a [`RequireScopeLayer`](crate::RequireScopeLayer) applied as it
/// is, answer in [`AuthBody`]: apply them per route (`route_layer`, `handler.layer`) as the
/// README shows, not directly under this layer in one `ServiceBuilder` stack (that does not
/// compile); a scope check can be applied as `RequireScopeLayer::new(..).same_body()` too.
/// Use [`optional`](Self::optional) /
/// [`required`](Self::required) here, or `layer.optional().same_body()`;
/// [`api_key_layer`](Self::api_key_layer) gives back the `ApiKeyLayer` (for
/// `KeyManager::for_layer`, say).
///
/// ```
/// use std::sync::Arc;
/// use axum::{routing::get, Router};
/// use keywarden::{ApiKeyLayer, Collection, MemoryStore, Principal, SecretRing};
///
/// let secrets = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
/// let layer = ApiKeyLayer::builder()
///     .store(Arc::new(MemoryStore::new()))
///     .secrets(secrets)
///     .collection(Collection::new("users"))
///     .build()
///     .unwrap();
/// let app: Router = Router::new()
///     .route("/whoami", get(|p: Principal| async move { p.subject().to_owned() }))
///     .layer(layer.same_body());
/// # let _ = app;
/// ```
#[derive(Clone)]
pub struct SameBodyLayer<L = ApiKeyLayer> {
    layer: L,
}

impl<L> SameBodyLayer<L> {
    pub(crate) fn new(layer: L) -> Self {
        Self { layer }
    }
}

impl SameBodyLayer {
    /// The [`ApiKeyLayer`] this one answers for.
    pub fn api_key_layer(&self) -> &ApiKeyLayer {
        &self.layer
    }

    /// This layer in optional mode, sharing its state: see [`ApiKeyLayer::optional`].
    #[must_use]
    pub fn optional(&self) -> Self {
        Self::new(self.layer.optional())
    }

    /// This layer in required mode, sharing its state: see [`ApiKeyLayer::required`].
    #[must_use]
    pub fn required(&self) -> Self {
        Self::new(self.layer.required())
    }
}

impl<L: fmt::Debug> fmt::Debug for SameBodyLayer<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SameBodyLayer")
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S, L: Layer<S>> Layer<S> for SameBodyLayer<L> {
    type Service = SameBodyService<L::Service>;

    fn layer(&self, inner: S) -> Self::Service {
        SameBodyService {
            inner: self.layer.layer(inner),
        }
    }
}

/// The service of a [`SameBodyLayer`]: keywarden's service `T` (an
/// [`ApiKeyService`](super::ApiKeyService) or a [`RequireScope`](crate::scope::RequireScope)),
/// with responses in the inner service's body type.
#[derive(Clone, Debug)]
pub struct SameBodyService<T> {
    inner: T,
}

impl<T> SameBodyService<T> {
    /// Keywarden's service inside (it holds the inner service).
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Keywarden's service inside, mutably.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Keywarden's service inside, consuming this one.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T, ReqBody, ResBody> Service<Request<ReqBody>> for SameBodyService<T>
where
    T: Service<Request<ReqBody>, Response = Response<AuthBody<ResBody>>>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = T::Error;
    type Future = SameBodyFuture<T::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        SameBodyFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of a [`SameBodyService`].
    pub struct SameBodyFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for SameBodyFuture<F>
where
    F: Future<Output = Result<Response<AuthBody<B>>, E>>,
    B: From<Bytes>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = ready!(self.project().inner.poll(cx))?;
        Poll::Ready(Ok(
            response.map(|body| body.into_inner().unwrap_or_else(B::from))
        ))
    }
}

impl<F> fmt::Debug for SameBodyFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SameBodyFuture").finish_non_exhaustive()
    }
}
