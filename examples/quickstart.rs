//! Waypost in one run, with nothing but a Rust toolchain: `cargo run --example quickstart`.
//!
//! 1. Starts three real HTTP user-service instances on loopback and registers them, with
//!    weights 1, 2 and 3, in the in-process registry (the `memory` backend).
//! 2. Sends requests through `waypost::http::HttpClient` with each classic strategy and prints
//!    which instance answered them (the `x-instance-id` response header).
//! 3. Stops one instance while requests flow — deregistration first, then its server — prints the
//!    watch event, and shows that traffic moved to the survivors without a failed request.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use waypost::http::HttpClient;
use waypost::memory::Memory;
use waypost::{
    Balancer, Discovery, Registration, RegistrationHandle, Registry, ServiceName, WatchEvent,
};

use common::{UserService, INSTANCE_HEADER};

const SERVICE: &str = "user-service";
const WEIGHTS: [u32; 3] = [1, 2, 3];
const STRATEGIES: [&str; 4] = [
    "round-robin",
    "random",
    "weighted-round-robin",
    "least-connections",
];
const REQUESTS: usize = 600;
const CONCURRENCY: usize = 8;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Answers per instance id, and failed requests.
#[derive(Clone, Debug, Default)]
struct Tally {
    by_instance: BTreeMap<String, usize>,
    failed: usize,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (id, n) in other.by_instance {
            *self.by_instance.entry(id).or_default() += n;
        }
        self.failed += other.failed;
    }
    fn total(&self) -> usize {
        self.by_instance.values().sum::<usize>() + self.failed
    }
}

/// What the run showed, for the test below.
struct Summary {
    per_strategy: Vec<(String, Tally)>,
    stopped: String,
    during: Tally,
    after: Tally,
    removal_seen: bool,
}

struct Instance {
    id: String,
    weight: u32,
    server: UserService,
    registration: RegistrationHandle,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Waypost's own log lines (watch errors, fail-static) to stderr; RUST_LOG, default info.
    common::init_tracing();
    let summary = run().await?;
    // The run checks itself, so that a regression cannot hide in a table.
    let failed: usize = summary
        .per_strategy
        .iter()
        .map(|(_, t)| t.failed)
        .sum::<usize>()
        + summary.during.failed
        + summary.after.failed;
    if failed > 0 {
        return Err(format!("{failed} requests failed").into());
    }
    if !summary.removal_seen {
        return Err("the watch did not report the stopped instance's removal".into());
    }
    if summary.after.by_instance.contains_key(&summary.stopped) {
        return Err(format!("{} still got traffic after it left", summary.stopped).into());
    }
    Ok(())
}

