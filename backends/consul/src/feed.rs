//! Many watches through one agent: two datacenter-wide blocking queries that tell which
//! services changed, so that a watch beyond the client's own blocking queries waits on them and
//! re-reads its service only when it changed.
//!
//! An agent serves one blocking query per HTTP/1.1 connection and limits the connections of one
//! client address (`limits.http_max_conns_per_client`, 200 by default), and Consul 1.8 has no
//! streaming. So a client holds a few blocking queries of its own
//! ([`max_blocking_watches`](crate::ConsulBuilder::max_blocking_watches)) and every further
//! watch subscribes here. Two loops follow the datacenter:
//!
//! - `GET /v1/health/state/any` lists every check with its `ModifyIndex`. A check that
//!   appeared, changed or went away names its service: a registration, a deregistration, a
//!   re-registration and a health change of a service with a check all show here, at the write's
//!   own index.
//! - `GET /v1/catalog/services` moves with every write to the services table. A service whose
//!   tags changed is named by the diff. A write that no check change explains at the same index
//!   (an instance without a check was added or changed) names no service: every subscribed
//!   watch re-reads (a sweep), with reads bounded by a semaphore.
//!
//! What cannot be told: a check-less write that lands in the same few milliseconds as another
//! write (the catalog's index then names only the last). Each subscribed watch also re-reads
//! every `wait`, as a blocking query returns every `wait`, which bounds that case.
//!
//! An error in either loop wakes every watch, so that each finds the outage itself, reports it
//! and retries with its own backoff (keeping its last instances). While a loop fails, a watch
//! whose reads still succeed (a token that may read its service but not the checks list) re-reads
//! at the backoff's longest delay instead of every `wait`. The loop's recovery wakes them all
//! again, since changes may have been missed meanwhile.
//!
//! The loops run in a task spawned on the runtime of the first watch that subscribed. If that
//! task ends while watches remain (its runtime shut down, or it panicked), the next watch that
//! waits or subscribes starts it again on its own runtime, waits for the new baseline and
//! re-reads. After a panic that happens at most once per backoff's longest delay, and
//! meanwhile every watch re-reads at that delay.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use waypost_core::{Backoff, Error, ServiceName};

use crate::api::Api;
use crate::backoff::TokenBucket;
use crate::watch::next_index;
use crate::BACKEND;

/// How long the catalog loop waits for the checks loop to reach the catalog's index before it
/// counts the write as unexplained (a sweep: correct, only dearer).
const CORRELATE: Duration = Duration::from_millis(100);

/// How many check-change indexes are remembered for correlating catalog writes.
const EXPLAINED_KEPT: usize = 4096;

/// The shared part of one client (and its clones): blocking-query slots, the subscriptions and
/// the loops that wake them.
pub(crate) struct Feed {
    api: Arc<Api>,
    stale: bool,
    wait: Duration,
    rate_limit: (u32, Duration),
    blocking: Arc<Semaphore>,
    max_blocking: usize,
    fetches: Arc<Semaphore>,
    subs: Mutex<Subs>,
}

#[derive(Default)]
struct Subs {
    /// Per watched service: a generation bumped on every wake, and how many watches hold it.
    services: HashMap<ServiceName, (watch::Sender<u64>, usize)>,
    /// The loops' task, from its start until the last watch unsubscribes (it may have ended
    /// before: see [`Running::ended`]).
    task: Option<Running>,
    /// When the last task was started.
    started: Option<Instant>,
    /// How many tasks were started: each one's number.
    starts: u64,
}

/// One start of the loops' task, and what watches read of it.
struct Running {
    handle: JoinHandle<()>,
    /// Which start this is (see [`Subs::starts`]).
    start: u64,
    /// Set once both loops have their first answer: the baseline that later answers are
    /// compared with. A watch reads its service only after it, so that no change falls between
    /// its read and the baseline.
    baseline: watch::Sender<bool>,
    /// How many of the task's two loops are failing.
    failing: Arc<AtomicUsize>,
    /// Closed when the task ends, however it ends (its sender lives in the task's future).
    alive: watch::Receiver<()>,
    /// Whether the task, once ended, panicked: read from the handle once, since a handle
    /// cannot be polled again after it gave its output.
    panicked: Option<bool>,
}

