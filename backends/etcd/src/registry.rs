//! Registration: a lease, the instance's key put with it, and a keep-alive that heals.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;
use tracing::Instrument;
use waypost_core::{Error, KeepAlive, StopMode};

use crate::retry;
use crate::{error, Ctx};
use waypost_core::Backoff;

/// What a registration puts: the key, its value, and the lease TTL in whole seconds.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) value: String,
    pub(crate) ttl_secs: i64,
}

impl Entry {
    /// A keep-alive every third of the TTL: two may be lost before the lease expires.
    fn interval(&self) -> Duration {
        Duration::from_secs(self.ttl_secs as u64) / 3
    }
}

/// Grants a new lease and puts the key with it. Returns the lease id.
pub(crate) async fn establish(ctx: &Ctx, entry: &Entry) -> Result<i64, Error> {
    let ttl = entry.ttl_secs;
    let lease = retry::call(
        &ctx.client,
        "grant lease",
        ctx.request_timeout,
        ctx.attempts,
        |mut c| async move { c.lease_grant(ttl, None).await },
    )
    .await?
    .id();
    let put = retry::call(
        &ctx.client,
        "put instance",
        ctx.request_timeout,
        ctx.attempts,
        |mut c| {
            let (key, value) = (entry.key.clone(), entry.value.clone());
            async move {
                c.put(
                    key,
                    value,
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
                .await
            }
        },
    )
    .await;
    if let Err(e) = put {
        // The lease holds nothing; let it go now rather than at its TTL.
        revoke_in_background(ctx, lease);
        return Err(e);
    }
    Ok(lease)
}

/// Revokes `lease`: its key disappears at once and watchers see a delete. An already expired
/// lease counts as revoked.
async fn revoke(ctx: &Ctx, lease: i64) -> Result<(), Error> {
    let r = retry::call(
        &ctx.client,
        "revoke lease",
        ctx.request_timeout,
        ctx.attempts,
        |mut c| async move { c.lease_revoke(lease).await },
    )
    .await;
    match r {
        Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

fn revoke_in_background(ctx: &Ctx, lease: i64) {
    let mut client = ctx.client.clone();
    let limit = ctx.request_timeout;
    tokio::spawn(async move {
        let _ = timeout(limit, client.lease_revoke(lease)).await;
    });
}

/// How holding a lease ended.
enum Held {
    Stop(StopMode),
    Lost(String),
}

/// The background task of a registration: keeps `lease` alive; when it is lost, grants a new
/// one and puts the key again, forever, with jittered backoff; revokes on shutdown.
pub(crate) async fn keep(
    ctx: Arc<Ctx>,
    entry: Entry,
    mut lease: i64,
    mut ka: KeepAlive,
) -> Result<(), Error> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let reason = match hold(&ctx, &entry, lease, &mut ka).await {
            Held::Stop(StopMode::Deregister) => return revoke(&ctx, lease).await,
            Held::Stop(StopMode::Abandon) => return Ok(()),
            Held::Lost(reason) => reason,
        };
        tracing::warn!(key = %entry.key, lease, %reason, "etcd registration lost; registering again");
        ka.set_recovering(reason.clone());
        let mut attempts: u32 = 0;
        loop {
            attempts = attempts.saturating_add(1);
            // Inside core's "registration" span (service, instance, backend).
            let span = tracing::debug_span!("reregister", attempt = attempts);
            let attempt = tokio::select! {
                mode = ka.stopped() => {
                    // The old lease may still hold the key (a silent stream, not an expiry).
                    return match mode {
                        StopMode::Deregister => revoke(&ctx, lease).await,
                        StopMode::Abandon => Ok(()),
                    };
                }
                r = establish(&ctx, &entry).instrument(span) => r,
            };
            match attempt {
                Ok(new_lease) => {
                    // The key now hangs on the new lease; the old one holds nothing.
                    revoke_in_background(&ctx, lease);
                    lease = new_lease;
                    backoff.reset();
                    tracing::info!(key = %entry.key, lease, "etcd registration restored");
                    break;
                }
                Err(e) => {
                    tracing::warn!(key = %entry.key, error = %e, "re-registering in etcd failed; retrying");
                    ka.set_recovering(format!("{reason}; re-registering failed: {e}"));
                    if let Some(mode) = ka.sleep(backoff.next_delay()).await {
                        return match mode {
                            StopMode::Deregister => revoke(&ctx, lease).await,
                            StopMode::Abandon => Ok(()),
                        };
                    }
                }
            }
        }
    }
}

/// Keeps `lease` alive until asked to stop or until the lease is lost: expired or unknown, the
/// stream closed or failed, or no answer within the deadline (a member that died can leave the
/// stream open and silent).
async fn hold(ctx: &Ctx, entry: &Entry, lease: i64, ka: &mut KeepAlive) -> Held {
    let interval = entry.interval();
    let deadline = ctx
        .request_timeout
        .min(interval)
        .max(Duration::from_millis(500));
    let open = async {
        let mut c = ctx.client.clone();
        // Sends the first keep-alive and waits for its answer.
        match timeout(ctx.request_timeout, c.lease_keep_alive(lease)).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(error::map("open lease keep-alive", e).to_string()),
            Err(_) => Err(format!(
                "keep-alive stream did not answer within {:?}",
                ctx.request_timeout
            )),
        }
    };
    // Inside core's "registration" span (service, instance, backend): only the lease here.
    let open = open.instrument(tracing::debug_span!("open_keep_alive", lease));
    let (mut keeper, mut stream) = tokio::select! {
        mode = ka.stopped() => return Held::Stop(mode),
        r = open => match r {
            Ok(pair) => pair,
            Err(reason) => return Held::Lost(reason),
        },
    };
    ka.set_live();
    // The key may be deleted by someone else while the lease lives (an operator's `etcdctl del`,
    // a script cleaning up): a watch on it notices at once, and the key is put back. While the
    // watch is down, each keep-alive round checks the key instead. An overwrite is left alone:
    // it is how a second registration of the same id takes over (the last one wins).
    let mut guard = KeyGuard { stream: None };
    if let Err(held) = guard.open(ctx, entry, lease, ka).await {
        return held;
    }
    let mut next_beat = tokio::time::Instant::now() + interval;
    loop {
        // A deadline, not a sleep per turn: changes to the key must not push keep-alives back.
        let change = tokio::select! {
            mode = ka.stopped() => return Held::Stop(mode),
            _ = tokio::time::sleep_until(next_beat) => None,
            change = guard.changed() => Some(change),
        };
        match change {
            Some(Ok(what)) => {
                tracing::warn!(key = %entry.key, lease, "the registration's key was {what} by someone else; putting it back");
                if let Err(held) = guard.restore(ctx, entry, lease, ka, what).await {
                    return held;
                }
                continue;
            }
            Some(Err(reason)) => {
                tracing::debug!(key = %entry.key, %reason, "the watch on the registration's key ended; checking on each keep-alive until it is back");
                guard.stream = None;
                continue;
            }
            None => next_beat = tokio::time::Instant::now() + interval,
        }
        let span = tracing::debug_span!("keep_alive", lease);
        let round = async {
            if let Err(e) = keeper.keep_alive().await {
                return Err(Held::Lost(format!("sending a keep-alive failed: {e}")));
            }
            let answer = tokio::select! {
                mode = ka.stopped() => return Err(Held::Stop(mode)),
                r = timeout(deadline, stream.message()) => r,
            };
            match answer {
                Err(_) => Err(Held::Lost(format!(
                    "no keep-alive answer within {deadline:?}"
                ))),
                Ok(Err(e)) => Err(Held::Lost(format!("keep-alive stream failed: {e}"))),
                Ok(Ok(None)) => Err(Held::Lost("keep-alive stream closed".into())),
                Ok(Ok(Some(resp))) if resp.ttl() <= 0 => Err(Held::Lost(format!(
                    "lease {lease:x} expired or is unknown to the server"
                ))),
                Ok(Ok(Some(resp))) => {
                    tracing::trace!(ttl = resp.ttl(), "etcd lease kept alive");
                    ka.set_live();
                    Ok(())
                }
            }
        };
        if let Err(held) = round.instrument(span).await {
            return held;
        }
        if guard.stream.is_none() {
            if let Err(held) = guard.open(ctx, entry, lease, ka).await {
                return held;
            }
        }
    }
}

