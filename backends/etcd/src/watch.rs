//! Listing a service's instances and watching them change, resumed by revision.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions, WatchResponse, WatchStream};
use futures::stream::{self, StreamExt};
use tokio::time::{timeout, Instant};
use tracing::{Instrument, Span};
use waypost_core::{Error, InstanceSet, ServiceInstance, ServiceName, Watch, WatchEvent};

use crate::error::{self, BACKEND};
use crate::retry;
use crate::Ctx;
use waypost_core::Backoff;

/// The valid instances among `kvs`, keyed by etcd key; invalid values are skipped, logged and
/// counted.
fn decode_all(
    ctx: &Ctx,
    service: &ServiceName,
    kvs: &[KeyValue],
) -> BTreeMap<Vec<u8>, ServiceInstance> {
    kvs.iter()
        .filter_map(|kv| decode(ctx, service, kv).map(|i| (kv.key().to_vec(), i)))
        .collect()
}

fn decode(ctx: &Ctx, service: &ServiceName, kv: &KeyValue) -> Option<ServiceInstance> {
    match ctx.layout.decode(service, kv.key(), kv.value()) {
        Ok(inst) => Some(inst),
        Err(why) => {
            ctx.skipped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                key = %String::from_utf8_lossy(kv.key()),
                reason = %why,
                "skipping a value under the etcd prefix that is not a waypost instance record"
            );
            None
        }
    }
}

/// Reads every key of `service`: the instances and the revision they are current at.
pub(crate) async fn list(
    ctx: &Ctx,
    service: &ServiceName,
) -> Result<(i64, BTreeMap<Vec<u8>, ServiceInstance>), Error> {
    let prefix = ctx.layout.service_prefix(service);
    let resp = retry::call(
        &ctx.client,
        "list instances",
        ctx.request_timeout,
        ctx.attempts,
        |mut c| {
            let key = prefix.clone();
            async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
        },
    )
    .await?;
    let revision = resp
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| Error::protocol(BACKEND, "list instances", "response without a header"))?;
    Ok((revision, decode_all(ctx, service, resp.kvs())))
}

/// A watch of one service. See [`Discovery`](waypost_core::Discovery) for the contract.
pub(crate) fn watch(
    ctx: Arc<Ctx>,
    closed: tokio::sync::watch::Receiver<()>,
    service: ServiceName,
) -> Watch {
    let span = tracing::info_span!("watch", service = %service, backend = BACKEND);
    let w = Watcher {
        span,
        failures: 0,
        failing_since: None,
        list_reason: "start",
        prefix: ctx.layout.service_prefix(&service),
        ctx,
        service,
        closed,
        current: BTreeMap::new(),
        delivered: InstanceSet::new(),
        last_revision: 0,
        need_list: true,
        stream: None,
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        retry_at: None,
        pending: VecDeque::new(),
    };
    stream::unfold(w, |mut w| async move {
        // Every log line of the watch carries its service and backend.
        let span = w.span.clone();
        w.next().instrument(span).await.map(|item| (item, w))
    })
    .boxed()
}

/// An open etcd watch and what is known about its liveness.
struct Open {
    stream: WatchStream,
    /// When the last message arrived (or the stream was opened).
    last_message: Instant,
    /// When a progress request went out that has not been answered yet.
    progress_asked: Option<Instant>,
}

struct Watcher {
    ctx: Arc<Ctx>,
    service: ServiceName,
    prefix: String,
    closed: tokio::sync::watch::Receiver<()>,
    /// The valid instances by key, as of `last_revision`.
    current: BTreeMap<Vec<u8>, ServiceInstance>,
    /// What this watch has told its consumer.
    delivered: InstanceSet,
    /// Every change up to this revision is in `current`.
    last_revision: i64,
    /// The next step must re-list (at the start, after compaction, and after an error).
    need_list: bool,
    /// Why: "start", "compaction" or "error" (a field of the re-list's span).
    list_reason: &'static str,
    stream: Option<Open>,
    backoff: Backoff,
    /// When the next attempt may start, after a failure.
    retry_at: Option<Instant>,
    pending: VecDeque<Result<WatchEvent, Error>>,
    /// Failures since the watch was last in sync (0 while healthy).
    failures: u32,
    /// When the current run of failures began.
    failing_since: Option<Instant>,
    /// `watch` {service, backend}: every item is produced inside it.
    span: Span,
}

