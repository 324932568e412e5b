//! The seed's Go balancing algorithms, ported to Rust as faithfully as possible, **for comparison
//! only**: they are the `seed/<strategy>/<n>` baseline of the `pick` bench, not code to use.
//!
//! What the seed did, and how each piece is carried over:
//!
//! | seed (Go) | port |
//! |---|---|
//! | `sync.Mutex` + `int` index, locked on every pick, over the `[]*Instance` slice | `Mutex<usize>` |
//! | `rand.Intn(len)` on `math/rand`'s global source, which takes a mutex on every call | `Mutex<fastrand::Rng>` |
//! | weighted round-robin: on **every** pick, append each instance `weight` times to a fresh slice, then index it with a mutexed counter | `Vec::new()` + `push` per pick (grows like Go's `append`), `Mutex<usize>` |
//! | least-connections: a `map[string]int` of in-flight counts by instance id behind a mutex; a pick scans the instances, looks each id up, takes the minimum and increments its count | `Mutex<HashMap<String, u64>>` |
//!
//! Two choices keep the baseline *conservative* (faster than a literal port would be), so that
//! the ratios in BENCHMARKS.md understate rather than overstate Waypost's gain:
//! - the weight is read from the instance's numeric weight, not parsed from a `weight:N` tag on
//!   every pick as the seed did;
//! - the least-connections map hashes ids with FNV-1a, closer in cost to Go's runtime map hash
//!   than Rust's default SipHash.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard};

use waypost_core::Endpoint;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The seed's four pickers, behind one interface for the bench.
pub trait SeedPicker: Send + Sync {
    /// The index of the picked instance, `None` for an empty slice.
    fn pick(&self, instances: &[Endpoint]) -> Option<usize>;
}

/// The seed's strategy names, spelled as Waypost's `by_name` spells the same strategies.
pub const NAMES: [&str; 4] = [
    "round-robin",
    "random",
    "weighted-round-robin",
    "least-connections",
];

/// The seed picker called `name` (one of [`NAMES`]).
pub fn by_name(name: &str) -> Option<Box<dyn SeedPicker>> {
    Some(match name {
        "round-robin" => Box::new(RoundRobin::default()),
        "random" => Box::new(Random::default()),
        "weighted-round-robin" => Box::new(WeightedRoundRobin::default()),
        "least-connections" => Box::new(LeastConnections::default()),
        _ => return None,
    })
}

/// `type RoundRobin struct { mu sync.Mutex; next int }`
#[derive(Default)]
pub struct RoundRobin {
    next: Mutex<usize>,
}

impl SeedPicker for RoundRobin {
    fn pick(&self, instances: &[Endpoint]) -> Option<usize> {
        let mut next = lock(&self.next);
        if instances.is_empty() {
            return None;
        }
        let i = *next % instances.len();
        *next = i + 1;
        Some(i)
    }
}

/// `rand.Intn(len(instances))` on the global `math/rand` source (a mutex-guarded generator).
pub struct Random {
    rng: Mutex<fastrand::Rng>,
}

impl Default for Random {
    fn default() -> Self {
        Random {
            rng: Mutex::new(fastrand::Rng::with_seed(1)),
        }
    }
}

impl SeedPicker for Random {
    fn pick(&self, instances: &[Endpoint]) -> Option<usize> {
        if instances.is_empty() {
            return None;
        }
        Some(lock(&self.rng).usize(..instances.len()))
    }
}

/// Builds `weighted := []*Instance{}` with each instance appended `weight` times, on every pick,
/// then `weighted[next % len(weighted)]` under a mutex.
#[derive(Default)]
pub struct WeightedRoundRobin {
    next: Mutex<usize>,
}

impl SeedPicker for WeightedRoundRobin {
    fn pick(&self, instances: &[Endpoint]) -> Option<usize> {
        // Go's `append` into a nil slice: no capacity reserved up front.
        let mut weighted: Vec<usize> = Vec::new();
        for (i, inst) in instances.iter().enumerate() {
            for _ in 0..inst.weight() {
                weighted.push(i);
            }
        }
        if weighted.is_empty() {
            return None;
        }
        let mut next = lock(&self.next);
        let picked = weighted[*next % weighted.len()];
        *next += 1;
        Some(picked)
    }
}

/// FNV-1a, standing in for Go's runtime map hash (see the module docs).
#[derive(Default)]
pub struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// `counts map[string]int` behind a mutex: a pick scans every instance for the lowest count and
/// increments the winner's (the seed's `Release` decremented it when the call ended; the bench,
/// like Waypost's `Picker::pick`, measures the pick alone).
#[derive(Default)]
pub struct LeastConnections {
    counts: Mutex<HashMap<String, u64, BuildHasherDefault<Fnv>>>,
}

impl SeedPicker for LeastConnections {
    fn pick(&self, instances: &[Endpoint]) -> Option<usize> {
        let mut counts = lock(&self.counts);
        let mut best: Option<(usize, u64)> = None;
        for (i, inst) in instances.iter().enumerate() {
            let c = counts.get(inst.id().as_str()).copied().unwrap_or(0);
            match best {
                Some((_, b)) if b <= c => {}
                _ => best = Some((i, c)),
            }
        }
        let (i, _) = best?;
        // `counts[id]++`: only the first pick of an id inserts (and allocates its key).
        let id = instances[i].id().as_str();
        match counts.get_mut(id) {
            Some(c) => *c += 1,
            None => {
                counts.insert(id.to_owned(), 1);
            }
        }
        Some(i)
    }
}
