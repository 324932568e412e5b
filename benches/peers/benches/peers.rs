//! Waypost's whole request path beside what a user would use instead, in one run.
//!
//! ```text
//! eval "$(scripts/fetch-bench-tools)"   # cmake, which pingora-core's zlib-ng needs
//! cargo bench --manifest-path benches/peers/Cargo.toml
//! ```
//!
//! Benchmark ids, `peer/<system>/<strategy>/<n>` for n = 10, 1,000 and 10,000 instances of
//! weights 1..10 (the `strategies` benches' fixture):
//! - `peer/waypost/<strategy>/<n>`: `Balancer::pick_with` and dropping the `PickGuard`, as
//!   `balancer_pick` in `strategies/benches/pick.rs` measures it: snapshot load, pick,
//!   in-flight accounting and the guard's clock read. The consistent-hash pick gets a
//!   different, well-spread key per request. `p2c-ewma-recorded` reports each pick a success
//!   (`PickGuard::success`), so the latency is recorded as tower's `PeakEwma` records it.
//! - `peer/pingora/<strategy>/<n>`: pingora-load-balancing's `LoadBalancer::select(key, 256)`
//!   over backends of the same addresses and weights, no health check configured (all ready):
//!   `weighted-round-robin` (`selection::RoundRobin`), `random` (`selection::Random`, which draws
//!   from the weighted list, so it compares with Waypost's `weighted-random`) with an empty key,
//!   and `ketama` (`selection::Consistent`) with the same key per request as Waypost's
//!   consistent-hash, as its 8 little-endian bytes.
//! - `peer/tower/<load>/<n>`: tower's `balance::p2c::Balance` over `n` services that are always
//!   ready and answer at once, discovered through `discover::ServiceList`: `p2c` with
//!   `load::Constant` (every service the same load) and `peak-ewma` with `load::PeakEwma`
//!   (default RTT 30 ms, decay 10 s, the RTT recorded when the response arrives). One request is
//!   `ready().await`, `call(())` and awaiting the response, on a current-thread tokio runtime
//!   whose `block_on` drives a whole timed batch.
//!
//! Criterion settings as in the repository's other benches: warm-up 300 ms, measurement 1 s,
//! 20 samples, no plots.

#[path = "../../../strategies/benches/fixture/mod.rs"]
mod fixture;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pingora_load_balancing::discovery::Static;
use pingora_load_balancing::selection::{
    BackendIter, BackendSelection, Consistent, Random, RoundRobin,
};
use pingora_load_balancing::{Backend, Backends, LoadBalancer};
use tokio::runtime::Runtime;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, Constant, Load, PeakEwma};
use tower::{Service, ServiceExt};
use waypost_core::{Balancer, WatchEvent};

use fixture::{context, instance, instances};

/// The instance-set sizes compared: 10, 1,000 and 10,000 instances.
const SIZES: [usize; 3] = [10, 1_000, 10_000];

/// pingora's bound on the candidates one `select` walks (the value its own examples pass).
const MAX_ITERATIONS: usize = 256;

/// Runs `pick(i)` for `i` in `0..iters` and returns the elapsed time.
fn run<F: Fn(u64)>(iters: u64, pick: &F) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        pick(i);
    }
    start.elapsed()
}

fn id(system: &str, strategy: &str, n: usize) -> BenchmarkId {
    BenchmarkId::new(format!("{system}/{strategy}"), n)
}

fn waypost(c: &mut Criterion) {
    for &n in &SIZES {
        for name in [
            "weighted-round-robin",
            "weighted-random",
            "consistent-hash",
            "p2c",
            "p2c-ewma",
        ] {
            let strategy = waypost_strategies::by_name(name).expect("the `all` feature has it");
            let balancer = Balancer::new(strategy);
            balancer.apply(WatchEvent::Snapshot(instances(n)));
            let hashing = name == "consistent-hash";
            let one = |i: u64| {
                drop(black_box(balancer.pick_with(&context(hashing, i))));
            };
            assert!(balancer.pick_with(&context(hashing, 0)).is_ok());
            c.benchmark_group("peer")
                .bench_function(id("waypost", name, n), |b| {
                    b.iter_custom(|iters| run(iters, &one))
                });
        }
        // tower's PeakEwma records every response's latency; Waypost's p2c-ewma learns the
        // same way only when the caller reports an outcome, so this one does.
        let balancer = Balancer::new(waypost_strategies::by_name("p2c-ewma").expect("in `all`"));
        balancer.apply(WatchEvent::Snapshot(instances(n)));
        let recorded = |i: u64| {
            if let Ok(guard) = balancer.pick_with(&context(false, i)) {
                guard.success();
            }
        };
        c.benchmark_group("peer")
            .bench_function(id("waypost", "p2c-ewma-recorded", n), |b| {
                b.iter_custom(|iters| run(iters, &recorded))
            });
    }
}

