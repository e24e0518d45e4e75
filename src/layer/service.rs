//! [`ApiKeyService`]: the middleware service.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;
use tracing::{Instrument, Span};

use super::future::{log_rejection, ResponseFuture};
use super::Mode;
use crate::body::AuthBody;
use crate::clock::mono_now;
use crate::principal::PassedWithoutKey;
use crate::ratelimit::Blocked;
use crate::rejection::{is_grpc, AuthRejection, Quota, RejectionKind};
use crate::stats::Verdict;
use crate::verify::{auth_span, binding, end_span, Decided, Presented, PresentedKey, Verifier};

/// Authenticates requests, then calls the inner service with the [`Principal`](crate::Principal)
/// in the request extensions. Created by [`ApiKeyLayer`](crate::ApiKeyLayer).
pub struct ApiKeyService<S> {
    inner: S,
    verifier: Arc<Verifier>,
    mode: Mode,
}

impl<S> ApiKeyService<S> {
    pub(crate) fn new(inner: S, verifier: Arc<Verifier>, mode: Mode) -> Self {
        Self {
            inner,
            verifier,
            mode,
        }
    }

    define_inner_service_accessors!();
}

impl<S: Clone> Clone for ApiKeyService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            verifier: self.verifier.clone(),
            mode: self.mode,
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
        // The authentication's span covers the decision, not the inner service.
        let span = auth_span();
        let entered = span.enter();
        let verifier = &self.verifier;
        let admission = &verifier.admission;
        let optional = self.mode == Mode::Optional;
        // One pass over the headers finds the credential and marks it sensitive, when it
        // can; else the lookups, and admission marks it.
        let presented = match verifier
            .credentials
            .prepare_marking(req.headers_mut(), optional)
        {
            Some(presented) => presented,
            None => verifier
                .credentials
                .prepare(req.headers(), req.uri().query(), optional),
        };
        let client = match presented {
            Presented::Nothing => None,
            _ => admission.client_address(req.headers(), req.extensions()),
        };
        let blocked = admission.blocked(client);
        let key = match presented {
            Presented::Reject(rejection) => {
                let rejection = match &blocked {
                    Some(blocked) => verifier.resolver.blocked_rejection(blocked),
                    None => {
                        admission.note_failure(client, rejection.kind());
                        rejection
                    }
                };
                verifier.tally_rejection(&span, None, &rejection);
                return ResponseFuture::reject(&rejection, is_grpc(req.headers()));
            }
            Presented::Nothing => {
                if !optional {
                    let rejection = AuthRejection::new(
                        RejectionKind::MissingCredentials,
                        "send an API key in the Authorization or X-Api-Key header",
                    );
                    verifier.tally_rejection(&span, None, &rejection);
                    return ResponseFuture::reject(&rejection, is_grpc(req.headers()));
                }
                verifier.tally(&span, None, Verdict::Anonymous, None);
                drop(entered);
                req.extensions_mut().insert(PassedWithoutKey);
                return ResponseFuture::inner(self.inner.call(req), Quota::default());
            }
            Presented::Key(key) => key,
        };
        if let Some(blocked) = blocked.as_ref().filter(|b| !b.allow_cached) {
            let rejection = verifier.resolver.blocked_rejection(blocked);
            verifier.tally_rejection(&span, binding(&key), &rejection);
            return ResponseFuture::reject(&rejection, is_grpc(req.headers()));
        }
        // The hit path: the cache answers, the limiter is in memory; nothing to wait for.
        let allowlist_client = || admission.allowlist_client(req.headers(), req.extensions());
        // The request's one clock reading on the hit path: the cache's deadlines and the
        // time of use.
        let at = mono_now();
        let now = verifier.outcome_now(
            &key,
            req.method(),
            blocked.as_ref(),
            at,
            allowlist_client,
            || request_cost(req.extensions()),
        );
        let now = match now {
            Some(decided) if decided.pending_cost.is_none() => {
                let admitted = verifier.admit_or_reject(&mut req, &key, client, decided, at, &span);
                return match admitted {
                    Ok(quota) => {
                        drop(entered);
                        let future = ResponseFuture::inner(self.inner.call(req), quota);
                        end_span(span);
                        future
                    }
                    Err(rejection) => ResponseFuture::reject(&rejection, is_grpc(req.headers())),
                };
            }
            // Accepted from the cache, but its credits must be leased first.
            pending => pending,
        };
        drop(entered);
        self.wait_for_store(req, key, now, span, client, blocked, optional)
    }
}

impl<S> ApiKeyService<S> {
    /// The request waits for the store (a miss, a stale entry, a remote rate limiter, credits
    /// to lease): boxed. Kept out of `call` (never inlined) so the hit path's stack frame does
    /// not hold room for this future, several kilobytes built here before it is boxed: a
    /// frame that size spans pages and many cache lines on every hit.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn wait_for_store<ReqBody, ResBody>(
        &mut self,
        mut req: Request<ReqBody>,
        key: PresentedKey,
        now: Option<Decided>,
        span: Span,
        client: Option<IpAddr>,
        blocked: Option<Blocked>,
        optional: bool,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqBody: Send + 'static,
        ResBody: Send + 'static,
    {
        // The service polled ready goes with the request, and a clone (maybe not ready)
        // stays for the next request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        ResponseFuture::boxed(async move {
            // Borrowed piece by piece: the future must not hold `&Request` (its body need
            // not be `Sync`).
            let (headers, extensions) = (req.headers(), req.extensions());
            let decided = match now {
                Some(pending) => verifier.settle(pending).instrument(span.clone()).await,
                None => {
                    verifier
                        .outcome(
                            &key,
                            headers,
                            req.uri().query(),
                            req.method(),
                            optional,
                            blocked.as_ref(),
                            || verifier.admission.allowlist_client(headers, extensions),
                            || request_cost(extensions),
                        )
                        .instrument(span.clone())
                        .await
                }
            };
            let admitted = span.in_scope(|| {
                let admitted =
                    verifier.admit_or_reject(&mut req, &key, client, decided, mono_now(), &span);
                if let Err(rejection) = &admitted {
                    log_rejection(rejection);
                }
                admitted
            });
            let quota = match admitted {
                Ok(quota) => quota,
                Err(rejection) => return Ok(rejection.to_response(is_grpc(req.headers()))),
            };
            let response = inner.call(req).await?;
            let mut response = response.map(AuthBody::inner);
            quota.write_headers(response.headers_mut());
            Ok(response)
        })
    }
}

/// The credits a request costs: its [`Cost`](super::Cost) extension, else 1.
fn request_cost(extensions: &http::Extensions) -> u64 {
    extensions
        .get::<super::Cost>()
        .map_or(1, |cost| u64::from(cost.get()))
}