async fn run() -> Result<Summary, Error> {
    let started = Instant::now();
    println!("Waypost quickstart: three user-service instances on loopback, in-process registry\n");

    // 1. Three real HTTP servers, each registered with its weight.
    let memory = Memory::new();
    let mut instances = Vec::new();
    for (i, weight) in WEIGHTS.into_iter().enumerate() {
        let id = format!("{SERVICE}-{}", i + 1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let server = UserService::start(listener, &id)?;
        let registration = Registration::builder(SERVICE, &id)
            .host("127.0.0.1")
            .port(server.addr().port())
            .weight(weight)
            .build()?;
        let registration = memory.register(registration).await?;
        println!("  registered {id}  at {}  weight {weight}", server.addr());
        instances.push(Instance {
            id,
            weight,
            server,
            registration,
        });
    }

    // 2. A watch of our own, to show what the balancer is told, and a balancer on the service.
    let service: ServiceName = SERVICE.parse()?;
    let mut watch = memory.watch(&service);
    println!();
    // The snapshot, then word that the watch is in sync with the backend.
    for _ in 0..2 {
        if let Some(event) = watch.next().await {
            println!("watch: {}", describe(&event?));
        }
    }
    let balancer = Balancer::watch(&memory, &service, waypost::strategies::RoundRobin::new());
    until_balancer(
        &balancer,
        |b| b.instances().len() == instances.len(),
        "the balancer to see every instance",
    )
    .await?;
    let client = HttpClient::builder(balancer.clone())
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(5))
        .build()?;

    // 3. Each strategy in turn, on the same client: the strategy is swapped at runtime.
    println!("\n{REQUESTS} requests per strategy, {CONCURRENCY} at a time, through waypost::http::HttpClient:\n");
    let columns: Vec<(String, u32)> = instances.iter().map(|i| (i.id.clone(), i.weight)).collect();
    print_header("strategy", &columns);
    let mut per_strategy = Vec::new();
    for name in STRATEGIES {
        let strategy = waypost::strategies::by_name(name)
            .ok_or_else(|| format!("strategy {name} is not compiled in"))?;
        balancer.set_strategy(strategy);
        let tally = send(&client, REQUESTS, CONCURRENCY).await;
        print_row(name, &columns, &tally);
        per_strategy.push((name.to_owned(), tally));
    }

    // 4. Stop the heaviest instance while requests flow.
    balancer.set_strategy(waypost::strategies::WeightedRoundRobin::new());
    let victim = instances.pop().ok_or("no instance to stop")?;
    println!(
        "\nStopping {} while requests flow (weighted-round-robin): deregister, then stop its server...",
        victim.id
    );
    let running = Arc::new(AtomicBool::new(true));
    let load = tokio::spawn(send_until(client.clone(), running.clone(), 4));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let endpoint = balancer
        .endpoints()
        .into_iter()
        .find(|e| e.id().as_str() == victim.id);
    victim.registration.shutdown().await?;
    let mut removal_seen = false;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
        let event = event?;
        println!("watch: {}", describe(&event));
        if matches!(&event, WatchEvent::Removed(i) if i.id().as_str() == victim.id) {
            removal_seen = true;
            break;
        }
    }
    // The server stops only once the balancer no longer picks the instance and the requests it
    // already sent there are answered: that is what makes the move lossless.
    until_balancer(
        &balancer,
        |b| b.instances().iter().all(|i| i.id().as_str() != victim.id),
        "the balancer to drop the stopped instance",
    )
    .await?;
    if let Some(endpoint) = endpoint {
        wait_for(
            || endpoint.state().in_flight() == 0,
            "requests in flight to finish",
        )
        .await?;
    }
    victim.server.stop().await?;
    println!("{} stopped", victim.id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.store(false, Ordering::Relaxed);
    let during = load.await?;

    let after = send(&client, REQUESTS, CONCURRENCY).await;
    println!();
    print_header("phase", &columns);
    print_row("during the stop", &columns, &during);
    print_row("after the stop", &columns, &after);

    let failed =
        per_strategy.iter().map(|(_, t)| t.failed).sum::<usize>() + during.failed + after.failed;
    let total =
        per_strategy.iter().map(|(_, t)| t.total()).sum::<usize>() + during.total() + after.total();
    println!(
        "\n(\"during\": requests picked before the balancer saw the removal finished on {}; its server\n\
         stopped only after they were answered. Retries would have covered a refused connection.)",
        victim.id
    );
    println!(
        "\n{failed} of {total} requests failed; {} got no traffic after it left. Done in {:.1} s.",
        victim.id,
        started.elapsed().as_secs_f64()
    );

    for i in instances {
        i.registration.shutdown().await?;
        i.server.stop().await?;
    }
    Ok(Summary {
        per_strategy,
        stopped: victim.id,
        during,
        after,
        removal_seen,
    })
}

/// Sends `n` GET requests, `concurrency` at a time, and tallies who answered.
async fn send(client: &HttpClient, n: usize, concurrency: usize) -> Tally {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return tally;
                    }
                    one(&client, i, &mut tally).await;
                }
            })
        })
        .collect();
    let mut tally = Tally::default();
    for w in workers {
        match w.await {
            Ok(t) => tally.merge(t),
            Err(_) => tally.failed += 1,
        }
    }
    tally
}

/// Sends requests until `running` turns false.
async fn send_until(client: HttpClient, running: Arc<AtomicBool>, concurrency: usize) -> Tally {
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (client, running) = (client.clone(), running.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut i = w;
                while running.load(Ordering::Relaxed) {
                    one(&client, i, &mut tally).await;
                    i += concurrency;
                }
                tally
            })
        })
        .collect();
    let mut tally = Tally::default();
    for w in workers {
        match w.await {
            Ok(t) => tally.merge(t),
            Err(_) => tally.failed += 1,
        }
    }
    tally
}

