//! The whole request path with and without a metrics recorder installed, in one run.
//!
//! ```text
//! cargo bench -p waypost-strategies --all-features --bench recorded
//! ```
//!
//! Benchmark ids:
//! - `balancer_pick/<strategy>/<n>`: `Balancer::pick_with` and dropping the guard (as in the
//!   `pick` bench), with no recorder installed: the series are no-op handles.
//! - `balancer_pick_recorded/<strategy>/<n>`: the same, after a Prometheus recorder
//!   (metrics-exporter-prometheus) was installed, so that each pick updates the instance's
//!   in-flight gauge twice and its `cancelled` counter once.
//! - `balancer_pick_success_recorded/<strategy>/<n>`: the same, ending every call with
//!   `success()`: the outcome counter and a latency sample in the histogram too.
//!
//! The recorder is process-wide and can only be installed once, so the groups without it run
//! first. Settings as in the `pick` bench.

mod fixture;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use waypost_core::{Balancer, WatchEvent};

use fixture::{context, instances, is_hashing};

const SIZES: [usize; 2] = [10, 10_000];

fn run<F: Fn(u64)>(iters: u64, pick: &F) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        pick(i);
    }
    start.elapsed()
}

fn balancers(n: usize) -> Vec<(&'static str, Balancer)> {
    waypost_strategies::names()
        .iter()
        .map(|&name| {
            let strategy = waypost_strategies::by_name(name).expect("names() lists it");
            // Named, so that the balancer registers its series when a recorder is installed.
            let balancer = Balancer::builder(strategy)
                .service("users".parse().expect("a valid name"))
                .build();
            balancer.apply(WatchEvent::Snapshot(instances(n)));
            (name, balancer)
        })
        .collect()
}

fn picks(c: &mut Criterion, group: &str, success: bool) {
    for n in SIZES {
        for (name, balancer) in balancers(n) {
            let hashing = is_hashing(name);
            let one = |i: u64| {
                let guard = black_box(balancer.pick_with(&context(hashing, i)));
                if success {
                    if let Ok(g) = guard {
                        g.success();
                    }
                }
            };
            c.benchmark_group(group)
                .bench_function(BenchmarkId::new(name, n), |b| {
                    b.iter_custom(|iters| run(iters, &one))
                });
        }
    }
}

fn without_recorder(c: &mut Criterion) {
    picks(c, "balancer_pick", false);
}

fn with_recorder(c: &mut Criterion) {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the first recorder of this process");
    // The recorder keeps raw histogram samples until a scrape drains them: scrape now and then,
    // as Prometheus would, so that memory stays bounded over a long run.
    let scraper = std::thread::spawn(move || {
        for _ in 0..600 {
            std::thread::sleep(Duration::from_secs(1));
            black_box(handle.render());
        }
    });
    picks(c, "balancer_pick_recorded", false);
    picks(c, "balancer_pick_success_recorded", true);
    drop(scraper);
}

criterion_group! {
    name = benches;
    config = fixture::criterion_config(20);
    targets = without_recorder, with_recorder
}
criterion_main!(benches);
