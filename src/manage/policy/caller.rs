//! What a management caller may do: the rules of `keys:admin` and `keys:self`, independent
//! of the front end that asks (the HTTP API maps [`CallerError`] to its problem+json).

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use super::expiry::parse_lifetime;
use super::request::{
    parse_credits, parse_networks, parse_rate_limit, parse_refill, parse_time, CreateRequest,
};
use super::validate::{check_free_text, check_scopes};
use crate::audit::{Actor, ChangeContext};
use crate::manage::{ExpiresIn, KeyManager, ManageError, NewKey};
use crate::net::IpNetwork;
use crate::principal::Principal;
use crate::ratelimit::RateLimitPolicy;
use crate::store::{Credits, KeyPatch, KeyQuery, KeyRecord, Refill};

/// Manages every key.
pub(crate) const ADMIN_SCOPE: &str = "keys:admin";
/// Manages the caller's own keys.
pub(crate) const SELF_SCOPE: &str = "keys:self";

/// Why a caller may not do what it asked.
#[derive(Debug)]
pub(crate) enum CallerError {
    /// The key holds neither management scope by name, or another system issued it.
    NotManager,
    /// A `keys:self` caller asked for more than it may; the detail says what, and never
    /// repeats submitted text.
    Forbidden(String),
    /// The request is invalid, or names a key the caller may not see (not found).
    Manage(ManageError),
}

impl From<ManageError> for CallerError {
    fn from(error: ManageError) -> Self {
        Self::Manage(error)
    }
}

/// An authenticated caller and how far its management rights reach.
#[derive(Debug)]
pub(crate) struct Caller {
    principal: Principal,
    /// Who the caller's changes are recorded as made by.
    context: ChangeContext,
    admin: bool,
    /// The rate limits of keys without their own, one per layer where keys are verified
    /// (never empty; `None`: unlimited there).
    default_rate_limits: Vec<Option<RateLimitPolicy>>,
    /// The caller's own credits as stored when the request began (`None`: unlimited); read
    /// for `keys:self` callers only.
    own_credits: Option<Credits>,
}

impl Caller {
    /// The caller behind `principal`, if its key may manage keys through `manager`.
    ///
    /// Management scopes are granted only by name (`*`, `keys:*` never grant them), and
    /// never to a key another system issued, whatever scopes that system gave it:
    /// [`Principal::has_scope`] already refuses a foreign principal; the manager's own view of
    /// its layers' foreign collections is checked too.
    pub(crate) fn new(principal: Principal, manager: &KeyManager) -> Result<Self, CallerError> {
        let foreign =
            principal.is_foreign() || manager.is_foreign_collection(principal.collection());
        let admin = !foreign && principal.has_scope(ADMIN_SCOPE);
        if !admin && (foreign || !principal.has_scope(SELF_SCOPE)) {
            return Err(CallerError::NotManager);
        }
        Ok(Self {
            context: ChangeContext::new(Actor::key(&principal)),
            principal,
            admin,
            default_rate_limits: manager.default_rate_limits(),
            own_credits: None,
        })
    }

    /// The caller's own credits, as its key's record holds them now: a `keys:self` caller
    /// never gives a key more.
    pub(crate) fn with_own_credits(mut self, credits: Option<Credits>) -> Self {
        self.own_credits = credits;
        self
    }

    /// Records the caller's client address and request id with its changes.
    pub(crate) fn with_request(
        mut self,
        address: Option<std::net::IpAddr>,
        id: Option<&str>,
    ) -> Self {
        self.context = self.context.client_address(address).request_id(id);
        self
    }

    /// The manager to make the caller's changes with: recorded as the caller's.
    pub(crate) fn manager(&self, manager: &KeyManager) -> KeyManager {
        manager.acting_as(self.context.clone())
    }

    /// Narrows an audit query to what the caller may read: everything for an admin, else
    /// the events about its owner's keys.
    pub(crate) fn restrict_audit(
        &self,
        mut query: crate::audit::AuditQuery,
    ) -> Option<crate::audit::AuditQuery> {
        if self.admin {
            return Some(query);
        }
        // Only kinds, or the caller's own key: naming another actor would tell whether it
        // changed the owner's keys, which the redacted events do not show.
        if let Some(actor) = &query.actor {
            let own = format!("key:{}", self.principal.key_id());
            if actor.contains(':') && *actor != own {
                return None;
            }
        }
        let own = |wanted: &Option<String>, mine: &str| wanted.as_deref().is_none_or(|w| w == mine);
        if !own(&query.collection, self.principal.collection())
            || !own(&query.subject, self.principal.subject())
        {
            return None;
        }
        query.collection = Some(self.principal.collection().to_owned());
        query.subject = Some(self.principal.subject().to_owned());
        Some(query)
    }

    /// The caller's own key id.
    pub(crate) fn key_id(&self) -> Uuid {
        self.principal.key_id()
    }

    /// Whether the caller holds `keys:admin`: then no other rule limits it.
    pub(crate) fn is_admin(&self) -> bool {
        self.admin
    }

    /// Whether the caller's key belongs to this owner.
    pub(crate) fn is_owner(&self, collection: &str, subject: &str) -> bool {
        self.principal.collection() == collection && self.principal.subject() == subject
    }

    /// Whether the caller may manage `record`: every key for an admin, else the keys of its
    /// own collection and subject.
    fn owns(&self, record: &KeyRecord) -> bool {
        self.admin
            || (record.subject == self.principal.subject()
                && record.collection == self.principal.collection())
    }

    /// The key, if the caller may manage it; someone else's key is as unknown as a missing
    /// one, so ids do not reveal which keys exist.
    pub(crate) async fn load(
        &self,
        manager: &KeyManager,
        id: Uuid,
    ) -> Result<KeyRecord, CallerError> {
        let record = manager.get(id).await?;
        if self.owns(&record) {
            Ok(record)
        } else {
            Err(ManageError::not_found(id).into())
        }
    }

