//! The faster of two random instances: peak-EWMA latency × load.

use std::sync::Arc;
use std::time::Duration;

use waypost_core::{Endpoint, PickContext, Picker, Strategy, EWMA_DECAY};

use crate::rng::Rng;
use crate::two_choices::{Candidate, TwoChoices};

/// Power of two choices on expected cost: draw two distinct instances at random and take the one
/// with the lower `latency × (in_flight + 1)`, where `latency` is the instance's peak-EWMA
/// estimate (Finagle's and Linkerd's `PeakEwma`, tower's `p2c` + `PeakEwma`).
///
/// # The estimate
/// It lives in the instance's [`EndpointState`](waypost_core::EndpointState), fed by the
/// [`PickGuard`](waypost_core::PickGuard) when a call ends: a sample above the estimate
/// replaces it at once (an instance that turns slow is avoided at once), a lower one pulls it
/// down with a weight that grows with the time since the previous sample.
///
/// Between samples the estimate decays toward zero with the time constant
/// [`decay`](Self::decay) (default [`EWMA_DECAY`]), at read time, as in Finagle's and tower's
/// `PeakEwma` ([`EndpointState::ewma_nanos_at`](waypost_core::EndpointState::ewma_nanos_at)).
/// An instance that stopped being picked after a slow spell therefore keeps getting cheaper
/// until it wins a pair again; its next sample then tells whether it is still slow (and
/// avoided again) or has recovered (and shares the traffic again). Without the decay such an
/// instance would keep its last estimate, and with sequential traffic never be picked again.
/// After a spell of latency `L` among instances of latency `l`, the first retry comes after
/// about `τ × ln(L / l)` of idle pairs (`τ` = 10 s, `L / l` = 20: 30 s); calls in flight on
/// its rivals bring it sooner.
///
/// Reading does not need the clock: both candidates decay by the same factor from a common
/// instant, so the pick compares `estimate × e^(sampled at / τ)`, one exponential per pick
/// ([`ewma_stored`](waypost_core::EndpointState::ewma_stored)). Multiplying by
/// `in_flight + 1` makes a fast instance lose to a slower idle one once enough calls are
/// queued on it.
///
/// # New instances
/// An instance without a sample yet borrows its rival's estimate, so the pair is compared on
/// load (and weight) alone; if neither has a sample, both count as equally fast. A new instance
/// thus gets the share an equally loaded peer would get until its first call ends:
/// - an estimate of 0 would make it win every pair it is drawn into, flooding it;
/// - a fixed default RTT is wrong in one direction or the other depending on the service
///   (too low floods, too high starves), and needs configuring;
/// - the mean of the instances with samples needs an O(n) pass per pick (or a stale copy).
///
/// # Weights
/// Candidates are drawn in proportion to weight, as in `P2c` (feature `p2c`), and a tie goes to
/// the first draw. The cost generalises to `latency × (1 + in_flight / weight)`: an instance
/// of weight `w` counts as `w` parallel servers, so its queue per server is what delays a new
/// call. With all weights 1 this is exactly `latency × (in_flight + 1)`. Dividing the whole
/// cost by the weight instead would hand every idle pair to the heavier instance, starving the
/// light ones at low load; this way equally fast idle instances tie, and the draw, proportional
/// to weight, decides.
///
/// A retry draws both candidates among the instances not tried yet.
///
/// A pick is O(1): two random numbers, six atomic loads, one `exp`, no clock read and no lock
/// (tower's `PeakEwma` takes a mutex and reads the clock per load reading).
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{Endpoint, Outcome, PickContext, ServiceInstance, Strategy};
/// use waypost_strategies::P2cEwma;
///
/// let endpoints: Vec<Endpoint> = ["fast", "slow"]
///     .iter()
///     .map(|id| ServiceInstance::builder("users", *id).host("h").port(80).build().unwrap())
///     .map(Endpoint::fresh)
///     .collect();
/// for (ep, ms) in endpoints.iter().zip([5, 50]) {
///     ep.state().begin();
///     ep.state().end(Some((Outcome::Success, Duration::from_millis(ms))));
/// }
/// let picker = P2cEwma::seeded(1).build(&endpoints);
/// assert_eq!(picker.pick(&endpoints, &PickContext::new()), Some(0));
/// ```
#[derive(Debug, Clone)]
pub struct P2cEwma {
    rng: Arc<Rng>,
    decay: Duration,
}

impl Default for P2cEwma {
    fn default() -> Self {
        Self::new()
    }
}

