//! The conformance scenarios, each an `async fn(&B)` for any [`Backend`] `B`.
//!
//! Every scenario uses service names of its own (see [`unique_service`]), so several can share
//! one backend, and waits by bounded polling ([`eventually`], [`Mirror::wait_until`]): it
//! returns as soon as the expected state is reached and fails with a message naming the backend,
//! the scenario step and the last observation when a bound from the [`Backend`] runs out.
//!
//! [`conformance_tests!`](crate::conformance_tests) runs them all; each can also be called alone:
//!
//! ```
//! # use std::sync::Arc;
//! # use waypost_conformance::{async_trait, Backend};
//! # use waypost_core::{Discovery, Registry};
//! # struct InProcess(waypost_memory::Memory);
//! # #[async_trait]
//! # impl Backend for InProcess {
//! #     fn name(&self) -> &'static str { "memory" }
//! #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
//! #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
//! #     async fn restart(&self) -> Result<(), String> { Ok(()) }
//! # }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let backend = InProcess(waypost_memory::Memory::new());
//! waypost_conformance::scenarios::register_then_discover(&backend).await;
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use tokio::time::Instant;
use waypost_core::{
    Balancer, FailStatic, Field, HealthCheck, InstanceSet, Liveness, Registration,
    RegistrationBuilder, RegistrationHandle, ServiceInstance, ServiceName, Watch, WatchEvent,
    Weight,
};

use crate::{Backend, Describes};
// The smallest strategy, for scenarios that only watch a balancer's status.
use waypost_core::testing::First;

/// The names of all scenarios, in the order [`conformance_tests!`](crate::conformance_tests)
/// declares them.
///
/// ```
/// assert!(waypost_conformance::scenarios::ALL.contains(&"reconnect_resync"));
/// ```
pub const ALL: &[&str] = &[
    "register_then_discover",
    "watch_starts_with_snapshot",
    "watch_add_update_remove",
    "ttl_expiry",
    "deregister_on_shutdown",
    "drop_deregisters",
    "liveness_is_reported",
    "reconnect_resync",
    "outage_without_change",
    "several_watchers_same_service",
    "many_instances",
    "unknown_service",
    "duplicate_ids",
    "bulk_churn",
    "bad_input",
];

/// The scenarios whose subject is the registry (expiry, deregistration, liveness, duplicate
/// registrations, validation): skipped for a [discovery-only](Backend::discovery_only) backend.
///
/// ```
/// use waypost_conformance::scenarios::{ALL, REGISTRATION};
/// assert!(REGISTRATION.iter().all(|s| ALL.contains(s)));
/// ```
pub const REGISTRATION: &[&str] = &[
    "ttl_expiry",
    "deregister_on_shutdown",
    "drop_deregisters",
    "liveness_is_reported",
    "duplicate_ids",
    "bad_input",
];

/// The longest any one scenario may run on `backend` before the harness fails it.
///
/// ```
/// # use std::sync::Arc;
/// # use waypost_conformance::{async_trait, Backend};
/// # use waypost_core::{Discovery, Registry};
/// # struct B(waypost_memory::Memory);
/// # #[async_trait]
/// # impl Backend for B {
/// #     fn name(&self) -> &'static str { "b" }
/// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
/// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
/// #     async fn restart(&self) -> Result<(), String> { Ok(()) }
/// # }
/// let b = B(waypost_memory::Memory::new());
/// assert!(waypost_conformance::scenarios::scenario_time_limit(&b) > b.heal_bound());
/// ```
pub fn scenario_time_limit<B: Backend + ?Sized>(backend: &B) -> Duration {
    backend.heal_bound()
        + backend.expiry_bound() * 2
        + backend.ttl() * 4
        + backend.settle_bound() * 6
        + Duration::from_secs(60)
}

/// A service name no other scenario (in this or another process) uses: `prefix` plus the
/// process id, a per-process counter and a clock-derived suffix.
///
/// ```
/// let a = waypost_conformance::scenarios::unique_service("users");
/// let b = waypost_conformance::scenarios::unique_service("users");
/// assert_ne!(a, b);
/// assert!(a.as_str().starts_with("users-"));
/// ```
pub fn unique_service(prefix: &str) -> ServiceName {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("{prefix}-{}-{n}-{nanos:x}", std::process::id());
    match ServiceName::new(&name) {
        Ok(name) => name,
        Err(e) => panic!("unique_service({prefix:?}) built the invalid name {name:?}: {e}"),
    }
}

/// Polls `probe` (quickly at first, then every 250 ms) until it returns `Ok`, and returns that
/// value; panics with `what` and the last `Err` observation if `bound` runs out first.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// let mut tries = 0;
/// let n = waypost_conformance::scenarios::eventually(Duration::from_secs(5), "third try", || {
///     tries += 1;
///     let t = tries;
///     async move { if t >= 3 { Ok(t) } else { Err(format!("try {t}")) } }
/// })
/// .await;
/// assert_eq!(n, 3);
/// # }
/// ```
pub async fn eventually<T, F, Fut>(bound: Duration, what: impl fmt::Display, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let until = Instant::now() + bound;
    let mut pause = Duration::from_millis(10);
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => {
                let now = Instant::now();
                if now >= until {
                    panic!("{what}: not reached within {bound:?}; last observation: {last}");
                }
                tokio::time::sleep(pause.min(until - now)).await;
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        }
    }
}

/// A consumer of a [`Watch`] that replays its events onto an [`InstanceSet`] and checks each
/// one against the watch contract as it arrives:
///
/// - a [`WatchEvent::Snapshot`] comes first (errors may precede it), and only once, sorted by
///   id without duplicates; [`WatchEvent::Synced`] never before it;
/// - `Added` never names an id already present, `Updated` and `Removed` never an absent one,
///   and `Updated` always carries a real change;
/// - the stream never ends. Errors are counted and otherwise allowed.
///
/// A violation panics with the watch's label.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use futures::{stream, StreamExt};
/// use waypost_conformance::scenarios::Mirror;
/// use waypost_core::{ServiceInstance, WatchEvent};
///
/// let a = ServiceInstance::builder("s", "a").host("h").port(1).build()?;
/// let events = vec![Ok(WatchEvent::Snapshot(vec![])), Ok(WatchEvent::Added(a))];
/// let watch = stream::iter(events).chain(stream::pending()).boxed();
/// let mut mirror = Mirror::new("example", watch);
/// mirror.wait_until(Duration::from_secs(5), "a is added", |set| set.get("a").is_some()).await;
/// assert_eq!(mirror.set().len(), 1);
/// # Ok(())
/// # }
/// ```
pub struct Mirror {
    label: String,
    describes: Describes,
    watch: Watch,
    set: InstanceSet,
    snapshot_seen: bool,
    in_sync: bool,
    synced: usize,
    errors: usize,
    last_error: Option<String>,
    log: Vec<WatchEvent>,
}

