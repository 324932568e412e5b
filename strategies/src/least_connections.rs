//! Fewest calls in flight per unit of weight.

use std::sync::Arc;

use waypost_core::{Endpoint, EndpointState, PickContext, Picker, Strategy};

use crate::rng::Rng;

/// The instance with the fewest calls in flight per unit of weight.
///
/// Calls in flight are counted by the [`PickGuard`](waypost_core::PickGuard) a pick returns
/// (from the pick until the guard records an outcome or is dropped), in the instance's
/// [`EndpointState`], so they survive instance-set updates. Loads
/// are compared as `in_flight / weight` by cross-multiplication (exact, no float).
///
/// Ties are broken fairly: the scan starts at a random instance (the thread's own generator) and
/// keeps the first least-loaded one it meets, so equally loaded instances share the traffic.
///
/// Cost: the scan stops at the first idle instance. With a fraction `f` of the instances idle
/// a pick reads about `1 / f` of them (one or two at light load, whatever `n`). When every
/// instance has a call in flight the scan reads all `n`: **O(n) worst case**, a few nanoseconds
/// per instance (a contiguous array of state pointers and weights, one state load each), so
/// tens of microseconds at 10,000 busy instances. For large sets under sustained load prefer
/// `P2c` (feature `p2c`), which always reads two.
///
/// With every instance idle the weight cannot matter (`0 / w` is 0 for all), so light
/// sequential traffic spreads evenly; weights take effect as calls overlap. A retry goes to
/// the least loaded of the instances not tried yet.
///
/// ```
/// use waypost_core::{Balancer, ServiceInstance, WatchEvent};
/// use waypost_strategies::LeastConnections;
///
/// let balancer = Balancer::new(LeastConnections::new());
/// let set = ["a", "b"].map(|id| ServiceInstance::builder("users", id).host("h").port(80).build());
/// balancer.apply(WatchEvent::Snapshot(set.into_iter().collect::<Result<_, _>>()?));
///
/// let busy = balancer.pick()?; // one call in flight on one instance...
/// let next = balancer.pick()?; // ...so the next call goes to the other
/// assert_ne!(busy.instance().id(), next.instance().id());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct LeastConnections {
    rng: Arc<Rng>,
}

impl LeastConnections {
    /// Least connections, breaking ties with the calling thread's generator.
    pub fn new() -> Self {
        Self::with_rng(Rng::new())
    }

    /// Least connections, breaking ties with `rng`.
    pub fn with_rng(rng: Rng) -> Self {
        LeastConnections { rng: Arc::new(rng) }
    }

    /// Deterministic tie-breaking (tests, simulations): `with_rng(Rng::seeded(seed))`.
    pub fn seeded(seed: u64) -> Self {
        Self::with_rng(Rng::seeded(seed))
    }
}

impl Strategy for LeastConnections {
    fn name(&self) -> &str {
        "least-connections"
    }

    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(LeastConnectionsPicker {
            rng: self.rng.clone(),
            members: endpoints
                .iter()
                .map(|e| (e.shared_state().clone(), e.weight()))
                .collect(),
        })
    }
}

struct LeastConnectionsPicker {
    rng: Arc<Rng>,
    /// Each endpoint's state and weight side by side: the scan reads one contiguous array and
    /// one pointer per instance, instead of two pointers per instance through the endpoints.
    members: Box<[(Arc<EndpointState>, u32)]>,
}

impl Picker for LeastConnectionsPicker {
    fn pick(&self, endpoints: &[Endpoint], _ctx: &PickContext<'_>) -> Option<usize> {
        let n = self.members.len();
        if n <= 1 || endpoints.len() != n {
            // Empty, trivial, or (against the Picker contract) another slice: stay in range.
            return (!endpoints.is_empty()).then_some(0);
        }
        let start = self.rng.below(n);
        let (state, weight) = &self.members[start];
        let mut best = start;
        let mut best_load = state.in_flight();
        if best_load == 0 {
            return Some(start);
        }
        let mut best_weight = *weight;
        // From the random start to the end, then around from the beginning.
        let rest = self.members[start + 1..]
            .iter()
            .zip(start + 1..)
            .chain(self.members[..start].iter().zip(0..));
        for ((state, weight), i) in rest {
            let load = state.in_flight();
            if load == 0 {
                return Some(i);
            }
            // load / weight < best_load / best_weight, without division; u128 cannot overflow.
            if u128::from(load) * u128::from(best_weight)
                < u128::from(best_load) * u128::from(*weight)
            {
                (best, best_load, best_weight) = (i, load, *weight);
            }
        }
        Some(best)
    }

    /// The least loaded per unit of weight among those not excluded, by the same scan.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        _ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.members.len();
        if endpoints.len() != n {
            return (0..endpoints.len()).find(|&i| !excluded(i));
        }
        if n == 0 {
            return None;
        }
        let start = self.rng.below(n);
        let mut best: Option<(usize, u64, u32)> = None;
        let order = (start..n).chain(0..start);
        for (i, (state, weight)) in order.map(|i| (i, &self.members[i])) {
            if excluded(i) {
                continue;
            }
            let load = state.in_flight();
            if load == 0 {
                return Some(i);
            }
            let better = best.map_or(true, |(_, best_load, best_weight)| {
                u128::from(load) * u128::from(best_weight)
                    < u128::from(best_load) * u128::from(*weight)
            });
            if better {
                best = Some((i, load, *weight));
            }
        }
        best.map(|(i, _, _)| i)
    }
}
