//! Retries (`Balancer::pick_excluding`): every strategy answers "the next candidate after
//! these" by its own rule. Hashing retries go to the next instance on the ring or in the table,
//! the same on every client; round robin takes one step of its rotation; weighted strategies
//! keep the weights of the instances left; load-aware ones choose among those left; the
//! resilience layer judges ejection on its own clock.
#![cfg(all(
    feature = "round-robin",
    feature = "random",
    feature = "weighted-round-robin",
    feature = "least-connections",
    feature = "weighted-random",
    feature = "p2c",
    feature = "p2c-ewma",
    feature = "consistent-hash",
    feature = "maglev",
    feature = "resilience"
))]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use waypost_core::{
    clock_nanos, Balancer, InstanceId, PickContext, PickGuard, ServiceInstance, Strategy,
    WatchEvent,
};
use waypost_strategies::resilience::{ManualClock, Resilient};
use waypost_strategies::{
    ConsistentHash, LeastConnections, Maglev, P2c, P2cEwma, Random, RoundRobin, WeightedRandom,
    WeightedRoundRobin,
};

fn inst(id: &str, weight: u32) -> ServiceInstance {
    ServiceInstance::builder("users", id)
        .host("10.0.0.1")
        .port(8080)
        .weight(weight)
        .build()
        .unwrap()
}

/// `i00`, `i01`, ... with `weights`.
fn weighted(weights: &[u32]) -> Vec<ServiceInstance> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| inst(&format!("i{i:02}"), w))
        .collect()
}

fn equal(n: usize) -> Vec<ServiceInstance> {
    weighted(&vec![1; n])
}

fn balancer(strategy: impl Strategy, set: Vec<ServiceInstance>) -> Balancer {
    let b = Balancer::new(strategy);
    b.apply(WatchEvent::Snapshot(set));
    b
}

fn name(i: usize) -> String {
    format!("i{i:02}")
}

fn id_of(g: &PickGuard) -> String {
    g.instance().id().to_string()
}

/// A retry of `ctx` after `tried`: the instance it goes to (the call is dropped).
fn retry(b: &Balancer, ctx: &PickContext<'_>, tried: &[&str]) -> String {
    let tried: Vec<InstanceId> = tried.iter().map(|t| InstanceId::new(t).unwrap()).collect();
    id_of(&b.pick_excluding(ctx, &tried).unwrap())
}

/// How often `n` retries after `tried` go to each instance.
fn retries(b: &Balancer, tried: &[&str], n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        *counts
            .entry(retry(b, &PickContext::new(), tried))
            .or_default() += 1;
    }
    counts
}

fn owner(b: &Balancer, ctx: &PickContext<'_>) -> String {
    id_of(&b.pick_with(ctx).unwrap())
}

