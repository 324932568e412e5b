//! With a Prometheus recorder installed (the one the examples and most services use), the pick
//! path of every compiled-in strategy still allocates nothing: the balancer registered the
//! series when it built its endpoints, so a pick, the in-flight gauge and the outcome counters
//! cost only atomic updates.
//!
//! The one allocation left is the recorder's own: metrics-exporter-prometheus keeps each
//! histogram's raw samples in blocks (metrics-util's `AtomicBucket`) that it allocates as they
//! fill and frees at each scrape, so a latency sample allocates when its series has no block
//! with room: the first sample of a series after a scrape, then one in every 64 or more. The
//! second test bounds exactly that.
//!
//! A test binary of its own: the recorder is process-wide and must be installed before the
//! balancers are built.
#![cfg(feature = "metrics")]

use metrics_exporter_prometheus::PrometheusBuilder;
use waypost_core::{Balancer, WatchEvent};

#[path = "support/alloc.rs"]
mod support;
use support::{context, count, instances, PICKS, SIZES};

#[test]
fn balancer_pick_and_guard_do_not_allocate_with_a_recorder() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder of this test binary");

    let mut allocating = Vec::new();
    for name in waypost_strategies::names() {
        for n in SIZES {
            let balancer = Balancer::builder(waypost_strategies::by_name(name).unwrap())
                .service("users".parse().unwrap())
                .build();
            balancer.apply(WatchEvent::Snapshot(instances(n)));
            // Cancelled calls: pick, in flight, cancelled counter; no latency sample.
            let cancelled = count(|i| drop(balancer.pick_with(&context(i)).unwrap()));
            if cancelled > 0 {
                allocating.push(format!(
                    "{name} at n={n}, cancelled calls: {cancelled} allocations in {PICKS} picks"
                ));
            }
            // Calls with an outcome also record a latency sample: at most one block per series
            // touched, plus one per 64 samples.
            let recorded = count(|i| {
                let guard = balancer.pick_with(&context(i)).unwrap();
                match i % 2 {
                    0 => guard.success(),
                    _ => guard.failure(),
                }
            });
            let bound = (n as u64).min(PICKS) + PICKS / 64;
            if recorded > bound {
                allocating.push(format!(
                    "{name} at n={n}, calls with an outcome: {recorded} allocations in {PICKS} \
                     picks (bound {bound})"
                ));
            }
        }
    }
    assert!(
        allocating.is_empty(),
        "Balancer::pick_with allocates with a recorder installed: {allocating:#?}"
    );
    // The series are really there: the picks were recorded.
    let text = handle.render();
    assert!(
        text.contains("waypost_requests_total{service=\"users\""),
        "{}",
        &text[..text.len().min(2000)]
    );
}
