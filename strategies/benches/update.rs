//! What an instance-set update costs a balancer holding 10,000 instances, and whether picks
//! running at the same time ever wait for it.
//!
//! ```text
//! cargo bench -p waypost-strategies --all-features --bench update
//! ```
//!
//! `update/<strategy>/10000`: one `Balancer::apply` of a single-instance change; iterations
//! alternate `WatchEvent::Added` and `WatchEvent::Removed` of the same instance, so the time is
//! the mean of one add and one remove. Each apply rebuilds the snapshot (the endpoint list and
//! the strategy's picker) and swaps it in; the old one is freed by whoever drops it last.
//!
//! Meanwhile a second thread picks in a loop (`Balancer::pick_with`, guard dropped) and times
//! every pick. After each strategy the bench prints that thread's pick-latency distribution
//! during the updates, and during a quiet period of the same length before them, so a pick that
//! waited for an update would show as a tail the quiet period lacks.
//!
//! The picking thread also counts its own heap allocations and frees: a pick that frees memory
//! is one that ended up releasing the last reference to a replaced snapshot, i.e. paid for the
//! update's clean-up on the request path.
//!
//! `update_batch/<strategy>/10000`: 100 of the instances, spread over the set, removed in one
//! `Balancer::apply_all`, then added back in one, in turn (a watch answer with many changes);
//! no picking thread.
//!
//! `update_two_tiers/<strategy>/10000`: a balancer with two failover tiers of 10,000 instances
//! each (disjoint ids, as two datacenters'), one single-instance change per iteration, to the
//! first tier and to the second in turn (`Balancer::apply_to`); no picking thread.
//!
//! Settings: warm-up 300 ms, measurement 1 s, 10 samples (criterion's minimum).

mod fixture;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use waypost_core::{Balancer, WatchEvent};

use fixture::{context, instance, instances, is_hashing};

const N: usize = 10_000;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static FREES: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts, per thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = FREES.try_with(|c| c.set(c.get() + 1));
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Pick latencies in log-linear buckets: 8 sub-buckets per power of two (≤ 12.5 % error).
struct Histogram {
    counts: Vec<u64>,
    max: u64,
    total: u64,
    /// Picks during which the picking thread allocated or freed heap memory.
    touched_heap: u64,
    allocations: u64,
    frees: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; 64 * 8],
            max: 0,
            total: 0,
            touched_heap: 0,
            allocations: 0,
            frees: 0,
        }
    }

    fn bucket(ns: u64) -> usize {
        if ns < 8 {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros() as usize; // ≥ 3
        let sub = (ns >> (exp - 3)) as usize & 7;
        (exp - 2) * 8 + sub
    }

    fn upper(bucket: usize) -> u64 {
        if bucket < 8 {
            return bucket as u64;
        }
        let exp = bucket / 8 + 2;
        let sub = (bucket % 8) as u64;
        ((8 + sub + 1) << (exp - 3)) - 1
    }

    fn record(&mut self, ns: u64) {
        self.counts[Self::bucket(ns)] += 1;
        self.max = self.max.max(ns);
        self.total += 1;
    }

    fn quantile(&self, q: f64) -> u64 {
        let rank = (q * self.total as f64).ceil() as u64;
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank.max(1) {
                return Self::upper(b).min(self.max);
            }
        }
        self.max
    }

    fn over(&self, ns: u64) -> u64 {
        self.counts
            .iter()
            .enumerate()
            .filter(|&(b, _)| b > Self::bucket(ns))
            .map(|(_, &c)| c)
            .sum()
    }

    fn summary(&self) -> String {
        format!(
            "{} picks, p50 {} ns, p99 {} ns, p99.9 {} ns, p99.99 {} ns, max {} ns, \
             {} over 10 µs ({:.1} per million); {} picks touched the heap ({} allocations, {} frees)",
            self.total,
            self.quantile(0.5),
            self.quantile(0.99),
            self.quantile(0.999),
            self.quantile(0.9999),
            self.max,
            self.over(10_000),
            self.over(10_000) as f64 * 1e6 / self.total.max(1) as f64,
            self.touched_heap,
            self.allocations,
            self.frees,
        )
    }
}

/// Picks from `balancer` until `stop`, timing each pick.
fn pick_loop(balancer: &Balancer, hashing: bool, stop: &AtomicBool) -> Histogram {
    let mut h = Histogram::new();
    let mut i = 0u64;
    let heap = || (ALLOCATIONS.with(Cell::get), FREES.with(Cell::get));
    while !stop.load(Ordering::Relaxed) {
        let (a0, f0) = heap();
        let start = Instant::now();
        drop(black_box(balancer.pick_with(&context(hashing, i))));
        let ns = start.elapsed().as_nanos() as u64;
        let (a1, f1) = heap();
        if (a1, f1) != (a0, f0) {
            h.touched_heap += 1;
            h.allocations += a1 - a0;
            h.frees += f1 - f0;
        }
        h.record(ns);
        i += 1;
    }
    h
}

