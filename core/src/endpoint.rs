//! An instance as the balancer holds it, with the per-instance state that outlives updates.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Stamp;

use crate::instance::{InstanceId, ServiceInstance, Weight};
use crate::metrics::RequestMetrics;

/// The default time constant of the peak-EWMA estimate (Linkerd's and Finagle's): an estimate
/// that gets no new sample falls to 1/e of its value in this time, and a sample taken this long
/// after the previous one outweighs the old estimate (see [`EndpointState::ewma_nanos_at`]).
/// [`EndpointState::set_ewma_decay`] replaces it per instance.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{EndpointState, EWMA_DECAY};
/// let s = EndpointState::new_at(0);
/// assert_eq!(s.ewma_decay(), EWMA_DECAY);
/// s.observe_latency_at(Duration::from_millis(100), 0);
/// let after = s.ewma_latency_at(EWMA_DECAY.as_nanos() as u64).unwrap();
/// assert_eq!(after.as_millis(), 36); // 100 ms / e
/// ```
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

/// Nanoseconds since a process-wide epoch: the time base of [`EndpointState`], so that time fits
/// in an atomic. Tests pass their own values to the `*_at` methods to simulate a clock.
///
/// It reads the same clock as [`PickGuard`](crate::PickGuard)'s latencies: the CPU's invariant
/// time-stamp counter where there is one, calibrated against the OS monotonic clock (see the
/// [`quanta`] crate), else the OS monotonic clock itself.
///
/// ```
/// let a = waypost_core::clock_nanos();
/// assert!(waypost_core::clock_nanos() >= a);
/// ```
pub fn clock_nanos() -> u64 {
    Stamp::now().nanos()
}

/// How a picked call ended.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{EndpointState, Outcome};
/// let s = EndpointState::new();
/// for outcome in [Outcome::Failure, Outcome::Failure, Outcome::Success, Outcome::Failure] {
///     s.begin();
///     s.end(Some((outcome, Duration::from_millis(1))));
/// }
/// // A success ends a run of failures; both count toward the totals.
/// assert_eq!((s.successes(), s.failures(), s.consecutive_failures()), (1, 3, 1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The call succeeded.
    Success,
    /// The call failed (connect error, timeout, 5xx...).
    Failure,
}

/// Load and health of one instance, shared by every snapshot that contains the instance and kept
/// across instance-set updates (keyed by id). Lock-free: every field is an atomic.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{EndpointState, Outcome};
/// let s = EndpointState::new();
/// s.begin();
/// assert_eq!(s.in_flight(), 1);
/// s.end(Some((Outcome::Success, Duration::from_millis(5))));
/// assert_eq!(s.in_flight(), 0);
/// assert_eq!(s.successes(), 1);
/// assert_eq!(s.ewma_latency(), Some(Duration::from_millis(5)));
/// ```
pub struct EndpointState {
    in_flight: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    consecutive_failures: AtomicU32,
    /// f64 nanoseconds as bits, as of `ewma_at`; 0 = no sample yet.
    ewma_bits: AtomicU64,
    ewma_at: AtomicU64,
    /// The estimate's time constant, nanoseconds (never 0).
    ewma_decay: AtomicU64,
    created_at: u64,
    /// Free for resilience layers (outlier ejection): clock_nanos until which the instance is
    /// ejected, and how many times it was.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
}

impl Default for EndpointState {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointState")
            .field("in_flight", &self.in_flight())
            .field("successes", &self.successes())
            .field("failures", &self.failures())
            .field("consecutive_failures", &self.consecutive_failures())
            .field("ewma_latency", &self.ewma_latency())
            .finish()
    }
}

impl EndpointState {
    /// Fresh state, created now.
    pub fn new() -> Self {
        Self::new_at(clock_nanos())
    }

