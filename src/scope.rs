//! [`RequireScopeLayer`]: a route-level layer that requires a scope of the principal, and its
//! service [`RequireScope`].
//!
//! It reads the principal an [`ApiKeyLayer`](crate::ApiKeyLayer) put into the request, so it
//! must run *after* (inside) that layer. In axum, a layer added later wraps the ones before
//! it: add the scope with `.route_layer(..)` (or `handler.layer(..)` for one method) and the
//! key layer with a later `.layer(..)`.
//!
//! ```
//! use std::sync::Arc;
//! use axum::handler::Handler;
//! use axum::{routing::get, Router};
//! use keywarden::{ApiKeyLayer, MemoryStore, RequireScopeLayer, SecretRing};
//!
//! let layer = ApiKeyLayer::builder()
//!     .store(Arc::new(MemoryStore::new()))
//!     .secrets(SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap())
//!     .build()
//!     .unwrap();
//! let app: Router = Router::new()
//!     // Per method, on each handler: GET needs `articles:read`, DELETE `articles:delete`.
//!     .route(
//!         "/articles/{id}",
//!         get((|| async { "article" }).layer(RequireScopeLayer::new("articles:read")))
//!             .delete((|| async { "deleted" }).layer(RequireScopeLayer::new("articles:delete"))),
//!     )
//!     // One scope for every method of a route.
//!     .route("/admin", get(|| async { "admin" }).route_layer(RequireScopeLayer::new("admin")))
//!     // Last, so outermost: every route above needs a key, and the scope checks run inside.
//!     .layer(layer);
//! # let _ = app;
//! ```
//!
//! No principal → 401 `missing_credentials`; scope missing → 403 `insufficient_scope`. Placed
//! the wrong way round (no key layer ran before it), every request is a 401 whose detail says
//! so, and an error is logged: the order is a configuration mistake, never a silent one.
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
use crate::layer::ResponseFuture;
use crate::principal::{PassedWithoutKey, Principal};
use crate::rejection::{is_grpc, AuthRejection, RejectionKind};
use crate::verify::Charged;

/// The detail of a scope check that no key layer ran before: a configuration error, said so.
const MISPLACED: &str = "no API-key layer ran before this scope check: RequireScopeLayer must be inside ApiKeyLayer (in axum, `.route_layer(RequireScopeLayer::new(..))` then `.layer(api_key_layer)`, or `handler.layer(..)`)";

/// Requires a scope (`*` and `prefix:*` grants count, except for the management scopes of
/// the `keys:` namespace, which only their exact name grants; see [`Principal::has_scope`]).
#[derive(Debug, Clone)]
pub struct RequireScopeLayer {
    rule: Rule,
}

/// The scope a request needs, for [`RequireScopeLayer::per_request`]: from the method and the
/// path the layer sees; `None` when no scope is defined for the request, which is refused.
pub type ScopeRule = dyn Fn(&http::Method, &str) -> Option<Arc<str>> + Send + Sync;

/// Which scope a request needs.
#[derive(Clone)]
enum Rule {
    /// The same one for every request.
    Fixed(Arc<str>),
    /// One per request, or none: refused.
    PerRequest(Arc<ScopeRule>),
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(scope) => f.debug_tuple("Fixed").field(scope).finish(),
            Self::PerRequest(_) => f.write_str("PerRequest(..)"),
        }
    }
}

impl RequireScopeLayer {
    /// Requires `scope`.
    pub fn new(scope: impl Into<Arc<str>>) -> Self {
        Self {
            rule: Rule::Fixed(scope.into()),
        }
    }

    /// Requires, of each request, the scope `rule` names for its method and path (the path
    /// as this layer sees it: inside an axum `nest`, without the nesting prefix). A request
    /// the rule names no scope for is refused with 403 `insufficient_scope` (fail closed).
    /// `keywarden::interop::StrapiContentApi` builds one that mirrors Strapi's per-action
    /// permissions.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use keywarden::RequireScopeLayer;
    ///
    /// // GET and HEAD need `reports:read`, DELETE `reports:delete`; anything else is refused.
    /// let scopes = RequireScopeLayer::per_request(|method, _path| match method.as_str() {
    ///     "GET" | "HEAD" => Some(Arc::from("reports:read")),
    ///     "DELETE" => Some(Arc::from("reports:delete")),
    ///     _ => None,
    /// });
    /// # let _ = scopes;
    /// ```
    pub fn per_request<F>(rule: F) -> Self
    where
        F: Fn(&http::Method, &str) -> Option<Arc<str>> + Send + Sync + 'static,
    {
        Self {
            rule: Rule::PerRequest(Arc::new(rule)),
        }
    }
}

impl RequireScopeLayer {
    /// This scope check with responses in the inner service's own body type (a refusal's
    /// body is built with `From<Bytes>`): see [`SameBodyLayer`](crate::layer::SameBodyLayer).
    /// For axum routes, where `AuthBody` would be boxed once per response; the check is the
    /// same.
    #[must_use]
    pub fn same_body(self) -> crate::layer::SameBodyLayer<Self> {
        crate::layer::SameBodyLayer::new(self)
    }
}

