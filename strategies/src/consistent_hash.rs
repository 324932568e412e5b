//! Ring hash (Ketama): requests with equal keys go to the same instance, and a change of the
//! instance set moves only the keys it must.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use waypost_core::{Endpoint, InstanceId, PickContext, Picker, Strategy};

use crate::Rng;

/// Ring hash in the Ketama style: each instance owns points on a 64-bit ring, as many as
/// `points_per_weight × weight`; a request goes to the owner of the first point at or after its
/// key's hash ([`PickContext::with_key`]).
///
/// - **Stable:** a point is (the top 32 bits of) the XXH3 hash of `"<instance id>-<n>"`, so
///   every process computes the same ring for the same set, and equal keys pick the same
///   instance everywhere.
/// - **Minimal disruption:** removing one of N instances moves only the keys it owned (about
///   1/N of them); adding one takes about 1/(N+1), from all the others.
/// - **Weighted:** an instance's share of keys is proportional to its weight (up to the spread
///   of its points: about ±1/√points).
/// - **Bounded:** the ring holds at most [`max_points`](Self::max_points) points (default 2²⁰,
///   8 MiB). A larger set gets fewer points per unit of weight (an integer, so that unchanged
///   instances keep their points across updates until the total weight crosses a step); the
///   balance gets coarser then. Past one point per unit of weight, every instance keeps at
///   least one point, and an update may move a few keys more than the minimum.
/// - **Cost:** a pick is a bucket lookup plus a binary search within one small bucket of the
///   sorted ring (usually one cache line): O(log n) at worst, no lock, no allocation. A build
///   reuses the last ring's points for unchanged instances and hashes and sorts only the new
///   ones' points: O(P) for P points (one pass), O(P log P) for the first build.
/// - **No key:** a request without a key gets a random point, so keyless traffic spreads in
///   proportion to weight, like a weighted random pick. That is a choice, not an error.
/// - **Retries:** a retry ([`Balancer::pick_excluding`](waypost_core::Balancer::pick_excluding))
///   walks on along the ring to the next point of an instance not tried yet: exactly where the
///   key would go if the tried instances left the set, and the same on every client.
///
/// ```
/// use waypost_core::{Balancer, PickContext, ServiceInstance, WatchEvent};
/// use waypost_strategies::ConsistentHash;
///
/// let balancer = Balancer::new(ConsistentHash::new());
/// let instances = (0..5)
///     .map(|i| ServiceInstance::builder("users", format!("u{i}")).host("10.0.0.1").port(8000 + i).build())
///     .collect::<Result<Vec<_>, _>>()?;
/// balancer.apply(WatchEvent::Snapshot(instances));
///
/// let ctx = PickContext::new().with_key(b"user-42");
/// let first = balancer.pick_with(&ctx)?.instance().id().clone();
/// for _ in 0..10 {
///     assert_eq!(balancer.pick_with(&ctx)?.instance().id(), &first);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ConsistentHash {
    points_per_weight: u32,
    max_points: usize,
    rng: Arc<Rng>,
    /// The last ring built, so that the next build reuses the points of unchanged instances
    /// instead of hashing and sorting everything again. Only builds take this lock.
    last: Mutex<Option<Built>>,
}

/// What the next build needs from the last one.
struct Built {
    ids: Vec<InstanceId>,
    /// Whether `ids` is strictly ascending (as balancers pass endpoints).
    sorted: bool,
    counts: Vec<u64>,
    points: Arc<Vec<u64>>,
}

impl Clone for ConsistentHash {
    /// The same settings and randomness; the clone keeps its own last ring.
    fn clone(&self) -> Self {
        ConsistentHash {
            points_per_weight: self.points_per_weight,
            max_points: self.max_points,
            rng: Arc::clone(&self.rng),
            last: Mutex::new(None),
        }
    }
}

impl fmt::Debug for ConsistentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsistentHash")
            .field("points_per_weight", &self.points_per_weight)
            .field("max_points", &self.max_points)
            .field("rng", &self.rng)
            .finish_non_exhaustive()
    }
}

impl Default for ConsistentHash {
    fn default() -> Self {
        Self::new()
    }
}

impl ConsistentHash {
    /// Points per unit of weight unless set: Ketama's 160 keeps an instance's share within a few
    /// percent of its weight's.
    pub const DEFAULT_POINTS_PER_WEIGHT: u32 = 160;
    /// Ring size limit unless set: 2²⁰ points, 8 MiB.
    pub const DEFAULT_MAX_POINTS: usize = 1 << 20;

