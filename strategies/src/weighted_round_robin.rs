//! In turn, in proportion to weight, smoothly interleaved.

use std::fmt;
use std::sync::Arc;

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

use crate::rng::Cursor;

/// In turn, in proportion to weight, smoothly interleaved: weights 1, 2, 3 give sequences like
/// `c b c a c b`, never `c c c b b a`.
///
/// # How
/// At build time every instance gets a run of positions on a cycle of `M` positions, as long as
/// its weight times a scale (`M` = total weight × the smallest scale that makes `M ≥`
/// [`MIN_CYCLE`](Self::MIN_CYCLE)). Each pick advances a position by a fixed stride `s`
/// coprime to `M` and picks the instance owning the position. Because `s` is coprime to `M`, `M`
/// consecutive picks visit every position exactly once: **exact proportions over every `M`
/// consecutive picks**. Because `s / M` is close to the golden ratio's fractional part, and
/// chosen among nearby candidates for the smallest continued-fraction partial quotients, the
/// positions form a low-discrepancy (Kronecker) sequence: any window of consecutive picks
/// gives each instance close to its share (the three-distance theorem keeps the positions evenly
/// spread at every length), which is what makes the interleaving smooth. The scale exists because
/// a small cycle has no good stride (with weights 1, 2, 3 the only strides coprime to 6 are ±1,
/// which would walk the runs in order).
///
/// What the tests hold it to, for weight sets from `1, 2, 3` to a hundred instances: every window
/// of 6 to 1,000 consecutive picks gives each instance within 3 picks of its share (the naive
/// "each instance `weight` times in a row" is off by up to `weight`), and no instance runs more
/// than twice as long as a perfectly smooth schedule needs. These hold per thread: each thread
/// follows the sequence on its own stripe of the position (see `RoundRobin`).
///
/// Finding the owner is O(1) on average: a guide table of `n` buckets over the cycle points to
/// the first instance of each bucket, and a binary search inside the bucket's (usually one or
/// two) candidates finishes, so the worst case is O(log n). Nothing is rebuilt per pick, there is
/// no lock and no division on the common path: one compare-and-swap on the thread's stripe of the
/// position (see `RoundRobin` for the striping), one 128-bit multiplication, two table reads.
///
/// Compared with nginx's smooth weighted round-robin (O(n) per pick, a lock when shared) and
/// Envoy's EDF scheduler (O(log n), a mutable heap behind a lock), this keeps picks lock-free;
/// compared with gRPC's static-stride scheduler it needs no retry loop, whose length grows with
/// the spread of the weights.
///
/// The position lives in the strategy and survives updates. Memory: 12 bytes per instance.
///
/// ```
/// use waypost_core::{Endpoint, PickContext, ServiceInstance, Strategy};
/// use waypost_strategies::WeightedRoundRobin;
///
/// let endpoints: Vec<Endpoint> = [("a", 1), ("b", 2), ("c", 3)]
///     .iter()
///     .map(|(id, w)| ServiceInstance::builder("users", *id).host("h").port(80).weight(*w).build())
///     .map(|inst| Endpoint::fresh(inst.unwrap()))
///     .collect();
/// let picker = WeightedRoundRobin::new().build(&endpoints);
/// let mut counts = [0u32; 3];
/// for _ in 0..600 {
///     counts[picker.pick(&endpoints, &PickContext::new()).unwrap()] += 1;
/// }
/// // About 100, 200, 300 (exactly so over every full cycle).
/// assert!(counts.iter().zip([100, 200, 300]).all(|(&c, w)| c.abs_diff(w) <= 3), "{counts:?}");
/// ```
#[derive(Debug, Clone)]
pub struct WeightedRoundRobin {
    cursor: Arc<Cursor>,
}

impl WeightedRoundRobin {
    /// The smallest cycle: a cycle is `total weight × scale` positions, with the smallest scale
    /// that makes it at least this long. Proportions are exact over every cycle of consecutive
    /// picks (and within a few picks of exact over any window).
    pub const MIN_CYCLE: u64 = 1 << 16;

    /// A weighted round-robin strategy starting at a random position.
    pub fn new() -> Self {
        WeightedRoundRobin {
            cursor: Arc::new(Cursor::new()),
        }
    }