impl<S> Layer<S> for RequireScopeLayer {
    type Service = RequireScope<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireScope {
            inner,
            rule: self.rule.clone(),
        }
    }
}

/// The service of [`RequireScopeLayer`].
#[derive(Debug, Clone)]
pub struct RequireScope<S> {
    inner: S,
    rule: Rule,
}

/// The detail of an unsafe request of a read-only key (the key layer's wording).
const READ_ONLY: &str = "this key is read-only";

/// The detail of a request no scope is defined for.
const NO_SCOPE: &str = "no scope is defined for this method and path";

impl<S> RequireScope<S> {
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequireScope<S>
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
        let per_request;
        let scope: Option<&str> = match &self.rule {
            Rule::Fixed(scope) => Some(scope),
            Rule::PerRequest(rule) => {
                per_request = rule(req.method(), req.uri().path());
                per_request.as_deref()
            }
        };
        let verdict = match req.extensions().get::<Principal>() {
            None if req.extensions().get::<PassedWithoutKey>().is_some() => {
                Some(AuthRejection::new(
                    RejectionKind::MissingCredentials,
                    "this route requires an API key",
                ))
            }
            None => {
                tracing::error!(
                    target: "keywarden",
                    scope = scope.unwrap_or(""),
                    "RequireScopeLayer ran before any ApiKeyLayer: place it inside the key layer"
                );
                Some(AuthRejection::new(
                    RejectionKind::MissingCredentials,
                    MISPLACED,
                ))
            }
            // The key layer refused unsafe methods of read-only keys already; a method
            // override between the two layers could change the method since, so the method
            // this layer sees is judged again.
            Some(principal) if principal.is_read_only() && !req.method().is_safe() => Some(
                AuthRejection::new(RejectionKind::InsufficientScope, READ_ONLY),
            ),
            Some(principal) => match scope {
                Some(scope) if principal.has_scope(scope) => None,
                Some(scope) => Some(AuthRejection::insufficient_scope(scope.to_string())),
                None => Some(AuthRejection::new(
                    RejectionKind::InsufficientScope,
                    NO_SCOPE,
                )),
            },
        };
        if let Some(rejection) = verdict {
            // A refused request costs no credits: what the key layer charged goes back.
            if let Some(charged) = req.extensions().get::<Charged>() {
                charged.refund();
            }
            return ResponseFuture::reject(&rejection, grpc);
        }
        ResponseFuture::inner(self.inner.call(req), crate::rejection::Quota::default())
    }
}

#[cfg(test)]
mod tests {
    use std::future::Ready;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::task::Waker;

    use http_body_util::BodyExt;

    use super::*;

    /// An inner service that is ready only when told, counts its `poll_ready` calls, and
    /// fails its readiness when told to.
    #[derive(Clone, Default)]
    struct Gate {
        ready: Arc<AtomicBool>,
        broken: Arc<AtomicBool>,
        polled: Arc<AtomicUsize>,
        called: Arc<AtomicUsize>,
    }

    impl Service<Request<()>> for Gate {
        type Response = Response<String>;
        type Error = &'static str;
        type Future = Ready<Result<Response<String>, &'static str>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.polled.fetch_add(1, Ordering::SeqCst);
            if self.broken.load(Ordering::SeqCst) {
                Poll::Ready(Err("inner failed"))
            } else if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }

