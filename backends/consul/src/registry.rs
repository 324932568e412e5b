//! Registering with the agent and keeping the registration alive.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn, Instrument};
use waypost_core::{Error, HealthCheck, KeepAlive, Registration, RegistrationHandle, StopMode};

use crate::api::Api;
use crate::wire::{check_id, ServiceRegistration};
use waypost_core::Backoff;

/// How often the handle of a registration with an HTTP or TCP check (run by Consul, no
/// heartbeat) asks the agent whether it still knows the service.
const MAX_PROBE_PERIOD: Duration = Duration::from_secs(10);
const MIN_PROBE_PERIOD: Duration = Duration::from_secs(1);

pub(crate) async fn register(
    api: Arc<Api>,
    reg: Registration,
) -> Result<RegistrationHandle, Error> {
    let instance = reg.instance_or_host(api.default_host())?;
    let payload = Arc::new(ServiceRegistration::new(&instance, &reg));
    // The first registration in its own span. The keep-alive task is spawned outside it: core
    // runs that task in a "registration" span with the same fields, which would otherwise nest
    // under this one.
    let span = tracing::info_span!(
        "register",
        service = %instance.service(),
        instance = %instance.id(),
        backend = crate::BACKEND,
    );
    first_registration(&api, &payload, reg.check())
        .instrument(span)
        .await?;
    let check = reg.check().clone();
    Ok(RegistrationHandle::spawn(
        crate::BACKEND,
        instance,
        move |ka| keep_alive(api, payload, check, ka),
    ))
}

async fn first_registration(
    api: &Api,
    payload: &ServiceRegistration,
    check: &HealthCheck,
) -> Result<(), Error> {
    // The first attempt's error goes to the caller: a 403 or an unreachable agent is theirs to
    // decide about, not a reason to retry silently.
    if let Err(e) = api.register(payload).await {
        debug!("registering with consul failed: {e}");
        return Err(e);
    }
    if check.heartbeat_interval().is_some() {
        // See `register_and_pass`; a failure here is the keep-alive loop's to heal.
        if let Err(e) = api.pass(&check_id(&payload.id)).await {
            warn!(id = %payload.id, "first heartbeat failed: {e}");
        }
    }
    info!(id = %payload.id, service = %payload.name, address = %payload.address, port = payload.port, "registered with consul");
    Ok(())
}

/// Registers, and passes a TTL check at once: the agent restores a TTL check's last saved
/// status when the same check is registered again (a critical one stays critical despite
/// `"Status": "passing"`), and the instance must be routable right away.
async fn register_and_pass(
    api: &Api,
    reg: &ServiceRegistration,
    check: &HealthCheck,
) -> Result<(), Error> {
    api.register(reg).await?;
    if check.heartbeat_interval().is_some() {
        api.pass(&check_id(&reg.id)).await?;
    }
    Ok(())
}

/// Runs `call`, unless the handle asks to stop first.
async fn or_stop<T>(ka: &mut KeepAlive, call: impl Future<Output = T>) -> Result<T, StopMode> {
    tokio::select! {
        mode = ka.stopped() => Err(mode),
        out = call => Ok(out),
    }
}

async fn keep_alive(
    api: Arc<Api>,
    reg: Arc<ServiceRegistration>,
    check: HealthCheck,
    mut ka: KeepAlive,
) -> Result<(), Error> {
    ka.set_live();
    let ttl = check.heartbeat_interval();
    let period = ttl.unwrap_or_else(|| match &check {
        HealthCheck::Http { interval, .. }
        | HealthCheck::Tcp { interval, .. }
        | HealthCheck::Grpc { interval, .. } => {
            (*interval).clamp(MIN_PROBE_PERIOD, MAX_PROBE_PERIOD)
        }
        _ => MAX_PROBE_PERIOD,
    });
    let check_id = check_id(&reg.id);
    let mut backoff = api.backoff();
    let mut delay = period;
    let round = Round {
        api: &api,
        reg: &reg,
        check: &check,
        check_id: &check_id,
        ttl: ttl.is_some(),
        period,
    };
    loop {
        if let Some(mode) = ka.sleep(delay).await {
            return finish(&api, &reg.id, mode).await;
        }
        // The task runs in core's "registration" span (service, instance, backend): each round
        // adds only its own span.
        let span = tracing::debug_span!("heartbeat", check = %check_id);
        match round.run(&mut ka, &mut backoff).instrument(span).await {
            Ok(next) => delay = next,
            Err(mode) => return finish(&api, &reg.id, mode).await,
        }
    }
}

/// One heartbeat round: the beat (a TTL pass, or asking the agent whether it still knows the
/// service), and re-registering when it failed.
struct Round<'a> {
    api: &'a Api,
    reg: &'a ServiceRegistration,
    check: &'a HealthCheck,
    check_id: &'a str,
    ttl: bool,
    period: Duration,
}

impl Round<'_> {
    /// How long to wait before the next round (the period when live, a backoff when
    /// re-registering failed), or the stop mode when the handle asked to stop.
    async fn run(&self, ka: &mut KeepAlive, backoff: &mut Backoff) -> Result<Duration, StopMode> {
        let (api, reg) = (self.api, self.reg);
        let beat = if self.ttl {
            or_stop(ka, api.pass(self.check_id)).await?
        } else {
            or_stop(ka, async {
                match api.has_service(&reg.id).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(Error::NotFound {
                        backend: crate::BACKEND,
                        what: format!("service {}", reg.id),
                    }),
                    Err(e) => Err(e),
                }
            })
            .await?
        };
        let err = match beat {
            Ok(()) => {
                tracing::trace!("consul heartbeat passed");
                ka.set_live();
                backoff.reset();
                return Ok(self.period);
            }
            Err(e) => e,
        };
        // The agent forgot the service (restart) or could not be reached: registering again is
        // idempotent, so do it in both cases and resume heart-beating.
        ka.set_recovering(err.to_string());
        warn!(id = %reg.id, "consul registration lost: {err}; registering again");
        match or_stop(ka, register_and_pass(api, reg, self.check)).await? {
            Ok(()) => {
                info!(id = %reg.id, "registered with consul again");
                ka.set_live();
                backoff.reset();
                Ok(self.period)
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(id = %reg.id, retry_in = ?delay, "registering again failed: {e}");
                Ok(delay)
            }
        }
    }
}

async fn finish(api: &Api, id: &str, mode: StopMode) -> Result<(), Error> {
    match mode {
        StopMode::Deregister => {
            let result = deregister(api, id).await;
            match &result {
                Ok(()) => info!(id, "deregistered from consul"),
                Err(e) => warn!(
                    id,
                    "deregistering failed: {e}; consul's check removes it later"
                ),
            }
            result
        }
        StopMode::Abandon => {
            debug!(id, "registration abandoned without deregistering");
            Ok(())
        }
    }
}

/// Deregisters `id`, trying again with the client's backoff while the agent cannot be reached,
/// for at most the request timeout in all: a shutdown should not leave the instance listed
/// (until its check removes it) because of a blip, such as an agent that closed a connection
/// at its per-client limit.
async fn deregister(api: &Api, id: &str) -> Result<(), Error> {
    let until = tokio::time::Instant::now() + api.request_timeout;
    let mut backoff = api.backoff();
    loop {
        let err = match api.deregister(id).await {
            Err(e @ Error::Unavailable { .. }) => e,
            done => return done,
        };
        let delay = backoff.next_delay();
        if tokio::time::Instant::now() + delay >= until {
            return Err(err);
        }
        debug!(id, retry_in = ?delay, "deregistering failed: {err}; trying again");
        tokio::time::sleep(delay).await;
    }
}