/// How long the picking thread runs alone before the updates: long enough for a tail to show
/// when measuring (`cargo bench`), short when `cargo test --benches` only checks that the bench
/// runs.
fn quiet_period() -> Duration {
    let measuring =
        std::env::args().any(|a| a == "--bench") && !std::env::args().any(|a| a == "--test");
    Duration::from_millis(if measuring { 1300 } else { 50 })
}

fn update(c: &mut Criterion) {
    let extra = instance(N);
    for name in waypost_strategies::names() {
        let strategy = waypost_strategies::by_name(name).expect("names() lists it");
        let balancer = Balancer::new(strategy);
        balancer.apply(WatchEvent::Snapshot(instances(N)));
        let hashing = is_hashing(name);

        let stop = AtomicBool::new(false);
        let (quiet, busy, updating) = std::thread::scope(|s| {
            let quiet = s.spawn(|| pick_loop(&balancer, hashing, &stop));
            std::thread::sleep(quiet_period());
            stop.store(true, Ordering::Relaxed);
            let quiet = quiet.join().expect("picker thread panicked");

            stop.store(false, Ordering::Relaxed);
            let busy = s.spawn(|| pick_loop(&balancer, hashing, &stop));
            let started = Instant::now();
            let mut updates = 0u64;
            c.benchmark_group("update")
                .bench_function(BenchmarkId::new(name, N), |b| {
                    let mut present = false;
                    b.iter(|| {
                        balancer.apply(if present {
                            WatchEvent::Removed(extra.clone())
                        } else {
                            WatchEvent::Added(extra.clone())
                        });
                        present = !present;
                        updates += 1;
                    })
                });
            stop.store(true, Ordering::Relaxed);
            let busy = busy.join().expect("picker thread panicked");
            (quiet, busy, (updates, started.elapsed()))
        });
        println!(
            "update/{name}/{N}: {} updates in {:.1} s; picks meanwhile: {}",
            updating.0,
            updating.1.as_secs_f64(),
            busy.summary()
        );
        println!(
            "update/{name}/{N}: picks without updates: {}",
            quiet.summary()
        );
    }
}

/// How many instances each `update_batch` iteration adds or removes together.
const BATCH: usize = 100;

/// `update_batch/<strategy>/10000`: `BATCH` of the instances removed in one `apply_all`, then
/// added back in one, in turn (one watch answer with many changes); no picking thread.
fn update_batch(c: &mut Criterion) {
    // Spread over the set. Removing them keeps consistent-hash at the same number of points
    // per weight (19); adding 100 new ones would cross to 18, and every such step rebuilds the
    // ring from scratch (see BENCHMARKS.md).
    let batch: Vec<_> = (0..BATCH).map(|k| instance(k * (N / BATCH))).collect();
    for name in ["round-robin", "consistent-hash", "maglev"] {
        let Some(strategy) = waypost_strategies::by_name(name) else {
            continue;
        };
        let balancer = Balancer::new(strategy);
        balancer.apply(WatchEvent::Snapshot(instances(N)));
        c.benchmark_group("update_batch")
            .bench_function(BenchmarkId::new(name, N), |b| {
                let mut k = 0usize;
                b.iter(|| {
                    let remove = k % 2 == 0;
                    balancer.apply_all(batch.iter().cloned().map(|i| {
                        if remove {
                            WatchEvent::Removed(i)
                        } else {
                            WatchEvent::Added(i)
                        }
                    }));
                    k += 1;
                })
            });
    }
}

fn update_two_tiers(c: &mut Criterion) {
    // A runtime only for the tiers' (never-ending, silent) watches that the builder spawns.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let _entered = runtime.enter();
    let silent = || -> waypost_core::Watch { Box::pin(futures::stream::pending()) };
    let extra = [instance(2 * N), instance(2 * N + 1)];
    for name in ["round-robin", "consistent-hash", "maglev"] {
        let Some(strategy) = waypost_strategies::by_name(name) else {
            continue;
        };
        let balancer = Balancer::builder(strategy)
            .tier_from_watch("dc1", silent())
            .tier_from_watch("dc2", silent())
            .build();
        balancer.apply_to(0, [WatchEvent::Snapshot(instances(N))]);
        balancer.apply_to(
            1,
            [WatchEvent::Snapshot((N..2 * N).map(instance).collect())],
        );
        c.benchmark_group("update_two_tiers")
            .bench_function(BenchmarkId::new(name, N), |b| {
                let mut k = 0usize;
                b.iter(|| {
                    let tier = k % 2;
                    let inst = extra[tier].clone();
                    balancer.apply_to(
                        tier,
                        [if (k / 2) % 2 == 0 {
                            WatchEvent::Added(inst)
                        } else {
                            WatchEvent::Removed(inst)
                        }],
                    );
                    k += 1;
                })
            });
    }
}

criterion_group! {
    name = benches;
    config = fixture::criterion_config(10);
    targets = update, update_batch, update_two_tiers
}
criterion_main!(benches);