        fn call(&mut self, _req: Request<()>) -> Self::Future {
            self.called.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(Response::new("inner".to_owned())))
        }
    }

    fn poll_ready(service: &mut RequireScope<Gate>) -> Poll<Result<(), &'static str>> {
        service.poll_ready(&mut Context::from_waker(Waker::noop()))
    }

    /// tower's contract: readiness is the inner service's (backpressure from a
    /// `ConcurrencyLimit` or `Buffer` inside passes through), and so are its errors.
    #[test]
    fn poll_ready_is_the_inner_services() {
        let gate = Gate::default();
        let mut service = RequireScopeLayer::new("read").layer(gate.clone());
        assert!(poll_ready(&mut service).is_pending());
        assert_eq!(gate.polled.load(Ordering::SeqCst), 1);
        gate.ready.store(true, Ordering::SeqCst);
        assert_eq!(poll_ready(&mut service), Poll::Ready(Ok(())));
        assert_eq!(gate.polled.load(Ordering::SeqCst), 2);
        gate.broken.store(true, Ordering::SeqCst);
        assert_eq!(poll_ready(&mut service), Poll::Ready(Err("inner failed")));
        assert_eq!(gate.called.load(Ordering::SeqCst), 0);
    }

    async fn answer(scopes: Option<&[&str]>, required: &str) -> (u16, String, usize) {
        answer_with(RequireScopeLayer::new(required), scopes, Request::new(())).await
    }

    /// Status, body and inner calls of `req` (with a principal holding `scopes`, if any)
    /// through `layer`.
    async fn answer_with(
        layer: RequireScopeLayer,
        scopes: Option<&[&str]>,
        mut req: Request<()>,
    ) -> (u16, String, usize) {
        let gate = Gate::default();
        gate.ready.store(true, Ordering::SeqCst);
        let mut service = layer.layer(gate.clone());
        if let Some(scopes) = scopes {
            req.extensions_mut().insert(Principal::for_tests(scopes));
        }
        assert!(poll_ready(&mut service).is_ready());
        let response = service.call(req).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            String::from_utf8(body.to_vec()).unwrap(),
            gate.called.load(Ordering::SeqCst),
        )
    }

    #[tokio::test]
    async fn only_a_principal_holding_the_scope_reaches_the_inner_service() {
        let (status, body, called) = answer(Some(&["read"]), "read").await;
        assert_eq!((status, body.as_str(), called), (200, "inner", 1));
        let (status, _, called) = answer(Some(&["*"]), "articles:read").await;
        assert_eq!((status, called), (200, 1));
        let (status, _, called) = answer(Some(&["articles:*"]), "articles:read").await;
        assert_eq!((status, called), (200, 1));

        let (status, body, called) = answer(Some(&["read"]), "write").await;
        assert_eq!((status, called), (403, 0), "{body}");
        assert!(body.contains("insufficient_scope"), "{body}");
        let (status, body, called) = answer(Some(&[]), "read").await;
        assert_eq!((status, called), (403, 0), "{body}");
        let (status, body, called) = answer(None, "read").await;
        assert_eq!((status, called), (401, 0), "{body}");
        assert!(body.contains("missing_credentials"), "{body}");
    }

    #[tokio::test]
    async fn a_missing_principal_says_whether_the_layers_are_misordered() {
        // Optional key layer, no key: the route needs one.
        let mut req = Request::new(());
        req.extensions_mut().insert(PassedWithoutKey);
        let (status, body, called) = answer_with(RequireScopeLayer::new("read"), None, req).await;
        assert_eq!((status, called), (401, 0), "{body}");
        assert!(body.contains("this route requires an API key"), "{body}");
        assert!(!body.contains("no API-key layer"), "{body}");
        // No key layer ran at all: a configuration mistake, said so.
        let (status, body, called) =
            answer_with(RequireScopeLayer::new("read"), None, Request::new(())).await;
        assert_eq!((status, called), (401, 0), "{body}");
        assert!(body.contains("no API-key layer ran before"), "{body}");
    }

    #[test]
    fn debug_names_the_rule() {
        let fixed = format!("{:?}", RequireScopeLayer::new("read"));
        assert!(fixed.contains("Fixed(\"read\")"), "{fixed}");
        let dynamic = format!("{:?}", RequireScopeLayer::per_request(|_, _| None));
        assert!(dynamic.contains("PerRequest(..)"), "{dynamic}");
    }

    async fn answer_per_request(
        scopes: &[&str],
        method: http::Method,
        path: &str,
    ) -> (u16, String, usize) {
        let layer = RequireScopeLayer::per_request(|method, path| match (method.as_str(), path) {
            ("GET", "/reports") => Some(Arc::from("reports:read")),
            ("DELETE", p) if p.starts_with("/reports/") => Some(Arc::from("reports:delete")),
            _ => None,
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        answer_with(layer, Some(scopes), req).await
    }

    #[tokio::test]
    async fn a_per_request_rule_requires_its_scope_and_refuses_what_it_does_not_name() {
        use http::Method;
        let (status, _, called) =
            answer_per_request(&["reports:read"], Method::GET, "/reports").await;
        assert_eq!((status, called), (200, 1));
        let (status, body, called) =
            answer_per_request(&["reports:read"], Method::DELETE, "/reports/7").await;
        assert_eq!((status, called), (403, 0), "{body}");
        assert!(body.contains("reports:delete"), "{body}");
        let (status, _, called) =
            answer_per_request(&["reports:delete"], Method::DELETE, "/reports/7").await;
        assert_eq!((status, called), (200, 1));
        // A read-only key on an unsafe method the key layer did not see (an override in
        // between): refused here too.
        let mut req = Request::builder()
            .method(Method::DELETE)
            .uri("/reports/7")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(Principal::read_only_for_tests(&["*"]));
        let layer = RequireScopeLayer::new("reports:delete");
        let (status, body, called) = answer_with(layer, None, req).await;
        assert_eq!((status, called), (403, 0), "{body}");
        assert!(body.contains("read-only"), "{body}");
        // Named by no rule: refused even for `*`.
        let (status, body, called) = answer_per_request(&["*"], Method::POST, "/reports").await;
        assert_eq!((status, called), (403, 0), "{body}");
        assert!(body.contains("no scope is defined"), "{body}");
    }
}
