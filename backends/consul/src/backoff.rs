//! Jittered exponential backoff, and the token bucket that paces blocking queries.

use std::time::Duration;

use tokio::time::Instant;

/// Exponential backoff with "equal jitter": each delay is half the current step plus a random
/// part of the other half, so that many clients that failed together do not retry together.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            step: min,
        }
    }

    /// The next delay; doubles the step up to the maximum.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    /// Back to the smallest step after a success.
    pub(crate) fn reset(&mut self) {
        self.step = self.min;
    }
}

/// A token bucket: `capacity` queries in a burst, then one per `refill`.
///
/// Rule 5 of watching Consul: a blocking query that returns without a real change (index churn
/// from unrelated writes, a broken index) must not turn into a busy loop, but a fixed sleep would
/// delay real updates. The bucket lets a few such returns through at once and then paces them.
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    capacity: u32,
    refill: Duration,
    tokens: u32,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(capacity: u32, refill: Duration, now: Instant) -> Self {
        let capacity = capacity.max(1);
        TokenBucket {
            capacity,
            refill,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    pub(crate) fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        if self.refill.is_zero() {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.last);
        let earned = elapsed.as_nanos() / self.refill.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(self.capacity);
            // Keep the remainder so that the rate stays exact.
            self.last += self.refill * earned.min(self.capacity);
            if self.tokens == self.capacity {
                self.last = now;
            }
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            Ok(())
        } else {
            Err((self.last + self.refill).saturating_duration_since(now))
        }
    }

    /// Waits for a token.
    pub(crate) async fn take(&mut self) {
        while let Err(wait) = self.try_take(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let steps = [100u64, 200, 400, 800, 800, 800];
        for step in steps {
            let d = b.next_delay();
            let step = Duration::from_millis(step);
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} not in [{:?}, {step:?}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn bucket_allows_a_burst_then_paces() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(3, Duration::from_secs(2), t0);
        for _ in 0..3 {
            assert!(bucket.try_take(t0).is_ok());
        }
        let wait = bucket.try_take(t0).unwrap_err();
        assert!(wait <= Duration::from_secs(2) && wait > Duration::ZERO);
        assert!(bucket.try_take(t0 + Duration::from_millis(1999)).is_err());
        assert!(bucket.try_take(t0 + Duration::from_secs(2)).is_ok());
        assert!(bucket.try_take(t0 + Duration::from_secs(2)).is_err());
        // A long pause refills the bucket up to its capacity, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(bucket.try_take(later).is_ok());
        }
        assert!(bucket.try_take(later).is_err());
    }
}
