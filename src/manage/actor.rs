//! The management API's callers as audit [`Actor`]s.

use crate::audit::Actor;
use crate::principal::Principal;

impl Actor {
    /// The caller behind a verified key.
    pub fn key(principal: &Principal) -> Self {
        Self::Key {
            id: principal.key_id(),
            subject: principal.subject().to_owned(),
        }
    }
}

impl From<&Principal> for Actor {
    fn from(principal: &Principal) -> Self {
        Self::key(principal)
    }
}
