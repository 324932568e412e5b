//! Registration: a lease, the instance's key put with it, and a keep-alive that heals.

use std::sync::atomic::{AtomicI64, Ordering};
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
    // The key's guard runs beside the keep-alives, never in their way: a check of the key
    // that waits on a silent server must not delay the beat that keeps the lease.
    let current = Arc::new(AtomicI64::new(lease));
    let guard = KeyGuard::spawn(ctx.clone(), entry.clone(), current.clone());
    loop {
        let reason = match hold(&ctx, &entry, lease, &mut ka).await {
            Held::Stop(StopMode::Deregister) => {
                // Stopped first, so that it cannot put back the key the revoke deletes.
                drop(guard);
                return revoke(&ctx, lease).await;
            }
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
                    drop(guard);
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
                    current.store(lease, Ordering::Release);
                    backoff.reset();
                    tracing::info!(key = %entry.key, lease, "etcd registration restored");
                    break;
                }
                Err(e) => {
                    tracing::warn!(key = %entry.key, error = %e, "re-registering in etcd failed; retrying");
                    ka.set_recovering(format!("{reason}; re-registering failed: {e}"));
                    if let Some(mode) = ka.sleep(backoff.next_delay()).await {
                        drop(guard);
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
    loop {
        if let Some(mode) = ka.sleep(interval).await {
            return Held::Stop(mode);
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
    }
}

/// Keeps a registration's key as the registration put it: a key deleted by someone else while
/// the lease lives (an operator's `etcdctl del`, a script cleaning up) is put back at once, on
/// the registration's current lease. A watch on the key notices; while it cannot be opened,
/// the key is read once per keep-alive interval instead. An overwrite is left alone: it is how
/// a second registration of the same id takes over (the last one wins). Runs on a task of its
/// own, stopped when dropped.
struct KeyGuard {
    task: tokio::task::AbortHandle,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KeyGuard {
    fn spawn(ctx: Arc<Ctx>, entry: Entry, lease: Arc<AtomicI64>) -> KeyGuard {
        let span = tracing::debug_span!("key_guard", key = %entry.key);
        let task = tokio::spawn(guard_key(ctx, entry, lease).instrument(span));
        KeyGuard {
            task: task.abort_handle(),
        }
    }
}

async fn guard_key(ctx: Arc<Ctx>, entry: Entry, lease: Arc<AtomicI64>) {
    let interval = entry.interval();
    loop {
        // Watching first, then reading: a delete between the two is not missed.
        let mut c = ctx.client.clone();
        let opened = timeout(
            ctx.request_timeout,
            c.watch(entry.key.clone(), Some(etcd_client::WatchOptions::new())),
        )
        .await;
        let stream = match opened {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(error = %error::map("watch own key", e), "cannot watch the registration's key; reading it each interval");
                None
            }
            Err(_) => None,
        };
        let mut c = ctx.client.clone();
        match timeout(ctx.request_timeout, c.get(entry.key.clone(), None)).await {
            Ok(Ok(resp)) if resp.kvs().is_empty() => {
                restore(&ctx, &entry, &lease).await;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %error::map("read own key", e), "cannot read the registration's key");
            }
            Err(_) => tracing::debug!("no answer reading the registration's key"),
        }
        if let Some(mut stream) = stream {
            loop {
                let resp = match stream.message().await {
                    Ok(Some(resp)) => resp,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "the watch on the registration's key failed");
                        break;
                    }
                };
                if resp.canceled() {
                    break;
                }
                let deleted = resp
                    .events()
                    .iter()
                    .any(|ev| ev.event_type() == etcd_client::EventType::Delete);
                // A failed restore is tried again at the next read, an interval from now.
                if deleted && !restore(&ctx, &entry, &lease).await {
                    break;
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Puts the key back with the registration's current lease, unless it is back already. A lease
/// that is gone is the keep-alive's to notice (it registers again, key included); any other
/// failure is tried again at the next check. Whether the key is back.
async fn restore(ctx: &Ctx, entry: &Entry, lease: &AtomicI64) -> bool {
    let lease = lease.load(Ordering::Acquire);
    tracing::warn!(
        lease,
        "the registration's key was deleted by someone else; putting it back"
    );
    // Only if the key is still absent: one delete can be seen twice (by the read after the
    // watch opened, and by the watch), and a second registration of the id may have put its
    // own value meanwhile, which must win.
    let txn = etcd_client::Txn::new()
        .when([etcd_client::Compare::create_revision(
            entry.key.clone(),
            etcd_client::CompareOp::Equal,
            0,
        )])
        .and_then([etcd_client::TxnOp::put(
            entry.key.clone(),
            entry.value.clone(),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )]);
    let mut c = ctx.client.clone();
    let put = timeout(ctx.request_timeout, c.txn(txn)).await;
    match put {
        Ok(Ok(resp)) if resp.succeeded() => {
            tracing::info!(lease, "the registration's key is back");
            true
        }
        Ok(Ok(_)) => {
            tracing::debug!(
                lease,
                "the registration's key is there again; left as it is"
            );
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(lease, error = %error::map("put instance back", e), "putting the registration's key back failed; trying again at the next check");
            false
        }
        Err(_) => {
            tracing::warn!(
                lease,
                "no answer putting the registration's key back; trying again at the next check"
            );
            false
        }
    }
}
