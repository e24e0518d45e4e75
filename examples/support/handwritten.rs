//! The middleware a Rust user would write instead of keywarden (issue 19's baseline), in the
//! shape axum's docs recommend: an `axum::middleware::from_fn_with_state` function that
//! SHA-256s the `X-Api-Key` value, looks the digest up in a `HashMap<Vec<u8>, Arc<Owner>>` and
//! inserts the owner into the request extensions.
//!
//! One copy, included with `#[path]` by the load server (`examples/loadserver.rs`), the
//! cold-lines driver (`examples/cold_lines.rs`) and the criterion bench
//! (`benches/hit_path.rs`), so all three measure the same middleware.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

/// The hand-written middleware's idea of a caller.
#[derive(Debug, Clone)]
#[allow(dead_code)] // read by handlers in a real application, not by the benchmarks' handlers
pub struct Owner {
    pub id: Uuid,
    pub name: String,
    pub subject: String,
    pub scopes: Vec<String>,
}

/// The owners by the SHA-256 digest of their key.
pub type Owners = Arc<HashMap<Vec<u8>, Arc<Owner>>>;

/// The middleware: SHA-256 of the `X-Api-Key` value, a map lookup, the owner into the
/// extensions; 401 without the header or for an unknown key.
pub async fn handwritten_auth(
    State(owners): State<Owners>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(value) = req.headers().get("x-api-key") else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let digest = Sha256::digest(value.as_bytes());
    match owners.get(digest.as_slice()) {
        Some(owner) => {
            let owner = Arc::clone(owner);
            req.extensions_mut().insert(owner);
            next.run(req).await
        }
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

/// The map of `keys`' digests, the `i`th key owned by `user-{i}`.
pub fn owners<'a>(keys: impl IntoIterator<Item = &'a str>) -> Owners {
    let owners = keys
        .into_iter()
        .enumerate()
        .map(|(i, key)| {
            let owner = Owner {
                id: Uuid::now_v7(),
                name: format!("load-{i}"),
                subject: format!("user-{i}"),
                scopes: Vec::new(),
            };
            (Sha256::digest(key.as_bytes()).to_vec(), Arc::new(owner))
        })
        .collect();
    Arc::new(owners)
}
