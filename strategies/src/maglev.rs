//! Maglev hashing: a prime-sized lookup table filled from each instance's permutation, so a
//! keyed pick is one multiplication and one load.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use std::sync::{Arc, Mutex};

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

use crate::kept;
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
///   big sets; a build costs O(M log M). Entries take two bytes while the set has at most
///   65,536 instances (128 KiB at the default size), four past that.
/// - **Updates:** a build reuses the permutations of the endpoints that an earlier build had
///   (it keeps clones of the last four builds' endpoints, one set per failover tier of a
///   balancer), so an update hashes only the instances that changed, then fills the table
///   again.
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
pub struct Maglev {
    table_size: u32,
    rng: Arc<Rng>,
    /// The last builds' endpoints and their permutations, the latest first (at most
    /// [`KEPT`](kept::KEPT), one per failover tier). Only builds take this lock.
    last: Mutex<Vec<Last>>,
}

impl Clone for Maglev {
    /// The same settings and randomness; the clone keeps its own last builds.
    fn clone(&self) -> Self {
        Maglev {
            table_size: self.table_size,
            rng: Arc::clone(&self.rng),
            last: Mutex::default(),
        }
    }
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("table_size", &self.table_size)
            .finish_non_exhaustive()
    }
}

impl Default for Maglev {
    fn default() -> Self {
        Self::new()
    }
}

impl Maglev {
    /// The table size unless set, as in Envoy and the paper: a prime.
    pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
    /// The largest table size accepted: 2²⁶ entries (256 MiB) is already far past any sensible set.
    pub const MAX_TABLE_SIZE: u32 = 1 << 26;

    /// A table of 65,537 entries, thread-local randomness for keyless picks.
    pub fn new() -> Self {
        Maglev {
            table_size: Self::DEFAULT_TABLE_SIZE,
            rng: Arc::new(Rng::new()),
            last: Mutex::default(),
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
        // A build that panicked may have left one half-updated: start afresh.
        let mut kept = self.last.lock().unwrap_or_else(|poisoned| {
            let mut kept = poisoned.into_inner();
            kept.clear();
            kept
        });
        let mut last = match closest(&kept, endpoints, self.table_size) {
            Some(i) => kept.remove(i),
            None => Last::default(),
        };
        last.update(endpoints, self.table_size);
        let rng = Arc::clone(&self.rng);
        let picker: Box<dyn Picker> = if endpoints.len() <= 1 << 16 {
            Box::new(Table::<u16> {
                entries: populate(&last.permutations, self.table_size),
                rng,
            })
        } else {
            Box::new(Table::<u32> {
                entries: populate(&last.permutations, self.table_size),
                rng,
            })
        };
        kept::keep(&mut kept, last);
        picker
    }
}

/// Where an instance's permutation of the table starts, its step (never 0, < M), and its
/// weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Permutation {
    offset: u32,
    skip: u32,
    weight: u32,
}

impl Permutation {
    fn of(endpoint: &Endpoint, size: u32) -> Self {
        let id = endpoint.id().as_str().as_bytes();
        let m = u64::from(size);
        let offset = xxhash_rust::xxh3::xxh3_64_with_seed(id, 0x6d61_676c) % m;
        let skip = xxhash_rust::xxh3::xxh3_64_with_seed(id, 0x736b_6970) % (m - 1) + 1;
        // Both are below M, which is below 2³².
        Permutation {
            offset: offset as u32,
            skip: skip as u32,
            weight: endpoint.weight(),
        }
    }
}

/// Which of the kept builds is this set's (see [`kept::closest`]): a sample counts when it is
/// the very endpoint at about the same place in the kept build (a small change moves the others
/// by a few places; compared without reading either) or, failing that, where its id is found
/// there (kept builds are in id order when their endpoints were).
fn closest(kept: &[Last], endpoints: &[Endpoint], size: u32) -> Option<usize> {
    const NEAR: usize = 2;
    let n = endpoints.len();
    kept::closest(kept, n, |last, at| {
        let e = &endpoints[at];
        let there = at * last.endpoints.len() / n;
        let near = &last.endpoints
            [there.saturating_sub(NEAR)..(there + NEAR + 1).min(last.endpoints.len())];
        last.size == size
            && (near.iter().any(|o| Endpoint::ptr_eq(o, e))
                || last
                    .endpoints
                    .binary_search_by(|o| o.id().cmp(e.id()))
                    .is_ok_and(|i| Endpoint::ptr_eq(&last.endpoints[i], e)))
    })
}

