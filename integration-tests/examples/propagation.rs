//! Propagation latency against real servers: how long after a registration (and after a
//! deregistration) a `Balancer` following a watch sees the change.
//!
//! ```text
//! eval "$(scripts/fetch-servers)"
//! cargo run --release -p waypost-conformance --features servers --example propagation [-- <tries>]
//! ```
//!
//! Starts a real Consul agent (`-dev`) and a real etcd on free loopback ports through the test
//! harness, and for each backend:
//! 1. registers an *anchor* instance that stays for the whole run (the balancer keeps the last
//!    non-empty set on an empty push, so without it a removal of the only probe would never
//!    show);
//! 2. starts `Balancer::watch` on the backend's `Discovery`;
//! 3. `tries` times (default 100): registers a probe instance and measures the time until the
//!    balancer serves it, from the moment `register()` returned (and, for context, from the moment
//!    it was called); then `shutdown()`s the probe (which deregisters) and measures the time from
//!    `shutdown()` returning until the balancer no longer serves it.
//!
//! The balancer is observed without polling: the watch stream is wrapped so that every poll of it
//! wakes the measuring task. The balancer polls its watch again only after it applied what the
//! previous poll gave, so the wake after an apply is the moment the balancer serves the new set.
//! Prints p50 / p99 / max per backend and direction.

use std::error::Error;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Notify;
// Propagation does not depend on the strategy: the smallest one will do.
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::etcd_server::EtcdServer;
use waypost_core::testing::First;
use waypost_core::{
    async_trait, Balancer, Discovery, HealthCheck, Registration, Registry, ServiceInstance,
    ServiceName, Watch,
};

/// A bound on every wait: a change that takes longer is reported as an error, not measured.
const BOUND: Duration = Duration::from_secs(10);

/// A discovery that wakes `polled` waiters whenever its watch stream is polled.
struct Observed<D> {
    inner: D,
    polled: Arc<Notify>,
}

#[async_trait]
impl<D: Discovery> Discovery for Observed<D> {
    async fn instances(
        &self,
        service: &ServiceName,
    ) -> Result<Vec<ServiceInstance>, waypost_core::Error> {
        self.inner.instances(service).await
    }

    fn watch(&self, service: &ServiceName) -> Watch {
        let mut inner = self.inner.watch(service);
        let polled = self.polled.clone();
        futures::stream::poll_fn(move |cx| {
            polled.notify_waiters();
            inner.poll_next_unpin(cx)
        })
        .boxed()
    }
}

fn serves(balancer: &Balancer, id: &str) -> bool {
    balancer.instances().iter().any(|i| i.id().as_str() == id)
}

/// Waits until `cond` holds, re-checking whenever the watch stream is polled; returns when.
async fn until(polled: &Notify, cond: impl Fn() -> bool) -> Result<Instant, String> {
    let wait = async {
        loop {
            let notified = polled.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake between the check and the await is kept.
            notified.as_mut().enable();
            if cond() {
                return Instant::now();
            }
            notified.await;
        }
    };
    tokio::time::timeout(BOUND, wait)
        .await
        .map_err(|_| format!("no change within {BOUND:?}"))
}

fn registration(id: &str, port: u16) -> Result<Registration, Box<dyn Error>> {
    Ok(Registration::builder("propagation", id)
        .host("127.0.0.1")
        .port(port)
        .check(HealthCheck::ttl(Duration::from_secs(10)))
        .build()?)
}

#[derive(Default)]
struct Samples {
    /// From `register()` returning to the balancer serving the instance.
    added: Vec<Duration>,
    /// From calling `register()` to the balancer serving the instance.
    added_from_call: Vec<Duration>,
    /// From `shutdown()` returning to the balancer no longer serving it.
    removed: Vec<Duration>,
    /// From calling `shutdown()` to the balancer no longer serving it.
    removed_from_call: Vec<Duration>,
}

async fn measure<B>(backend: B, tries: usize) -> Result<Samples, Box<dyn Error>>
where
    B: Registry + Discovery + Clone + 'static,
{
    let service = ServiceName::new("propagation")?;
    let polled = Arc::new(Notify::new());
    let observed = Observed {
        inner: backend.clone(),
        polled: polled.clone(),
    };
    let anchor = backend.register(registration("anchor", 9000)?).await?;
    let balancer = Balancer::watch(&observed, &service, First);
    until(&polled, || serves(&balancer, "anchor")).await?;

    let mut s = Samples::default();
    for i in 0..tries {
        let id = format!("probe-{i}");
        let called = Instant::now();
        let handle = backend
            .register(registration(&id, 10_000 + i as u16)?)
            .await?;
        let returned = Instant::now();
        let seen = until(&polled, || serves(&balancer, &id)).await?;
        s.added.push(seen.saturating_duration_since(returned));
        s.added_from_call.push(seen - called);

        let called = Instant::now();
        handle.shutdown().await?;
        let returned = Instant::now();
        let gone = until(&polled, || !serves(&balancer, &id)).await?;
        s.removed.push(gone.saturating_duration_since(returned));
        s.removed_from_call.push(gone - called);
    }
    anchor.shutdown().await?;
    Ok(s)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn row(backend: &str, what: &str, samples: &mut [Duration]) {
    samples.sort();
    println!(
        "| {backend} | {what} | {} | {} | {} | {} |",
        samples.len(),
        ms(quantile(samples, 0.5)),
        ms(quantile(samples, 0.99)),
        ms(samples[samples.len() - 1]),
    );
}

async fn timed<T>(what: &str, f: impl Future<Output = T>) -> T {
    let start = Instant::now();
    let out = f.await;
    eprintln!("{what} in {:.2} s", start.elapsed().as_secs_f64());
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn Error>> {
    let tries: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|e| format!("tries {n:?}: {e}"))?,
        None => 100,
    };
    if tries == 0 {
        return Err("tries must be at least 1".into());
    }

    let consul_server = ConsulServer::start().await;
    let consul = waypost_consul::Consul::builder()
        .address(consul_server.http_url())
        .build()?;
    let mut consul_samples = timed("consul measured", measure(consul, tries)).await?;
    drop(consul_server);

    let etcd_server = EtcdServer::start().await;
    let etcd = waypost_etcd::Etcd::builder()
        .endpoints(etcd_server.endpoints())
        .connect()
        .await?;
    let mut etcd_samples = timed("etcd measured", measure(etcd, tries)).await?;
    drop(etcd_server);

    println!("| backend | change | tries | p50 | p99 | max |");
    println!("|---|---|---:|---:|---:|---:|");
    for (name, s) in [("consul", &mut consul_samples), ("etcd", &mut etcd_samples)] {
        row(name, "register returned → balancer serves it", &mut s.added);
        row(
            name,
            "shutdown returned → balancer drops it",
            &mut s.removed,
        );
        row(
            name,
            "register called → balancer serves it",
            &mut s.added_from_call,
        );
        row(
            name,
            "shutdown called → balancer drops it",
            &mut s.removed_from_call,
        );
    }
    Ok(())
}
