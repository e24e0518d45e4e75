//! The demo service behind `keywarden serve` and the quickstart example (which includes this
//! file with `#[path]`, so there is one copy).
//!
//! `GET /healthz` is open; `GET /whoami` and the management API under `/admin` sit behind the
//! layer. With the `admin-ui` feature, the admin UI's page is `/admin/ui/` (open: the browser
//! loads it before it has a key to send). Keys of the collections `users`, `teams` and
//! `services` are accepted.

use std::sync::Arc;

use axum::http::header;
use axum::routing::get;
use axum::{Json, Router};
use keywarden::{
    management_router, ApiKeyLayer, ApiKeyLayerBuilder, Collection, KeyManager, Principal,
};

/// The collections the demo service accepts, in the order they are configured.
pub(crate) const DEMO_COLLECTIONS: [&str; 3] = ["users", "teams", "services"];

/// A layer builder with `collections` configured, in order (the demo's are
/// [`DEMO_COLLECTIONS`]). Add a store and secrets, then [`build`](ApiKeyLayerBuilder::build).
pub(crate) fn layer_builder_with(
    collections: impl IntoIterator<Item = Collection>,
) -> ApiKeyLayerBuilder {
    collections
        .into_iter()
        .fold(ApiKeyLayer::builder(), ApiKeyLayerBuilder::collection)
}

/// The demo service: `GET /healthz` (open, answers `ok`), `GET /whoami` (the caller's
/// [`Principal`] as JSON) and [`management_router`] nested under `/admin`, both behind `layer`.
///
/// Build `manager` with [`KeyManager::for_layer`] so management changes reach this layer's
/// cache at once.
pub(crate) fn demo_router(layer: ApiKeyLayer, manager: Arc<KeyManager>) -> Router {
    let app = Router::new()
        .route("/whoami", get(whoami))
        .nest("/admin", management_router(manager))
        .layer(layer)
        // Added after `layer`, so it is not authenticated: load balancers probe it keyless.
        .route("/healthz", get(healthz));
    // Also after `layer`: the page holds no data, and calls the API with the key pasted in it.
    #[cfg(feature = "admin-ui")]
    let app = app.nest("/admin", keywarden::manage::admin_ui());
    app
}

/// Where [`demo_router`] serves the admin UI, if it does.
pub(crate) const ADMIN_UI_PATH: Option<&str> = if cfg!(feature = "admin-ui") {
    Some("/admin/ui/")
} else {
    None
};

async fn healthz() -> ([(header::HeaderName, &'static str); 1], &'static str) {
    ([(header::CACHE_CONTROL, "no-store")], "ok")
}

async fn whoami(principal: Principal) -> Json<Principal> {
    Json(principal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::{Request, StatusCode};
    use keywarden::{MemoryStore, NewKey, SecretRing};
    use tower::ServiceExt;

    fn app() -> (Router, Arc<KeyManager>) {
        let secrets = SecretRing::from_strs("demo-test-secret-0123456789abcdefgh", None).unwrap();
        let layer = layer_builder_with(DEMO_COLLECTIONS.map(Collection::new))
            .store(Arc::new(MemoryStore::new()))
            .secrets(secrets)
            .build()
            .unwrap();
        let manager = Arc::new(KeyManager::for_layer(&layer));
        (demo_router(layer, manager.clone()), manager)
    }

    /// The page loads without a key; the API beside it still needs one.
    #[cfg(feature = "admin-ui")]
    #[tokio::test]
    async fn the_admin_ui_is_open_and_the_api_beside_it_is_not() {
        let (app, _) = app();
        let get = |uri: &'static str| {
            let app = app.clone();
            async move {
                app.oneshot(Request::get(uri).body(Body::empty()).unwrap())
                    .await
                    .unwrap()
                    .status()
            }
        };
        assert_eq!(get("/admin/ui/").await, StatusCode::OK);
        assert_eq!(get("/admin/ui/app.js").await, StatusCode::OK);
        assert_eq!(get("/admin/ui").await, StatusCode::PERMANENT_REDIRECT);
        for api in ["/admin/keys", "/admin/openapi.json"] {
            assert_eq!(get(api).await, StatusCode::UNAUTHORIZED, "{api}");
        }
        // Not normalised into the API: the UI's own 404, not the keys.
        assert_eq!(get("/admin/ui/../keys").await, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn healthz_is_open_and_whoami_is_not() {
        let (app, manager) = app();
        let response = app
            .clone()
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);

        let response = app
            .clone()
            .oneshot(Request::get("/whoami").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

        for collection in DEMO_COLLECTIONS {
            let created = manager
                .create(NewKey::new("k", "bob").collection(collection))
                .await
                .unwrap();
            let request = Request::get("/whoami")
                .header(
                    "authorization",
                    format!("{collection} API-Key {}", created.key.expose()),
                )
                .body(Body::empty())
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{collection}");
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["subject"], "bob");
            assert_eq!(json["collection"], collection);
        }
    }
}