    /// 160 points per unit of weight, at most 2²⁰ points, thread-local randomness for keyless
    /// picks.
    pub fn new() -> Self {
        ConsistentHash {
            points_per_weight: Self::DEFAULT_POINTS_PER_WEIGHT,
            max_points: Self::DEFAULT_MAX_POINTS,
            rng: Arc::new(Rng::new()),
            last: Mutex::new(None),
        }
    }

    /// Points per unit of weight (at least 1). More points: a finer balance and a bigger ring.
    ///
    /// ```
    /// use waypost_core::{Endpoint, PickContext, ServiceInstance, Strategy};
    /// use waypost_strategies::ConsistentHash;
    ///
    /// let eps: Vec<Endpoint> = ["u0", "u1"]
    ///     .iter()
    ///     .map(|id| Endpoint::fresh(ServiceInstance::builder("users", *id).host("h").port(80).build().unwrap()))
    ///     .collect();
    /// // The first instance's share of 10,000 keys, with `points` per unit of weight.
    /// let share = |points: u32| {
    ///     let ring = ConsistentHash::new().points_per_weight(points).build(&eps);
    ///     (0..10_000u64)
    ///         .filter(|k| ring.pick(&eps, &PickContext::new().with_key(&k.to_le_bytes())) == Some(0))
    ///         .count()
    /// };
    /// assert!((4_800..5_200).contains(&share(1_000)));
    /// assert!(!(4_800..5_200).contains(&share(1))); // one point each: a coarse split
    /// ```
    pub fn points_per_weight(mut self, points: u32) -> Self {
        self.points_per_weight = points.max(1);
        self
    }

