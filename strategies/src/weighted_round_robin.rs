//! In turn, in proportion to weight, smoothly interleaved.

use std::fmt;
use std::sync::Arc;

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

use crate::rng::{by_weight, Cursor};

/// In turn, in proportion to weight, smoothly interleaved: nginx's smooth weighted round-robin,
/// precomputed. Weights 5, 1, 1 give `a a b a c a a`, weights 1, 2, 3 give `c b a c b c`:
/// exactly `weight` picks of each instance in **every** window of `W` consecutive picks
/// (`W` = the sum of the weights), never a burst of one instance.
///
/// # How
/// At build time the picker computes one cycle of nginx's smooth weighted round-robin (SWRR: each
/// step every instance gains its weight, the one with the most wins and pays `W`) and stores it
/// as a table of `W` instance indices (2 bytes each). SWRR's state is back to zero after `W`
/// steps, so the cycle repeats: a pick is `table[position]` with the position advanced by one in
/// `0..W`. Whichever position a thread starts at, `W` consecutive picks cover the table once,
/// hence exact counts in every window of `W` picks, and the same interleaving nginx gives.
///
/// Building the cycle naively costs `W × n`. Instances of equal weight are picked by SWRR in
/// index order (they tie until each had its turn), so the build tracks one candidate per distinct
/// weight, and it advances by whole runs: a group keeps winning until its rotation wraps or a
/// heavier group catches up, which one pass over the `d` groups computes. The cost is `d` per
/// run, at most `W × d`, and far less when many instances share a weight (weights 1..10 over
/// 10,000 instances: tens of microseconds).
///
/// The table is used when `W ≤` [`MAX_TABLE`](Self::MAX_TABLE) and building it takes at most
/// [`MAX_BUILD_STEPS`](Self::MAX_BUILD_STEPS). Otherwise (large or very diverse weights) the
/// picker falls back to a low-discrepancy stride over a cycle of the same `W` positions: every
/// instance owns a run of `weight` positions, each pick advances the position by a stride
/// coprime to `W` near `W / φ` (so the positions form a Kronecker sequence). It is still exact
/// over every window of `W` picks (the stride visits each position once per `W` picks) and close
/// to its share in every shorter window, but its interleaving is not SWRR's; finding the owner
/// of a position is O(1) on average, O(log n) at worst. [`schedule`](Self::schedule) says which
/// one a set of weights gets.
///
/// Exactness holds per thread: the position lives in 16 stripes, each thread advancing its own
/// (see `RoundRobin`), so two threads picking at once never contend on one cache line and each
/// sees whole windows. The position lives in the strategy, so it survives rebuilds; a position
/// beyond a cycle that shrank is taken modulo the new one, never out of range.
///
/// A retry takes the next entry of the cycle whose instance was not tried yet, and the position
/// goes on after it: the cycle with the tried instances left out, so the others keep their
/// weights.
///
/// Pick cost: one uncontended compare-and-swap and one table read; no lock, no allocation, no
/// division on the common path. Memory: `2 × W` bytes for the table (at most 128 KiB), or 12
/// bytes per instance for the fallback. Compared with nginx (O(n) per pick under a lock) and
/// Envoy's EDF scheduler (O(log n), a mutable heap behind a lock), the work moves to the build.
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
/// assert_eq!(counts, [100, 200, 300]); // 100 whole cycles of 6, wherever they started
///
/// // One cycle, as nginx would pick it (the picker starts at a random point of it).
/// assert_eq!(WeightedRoundRobin::schedule([5, 1, 1]), Some(vec![0, 0, 1, 0, 2, 0, 0]));
/// ```
#[derive(Debug, Clone)]
pub struct WeightedRoundRobin {
    cursor: Arc<Cursor>,
}

impl WeightedRoundRobin {
    /// The longest cycle kept as a table of picks: `W` (the sum of the weights) above this uses
    /// the stride fallback. One table entry is 2 bytes, so a table is at most 128 KiB; and since
    /// every weight is at least 1, a set with a table has at most this many instances, whose
    /// indices fit the 2 bytes.
    pub const MAX_TABLE: u64 = 1 << 16;

