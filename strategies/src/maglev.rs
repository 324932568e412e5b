//! Maglev hashing: a prime-sized lookup table filled from each instance's permutation, so a
//! keyed pick is one multiplication and one load.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use std::sync::Arc;

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

use crate::rng::rehash;
use crate::Rng;

/// Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights as in Envoy's weighted
/// Maglev: a lookup table of a prime size M (default 65,537) where each instance owns entries in
/// proportion to its weight; a request's key hash ([`PickContext::with_key`]) selects entry
/// ⌊hash × M / 2⁶⁴⌋.
///
/// - **O(1) pick:** a multiplication and one table load; no lock, no allocation.
/// - **Balanced:** every instance's share of the table is within one entry per round of its
///   weight's share, far tighter than a ring's.
/// - **Minimal disruption:** removing one of N instances reassigns its entries plus a small
///   number of others (the paper measures a few percent at most); the rest keep their owner.
/// - **Stable:** permutations come from XXH3 hashes of the instance ids, so every process
///   builds the same table for the same set.
/// - **Size:** M should exceed the number of instances by a wide margin (the paper uses
///   M > 100 × N): with fewer entries per instance the weights are honoured coarsely, and past
///   M instances some get none. Pick a larger prime with [`table_size`](Self::table_size) for
///   big sets; a build costs O(M log M).
/// - **No key:** a request without a key takes a random entry, which is a weighted random
///   pick. That is a choice, not an error.
/// - **Retries:** a retry ([`Balancer::pick_excluding`](waypost_core::Balancer::pick_excluding))
///   looks the key up again under a second hash (a third...) until it lands on an instance not
///   tried yet: the same instance on every client, and spread over the others in proportion
///   to weight.
///
/// ```
/// use waypost_core::{Balancer, PickContext, ServiceInstance, WatchEvent};
/// use waypost_strategies::Maglev;
///
/// let balancer = Balancer::new(Maglev::new());
/// let instances = (0..5)
///     .map(|i| ServiceInstance::builder("users", format!("u{i}")).host("10.0.0.1").port(8000 + i).build())
///     .collect::<Result<Vec<_>, _>>()?;
/// balancer.apply(WatchEvent::Snapshot(instances));
///
/// let ctx = PickContext::new().with_key(b"session-7");
/// let first = balancer.pick_with(&ctx)?.instance().id().clone();
/// assert_eq!(balancer.pick_with(&ctx)?.instance().id(), &first);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct Maglev {
    table_size: u32,
    rng: Arc<Rng>,
}

impl Default for Maglev {
    fn default() -> Self {
        Self::new()
    }
}

impl Maglev {
    /// The table size unless set, as in Envoy and the paper: a prime, 256 KiB of table.
    pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
    /// The largest table size accepted: 2²⁶ entries (256 MiB) is already far past any sensible set.
    pub const MAX_TABLE_SIZE: u32 = 1 << 26;

    /// A table of 65,537 entries, thread-local randomness for keyless picks.
    pub fn new() -> Self {
        Maglev {
            table_size: Self::DEFAULT_TABLE_SIZE,
            rng: Arc::new(Rng::new()),
        }
    }

    /// The table size: the smallest prime at least `size` (Maglev needs a prime so that every
    /// instance's permutation visits every entry), between 2 and [`MAX_TABLE_SIZE`](Self::MAX_TABLE_SIZE).
    ///
    /// ```
    /// use waypost_strategies::Maglev;
    /// assert_eq!(Maglev::new().table_size(655_360).size(), 655_373);
    /// assert_eq!(Maglev::new().table_size(65_537).size(), 65_537);
    /// ```
    pub fn table_size(mut self, size: u32) -> Self {
        self.table_size = next_prime(size.clamp(2, Self::MAX_TABLE_SIZE));
        self
    }

    /// The table size in use (always a prime).
    pub fn size(&self) -> u32 {
        self.table_size
    }

    /// As [`new`](Self::new), with keyless picks drawn from `rng`.
    pub fn with_rng(rng: Rng) -> Self {
        Self {
            rng: Arc::new(rng),
            ..Self::new()
        }
    }