    /// The cycle length for `weights`: over every this many consecutive picks (on one thread,
    /// between two updates) each instance is picked exactly `weight × cycle / total` times.
    ///
    /// ```
    /// use waypost_strategies::WeightedRoundRobin;
    /// let m = WeightedRoundRobin::cycle_len([1, 2, 3]);
    /// assert_eq!(m % 6, 0);
    /// assert!(m >= WeightedRoundRobin::MIN_CYCLE);
    /// ```
    pub fn cycle_len(weights: impl IntoIterator<Item = u32>) -> u64 {
        let total: u64 = weights.into_iter().map(u64::from).sum();
        if total == 0 {
            return 0;
        }
        total * Self::MIN_CYCLE.div_ceil(total)
    }
}

impl Default for WeightedRoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

impl Strategy for WeightedRoundRobin {
    fn name(&self) -> &str {
        "weighted-round-robin"
    }

    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(Table::new(endpoints, self.cursor.clone()))
    }
}

/// The picker: the runs of positions of every instance on the cycle, and a guide into them.
struct Table {
    cursor: Arc<Cursor>,
    /// `ends[i]`: the first position after instance `i`'s run (cumulative scaled weights).
    ends: Box<[u64]>,
    /// `guide[b]`: the instance owning the first position of bucket `b`; two extra entries
    /// (the last instance) so that `guide[b + 2]` is always valid.
    guide: Box<[u32]>,
    /// `floor(2^64 × buckets / cycle)`: a position's bucket is `(x × mul) >> 64`.
    mul: u64,
    cycle: u64,
    stride: u64,
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("instances", &self.ends.len())
            .field("cycle", &self.cycle)
            .field("stride", &self.stride)
            .finish_non_exhaustive()
    }
}

impl Table {
    fn new(endpoints: &[Endpoint], cursor: Arc<Cursor>) -> Self {
        let n = endpoints.len();
        let cycle = WeightedRoundRobin::cycle_len(endpoints.iter().map(Endpoint::weight));
        let scale = if cycle == 0 {
            0
        } else {
            cycle / endpoints.iter().map(|e| u64::from(e.weight())).sum::<u64>()
        };
        let ends: Box<[u64]> = endpoints
            .iter()
            .scan(0u64, |end, e| {
                *end += u64::from(e.weight()) * scale;
                Some(*end)
            })
            .collect();

        // Bucket b covers positions [ceil(b·M/n), ceil((b+1)·M/n)); its guide entry is the owner
        // of its first position. The computed bucket of x is never above the exact one and at
        // most one below it (mul rounds down, by less than 2^-64 per position), so the owner of
        // x lies between guide[b] and guide[b + 2].
        let buckets = n as u128;
        let (mul, guide) = if n == 0 {
            (0, Box::from([]))
        } else {
            let mul = ((buckets << 64) / u128::from(cycle)).min(u128::from(u64::MAX)) as u64;
            let mut guide = Vec::with_capacity(n + 2);
            let mut owner = 0usize;
            // start = ceil(b·M/n), kept as whole + frac/n without a division per bucket.
            let (step, rem) = (cycle / n as u64, cycle % n as u64);
            let (mut whole, mut frac) = (0u64, 0u64);
            for _ in 0..n {
                let start = whole + u64::from(frac != 0);
                while owner + 1 < n && ends[owner] <= start {
                    owner += 1;
                }
                guide.push(owner as u32);
                whole += step;
                frac += rem;
                if frac >= n as u64 {
                    frac -= n as u64;
                    whole += 1;
                }
            }
            guide.extend([(n - 1) as u32; 2]);
            (mul, guide.into_boxed_slice())
        };

        Table {
            cursor,
            ends,
            guide,
            mul,
            cycle,
            stride: stride_for(cycle),
        }
    }

    /// The instance owning position `x` (`x < cycle`).
    #[inline]
    fn owner(&self, x: u64) -> usize {
        let b = ((u128::from(x) * u128::from(self.mul)) >> 64) as usize;
        let lo = self.guide[b] as usize;
        let hi = self.guide[b + 2] as usize;
        lo + self.ends[lo..=hi].partition_point(|&end| end <= x)
    }
}

