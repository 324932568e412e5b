//! The balancer: a watch joined to a strategy, serving picks from an immutable snapshot.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::clock::Stamp;

use arc_swap::ArcSwap;
use futures::StreamExt;
use tokio::sync::watch;

use crate::discovery::Discovery;
use crate::endpoint::{Endpoint, EndpointState, Outcome};
use crate::error::Error;
use crate::event::{Watch, WatchEvent};
use crate::instance::{InstanceId, ServiceInstance, ServiceName};
use crate::metrics::{BalancerMetrics, RequestMetrics};
use crate::strategy::{PickContext, Picker, Strategy};
use crate::tiers::{self, Counts, TierStatus, DEFAULT_OVERPROVISIONING};

/// What picks read: replaced whole on every update, never changed in place.
struct Snapshot {
    /// Never empty: a balancer without failover tiers has one.
    tiers: Vec<Arc<TierSnapshot>>,
    /// Cumulative traffic thresholds, one per tier (see [`tiers::thresholds`]).
    thresholds: Vec<u64>,
    /// With tiers, the ids each tier reports (critical ones included), sorted: so that a retry
    /// can tell where an attempt went after its instance left the served set. Empty without.
    reported: Vec<Arc<Vec<InstanceId>>>,
}

/// One tier's instances and the picker built over them.
struct TierSnapshot {
    endpoints: Vec<Endpoint>,
    picker: Box<dyn Picker>,
}

impl TierSnapshot {
    fn pick(&self, ctx: &PickContext<'_>) -> Option<&Endpoint> {
        self.picker
            .pick(&self.endpoints, ctx)
            .and_then(|i| self.endpoints.get(i))
    }

    fn find(&self, id: &InstanceId) -> Option<&Endpoint> {
        entry(&self.endpoints, id)
    }
}

/// The endpoint of `id` in `list` (in id order).
fn entry<'a>(list: &'a [Endpoint], id: &InstanceId) -> Option<&'a Endpoint> {
    let i = list.binary_search_by(|e| e.id().cmp(id)).ok()?;
    list.get(i)
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
    /// The backend reported instances, all of them [critical](crate::Health::Critical); the
    /// last set with a healthy instance is kept.
    NoneHealthy,
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
            FailStatic::NoneHealthy => f.write_str(
                "every instance the backend reported is critical; serving the last healthy set",
            ),
        }
    }
}

/// A picture of a balancer's health, for logs, metrics and readiness probes.
///
/// ```
/// # use waypost_core::*;
/// # struct First; struct P;
/// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
/// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
/// let balancer = Balancer::builder(First).service("users".parse()?).build();
/// balancer.apply_all([WatchEvent::Snapshot(vec![ServiceInstance::builder("users", "a").host("h").port(1).build()?]), WatchEvent::Synced]);
/// balancer.report_error(&Error::unavailable("consul", "watch", "connection refused"));
/// let status = balancer.status();
/// assert_eq!((status.serving, status.reported, status.in_sync), (1, 1, false));
/// assert!(matches!(status.fail_static, Some(FailStatic::BackendError(_))));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalancerStatus {
    /// The service, when the balancer follows a watch.
    pub service: Option<ServiceName>,
    /// The strategy's name.
    pub strategy: String,
    /// Instances picks choose from now (in every tier).
    pub serving: usize,
    /// Instances the backend reported last (in every tier), critical ones included.
    pub reported: usize,
    /// Set when the served set differs from the reported one, and why (for a balancer with
    /// tiers: the first tier that is fail-static; see [`Balancer::tiers`]). A
    /// [`BackendError`](FailStatic::BackendError) lasts from a watch error until the watch
    /// says [`WatchEvent::Synced`] again.
    pub fail_static: Option<FailStatic>,
    /// Whether the watch has said it is in sync with the backend ([`WatchEvent::Synced`]) and
    /// reported no error since (every tier's watch, with tiers). `false` before the first
    /// `Synced`, and for a balancer fed by hand until it is given one.
    pub in_sync: bool,
    /// Updates applied so far.
    pub updates: u64,
}

/// Why no instance could be picked.
///
/// ```
/// # use waypost_core::*;
/// # struct First; struct P;
/// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
/// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
/// let balancer = Balancer::builder(First).service("users".parse()?).build();
/// let err = balancer.pick().unwrap_err();
/// assert!(matches!(err, PickError::NoInstances { .. }));
/// assert!(err.to_string().contains("no instance of users"), "{err}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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

/// Why no instance became available in time; see [`Balancer::ready_within`].
///
/// ```
/// # use waypost_core::*;
/// # struct First; struct P;
/// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
/// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let balancer = Balancer::builder(First).service("users".parse()?).build();
/// balancer.apply_all([WatchEvent::Snapshot(vec![]), WatchEvent::Synced]);
/// let why = balancer.ready_within(std::time::Duration::from_millis(5)).await.unwrap_err();
/// assert!(why.error().is_none() && why.reported() == 0);
/// assert!(why.to_string().contains("reports none"), "{why}");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct NotReady {
    service: Option<ServiceName>,
    waited: Duration,
    error: Option<Error>,
    reported: usize,
    synced: bool,
}

impl NotReady {
    /// The watch's last error, while it fails.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Instances the backend reported (all critical, when more than 0).
    pub fn reported(&self) -> usize {
        self.reported
    }
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no instance{} became available within {:?}: ",
            service_suffix(&self.service),
            self.waited
        )?;
        match &self.error {
            Some(e) => write!(f, "the watch fails: {e}"),
            None if self.reported > 0 => write!(
                f,
                "the backend reports {} instance(s), none passing its health check",
                self.reported
            ),
            None if self.synced => f.write_str(
                "the backend reports none: register one under this name (and check the name)",
            ),
            None => f.write_str("the watch has not answered yet"),
        }
    }
}

impl std::error::Error for NotReady {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.as_ref().map(|e| e as _)
    }
}

fn service_suffix(s: &Option<ServiceName>) -> String {
    s.as_ref().map(|s| format!(" of {s}")).unwrap_or_default()
}

/// Options of a [`Balancer`]; see [`Balancer::builder`].
///
/// ```
/// # use waypost_core::*;
/// # struct First; struct P;
/// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
/// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
/// let balancer = Balancer::builder(First)
///     .service("users".parse()?)
///     .keep_last_on_empty(false)
///     .build();
/// let a = ServiceInstance::builder("users", "a").host("h").port(1).build()?;
/// balancer.apply(WatchEvent::Snapshot(vec![a]));
/// balancer.apply(WatchEvent::Snapshot(vec![])); // believed: nothing is kept
/// assert_eq!(balancer.status().serving, 0);
/// assert_eq!(balancer.status().service.map(|s| s.to_string()).as_deref(), Some("users"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
pub struct BalancerBuilder {
    strategy: Arc<dyn Strategy>,
    keep_last_on_empty: bool,
    service: Option<ServiceName>,
    instance_labels: bool,
    tiers: Vec<(String, Option<Watch>)>,
    overprovisioning: u32,
    cancel_is_failure_after: Option<Duration>,
}

impl fmt::Debug for dyn Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Strategy({})", self.name())
    }
}

impl fmt::Debug for BalancerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancerBuilder")
            .field("strategy", &self.strategy)
            .field("keep_last_on_empty", &self.keep_last_on_empty)
            .field("service", &self.service)
            .field("instance_labels", &self.instance_labels)
            .field(
                "tiers",
                &self.tiers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("overprovisioning", &self.overprovisioning)
            .field("cancel_is_failure_after", &self.cancel_is_failure_after)
            .finish()
    }
}