    /// As [`new`](Self::new), with keyless picks drawn from a generator seeded with `seed`
    /// (reproducible tests and simulations).
    ///
    /// ```
    /// use waypost_core::{Endpoint, PickContext, ServiceInstance, Strategy};
    /// use waypost_strategies::Maglev;
    ///
    /// let eps: Vec<Endpoint> = (0..5)
    ///     .map(|i| Endpoint::fresh(ServiceInstance::builder("users", format!("u{i}")).host("h").port(80).build().unwrap()))
    ///     .collect();
    /// // Keyless picks: the same sequence from equal seeds.
    /// let keyless = |seed: u64| {
    ///     let table = Maglev::seeded(seed).build(&eps);
    ///     (0..20).map(|_| table.pick(&eps, &PickContext::new()).unwrap()).collect::<Vec<_>>()
    /// };
    /// assert_eq!(keyless(7), keyless(7));
    /// assert_ne!(keyless(7), keyless(8));
    /// ```
    pub fn seeded(seed: u64) -> Self {
        Self::with_rng(Rng::seeded(seed))
    }
}

fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 {
        return false;
    }
    let n = u64::from(n);
    (3u64..)
        .step_by(2)
        .take_while(|d| d * d <= n)
        .all(|d| n % d != 0)
}

fn next_prime(n: u32) -> u32 {
    // Prime gaps below 2^32 are under 400, so this ends quickly and never overflows for the
    // sizes allowed.
    (n..).find(|&m| is_prime(m)).unwrap_or(n)
}

impl Strategy for Maglev {
    fn name(&self) -> &str {
        "maglev"
    }

    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(Table {
            entries: populate(endpoints, self.table_size),
            rng: Arc::clone(&self.rng),
        })
    }
}

/// Fills the table as Envoy's weighted Maglev does: in round `r`, an instance of weight `w`
/// claims its next preferred free entry when `r × w` has caught up with the `max_weight` it has
/// paid per entry so far, so that heavier instances claim proportionally more often; within a
/// round, instances claim in slice order.
///
/// An instance's rounds depend only on its weight, so instances are scheduled in groups of
/// equal weight: a small heap of groups replays the rounds in order (instead of a heap of all
/// instances, or visiting every instance every round, which would cost O(M × N) with one heavy
/// instance among many light ones). Free entries are tracked in a bitmap (M bits, 8 KiB at the
/// default size) so that the ~M ln M probes stay in L1.
fn populate(endpoints: &[Endpoint], size: u32) -> Vec<u32> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let m = u64::from(size);
    let n = endpoints.len();
    let max_weight = endpoints
        .iter()
        .map(|e| u64::from(e.weight()))
        .max()
        .unwrap_or(1);
    // Per instance: the current entry of its permutation and the step (never 0, < m).
    let mut cursor: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|e| {
            let id = e.id().as_str().as_bytes();
            let offset = xxhash_rust::xxh3::xxh3_64_with_seed(id, 0x6d61_676c) % m;
            let skip = xxhash_rust::xxh3::xxh3_64_with_seed(id, 0x736b_6970) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    // Instances sorted by (weight, index): each group of equal weight is a run, in index order.
    // (Packed as weight << 32 | index: one integer compare per step of the sort.)
    let mut members: Vec<u64> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| u64::from(e.weight()) << 32 | i as u64)
        .collect();
    members.sort_unstable();
    // Per group: its weight, its run in `members`, and how many claims each member has made.
    let mut groups: Vec<(u64, usize, usize, u64)> = Vec::new();
    let mut start = 0;
    for end in 1..=n {
        if end == n || members[end] >> 32 != members[start] >> 32 {
            groups.push((members[start] >> 32, start, end, 0));
            start = end;
        }
    }
    // (round of the next claim, group): after k claims, an instance of weight w claims again in
    // round ceil(k × max_weight / w), but at most once per round.
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> =
        (0..groups.len()).map(|g| Reverse((1, g))).collect();
    let mut table = vec![u32::MAX; size as usize];
    let mut used = vec![0u64; (size as usize).div_ceil(64)];
    // Scratch space for rounds where several groups are due: their members in index order.
    let mut due_groups: Vec<usize> = Vec::new();
    let mut due: Vec<u32> = Vec::new();
    let mut marks = vec![0u64; n.div_ceil(64)];
    // For the endgame: the free entries, and each instance's skip⁻¹ mod M (0: not computed yet).
    let mut free: Vec<u64> = Vec::new();
    let mut inverse = vec![0u64; n];
    let mut filled = 0u64;
    'fill: while filled < m {
        let Some(&Reverse((round, _))) = heap.peek() else {
            break;
        };
        due_groups.clear();
        while let Some(&Reverse((r, g))) = heap.peek() {
            if r != round {
                break;
            }
            heap.pop();
            due_groups.push(g);
        }
        // Ties within a round go to the lower index, as in Envoy's loop over the instances.
        due.clear();
        if let [g] = due_groups[..] {
            let (_, lo, hi, _) = groups[g];
            due.extend(members[lo..hi].iter().map(|&x| x as u32));
        } else {
            let count: usize = due_groups.iter().map(|&g| groups[g].2 - groups[g].1).sum();
            if count * 16 < n {
                // Few: sorting them is cheaper than scanning a bitmap of all instances.
                for &g in &due_groups {
                    let (_, lo, hi, _) = groups[g];
                    due.extend(members[lo..hi].iter().map(|&x| x as u32));
                }
                due.sort_unstable();
            } else {
                for &g in &due_groups {
                    let (_, lo, hi, _) = groups[g];
                    for &i in &members[lo..hi] {
                        let i = i as u32;
                        marks[i as usize / 64] |= 1 << (i % 64);
                    }
                }
                for (w, word) in marks.iter_mut().enumerate() {
                    while *word != 0 {
                        due.push((w * 64) as u32 + word.trailing_zeros());
                        *word &= *word - 1;
                    }
                }
            }
        }
        for &i in &due {
            let (mut c, skip) = cursor[i as usize];
            if m - filled > ENDGAME {
                while used[(c / 64) as usize] & (1 << (c % 64)) != 0 {
                    c = step(c, skip, m);
                }
            } else {
                // The last few entries: probing would take about M / free steps per claim (half
                // of all probes happen here), so find the free entry that comes first in this
                // instance's permutation directly. Entry e is at position (e - c) / skip mod M.
                if free.is_empty() {
                    free = free_entries(&used, m);
                }
                let inv = match inverse[i as usize] {
                    0 => pow_mod(skip, m - 2, m),
                    inv => inv,
                };
                inverse[i as usize] = inv;
                let first = (0..free.len())
                    .min_by_key(|&k| step(free[k], m - c, m) * inv % m)
                    .unwrap_or(0);
                c = free.swap_remove(first);
            }
            used[(c / 64) as usize] |= 1 << (c % 64);
            table[c as usize] = i;
            cursor[i as usize].0 = step(c, skip, m);
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
        for &g in &due_groups {
            let group = &mut groups[g];
            group.3 += 1;
            let next = (group.3 * max_weight).div_ceil(group.0).max(round + 1);
            heap.push(Reverse((next, g)));
        }
    }
    table
}

