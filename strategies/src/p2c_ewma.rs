//! The faster of two random instances: peak-EWMA latency × load.

use std::sync::Arc;

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

use crate::rng::Rng;
use crate::two_choices::TwoChoices;

/// Power of two choices on expected cost: draw two distinct instances at random and take the one
/// with the lower `latency × (in_flight + 1)`, where `latency` is the instance's peak-EWMA
/// estimate (Finagle's and Linkerd's `PeakEwma`, tower's `p2c` + `PeakEwma`).
///
/// # The estimate
/// It lives in the instance's [`EndpointState`](waypost_core::EndpointState), fed by the
/// [`PickGuard`](waypost_core::PickGuard) when a call ends: a sample above the estimate
/// replaces it at once (an instance that turns slow is avoided at once), a lower one pulls it
/// down with a weight decaying over [`EWMA_DECAY`](waypost_core::EWMA_DECAY) (an instance that
/// recovers wins traffic back gradually). Multiplying by `in_flight + 1` makes a fast instance
/// lose to a slower idle one once enough calls are queued on it.
///
/// The estimate only moves when a sample arrives (reading it does not decay it, unlike tower's
/// `PeakEwma`, which reads the clock on every load reading). An instance that stopped being
/// picked after a slow spell keeps its estimate until load on its rivals makes it the cheaper
/// choice again and a new sample brings the estimate down.
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
/// A pick is O(1): two random numbers, four atomic loads, no lock (tower's `PeakEwma` takes a
/// mutex per load reading).
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
#[derive(Debug, Clone, Default)]
pub struct P2cEwma {
    rng: Arc<Rng>,
}

impl P2cEwma {
    /// P2C on peak-EWMA latency, drawing from the calling thread's generator.
    pub fn new() -> Self {
        Self::with_rng(Rng::new())
    }

    /// P2C on peak-EWMA latency, drawing from `rng`.
    pub fn with_rng(rng: Rng) -> Self {
        P2cEwma { rng: Arc::new(rng) }
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
        Box::new(P2cEwmaPicker(TwoChoices::new(self.rng.clone(), endpoints)))
    }
}

#[derive(Debug)]
struct P2cEwmaPicker(TwoChoices);

impl Picker for P2cEwmaPicker {
    #[inline]
    fn pick(&self, endpoints: &[Endpoint], _ctx: &PickContext<'_>) -> Option<usize> {
        let ((a, sa, wa), (b, sb, wb)) = match self.0.draw(endpoints) {
            Ok(pair) => pair,
            Err(answer) => return answer,
        };
        // 0.0 means "no sample yet": borrow the rival's estimate (see the type's docs).
        let (lat_a, lat_b) = match (sa.ewma_nanos(), sb.ewma_nanos()) {
            (0.0, 0.0) => (1.0, 1.0),
            (0.0, b) => (b, b),
            (a, 0.0) => (a, a),
            (a, b) => (a, b),
        };
        let (wa, wb) = (f64::from(wa), f64::from(wb));
        // latency × (1 + in_flight / weight), both sides multiplied by wa × wb.
        let cost_a = lat_a * (wa + sa.in_flight() as f64) * wb;
        let cost_b = lat_b * (wb + sb.in_flight() as f64) * wa;
        // A tie keeps the first draw.
        if cost_b < cost_a {
            Some(b)
        } else {
            Some(a)
        }
    }
}
