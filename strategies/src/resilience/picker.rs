//! The picker of [`Resilient`](super::Resilient): the inner strategy's picks, screened.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use waypost_core::{Endpoint, PickContext, Picker};

use super::clock::Clock;
use crate::rng::rehash;
use crate::Rng;

/// How many times a pick asks the inner strategy before it scans for any healthy instance.
/// With at most half the instances ejected, a random strategy needs all of them with
/// probability 1/256.
const TRIES: u32 = 8;

/// State shared by a strategy and every picker it built (old pickers can still be in use while
/// a new one serves).
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// Held while one thread decides on an ejection; others never wait for it, they skip the
    /// decision (the next pick of the instance makes it).
    deciding: AtomicBool,
    /// Counts ejections, so that pickers know their healthy counts are stale.
    epoch: AtomicU64,
    /// When the first non-empty set was built ([`waypost_core::clock_nanos`], the base of
    /// `created_at`): instances created before are exempt from slow start.
    pub(super) started: OnceLock<u64>,
    /// The layer's series, for the service of the first non-empty build.
    pub(super) metrics: OnceLock<super::metrics::ResilienceMetrics>,
}

impl Shared {
    fn try_lock(&self) -> bool {
        self.deciding
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }
    fn unlock(&self) {
        self.deciding.store(false, Ordering::Release);
    }
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

/// [`OutlierEjection`](super::OutlierEjection) in nanoseconds, sanitized.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ejection {
    pub(super) threshold: u32,
    pub(super) base: u64,
    pub(super) max: u64,
    pub(super) max_share: f64,
    pub(super) probation: u64,
}

impl Ejection {
    /// The ejection count and end of an ejection decided at `now`, for an instance whose last
    /// ejection (`count` of them so far) ended at `last_until`.
    ///
    /// The count falls by one per whole base interval the instance has been back without an
    /// ejection, as Envoy decrements it after each ejection-free interval (this layer has no
    /// sweep timer, so it settles the intervals when it ejects again). It grows only while
    /// the ejection is shorter than the maximum, also as Envoy does, so that an instance
    /// ejected often comes back to short ejections after at most `max / base` healthy
    /// intervals.
    pub(super) fn next(&self, count: u32, last_until: u64, now: u64) -> (u32, u64) {
        let back = now.saturating_sub(last_until);
        let healthy_intervals = u32::try_from(back / self.base.max(1)).unwrap_or(u32::MAX);
        let remembered = count.saturating_sub(healthy_intervals);
        let at_max = u64::from(remembered).saturating_mul(self.base) >= self.max;
        let count = if at_max { remembered } else { remembered + 1 };
        let until = now.saturating_add(self.base.saturating_mul(u64::from(count)).min(self.max));
        (count, until)
    }
}

/// [`SlowStart`](super::SlowStart) in nanoseconds, sanitized.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ramp {
    pub(super) window: u64,
    pub(super) inv_aggression: f64,
    pub(super) min: f64,
}

/// [`ZonePreference`](super::ZonePreference), sanitized.
#[derive(Clone, Copy, Debug)]
pub(super) struct Zone {
    pub(super) min_healthy: usize,
    pub(super) min_share: f64,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    pub(super) ejection: Option<Ejection>,
    pub(super) ramp: Option<Ramp>,
    pub(super) panic: f64,
    pub(super) zone: Option<Zone>,
}

/// Which endpoints a group holds.
pub(super) enum Members {
    /// The whole slice the picker receives.
    All,
    /// A subset, with each member's index in the whole slice.
    Some {
        endpoints: Vec<Endpoint>,
        to_full: Vec<u32>,
    },
}

/// A set of endpoints with the inner strategy's picker for it: the filtered set, or the part of
/// it in one zone.
pub(super) struct Group {
    pub(super) zone: Option<Box<str>>,
    pub(super) members: Members,
    pub(super) picker: Box<dyn waypost_core::Picker>,
    pub(super) len: usize,
    /// Members not ejected, as of the picker's last count.
    pub(super) healthy: AtomicUsize,
}

