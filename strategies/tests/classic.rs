//! The classic strategies (round-robin, random, weighted round-robin, least-connections) and
//! weighted random: distributions, fairness across updates, tie-breaking, and that no pick is
//! ever out of range or lands on a removed instance.

use std::collections::HashMap;

use proptest::prelude::*;
use waypost_core::{
    Balancer, Endpoint, PickContext, Picker, ServiceInstance, Strategy, WatchEvent,
};

fn instance(id: &str, weight: u32) -> ServiceInstance {
    ServiceInstance::builder("users", id)
        .host("10.0.0.1")
        .port(8080)
        .weight(weight)
        .build()
        .unwrap()
}

/// Instances `i000`, `i001`, ... (sorted by id in that order) with `weights`.
fn instances(weights: &[u32]) -> Vec<ServiceInstance> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| instance(&format!("i{i:03}"), w))
        .collect()
}

fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
    instances(weights)
        .into_iter()
        .map(Endpoint::fresh)
        .collect()
}

/// `count` picks from `picker`, as indices.
fn run(picker: &dyn Picker, eps: &[Endpoint], count: usize) -> Vec<usize> {
    (0..count)
        .map(|_| picker.pick(eps, &PickContext::new()).unwrap())
        .collect()
}

fn counts(seq: &[usize], n: usize) -> Vec<u64> {
    let mut c = vec![0u64; n];
    for &i in seq {
        c[i] += 1;
    }
    c
}

/// Picks through a balancer, released at once, counted by instance id.
fn tally(balancer: &Balancer, picks: usize) -> HashMap<String, u64> {
    let mut by_id = HashMap::new();
    for _ in 0..picks {
        let guard = balancer.pick().unwrap();
        *by_id.entry(guard.instance().id().to_string()).or_insert(0) += 1;
        guard.success();
    }
    by_id
}

/// Every strategy of this crate's file set that is compiled in, fresh, seeded where random.
#[allow(clippy::vec_init_then_push)] // each push is behind its own feature
fn strategies() -> Vec<Box<dyn Strategy>> {
    let mut all: Vec<Box<dyn Strategy>> = Vec::new();
    #[cfg(feature = "round-robin")]
    all.push(Box::new(waypost_strategies::RoundRobin::new()));
    #[cfg(feature = "random")]
    all.push(Box::new(waypost_strategies::Random::seeded(1)));
    #[cfg(feature = "weighted-round-robin")]
    all.push(Box::new(waypost_strategies::WeightedRoundRobin::new()));
    #[cfg(feature = "least-connections")]
    all.push(Box::new(waypost_strategies::LeastConnections::seeded(2)));
    #[cfg(feature = "weighted-random")]
    all.push(Box::new(waypost_strategies::WeightedRandom::seeded(3)));
    #[cfg(feature = "p2c")]
    all.push(Box::new(waypost_strategies::P2c::seeded(4)));
    #[cfg(feature = "p2c-ewma")]
    all.push(Box::new(waypost_strategies::P2cEwma::seeded(5)));
    all
}

#[test]
fn names_match_by_name() {
    let all = strategies();
    assert!(!all.is_empty());
    for s in all {
        let by_name = waypost_strategies::by_name(s.name()).expect("by_name knows every type");
        assert_eq!(by_name.name(), s.name());
        assert!(waypost_strategies::names().contains(&s.name()));
    }
}

#[test]
fn empty_gives_none_and_one_gives_zero() {
    for s in strategies() {
        let picker = s.build(&[]);
        assert_eq!(picker.pick(&[], &PickContext::new()), None, "{}", s.name());
        let one = endpoints(&[5]);
        let picker = s.build(&one);
        assert_eq!(counts(&run(&*picker, &one, 10), 1), [10], "{}", s.name());
    }
}

