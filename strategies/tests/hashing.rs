//! Consistent hashing (ring and Maglev): stability, balance, disruption bounds, keyless picks.
#![cfg(all(feature = "consistent-hash", feature = "maglev"))]

use std::collections::HashMap;

use waypost_core::{Balancer, PickContext, PickError, ServiceInstance, Strategy, WatchEvent};
use waypost_strategies::{ConsistentHash, Maglev};

fn inst(id: &str, weight: u32) -> ServiceInstance {
    ServiceInstance::builder("users", id)
        .host("10.0.0.1")
        .port(8080)
        .weight(weight)
        .build()
        .unwrap()
}

fn equal(n: usize) -> Vec<ServiceInstance> {
    (0..n).map(|i| inst(&format!("i{i:02}"), 1)).collect()
}

fn balancer(strategy: impl Strategy, set: Vec<ServiceInstance>) -> Balancer {
    let b = Balancer::new(strategy);
    b.apply(WatchEvent::Snapshot(set));
    b
}

fn owner(b: &Balancer, ctx: &PickContext<'_>) -> String {
    b.pick_with(ctx).unwrap().instance().id().to_string()
}

/// Which instance each of `keys` keys goes to.
fn assignment(b: &Balancer, keys: usize) -> Vec<String> {
    (0..keys)
        .map(|k| {
            owner(
                b,
                &PickContext::new().with_key(format!("key-{k}").as_bytes()),
            )
        })
        .collect()
}

fn shares(picks: &[String]) -> HashMap<String, f64> {
    let mut counts: HashMap<String, f64> = HashMap::new();
    for p in picks {
        *counts.entry(p.clone()).or_default() += 1.0;
    }
    counts.values_mut().for_each(|c| *c /= picks.len() as f64);
    counts
}

/// The hash whose Maglev slot is `slot` (slot = ⌊hash × M / 2⁶⁴⌋, as documented).
fn slot_hash(slot: u64, m: u64) -> u64 {
    (u128::from(slot) << 64).div_ceil(u128::from(m)) as u64
}