impl Mirror {
    /// Starts following `watch`; `label` names it in failure messages.
    ///
    /// The watch is consumed at once by a task of its own (as a balancer consumes it), so the
    /// backend's intermediate states during an outage or a restart reach the checks even while
    /// the scenario looks elsewhere. Must be called within a Tokio runtime.
    pub fn new(label: impl Into<String>, mut watch: Watch) -> Self {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            while let Some(item) = watch.next().await {
                if tx.unbounded_send(item).is_err() {
                    return; // the mirror was dropped
                }
            }
        });
        Mirror {
            label: label.into(),
            describes: Describes::Everything,
            watch: rx.boxed(),
            set: InstanceSet::new(),
            snapshot_seen: false,
            in_sync: false,
            synced: 0,
            errors: 0,
            last_error: None,
            log: Vec::new(),
        }
    }

    /// Compares instances as `describes` says the backend reports them: for
    /// [`Describes::Address`], each instance is named by the id it was registered with (through
    /// this module's `register`-time record of addresses) before the checks and the set see
    /// it, so that scenarios speak of `a` and `b` whatever ids the discovery makes up.
    pub fn describing(mut self, describes: Describes) -> Self {
        self.describes = describes;
        self
    }

    /// The set as the events received so far describe it.
    pub fn set(&self) -> &InstanceSet {
        &self.set
    }

    /// Every change received so far, in order (errors and [`WatchEvent::Synced`] excluded).
    pub fn log(&self) -> &[WatchEvent] {
        &self.log
    }

    /// How many errors the watch yielded so far.
    pub fn errors(&self) -> usize {
        self.errors
    }

    /// Whether the snapshot has arrived.
    pub fn has_snapshot(&self) -> bool {
        self.snapshot_seen
    }

    /// Whether the last word of the watch about its health was [`WatchEvent::Synced`] (not an
    /// error since).
    pub fn is_in_sync(&self) -> bool {
        self.in_sync
    }

    /// How many [`WatchEvent::Synced`] the watch has said so far.
    pub fn synced(&self) -> usize {
        self.synced
    }

    /// The ids in the set, for messages.
    pub fn ids(&self) -> Vec<String> {
        self.set.iter().map(|i| i.id().to_string()).collect()
    }

    /// Receives and checks one item, waiting until `until` at most. Returns the event (`None`
    /// for an error item), or `Err(())` when the deadline passed first.
    pub async fn next_until(&mut self, until: Instant) -> Result<Option<WatchEvent>, ()> {
        match tokio::time::timeout_at(until, self.watch.next()).await {
            Err(_) => Err(()),
            Ok(None) => panic!(
                "{}: the watch ended; a watch must never end while its discovery lives \
                 (after {} errors, last: {:?})",
                self.label, self.errors, self.last_error
            ),
            Ok(Some(Err(e))) => {
                self.errors += 1;
                self.in_sync = false;
                self.last_error = Some(e.to_string());
                Ok(None)
            }
            Ok(Some(Ok(ev))) => {
                let ev = as_registered_event(self.describes, ev);
                self.check_and_apply(&ev);
                Ok(Some(ev))
            }
        }
    }

    fn check_and_apply(&mut self, ev: &WatchEvent) {
        let label = &self.label;
        if let WatchEvent::Synced = ev {
            assert!(
                self.snapshot_seen,
                "{label}: Synced arrived before the Snapshot; a watch is in sync only once it \
                 has delivered the whole set"
            );
            self.in_sync = true;
            self.synced += 1;
            return;
        }
        match ev {
            WatchEvent::Snapshot(all) => {
                assert!(
                    !self.snapshot_seen,
                    "{label}: a second Snapshot arrived ({} instances); after the first, a watch \
                     must deliver only changes, even after a reconnect",
                    all.len()
                );
                let ids: Vec<&str> = all.iter().map(|i| i.id().as_str()).collect();
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(
                    ids, sorted,
                    "{label}: the snapshot must be sorted by id without duplicates"
                );
                self.snapshot_seen = true;
            }
            WatchEvent::Synced => {}
            WatchEvent::Added(i) | WatchEvent::Updated(i) | WatchEvent::Removed(i) => {
                assert!(
                    self.snapshot_seen,
                    "{label}: {ev:?} arrived before the Snapshot; a watch starts with a snapshot"
                );
                let present = self.set.get(i.id().as_str());
                match (ev, present) {
                    (WatchEvent::Added(_), Some(old)) => panic!(
                        "{label}: Added({}) for an id already present (as {old:?}); after a \
                         resync a watch must emit only the real difference",
                        i.id()
                    ),
                    (WatchEvent::Updated(_), None) => {
                        panic!("{label}: Updated({}) for an id never added", i.id())
                    }
                    (WatchEvent::Updated(_), Some(old)) if old == i => {
                        panic!("{label}: Updated({}) without any change ({i:?})", i.id())
                    }
                    (WatchEvent::Removed(_), None) => {
                        panic!("{label}: Removed({}) for an id not present", i.id())
                    }
                    _ => {}
                }
            }
        }
        self.set.apply(ev);
        self.log.push(ev.clone());
    }

    /// Receives events until `pred` holds for the set (after the snapshot), for at most
    /// `bound`; panics naming `what` otherwise.
    pub async fn wait_until(
        &mut self,
        bound: Duration,
        what: &str,
        pred: impl Fn(&InstanceSet) -> bool,
    ) {
        let until = Instant::now() + bound;
        loop {
            if self.snapshot_seen && pred(&self.set) {
                return;
            }
            if self.next_until(until).await.is_err() {
                panic!(
                    "{}: {what}: not seen within {bound:?}; the watch shows {:?} (snapshot \
                     received: {}, errors: {}, last error: {:?})",
                    self.label,
                    self.ids(),
                    self.snapshot_seen,
                    self.errors,
                    self.last_error
                );
            }
        }
    }

    /// Receives items until the watch has said [`WatchEvent::Synced`] with no error after it,
    /// for at most `bound`; panics naming `what` otherwise.
    pub async fn wait_in_sync(&mut self, bound: Duration, what: &str) {
        let until = Instant::now() + bound;
        while !self.in_sync {
            if self.next_until(until).await.is_err() {
                panic!(
                    "{}: {what}: no Synced within {bound:?} (Synced so far: {}, errors: {}, last \
                     error: {:?}); a watch must say Synced after its snapshot and after every \
                     recovery, even when nothing changed",
                    self.label, self.synced, self.errors, self.last_error
                );
            }
        }
    }

    /// Receives events for `period` and checks that `invariant` holds after every one of them.
    pub async fn hold(
        &mut self,
        period: Duration,
        what: &str,
        invariant: impl Fn(&InstanceSet) -> bool,
    ) {
        let until = Instant::now() + period;
        while let Ok(ev) = self.next_until(until).await {
            assert!(
                invariant(&self.set),
                "{}: {what}: broken by {ev:?}; the watch shows {:?}",
                self.label,
                self.ids()
            );
        }
    }
}

/// A TTL registration of `id` in `service` at the backend's host, on a port derived from `n`.
fn registration<B: Backend + ?Sized>(
    backend: &B,
    service: &ServiceName,
    id: &str,
    n: u16,
) -> RegistrationBuilder {
    Registration::builder(service.as_str(), id)
        .host(backend.host())
        .port(20_000 + n)
        .check(HealthCheck::ttl(backend.ttl()))
}

async fn register<B: Backend + ?Sized>(
    backend: &B,
    reg: RegistrationBuilder,
) -> RegistrationHandle {
    let reg = match reg.build() {
        Ok(reg) => reg,
        Err(e) => panic!(
            "[{}] the scenario built an invalid registration: {e}",
            backend.name()
        ),
    };
    let id = reg.id().clone();
    match backend.registry().register(reg).await {
        Ok(h) => {
            remember(h.instance());
            h
        }
        Err(e) => panic!("[{}] registering {id} failed: {e}", backend.name()),
    }
}

/// Waits until `instances(service)` answers and `check` accepts the answer.
async fn instances_until<B: Backend + ?Sized>(
    backend: &B,
    service: &ServiceName,
    bound: Duration,
    what: &str,
    check: impl Fn(&[ServiceInstance]) -> Result<(), String>,
) -> Vec<ServiceInstance> {
    let discovery = backend.discovery();
    let describes = backend.describes();
    eventually(
        bound,
        format!("[{}] instances({service}): {what}", backend.name()),
        || {
            let discovery = discovery.clone();
            let check = &check;
            async move {
                let list = discovery
                    .instances(service)
                    .await
                    .map_err(|e| format!("error: {e}"))?;
                let list = as_registered_list(describes, list);
                check(&list).map_err(|why| format!("{why}; got {:?}", ids_of(&list)))?;
                Ok(list)
            }
        },
    )
    .await
}

fn ids_of(list: &[ServiceInstance]) -> Vec<String> {
    list.iter().map(|i| i.id().to_string()).collect()
}

