//! Many services watched from one process (issue 13, part 4): how long until every balancer is
//! ready, whether any watch failed, how many connections the process holds to the server, and
//! how fast a change reaches its balancer.
//!
//! ```text
//! eval "$(scripts/fetch-servers)"
//! cargo run --release -p waypost-conformance --features servers --example services -- \
//!     --backend consul|etcd [--services 1000] [--changes 100] [--ready-bound 60]
//! ```
//!
//! 1. Starts a real Consul agent (`-dev`, default limits) or etcd through the test harness.
//! 2. Registers `--services` services of one instance each **directly through the server's API**
//!    (Consul's agent endpoint, etcd puts of Waypost's record), from a client that is dropped
//!    before the watches start. Not through Waypost's `Registry`: each of its registrations
//!    keeps itself alive (a TTL heartbeat on Consul; a lease keep-alive and a watch of its own
//!    key on etcd), which would add a thousand timers and streams to the process being
//!    measured. A gateway's upstreams register from their own processes.
//! 3. Connects one discovery client and builds one `Balancer::watch` per service at once; waits
//!    (at most `--ready-bound` seconds) until every balancer can pick, sampling the process's
//!    connections to the server meanwhile.
//! 4. `--changes` times: registers a second instance of a random service through Waypost's
//!    `Registry` (a second client), waits until that service's balancer serves it, shuts it down,
//!    and waits until the balancer drops it. Each wait is bounded: a change not seen within
//!    [`CHANGE_BOUND`] counts as missed, and the phase stops after [`MAX_MISSES`] misses.
//!
//! Prints markdown: readiness, watch errors (every `Err` a watch yielded, counted by wrapping
//! the watch streams; the balancer's own status only shows an error until the watch is in sync
//! again), connections, CPU and memory, and the propagation quantiles.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::etcd_server::EtcdServer;
use waypost_conformance::sockets::established_to;
use waypost_conformance::watch_errors::CountingDiscovery;
use waypost_core::{
    Balancer, Discovery, FailStatic, HealthCheck, Registration, Registry, ServiceInstance,
    ServiceName,
};
use waypost_strategies::RoundRobin;

/// How long one change may take to reach its balancer before it counts as missed.
const CHANGE_BOUND: Duration = Duration::from_secs(5);
/// Misses after which the propagation phase stops (the watches are not working).
const MAX_MISSES: usize = 5;
/// Registrations in flight at once while seeding (well under Consul's 200 connections per client).
const SEED_CONCURRENCY: usize = 32;

type BoxError = Box<dyn Error + Send + Sync>;

enum Server {
    Consul(ConsulServer),
    Etcd(EtcdServer),
}

fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

fn seed_port(i: usize) -> u16 {
    10_000 + (i % 50_000) as u16
}

impl Server {
    async fn start(backend: &str) -> Result<Server, BoxError> {
        match backend {
            "consul" => Ok(Server::Consul(ConsulServer::start().await)),
            "etcd" => Ok(Server::Etcd(EtcdServer::start().await)),
            other => Err(format!("--backend {other:?}: expected consul or etcd").into()),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Server::Consul(_) => "consul",
            Server::Etcd(_) => "etcd",
        }
    }

    /// The port clients connect to.
    fn port(&self) -> Result<u16, BoxError> {
        let url = match self {
            Server::Consul(s) => s.http_url(),
            Server::Etcd(s) => s.endpoint(),
        };
        let port = url.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
        port.parse()
            .map_err(|e| format!("no port in the server URL {url}: {e}").into())
    }

