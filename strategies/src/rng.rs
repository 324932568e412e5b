//! Where pickers get their spread from: random numbers ([`Rng`]), weighted draws (`Alias`) and
//! per-thread positions (`Cursor`).
//!
//! All three are lock-free and shareable between threads, and none puts a cache line that every
//! thread writes on the pick path: the default [`Rng`] is thread-local, and a `Cursor` keeps one
//! position per thread stripe.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A random number source for pickers: lock-free, `Send + Sync`, and cheap on the pick path.
///
/// [`Rng::new`] (the default) draws from the calling thread's own generator (`fastrand`'s
/// thread-local wyrand), so threads picking at once share nothing. [`Rng::seeded`] is
/// deterministic (SplitMix64 over one atomic counter) for tests and simulations: the same seed
/// gives the same sequence on one thread. Its counter is shared by the threads that use it, so
/// it is meant for tests, not for hot multi-threaded paths.
///
/// ```
/// use waypost_strategies::Rng;
///
/// let a = Rng::seeded(7);
/// let b = Rng::seeded(7);
/// let xs: Vec<usize> = (0..5).map(|_| a.below(10)).collect();
/// let ys: Vec<usize> = (0..5).map(|_| b.below(10)).collect();
/// assert_eq!(xs, ys);
/// assert!(xs.iter().all(|&x| x < 10));
///
/// let f = Rng::new().f64();
/// assert!((0.0..1.0).contains(&f));
/// ```
pub struct Rng(Source);

enum Source {
    Thread,
    Seeded(AtomicU64),
}

/// SplitMix64's increment (2^64 / φ, odd).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    /// The calling thread's generator, seeded from the OS-provided entropy `fastrand` uses.
    pub const fn new() -> Self {
        Rng(Source::Thread)
    }

    /// A deterministic generator: equal seeds give equal sequences (on one thread).
    pub const fn seeded(seed: u64) -> Self {
        Rng(Source::Seeded(AtomicU64::new(seed)))
    }

    /// A uniformly distributed `u64`.
    #[inline]
    pub fn u64(&self) -> u64 {
        match &self.0 {
            Source::Thread => fastrand::u64(..),
            Source::Seeded(state) => {
                // SplitMix64: a Weyl sequence (one fetch_add, so concurrent callers never get
                // the same value) through a bijective mixer.
                let mut z = state
                    .fetch_add(GAMMA, Ordering::Relaxed)
                    .wrapping_add(GAMMA);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            }
        }
    }

    /// A number in `0..n`, or 0 when `n` is 0 (so that a caller's empty case cannot panic).
    ///
    /// Lemire's multiply-shift: one multiplication, no division. The bias is below `n / 2^64`,
    /// far under anything a load balancer can observe.
    #[inline]
    pub fn below(&self, n: usize) -> usize {
        self.below_u64(n as u64) as usize
    }

    /// As [`below`](Self::below), for `u64` ranges (weight sums).
    #[inline]
    pub fn below_u64(&self, n: u64) -> u64 {
        ((u128::from(self.u64()) * u128::from(n)) >> 64) as u64
    }

    /// A float in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn f64(&self) -> f64 {
        (self.u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for Rng {
    /// A thread-local source stays thread-local; a seeded one is copied with its current state,
    /// so the clone repeats the original's upcoming sequence.
    fn clone(&self) -> Self {
        match &self.0 {
            Source::Thread => Rng::new(),
            Source::Seeded(state) => Rng::seeded(state.load(Ordering::Relaxed)),
        }
    }
}

impl fmt::Debug for Rng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Source::Thread => f.write_str("Rng(thread-local)"),
            Source::Seeded(_) => f.write_str("Rng(seeded)"),
        }
    }
}

/// A weighted draw in O(1): Vose's alias table, built in integers.
///
/// Weights are scaled by `n`, so that every column holds exactly `total` units, split between
/// the column's own instance (`keep` units) and one `alias`; the split is computed exactly in
/// integers, then stored as a threshold on a 64-bit draw. A draw is one random `u64`: its
/// product with `n` gives the column in the high half and, in the low half, a second uniform
/// number for the split (Lemire's trick used twice). The probability of instance `i` is
/// `w_i / total` to within `n / 2^64`: exact for any load balancer's purposes.
#[cfg(any(feature = "weighted-random", feature = "p2c", feature = "p2c-ewma"))]
#[derive(Debug)]
pub(crate) struct Alias {
    /// Empty when every weight is equal: a plain uniform draw is then exact and cheaper.
    slots: Box<[Slot]>,
}

