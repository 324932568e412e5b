//! The less loaded of two random instances.

use std::sync::Arc;

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

use crate::rng::Rng;
use crate::two_choices::{Candidate, TwoChoices};

/// Power of two choices: draw two distinct instances at random and take the one with fewer
/// calls in flight per unit of weight.
///
/// Two choices instead of a full scan keep a pick O(1) at any size while bounding the worst
/// load exponentially better than one random choice (Mitzenmacher); calls in flight are counted
/// by the [`PickGuard`](waypost_core::PickGuard), as for least-connections.
///
/// # Weights
/// Load is taken relative to weight, as in Envoy's least-request balancer, and the weights also
/// steer which two instances are looked at:
/// - the two candidates are drawn in proportion to weight (an O(1) alias table; a plain uniform
///   draw when all weights are equal);
/// - they are compared by `in_flight / weight` (cross-multiplied, exact); a tie goes to the
///   first draw.
///
/// At light load (both candidates idle: a tie) traffic therefore follows the weights exactly,
/// and as calls overlap the comparison keeps the calls in flight proportional to weight. The
/// alternative, uniform candidates compared by `(in_flight + 1) / weight`, gives every idle tie
/// to the heavier candidate: with weights 1, 2, 3 and sequential calls the lightest instance
/// would get nothing.
///
/// When one instance dominates the weights, the second draw is retried once and then taken
/// uniformly among the others, so the two candidates are always distinct and a pick never loops.
/// A retry draws both candidates among the instances not tried yet.
///
/// ```
/// use waypost_core::{Balancer, ServiceInstance, WatchEvent};
/// use waypost_strategies::P2c;
///
/// let balancer = Balancer::new(P2c::seeded(7));
/// let set = ["a", "b"].map(|id| ServiceInstance::builder("users", id).host("h").port(80).build());
/// balancer.apply(WatchEvent::Snapshot(set.into_iter().collect::<Result<_, _>>()?));
///
/// let busy = balancer.pick()?;
/// // With two instances both are always candidates: the idle one wins.
/// for _ in 0..10 {
///     assert_ne!(balancer.pick()?.instance().id(), busy.instance().id());
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct P2c {
    rng: Arc<Rng>,
}

impl P2c {
    /// P2C drawing from the calling thread's generator.
    pub fn new() -> Self {
        Self::with_rng(Rng::new())
    }

    /// P2C drawing from `rng`.
    pub fn with_rng(rng: Rng) -> Self {
        P2c { rng: Arc::new(rng) }
    }

    /// Deterministic P2C (tests, simulations): `with_rng(Rng::seeded(seed))`.
    pub fn seeded(seed: u64) -> Self {
        Self::with_rng(Rng::seeded(seed))
    }
}

impl Strategy for P2c {
    fn name(&self) -> &str {
        "p2c"
    }

    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(P2cPicker(TwoChoices::new(self.rng.clone(), endpoints)))
    }
}

#[derive(Debug)]
struct P2cPicker(TwoChoices);

impl Picker for P2cPicker {
    #[inline]
    fn pick(&self, endpoints: &[Endpoint], _ctx: &PickContext<'_>) -> Option<usize> {
        match self.0.draw(endpoints) {
            Ok((a, b)) => Some(less_loaded(a, b)),
            Err(answer) => answer,
        }
    }

    /// The less loaded of two candidates drawn among those not excluded.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        _ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        match self.0.draw_excluding(endpoints, excluded) {
            Ok((a, b)) => Some(less_loaded(a, b)),
            Err(answer) => answer,
        }
    }
}

#[inline]
fn less_loaded((a, sa, wa): Candidate<'_>, (b, sb, wb): Candidate<'_>) -> usize {
    let (la, lb) = (sa.in_flight(), sb.in_flight());
    // lb / wb < la / wa, cross-multiplied; a tie keeps the first draw.
    if u128::from(lb) * u128::from(wa) < u128::from(la) * u128::from(wb) {
        b
    } else {
        a
    }
}