impl BalancerBuilder {
    /// Whether an empty push keeps the last non-empty set (default `true`: an empty answer from a
    /// registry is far more often a glitch than a real "all gone", and a stale instance fails one
    /// request where an empty set fails all of them). The same holds for a push in which every
    /// instance is critical ([`FailStatic::NoneHealthy`]).
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

    /// Names the service (for status, errors and metrics). Defaults to the service of the
    /// watch given to [`watch`](Self::watch), or of the first [`tier`](Self::tier).
    pub fn service(mut self, service: ServiceName) -> Self {
        self.service = Some(service);
        self
    }

    /// Adds a failover tier that follows `discovery.watch(service)`. Tiers are in the order
    /// added, the first one preferred: it takes all the traffic while its healthy share ×
    /// the [overprovisioning](Self::overprovisioning) factor covers 100 %, and what it cannot
    /// take spills to the next ones (the whole rule is in the crate docs'
    /// [failover tiers](crate#failover-tiers) section; [`Balancer::tiers`] reports the shares).
    /// Each tier has its own strategy state and is fail-static on its
    /// own; an instance id that a higher tier serves is left out of the lower ones, so an
    /// instance registered in two registries (a migration) is counted and served once.
    ///
    /// For the health share to mean something, a tier's backend must report failing instances
    /// as [critical](crate::Health::Critical) rather than drop them (Consul with
    /// `passing_only(false)`). A backend that drops them (etcd, when a lease expires) makes a
    /// tier look healthy while any instance is left.
    pub fn tier<D: Discovery + ?Sized>(
        mut self,
        name: impl Into<String>,
        discovery: &D,
        service: &ServiceName,
    ) -> Self {
        if self.service.is_none() {
            self.service = Some(service.clone());
        }
        self.tiers
            .push((name.into(), Some(discovery.watch(service))));
        self
    }

    /// Adds a failover tier that follows an existing watch stream; see [`tier`](Self::tier).
    pub fn tier_from_watch(mut self, name: impl Into<String>, watch: Watch) -> Self {
        self.tiers.push((name.into(), Some(watch)));
        self
    }

    /// The overprovisioning factor of a balancer with tiers, in percent (default
    /// [`DEFAULT_OVERPROVISIONING`], Envoy's 140 %): a tier whose healthy share × this factor
    /// reaches 100 % takes all the traffic that reaches it. 100 spills as soon as one instance
    /// of the first tier is critical; 0 is taken as 1.
    pub fn overprovisioning(mut self, percent: u32) -> Self {
        self.overprovisioning = percent.max(1);
        self
    }