    /// The most points the ring holds (at least 1; each point costs 8 bytes). Sets whose
    /// `points_per_weight × total weight` exceeds it are scaled down, every instance keeping
    /// at least one point.
    ///
    /// ```
    /// use std::collections::BTreeSet;
    /// use waypost_core::{Endpoint, PickContext, ServiceInstance, Strategy};
    /// use waypost_strategies::ConsistentHash;
    ///
    /// let eps: Vec<Endpoint> = (0..100)
    ///     .map(|i| Endpoint::fresh(ServiceInstance::builder("users", format!("u{i}")).host("h").port(80).build().unwrap()))
    ///     .collect();
    /// // 16 points cannot give 100 instances 160 each: each gets one, and still some keys.
    /// let ring = ConsistentHash::new().max_points(16).build(&eps);
    /// let owners: BTreeSet<usize> = (0..100_000u64)
    ///     .filter_map(|k| ring.pick(&eps, &PickContext::new().with_key(&k.to_le_bytes())))
    ///     .collect();
    /// assert_eq!(owners.len(), 100);
    /// ```
    pub fn max_points(mut self, points: usize) -> Self {
        self.max_points = points.max(1);
        self
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
    /// use waypost_strategies::ConsistentHash;
    ///
    /// let eps: Vec<Endpoint> = (0..5)
    ///     .map(|i| Endpoint::fresh(ServiceInstance::builder("users", format!("u{i}")).host("h").port(80).build().unwrap()))
    ///     .collect();
    /// // Keyless picks: the same sequence from equal seeds.
    /// let keyless = |seed: u64| {
    ///     let ring = ConsistentHash::seeded(seed).build(&eps);
    ///     (0..20).map(|_| ring.pick(&eps, &PickContext::new()).unwrap()).collect::<Vec<_>>()
    /// };
    /// assert_eq!(keyless(7), keyless(7));
    /// assert_ne!(keyless(7), keyless(8));
    /// ```
    pub fn seeded(seed: u64) -> Self {
        Self::with_rng(Rng::seeded(seed))
    }

    /// How many points each endpoint gets, in slice order: `weight × per_weight` with one
    /// integer `per_weight` for the whole set, so that the counts of unchanged instances stay
    /// the same across updates (unless the total weight crosses a step of
    /// `max_points / total weight`), and with them their points.
    fn counts(&self, endpoints: &[Endpoint]) -> Vec<u64> {
        let total_weight: u64 = endpoints.iter().map(|e| u64::from(e.weight())).sum();
        let max = self.max_points as u64;
        let per_weight = u64::from(self.points_per_weight).min(max / total_weight.max(1));
        if per_weight >= 1 {
            return endpoints
                .iter()
                .map(|e| u64::from(e.weight()) * per_weight)
                .collect();
        }
        // Not even one point per unit of weight fits: scale down, one point at least each
        // (u128: weight × max can exceed 64 bits). Every update then reshapes the whole ring.
        endpoints
            .iter()
            .map(|e| {
                let w = u128::from(e.weight());
                ((w * u128::from(max) / u128::from(total_weight)) as u64).max(1)
            })
            .collect()
    }

    /// The ring for `endpoints`, its points sorted by hash then owner, reusing `last`'s points of
    /// every instance that kept its id and point count: one pass over the P points (which also
    /// fills the bucket index), plus hashing and sorting only the changed instances' points.
    fn ring(
        &self,
        endpoints: &[Endpoint],
        sorted: bool,
        counts: &[u64],
        last: Option<&Built>,
    ) -> Ring {
        let (remap, kept) = carry_over(endpoints, sorted, counts, last);
        let mut fresh = Vec::new();
        let mut name = Vec::new();
        for (i, ep) in endpoints.iter().enumerate().filter(|&(i, _)| !kept[i]) {
            for replica in 0..counts[i] {
                name.clear();
                name.extend_from_slice(ep.id().as_str().as_bytes());
                name.push(b'-');
                push_decimal(&mut name, replica);
                let hash = xxhash_rust::xxh3::xxh3_64(&name) >> 32;
                fresh.push(hash << 32 | i as u64);
            }
        }
        fresh.sort_unstable();

        let mut ring = RingBuilder::new(counts.iter().sum::<u64>() as usize);
        let carried = last.map_or(&[][..], |l| &l.points[..]);
        // The loop runs once per point (a million at 10,000 instances): keep it to a lookup, a
        // compare against the next fresh point (rarely true) and the push.
        let mut fresh = fresh.into_iter().peekable();
        let mut next_fresh = fresh.peek().copied().unwrap_or(u64::MAX);
        for &p in carried {
            let owner = remap.get(p as u32 as usize).copied().unwrap_or(u32::MAX);
            if owner == u32::MAX {
                continue;
            }
            let p = p & !0xffff_ffff | u64::from(owner);
            if next_fresh <= p {
                while let Some(f) = fresh.next_if(|&f| f <= p) {
                    ring.push(f);
                }
                next_fresh = fresh.peek().copied().unwrap_or(u64::MAX);
            }
            ring.push(p);
        }
        fresh.for_each(|f| ring.push(f));
        ring.finish(Arc::clone(&self.rng))
    }
}

/// For each of `last`'s instances, its index in `endpoints` if its points carry over (same id,
/// same point count), else `u32::MAX`; and for each endpoint, whether its points carry over.
/// Balancers pass endpoints sorted by id, so this is usually a merge of two sorted lists; a
/// hash map handles any other order.
fn carry_over(
    endpoints: &[Endpoint],
    sorted: bool,
    counts: &[u64],
    last: Option<&Built>,
) -> (Vec<u32>, Vec<bool>) {
    let mut kept = vec![false; endpoints.len()];
    let Some(last) = last else {
        return (Vec::new(), kept);
    };
    let mut remap = vec![u32::MAX; last.ids.len()];
    let mut carry = |old: usize, new: usize| {
        if counts[new] == last.counts[old] {
            kept[new] = true;
            remap[old] = new as u32;
        }
    };
    if sorted && last.sorted {
        let (mut old, mut new) = (0, 0);
        while old < last.ids.len() && new < endpoints.len() {
            match last.ids[old].as_str().cmp(endpoints[new].id().as_str()) {
                std::cmp::Ordering::Less => old += 1,
                std::cmp::Ordering::Greater => new += 1,
                std::cmp::Ordering::Equal => {
                    carry(old, new);
                    old += 1;
                    new += 1;
                }
            }
        }
    } else {
        let index: HashMap<&str, usize> = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id().as_str(), i))
            .collect();
        for (old, id) in last.ids.iter().enumerate() {
            if let Some(&new) = index.get(id.as_str()) {
                carry(old, new);
            }
        }
    }
    (remap, kept)
}

/// `n` in decimal, as `format!` would write it, without formatting machinery (a build hashes up
/// to a million names).
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

impl Strategy for ConsistentHash {
    fn name(&self) -> &str {
        "consistent-hash"
    }

    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        let counts = self.counts(endpoints);
        // A poisoned lock only means a build panicked; the cache is then simply not reused.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let sorted = endpoints
            .windows(2)
            .all(|w| w[0].id().as_str() < w[1].id().as_str());
        let ring = self.ring(endpoints, sorted, &counts, last.as_ref());
        *last = Some(Built {
            ids: endpoints.iter().map(|e| e.id().clone()).collect(),
            sorted,
            counts,
            points: Arc::clone(&ring.points),
        });
        Box::new(ring)
    }
}