    /// A `keys:self` caller grants only scopes it holds, by the rules of
    /// [`Principal::has_scope`]: holding `*` does not let it grant `keys:admin`.
    fn may_grant(&self, scopes: &[String]) -> Result<(), CallerError> {
        if self.admin {
            return Ok(());
        }
        // Malformed scopes are a 422, not a privilege question.
        check_scopes(&mut scopes.to_vec())?;
        // By position: the scope itself is submitted text, maybe a key pasted by mistake.
        match scopes.iter().position(|s| !self.principal.has_scope(s)) {
            Some(index) => Err(forbidden(format!(
                "a `keys:self` key cannot grant scopes[{index}], a scope it does not hold"
            ))),
            None => Ok(()),
        }
    }

    /// A `keys:self` caller names its own collection, subject, owner kind and environment
    /// or none.
    fn may_own(&self, body: &CreateRequest) -> Result<(), CallerError> {
        if self.admin {
            return Ok(());
        }
        let p = &self.principal;
        let differs = |given: Option<&str>, own: &str| given.is_some_and(|g| g != own);
        let mismatch = if differs(body.subject.as_deref(), p.subject()) {
            Some("subject")
        } else if differs(body.collection.as_deref(), p.collection()) {
            Some("collection")
        } else if body.owner_kind.is_some_and(|k| k != p.owner_kind()) {
            Some("owner_kind")
        } else if differs(body.environment.as_deref(), p.environment()) {
            Some("environment")
        } else {
            None
        };
        match mismatch {
            Some(field) => Err(forbidden(format!(
                "a `keys:self` key can only create keys for its own {field}; that needs `{ADMIN_SCOPE}`"
            ))),
            None => Ok(()),
        }
    }

    /// The latest expiry the caller may give a key: its own, unless it is an admin.
    pub(crate) fn max_expiry(&self) -> Option<OffsetDateTime> {
        if self.admin {
            None
        } else {
            self.principal.expires_at()
        }
    }

    /// Whether a key with limit `policy` is held at least as tightly as one with limit
    /// `limit`, wherever keys are verified: each compared as it applies there (its own, else
    /// that layer's default; `None` there: unlimited). With several layers, one comparison
    /// per layer default, so neither the tightest nor the loosest default hides an escape.
    fn effectively_within(
        &self,
        policy: Option<RateLimitPolicy>,
        limit: Option<RateLimitPolicy>,
    ) -> bool {
        self.default_rate_limits
            .iter()
            .all(|default| within(policy.or(*default), limit.or(*default)))
    }

    /// A new key's lifetime: what was asked (`None`: nothing), within the caller's expiry.
    fn bound_expiry(
        &self,
        asked: Option<ExpiresIn>,
        now: OffsetDateTime,
    ) -> Result<ExpiresIn, CallerError> {
        let Some(limit) = self.max_expiry() else {
            return Ok(asked.unwrap_or_default());
        };
        let Some(asked) = asked else {
            return Ok(ExpiresIn::At(limit));
        };
        match asked.expires_at(now) {
            // Absolute, so the stored expiry is exactly the one checked here.
            Some(at) if at <= limit => Ok(ExpiresIn::At(at)),
            _ => Err(forbidden(format!(
                "a `keys:self` key cannot create a key that outlives it: give an expiry no later than {}",
                limit.format(&Rfc3339).unwrap_or_default()
            ))),
        }
    }

    /// A new key's rate limit: what was asked, within the caller's effective limit. Nothing
    /// asked inherits the caller's own policy (none: the default, like the caller).
    fn bound_rate_limit(
        &self,
        asked: Option<RateLimitPolicy>,
    ) -> Result<Option<RateLimitPolicy>, CallerError> {
        if self.admin {
            return Ok(asked);
        }
        let own = self.principal.rate_limit();
        match asked {
            // Inheriting the caller's own policy is as tight as the caller on every layer.
            None => Ok(own),
            Some(asked) if self.effectively_within(Some(asked), own) => Ok(Some(asked)),
            Some(_) => Err(forbidden(match own {
                Some(own) => format!(
                    "a `keys:self` key cannot create a key with a rate limit looser than its own ({own})"
                ),
                None => "a `keys:self` key cannot create a key with a rate limit looser than its own (the layer's default)".to_owned(),
            })),
        }
    }

    /// A new key's allowlist: what was asked, within the caller's own. Nothing asked
    /// inherits the caller's own list (empty: anywhere, like the caller).
    fn bound_allowed_ips(
        &self,
        asked: Option<Vec<IpNetwork>>,
    ) -> Result<Vec<IpNetwork>, CallerError> {
        if self.admin {
            return Ok(asked.unwrap_or_default());
        }
        let own = self.principal.allowed_ips();
        match asked {
            None => Ok(own.to_vec()),
            Some(asked) if ips_within(&asked, own) => Ok(asked),
            Some(_) => Err(forbidden(
                "a `keys:self` key cannot create a key usable from addresses it may not use itself: \
                 give allowed_ips within its own"
                    .to_owned(),
            )),
        }
    }

    /// A new key's credits: what was asked. A `keys:self` caller with credits gives a new key
    /// credits only out of its own balance (the handler moves them: [`Caller::credits_to_move`]),
    /// never a refill (each key would be refilled: a budget multiplied), and never none
    /// (unlimited).
    fn bound_credits(
        &self,
        asked: Option<u64>,
        refill: Option<Refill>,
    ) -> Result<Option<Credits>, CallerError> {
        let wanted = match (asked, refill) {
            (None, None) => None,
            (Some(remaining), refill) => Some(Credits { remaining, refill }),
            (None, Some(refill)) => Some(Credits::new(refill.amount()).with_refill(refill)),
        };
        let own = match self.own_credits {
            Some(own) if !self.admin => own,
            _ => return Ok(wanted),
        };
        let Some(wanted) = wanted else {
            return Err(forbidden(
                "a `keys:self` key with credits cannot create a key with unlimited credits: ask for `credits`, which are moved from its own balance"
                    .to_owned(),
            ));
        };
        if wanted.refill.is_some() {
            return Err(forbidden(
                "a `keys:self` key with credits cannot give a key a refill: ask for `credits`, which are moved from its own balance"
                    .to_owned(),
            ));
        }
        if wanted.remaining > own.remaining {
            return Err(forbidden(format!(
                "a `keys:self` key cannot give a key more credits than it has itself ({})",
                own.remaining
            )));
        }
        Ok(Some(wanted))
    }