    /// The most work spent building a table, in groups visited (see the type's docs): about a
    /// millisecond at most. Weights whose table would take more (many distinct weights, each
    /// on few instances) get the stride fallback, which builds in O(n).
    pub const MAX_BUILD_STEPS: u64 = 1 << 18;

    /// A weighted round-robin strategy starting at a random position.
    pub fn new() -> Self {
        WeightedRoundRobin {
            cursor: Arc::new(Cursor::new()),
        }
    }

    /// The cycle length for `weights`: their sum `W`. Over every `W` consecutive picks (on one
    /// thread, between two updates) each instance is picked exactly `weight` times.
    ///
    /// ```
    /// use waypost_strategies::WeightedRoundRobin;
    /// assert_eq!(WeightedRoundRobin::cycle_len([1, 2, 3]), 6);
    /// assert_eq!(WeightedRoundRobin::cycle_len([1_000_000, 1]), 1_000_001);
    /// ```
    pub fn cycle_len(weights: impl IntoIterator<Item = u32>) -> u64 {
        weights.into_iter().map(u64::from).sum()
    }

    /// One cycle of picks for `weights` (instance indices), in the order a picker built for them
    /// follows (starting from a random point of it): nginx's smooth weighted round-robin, ties
    /// to the lower index. `None` when the weights get the stride fallback instead (see the type's
    /// docs), or when there are none.
    ///
    /// ```
    /// use waypost_strategies::WeightedRoundRobin;
    /// assert_eq!(WeightedRoundRobin::schedule([1, 2, 3]), Some(vec![2, 1, 0, 2, 1, 2]));
    /// assert_eq!(WeightedRoundRobin::schedule([100_000, 1]), None); // W above MAX_TABLE
    /// ```
    pub fn schedule(weights: impl IntoIterator<Item = u32>) -> Option<Vec<usize>> {
        let weights: Vec<u32> = weights.into_iter().collect();
        smooth_cycle(&weights).map(|t| t.iter().map(|&i| usize::from(i)).collect())
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
        let weights: Vec<u32> = endpoints.iter().map(Endpoint::weight).collect();
        match smooth_cycle(&weights) {
            Some(table) => Box::new(Schedule {
                cursor: self.cursor.clone(),
                n: endpoints.len(),
                table: table.into_boxed_slice(),
            }),
            None => Box::new(Stride::new(&weights, self.cursor.clone())),
        }
    }
}