impl Picker for Table {
    #[inline]
    fn pick(&self, endpoints: &[Endpoint], _ctx: &PickContext<'_>) -> Option<usize> {
        let n = self.ends.len();
        if n <= 1 || endpoints.len() != n {
            // Empty, trivial, or (against the Picker contract) a different slice: stay in range.
            return (!endpoints.is_empty()).then_some(0);
        }
        let x = self.cursor.advance(self.stride, self.cycle);
        Some(self.owner(x))
    }
}

/// A stride for a cycle of `cycle` positions: coprime to it (so one cycle visits every
/// position), near `cycle / φ`, and among the candidates there the first whose continued
/// fraction `stride / cycle` has no partial quotient above 3, or failing that (within a budget
/// of 256 candidates, a few tens of microseconds) the one with the smallest largest quotient.
///
/// Why the quotients: after `q_k` picks (a convergent's denominator) the positions nearly
/// repeat, shifted by about `1 / (a_{k+1} q_k)` of the cycle; a large `a_{k+1}` means the same
/// pattern repeats up to `a_{k+1}` times, and so does its rounding error. With every quotient
/// small, each window of consecutive picks holds each instance within a few picks of its share,
/// at every window length up to the cycle. Near `cycle / φ` (whose quotients are all 1) the
/// leading quotients are 1 already; the search is about the trailing ones.
fn stride_for(cycle: u64) -> u64 {
    const GOOD: u64 = 3;
    const BUDGET: u64 = 128;
    if cycle <= 2 {
        return 1;
    }
    // cycle × (φ − 1), with 2^64 / φ as the fixed-point constant.
    let target = ((u128::from(cycle) * 0x9E37_79B9_7F4A_7C15) >> 64) as u64;
    let mut best = (u64::MAX, 1u64);
    for d in 0..BUDGET {
        for s in [target.saturating_add(d), target.saturating_sub(d)] {
            if s == 0 || s >= cycle {
                continue;
            }
            if let Some(score) = largest_partial_quotient(s, cycle, best.0) {
                best = (score, s);
                if score <= GOOD {
                    return s;
                }
            }
        }
    }
    best.1
}

/// The largest partial quotient of `s / m`'s continued fraction, if `s` and `m` are coprime and
/// every quotient is below `bound` (`None` otherwise: the search has a better stride already).
fn largest_partial_quotient(s: u64, m: u64, bound: u64) -> Option<u64> {
    let (mut a, mut b) = (m, s);
    let mut largest = 0;
    while b != 0 {
        let q = a / b;
        if q >= bound {
            return None;
        }
        largest = largest.max(q);
        (a, b) = (b, a - q * b);
    }
    // `a` is now gcd(s, m).
    (a == 1).then_some(largest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypost_core::ServiceInstance;

    fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Endpoint::fresh(
                    ServiceInstance::builder("s", format!("i{i:05}"))
                        .host("h")
                        .port(1)
                        .weight(w)
                        .build()
                        .unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn owner_matches_a_linear_search_at_every_position() {
        for weights in [
            vec![1, 2, 3],
            vec![1_000_000, 1, 1, 1, 1, 1, 1, 1],
            vec![1, 1, 1, 1, 1, 1, 1, 1, 1_000_000],
            (1..=300).map(|i| (i * 7919) % 10 + 1).collect(),
        ] {
            let eps = endpoints(&weights);
            let t = Table::new(&eps, Arc::new(Cursor::new()));
            let linear = |x: u64| t.ends.iter().position(|&e| e > x).unwrap();
            // Every run boundary, its neighbours, and a spread of positions.
            let mut xs: Vec<u64> = t
                .ends
                .iter()
                .flat_map(|&e| [e.saturating_sub(1), e])
                .filter(|&x| x < t.cycle)
                .collect();
            xs.extend((0..10_000).map(|k| k * t.cycle / 10_000));
            xs.push(t.cycle - 1);
            for x in xs {
                assert_eq!(t.owner(x), linear(x), "x = {x}, weights {weights:?}");
            }
        }
    }

    #[test]
    fn stride_is_coprime_and_its_partial_quotients_are_small() {
        for cycle in [65_536u64, 65_538, 65_540, 99_999, 1 << 20, 1_000_000_007] {
            let s = stride_for(cycle);
            let largest = largest_partial_quotient(s, cycle, u64::MAX);
            assert!(
                matches!(largest, Some(1..=4)),
                "cycle {cycle}, stride {s}: {largest:?}"
            );
        }
    }
}
