//! The balancer: a watch joined to a strategy, serving picks from an immutable snapshot.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::StreamExt;
use tokio::sync::watch;

use crate::discovery::Discovery;
use crate::endpoint::{clock_nanos, Endpoint, EndpointState, Outcome};
use crate::error::Error;
use crate::event::{Watch, WatchEvent};
use crate::instance::{InstanceId, ServiceInstance, ServiceName};
use crate::metrics::{BalancerMetrics, RequestMetrics};
use crate::strategy::{PickContext, Picker, Strategy};

/// What picks read: replaced whole on every update, never changed in place.
struct Snapshot {
    endpoints: Vec<Endpoint>,
    picker: Box<dyn Picker>,
}

/// Why the balancer serves a set other than the one the backend reported last.
///
/// ```
/// use waypost_core::FailStatic;
/// assert!(FailStatic::EmptyPush.to_string().contains("empty"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailStatic {
    /// The backend reported no instances; the last non-empty set is kept.
    EmptyPush,
    /// The watch reports errors; the last set received is kept until it recovers.
    BackendError(String),
}

impl fmt::Display for FailStatic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailStatic::EmptyPush => {
                f.write_str("the backend reported an empty set; serving the last non-empty one")
            }
            FailStatic::BackendError(e) => {
                write!(f, "the watch failed ({e}); serving the last known set")
            }
        }
    }
}

/// A picture of a balancer's health, for logs, metrics and readiness probes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalancerStatus {
    /// The service, when the balancer follows a watch.
    pub service: Option<ServiceName>,
    /// The strategy's name.
    pub strategy: String,
    /// Instances picks choose from now.
    pub serving: usize,
    /// Instances the backend reported last.
    pub reported: usize,
    /// Set when the served set differs from the reported one, and why. A
    /// [`BackendError`](FailStatic::BackendError) lasts from a watch error until the watch
    /// says [`WatchEvent::Synced`] again.
    pub fail_static: Option<FailStatic>,
    /// Whether the watch has said it is in sync with the backend ([`WatchEvent::Synced`]) and
    /// reported no error since. `false` before the first `Synced`, and for a balancer fed by
    /// hand until it is given one.
    pub in_sync: bool,
    /// Updates applied so far.
    pub updates: u64,
}

/// Why no instance could be picked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PickError {
    /// The balancer holds no instance.
    #[error("no instance{} is available: none is registered and passing its health check, or the watch has not delivered yet (see Balancer::status)", service_suffix(.service))]
    NoInstances {
        /// The service, when known.
        service: Option<ServiceName>,
    },
    /// Instances exist, but the strategy found none that fits the request (every one excluded or
    /// ejected).
    #[error("no instance{} fits this request (all {candidates} are excluded or ejected)", service_suffix(.service))]
    NoneFits {
        /// The service, when known.
        service: Option<ServiceName>,
        /// How many instances there were.
        candidates: usize,
    },
}

fn service_suffix(s: &Option<ServiceName>) -> String {
    s.as_ref().map(|s| format!(" of {s}")).unwrap_or_default()
}

/// Options of a [`Balancer`]; see [`Balancer::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct BalancerBuilder {
    strategy: Arc<dyn Strategy>,
    keep_last_on_empty: bool,
    service: Option<ServiceName>,
    instance_labels: bool,
}

impl fmt::Debug for dyn Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Strategy({})", self.name())
    }
}

impl BalancerBuilder {
    /// Whether an empty push keeps the last non-empty set (default `true`: an empty answer from a
    /// registry is far more often a glitch than a real "all gone", and a stale instance fails one
    /// request where an empty set fails all of them).
    pub fn keep_last_on_empty(mut self, keep: bool) -> Self {
        self.keep_last_on_empty = keep;
        self
    }

    /// Whether the per-instance metric series (`waypost_requests_total`,
    /// `waypost_requests_active`, `waypost_request_duration_seconds`) carry an `instance` label
    /// (default `true`). Turn it off for very large sets: the series are then per service only.
    /// Has no effect without the `metrics` feature.
    ///
    /// ```
    /// # use waypost_core::*;
    /// # struct First; struct P;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
    /// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// let balancer = Balancer::builder(First).metric_instance_labels(false).build();
    /// assert_eq!(balancer.status().serving, 0);
    /// ```
    pub fn metric_instance_labels(mut self, on: bool) -> Self {
        self.instance_labels = on;
        self
    }

