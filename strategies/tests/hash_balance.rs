//! Ring hash and Maglev at 10 to 10,000 instances: how far the most loaded instance is over its
//! fair share, how many keys move when one instance leaves, and that a picker built step by
//! step (reusing the last build) sends every key where one built from scratch does.
//!
//! Shares are measured on an even grid of key hashes (`PickContext::with_hash`), which measures
//! each instance's part of the hash space directly instead of sampling it. The figures print
//! with `-- --nocapture` (BENCHMARKS.md quotes them).
#![cfg(all(feature = "consistent-hash", feature = "maglev"))]

use std::sync::Arc;

use waypost_core::{Endpoint, EndpointState, PickContext, Picker, ServiceInstance, Strategy};
use waypost_strategies::{ConsistentHash, Maglev};

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

fn inst(i: usize, weight: u32) -> ServiceInstance {
    ServiceInstance::builder("users", format!("users-{i:05}"))
        .host("10.0.0.1")
        .port(8080)
        .weight(weight)
        .build()
        .unwrap()
}

fn endpoints(set: &[ServiceInstance]) -> Vec<Endpoint> {
    set.iter()
        .map(|i| Endpoint::new(i.clone(), Arc::new(EndpointState::new())))
        .collect()
}

/// `n` instances of weight 1 (`weighted`: weights 1..10, as the benches' fixture).
fn set(n: usize, weighted: bool) -> Vec<ServiceInstance> {
    (0..n)
        .map(|i| inst(i, if weighted { 1 + (i % 10) as u32 } else { 1 }))
        .collect()
}

/// Enough grid keys that every instance's part is measured in hundreds of keys.
fn grid_size(n: usize) -> u64 {
    (n as u64 * 400).max(1 << 16)
}

/// The owner (by id) of each of `keys` evenly spaced hashes.
fn owners(picker: &dyn Picker, eps: &[Endpoint], keys: u64) -> Vec<String> {
    let step = u64::MAX / keys;
    (0..keys)
        .map(|k| {
            let ctx = PickContext::new().with_hash(k * step + step / 2);
            eps[picker.pick(eps, &ctx).unwrap()].id().to_string()
        })
        .collect()
}

/// The most loaded instance's share of the keys over its fair share (its weight's share).
fn max_over_fair(set: &[ServiceInstance], owners: &[String]) -> f64 {
    let total: f64 = set.iter().map(|i| f64::from(i.weight().get())).sum();
    let mut counts = std::collections::HashMap::<&str, f64>::new();
    for o in owners {
        *counts.entry(o.as_str()).or_default() += 1.0;
    }
    set.iter()
        .map(|i| {
            let share = counts.get(i.id().as_str()).copied().unwrap_or(0.0) / owners.len() as f64;
            share / (f64::from(i.weight().get()) / total)
        })
        .fold(0.0, f64::max)
}

/// Makes a fresh strategy (one with no last build to reuse).
type Make = fn() -> Box<dyn Strategy>;