    /// Fresh state created at `now` ([`clock_nanos`] time base).
    pub fn new_at(now: u64) -> Self {
        EndpointState {
            in_flight: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ewma_bits: AtomicU64::new(0),
            ewma_at: AtomicU64::new(now),
            ewma_decay: AtomicU64::new(EWMA_DECAY.as_nanos() as u64),
            created_at: now,
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    /// A call to this instance starts.
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A call ends, with its outcome and latency if known (`None`: cancelled, counts nothing).
    pub fn end(&self, outcome: Option<(Outcome, Duration)>) {
        // A cancelled call records no latency: skip the clock read (tens of ns on some VMs).
        let now = if outcome.is_some() { clock_nanos() } else { 0 };
        self.end_at(outcome, now);
    }

    /// As [`end`](Self::end), at time `now`.
    pub fn end_at(&self, outcome: Option<(Outcome, Duration)>, now: u64) {
        // Saturating: a stray end() must never wrap the count to u64::MAX.
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        match outcome {
            Some((Outcome::Success, latency)) => {
                self.successes.fetch_add(1, Ordering::Relaxed);
                self.consecutive_failures.store(0, Ordering::Relaxed);
                self.observe_latency_at(latency, now);
            }
            Some((Outcome::Failure, latency)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
                self.observe_latency_at(latency, now);
            }
            None => {}
        }
    }

    /// Feeds one latency sample, taken at `now`, into the peak-EWMA estimate. The estimate is
    /// first decayed to `now` as a reader would see it ([`ewma_nanos_at`](Self::ewma_nanos_at));
    /// a sample above that replaces it at once (peak), a lower one pulls it toward itself with
    /// weight `1 − e^(−Δ/τ)`, where `Δ` is the time since the previous sample and `τ` the
    /// [decay](Self::ewma_decay). The new estimate thus lies between the sample and the decayed
    /// one: a lower sample never raises what readers see.
    pub fn observe_latency_at(&self, latency: Duration, now: u64) {
        let sample = latency.as_nanos() as f64;
        let tau = self.ewma_decay.load(Ordering::Relaxed) as f64;
        let last = self.ewma_at.swap(now, Ordering::Relaxed);
        let w = decay_factor(now.saturating_sub(last), tau);
        let _ = self
            .ewma_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let now_value = f64::from_bits(bits) * w;
                let next = if bits == 0 || sample > now_value {
                    sample
                } else {
                    now_value * w + sample * (1.0 - w)
                };
                // Keep 0 meaning "no sample": a 0 ns sample becomes the smallest positive value.
                Some(next.max(f64::MIN_POSITIVE).to_bits())
            });
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
    /// Successful calls so far.
    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }
    /// Failed calls so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
    /// Failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }
    /// The peak-EWMA latency estimate as of its last sample, undecayed; `None` before the first
    /// sample. What pickers compare is [`ewma_latency_at`](Self::ewma_latency_at).
    pub fn ewma_latency(&self) -> Option<Duration> {
        let bits = self.ewma_bits.load(Ordering::Relaxed);
        (bits != 0).then(|| Duration::from_nanos(f64::from_bits(bits) as u64))
    }
    /// The estimate as of its last sample in nanoseconds as a float (0.0 before the first
    /// sample), undecayed; see [`ewma_nanos_at`](Self::ewma_nanos_at).
    pub fn ewma_nanos(&self) -> f64 {
        let bits = self.ewma_bits.load(Ordering::Relaxed);
        if bits == 0 {
            0.0
        } else {
            f64::from_bits(bits)
        }
    }
    /// The estimate as stored and when: `(nanoseconds, time of the last sample)` on the
    /// [`clock_nanos`] base, `(0.0, _)` before the first sample. The estimate at any later time
    /// follows from these two alone (see [`ewma_nanos_at`](Self::ewma_nanos_at)), so a picker
    /// comparing two instances at the same instant can compare `value × e^(at/τ)` and needs no
    /// clock: the common factor `e^(−now/τ)` cancels.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::EndpointState;
    /// let s = EndpointState::new_at(0);
    /// s.observe_latency_at(Duration::from_micros(250), 7);
    /// assert_eq!(s.ewma_stored(), (250_000.0, 7));
    /// ```
    pub fn ewma_stored(&self) -> (f64, u64) {
        (self.ewma_nanos(), self.ewma_at.load(Ordering::Relaxed))
    }
    /// The estimate decayed to `now` ([`clock_nanos`] time base), in nanoseconds: the stored
    /// value times `e^(−(now − at)/τ)`, where `at` is the time of the last sample and `τ` the
    /// [decay](Self::ewma_decay); 0.0 before the first sample. Decaying toward 0 at read time
    /// (as Finagle's and tower's `PeakEwma` do) is what brings an instance back after a slow
    /// spell: the estimate of an instance that nobody picks keeps falling until it wins a
    /// comparison, and its next sample tells whether it is still slow. A pure function of
    /// the stored pair and `now`, whichever clock `now` comes from.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::EndpointState;
    /// let s = EndpointState::new_at(0);
    /// assert_eq!(s.ewma_nanos_at(0), 0.0);
    /// s.set_ewma_decay(Duration::from_secs(1));
    /// s.observe_latency_at(Duration::from_millis(8), 0);
    /// let half_life = (std::f64::consts::LN_2 * 1e9) as u64;
    /// assert!((s.ewma_nanos_at(half_life) - 4e6).abs() < 1.0);
    /// assert!((s.ewma_nanos_at(3 * half_life) - 1e6).abs() < 1.0);
    /// // Long unread, the estimate is tiny, but still a sample (not 0.0, "none yet").
    /// assert!(s.ewma_nanos_at(u64::MAX) > 0.0);
    /// ```
    pub fn ewma_nanos_at(&self, now: u64) -> f64 {
        let (value, at) = self.ewma_stored();
        if value == 0.0 {
            return 0.0;
        }
        let tau = self.ewma_decay.load(Ordering::Relaxed) as f64;
        (value * decay_factor(now.saturating_sub(at), tau)).max(f64::MIN_POSITIVE)
    }
    /// [`ewma_nanos_at`](Self::ewma_nanos_at) as a duration; `None` before the first sample.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::EndpointState;
    /// let s = EndpointState::new_at(0);
    /// assert_eq!(s.ewma_latency_at(5), None);
    /// s.observe_latency_at(Duration::from_millis(3), 5);
    /// assert_eq!(s.ewma_latency_at(5), Some(Duration::from_millis(3)));
    /// assert!(s.ewma_latency_at(5_000_000_000) < Some(Duration::from_millis(2)));
    /// ```
    pub fn ewma_latency_at(&self, now: u64) -> Option<Duration> {
        let v = self.ewma_nanos_at(now);
        (v != 0.0).then(|| Duration::from_nanos(v as u64))
    }
    /// The estimate's time constant `τ` (default [`EWMA_DECAY`]).
    pub fn ewma_decay(&self) -> Duration {
        Duration::from_nanos(self.ewma_decay.load(Ordering::Relaxed))
    }
    /// Sets the estimate's time constant `τ` (at least 1 ns): how fast an unsampled estimate
    /// fades, and how much weight a lower sample gets. Samples and reads both use it, so the
    /// strategy that compares estimates sets it on every instance it picks from
    /// (`P2cEwma::decay` in waypost-strategies); the last one set is the one in force.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::EndpointState;
    /// let s = EndpointState::new_at(0);
    /// s.set_ewma_decay(Duration::from_millis(100));
    /// assert_eq!(s.ewma_decay(), Duration::from_millis(100));
    /// s.set_ewma_decay(Duration::ZERO);
    /// assert_eq!(s.ewma_decay(), Duration::from_nanos(1));
    /// ```
    pub fn set_ewma_decay(&self, decay: Duration) {
        let nanos = u64::try_from(decay.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.ewma_decay.store(nanos, Ordering::Relaxed);
    }
    /// When this state was created ([`clock_nanos`] time base): when the balancer first saw the
    /// instance.
    pub fn created_at(&self) -> u64 {
        self.created_at
    }
    /// Until when the instance is ejected, on the time base of whoever ejected it (the
    /// [`clock_nanos`] base unless a resilience layer runs on a clock of its own); 0 if never.
    pub fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Acquire)
    }
    /// Ejects the instance until `until` and counts the ejection, whatever its state: returns
    /// the new count. A layer that decides ejections from what it read uses
    /// [`try_eject`](Self::try_eject) instead.
    pub fn eject_until(&self, until: u64) -> u32 {
        self.ejected_until.store(until, Ordering::Release);
        self.ejections.fetch_add(1, Ordering::Relaxed) + 1
    }
    /// Ejects the instance until `until` and sets its ejection count to `ejections`, if it is
    /// still ejected until `seen` (what [`ejected_until`](Self::ejected_until) returned when
    /// the caller decided): a compare-and-swap, so that of callers deciding on the same reading
    /// exactly one ejects, and the count is written once. Returns whether this call ejected it.
    ///
    /// ```
    /// use waypost_core::EndpointState;
    /// let s = EndpointState::new_at(0);
    /// let seen = s.ejected_until();
    /// assert!(s.try_eject(seen, 30, 1));
    /// // A second decision on the same reading comes too late.
    /// assert!(!s.try_eject(seen, 60, 2));
    /// assert_eq!((s.ejected_until(), s.ejections()), (30, 1));
    /// ```
    pub fn try_eject(&self, seen: u64, until: u64, ejections: u32) -> bool {
        let won = self
            .ejected_until
            .compare_exchange(seen, until, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if won {
            self.ejections.store(ejections, Ordering::Relaxed);
        }
        won
    }
    /// The instance's ejection count, as the layer that ejects it keeps it: what makes each
    /// ejection longer than the last. [`eject_until`](Self::eject_until) adds one;
    /// [`try_eject`](Self::try_eject) sets it (the resilience layer lowers it after
    /// ejection-free periods, as Envoy does).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }
    /// Resets the consecutive-failure count (after an ejection, so that it is not re-ejected at once).
    pub fn reset_consecutive_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }
}