    /// Names the service (for status and errors) without following a watch.
    pub fn service(mut self, service: ServiceName) -> Self {
        self.service = Some(service);
        self
    }

    /// A balancer fed by hand with [`Balancer::apply`].
    pub fn build(self) -> Balancer {
        let empty = Snapshot {
            picker: self.strategy.build(&[]),
            endpoints: Vec::new(),
        };
        let (ready, _) = watch::channel(0usize);
        let metrics = BalancerMetrics::new(self.service.as_ref().map(ServiceName::as_str));
        Balancer {
            shared: Arc::new(Shared {
                generation: std::sync::atomic::AtomicU64::new(0),
                metrics,
                instance_labels: self.instance_labels,
                current: ArcSwap::from_pointee(empty),
                updater: Mutex::new(Updater {
                    reported: BTreeMap::new(),
                    retired: None,
                    strategy: self.strategy,
                    fail_static: None,
                    in_sync: false,
                    updates: 0,
                }),
                keep_last_on_empty: self.keep_last_on_empty,
                service: self.service,
                ready,
                task: Mutex::new(None),
            }),
        }
    }

    /// A balancer that follows `discovery.watch(service)` on a background task (on the current
    /// Tokio runtime) until the last clone of the balancer is dropped.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn watch<D: Discovery + ?Sized>(
        mut self,
        discovery: &D,
        service: &ServiceName,
    ) -> Balancer {
        self.service = Some(service.clone());
        let watch = discovery.watch(service);
        self.build_from_watch(watch)
    }

    /// A balancer that follows an existing watch stream.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn build_from_watch(self, watch: Watch) -> Balancer {
        let balancer = self.build();
        let weak = Arc::downgrade(&balancer.shared);
        let task = tokio::spawn(follow(weak, watch));
        *lock(&balancer.shared.task) = Some(task.abort_handle());
        balancer
    }
}

