//! Feature `testing` (enable it in `[dev-dependencies]`). Helpers for testing your own code
//! against keywarden: a [`PrincipalBuilder`] for unit tests
//! of code that takes a [`Principal`](crate::Principal), and [`layer_with_keys`] for a layer
//! over a memory store with keys in one call.
//!
//! ```
//! use keywarden::testing::layer_with_keys;
//! use keywarden::NewKey;
//!
//! # tokio_test_block(async {
//! let (layer, keys) = layer_with_keys("customers", [NewKey::new("ci", "acme").scope("read")]).await;
//! let principal = layer.verify(keys[0].key.expose(), &http::Method::GET).await.unwrap();
//! assert_eq!(principal.subject(), "acme");
//! assert_eq!(principal.collection(), "customers");
//! # });
//! # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

use std::sync::Arc;

use crate::layer::{ApiKeyLayer, Collection};
use crate::manage::{CreatedKey, KeyManager, NewKey};
use crate::secret::{Secret, SecretRing};
use crate::store::MemoryStore;

pub use crate::principal::PrincipalBuilder;

/// A required layer serving `collection` over a new memory store and a random secret, and the
/// keys `keys` created in it (each filed under `collection`). For tests only: nothing is
/// persisted, and the secret is gone with the layer.
///
/// # Panics
/// If a key cannot be created (an invalid [`NewKey`]): a test's mistake, said at once.
pub async fn layer_with_keys(
    collection: &str,
    keys: impl IntoIterator<Item = NewKey>,
) -> (ApiKeyLayer, Vec<CreatedKey>) {
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(MemoryStore::new()))
        .secrets(SecretRing::new(Secret::generate()))
        .collection(Collection::new(collection))
        .build()
        .expect("a memory-store layer with one collection builds");
    let manager = KeyManager::for_layer(&layer);
    let mut created = Vec::new();
    for key in keys {
        let key = manager
            .create(key.collection(collection))
            .await
            .expect("the test key is valid");
        created.push(key);
    }
    (layer, created)
}
