//! Hedging: when to send an idempotent request a second time, to another instance, while the
//! first attempt is still out. One policy serves the HTTP client and the tower service.

use std::sync::Mutex;
use std::time::Duration;

/// Why a hedge with one attempt in all is refused (the HTTP client's and the gRPC channel's).
pub(crate) const HEDGE_WITH_ONE_ATTEMPT: &str =
    "hedge is set, and max_attempts is 1: a hedge is a second attempt of the call, so it could \
     never be sent; give max_attempts 2 or more, or no hedge";

/// When a call sends a *hedge*: another attempt of the same idempotent request to a different
/// instance, while the first one has not answered yet. The first answer wins; the attempts
/// still out are dropped (the HTTP client closes their connections, hyper resets a gRPC
/// call's HTTP/2 stream) with their pick guards, so the balancer counts them as cancelled,
/// neither success nor failure.
///
/// Hedges are extra attempts, so they are bounded like retries: by the client's maximum
/// attempts (all attempts of a call, hedges and retries together), by the call's deadline,
/// and by the same [`RetryBudget`](super::RetryBudget): each hedge takes a token, and a spent
/// budget sends none (the metrics count a hedge as a retry: `waypost_retries_total`, and a
/// refused one in `waypost_retry_budget_exhausted_total`). Only idempotent requests are
/// hedged, and only to an instance the call has not tried. The HTTP client takes one with
/// `HttpClientBuilder::hedge`, the tower service with `BalancedBuilder::hedge`, the gRPC
/// channel with `GrpcChannelBuilder::hedge`.
///
/// ```
/// use std::time::Duration;
/// use waypost::retry::Hedge;
///
/// let fixed = Hedge::after(Duration::from_millis(50));
/// assert_eq!(fixed.delay(), Duration::from_millis(50));
/// // The observed 95th percentile of this client's answers, 100 ms until 20 were seen.
/// let observed = Hedge::p95(Duration::from_millis(100));
/// assert_eq!(observed.delay(), Duration::from_millis(100));
/// ```
pub struct Hedge {
    delay: Delay,
    observed: Latencies,
}

impl std::fmt::Debug for Hedge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hedge")
            .field("delay", &self.delay)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delay {
    Fixed(Duration),
    P95 { until_known: Duration },
}

/// Answers needed before the observed percentile is used.
const MIN_SAMPLES: u32 = 20;
/// The percentile reads the answers of the current and the previous generation of this many.
const GENERATION: u32 = 1000;
/// Latency buckets: bucket `i` holds latencies up to `FIRST_BOUND × GROWTH^i`.
const BUCKETS: usize = 64;
const FIRST_BOUND: Duration = Duration::from_micros(50);
const GROWTH: f64 = 1.25;

impl Hedge {
    /// A hedge after a fixed `delay` without an answer. [`Duration::ZERO`] sends the second
    /// attempt at once, with the first.
    pub fn after(delay: Duration) -> Hedge {
        Hedge {
            delay: Delay::Fixed(delay),
            observed: Latencies::default(),
        }
    }

    /// A hedge after the 95th percentile of the latencies this client observed (the time to
    /// the answer's headers, over its last 1,000 to 2,000 answers, rounded up by at most
    /// 25 %), so that about one call in twenty sends one; `until_known` until 20 answers were
    /// seen.
    pub fn p95(until_known: Duration) -> Hedge {
        Hedge {
            delay: Delay::P95 { until_known },
            observed: Latencies::default(),
        }
    }

    /// The delay a call starting now would wait before its hedge.
    pub fn delay(&self) -> Duration {
        match self.delay {
            Delay::Fixed(d) => d,
            Delay::P95 { until_known } => self.observed.p95().unwrap_or(until_known),
        }
    }

    /// Records the latency of an answer (only a percentile hedge keeps them).
    pub(crate) fn observe(&self, latency: Duration) {
        if matches!(self.delay, Delay::P95 { .. }) {
            self.observed.record(latency);
        }
    }
}

