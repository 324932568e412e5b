//! Power of two choices, on calls in flight (`p2c`) and on peak-EWMA latency (`p2c-ewma`).
#![cfg(any(feature = "p2c", feature = "p2c-ewma"))]

use std::sync::Arc;

use waypost_core::{Endpoint, EndpointState, PickContext, Picker, ServiceInstance, Strategy};

fn endpoint(id: &str, weight: u32) -> Endpoint {
    let inst = ServiceInstance::builder("users", id)
        .host("10.0.0.1")
        .port(8080)
        .weight(weight)
        .build()
        .unwrap();
    Endpoint::new(inst, Arc::new(EndpointState::new_at(0)))
}

fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| endpoint(&format!("i{i:03}"), w))
        .collect()
}

fn pick(picker: &dyn Picker, eps: &[Endpoint]) -> usize {
    picker.pick(eps, &PickContext::new()).unwrap()
}

/// `count` picks whose calls end before the next one starts.
fn sequential(picker: &dyn Picker, eps: &[Endpoint], count: usize) -> Vec<u64> {
    let mut c = vec![0u64; eps.len()];
    for _ in 0..count {
        c[pick(picker, eps)] += 1;
    }
    c
}

/// `count` picks whose calls all stay in flight (each pick begins a call on its instance).
fn held(picker: &dyn Picker, eps: &[Endpoint], count: usize) -> Vec<u64> {
    for _ in 0..count {
        eps[pick(picker, eps)].state().begin();
    }
    eps.iter().map(|e| e.state().in_flight()).collect()
}

fn shares(c: &[u64]) -> Vec<f64> {
    let total: u64 = c.iter().sum();
    c.iter().map(|&x| x as f64 / total as f64).collect()
}

#[cfg(feature = "p2c")]
mod p2c {
    use super::*;
    use waypost_strategies::P2c;

    #[test]
    fn a_loaded_instance_loses_every_pair() {
        let eps = endpoints(&[1, 1, 1, 1]);
        for _ in 0..5 {
            eps[0].state().begin();
        }
        let picker = P2c::seeded(1).build(&eps);
        let c = sequential(&*picker, &eps, 3_000);
        assert_eq!(c[0], 0, "{c:?}");
        // The others share evenly (each is in half of the pairs, and wins all but the one
        // against another idle instance half the time).
        for &x in &c[1..] {
            assert!(x.abs_diff(1_000) < 100, "{c:?}");
        }
    }

    #[test]
    fn the_two_candidates_are_distinct() {
        // With two instances the pair is always both: the busy one is never picked. Two
        // independent draws would both land on it a quarter of the time.
        let eps = endpoints(&[1, 1]);
        eps[1].state().begin();
        let picker = P2c::seeded(2).build(&eps);
        assert_eq!(sequential(&*picker, &eps, 1_000), [1_000, 0]);
    }

    #[test]
    fn held_calls_stay_balanced() {
        let eps = endpoints(&[1; 8]);
        let picker = P2c::seeded(3).build(&eps);
        let l = held(&*picker, &eps, 800);
        // P2C keeps the gap to O(log log n); one random choice would spread about ±30.
        let (min, max) = (l.iter().min().unwrap(), l.iter().max().unwrap());
        assert!(max - min <= 3, "{l:?}");
    }

    #[test]
    fn weights_steer_light_traffic() {
        let eps = endpoints(&[1, 2, 3]);
        let picker = P2c::seeded(4).build(&eps);
        let s = shares(&sequential(&*picker, &eps, 60_000));
        for (got, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((got - want).abs() < 0.01, "{s:?}");
        }
    }

    #[test]
    fn weights_steer_calls_in_flight() {
        let eps = endpoints(&[1, 2, 3]);
        let picker = P2c::seeded(5).build(&eps);
        let l = held(&*picker, &eps, 600);
        for (got, want) in l.iter().zip([100u64, 200, 300]) {
            assert!(got.abs_diff(want) <= 6, "{l:?}");
        }
    }
}

#[cfg(feature = "p2c-ewma")]
mod p2c_ewma {
    use super::*;
    use std::time::{Duration, Instant};
    use waypost_core::{Balancer, WatchEvent, EWMA_DECAY};
    use waypost_strategies::P2cEwma;

    fn sample(ep: &Endpoint, ms: u64, at: u64) {
        ep.state().observe_latency_at(Duration::from_millis(ms), at);
    }

    #[test]
    fn prefers_the_faster_instance() {
        let eps = endpoints(&[1, 1]);
        sample(&eps[0], 50, 0);
        sample(&eps[1], 5, 0);
        let picker = P2cEwma::seeded(1).build(&eps);
        assert_eq!(sequential(&*picker, &eps, 1_000), [0, 1_000]);

        // Among four, the fast one wins every pair it is in: half of them.
        let eps = endpoints(&[1, 1, 1, 1]);
        for (ep, ms) in eps.iter().zip([40, 5, 40, 40]) {
            sample(ep, ms, 0);
        }
        let picker = P2cEwma::seeded(2).build(&eps);
        let s = shares(&sequential(&*picker, &eps, 6_000));
        assert!((s[1] - 0.5).abs() < 0.03, "{s:?}");
    }