#[cfg(any(feature = "weighted-random", feature = "p2c", feature = "p2c-ewma"))]
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// `keep / total × 2^64`, saturated: a column is its own instance below this threshold.
    keep: u64,
    alias: u32,
}

#[cfg(any(feature = "weighted-random", feature = "p2c", feature = "p2c-ewma"))]
impl Alias {
    /// The table for `weights` (each ≥ 1; at most `u32::MAX` of them).
    pub(crate) fn new(weights: impl ExactSizeIterator<Item = u32> + Clone) -> Self {
        let split = Self::split(weights);
        let slots = split
            .map(|(total, columns)| {
                columns
                    .into_iter()
                    .map(|(keep, alias)| Slot {
                        keep: ((u128::from(keep) << 64) / u128::from(total))
                            .min(u128::from(u64::MAX)) as u64,
                        alias,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Alias { slots }
    }

    /// Vose's construction in integers: `(total, [(units kept, alias)])`, or `None` when all
    /// weights are equal. Column `i` holds `total` units: `kept` of instance `i`, the rest of
    /// `alias`; instance `i`'s units over all columns sum to exactly `w_i × n`.
    fn split(
        weights: impl ExactSizeIterator<Item = u32> + Clone,
    ) -> Option<(u64, Vec<(u64, u32)>)> {
        let n = weights.len() as u64;
        let total: u64 = weights.clone().map(u64::from).sum();
        let first = weights.clone().next();
        if weights.clone().all(|w| Some(w) == first) {
            return None;
        }
        let mut left: Vec<u64> = weights.map(|w| u64::from(w) * n).collect();
        // A full column keeps all of itself (and its alias is itself, should the draw land
        // on the saturated threshold).
        let mut columns: Vec<(u64, u32)> = (0..left.len() as u32).map(|i| (total, i)).collect();
        let (mut small, mut large): (Vec<u32>, Vec<u32>) =
            (0..left.len() as u32).partition(|&i| left[i as usize] < total);
        while let (Some(s), Some(l)) = (small.pop(), large.last().copied()) {
            columns[s as usize] = (left[s as usize], l);
            // The large one fills the rest of the small one's column.
            left[l as usize] -= total - left[s as usize];
            if left[l as usize] < total {
                large.pop();
                small.push(l);
            }
        }
        // Integers leave no residue: whatever remains holds exactly `total` (a full column).
        Some((total, columns))
    }

    /// An index in `0..n` drawn in proportion to weight (`n` = the number of weights given).
    #[inline]
    pub(crate) fn draw(&self, rng: &Rng, n: usize) -> usize {
        let wide = u128::from(rng.u64()) * n as u128;
        let col = (wide >> 64) as usize;
        match self.slots.get(col) {
            None => col,
            Some(slot) if (wide as u64) < slot.keep => col,
            Some(slot) => slot.alias as usize,
        }
    }

    /// Two distinct indices, each drawn in proportion to weight as far as distinctness allows:
    /// the second is redrawn once if it equals the first, then taken uniformly among the others
    /// (so that a dominant instance cannot make this loop). Needs `n >= 2`.
    #[cfg(any(feature = "p2c", feature = "p2c-ewma"))]
    #[inline]
    pub(crate) fn draw_two(&self, rng: &Rng, n: usize) -> (usize, usize) {
        let a = self.draw(rng, n);
        let mut b = self.draw(rng, n);
        if b == a {
            b = self.draw(rng, n);
        }
        if b == a {
            let j = rng.below(n - 1);
            b = if j >= a { j + 1 } else { j };
        }
        (a, b)
    }
}

/// How many draws a retry makes before it counts what is left: with half of the instances
/// excluded, all eight miss with probability 1/256.
#[cfg(any(
    feature = "random",
    feature = "weighted-random",
    feature = "p2c",
    feature = "p2c-ewma"
))]
pub(crate) const RETRY_DRAWS: u32 = 8;

/// An index in `0..n` that `skip` leaves, chosen in proportion to `weight` among those: the
/// one whose run of weight holds `pick(total)` (`total` = the weights left, `pick` returns a
/// number below it). Two passes over the indices: for the retries that draws could not place,
/// never on the pick path. `None` when nothing is left.
#[cfg(any(
    feature = "random",
    feature = "weighted-random",
    feature = "weighted-round-robin",
    feature = "p2c",
    feature = "p2c-ewma"
))]
pub(crate) fn by_weight(
    n: usize,
    weight: impl Fn(usize) -> u64,
    skip: impl Fn(usize) -> bool,
    pick: impl FnOnce(u64) -> u64,
) -> Option<usize> {
    let total: u64 = (0..n).filter(|&i| !skip(i)).map(&weight).sum();
    if total == 0 {
        return None;
    }
    let mut x = pick(total).min(total - 1);
    let mut last = None;
    for i in (0..n).filter(|&i| !skip(i)) {
        let w = weight(i);
        if x < w {
            return Some(i);
        }
        x -= w;
        last = Some(i);
    }
    // Only if `skip` changed its mind between the passes.
    last
}