/// The endpoints of one build and their permutations, for the table size `size`.
#[derive(Default)]
struct Last {
    size: u32,
    endpoints: Vec<Endpoint>,
    permutations: Vec<Permutation>,
}

impl Last {
    /// Makes this the build of `endpoints`: an endpoint this build had keeps its permutation,
    /// found by identity ([`Endpoint::ptr_eq`]) without reading the endpoint. (Reading every
    /// id to hash it again took about 0.2 ms of a 1.1 ms build at 10,000 instances in a
    /// balancer, whose endpoints are spread over the heap.) The endpoints are expected in id
    /// order, as balancers pass them: the kept ones are matched in step, and one that is gone
    /// is passed over by comparing ids there. In any other order the ones out of step are
    /// hashed again, nothing worse.
    fn update(&mut self, endpoints: &[Endpoint], size: u32) {
        if self.size != size {
            *self = Last {
                size,
                ..Last::default()
            };
        }
        let old_permutations = std::mem::take(&mut self.permutations);
        let mut old = std::mem::take(&mut self.endpoints).into_iter();
        // The next endpoint of the last build, and its index there.
        let (mut next, mut j) = (old.next(), 0);
        self.endpoints.reserve(endpoints.len());
        self.permutations.reserve(endpoints.len());
        for e in endpoints {
            while let Some(o) = &next {
                if Endpoint::ptr_eq(o, e) || o.id() >= e.id() {
                    break;
                }
                (next, j) = (old.next(), j + 1);
            }
            match next.take_if(|o| Endpoint::ptr_eq(o, e)) {
                Some(kept) => {
                    self.endpoints.push(kept);
                    self.permutations.push(old_permutations[j]);
                    (next, j) = (old.next(), j + 1);
                }
                None => {
                    self.endpoints.push(e.clone());
                    self.permutations.push(Permutation::of(e, size));
                }
            }
        }
    }
}

/// A table entry: the index of the instance that owns it, in two bytes while the set has at
/// most 65,536 instances (half the memory to fill on an update and to load from on a pick),
/// four past that.
trait Owner: Copy + PartialEq + Send + Sync + 'static {
    /// `i` as an entry; the table's type is chosen so that every index fits.
    fn from_index(i: u32) -> Self;
    fn index(self) -> usize;
}

impl Owner for u16 {
    #[inline]
    fn from_index(i: u32) -> Self {
        debug_assert!(
            i <= u32::from(u16::MAX),
            "a u16 table holds at most 65,536 instances"
        );
        i as u16
    }
    #[inline]
    fn index(self) -> usize {
        usize::from(self)
    }
}

