//! The response body of the layer: the inner service's body, or a rejection.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The body of responses from [`ApiKeyService`](crate::ApiKeyService) and
    /// [`RequireScopeLayer`](crate::RequireScopeLayer): either the inner service's body, untouched,
    /// or the small body of a rejection. It implements `http_body::Body` wherever the inner
    /// body does, so the same layer wraps axum, tonic and hyper services.
    #[derive(Debug)]
    pub struct AuthBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Rejection { bytes: Option<Bytes> },
    }
}

impl<B> AuthBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn rejection(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Rejection {
                bytes: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }

    /// The inner service's body, untouched; or, for a rejection, its bytes not yet sent.
    ///
    /// [`ApiKeyLayer::same_body`](crate::ApiKeyLayer::same_body) uses it to hand the inner
    /// service's own body type back to axum, which boxes any other.
    pub fn into_inner(self) -> Result<B, Bytes> {
        match self.kind {
            Kind::Inner { body } => Ok(body),
            Kind::Rejection { bytes } => Err(bytes.unwrap_or_default()),
        }
    }

    /// The bytes of a rejection body not yet sent; `None` for the inner service's body.
    pub fn rejection_bytes(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Rejection { bytes } => Some(bytes.as_deref().unwrap_or_default()),
            Kind::Inner { .. } => None,
        }
    }
}

impl<B> Body for AuthBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Rejection { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Rejection { bytes } => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Rejection { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
