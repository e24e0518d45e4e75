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

use time::{Duration, OffsetDateTime};

/// A source of the current time. Expiry is always judged against it at request time.
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current time, UTC.
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
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