fn exactly(ids: &[&str]) -> impl Fn(&[ServiceInstance]) -> Result<(), String> {
    let want: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    move |list| {
        let got: BTreeSet<String> = ids_of(list).into_iter().collect();
        if got == want {
            Ok(())
        } else {
            Err(format!("want exactly {want:?}"))
        }
    }
}

fn set_is(ids: &[&str]) -> impl Fn(&InstanceSet) -> bool {
    let want: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    move |set| {
        set.iter()
            .map(|i| i.id().to_string())
            .collect::<BTreeSet<_>>()
            == want
    }
}

fn label<B: Backend + ?Sized>(backend: &B, what: &str) -> String {
    format!("[{}] {what}", backend.name())
}

/// A [`Mirror`] of `watch`, comparing what `backend` [describes](Backend::describes).
fn mirror_of<B: Backend + ?Sized>(backend: &B, what: &str, watch: Watch) -> Mirror {
    Mirror::new(label(backend, what), watch).describing(backend.describes())
}

/// Every instance the scenarios registered, by service and address: how the id an instance was
/// registered with is found again for a backend that reports addresses only.
static REGISTERED: Mutex<BTreeMap<(String, String), String>> = Mutex::new(BTreeMap::new());

fn remember(instance: &ServiceInstance) {
    let key = (instance.service().to_string(), instance.authority());
    let mut registered = REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    registered.insert(key, instance.id().to_string());
}

/// `instance` as the scenarios name it: unchanged, or for [`Describes::Address`] renamed to
/// the id that was registered at its address (if any was).
fn as_registered(describes: Describes, instance: ServiceInstance) -> ServiceInstance {
    if describes == Describes::Everything {
        return instance;
    }
    let key = (instance.service().to_string(), instance.authority());
    let id = {
        let registered = REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
        registered.get(&key).cloned()
    };
    let Some(id) = id else { return instance };
    let mut b = ServiceInstance::builder(instance.service().as_str(), id)
        .host(instance.host())
        .port(instance.port())
        .weight(instance.weight().get())
        .zone_opt(instance.zone().map(str::to_owned));
    for t in instance.tags() {
        b = b.tag(t.as_str());
    }
    for (k, v) in instance.metadata() {
        b = b.meta(k.as_str(), v.as_str());
    }
    b.build().unwrap_or(instance)
}

/// The list renamed as [`as_registered`] does, and sorted again by the new ids; unchanged
/// (order included: the scenarios check it) for [`Describes::Everything`].
fn as_registered_list(describes: Describes, list: Vec<ServiceInstance>) -> Vec<ServiceInstance> {
    if describes == Describes::Everything {
        return list;
    }
    let mut list: Vec<_> = list
        .into_iter()
        .map(|i| as_registered(describes, i))
        .collect();
    list.sort_by(|a, b| a.id().cmp(b.id()));
    list
}

fn as_registered_event(describes: Describes, event: WatchEvent) -> WatchEvent {
    match event {
        WatchEvent::Snapshot(all) => WatchEvent::Snapshot(as_registered_list(describes, all)),
        WatchEvent::Added(i) => WatchEvent::Added(as_registered(describes, i)),
        WatchEvent::Updated(i) => WatchEvent::Updated(as_registered(describes, i)),
        WatchEvent::Removed(i) => WatchEvent::Removed(as_registered(describes, i)),
        WatchEvent::Synced => WatchEvent::Synced,
    }
}

/// Checks that `got` (as discovered) describes `want` (as registered). A backend may keep the
/// zone in metadata key `zone` (Consul has no zone field) and the weight in metadata key
/// `weight`; any other metadata must round-trip exactly.
#[cfg(test)]
fn assert_describes(backend_name: &str, got: &ServiceInstance, want: &ServiceInstance) {
    assert_describes_as(Describes::Everything, backend_name, got, want);
}

/// [`assert_describes`], comparing only what `describes` covers.
fn assert_describes_as(
    describes: Describes,
    backend_name: &str,
    got: &ServiceInstance,
    want: &ServiceInstance,
) {
    let id = want.id();
    assert_eq!(got.id(), want.id(), "[{backend_name}] id");
    assert_eq!(
        got.service(),
        want.service(),
        "[{backend_name}] service of {id}"
    );
    assert_eq!(got.host(), want.host(), "[{backend_name}] host of {id}");
    assert_eq!(got.port(), want.port(), "[{backend_name}] port of {id}");
    if describes == Describes::Address {
        return;
    }
    assert_eq!(
        got.tags(),
        want.tags(),
        "[{backend_name}] tags of {id} (order included)"
    );
    assert_eq!(
        got.weight(),
        want.weight(),
        "[{backend_name}] weight of {id}"
    );
    let zone = got
        .zone()
        .or_else(|| got.metadata().get("zone").map(String::as_str));
    assert_eq!(
        zone,
        want.zone(),
        "[{backend_name}] zone of {id} (as zone, or as metadata key \"zone\")"
    );
    for (k, v) in want.metadata() {
        assert_eq!(
            got.metadata().get(k),
            Some(v),
            "[{backend_name}] metadata {k:?} of {id}"
        );
    }
    for (k, v) in got.metadata() {
        if want.metadata().contains_key(k) {
            continue;
        }
        let explained = match k.as_str() {
            "zone" => want.zone() == Some(v.as_str()),
            "weight" => v.parse::<u32>().ok() == Some(want.weight().get()),
            _ => false,
        };
        assert!(
            explained,
            "[{backend_name}] {id} carries metadata {k:?}={v:?} that was never registered"
        );
    }
}

/// Registers instances with every field set (and one without a host) and finds them again:
/// host, port, tags in order, metadata, weight and zone round-trip, the list is sorted by id,
/// a missing host is filled in by the backend, and an unknown service has no instances.
pub async fn register_then_discover<B: Backend + ?Sized>(backend: &B) {
    let svc = unique_service("discover");
    let full = register(
        backend,
        registration(backend, &svc, &format!("{svc}-a"), 1)
            .tag("v1")
            .tag("canary")
            .tag("blue")
            .meta("version", "1.4.2")
            .meta("team", "core services")
            .weight(3)
            .zone("zone-a"),
    )
    .await;
    // An id with ':' and '.' as many real ids have (`name-host:port`).
    let plain = register(
        backend,
        registration(backend, &svc, &format!("{svc}-b-10.0.0.5:8080"), 2),
    )
    .await;
    let no_host = register(
        backend,
        Registration::builder(svc.as_str(), format!("{svc}-c"))
            .port(20_003)
            .check(HealthCheck::ttl(backend.ttl())),
    )
    .await;
    assert!(
        !no_host.instance().host().is_empty(),
        "[{}] the handle must show the host the backend filled in",
        backend.name()
    );
    for h in [&full, &plain] {
        assert_eq!(
            h.instance().host(),
            backend.host(),
            "[{}] a given host is kept",
            backend.name()
        );
    }

    let want: Vec<&ServiceInstance> = vec![full.instance(), plain.instance(), no_host.instance()];
    let want_ids: Vec<&str> = want.iter().map(|i| i.id().as_str()).collect();
    let list = instances_until(
        backend,
        &svc,
        backend.settle_bound(),
        "all three registered instances are listed",
        exactly(&want_ids),
    )
    .await;
    let ids = ids_of(&list);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        ids,
        sorted,
        "[{}] instances() must be sorted by id",
        backend.name()
    );
    for w in want {
        let got = list.iter().find(|i| i.id() == w.id());
        match got {
            Some(got) => assert_describes_as(backend.describes(), backend.name(), got, w),
            None => panic!("[{}] {} vanished", backend.name(), w.id()),
        }
    }
    let plain_got = list.iter().find(|i| i.id() == plain.instance().id());
    assert_eq!(
        plain_got.map(|i| i.weight()),
        Some(Weight::ONE),
        "[{}] the default weight is 1",
        backend.name()
    );

    let unknown = unique_service("nobody");
    let none = backend.discovery().instances(&unknown).await;
    match none {
        Ok(list) => assert!(
            list.is_empty(),
            "[{}] an unknown service has no instances, got {:?}",
            backend.name(),
            ids_of(&list)
        ),
        Err(e) => panic!(
            "[{}] an unknown service is not an error: {e}",
            backend.name()
        ),
    }

    for h in [full, plain, no_host] {
        if let Err(e) = h.shutdown().await {
            panic!("[{}] shutdown failed: {e}", backend.name());
        }
    }
}