/// The fixture's `n` instances as pingora backends: same addresses, same weights.
fn backends(n: usize) -> BTreeSet<Backend> {
    (0..n)
        .map(|i| {
            let inst = instance(i);
            let addr = format!("{}:{}", inst.host(), inst.port());
            Backend::new_with_weight(&addr, inst.weight().get() as usize)
                .expect("the fixture's addresses parse")
        })
        .collect()
}

/// A pingora load balancer over static backends, its selector built once.
fn pingora_lb<S>(runtime: &Runtime, n: usize) -> LoadBalancer<S>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    let lb = LoadBalancer::<S>::from_backends(Backends::new(Static::new(backends(n))));
    runtime
        .block_on(lb.update())
        .expect("static discovery does not fail");
    lb
}

fn pingora(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    for &n in &SIZES {
        let wrr = pingora_lb::<RoundRobin>(&runtime, n);
        let random = pingora_lb::<Random>(&runtime, n);
        let ketama = pingora_lb::<Consistent>(&runtime, n);
        let wrr_one = |_: u64| {
            black_box(wrr.select(black_box(b""), MAX_ITERATIONS));
        };
        let random_one = |_: u64| {
            black_box(random.select(black_box(b""), MAX_ITERATIONS));
        };
        // The same key per request as Waypost's consistent-hash gets from `fixture::context`.
        let ketama_one = |i: u64| {
            let key = i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes();
            black_box(ketama.select(black_box(&key), MAX_ITERATIONS));
        };
        assert!(wrr.select(b"", MAX_ITERATIONS).is_some());
        assert!(random.select(b"", MAX_ITERATIONS).is_some());
        assert!(ketama.select(&0u64.to_le_bytes(), MAX_ITERATIONS).is_some());
        let mut group = c.benchmark_group("peer");
        group.bench_function(id("pingora", "weighted-round-robin", n), |b| {
            b.iter_custom(|iters| run(iters, &wrr_one))
        });
        group.bench_function(id("pingora", "random", n), |b| {
            b.iter_custom(|iters| run(iters, &random_one))
        });
        group.bench_function(id("pingora", "ketama", n), |b| {
            b.iter_custom(|iters| run(iters, &ketama_one))
        });
    }
}

/// A service that is always ready and answers at once, so that only the balancer is measured.
#[derive(Clone, Copy)]
struct Immediate;

impl Service<()> for Immediate {
    type Response = ();
    type Error = Infallible;
    type Future = Ready<Result<(), Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        ready(Ok(()))
    }
}

/// Times `iters` requests through `balance`, each `ready().await`, `call` and the response.
fn requests<S>(
    runtime: &Runtime,
    balance: &mut Balance<ServiceList<Vec<S>>, ()>,
    iters: u64,
) -> Duration
where
    S: Service<(), Response = (), Error = Infallible> + Load,
    S::Metric: std::fmt::Debug,
{
    runtime.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let service = balance
                .ready()
                .await
                .expect("the services are always ready");
            service.call(()).await.expect("the services always answer");
        }
        start.elapsed()
    })
}

fn tower(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    for &n in &SIZES {
        let constant: Vec<_> = (0..n).map(|_| Constant::new(Immediate, 1usize)).collect();
        let mut p2c = Balance::new(ServiceList::new(constant));
        let ewma: Vec<_> = (0..n)
            .map(|_| {
                PeakEwma::new(
                    Immediate,
                    Duration::from_millis(30),
                    10e9,
                    CompleteOnResponse::default(),
                )
            })
            .collect();
        let mut peak_ewma = Balance::new(ServiceList::new(ewma));
        // The first request discovers all n services; the timed ones find them ready.
        requests(&runtime, &mut p2c, 1);
        requests(&runtime, &mut peak_ewma, 1);
        assert_eq!(p2c.len(), n);
        assert_eq!(peak_ewma.len(), n);
        let mut group = c.benchmark_group("peer");
        group.bench_function(id("tower", "p2c", n), |b| {
            b.iter_custom(|iters| requests(&runtime, &mut p2c, iters))
        });
        group.bench_function(id("tower", "peak-ewma", n), |b| {
            b.iter_custom(|iters| requests(&runtime, &mut peak_ewma, iters))
        });
    }
}

criterion_group! {
    name = benches;
    config = fixture::criterion_config(20);
    targets = waypost, pingora, tower
}
criterion_main!(benches);