    /// Registers `n` services of one instance each through the server's own API, from a client
    /// dropped on return.
    async fn seed(&self, n: usize) -> Result<(), BoxError> {
        match self {
            Server::Consul(s) => {
                let http = reqwest::Client::builder().no_proxy().build()?;
                let url = format!("{}/v1/agent/service/register", s.http_url());
                futures::stream::iter(0..n)
                    .map(|i| {
                        let (http, url) = (&http, &url);
                        async move {
                            let name = service_name(i);
                            // No check: the instance is passing from the start.
                            let body = serde_json::json!({
                                "ID": format!("{name}-a"),
                                "Name": name,
                                "Address": "127.0.0.1",
                                "Port": seed_port(i),
                            });
                            let resp = http.put(url).json(&body).send().await?;
                            if !resp.status().is_success() {
                                let status = resp.status();
                                let text = resp.text().await.unwrap_or_default();
                                return Err(format!("registering {name}: {status} {text}").into());
                            }
                            Ok::<(), BoxError>(())
                        }
                    })
                    .buffer_unordered(SEED_CONCURRENCY)
                    .try_collect::<()>()
                    .await
            }
            Server::Etcd(s) => {
                let client =
                    waypost_etcd::etcd_client::Client::connect(s.endpoints(), None).await?;
                futures::stream::iter(0..n)
                    .map(|i| {
                        let mut client = client.clone();
                        async move {
                            let name = service_name(i);
                            let instance =
                                ServiceInstance::builder(name.as_str(), format!("{name}-a"))
                                    .host("127.0.0.1")
                                    .port(seed_port(i))
                                    .build()?;
                            // Written as a registrar outside Waypost would: no lease.
                            let key = waypost_etcd::record_key(
                                waypost_etcd::DEFAULT_PREFIX,
                                instance.service(),
                                instance.id(),
                            );
                            client
                                .put(key, waypost_etcd::encode_record(&instance), None)
                                .await?;
                            Ok::<(), BoxError>(())
                        }
                    })
                    .buffer_unordered(SEED_CONCURRENCY)
                    .try_collect::<()>()
                    .await
            }
        }
    }

    /// A new client of the server: a discovery and a registry (the same client).
    async fn client(&self) -> Result<(Arc<dyn Discovery>, Arc<dyn Registry>), BoxError> {
        match self {
            Server::Consul(s) => {
                let c = waypost_consul::Consul::builder()
                    .address(s.http_url())
                    .build()?;
                Ok((Arc::new(c.clone()), Arc::new(c)))
            }
            Server::Etcd(s) => {
                let c = waypost_etcd::Etcd::builder()
                    .endpoints(s.endpoints())
                    .connect()
                    .await?;
                Ok((Arc::new(c.clone()), Arc::new(c)))
            }
        }
    }
}

/// CPU time this process used so far, user and system, all threads (dead ones included):
/// `utime + stime` of `/proc/self/stat`, the counters `getrusage(RUSAGE_SELF)` reads, in
/// Linux's `USER_HZ` (100 per second) ticks.
fn cpu_time() -> Result<Duration, BoxError> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("/proc/self/stat without a command name")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the line; `after` starts at field 3.
    let ticks = |i: usize| -> Result<u64, BoxError> {
        Ok(fields
            .get(i)
            .ok_or("/proc/self/stat is too short")?
            .parse()?)
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 10))
}