/// A new watch delivers the current set as its first event (for an empty service too), then
/// nothing while nothing changes.
pub async fn watch_starts_with_snapshot<B: Backend + ?Sized>(backend: &B) {
    let svc = unique_service("snapshot");
    let a = register(backend, registration(backend, &svc, "a", 1).tag("x")).await;
    let b = register(backend, registration(backend, &svc, "b", 2)).await;
    let listed = instances_until(
        backend,
        &svc,
        backend.settle_bound(),
        "both instances are listed",
        exactly(&["a", "b"]),
    )
    .await;

    let mut mirror = mirror_of(backend, "watch", backend.discovery().watch(&svc));
    let until = Instant::now() + backend.settle_bound();
    let first = loop {
        match mirror.next_until(until).await {
            Ok(Some(ev)) => break ev,
            Ok(None) => continue, // an error before the snapshot is allowed
            Err(()) => panic!(
                "[{}] no snapshot within {:?} of opening the watch",
                backend.name(),
                backend.settle_bound()
            ),
        }
    };
    match first {
        WatchEvent::Snapshot(all) => assert_eq!(
            all,
            listed,
            "[{}] the snapshot must equal instances()",
            backend.name()
        ),
        other => panic!(
            "[{}] the first event must be a Snapshot, got {other:?}",
            backend.name()
        ),
    }
    // Nothing changes, so nothing may be said (a re-poll is not a change).
    mirror
        .hold(
            backend.ttl() + Duration::from_millis(500),
            "no change",
            |_| true,
        )
        .await;
    assert_eq!(
        mirror.log().len(),
        1,
        "[{}] the watch emitted events although nothing changed: {:?}",
        backend.name(),
        mirror.log()
    );

    let empty = unique_service("snapshot-empty");
    let mut mirror = mirror_of(backend, "empty watch", backend.discovery().watch(&empty));
    mirror
        .wait_until(backend.settle_bound(), "an empty snapshot", |s| {
            s.is_empty()
        })
        .await;
    assert!(
        matches!(mirror.log(), [WatchEvent::Snapshot(v)] if v.is_empty()),
        "[{}] an empty service's watch starts with an empty snapshot, got {:?}",
        backend.name(),
        mirror.log()
    );

    for h in [a, b] {
        let _ = h.shutdown().await;
    }
}

/// A watch delivers `Added` for a registration, `Updated` (not removed-then-added) when the same
/// id registers again with other tags and weight, and `Removed` on shutdown.
pub async fn watch_add_update_remove<B: Backend + ?Sized>(backend: &B) {
    let svc = unique_service("changes");
    let bound = backend.settle_bound();
    let mut mirror = mirror_of(backend, "watch", backend.discovery().watch(&svc));
    mirror
        .wait_until(bound, "the empty snapshot", |s| s.is_empty())
        .await;

    let a1 = register(
        backend,
        registration(backend, &svc, "a", 1).tag("v1").weight(1),
    )
    .await;
    mirror.wait_until(bound, "a added", set_is(&["a"])).await;
    let added = mirror.set().get("a").cloned();
    match added {
        Some(got) => assert_describes_as(backend.describes(), backend.name(), &got, a1.instance()),
        None => panic!("[{}] a missing after its Added", backend.name()),
    }
    assert!(
        mirror
            .log()
            .iter()
            .any(|e| matches!(e, WatchEvent::Added(i) if i.id().as_str() == "a")),
        "[{}] a must arrive as Added, got {:?}",
        backend.name(),
        mirror.log()
    );

    let b = register(backend, registration(backend, &svc, "b", 2)).await;
    mirror
        .wait_until(bound, "b added", set_is(&["a", "b"]))
        .await;

    // The same id again, described differently: an update in place.
    let seen_before_update = mirror.log().len();
    let a2 = register(
        backend,
        registration(backend, &svc, "a", 1)
            .tag("v2")
            .tag("blue")
            .weight(5),
    )
    .await;
    // The first handle must neither deregister nor restore its version: a crashed process.
    let _ = a1.abandon().await;
    let want = a2.instance().clone();
    if backend.describes() == Describes::Address {
        // Only the address is reported, and it did not change: there is nothing to tell, and
        // a must not leave meanwhile.
        mirror
            .hold(
                Duration::from_secs(1),
                "a stays while it registers again",
                |s| s.get("a").is_some(),
            )
            .await;
        let since = &mirror.log()[seen_before_update..];
        assert!(
            !since
                .iter()
                .any(|e| matches!(e, WatchEvent::Removed(i) if i.id().as_str() == "a")),
            "[{}] re-registering a must not remove it first, got {since:?}",
            backend.name()
        );
    } else {
        mirror
            .wait_until(bound, "a updated to tags [v2, blue] and weight 5", |s| {
                s.get("a")
                    .is_some_and(|i| i.weight().get() == 5 && i.tags() == want.tags())
            })
            .await;
        let since = &mirror.log()[seen_before_update..];
        assert!(
        since
            .iter()
            .any(|e| matches!(e, WatchEvent::Updated(i) if i.id().as_str() == "a")),
        "[{}] re-registering a with other tags and weight must be an Updated event, got {since:?}",
        backend.name()
    );
        assert!(
            !since
                .iter()
                .any(|e| matches!(e, WatchEvent::Removed(i) if i.id().as_str() == "a")),
            "[{}] re-registering a must not remove it first, got {since:?}",
            backend.name()
        );
        if let Some(got) = mirror.set().get("a") {
            assert_describes_as(backend.describes(), backend.name(), got, &want);
        }
    }

    if let Err(e) = a2.shutdown().await {
        panic!("[{}] shutdown of a failed: {e}", backend.name());
    }
    mirror.wait_until(bound, "a removed", set_is(&["b"])).await;
    assert!(
        mirror
            .log()
            .iter()
            .any(|e| matches!(e, WatchEvent::Removed(i) if i.id().as_str() == "a")),
        "[{}] a must leave as Removed",
        backend.name()
    );
    let _ = b.shutdown().await;
    mirror
        .wait_until(bound, "b removed", |s| s.is_empty())
        .await;
}

/// Heartbeats keep a TTL registration listed well past its TTL; once the handle is abandoned
/// (a crashed process) the backend removes it within [`Backend::expiry_bound`], while a
/// heart-beating neighbour stays.
pub async fn ttl_expiry<B: Backend + ?Sized>(backend: &B) {
    let svc = unique_service("ttl");
    let bound = backend.settle_bound();
    let mut mirror = mirror_of(backend, "watch", backend.discovery().watch(&svc));
    let doomed = register(backend, registration(backend, &svc, "doomed", 1)).await;
    let keeper = register(backend, registration(backend, &svc, "keeper", 2)).await;
    assert_eq!(
        doomed.wait_live().await,
        Liveness::Live,
        "[{}] doomed live",
        backend.name()
    );
    mirror
        .wait_until(bound, "both listed", set_is(&["doomed", "keeper"]))
        .await;

    // Two TTLs: without heartbeats the backend would have dropped both by now.
    mirror
        .hold(
            backend.ttl() * 2,
            "heart-beating instances stay listed",
            set_is(&["doomed", "keeper"]),
        )
        .await;

    if let Err(e) = doomed.abandon().await {
        panic!("[{}] abandon failed: {e}", backend.name());
    }
    mirror
        .wait_until(
            backend.expiry_bound(),
            "the abandoned instance expires (within expiry_bound)",
            |s| s.get("doomed").is_none(),
        )
        .await;
    assert!(
        mirror.set().get("keeper").is_some(),
        "[{}] expiry must only remove the abandoned instance",
        backend.name()
    );
    instances_until(
        backend,
        &svc,
        bound,
        "only keeper is listed",
        exactly(&["keeper"]),
    )
    .await;
    let _ = keeper.shutdown().await;
}