#[test]
fn removed_instances_are_never_picked() {
    for s in strategies() {
        let name = s.name().to_owned();
        let balancer = Balancer::new(s);
        let set = instances(&[1, 2, 3, 4, 5]);
        balancer.apply(WatchEvent::Snapshot(set.clone()));
        // Load every other instance, so that a load-aware strategy that still saw the removed
        // (idle) instance would prefer it.
        let _held: Vec<_> = (0..20).map(|_| balancer.pick().unwrap()).collect();
        balancer.apply(WatchEvent::Removed(set[2].clone()));
        balancer.apply(WatchEvent::Removed(set[4].clone()));
        let seen = tally(&balancer, 2_000);
        assert!(!seen.contains_key("i002"), "{name}: {seen:?}");
        assert!(!seen.contains_key("i004"), "{name}: {seen:?}");
        assert_eq!(seen.values().sum::<u64>(), 2_000);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the weights, sizes and loads, and across rebuilds that shrink or grow the set,
    /// a pick is an index into the slice the picker was built for.
    #[test]
    fn picks_are_always_in_range(
        sets in prop::collection::vec(
            prop::collection::vec((1u32..=1_000_000, 0u64..4), 0..24), 1..5),
    ) {
        for s in strategies() {
            for set in &sets {
                let weights: Vec<u32> = set.iter().map(|&(w, _)| w).collect();
                let eps = endpoints(&weights);
                for (ep, &(_, load)) in eps.iter().zip(set) {
                    for _ in 0..load {
                        ep.state().begin();
                    }
                }
                let picker = s.build(&eps);
                for _ in 0..50 {
                    let picked = picker.pick(&eps, &PickContext::new());
                    if eps.is_empty() {
                        prop_assert_eq!(picked, None);
                    } else {
                        let in_range = matches!(picked, Some(i) if i < eps.len());
                        prop_assert!(in_range, "{}: {:?}", s.name(), picked);
                    }
                }
            }
        }
    }
}

#[cfg(feature = "round-robin")]
mod round_robin {
    use super::*;
    use std::sync::Arc;
    use waypost_strategies::RoundRobin;

    #[test]
    fn every_window_of_n_picks_holds_each_instance_once() {
        let eps = endpoints(&[1, 5, 1, 9, 1]);
        let picker = RoundRobin::new().build(&eps);
        let seq = run(&*picker, &eps, 50);
        for window in seq.windows(5) {
            let mut w = window.to_vec();
            w.sort_unstable();
            assert_eq!(w, [0, 1, 2, 3, 4], "{seq:?}");
        }
    }

    #[test]
    fn fair_after_shrink_and_grow() {
        let balancer = Balancer::new(RoundRobin::new());
        let all = instances(&[1; 7]);
        balancer.apply(WatchEvent::Snapshot(all[..5].to_vec()));
        let seen = tally(&balancer, 500);
        assert_eq!(seen.len(), 5);
        assert!(seen.values().all(|&c| c == 100), "{seen:?}");

        // Shrink: the position may be beyond the new end; it must wrap, not skip or fail.
        balancer.apply(WatchEvent::Removed(all[3].clone()));
        balancer.apply(WatchEvent::Removed(all[4].clone()));
        let seen = tally(&balancer, 300);
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.values().all(|&c| c == 100), "{seen:?}");

        // Grow past the original size.
        balancer.apply(WatchEvent::Added(all[3].clone()));
        balancer.apply(WatchEvent::Added(all[4].clone()));
        balancer.apply(WatchEvent::Added(all[5].clone()));
        balancer.apply(WatchEvent::Added(all[6].clone()));
        let seen = tally(&balancer, 700);
        assert_eq!(seen.len(), 7, "{seen:?}");
        assert!(seen.values().all(|&c| c == 100), "{seen:?}");
    }

    #[test]
    fn position_survives_an_update() {
        let strategy = RoundRobin::new();
        let three = endpoints(&[1, 1, 1]);
        let four = endpoints(&[1, 1, 1, 1]);
        // Alternate between a set of three and of four, one pick per rebuild: every pick
        // continues the rotation from the previous one (a picker-local counter would restart).
        let mut prev = (run(&*strategy.build(&three), &three, 1)[0], 3);
        for k in 0..20 {
            let eps = if k % 2 == 0 { &four } else { &three };
            let picked = strategy.build(eps).pick(eps, &PickContext::new()).unwrap();
            assert_eq!(picked, (prev.0 + 1) % prev.1 % eps.len(), "pick {k}");
            prev = (picked, eps.len());
        }
    }

    #[test]
    fn a_position_from_a_larger_set_stays_in_range() {
        let strategy = RoundRobin::new();
        let big = endpoints(&[1; 100]);
        let picker = strategy.build(&big);
        // Move the position somewhere in 0..100, most likely beyond 3.
        let _ = run(&*picker, &big, 97);
        let small = endpoints(&[1; 3]);
        let picker = strategy.build(&small);
        let seq = run(&*picker, &small, 300);
        assert_eq!(counts(&seq, 3), [100, 100, 100]);
    }

    #[test]
    fn threads_picking_at_once_stay_fair() {
        let strategy = RoundRobin::new();
        let eps = Arc::new(endpoints(&[1; 4]));
        let picker: Arc<dyn Picker> = Arc::from(strategy.build(&eps));
        let per_thread: Vec<Vec<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (picker, eps) = (picker.clone(), eps.clone());
                    s.spawn(move || counts(&run(&*picker, &eps, 4_000), 4))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let total: Vec<u64> = (0..4)
            .map(|i| per_thread.iter().map(|c| c[i]).sum())
            .collect();
        // Each thread's picks rotate exactly unless threads share a stripe; either way the
        // total is within a few picks of even.
        for c in &total {
            assert!(c.abs_diff(4_000) <= 16, "{total:?}");
        }
    }
}