    #[test]
    fn calls_in_flight_raise_the_cost() {
        // 10 ms × (in flight + 1) against an idle 50 ms instance: the fast one takes the first
        // four calls (cost 10..40 < 50), ties at 50, and loses from six in flight on.
        let eps = endpoints(&[1, 1]);
        sample(&eps[0], 10, 0);
        sample(&eps[1], 50, 0);
        let picker = P2cEwma::seeded(3).build(&eps);
        for _ in 0..4 {
            let i = pick(&*picker, &eps);
            assert_eq!(i, 0);
            eps[i].state().begin();
        }
        eps[0].state().begin(); // five in flight: cost 60 > 50
        assert_eq!(pick(&*picker, &eps), 1);
    }

    #[test]
    fn a_new_instance_is_not_flooded_nor_starved() {
        // Four instances with 20 ms estimates, one new without a sample. Calls stay in flight,
        // as they would while the new instance's first calls are still running.
        let mut eps = endpoints(&[1, 1, 1, 1]);
        for ep in &eps {
            sample(ep, 20, 0);
        }
        eps.push(endpoint("new", 1));
        let picker = P2cEwma::seeded(4).build(&eps);
        let l = held(&*picker, &eps, 500);
        let new = shares(&l)[4];
        // An estimate of 0 would win every pair it is in (40 % of all picks); a pessimistic
        // default would leave it nearly idle. It gets a peer's share.
        assert!(
            (0.17..=0.23).contains(&new),
            "new instance's share {new}, loads {l:?}"
        );
    }

    #[test]
    fn instances_without_samples_balance_on_load() {
        let eps = endpoints(&[1; 6]);
        let picker = P2cEwma::seeded(5).build(&eps);
        let l = held(&*picker, &eps, 600);
        let (min, max) = (l.iter().min().unwrap(), l.iter().max().unwrap());
        assert!(max - min <= 3, "{l:?}");
    }

    #[test]
    fn a_slow_instance_is_tried_again_once_its_estimate_has_decayed() {
        // After one slow answer, only the fast instance gets samples: the slow one's estimate
        // decays from its own sample time, and the comparison follows.
        let eps = endpoints(&[1, 1]);
        sample(&eps[0], 10, 0);
        sample(&eps[1], 200, 0); // a slow spell: the peak is taken at once
        let picker = P2cEwma::seeded(6).build(&eps);
        let tau = EWMA_DECAY.as_nanos() as u64;
        assert_eq!(pick(&*picker, &eps), 0);
        // 2 τ on, 200 ms has decayed to 27 ms: still the slower one.
        sample(&eps[0], 10, 2 * tau);
        assert_eq!(sequential(&*picker, &eps, 100), [100, 0]);
        // 4 τ on, to 3.7 ms: now the cheaper one, with no sample of its own since.
        sample(&eps[0], 10, 4 * tau);
        assert_eq!(pick(&*picker, &eps), 1);
    }

    #[test]
    fn a_recovered_instance_wins_traffic_back_through_picks_alone() {
        // Real time and real calls through a balancer, so a short time constant: 100 ms.
        let balancer = Balancer::new(P2cEwma::seeded(6).decay(Duration::from_millis(100)));
        let inst = |id: &str| {
            ServiceInstance::builder("users", id)
                .host("10.0.0.1")
                .port(8080)
                .build()
                .unwrap()
        };
        balancer.apply(WatchEvent::Snapshot(vec![inst("a"), inst("b")]));
        // One call that takes `hold`, answered successfully: the instance it went to.
        let call = |hold: Duration| {
            let g = balancer.pick().unwrap();
            let id = g.instance().id().to_string();
            std::thread::sleep(hold);
            g.success();
            id
        };
        let fast = Duration::from_millis(1);
        // Fast calls until both instances have an estimate (about 1 ms).
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 2 {
            seen.insert(call(fast));
        }
        // One slow call, 30 ms.
        let slow = call(Duration::from_millis(30));
        // Right after it, the other instance takes the traffic...
        for _ in 0..3 {
            assert_ne!(call(fast), slow, "the slow answer did not count");
        }
        // ...until the slow one's estimate, which gets no sample meanwhile, has decayed below
        // the other's (after about 100 ms × ln(30 ms / 1 ms), a third of a second): then it is
        // tried again.
        let deadline = Instant::now() + Duration::from_secs(20);
        while call(fast) != slow {
            assert!(
                Instant::now() < deadline,
                "{slow} was never picked again after its slow answer"
            );
        }
        // Its answer was fast, and it shares the traffic again.
        let back = (0..200).filter(|_| call(fast) == slow).count();
        assert!(
            back >= 40,
            "{slow} got {back} of 200 calls after it recovered"
        );
    }

    #[test]
    fn weights_count() {
        // Equal latency and no load: picks follow the weights.
        let eps = endpoints(&[1, 3]);
        for ep in &eps {
            sample(ep, 10, 0);
        }
        let picker = P2cEwma::seeded(7).build(&eps);
        let s = shares(&sequential(&*picker, &eps, 40_000));
        assert!((s[1] - 0.75).abs() < 0.01, "{s:?}");
    }
}
