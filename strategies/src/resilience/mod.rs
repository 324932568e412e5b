//! Resilience around any strategy: passive outlier ejection, slow start, a panic threshold,
//! zone preference and filters, in one wrapper, [`Resilient`].
//!
//! Everything it remembers about an instance lives in the instance's
//! [`EndpointState`](waypost_core::EndpointState) (consecutive failures, ejection time and count,
//! creation time), which the balancer keeps across instance-set updates by id; the wrapper itself
//! holds only settings and a few shared atomics. Picks take no lock and allocate nothing.
//!
//! How a pick goes:
//! 1. Filters were applied when the set was built: the inner strategy only ever sees the
//!    instances that pass ([`Filter`]).
//! 2. If the request names a zone and enough instances there are healthy, the inner strategy
//!    picks among those ([`ZonePreference`]); otherwise among all.
//! 3. If fewer than the panic threshold of that group are healthy, ejection is ignored and the
//!    pick spreads over the whole group (as Envoy does, rather than overloading the few left).
//! 4. Otherwise the inner strategy's choice is screened: an ejected instance, or one whose
//!    failures now call for ejection ([`OutlierEjection`]), is skipped, and an instance in slow
//!    start is accepted with the probability of its ramp ([`SlowStart`]); then the inner strategy
//!    chooses again (up to 8 times; a keyed request is rehashed deterministically, so that a key
//!    whose instance is ejected keeps going to the same substitute). If every try fails, a scan
//!    finds any healthy instance.
//!
//! A retry ([`Balancer::pick_excluding`](waypost_core::Balancer::pick_excluding)) goes through
//! the same screen with the inner strategy's answer for retries (the next instance on a ring,
//! the next in turn...), so ejection is judged on this layer's [`Clock`] there too; if every
//! instance not tried yet is ejected, the retry takes one of those rather than fail.
//!
//! The layer needs outcomes: call [`PickGuard::failure`](waypost_core::PickGuard::failure) or
//! `success` for every call, or ejection never sees a failure.
//!
//! Costs: a pick reads the clock (when ejection or slow start is on) and a few atomics, plus
//! what the inner strategy costs per try. Ejecting an instance, and the first pick after an
//! ejection ends, count the healthy instances: O(n), once per such event. Each build runs the
//! inner strategy's build once for the whole set and once per zone.
//!
//! Ejection state is read from [`EndpointState`](waypost_core::EndpointState); an ejection made
//! there by anything other than this layer is obeyed by picks at once, but counted toward the
//! panic threshold, zone health and the ejection limit only from the next instance-set update
//! (or the layer's own next ejection or end of one).
mod clock;
mod filter;
mod metrics;
mod picker;
mod policy;

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use waypost_core::{clock_nanos, Endpoint, Picker, Strategy};

pub use clock::{Clock, ManualClock};
pub use filter::Filter;
pub use policy::{OutlierEjection, SlowStart, ZonePreference};

use crate::Rng;
use picker::{Ejection, Group, Members, Ramp, ResilientPicker, Settings, Shared, Zone};

/// Wraps any [`Strategy`] with outlier ejection, slow start, a panic threshold, zone preference
/// and filters (see the [module documentation](self) for how a pick goes).
///
/// Defaults: [`OutlierEjection::default`] on, panic threshold 50 %, [`ZonePreference::default`]
/// on (it only acts on requests that name a zone), no slow start, no filter, the system clock.
///
/// Its [`name`](Strategy::name) is the inner strategy's, so that metrics and configuration keep
/// speaking of `round-robin` or `p2c`; its `Debug` output shows the wrapper.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{Balancer, PickContext, ServiceInstance, WatchEvent};
/// use waypost_strategies::resilience::{Filter, OutlierEjection, Resilient, SlowStart};
/// use waypost_strategies::RoundRobin;
///
/// let strategy = Resilient::new(RoundRobin::new())
///     .outlier_ejection(OutlierEjection { consecutive_failures: 3, ..Default::default() })
///     .slow_start(SlowStart { window: Duration::from_secs(30), ..Default::default() })
///     .panic_threshold(0.3)
///     .filter(Filter::new().tag("v2"));
/// assert_eq!(waypost_core::Strategy::name(&strategy), "round-robin");
///
/// let balancer = Balancer::new(strategy);
/// let v = |id: &str, tag: &str| {
///     ServiceInstance::builder("users", id).host("10.0.0.1").port(80).tag(tag).zone("eu-1a").build()
/// };
/// balancer.apply(WatchEvent::Snapshot(vec![v("a", "v1")?, v("b", "v2")?, v("c", "v2")?]));
/// for _ in 0..10 {
///     let guard = balancer.pick_with(&PickContext::new().with_zone("eu-1a"))?;
///     assert_ne!(guard.instance().id().as_str(), "a"); // filtered out
///     guard.success();
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
pub struct Resilient<S> {
    inner: S,
    ejection: Option<OutlierEjection>,
    slow_start: Option<SlowStart>,
    panic_threshold: f64,
    zone: Option<ZonePreference>,
    filter: Filter,
    clock: Clock,
    rng: Arc<Rng>,
    shared: Arc<Shared>,
}

impl<S: Strategy + Default> Default for Resilient<S> {
    fn default() -> Self {
        Self::new(S::default())
    }
}

impl<S> fmt::Debug for Resilient<S>
where
    S: Strategy,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resilient")
            .field("inner", &self.inner.name())
            .field("outlier_ejection", &self.ejection)
            .field("slow_start", &self.slow_start)
            .field("panic_threshold", &self.panic_threshold)
            .field("zone_preference", &self.zone)
            .field("filter", &self.filter)
            .field("clock", &self.clock)
            .finish()
    }
}