/// Applies a watch to a balancer; ends when the balancer is gone or the watch ends.
async fn follow(shared: Weak<Shared>, mut watch: Watch) {
    while let Some(first) = watch.next().await {
        // Drain what is already queued so that a burst (a resync diff) costs one rebuild.
        let mut batch = vec![first];
        while let Some(Some(more)) = watch.now_or_never_ready() {
            batch.push(more);
            if batch.len() >= 1024 {
                break;
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let balancer = Balancer { shared };
        let mut events = Vec::with_capacity(batch.len());
        for item in batch {
            match item {
                Ok(ev) => events.push(ev),
                Err(e) => {
                    if !events.is_empty() {
                        balancer.apply_all(std::mem::take(&mut events));
                    }
                    balancer.report_error(&e);
                }
            }
        }
        if !events.is_empty() {
            balancer.apply_all(events);
        }
    }
    if let Some(shared) = shared.upgrade() {
        tracing::warn!(service = ?shared.service, "watch ended; the balancer keeps serving its last set");
    }
}

/// `FutureExt::now_or_never` on the next item, spelled for streams.
trait NowOrNever: StreamExt + Unpin {
    fn now_or_never_ready(&mut self) -> Option<Option<Self::Item>> {
        futures::FutureExt::now_or_never(self.next())
    }
}
impl<S: StreamExt + Unpin + ?Sized> NowOrNever for S {}

struct Shared {
    current: ArcSwap<Snapshot>,
    /// Counts the snapshots published, for [`Balancer::generation`].
    generation: std::sync::atomic::AtomicU64,
    metrics: BalancerMetrics,
    instance_labels: bool,
    updater: Mutex<Updater>,
    keep_last_on_empty: bool,
    service: Option<ServiceName>,
    /// Count of served instances, for `ready()`.
    ready: watch::Sender<usize>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

/// Update-side state; only `apply` and `set_strategy` take its lock, picks never do.
struct Updater {
    /// What the backend reported last, as endpoints (state attached).
    reported: BTreeMap<InstanceId, Endpoint>,
    /// The snapshot replaced by the last update, dropped at the next one: so that the update side,
    /// not a pick that happened to hold the last reference, pays for freeing it.
    retired: Option<Arc<Snapshot>>,
    strategy: Arc<dyn Strategy>,
    fail_static: Option<FailStatic>,
    /// A `Synced` came after the last error.
    in_sync: bool,
    updates: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data here (every write is a whole
    // replacement), so poisoning is not a reason to stop serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Joins a watch to a strategy: picks read an immutable snapshot without locking or allocating,
/// and are never blocked by an update. Cheap to clone; clones share everything.
///
/// ```
/// use waypost_core::{Balancer, Endpoint, PickContext, Picker, ServiceInstance, Strategy, WatchEvent};
/// # struct First; struct P;
/// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
/// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
/// let balancer = Balancer::new(First);
/// let a = ServiceInstance::builder("users", "a").host("10.0.0.1").port(80).build()?;
/// balancer.apply(WatchEvent::Snapshot(vec![a]));
/// let guard = balancer.pick()?;
/// assert_eq!(guard.instance().authority(), "10.0.0.1:80");
/// guard.success();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("status", &self.status())
            .finish()
    }
}

impl Balancer {
    /// A balancer with `strategy` and default options, fed by hand with [`apply`](Self::apply).
    pub fn new(strategy: impl Strategy) -> Self {
        Self::builder(strategy).build()
    }

    /// Options: fail-static behaviour, service name; then `build`, `watch` or `build_from_watch`.
    pub fn builder(strategy: impl Strategy) -> BalancerBuilder {
        BalancerBuilder {
            strategy: Arc::new(strategy),
            keep_last_on_empty: true,
            service: None,
            instance_labels: true,
        }
    }

    /// A balancer following `discovery.watch(service)`, with default options.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn watch<D: Discovery + ?Sized>(
        discovery: &D,
        service: &ServiceName,
        strategy: impl Strategy,
    ) -> Self {
        Self::builder(strategy).watch(discovery, service)
    }

    /// Picks an instance for a request without a key.
    pub fn pick(&self) -> Result<PickGuard, PickError> {
        self.pick_with(&PickContext::new())
    }

    /// Picks an instance for a request described by `ctx`. Lock-free and allocation-free.
    pub fn pick_with(&self, ctx: &PickContext<'_>) -> Result<PickGuard, PickError> {
        let snap = self.shared.current.load();
        if snap.endpoints.is_empty() {
            return Err(PickError::NoInstances {
                service: self.shared.service.clone(),
            });
        }
        match snap
            .picker
            .pick(&snap.endpoints, ctx)
            .and_then(|i| snap.endpoints.get(i))
        {
            Some(ep) => Ok(PickGuard::new(ep.clone())),
            None => Err(PickError::NoneFits {
                service: self.shared.service.clone(),
                candidates: snap.endpoints.len(),
            }),
        }
    }

    /// Picks an instance other than those in `exclude` (for a retry on a different instance).
    /// Falls back to an excluded one only when nothing else exists.
    pub fn pick_excluding(
        &self,
        ctx: &PickContext<'_>,
        exclude: &[InstanceId],
    ) -> Result<PickGuard, PickError> {
        let snap = self.shared.current.load();
        let eps = &snap.endpoints;
        if eps.is_empty() {
            return Err(PickError::NoInstances {
                service: self.shared.service.clone(),
            });
        }
        let excluded = |ep: &Endpoint| exclude.iter().any(|x| x == ep.id());
        // The strategy's own choice first, a few times (random strategies vary).
        for _ in 0..4 {
            if let Some(ep) = snap.picker.pick(eps, ctx).and_then(|i| eps.get(i)) {
                if !excluded(ep) {
                    return Ok(PickGuard::new(ep.clone()));
                }
            }
        }
        // Then the least loaded one not excluded (and not ejected by a resilience layer, if any
        // is left), so that retries still spread.
        let now = clock_nanos();
        let least_loaded = |ok: &dyn Fn(&Endpoint) -> bool| {
            eps.iter()
                .filter(|ep| ok(ep))
                .min_by_key(|ep| ep.state().in_flight())
        };
        let fallback = least_loaded(&|ep| !excluded(ep) && ep.state().ejected_until() <= now)
            .or_else(|| least_loaded(&|ep| !excluded(ep)))
            .or_else(|| eps.first());
        match fallback {
            Some(ep) => Ok(PickGuard::new(ep.clone())),
            None => Err(PickError::NoneFits {
                service: self.shared.service.clone(),
                candidates: eps.len(),
            }),
        }
    }

    /// Applies one watch event.
    pub fn apply(&self, event: WatchEvent) {
        self.apply_all([event]);
    }

    /// Applies several events with one rebuild.
    pub fn apply_all(&self, events: impl IntoIterator<Item = WatchEvent>) {
        let mut up = lock(&self.shared.updater);
        let current = self.shared.current.load();
        let state_for = |id: &InstanceId, reported: &BTreeMap<InstanceId, Endpoint>| {
            // Reuse the state of an instance seen before, in the reported set or (after an
            // empty push) in the served one, so counters and latency survive updates.
            reported
                .get(id)
                .or_else(|| {
                    current
                        .endpoints
                        .binary_search_by(|e| e.id().cmp(id))
                        .ok()
                        .map(|i| &current.endpoints[i])
                })
                .map(|e| e.shared_state().clone())
                .unwrap_or_else(|| Arc::new(EndpointState::new()))
        };
        let mut changed = false;
        let mut synced = false;
        let endpoint = |inst: ServiceInstance, state: Arc<EndpointState>| {
            let id = self.shared.instance_labels.then(|| inst.id().as_str());
            let metrics = RequestMetrics::new(inst.service().as_str(), id);
            Endpoint::with_metrics(inst, state, metrics)
        };
        for event in events {
            self.shared.metrics.event(&event);
            match event {
                WatchEvent::Snapshot(all) => {
                    let mut next = BTreeMap::new();
                    for inst in all {
                        let ep = match up.reported.get(inst.id()) {
                            Some(old) if old.instance() == &inst => old.clone(),
                            _ => endpoint(inst.clone(), state_for(inst.id(), &up.reported)),
                        };
                        next.insert(inst.id().clone(), ep);
                    }
                    up.reported = next;
                    changed = true;
                }
                WatchEvent::Added(inst) | WatchEvent::Updated(inst) => {
                    if up.reported.get(inst.id()).map(Endpoint::instance) != Some(&inst) {
                        let ep = endpoint(inst.clone(), state_for(inst.id(), &up.reported));
                        up.reported.insert(inst.id().clone(), ep);
                        changed = true;
                    }
                }
                WatchEvent::Removed(inst) => {
                    changed |= up.reported.remove(inst.id()).is_some();
                }
                WatchEvent::Synced => synced = true,
            }
        }
        drop(current);
        if changed {
            self.publish(&mut up);
        }
        // Only the watch's own word ends an error: a change that arrives during a resync does
        // not prove that the rest of the set has been caught up with.
        if synced {
            up.in_sync = true;
            if matches!(up.fail_static, Some(FailStatic::BackendError(_))) {
                up.fail_static = None;
                tracing::info!(service = ?self.shared.service, "watch in sync again");
            }
        }
        self.observe(&up);
    }

    /// Records a watch error: the served set stays as it is, and the status says why until a
    /// [`WatchEvent::Synced`] arrives.
    pub fn report_error(&self, error: &Error) {
        let mut up = lock(&self.shared.updater);
        tracing::warn!(service = ?self.shared.service, %error, "watch error; serving the last known instances");
        up.fail_static = Some(FailStatic::BackendError(error.to_string()));
        up.in_sync = false;
        self.shared
            .metrics
            .error(error.backend().unwrap_or("unknown"));
        self.observe(&up);
    }

    /// Sets the membership gauges from the update side's state.
    fn observe(&self, up: &Updater) {
        let current = self.shared.current.load();
        let served = current.picker.serving(&current.endpoints);
        self.shared
            .metrics
            .membership(up.reported.len(), served, up.fail_static.is_some());
    }

    /// Replaces the strategy; per-instance state is kept. Picks in progress finish on the old one.
    pub fn set_strategy(&self, strategy: impl Strategy) {
        let mut up = lock(&self.shared.updater);
        up.strategy = Arc::new(strategy);
        let endpoints = self.shared.current.load().endpoints.clone();
        let picker = up.strategy.build(&endpoints);
        let old = self
            .shared
            .current
            .swap(Arc::new(Snapshot { endpoints, picker }));
        up.retired = Some(old);
        self.observe(&up);
    }

    fn publish(&self, up: &mut Updater) {
        up.updates += 1;
        let served_now = self.shared.current.load().endpoints.len();
        if up.reported.is_empty() && self.shared.keep_last_on_empty && served_now > 0 {
            if up.fail_static != Some(FailStatic::EmptyPush) {
                tracing::warn!(service = ?self.shared.service, kept = served_now,
                    "backend reported no instances; keeping the last non-empty set");
            }
            up.fail_static = Some(FailStatic::EmptyPush);
            return;
        }
        if up.fail_static == Some(FailStatic::EmptyPush) {
            up.fail_static = None;
        }
        let endpoints: Vec<Endpoint> = up.reported.values().cloned().collect();
        let picker = up.strategy.build(&endpoints);
        let n = endpoints.len();
        let old = self
            .shared
            .current
            .swap(Arc::new(Snapshot { endpoints, picker }));
        up.retired = Some(old);
        self.shared
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        self.shared.ready.send_replace(n);
    }

    /// The instances picks choose from now, sorted by id.
    pub fn instances(&self) -> Vec<ServiceInstance> {
        self.shared
            .current
            .load()
            .endpoints
            .iter()
            .map(|e| e.instance().clone())
            .collect()
    }

    /// How many instance sets the balancer has served so far: it changes exactly when the set
    /// picks choose from changes. One atomic load; for code that keeps something per instance
    /// (a connection, a client) and must let go of instances that left.
    ///
    /// ```
    /// # use waypost_core::*;
    /// # struct First; struct P;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
    /// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// let balancer = Balancer::new(First);
    /// let before = balancer.generation();
    /// balancer.apply(WatchEvent::Snapshot(vec![ServiceInstance::builder("s", "a").host("h").port(1).build()?]));
    /// assert_ne!(balancer.generation(), before);
    /// let now = balancer.generation();
    /// balancer.apply(WatchEvent::Synced); // no change to the set
    /// assert_eq!(balancer.generation(), now);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn generation(&self) -> u64 {
        self.shared
            .generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The endpoints picks choose from now, with their load and health.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.shared.current.load().endpoints.clone()
    }

    /// Health and size, for logs and probes.
    pub fn status(&self) -> BalancerStatus {
        let up = lock(&self.shared.updater);
        BalancerStatus {
            service: self.shared.service.clone(),
            strategy: up.strategy.name().to_owned(),
            serving: self.shared.current.load().endpoints.len(),
            reported: up.reported.len(),
            fail_static: up.fail_static.clone(),
            in_sync: up.in_sync,
            updates: up.updates,
        }
    }

    /// Waits until at least one instance can be picked.
    pub async fn ready(&self) {
        let mut rx = self.shared.ready.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Waits up to `timeout` for an instance; `false` if none came.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.ready()).await.is_ok()
    }
}