    /// A call cancelled (its [`PickGuard`] dropped without an outcome) after running this long
    /// counts as a failure, with its elapsed time as latency. Without it (the default) a
    /// cancelled call records no outcome, and an instance that is slow enough for callers to
    /// give up on it (a tower `Timeout`, `tokio::time::timeout` around a call) looks healthy
    /// to load-aware strategies and to outlier ejection. Set it to the callers' timeout, or a
    /// little below. A caller that knows its own deadline can also tell each guard
    /// ([`PickGuard::set_deadline`]). (A gRPC call with `grpc-timeout` needs neither: tonic's
    /// channel enforces it and the call fails, which is recorded.)
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use waypost_core::*;
    /// # struct First; struct P;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
    /// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// let balancer = Balancer::builder(First).cancel_is_failure_after(Duration::ZERO).build();
    /// balancer.apply(WatchEvent::Snapshot(vec![ServiceInstance::builder("s", "a").host("h").port(1).build()?]));
    /// drop(balancer.pick()?); // given up on
    /// assert_eq!(balancer.endpoints()[0].state().failures(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn cancel_is_failure_after(mut self, after: Duration) -> Self {
        self.cancel_is_failure_after = Some(after);
        self
    }

    /// Builds the balancer: fed by hand with [`Balancer::apply`] when no tier was added, else
    /// following every tier's watch on a background task each (until the last clone of the
    /// balancer is dropped).
    ///
    /// # Panics
    /// Outside a Tokio runtime, when tiers were added.
    pub fn build(mut self) -> Balancer {
        let mut watches = Vec::new();
        let names: Vec<String> = if self.tiers.is_empty() {
            vec![String::new()]
        } else {
            self.tiers
                .iter_mut()
                .map(|(name, watch)| {
                    watches.extend(watch.take());
                    name.clone()
                })
                .collect()
        };
        let balancer = self.build_tiers(&names);
        for (tier, watch) in watches.into_iter().enumerate() {
            balancer.follow(tier, watch);
        }
        balancer
    }

    fn build_tiers(&self, names: &[String]) -> Balancer {
        // The request path's clock calibrates once per process: here, not on the first pick.
        crate::clock::warm_up();
        let empty = || {
            Arc::new(TierSnapshot {
                picker: self.strategy.build(&[]),
                endpoints: Vec::new(),
            })
        };
        let (ready, _) = watch::channel(0usize);
        let service = self.service.as_ref().map(ServiceName::as_str);
        let metrics = BalancerMetrics::new(service, if names.len() > 1 { names } else { &[] });
        let first_only: Vec<u64> = std::iter::once(tiers::WHOLE)
            .chain(std::iter::repeat(tiers::WHOLE))
            .take(names.len())
            .collect();
        Balancer {
            shared: Arc::new(Shared {
                generation: AtomicU64::new(0),
                spill_seq: AtomicU64::new(0),
                metrics,
                instance_labels: self.instance_labels,
                current: ArcSwap::from_pointee(Snapshot {
                    tiers: names.iter().map(|_| empty()).collect(),
                    thresholds: first_only,
                    reported: Vec::new(),
                }),
                updater: Mutex::new(Updater {
                    tiers: names
                        .iter()
                        .map(|name| TierState {
                            name: name.clone(),
                            reported: BTreeMap::new(),
                            fail_static: None,
                            last_error: None,
                            in_sync: false,
                            counts: Counts::default(),
                            share: 0.0,
                            gap: Gap::Unknown,
                            spare: Spare::default(),
                        })
                        .collect(),
                    retired: None,
                    strategy: self.strategy.clone(),
                    updates: 0,
                }),
                keep_last_on_empty: self.keep_last_on_empty,
                overprovisioning: self.overprovisioning,
                cancel_is_failure_after: self.cancel_is_failure_after,
                service: self.service.clone(),
                ready,
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A balancer that follows `discovery.watch(service)` on a background task (on the current
    /// Tokio runtime) until the last clone of the balancer is dropped. With tiers added, this
    /// is one more tier (the last one), named after the service.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn watch<D: Discovery + ?Sized>(
        mut self,
        discovery: &D,
        service: &ServiceName,
    ) -> Balancer {
        if self.tiers.is_empty() {
            self.service = Some(service.clone());
            let watch = discovery.watch(service);
            self.build_from_watch(watch)
        } else {
            self.tier(service.as_str(), discovery, service).build()
        }
    }

    /// A balancer that follows an existing watch stream. With tiers added, this is one more
    /// tier (the last one).
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn build_from_watch(self, watch: Watch) -> Balancer {
        if self.tiers.is_empty() {
            let balancer = self.build_tiers(&[String::new()]);
            balancer.follow(0, watch);
            balancer
        } else {
            let name = format!("tier {}", self.tiers.len());
            self.tier_from_watch(name, watch).build()
        }
    }
}

/// Applies a watch to one tier of a balancer; ends when the balancer is gone or the watch
/// ends.
async fn follow(shared: Weak<Shared>, tier: usize, mut watch: Watch) {
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
                        balancer.apply_to(tier, std::mem::take(&mut events));
                    }
                    balancer.report_error_to(tier, &e);
                }
            }
        }
        if !events.is_empty() {
            balancer.apply_to(tier, events);
        }
    }
    if let Some(shared) = shared.upgrade() {
        tracing::warn!(service = ?shared.service, tier, "watch ended; the balancer keeps serving its last set");
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
    generation: AtomicU64,
    /// Numbers the picks without a key of a balancer with tiers (see [`tiers::weyl`]).
    spill_seq: AtomicU64,
    metrics: BalancerMetrics,
    instance_labels: bool,
    updater: Mutex<Updater>,
    keep_last_on_empty: bool,
    overprovisioning: u32,
    cancel_is_failure_after: Option<Duration>,
    service: Option<ServiceName>,
    /// Count of served instances, for `ready()`; sent on every publish, for `changed()`.
    ready: watch::Sender<usize>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

/// Update-side state; only `apply` and `set_strategy` take its lock, picks never do.
struct Updater {
    tiers: Vec<TierState>,
    /// The snapshot replaced by the last update, taken apart at the next one ([`harvest`]): so
    /// that the update side, not a pick that happened to hold the last reference, pays for
    /// freeing it, and so that the lists it replaced can be edited into the next ones.
    retired: Option<Arc<Snapshot>>,
    strategy: Arc<dyn Strategy>,
    updates: u64,
}

struct TierState {
    name: String,
    /// What the backend reported last, as endpoints (state attached), critical ones included.
    reported: BTreeMap<InstanceId, Endpoint>,
    fail_static: Option<FailStatic>,
    /// The watch's last error, until it says `Synced` again.
    last_error: Option<Error>,
    /// A `Synced` came after the last error.
    in_sync: bool,
    counts: Counts,
    share: f64,
    /// Where the lists the last change of this tier replaced (its served list, and with tiers
    /// its reported ids) may differ from the ones it made.
    gap: Gap,
    /// Replaced lists of this tier, to be edited into its next ones.
    spare: Spare,
}

impl TierState {
    /// Whether the tier serves a set it kept (fail-static), not what it reports.
    fn keeps(&self) -> bool {
        matches!(
            self.fail_static,
            Some(FailStatic::EmptyPush | FailStatic::NoneHealthy)
        )
    }
}

/// Up to how many ids an edit fixes a list in place; more are fixed in one pass over a copy
/// (see [`fixed`]). In place, each insert or remove shifts the list's tail: about as much as
/// the copy costs for two of them.
const FIX_IN_PLACE: usize = 2;

/// The ids at which a tier's replaced lists may differ from the current ones. An update that
/// changes a few instances then edits a replaced list at those ids and its own (the update
/// side is its only holder once picks let go of it), instead of cloning every endpoint into a
/// new list and dropping the old one: work in proportion to the change, and no write to the
/// reference counts of the endpoints that stay.
enum Gap {
    /// Not known (after a whole snapshot, or a list rebuilt): the list is not kept.
    Unknown,
    /// At most these ids.
    At(Vec<InstanceId>),
}

/// A tier's lists that the snapshot before the current one served, each with the ids at which
/// it may differ from the current one's. It keeps what the tier's last change removed alive
/// until the tier changes again (one change's worth: memory only).
#[derive(Default)]
struct Spare {
    endpoints: Option<(Vec<Endpoint>, Vec<InstanceId>)>,
    reported: Option<(Vec<InstanceId>, Vec<InstanceId>)>,
}

/// What an update's changes did to one tier's served list.
enum Edited {
    /// Nothing: every changed instance is served as before (or still not served). `counted`:
    /// how many reported instances the tier now counts as its own.
    Same { counted: usize },
    /// The new list.
    New { counted: usize, list: Vec<Endpoint> },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data here (every write is a whole
    // replacement), so poisoning is not a reason to stop serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Joins a watch to a strategy: picks read an immutable snapshot without locking or allocating,
/// and are never blocked by an update. Cheap to clone; clones share everything.
///
/// A balancer can also follow several watches as ordered failover tiers (a datacenter each,
/// or two registries during a migration): see [`BalancerBuilder::tier`].
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

    /// Options: fail-static behaviour, service name, failover tiers; then `build`, `watch` or
    /// `build_from_watch`.
    pub fn builder(strategy: impl Strategy) -> BalancerBuilder {
        BalancerBuilder {
            strategy: Arc::new(strategy),
            keep_last_on_empty: true,
            service: None,
            instance_labels: true,
            tiers: Vec::new(),
            overprovisioning: DEFAULT_OVERPROVISIONING,
            cancel_is_failure_after: None,
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

    fn follow(&self, tier: usize, watch: Watch) {
        let weak = Arc::downgrade(&self.shared);
        let task = tokio::spawn(follow(weak, tier, watch));
        lock(&self.shared.tasks).push(task.abort_handle());
    }

    /// Picks an instance for a request without a key.
    pub fn pick(&self) -> Result<PickGuard, PickError> {
        self.pick_with(&PickContext::new())
    }

    /// Picks an instance for a request described by `ctx`. Lock-free and allocation-free.
    ///
    /// With tiers, the tier comes first: a request with a key always lands in the same tier
    /// while the shares stay the same, requests without one spread over the tiers in exactly
    /// their shares. A tier that holds no instance that fits passes the request on to the
    /// others, in order.
    pub fn pick_with(&self, ctx: &PickContext<'_>) -> Result<PickGuard, PickError> {
        let snap = self.shared.current.load();
        if snap.tiers.len() == 1 {
            let tier = &snap.tiers[0];
            if tier.endpoints.is_empty() {
                return Err(self.no_instances());
            }
            return match tier.pick(ctx) {
                Some(ep) => Ok(self.guard(ep, 0)),
                None => Err(self.none_fits(&snap)),
            };
        }
        let first = self.choose_tier(&snap, ctx);
        for t in tier_order(first, snap.tiers.len()) {
            if let Some(ep) = snap.tiers[t].pick(ctx) {
                return Ok(self.guard(ep, t));
            }
        }
        if snap.tiers.iter().all(|t| t.endpoints.is_empty()) {
            Err(self.no_instances())
        } else {
            Err(self.none_fits(&snap))
        }
    }

    fn guard(&self, endpoint: &Endpoint, tier: usize) -> PickGuard {
        let mut guard = PickGuard::new(endpoint.clone(), tier);
        guard.fail_after = self.shared.cancel_is_failure_after;
        guard
    }

    fn choose_tier(&self, snap: &Snapshot, ctx: &PickContext<'_>) -> usize {
        let x = u64::from(match ctx.hash() {
            Some(h) => tiers::mix(h),
            None => tiers::weyl(self.shared.spill_seq.fetch_add(1, Ordering::Relaxed)),
        });
        snap.thresholds
            .iter()
            .position(|t| x < *t)
            .unwrap_or(snap.tiers.len() - 1)
    }

    fn no_instances(&self) -> PickError {
        PickError::NoInstances {
            service: self.shared.service.clone(),
        }
    }

    fn none_fits(&self, snap: &Snapshot) -> PickError {
        PickError::NoneFits {
            service: self.shared.service.clone(),
            candidates: snap.tiers.iter().map(|t| t.endpoints.len()).sum(),
        }
    }

    /// Picks an instance other than those in `exclude` (for a retry on a different instance).
    /// Falls back to an excluded one only when nothing else exists.
    ///
    /// With tiers, the first retry stays in the tier of the first attempt (another instance
    /// there: locality), and later ones go on to the next tier (then the ones before), so
    /// that a tier that went away costs a request at most two attempts there. A tier whose
    /// every instance was tried is skipped. An attempt is placed by where its instance is
    /// served or reported now (a tried instance that turned critical since still places it).
    pub fn pick_excluding(
        &self,
        ctx: &PickContext<'_>,
        exclude: &[InstanceId],
    ) -> Result<PickGuard, PickError> {
        let snap = self.shared.current.load();
        if snap.tiers.iter().all(|t| t.endpoints.is_empty()) {
            return Err(self.no_instances());
        }
        if snap.tiers.len() == 1 {
            return match pick_excluding_in(&snap.tiers[0], ctx, exclude, true) {
                Some(ep) => Ok(self.guard(ep, 0)),
                None => Err(self.none_fits(&snap)),
            };
        }
        let n = snap.tiers.len();
        // An attempt's tier: where its instance is served, or reported (critical, say: it left
        // the served set after it was tried).
        let tier_of = |id: &InstanceId| {
            (0..n).find(|&t| {
                snap.tiers[t].find(id).is_some()
                    || snap
                        .reported
                        .get(t)
                        .is_some_and(|r| r.binary_search(id).is_ok())
            })
        };
        // Where the call started: its first attempt that can still be placed.
        let start = match exclude.iter().find_map(tier_of) {
            Some(home) if exclude.len() >= 2 => (home + 1) % n,
            Some(home) => home,
            None => self.choose_tier(&snap, ctx),
        };
        let spent = |t: usize| {
            let tier = &snap.tiers[t];
            let tried = exclude.iter().filter(|id| tier.find(id).is_some()).count();
            tried >= tier.endpoints.len()
        };
        for t in tier_order(start, n) {
            if spent(t) {
                continue;
            }
            if let Some(ep) = pick_excluding_in(&snap.tiers[t], ctx, exclude, false) {
                return Ok(self.guard(ep, t));
            }
        }
        // Every tier spent: an excluded one rather than nothing.
        for t in tier_order(start, n) {
            if let Some(ep) = pick_excluding_in(&snap.tiers[t], ctx, exclude, true) {
                return Ok(self.guard(ep, t));
            }
        }
        Err(self.none_fits(&snap))
    }

    /// Applies one watch event (to the first tier).
    pub fn apply(&self, event: WatchEvent) {
        self.apply_all([event]);
    }

    /// Applies several events with one rebuild (to the first tier).
    pub fn apply_all(&self, events: impl IntoIterator<Item = WatchEvent>) {
        self.apply_to(0, events);
    }

    /// Applies several events to tier `tier` (in the order the tiers were added) with one
    /// rebuild. Does nothing for a tier that does not exist.
    pub fn apply_to(&self, tier: usize, events: impl IntoIterator<Item = WatchEvent>) {
        let mut up = lock(&self.shared.updater);
        let current = self.shared.current.load();
        let Some(served) = current.tiers.get(tier) else {
            return;
        };
        let state_for = |id: &InstanceId, reported: &BTreeMap<InstanceId, Endpoint>| {
            // Reuse the state of an instance seen before, in the reported set or (after an
            // empty push) in the served one, so counters and latency survive updates.
            reported
                .get(id)
                .or_else(|| served.find(id))
                .map(|e| e.shared_state().clone())
                .unwrap_or_else(|| Arc::new(EndpointState::new()))
        };
        let mut changed = false;
        // The ids the events changed; `None` after a whole snapshot.
        let mut touched: Option<Vec<InstanceId>> = Some(Vec::new());
        let mut synced = false;
        let endpoint = |inst: ServiceInstance, state: Arc<EndpointState>| {
            let id = self.shared.instance_labels.then(|| inst.id().as_str());
            let metrics = RequestMetrics::new(inst.service().as_str(), id);
            Endpoint::with_metrics(inst, state, metrics)
        };
        let ts = &mut up.tiers[tier];
        for event in events {
            self.shared.metrics.event(&event);
            match event {
                WatchEvent::Snapshot(all) => {
                    let mut next = BTreeMap::new();
                    for inst in all {
                        let ep = match ts.reported.get(inst.id()) {
                            Some(old) if old.instance() == &inst => old.clone(),
                            _ => endpoint(inst.clone(), state_for(inst.id(), &ts.reported)),
                        };
                        next.insert(inst.id().clone(), ep);
                    }
                    ts.reported = next;
                    changed = true;
                    touched = None;
                }
                WatchEvent::Added(inst) | WatchEvent::Updated(inst) => {
                    if ts.reported.get(inst.id()).map(Endpoint::instance) != Some(&inst) {
                        let ep = endpoint(inst.clone(), state_for(inst.id(), &ts.reported));
                        ts.reported.insert(inst.id().clone(), ep);
                        changed = true;
                        if let Some(t) = &mut touched {
                            t.push(inst.id().clone());
                        }
                    }
                }
                WatchEvent::Removed(inst) => {
                    if ts.reported.remove(inst.id()).is_some() {
                        changed = true;
                        if let Some(t) = &mut touched {
                            t.push(inst.id().clone());
                        }
                    }
                }
                WatchEvent::Synced => synced = true,
            }
        }
        // Only the watch's own word ends an error: a change that arrives during a resync does
        // not prove that the rest of the set has been caught up with.
        if synced {
            ts.in_sync = true;
            ts.last_error = None;
            if matches!(ts.fail_static, Some(FailStatic::BackendError(_))) {
                ts.fail_static = None;
                tracing::info!(service = ?self.shared.service, tier = %ts.name, "watch in sync again");
            }
        }
        drop(current);
        if changed {
            up.updates += 1;
            self.publish(&mut up, tier, touched.as_deref());
        }
        self.observe(&up);
    }

    /// Records a watch error (of the first tier): the served set stays as it is, and the
    /// status says why until a [`WatchEvent::Synced`] arrives.
    pub fn report_error(&self, error: &Error) {
        self.report_error_to(0, error);
    }

    /// Records a watch error of tier `tier`; see [`report_error`](Self::report_error).
    pub fn report_error_to(&self, tier: usize, error: &Error) {
        let mut up = lock(&self.shared.updater);
        let Some(ts) = up.tiers.get_mut(tier) else {
            return;
        };
        tracing::warn!(service = ?self.shared.service, tier = %ts.name, %error, "watch error; serving the last known instances");
        ts.fail_static = Some(FailStatic::BackendError(error.to_string()));
        ts.last_error = Some(error.clone());
        ts.in_sync = false;
        self.shared
            .metrics
            .error(error.backend().unwrap_or("unknown"));
        self.observe(&up);
    }

    /// Sets the membership gauges from the update side's state.
    fn observe(&self, up: &Updater) {
        let current = self.shared.current.load();
        let served: usize = current
            .tiers
            .iter()
            .map(|t| t.picker.serving(&t.endpoints))
            .sum();
        let reported = up.tiers.iter().map(|t| t.reported.len()).sum();
        let fail_static = up.tiers.iter().any(|t| t.fail_static.is_some());
        self.shared
            .metrics
            .membership(reported, served, fail_static);
    }

    /// Replaces the strategy (of every tier); per-instance state is kept. Picks in progress
    /// finish on the old one.
    pub fn set_strategy(&self, strategy: impl Strategy) {
        let mut up = lock(&self.shared.updater);
        up.strategy = Arc::new(strategy);
        let current = self.shared.current.load_full();
        let tiers = current
            .tiers
            .iter()
            .map(|t| {
                Arc::new(TierSnapshot {
                    picker: up.strategy.build(&t.endpoints),
                    endpoints: t.endpoints.clone(),
                })
            })
            .collect();
        let old = self.shared.current.swap(Arc::new(Snapshot {
            tiers,
            thresholds: current.thresholds.clone(),
            reported: current.reported.clone(),
        }));
        drop(current);
        up.retired = Some(old);
        // The retired snapshot serves the same lists.
        for ts in &mut up.tiers {
            ts.gap = Gap::At(Vec::new());
        }
        self.observe(&up);
    }

    /// Rebuilds what changed: each tier's served set (healthy instances that no higher tier
    /// serves, or the last set when fail-static), the tiers' shares, and the snapshot. Only
    /// tier `from`'s reported set changed (at `touched`, when known), so the tiers above it
    /// serve what they served.
    ///
    /// With `touched` known, each tier from `from` down is edited at those ids rather than
    /// rebuilt ([`edit_tier`]) for as long as the tiers above it change only there; the first
    /// tier that starts or stops keeping its last set, and every tier below it, is rebuilt.
    fn publish(&self, up: &mut Updater, from: usize, touched: Option<&[InstanceId]>) {
        let current = self.shared.current.load_full();
        harvest(up, &current);
        let many = up.tiers.len() > 1;
        // With tiers, the ids each tier reported, as the last publish left them (none yet
        // before the first).
        let reported_before =
            (current.reported.len() == up.tiers.len()).then_some(&current.reported);
        let mut editing = touched.filter(|_| !many || reported_before.is_some());
        // Per tier: the gap this publish leaves between its lists and the ones it replaces,
        // for the tiers it changes; set only if the snapshot is swapped.
        let mut gaps: Vec<Option<Gap>> = (0..up.tiers.len()).map(|_| None).collect();
        let mut next: Vec<Arc<TierSnapshot>> = Vec::with_capacity(up.tiers.len());
        let mut changed = false;
        for (i, gap) in gaps.iter_mut().enumerate() {
            let old = &current.tiers[i];
            if i < from {
                // Neither its reported set nor those of the tiers above it changed.
                next.push(old.clone());
                continue;
            }
            let (higher, rest) = up.tiers.split_at_mut(i);
            let ts = &mut rest[0];
            if let Some(touched) = editing.filter(|_| !ts.keeps()) {
                let reported_before = reported_before
                    .filter(|_| i == from)
                    .and_then(|r| r.get(i))
                    .map(|r| &r[..]);
                let fix = TierFix {
                    touched,
                    above: (higher, &next, &current.tiers[..i]),
                    reported_before,
                    keep_on_empty: self.shared.keep_last_on_empty,
                };
                match edit_tier(ts, &old.endpoints, fix) {
                    Some(Edited::Same { counted }) => {
                        // The served list stays; only the reported count may have moved.
                        ts.counts.reported = counted;
                        next.push(old.clone());
                        continue;
                    }
                    Some(Edited::New { counted, list }) => {
                        ts.counts = Counts {
                            reported: counted,
                            healthy: list.len(),
                            serving: list.len(),
                        };
                        changed = true;
                        *gap = Some(Gap::At(touched.to_vec()));
                        next.push(Arc::new(TierSnapshot {
                            picker: up.strategy.build(&list),
                            endpoints: list,
                        }));
                        continue;
                    }
                    // The list would empty out and may be kept: decided below, for this tier
                    // and the ones after it.
                    None => {}
                }
            }
            editing = None;
            // What the tiers above serve, in id order as the reported set is, so that one walk
            // along both leaves those out: no set of ids to build and look up.
            let mut above = served_above(higher, &next, &ts.reported)
                .into_iter()
                .peekable();
            let (counted, healthy) = if above.peek().is_none() {
                // Without tiers, the walk as it was before them.
                healthy_of(ts.reported.values(), ts.reported.len())
            } else {
                let not_above = |e: &&Endpoint| {
                    let id = e.id();
                    while above.next_if(|a| *a < id).is_some() {}
                    above.peek() != Some(&id)
                };
                healthy_of(ts.reported.values().filter(not_above), ts.reported.len())
            };
            let keep = if healthy.is_empty()
                && self.shared.keep_last_on_empty
                && !old.endpoints.is_empty()
            {
                if ts.reported.is_empty() {
                    Some(FailStatic::EmptyPush)
                } else if counted > 0 {
                    Some(FailStatic::NoneHealthy)
                } else {
                    // Every instance is served by a higher tier: nothing to keep here.
                    None
                }
            } else {
                None
            };
            ts.counts = Counts {
                reported: counted,
                healthy: healthy.len(),
                serving: if keep.is_some() {
                    old.endpoints.len()
                } else {
                    healthy.len()
                },
            };
            match keep {
                Some(why) => {
                    if ts.fail_static.as_ref() != Some(&why) {
                        tracing::warn!(service = ?self.shared.service, tier = %ts.name, kept = old.endpoints.len(), "{why}");
                    }
                    ts.fail_static = Some(why);
                    next.push(old.clone());
                }
                None => {
                    if ts.keeps() {
                        ts.fail_static = None;
                    }
                    if same_endpoints(&old.endpoints, &healthy) {
                        next.push(old.clone());
                    } else {
                        changed = true;
                        // The spare differed from the list replaced now, not from the new one.
                        ts.spare.endpoints = None;
                        *gap = Some(Gap::Unknown);
                        next.push(Arc::new(TierSnapshot {
                            picker: up.strategy.build(&healthy),
                            endpoints: healthy,
                        }));
                    }
                }
            }
        }
        let counts: Vec<Counts> = up.tiers.iter().map(|t| t.counts).collect();
        let shares = if many {
            tiers::shares(&counts, self.shared.overprovisioning)
        } else {
            vec![1.0]
        };
        let thresholds = if many {
            tiers::thresholds(&shares)
        } else {
            vec![tiers::WHOLE]
        };
        for (ts, share) in up.tiers.iter_mut().zip(&shares) {
            ts.share = *share;
        }
        if many {
            self.shared.metrics.tier_shares(&shares);
        }
        let reported: Vec<Arc<Vec<InstanceId>>> = if many {
            let mut reported = Vec::with_capacity(up.tiers.len());
            for (i, ts) in up.tiers.iter_mut().enumerate() {
                let ids = match (current.reported.get(i), touched) {
                    // Only tier `from` reported anything new.
                    (Some(old), _) if i != from => old.clone(),
                    (Some(old), Some(touched)) => {
                        let same = touched.iter().all(|id| {
                            old.binary_search(id).is_ok() == ts.reported.contains_key(id)
                        });
                        if same {
                            old.clone()
                        } else {
                            // Edited at the ids that changed, like the served lists.
                            let (list, gap) = ts
                                .spare
                                .reported
                                .take()
                                .unwrap_or_else(|| (old.to_vec(), Vec::new()));
                            let fix = sorted_ids(touched, &gap);
                            let keys = &ts.reported;
                            let now = |id: &InstanceId| keys.get_key_value(id).map(|(k, _)| k);
                            let list = fixed(list, &fix, |id| id, now, |a, b| a == b);
                            // (Or unknown already, when the served list was rebuilt.)
                            gaps[i].get_or_insert_with(|| Gap::At(touched.to_vec()));
                            Arc::new(list)
                        }
                    }
                    // Compared before collected: the ids are the same `Arc`s, equal at a glance.
                    (Some(old), None)
                        if old.len() == ts.reported.len() && old.iter().eq(ts.reported.keys()) =>
                    {
                        old.clone()
                    }
                    _ => {
                        ts.spare.reported = None;
                        gaps[i] = Some(Gap::Unknown);
                        Arc::new(ts.reported.keys().cloned().collect())
                    }
                };
                reported.push(ids);
            }
            reported
        } else {
            Vec::new()
        };
        let reported_changed = reported.len() != current.reported.len()
            || reported
                .iter()
                .zip(&current.reported)
                .any(|(a, b)| !Arc::ptr_eq(a, b));
        let moved = changed || thresholds != current.thresholds;
        if !moved && !reported_changed {
            return;
        }
        let n = next.iter().map(|t| t.endpoints.len()).sum();
        let old = self.shared.current.swap(Arc::new(Snapshot {
            tiers: next,
            thresholds,
            reported,
        }));
        drop(current);
        up.retired = Some(old);
        for (ts, gap) in up.tiers.iter_mut().zip(gaps) {
            if let Some(gap) = gap {
                ts.gap = gap;
            }
        }
        // What picks choose from is the same when only the reported ids moved.
        if moved {
            self.shared.generation.fetch_add(1, Ordering::Release);
            self.shared.ready.send_replace(n);
        }
    }

    /// The instances picks choose from now, tier by tier, each tier sorted by id; an id served
    /// by two tiers is listed once.
    pub fn instances(&self) -> Vec<ServiceInstance> {
        self.endpoints()
            .into_iter()
            .map(|e| e.instance().clone())
            .collect()
    }

    /// How many instance sets the balancer has served so far: it changes exactly when the set
    /// picks choose from changes (or, with tiers, the tiers' shares). One atomic load; for code
    /// that keeps something per instance (a connection, a client) and must let go of instances
    /// that left.
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
        self.shared.generation.load(Ordering::Acquire)
    }

    /// The endpoints picks choose from now, with their load and health: tier by tier, each
    /// tier sorted by id; an id served by two tiers (a fail-static one) is listed once.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let snap = self.shared.current.load();
        if snap.tiers.len() == 1 {
            return snap.tiers[0].endpoints.clone();
        }
        let mut seen = std::collections::BTreeSet::new();
        snap.tiers
            .iter()
            .flat_map(|t| t.endpoints.iter())
            .filter(|e| seen.insert(e.id().clone()))
            .cloned()
            .collect()
    }

    /// Health and size, for logs and probes.
    pub fn status(&self) -> BalancerStatus {
        let up = lock(&self.shared.updater);
        let snap = self.shared.current.load();
        BalancerStatus {
            service: self.shared.service.clone(),
            strategy: up.strategy.name().to_owned(),
            serving: snap.tiers.iter().map(|t| t.endpoints.len()).sum(),
            reported: up.tiers.iter().map(|t| t.reported.len()).sum(),
            fail_static: up.tiers.iter().find_map(|t| t.fail_static.clone()),
            in_sync: up.tiers.iter().all(|t| t.in_sync),
            updates: up.updates,
        }
    }

    /// Each tier's health and share of the traffic, in order (one entry, named `""`, for a
    /// balancer without tiers). [`PickGuard::tier`] is an index into this list.
    pub fn tiers(&self) -> Vec<TierStatus> {
        let up = lock(&self.shared.updater);
        let snap = self.shared.current.load();
        up.tiers
            .iter()
            .zip(&snap.tiers)
            .map(|(ts, served)| TierStatus {
                name: ts.name.clone(),
                reported: ts.counts.reported,
                healthy: ts.counts.healthy,
                serving: served.endpoints.len(),
                share: if up.tiers.len() == 1 { 1.0 } else { ts.share },
                fail_static: ts.fail_static.clone(),
                in_sync: ts.in_sync,
            })
            .collect()
    }

    /// Waits until at least one instance can be picked.
    pub async fn ready(&self) {
        let mut rx = self.shared.ready.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Waits up to `timeout` for an instance; `false` if none came. [`ready_within`](Self::ready_within)
    /// says why.
    #[must_use = "false means that no instance can be picked"]
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.ready()).await.is_ok()
    }

    /// Waits up to `timeout` for an instance; if none came, says why: the watch's last error
    /// (an unreachable backend, a refused token: the error says which, and what to do), or
    /// what the backend reported (nothing, or instances that are all critical).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use waypost_core::*;
    /// # struct First; struct P;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
    /// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let balancer = Balancer::builder(First).service("users".parse().unwrap()).build();
    /// balancer.report_error(&Error::unavailable("consul", "watch", "connection refused"));
    /// let why = balancer.ready_within(Duration::from_millis(10)).await.unwrap_err();
    /// assert!(why.error().is_some_and(Error::is_retryable));
    /// assert!(why.to_string().contains("connection refused"), "{why}");
    /// # }
    /// ```
    pub async fn ready_within(&self, timeout: Duration) -> Result<(), NotReady> {
        if self.wait_ready(timeout).await {
            return Ok(());
        }
        let up = lock(&self.shared.updater);
        Err(NotReady {
            service: self.shared.service.clone(),
            waited: timeout,
            error: up.tiers.iter().find_map(|t| t.last_error.clone()),
            reported: up.tiers.iter().map(|t| t.reported.len()).sum(),
            synced: up.tiers.iter().any(|t| t.in_sync),
        })
    }

    /// Waits until the set picks choose from (or, with tiers, the tiers' shares) differs from
    /// generation `since` (see [`generation`](Self::generation)), and returns the new
    /// generation: a loop that passes back what it got never misses a change and never polls.
    ///
    /// ```
    /// # use waypost_core::*;
    /// # struct First; struct P;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
    /// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let balancer = Balancer::new(First);
    /// let seen = balancer.generation();
    /// let feeder = balancer.clone();
    /// tokio::spawn(async move {
    ///     let a = ServiceInstance::builder("s", "a").host("h").port(1).build().unwrap();
    ///     feeder.apply(WatchEvent::Snapshot(vec![a]));
    /// });
    /// let now = balancer.changed(seen).await;
    /// assert_ne!(now, seen);
    /// assert_eq!(balancer.instances().len(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn changed(&self, since: u64) -> u64 {
        let mut rx = self.shared.ready.subscribe();
        loop {
            let now = self.generation();
            if now != since {
                return now;
            }
            // Every publish sends on this channel after moving the generation, so a change
            // after the load above wakes this up. The sender lives as long as `self`.
            if rx.changed().await.is_err() {
                return self.generation();
            }
        }
    }
}

