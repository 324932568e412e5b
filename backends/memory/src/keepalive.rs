//! The background task behind each registration handle: heartbeats, healing, deregistration.

use std::sync::{Arc, Weak};
use std::time::Duration;

use waypost_core::{Backoff, Error, HealthCheck, KeepAlive, ServiceInstance, StopMode};

use crate::check::{run_probe, Probe};
use crate::state::Inner;

/// Stores a registration and starts what keeps it judged: the reaper for a TTL check, a probe
/// for a check the backend runs.
pub(crate) fn install(
    inner: &Arc<Inner>,
    instance: &ServiceInstance,
    check: &HealthCheck,
) -> Result<(), Error> {
    let token = inner.put(instance, check)?;
    match Probe::for_check(check) {
        Some(probe) => {
            tokio::spawn(run_probe(
                Arc::downgrade(inner),
                instance.service().clone(),
                instance.id().clone(),
                token,
                probe,
            ));
        }
        None => inner.ensure_reaper(),
    }
    Ok(())
}

/// How often the handle talks to the backend: every TTL/3 for a TTL check; for a check the
/// backend runs, every check interval, only to notice that the backend forgot the registration.
fn period(check: &HealthCheck) -> Duration {
    match (check.heartbeat_interval(), check) {
        (Some(every), _) => every,
        (
            None,
            HealthCheck::Http { interval, .. }
            | HealthCheck::Tcp { interval, .. }
            | HealthCheck::Grpc { interval, .. },
        ) => *interval,
        (None, _) => Duration::from_secs(1),
    }
}

/// The keep-alive loop. Retries forever while the handle lives; ends when asked to stop or when
/// the backend itself is dropped.
pub(crate) async fn run(
    inner: Weak<Inner>,
    instance: ServiceInstance,
    check: HealthCheck,
    mut keep_alive: KeepAlive,
) -> Result<(), Error> {
    let every = period(&check);
    let ttl = match &check {
        HealthCheck::Ttl { ttl } => Some(*ttl),
        _ => None,
    };
    // Capped at the heartbeat period: a recovering registration never waits longer than a
    // healthy one between attempts.
    let mut backoff = Backoff::new(Duration::from_millis(50), every);
    let mut delay = every;
    keep_alive.set_live(); // `register` stored it before spawning this task
    loop {
        if let Some(mode) = keep_alive.sleep(delay).await {
            return stop(&inner, &instance, mode);
        }
        let Some(backend) = inner.upgrade() else {
            return Err(closed());
        };
        // Inside core's "registration" span (service, instance, backend).
        let span = tracing::debug_span!("heartbeat");
        delay = span.in_scope(|| {
            let outcome = match backend.beat(instance.service(), instance.id(), ttl) {
                Err(Error::NotFound { .. }) => {
                    // Expired, or a restart forgot it: register again, as a client of a
                    // restarted Consul agent must.
                    keep_alive.set_recovering(format!(
                        "the memory backend no longer holds {}; registering again",
                        instance.id()
                    ));
                    let again = install(&backend, &instance, &check);
                    if again.is_ok() {
                        tracing::info!(id = %instance.id(), "registered in memory again");
                    }
                    again
                }
                other => other,
            };
            match outcome {
                Ok(()) => {
                    tracing::trace!("memory heartbeat passed");
                    keep_alive.set_live();
                    backoff.reset();
                    every
                }
                Err(e) => {
                    tracing::debug!(id = %instance.id(), error = %e, "memory keep-alive failed; retrying");
                    keep_alive.set_recovering(e.to_string());
                    backoff.next_delay()
                }
            }
        });
    }
}

fn stop(inner: &Weak<Inner>, instance: &ServiceInstance, mode: StopMode) -> Result<(), Error> {
    match (mode, inner.upgrade()) {
        (StopMode::Deregister, Some(backend)) => backend.remove(instance.service(), instance.id()),
        // Abandoned (a crash: the TTL removes it), or the backend is gone with all it held.
        _ => Ok(()),
    }
}

fn closed() -> Error {
    Error::Closed {
        what: "the memory backend (every Memory clone was dropped)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_follows_the_check() {
        assert_eq!(
            period(&HealthCheck::ttl(Duration::from_secs(3))),
            Duration::from_secs(1)
        );
        assert_eq!(
            period(&HealthCheck::tcp("h:1", Duration::from_secs(2))),
            Duration::from_secs(2)
        );
    }
}
