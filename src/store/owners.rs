//! Owner policies: a rate limit and/or credits that all the keys of one owner (a subject of a
//! collection) share, on top of each key's own.
//!
//! Limits per key give an owner with ten keys ten budgets. An owner policy is one budget for
//! all of them: every request by any of the owner's keys is counted against the key's own
//! limits first, then against its owner's, and is accepted only if both allow it (a request
//! its owner refuses gets its key's share back). The policy is stored per owner
//! ([`KeyStore::set_owner_policy`]); its credits are leased and spent like a key's
//! ([`KeyStore::lease_owner_credits`]), so they hold across instances the same way.
//!
//! A collection can also give every owner the same rate limit
//! ([`Collection::owner_rate_limit`](crate::Collection::owner_rate_limit)); an owner's stored
//! rate limit replaces that default for that owner.
//!
//! ```
//! use keywarden::store::OwnerPolicyUpdate;
//!
//! // 600 requests a minute and 10,000 credits a month, shared by all of the owner's keys.
//! let update = OwnerPolicyUpdate::default()
//!     .rate_limit(Some("600/min".parse().unwrap()))
//!     .credits(Some(10_000))
//!     .refill(Some("10000/month".parse().unwrap()));
//! assert!(update.changes_credits());
//! ```
//!
//! [`KeyStore::set_owner_policy`]: super::KeyStore::set_owner_policy
//! [`KeyStore::lease_owner_credits`]: super::KeyStore::lease_owner_credits

use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Credits, Refill};
use crate::ratelimit::RateLimitPolicy;

/// What all the keys of one owner share.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OwnerPolicy {
    /// The collection the owner's keys belong to.
    pub collection: String,
    /// The owner: the keys' subject.
    pub subject: String,
    /// The rate limit all the owner's keys share (`None`: the collection's
    /// [`owner_rate_limit`](crate::Collection::owner_rate_limit), if any).
    pub rate_limit: Option<RateLimitPolicy>,
    /// The credits all the owner's keys share (`None`: no shared budget). `remaining` does not
    /// count credits instances hold leased.
    pub credits: Option<Credits>,
    /// When the policy was last changed.
    pub updated_at: OffsetDateTime,
}

impl OwnerPolicy {
    /// The identifier of the owner's shared budget: the same in every process (rate-limit
    /// buckets in Redis and credit pools in the store are keyed by it).
    pub fn pool(&self) -> Uuid {
        owner_pool(&self.collection, &self.subject)
    }
}

/// The limits an owner's keys carry when they are read (the owner's policy at that moment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OwnerLimits {
    /// The owner's rate limit.
    pub rate_limit: Option<RateLimitPolicy>,
    /// Whether the owner has credits, and their refill (the balance is read when leased).
    pub credits: Option<Option<Refill>>,
    /// The generation of the owner's credits: it changes whenever they are set, voiding what
    /// instances hold leased of earlier ones (0 without credits).
    pub generation: u64,
}

impl OwnerLimits {
    /// Whether the owner's policy limits anything.
    pub fn is_empty(&self) -> bool {
        self.rate_limit.is_none() && self.credits.is_none()
    }
}

/// A change to an owner's policy: `None` fields stay as they are. Setting one on an owner
/// without a policy creates it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OwnerPolicyUpdate {
    /// Sets (`Some(Some(_))`) or removes (`Some(None)`) the shared rate limit.
    pub rate_limit: Option<Option<RateLimitPolicy>>,
    /// Sets the shared credit balance (`Some(n)`), or removes the shared credits (`None`,
    /// which drops their refill too). Voids every lease instances hold and restarts the
    /// refill schedule.
    pub credits: Option<Option<u64>>,
    /// Sets or clears the refill of the shared credits. An owner without credits gets the
    /// refill's amount as its balance. Voids leases like [`credits`](Self::credits).
    pub refill: Option<Option<Refill>>,
}

impl OwnerPolicyUpdate {
    /// Sets or removes the rate limit.
    #[must_use]
    pub fn rate_limit(mut self, rate_limit: Option<RateLimitPolicy>) -> Self {
        self.rate_limit = Some(rate_limit);
        self
    }

    /// Sets the balance, or removes the credits.
    #[must_use]
    pub fn credits(mut self, credits: Option<u64>) -> Self {
        self.credits = Some(credits);
        self
    }

    /// Sets or clears the refill.
    #[must_use]
    pub fn refill(mut self, refill: Option<Refill>) -> Self {
        self.refill = Some(refill);
        self
    }