fn key(k: usize) -> PickContext<'static> {
    PickContext::new().with_hash((k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

// ---------------------------------------------------------------------------------------------
// Round robin

#[test]
fn round_robin_retries_the_next_in_turn_and_the_rotation_goes_on_after_it() {
    let b = balancer(RoundRobin::new(), equal(8));
    let index = |id: &str| id[1..].parse::<usize>().unwrap();
    let x = index(&owner(&b, &PickContext::new()));
    let at = |k: usize| name((x + k) % 8);
    // The call to x failed; the next four in turn were tried too (more than any number of
    // re-picks would skip).
    let tried: Vec<String> = (0..5).map(at).collect();
    let tried: Vec<&str> = tried.iter().map(String::as_str).collect();
    assert_eq!(retry(&b, &PickContext::new(), &tried), at(5));
    // The retry was one turn of the rotation: the next request gets the one after it, and a
    // whole round from there covers every instance once.
    let round: Vec<String> = (0..8).map(|_| owner(&b, &PickContext::new())).collect();
    let expected: Vec<String> = (6..14).map(at).collect();
    assert_eq!(round, expected);
    // Everyone tried: the balancer's fall-back, an excluded one rather than nothing.
    let all: Vec<String> = (0..8).map(name).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    assert!(all.contains(&retry(&b, &PickContext::new(), &all).as_str()));
}

#[test]
fn weighted_round_robin_retries_follow_the_cycle_without_the_tried_instances() {
    // Weights 6, 1, 2: with i00 tried, every three retries are one lap of the cycle's other
    // entries, one i01 and two i02, whatever the cycle's starting point.
    let b = balancer(WeightedRoundRobin::new(), weighted(&[6, 1, 2]));
    let c = retries(&b, &["i00"], 300);
    assert_eq!(c, BTreeMap::from([(name(1), 100), (name(2), 200)]));
    // The same on the stride fallback (a cycle too long for a table): the heavy instance owns
    // all but 3 of 100,003 positions, so the retry chooses among the rest by weight.
    let b = balancer(WeightedRoundRobin::new(), weighted(&[100_000, 1, 2]));
    assert_eq!(WeightedRoundRobin::schedule([100_000, 1, 2]), None);
    let c = retries(&b, &["i00"], 3_000);
    assert!(!c.contains_key(&name(0)), "{c:?}");
    let light = c.get(&name(1)).copied().unwrap_or(0);
    assert!((800..1_200).contains(&light), "{c:?}");
}

// ---------------------------------------------------------------------------------------------
// Random choices

#[test]
fn random_retries_spread_evenly_over_the_rest() {
    let b = balancer(Random::seeded(1), equal(4));
    let c = retries(&b, &["i00"], 30_000);
    assert!(!c.contains_key(&name(0)), "{c:?}");
    for i in 1..4 {
        assert!(c[&name(i)].abs_diff(10_000) < 500, "{c:?}");
    }
    // Nearly everyone tried: the draws miss, the count finds the one left.
    let b = balancer(Random::seeded(2), equal(64));
    let tried: Vec<String> = (0..63).map(name).collect();
    let tried: Vec<&str> = tried.iter().map(String::as_str).collect();
    assert_eq!(
        retries(&b, &tried, 50).keys().collect::<Vec<_>>(),
        [&name(63)]
    );
}

#[test]
fn weighted_random_retries_keep_the_weights_of_the_rest() {
    let b = balancer(WeightedRandom::seeded(3), weighted(&[1, 2, 3, 4]));
    let c = retries(&b, &["i03"], 60_000);
    assert!(!c.contains_key(&name(3)), "{c:?}");
    for (i, want) in [10_000, 20_000, 30_000].into_iter().enumerate() {
        assert!(c[&name(i)].abs_diff(want) < 800, "{c:?}");
    }
    // The heavy one tried: the rest (weights 1, 2, 3 of 100) are mostly found by counting.
    let b = balancer(WeightedRandom::seeded(4), weighted(&[1, 2, 3, 94]));
    let c = retries(&b, &["i03"], 6_000);
    for (i, want) in [1_000, 2_000, 3_000].into_iter().enumerate() {
        assert!(c[&name(i)].abs_diff(want) < 250, "{c:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Load-aware

#[test]
fn least_connections_retries_the_least_loaded_per_weight_of_the_rest() {
    // i00 idle but tried; i01 2 calls on weight 4 (0.5 each), i02 1 call on weight 1.
    let b = balancer(LeastConnections::seeded(5), weighted(&[1, 4, 1]));
    let eps = b.endpoints();
    for _ in 0..2 {
        eps[1].state().begin();
    }
    eps[2].state().begin();
    for _ in 0..50 {
        assert_eq!(retry(&b, &PickContext::new(), &["i00"]), name(1));
    }
}

#[test]
fn p2c_retries_compare_two_of_the_rest() {
    // i00 idle but tried. Of the two left both are candidates: i01 (3 calls on weight 5) is
    // less loaded per weight than i02 (1 call on weight 1).
    let b = balancer(P2c::seeded(6), weighted(&[1, 5, 1]));
    let eps = b.endpoints();
    for _ in 0..3 {
        eps[1].state().begin();
    }
    eps[2].state().begin();
    for _ in 0..200 {
        assert_eq!(retry(&b, &PickContext::new(), &["i00"]), name(1));
    }
    // All idle: the candidates are drawn in proportion to weight among the rest (1 : 3).
    let b = balancer(P2c::seeded(7), weighted(&[1, 1, 3]));
    let c = retries(&b, &["i00"], 20_000);
    assert!(c[&name(2)].abs_diff(15_000) < 400, "{c:?}");
}

#[test]
fn p2c_ewma_retries_the_cheaper_of_the_rest() {
    let b = balancer(P2cEwma::seeded(8), equal(3));
    let now = clock_nanos();
    for (ep, ms) in b.endpoints().iter().zip([1, 50, 5]) {
        ep.state()
            .observe_latency_at(Duration::from_millis(ms), now);
    }
    // i00, the fastest, was tried: of the two left, the faster.
    for _ in 0..200 {
        assert_eq!(retry(&b, &PickContext::new(), &["i00"]), name(2));
    }
}

// ---------------------------------------------------------------------------------------------
// Hashing

#[test]
fn ring_retries_go_where_the_key_would_go_without_the_tried_instances() {
    let a = balancer(ConsistentHash::new(), equal(20));
    let mut reversed = equal(20);
    reversed.reverse();
    let b = balancer(ConsistentHash::seeded(99), reversed);
    // The ring of each set with one instance left out, as a reference.
    let without: BTreeMap<String, Balancer> = (0..20)
        .map(|i| {
            let mut set = equal(20);
            set.remove(i);
            (name(i), balancer(ConsistentHash::new(), set))
        })
        .collect();
    let mut targets = BTreeSet::new();
    for k in 0..2_000 {
        let ctx = key(k);
        let home = owner(&a, &ctx);
        assert_eq!(owner(&b, &ctx), home);
        let next = retry(&a, &ctx, &[&home]);
        assert_ne!(next, home);
        assert_eq!(retry(&b, &ctx, &[&home]), next, "two clients disagree");
        assert_eq!(owner(&without[&home], &ctx), next, "key {k}");
        // A second retry walks on, past both.
        let third = retry(&a, &ctx, &[&home, &next]);
        assert!(third != home && third != next);
        assert_eq!(retry(&b, &ctx, &[&next, &home]), third);
        targets.insert((home, next));
    }
    // The keys of one instance retry on many others (its points are spread over the ring).
    let from_one = targets.iter().filter(|(h, _)| h == &name(0)).count();
    assert!(from_one >= 10, "{targets:?}");
}

#[test]
fn maglev_retries_go_to_the_same_next_instance_on_every_client_and_spread_by_weight() {
    // One heavy instance (weight 10) among 19 of weight 1.
    let mut weights = vec![1; 20];
    weights[0] = 10;
    let a = balancer(Maglev::new(), weighted(&weights));
    let mut reversed = weighted(&weights);
    reversed.reverse();
    let b = balancer(Maglev::seeded(3), reversed);
    let mut by_home: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut to_heavy, mut from_light) = (0, 0);
    for k in 0..4_000 {
        let ctx = key(k);
        let home = owner(&a, &ctx);
        let next = retry(&a, &ctx, &[&home]);
        assert_ne!(next, home);
        assert_eq!(retry(&b, &ctx, &[&home]), next, "two clients disagree");
        assert_eq!(retry(&a, &ctx, &[&home]), next, "a retry moved");
        if home != name(0) {
            from_light += 1;
            to_heavy += usize::from(next == name(0));
        }
        by_home.entry(home).or_default().insert(next);
    }
    // The heavy instance owns 10 of the 28 weights left: its share of the retries.
    let share = to_heavy as f64 / from_light as f64;
    assert!((0.30..0.42).contains(&share), "{share}");
    // And the keys of any one instance retry on many others.
    for (home, nexts) in &by_home {
        assert!(nexts.len() >= 8, "{home}: {nexts:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Through the resilience layer

/// A key whose instance is `id`.
fn key_of(b: &Balancer, id: &str) -> PickContext<'static> {
    (0..100_000)
        .map(key)
        .find(|ctx| owner(b, ctx) == id)
        .unwrap()
}

#[test]
fn a_retry_through_the_resilience_layer_judges_ejection_on_the_layer_s_clock() {
    // The layer's clock runs 1,000 s ahead of the wall clock, so the two disagree about when
    // an ejection ends.
    let clock = ManualClock::at(clock_nanos() + 1_000_000_000_000);
    let b = balancer(
        Resilient::new(ConsistentHash::new()).clock(clock.clock()),
        equal(6),
    );
    let ctx = key(1);
    let home = owner(&b, &ctx);
    let next = retry(&b, &ctx, &[&home]);
    // Eject `next` (five failures, noticed by a pick).
    let theirs = key_of(&b, &next);
    for _ in 0..5 {
        b.pick_with(&theirs).unwrap().failure();
    }
    assert_ne!(owner(&b, &theirs), next);
    let until = b.endpoints()[next[1..].parse::<usize>().unwrap()]
        .state()
        .ejected_until();
    assert_eq!(until, clock.now() + 30_000_000_000);
    // Ejected on the layer's clock: the retry walks on past it.
    let meanwhile = retry(&b, &ctx, &[&home]);
    assert!(meanwhile != next && meanwhile != home, "{meanwhile}");
    // Back on the layer's clock (while the wall clock is still 1,000 s before the ejection's
    // end): the retry goes to the ring's next instance again.
    clock.advance(Duration::from_secs(30));
    assert!(clock_nanos() < until);
    assert_eq!(retry(&b, &ctx, &[&home]), next);
}

#[test]
fn a_retry_through_the_resilience_layer_keeps_the_inner_strategy_s_rule() {
    // Round robin inside: the retry is one step of the rotation, as without the layer.
    let b = balancer(Resilient::new(RoundRobin::new()), equal(4));
    let x: usize = owner(&b, &PickContext::new())[1..].parse().unwrap();
    let at = |k: usize| name((x + k) % 4);
    assert_eq!(retry(&b, &PickContext::new(), &[&at(0), &at(1)]), at(2));
    assert_eq!(owner(&b, &PickContext::new()), at(3));
    // Zones: with the caller's zone all tried, the retry goes to another zone.
    let zoned = |id: &str, zone: &str| inst(id, 1).to_builder().zone(zone).build().unwrap();
    let b = balancer(
        Resilient::new(RoundRobin::new()),
        vec![zoned("a1", "a"), zoned("a2", "a"), zoned("b1", "b")],
    );
    let in_a = PickContext::new().with_zone("a");
    assert_eq!(retry(&b, &in_a, &["a1"]), "a2");
    assert_eq!(retry(&b, &in_a, &["a1", "a2"]), "b1");
}
