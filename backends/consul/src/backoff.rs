//! The token bucket that paces blocking queries.

use std::time::Duration;

use tokio::time::Instant;

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
