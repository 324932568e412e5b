//! Ring hash (Ketama): requests with equal keys go to the same instance, and a change of the
//! instance set moves only the keys it must.

use std::fmt;
use std::sync::{Arc, Mutex};

use waypost_core::{Endpoint, InstanceId, PickContext, Picker, Strategy};

use crate::kept;
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
///   sorted ring (usually one cache line): O(log n) at worst, no lock, no allocation. The ring
///   is kept in chunks of about 256 points by hash range, shared between successive rings: a
///   build that adds or removes a few instances hashes only their points and rewrites only the
///   chunks those fall in, plus O(n) bookkeeping; the first build, and one that changes more
///   than a quarter of the points, hashes and sorts all P points: O(P log P).
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
    /// The last rings built (those whose endpoints were sorted by id, as balancers pass them),
    /// the latest first, at most [`KEPT`](kept::KEPT), one per failover tier: so that the next
    /// build reuses the chunks of points it does not change instead of hashing and sorting
    /// everything again. Only builds take this lock.
    last: Mutex<Vec<Built>>,
}

impl Clone for ConsistentHash {
    /// The same settings and randomness; the clone keeps its own last ring.
    fn clone(&self) -> Self {
        ConsistentHash {
            points_per_weight: self.points_per_weight,
            max_points: self.max_points,
            rng: Arc::clone(&self.rng),
            last: Mutex::default(),
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
            last: Mutex::default(),
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

    /// The ring for `endpoints` from scratch: every point hashed and sorted. Slots are the
    /// endpoints' indices.
    fn scratch(
        &self,
        endpoints: &[Endpoint],
        counts: &[u64],
        sorted: bool,
    ) -> (Ring, Option<Built>) {
        let len = counts.iter().sum::<u64>() as usize;
        let geometry = Geometry::for_len(len);
        let mut points = Vec::with_capacity(len);
        let mut name = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            for_each_point(&mut name, ep.id(), counts[i], |hash| {
                points.push(hash << 32 | i as u64)
            });
        }
        points.sort_unstable();
        order_ties(&mut points, |slot| endpoints[slot].id().as_str());
        let mut chunks = Vec::with_capacity(1 << geometry.chunk_bits);
        let mut starts = vec![0; geometry.index_len()];
        let mut at = 0;
        for c in 0..1usize << geometry.chunk_bits {
            let end = at + points[at..].partition_point(|&p| geometry.chunk_of(p) <= c);
            geometry.index(c, &points[at..end], &mut starts);
            chunks.push(Arc::from(&points[at..end]));
            at = end;
        }
        let ring = Ring::new(
            chunks.clone(),
            starts.clone(),
            (0..endpoints.len() as u32).collect(),
            geometry,
            len,
            Arc::clone(&self.rng),
        );
        // Only a sorted set is matched against the next one (a merge of two sorted id lists);
        // an unsorted one (or one with a repeated id) is rebuilt from scratch next time.
        let built = sorted.then(|| Built {
            ids: endpoints.iter().map(|e| Some(e.id().clone())).collect(),
            counts: counts.to_vec(),
            free: Vec::new(),
            order: (0..endpoints.len() as u32).collect(),
            geometry,
            chunks,
            starts,
        });
        (ring, built)
    }

    /// The ring for `endpoints` (sorted by id) from `last`, updating `last` to match: only the
    /// chunks that hold points of instances that came, left or changed their point count are
    /// rewritten; the others are shared with the last ring. `None` (and `last` untouched) when a
    /// build from scratch is cheaper or the chunk layout no longer suits the ring's size.
    fn incremental(
        &self,
        endpoints: &[Endpoint],
        counts: &[u64],
        last: &mut Built,
    ) -> Option<Ring> {
        let len = counts.iter().sum::<u64>() as usize;
        let geometry = last.geometry;
        if !geometry.suits(len) {
            return None;
        }
        let mut slot_of = vec![u32::MAX; endpoints.len()];
        let mut removed = Vec::new();
        let mut added = Vec::new();
        let (mut old, mut new) = (0, 0);
        while old < last.order.len() || new < endpoints.len() {
            let slot = last.order.get(old).copied();
            let order = match (slot, endpoints.get(new)) {
                (Some(s), Some(e)) => last.id(s).cmp(e.id().as_str()),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match (order, slot) {
                (std::cmp::Ordering::Equal, Some(s)) => {
                    if last.counts[s as usize] == counts[new] {
                        slot_of[new] = s;
                    } else {
                        removed.push(s);
                        added.push(new);
                    }
                    old += 1;
                    new += 1;
                }
                (std::cmp::Ordering::Less, Some(s)) => {
                    removed.push(s);
                    old += 1;
                }
                _ => {
                    added.push(new);
                    new += 1;
                }
            }
        }
        let changed: u64 = removed
            .iter()
            .map(|&s| last.counts[s as usize])
            .sum::<u64>()
            + added.iter().map(|&i| counts[i]).sum::<u64>();
        if changed as usize * 4 > len.max(1) {
            return None;
        }

        let mut name = Vec::new();
        let mut touched = Vec::new();
        let mut gone = vec![false; last.ids.len()];
        for &s in &removed {
            gone[s as usize] = true;
            if let Some(id) = &last.ids[s as usize] {
                for_each_point(&mut name, id, last.counts[s as usize], |hash| {
                    touched.push(geometry.chunk_of(hash << 32))
                });
            }
        }
        for &s in &removed {
            last.ids[s as usize] = None;
            last.counts[s as usize] = 0;
            last.free.push(s);
        }
        let mut fresh = Vec::new();
        for &i in &added {
            let s = last.free.pop().unwrap_or_else(|| {
                last.ids.push(None);
                last.counts.push(0);
                (last.ids.len() - 1) as u32
            });
            last.ids[s as usize] = Some(endpoints[i].id().clone());
            last.counts[s as usize] = counts[i];
            slot_of[i] = s;
            for_each_point(&mut name, endpoints[i].id(), counts[i], |hash| {
                fresh.push(hash << 32 | u64::from(s))
            });
        }
        fresh.sort_unstable();
        order_ties(&mut fresh, |s| last.id(s as u32));
        touched.extend(fresh.iter().map(|&p| geometry.chunk_of(p)));
        touched.sort_unstable();
        touched.dedup();

        let mut merged = Vec::new();
        let mut at = 0;
        for &c in &touched {
            let end = at + fresh[at..].partition_point(|&p| geometry.chunk_of(p) <= c);
            let mut kept = last.chunks[c]
                .iter()
                .copied()
                .filter(|&p| !gone.get(p as u32 as usize).copied().unwrap_or(false))
                .peekable();
            let mut new = fresh[at..end].iter().copied().peekable();
            merged.clear();
            // A merge by (hash, id): coinciding points stay in id order.
            loop {
                let next = match (kept.peek(), new.peek()) {
                    (Some(&k), Some(&f)) => {
                        let k_first = (k >> 32, last.id(k as u32)) < (f >> 32, last.id(f as u32));
                        if k_first {
                            kept.next()
                        } else {
                            new.next()
                        }
                    }
                    (Some(_), None) => kept.next(),
                    (None, Some(_)) => new.next(),
                    (None, None) => break,
                };
                merged.extend(next);
            }
            geometry.index(c, &merged, &mut last.starts);
            last.chunks[c] = Arc::from(&merged[..]);
            at = end;
        }
        let mut slots = vec![u32::MAX; last.ids.len()];
        for (i, &s) in slot_of.iter().enumerate() {
            slots[s as usize] = i as u32;
        }
        last.order = slot_of;
        Some(Ring::new(
            last.chunks.clone(),
            last.starts.clone(),
            slots,
            geometry,
            len,
            Arc::clone(&self.rng),
        ))
    }
}

/// Calls `f` with the hash of each of the `count` points of instance `id`: the top 32 bits of
/// the XXH3 hash of `"<id>-<n>"`.
fn for_each_point(name: &mut Vec<u8>, id: &InstanceId, count: u64, mut f: impl FnMut(u64)) {
    for replica in 0..count {
        name.clear();
        name.extend_from_slice(id.as_str().as_bytes());
        name.push(b'-');
        push_decimal(name, replica);
        f(xxhash_rust::xxh3::xxh3_64(name) >> 32);
    }
}

/// Puts each run of coinciding points (sorted by hash) in the order of their owners' ids, then
/// slots: the lowest id owns a shared point whatever the slots or the update history.
fn order_ties<'a>(points: &mut [u64], id: impl Fn(usize) -> &'a str) {
    let mut start = 0;
    while start < points.len() {
        let hash = points[start] >> 32;
        // Runs are short (almost always one point): a walk, not a search of the whole rest.
        let end = start
            + points[start..]
                .iter()
                .take_while(|&&p| p >> 32 == hash)
                .count();
        if end - start > 1 {
            points[start..end].sort_unstable_by(|&a, &b| {
                (id(a as u32 as usize), a as u32).cmp(&(id(b as u32 as usize), b as u32))
            });
        }
        start = end;
    }
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
        // A build that panicked may have left the cache half-updated: start afresh.
        let mut kept = self.last.lock().unwrap_or_else(|poisoned| {
            let mut kept = poisoned.into_inner();
            kept.clear();
            kept
        });
        let sorted = endpoints
            .windows(2)
            .all(|w| w[0].id().as_str() < w[1].id().as_str());
        if sorted {
            // A kept ring holds a sampled endpoint when it has its id.
            let closest = kept::closest(&kept, endpoints.len(), |built: &Built, at| {
                let id = endpoints[at].id().as_str();
                built
                    .order
                    .binary_search_by(|&s| built.id(s).cmp(id))
                    .is_ok()
            });
            if let Some(i) = closest {
                let ring = self.incremental(endpoints, &counts, &mut kept[i]);
                // This set's ring: kept first if updated, else replaced by the one from scratch.
                let built = kept.remove(i);
                if let Some(ring) = ring {
                    kept::keep(&mut kept, built);
                    return Box::new(ring);
                }
            }
        }
        let (ring, built) = self.scratch(endpoints, &counts, sorted);
        if let Some(built) = built {
            kept::keep(&mut kept, built);
        }
        Box::new(ring)
    }
}

