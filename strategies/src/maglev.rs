//! Maglev hashing: a prime-sized lookup table filled from each instance's permutation, so a
//! keyed pick is one multiplication and one load.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use std::sync::Arc;

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

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
    /// use waypost_strategies::Maglev;
    /// let s = Maglev::seeded(7);
    /// # let _ = s;
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
/// paid per entry so far, so that heavier instances claim proportionally more often. A heap
/// replays the rounds in order without visiting every instance every round (which would cost
/// O(M × N) with one heavy instance among many light ones).
fn populate(endpoints: &[Endpoint], size: u32) -> Vec<u32> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let m = u64::from(size);
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
    // (round of the next claim, index): after k claims, an instance of weight w claims again in
    // round ceil(k × max_weight / w), but at most once per round; ties go to the lower index, as
    // in Envoy's loop.
    let mut claims = vec![0u64; endpoints.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> =
        (0..endpoints.len()).map(|i| Reverse((1, i))).collect();
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    while filled < m {
        let Some(Reverse((round, i))) = heap.pop() else {
            break;
        };
        let (mut c, skip) = cursor[i];
        while table[c as usize] != u32::MAX {
            c = step(c, skip, m);
        }
        table[c as usize] = i as u32;
        cursor[i].0 = step(c, skip, m);
        filled += 1;
        claims[i] += 1;
        let w = u64::from(endpoints[i].weight());
        // At most one claim per round, as in Envoy's loop over the instances.
        let next = (claims[i] * max_weight).div_ceil(w).max(round + 1);
        heap.push(Reverse((next, i)));
    }
    table
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
        let hash = ctx.hash().unwrap_or_else(|| self.rng.u64());
        // ⌊hash × M / 2⁶⁴⌋: a uniform entry without a division.
        let slot = ((u128::from(hash) * self.entries.len() as u128) >> 64) as usize;
        self.entries.get(slot).map(|&i| i as usize)
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
}