impl<S: Strategy> Resilient<S> {
    /// Wraps `inner` with the default settings.
    pub fn new(inner: S) -> Self {
        Resilient {
            inner,
            ejection: Some(OutlierEjection::default()),
            slow_start: None,
            panic_threshold: 0.5,
            zone: Some(ZonePreference::default()),
            filter: Filter::new(),
            clock: Clock::system(),
            rng: Arc::new(Rng::new()),
            shared: Arc::default(),
        }
    }

    /// Sets outlier ejection.
    pub fn outlier_ejection(mut self, ejection: OutlierEjection) -> Self {
        self.ejection = Some(ejection);
        self
    }

    /// Turns outlier ejection off: failures never take an instance out.
    pub fn without_outlier_ejection(mut self) -> Self {
        self.ejection = None;
        self
    }

    /// Turns slow start on.
    pub fn slow_start(mut self, slow_start: SlowStart) -> Self {
        self.slow_start = Some(slow_start);
        self
    }

    /// Below this share of healthy instances (0.0 to 1.0, default 0.5; clamped, NaN means the
    /// default) picks ignore ejection and spread over all. 0.0 turns panic mode off: then, with
    /// every instance ejected, picks fail with `PickError::NoneFits`.
    pub fn panic_threshold(mut self, share: f64) -> Self {
        self.panic_threshold = policy::share(share, 0.5);
        self
    }

    /// Sets zone preference.
    pub fn zone_preference(mut self, zone: ZonePreference) -> Self {
        self.zone = Some(zone);
        self
    }

    /// Turns zone preference off: a request's zone is ignored.
    pub fn without_zone_preference(mut self) -> Self {
        self.zone = None;
        self
    }

    /// Only instances that pass `filter` are ever picked.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// The clock (simulated time in tests; see [`ManualClock`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The randomness of slow start and of the last-resort scan (seed it for reproducible tests).
    pub fn rng(mut self, rng: Rng) -> Self {
        self.rng = Arc::new(rng);
        self
    }

    /// The wrapped strategy.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn settings(&self) -> Settings {
        let ejection = self.ejection.as_ref().map(|e| Ejection {
            threshold: e.consecutive_failures.max(1),
            base: nanos(e.base_ejection_time),
            max: nanos(e.max_ejection_time),
            max_share: policy::share(e.max_ejected_share, 0.5),
            probation: nanos(e.probation),
        });
        let ramp = self.slow_start.as_ref().map(|s| Ramp {
            window: nanos(s.window),
            inv_aggression: if s.aggression > 0.0 && s.aggression.is_finite() {
                1.0 / s.aggression
            } else {
                1.0
            },
            min: policy::share(s.min_weight_share, 0.1),
        });
        let zone = self.zone.as_ref().map(|z| Zone {
            min_healthy: z.min_healthy.max(1),
            min_share: policy::share(z.min_healthy_share, 0.7),
        });
        Settings {
            ejection,
            ramp,
            panic: self.panic_threshold,
            zone,
        }
    }

    /// A group of `endpoints` (indices into them) with the inner strategy's picker for it.
    fn group(
        &self,
        endpoints: &[Endpoint],
        members: Option<Vec<u32>>,
        zone: Option<&str>,
    ) -> Group {
        let (members, picker, len) = match members {
            None => (Members::All, self.inner.build(endpoints), endpoints.len()),
            Some(to_full) => {
                let subset: Vec<Endpoint> = to_full
                    .iter()
                    .map(|&i| endpoints[i as usize].clone())
                    .collect();
                let picker = self.inner.build(&subset);
                let len = subset.len();
                (
                    Members::Some {
                        endpoints: subset,
                        to_full,
                    },
                    picker,
                    len,
                )
            }
        };
        Group {
            zone: zone.map(Box::from),
            members,
            picker,
            len,
            healthy: AtomicUsize::new(len),
        }
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<S: Strategy> Strategy for Resilient<S> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        if !endpoints.is_empty() {
            // Instances present at the first real build are not slow-started. created_at is on
            // the clock_nanos base whatever clock the layer reads, so compare on that base.
            let _ = self.shared.started.set(clock_nanos());
            let service = endpoints[0].instance().service().as_str();
            self.shared
                .metrics
                .get_or_init(|| metrics::ResilienceMetrics::new(service));
        }
        let started = self.shared.started.get().copied().unwrap_or(0);
        let settings = self.settings();

        let passing: Option<Vec<u32>> = (!self.filter.is_empty()).then(|| {
            (0..endpoints.len() as u32)
                .filter(|&i| self.filter.matches(endpoints[i as usize].instance()))
                .collect()
        });
        let all = match &passing {
            Some(p) if p.is_empty() => None,
            _ => Some(self.group(endpoints, passing.clone(), None)),
        };

        let mut zones = Vec::new();
        if settings.zone.is_some() && all.is_some() {
            let members: Vec<u32> =
                passing.unwrap_or_else(|| (0..endpoints.len() as u32).collect());
            let mut by_zone: std::collections::BTreeMap<&str, Vec<u32>> = Default::default();
            for i in members {
                if let Some(z) = endpoints[i as usize].instance().zone() {
                    by_zone.entry(z).or_default().push(i);
                }
            }
            for (zone, members) in by_zone {
                zones.push(self.group(endpoints, Some(members), Some(zone)));
            }
        }

        let picker = ResilientPicker {
            settings,
            all,
            zones,
            started,
            clock: self.clock.clone(),
            rng: Arc::clone(&self.rng),
            shared: Arc::clone(&self.shared),
            counts_until: AtomicU64::new(u64::MAX),
            counts_epoch: AtomicU64::new(0),
        };
        if settings.ejection.is_some() {
            picker.recount(endpoints, self.clock.now(), self.shared.epoch());
        } else {
            picker.observe();
        }
        Box::new(picker)
    }
}