impl Group {
    /// The inner strategy's pick, as an index into the whole slice.
    #[inline]
    fn pick(&self, full: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        match &self.members {
            Members::All => self.picker.pick(full, ctx).filter(|&i| i < full.len()),
            Members::Some { endpoints, to_full } => {
                let i = self.picker.pick(endpoints, ctx)?;
                to_full.get(i).map(|&f| f as usize)
            }
        }
    }

    /// The inner strategy's answer for a retry, skipping the members for which `skip` (on
    /// indices into the whole slice) is true; as an index into the whole slice.
    fn pick_excluding(
        &self,
        full: &[Endpoint],
        ctx: &PickContext<'_>,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        match &self.members {
            Members::All => self
                .picker
                .pick_excluding(full, ctx, skip)
                .filter(|&i| i < full.len()),
            Members::Some { endpoints, to_full } => {
                let local = |k: usize| to_full.get(k).map_or(true, |&f| skip(f as usize));
                let k = self.picker.pick_excluding(endpoints, ctx, &local)?;
                to_full.get(k).map(|&f| f as usize)
            }
        }
    }

    /// The `k`-th member, as an index into the whole slice.
    fn member(&self, k: usize) -> Option<usize> {
        match &self.members {
            Members::All => Some(k),
            Members::Some { to_full, .. } => to_full.get(k).map(|&f| f as usize),
        }
    }
}

pub(super) struct ResilientPicker {
    pub(super) settings: Settings,
    /// `None` when the filter passes no instance.
    pub(super) all: Option<Group>,
    pub(super) zones: Vec<Group>,
    /// Instances created at or before this time are not slow-started.
    pub(super) started: u64,
    pub(super) clock: Clock,
    pub(super) rng: std::sync::Arc<Rng>,
    pub(super) shared: std::sync::Arc<Shared>,
    /// The healthy counts hold until this time (the earliest end of an ejection) ...
    pub(super) counts_until: AtomicU64,
    /// ... and as long as no ejection happened since they were taken.
    pub(super) counts_epoch: AtomicU64,
}

impl ResilientPicker {
    /// Counts the healthy members of every group at `now`. Costs O(n): runs when an ejection
    /// ends or happens, not per pick.
    pub(super) fn recount(&self, endpoints: &[Endpoint], now: u64, epoch: u64) {
        let mut until = u64::MAX;
        for group in self.all.iter().chain(&self.zones) {
            let mut healthy = 0;
            for k in 0..group.len {
                let Some(ep) = group.member(k).and_then(|i| endpoints.get(i)) else {
                    continue;
                };
                let out = ep.state().ejected_until();
                if out > now {
                    until = until.min(out);
                } else {
                    healthy += 1;
                }
            }
            group.healthy.store(healthy, Ordering::Relaxed);
        }
        self.counts_until.store(until, Ordering::Relaxed);
        self.counts_epoch.store(epoch, Ordering::Relaxed);
        self.observe();
    }

    /// Whether `group` is in panic mode: fewer healthy members than the threshold allows.
    fn in_panic(&self, group: &Group) -> bool {
        (self.healthy(group) as f64) < self.settings.panic * group.len as f64
    }

    /// Sets the layer's gauges from the whole set's counts.
    pub(super) fn observe(&self) {
        if let (Some(m), Some(all)) = (self.shared.metrics.get(), &self.all) {
            m.counts(all.len, self.healthy(all), self.in_panic(all));
        }
    }

    fn refresh(&self, endpoints: &[Endpoint], now: u64) {
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        if now < self.counts_until.load(Ordering::Relaxed)
            && epoch == self.counts_epoch.load(Ordering::Relaxed)
        {
            return;
        }
        // Whoever holds the lock is counting or ejecting; the stale counts do until then.
        if self.shared.try_lock() {
            self.recount(endpoints, now, self.shared.epoch.load(Ordering::Acquire));
            self.shared.unlock();
        }
    }

    fn healthy(&self, group: &Group) -> usize {
        if self.settings.ejection.is_some() {
            group.healthy.load(Ordering::Relaxed)
        } else {
            group.len
        }
    }

