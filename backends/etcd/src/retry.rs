//! Calls that survive a dead member, and the backoff of loops that retry forever.

use std::future::Future;
use std::time::Duration;

use waypost_core::Error;

use crate::error;

/// Exponential backoff with jitter: each delay is drawn from the upper half of a window that
/// doubles up to `max`, so that clients that lost the same server do not return in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let window = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        window.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    /// Forget past failures after a success.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Runs one request with a deadline, and runs it again (on whichever member the client's
/// balancer picks next) while it fails with [`Error::Unavailable`]: with several endpoints,
/// `etcd-client` keeps sending some requests to a dead member for a while.
pub(crate) async fn call<T, F, Fut>(
    client: &etcd_client::Client,
    operation: &str,
    timeout: Duration,
    attempts: u32,
    mut f: F,
) -> Result<T, Error>
where
    F: FnMut(etcd_client::Client) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    let mut attempt = 1;
    loop {
        let err = match tokio::time::timeout(timeout, f(client.clone())).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => error::map(operation, e),
            Err(_) => error::timed_out(operation, timeout),
        };
        if !matches!(err, Error::Unavailable { .. }) || attempt >= attempts {
            return Err(err);
        }
        tracing::debug!(operation, attempt, error = %err, "etcd request failed; trying again");
        attempt += 1;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[2] >= Duration::from_millis(200) && d[2] <= Duration::from_millis(400));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(1)));
        assert!(d[7] >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