/// How a ring is cut: `2^chunk_bits` chunks by the top bits of the hash, each with an index of
/// `2^bucket_bits` buckets by the next bits, about 256 points per chunk and 8 per bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    chunk_bits: u32,
    bucket_bits: u32,
}

impl Geometry {
    fn for_len(len: usize) -> Geometry {
        let log = usize::BITS - 1 - len.max(1).leading_zeros();
        let chunk_bits = log.saturating_sub(8).min(12);
        let bucket_bits = log.saturating_sub(3 + chunk_bits).min(12);
        Geometry {
            chunk_bits,
            bucket_bits,
        }
    }

    /// Whether a ring of `len` points may keep this layout: until its size has halved or
    /// doubled past the layout's own (so that a set hovering at a power of two is not rebuilt
    /// from scratch on every update), buckets then hold 2 to 32 points.
    fn suits(self, len: usize) -> bool {
        [len / 2, len, len.saturating_mul(2)]
            .iter()
            .any(|&l| Geometry::for_len(l) == self)
    }

    /// The chunk of a packed point (or of a hash in the top 32 bits).
    #[inline]
    fn chunk_of(self, point: u64) -> usize {
        // A u64 shift: 32 - 0 bits is still in range.
        ((point >> 32) >> (32 - self.chunk_bits)) as usize
    }

