//! What one pick costs, per strategy and instance-set size, against the seed's algorithms.
//!
//! ```text
//! cargo bench -p waypost-strategies --all-features --bench pick
//! ```
//!
//! Benchmark ids:
//! - `pick/<strategy>/<n>`: one `Picker::pick` over `n` endpoints (weights 1..10, a steady load
//!   of 0..3 calls in flight, see `fixture`), the picker built once outside the loop. Hashing
//!   strategies get a different key on every pick.
//! - `pick_2threads/<strategy>/<n>`: the same picker, two threads picking from it at once. Both
//!   threads wait on a barrier, then each runs the same number of picks and times itself; the
//!   reported time is the slower thread's elapsed time divided by its pick count, i.e. what one
//!   pick costs a thread while another thread is picking from the same picker. (Throughput of the
//!   pair is twice that rate.) On a 2-core machine the two threads only overlap fully when the
//!   machine is otherwise idle; BENCHMARKS.md records the load.
//! - `balancer_pick/<strategy>/<n>`: `Balancer::pick_with` and dropping the guard, i.e. the whole
//!   request-path cost: snapshot load, pick, in-flight accounting.
//! - `request_path_parts/<part>`: each part of what `balancer_pick` adds to `pick`, alone.
//! - `balancer_pick_2threads/<strategy>/<n>`: the same, two threads picking through one
//!   balancer at once, timed like `pick_2threads`.
//! - `balancer_pick_excluding/<strategy>/<n>`: `Balancer::pick_excluding` and dropping the
//!   guard: a retry avoiding the instance that the request's first pick chose (64 requests in
//!   turn; for hashing strategies, each key's own instance, so every retry walks on).
//! - `balancer_pick_tiered/<state>/<strategy>/<n>`: the same through a balancer with two
//!   failover tiers of `n` instances each: `healthy` (the first tier takes everything) and
//!   `spilling` (two thirds of the first tier critical: 47 % stays, 53 % spills).
//! - `seed/<strategy>/<n>` and `seed_2threads/<strategy>/<n>`: the seed's Go algorithms, ported
//!   in `seed/` (mutex round-robin, mutex random, weighted list rebuilt per pick, least-connections
//!   scanning a mutex-guarded map), measured exactly like `pick` and `pick_2threads`.
//!
//! Criterion settings are short so that the whole bench runs in a few minutes on 2 cores
//! (warm-up 300 ms, measurement 1 s, 20 samples, no plots); command-line flags such as
//! `--measurement-time 5` override them.

mod fixture;
mod seed;

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use waypost_core::{Balancer, Health, InstanceId, WatchEvent};

use fixture::{context, endpoints, instances, is_hashing, SIZES};

/// Runs `pick(offset + i)` for `i` in `0..iters` and returns the elapsed time.
fn run<F: Fn(u64)>(iters: u64, offset: u64, pick: &F) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        pick(offset + i);
    }
    start.elapsed()
}

/// Two threads released together by a barrier each run `iters` picks; returns the slower one's
/// elapsed time (see the module docs).
fn run_2threads<F: Fn(u64) + Sync>(iters: u64, pick: &F) -> Duration {
    let barrier = Barrier::new(2);
    let timed = |offset: u64| {
        barrier.wait();
        run(iters, offset, pick)
    };
    std::thread::scope(|s| {
        // The second thread's keys start far away, so hashing strategies see distinct keys.
        let other = s.spawn(|| timed(1 << 40));
        let mine = timed(0);
        let theirs = other.join().expect("the second picking thread panicked");
        mine.max(theirs)
    })
}

fn pick(c: &mut Criterion) {
    for &n in &SIZES {
        let eps = endpoints(n);
        for name in waypost_strategies::names() {
            let strategy = waypost_strategies::by_name(name).expect("names() lists it");
            let picker = strategy.build(&eps);
            let hashing = is_hashing(name);
            let one = |i: u64| {
                black_box(picker.pick(black_box(&eps), &context(hashing, i)));
            };
            c.benchmark_group("pick")
                .bench_function(BenchmarkId::new(name, n), |b| {
                    b.iter_custom(|iters| run(iters, 0, &one))
                });
            c.benchmark_group("pick_2threads")
                .bench_function(BenchmarkId::new(name, n), |b| {
                    b.iter_custom(|iters| run_2threads(iters, &one))
                });
        }
    }
}

fn balancer_pick(c: &mut Criterion) {
    for n in [10, 10_000] {
        for name in waypost_strategies::names() {
            let strategy = waypost_strategies::by_name(name).expect("names() lists it");
            let balancer = Balancer::new(strategy);
            balancer.apply(WatchEvent::Snapshot(instances(n)));
            let hashing = is_hashing(name);
            let one = |i: u64| {
                drop(black_box(balancer.pick_with(&context(hashing, i))));
            };
            c.benchmark_group("balancer_pick")
                .bench_function(BenchmarkId::new(name, n), |b| {
                    b.iter_custom(|iters| run(iters, 0, &one))
                });
            c.benchmark_group("balancer_pick_2threads")
                .bench_function(BenchmarkId::new(name, n), |b| {
                    b.iter_custom(|iters| run_2threads(iters, &one))
                });
        }
    }
}