/// A second, third... hash for a key whose first choice is unusable: deterministic, so that the
/// key keeps going to the same substitute on every client (SplitMix64's finalizer).
#[cfg(any(feature = "maglev", feature = "resilience"))]
pub(crate) fn rehash(hash: u64, attempt: u32) -> u64 {
    let mut z = hash.wrapping_add(u64::from(attempt).wrapping_mul(GAMMA));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Stripes of a [`Cursor`]: enough that the worker threads of a typical runtime each get their
/// own; more threads share stripes (still correct, just contended).
#[cfg(any(feature = "round-robin", feature = "weighted-round-robin"))]
const STRIPES: usize = 16;

/// A position in a cycle, kept per thread stripe so that threads picking at once do not bounce
/// one cache line between cores.
///
/// Each thread advances its own stripe (thread `k` gets stripe `k mod 16`), so each thread's
/// picks follow the strategy's sequence exactly, and the union over threads is fair to within
/// one step per thread. Stripes start at random positions so that many clients started at the
/// same moment do not all begin with the same instance.
#[cfg(any(feature = "round-robin", feature = "weighted-round-robin"))]
pub(crate) struct Cursor {
    stripes: [Padded; STRIPES],
}

/// One stripe, on its own cache line (128 bytes: adjacent-line prefetch pairs 64-byte lines).
#[cfg(any(feature = "round-robin", feature = "weighted-round-robin"))]
#[repr(align(128))]
struct Padded(AtomicU64);

#[cfg(any(feature = "round-robin", feature = "weighted-round-robin"))]
impl Cursor {
    pub(crate) fn new() -> Self {
        Cursor {
            stripes: std::array::from_fn(|_| Padded(AtomicU64::new(fastrand::u64(..)))),
        }
    }

    /// Moves this thread's position `step` forward in a cycle of `len` (`0 < step <= len`) and
    /// returns the position it was at, in `0..len`.
    ///
    /// A position left over from a longer cycle (the set shrank) is first taken modulo `len`,
    /// so it is never out of range; the common path has no division.
    #[inline]
    pub(crate) fn advance(&self, step: u64, len: u64) -> u64 {
        let slot = &self.stripes[stripe()].0;
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let at = if cur < len { cur } else { cur % len };
            let mut next = at + step;
            if next >= len {
                next -= len;
            }
            // Uncontended unless threads share a stripe; a failed exchange retries with the
            // value another thread wrote, so no step is lost or taken twice.
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return at,
                Err(now) => cur = now,
            }
        }
    }

    /// The first of at most `limit` positions from this thread's current one (in steps of
    /// `step` in a cycle of `len`) that `take` accepts; the position moves to the step after
    /// it, in one exchange, so that the rotation goes on after what was taken. `None`, the
    /// position unchanged, if `take` accepts none of them.
    #[inline]
    pub(crate) fn advance_to(
        &self,
        step: u64,
        len: u64,
        limit: u64,
        take: impl Fn(u64) -> bool,
    ) -> Option<u64> {
        let slot = &self.stripes[stripe()].0;
        let next_of = |x: u64| {
            let next = x + step;
            if next >= len {
                next - len
            } else {
                next
            }
        };
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let mut at = if cur < len { cur } else { cur % len };
            let mut taken = None;
            for _ in 0..limit {
                if take(at) {
                    taken = Some(at);
                    break;
                }
                at = next_of(at);
            }
            let taken = taken?;
            match slot.compare_exchange_weak(
                cur,
                next_of(taken),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(taken),
                Err(now) => cur = now,
            }
        }
    }
}