/// The sorted ring as one array of packed points, `(hash << 32) | owner`, indexed by the top
/// bits of the hash so that a search reads one small bucket: typically one cache line, which
/// also holds the owners. Points are 32-bit, as in Ketama: at the default 2²⁰ points about a
/// hundred coincide. Coinciding points are all kept, sorted by owner, so the search finds the
/// lowest owner (the lowest id, in the balancer's sorted slices) whatever the update history,
/// and removing that owner hands the point to the next.
struct Ring {
    /// Shared with the strategy's cache of the last build.
    points: Arc<Vec<u64>>,
    /// `buckets[b]` = the first ring position whose hash has top bits ≥ `b`; one extra entry at
    /// the end holds the ring's length.
    buckets: Vec<u32>,
    shift: u32,
    rng: Arc<Rng>,
}

/// Collects a ring's sorted points and fills the bucket index on the way, so that a build
/// passes over the points only once.
struct RingBuilder {
    points: Vec<u64>,
    buckets: Vec<u32>,
    shift: u32,
}

impl RingBuilder {
    fn new(len: usize) -> RingBuilder {
        // About eight points (one cache line) per bucket, at most 2^17 buckets (512 KiB).
        let bits = (usize::BITS - len.leading_zeros())
            .saturating_sub(3)
            .clamp(1, 17);
        RingBuilder {
            points: Vec::with_capacity(len),
            buckets: Vec::with_capacity((1 << bits) + 1),
            shift: 32 - bits,
        }
    }

    /// Appends `point`, which must not sort before the last one.
    #[inline]
    fn push(&mut self, point: u64) {
        // Every bucket up to this point's that has no start yet starts here.
        let bucket = ((point >> 32) >> self.shift) as usize;
        while self.buckets.len() <= bucket {
            self.buckets.push(self.points.len() as u32);
        }
        self.points.push(point);
    }

    fn finish(mut self, rng: Arc<Rng>) -> Ring {
        // Buckets past the last point, and the closing entry, start at the end.
        let end = self.points.len() as u32;
        self.buckets.resize((1 << (32 - self.shift)) + 1, end);
        Ring {
            points: Arc::new(self.points),
            buckets: self.buckets,
            shift: self.shift,
            rng,
        }
    }
}

impl Ring {
    /// The ring position of the first point at or after `hash` (wrapping around to 0).
    #[inline]
    fn position_of(&self, hash: u64) -> Option<usize> {
        let hash = hash >> 32;
        let b = (hash >> self.shift) as usize;
        let lo = *self.buckets.get(b)? as usize;
        let hi = *self.buckets.get(b + 1)? as usize;
        let pos = lo
            + self
                .points
                .get(lo..hi)?
                .partition_point(|&p| p >> 32 < hash);
        // Past the last point: the ring wraps around to the first.
        Some(if pos < self.points.len() { pos } else { 0 })
    }

    #[inline]
    fn owner_at(&self, pos: usize) -> usize {
        self.points[pos] as u32 as usize
    }
}

impl Picker for Ring {
    fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        if endpoints.is_empty() || self.points.is_empty() {
            return None;
        }
        let hash = ctx.hash().unwrap_or_else(|| self.rng.u64());
        self.position_of(hash).map(|pos| self.owner_at(pos))
    }

    /// Walks the ring from the key's point to the first point whose owner is not excluded:
    /// where the key would go if the excluded instances left the set, and the same on every
    /// client. Usually a few points; the whole ring only when the instances left own almost
    /// none of it.
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        if endpoints.is_empty() || self.points.is_empty() {
            return None;
        }
        let hash = ctx.hash().unwrap_or_else(|| self.rng.u64());
        let start = self.position_of(hash)?;
        let len = self.points.len();
        let mut previous = usize::MAX;
        (start..len).chain(0..start).find_map(|pos| {
            let owner = self.owner_at(pos);
            // Runs of one owner's points are common (a heavy instance): ask once per run.
            if owner == previous {
                return None;
            }
            previous = owner;
            (!excluded(owner)).then_some(owner)
        })
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("points", &self.points.len())
            .field("buckets", &(self.buckets.len() - 1))
            .finish()
    }
}