impl P2cEwma {
    /// P2C on peak-EWMA latency, drawing from the calling thread's generator.
    pub fn new() -> Self {
        Self::with_rng(Rng::new())
    }

    /// P2C on peak-EWMA latency, drawing from `rng`.
    pub fn with_rng(rng: Rng) -> Self {
        P2cEwma {
            rng: Arc::new(rng),
            decay: EWMA_DECAY,
        }
    }

    /// The estimates' time constant `τ` (default [`EWMA_DECAY`], 10 s; at least 1 ns): how
    /// fast an instance's estimate fades while it gets no sample, and so how soon an instance
    /// avoided after a slow spell is tried again. Set on every instance's state at each build
    /// ([`EndpointState::set_ewma_decay`](waypost_core::EndpointState::set_ewma_decay)), so
    /// that samples and picks agree on it. Shorter reacts faster and probes slow instances
    /// more often; tower leaves it to the caller, Finagle and Linkerd use 10 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::{Endpoint, ServiceInstance, Strategy};
    /// use waypost_strategies::P2cEwma;
    ///
    /// let eps = [Endpoint::fresh(ServiceInstance::builder("users", "a").host("h").port(80).build()?)];
    /// let _picker = P2cEwma::new().decay(Duration::from_secs(2)).build(&eps);
    /// assert_eq!(eps[0].state().ewma_decay(), Duration::from_secs(2));
    /// # Ok::<(), waypost_core::ValidationError>(())
    /// ```
    pub fn decay(mut self, decay: Duration) -> Self {
        self.decay = decay.max(Duration::from_nanos(1));
        self
    }

    /// Deterministic P2C on peak-EWMA latency (tests, simulations):
    /// `with_rng(Rng::seeded(seed))`.
    pub fn seeded(seed: u64) -> Self {
        Self::with_rng(Rng::seeded(seed))
    }
}

impl Strategy for P2cEwma {
    fn name(&self) -> &str {
        "p2c-ewma"
    }

    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        for ep in endpoints {
            ep.state().set_ewma_decay(self.decay);
        }
        Box::new(P2cEwmaPicker {
            choices: TwoChoices::new(self.rng.clone(), endpoints),
            inv_tau: 1.0 / self.decay.as_nanos() as f64,
        })
    }
}

#[derive(Debug)]
struct P2cEwmaPicker {
    choices: TwoChoices,
    /// 1 / τ, per nanosecond.
    inv_tau: f64,
}

/// Beyond `e^±MAX_EXPONENT` one estimate has decayed to nothing next to the other (e^600 is
/// 10^260); clamping keeps the products finite.
const MAX_EXPONENT: f64 = 600.0;

impl Picker for P2cEwmaPicker {
    #[inline]
    fn pick(&self, endpoints: &[Endpoint], _ctx: &PickContext<'_>) -> Option<usize> {
        match self.choices.draw(endpoints) {
            Ok((a, b)) => Some(self.cheaper(a, b)),
            Err(answer) => answer,
        }
    }

    /// The cheaper of two candidates drawn among those not excluded.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        _ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        match self.choices.draw_excluding(endpoints, excluded) {
            Ok((a, b)) => Some(self.cheaper(a, b)),
            Err(answer) => answer,
        }
    }
}

impl P2cEwmaPicker {
    #[inline]
    fn cheaper(&self, (a, sa, wa): Candidate<'_>, (b, sb, wb): Candidate<'_>) -> usize {
        let ((va, at_a), (vb, at_b)) = (sa.ewma_stored(), sb.ewma_stored());
        // Both decayed to a common instant (see the type's docs): b's estimate relative to
        // a's gains e^((at_b − at_a)/τ). 0.0 means "no sample yet": borrow the rival's.
        let (lat_a, lat_b) = if va == 0.0 || vb == 0.0 {
            (1.0, 1.0)
        } else {
            let dt = at_b.wrapping_sub(at_a) as i64 as f64;
            let x = (dt * self.inv_tau).clamp(-MAX_EXPONENT, MAX_EXPONENT);
            (va, vb * x.exp())
        };
        let (wa, wb) = (f64::from(wa), f64::from(wb));
        // latency × (1 + in_flight / weight), both sides multiplied by wa × wb.
        let cost_a = lat_a * (wa + sa.in_flight() as f64) * wb;
        let cost_b = lat_b * (wb + sb.in_flight() as f64) * wa;
        // A tie keeps the first draw.
        if cost_b < cost_a {
            b
        } else {
            a
        }
    }
}