/// Tiers from `first` on, then those before it.
fn tier_order(first: usize, n: usize) -> impl Iterator<Item = usize> {
    (first..n).chain(0..first.min(n))
}

/// Takes the retired snapshot apart once no pick holds it: each list of a tier that the last
/// update replaced (with tiers, its reported ids too) becomes that tier's spare, to be edited
/// at the last update's gap into the next list. A list the last update did not replace is
/// also the current one's: dropped here (the spare taken from it earlier still applies).
fn harvest(up: &mut Updater, current: &Snapshot) {
    let Some(retired) = up.retired.take() else {
        return;
    };
    let retired = match Arc::try_unwrap(retired) {
        Ok(retired) => retired,
        // A pick still holds it: it is freed later, as before.
        Err(shared) => {
            up.retired = Some(shared);
            return;
        }
    };
    let mut reported = retired.reported.into_iter();
    for (i, (tier, ts)) in retired.tiers.into_iter().zip(&mut up.tiers).enumerate() {
        let ids = reported.next();
        let Gap::At(gap) = &ts.gap else {
            continue;
        };
        if !Arc::ptr_eq(&tier, &current.tiers[i]) {
            if let Ok(tier) = Arc::try_unwrap(tier) {
                ts.spare.endpoints = Some((tier.endpoints, gap.clone()));
            }
        }
        if let (Some(ids), Some(now)) = (ids, current.reported.get(i)) {
            if !Arc::ptr_eq(&ids, now) {
                if let Ok(ids) = Arc::try_unwrap(ids) {
                    ts.spare.reported = Some((ids, gap.clone()));
                }
            }
        }
    }
}