/// How many free entries are left when a build stops probing and searches the free entries
/// instead: each search costs one multiplication and division per free entry, a probe a few
/// cycles, and probing costs about M / free probes per claim.
const ENDGAME: u64 = 64;

/// The entries not yet taken, in order.
fn free_entries(used: &[u64], m: u64) -> Vec<u64> {
    let mut free = Vec::new();
    for (w, &word) in used.iter().enumerate() {
        let mut bits = !word;
        while bits != 0 {
            let e = (w * 64) as u64 + u64::from(bits.trailing_zeros());
            if e >= m {
                break;
            }
            free.push(e);
            bits &= bits - 1;
        }
    }
    free
}

/// `base^exp mod m` for `m < 2³²` (here `skip^(M-2)`: the inverse of `skip` mod the prime M).
fn pow_mod(mut base: u64, mut exp: u64, m: u64) -> u64 {
    let mut result = 1 % m;
    base %= m;
    while exp > 0 {
        if exp & 1 == 1 {
            result = result * base % m;
        }
        base = base * base % m;
        exp >>= 1;
    }
    result
}

/// The next entry of a permutation: `(c + skip) mod m` for `c, skip < m`, without the division
/// (the build's inner loop runs about M ln M times).
#[inline]
fn step(c: u64, skip: u64, m: u64) -> u64 {
    let next = c + skip;
    if next >= m {
        next - m
    } else {
        next
    }
}

struct Table {
    entries: Vec<u32>,
    rng: Arc<Rng>,
}

impl Picker for Table {
    fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        if endpoints.is_empty() || self.entries.is_empty() {
            return None;
        }
        let slot = self.slot(ctx);
        self.entries.get(slot).map(|&i| i as usize)
    }

    /// The owner of the key's entry under a second hash, a third..., until one is not
    /// excluded: deterministic, so the same on every client, and in proportion to weight among
    /// the rest (a fresh hash lands on each instance's share of the entries; the entries next
    /// to one instance's are not spread that evenly). After 16 hashes, which all land on
    /// excluded instances only when those own nearly the whole table, the table is walked on
    /// from the last entry.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        const HASHES: u32 = 16;
        if endpoints.is_empty() || self.entries.is_empty() {
            return None;
        }
        let hash = ctx.hash().unwrap_or_else(|| self.rng.u64());
        let mut slot = self.slot_of(hash);
        for attempt in 0..=HASHES {
            if attempt > 0 {
                slot = self.slot_of(rehash(hash, attempt));
            }
            let owner = self.entries[slot] as usize;
            if !excluded(owner) {
                return Some(owner);
            }
        }
        let (before, after) = self.entries.split_at(slot);
        let mut previous = u32::MAX;
        after.iter().chain(before).find_map(|&owner| {
            // An entry owned like the one before it gives the same answer: ask once per run.
            if owner == previous {
                return None;
            }
            previous = owner;
            (!excluded(owner as usize)).then_some(owner as usize)
        })
    }
}