/// What happened to a registration's key (for messages).
type Foreign = &'static str;

/// Keeps a registration's key as the registration put it.
struct KeyGuard {
    /// The watch on the key; `None` while it is down (each keep-alive round re-opens it).
    stream: Option<etcd_client::WatchStream>,
}

impl KeyGuard {
    /// Opens the watch (if it can), then reads the key and puts it back if it is gone:
    /// watching first, so that a delete between the read and the watch is not missed.
    async fn open(
        &mut self,
        ctx: &Ctx,
        entry: &Entry,
        lease: i64,
        ka: &mut KeepAlive,
    ) -> Result<(), Held> {
        let mut c = ctx.client.clone();
        let opened = timeout(
            ctx.request_timeout,
            c.watch(entry.key.clone(), Some(etcd_client::WatchOptions::new())),
        )
        .await;
        self.stream = match opened {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(key = %entry.key, error = %error::map("watch own key", e), "cannot watch the registration's key; checking it on each keep-alive");
                None
            }
            Err(_) => None,
        };
        let read = retry::call(
            &ctx.client,
            "read own key",
            ctx.request_timeout,
            ctx.attempts,
            |mut c| {
                let key = entry.key.clone();
                async move { c.get(key, None).await }
            },
        )
        .await;
        let what = match read {
            Ok(resp) if resp.kvs().is_empty() => "deleted",
            Ok(_) => return Ok(()),
            Err(e) => {
                // Not a reason to drop the lease: the next round reads again.
                tracing::debug!(key = %entry.key, error = %e, "cannot read the registration's key");
                self.stream = None;
                return Ok(());
            }
        };
        tracing::warn!(key = %entry.key, lease, "the registration's key was {what} by someone else; putting it back");
        self.restore(ctx, entry, lease, ka, what).await
    }

    /// The next delete of the key, or why the watch ended. Pending while there is no watch.
    async fn changed(&mut self) -> Result<Foreign, String> {
        let Some(stream) = self.stream.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return Err("the watch stream closed".into()),
                Err(e) => return Err(format!("the watch stream failed: {e}")),
            };
            if resp.canceled() {
                return Err(format!("the watch was cancelled: {}", resp.cancel_reason()));
            }
            if resp
                .events()
                .iter()
                .any(|ev| ev.event_type() == etcd_client::EventType::Delete)
            {
                return Ok("deleted");
            }
        }
    }

    /// Puts the key back with `lease`. A lease that is gone ends the hold (the registration
    /// starts over with a new one); any other failure is retried on the next round, with the
    /// registration reported recovering meanwhile.
    async fn restore(
        &mut self,
        ctx: &Ctx,
        entry: &Entry,
        lease: i64,
        ka: &mut KeepAlive,
        what: Foreign,
    ) -> Result<(), Held> {
        let put = retry::call(
            &ctx.client,
            "put instance back",
            ctx.request_timeout,
            ctx.attempts,
            |mut c| {
                let (key, value) = (entry.key.clone(), entry.value.clone());
                async move {
                    c.put(
                        key,
                        value,
                        Some(etcd_client::PutOptions::new().with_lease(lease)),
                    )
                    .await
                }
            },
        )
        .await;
        match put {
            Ok(_) => {
                ka.set_live();
                tracing::info!(key = %entry.key, lease, "the registration's key is back");
                Ok(())
            }
            Err(Error::NotFound { .. }) => Err(Held::Lost(format!(
                "the key was {what} by someone else and lease {lease:x} is gone"
            ))),
            Err(e) => {
                ka.set_recovering(format!(
                    "the key was {what} by someone else; putting it back failed: {e}"
                ));
                // Checked again on the next keep-alive round.
                self.stream = None;
                Ok(())
            }
        }
    }
}