/// `touched` and `gap` together, sorted, each id once.
fn sorted_ids<'a>(touched: &'a [InstanceId], gap: &'a [InstanceId]) -> Vec<&'a InstanceId> {
    let mut ids: Vec<&InstanceId> = touched.iter().chain(gap).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// What [`edit_tier`] needs besides the tier.
struct TierFix<'a> {
    /// The ids at which tier `from`'s reported set changed.
    touched: &'a [InstanceId],
    /// The tiers above this one: their states, their new snapshots and their old ones.
    above: (
        &'a [TierState],
        &'a [Arc<TierSnapshot>],
        &'a [Arc<TierSnapshot>],
    ),
    /// For tier `from` when it has tiers above it: the ids it reported before.
    reported_before: Option<&'a [InstanceId]>,
    keep_on_empty: bool,
}

/// A tier's served list and count after tier `from`'s reported set changed at `touched`, `old`
/// being the list it served before, when every tier above serves what it served but at
/// `touched` and none starts or stops keeping its last set (so the tier's list and counts can
/// differ from before only at `touched`). The tier's spare list is edited when it has one: it
/// differs from `old` only at its gap, so fixing it there and at `touched` makes the new list
/// without touching the endpoints that stay. Otherwise `old` is cloned and edited at `touched`.
/// `None` when the list would empty out and fail-static may keep it: a rebuild decides.
fn edit_tier(ts: &mut TierState, old: &[Endpoint], fix: TierFix<'_>) -> Option<Edited> {
    let TierFix {
        touched,
        above: (higher, above, above_before),
        reported_before,
        keep_on_empty,
    } = fix;
    let reported = &ts.reported;
    // Whether a tier above serves `id`, in the snapshots `tiers` (the tiers' keeping is the
    // same before and after).
    let served_by = |tiers: &[Arc<TierSnapshot>], id: &InstanceId| {
        higher
            .iter()
            .zip(tiers)
            .any(|(h, t)| !h.keeps() && t.find(id).is_some())
    };
    let serving = |id: &InstanceId| {
        reported
            .get(id)
            .filter(|e| e.instance().health().is_serving())
            .filter(|_| !served_by(above, id))
    };
    let counted = if higher.is_empty() {
        reported.len()
    } else {
        // The reported instances the tier counts are those no tier above serves: that changed
        // only at `touched`.
        let was = |id: &InstanceId| {
            reported_before.map_or_else(
                || reported.contains_key(id),
                |r| r.binary_search(id).is_ok(),
            ) && !served_by(above_before, id)
        };
        let is = |id: &InstanceId| reported.contains_key(id) && !served_by(above, id);
        sorted_ids(touched, &[])
            .iter()
            .fold(ts.counts.reported, |n, id| {
                (n + usize::from(is(id))).saturating_sub(usize::from(was(id)))
            })
    };
    let unchanged = touched
        .iter()
        .all(|id| match (entry(old, id), serving(id)) {
            (None, None) => true,
            (Some(before), Some(after)) => Endpoint::ptr_eq(before, after),
            _ => false,
        });
    if unchanged {
        return Some(Edited::Same { counted });
    }
    let (list, gap) = ts
        .spare
        .endpoints
        .take()
        .unwrap_or_else(|| (old.to_vec(), Vec::new()));
    let list = fixed(
        list,
        &sorted_ids(touched, &gap),
        Endpoint::id,
        serving,
        Endpoint::ptr_eq,
    );
    if list.is_empty() && keep_on_empty && !old.is_empty() {
        return None;
    }
    Some(Edited::New { counted, list })
}