/// The long TTL used where a removal must be explained by deregistration, not expiry.
fn long_ttl<B: Backend + ?Sized>(backend: &B) -> Duration {
    (backend.expiry_bound() + backend.settle_bound() * 2).max(Duration::from_secs(30))
}

/// `shutdown()` deregisters: the instance leaves the watch (as `Removed`) and the list long
/// before its TTL could have expired.
pub async fn deregister_on_shutdown<B: Backend + ?Sized>(backend: &B) {
    let svc = unique_service("shutdown");
    let bound = backend.settle_bound();
    let mut mirror = mirror_of(backend, "watch", backend.discovery().watch(&svc));
    let h = register(
        backend,
        registration(backend, &svc, "a", 1).check(HealthCheck::ttl(long_ttl(backend))),
    )
    .await;
    mirror.wait_until(bound, "a added", set_is(&["a"])).await;
    instances_until(backend, &svc, bound, "a is listed", exactly(&["a"])).await;
    if let Err(e) = h.shutdown().await {
        panic!("[{}] shutdown failed: {e}", backend.name());
    }
    mirror
        .wait_until(bound, "a removed after shutdown", |s| s.is_empty())
        .await;
    assert!(
        matches!(mirror.log().last(), Some(WatchEvent::Removed(i)) if i.id().as_str() == "a"),
        "[{}] shutdown must show as Removed, got {:?}",
        backend.name(),
        mirror.log()
    );
    instances_until(backend, &svc, bound, "nothing is listed", exactly(&[])).await;
}

/// Dropping a handle deregisters in the background: the instance leaves long before its TTL
/// could have expired, and the handle's liveness ends as `Stopped`.
pub async fn drop_deregisters<B: Backend + ?Sized>(backend: &B) {
    let svc = unique_service("drop");
    let bound = backend.settle_bound();
    let mut mirror = mirror_of(backend, "watch", backend.discovery().watch(&svc));
    let h = register(
        backend,
        registration(backend, &svc, "a", 1).check(HealthCheck::ttl(long_ttl(backend))),
    )
    .await;
    let stay = register(
        backend,
        registration(backend, &svc, "b", 2).check(HealthCheck::ttl(long_ttl(backend))),
    )
    .await;
    mirror
        .wait_until(bound, "a and b added", set_is(&["a", "b"]))
        .await;
    let mut live = h.subscribe();
    drop(h);
    mirror
        .wait_until(bound, "a removed after drop", set_is(&["b"]))
        .await;
    instances_until(backend, &svc, bound, "only b is listed", exactly(&["b"])).await;
    let stopped = tokio::time::timeout(bound, live.wait_for(|l| *l == Liveness::Stopped)).await;
    // `Err` from `wait_for` means the task ended and dropped its sender: stopped as well.
    assert!(
        stopped.is_ok(),
        "[{}] a dropped handle's liveness must end as Stopped",
        backend.name()
    );
    let _ = stay.shutdown().await;
}

/// A handle reports `Live` once the backend lists the instance, and `Stopped` after
/// shutdown or abandon.
pub async fn liveness_is_reported<B: Backend + ?Sized>(backend: &B) {
    let svc = unique_service("liveness");
    let bound = backend.settle_bound();
    let h = register(backend, registration(backend, &svc, "a", 1)).await;
    let live = tokio::time::timeout(bound, h.wait_live()).await;
    assert_eq!(
        live.ok(),
        Some(Liveness::Live),
        "[{}] wait_live must report Live",
        backend.name()
    );
    assert!(h.is_live(), "[{}] is_live after wait_live", backend.name());
    assert_eq!(h.liveness(), Liveness::Live);
    instances_until(
        backend,
        &svc,
        bound,
        "a live instance is listed",
        exactly(&["a"]),
    )
    .await;
    let rx = h.subscribe();
    if let Err(e) = h.shutdown().await {
        panic!("[{}] shutdown failed: {e}", backend.name());
    }
    assert_eq!(
        *rx.borrow(),
        Liveness::Stopped,
        "[{}] after shutdown the liveness is Stopped",
        backend.name()
    );

    let h = register(backend, registration(backend, &svc, "b", 2)).await;
    assert_eq!(
        tokio::time::timeout(bound, h.wait_live()).await.ok(),
        Some(Liveness::Live)
    );
    let rx = h.subscribe();
    let _ = h.abandon().await;
    assert_eq!(
        *rx.borrow(),
        Liveness::Stopped,
        "[{}] after abandon the liveness is Stopped",
        backend.name()
    );
}

/// The status bug's scenario: an outage in which the set does not change.
///
/// With an instance registered (a TTL long enough to outlast the outage), a watch and a
/// [`Balancer`] on the service, the backend is cut off ([`Backend::partition`]). The watch must
/// yield an error and the balancer report it; once the backend is reachable again
/// ([`Backend::heal`]), within one [`retry_period`](Backend::retry_period) the watch must say
/// [`WatchEvent::Synced`] without any change event, and the balancer's status must be healthy
/// again (no fail-static, in sync, serving the instance). The registration is live again too.
pub async fn outage_without_change<B: Backend + ?Sized>(backend: &B) {
    let service = unique_service("outage");
    let settle = backend.settle_bound();
    let handle = register(
        backend,
        registration(backend, &service, "a", 1).check(HealthCheck::ttl(long_ttl(backend))),
    )
    .await;
    let discovery = backend.discovery();
    let mut mirror = mirror_of(backend, "outage watch", discovery.watch(&service));
    mirror
        .wait_until(settle, "a is listed", set_is(&["a"]))
        .await;
    mirror
        .wait_in_sync(settle, "in sync after the first snapshot")
        .await;
    let balancer = Balancer::watch(&*discovery, &service, First);
    let healthy = |what: &'static str| {
        let balancer = balancer.clone();
        move || {
            let st = balancer.status();
            async move {
                if st.serving == 1 && st.in_sync && st.fail_static.is_none() {
                    Ok(())
                } else {
                    Err(format!("{what}: {st:?}"))
                }
            }
        }
    };
    eventually(
        settle,
        label(backend, "the balancer serves a and is in sync"),
        healthy("before the outage"),
    )
    .await;
    let changes_before = mirror.log().len();

    if let Err(e) = backend.partition().await {
        panic!("[{}] partition failed: {e}", backend.name());
    }
    let errors_before = mirror.errors();
    eventually(
        backend.heal_bound(),
        label(backend, "the balancer reports the outage"),
        || {
            let st = balancer.status();
            async move {
                match st.fail_static {
                    Some(FailStatic::BackendError(_)) if !st.in_sync => Ok(()),
                    _ => Err(format!("{st:?}")),
                }
            }
        },
    )
    .await;
    let until = Instant::now() + backend.heal_bound();
    while mirror.errors() == errors_before {
        if mirror.next_until(until).await.is_err() {
            panic!(
                "[{}] the watch yielded no error during the outage; a watch must report an \
                 outage as an Err item",
                backend.name()
            );
        }
    }
    assert!(!mirror.is_in_sync());
    assert_eq!(
        balancer.instances().len(),
        1,
        "[{}] fail-static: the balancer keeps serving a during the outage",
        backend.name()
    );

    if let Err(e) = backend.heal().await {
        panic!("[{}] heal failed: {e}", backend.name());
    }
    let one_retry = backend.retry_period() + Duration::from_secs(2);
    mirror
        .wait_in_sync(
            one_retry,
            "Synced after the outage (nothing changed, so only Synced can say it is over)",
        )
        .await;
    eventually(
        one_retry,
        label(
            backend,
            "the balancer's status is healthy again after the outage",
        ),
        healthy("after the outage"),
    )
    .await;
    assert_eq!(
        &mirror.log()[changes_before..],
        &[] as &[WatchEvent],
        "[{}] the set did not change, so the watch must tell no change",
        backend.name()
    );
    eventually(
        backend.heal_bound(),
        label(backend, "a's registration is live again"),
        || {
            let l = handle.liveness();
            async move {
                if l.is_live() {
                    Ok(())
                } else {
                    Err(format!("{l:?}"))
                }
            }
        },
    )
    .await;
    if let Err(e) = handle.shutdown().await {
        panic!("[{}] shutdown after the outage failed: {e}", backend.name());
    }
}

