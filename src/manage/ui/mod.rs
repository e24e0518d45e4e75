//! The admin web UI (feature `admin-ui`): a page for keys, served from files embedded at
//! compile time, that calls the [management API](crate::manage::management_router) from the
//! browser with a key the operator pastes.
//!
//! ```
//! use std::sync::Arc;
//! use axum::Router;
//! use keywarden::manage::admin_ui;
//! use keywarden::{management_router, ApiKeyLayer, Collection, KeyManager, MemoryStore, SecretRing};
//!
//! let secrets = SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
//! let layer = ApiKeyLayer::builder()
//!     .store(Arc::new(MemoryStore::new()))
//!     .secrets(secrets)
//!     .collection(Collection::new("users"))
//!     .build()
//!     .unwrap();
//! let manager = Arc::new(KeyManager::for_layer(&layer));
//! let app: Router = Router::new()
//!     .nest("/admin", management_router(manager))
//!     .layer(layer)
//!     // After the layer: a browser loads the page before it has a key to send. The page
//!     // is `/admin/ui/` and calls the API one level up, at `/admin/keys`.
//!     .nest("/admin", admin_ui());
//! # let _ = app;
//! ```
//!
//! The page is public and holds no data: everything it shows comes from the management API,
//! called with the pasted key as `Authorization: Bearer`, so the API's authorization is the
//! UI's. Nest [`admin_ui`] under the same path as the management router, outside the
//! [`ApiKeyLayer`](crate::ApiKeyLayer) (a layer in front of it would answer the browser's
//! first, keyless request with a 401).
//!
//! Every response carries a strict Content-Security-Policy (scripts, styles and connections
//! to this origin only, no inline script or style, no framing), `X-Frame-Options: DENY`,
//! `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`; assets are revalidated
//! on every load (`Cache-Control: no-cache` with an `ETag`), so an upgrade is never mixed
//! with a cached old module.

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, LOCATION,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

/// The policy of every UI response: this origin's scripts, styles and API only; SVG charts
/// are built in the DOM, so no inline anything is needed.
const POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self' data:; font-src 'self'; \
    frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The embedded files: name under `ui/`, media type, bytes.
const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("assets/index.html"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("assets/app.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/api.js"),
    ),
    (
        "dom.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/dom.js"),
    ),
    (
        "chart.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/chart.js"),
    ),
    (
        "keys.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/keys.js"),
    ),
    (
        "key.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/key.js"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("assets/favicon.svg"),
    ),
];

/// One embedded file, with the validator computed once when the router is built.
#[derive(Clone)]
struct Asset {
    content_type: &'static str,
    body: &'static str,
    etag: HeaderValue,
}

impl Asset {
    fn new(content_type: &'static str, body: &'static str) -> Self {
        let digest = Sha256::digest(body.as_bytes());
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header");
        Self {
            content_type,
            body,
            etag,
        }
    }

    fn respond(&self, request: &HeaderMap) -> Response {
        let fresh = request
            .get(IF_NONE_MATCH)
            .is_some_and(|tags| etag_matches(tags.as_bytes(), self.etag.as_bytes()));
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            (
                [(CONTENT_TYPE, HeaderValue::from_static(self.content_type))],
                self.body,
            )
                .into_response()
        };
        response.headers_mut().insert(ETAG, self.etag.clone());
        secure(response)
    }
}

/// Whether an `If-None-Match` list names `etag` (weak comparison, RFC 9110 §13.1.2).
fn etag_matches(list: &[u8], etag: &[u8]) -> bool {
    list.split(|b| *b == b',').any(|tag| {
        let tag = tag.trim_ascii();
        tag == b"*" || tag.strip_prefix(b"W/").unwrap_or(tag) == etag
    })
}

