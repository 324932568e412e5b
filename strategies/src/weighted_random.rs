//! At random, in proportion to weight.

use std::sync::Arc;

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

use crate::rng::{by_weight, Alias, Rng, RETRY_DRAWS};

/// At random, in proportion to weight: an instance of weight 3 gets three times the picks of
/// one of weight 1, exactly in the limit.
///
/// Built on Vose's alias table, computed in integers at build time (O(n)): a pick is one random
/// `u64` and one table read, O(1) at any size, and the probability of each instance is
/// `weight / total weight` to within `n / 2^64` (no floating-point rounding). When all weights
/// are equal the table is skipped and a pick is one uniform draw. Memory: 16 bytes per instance.
/// A retry goes to one of the instances not tried yet, in proportion to weight among them.
///
/// ```
/// use waypost_core::{Endpoint, PickContext, ServiceInstance, Strategy};
/// use waypost_strategies::WeightedRandom;
///
/// let endpoints: Vec<Endpoint> = [("a", 1), ("b", 9)]
///     .iter()
///     .map(|(id, w)| ServiceInstance::builder("users", *id).host("h").port(80).weight(*w).build())
///     .map(|inst| Endpoint::fresh(inst.unwrap()))
///     .collect();
/// let picker = WeightedRandom::seeded(1).build(&endpoints);
/// let heavy = (0..10_000)
///     .filter(|_| picker.pick(&endpoints, &PickContext::new()) == Some(1))
///     .count();
/// assert!((8_800..9_200).contains(&heavy), "{heavy}"); // about 90 %
/// ```
#[derive(Debug, Clone, Default)]
pub struct WeightedRandom {
    rng: Arc<Rng>,
}

impl WeightedRandom {
    /// Weighted random picks from the calling thread's generator.
    pub fn new() -> Self {
        Self::with_rng(Rng::new())
    }

    /// Weighted random picks from `rng`.
    pub fn with_rng(rng: Rng) -> Self {
        WeightedRandom { rng: Arc::new(rng) }
    }

    /// Deterministic weighted random picks (tests, simulations): `with_rng(Rng::seeded(seed))`.
    pub fn seeded(seed: u64) -> Self {
        Self::with_rng(Rng::seeded(seed))
    }
}

impl Strategy for WeightedRandom {
    fn name(&self) -> &str {
        "weighted-random"
    }

    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(WeightedRandomPicker {
            rng: self.rng.clone(),
            alias: Alias::new(endpoints.iter().map(Endpoint::weight)),
            len: endpoints.len(),
        })
    }
}

#[derive(Debug)]
struct WeightedRandomPicker {
    rng: Arc<Rng>,
    alias: Alias,
    len: usize,
}

impl Picker for WeightedRandomPicker {
    #[inline]
    fn pick(&self, endpoints: &[Endpoint], _ctx: &PickContext<'_>) -> Option<usize> {
        if self.len != endpoints.len() {
            // Against the Picker contract (another slice): stay in range.
            return (!endpoints.is_empty()).then_some(0);
        }
        match self.len {
            0 => None,
            1 => Some(0),
            n => Some(self.alias.draw(&self.rng, n)),
        }
    }

    /// In proportion to weight among those not excluded: draws until one is not (a few), then
    /// sums the weights left.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        if self.len != n {
            return (0..n).find(|&i| !excluded(i));
        }
        (0..RETRY_DRAWS)
            .filter_map(|_| self.pick(endpoints, ctx))
            .find(|&i| !excluded(i))
            .or_else(|| {
                let weight = |i: usize| u64::from(endpoints[i].weight());
                by_weight(n, weight, excluded, |total| self.rng.below_u64(total))
            })
    }
}