/// With a watch open and instances registered, the backend restarts. The registrations heal by
/// themselves (they are listed again and their handles live), changes after the restart are
/// delivered, and the watch's events, replayed onto a set, are consistent throughout (checked
/// by [`Mirror`]) and end equal to the truth. The watch may yield errors in between and never
/// ends.
pub async fn reconnect_resync<B: Backend + ?Sized>(backend: &B) {
    let svc = unique_service("resync");
    let bound = backend.settle_bound();
    let mut handles = Vec::new();
    for (n, id) in ["a", "b", "c"].into_iter().enumerate() {
        handles.push(
            register(
                backend,
                registration(backend, &svc, id, n as u16).tag("before"),
            )
            .await,
        );
    }
    let mut mirror = mirror_of(backend, "watch", backend.discovery().watch(&svc));
    mirror
        .wait_until(bound, "a, b, c listed", set_is(&["a", "b", "c"]))
        .await;
    for h in &handles {
        let live = tokio::time::timeout(bound, h.wait_live()).await;
        assert_eq!(
            live.ok(),
            Some(Liveness::Live),
            "[{}] {} must be live before the restart",
            backend.name(),
            h.instance().id()
        );
    }
    let failures_before: u64 = handles.iter().map(RegistrationHandle::failures).sum();
    let errors_before = mirror.errors();

    if let Err(e) = backend.restart().await {
        panic!("[{}] restart failed: {e}", backend.name());
    }

    // The restart must have taken the backend away: the watch reported it, and the
    // registrations noticed (a restart() that does nothing would otherwise pass).
    let until = Instant::now() + backend.heal_bound();
    while mirror.errors() == errors_before {
        if mirror.next_until(until).await.is_err() {
            panic!(
                "[{}] the watch yielded no error across the restart: either restart() did not \
                 take the backend away, or the watch hid the outage (a watch must yield an Err \
                 while the backend is unreachable)",
                backend.name()
            );
        }
    }
    eventually(
        backend.heal_bound(),
        label(
            backend,
            "a registration handle reports losing its registration across the restart \
             (restart() must take the backend away, and a handle must report Recovering, \
             counted by RegistrationHandle::failures, when a heartbeat fails)",
        ),
        || {
            let now: u64 = handles.iter().map(RegistrationHandle::failures).sum();
            async move {
                if now > failures_before {
                    Ok(())
                } else {
                    Err(format!("{now} failures, as before the restart"))
                }
            }
        },
    )
    .await;

    // The registrations heal by themselves.
    instances_until(
        backend,
        &svc,
        backend.heal_bound(),
        "a, b, c are listed again after the restart",
        exactly(&["a", "b", "c"]),
    )
    .await;
    for h in &handles {
        let live = tokio::time::timeout(backend.heal_bound(), h.wait_live()).await;
        assert_eq!(
            live.ok(),
            Some(Liveness::Live),
            "[{}] {} must be live again after the restart",
            backend.name(),
            h.instance().id()
        );
    }

    // Changes after the restart reach the same watch.
    let d = register(backend, registration(backend, &svc, "d", 4).tag("after")).await;
    let a = handles.remove(0);
    if let Err(e) = a.shutdown().await {
        panic!(
            "[{}] shutdown of a after the restart failed: {e}",
            backend.name()
        );
    }
    let truth = instances_until(
        backend,
        &svc,
        backend.heal_bound(),
        "b, c, d are listed",
        exactly(&["b", "c", "d"]),
    )
    .await;
    mirror
        .wait_until(
            backend.heal_bound(),
            "the watch converges on the truth",
            |s| s.instances() == truth,
        )
        .await;
    // Converged: nothing further may arrive while nothing changes (errors aside).
    mirror
        .hold(Duration::from_secs(1), "the set stays the truth", |s| {
            s.instances() == truth
        })
        .await;

    for h in handles.into_iter().chain([d]) {
        let _ = h.shutdown().await;
    }
}

/// Several watchers of one service (each from its own discovery client) all see the same
/// adds and removals; a watcher opened later starts with the current set.
pub async fn several_watchers_same_service<B: Backend + ?Sized>(backend: &B) {
    let svc = unique_service("watchers");
    let bound = backend.settle_bound();
    let mut mirrors: Vec<Mirror> = (0..3)
        .map(|n| {
            mirror_of(
                backend,
                &format!("watcher {n}"),
                backend.discovery().watch(&svc),
            )
        })
        .collect();
    let a = register(backend, registration(backend, &svc, "a", 1)).await;
    let b = register(backend, registration(backend, &svc, "b", 2)).await;
    for m in &mut mirrors {
        m.wait_until(bound, "a and b", set_is(&["a", "b"])).await;
    }
    let _ = a.shutdown().await;
    for m in &mut mirrors {
        m.wait_until(bound, "a removed", set_is(&["b"])).await;
        assert!(
            m.log()
                .iter()
                .any(|e| matches!(e, WatchEvent::Removed(i) if i.id().as_str() == "a")),
            "[{}] every watcher sees the removal",
            backend.name()
        );
    }
    let mut late = mirror_of(backend, "late watcher", backend.discovery().watch(&svc));
    late.wait_until(bound, "the current set", set_is(&["b"]))
        .await;
    assert!(
        matches!(late.log().first(), Some(WatchEvent::Snapshot(v)) if v.len() == 1),
        "[{}] a late watcher starts with the current set, got {:?}",
        backend.name(),
        late.log()
    );
    let _ = b.shutdown().await;
    for m in mirrors.iter_mut().chain([&mut late]) {
        m.wait_until(bound, "b removed", |s| s.is_empty()).await;
    }
}

/// Fifty instances registered concurrently (from several registry clients) are all listed,
/// sorted, and in one watch; shut down concurrently, all leave.
pub async fn many_instances<B: Backend + ?Sized>(backend: &B) {
    const N: u16 = 50;
    let svc = unique_service("many");
    let bound = backend.settle_bound() * 2;
    let registries: Vec<_> = (0..5).map(|_| backend.registry()).collect();
    let regs = (0..N).map(|n| {
        let reg = registration(backend, &svc, &format!("i{n:03}"), n).build();
        let registry = registries[usize::from(n) % registries.len()].clone();
        async move {
            let reg = reg.map_err(|e| e.to_string())?;
            registry.register(reg).await.map_err(|e| e.to_string())
        }
    });
    let mut handles = Vec::new();
    for r in join_all(regs).await {
        match r {
            Ok(h) => {
                remember(h.instance());
                handles.push(h);
            }
            Err(e) => panic!("[{}] registering one of {N} failed: {e}", backend.name()),
        }
    }
    let list = instances_until(backend, &svc, bound, "all 50 are listed", |l| {
        if l.len() == usize::from(N) {
            Ok(())
        } else {
            Err(format!("{} of {N}", l.len()))
        }
    })
    .await;
    let want: Vec<String> = (0..N).map(|n| format!("i{n:03}")).collect();
    assert_eq!(
        ids_of(&list),
        want,
        "[{}] all 50, sorted by id",
        backend.name()
    );

    let mut mirror = mirror_of(backend, "watch", backend.discovery().watch(&svc));
    mirror
        .wait_until(bound, "all 50 in the watch", |s| s.len() == usize::from(N))
        .await;
    join_all(handles.into_iter().map(|h| h.shutdown())).await;
    mirror
        .wait_until(bound, "all 50 gone", |s| s.is_empty())
        .await;
    instances_until(backend, &svc, bound, "none is listed", exactly(&[])).await;
}