/// One cycle of nginx's smooth weighted round-robin over `weights`, or `None` when it would be
/// too long or too costly to build (or there are no weights).
///
/// nginx, per pick: every instance's `current += weight`; the largest `current` (first in order on
/// a tie) is picked and pays `current -= W`. After `W` picks every `current` is 0 again.
///
/// Instances of equal weight start equal and gain equally, so among them SWRR picks in index
/// order, one round after another: within a group of equal weight, the candidate is the member
/// at the group's rotation point, and its `current` is `t × weight − W × rounds` (`t` steps so
/// far, `rounds` completed rotations). Tracking one candidate per group, a run of picks at a
/// time, gives nginx's exact sequence for `groups` per run instead of `n` per pick.
fn smooth_cycle(weights: &[u32]) -> Option<Vec<u16>> {
    const _: () = assert!(
        WeightedRoundRobin::MAX_TABLE <= 1 << 16,
        "indices must fit u16"
    );
    let total = WeightedRoundRobin::cycle_len(weights.iter().copied());
    if total == 0 || total > WeightedRoundRobin::MAX_TABLE {
        return None;
    }
    // Members of each weight, in index order (the sort is stable).
    // (`n ≤ W ≤ 2^16`, so every index fits a u16; `n` itself may not.)
    let mut order: Vec<u16> = (0..weights.len()).map(|i| i as u16).collect();
    order.sort_by_key(|&i| weights[usize::from(i)]);
    let mut groups: Vec<Group> = Vec::new();
    for (at, &i) in order.iter().enumerate() {
        let w = weights[usize::from(i)];
        match groups.last_mut() {
            Some(g) if g.weight == w => g.len += 1,
            _ => groups.push(Group {
                weight: w,
                start: at,
                len: 1,
                turn: 0,
            }),
        }
    }

    // `next[g]`: the value of group g's candidate at the coming step (its `current` plus its
    // weight), which is what nginx compares. It stays within ±n × W ≤ 2^32 (the instances'
    // `current`s sum to 0 and none drops below −W): no overflow in an i64.
    let total_i = total as i64;
    let mut next: Vec<i64> = groups.iter().map(|g| i64::from(g.weight)).collect();
    let leader = |g: &Group| order[g.start + g.turn];
    let mut table: Vec<u16> = Vec::with_capacity(total as usize);
    let mut work = 0u64;
    while table.len() < total as usize {
        // Each run costs a pass over the groups; past the budget, the fallback is cheaper.
        work += groups.len() as u64;
        if work > WeightedRoundRobin::MAX_BUILD_STEPS {
            return None;
        }
        // The step's winner: the largest value, the lower index on a tie.
        let mut top = 0;
        for h in 1..groups.len() {
            let better = next[h] > next[top]
                || (next[h] == next[top] && leader(&groups[h]) < leader(&groups[top]));
            if better {
                top = h;
            }
        }
        // The winner's next members have the same value (they have not paid yet), so it keeps
        // winning until its rotation wraps or a heavier group, gaining `gap` more per step,
        // catches up: a run of consecutive picks found in one pass over the groups.
        let g = &groups[top];
        let w = i64::from(g.weight);
        let mut run = g.len - g.turn;
        for (h, other) in groups.iter().enumerate() {
            let gap = i64::from(other.weight) - w;
            if gap <= 0 {
                continue; // a lighter group falls further behind (weights of groups differ)
            }
            let lead = next[top] - next[h]; // ≥ 0: `top` won this step
            let (steps, rest) = (lead / gap, lead % gap);
            // `top` wins while its lead is positive; on a tie, while its member's index is lower.
            let mut wins = if rest == 0 { steps } else { steps + 1 };
            if rest == 0
                && (steps as usize) < run
                && order[g.start + g.turn + steps as usize] < leader(other)
            {
                wins += 1;
            }
            run = run.min(wins as usize);
        }
        let run = run.max(1); // the step's winner at least (a lead of 0 means a lower index)
        table.extend_from_slice(&order[g.start + g.turn..g.start + g.turn + run]);
        for (value, h) in next.iter_mut().zip(&groups) {
            *value += run as i64 * i64::from(h.weight);
        }
        let g = &mut groups[top];
        g.turn += run;
        if g.turn == g.len {
            // Every member paid once more: the next candidate (the first again) is W lower.
            g.turn = 0;
            next[top] -= total_i;
        }
    }
    Some(table)
}

/// Instances of one weight, `order[start..start + len]`, and whose turn it is among them.
struct Group {
    weight: u32,
    start: usize,
    len: usize,
    turn: usize,
}

/// The picker when the cycle is a table: the position walks the table.
struct Schedule {
    cursor: Arc<Cursor>,
    n: usize,
    table: Box<[u16]>,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("instances", &self.n)
            .field("cycle", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl Picker for Schedule {
    #[inline]
    fn pick(&self, endpoints: &[Endpoint], _ctx: &PickContext<'_>) -> Option<usize> {
        if self.n <= 1 || endpoints.len() != self.n {
            // Trivial, or (against the Picker contract) a different slice: stay in range.
            return (!endpoints.is_empty()).then_some(0);
        }
        let x = self.cursor.advance(1, self.table.len() as u64);
        self.table.get(x as usize).map(|&i| usize::from(i))
    }

    /// The next entry of the cycle whose instance is not excluded, and the position goes on
    /// after it (one exchange): the cycle with the excluded instances left out, so the rest
    /// keep their weights and their interleaving.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        _ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.n <= 1 || endpoints.len() != self.n {
            return (0..endpoints.len()).find(|&i| !excluded(i));
        }
        let owner = |x: u64| usize::from(self.table[x as usize]);
        let len = self.table.len() as u64;
        self.cursor
            .advance_to(1, len, len, |x| !excluded(owner(x)))
            .map(owner)
    }
}