#[cfg(any(feature = "round-robin", feature = "weighted-round-robin"))]
impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cursor")
            .field("stripes", &STRIPES)
            .finish_non_exhaustive()
    }
}

/// The calling thread's stripe, assigned in order of first use.
#[cfg(any(feature = "round-robin", feature = "weighted-round-robin"))]
#[inline]
fn stripe() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;

    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE
        .try_with(|s| {
            let v = s.get();
            if v < STRIPES {
                v
            } else {
                let v = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
                s.set(v);
                v
            }
        })
        // During thread teardown the thread-local is gone: share stripe 0.
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_is_deterministic_and_seeds_differ() {
        let a: Vec<u64> = {
            let r = Rng::seeded(1);
            (0..8).map(|_| r.u64()).collect()
        };
        let b: Vec<u64> = {
            let r = Rng::seeded(1);
            (0..8).map(|_| r.u64()).collect()
        };
        let c: Vec<u64> = {
            let r = Rng::seeded(2);
            (0..8).map(|_| r.u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn clone_of_seeded_repeats_the_sequence() {
        let r = Rng::seeded(9);
        r.u64();
        let c = r.clone();
        assert_eq!(r.u64(), c.u64());
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        for rng in [Rng::new(), Rng::seeded(3)] {
            assert_eq!(rng.below(0), 0);
            assert_eq!(rng.below(1), 0);
            let mut counts = [0u32; 7];
            for _ in 0..70_000 {
                counts[rng.below(7)] += 1;
            }
            for c in counts {
                assert!((9_000..11_000).contains(&c), "{counts:?}");
            }
            for _ in 0..1000 {
                let f = rng.f64();
                assert!((0.0..1.0).contains(&f));
            }
        }
    }

    #[cfg(any(feature = "weighted-random", feature = "p2c", feature = "p2c-ewma"))]
    #[test]
    fn alias_columns_hold_exactly_the_weights() {
        let weights = [1u32, 2, 3, 10, 1, 7];
        let (total, columns) = Alias::split(weights.iter().copied()).unwrap();
        let n = weights.len() as u64;
        // Each instance's units over all columns must be exactly w_i × n.
        let mut share = vec![0u64; weights.len()];
        for (i, &(keep, alias)) in columns.iter().enumerate() {
            share[i] += keep;
            share[alias as usize] += total - keep;
        }
        let want: Vec<u64> = weights.iter().map(|&w| u64::from(w) * n).collect();
        assert_eq!(share, want);
        assert!(Alias::split([4u32, 4, 4].into_iter()).is_none());
    }

    #[cfg(any(feature = "weighted-random", feature = "p2c", feature = "p2c-ewma"))]
    #[test]
    fn alias_draws_follow_the_weights() {
        let alias = Alias::new([1u32, 2, 3, 4].into_iter());
        let rng = Rng::seeded(8);
        let mut counts = [0u32; 4];
        for _ in 0..100_000 {
            counts[alias.draw(&rng, 4)] += 1;
        }
        for (c, w) in counts.iter().zip([1u32, 2, 3, 4]) {
            assert!(c.abs_diff(w * 10_000) < 600, "{counts:?}");
        }
    }

    #[cfg(any(feature = "p2c", feature = "p2c-ewma"))]
    #[test]
    fn draw_two_is_distinct_even_when_one_weight_dominates() {
        let alias = Alias::new([1_000_000u32, 1, 1].into_iter());
        let rng = Rng::seeded(5);
        for _ in 0..10_000 {
            let (a, b) = alias.draw_two(&rng, 3);
            assert_ne!(a, b);
            assert!(a < 3 && b < 3);
        }
    }

    #[cfg(any(feature = "round-robin", feature = "weighted-round-robin"))]
    #[test]
    fn cursor_cycles_and_survives_a_shorter_cycle() {
        let c = Cursor::new();
        let first = c.advance(1, 5);
        assert!(first < 5);
        let seq: Vec<u64> = (0..5).map(|_| c.advance(1, 5)).collect();
        let mut sorted = seq.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2, 3, 4]);
        for _ in 0..100 {
            assert!(c.advance(1, 2) < 2);
        }
        for _ in 0..100 {
            assert!(c.advance(3, 7) < 7);
        }
    }
}