    /// Entries of a ring's bucket index: `2^bucket_bits + 1` starts per chunk (the last one
    /// the chunk's length).
    #[inline]
    fn index_len(self) -> usize {
        (1usize << self.chunk_bits) * self.stride()
    }

    #[inline]
    fn stride(self) -> usize {
        (1usize << self.bucket_bits) + 1
    }

    /// Writes chunk `c`'s part of the bucket index for its `points` (sorted, all of chunk `c`).
    fn index(self, c: usize, points: &[u64], starts: &mut [u32]) {
        let buckets = 1usize << self.bucket_bits;
        let starts = &mut starts[c * self.stride()..][..self.stride()];
        let shift = 32 - self.chunk_bits - self.bucket_bits;
        let mut b = 0;
        for (i, &p) in points.iter().enumerate() {
            let pb = ((p >> 32) >> shift) as usize & (buckets - 1);
            while b <= pb {
                starts[b] = i as u32;
                b += 1;
            }
        }
        starts[b..].fill(points.len() as u32);
    }
}

/// The sorted ring as packed points, `(hash << 32) | slot`, cut by hash range into chunks that
/// successive rings share (see [`Geometry`]), with one bucket index over all chunks (copied for
/// each ring: 264 KiB at 10,000 instances) so that a pick reads the index, then one cache line of
/// points. A slot is an owner number that an instance keeps
/// across updates, so that a point need not change when other instances come or go; `slots`
/// maps it to the instance's index in this build's endpoints. Points are 32-bit, as in Ketama:
/// at the default 2²⁰ points about a hundred coincide. Coinciding points are all kept, in id
/// order, so the search finds the lowest id whatever the update history, and removing that
/// owner hands the point to the next.
struct Ring {
    chunks: Vec<Arc<[u64]>>,
    /// Per chunk, where each bucket starts in it (see [`Geometry::index`]).
    starts: Vec<u32>,
    slots: Vec<u32>,
    bucket_bits: u32,
    bucket_shift: u32,
    stride: usize,
    len: usize,
    rng: Arc<Rng>,
}