/// A histogram of recent latencies in buckets growing by 25 %, in two generations: the
/// current one, and the last full one, so that old answers age out as new ones come in.
#[derive(Default)]
struct Latencies {
    inner: Mutex<Generations>,
}

struct Generations {
    current: [u32; BUCKETS],
    previous: [u32; BUCKETS],
    in_current: u32,
}

impl Default for Generations {
    fn default() -> Self {
        Generations {
            current: [0; BUCKETS],
            previous: [0; BUCKETS],
            in_current: 0,
        }
    }
}

/// The bucket of `latency`: the first whose bound is at least it.
fn bucket(latency: Duration) -> usize {
    if latency <= FIRST_BOUND {
        return 0;
    }
    let ratio = latency.as_secs_f64() / FIRST_BOUND.as_secs_f64();
    let i = (ratio.ln() / GROWTH.ln()).ceil();
    // `i` is positive and finite here; anything past the last bucket (about 65 s) goes in it.
    (i as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`.
fn bound(i: usize) -> Duration {
    FIRST_BOUND.mul_f64(GROWTH.powi(i as i32))
}

impl Latencies {
    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // Every update leaves the counts consistent: a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, latency: Duration) {
        let mut g = self.lock();
        if g.in_current >= GENERATION {
            g.previous = g.current;
            g.current = [0; BUCKETS];
            g.in_current = 0;
        }
        g.current[bucket(latency)] += 1;
        g.in_current += 1;
    }

    /// The 95th percentile (nearest rank, as the bound of its bucket); `None` before
    /// [`MIN_SAMPLES`] answers.
    fn p95(&self) -> Option<Duration> {
        let g = self.lock();
        let counts: Vec<u32> = g
            .current
            .iter()
            .zip(g.previous.iter())
            .map(|(a, b)| a + b)
            .collect();
        let total: u32 = counts.iter().sum();
        if total < MIN_SAMPLES {
            return None;
        }
        let rank = (u64::from(total) * 95).div_ceil(100);
        let mut seen = 0u64;
        for (i, n) in counts.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank {
                return Some(bound(i));
            }
        }
        Some(bound(BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_latencies_within_a_quarter() {
        for ms in [0.01, 0.05, 0.051, 1.0, 7.3, 95.0, 1000.0, 30_000.0] {
            let d = Duration::from_secs_f64(ms / 1000.0);
            let b = bound(bucket(d));
            assert!(b >= d, "{d:?} in a bucket up to {b:?}");
            assert!(b <= FIRST_BOUND.max(d.mul_f64(GROWTH)), "{d:?}: {b:?}");
        }
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
    }

    #[test]
    fn the_p95_follows_the_answers_and_waits_for_enough_of_them() {
        let hedge = Hedge::p95(Duration::from_secs(7));
        for _ in 0..MIN_SAMPLES - 1 {
            hedge.observe(Duration::from_millis(1));
        }
        assert_eq!(hedge.delay(), Duration::from_secs(7), "too few answers yet");

        let hedge = Hedge::p95(Duration::from_secs(7));
        for ms in 1..=100 {
            hedge.observe(Duration::from_millis(ms));
        }
        let p95 = hedge.delay();
        assert!(
            p95 >= Duration::from_millis(95) && p95 <= Duration::from_millis(119),
            "{p95:?}"
        );

        // Two generations later the old answers are gone: all fast now.
        for _ in 0..2 * GENERATION {
            hedge.observe(Duration::from_micros(200));
        }
        assert!(
            hedge.delay() <= Duration::from_micros(250),
            "{:?}",
            hedge.delay()
        );
    }

    #[test]
    fn a_fixed_hedge_keeps_no_latencies() {
        let hedge = Hedge::after(Duration::from_millis(3));
        for _ in 0..100 {
            hedge.observe(Duration::from_secs(1));
        }
        assert_eq!(hedge.delay(), Duration::from_millis(3));
        assert_eq!(hedge.observed.p95(), None);
    }
}
