//! The distributed limiter: one GCRA in a Lua script, one round trip per request, so every
//! instance sharing the Redis namespace draws from one budget per key.
//!
//! Time is the Redis server's own clock (`TIME`), read inside the script, so instances with
//! skewed clocks agree; the application clocks (and [`Clock`](crate::clock::Clock)) play no part.
//! Reading `TIME` and then writing needs Redis 5 or later, which
//! [`RedisBackend::connect`] checks. Whatever the stored value, a request is decided: a
//! value that is not a number (or a key of another type) counts as a full budget, and one
//! further ahead than any request can push it (a server clock stepped back, a foreign
//! write) is clamped to a spent budget that refills normally. Every limiter key carries a
//! TTL, at most one full refill.

use std::time::Duration;

use uuid::Uuid;

use super::local::{emission_interval, status};
use super::{Decision, RateLimitPolicy};
use crate::redis::{RedisBackend, RedisBackendError};

/// GCRA over Redis's own clock (`TIME`).
/// KEYS[1] = the key's budget; ARGV = emission interval (µs), burst.
/// Returns {allowed, remaining, retry_after_us}. The stored value is the theoretical arrival
/// time (µs); it expires once the budget would be full again, so idle keys cost nothing.
/// `pcall`: a key of another type must not fail the script (SET replaces it).
const GCRA: &str = r"
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tolerance = emission * burst
local stored = redis.pcall('GET', KEYS[1])
local tat = nil
if type(stored) == 'string' then tat = tonumber(stored) end
local repair = false
if tat == nil or tat ~= tat then
  repair = stored ~= false
  tat = now
elseif tat > now + tolerance then
  repair = true
  tat = now + tolerance
end
if tat < now then tat = now end
local new_tat = tat + emission
local allow_at = new_tat - tolerance
if now < allow_at then
  if repair or redis.call('PTTL', KEYS[1]) == -1 then
    redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
  return {0, 0, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((now + tolerance - new_tat) / emission), 0}
";

/// Gives back one request the GCRA script took: the stored TAT moves back one emission
/// interval, keeping its TTL. KEYS[1] = the key's budget; ARGV[1] = emission interval (µs).
/// Nothing stored (or not a number): nothing to give back.
const REFUND: &str = r"
local stored = redis.pcall('GET', KEYS[1])
if type(stored) ~= 'string' then return 0 end
local tat = tonumber(stored)
if tat == nil or tat ~= tat then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then return 0 end
redis.call('SET', KEYS[1], string.format('%d', tat - tonumber(ARGV[1])), 'PX', ttl)
return 1
";

pub(crate) struct RedisLimiter {
    backend: RedisBackend,
    script: redis::Script,
    refund: redis::Script,
}

impl RedisLimiter {
    pub(crate) fn new(backend: RedisBackend) -> Self {
        Self {
            backend,
            script: redis::Script::new(GCRA),
            refund: redis::Script::new(REFUND),
        }
    }

    /// Takes one request from `key`'s shared budget under `policy`.
    pub(crate) async fn check(
        &self,
        key: Uuid,
        policy: &RateLimitPolicy,
    ) -> Result<Decision, RedisBackendError> {
        let emission = emission_interval(policy);
        let emission_us = u64::try_from(emission.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut connection = self.backend.connection();
        let mut invocation = self.script.key(self.backend.rate_key(key));
        invocation.arg(emission_us).arg(policy.burst());
        let (allowed, remaining, retry_us): (i64, i64, i64) = self
            .backend
            .run(invocation.invoke_async(&mut connection))
            .await?;
        let remaining = u32::try_from(remaining.max(0)).unwrap_or(u32::MAX);
        let status = status(policy, remaining, emission);
        Ok(if allowed == 1 {
            Decision::allowed(status)
        } else {
            let wait = Duration::from_micros(u64::try_from(retry_us.max(0)).unwrap_or(0));
            Decision::denied(status, wait)
        })
    }
}

impl RedisLimiter {
    /// Gives back one request [`check`](Self::check) took from `key`'s budget.
    pub(crate) async fn refund(
        &self,
        key: Uuid,
        policy: &RateLimitPolicy,
    ) -> Result<(), RedisBackendError> {
        let emission_us = u64::try_from(emission_interval(policy).as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut connection = self.backend.connection();
        let mut invocation = self.refund.key(self.backend.rate_key(key));
        invocation.arg(emission_us);
        let _: i64 = self
            .backend
            .run(invocation.invoke_async(&mut connection))
            .await?;
        Ok(())
    }
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("backend", &self.backend)
            .finish()
    }
}