    /// The credits a new key gets out of the caller's own balance: a `keys:self` caller with
    /// credits gives, it does not copy.
    pub(crate) fn credits_to_move(&self, new: &NewKey) -> Option<u64> {
        if self.admin || self.own_credits.is_none() {
            return None;
        }
        new.credits.map(|c| c.remaining).filter(|n| *n > 0)
    }

    /// A `keys:self` caller rotates only keys no more powerful than itself: the new key's
    /// plaintext is the caller's to use.
    pub(crate) fn may_rotate(&self, key: &KeyRecord) -> Result<(), CallerError> {
        if self.admin {
            return Ok(());
        }
        match self.more_powerful(key) {
            Some(reason) => Err(forbidden(format!(
                "a `keys:self` key cannot rotate this key: {reason}; that needs `{ADMIN_SCOPE}`"
            ))),
            None => Ok(()),
        }
    }

    /// Why `key` is more powerful than the caller (`None`: it is not): disabled, a scope the
    /// caller lacks, another environment, a later expiry or a looser effective rate limit.
    fn more_powerful(&self, key: &KeyRecord) -> Option<&'static str> {
        let p = &self.principal;
        if key.disabled {
            Some("it is disabled")
        } else if !key.scopes.iter().all(|s| p.has_scope(s)) {
            Some("it has a scope the caller does not hold")
        } else if key.environment != p.environment() {
            Some("it belongs to another environment")
        } else if !ends_by(key.expires_at, p.expires_at()) {
            Some("it expires later than the caller")
        } else if !self.effectively_within(key.rate_limit, p.rate_limit()) {
            Some("its rate limit is looser than the caller's")
        } else if !ips_within(&key.allowed_ips, p.allowed_ips()) {
            Some("it may be used from addresses the caller may not use")
        } else if !credits_within(key.credits, self.own_credits) {
            Some("it has more credits than the caller, or a more generous refill")
        } else {
            None
        }
    }

    /// A `keys:self` caller only tightens a key, relative to its current values and never
    /// past the caller's own expiry. Values equal to the current ones are then dropped from
    /// the patch, so a harmless `"disabled": false` cannot undo an admin's concurrent disable.
    pub(crate) fn may_patch(
        &self,
        key: &KeyRecord,
        patch: &mut KeyPatch,
    ) -> Result<(), CallerError> {
        if self.admin {
            return Ok(());
        }
        if let Some(scopes) = &patch.scopes {
            self.may_grant(scopes)?;
            // Granting a scope the key lacks hands the caller's powers to that key: only to a
            // key no more powerful than the caller, as judged after the patch (the checks of
            // a rotation). Narrowing or keeping scopes needs no such check.
            if scopes.iter().any(|s| !key.scopes.contains(s)) {
                let mut after = key.clone();
                patch.apply_to(&mut after, key.updated_at);
                if let Some(why) = self.more_powerful(&after) {
                    return Err(forbidden(format!(
                        "a `keys:self` key can add scopes only to a key no more powerful than itself, and {why}; that needs `{ADMIN_SCOPE}`"
                    )));
                }
            }
        }
        let loosened = if patch.disabled == Some(false) && key.disabled {
            Some("re-enable a disabled key")
        } else if patch.read_only == Some(false) && key.read_only {
            Some("make a read-only key writable")
        } else if patch.expires_at.is_some_and(|at| {
            !ends_by(at, key.expires_at) || !ends_by(at, self.principal.expires_at())
        }) {
            Some("remove or extend an expiry, or set one later than its own")
        } else if patch.rate_limit.is_some_and(|limit| {
            // Effective limits: `null` puts the key under the default (unlimited without
            // one), which loosens a key whose own limit is tighter.
            !self.effectively_within(limit, key.rate_limit)
        }) {
            Some("remove or loosen a rate limit")
        } else if patch.allowed_ips.as_ref().is_some_and(|ips| {
            !ips_within(ips, &key.allowed_ips) || !ips_within(ips, self.principal.allowed_ips())
        }) {
            Some("widen an IP allowlist, or allow addresses it may not use itself")
        } else if !self.credits_patch_tightens(key, patch) {
            Some("raise a key's credits or make them unlimited, loosen its refill, or give more than it has itself")
        } else {
            None
        };
        if let Some(what) = loosened {
            return Err(forbidden(format!(
                "a `keys:self` key can only tighten keys and cannot {what}; that needs `{ADMIN_SCOPE}`"
            )));
        }
        if patch.disabled == Some(key.disabled) {
            patch.disabled = None;
        }
        if patch.read_only == Some(key.read_only) {
            patch.read_only = None;
        }
        if patch.expires_at == Some(key.expires_at) {
            patch.expires_at = None;
        }
        if patch.rate_limit == Some(key.rate_limit) {
            patch.rate_limit = None;
        }
        if patch.allowed_ips.as_ref() == Some(&key.allowed_ips) {
            patch.allowed_ips = None;
        }
        Ok(())
    }

    /// Whether a `keys:self` caller's patch of `key`'s credits only tightens them, and stays
    /// within the caller's own.
    fn credits_patch_tightens(&self, key: &KeyRecord, patch: &KeyPatch) -> bool {
        if !patch.changes_credits() {
            return true;
        }
        let mut after = key.clone();
        patch.apply_to(&mut after, key.updated_at);
        let lowered = match (after.credits, key.credits) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(_), None) => true,
            (Some(new), Some(old)) => {
                new.remaining <= old.remaining && refill_within(new.refill, old.refill)
            }
        };
        lowered && credits_within(after.credits, self.own_credits)
    }

    /// The key to create.
    pub(crate) fn new_key(
        &self,
        body: CreateRequest,
        now: OffsetDateTime,
    ) -> Result<NewKey, CallerError> {
        self.may_own(&body)?;
        if let Some(scopes) = &body.scopes {
            self.may_grant(scopes)?;
        }
        check_free_text(body.description.as_deref(), body.metadata.as_ref())?;
        let p = &self.principal;
        let name = body
            .name
            .ok_or_else(|| ManageError::invalid("name", "name is required"))?;
        let asked = match (body.expires_in, body.expires_at) {
            (Some(_), Some(_)) => {
                return Err(ManageError::invalid(
                    "expires_at",
                    "give expires_in or expires_at, not both",
                )
                .into())
            }
            (Some(text), None) => match parse_lifetime(&text) {
                Some(expires_in) => Some(expires_in),
                None => {
                    return Err(ManageError::invalid(
                        "expires_in",
                        "expected a lifetime such as 7d, 30d, 90d, 24h or `unlimited`",
                    )
                    .into())
                }
            },
            (None, Some(text)) => {
                let at = parse_time("expires_at", &text)?;
                if at <= now {
                    return Err(ManageError::invalid(
                        "expires_at",
                        "expires_at must be in the future",
                    )
                    .into());
                }
                Some(ExpiresIn::At(at))
            }
            (None, None) => None,
        };
        let rate_limit = body
            .rate_limit
            .as_deref()
            .map(parse_rate_limit)
            .transpose()?;
        let mut new = NewKey::new(name, body.subject.unwrap_or_else(|| p.subject().to_owned()))
            .collection(body.collection.unwrap_or_else(|| p.collection().to_owned()))
            .owner_kind(body.owner_kind.unwrap_or_else(|| p.owner_kind()))
            .environment(
                body.environment
                    .unwrap_or_else(|| p.environment().to_owned()),
            )
            .read_only(body.read_only.unwrap_or(false))
            .expires_in(self.bound_expiry(asked, now)?);
        new.description = body.description;
        new.scopes = body.scopes.unwrap_or_default();
        if let Some(metadata) = body.metadata {
            new.metadata = metadata;
        }
        new.rate_limit = self.bound_rate_limit(rate_limit)?;
        let allowed_ips = body
            .allowed_ips
            .as_deref()
            .map(parse_networks)
            .transpose()?;
        new.allowed_ips = self.bound_allowed_ips(allowed_ips)?;
        let credits = body.credits.as_ref().map(parse_credits).transpose()?;
        let refill = body.refill.as_deref().map(parse_refill).transpose()?;
        new.credits = self.bound_credits(credits, refill)?;
        Ok(new)
    }

    /// Limits a `keys:self` listing to the caller's keys; `None` when the filters the caller
    /// gave can only match other owners' keys.
    pub(crate) fn restrict(&self, mut query: KeyQuery) -> Option<KeyQuery> {
        if self.admin {
            return Some(query);
        }
        let p = &self.principal;
        if query.subject.as_deref().is_some_and(|s| s != p.subject())
            || query
                .collection
                .as_deref()
                .is_some_and(|c| c != p.collection())
        {
            return None;
        }
        query.subject = Some(p.subject().to_owned());
        query.collection = Some(p.collection().to_owned());
        Some(query)
    }
}

