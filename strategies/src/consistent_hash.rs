//! Ring hash (Ketama): requests with equal keys go to the same instance, and a change of the
//! instance set moves only the keys it must.

use std::fmt::{self, Write as _};
use std::sync::Arc;

use waypost_core::{Endpoint, PickContext, Picker, Strategy};

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
/// - **Bounded:** the ring holds at most [`max_points`](Self::max_points) points (default 2²⁰).
///   A larger set is scaled down, every instance keeping at least one point; the balance gets
///   coarser then, and, because the scale depends on the total weight, an update moves a few
///   keys more than the minimum.
/// - **Cost:** a pick is a bucket lookup plus a binary search within one small bucket of the
///   sorted ring (usually one cache line): O(log n) at worst, no lock, no allocation. A build
///   hashes and sorts every point: O(P log P) for P points, tens of milliseconds at the limit.
/// - **No key:** a request without a key gets a random point, so keyless traffic spreads in
///   proportion to weight, like a weighted random pick. That is a choice, not an error.
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
#[derive(Clone, Debug)]
pub struct ConsistentHash {
    points_per_weight: u32,
    max_points: usize,
    rng: Arc<Rng>,
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
        }
    }

    /// Points per unit of weight (at least 1). More points: a finer balance and a bigger ring.
    ///
    /// ```
    /// let s = waypost_strategies::ConsistentHash::new().points_per_weight(40);
    /// # let _ = s;
    /// ```
    pub fn points_per_weight(mut self, points: u32) -> Self {
        self.points_per_weight = points.max(1);
        self
    }

    /// The most points the ring holds (at least 1; each point costs 8 bytes). Sets whose
    /// `points_per_weight × total weight` exceeds it are scaled down.
    ///
    /// ```
    /// let s = waypost_strategies::ConsistentHash::new().max_points(1 << 16);
    /// # let _ = s;
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
    /// use waypost_strategies::ConsistentHash;
    /// let s = ConsistentHash::seeded(7);
    /// # let _ = s;
    /// ```
    pub fn seeded(seed: u64) -> Self {
        Self::with_rng(Rng::seeded(seed))
    }

    /// How many points each endpoint gets, in slice order.
    fn points(&self, endpoints: &[Endpoint]) -> Vec<u64> {
        let wanted: Vec<u64> = endpoints
            .iter()
            .map(|e| u64::from(e.weight()) * u64::from(self.points_per_weight))
            .collect();
        let total: u64 = wanted.iter().sum();
        let max = self.max_points as u64;
        if total <= max {
            return wanted;
        }
        // Scale down; u128 because points × max can exceed 64 bits.
        wanted
            .into_iter()
            .map(|p| ((u128::from(p) * u128::from(max) / u128::from(total)) as u64).max(1))
            .collect()
    }
}

impl Strategy for ConsistentHash {
    fn name(&self) -> &str {
        "consistent-hash"
    }

    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(Ring::new(
            endpoints,
            &self.points(endpoints),
            Arc::clone(&self.rng),
        ))
    }
}

/// The sorted ring as one array of packed points, `(hash << 32) | owner`, indexed by the top
/// bits of the hash so that a search reads one small bucket: typically one cache line, which
/// also holds the owners. Points are 32-bit, as in Ketama: at the default 2²⁰ points about a
/// hundred coincide, which only drops those duplicates.
struct Ring {
    points: Vec<u64>,
    /// `buckets[b]` = the first ring position whose hash has top bits ≥ `b`; one extra entry at
    /// the end holds the ring's length.
    buckets: Vec<u32>,
    shift: u32,
    rng: Arc<Rng>,
}

impl Ring {
    fn new(endpoints: &[Endpoint], counts: &[u64], rng: Arc<Rng>) -> Ring {
        let total: usize = counts.iter().map(|&p| p as usize).sum();
        let mut points: Vec<u64> = Vec::with_capacity(total);
        let mut name = String::new();
        for (i, (ep, &n)) in endpoints.iter().zip(counts).enumerate() {
            for replica in 0..n {
                name.clear();
                // Writing into a String cannot fail.
                let _ = write!(name, "{}-{}", ep.id(), replica);
                let hash = xxhash_rust::xxh3::xxh3_64(name.as_bytes()) >> 32;
                points.push(hash << 32 | i as u64);
            }
        }
        // Equal hashes go to the lower index (sorting the packed value sorts by hash, then
        // owner), which is the lower id for the balancer's sorted slices: the same winner
        // whatever else is in the set.
        points.sort_unstable();
        points.dedup_by_key(|p| *p >> 32);

        // About eight points (one cache line) per bucket, at most 2^17 buckets (512 KiB).
        let bits = (usize::BITS - points.len().leading_zeros())
            .saturating_sub(3)
            .clamp(1, 17);
        let shift = 32 - bits;
        let mut buckets = Vec::with_capacity((1 << bits) + 1);
        let mut pos = 0usize;
        for b in 0..(1u64 << bits) {
            while pos < points.len() && (points[pos] >> 32) >> shift < b {
                pos += 1;
            }
            buckets.push(pos as u32);
        }
        buckets.push(points.len() as u32);
        Ring {
            points,
            buckets,
            shift,
            rng,
        }
    }

    #[inline]
    fn owner_of(&self, hash: u64) -> Option<usize> {
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
        let point = match self.points.get(pos) {
            Some(&p) => p,
            None => *self.points.first()?,
        };
        Some(point as u32 as usize)
    }
}

impl Picker for Ring {
    fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        if endpoints.is_empty() || self.points.is_empty() {
            return None;
        }
        let hash = ctx.hash().unwrap_or_else(|| self.rng.u64());
        self.owner_of(hash)
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
