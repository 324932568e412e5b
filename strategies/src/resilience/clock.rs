//! The time base of the layer, replaceable so that tests can simulate time.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use waypost_core::clock_nanos;

/// Where the resilience layer reads the time: nanoseconds on the [`clock_nanos`] time base (the
/// one [`EndpointState`](waypost_core::EndpointState) uses for `created_at` and
/// `ejected_until`). The system clock unless replaced, e.g. by a [`ManualClock`] in tests.
///
/// ```
/// use waypost_strategies::resilience::Clock;
/// let clock = Clock::system();
/// let a = clock.now();
/// assert!(clock.now() >= a);
/// assert_eq!(Clock::from_fn(|| 42).now(), 42);
/// ```
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<dyn Fn() -> u64 + Send + Sync>>);

impl Clock {
    /// [`clock_nanos`]: the real, monotonic time.
    pub fn system() -> Self {
        Clock(None)
    }

    /// A clock that asks `now` (nanoseconds on the [`clock_nanos`] time base).
    pub fn from_fn(now: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Clock(Some(Arc::new(now)))
    }

    /// The time now.
    #[inline]
    pub fn now(&self) -> u64 {
        match &self.0 {
            None => clock_nanos(),
            Some(f) => f(),
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_none() {
            "Clock(system)"
        } else {
            "Clock(custom)"
        })
    }
}

/// A clock that moves only when told: for deterministic tests of ejection and slow start.
/// Starts at the current [`clock_nanos`], so that instance states created now (whose
/// `created_at` comes from the real clock) line up with it.
///
/// ```
/// use std::time::Duration;
/// use waypost_strategies::resilience::ManualClock;
/// let manual = ManualClock::new();
/// let clock = manual.clock();
/// let t0 = clock.now();
/// manual.advance(Duration::from_secs(30));
/// assert_eq!(clock.now() - t0, 30_000_000_000);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock standing at the current [`clock_nanos`].
    pub fn new() -> Self {
        Self::at(clock_nanos())
    }

    /// A clock standing at `nanos`.
    pub fn at(nanos: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(nanos)))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(by))
            });
    }

    /// The time the clock shows.
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// A [`Clock`] reading this one, for [`Resilient::clock`](super::Resilient::clock).
    pub fn clock(&self) -> Clock {
        let t = Arc::clone(&self.0);
        Clock::from_fn(move || t.load(Ordering::Relaxed))
    }
}