/// A service nobody registered is no error: `instances` answers `Ok` with nothing, and a watch
/// starts with an empty snapshot, says `Synced`, and reports no error. The same holds for a
/// service whose last instance left.
pub async fn unknown_service<B: Backend + ?Sized>(backend: &B) {
    let settle = backend.settle_bound();
    let never = unique_service("never-registered");
    match backend.discovery().instances(&never).await {
        Ok(list) => assert!(
            list.is_empty(),
            "[{}] an unknown service has no instances, got {:?}",
            backend.name(),
            ids_of(&list)
        ),
        Err(e) => panic!(
            "[{}] instances() of an unknown service must be Ok(empty), not an error: {e}",
            backend.name()
        ),
    }
    let mut mirror = mirror_of(
        backend,
        "unknown-service watch",
        backend.discovery().watch(&never),
    );
    mirror
        .wait_in_sync(settle, "an empty snapshot, then Synced")
        .await;
    assert!(mirror.set().is_empty());
    assert_eq!(
        mirror.errors(),
        0,
        "[{}] an unknown service is no error for a watch",
        backend.name()
    );

    // A service that had an instance and lost it.
    let gone = unique_service("gone");
    let h = register(backend, registration(backend, &gone, "a", 1)).await;
    instances_until(backend, &gone, settle, "a is listed", exactly(&["a"])).await;
    if let Err(e) = h.shutdown().await {
        panic!("[{}] shutdown failed: {e}", backend.name());
    }
    instances_until(
        backend,
        &gone,
        settle,
        "a service whose last instance left lists nothing, without an error",
        exactly(&[]),
    )
    .await;
}

/// Two live handles with the same id: the last registration wins. The instance is listed once,
/// as the second handle described it, and stays so while both handles heart-beat (the first
/// must not restore its version). What shutting the *older* handle down does is the backend's
/// own (Consul deregisters by id; an etcd lease only removes what it still owns), so the
/// scenario abandons it, as a crashed process would, and checks that the newer registration
/// is still listed afterwards.
pub async fn duplicate_ids<B: Backend + ?Sized>(backend: &B) {
    let svc = unique_service("duplicate");
    let settle = backend.settle_bound();
    let first = register(backend, registration(backend, &svc, "dup", 1).tag("first")).await;
    instances_until(
        backend,
        &svc,
        settle,
        "the first dup is listed",
        exactly(&["dup"]),
    )
    .await;
    let second = register(backend, registration(backend, &svc, "dup", 2).tag("second")).await;
    let second_port = second.instance().port();
    let is_second = |list: &[ServiceInstance]| match list {
        [one] if one.id().as_str() == "dup" && one.port() == second_port => Ok(()),
        _ => Err(format!(
            "want exactly one dup, on port {second_port} (the last registration)"
        )),
    };
    instances_until(
        backend,
        &svc,
        settle,
        "the last registration wins",
        is_second,
    )
    .await;
    // Both handles keep heart-beating for longer than a TTL: the first must not take over.
    let mut mirror = mirror_of(backend, "duplicate watch", backend.discovery().watch(&svc));
    mirror
        .wait_until(settle, "dup in the watch", |s| {
            s.get("dup").is_some_and(|i| i.port() == second_port)
        })
        .await;
    mirror
        .hold(
            backend.ttl() + Duration::from_secs(1),
            "the last registration stays while both handles live",
            |s| s.len() == 1 && s.get("dup").is_some_and(|i| i.port() == second_port),
        )
        .await;
    if let Err(e) = first.abandon().await {
        panic!(
            "[{}] abandoning the first handle failed: {e}",
            backend.name()
        );
    }
    instances_until(
        backend,
        &svc,
        settle,
        "the newer registration outlives the abandoned older handle",
        is_second,
    )
    .await;
    if let Err(e) = second.shutdown().await {
        panic!(
            "[{}] shutdown of the second handle failed: {e}",
            backend.name()
        );
    }
    instances_until(
        backend,
        &svc,
        settle,
        "dup is gone after its shutdown",
        exactly(&[]),
    )
    .await;
}

/// Hundreds of registrations and deregistrations in a burst: the watch's final state equals
/// the backend's, and every event on the way is consistent (no duplicate add, no removal of
/// an absent id).
pub async fn bulk_churn<B: Backend + ?Sized>(backend: &B) {
    const FIRST: u16 = 200;
    const SECOND: u16 = 100;
    let svc = unique_service("churn");
    let bound = backend.settle_bound() * 3;
    let mut mirror = mirror_of(backend, "churn watch", backend.discovery().watch(&svc));
    mirror
        .wait_until(backend.settle_bound(), "the empty snapshot", |s| {
            s.is_empty()
        })
        .await;
    let registries: Vec<_> = (0..4).map(|_| backend.registry()).collect();
    let svc_ref = &svc;
    let registries_ref = &registries;
    // 32 at a time: a burst, within what one client may hold open to a server (Consul's
    // agent allows 200 connections per client address by default).
    let burst = |range: std::ops::Range<u16>| {
        let (svc, registries) = (svc_ref, registries_ref);
        futures::stream::iter(range.map(move |n| {
            let reg = registration(backend, svc, &format!("c{n:04}"), n).build();
            let registry = registries[usize::from(n) % registries.len()].clone();
            async move {
                let reg = reg.map_err(|e| e.to_string())?;
                registry.register(reg).await.map_err(|e| e.to_string())
            }
        }))
        .buffered(32)
        .collect::<Vec<_>>()
    };
    let mut handles = Vec::new();
    for r in burst(0..FIRST).await {
        match r {
            Ok(h) => {
                remember(h.instance());
                handles.push(h);
            }
            Err(e) => panic!(
                "[{}] registering one of {FIRST} failed: {e}",
                backend.name()
            ),
        }
    }
    // At once: half of them leave while as many new ones arrive.
    let leaving: Vec<_> = handles.drain(..usize::from(SECOND)).collect();
    let (left, arrived) = futures::join!(
        join_all(leaving.into_iter().map(|h| h.shutdown())),
        burst(FIRST..FIRST + SECOND)
    );
    for r in left {
        if let Err(e) = r {
            panic!("[{}] a shutdown in the burst failed: {e}", backend.name());
        }
    }
    for r in arrived {
        match r {
            Ok(h) => {
                remember(h.instance());
                handles.push(h);
            }
            Err(e) => panic!("[{}] registering in the burst failed: {e}", backend.name()),
        }
    }
    let want: BTreeSet<String> = (SECOND..FIRST + SECOND)
        .map(|n| format!("c{n:04}"))
        .collect();
    let listed = instances_until(
        backend,
        &svc,
        bound,
        "the backend lists the survivors",
        |l| {
            if ids_of(l).into_iter().collect::<BTreeSet<_>>() == want {
                Ok(())
            } else {
                Err(format!("{} listed, want {}", l.len(), want.len()))
            }
        },
    )
    .await;
    mirror
        .wait_until(
            bound,
            "the watch shows exactly what the backend lists",
            |s| {
                s.iter()
                    .map(|i| i.id().to_string())
                    .collect::<BTreeSet<_>>()
                    == want
            },
        )
        .await;
    assert_eq!(
        mirror.set().instances(),
        listed,
        "[{}] the watch's final state equals the backend's",
        backend.name()
    );
    join_all(handles.into_iter().map(|h| h.shutdown())).await;
    mirror
        .wait_until(bound, "all gone after the last shutdowns", |s| s.is_empty())
        .await;
}

