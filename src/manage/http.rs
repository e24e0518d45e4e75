//! The management HTTP API (placeholder until implemented).

use std::sync::Arc;

use super::KeyManager;

/// The management API as an axum `Router` to nest under any path, behind an
/// [`ApiKeyLayer`](crate::ApiKeyLayer).
pub fn management_router(manager: Arc<KeyManager>) -> axum::Router {
    let _ = manager;
    axum::Router::new()
}
