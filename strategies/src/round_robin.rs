//! Each instance in turn.

use std::sync::Arc;

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

use crate::rng::Cursor;

/// Each instance in turn, ignoring weights.
///
/// The position lives in the strategy and is shared by every picker it builds, so an update of
/// the instance set does not restart the rotation at the first instance. A position beyond a
/// set that shrank is taken modulo the new size: never out of range, and the rotation over the
/// new set is exact from the next pick on.
///
/// The position is kept in 16 stripes, each on its own cache line, and a thread always uses the
/// same stripe (threads are assigned stripes in turn). Each thread thus rotates through the
/// whole set on its own: threads picking at once do not bounce one cache line between cores (a
/// single shared counter would make every pick a cache miss under concurrency), and the total
/// is fair to within one pick per thread. Each stripe starts at a random instance, so that
/// clients started together do not all hit the first one. Pick cost: one uncontended
/// compare-and-swap, no division, no allocation.
///
/// A retry ([`Balancer::pick_excluding`](waypost_core::Balancer::pick_excluding)) takes the
/// next instance in turn that was not tried yet, and the rotation goes on after it, as if the
/// skipped ones had had their turn.
///
/// ```
/// use waypost_core::{Balancer, ServiceInstance, WatchEvent};
/// use waypost_strategies::RoundRobin;
///
/// let balancer = Balancer::new(RoundRobin::new());
/// let set = ["a", "b", "c"]
///     .map(|id| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build().unwrap());
/// balancer.apply(WatchEvent::Snapshot(set.to_vec()));
///
/// let mut seen: Vec<String> = (0..3)
///     .map(|_| balancer.pick().unwrap().instance().id().to_string())
///     .collect();
/// seen.sort();
/// assert_eq!(seen, ["a", "b", "c"]); // three picks, three different instances
/// ```
#[derive(Debug, Clone)]
pub struct RoundRobin {
    cursor: Arc<Cursor>,
}

impl RoundRobin {
    /// A round-robin strategy starting at a random position.
    pub fn new() -> Self {
        RoundRobin {
            cursor: Arc::new(Cursor::new()),
        }
    }
}

impl Default for RoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

impl Strategy for RoundRobin {
    fn name(&self) -> &str {
        "round-robin"
    }

    fn build(&self, _endpoints: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(RoundRobinPicker {
            cursor: self.cursor.clone(),
        })
    }
}

struct RoundRobinPicker {
    cursor: Arc<Cursor>,
}

impl Picker for RoundRobinPicker {
    #[inline]
    fn pick(&self, endpoints: &[Endpoint], _ctx: &PickContext<'_>) -> Option<usize> {
        match endpoints.len() {
            0 => None,
            1 => Some(0),
            n => Some(self.cursor.advance(1, n as u64) as usize),
        }
    }

    /// The next in turn that is not excluded, and the rotation goes on after it: one step of
    /// the cursor (one exchange) however many are skipped.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        _ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = endpoints.len() as u64;
        self.cursor
            .advance_to(1, n, n, |x| !excluded(x as usize))
            .map(|x| x as usize)
    }
}