/// Bad input is rejected when the registration is built (so before any I/O), with an error
/// naming the field; input at the documented limits is accepted and round-trips.
pub async fn bad_input<B: Backend + ?Sized>(backend: &B) {
    let name = backend.name();
    let ok = || {
        Registration::builder("svc", "id-1")
            .host("127.0.0.1")
            .port(8080)
    };
    let cases: Vec<(RegistrationBuilder, Field)> = vec![
        (Registration::builder("", "id").port(1), Field::ServiceName),
        (
            Registration::builder("a/b", "id").port(1),
            Field::ServiceName,
        ),
        (
            Registration::builder("a b", "id").port(1),
            Field::ServiceName,
        ),
        (
            Registration::builder("x".repeat(129), "id").port(1),
            Field::ServiceName,
        ),
        (Registration::builder("svc", "").port(1), Field::InstanceId),
        (
            Registration::builder("svc", "a/b").port(1),
            Field::InstanceId,
        ),
        (
            Registration::builder("svc", "a\nb").port(1),
            Field::InstanceId,
        ),
        (Registration::builder("svc", "id"), Field::Port),
        (ok().port(0), Field::Port),
        (ok().host(""), Field::Host),
        (ok().host("a b"), Field::Host),
        (ok().weight(0), Field::Weight),
        (ok().weight(Weight::MAX + 1), Field::Weight),
        (ok().tag("ok").tag("bad\u{0}"), Field::Tag(1)),
        (
            ok().meta("bad key", "v"),
            Field::MetadataKey("bad key".into()),
        ),
        (
            ok().meta("k", "line\nbreak"),
            Field::MetadataValue("k".into()),
        ),
        (ok().zone(""), Field::Zone),
        (
            ok().check(HealthCheck::ttl(Duration::ZERO)),
            Field::CheckTtl,
        ),
        (
            ok().check(HealthCheck::http("ftp://x", Duration::from_secs(1))),
            Field::CheckUrl,
        ),
        (
            ok().check(HealthCheck::tcp("no-port", Duration::from_secs(1))),
            Field::CheckAddress,
        ),
        (
            ok().deregister_critical_after(Duration::ZERO),
            Field::DeregisterAfter,
        ),
    ];
    for (builder, field) in cases {
        let shown = format!("{builder:?}");
        match builder.build() {
            Ok(_) => panic!("[{name}] {shown} must be rejected"),
            Err(e) => {
                assert_eq!(e.field(), &field, "[{name}] {shown}: wrong field in {e}");
                assert!(!e.to_string().is_empty());
            }
        }
    }
    for bad in ["", "a/b", "a\u{7}b", "naïve"] {
        let err = ServiceName::new(bad).err();
        assert_eq!(
            err.as_ref().map(|e| e.field()),
            Some(&Field::ServiceName),
            "[{name}] service name {bad:?} must be rejected before discovery is asked"
        );
    }

    // At the limits: many tags and metadata pairs, long values; the backend takes them as they are.
    let svc = unique_service("limits");
    let mut reg = registration(backend, &svc, "edge-1", 1);
    for t in 0..32 {
        reg = reg.tag(format!("tag-{t}"));
    }
    for m in 0..32 {
        reg = reg.meta(format!("key_{m}"), format!("value {m} ").repeat(20));
    }
    let h = register(backend, reg).await;
    let list = instances_until(
        backend,
        &svc,
        backend.settle_bound(),
        "the instance at the limits is listed",
        exactly(&["edge-1"]),
    )
    .await;
    assert_describes_as(backend.describes(), name, &list[0], h.instance());
    let _ = h.shutdown().await;
}

#[cfg(test)]
mod tests {
    //! The checks of [`Mirror`] must catch each kind of inconsistent watch.

    use super::*;
    use futures::stream;

    fn inst(id: &str, port: u16) -> ServiceInstance {
        ServiceInstance::builder("s", id)
            .host("h")
            .port(port)
            .build()
            .unwrap()
    }

    /// Feeds `events` (then nothing, forever) through a mirror until it has seen them all.
    async fn replay(events: Vec<WatchEvent>) {
        let n = events.len();
        let watch = stream::iter(events.into_iter().map(Ok))
            .chain(stream::pending())
            .boxed();
        let mut mirror = Mirror::new("test", watch);
        let until = Instant::now() + Duration::from_secs(5);
        while mirror.log().len() < n {
            mirror.next_until(until).await.unwrap();
        }
    }

    #[tokio::test]
    async fn consistent_events_pass() {
        replay(vec![
            WatchEvent::Snapshot(vec![inst("a", 1)]),
            WatchEvent::Added(inst("b", 1)),
            WatchEvent::Updated(inst("a", 2)),
            WatchEvent::Removed(inst("b", 1)),
            WatchEvent::Added(inst("b", 1)),
        ])
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "already present")]
    async fn added_twice_is_caught() {
        replay(vec![
            WatchEvent::Snapshot(vec![inst("a", 1)]),
            WatchEvent::Added(inst("a", 1)),
        ])
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "never added")]
    async fn update_of_an_absent_id_is_caught() {
        replay(vec![
            WatchEvent::Snapshot(vec![]),
            WatchEvent::Updated(inst("a", 1)),
        ])
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "without any change")]
    async fn empty_update_is_caught() {
        replay(vec![
            WatchEvent::Snapshot(vec![inst("a", 1)]),
            WatchEvent::Updated(inst("a", 1)),
        ])
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "not present")]
    async fn removal_of_an_absent_id_is_caught() {
        replay(vec![
            WatchEvent::Snapshot(vec![]),
            WatchEvent::Removed(inst("a", 1)),
        ])
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "second Snapshot")]
    async fn second_snapshot_is_caught() {
        replay(vec![
            WatchEvent::Snapshot(vec![]),
            WatchEvent::Snapshot(vec![]),
        ])
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "before the Snapshot")]
    async fn change_before_snapshot_is_caught() {
        replay(vec![WatchEvent::Added(inst("a", 1))]).await;
    }

    #[tokio::test]
    #[should_panic(expected = "sorted by id")]
    async fn unsorted_snapshot_is_caught() {
        replay(vec![WatchEvent::Snapshot(vec![inst("b", 1), inst("a", 1)])]).await;
    }

    #[tokio::test]
    #[should_panic(expected = "the watch ended")]
    async fn ended_watch_is_caught() {
        let watch = stream::iter([Ok(WatchEvent::Snapshot(vec![]))]).boxed();
        let mut mirror = Mirror::new("test", watch);
        mirror
            .wait_until(Duration::from_secs(5), "never", |_| false)
            .await;
    }

    #[tokio::test]
    #[should_panic(expected = "not seen within")]
    async fn wait_until_gives_up_at_its_bound() {
        let watch = stream::iter([Ok(WatchEvent::Snapshot(vec![]))])
            .chain(stream::pending())
            .boxed();
        let mut mirror = Mirror::new("test", watch);
        mirror
            .wait_until(Duration::from_millis(100), "never", |_| false)
            .await;
    }

    #[tokio::test]
    async fn errors_are_counted_not_fatal() {
        let err = waypost_core::Error::unavailable("test", "watch", "down");
        let watch = stream::iter([Err(err), Ok(WatchEvent::Snapshot(vec![inst("a", 1)]))])
            .chain(stream::pending())
            .boxed();
        let mut mirror = Mirror::new("test", watch);
        mirror
            .wait_until(Duration::from_secs(5), "a", |s| s.len() == 1)
            .await;
        assert_eq!(mirror.errors(), 1);
    }

    #[test]
    fn describes_accepts_zone_and_weight_in_metadata_only() {
        let want = ServiceInstance::builder("s", "a")
            .host("h")
            .port(1)
            .weight(3)
            .zone("z")
            .build()
            .unwrap();
        let consul_like = ServiceInstance::builder("s", "a")
            .host("h")
            .port(1)
            .weight(3)
            .meta("zone", "z")
            .meta("weight", "3")
            .build()
            .unwrap();
        assert_describes("test", &consul_like, &want);
        let stray = consul_like.to_builder().meta("extra", "x").build().unwrap();
        let caught = std::panic::catch_unwind(|| assert_describes("test", &stray, &want));
        assert!(caught.is_err(), "unregistered metadata must be caught");
    }
}