/// The fallback picker: the runs of positions of every instance on a cycle of `W` positions,
/// a stride through them, and a guide into them.
struct Stride {
    cursor: Arc<Cursor>,
    /// `ends[i]`: the first position after instance `i`'s run (cumulative weights).
    ends: Box<[u64]>,
    /// `guide[b]`: the instance owning the first position of bucket `b`; two extra entries
    /// (the last instance) so that `guide[b + 2]` is always valid.
    guide: Box<[u32]>,
    /// `floor(2^64 × buckets / cycle)`: a position's bucket is `(x × mul) >> 64`.
    mul: u64,
    cycle: u64,
    stride: u64,
}

impl fmt::Debug for Stride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stride")
            .field("instances", &self.ends.len())
            .field("cycle", &self.cycle)
            .field("stride", &self.stride)
            .finish_non_exhaustive()
    }
}

impl Stride {
    fn new(weights: &[u32], cursor: Arc<Cursor>) -> Self {
        let n = weights.len();
        let cycle = WeightedRoundRobin::cycle_len(weights.iter().copied());
        let ends: Box<[u64]> = weights
            .iter()
            .scan(0u64, |end, &w| {
                *end += u64::from(w);
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

        Stride {
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

impl Picker for Stride {
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

    /// The next position of the stride whose owner is not excluded, and the position goes on
    /// after it (one exchange). When the excluded own so much of the cycle that 64 strides
    /// find none of the rest, one stride's position chooses among the rest by weight.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        _ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        const WALK: u64 = 64;
        let n = self.ends.len();
        if n <= 1 || endpoints.len() != n {
            return (0..endpoints.len()).find(|&i| !excluded(i));
        }
        if let Some(x) = self
            .cursor
            .advance_to(self.stride, self.cycle, WALK, |x| !excluded(self.owner(x)))
        {
            return Some(self.owner(x));
        }
        let weight = |i: usize| self.ends[i] - i.checked_sub(1).map_or(0, |j| self.ends[j]);
        let x = self.cursor.advance(self.stride, self.cycle);
        by_weight(n, weight, excluded, |total| x % total)
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

    #[test]
    fn owner_matches_a_linear_search_at_every_position() {
        for weights in [
            vec![1, 2, 3],
            vec![1_000_000, 1, 1, 1, 1, 1, 1, 1],
            vec![1, 1, 1, 1, 1, 1, 1, 1, 1_000_000],
            (1..=300).map(|i| (i * 7919) % 10 + 1).collect(),
        ] {
            let t = Stride::new(&weights, Arc::new(Cursor::new()));
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
    fn cost_limits_choose_the_fallback() {
        // W above the table's cap.
        assert!(smooth_cycle(&[1 << 16, 1]).is_none());
        assert_eq!(
            smooth_cycle(&[(1 << 16) - 1, 1]).map(|t| t.len()),
            Some(1 << 16)
        );
        // W within the cap, but too much work: 1..=300 sums to 45,150, with 300 groups of
        // one instance (a run per pick), about 45,150 × 300 = 13.5 million steps.
        let diverse: Vec<u32> = (1..=300).collect();
        assert!(smooth_cycle(&diverse).is_none());
        // The same W with few distinct weights is cheap enough.
        assert!(smooth_cycle(&[150; 301]).is_some());
        assert!(smooth_cycle(&[]).is_none());
        // As many instances as the table holds: every index fits.
        let all = smooth_cycle(&[1; 1 << 16]).unwrap();
        assert!(all.iter().enumerate().all(|(k, &i)| usize::from(i) == k));
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
