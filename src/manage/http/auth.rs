//! The caller of a management route: the [`Principal`] the layer inserted, judged by the
//! management policy ([`Caller::new`]).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;
use crate::manage::policy::Caller;
use crate::manage::KeyManager;
use crate::principal::Principal;

impl FromRequestParts<Arc<KeyManager>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        manager: &Arc<KeyManager>,
    ) -> Result<Self, Self::Rejection> {
        // No principal: the layer's own 401 `missing_credentials`.
        let principal = Principal::from_request_parts(parts, manager)
            .await
            .map_err(ApiError::Auth)?;
        let request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok());
        let address = manager.client_address(&parts.headers, &parts.extensions);
        let key_id = principal.key_id();
        let caller = match Caller::new(principal, manager) {
            Ok(caller) => caller.with_request(address, request_id),
            Err(refused) => {
                // Refused for its scopes: the request costs no credits.
                crate::layer::refund_credits(&parts.extensions);
                return Err(refused.into());
            }
        };
        if caller.is_admin() {
            return Ok(caller);
        }
        // A `keys:self` caller gives no key more credits than it has: its balance now, from
        // the store (the cached principal does not carry a balance).
        let own = match manager.get(key_id).await {
            Ok(record) => record.credits,
            // Deleted since the layer cached it: as if it had nothing left to give.
            Err(error) if error.kind() == crate::manage::ManageErrorKind::NotFound => {
                Some(crate::store::Credits::new(0))
            }
            Err(error) => return Err(ApiError::from(error)),
        };
        Ok(caller.with_own_credits(own))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryStore, SecretRing};

    async fn caller(principal: Option<Principal>) -> Result<Caller, (u16, String)> {
        let secrets =
            SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
        let manager = Arc::new(KeyManager::new(Arc::new(MemoryStore::new()), secrets));
        let (mut parts, ()) = axum::http::Request::new(()).into_parts();
        if let Some(principal) = principal {
            parts.extensions.insert(principal);
        }
        Caller::from_request_parts(&mut parts, &manager)
            .await
            .map_err(|error| error.status_and_code())
    }

    #[tokio::test]
    async fn no_principal_is_a_401_and_no_management_scope_a_403() {
        assert_eq!(
            caller(None).await.unwrap_err(),
            (401, "missing_credentials".to_owned())
        );
        for scopes in [
            &["read"][..],
            &["articles:*"],
            &[],
            &["keys:selfish"],
            &["*"],
        ] {
            assert_eq!(
                caller(Some(Principal::for_tests(scopes)))
                    .await
                    .unwrap_err(),
                (403, "insufficient_scope".to_owned()),
                "{scopes:?}"
            );
        }
        assert!(caller(Some(Principal::for_tests(&["keys:admin"])))
            .await
            .unwrap()
            .is_admin());
        assert!(!caller(Some(Principal::for_tests(&["keys:self"])))
            .await
            .unwrap()
            .is_admin());
    }
}