#[cfg(feature = "random")]
mod random {
    use super::*;
    use waypost_strategies::Random;

    #[test]
    fn uniform_by_chi_square() {
        let eps = endpoints(&[1, 10, 100, 1, 1, 1, 1, 1, 1, 1]);
        let picker = Random::seeded(0xC0FFEE).build(&eps);
        let n = 100_000;
        let c = counts(&run(&*picker, &eps, n), eps.len());
        let expected = n as f64 / eps.len() as f64;
        let chi2: f64 = c
            .iter()
            .map(|&o| (o as f64 - expected).powi(2) / expected)
            .sum();
        // 9 degrees of freedom: P(chi² > 27.88) = 0.001. Weights must not matter.
        assert!(chi2 < 27.88, "chi² = {chi2}, counts {c:?}");
    }

    #[test]
    fn seeded_is_reproducible() {
        let eps = endpoints(&[1; 16]);
        let a = run(&*Random::seeded(9).build(&eps), &eps, 100);
        let b = run(&*Random::seeded(9).build(&eps), &eps, 100);
        let c = run(&*Random::seeded(10).build(&eps), &eps, 100);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}

#[cfg(feature = "weighted-round-robin")]
mod weighted_round_robin {
    use super::*;
    use std::sync::Arc;
    use waypost_strategies::WeightedRoundRobin;

    fn weight_sets() -> Vec<Vec<u32>> {
        vec![
            vec![1, 3],
            vec![1, 2, 3],
            vec![5, 1, 1],
            (1..=10).collect(),
            vec![1, 1, 1, 1],
            vec![10, 1],
            vec![3, 7, 11, 2, 9],
            vec![100, 100, 100],
            (0..100).map(|i| i % 10 + 1).collect(),
            (0..37).map(|i| (i * i) % 23 + 1).collect(),
            // Stride fallback: W above the table's cap ...
            vec![1_000_000, 1],
            vec![70_000, 3, 5],
            // ... and W within it but too many distinct weights to build the table cheaply.
            (1..=300).collect(),
        ]
    }

    /// nginx's smooth weighted round-robin, as nginx writes it (O(n) per pick): the reference.
    fn nginx_swrr(weights: &[u32], picks: usize) -> Vec<usize> {
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        let mut current = vec![0i64; weights.len()];
        (0..picks)
            .map(|_| {
                let mut best = 0;
                for (i, &w) in weights.iter().enumerate() {
                    current[i] += i64::from(w);
                    if current[i] > current[best] {
                        best = i;
                    }
                }
                current[best] -= total;
                best
            })
            .collect()
    }