fn forbidden(detail: String) -> CallerError {
    CallerError::Forbidden(detail)
}

/// Whether an expiry (`None`: never) comes no later than `limit` (`None`: never).
fn ends_by(expires_at: Option<OffsetDateTime>, limit: Option<OffsetDateTime>) -> bool {
    match (expires_at, limit) {
        (_, None) => true,
        (Some(at), Some(limit)) => at <= limit,
        (None, Some(_)) => false,
    }
}

/// Whether an allowlist (empty: anywhere) admits no address that `limit` (empty: anywhere)
/// does not: each of its networks inside one of `limit`'s.
/// Whether `refill` gives no more than `limit` (no refill gives nothing; a limit of none
/// allows none).
fn refill_within(refill: Option<Refill>, limit: Option<Refill>) -> bool {
    match (refill, limit) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(refill), Some(limit)) => refill.is_within(&limit),
    }
}

/// Whether credits `credits` are no more than `limit` (`None`: unlimited).
fn credits_within(credits: Option<Credits>, limit: Option<Credits>) -> bool {
    match (credits, limit) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(credits), Some(limit)) => {
            credits.remaining <= limit.remaining && refill_within(credits.refill, limit.refill)
        }
    }
}

fn ips_within(networks: &[IpNetwork], limit: &[IpNetwork]) -> bool {
    limit.is_empty()
        || (!networks.is_empty()
            && networks
                .iter()
                .all(|network| limit.iter().any(|outer| outer.contains_network(network))))
}

