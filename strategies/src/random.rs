//! Uniformly at random.

use std::sync::Arc;

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

use crate::rng::{by_weight, Rng, RETRY_DRAWS};

/// Uniformly at random, ignoring weights. See `WeightedRandom` (feature `weighted-random`) for
/// picks in proportion to weight.
///
/// Pick cost: one draw from the thread's own generator (nothing shared between threads) and one
/// multiplication. A retry goes uniformly to one of the instances not tried yet.
///
/// ```
/// use waypost_core::{Endpoint, PickContext, ServiceInstance, Strategy};
/// use waypost_strategies::Random;
///
/// let endpoints: Vec<Endpoint> = ["a", "b", "c"]
///     .iter()
///     .map(|id| ServiceInstance::builder("users", *id).host("h").port(80).build().unwrap())
///     .map(Endpoint::fresh)
///     .collect();
/// let picker = Random::seeded(42).build(&endpoints);
/// let i = picker.pick(&endpoints, &PickContext::new()).unwrap();
/// assert!(i < 3);
/// assert_eq!(picker.pick(&[], &PickContext::new()), None);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Random {
    rng: Arc<Rng>,
}

impl Random {
    /// Random picks from the calling thread's generator.
    pub fn new() -> Self {
        Self::with_rng(Rng::new())
    }

    /// Random picks from `rng`.
    pub fn with_rng(rng: Rng) -> Self {
        Random { rng: Arc::new(rng) }
    }

    /// Deterministic random picks (tests, simulations): `with_rng(Rng::seeded(seed))`.
    pub fn seeded(seed: u64) -> Self {
        Self::with_rng(Rng::seeded(seed))
    }
}

impl Strategy for Random {
    fn name(&self) -> &str {
        "random"
    }

    fn build(&self, _endpoints: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(RandomPicker {
            rng: self.rng.clone(),
        })
    }
}

struct RandomPicker {
    rng: Arc<Rng>,
}

impl Picker for RandomPicker {
    #[inline]
    fn pick(&self, endpoints: &[Endpoint], _ctx: &PickContext<'_>) -> Option<usize> {
        match endpoints.len() {
            0 => None,
            n => Some(self.rng.below(n)),
        }
    }

    /// Uniformly among those not excluded: draws until one is not (a few), then counts them.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        _ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        (0..RETRY_DRAWS)
            .map(|_| self.rng.below(n))
            .find(|&i| !excluded(i))
            .or_else(|| by_weight(n, |_| 1, excluded, |total| self.rng.below_u64(total)))
    }
}