/// What the next build needs from the last one.
struct Built {
    /// Per slot: the instance's id, `None` for a free slot.
    ids: Vec<Option<InstanceId>>,
    /// Per slot: its point count (0 when free).
    counts: Vec<u64>,
    free: Vec<u32>,
    /// The slot of each endpoint of the last build, in its order (ascending ids).
    order: Vec<u32>,
    geometry: Geometry,
    chunks: Vec<Arc<[u64]>>,
    starts: Vec<u32>,
}

impl Built {
    fn id(&self, slot: u32) -> &str {
        self.ids[slot as usize]
            .as_ref()
            .map_or("", |id| id.as_str())
    }
}

impl Ring {
    fn new(
        chunks: Vec<Arc<[u64]>>,
        starts: Vec<u32>,
        slots: Vec<u32>,
        geometry: Geometry,
        len: usize,
        rng: Arc<Rng>,
    ) -> Ring {
        Ring {
            chunks,
            starts,
            slots,
            bucket_bits: geometry.bucket_bits,
            bucket_shift: 32 - geometry.chunk_bits - geometry.bucket_bits,
            stride: geometry.stride(),
            len,
            rng,
        }
    }

    /// The chunk and position within it of the first point at or after `hash` (wrapping
    /// around to the ring's first point).
    #[inline]
    fn position_of(&self, hash: u64) -> Option<(usize, usize)> {
        let h = hash >> 32;
        // The top chunk_bits + bucket_bits bits: the chunk, then the bucket within it. The
        // chunk's address and the bucket's start are independent loads.
        let top = (h >> self.bucket_shift) as usize;
        let c = top >> self.bucket_bits;
        let i = c * self.stride + (top & ((1 << self.bucket_bits) - 1));
        let points = self.chunks.get(c)?;
        let lo = *self.starts.get(i)? as usize;
        let hi = *self.starts.get(i + 1)? as usize;
        let pos = lo + points.get(lo..hi)?.partition_point(|&p| p >> 32 < h);
        if pos < points.len() {
            return Some((c, pos));
        }
        // Past the chunk's last point: the next chunk that has one (usually the next chunk).
        let n = self.chunks.len();
        (1..=n)
            .map(|d| (c + d) % n)
            .find(|&c| !self.chunks[c].is_empty())
            .map(|c| (c, 0))
    }