/// One picked instance, for the length of one call. Counts the call as in flight until it is
/// dropped, and records its outcome and latency with [`success`](Self::success),
/// [`failure`](Self::failure) or [`record`](Self::record). Dropped without either, the call
/// counts as cancelled (no outcome).
///
/// ```
/// # use waypost_core::*;
/// # struct First; struct P;
/// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
/// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
/// # let balancer = Balancer::new(First);
/// # balancer.apply(WatchEvent::Snapshot(vec![ServiceInstance::builder("s", "a").host("h").port(1).build()?]));
/// let guard = balancer.pick()?;
/// assert_eq!(guard.endpoint().state().in_flight(), 1);
/// let state = guard.endpoint().clone();
/// guard.failure();
/// assert_eq!(state.state().in_flight(), 0);
/// assert_eq!(state.state().failures(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "the guard counts the call in flight until it is dropped"]
pub struct PickGuard {
    endpoint: Endpoint,
    started: Instant,
    done: bool,
}

impl PickGuard {
    fn new(endpoint: Endpoint) -> Self {
        endpoint.state().begin();
        endpoint.metrics().begin();
        PickGuard {
            endpoint,
            started: Instant::now(),
            done: false,
        }
    }

    /// The picked instance.
    pub fn instance(&self) -> &ServiceInstance {
        self.endpoint.instance()
    }

    /// The picked endpoint (instance and state).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Time since the pick.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The call succeeded.
    pub fn success(self) {
        self.record(Outcome::Success);
    }

    /// The call failed.
    pub fn failure(self) {
        self.record(Outcome::Failure);
    }

    /// Records `outcome` with the time since the pick as latency.
    pub fn record(mut self, outcome: Outcome) {
        self.done = true;
        let sample = Some((outcome, self.started.elapsed()));
        self.endpoint.state().end(sample);
        self.endpoint.metrics().end(sample);
    }
}

impl Drop for PickGuard {
    fn drop(&mut self) {
        if !self.done {
            self.endpoint.state().end(None);
            self.endpoint.metrics().end(None);
        }
    }
}

impl fmt::Debug for PickGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PickGuard")
            .field("endpoint", &self.endpoint)
            .field("elapsed", &self.elapsed())
            .finish()
    }
}