    /// Whether the update touches the credits (a new generation: leases are void).
    pub fn changes_credits(&self) -> bool {
        self.credits.is_some() || self.refill.is_some()
    }

    /// The credits after the update, from `before`; what every backend applies.
    pub fn apply_credits(&self, before: Option<Credits>) -> Option<Credits> {
        let mut credits = before;
        if let Some(balance) = self.credits {
            let refill = credits.and_then(|c| c.refill);
            credits = balance.map(|remaining| Credits { remaining, refill });
        }
        if let Some(refill) = self.refill {
            match (&mut credits, refill) {
                (Some(credits), refill) => credits.refill = refill,
                (None, Some(refill)) => {
                    credits = Some(Credits {
                        remaining: refill.amount(),
                        refill: Some(refill),
                    });
                }
                (None, None) => {}
            }
        }
        credits
    }
}

/// The shared budget of `subject`'s keys in `collection`: a UUIDv8 from domain-separated
/// SHA-256 of the collection and the subject (slugs are visible ASCII, so the NUL separators
/// are unambiguous), the same in every process. keywarden key ids are v7; foreign ids may be
/// v8 too, but from another domain's hash.
pub(crate) fn owner_pool(collection: &str, subject: &str) -> Uuid {
    let digest = Sha256::new()
        .chain_update(b"keywarden owner budget\0")
        .chain_update(collection.as_bytes())
        .chain_update(b"\0")
        .chain_update(subject.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::new_v8(bytes)
}

/// The rate-limit bucket of an owner's stored rate limit: its pool and the policy, so a changed
/// policy starts from a full budget (raising a throttled customer's limit takes effect at once)
/// instead of inheriting what was spent under the old one. The same in every process.
pub(crate) fn owner_rate_bucket(pool: Uuid, policy: &RateLimitPolicy) -> Uuid {
    let digest = Sha256::new()
        .chain_update(b"keywarden owner rate budget\0")
        .chain_update(pool.as_bytes())
        .chain_update(policy.to_string().as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::new_v8(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pools_are_stable_distinct_and_never_key_ids() {
        let a = owner_pool("users", "alice");
        assert_eq!(a, owner_pool("users", "alice"));
        assert_eq!(a.get_version_num(), 8);
        for other in [
            owner_pool("users", "bob"),
            owner_pool("teams", "alice"),
            // The separator keeps (collection, subject) pairs apart.
            owner_pool("user", "salice"),
            owner_pool("usersalice", ""),
        ] {
            assert_ne!(a, other);
        }
        // Pinned: a change would split budgets between instances of two versions.
        assert_eq!(a.to_string(), "ebf04656-41ff-839e-8469-ef1393992827");
    }

    #[test]
    fn a_changed_rate_limit_gets_its_own_bucket() {
        let pool = owner_pool("users", "alice");
        let slow: RateLimitPolicy = "2/min".parse().unwrap();
        let fast: RateLimitPolicy = "1000/min".parse().unwrap();
        let bucket = owner_rate_bucket(pool, &slow);
        assert_eq!(bucket, owner_rate_bucket(pool, &slow));
        assert_ne!(bucket, owner_rate_bucket(pool, &fast));
        assert_ne!(bucket, pool, "never the collection budget's bucket");
        assert_ne!(bucket, owner_rate_bucket(owner_pool("users", "bob"), &slow));
    }

    #[test]
    fn updates_apply_credits_like_a_key_patch() {
        let refill: Refill = "10/day".parse().unwrap();
        let set = OwnerPolicyUpdate::default().credits(Some(5));
        assert_eq!(set.apply_credits(None), Some(Credits::new(5)));
        assert_eq!(
            set.apply_credits(Some(Credits::new(1).with_refill(refill))),
            Some(Credits::new(5).with_refill(refill)),
            "a new balance keeps the refill"
        );
        let refill_only = OwnerPolicyUpdate::default().refill(Some(refill));
        assert_eq!(
            refill_only.apply_credits(None),
            Some(Credits::new(10).with_refill(refill)),
            "a refill alone starts at its amount"
        );
        assert_eq!(
            refill_only.apply_credits(Some(Credits::new(3))),
            Some(Credits::new(3).with_refill(refill))
        );
        let remove = OwnerPolicyUpdate::default().credits(None);
        assert_eq!(
            remove.apply_credits(Some(Credits::new(3).with_refill(refill))),
            None
        );
        assert!(!OwnerPolicyUpdate::default()
            .rate_limit(None)
            .changes_credits());
    }
}