impl Table {
    /// The request's entry.
    #[inline]
    fn slot(&self, ctx: &PickContext<'_>) -> usize {
        self.slot_of(ctx.hash().unwrap_or_else(|| self.rng.u64()))
    }

    /// ⌊hash × M / 2⁶⁴⌋: a uniform entry without a division.
    #[inline]
    fn slot_of(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.entries.len() as u128) >> 64) as usize
    }
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("size", &self.entries.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65_537));
        assert_eq!(next_prime(65_536), 65_537);
        assert_eq!(next_prime(1 << 26), 67_108_879);
    }

    /// The straightforward fill: a heap of every instance keyed by (round of its next claim,
    /// index). `populate` must build exactly this table, or keys would move between versions.
    fn reference(endpoints: &[Endpoint], size: u32) -> Vec<u32> {
        if endpoints.is_empty() {
            return Vec::new();
        }
        let m = u64::from(size);
        let max_weight = endpoints
            .iter()
            .map(|e| u64::from(e.weight()))
            .max()
            .unwrap();
        let mut cursor: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let id = e.id().as_str().as_bytes();
                let offset = xxhash_rust::xxh3::xxh3_64_with_seed(id, 0x6d61_676c) % m;
                let skip = xxhash_rust::xxh3::xxh3_64_with_seed(id, 0x736b_6970) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut claims = vec![0u64; endpoints.len()];
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> =
            (0..endpoints.len()).map(|i| Reverse((1, i))).collect();
        let mut table = vec![u32::MAX; size as usize];
        let mut filled = 0u64;
        while filled < m {
            let Reverse((round, i)) = heap.pop().unwrap();
            let (mut c, skip) = cursor[i];
            while table[c as usize] != u32::MAX {
                c = (c + skip) % m;
            }
            table[c as usize] = i as u32;
            cursor[i].0 = (c + skip) % m;
            filled += 1;
            claims[i] += 1;
            let w = u64::from(endpoints[i].weight());
            heap.push(Reverse((
                (claims[i] * max_weight).div_ceil(w).max(round + 1),
                i,
            )));
        }
        table
    }

    fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let instance = waypost_core::ServiceInstance::builder("s", format!("i{i:05}"))
                    .host("10.0.0.1")
                    .port(80)
                    .weight(w)
                    .build()
                    .unwrap();
                Endpoint::new(instance, Arc::new(waypost_core::EndpointState::new()))
            })
            .collect()
    }

    #[test]
    fn grouped_fill_builds_the_same_table_as_a_heap_of_instances() {
        let mut rng = fastrand::Rng::with_seed(6);
        let cases: Vec<(Vec<u32>, u32)> = vec![
            ((1..=10).cycle().take(1_000).collect(), 10_007),
            ((0..300).map(|_| rng.u32(1..=40)).collect(), 10_007),
            ((0..50).map(|_| rng.u32(1..=3)).collect(), 65_537),
            // One heavy instance among many light ones.
            (
                (0..400).map(|i| if i == 7 { 1_000 } else { 1 }).collect(),
                4_001,
            ),
            // Few distinct weights, several due in the same rounds (the bitmap path).
            (
                (0..2_000)
                    .map(|i| if i % 100 == 0 { 9 } else { 1 })
                    .collect(),
                5_003,
            ),
            // A few heavy instances of two weights due together (the sorting path).
            (
                (0..2_000)
                    .map(|i| match i % 200 {
                        0 => 10,
                        100 => 9,
                        _ => 1,
                    })
                    .collect(),
                10_007,
            ),
            // More instances than entries.
            (vec![1, 2, 3, 4, 5, 6, 7, 8], 5),
            (vec![3], 2),
        ];
        for (weights, size) in cases {
            let eps = endpoints(&weights);
            assert_eq!(
                populate(&eps, size),
                reference(&eps, size),
                "{} instances, size {size}",
                weights.len()
            );
        }
    }
}