/// `list` (in id order of `key`) with its entries at `fix` (in id order) made what `now` says:
/// that id's entry, or none; an entry `same` as the one now is left as it is. The fixed ids
/// are found by binary search, so that no other entry is read, cloned or dropped. A few are
/// fixed in place (each insert or remove shifts the tail); more in one pass that moves the
/// entries between them over in runs, so that a list edited at many ids costs no more than
/// one copy of it.
fn fixed<'a, T: Clone + 'a>(
    mut list: Vec<T>,
    fix: &[&InstanceId],
    key: impl Fn(&T) -> &InstanceId,
    now: impl Fn(&InstanceId) -> Option<&'a T>,
    same: impl Fn(&T, &T) -> bool,
) -> Vec<T> {
    let position = |list: &[T], id: &InstanceId| list.binary_search_by(|e| key(e).cmp(id));
    if fix.len() <= FIX_IN_PLACE {
        for id in fix {
            match (position(&list, id), now(id)) {
                (Ok(i), Some(n)) if same(&list[i], n) => {}
                (Ok(i), Some(n)) => list[i] = n.clone(),
                (Ok(i), None) => {
                    list.remove(i);
                }
                (Err(i), Some(n)) => list.insert(i, n.clone()),
                (Err(_), None) => {}
            }
        }
        return list;
    }
    let at: Vec<Result<usize, usize>> = fix.iter().map(|id| position(&list, id)).collect();
    let mut out = Vec::with_capacity(list.len() + fix.len());
    let mut rest = list.into_iter();
    let mut next = 0;
    for (id, at) in fix.iter().zip(at) {
        let (Ok(i) | Err(i)) = at;
        out.extend(rest.by_ref().take(i - next));
        next = i;
        let was = match at {
            Ok(_) => {
                next += 1;
                rest.next()
            }
            Err(_) => None,
        };
        match (was, now(id)) {
            (Some(e), Some(n)) if same(&e, n) => out.push(e),
            // Replaced, removed or added; a replaced or removed entry is dropped here, on the
            // update side.
            (_, n) => out.extend(n.cloned()),
        }
    }
    out.extend(rest);
    out
}