/// `e^(−elapsed/τ)`: how much of an estimate is left after `elapsed` nanoseconds.
#[inline]
fn decay_factor(elapsed: u64, tau: f64) -> f64 {
    if elapsed == 0 {
        1.0
    } else {
        (-(elapsed as f64) / tau).exp()
    }
}

/// An instance together with its [`EndpointState`]: what strategies pick from. Cheap to clone.
///
/// ```
/// use std::sync::Arc;
/// use waypost_core::{Endpoint, EndpointState, ServiceInstance};
/// let inst = ServiceInstance::builder("s", "a").host("h").port(1).weight(2).build()?;
/// let ep = Endpoint::new(inst, Arc::new(EndpointState::new()));
/// assert_eq!(ep.weight(), 2);
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
#[derive(Clone)]
pub struct Endpoint(Arc<EndpointInner>);

struct EndpointInner {
    instance: ServiceInstance,
    state: Arc<EndpointState>,
    weight: u32,
    /// The request series; registered by the balancer, no-ops for an endpoint made by hand.
    metrics: RequestMetrics,
}

impl Endpoint {
    /// Pairs `instance` with `state`.
    pub fn new(instance: ServiceInstance, state: Arc<EndpointState>) -> Self {
        Self::with_metrics(instance, state, RequestMetrics::none())
    }