    #[inline]
    fn owner(&self, point: u64) -> Option<usize> {
        self.slots.get(point as u32 as usize).map(|&i| i as usize)
    }

    fn points(&self, c: usize) -> &[u64] {
        &self.chunks[c]
    }
}

impl Picker for Ring {
    fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        if endpoints.is_empty() || self.len == 0 {
            return None;
        }
        let hash = ctx.hash().unwrap_or_else(|| self.rng.u64());
        let (c, pos) = self.position_of(hash)?;
        self.owner(self.points(c)[pos])
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
        if endpoints.is_empty() || self.len == 0 {
            return None;
        }
        let hash = ctx.hash().unwrap_or_else(|| self.rng.u64());
        let (start, pos) = self.position_of(hash)?;
        let n = self.chunks.len();
        let (before, after) = self.points(start).split_at(pos);
        let mut previous = usize::MAX;
        after
            .iter()
            .chain((1..n).flat_map(|d| self.points((start + d) % n)))
            .chain(before)
            .find_map(|&point| {
                let owner = self.owner(point)?;
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
            .field("points", &self.len)
            .field("chunks", &self.chunks.len())
            .field("buckets_per_chunk", &(1usize << self.bucket_bits))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(ids: impl Iterator<Item = usize>) -> Vec<Endpoint> {
        ids.map(|i| {
            let instance = waypost_core::ServiceInstance::builder("s", format!("i{i:05}"))
                .host("10.0.0.1")
                .port(80)
                .build()
                .unwrap();
            Endpoint::fresh(instance)
        })
        .collect()
    }

    /// Coinciding points go in their owners' id order, then slot order; other points, and
    /// runs at either end, stay where the sort put them.
    #[test]
    fn coinciding_points_are_ordered_by_owner_id() {
        let ids = ["c", "a", "b", "a"]; // slot -> owner id
        let point = |hash: u64, slot: u64| hash << 32 | slot;
        let mut points = vec![
            point(1, 0),
            point(1, 2),
            point(1, 1),
            point(5, 3),
            point(7, 2),
            point(7, 0),
            point(7, 3),
            point(7, 1),
        ];
        order_ties(&mut points, |slot| ids[slot]);
        assert_eq!(
            points,
            [
                point(1, 1), // a
                point(1, 2), // b
                point(1, 0), // c
                point(5, 3),
                point(7, 1), // a, slot 1
                point(7, 3), // a, slot 3
                point(7, 2), // b
                point(7, 0), // c
            ]
        );
    }

    /// Each tier of a balancer finds its own kept ring, and updates it in place: two tiers
    /// built in turn keep two rings, the one just built first.
    #[test]
    fn each_tier_updates_its_own_kept_ring() {
        let strategy = ConsistentHash::new();
        let dc1 = endpoints((0..300).step_by(2));
        let mut dc2 = endpoints((1..300).step_by(2));
        let _ = strategy.build(&dc1);
        let _ = strategy.build(&dc2);
        dc2.remove(7);
        let _ = strategy.build(&dc2);
        let _ = strategy.build(&dc1[1..]);
        let kept = strategy.last.lock().unwrap();
        let sizes: Vec<usize> = kept.iter().map(|b| b.order.len()).collect();
        assert_eq!(sizes, [149, 149]);
        assert_eq!(kept[0].id(kept[0].order[0]), "i00002");
        assert_eq!(kept[1].id(kept[1].order[0]), "i00001");
    }
}
