//! The pick path of every compiled-in strategy allocates nothing, at 10 and at 10,000
//! instances: `Picker::pick`, and `Balancer::pick_with` with the guard's outcome recorded or the
//! guard dropped. Counted per thread by a global allocator, so tests running in parallel do not
//! disturb the count.

use std::sync::Arc;
use std::time::Duration;

use waypost_core::{clock_nanos, Balancer, Endpoint, EndpointState, InstanceId, WatchEvent};

#[path = "support/alloc.rs"]
mod support;
use support::{allocations, context, count, instances, PICKS, SIZES};

/// Endpoints under some load, so load-aware strategies take their real branches.
fn endpoints(n: usize) -> Vec<Endpoint> {
    let now = clock_nanos();
    instances(n)
        .into_iter()
        .enumerate()
        .map(|(i, inst)| {
            let state = EndpointState::new_at(now);
            for _ in 0..i % 3 {
                state.begin();
            }
            state.observe_latency_at(Duration::from_micros(50 + (i as u64 * 13) % 200), now);
            Endpoint::new(inst, Arc::new(state))
        })
        .collect()
}

#[test]
fn the_counter_sees_allocations() {
    // Guards the assertions below against a counter that counts nothing.
    let before = allocations();
    drop(std::hint::black_box(Box::new(7u64)));
    assert_eq!(allocations() - before, 1);
}

#[test]
fn every_strategy_compiled_in_is_tested() {
    // Guards the loops below against testing nothing: the default features give four.
    assert!(waypost_strategies::names().len() >= 4);
}

#[test]
fn picker_pick_does_not_allocate() {
    let mut allocating = Vec::new();
    for name in waypost_strategies::names() {
        let strategy = waypost_strategies::by_name(name).unwrap();
        for n in SIZES {
            let eps = endpoints(n);
            let picker = strategy.build(&eps);
            let mut picked = 0u64;
            let allocs = count(|i| {
                if let Some(k) = picker.pick(&eps, &context(i)) {
                    assert!(k < eps.len(), "{name} picked index {k} of {}", eps.len());
                    picked += 1;
                }
            });
            assert_eq!(picked, PICKS + 1, "{name} at n={n} declined picks");
            if allocs > 0 {
                allocating.push(format!(
                    "{name} at n={n}: {allocs} allocations in {PICKS} picks"
                ));
            }
        }
    }
    assert!(
        allocating.is_empty(),
        "Picker::pick allocates: {allocating:#?}"
    );
}

#[test]
fn balancer_pick_and_guard_do_not_allocate() {
    let mut allocating = Vec::new();
    for name in waypost_strategies::names() {
        for n in SIZES {
            let balancer = Balancer::new(waypost_strategies::by_name(name).unwrap());
            balancer.apply(WatchEvent::Snapshot(instances(n)));
            let allocs = count(|i| {
                let guard = balancer.pick_with(&context(i)).unwrap();
                // Every way a call can end: success, failure (with latency), cancelled.
                match i % 3 {
                    0 => guard.success(),
                    1 => guard.failure(),
                    _ => drop(guard),
                }
            });
            if allocs > 0 {
                allocating.push(format!(
                    "{name} at n={n}: {allocs} allocations in {PICKS} picks"
                ));
            }
        }
    }
    assert!(
        allocating.is_empty(),
        "Balancer::pick_with allocates: {allocating:#?}"
    );
}

#[test]
fn retries_do_not_allocate() {
    let mut allocating = Vec::new();
    for name in waypost_strategies::names() {
        for n in SIZES {
            let eps = endpoints(n);
            let picker = waypost_strategies::by_name(name).unwrap().build(&eps);
            // Tried: whatever the pick chose, and its neighbours.
            let mut retried = 0u64;
            let picker_allocs = count(|i| {
                let ctx = context(i);
                let first = picker.pick(&eps, &ctx).unwrap();
                let tried = |k: usize| k.abs_diff(first) <= 1;
                if let Some(k) = picker.pick_excluding(&eps, &ctx, &tried) {
                    assert!(!tried(k), "{name} retried on {k}, one it was told to avoid");
                    retried += 1;
                }
            });
            assert_eq!(retried, PICKS + 1, "{name} at n={n} declined retries");
            // Through the balancer, plain and behind the resilience layer.
            let tried: Vec<InstanceId> = instances(n)[..2].iter().map(|i| i.id().clone()).collect();
            let plain = Balancer::new(waypost_strategies::by_name(name).unwrap());
            let wrapped = Balancer::new(waypost_strategies::resilience::Resilient::new(
                waypost_strategies::by_name(name).unwrap(),
            ));
            for (what, balancer) in [
                ("picker", None),
                ("balancer", Some(&plain)),
                ("resilient", Some(&wrapped)),
            ] {
                let allocs = match balancer {
                    None => picker_allocs,
                    Some(b) => {
                        b.apply(WatchEvent::Snapshot(instances(n)));
                        count(|i| {
                            let guard = b.pick_excluding(&context(i), &tried).unwrap();
                            assert!(!tried.contains(guard.instance().id()));
                            guard.success();
                        })
                    }
                };
                if allocs > 0 {
                    allocating.push(format!(
                        "{name} ({what}) at n={n}: {allocs} allocations in {PICKS} retries"
                    ));
                }
            }
        }
    }
    assert!(allocating.is_empty(), "retries allocate: {allocating:#?}");
}