/// The headers every UI response carries.
fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The admin UI as an axum `Router` with the routes `/ui` (a redirect to `/ui/`), `/ui/`
/// (the page) and `/ui/{file}` (its scripts and styles). Nest it under the path the
/// [management router](crate::manage::management_router) is nested under, outside the
/// [`ApiKeyLayer`](crate::ApiKeyLayer): the page finds the API one level above itself.
///
/// The routes need no key and no state (a `Router<S>` for any app state `S`). The router has
/// no fallback of its own, so it merges with the app's routes under the same path.
pub fn admin_ui<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let assets: Vec<(&'static str, Asset)> = FILES
        .iter()
        .map(|(name, content_type, body)| (*name, Asset::new(content_type, body)))
        .collect();
    let index = assets
        .iter()
        .find(|(name, _)| *name == "index.html")
        .map(|(_, asset)| asset.clone())
        .expect("index.html is embedded");
    let mut router = Router::new()
        // Relative, so it works wherever the router is nested: `/x/ui` + `ui/` = `/x/ui/`.
        .route(
            "/ui",
            get(|| async {
                secure(
                    (
                        StatusCode::PERMANENT_REDIRECT,
                        [(LOCATION, HeaderValue::from_static("ui/"))],
                    )
                        .into_response(),
                )
            }),
        )
        .route(
            "/ui/",
            get(move |headers: HeaderMap| async move { index.respond(&headers) }),
        );
    for (name, asset) in assets {
        router = router.route(
            &format!("/ui/{name}"),
            get(move |headers: HeaderMap| async move { asset.respond(&headers) }),
        );
    }
    // Anything else under `/ui/` is a 404 with the same headers (not the app's fallback).
    router.route(
        "/ui/{*rest}",
        get(|| async { secure(StatusCode::NOT_FOUND.into_response()) }),
    )
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn get(path: &str, if_none_match: Option<&HeaderValue>) -> Response {
        let mut request = Request::get(path);
        if let Some(tag) = if_none_match {
            request = request.header(IF_NONE_MATCH, tag);
        }
        Router::<()>::new()
            .nest("/admin", admin_ui())
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    fn assert_secure(response: &Response, path: &str) {
        let headers = response.headers();
        let csp = headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {directive} in {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(headers[X_FRAME_OPTIONS], "DENY", "{path}");
        assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
        assert_eq!(headers[REFERRER_POLICY], "no-referrer", "{path}");
        assert_eq!(headers[CACHE_CONTROL], "no-cache", "{path}");
    }

    #[tokio::test]
    async fn every_file_is_served_with_its_type_and_the_security_headers() {
        for (name, content_type, body) in FILES {
            let path = format!("/admin/ui/{name}");
            let response = get(&path, None).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_secure(&response, &path);
            assert_eq!(response.headers()[CONTENT_TYPE], *content_type, "{path}");
            assert!(response.headers().contains_key(ETAG), "{path}");
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(bytes, body.as_bytes(), "{path}");
        }
        let page = get("/admin/ui/", None).await;
        assert_eq!(page.status(), StatusCode::OK);
        assert_secure(&page, "/admin/ui/");
        assert_eq!(page.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    }

    #[tokio::test]
    async fn the_bare_path_redirects_relative_to_where_it_is_nested() {
        let response = get("/admin/ui", None).await;
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(response.headers()[LOCATION], "ui/");
        assert_secure(&response, "/admin/ui");
    }

    #[tokio::test]
    async fn a_matching_etag_is_a_304_and_unknown_files_are_404() {
        let first = get("/admin/ui/app.js", None).await;
        let tag = first.headers()[ETAG].clone();
        let again = get("/admin/ui/app.js", Some(&tag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_secure(&again, "304");
        assert_eq!(again.headers()[ETAG], tag);
        let list =
            HeaderValue::from_str(&format!("\"other\", W/{}", tag.to_str().unwrap())).unwrap();
        assert_eq!(
            get("/admin/ui/app.js", Some(&list)).await.status(),
            StatusCode::NOT_MODIFIED
        );
        let stale = HeaderValue::from_static("\"0123\"");
        assert_eq!(
            get("/admin/ui/app.js", Some(&stale)).await.status(),
            StatusCode::OK
        );
        for missing in [
            "/admin/ui/nope.js",
            "/admin/ui/../Cargo.toml",
            "/admin/ui/keys/x",
        ] {
            let response = get(missing, None).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{missing}");
            if missing.starts_with("/admin/ui/") && !missing.contains("..") {
                assert_secure(&response, missing);
            }
        }
    }

    /// The page must never write API data as HTML: no `innerHTML`, `outerHTML`,
    /// `insertAdjacentHTML`, `document.write` or `eval` in any script, and no inline script
    /// or style in the page (the CSP would refuse it).
    #[test]
    fn the_assets_use_no_html_sinks_and_nothing_inline() {
        for (name, _, body) in FILES {
            for sink in [
                ".innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "localStorage.",
                "document.cookie",
            ] {
                assert!(!body.contains(sink), "{name} uses {sink}");
            }
        }
        let (_, _, index) = FILES.iter().find(|(n, _, _)| *n == "index.html").unwrap();
        assert!(!index.contains("<style"), "inline style element");
        assert!(!index.contains("style="), "inline style attribute");
        assert_eq!(
            index.matches("<script").count(),
            index.matches("<script type=\"module\" src=").count(),
            "every script is an external module"
        );
    }
}