impl Watcher {
    /// The next item; `None` once the [`Etcd`](crate::Etcd) client is dropped.
    async fn next(&mut self) -> Option<Result<WatchEvent, Error>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            let mut closed = self.closed.clone();
            tokio::select! {
                // Errs when every clone of the client is gone.
                r = closed.changed() => if r.is_err() { return None },
                () = self.step() => {}
            }
        }
    }

    /// One step of the state machine; queues what the consumer must be told.
    async fn step(&mut self) {
        if let Some(at) = self.retry_at.take() {
            tokio::time::sleep_until(at).await;
        }
        if self.need_list {
            return self.relist().await;
        }
        let Some(open) = &mut self.stream else {
            return self.open().await;
        };
        let idle_limit = match open.progress_asked {
            Some(asked) => asked + self.ctx.request_timeout,
            None => open.last_message + self.ctx.progress_interval,
        };
        let msg = tokio::select! {
            m = open.stream.message() => m,
            () = tokio::time::sleep_until(idle_limit) => {
                if open.progress_asked.is_some() {
                    // A watch on a member that lost the cluster can hang without a word.
                    self.stream = None;
                    return self.fail(Error::unavailable(
                        BACKEND,
                        "watch",
                        format!("no answer to a progress request within {:?}; re-opening the watch", self.ctx.request_timeout),
                    ));
                }
                if let Err(e) = open.stream.request_progress().await {
                    self.stream = None;
                    return self.fail(error::map("watch progress request", e));
                }
                open.progress_asked = Some(Instant::now());
                return;
            }
        };
        match msg {
            Ok(Some(resp)) => {
                open.last_message = Instant::now();
                open.progress_asked = None;
                self.handle(resp).await;
            }
            Ok(None) => {
                // A closed stream is a reason to resume, never to end (go-kit's bug).
                self.stream = None;
                tracing::debug!(service = %self.service, "etcd watch stream closed; resuming");
                self.pause();
            }
            Err(e) => {
                self.stream = None;
                self.fail(error::map("watch", e));
            }
        }
    }

    async fn relist(&mut self) {
        let span = tracing::info_span!(
            "relist",
            reason = self.list_reason,
            attempt = tracing::field::Empty,
        );
        if self.failures > 0 {
            // The how-many-th attempt to resync after an error.
            span.record("attempt", self.failures);
        }
        let listed = list(&self.ctx, &self.service)
            .instrument(span.clone())
            .await;
        span.in_scope(|| self.listed(listed));
    }

    /// Takes in the answer of a re-list.
    fn listed(&mut self, listed: Result<(i64, BTreeMap<Vec<u8>, ServiceInstance>), Error>) {
        match listed {
            Ok((revision, instances)) => {
                if self.failures > 0 {
                    let down_for = self.failing_since.take().map(|t| t.elapsed());
                    tracing::info!(
                        service = %self.service,
                        failures = self.failures,
                        ?down_for,
                        revision,
                        "etcd watch recovered"
                    );
                    self.failures = 0;
                }
                tracing::debug!(
                    revision,
                    instances = instances.len(),
                    "etcd watch listed the service"
                );
                self.current = instances;
                self.last_revision = revision;
                self.need_list = false;
                self.backoff.reset();
                self.emit();
            }
            Err(e) => self.fail(e),
        }
    }

    async fn open(&mut self) {
        let span = tracing::info_span!("open_watch", from_revision = self.last_revision + 1);
        self.open_inner().instrument(span).await;
    }

    async fn open_inner(&mut self) {
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_progress_notify()
            .with_start_revision(self.last_revision + 1);
        let mut c = self.ctx.client.clone();
        let opened = timeout(
            self.ctx.request_timeout,
            c.watch(self.prefix.clone(), Some(options)),
        )
        .await;
        match opened {
            Ok(Ok(stream)) => {
                self.stream = Some(Open {
                    stream,
                    last_message: Instant::now(),
                    progress_asked: None,
                });
            }
            Ok(Err(e)) => self.fail(error::map("open watch", e)),
            Err(_) => self.fail(error::timed_out("open watch", self.ctx.request_timeout)),
        }
    }

    async fn handle(&mut self, resp: WatchResponse) {
        if resp.canceled() {
            self.stream = None;
            if resp.compact_revision() > 0 {
                // The revisions we missed are gone: re-list and tell only the difference. Never
                // jump to the compact revision, that would skip events.
                tracing::info!(
                    service = %self.service,
                    from = self.last_revision + 1,
                    compacted_to = resp.compact_revision(),
                    "etcd watch hit a compacted revision; re-listing"
                );
                self.need_list = true;
                self.list_reason = "compaction";
                return;
            }
            let reason = resp.cancel_reason().to_owned();
            let err = if reason.contains("permission denied") {
                Error::PermissionDenied {
                    backend: BACKEND,
                    operation: format!("watch {}", self.prefix),
                    message: reason,
                }
            } else {
                Error::unavailable(
                    BACKEND,
                    "watch",
                    format!("the server cancelled the watch: {reason:?}"),
                )
            };
            return self.fail(err);
        }
        if resp.created() {
            // The acknowledgement of the watch request, without events. Not yet a sign of
            // health: a member without a leader acknowledges, then cancels.
            return;
        }
        self.backoff.reset();
        if resp.events().is_empty() {
            // A progress notification: every change up to this revision has been sent. (etcd
            // before 3.4.25 / 3.5.8 could answer a progress *request* of a watch that was still
            // catching up with the current revision; progress is only requested after a quiet
            // `progress_interval`, when a catching-up watch would have sent events.)
            if let Some(h) = resp.header() {
                self.last_revision = self.last_revision.max(h.revision());
            }
            return;
        }
        let mut touched = BTreeSet::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            self.last_revision = self.last_revision.max(kv.mod_revision());
            touched.insert(kv.key().to_vec());
            match ev.event_type() {
                EventType::Put => match decode(&self.ctx, &self.service, kv) {
                    Some(inst) => {
                        self.current.insert(kv.key().to_vec(), inst);
                    }
                    // An instance overwritten with garbage is no longer an instance.
                    None => {
                        self.current.remove(kv.key());
                    }
                },
                EventType::Delete => {
                    self.current.remove(kv.key());
                }
            }
        }
        self.emit_touched(touched);
    }

    /// Queues what changed at `keys` since it was delivered (nothing where nothing did): one
    /// event costs work in proportion to it, not to the set.
    fn emit_touched(&mut self, keys: BTreeSet<Vec<u8>>) {
        if !self.delivered.is_in_sync() {
            // What was delivered is the whole set only once a re-list was told.
            return self.emit();
        }
        for key in keys {
            // A key that names no valid instance id never held an instance.
            let Ok(id) = self.ctx.layout.instance_id(&self.service, &key) else {
                continue;
            };
            let event = match (self.delivered.get(id.as_str()), self.current.get(&key)) {
                (Some(was), Some(now)) if was == now => continue,
                (Some(_), Some(now)) => WatchEvent::Updated(now.clone()),
                (None, Some(now)) => WatchEvent::Added(now.clone()),
                (Some(was), None) => WatchEvent::Removed(was.clone()),
                (None, None) => continue,
            };
            self.delivered.apply(&event);
            self.pending.push_back(Ok(event));
        }
    }

    /// Queues the difference between what was delivered and `current` (nothing if none).
    fn emit(&mut self) {
        let events = self.delivered.sync(self.current.values().cloned());
        self.pending.extend(events.into_iter().map(Ok));
    }

    /// Reports `err` (the watch goes on) and schedules the next attempt after a backoff, which
    /// starts with a re-list.
    ///
    /// The re-list is what proves the watch in sync again: its answer is the whole set as of a
    /// revision, so the difference to what was delivered, then `Synced`, can be said at once,
    /// whether or not anything changed. (Resuming from the last revision alone would stay silent
    /// when nothing changed, and asking for progress while a watch catches up is unsafe on etcd
    /// before 3.4.25.) The watch then resumes from that revision + 1, so nothing is skipped.
    fn fail(&mut self, err: Error) {
        tracing::warn!(service = %self.service, error = %err, "etcd watch interrupted; retrying");
        self.failures = self.failures.saturating_add(1);
        self.failing_since.get_or_insert_with(Instant::now);
        self.delivered.interrupted();
        self.need_list = true;
        self.list_reason = "error";
        self.pending.push_back(Err(err));
        self.pause();
    }

    /// Schedules the next attempt after a backoff. The wait happens at the start of the next
    /// step, so that queued items (an error) reach the consumer first.
    fn pause(&mut self) {
        self.retry_at = Some(Instant::now() + self.backoff.next_delay());
    }
}