/// One `GET /users/{id}`: counted for the instance named by the answer's header, or as failed.
async fn one(client: &HttpClient, i: usize, tally: &mut Tally) {
    let path = format!("/users/{}", i % common::USERS as usize + 1);
    let answered_by = match client.get(path).send().await {
        Ok(r) if r.status().is_success() => r
            .headers()
            .get(INSTANCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        Ok(r) => {
            eprintln!("  failed: {} from {}", r.status(), r.instance().id());
            None
        }
        Err(e) => {
            eprintln!("  failed: {e}");
            None
        }
    };
    match answered_by {
        Some(id) => *tally.by_instance.entry(id).or_default() += 1,
        None => tally.failed += 1,
    }
}

fn describe(event: &WatchEvent) -> String {
    let ids = |v: &[waypost::ServiceInstance]| {
        v.iter()
            .map(|i| i.id().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match event {
        WatchEvent::Snapshot(all) => format!("snapshot of {} instances: {}", all.len(), ids(all)),
        WatchEvent::Added(i) => format!("added {} ({})", i.id(), i.authority()),
        WatchEvent::Updated(i) => format!("updated {} ({})", i.id(), i.authority()),
        WatchEvent::Removed(i) => format!("removed {} ({})", i.id(), i.authority()),
        WatchEvent::Synced => "in sync with the backend".to_owned(),
    }
}

fn print_header(first: &str, columns: &[(String, u32)]) {
    let mut line = format!("  {first:<22}");
    for (id, weight) in columns {
        line.push_str(&format!("{:>22}", format!("{id} (w{weight})")));
    }
    line.push_str(&format!("{:>9}", "failed"));
    println!("{line}");
}

fn print_row(label: &str, columns: &[(String, u32)], tally: &Tally) {
    let total = tally.total().max(1) as f64;
    let mut line = format!("  {label:<22}");
    for (id, _) in columns {
        let n = tally.by_instance.get(id).copied().unwrap_or(0);
        line.push_str(&format!(
            "{:>22}",
            format!("{n:>5} {:>5.1} %", 100.0 * n as f64 / total)
        ));
    }
    line.push_str(&format!("{:>9}", tally.failed));
    println!("{line}");
}

/// Waits up to 10 s until the balancer's set satisfies `ready`, woken by each change of the
/// set (`Balancer::changed`), never polling.
async fn until_balancer(
    balancer: &Balancer,
    ready: impl Fn(&Balancer) -> bool,
    what: &str,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = balancer.generation();
    while !ready(balancer) {
        seen = tokio::time::timeout_at(deadline, balancer.changed(seen))
            .await
            .map_err(|_| format!("timed out waiting for {what}"))?;
    }
    Ok(())
}

/// Waits up to 10 s for `ready`, polling: for what no event announces (calls in flight).
async fn wait_for(ready: impl Fn() -> bool, what: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The quickstart is the project's front door: it runs in every `cargo test`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_quickstart_moves_traffic_without_a_failed_request() {
        let s = super::run().await.unwrap();
        assert!(s.removal_seen, "the watch must show the removal");
        for (name, tally) in &s.per_strategy {
            assert_eq!(tally.failed, 0, "{name}");
            assert_eq!(tally.total(), super::REQUESTS, "{name}");
            assert_eq!(tally.by_instance.len(), 3, "{name}: every instance serves");
        }
        // Weighted round robin is exact over its whole cycle; over 600 picks within a few.
        let wrr = &s
            .per_strategy
            .iter()
            .find(|(n, _)| n == "weighted-round-robin")
            .unwrap()
            .1;
        for (id, want) in [
            ("user-service-1", 100),
            ("user-service-2", 200),
            ("user-service-3", 300),
        ] {
            let got = wrr.by_instance[id];
            assert!(
                got.abs_diff(want) <= 3,
                "{id}: {got} answers, want about {want}"
            );
        }
        assert_eq!(s.during.failed, 0);
        assert_eq!(s.after.failed, 0);
        assert_eq!(
            s.after.by_instance.get(&s.stopped),
            None,
            "no traffic after the stop"
        );
        assert_eq!(s.after.total(), super::REQUESTS);
    }
}
