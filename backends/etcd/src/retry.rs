//! Calls that survive a dead member.

use std::future::Future;
use std::time::Duration;

use waypost_core::{Backoff, Error};

use crate::error;

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