/// Each hashing strategy by name.
fn strategies() -> [(&'static str, Make); 2] {
    [
        ("consistent-hash", || Box::new(ConsistentHash::new())),
        ("maglev", || Box::new(Maglev::new())),
    ]
}

#[test]
fn the_most_loaded_instance_stays_within_a_bound_of_its_fair_share() {
    // Bounds per (strategy, size), equal weights then weights 1..10: the figures measured, with
    // some margin. The ring's spread is about ±1/√points; Maglev's is one entry in M / n, and at
    // 10,000 instances its default 65,537 entries give a weight-1 instance one or two.
    let bounds = [
        (
            "consistent-hash",
            [(1.2, 1.2), (1.3, 1.25), (1.4, 1.3), (1.7, 2.0)],
        ),
        (
            "maglev",
            [(1.01, 1.01), (1.01, 1.02), (1.07, 1.08), (1.1, 1.75)],
        ),
    ];
    for (name, make) in strategies() {
        let limits = bounds.iter().find(|(b, _)| *b == name).unwrap().1;
        for (&n, (equal_limit, weighted_limit)) in SIZES.iter().zip(limits) {
            for (weighted, limit) in [(false, equal_limit), (true, weighted_limit)] {
                let set = set(n, weighted);
                let eps = endpoints(&set);
                let picker = make().build(&eps);
                let ratio = max_over_fair(&set, &owners(picker.as_ref(), &eps, grid_size(n)));
                println!("{name} n={n} weighted={weighted}: max share / fair share {ratio:.3}");
                assert!(
                    ratio <= limit,
                    "{name}, {n} instances, weighted {weighted}: {ratio:.3} > {limit}"
                );
            }
        }
    }
}

#[test]
fn keys_moved_when_one_of_n_instances_leaves_stay_within_a_bound() {
    for (name, make) in strategies() {
        for n in SIZES {
            let set = set(n, false);
            let eps = endpoints(&set);
            let keys = grid_size(n);
            let strategy = make();
            let before = owners(strategy.build(&eps).as_ref(), &eps, keys);
            // Several instances leave in turn (each alone), so that one instance's luck in the
            // hash space does not decide the figure.
            let leavers: Vec<usize> = (0..5).map(|k| k * n / 5 + 1).collect();
            let mut moved_total = 0.0;
            let mut moved_max: f64 = 0.0;
            for &gone in &leavers {
                let mut rest = set.clone();
                let gone_id = rest.remove(gone).id().to_string();
                let rest_eps = endpoints(&rest);
                let after = owners(strategy.build(&rest_eps).as_ref(), &rest_eps, keys);
                let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
                if name == "consistent-hash" {
                    // The ring moves only the keys of the instance that left.
                    assert!(before
                        .iter()
                        .zip(&after)
                        .all(|(b, a)| b == a || *b == gone_id));
                }
                let fraction = moved as f64 / keys as f64 * n as f64;
                moved_total += fraction;
                moved_max = moved_max.max(fraction);
                // Back to the full set: every key returns.
                assert_eq!(owners(strategy.build(&eps).as_ref(), &eps, keys), before);
            }
            let mean = moved_total / leavers.len() as f64;
            println!(
                "{name} n={n}: keys moved when one leaves, × n: mean {mean:.3}, max {moved_max:.3}"
            );
            // The ring moves exactly the leaver's share: at most 1.1 / n on average. Maglev also
            // moves entries between the others, the more so the fewer entries each instance
            // holds: at its default 65,537 entries the 1.1 / n holds only at 10
            // instances (BENCHMARKS.md: a target missed). These bounds are what it does.
            let limit = match (name, n) {
                ("maglev", 100) => 1.7,
                ("maglev", 1_000) => 7.5,
                ("maglev", 10_000) => 10.5,
                _ => 1.1,
            };
            assert!(mean <= limit, "{name}, {n} instances: {mean:.3} / n moved");
        }
    }
}

#[test]
fn a_picker_built_step_by_step_picks_what_one_built_from_scratch_picks() {
    for (name, make) in strategies() {
        for n in SIZES {
            let full = set(n, true);
            let strategy = make();
            // A history of updates on one strategy: the set without a few, then instances added
            // one by one, one reweighted (a new point count), one removed.
            let mut now: Vec<ServiceInstance> = full[3..].to_vec();
            let _ = strategy.build(&endpoints(&now));
            for i in (0..3).rev() {
                now.insert(0, full[i].clone());
                let _ = strategy.build(&endpoints(&now));
            }
            now[n / 2] = now[n / 2].to_builder().weight(17).build().unwrap();
            let _ = strategy.build(&endpoints(&now));
            now.remove(n / 3);
            let eps = endpoints(&now);
            let stepwise = strategy.build(&eps);
            let at_once = make().build(&eps);
            let keys = grid_size(n);
            assert_eq!(
                owners(stepwise.as_ref(), &eps, keys),
                owners(at_once.as_ref(), &eps, keys),
                "{name}, {n} instances"
            );
            // Retries walk the same way too.
            for k in 0..200u64 {
                let ctx = PickContext::new().with_hash(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let first = at_once.pick(&eps, &ctx).unwrap();
                let avoid = |i: usize| i == first;
                assert_eq!(
                    stepwise.pick_excluding(&eps, &ctx, &avoid),
                    at_once.pick_excluding(&eps, &ctx, &avoid),
                    "{name}, {n} instances, key {k}"
                );
            }
        }
    }
}

/// A balancer with failover tiers builds each tier's picker with one strategy, one tier at a
/// time, and a change rebuilds only its tier. Each strategy keeps one build per tier; through
/// alternating updates of two tiers (the same endpoints kept, as a balancer keeps them), each
/// tier's picker still picks what one built from scratch for its set picks.
#[test]
fn two_tiers_updated_in_turn_pick_what_fresh_builds_pick() {
    for (name, make) in strategies() {
        let n = 2_000;
        let all = endpoints(&set(n, true));
        // Two disjoint tiers, each in id order.
        let mut dc1: Vec<Endpoint> = all.iter().step_by(2).cloned().collect();
        let mut dc2: Vec<Endpoint> = all.iter().skip(1).step_by(2).cloned().collect();
        let strategy = make();
        let _ = strategy.build(&dc1);
        let _ = strategy.build(&dc2);
        let check = |tier: &[Endpoint], label: &str| {
            let stepwise = strategy.build(tier);
            let at_once = make().build(tier);
            assert_eq!(
                owners(stepwise.as_ref(), tier, 1 << 16),
                owners(at_once.as_ref(), tier, 1 << 16),
                "{name}, {label}"
            );
        };
        for round in 0..3 {
            dc1.remove(10 + round);
            check(&dc1, "dc1 after a removal");
            dc2.insert(0, Endpoint::fresh(inst(n + round, 3)));
            dc2.sort_by(|a, b| a.id().cmp(b.id()));
            check(&dc2, "dc2 after an addition");
        }
    }
}

#[test]
fn a_ring_that_shrinks_and_grows_across_its_layouts_stays_the_ring_of_its_set() {
    // From 1,200 instances down to 100 and back to 700 one at a time: the ring's chunk layout
    // changes on the way (rebuilt from scratch), and every step in between reuses the last ring.
    let full = set(1_200, true);
    let strategy = ConsistentHash::new();
    let mut now = full.clone();
    let _ = strategy.build(&endpoints(&now));
    let check = |now: &[ServiceInstance], stepwise: &dyn Picker| {
        let eps = endpoints(now);
        let at_once = ConsistentHash::new().build(&eps);
        assert_eq!(
            owners(stepwise, &eps, 1 << 16),
            owners(at_once.as_ref(), &eps, 1 << 16),
            "{} instances",
            now.len()
        );
    };
    while now.len() > 100 {
        now.remove(now.len() / 2);
        let picker = strategy.build(&endpoints(&now));
        if now.len() % 250 == 0 {
            check(&now, picker.as_ref());
        }
    }
    for i in 0..600 {
        let at = now.partition_point(|x| x.id() < full[i * 2].id());
        if now.get(at).map(|x| x.id()) != Some(full[i * 2].id()) {
            now.insert(at, full[i * 2].clone());
        }
        let picker = strategy.build(&endpoints(&now));
        if i % 150 == 0 {
            check(&now, picker.as_ref());
        }
    }
    let picker = strategy.build(&endpoints(&now));
    check(&now, picker.as_ref());
}
