//! The request path's clock: a calibrated CPU counter, read in a few nanoseconds.
//!
//! Every pick reads the time once, to measure the call's latency, so the clock is most of what
//! the balancer adds to a strategy's pick. `std::time::Instant::now()` goes through the vDSO and
//! costs 16 to 47 ns on the VMs Waypost is measured on; reading the CPU's time-stamp counter
//! costs about 8 ns. [`quanta`] does the reading: it uses the counter only where it is invariant
//! (constant rate, never stopped, in step across cores), calibrates it against the OS monotonic
//! clock once per process (up to 200 ms, done when the first balancer is built, not on a
//! request), and otherwise reads the OS monotonic clock itself, as `Instant` does.
//!
//! Resolution: one counter tick scaled to nanoseconds (well under a nanosecond on current
//! x86-64 CPUs), or the OS clock's where the counter is not used. The crate's tests check that
//! an interval on it agrees with the same interval on `Instant` within 0.1 % and 1 µs.

use std::sync::OnceLock;
use std::time::Duration;

fn clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

/// The counter's value at the process-wide epoch of [`crate::clock_nanos`].
fn epoch() -> u64 {
    static EPOCH: OnceLock<u64> = OnceLock::new();
    *EPOCH.get_or_init(|| clock().raw())
}

/// Calibrates the clock now, so that no request pays for it.
pub(crate) fn warm_up() {
    epoch();
}

/// A point in time on the request path's clock: the raw counter, scaled only when a duration
/// is asked for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stamp(u64);

impl Stamp {
    pub(crate) fn now() -> Stamp {
        Stamp(clock().raw())
    }

    /// Time from `self` to `later` (zero if `later` is earlier).
    pub(crate) fn until(self, later: Stamp) -> Duration {
        Duration::from_nanos(clock().delta_as_nanos(self.0, later.0))
    }

    /// Nanoseconds since the epoch of [`crate::clock_nanos`].
    pub(crate) fn nanos(self) -> u64 {
        clock().delta_as_nanos(epoch(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The counter agrees with `Instant`: an interval measured on it lies between the same
    /// interval measured on `Instant` from inside and from outside, within the calibration's
    /// error (0.1 % here, far looser than quanta's bound, plus a microsecond of rounding).
    #[test]
    fn agrees_with_instant() {
        warm_up();
        for sleep_ms in [1, 5, 20] {
            let outer_start = Instant::now();
            let start = Stamp::now();
            let inner_start = Instant::now();
            std::thread::sleep(Duration::from_millis(sleep_ms));
            let inner = inner_start.elapsed();
            let measured = start.until(Stamp::now());
            let outer = outer_start.elapsed();
            let slack = |d: Duration| d / 1000 + Duration::from_micros(1);
            assert!(
                measured + slack(inner) >= inner && measured <= outer + slack(outer),
                "counter measured {measured:?}; Instant measured {inner:?} inside and {outer:?} outside"
            );
            assert!(measured >= Duration::from_millis(sleep_ms) - slack(measured));
        }
    }

    #[test]
    fn never_runs_backwards() {
        let mut last = Stamp::now();
        for _ in 0..100_000 {
            let next = Stamp::now();
            assert!(next.nanos() >= last.nanos());
            last = next;
        }
        assert_eq!(Stamp::now().until(last), Duration::ZERO);
    }
}