fn balancer_pick_excluding(c: &mut Criterion) {
    for n in [10, 10_000] {
        for name in waypost_strategies::names() {
            let strategy = waypost_strategies::by_name(name).expect("names() lists it");
            let balancer = Balancer::new(strategy);
            balancer.apply(WatchEvent::Snapshot(instances(n)));
            let hashing = is_hashing(name);
            // 64 requests whose first attempt failed: each retry avoids the instance its own
            // first pick chose (for a hashing strategy, its key's instance).
            let tried: Vec<Vec<InstanceId>> = (0..64u64)
                .map(|i| {
                    let first = balancer.pick_with(&context(hashing, i)).expect("a pick");
                    vec![first.instance().id().clone()]
                })
                .collect();
            let one = |i: u64| {
                let k = i % 64;
                drop(black_box(
                    balancer.pick_excluding(&context(hashing, k), &tried[k as usize]),
                ));
            };
            c.benchmark_group("balancer_pick_excluding")
                .bench_function(BenchmarkId::new(name, n), |b| {
                    b.iter_custom(|iters| run(iters, 0, &one))
                });
        }
    }
}

fn balancer_pick_tiered(c: &mut Criterion) {
    // The tiers' watch tasks need a runtime to be spawned on; the bench feeds them by hand.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    let _entered = runtime.enter();
    for n in [10, 10_000] {
        for name in ["round-robin", "p2c-ewma", "maglev"] {
            for state in ["healthy", "spilling"] {
                let strategy = waypost_strategies::by_name(name).expect("names() lists it");
                let idle = || futures::StreamExt::boxed(futures::stream::pending());
                let balancer = Balancer::builder(strategy)
                    .tier_from_watch("near", idle())
                    .tier_from_watch("far", idle())
                    .build();
                let near: Vec<_> = instances(n)
                    .into_iter()
                    .enumerate()
                    .map(|(i, inst)| {
                        let critical = state == "spilling" && i % 3 != 0;
                        let health = if critical {
                            Health::Critical
                        } else {
                            Health::Passing
                        };
                        inst.to_builder().health(health).build().expect("valid")
                    })
                    .collect();
                let far: Vec<_> = instances(2 * n).split_off(n);
                balancer.apply_to(0, [WatchEvent::Snapshot(near)]);
                balancer.apply_to(1, [WatchEvent::Snapshot(far)]);
                let hashing = is_hashing(name);
                let one = |i: u64| {
                    drop(black_box(balancer.pick_with(&context(hashing, i))));
                };
                c.benchmark_group("balancer_pick_tiered")
                    .bench_function(BenchmarkId::new(format!("{state}/{name}"), n), |b| {
                        b.iter_custom(|iters| run(iters, 0, &one))
                    });
            }
        }
    }
}

fn seed_port(c: &mut Criterion) {
    for &n in &SIZES {
        let eps = endpoints(n);
        for name in seed::NAMES {
            let picker = seed::by_name(name).expect("seed::NAMES lists it");
            let one = |_: u64| {
                black_box(picker.pick(black_box(&eps)));
            };
            c.benchmark_group("seed")
                .bench_function(BenchmarkId::new(name, n), |b| {
                    b.iter_custom(|iters| run(iters, 0, &one))
                });
            c.benchmark_group("seed_2threads")
                .bench_function(BenchmarkId::new(name, n), |b| {
                    b.iter_custom(|iters| run_2threads(iters, &one))
                });
        }
    }
}

/// What `balancer_pick` adds to `pick`, one part at a time (n=10,000, the picked endpoint
/// warm in cache, one thread): the clock read it makes and the one it replaced, the snapshot
/// load and release, the endpoint's reference count up and down, and the in-flight count up and
/// down.
fn request_path_parts(c: &mut Criterion) {
    let balancer = Balancer::new(waypost_strategies::by_name("round-robin").expect("compiled in"));
    balancer.apply(WatchEvent::Snapshot(instances(10_000)));
    let endpoint = balancer.endpoints()[77].clone();
    let snapshot = arc_swap::ArcSwap::from_pointee(balancer.endpoints());
    let mut g = c.benchmark_group("request_path_parts");
    g.bench_function("std_instant_now", |b| b.iter(|| black_box(Instant::now())));
    g.bench_function("clock_nanos", |b| {
        b.iter(|| black_box(waypost_core::clock_nanos()))
    });
    g.bench_function("snapshot_load", |b| {
        b.iter(|| drop(black_box(snapshot.load())))
    });
    g.bench_function("endpoint_clone", |b| {
        b.iter(|| drop(black_box(endpoint.clone())))
    });
    g.bench_function("in_flight", |b| {
        b.iter(|| {
            endpoint.state().begin();
            endpoint.state().end(None);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = fixture::criterion_config(20);
    targets = pick, balancer_pick, balancer_pick_excluding, balancer_pick_tiered, seed_port,
        request_path_parts
}
criterion_main!(benches);