    /// Every window of `W` consecutive picks in `seq` holds each instance exactly `weight`
    /// times. (One exact window plus `seq[k] == seq[k + W]` everywhere implies it for all
    /// windows: sliding by one drops and adds the same instance.)
    fn assert_every_window_exact(seq: &[usize], weights: &[u32], what: &str) {
        let w = WeightedRoundRobin::cycle_len(weights.iter().copied()) as usize;
        assert!(seq.len() >= 2 * w, "{what}: too few picks to test");
        let first: Vec<u64> = counts(&seq[..w], weights.len());
        let want: Vec<u64> = weights.iter().map(|&x| u64::from(x)).collect();
        assert_eq!(first, want, "{what}: the first window, weights {weights:?}");
        if let Some(k) = (0..seq.len() - w).find(|&k| seq[k] != seq[k + w]) {
            panic!(
                "{what}: window starting at {} is off, weights {weights:?}",
                k + 1
            );
        }
    }

    #[test]
    fn exact_counts_in_every_window_of_w_picks() {
        for weights in weight_sets() {
            let eps = endpoints(&weights);
            let w = WeightedRoundRobin::cycle_len(weights.iter().copied()) as usize;
            let picker = WeightedRoundRobin::new().build(&eps);
            let seq = run(&*picker, &eps, 3 * w + 17);
            assert_every_window_exact(&seq, &weights, "one thread");
        }
    }

    #[test]
    fn a_short_run_is_exact_too() {
        // The cases that were only approximately right with a 65,536-pick cycle starting at a
        // random point: 8 picks of 1 and 3, 600 picks of 1, 2, 3.
        for _ in 0..50 {
            let eps = endpoints(&[1, 3]);
            let picker = WeightedRoundRobin::new().build(&eps);
            assert_eq!(counts(&run(&*picker, &eps, 8), 2), [2, 6]);
            let eps = endpoints(&[1, 2, 3]);
            let picker = WeightedRoundRobin::new().build(&eps);
            assert_eq!(counts(&run(&*picker, &eps, 600), 3), [100, 200, 300]);
        }
    }