impl Owner for u32 {
    #[inline]
    fn from_index(i: u32) -> Self {
        i
    }
    #[inline]
    fn index(self) -> usize {
        self as usize
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
fn populate<E: Owner>(permutations: &[Permutation], size: u32) -> Vec<E> {
    if permutations.is_empty() {
        return Vec::new();
    }
    let m = u64::from(size);
    let n = permutations.len();
    // Per instance: the current entry of its permutation and the step.
    let mut cursor: Vec<(u32, u32)> = permutations.iter().map(|p| (p.offset, p.skip)).collect();
    let weights: Vec<u32> = permutations.iter().map(|p| p.weight).collect();
    let max_weight = weights.iter().copied().max().map_or(1, u64::from);
    let (members, mut groups) = by_weight(&weights);
    // (round of the next claim, group): after k claims, an instance of weight w claims again in
    // round ceil(k × max_weight / w), but at most once per round.
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> =
        (0..groups.len()).map(|g| Reverse((1, g))).collect();
    // Zeroed, so the allocator can hand out fresh pages without writing them: the fill writes
    // every entry once (`used` says which are taken).
    let mut table = vec![E::from_index(0); size as usize];
    let mut used = vec![0u64; (size as usize).div_ceil(64)];
    // Scratch space for rounds where several groups are due: their members in index order.
    let mut due_groups: Vec<usize> = Vec::new();
    let mut due: Vec<u32> = Vec::new();
    let mut marks = vec![0u64; n.div_ceil(64)];
    // With at most 64 groups (64 distinct weights), each instance's group, for `due_in`.
    let group_of: Vec<u8> = if groups.len() <= 64 {
        let mut group_of = vec![0u8; n];
        for (g, &(_, lo, hi, _)) in groups.iter().enumerate() {
            for &i in &members[lo..hi] {
                group_of[i as usize] = g as u8;
            }
        }
        group_of
    } else {
        Vec::new()
    };
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
            due.extend_from_slice(&members[lo..hi]);
        } else {
            let count: usize = due_groups.iter().map(|&g| groups[g].2 - groups[g].1).sum();
            if count * 16 < n {
                // Few: sorting them is cheaper than scanning a bitmap of all instances.
                for &g in &due_groups {
                    let (_, lo, hi, _) = groups[g];
                    due.extend_from_slice(&members[lo..hi]);
                }
                due.sort_unstable();
            } else if !group_of.is_empty() {
                let mask = due_groups.iter().fold(0u64, |mask, &g| mask | 1 << g);
                due_in(&group_of, mask, &mut due);
            } else {
                for &g in &due_groups {
                    let (_, lo, hi, _) = groups[g];
                    for &i in &members[lo..hi] {
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
        // Claims before the endgame, without checking for it on each.
        let bulk = due.len().min((m - filled).saturating_sub(ENDGAME) as usize);
        for &i in &due[..bulk] {
            let (c, skip) = cursor[i as usize];
            let (c, skip) = (u64::from(c), u64::from(skip));
            let c = first_free(&used, c, skip, m);
            used[(c / 64) as usize] |= 1 << (c % 64);
            table[c as usize] = E::from_index(i);
            cursor[i as usize].0 = step(c, skip, m) as u32;
        }
        filled += bulk as u64;
        // The last few entries: probing would take about M / free steps per claim (half of all
        // probes happen here), so find the free entry that comes first in this instance's
        // permutation directly. Entry e is at position (e - c) / skip mod M.
        for &i in &due[bulk..] {
            let (c, skip) = cursor[i as usize];
            let (c, skip) = (u64::from(c), u64::from(skip));
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
            let c = free.swap_remove(first);
            table[c as usize] = E::from_index(i);
            cursor[i as usize].0 = step(c, skip, m) as u32;
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

/// Sets `due` to the instances, in index order, whose group is in `mask` (bit g: group g is
/// due). Every instance is written and the length advances only for the due ones, so there is
/// no branch to mispredict on a round where about half of the instances are due.
fn due_in(group_of: &[u8], mask: u64, due: &mut Vec<u32>) {
    due.clear();
    due.resize(group_of.len() + 1, 0);
    let mut len = 0;
    for (i, &g) in group_of.iter().enumerate() {
        due[len] = i as u32;
        len += (mask >> g & 1) as usize;
    }
    due.truncate(len);
}

/// The instances' indexes grouped by weight, lightest first and each group in index order, and
/// per group: its weight, its run in that list, and 0 (the claims its members have made).
///
/// Weights span a small range in practice (1..10, 1..100), so a counting sort does it in two
/// passes; a wide range falls back to sorting.
#[allow(clippy::type_complexity)]
fn by_weight(weights: &[u32]) -> (Vec<u32>, Vec<(u64, usize, usize, u64)>) {
    const COUNTED: u32 = 4_096;
    let (Some(&min), Some(&max)) = (weights.iter().min(), weights.iter().max()) else {
        return (Vec::new(), Vec::new());
    };
    let mut groups = Vec::new();
    if max - min < COUNTED {
        // starts[k]: where the group of weight min + k begins in `members`.
        let mut starts = vec![0usize; (max - min) as usize + 2];
        for &w in weights {
            starts[(w - min) as usize + 1] += 1;
        }
        for k in 1..starts.len() {
            starts[k] += starts[k - 1];
        }
        for (k, run) in starts.windows(2).enumerate() {
            if run[1] > run[0] {
                groups.push((u64::from(min) + k as u64, run[0], run[1], 0));
            }
        }
        let mut members = vec![0u32; weights.len()];
        for (i, &w) in weights.iter().enumerate() {
            let next = &mut starts[(w - min) as usize];
            members[*next] = i as u32;
            *next += 1;
        }
        return (members, groups);
    }
    // Packed as weight << 32 | index: one integer compare per step of the sort.
    let mut packed: Vec<u64> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| u64::from(w) << 32 | i as u64)
        .collect();
    packed.sort_unstable();
    let mut start = 0;
    for end in 1..=packed.len() {
        if end == packed.len() || packed[end] >> 32 != packed[start] >> 32 {
            groups.push((packed[start] >> 32, start, end, 0));
            start = end;
        }
    }
    (packed.into_iter().map(|x| x as u32).collect(), groups)
}

/// How many free entries are left when a build stops probing and searches the free entries
/// instead: each search costs one multiplication and division per free entry, a probe a few
/// cycles, and probing costs about M / free probes per claim.
const ENDGAME: u64 = 64;

/// The first free entry of the permutation `c, c + skip, c + 2 skip, ...` (mod `m`).
///
/// Most claims find one of the first four entries free. Those four are tested together and
/// the first free one selected without a branch: a branch per entry would be mispredicted on
/// about every other claim of the table's middle part, where the first entry is as likely
/// taken as not. Past them the permutation is walked as four interleaved chains, each
/// stepping `4 × skip`: a walk is bound by the latency of computing the next entry (an add, a
/// compare, a select), and four chains that do not depend on each other pay it once per four
/// entries instead of once per entry.
#[inline(always)]
fn first_free(used: &[u64], c: u64, skip: u64, m: u64) -> u64 {
    let taken = |e: u64| used[(e / 64) as usize] & (1 << (e % 64)) != 0;
    let c1 = step(c, skip, m);
    let c2 = step(c1, skip, m);
    let c3 = step(c2, skip, m);
    let free = !(u32::from(taken(c))
        | u32::from(taken(c1)) << 1
        | u32::from(taken(c2)) << 2
        | u32::from(taken(c3)) << 3)
        & 0b1111;
    if free != 0 {
        return [c, c1, c2, c3][free.trailing_zeros() as usize & 3];
    }
    let skip2 = step(skip, skip, m);
    let skip4 = step(skip2, skip2, m);
    let (mut c, mut c1, mut c2, mut c3) = (
        step(c, skip4, m),
        step(c1, skip4, m),
        step(c2, skip4, m),
        step(c3, skip4, m),
    );
    loop {
        if !taken(c) {
            return c;
        }
        if !taken(c1) {
            return c1;
        }
        if !taken(c2) {
            return c2;
        }
        if !taken(c3) {
            return c3;
        }
        c = step(c, skip4, m);
        c1 = step(c1, skip4, m);
        c2 = step(c2, skip4, m);
        c3 = step(c3, skip4, m);
    }
}

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

struct Table<E> {
    entries: Vec<E>,
    rng: Arc<Rng>,
}

impl<E: Owner> Picker for Table<E> {
    fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        if endpoints.is_empty() || self.entries.is_empty() {
            return None;
        }
        let slot = self.slot(ctx);
        self.entries.get(slot).map(|&i| i.index())
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
            let owner = self.entries[slot].index();
            if !excluded(owner) {
                return Some(owner);
            }
        }
        let (before, after) = self.entries.split_at(slot);
        let mut previous = None;
        after.iter().chain(before).find_map(|&owner| {
            // An entry owned like the one before it gives the same answer: ask once per run.
            if previous == Some(owner) {
                return None;
            }
            previous = Some(owner);
            (!excluded(owner.index())).then_some(owner.index())
        })
    }
}

impl<E> Table<E> {
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

impl<E> fmt::Debug for Table<E> {
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

    fn permutations(endpoints: &[Endpoint], size: u32) -> Vec<Permutation> {
        endpoints.iter().map(|e| Permutation::of(e, size)).collect()
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
            // More than 64 distinct weights (no per-instance group list).
            ((0..2_000).map(|i| 1 + i % 100).collect(), 10_007),
            // Weights too far apart to count: grouped by sorting.
            (
                (0..500)
                    .map(|i| if i % 50 == 0 { 5_000 } else { 1 + i % 3 })
                    .collect(),
                10_007,
            ),
            // More instances than entries.
            (vec![1, 2, 3, 4, 5, 6, 7, 8], 5),
            (vec![3], 2),
        ];
        for (weights, size) in cases {
            let eps = endpoints(&weights);
            let expected = reference(&eps, size);
            let perms = permutations(&eps, size);
            assert_eq!(
                populate::<u32>(&perms, size),
                expected,
                "{} instances, size {size}",
                weights.len()
            );
            let narrow: Vec<u32> = populate::<u16>(&perms, size)
                .into_iter()
                .map(u32::from)
                .collect();
            assert_eq!(narrow, expected, "two-byte entries, size {size}");
        }
    }

    /// The last build's permutations are reused only for the very endpoints they were made
    /// for: after adds, removes, a changed weight (a new endpoint under the same id) and a
    /// set passed out of id order, they are what hashing every endpoint afresh gives.
    #[test]
    fn an_update_keeps_only_the_permutations_of_the_same_endpoints() {
        let size = 10_007;
        let all = endpoints(&(1..=10).cycle().take(300).collect::<Vec<_>>());
        let mut last = Last::default();
        let check = |last: &Last, set: &[Endpoint]| {
            assert_eq!(last.permutations, permutations(set, size));
            assert_eq!(last.endpoints.len(), set.len());
            assert!(last
                .endpoints
                .iter()
                .zip(set)
                .all(|(a, b)| Endpoint::ptr_eq(a, b)));
        };
        let mut set: Vec<Endpoint> = all[..200].to_vec();
        last.update(&set, size);
        check(&last, &set);
        // Removes (first, middle, last) and adds (between and after).
        set.remove(0);
        set.remove(100);
        set.pop();
        set.insert(50, all[250].clone());
        set.extend(all[280..290].iter().cloned());
        set.sort_by(|a, b| a.id().cmp(b.id()));
        last.update(&set, size);
        check(&last, &set);
        // The same id with another weight is another endpoint.
        let changed = waypost_core::ServiceInstance::builder("s", set[7].id().as_str())
            .host("10.0.0.1")
            .port(80)
            .weight(set[7].weight() % 10 + 1)
            .build()
            .unwrap();
        set[7] = Endpoint::fresh(changed);
        last.update(&set, size);
        check(&last, &set);
        // Out of id order.
        set.reverse();
        last.update(&set, size);
        check(&last, &set);
        // Another table size: every permutation is different.
        last.update(&set, 65_537);
        assert_eq!(last.permutations, permutations(&set, 65_537));
        last.update(&[], size);
        check(&last, &[]);
    }

    /// A balancer with failover tiers builds each tier's picker with the same strategy, one
    /// tier at a time: each build must find the kept set of its own tier, not the last one
    /// built, or every update would hash the whole tier again.
    #[test]
    fn each_tier_finds_its_own_kept_build() {
        let size = 10_007;
        let all = endpoints(&(1..=10).cycle().take(90).collect::<Vec<_>>());
        // Two disjoint sets, each in id order, as a balancer's tiers are.
        let mut dc1: Vec<Endpoint> = all.iter().step_by(3).cloned().collect();
        let mut dc2: Vec<Endpoint> = all.iter().skip(1).step_by(3).cloned().collect();
        let maglev = Maglev::new().table_size(size);
        maglev.build(&dc1);
        maglev.build(&dc2);
        dc1.remove(5);
        assert_eq!(
            closest(&maglev.last.lock().unwrap(), &dc1, size),
            Some(1),
            "dc1's build is the older one kept"
        );
        maglev.build(&dc1);
        dc2.pop();
        assert_eq!(closest(&maglev.last.lock().unwrap(), &dc2, size), Some(1));
        maglev.build(&dc2);
        let kept = maglev.last.lock().unwrap();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].permutations, permutations(&dc2, size));
        assert_eq!(kept[1].permutations, permutations(&dc1, size));
        // A set that shares nothing with either starts afresh; another table size too.
        assert_eq!(closest(&kept, &endpoints(&[1, 2]), size), None);
        assert_eq!(closest(&kept, &dc1, 65_537), None);
        drop(kept);
        for _ in 0..kept::KEPT + 2 {
            maglev.build(&endpoints(&[1, 2, 3]));
        }
        assert_eq!(maglev.last.lock().unwrap().len(), kept::KEPT);
    }
}