/// `VmRSS` and `VmHWM` (peak) of `/proc/self/status`, in KiB.
fn rss_kib() -> Result<(u64, u64), BoxError> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<u64, BoxError> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| format!("no {name} in /proc/self/status"))?;
        Ok(line
            .trim_start_matches(name)
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A small deterministic generator (xorshift64*), so that a run picks the same services.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

fn serves(balancer: &Balancer, id: &str) -> bool {
    balancer.instances().iter().any(|i| i.id().as_str() == id)
}

/// Waits until `cond` holds of `balancer`, woken by its changes (no polling); returns when, or
/// `None` after [`CHANGE_BOUND`].
async fn until(balancer: &Balancer, cond: impl Fn(&Balancer) -> bool) -> Option<Instant> {
    let wait = async {
        loop {
            // The generation is read before the check, so a change in between is not missed.
            let seen = balancer.generation();
            if cond(balancer) {
                return Instant::now();
            }
            balancer.changed(seen).await;
        }
    };
    tokio::time::timeout(CHANGE_BOUND, wait).await.ok()
}

#[derive(Default)]
struct Changes {
    added_from_call: Vec<Duration>,
    added_from_return: Vec<Duration>,
    removed_from_call: Vec<Duration>,
    removed_from_return: Vec<Duration>,
    missed: usize,
    tried: usize,
    /// Why a registration or a shutdown failed.
    failed: Vec<String>,
}

async fn propagate(
    registry: &dyn Registry,
    balancers: &[Balancer],
    changes: usize,
) -> Result<Changes, BoxError> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = Changes::default();
    for k in 0..changes {
        if out.missed >= MAX_MISSES {
            break;
        }
        out.tried += 1;
        let i = rng.below(balancers.len());
        let balancer = &balancers[i];
        let id = format!("{}-probe-{k}", service_name(i));
        let registration = Registration::builder(service_name(i).as_str(), id.as_str())
            .host("127.0.0.1")
            .port(60_000 + (k % 5_000) as u16)
            .check(HealthCheck::ttl(Duration::from_secs(10)))
            .build()?;

        let called = Instant::now();
        let handle = match registry.register(registration).await {
            Ok(handle) => handle,
            // At a server that refuses connections (Consul's per-client limit) the change
            // itself cannot be made: that is a result, not a reason to stop measuring.
            Err(e) => {
                out.failed.push(e.to_string());
                out.missed += 1;
                continue;
            }
        };
        let returned = Instant::now();
        match until(balancer, |b| serves(b, &id)).await {
            Some(seen) => {
                out.added_from_call.push(seen - called);
                out.added_from_return
                    .push(seen.saturating_duration_since(returned));
            }
            None => out.missed += 1,
        }

        let called = Instant::now();
        if let Err(e) = handle.shutdown().await {
            out.failed.push(e.to_string());
            out.missed += 1;
            continue;
        }
        let returned = Instant::now();
        match until(balancer, |b| !serves(b, &id)).await {
            Some(gone) => {
                out.removed_from_call.push(gone - called);
                out.removed_from_return
                    .push(gone.saturating_duration_since(returned));
            }
            None => out.missed += 1,
        }
    }
    Ok(out)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

struct Args {
    backend: String,
    services: usize,
    changes: usize,
    ready_bound: Duration,
}

fn args() -> Result<Args, BoxError> {
    let mut out = Args {
        backend: String::new(),
        services: 1000,
        changes: 100,
        ready_bound: Duration::from_secs(60),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => out.backend = value()?,
            "--services" => out.services = value()?.parse()?,
            "--changes" => out.changes = value()?.parse()?,
            "--ready-bound" => out.ready_bound = Duration::from_secs(value()?.parse()?),
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: --backend consul|etcd [--services N] [--changes M] [--ready-bound SECS]"
                )
                .into())
            }
        }
    }
    if out.backend.is_empty() {
        return Err("--backend consul|etcd is required".into());
    }
    if out.services == 0 {
        return Err("--services must be at least 1".into());
    }
    Ok(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let args = args()?;
    let n = args.services;
    let server = Server::start(&args.backend).await?;
    let port = server.port()?;

    let seeding = Instant::now();
    server.seed(n).await?;
    let seeded_in = seeding.elapsed();
    eprintln!("registered {n} services in {}", secs(seeded_in));

    // Whatever the process holds to the server already (the harness's health-check client, the
    // seeding client's last connections while they close) is not the watches'.
    let before = established_to(port)?;
    let connections =
        || -> Result<usize, BoxError> { Ok(established_to(port)?.difference(&before).count()) };
    let cpu_before = cpu_time()?;

    let started = Instant::now();
    let (discovery, _) = server.client().await?;
    let discovery = CountingDiscovery::new(discovery);
    let errors = discovery.errors();
    let mut balancers = Vec::with_capacity(n);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..n {
        let service = ServiceName::new(service_name(i))?;
        let balancer = Balancer::watch(&discovery, &service, RoundRobin::default());
        let (b, tx) = (balancer.clone(), ready_tx.clone());
        tokio::spawn(async move {
            b.ready().await;
            let _ = tx.send(started.elapsed());
        });
        balancers.push(balancer);
    }
    drop(ready_tx);
    let built_in = started.elapsed();

    // Ready times as they come, and the connections every 100 ms meanwhile.
    let mut ready_times = Vec::with_capacity(n);
    let mut peak = connections()?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let deadline = tokio::time::sleep(args.ready_bound);
    tokio::pin!(deadline);
    while ready_times.len() < n {
        tokio::select! {
            t = ready_rx.recv() => match t {
                Some(t) => ready_times.push(t),
                None => break,
            },
            _ = tick.tick() => peak = peak.max(connections()?),
            () = &mut deadline => break,
        }
    }
    let waited = started.elapsed();
    let cpu_ready = cpu_time()? - cpu_before;
    let held_at_ready = connections()?;
    peak = peak.max(held_at_ready);
    let errors_at_ready = (errors.services(), errors.total());
    ready_times.sort();
    let ready = ready_times.len();

    let (_, registry) = server.client().await?;
    let propagation_started = Instant::now();
    let cpu_before_changes = cpu_time()?;
    let mut changes = propagate(&*registry, &balancers, args.changes).await?;
    let propagation_took = propagation_started.elapsed();
    let cpu_changes = cpu_time()? - cpu_before_changes;
    let (rss, hwm) = rss_kib()?;
    let fail_static_errors = balancers
        .iter()
        .filter(|b| matches!(b.status().fail_static, Some(FailStatic::BackendError(_))))
        .count();
    let not_serving = balancers.iter().filter(|b| b.status().serving == 0).count();
    let held_at_end = connections()?;

    let backend = server.name();
    println!("#### {backend}: {n} services, one instance each");
    println!();
    println!("| | |");
    println!("|---|---|");
    println!(
        "| services registered (server API, {SEED_CONCURRENCY} at a time) | {n} in {} |",
        secs(seeded_in)
    );
    println!(
        "| balancers built (`Balancer::watch`, one client) | {n} in {} |",
        ms(built_in)
    );
    if ready == n {
        println!("| balancers ready | all {n} |");
        println!(
            "| ready time per balancer, p50 / max (= all ready) | {} / {} |",
            secs(quantile(&ready_times, 0.5)),
            secs(ready_times[n - 1])
        );
    } else {
        println!(
            "| balancers ready | **{ready} of {n}** after {} (the bound) |",
            secs(waited)
        );
        if ready > 0 {
            println!(
                "| ready time of those, p50 / max | {} / {} |",
                secs(quantile(&ready_times, 0.5)),
                secs(ready_times[ready - 1])
            );
        }
    }
    println!(
        "| balancers whose watch yielded an error, by all ready (or the bound) | {} ({} errors) |",
        errors_at_ready.0, errors_at_ready.1
    );
    println!(
        "| the same, by the end of the run | {} ({} errors) |",
        errors.services(),
        errors.total()
    );
    println!("| balancers fail-static on a backend error at the end | {fail_static_errors} |");
    println!("| balancers serving nothing at the end | {not_serving} |");
    println!(
        "| connections to the server, at all ready / peak while starting (100 ms samples) | {held_at_ready} / {peak} |"
    );
    println!("| connections at the end (with the registry client's) | {held_at_end} |");
    println!(
        "| client CPU, start to all ready (or the bound) / propagation phase | {} / {} |",
        secs(cpu_ready),
        secs(cpu_changes)
    );
    println!(
        "| client RSS at the end / peak | {:.1} MiB / {:.1} MiB |",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    let messages = errors.messages();
    if !messages.is_empty() {
        let mut by_count: Vec<_> = messages.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1));
        for (message, count) in by_count.into_iter().take(3) {
            println!("| error seen {count}× | `{message}` |");
        }
    }
    println!();
    println!(
        "Propagation: {} changes tried in {}, {} missed (not seen within {CHANGE_BOUND:?}, or the \
         registration or shutdown failed: {} times){}.",
        changes.tried,
        secs(propagation_took),
        changes.missed,
        changes.failed.len(),
        if changes.tried < args.changes {
            format!(", stopped after {MAX_MISSES} misses")
        } else {
            String::new()
        }
    );
    if let Some(first) = changes.failed.first() {
        println!();
        println!("The first failed change: `{first}`");
    }
    println!();
    println!("| change | seen | p50 | p95 | max |");
    println!("|---|---:|---:|---:|---:|");
    for (what, samples) in [
        (
            "`register()` called → balancer serves it",
            &mut changes.added_from_call,
        ),
        (
            "`register()` returned → balancer serves it",
            &mut changes.added_from_return,
        ),
        (
            "`shutdown()` called → balancer drops it",
            &mut changes.removed_from_call,
        ),
        (
            "`shutdown()` returned → balancer drops it",
            &mut changes.removed_from_return,
        ),
    ] {
        samples.sort();
        if samples.is_empty() {
            println!("| {what} | 0 | – | – | – |");
        } else {
            println!(
                "| {what} | {} | {} | {} | {} |",
                samples.len(),
                ms(quantile(samples, 0.5)),
                ms(quantile(samples, 0.95)),
                ms(samples[samples.len() - 1]),
            );
        }
    }
    Ok(())
}
