//! Time, injectable so expiry can be tested without waiting.
//!
//! A clock gives two readings: the wall-clock time ([`Clock::now`]), which expiry dates are
//! judged against, and a monotonic reading ([`Clock::monotonic`]), which rate limits and
//! failed-attempt windows measure intervals with, so stepping the system clock (NTP, an
//! operator, a VM resume) neither blocks keys nor hands out fresh budgets.
//!
//! ```
//! use keywarden::{clock::Clock, clock::ManualClock};
//! use time::{Duration, OffsetDateTime};
//!
//! let clock = ManualClock::new(OffsetDateTime::UNIX_EPOCH);
//! clock.advance(Duration::days(30));
//! assert_eq!(clock.now(), OffsetDateTime::UNIX_EPOCH + Duration::days(30));
//! ```

use std::fmt::Debug;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

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

    /// A monotonic reading: never goes back, whatever happens to the wall clock. Rate limits
    /// and failed-attempt windows are measured with it. The default is
    /// [`Instant::now`]; a test clock overrides it to move time by hand.
    fn monotonic(&self) -> Instant {
        Instant::now()
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
            // i64 arithmetic, not `as_nanos`'s u128: this runs on every accepted request.
            Ok(since) => i64::try_from(since.as_secs())
                .ok()
                .and_then(|secs| secs.checked_mul(1_000_000_000))
                .and_then(|nanos| nanos.checked_add(i64::from(since.subsec_nanos())))
                .unwrap_or(i64::MAX),
            Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
        }
    }
}

/// A clock that moves only when told to; clones share one time.
///
/// Like a real system clock it has a wall-clock reading and a monotonic one:
/// [`advance`](Self::advance) by a positive duration moves both (time passes), while
/// [`set`](Self::set) and a negative `advance` move only the wall clock (the system clock is
/// stepped), so tests can check that stepping the clock does not disturb rate limits.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<ManualTime>>);

#[derive(Debug)]
struct ManualTime {
    wall: OffsetDateTime,
    /// The monotonic reading: where it started, and how far it has been advanced since.
    origin: Instant,
    elapsed: std::time::Duration,
}

impl ManualClock {
    /// A clock stopped at `now`.
    pub fn new(now: OffsetDateTime) -> Self {
        Self(Arc::new(Mutex::new(ManualTime {
            wall: now,
            origin: Instant::now(),
            elapsed: std::time::Duration::ZERO,
        })))
    }

    fn time(&self) -> std::sync::MutexGuard<'_, ManualTime> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets `by` pass: moves the wall clock and the monotonic reading forward. A negative
    /// duration steps the wall clock back and leaves the monotonic reading where it is.
    pub fn advance(&self, by: Duration) {
        let mut time = self.time();
        time.wall += by;
        if let Ok(forward) = std::time::Duration::try_from(by) {
            time.elapsed = time.elapsed.saturating_add(forward);
        }
    }

    /// Sets the wall clock (steps it, forward or back); the monotonic reading does not move.
    pub fn set(&self, to: OffsetDateTime) {
        self.time().wall = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        self.time().wall
    }

    fn monotonic(&self) -> Instant {
        let time = self.time();
        // Out of `Instant`'s range only after hundreds of billions of years of advancing.
        time.origin.checked_add(time.elapsed).unwrap_or(time.origin)
    }
}

/// Nanoseconds of the monotonic clock since keywarden first read it in this process: the
/// hit path's time in one word, so cache deadlines can live in atomics and one reading per
/// request serves them and the time of use.
pub(crate) type MonoNanos = u64;

static MONO_ORIGIN: OnceLock<Instant> = OnceLock::new();

/// The monotonic reading `at` as [`MonoNanos`] (0 for a reading from before the origin).
#[inline]
pub(crate) fn mono_nanos(at: Instant) -> MonoNanos {
    let since = at.saturating_duration_since(*MONO_ORIGIN.get_or_init(Instant::now));
    since
        .as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(since.subsec_nanos()))
}

/// The monotonic clock now, as [`MonoNanos`].
#[inline]
pub(crate) fn mono_now() -> MonoNanos {
    mono_nanos(Instant::now())
}

/// Wall-clock times (Unix nanoseconds) from monotonic readings, for the system clock: the hit
/// path reads the clock once, and that one reading serves the cache's deadlines and the time
/// of use. The offset between the two clocks is taken again by [`WallAnchor::reanchor`] (the
/// usage flusher does, before every flush), so a step of the wall clock reaches the recorded
/// times within one flush interval.
#[derive(Debug)]
pub(crate) struct WallAnchor {
    /// Unix nanoseconds at the monotonic origin, as of the latest anchoring.
    offset: AtomicI64,
}

impl WallAnchor {
    pub(crate) fn new() -> Self {
        let anchor = Self {
            offset: AtomicI64::new(0),
        };
        anchor.reanchor();
        anchor
    }

    /// Takes the offset between the wall clock and the monotonic clock again.
    pub(crate) fn reanchor(&self) {
        // The wall reading between two monotonic ones: against their midpoint, a preemption
        // between the reads skews the offset by half of it at most, either way.
        let before = mono_now();
        let wall = SystemClock.now_unix_nanos();
        let after = mono_now();
        let mono = signed(before + (after.saturating_sub(before)) / 2);
        self.offset
            .store(wall.saturating_sub(mono), Ordering::Relaxed);
    }

    /// The wall-clock time of the monotonic reading `at`.
    #[inline]
    pub(crate) fn unix_nanos(&self, at: MonoNanos) -> i64 {
        signed(at).saturating_add(self.offset.load(Ordering::Relaxed))
    }
}

fn signed(nanos: MonoNanos) -> i64 {
    i64::try_from(nanos).unwrap_or(i64::MAX)
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

    #[test]
    fn an_anchor_turns_monotonic_readings_into_wall_clock_times() {
        let anchor = WallAnchor::new();
        let before = SystemClock.now_unix_nanos();
        let at = mono_now();
        let after = SystemClock.now_unix_nanos();
        let wall = anchor.unix_nanos(at);
        // Within the two wall readings, give or take the anchoring's own two reads.
        let slack = 5_000_000;
        assert!(
            before - slack <= wall && wall <= after + slack,
            "{before} <= {wall} <= {after}"
        );
        assert_eq!(anchor.unix_nanos(at + 3_000_000_000) - wall, 3_000_000_000);
        // Readings are monotonic, and one from before the origin is the origin.
        assert!(mono_now() >= at);
        let origin = *MONO_ORIGIN.get().unwrap();
        if let Some(earlier) = origin.checked_sub(std::time::Duration::from_secs(1)) {
            assert_eq!(mono_nanos(earlier), 0);
        }
        // A saturated reading stays a time, not an overflow.
        assert_eq!(anchor.unix_nanos(u64::MAX), i64::MAX);
    }

    #[test]
    fn manual_monotonic_reading_moves_only_when_time_passes() {
        let start = OffsetDateTime::UNIX_EPOCH + Duration::days(1);
        let clock = ManualClock::new(start);
        let t0 = clock.monotonic();
        clock.advance(Duration::seconds(5));
        assert_eq!(clock.monotonic() - t0, std::time::Duration::from_secs(5));
        assert_eq!(clock.now(), start + Duration::seconds(5));
        clock.advance(Duration::hours(-1));
        clock.set(start - Duration::days(3));
        assert_eq!(clock.now(), start - Duration::days(3));
        assert_eq!(clock.monotonic() - t0, std::time::Duration::from_secs(5));
        let system = SystemClock;
        let a = system.monotonic();
        assert!(system.monotonic() >= a);
    }
}
