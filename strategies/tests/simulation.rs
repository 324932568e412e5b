//! A load-balancing simulation in the style of tower's `balance` demo: backends with different
//! latency distributions, Poisson arrivals, a simulated clock (no sleeping, seeded, so every run
//! gives the same numbers). Latency-aware P2C must beat round-robin at the 99th percentile.
//!
//! `cargo test -p waypost-strategies --features p2c-ewma --test simulation -- --nocapture`
//! prints the table.
#![cfg(all(feature = "round-robin", feature = "p2c-ewma"))]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use waypost_core::{Endpoint, EndpointState, Outcome, PickContext, ServiceInstance, Strategy};
use waypost_strategies::{P2cEwma, RoundRobin};

const MS: f64 = 1e6;

/// One backend's latency: a floor, an exponential tail, rare stalls, and a slowdown per call
/// already in flight (a server that queues).
struct Backend {
    floor_ms: f64,
    tail_ms: f64,
    stall_chance: f64,
    stall_ms: f64,
    per_call_in_flight: f64,
}

const BACKENDS: [Backend; 5] = [
    Backend {
        floor_ms: 5.0,
        tail_ms: 5.0,
        stall_chance: 0.0,
        stall_ms: 0.0,
        per_call_in_flight: 0.05,
    },
    Backend {
        floor_ms: 5.0,
        tail_ms: 5.0,
        stall_chance: 0.0,
        stall_ms: 0.0,
        per_call_in_flight: 0.05,
    },
    Backend {
        floor_ms: 8.0,
        tail_ms: 8.0,
        stall_chance: 0.0,
        stall_ms: 0.0,
        per_call_in_flight: 0.05,
    },
    Backend {
        floor_ms: 30.0,
        tail_ms: 20.0,
        stall_chance: 0.0,
        stall_ms: 0.0,
        per_call_in_flight: 0.05,
    },
    Backend {
        floor_ms: 60.0,
        tail_ms: 60.0,
        stall_chance: 0.02,
        stall_ms: 500.0,
        per_call_in_flight: 0.05,
    },
];

const REQUESTS: usize = 40_000;
/// Mean time between arrivals: 250 requests per second.
const ARRIVAL_MS: f64 = 4.0;

struct Report {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    share: Vec<f64>,
}

fn exp(rng: &mut fastrand::Rng, mean: f64) -> f64 {
    // 1 - f64() is in (0, 1]: ln never sees 0.
    -mean * (1.0 - rng.f64()).ln()
}

/// Runs the same arrival and latency draws (same seed) through `strategy`.
fn simulate(strategy: &dyn Strategy) -> Report {
    let endpoints: Vec<Endpoint> = (0..BACKENDS.len())
        .map(|i| {
            let inst = ServiceInstance::builder("sim", format!("b{i}"))
                .host("10.0.0.1")
                .port(8080)
                .build()
                .unwrap();
            Endpoint::new(inst, Arc::new(EndpointState::new_at(0)))
        })
        .collect();
    let picker = strategy.build(&endpoints);
    let mut rng = fastrand::Rng::with_seed(0x5EED);
    // Calls in flight, by end time: (end, backend, latency).
    let mut pending: BinaryHeap<Reverse<(u64, usize, u64)>> = BinaryHeap::new();
    let mut latencies = Vec::with_capacity(REQUESTS);
    let mut picks = vec![0usize; BACKENDS.len()];
    let mut now = 0u64;
    for _ in 0..REQUESTS {
        now += (exp(&mut rng, ARRIVAL_MS) * MS) as u64;
        // Calls that ended by now report, in order, at their own end times.
        while let Some(&Reverse((end, i, latency))) = pending.peek() {
            if end > now {
                break;
            }
            pending.pop();
            endpoints[i]
                .state()
                .end_at(Some((Outcome::Success, Duration::from_nanos(latency))), end);
        }
        let i = picker.pick(&endpoints, &PickContext::new()).unwrap();
        let b = &BACKENDS[i];
        let state = endpoints[i].state();
        let mut ms = b.floor_ms + exp(&mut rng, b.tail_ms);
        if rng.f64() < b.stall_chance {
            ms += b.stall_ms;
        }
        ms *= 1.0 + b.per_call_in_flight * state.in_flight() as f64;
        state.begin();
        let latency = (ms * MS) as u64;
        pending.push(Reverse((now + latency, i, latency)));
        latencies.push(ms);
        picks[i] += 1;
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((q * REQUESTS as f64).ceil() as usize).min(REQUESTS) - 1];
    Report {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: latencies[REQUESTS - 1],
        share: picks.iter().map(|&p| p as f64 / REQUESTS as f64).collect(),
    }
}

fn print(name: &str, r: &Report) {
    let share: Vec<String> = r
        .share
        .iter()
        .map(|s| format!("{:4.1}%", s * 100.0))
        .collect();
    println!(
        "{name:<18} p50 {:7.1} ms  p90 {:7.1} ms  p99 {:7.1} ms  max {:7.1} ms  share {}",
        r.p50,
        r.p90,
        r.p99,
        r.max,
        share.join(" ")
    );
}

#[test]
fn p2c_ewma_beats_round_robin_at_p99() {
    println!(
        "{REQUESTS} requests at {:.0}/s over {} backends \
         (two fast, one a bit slower, one slow, one slow with stalls)",
        1e3 / ARRIVAL_MS,
        BACKENDS.len()
    );
    let rr = simulate(&RoundRobin::new());
    print("round-robin", &rr);
    let ewma = simulate(&P2cEwma::seeded(42));
    print("p2c-ewma", &ewma);
    #[cfg(feature = "p2c")]
    print("p2c", &simulate(&waypost_strategies::P2c::seeded(42)));
    #[cfg(feature = "least-connections")]
    print(
        "least-connections",
        &simulate(&waypost_strategies::LeastConnections::seeded(42)),
    );
    #[cfg(feature = "random")]
    print("random", &simulate(&waypost_strategies::Random::seeded(42)));

    assert!(
        ewma.p99 < rr.p99,
        "p2c-ewma p99 {:.1} ms is not below round-robin's {:.1} ms",
        ewma.p99,
        rr.p99
    );
    // Round-robin gives every backend a fifth whatever its speed; p2c-ewma must have moved
    // traffic off the slow ones.
    assert!(ewma.share[3] + ewma.share[4] < 0.2, "{:?}", ewma.share);
}
