//! Heap held per instance by a balancer, and heap allocations per pick, counted with a global
//! allocator. Prints markdown tables; not a criterion bench (these are counts, not timings).
//!
//! ```text
//! cargo bench -p waypost-strategies --all-features --bench memory
//! ```
//!
//! - *bytes / instance*: live heap after `Balancer::new` + `apply(Snapshot(10,000 instances))`
//!   minus live heap before building the instances, divided by 10,000. It includes the instances
//!   themselves (ids, hosts, ... as the watch delivered them), which the balancer now owns.
//! - *instance data*: the same 10,000 instances alone in a `Vec`, per instance.
//! - *picker*: what `Strategy::build` alone holds for 10,000 endpoints (tables, rings), per instance.
//! - *allocations / pick*: heap allocations over 100,000 picks divided by 100,000, through
//!   `Picker::pick` and through `Balancer::pick_with` + dropping the guard; the seed port for
//!   comparison (over 1,000 picks). `tests/alloc.rs` asserts the zero.

mod fixture;
mod seed;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use waypost_core::{Balancer, WatchEvent};

use fixture::{context, endpoints, instances, is_hashing};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> i64 {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

const N: usize = 10_000;
const PICKS: u64 = 100_000;
const SEED_PICKS: u64 = 1_000;

/// `cargo bench` passes `--bench`; `cargo test --benches` does not and only checks that this
/// runs, so it counts over fewer picks.
fn picks(full: u64) -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        full
    } else {
        full / 100
    }
}

/// Allocations per call of `f` over `calls` calls, after one warm-up call (thread-locals, lazy
/// statics).
fn per_call(calls: u64, mut f: impl FnMut(u64)) -> f64 {
    f(0);
    let before = allocations();
    for i in 1..=calls {
        f(i);
    }
    (allocations() - before) as f64 / calls as f64
}

fn main() {
    // A filter argument is not supported here.
    let before = live();
    let data = instances(N);
    let instance_bytes = (live() - before) as f64 / N as f64;
    drop(data);

    println!("Heap per instance at {N} instances (instance data alone: {instance_bytes:.0} B)\n");
    println!("| strategy | bytes / instance held by a balancer | of which picker | allocations / pick (Picker::pick, n=10 / n=10,000) | allocations / pick (Balancer::pick_with + guard, n=10 / n=10,000) |");
    println!("|---|---:|---:|---:|---:|");
    for name in waypost_strategies::names() {
        let strategy = waypost_strategies::by_name(name).expect("names() lists it");
        let hashing = is_hashing(name);

        let before = live();
        let balancer = Balancer::new(strategy.clone());
        balancer.apply(WatchEvent::Snapshot(instances(N)));
        let held = (live() - before) as f64 / N as f64;

        let eps = endpoints(N);
        let before = live();
        let built = strategy.build(&eps);
        let picker_bytes = (live() - before) as f64 / N as f64;
        drop(built);

        let mut pick_allocs = Vec::new();
        let mut balancer_allocs = Vec::new();
        for n in [10, N] {
            let eps = endpoints(n);
            let picker = strategy.build(&eps);
            pick_allocs.push(per_call(picks(PICKS), |i| {
                black_box(picker.pick(&eps, &context(hashing, i)));
            }));
            let balancer = Balancer::new(strategy.clone());
            balancer.apply(WatchEvent::Snapshot(instances(n)));
            balancer_allocs.push(per_call(picks(PICKS), |i| {
                drop(black_box(balancer.pick_with(&context(hashing, i))));
            }));
        }
        println!(
            "| {name} | {held:.0} | {picker_bytes:.0} | {} / {} | {} / {} |",
            pick_allocs[0], pick_allocs[1], balancer_allocs[0], balancer_allocs[1]
        );
        drop(balancer);
    }

    println!("\nSeed port, allocations per pick\n");
    println!("| strategy | n=10 | n=10,000 |");
    println!("|---|---:|---:|");
    for name in seed::NAMES {
        let mut row = Vec::new();
        for n in [10, N] {
            let eps = endpoints(n);
            let picker = seed::by_name(name).expect("seed::NAMES lists it");
            // The seed's picks take up to ~0.2 ms at 10,000 instances: fewer of them.
            row.push(per_call(picks(SEED_PICKS), |_| {
                black_box(picker.pick(&eps));
            }));
        }
        println!("| {name} | {} | {} |", row[0], row[1]);
    }
}
