//! [`Cost`]: what a request costs in credits, and the route layer that sets it.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use crate::body::AuthBody;
use crate::rejection::{is_grpc, AuthRejection, Quota, RejectionKind};
use crate::verify::Charged;

/// What a request costs a key with [credits](crate::store::Credits): 1 by default. Requests
/// of keys without credits cost nothing, whatever their cost; a rejected request costs
/// nothing either.
///
/// Two ways to price a route:
///
/// - **As a layer inside the key layer** (on the route): the key layer charges 1, and
///   `Cost::new(5)` charges the other 4 before the handler runs, or gives back the difference
///   for a cheaper route (`Cost::new(0)`: free). A key without the extra credits gets 429
///   `usage_exceeded`, and the 1 it was charged back. The key layer charges before the route
///   is known, so a key with no credits left is refused even on a route priced 0 here.
/// - **As a request extension set before the key layer** (by an outer layer, e.g.
///   `tower_http::add_extension::AddExtensionLayer::new(Cost::new(5))`): the key layer
///   charges it at once; a cost of 0 set this way answers even a key with nothing left.
///
/// ```
/// use axum::{routing::{get, post}, Router};
/// use keywarden::Cost;
///
/// # fn demo(keys: keywarden::ApiKeyLayer) -> Router {
/// let app: Router = Router::new()
///     .route("/search", get(|| async { "results" }).layer(Cost::new(5)))
///     .route("/health", get(|| async { "ok" }).layer(Cost::new(0)))
///     .route("/items", post(|| async { "created" }))
///     .layer(keys);
/// # app }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cost(u32);

impl Cost {
    /// A cost of `credits`.
    pub const fn new(credits: u32) -> Self {
        Self(credits)
    }

    /// The credits.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl Default for Cost {
    fn default() -> Self {
        Self(1)
    }
}

impl<S> Layer<S> for Cost {
    type Service = CostService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CostService { inner, cost: *self }
    }
}

/// The service of a [`Cost`] layer: charges the rest of a route's cost (or gives back what the
/// key layer charged beyond it) for keys with credits.
#[derive(Debug, Clone)]
pub struct CostService<S> {
    inner: S,
    cost: Cost,
}

impl<S> CostService<S> {
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CostService<S>
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
        let wanted = u64::from(self.cost.get());
        // Only a key with credits was charged; every other request passes as it is.
        let Some(charged) = req.extensions_mut().get_mut::<Charged>() else {
            return ResponseFuture::inner(self.inner.call(req), Quota::default());
        };
        if wanted <= charged.cost {
            charged.refund_part(charged.cost.saturating_sub(wanted));
            charged.cost = wanted;
            // The key layer's count is stale by what was given back: report the new one.
            let quota = Quota {
                credits: charged.known_left(),
                ..Quota::default()
            };
            return ResponseFuture::inner(self.inner.call(req), quota);
        }
        let extra = wanted - charged.cost;
        if let Some(left) = charged.spend_more_now(extra) {
            charged.cost = wanted;
            let quota = Quota {
                credits: Some(left),
                ..Quota::default()
            };
            return ResponseFuture::inner(self.inner.call(req), quota);
        }
        // The instance holds too few: lease, then call the inner service (the one polled
        // ready goes with the request; a clone stays).
        let charged = charged.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::boxed(async move {
            let unavailable = || {
                AuthRejection::new(
                    RejectionKind::StoreUnavailable,
                    "the key store is unavailable",
                )
            };
            let left = match charged.charge_more(extra, unavailable).await {
                Ok(left) => left,
                Err(rejection) => {
                    // Refused: the request costs nothing, so what the key layer took goes back.
                    charged.refund();
                    super::future::log_rejection(&rejection);
                    return Ok(rejection.to_response(is_grpc(req.headers())));
                }
            };
            if let Some(slot) = req.extensions_mut().get_mut::<Charged>() {
                slot.cost = wanted;
            }
            let mut response = inner.call(req).await?.map(AuthBody::inner);
            Quota {
                credits: left,
                ..Quota::default()
            }
            .write_headers(response.headers_mut());
            Ok(response)
        })
    }
}

/// Gives back the credits the key layer charged a request that is refused after all (by a
/// check of keywarden's own past the key layer, e.g. the management API's scopes).
#[cfg(feature = "manage-api")]
pub(crate) fn refund_credits(extensions: &http::Extensions) {
    if let Some(charged) = extensions.get::<Charged>() {
        charged.refund();
    }
}