impl Running {
    fn ended(&self) -> bool {
        self.alive.has_changed().is_err()
    }
}

/// How a watch waits for its service to change.
pub(crate) enum Wait {
    /// A blocking query of its own; the permit is one of the client's slots.
    Blocking {
        /// Held, never read: dropping the watch frees the slot.
        _slot: OwnedSemaphorePermit,
    },
    /// Woken by the feed; subscribes on its first poll (the loops need a runtime).
    Shared {
        feed: Arc<Feed>,
        subscription: Option<Subscription>,
    },
}

/// One watch's subscription to its service's wakes; unsubscribes when dropped.
pub(crate) struct Subscription {
    feed: Arc<Feed>,
    service: ServiceName,
    rx: watch::Receiver<u64>,
    baseline: watch::Receiver<bool>,
    /// The start of the task whose baseline this watch read after.
    start: u64,
}

impl Subscription {
    /// Marks every wake so far as seen: call before reading, so that a change during the read
    /// wakes the watch again.
    pub(crate) fn seen(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Until the next wake (at once if one came since [`seen`](Self::seen)), or `within`. While
    /// the shared watch fails (it cannot tell of changes, though the agent may still answer
    /// reads, as when a token may read services but not the checks list) or its task has
    /// ended, at most the backoff's longest delay: the watch polls rather than go stale. A task
    /// that ended is started again here (see the module's text). After a start since its last
    /// read (its own or another watch's), the watch returns once the new baseline is there, to
    /// read what it may have missed.
    pub(crate) async fn woken(&mut self, within: Duration) {
        let (fresh, alive, failing) = {
            let mut subs = self.feed.lock();
            self.feed.ensure_running(&mut subs);
            match &subs.task {
                Some(run) if !run.ended() => {
                    // Started since this watch last read (by it or by another): what it read
                    // may predate the new baseline.
                    let fresh = run.start != self.start;
                    if fresh {
                        self.baseline = run.baseline.subscribe();
                        self.start = run.start;
                    }
                    let failing = run.failing.load(Ordering::Relaxed) > 0;
                    (fresh, Some(run.alive.clone()), failing)
                }
                _ => (false, None, true),
            }
        };
        if fresh {
            self.baseline(self.feed.api.request_timeout).await;
            return;
        }
        let within = if failing {
            within.min(self.feed.api.backoff.1)
        } else {
            within
        };
        let ended = async {
            match alive {
                // Resolves only when the task ends: its sender never sends.
                Some(mut alive) => {
                    let _ = alive.changed().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.rx.changed() => {}
            () = ended => {}
            () = tokio::time::sleep(within) => {}
        }
    }

    /// Until the feed has its baseline or fails, or `within` (an agent that does not answer
    /// fails the watch's own read, which reports it).
    pub(crate) async fn baseline(&mut self, within: Duration) {
        let _ = tokio::time::timeout(within, self.baseline.wait_for(|&b| b)).await;
    }

    /// A slot for one read.
    pub(crate) async fn fetch_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.feed.fetches.clone().acquire_owned().await.ok()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.feed.unsubscribe(&self.service);
    }
}

impl Feed {
    pub(crate) fn new(
        api: Arc<Api>,
        stale: bool,
        wait: Duration,
        rate_limit: (u32, Duration),
        max_blocking: usize,
    ) -> Self {
        Feed {
            api,
            stale,
            wait,
            rate_limit,
            blocking: Arc::new(Semaphore::new(max_blocking)),
            max_blocking,
            fetches: Arc::new(Semaphore::new(crate::SHARED_WATCH_READS)),
            subs: Mutex::new(Subs::default()),
        }
    }

    /// A blocking-query slot if one is free, else a subscription to come.
    pub(crate) fn wait_for(self: &Arc<Self>) -> Wait {
        match self.blocking.clone().try_acquire_owned() {
            Ok(_slot) => Wait::Blocking { _slot },
            Err(_) => Wait::Shared {
                feed: self.clone(),
                subscription: None,
            },
        }
    }

    /// How many watches may hold a blocking query of their own.
    pub(crate) fn max_blocking(&self) -> usize {
        self.max_blocking
    }

    /// Subscribes to `service`'s wakes, starting the loops if this is the first subscription
    /// (or if their task ended).
    pub(crate) fn subscribe(self: &Arc<Self>, service: &ServiceName) -> Subscription {
        debug!(service = %service, "consul watch: no blocking-query slot left; on the shared watch");
        let mut subs = self.lock();
        let rx = match subs.services.get_mut(service) {
            Some((tx, count)) => {
                *count += 1;
                tx.subscribe()
            }
            None => {
                let (tx, rx) = watch::channel(0);
                subs.services.insert(service.clone(), (tx, 1));
                rx
            }
        };
        self.ensure_running(&mut subs);
        let (baseline, start) = match &subs.task {
            Some(run) if !run.ended() => (run.baseline.subscribe(), run.start),
            // Started less than the backoff's longest delay ago and ended already: reading
            // at once is all a watch can do.
            _ => (watch::channel(true).1, 0),
        };
        Subscription {
            feed: self.clone(),
            service: service.clone(),
            rx,
            baseline,
            start,
        }
    }

    /// Starts the loops' task if none runs: the first time, after the last watch left, or
    /// after it ended. A task that panicked is started again at most once per backoff's longest
    /// delay (a bug that panics at once must not turn into a loop of starts); one whose runtime
    /// shut down, at once.
    fn ensure_running(self: &Arc<Self>, subs: &mut Subs) {
        let now = Instant::now();
        if let Some(run) = &mut subs.task {
            if !run.ended() {
                return;
            }
            // The task has ended, so its output is ready (or, a moment after the end, about to
            // be: then it counts as a panic, the cautious choice).
            let panicked = *run.panicked.get_or_insert_with(|| {
                !matches!(
                    futures::FutureExt::now_or_never(&mut run.handle),
                    Some(Err(e)) if e.is_cancelled()
                )
            });
            let recently = subs
                .started
                .is_some_and(|at| now.duration_since(at) < self.api.backoff.1);
            if panicked && recently {
                return;
            }
            warn!(
                panicked,
                "consul shared watch: its task ended ({}); starting it again",
                if panicked {
                    "it panicked"
                } else {
                    "its runtime shut down"
                }
            );
        } else {
            debug!("consul: starting the shared watch's catalog and checks queries");
        }
        let (baseline, _) = watch::channel(false);
        let (alive_tx, alive) = watch::channel(());
        let failing = Arc::new(AtomicUsize::new(0));
        let task = Task {
            baseline: baseline.clone(),
            loops_with_baseline: AtomicUsize::new(0),
            failing: failing.clone(),
            _alive: alive_tx,
        };
        if let Some(old) = subs.task.take() {
            old.handle.abort();
        }
        subs.starts += 1;
        subs.task = Some(Running {
            handle: tokio::spawn(run(self.clone(), task)),
            start: subs.starts,
            baseline,
            failing,
            alive,
            panicked: None,
        });
        subs.started = Some(now);
    }

    fn unsubscribe(&self, service: &ServiceName) {
        let mut subs = self.lock();
        if let Some((_, count)) = subs.services.get_mut(service) {
            *count -= 1;
            if *count == 0 {
                subs.services.remove(service);
            }
        }
        if subs.services.is_empty() {
            if let Some(run) = subs.task.take() {
                run.handle.abort();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subs> {
        // The map stays consistent through a panic elsewhere: every update is one operation.
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the watches of each named service that has any.
    fn wake<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let subs = self.lock();
        for name in names {
            if let Some((tx, _)) = ServiceName::new(name)
                .ok()
                .and_then(|n| subs.services.get(&n))
            {
                tx.send_modify(|g| *g += 1);
            }
        }
    }

    fn wake_all(&self, why: &str) {
        let subs = self.lock();
        debug!(
            services = subs.services.len(),
            "consul shared watch: every service re-reads ({why})"
        );
        for (tx, _) in subs.services.values() {
            tx.send_modify(|g| *g += 1);
        }
    }
}

/// What the two loops share: the indexes at which checks changed, and how far the checks loop
/// has read.
struct Correlation {
    explained: Mutex<BTreeSet<u64>>,
    checks_index: watch::Sender<u64>,
}

impl Correlation {
    fn explain(&self, indexes: impl IntoIterator<Item = u64>) {
        let mut set = self.explained.lock().unwrap_or_else(|e| e.into_inner());
        set.extend(indexes);
        while set.len() > EXPLAINED_KEPT {
            set.pop_first();
        }
    }

    fn explains(&self, index: u64) -> bool {
        self.explained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&index)
    }
}

/// What one run of the loops tells the watches besides wakes.
struct Task {
    /// `true` once watches may read: both loops have their baseline, or one failed.
    baseline: watch::Sender<bool>,
    loops_with_baseline: AtomicUsize,
    failing: Arc<AtomicUsize>,
    /// Dropped with the task's future, however the task ends: closes [`Running::alive`].
    _alive: watch::Sender<()>,
}

impl Task {
    /// One loop has its first answer; with both, watches may read.
    fn has_baseline(&self) {
        if self.loops_with_baseline.fetch_add(1, Ordering::AcqRel) == 1 {
            self.baseline.send_replace(true);
        }
    }
}

async fn run(feed: Arc<Feed>, task: Task) {
    let corr = Correlation {
        explained: Mutex::new(BTreeSet::new()),
        checks_index: watch::channel(0).0,
    };
    futures::future::join(
        catalog_loop(&feed, &corr, &task),
        checks_loop(&feed, &corr, &task),
    )
    .await;
}

/// One loop's pacing and failure bookkeeping (rules 4–6 of watching Consul).
struct Pace<'a> {
    task: &'a Task,
    index: u64,
    backoff: Backoff,
    bucket: TokenBucket,
    throttle: bool,
    failing: bool,
}

impl<'a> Pace<'a> {
    fn new(feed: &Feed, task: &'a Task) -> Self {
        Pace {
            task,
            index: 0,
            backoff: feed.api.backoff(),
            bucket: TokenBucket::new(
                feed.rate_limit.0,
                feed.rate_limit.1,
                tokio::time::Instant::now(),
            ),
            throttle: false,
            failing: false,
        }
    }

    async fn query(&mut self, feed: &Feed, path: &[&str]) -> Option<(u64, u64, Vec<u8>)> {
        if self.throttle {
            self.bucket.take().await;
        }
        let sent = self.index;
        match feed.api.list(path, feed.stale, sent, feed.wait).await {
            Ok((returned, body)) => {
                if self.failing {
                    self.failing = false;
                    self.task.failing.fetch_sub(1, Ordering::Relaxed);
                    info!(path = path.join("/"), "consul shared watch recovered");
                    feed.wake_all("the shared watch recovered: changes may have been missed");
                }
                self.backoff.reset();
                self.index = next_index(sent, returned);
                Some((sent, self.index, body))
            }
            Err(e) => self.failed(feed, path, e).await,
        }
    }

    async fn failed<T>(&mut self, feed: &Feed, path: &[&str], e: Error) -> Option<T> {
        let delay = self.backoff.next_delay();
        warn!(path = path.join("/"), retry_in = ?delay, "consul shared watch failed: {e}");
        if !self.failing {
            self.failing = true;
            self.task.failing.fetch_add(1, Ordering::Relaxed);
            // Each watch reads its service now: it reports the outage and retries on its own,
            // or, if the agent still answers it, polls until the shared watch recovers.
            self.task.baseline.send_replace(true);
            feed.wake_all("the shared watch failed");
        }
        self.index = 0;
        self.throttle = false;
        tokio::time::sleep(delay).await;
        None
    }
}

fn bad_body(path: &[&str], e: serde_json::Error) -> Error {
    Error::protocol(
        BACKEND,
        format!("GET /{}", path.join("/")),
        format!("unexpected answer ({e}); retried"),
    )
}

async fn catalog_loop(feed: &Feed, corr: &Correlation, task: &Task) {
    const PATH: [&str; 3] = ["v1", "catalog", "services"];
    let mut pace = Pace::new(feed, task);
    let mut known: Option<HashMap<String, Vec<String>>> = None;
    loop {
        let Some((sent, index, body)) = pace.query(feed, &PATH).await else {
            continue;
        };
        let services: HashMap<String, Vec<String>> = match serde_json::from_slice(&body) {
            Ok(s) => s,
            Err(e) => {
                pace.failed::<()>(feed, &PATH, bad_body(&PATH, e)).await;
                continue;
            }
        };
        if let Some(old) = &known {
            let changed = services
                .iter()
                .filter(|(name, tags)| old.get(*name) != Some(*tags))
                .map(|(name, _)| name.as_str())
                .chain(
                    old.keys()
                        .filter(|name| !services.contains_key(*name))
                        .map(String::as_str),
                );
            feed.wake(changed);
            if sent > 0 && index > sent && !explained(corr, index).await {
                feed.wake_all("a catalog write that no check change explains");
            }
        }
        if known.is_none() {
            task.has_baseline();
        }
        known = Some(services);
        // Rule 5: only a return that did not move the index can be a busy loop; a move is a
        // write, if not always one to a watched service.
        pace.throttle = index <= sent;
    }
}

/// Whether a check change was seen at `index`, once the checks loop has read that far (or
/// [`CORRELATE`] has passed).
async fn explained(corr: &Correlation, index: u64) -> bool {
    let mut rx = corr.checks_index.subscribe();
    let _ = tokio::time::timeout(CORRELATE, rx.wait_for(|&i| i >= index)).await;
    corr.explains(index)
}

/// A check as `/v1/health/state/any` lists it: only what tells a change.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    node: String,
    #[serde(rename = "CheckID")]
    check_id: String,
    #[serde(default)]
    service_name: String,
    #[serde(default)]
    modify_index: u64,
}

async fn checks_loop(feed: &Feed, corr: &Correlation, task: &Task) {
    const PATH: [&str; 4] = ["v1", "health", "state", "any"];
    let mut pace = Pace::new(feed, task);
    // (node, check id) → (service, modify index)
    let mut known: Option<HashMap<(String, String), (String, u64)>> = None;
    loop {
        let Some((sent, index, body)) = pace.query(feed, &PATH).await else {
            continue;
        };
        let checks: Vec<Check> = match serde_json::from_slice(&body) {
            Ok(c) => c,
            Err(e) => {
                pace.failed::<()>(feed, &PATH, bad_body(&PATH, e)).await;
                continue;
            }
        };
        let checks: HashMap<(String, String), (String, u64)> = checks
            .into_iter()
            .map(|c| ((c.node, c.check_id), (c.service_name, c.modify_index)))
            .collect();
        if let Some(old) = &known {
            let mut names: Vec<&str> = Vec::new();
            let mut at = Vec::new();
            for (key, (service, modified)) in &checks {
                if old.get(key).map(|(_, m)| m) != Some(modified) {
                    names.push(service);
                    at.push(*modified);
                }
            }
            for (key, (service, _)) in old {
                if !checks.contains_key(key) {
                    names.push(service);
                    at.push(index);
                }
            }
            corr.explain(at);
            if names.iter().any(|n| n.is_empty()) {
                // A node's own check: every service on it changed health.
                feed.wake_all("a node check changed");
            } else if names.is_empty() && sent > 0 && index > sent {
                // The index moved with nothing to show for it: a check-less instance went away.
                feed.wake_all("the checks' index moved without a visible change");
            } else {
                feed.wake(names);
            }
        }
        if known.is_none() {
            task.has_baseline();
        }
        known = Some(checks);
        corr.checks_index.send_replace(index);
        pace.throttle = index <= sent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONGEST: Duration = Duration::from_secs(60);

    /// A feed whose agent refuses connections: its loops fail and back off, which these
    /// tests do not look at.
    fn feed() -> Arc<Feed> {
        crate::Consul::builder()
            .address("http://127.0.0.1:9")
            .retry_backoff(Duration::from_millis(10), LONGEST)
            .build()
            .expect("a valid address")
            .feed
    }

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).expect("a valid name")
    }

    /// How the replaced task ends.
    enum End {
        Panic,
        /// What a runtime's shutdown leaves (the test with a real agent shuts one down).
        Cancel,
    }

    /// Puts in place of the running task one that ended as `end` says, once it has ended.
    async fn replace_task(feed: &Feed, end: End) {
        let (alive_tx, alive) = watch::channel(());
        let cancel = matches!(end, End::Cancel);
        let handle = tokio::spawn(async move {
            let _alive = alive_tx;
            match end {
                End::Panic => panic!("a bug in the loops"),
                End::Cancel => std::future::pending::<()>().await,
            }
        });
        if cancel {
            handle.abort();
        }
        while !handle.is_finished() {
            tokio::task::yield_now().await;
        }
        let mut subs = feed.lock();
        let old = subs
            .task
            .take()
            .expect("a task runs while a watch subscribes");
        old.handle.abort();
        subs.task = Some(Running {
            handle,
            start: old.start,
            baseline: old.baseline,
            failing: old.failing,
            alive,
            panicked: None,
        });
    }

    fn start(feed: &Feed) -> (u64, bool) {
        let subs = feed.lock();
        let run = subs.task.as_ref().expect("a task");
        (run.start, run.ended())
    }

    #[tokio::test]
    async fn a_task_that_panicked_is_started_again_only_after_the_longest_backoff() {
        let feed = feed();
        let _first = feed.subscribe(&name("a"));
        assert_eq!(start(&feed), (1, false));

        replace_task(&feed, End::Panic).await;
        assert_eq!(start(&feed), (1, true));
        // Started less than the longest backoff ago: a bug that panics at once must not turn
        // into a loop of starts.
        let second = feed.subscribe(&name("b"));
        assert_eq!(start(&feed), (1, true), "not started again yet");
        assert_eq!(
            second.start, 0,
            "the watch reads at once, with no baseline to wait for"
        );
        drop(second);
        // More watches meanwhile change nothing (the handle's output was read once).
        let _again = feed.subscribe(&name("b"));
        assert_eq!(start(&feed), (1, true), "still not started again");

        // Once the longest backoff has passed since the last start, the next watch starts it.
        let earlier = Instant::now().checked_sub(LONGEST).expect("the clock runs");
        feed.lock().started = Some(earlier);
        let third = feed.subscribe(&name("c"));
        assert_eq!(start(&feed), (2, false), "started again");
        assert_eq!(
            third.start, 2,
            "the watch waits for the new task's baseline"
        );
    }

    #[tokio::test]
    async fn a_task_whose_runtime_ended_it_is_started_again_at_once() {
        let feed = feed();
        let _first = feed.subscribe(&name("a"));
        replace_task(&feed, End::Cancel).await;
        assert_eq!(start(&feed), (1, true));
        let _second = feed.subscribe(&name("b"));
        assert_eq!(start(&feed), (2, false), "started again at once");
    }
}