/// Whether two served sets are the same instances with the same state (so that the picker
/// built over the old one can stay).
fn same_endpoints(a: &[Endpoint], b: &[Endpoint]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            Endpoint::ptr_eq(x, y)
                || (Arc::ptr_eq(x.shared_state(), y.shared_state()) && x.instance() == y.instance())
        })
}

/// How many of `counted` there are, and the healthy ones as the snapshot's list. Room is made
/// for `room` at once (the list is then filled without growing), and what is left unused is
/// given back: the snapshot keeps it until the next update.
fn healthy_of<'a>(
    counted: impl Iterator<Item = &'a Endpoint>,
    room: usize,
) -> (usize, Vec<Endpoint>) {
    let mut count = 0;
    let mut healthy = Vec::with_capacity(room);
    for e in counted {
        count += 1;
        if e.instance().health().is_serving() {
            healthy.push(e.clone());
        }
    }
    healthy.shrink_to_fit();
    (count, healthy)
}

/// The ids within `reported`'s range that the tiers above serve healthy, in id order: what
/// each of them serves unless it keeps its last set fail-static (an instance that left a
/// registry and lives on in a lower one is that one's to serve). `next` holds their snapshots,
/// built or kept by this publish, each in id order: the part of each within the range is found
/// by binary search, so that a tier whose instances are named apart (as different datacenters'
/// often are) costs a few comparisons, not a walk along all of them.
fn served_above<'a>(
    higher: &[TierState],
    next: &'a [Arc<TierSnapshot>],
    reported: &BTreeMap<InstanceId, Endpoint>,
) -> Vec<&'a InstanceId> {
    let (Some((low, _)), Some((high, _))) = (reported.first_key_value(), reported.last_key_value())
    else {
        return Vec::new();
    };
    let mut within = higher
        .iter()
        .zip(next)
        .filter(|(ts, _)| {
            !matches!(
                ts.fail_static,
                Some(FailStatic::EmptyPush | FailStatic::NoneHealthy)
            )
        })
        .map(|(_, tier)| {
            let eps = &tier.endpoints[..];
            let from = eps.partition_point(|e| e.id() < low);
            let to = from + eps[from..].partition_point(|e| e.id() <= high);
            &eps[from..to]
        })
        .filter(|eps| !eps.is_empty())
        .peekable();
    let Some(first) = within.next() else {
        return Vec::new();
    };
    let mut ids: Vec<&InstanceId> = first.iter().map(Endpoint::id).collect();
    // One tier's are in id order already; more are merged.
    if within.peek().is_some() {
        ids.extend(within.flat_map(|eps| eps.iter().map(Endpoint::id)));
        ids.sort_unstable();
        ids.dedup();
    }
    ids
}