    #[test]
    fn the_cycle_is_nginx_smooth_weighted_round_robin() {
        let mut sets = weight_sets();
        // Ties between groups of equal weight and between weights, unsorted orders.
        sets.push(vec![2, 1, 2, 1, 3, 3, 1]);
        sets.push(vec![7, 7, 7, 1, 1, 1, 20]);
        sets.push((0..500).map(|i| (i * 7919) % 13 + 1).collect());
        for weights in sets {
            let w = WeightedRoundRobin::cycle_len(weights.iter().copied()) as usize;
            let Some(cycle) = WeightedRoundRobin::schedule(weights.iter().copied()) else {
                assert!(
                    w as u64 > WeightedRoundRobin::MAX_TABLE || weights.len() > 100,
                    "{weights:?}: no table"
                );
                continue;
            };
            assert_eq!(cycle, nginx_swrr(&weights, w), "weights {weights:?}");
            // A picker follows that cycle from some point of it.
            let eps = endpoints(&weights);
            let picker = WeightedRoundRobin::new().build(&eps);
            let seq = run(&*picker, &eps, 2 * w);
            let offset = (0..w)
                .find(|&o| (0..w).all(|k| seq[k] == cycle[(o + k) % w]))
                .unwrap_or_else(|| panic!("{weights:?}: picks are not a rotation of the cycle"));
            assert_eq!(seq[w..], seq[..w], "{weights:?} from {offset}");
        }
        assert_eq!(
            WeightedRoundRobin::schedule([5, 1, 1]),
            Some(vec![0, 0, 1, 0, 2, 0, 0]) // a a b a c a a
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any weights (repeats included, so that equal-weight groups and ties between groups
        /// occur): the table is nginx's cycle.
        #[test]
        fn any_small_weights_give_nginx_cycle(
            weights in prop::collection::vec(
                prop_oneof![1u32..=4, 1u32..=40, Just(7u32)], 1..40),
        ) {
            let w = WeightedRoundRobin::cycle_len(weights.iter().copied()) as usize;
            let cycle = WeightedRoundRobin::schedule(weights.iter().copied());
            prop_assert_eq!(cycle, Some(nginx_swrr(&weights, w)));
        }
    }

    #[test]
    fn large_weights_use_the_fallback_and_stay_exact() {
        for weights in [
            vec![1_000_000u32, 1],
            vec![70_000, 3, 5],
            (1..=300).collect(),
        ] {
            assert_eq!(WeightedRoundRobin::schedule(weights.iter().copied()), None);
            let eps = endpoints(&weights);
            let w = WeightedRoundRobin::cycle_len(weights.iter().copied()) as usize;
            let seq = run(&*WeightedRoundRobin::new().build(&eps), &eps, 2 * w + 5);
            assert_every_window_exact(&seq, &weights, "fallback");
        }
    }

    /// The largest deviation, over every window of 6 to 1,000 consecutive picks and every
    /// instance, of its count from its share of the window; and the longest run of one instance.
    fn unevenness(seq: &[usize], weights: &[u32]) -> (f64, usize) {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        // Prefix counts per instance make each window O(n).
        let mut prefix = vec![vec![0u32; weights.len()]; seq.len() + 1];
        for (k, &i) in seq.iter().enumerate() {
            prefix[k + 1] = prefix[k].clone();
            prefix[k + 1][i] += 1;
        }
        let mut worst = 0.0f64;
        for len in [6usize, 10, 30, 100, 1_000] {
            for start in 0..=seq.len() - len {
                for (i, &w) in weights.iter().enumerate() {
                    let got = f64::from(prefix[start + len][i] - prefix[start][i]);
                    let want = len as f64 * f64::from(w) / total as f64;
                    worst = worst.max((got - want).abs());
                }
            }
        }
        (worst, longest_run(seq))
    }

    fn longest_run(seq: &[usize]) -> usize {
        let (mut run_len, mut longest) = (1, 1);
        for pair in seq.windows(2) {
            run_len = if pair[0] == pair[1] { run_len + 1 } else { 1 };
            longest = longest.max(run_len);
        }
        longest
    }

    /// The longest run a smooth schedule needs: the heaviest instance's picks spread between
    /// the others' (`ceil(w_max / (total - w_max))`).
    fn ideal_run(weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let max = u64::from(*weights.iter().max().unwrap());
        max.div_ceil(total - max) as usize
    }

    /// Counts in every window of consecutive picks stay within 3 of the window's share, and no
    /// instance runs longer than twice what a smooth schedule needs.
    #[test]
    fn smooth_interleaving() {
        for weights in weight_sets() {
            if weights.len() > 100 {
                continue; // the O(n) per window check would be slow; exactness is tested above
            }
            let eps = endpoints(&weights);
            let picker = WeightedRoundRobin::new().build(&eps);
            let seq = run(&*picker, &eps, 20_000);
            let (worst, longest) = unevenness(&seq, &weights);
            println!(
                "weights {weights:?}: worst window deviation {worst:.2}, longest run {longest}"
            );
            assert!(
                worst <= 3.0,
                "weights {weights:?}: a window is off by {worst}"
            );
            assert!(
                longest <= 2 * ideal_run(&weights),
                "weights {weights:?}: a run of {longest}"
            );
        }
    }

    #[test]
    fn no_burst_longer_than_nginx_gives() {
        // 5, 1, 1: `a a b a c a a`, repeated: the longest run of `a` is 4 (across the cycle's
        // end); the naive `a a a a a b c` would run 5.
        let weights = [5, 1, 1];
        let eps = endpoints(&weights);
        let seq = run(&*WeightedRoundRobin::new().build(&eps), &eps, 700);
        assert_eq!(longest_run(&seq), longest_run(&nginx_swrr(&weights, 700)));
        assert_eq!(longest_run(&seq), 4);
    }

    /// The check above rejects the seed's scheduler (each instance repeated `weight` times).
    #[test]
    fn the_smoothness_check_rejects_bursts() {
        for weights in [vec![1u32, 2, 3], vec![100, 100, 100]] {
            let cycle: Vec<usize> = weights
                .iter()
                .enumerate()
                .rev()
                .flat_map(|(i, &w)| std::iter::repeat_n(i, w as usize))
                .collect();
            let seq: Vec<usize> = cycle.iter().copied().cycle().take(3_000).collect();
            let (worst, longest) = unevenness(&seq, &weights);
            assert!(
                worst > 3.0 || longest > 2 * ideal_run(&weights),
                "weights {weights:?}: {worst}, {longest}"
            );
        }
    }

    #[test]
    fn position_survives_an_update() {
        let strategy = WeightedRoundRobin::new();
        let eps = endpoints(&[1, 2, 3]);
        // Half a cycle, a rebuild for the same set, the other half, several times over: every
        // window of 6 is still exact, which a picker-local position (restarting at each build)
        // would not be.
        let seq: Vec<usize> = (0..20)
            .flat_map(|_| run(&*strategy.build(&eps), &eps, 3))
            .collect();
        assert_every_window_exact(&seq, &[1, 2, 3], "across rebuilds");
    }

    #[test]
    fn a_position_from_a_larger_set_stays_in_range_and_exact() {
        let strategy = WeightedRoundRobin::new();
        for big in [vec![1_000_000u32, 1, 1], (1..=10).collect(), vec![9; 40]] {
            let eps = endpoints(&big);
            // Move the position somewhere in the big cycle, most likely beyond the small one.
            let _ = run(&*strategy.build(&eps), &eps, 997);
            let small = endpoints(&[1, 2, 3]);
            let seq = run(&*strategy.build(&small), &small, 60);
            assert_every_window_exact(&seq, &[1, 2, 3], "after shrinking");
        }
    }

    #[test]
    fn two_threads_picking_at_once_each_see_exact_windows() {
        for weights in [vec![1u32, 2, 3], (1..=10).collect(), vec![1_000_000, 1]] {
            let eps = Arc::new(endpoints(&weights));
            let picker: Arc<dyn Picker> = Arc::from(WeightedRoundRobin::new().build(&eps));
            let w = WeightedRoundRobin::cycle_len(weights.iter().copied()) as usize;
            let picks = (3 * w).min(2_100_000);
            // Two fresh threads get different stripes of the position (threads take stripes
            // in turn), so each follows the cycle on its own, whatever the other does.
            let seqs: Vec<Vec<usize>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|_| {
                        let (picker, eps) = (picker.clone(), eps.clone());
                        s.spawn(move || run(&*picker, &eps, picks))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for seq in &seqs {
                assert_every_window_exact(seq, &weights, "a thread");
            }
        }
    }

    #[test]
    fn weights_from_tags_count() {
        let balancer = Balancer::new(WeightedRoundRobin::new());
        let set = ["a", "b"].map(|id| {
            ServiceInstance::builder("users", id)
                .host("h")
                .port(1)
                .tag(if id == "a" { "weight:1" } else { "weight:4" })
                .build()
                .unwrap()
        });
        balancer.apply(WatchEvent::Snapshot(set.to_vec()));
        let seen = tally(&balancer, 5_000);
        assert_eq!((seen["a"], seen["b"]), (1_000, 4_000), "{seen:?}");
    }
}

#[cfg(feature = "least-connections")]
mod least_connections {
    use super::*;
    use waypost_strategies::LeastConnections;

    fn loads(balancer: &Balancer) -> Vec<u64> {
        balancer
            .endpoints()
            .iter()
            .map(|e| e.state().in_flight())
            .collect()
    }

    #[test]
    fn follows_calls_in_flight() {
        let balancer = Balancer::new(LeastConnections::seeded(1));
        balancer.apply(WatchEvent::Snapshot(instances(&[1, 1, 1])));
        let mut held = Vec::new();
        for _ in 0..30 {
            held.push(balancer.pick().unwrap());
            let l = loads(&balancer);
            // Each pick went to a least-loaded instance, so loads never drift apart.
            assert!(
                l.iter().max().unwrap() - l.iter().min().unwrap() <= 1,
                "{l:?}"
            );
        }
        assert_eq!(loads(&balancer), [10, 10, 10]);

        // Calls on i001 end: it is the only one with room, so it gets the next ten.
        held.retain(|g| g.instance().id().as_str() != "i001");
        assert_eq!(loads(&balancer), [10, 0, 10]);
        for _ in 0..10 {
            let g = balancer.pick().unwrap();
            assert_eq!(g.instance().id().as_str(), "i001");
            held.push(g);
        }
    }

    #[test]
    fn load_is_per_unit_of_weight() {
        let balancer = Balancer::new(LeastConnections::seeded(2));
        balancer.apply(WatchEvent::Snapshot(instances(&[1, 2, 3])));
        let held: Vec<_> = (0..60).map(|_| balancer.pick().unwrap()).collect();
        assert_eq!(loads(&balancer), [10, 20, 30]);
        drop(held);
        assert_eq!(loads(&balancer), [0, 0, 0]);
    }

    #[test]
    fn an_idle_instance_wins_over_busy_ones() {
        let eps = endpoints(&[1; 50]);
        for (i, ep) in eps.iter().enumerate() {
            if i != 37 {
                ep.state().begin();
            }
        }
        let picker = LeastConnections::seeded(3).build(&eps);
        assert!(run(&*picker, &eps, 100).iter().all(|&i| i == 37));
    }

    #[test]
    fn ties_are_shared() {
        // All idle (every call ends before the next): each of the equal instances gets a share.
        let eps = endpoints(&[1, 1, 1, 1, 1]);
        let picker = LeastConnections::seeded(4).build(&eps);
        let c = counts(&run(&*picker, &eps, 5_000), 5);
        assert!(c.iter().all(|&c| c.abs_diff(1_000) < 120), "{c:?}");

        // All equally busy: the full scan must still rotate among the tied instances.
        for ep in &eps {
            ep.state().begin();
        }
        let c = counts(&run(&*picker, &eps, 5_000), 5);
        assert!(c.iter().all(|&c| c.abs_diff(1_000) < 120), "{c:?}");
    }
}

#[cfg(feature = "weighted-random")]
mod weighted_random {
    use super::*;
    use waypost_strategies::WeightedRandom;

    #[test]
    fn proportional_to_weight() {
        for weights in [
            vec![1u32, 2, 3],
            vec![1, 1, 1, 97],
            vec![7, 7, 7],
            vec![1_000_000, 1, 500_000],
        ] {
            let eps = endpoints(&weights);
            let picker = WeightedRandom::seeded(11).build(&eps);
            let n = 200_000;
            let c = counts(&run(&*picker, &eps, n), eps.len());
            let total: u32 = weights.iter().sum();
            let expected: Vec<f64> = weights
                .iter()
                .map(|&w| n as f64 * f64::from(w) / f64::from(total))
                .collect();
            // Chi-square over the cells expected to get anything measurable.
            let chi2: f64 = c
                .iter()
                .zip(&expected)
                .filter(|(_, &e)| e >= 5.0)
                .map(|(&o, &e)| (o as f64 - e).powi(2) / e)
                .sum();
            // ≤ 3 degrees of freedom: P(chi² > 16.27) = 0.001.
            assert!(
                chi2 < 16.27,
                "weights {weights:?}: chi² {chi2}, counts {c:?}"
            );
        }
    }

    #[test]
    fn seeded_is_reproducible() {
        let eps = endpoints(&[1, 2, 3, 4]);
        let a = run(&*WeightedRandom::seeded(3).build(&eps), &eps, 100);
        let b = run(&*WeightedRandom::seeded(3).build(&eps), &eps, 100);
        assert_eq!(a, b);
    }
}
