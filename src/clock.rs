//! Time, injectable so expiry can be tested without waiting.
//!
//! ```
//! use keywarden::{Clock, ManualClock};
//! use time::{Duration, OffsetDateTime};
//!
//! let clock = ManualClock::new(OffsetDateTime::UNIX_EPOCH);
//! clock.advance(Duration::days(30));
//! assert_eq!(clock.now(), OffsetDateTime::UNIX_EPOCH + Duration::days(30));
//! ```

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use time::{Duration, OffsetDateTime};

/// A source of the current time. Expiry is always judged against it at request time.
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current time, UTC.
    fn now(&self) -> OffsetDateTime;

    /// The current time as nanoseconds since the Unix epoch (saturating outside 1677–2262),
    /// as usage tracking records it on every accepted request. The default derives it from
    /// [`Clock::now`]; a clock that can read it more cheaply may override it, and must agree
    /// with `now`.
    fn now_unix_nanos(&self) -> i64 {
        unix_nanos(self.now())
    }
}

/// Nanoseconds since the Unix epoch of `at`, saturating.
pub(crate) fn unix_nanos(at: OffsetDateTime) -> i64 {
    let nanos = at.unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(if nanos < 0 { i64::MIN } else { i64::MAX })
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    /// Skips the calendar conversion `now` does.
    fn now_unix_nanos(&self) -> i64 {
        match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            Ok(since) => i64::try_from(since.as_nanos()).unwrap_or(i64::MAX),
            Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
        }
    }
}

/// A clock that moves only when told to; clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<OffsetDateTime>>);

impl ManualClock {
    /// A clock stopped at `now`.
    pub fn new(now: OffsetDateTime) -> Self {
        Self(Arc::new(Mutex::new(now)))
    }

    /// Moves the clock forward (or back, with a negative duration).
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Sets the clock.
    pub fn set(&self, to: OffsetDateTime) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_nanos_agree_with_now() {
        let manual =
            ManualClock::new(OffsetDateTime::UNIX_EPOCH + Duration::nanoseconds(1_234_567_891));
        assert_eq!(manual.now_unix_nanos(), 1_234_567_891);
        let system = SystemClock;
        let before = unix_nanos(system.now());
        let nanos = system.now_unix_nanos();
        let after = unix_nanos(system.now());
        assert!(before <= nanos && nanos <= after);
    }
}
