//! keywarden composed with another bearer-token authentication layer.
//!
//! keywarden runs in optional mode in front of a session-token layer (standing in for a JWT
//! layer). A `Bearer` token without a keywarden prefix is left alone for the session layer; a
//! keywarden key is verified by keywarden. Handlers accept either identity.
//!
//! Run: `cargo run --example compose_bearer`

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header::AUTHORIZATION, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use keywarden::{
    ApiKeyLayer, Collection, KeyManager, MemoryStore, Mode, NewKey, Principal, SecretRing,
};

/// A signed-in browser user, as the existing session layer knows them.
#[derive(Clone, Debug)]
pub struct Session {
    pub user: String,
}

/// The existing bearer layer: accepts `Bearer sess_...` tokens it issued.
async fn sessions(
    Extension(known): Extension<Arc<HashMap<String, Session>>>,
    mut req: Request,
    next: Next,
) -> Response {
    if req.extensions().get::<Principal>().is_some() {
        return next.run(req).await; // keywarden already authenticated this request
    }
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token.and_then(|t| known.get(t)) {
        Some(session) => {
            req.extensions_mut().insert(session.clone());
            next.run(req).await
        }
        None => (StatusCode::UNAUTHORIZED, "sign in or send an API key").into_response(),
    }
}

async fn hello(principal: Option<Principal>, session: Option<Extension<Session>>) -> String {
    match (principal, session) {
        (Some(p), _) => format!("hello {} (API key {})", p.subject(), p.key_name()),
        (None, Some(Extension(s))) => format!("hello {} (session)", s.user),
        (None, None) => unreachable!("the session layer rejects anonymous requests"),
    }
}

/// The composed application and a manager for its keys.
pub fn app(secret: &str) -> (Router, KeyManager) {
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(MemoryStore::new()))
        .secrets(SecretRing::from_strs(secret, None).expect("a 32-byte secret"))
        .collection(Collection::new("users"))
        .mode(Mode::Optional)
        .build()
        .expect("valid configuration");
    let manager = KeyManager::for_layer(&layer);
    let sessions_table: Arc<HashMap<String, Session>> = Arc::new(HashMap::from([(
        "sess_browser_token".to_owned(),
        Session {
            user: "bob".to_owned(),
        },
    )]));
    let router = Router::new()
        .route("/hello", get(hello))
        .layer(middleware::from_fn(sessions))
        .layer(Extension(sessions_table))
        // Outermost: keywarden runs first.
        .layer(layer);
    (router, manager)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    use tower::ServiceExt;
    let (router, manager) = app("example-secret-0123456789-abcdefghijklmn");
    let key = manager
        .create(NewKey::new("script", "alice"))
        .await
        .expect("created")
        .key;
    for (who, value) in [
        ("API-key client", format!("Bearer {}", key.expose())),
        ("session client", "Bearer sess_browser_token".to_owned()),
        ("stranger", "Bearer sess_unknown".to_owned()),
    ] {
        let request = Request::builder()
            .uri("/hello")
            .header(AUTHORIZATION, value)
            .body(axum::body::Body::empty())
            .expect("request");
        let response = router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .expect("body");
        println!("{who:15} → {status} {}", String::from_utf8_lossy(&body));
    }
}