    pub(crate) fn with_metrics(
        instance: ServiceInstance,
        state: Arc<EndpointState>,
        metrics: RequestMetrics,
    ) -> Self {
        let weight = instance.weight().get();
        Endpoint(Arc::new(EndpointInner {
            instance,
            state,
            weight,
            metrics,
        }))
    }

    pub(crate) fn metrics(&self) -> &RequestMetrics {
        &self.0.metrics
    }

    /// An endpoint with fresh state (for tests and benchmarks).
    pub fn fresh(instance: ServiceInstance) -> Self {
        Self::new(instance, Arc::new(EndpointState::new()))
    }

    /// The instance.
    pub fn instance(&self) -> &ServiceInstance {
        &self.0.instance
    }
    /// Its id.
    pub fn id(&self) -> &InstanceId {
        self.0.instance.id()
    }
    /// Its weight as a number (1..=[`Weight::MAX`]).
    pub fn weight(&self) -> u32 {
        self.0.weight
    }
    /// Its weight.
    pub fn weight_typed(&self) -> Weight {
        self.0.instance.weight()
    }
    /// Its load and health.
    pub fn state(&self) -> &EndpointState {
        &self.0.state
    }
    /// The shared state, to carry over into a new endpoint for the same id.
    pub fn shared_state(&self) -> &Arc<EndpointState> {
        &self.0.state
    }

    /// Whether `a` and `b` are one endpoint (clones of each other), told without reading
    /// either. An endpoint's instance and weight never change once it is made (a balancer
    /// makes a new endpoint for a changed instance), so a strategy can keep what it computed
    /// for an endpoint for as long as it holds a clone of it.
    ///
    /// ```
    /// use waypost_core::{Endpoint, ServiceInstance};
    /// let inst = ServiceInstance::builder("s", "a").host("h").port(1).build()?;
    /// let a = Endpoint::fresh(inst.clone());
    /// assert!(Endpoint::ptr_eq(&a, &a.clone()));
    /// // The same instance in another endpoint is another endpoint.
    /// assert!(!Endpoint::ptr_eq(&a, &Endpoint::fresh(inst)));
    /// # Ok::<(), waypost_core::ValidationError>(())
    /// ```
    pub fn ptr_eq(a: &Endpoint, b: &Endpoint) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", self.id())
            .field("authority", &self.instance().authority())
            .field("weight", &self.weight())
            .field("in_flight", &self.state().in_flight())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_takes_peaks_and_decays_toward_lower_samples() {
        let s = EndpointState::new_at(0);
        s.observe_latency_at(Duration::from_millis(10), 0);
        s.observe_latency_at(Duration::from_millis(100), 1);
        assert_eq!(s.ewma_latency(), Some(Duration::from_millis(100)));
        // Long after the peak a low sample dominates.
        s.observe_latency_at(Duration::from_millis(10), 60 * EWMA_DECAY.as_nanos() as u64);
        let v = s.ewma_latency().unwrap();
        assert!(v < Duration::from_millis(11), "{v:?}");
    }