    /// The caller's zone if it is healthy enough, else everything.
    fn choose<'g>(&'g self, all: &'g Group, ctx: &PickContext<'_>) -> &'g Group {
        if let (Some(pref), Some(zone)) = (self.settings.zone, ctx.zone()) {
            if let Some(g) = self.zones.iter().find(|g| g.zone.as_deref() == Some(zone)) {
                let healthy = self.healthy(g);
                if healthy >= pref.min_healthy && healthy as f64 >= pref.min_share * g.len as f64 {
                    return g;
                }
            }
        }
        all
    }

    /// Whether `ep` is ejected now, ejecting it first if its failures call for it.
    #[inline]
    fn is_out(&self, ep: &Endpoint, endpoints: &[Endpoint], now: u64, ej: &Ejection) -> bool {
        let s = ep.state();
        if s.ejected_until() > now {
            return true;
        }
        let failures = s.consecutive_failures();
        failures > 0 && self.maybe_eject(ep, endpoints, now, ej, failures)
    }

    #[cold]
    fn maybe_eject(
        &self,
        ep: &Endpoint,
        endpoints: &[Endpoint],
        now: u64,
        ej: &Ejection,
        failures: u32,
    ) -> bool {
        let s = ep.state();
        let last = s.ejected_until();
        // Back from an ejection not long ago: one failure is enough.
        let on_probation = last != 0 && now < last.saturating_add(ej.probation);
        let threshold = if on_probation { 1 } else { ej.threshold };
        if failures < threshold || !self.shared.try_lock() {
            return false;
        }
        let out = self.eject_locked(ep, endpoints, now, ej, threshold);
        self.shared.unlock();
        out
    }

    fn eject_locked(
        &self,
        ep: &Endpoint,
        endpoints: &[Endpoint],
        now: u64,
        ej: &Ejection,
        threshold: u32,
    ) -> bool {
        let s = ep.state();
        // Decided by another thread between our first look and the lock?
        let seen = s.ejected_until();
        if seen > now {
            return true;
        }
        if s.consecutive_failures() < threshold {
            return false;
        }
        let Some(all) = &self.all else { return false };
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        if epoch != self.counts_epoch.load(Ordering::Relaxed)
            || now >= self.counts_until.load(Ordering::Relaxed)
        {
            self.recount(endpoints, now, epoch);
        }
        let ejected = all.len - all.healthy.load(Ordering::Relaxed).min(all.len);
        if (ejected + 1) as f64 > ej.max_share * all.len as f64 {
            return false;
        }
        let (count, until) = ej.next(s.ejections(), seen, now);
        // The lock covers this layer's pickers only; another layer over the same states (the
        // strategy that a `set_strategy` replaced, still serving picks in progress) may decide
        // at the same moment. Whoever exchanges first ejects; the other obeys.
        if !s.try_eject(seen, until, count) {
            return s.ejected_until() > now;
        }
        // Failures counted from here on are the instance's next record.
        s.reset_consecutive_failures();
        // The counts change for the whole set and for the instance's zone, nothing else.
        all.healthy.fetch_sub(1, Ordering::Relaxed);
        if let Some(g) = self
            .zones
            .iter()
            .find(|g| g.zone.as_deref().is_some() && g.zone.as_deref() == ep.instance().zone())
        {
            let _ = g
                .healthy
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| h.checked_sub(1));
        }
        self.counts_until.fetch_min(until, Ordering::Relaxed);
        // Other pickers (older snapshots) recount; this one is already up to date.
        let next = self.shared.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.counts_epoch.store(next, Ordering::Relaxed);
        if let Some(m) = self.shared.metrics.get() {
            m.ejected();
        }
        self.observe();
        true
    }

    /// The slow-start factor of `ep` at `now`: 1.0 once warm.
    #[inline]
    fn ramp(&self, ep: &Endpoint, now: u64, ramp: &Ramp) -> f64 {
        let created = ep.state().created_at();
        if created <= self.started {
            return 1.0;
        }
        let age = now.saturating_sub(created);
        if age >= ramp.window {
            return 1.0;
        }
        let f = age as f64 / ramp.window as f64;
        let f = if ramp.inv_aggression == 1.0 {
            f
        } else {
            f.powf(ramp.inv_aggression)
        };
        f.max(ramp.min)
    }

    /// Any healthy member, starting at a random one: the last resort when the inner strategy
    /// kept choosing ejected instances.
    #[cold]
    fn scan(&self, group: &Group, endpoints: &[Endpoint], now: u64) -> Option<usize> {
        let ejection = self.settings.ejection.as_ref();
        if group.len == 0 {
            return None;
        }
        let start = self.rng.below(group.len);
        (0..group.len)
            .filter_map(|k| group.member((start + k) % group.len))
            .find(|&i| {
                endpoints.get(i).is_some_and(|ep| {
                    !ejection.is_some_and(|ej| self.is_out(ep, endpoints, now, ej))
                })
            })
    }
}