/// The owner of every entry of a Maglev table of size `m`.
fn table(b: &Balancer, m: u64) -> Vec<String> {
    (0..m)
        .map(|s| owner(b, &PickContext::new().with_hash(slot_hash(s, m))))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Ring hash

#[test]
fn ring_same_key_same_instance_in_every_balancer() {
    let a = balancer(ConsistentHash::new(), equal(20));
    let mut reversed = equal(20);
    reversed.reverse();
    let b = balancer(ConsistentHash::seeded(99), reversed);
    let keys_a = assignment(&a, 2_000);
    assert_eq!(keys_a, assignment(&a, 2_000), "a key moved between picks");
    assert_eq!(keys_a, assignment(&b, 2_000), "two balancers disagree");
    // And the keys do spread.
    assert_eq!(shares(&keys_a).len(), 20);
}

#[test]
fn ring_removing_one_of_n_moves_only_its_keys_about_one_nth() {
    const N: usize = 10;
    const KEYS: usize = 10_000;
    let b = balancer(ConsistentHash::new(), equal(N));
    let before = assignment(&b, KEYS);
    let gone = equal(N).remove(3);
    b.apply(WatchEvent::Removed(gone.clone()));
    let after = assignment(&b, KEYS);
    let mut moved = 0;
    for (x, y) in before.iter().zip(&after) {
        if x != y {
            moved += 1;
            assert_eq!(x, gone.id().as_str(), "a key of a remaining instance moved");
        }
        assert_ne!(y, gone.id().as_str());
    }
    let share = moved as f64 / KEYS as f64;
    assert!(
        (0.07..=0.13).contains(&share),
        "moved {share} of keys, expected about 1/{N}"
    );

    // Adding it back restores the original assignment exactly.
    b.apply(WatchEvent::Added(gone));
    assert_eq!(assignment(&b, KEYS), before);
}

#[test]
fn ring_adding_one_takes_about_one_n_plus_first_only_for_itself() {
    const N: usize = 10;
    const KEYS: usize = 10_000;
    let b = balancer(ConsistentHash::new(), equal(N));
    let before = assignment(&b, KEYS);
    b.apply(WatchEvent::Added(inst("new", 1)));
    let after = assignment(&b, KEYS);
    let moved: Vec<_> = before.iter().zip(&after).filter(|(x, y)| x != y).collect();
    assert!(moved.iter().all(|(_, y)| y.as_str() == "new"));
    let share = moved.len() as f64 / KEYS as f64;
    assert!(
        (0.06..=0.12).contains(&share),
        "moved {share}, expected about 1/11"
    );
}

#[test]
fn ring_weights_skew_the_share_of_keys() {
    let set = vec![inst("w1", 1), inst("w2", 2), inst("w3", 3), inst("w4", 4)];
    let b = balancer(ConsistentHash::new(), set);
    let s = shares(&assignment(&b, 40_000));
    for (id, w) in [("w1", 1.0), ("w2", 2.0), ("w3", 3.0), ("w4", 4.0)] {
        let want = w / 10.0;
        let got = s[id];
        assert!(
            (got - want).abs() <= 0.2 * want,
            "{id}: share {got}, want about {want}"
        );
    }
    assert!(
        s["w1"] < s["w2"] && s["w2"] < s["w3"] && s["w3"] < s["w4"],
        "{s:?}"
    );
}

#[test]
fn ring_without_a_key_picks_at_random_in_proportion_to_weight() {
    let set = vec![inst("light", 1), inst("heavy", 3)];
    let run = |seed| {
        let b = balancer(ConsistentHash::seeded(seed), set.clone());
        (0..20_000)
            .map(|_| owner(&b, &PickContext::new()))
            .collect::<Vec<_>>()
    };
    let picks = run(5);
    assert_eq!(picks, run(5), "a seeded balancer repeats itself");
    let s = shares(&picks);
    assert!((0.70..=0.80).contains(&s["heavy"]), "{s:?}");
}

#[test]
fn ring_size_is_bounded_and_every_instance_keeps_a_point() {
    // 200 instances × weight 50 × 160 points would be 1.6 M points; the limit is 2,000.
    let set: Vec<_> = (0..200).map(|i| inst(&format!("i{i:03}"), 50)).collect();
    let b = balancer(ConsistentHash::new().max_points(2_000), set);
    let s = shares(&assignment(&b, 40_000));
    assert!(s.len() >= 190, "only {} instances own keys", s.len());
}

#[test]
fn hashing_strategies_on_an_empty_set_report_no_instances() {
    for s in [
        Box::new(ConsistentHash::new()) as Box<dyn Strategy>,
        Box::new(Maglev::new()),
    ] {
        let b = Balancer::new(s);
        let err = b.pick_with(&PickContext::new().with_key(b"k")).unwrap_err();
        assert!(matches!(err, PickError::NoInstances { .. }), "{err:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Maglev

#[test]
fn maglev_same_key_same_instance_in_every_balancer() {
    let a = balancer(Maglev::new(), equal(20));
    let b = balancer(Maglev::seeded(3), equal(20));
    let keys = assignment(&a, 2_000);
    assert_eq!(keys, assignment(&b, 2_000));
    assert_eq!(shares(&keys).len(), 20);
}

#[test]
fn maglev_table_is_balanced_by_weight() {
    let m = u64::from(Maglev::DEFAULT_TABLE_SIZE);
    let weights = [1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let set: Vec<_> = weights
        .iter()
        .map(|&w| inst(&format!("w{w:02}"), w))
        .collect();
    let b = balancer(Maglev::new(), set);
    let s = shares(&table(&b, m));
    let total: u32 = weights.iter().sum();
    for w in weights {
        let want = f64::from(w) / f64::from(total);
        let got = s[&format!("w{w:02}")];
        assert!(
            (got - want).abs() <= 0.02 * want,
            "weight {w}: {got} of the table, want {want}"
        );
    }

    // Equal weights: each of 7 instances holds 1/7 of the table, to within 1 %.
    let b = balancer(Maglev::new(), equal(7));
    for (id, got) in shares(&table(&b, m)) {
        assert!((got - 1.0 / 7.0).abs() <= 0.01 / 7.0, "{id}: {got}");
    }
}

#[test]
fn maglev_removing_one_of_n_disrupts_little_beyond_its_own_entries() {
    const N: usize = 10;
    let m = 10_007u64;
    let b = balancer(Maglev::new().table_size(10_000), equal(N));
    let before = table(&b, m);
    let gone = equal(N).remove(4);
    b.apply(WatchEvent::Removed(gone.clone()));
    let after = table(&b, m);
    let own = before
        .iter()
        .filter(|o| o.as_str() == gone.id().as_str())
        .count();
    let others_moved = before
        .iter()
        .zip(&after)
        .filter(|(x, y)| x != y && x.as_str() != gone.id().as_str())
        .count();
    let own_share = own as f64 / m as f64;
    let extra = others_moved as f64 / m as f64;
    assert!(
        (own_share - 0.1).abs() < 0.01,
        "the removed instance held {own_share}"
    );
    // Maglev trades a little disruption for balance; the paper measures a few percent.
    assert!(
        extra < 0.05,
        "{extra} of the table moved between remaining instances"
    );
    assert!(after.iter().all(|o| o.as_str() != gone.id().as_str()));
}

/// A build reuses the last build's permutations; after adds, removes and a weight change, the
/// table must still be the one a balancer that never saw the earlier sets builds.
#[test]
fn maglev_after_updates_serves_the_table_of_a_fresh_build() {
    let m = 10_007u64;
    let weighted = |n: usize| -> Vec<ServiceInstance> {
        (0..n)
            .map(|i| inst(&format!("i{i:03}"), 1 + (i % 5) as u32))
            .collect()
    };
    let all = weighted(120);
    let updated = balancer(Maglev::new().table_size(10_000), all[..100].to_vec());
    updated.apply_all([
        WatchEvent::Removed(all[0].clone()),
        WatchEvent::Removed(all[57].clone()),
        WatchEvent::Added(all[110].clone()),
    ]);
    updated.apply(WatchEvent::Added(all[105].clone()));
    updated.apply(WatchEvent::Updated(inst("i042", 9)));
    updated.apply(WatchEvent::Removed(all[99].clone()));

    let mut last: Vec<ServiceInstance> = all[..100]
        .iter()
        .filter(|i| !["i000", "i057", "i099"].contains(&i.id().as_str()))
        .cloned()
        .chain([all[105].clone(), all[110].clone()])
        .map(|i| {
            if i.id().as_str() == "i042" {
                inst("i042", 9)
            } else {
                i
            }
        })
        .collect();
    last.reverse();
    let fresh = balancer(Maglev::new().table_size(10_000), last);
    let table_updated = table(&updated, m);
    assert_eq!(table_updated, table(&fresh, m));
    // The weight change took: i042 (weight 3 before) now holds a weight-9 share.
    let share = shares(&table_updated)["i042"];
    assert!(share > 8.0 * share_of_weight_1(&table_updated), "{share}");
}

/// The mean share of the table held by the weight-1 instances (ids i000, i005, ...).
fn share_of_weight_1(table: &[String]) -> f64 {
    let s = shares(table);
    let ones: Vec<f64> = s
        .iter()
        .filter(|(id, _)| id[1..].parse::<usize>().is_ok_and(|i| i % 5 == 0))
        .map(|(_, &v)| v)
        .collect();
    ones.iter().sum::<f64>() / ones.len() as f64
}

#[test]
fn maglev_without_a_key_picks_at_random_in_proportion_to_weight() {
    let set = vec![inst("light", 1), inst("heavy", 3)];
    let run = |seed| {
        let b = balancer(Maglev::seeded(seed), set.clone());
        (0..20_000)
            .map(|_| owner(&b, &PickContext::new()))
            .collect::<Vec<_>>()
    };
    let picks = run(11);
    assert_eq!(picks, run(11));
    let s = shares(&picks);
    assert!((0.72..=0.78).contains(&s["heavy"]), "{s:?}");
}

#[test]
fn maglev_table_size_is_a_prime_at_least_the_one_asked() {
    assert_eq!(Maglev::new().size(), 65_537);
    assert_eq!(Maglev::new().table_size(0).size(), 2);
    assert_eq!(Maglev::new().table_size(100).size(), 101);
    assert_eq!(Maglev::new().table_size(u32::MAX).size(), 67_108_879);
    // More instances than entries: every entry still has an owner, some instances none.
    let b = balancer(Maglev::new().table_size(5), equal(8));
    let owners = table(&b, 5);
    assert_eq!(owners.len(), 5);
}

#[test]
fn ring_over_its_point_limit_still_moves_only_the_removed_instances_keys() {
    // 100 instances of weight 10 at 160 points per unit would be 160,000 points; the limit
    // allows 10 per unit, and one instance fewer still rounds to 10, so unchanged instances keep
    // their points.
    let set: Vec<_> = (0..100).map(|i| inst(&format!("i{i:03}"), 10)).collect();
    let b = balancer(ConsistentHash::new().max_points(10_000), set.clone());
    let before = assignment(&b, 20_000);
    b.apply(WatchEvent::Removed(set[42].clone()));
    let after = assignment(&b, 20_000);
    let moved = before.iter().zip(&after).filter(|(x, y)| x != y);
    assert!(moved.clone().all(|(x, _)| x == "i042"));
    let share = moved.count() as f64 / 20_000.0;
    assert!((0.003..=0.02).contains(&share), "{share}");
}

#[test]
fn ring_built_step_by_step_equals_ring_built_at_once() {
    // Built incrementally (reusing the last ring) or from scratch, the ring is the same.
    let set: Vec<_> = (0..30)
        .map(|i| inst(&format!("i{i:02}"), 1 + i % 4))
        .collect();
    let stepwise = balancer(ConsistentHash::new(), set[..10].to_vec());
    for i in set[10..].iter() {
        stepwise.apply(WatchEvent::Added(i.clone()));
    }
    stepwise.apply(WatchEvent::Removed(set[3].clone()));
    stepwise.apply(WatchEvent::Updated(
        set[7].to_builder().weight(9).build().unwrap(),
    ));
    let mut end = set.clone();
    end[7] = set[7].to_builder().weight(9).build().unwrap();
    end.remove(3);
    let at_once = balancer(ConsistentHash::new(), end);
    assert_eq!(assignment(&stepwise, 20_000), assignment(&at_once, 20_000));
}

#[test]
fn ring_built_from_unsorted_endpoints_equals_ring_built_from_sorted_ones() {
    // Balancers pass endpoints sorted by id; a direct caller may not. Reusing the last ring must
    // work either way (it matches instances by id, not by position).
    use std::sync::Arc;
    use waypost_core::{Endpoint, EndpointState};
    let endpoints = |set: &[ServiceInstance]| -> Vec<Endpoint> {
        set.iter()
            .map(|i| Endpoint::new(i.clone(), Arc::new(EndpointState::new())))
            .collect()
    };
    let owners = |picker: &dyn waypost_core::Picker, eps: &[Endpoint]| -> Vec<String> {
        (0..5_000u64)
            .map(|k| {
                let ctx = PickContext::new().with_hash(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                eps[picker.pick(eps, &ctx).unwrap()].id().to_string()
            })
            .collect()
    };
    let set: Vec<_> = (0..40)
        .map(|i| inst(&format!("i{i:02}"), 1 + i % 3))
        .collect();
    let mut shuffled = set.clone();
    shuffled.reverse();
    shuffled.swap(3, 17);

    let strategy = ConsistentHash::new();
    let _ = strategy.build(&endpoints(&shuffled[5..]));
    let _ = strategy.build(&endpoints(&shuffled[..30]));
    let eps = endpoints(&shuffled[2..]);
    let stepwise = strategy.build(&eps);

    let mut sorted = shuffled[2..].to_vec();
    sorted.sort_by(|a, b| a.id().cmp(b.id()));
    let sorted_eps = endpoints(&sorted);
    let at_once = ConsistentHash::new().build(&sorted_eps);
    assert_eq!(
        owners(stepwise.as_ref(), &eps),
        owners(at_once.as_ref(), &sorted_eps)
    );
}