    #[test]
    fn an_estimate_without_new_samples_decays_toward_zero_when_read() {
        let s = EndpointState::new_at(0);
        s.observe_latency_at(Duration::from_millis(200), 0);
        let tau = EWMA_DECAY.as_nanos() as u64;
        let read = |t: u64| s.ewma_nanos_at(t) / 1e6;
        assert_eq!(read(0), 200.0);
        assert!((read(tau) - 200.0 / std::f64::consts::E).abs() < 1e-9);
        // Reading stores nothing: the same time reads the same value, whatever was read before.
        assert_eq!(read(tau), read(tau));
        assert!(read(30 * tau) < 1e-9);
        // A reading earlier than the sample (another thread's clock) is not decayed.
        s.observe_latency_at(Duration::from_millis(200), 5 * tau);
        assert_eq!(read(5 * tau - 1), 200.0);
        assert_eq!(
            s.ewma_latency(),
            Some(Duration::from_millis(200)),
            "undecayed"
        );
    }

    #[test]
    fn a_sample_moves_the_decayed_estimate_never_past_either_end() {
        let tau = EWMA_DECAY.as_nanos() as u64;
        // A sample above the decayed estimate replaces it, even if it is below the stored one.
        let s = EndpointState::new_at(0);
        s.observe_latency_at(Duration::from_millis(100), 0);
        let later = 3 * tau;
        assert!(s.ewma_nanos_at(later) < 5e6);
        s.observe_latency_at(Duration::from_millis(20), later);
        assert_eq!(s.ewma_latency_at(later), Some(Duration::from_millis(20)));
        // A sample below the decayed estimate pulls it down, never up.
        let s = EndpointState::new_at(0);
        s.observe_latency_at(Duration::from_millis(100), 0);
        let at = tau / 2;
        let before = s.ewma_nanos_at(at);
        s.observe_latency_at(Duration::from_millis(50), at);
        let after = s.ewma_nanos_at(at);
        assert!(
            50e6 < after && after < before,
            "{after} not in (50 ms, {before})"
        );
    }

    #[test]
    fn the_decay_is_per_instance_and_used_by_samples_and_reads() {
        let s = EndpointState::new_at(0);
        s.set_ewma_decay(Duration::from_millis(1));
        s.observe_latency_at(Duration::from_millis(100), 0);
        // 10 ms is ten time constants: the default decay would have kept 99.9 %.
        assert!(s.ewma_nanos_at(10_000_000) < 100e6 * 1e-4);
        s.observe_latency_at(Duration::from_millis(1), 10_000_000);
        assert_eq!(
            s.ewma_latency_at(10_000_000),
            Some(Duration::from_millis(1))
        );
    }

    #[test]
    fn of_threads_deciding_on_one_reading_exactly_one_ejects() {
        for round in 0..200 {
            let s = EndpointState::new_at(0);
            let seen = s.ejected_until();
            let barrier = std::sync::Barrier::new(4);
            let won: usize = std::thread::scope(|scope| {
                let racers: Vec<_> = (1..=4u64)
                    .map(|k| {
                        let (s, barrier) = (&s, &barrier);
                        scope.spawn(move || {
                            barrier.wait();
                            usize::from(s.try_eject(seen, 100 * k, k as u32))
                        })
                    })
                    .collect();
                racers.into_iter().map(|r| r.join().unwrap()).sum()
            });
            assert_eq!(won, 1, "round {round}");
            // The winner's until and count, together.
            let until = s.ejected_until();
            assert_eq!(u64::from(s.ejections()) * 100, until, "round {round}");
        }
    }

    #[test]
    fn end_without_begin_does_not_wrap() {
        let s = EndpointState::new();
        s.end(None);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn failures_count_consecutively_until_success() {
        let s = EndpointState::new();
        for _ in 0..3 {
            s.begin();
            s.end(Some((Outcome::Failure, Duration::ZERO)));
        }
        assert_eq!(s.consecutive_failures(), 3);
        s.begin();
        s.end(Some((Outcome::Success, Duration::ZERO)));
        assert_eq!(s.consecutive_failures(), 0);
        assert_eq!((s.successes(), s.failures()), (1, 3));
    }
}
