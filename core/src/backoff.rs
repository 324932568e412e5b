//! Jittered exponential backoff for loops that retry forever (watches, keep-alives).

use std::time::Duration;

/// Exponential backoff with jitter: each delay is drawn from the upper half of a step that
/// doubles from `min` up to `max`, so that clients that lost the same server do not come back in
/// lockstep. Backends share it so that every retry loop behaves the same.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::Backoff;
/// let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// let first = b.next_delay();
/// assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
/// for _ in 0..10 {
///     assert!(b.next_delay() <= Duration::from_secs(1));
/// }
/// b.reset(); // after a success
/// assert!(b.next_delay() <= Duration::from_millis(100));
/// ```
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Steps from `min` (at least 1 ms) doubling up to `max` (at least `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            step: min,
        }
    }

    /// The delay before the next attempt: between half and all of the current step; then the
    /// step doubles, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = self.step.saturating_mul(2).min(self.max);
        step.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    /// Back to the smallest step, after a success.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(800));
        let steps: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, step) in steps.iter().zip([100, 200, 400, 800, 800, 800]) {
            assert!(
                *d >= ms(step / 2) && *d <= ms(step),
                "{d:?} for step {step}"
            );
        }
        // Jitter: not every delay at a capped step is the same.
        let capped: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(capped.iter().any(|d| *d != capped[0]));
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }
}