/// A pick in one tier that avoids `exclude`: the strategy's own answer for a retry
/// ([`Picker::pick_excluding`]: the next instance on a ring or in a table, the next in turn,
/// the least loaded of the rest...; a resilience layer also skips the instances it ejected, on
/// its own clock); with `fall_back`, an excluded one when nothing else exists.
fn pick_excluding_in<'a>(
    tier: &'a TierSnapshot,
    ctx: &PickContext<'_>,
    exclude: &[InstanceId],
    fall_back: bool,
) -> Option<&'a Endpoint> {
    let eps = &tier.endpoints;
    // Out of range counts as excluded, so that no picker's answer can be one.
    let excluded = |i: usize| eps.get(i).map_or(true, |ep| exclude.contains(ep.id()));
    // Every one tried already: no need to make the strategy walk its whole ring or table.
    let all_tried = exclude.len() >= eps.len() && eps.iter().all(|ep| exclude.contains(ep.id()));
    let answer = if !all_tried {
        tier.picker
            .pick_excluding(eps, ctx, &excluded)
            .filter(|&i| !excluded(i))
            .and_then(|i| eps.get(i))
    } else {
        None
    };
    answer.or_else(|| if fall_back { eps.first() } else { None })
}

/// One picked instance, for the length of one call. Counts the call as in flight until it is
/// dropped, and records its outcome and latency with [`success`](Self::success),
/// [`failure`](Self::failure) or [`record`](Self::record). Dropped without either, the call
/// counts as cancelled (no outcome), unless it ran past its deadline
/// ([`set_deadline`](Self::set_deadline),
/// [`cancel_is_failure_after`](BalancerBuilder::cancel_is_failure_after)): then it is a
/// failure. A call whose answer streams marks its first response with
/// [`responded`](Self::responded) and stays in flight until its stream ends.
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
    /// On the request path's clock (`crate::clock`), which costs a fraction of `Instant::now()`.
    started: Stamp,
    tier: usize,
    /// Dropped without an outcome after this long, the call counts as a failure.
    fail_after: Option<Duration>,
    /// The caller's deadline, on its own clock: compared only when the guard is dropped
    /// without an outcome, so that setting it costs no clock read.
    deadline: Option<Instant>,
    /// When the answer began ([`PickGuard::responded`]): the end of the latency recorded.
    responded: Option<Stamp>,
    done: bool,
}

impl PickGuard {
    fn new(endpoint: Endpoint, tier: usize) -> Self {
        endpoint.state().begin();
        endpoint.metrics().begin();
        PickGuard {
            endpoint,
            started: Stamp::now(),
            tier,
            fail_after: None,
            deadline: None,
            responded: None,
            done: false,
        }
    }

    /// The caller gives up on the call at `deadline`: dropped without an outcome at or after
    /// it (or within 1 %, at least 1 ms, before it: the caller's clock started before the
    /// pick), the call counts as a failure (it timed out) with its elapsed time as latency,
    /// instead of as cancelled. The earlier of this and the balancer's
    /// [`cancel_is_failure_after`](BalancerBuilder::cancel_is_failure_after) applies.
    ///
    /// ```
    /// # use std::time::Instant;
    /// # use waypost_core::*;
    /// # struct First; struct P;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
    /// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// # let balancer = Balancer::new(First);
    /// # balancer.apply(WatchEvent::Snapshot(vec![ServiceInstance::builder("s", "a").host("h").port(1).build()?]));
    /// let mut guard = balancer.pick()?;
    /// guard.set_deadline(Instant::now()); // the caller's timeout has already run out
    /// let endpoint = guard.endpoint().clone();
    /// drop(guard);
    /// assert_eq!(endpoint.state().failures(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
    }

    /// The tier that served the pick: an index into [`Balancer::tiers`] (0 without tiers).
    pub fn tier(&self) -> usize {
        self.tier
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
    ///
    /// Measured on a calibrated CPU counter where the CPU has an invariant one (nanosecond
    /// resolution; tested to agree with `Instant` within 0.1 % and 1 µs), else on the OS
    /// monotonic clock; see [`clock_nanos`](crate::clock_nanos).
    pub fn elapsed(&self) -> Duration {
        self.started.until(Stamp::now())
    }

    /// The call succeeded.
    pub fn success(self) {
        self.record(Outcome::Success);
    }

    /// The call failed.
    pub fn failure(self) {
        self.record(Outcome::Failure);
    }

    /// Records `outcome` with the time since the pick as latency (up to
    /// [`responded`](Self::responded), if it was called).
    pub fn record(mut self, outcome: Outcome) {
        self.done = true;
        self.end(outcome, self.responded.unwrap_or_else(Stamp::now));
    }

    /// Ends the call with `outcome`, its latency up to `at`.
    fn end(&self, outcome: Outcome, at: Stamp) {
        let sample = Some((outcome, self.started.until(at)));
        self.endpoint.state().end_at(sample, at.nanos());
        self.endpoint.metrics().end(sample);
    }

    /// The answer began to arrive (a response's head, say) and streams on: the latency
    /// recorded with the outcome is the time up to now, while the call stays in flight until
    /// the outcome is recorded at the stream's end (a failure then, if the stream fails). From
    /// now on, dropped without an outcome, the call counts as a success: the instance
    /// answered, whatever the caller did with the answer (its deadline no longer applies).
    /// Calling it again changes nothing.
    ///
    /// ```
    /// # use waypost_core::*;
    /// # struct First; struct P;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
    /// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// # let balancer = Balancer::new(First);
    /// # balancer.apply(WatchEvent::Snapshot(vec![ServiceInstance::builder("s", "a").host("h").port(1).build()?]));
    /// let mut guard = balancer.pick()?;
    /// guard.responded();
    /// let to_response = guard.elapsed(); // later than the response: an upper bound
    /// let endpoint = guard.endpoint().clone();
    /// std::thread::sleep(std::time::Duration::from_millis(20)); // the stream goes on
    /// assert_eq!(endpoint.state().in_flight(), 1);
    /// guard.success();
    /// assert_eq!(endpoint.state().in_flight(), 0);
    /// assert!(endpoint.state().ewma_latency().unwrap() <= to_response);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn responded(&mut self) {
        if self.responded.is_none() {
            self.responded = Some(Stamp::now());
        }
    }
}

impl Drop for PickGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // A caller that gave up because the call took too long learnt something about the
        // instance: a cancelled call past the threshold is a slow failure, not "no outcome".
        // The caller started its clock a little before the pick: a drop within 1 % (at least
        // 1 ms) of the deadline is the caller's timeout, not an early cancel.
        if let Some(end) = self.responded {
            // The instance answered: what the caller did with the answer is not its doing.
            return self.end(Outcome::Success, end);
        }
        if self.fail_after.is_some() || self.deadline.is_some() {
            let now = Stamp::now();
            let elapsed = self.started.until(now);
            // The deadline as a time after the pick: the elapsed time plus what was left of it
            // (or minus how long ago it passed).
            let by_deadline = self.deadline.map(|d| {
                let wall = Instant::now();
                match d.checked_duration_since(wall) {
                    Some(left) => elapsed + left,
                    None => elapsed.saturating_sub(wall - d),
                }
            });
            let after = match (self.fail_after, by_deadline) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(Duration::MAX),
            };
            let slack = (after / 100).max(Duration::from_millis(1));
            if elapsed.saturating_add(slack) >= after {
                return self.end(Outcome::Failure, now);
            }
        }
        self.endpoint.state().end(None);
        self.endpoint.metrics().end(None);
    }
}

impl fmt::Debug for PickGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PickGuard")
            .field("endpoint", &self.endpoint)
            .field("tier", &self.tier)
            .field("elapsed", &self.elapsed())
            .finish()
    }
}