/// Whether a rate limit (`None`: unlimited) is no looser than `limit` (`None`: unlimited).
fn within(policy: Option<RateLimitPolicy>, limit: Option<RateLimitPolicy>) -> bool {
    match (policy, limit) {
        (_, None) => true,
        (Some(policy), Some(limit)) => policy.is_within(&limit),
        (None, Some(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use time::macros::datetime;

    use super::*;
    use crate::manage::ManageErrorKind;
    use crate::store::test_support::record;
    use crate::store::OwnerKind;
    use crate::{MemoryStore, SecretRing};

    fn test_manager() -> KeyManager {
        let secrets =
            SecretRing::from_strs("a-secret-of-at-least-thirty-two-bytes!", None).unwrap();
        KeyManager::new(Arc::new(MemoryStore::new()), secrets)
    }

    /// The caller a key of this record becomes.
    fn caller(key: &KeyRecord) -> Caller {
        match Caller::new(
            Principal::from_record(key, false, &crate::principal::TEST_PROFILES),
            &test_manager(),
        ) {
            Ok(caller) => caller,
            Err(err) => panic!("not a caller: {err:?}"),
        }
    }

    fn key(scopes: &[&str]) -> KeyRecord {
        let mut key = record(1);
        key.collection = "users".into();
        key.subject = "alice".into();
        key.environment = "live".into();
        key.scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        key
    }

    fn self_caller_key() -> KeyRecord {
        let mut key = key(&["keys:self", "read", "articles:*"]);
        key.expires_at = Some(datetime!(2040-01-01 00:00 UTC));
        key
    }

    const ALLOWED: &str = "allowed";
    const FORBIDDEN: &str = "forbidden";
    const INVALID: &str = "invalid";

    /// What the policy answered.
    fn answer(result: Result<(), CallerError>) -> &'static str {
        match result {
            Ok(()) => ALLOWED,
            Err(CallerError::NotManager) => "not a manager",
            Err(CallerError::Forbidden(_)) => FORBIDDEN,
            Err(CallerError::Manage(err)) => match err.kind() {
                ManageErrorKind::Invalid => INVALID,
                ManageErrorKind::NotFound => "not found",
                _ => "other",
            },
        }
    }

    #[test]
    fn a_caller_needs_a_management_scope_by_name() {
        for scopes in [
            &["read"][..],
            &["articles:*"],
            &[],
            &["keys:selfish"],
            &["*"],
            &["keys:*"],
        ] {
            let result = Caller::new(Principal::for_tests(scopes), &test_manager());
            assert!(matches!(result, Err(CallerError::NotManager)), "{scopes:?}");
        }
        assert!(caller(&key(&["keys:admin"])).is_admin());
        assert!(!caller(&key(&["keys:self"])).is_admin());
        assert!(caller(&key(&["read", "keys:admin"])).is_admin());
        assert!(caller(&key(&["keys:self", "keys:admin"])).is_admin());
    }

    /// A key another system issued never manages keys, whatever scopes it was given.
    #[test]
    fn a_foreign_principal_is_never_a_manager() {
        for scopes in [
            &["keys:admin"][..],
            &["keys:self"],
            &["keys:admin", "keys:self"],
        ] {
            let foreign =
                Principal::from_record(&key(scopes), true, &crate::principal::TEST_PROFILES);
            let result = Caller::new(foreign, &test_manager());
            assert!(matches!(result, Err(CallerError::NotManager)), "{scopes:?}");
        }
    }

    #[test]
    fn a_self_caller_owns_the_keys_of_its_subject_in_its_collection() {
        let me = caller(&key(&["keys:self"]));
        let admin = caller(&key(&["keys:admin"]));
        let mut mine = record(2);
        (mine.collection, mine.subject) = ("users".into(), "alice".into());
        let mut other_subject = mine.clone();
        other_subject.subject = "bob".into();
        let mut other_collection = mine.clone();
        other_collection.collection = "teams".into();
        let mut prefix_only = mine.clone();
        prefix_only.subject = "alice2".into();
        assert!(me.owns(&mine));
        for theirs in [&other_subject, &other_collection, &prefix_only] {
            assert!(!me.owns(theirs), "{}/{}", theirs.collection, theirs.subject);
            assert!(admin.owns(theirs));
        }
    }

    #[test]
    fn a_self_caller_grants_only_scopes_it_holds() {
        let me = caller(&self_caller_key());
        let scopes = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        for held in [
            &[][..],
            &["read"],
            &["keys:self"],
            &["articles:read", "articles:write"],
            &["read", "keys:self"],
        ] {
            assert_eq!(answer(me.may_grant(&scopes(held))), ALLOWED, "{held:?}");
        }
        for not_held in [&["write"][..], &["read", "write"], &["keys:admin"], &["*"]] {
            assert_eq!(
                answer(me.may_grant(&scopes(not_held))),
                FORBIDDEN,
                "{not_held:?}"
            );
        }
        // The refused scope is named by position, never echoed.
        let Err(CallerError::Forbidden(detail)) = me.may_grant(&scopes(&["read", "secret-ish"]))
        else {
            panic!("granted a scope the caller does not hold");
        };
        assert!(detail.contains("scopes[1]"), "{detail}");
        assert!(!detail.contains("secret-ish"));
        // Malformed scopes are a validation error, not a privilege question.
        assert_eq!(answer(me.may_grant(&scopes(&[""]))), INVALID);

        let admin = caller(&key(&["keys:admin"]));
        assert_eq!(
            answer(admin.may_grant(&scopes(&["write", "keys:admin", "*"]))),
            ALLOWED
        );
    }

    #[test]
    fn a_self_caller_creates_keys_only_for_itself() {
        let me = caller(&self_caller_key());
        let admin = caller(&key(&["keys:admin"]));
        let body = |f: fn(&mut CreateRequest)| {
            let mut body = CreateRequest::default();
            f(&mut body);
            body
        };
        let own = [
            body(|_| {}),
            body(|b| b.subject = Some("alice".into())),
            body(|b| b.collection = Some("users".into())),
            body(|b| b.owner_kind = Some(OwnerKind::User)),
            body(|b| b.environment = Some("live".into())),
        ];
        for body in &own {
            assert_eq!(answer(me.may_own(body)), ALLOWED, "{body:?}");
        }
        let foreign = [
            (body(|b| b.subject = Some("bob".into())), "subject"),
            (body(|b| b.collection = Some("teams".into())), "collection"),
            (body(|b| b.owner_kind = Some(OwnerKind::Team)), "owner_kind"),
            (body(|b| b.environment = Some("test".into())), "environment"),
        ];
        for (body, field) in &foreign {
            let Err(CallerError::Forbidden(detail)) = me.may_own(body) else {
                panic!("created a key for another {field}");
            };
            assert!(detail.contains(field), "{detail}");
            assert_eq!(answer(admin.may_own(body)), ALLOWED);
        }
    }

    #[test]
    fn a_self_caller_rotates_only_keys_no_more_powerful_than_itself() {
        let me = caller(&self_caller_key());
        let admin = caller(&key(&["keys:admin"]));
        let mut weaker = key(&["read", "articles:read"]);
        weaker.expires_at = Some(datetime!(2039-01-01 00:00 UTC));
        assert_eq!(answer(me.may_rotate(&weaker)), ALLOWED);
        let mut same_expiry = weaker.clone();
        same_expiry.expires_at = Some(datetime!(2040-01-01 00:00 UTC));
        assert_eq!(answer(me.may_rotate(&same_expiry)), ALLOWED);

        let mut disabled = weaker.clone();
        disabled.disabled = true;
        let mut broader = weaker.clone();
        broader.scopes.push("write".into());
        let mut elsewhere = weaker.clone();
        elsewhere.environment = "test".into();
        let mut later = weaker.clone();
        later.expires_at = Some(datetime!(2040-01-01 00:00:01 UTC));
        let mut never = weaker.clone();
        never.expires_at = None;
        for stronger in [&disabled, &broader, &elsewhere, &later, &never] {
            assert_eq!(answer(me.may_rotate(stronger)), FORBIDDEN, "{stronger:?}");
            assert_eq!(answer(admin.may_rotate(stronger)), ALLOWED);
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn an_allowlist_is_within_another_only_when_every_network_is_inside_it() {
        let office = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(ips_within(&nets(&["10.1.0.0/16"]), &office));
        assert!(ips_within(
            &nets(&["10.1.0.0/16", "2001:db8:1::/48"]),
            &office
        ));
        assert!(ips_within(&office, &office));
        assert!(ips_within(&[], &[]), "anywhere is within anywhere");
        assert!(ips_within(&office, &[]), "anything is within anywhere");
        assert!(!ips_within(&[], &office), "anywhere is wider than a list");
        assert!(!ips_within(&nets(&["10.1.0.0/16", "192.0.2.1"]), &office));
        assert!(!ips_within(&nets(&["0.0.0.0/0"]), &office));
        assert!(!ips_within(&nets(&["::/0"]), &nets(&["0.0.0.0/0"])));
        assert!(
            ips_within(&nets(&["::ffff:10.0.0.0/104"]), &office),
            "mapped is IPv4"
        );
    }

    #[test]
    fn a_self_caller_never_widens_an_allowlist() {
        let mut own = self_caller_key();
        own.allowed_ips = nets(&["10.0.0.0/8"]);
        let me = caller(&own);
        let admin = caller(&key(&["keys:admin"]));
        let mut current = key(&["read"]);
        current.expires_at = own.expires_at;
        current.allowed_ips = nets(&["10.1.0.0/16"]);
        let with = |list: &[&str]| KeyPatch {
            allowed_ips: Some(nets(list)),
            ..KeyPatch::default()
        };
        let mut narrower = with(&["10.1.2.0/24"]);
        assert_eq!(answer(me.may_patch(&current, &mut narrower)), ALLOWED);
        assert_eq!(narrower.allowed_ips, Some(nets(&["10.1.2.0/24"])));
        let mut same = with(&["10.1.0.0/16"]);
        assert_eq!(answer(me.may_patch(&current, &mut same)), ALLOWED);
        assert_eq!(
            same.allowed_ips, None,
            "an unchanged list is dropped from the patch"
        );
        for wider in [
            &[][..],
            &["10.0.0.0/8"],
            &["10.1.0.0/16", "10.2.0.0/16"],
            &["192.0.2.0/24"],
        ] {
            let mut patch = with(wider);
            assert_eq!(
                answer(me.may_patch(&current, &mut patch)),
                FORBIDDEN,
                "{wider:?}"
            );
            assert_eq!(answer(admin.may_patch(&current, &mut with(wider))), ALLOWED);
        }
        // A key of its own without a list may be given one within the caller's, not outside.
        let mut open = current.clone();
        open.allowed_ips.clear();
        assert_eq!(
            answer(me.may_patch(&open, &mut with(&["10.9.0.0/16"]))),
            ALLOWED
        );
        assert_eq!(
            answer(me.may_patch(&open, &mut with(&["11.0.0.0/8"]))),
            FORBIDDEN
        );
        // Rotation: a key usable from more places than the caller is more powerful.
        assert_eq!(answer(me.may_rotate(&current)), ALLOWED);
        assert_eq!(answer(me.may_rotate(&open)), FORBIDDEN);
        assert_eq!(
            me.bound_allowed_ips(None).unwrap(),
            nets(&["10.0.0.0/8"]),
            "a new key inherits the caller's list"
        );
        assert!(me.bound_allowed_ips(Some(Vec::new())).is_err());
        assert!(admin.bound_allowed_ips(None).unwrap().is_empty());
    }

    #[test]
    fn a_self_caller_only_tightens_keys() {
        let me = caller(&self_caller_key());
        let admin = caller(&key(&["keys:admin"]));
        let mut current = key(&["read"]);
        current.expires_at = Some(datetime!(2035-01-01 00:00 UTC));
        current.rate_limit = Some("10/min".parse().unwrap());
        let mut disabled = current.clone();
        disabled.disabled = true;
        let mut read_only = current.clone();
        read_only.read_only = true;
        let patch = |f: fn(&mut KeyPatch)| {
            let mut patch = KeyPatch::default();
            f(&mut patch);
            patch
        };

        let tighter = [
            patch(|p| p.expires_at = Some(Some(datetime!(2034-01-01 00:00 UTC)))),
            patch(|p| p.disabled = Some(true)),
            patch(|p| p.read_only = Some(true)),
            patch(|p| p.rate_limit = Some(Some("5/min".parse().unwrap()))),
            patch(|p| p.scopes = Some(vec!["read".into(), "articles:read".into()])),
            patch(|p| p.name = Some("renamed".into())),
        ];
        for mut tighter in tighter {
            let before = tighter.clone();
            assert_eq!(
                answer(me.may_patch(&current, &mut tighter)),
                ALLOWED,
                "{before:?}"
            );
            assert_eq!(tighter, before, "a real change is kept");
        }

        let looser = [
            (
                &current,
                patch(|p| p.expires_at = Some(Some(datetime!(2035-01-01 00:00:01 UTC)))),
            ),
            (&current, patch(|p| p.expires_at = Some(None))),
            (
                &current,
                patch(|p| p.rate_limit = Some(Some("11/min".parse().unwrap()))),
            ),
            (&current, patch(|p| p.rate_limit = Some(None))),
            (&current, patch(|p| p.scopes = Some(vec!["write".into()]))),
            (&disabled, patch(|p| p.disabled = Some(false))),
            (&read_only, patch(|p| p.read_only = Some(false))),
        ];
        for (key, mut looser) in looser {
            let before = looser.clone();
            assert_eq!(
                answer(me.may_patch(key, &mut looser)),
                FORBIDDEN,
                "{before:?}"
            );
            assert_eq!(answer(admin.may_patch(key, &mut before.clone())), ALLOWED);
        }

        // Never past the caller's own expiry, even on a key that has none.
        let mut unlimited = current.clone();
        unlimited.expires_at = None;
        let mut past_caller = patch(|p| p.expires_at = Some(Some(datetime!(2041-01-01 00:00 UTC))));
        assert_eq!(
            answer(me.may_patch(&unlimited, &mut past_caller)),
            FORBIDDEN
        );
        let mut within_caller =
            patch(|p| p.expires_at = Some(Some(datetime!(2039-01-01 00:00 UTC))));
        assert_eq!(
            answer(me.may_patch(&unlimited, &mut within_caller)),
            ALLOWED
        );

        // Values equal to the current ones are dropped, so they cannot undo a concurrent change.
        let mut same = KeyPatch {
            disabled: Some(false),
            read_only: Some(false),
            expires_at: Some(current.expires_at),
            rate_limit: Some(current.rate_limit),
            name: Some("kept".into()),
            ..KeyPatch::default()
        };
        assert_eq!(answer(me.may_patch(&current, &mut same)), ALLOWED);
        assert_eq!(
            same,
            KeyPatch {
                name: Some("kept".into()),
                ..KeyPatch::default()
            }
        );
    }

    /// A `keys:self` caller's new key gets at most the caller's own rate limit.
    #[test]
    fn a_self_caller_creates_keys_within_its_own_rate_limit() {
        let mut own = self_caller_key();
        own.rate_limit = Some("10/min".parse().unwrap());
        let me = caller(&own);
        let now = datetime!(2030-01-01 00:00 UTC);
        let body = |rate_limit: Option<&str>| CreateRequest {
            name: Some("k".into()),
            rate_limit: rate_limit.map(str::to_owned),
            ..CreateRequest::default()
        };
        for looser in ["11/min", "1/s", "10/min,burst=20"] {
            let result = me.new_key(body(Some(looser)), now).map(|_| ());
            assert_eq!(answer(result), FORBIDDEN, "{looser}");
        }
        let tighter = me.new_key(body(Some("5/min")), now).unwrap();
        assert_eq!(tighter.rate_limit, Some("5/min".parse().unwrap()));
        let inherited = me.new_key(body(None), now).unwrap();
        assert_eq!(inherited.rate_limit, own.rate_limit);

        let admin = caller(&key(&["keys:admin"]));
        let any = admin.new_key(body(Some("1000/s")), now).unwrap();
        assert_eq!(any.rate_limit, Some("1000/s".parse().unwrap()));
    }

    /// A new key never outlives a `keys:self` caller: asked later, it is refused; asked for
    /// nothing, it inherits the caller's expiry; an admin's is unbounded.
    #[test]
    fn a_self_caller_cannot_create_a_key_that_outlives_it() {
        let me = caller(&self_caller_key());
        let now = datetime!(2030-01-01 00:00 UTC);
        let body = |expires_in: Option<&str>, expires_at: Option<&str>| CreateRequest {
            name: Some("k".into()),
            expires_in: expires_in.map(str::to_owned),
            expires_at: expires_at.map(str::to_owned),
            ..CreateRequest::default()
        };
        for (expires_in, expires_at) in [
            (Some("unlimited"), None),
            (Some("5000d"), None),
            (None, Some("2040-01-01T00:00:01Z")),
        ] {
            let result = me.new_key(body(expires_in, expires_at), now).map(|_| ());
            assert_eq!(answer(result), FORBIDDEN, "{expires_in:?} {expires_at:?}");
        }
        let inherited = me.new_key(body(None, None), now).unwrap();
        assert_eq!(
            inherited.expires_in,
            ExpiresIn::At(datetime!(2040-01-01 00:00 UTC))
        );
        let sooner = me.new_key(body(Some("30d"), None), now).unwrap();
        assert_eq!(
            sooner.expires_in,
            ExpiresIn::At(now + time::Duration::days(30)),
            "made absolute, so what is stored is what was checked"
        );

        let admin = caller(&key(&["keys:admin"]));
        let forever = admin.new_key(body(Some("unlimited"), None), now).unwrap();
        assert_eq!(forever.expires_in, ExpiresIn::Unlimited);
        // Malformed text is a validation error, whoever asks.
        let result = admin.new_key(body(Some("soon"), None), now).map(|_| ());
        assert_eq!(answer(result), INVALID);
    }

    /// A `keys:self` caller's new key is its own: defaults from the caller, not `users`.
    #[test]
    fn a_new_key_defaults_to_the_callers_owner_and_environment() {
        let mut own = self_caller_key();
        own.collection = "teams".into();
        own.owner_kind = OwnerKind::Team;
        own.environment = "test".into();
        let me = caller(&own);
        let request = CreateRequest {
            name: Some("k".into()),
            ..CreateRequest::default()
        };
        let new = me
            .new_key(request, datetime!(2030-01-01 00:00 UTC))
            .unwrap();
        assert_eq!(
            (
                new.collection.as_deref(),
                new.subject.as_str(),
                new.owner_kind,
                new.environment.as_str()
            ),
            (Some("teams"), "alice", OwnerKind::Team, "test")
        );
        let result = me
            .new_key(CreateRequest::default(), datetime!(2030-01-01 00:00 UTC))
            .map(|_| ());
        assert_eq!(answer(result), INVALID, "a name is required");
    }

    /// Adding a scope is handing over power: only to a key no more powerful than the caller.
    #[test]
    fn a_self_caller_adds_scopes_only_to_keys_no_more_powerful_than_itself() {
        let me = caller(&self_caller_key());
        let mut weaker = key(&["read"]);
        weaker.expires_at = Some(datetime!(2039-01-01 00:00 UTC));
        let add = || KeyPatch {
            scopes: Some(vec!["read".into(), "articles:read".into()]),
            ..KeyPatch::default()
        };
        assert_eq!(answer(me.may_patch(&weaker, &mut add())), ALLOWED);
        let mut unlimited = weaker.clone();
        unlimited.expires_at = None;
        let mut looser = weaker.clone();
        looser.rate_limit = None;
        let mut limited = self_caller_key();
        limited.rate_limit = Some("10/min".parse().unwrap());
        let limited_me = caller(&limited);
        looser.rate_limit = Some("100/min".parse().unwrap());
        assert_eq!(answer(me.may_patch(&unlimited, &mut add())), FORBIDDEN);
        assert_eq!(answer(limited_me.may_patch(&looser, &mut add())), FORBIDDEN);
        // Narrowing needs no such check.
        let mut narrow = KeyPatch {
            scopes: Some(Vec::new()),
            ..KeyPatch::default()
        };
        assert_eq!(answer(me.may_patch(&unlimited, &mut narrow)), ALLOWED);
        // Keeping the scopes a key has adds nothing: no such check either...
        let mut keep = KeyPatch {
            scopes: Some(vec!["read".into()]),
            ..KeyPatch::default()
        };
        assert_eq!(answer(me.may_patch(&unlimited, &mut keep)), ALLOWED);
        // ...while a new scope is checked even when the patch keeps none of the old ones.
        let mut replace = KeyPatch {
            scopes: Some(vec!["articles:read".into()]),
            ..KeyPatch::default()
        };
        assert_eq!(answer(me.may_patch(&unlimited, &mut replace)), FORBIDDEN);
        assert_eq!(answer(me.may_patch(&weaker, &mut replace)), ALLOWED);
    }

    #[test]
    fn a_self_callers_listing_is_limited_to_its_own_keys() {
        let me = caller(&key(&["keys:self"]));
        let admin = caller(&key(&["keys:admin"]));
        let query = |collection: Option<&str>, subject: Option<&str>| {
            let mut query = KeyQuery::new();
            query.collection = collection.map(str::to_owned);
            query.subject = subject.map(str::to_owned);
            query
        };
        for (collection, subject) in [
            (None, None),
            (Some("users"), None),
            (None, Some("alice")),
            (Some("users"), Some("alice")),
        ] {
            let restricted = me.restrict(query(collection, subject)).unwrap();
            assert_eq!(
                (
                    restricted.collection.as_deref(),
                    restricted.subject.as_deref()
                ),
                (Some("users"), Some("alice")),
                "{collection:?} {subject:?}"
            );
        }
        for (collection, subject) in [
            (Some("teams"), None),
            (None, Some("bob")),
            (Some("users"), Some("alice2")),
        ] {
            assert!(me.restrict(query(collection, subject)).is_none());
            let unchanged = admin.restrict(query(collection, subject)).unwrap();
            assert_eq!(
                (
                    unchanged.collection.as_deref(),
                    unchanged.subject.as_deref()
                ),
                (collection, subject)
            );
        }
        let all = admin.restrict(query(None, None)).unwrap();
        assert_eq!((all.collection, all.subject), (None, None));
    }

    /// Someone else's key is as unknown to a `keys:self` caller as a missing one.
    #[tokio::test]
    async fn a_self_caller_loads_only_its_own_keys() {
        let manager = test_manager();
        let mine = manager.create(NewKey::new("mine", "alice")).await.unwrap();
        let theirs = manager.create(NewKey::new("theirs", "bob")).await.unwrap();
        let me = Caller::new(
            Principal::from_record(
                &key(&["keys:self"]),
                false,
                &crate::principal::TEST_PROFILES,
            ),
            &manager,
        )
        .unwrap();
        assert_eq!(
            me.load(&manager, mine.record.id).await.unwrap(),
            mine.record
        );
        let hidden = me.load(&manager, theirs.record.id).await.map(|_| ());
        assert_eq!(answer(hidden), "not found");
        let missing = me.load(&manager, Uuid::now_v7()).await.map(|_| ());
        assert_eq!(answer(missing), "not found");
        let admin = Caller::new(
            Principal::from_record(
                &key(&["keys:admin"]),
                false,
                &crate::principal::TEST_PROFILES,
            ),
            &manager,
        )
        .unwrap();
        assert!(admin.load(&manager, theirs.record.id).await.is_ok());
    }

    #[test]
    fn a_self_caller_with_credits_gives_only_out_of_its_own() {
        let limited = |remaining| {
            caller(&self_caller_key()).with_own_credits(Some(
                Credits::new(remaining).with_refill("100/day".parse().unwrap()),
            ))
        };
        let me = limited(40);
        let refill = || Some("10/day".parse::<Refill>().unwrap());
        assert!(me.bound_credits(None, None).is_err(), "unlimited");
        assert!(me.bound_credits(Some(1), refill()).is_err(), "a refill");
        assert!(me.bound_credits(None, refill()).is_err(), "a refill alone");
        assert!(
            me.bound_credits(Some(41), None).is_err(),
            "more than it has"
        );
        assert_eq!(
            me.bound_credits(Some(40), None).unwrap(),
            Some(Credits::new(40))
        );
        let new = NewKey::new("k", "alice").credits(40);
        assert_eq!(me.credits_to_move(&new), Some(40), "moved, not copied");
        assert_eq!(
            me.credits_to_move(&NewKey::new("k", "alice").credits(0)),
            None
        );

        // Unlimited callers and admins give anything, and move nothing.
        let free = caller(&self_caller_key());
        assert_eq!(free.bound_credits(None, None).unwrap(), None);
        assert!(free.bound_credits(Some(u64::MAX >> 12), refill()).is_ok());
        assert_eq!(free.credits_to_move(&new), None);
        let admin = caller(&key(&["keys:admin"])).with_own_credits(Some(Credits::new(1)));
        assert_eq!(admin.credits_to_move(&new), None);
        assert!(admin.bound_credits(Some(1_000), refill()).is_ok());
    }

    #[test]
    fn a_self_caller_only_lowers_credits() {
        let me = caller(&self_caller_key()).with_own_credits(Some(
            Credits::new(50).with_refill("100/day".parse().unwrap()),
        ));
        let mut current = key(&["read"]);
        current.credits = Some(Credits::new(10).with_refill("10/day".parse().unwrap()));
        let patch = |credits: Option<Option<u64>>, refill: Option<Option<&str>>| KeyPatch {
            credits,
            credit_refill: refill.map(|r| r.map(|r| r.parse().unwrap())),
            ..KeyPatch::default()
        };
        for (p, want) in [
            (patch(Some(Some(9)), None), true),
            (patch(Some(Some(10)), None), true),
            (patch(Some(Some(11)), None), false),
            (patch(Some(None), None), false),
            (patch(None, Some(None)), true),
            (patch(None, Some(Some("5/day"))), true),
            (patch(None, Some(Some("11/day"))), false),
            (patch(None, Some(Some("10/h"))), false),
            (patch(None, None), true),
        ] {
            assert_eq!(me.credits_patch_tightens(&current, &p), want, "{p:?}");
        }
        // An unlimited key may be given credits within the caller's own.
        let mut unlimited = key(&["read"]);
        unlimited.credits = None;
        assert!(me.credits_patch_tightens(&unlimited, &patch(Some(Some(50)), None)));
        assert!(!me.credits_patch_tightens(&unlimited, &patch(Some(Some(51)), None)));
    }
}