impl Picker for ResilientPicker {
    fn serving(&self, _: &[Endpoint]) -> usize {
        match &self.all {
            None => 0,
            Some(all) if self.in_panic(all) => all.len,
            Some(all) => self.healthy(all),
        }
    }

    fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        let all = self.all.as_ref()?;
        let settings = &self.settings;
        // Reading the clock costs a few tens of ns: only when something needs the time.
        let now = if settings.ejection.is_some() || settings.ramp.is_some() {
            self.clock.now()
        } else {
            0
        };
        if settings.ejection.is_some() {
            self.refresh(endpoints, now);
        }
        let group = self.choose(all, ctx);
        let panic = self.in_panic(group);
        let mut warming = None;
        for attempt in 0..TRIES {
            let retry;
            let ctx = match ctx.hash() {
                Some(h) if attempt > 0 => {
                    retry = ctx.with_hash(rehash(h, attempt));
                    &retry
                }
                _ => ctx,
            };
            let Some(i) = group.pick(endpoints, ctx) else {
                break;
            };
            let Some(ep) = endpoints.get(i) else { break };
            if let Some(ej) = &settings.ejection {
                // In panic mode ejection is still decided (so that the counts stay true) but
                // not obeyed.
                if self.is_out(ep, endpoints, now, ej) && !panic {
                    continue;
                }
            }
            if let Some(ramp) = &settings.ramp {
                let f = self.ramp(ep, now, ramp);
                if f < 1.0 && self.rng.f64() >= f {
                    // Rejected for now; still better than nothing if every try is.
                    warming.get_or_insert(i);
                    continue;
                }
            }
            return Some(i);
        }
        if warming.is_some() {
            return warming;
        }
        if panic {
            group.pick(endpoints, ctx)
        } else {
            self.scan(group, endpoints, now)
        }
    }

    /// The inner strategy's answer for a retry, screened as a pick is, on this layer's clock:
    /// among the instances not excluded, one not ejected (unless in panic mode) and, with slow
    /// start, accepted by its ramp; then one not ejected; in the caller's zone first, then in
    /// the whole set. If every instance left is ejected, one of those: better than one tried
    /// already.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let all = self.all.as_ref()?;
        let settings = &self.settings;
        let now = if settings.ejection.is_some() || settings.ramp.is_some() {
            self.clock.now()
        } else {
            0
        };
        if settings.ejection.is_some() {
            self.refresh(endpoints, now);
        }
        // One draw for the whole retry, so that an instance's verdict is the same however
        // often the inner strategy asks: a ramping instance passes with its ramp's probability.
        let bar = if settings.ramp.is_some() {
            self.rng.f64()
        } else {
            0.0
        };
        let usable = |i: usize, panic: bool, ramping: bool| {
            if excluded(i) {
                return false;
            }
            let Some(ep) = endpoints.get(i) else {
                return false;
            };
            if let Some(ej) = &settings.ejection {
                if self.is_out(ep, endpoints, now, ej) && !panic {
                    return false;
                }
            }
            match (&settings.ramp, ramping) {
                (Some(ramp), true) => self.ramp(ep, now, ramp) > bar,
                _ => true,
            }
        };
        let group = self.choose(all, ctx);
        let groups = [Some(group), (!std::ptr::eq(group, all)).then_some(all)];
        let ramp_passes: &[bool] = if settings.ramp.is_some() {
            &[true, false]
        } else {
            &[false]
        };
        for g in groups.into_iter().flatten() {
            let panic = self.in_panic(g);
            for &ramping in ramp_passes {
                if let Some(i) = g.pick_excluding(endpoints, ctx, &|i| !usable(i, panic, ramping)) {
                    return Some(i);
                }
            }
        }
        all.pick_excluding(endpoints, ctx, excluded)
    }
}
