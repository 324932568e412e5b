//! One service with many instances against a real server: how long one added or removed
//! instance takes to reach a `Balancer`, what the client spends on it, and (for Consul) how long
//! the agent itself takes to answer the same query.
//!
//! ```text
//! eval "$(scripts/fetch-servers)"
//! cargo run --release -p waypost-conformance --features servers --example instances -- \
//!     [--backend consul|etcd] [--instances 10000] [--changes 20]
//! ```
//!
//! Without `--backend`, both run, Consul first. For each backend:
//! 1. the harness starts a real server (Consul 1.8 `-dev`, or etcd) on free loopback ports;
//! 2. `--instances` instances of the service `instances` are written straight into the server,
//!    in batches, not through Waypost: Consul's `PUT /v1/txn` (64 operations each: catalog nodes
//!    of 100 instances, each node with a passing node check, and per instance a service with
//!    `Weights` and a passing check named as Waypost names its own, so that an entry has the
//!    shape of an agent-registered one), etcd's transactions (128 puts each) of the records
//!    Waypost writes, without a lease;
//! 3. one `Balancer` is built from the backend's `Discovery::watch` (a strategy that does no
//!    work of its own, so that the backend's cost shows), and the time until it serves them all
//!    is the *initial load*;
//! 4. a probe instance is registered through Waypost's `Registry`, and the time from the call
//!    (and from its return) until the balancer serves it is taken; then the probe's handle is
//!    shut down (which deregisters) and the time until the balancer no longer serves it. The
//!    balancer is observed without polling: `Balancer::changed` wakes the measuring task when a
//!    new set is published. For etcd, step 4 runs `--changes` times on one balancer.
//!
//! For Consul, each change is followed by the agent's own answer time for one: the balancer is
//! dropped, and a plain `reqwest` client sends the query Waypost's watch sends
//! (`GET /v1/health/service/instances?passing=true&index=<X-Consul-Index>&wait=300s`), blocking
//! on the current index, and reads the whole body while another probe is added, then again
//! while it is removed; the times to the answer's headers, first body chunk and last byte are
//! taken from the call to `register()` / `shutdown()`. An answer that does not show the change
//! yet (another write moved the index) is followed by the next blocking query, as Waypost's
//! watch would do. Then steps 3 and 4 run again with a new balancer, `--changes` times in all:
//! Waypost and the agent are measured in turns, so that a machine busy with something else for
//! a while affects both alike. (A dropped watch leaves its blocking query waiting in the agent,
//! which would answer it at the next change beside the plain client's: a catalog write to one
//! bulk instance releases it first, and the plain client starts 1 s later.)
//!
//! Client cost over step 4, divided by the number of changes (adds + removes): CPU time of the
//! whole process (user + system; every thread's `/proc/self/task/*/schedstat`, in ns, with the
//! coarser `utime + stime` ticks of `/proc/self/stat` beside it), and memory: `VmRSS` and
//! `VmHWM` of `/proc/self/status`, the peak reset (`/proc/self/clear_refs`) after each initial
//! load, so that it is the changes'.
//!
//! Prints Markdown.

use std::error::Error;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::etcd_server::EtcdServer;
use waypost_core::{
    Balancer, Discovery, Endpoint, HealthCheck, InstanceId, PickContext, Picker, Registration,
    Registry, ServiceInstance, ServiceName,
};

const SERVICE: &str = "instances";
const USAGE: &str = "use --backend consul|etcd, --instances N, --changes N";
/// A bound on every wait: a change that takes longer is reported as an error, not measured.
const BOUND: Duration = Duration::from_secs(60);
/// The pause before each change, so that the blocking query (or the watch) that is to see it
/// waits in the server.
const SETTLE: Duration = Duration::from_millis(100);
/// Instances per catalog node in the Consul bulk load.
const PER_NODE: usize = 100;
/// Consul's limit of operations in one transaction.
const CONSUL_TXN_OPS: usize = 64;
/// etcd's default `--max-txn-ops`.
const ETCD_TXN_OPS: usize = 128;

/// Propagation does not depend on the strategy: one that builds nothing shows the backend's
/// cost. It notes whether the set it is built for holds the probe being looked for, so that
/// checking costs a binary search, not a copy of 10,000 endpoints.
#[derive(Clone, Default)]
struct First {
    probe: Arc<Mutex<Probe>>,
}
#[derive(Default)]
struct Probe {
    id: Option<InstanceId>,
    /// Whether the last set built holds `id`.
    present: bool,
}
struct FirstPicker;
impl waypost_core::Strategy for First {
    fn name(&self) -> &str {
        "first"
    }
    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        let mut probe = self.probe.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = &probe.id {
            // A balancer without tiers builds for its endpoints sorted by id.
            probe.present = endpoints.binary_search_by(|e| e.id().cmp(id)).is_ok();
        }
        Box::new(FirstPicker)
    }
}
impl First {
    /// Looks for `id` from the next build on.
    fn look_for(&self, id: &InstanceId) {
        let mut probe = self.probe.lock().unwrap_or_else(|p| p.into_inner());
        probe.id = Some(id.clone());
        probe.present = false;
    }
    /// Whether the set last built holds the probe looked for.
    fn serves_probe(&self) -> bool {
        self.probe.lock().unwrap_or_else(|p| p.into_inner()).present
    }
}
impl Picker for FirstPicker {
    fn pick(&self, endpoints: &[Endpoint], _: &PickContext<'_>) -> Option<usize> {
        (!endpoints.is_empty()).then_some(0)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Consul,
    Etcd,
}

struct Args {
    backends: Vec<Backend>,
    instances: usize,
    changes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        backends: vec![Backend::Consul, Backend::Etcd],
        instances: 10_000,
        changes: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value:?}: {e}"))
        };
        match flag.as_str() {
            "--backend" => {
                args.backends = match value.as_str() {
                    "consul" => vec![Backend::Consul],
                    "etcd" => vec![Backend::Etcd],
                    other => return Err(format!("--backend {other:?}: consul or etcd")),
                }
            }
            "--instances" => args.instances = number()?,
            "--changes" => args.changes = number()?,
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    if args.instances == 0 || args.changes == 0 {
        return Err("--instances and --changes must be at least 1".into());
    }
    if args.changes > 1_000 {
        return Err("--changes: at most 1000 (the probes' ports are 30000 + i)".into());
    }
    Ok(args)
}

/// CPU time of the whole process so far.
#[derive(Clone, Copy)]
struct Cpu {
    /// Sum of every live thread's run time (`/proc/self/task/*/schedstat`), ns.
    threads_ns: u64,
    /// Thread count at the reading: a thread that ended in between took its time with it.
    threads: usize,
    /// `utime + stime` of `/proc/self/stat`, in ticks of 10 ms (USER_HZ is 100 on Linux).
    ticks: u64,
}

fn cpu() -> Result<Cpu, Box<dyn Error>> {
    let mut threads_ns = 0;
    let mut threads = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path().join("schedstat");
        // A thread may end while the list is read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let ns: u64 = text
            .split_whitespace()
            .next()
            .ok_or("empty schedstat")?
            .parse()?;
        threads_ns += ns;
        threads += 1;
    }
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The command name, in parentheses, may hold spaces: count fields after its end.
    let rest = &stat[stat.rfind(')').ok_or("bad /proc/self/stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are the 12th and 13th after the name.
    let field = |i: usize| -> Result<u64, Box<dyn Error>> {
        Ok(fields.get(i).ok_or("short /proc/self/stat")?.parse()?)
    };
    Ok(Cpu {
        threads_ns,
        threads,
        ticks: field(11)? + field(12)?,
    })
}

/// `VmRSS` and `VmHWM`, in MiB.
fn memory() -> Result<(f64, f64), Box<dyn Error>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<f64, Box<dyn Error>> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| format!("no {name} in /proc/self/status"))?;
        let kb: f64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets `VmHWM` to the current RSS (Linux 4.0 and later).
fn reset_peak() -> Result<(), Box<dyn Error>> {
    std::fs::write("/proc/self/clear_refs", "5")?;
    Ok(())
}

fn max2(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0.max(b.0), a.1.max(b.1))
}

/// Probe `i`: `probe-i` for Waypost's changes, `plain-i` for the plain client's.
fn probe(i: usize, plain: bool) -> Result<Registration, Box<dyn Error>> {
    let name = if plain { "plain" } else { "probe" };
    Ok(Registration::builder(SERVICE, format!("{name}-{i}"))
        .host("127.0.0.1")
        .port(30_000 + i as u16)
        .check(HealthCheck::ttl(Duration::from_secs(10)))
        .build()?)
}

fn bulk_id(i: usize) -> String {
    format!("i-{i:05}")
}

fn bulk_host(i: usize) -> String {
    format!("10.{}.{}.{}", 1 + i / 65_536, (i / 256) % 256, i % 256)
}

/// Waits, woken by each publish, until the balancer serves `n` instances; returns when.
async fn until_serving(balancer: &Balancer, n: usize) -> Result<Instant, String> {
    let wait = async {
        let mut seen = balancer.generation();
        loop {
            if balancer.status().serving == n {
                return Instant::now();
            }
            seen = balancer.changed(seen).await;
        }
    };
    tokio::time::timeout(BOUND, wait).await.map_err(|_| {
        format!(
            "the balancer did not serve {n} instances within {BOUND:?}: {:?}",
            balancer.status()
        )
    })
}

/// What steps 3 and 4 measured, over every round.
#[derive(Default)]
struct Changes {
    added_from_call: Vec<Duration>,
    added_from_return: Vec<Duration>,
    removed_from_call: Vec<Duration>,
    removed_from_return: Vec<Duration>,
    /// One per balancer built.
    initial_load: Vec<Duration>,
    /// CPU over the changes, ns, from schedstat; `None` once threads came or went in a round.
    cpu_ns: Option<u64>,
    /// CPU over the changes, in 10 ms ticks.
    cpu_ticks: u64,
    /// VmRSS / VmHWM before the first balancer, MiB.
    before: (f64, f64),
    /// The highest VmRSS / VmHWM after an initial load, MiB.
    loaded: (f64, f64),
    /// The highest VmRSS / VmHWM after a round of changes (peak since its initial load), MiB.
    after: (f64, f64),
}

/// One round: a new balancer, its initial load, then adding and removing each probe of
/// `probes`.
async fn measure<B>(
    backend: &B,
    n: usize,
    probes: Range<usize>,
    out: &mut Changes,
) -> Result<(), Box<dyn Error>>
where
    B: Registry + Discovery,
{
    let service = ServiceName::new(SERVICE)?;
    if out.initial_load.is_empty() {
        reset_peak()?;
        out.before = memory()?;
        out.cpu_ns = Some(0);
    }
    reset_peak()?;
    let started = Instant::now();
    let strategy = First::default();
    let balancer = Balancer::watch(backend, &service, strategy.clone());
    let loaded = until_serving(&balancer, n).await?;
    out.initial_load.push(loaded - started);
    out.loaded = max2(out.loaded, memory()?);
    // Let the initial load's stragglers (freeing, a second answer) finish before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    reset_peak()?;

    let before = cpu()?;
    for i in probes {
        let id = InstanceId::new(format!("probe-{i}"))?;
        let reg = probe(i, false)?;
        strategy.look_for(&id);
        // As before the plain client's changes: the watch's next query waits in the server.
        tokio::time::sleep(SETTLE).await;
        let called = Instant::now();
        let handle = backend.register(reg).await?;
        let returned = Instant::now();
        let seen = until_serving(&balancer, n + 1).await?;
        if !strategy.serves_probe() {
            return Err(format!("the balancer serves {} instances, but not {id}", n + 1).into());
        }
        out.added_from_call.push(seen - called);
        out.added_from_return
            .push(seen.saturating_duration_since(returned));

        tokio::time::sleep(SETTLE).await;
        let called = Instant::now();
        handle.shutdown().await?;
        let returned = Instant::now();
        let gone = until_serving(&balancer, n).await?;
        if strategy.serves_probe() {
            return Err(format!("the balancer still serves {id}").into());
        }
        out.removed_from_call.push(gone - called);
        out.removed_from_return
            .push(gone.saturating_duration_since(returned));
    }
    // Work the last change still caused (a second answer) belongs to it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = cpu()?;
    out.after = max2(out.after, memory()?);
    out.cpu_ns = out.cpu_ns.and_then(|sum| {
        (after.threads == before.threads)
            .then(|| sum + after.threads_ns.saturating_sub(before.threads_ns))
    });
    out.cpu_ticks += after.ticks - before.ticks;
    Ok(())
}

/// The agent's own answer times, from the call that made the change.
#[derive(Default)]
struct AgentTimes {
    headers: Vec<Duration>,
    first_chunk: Vec<Duration>,
    whole_body: Vec<Duration>,
    /// Blocking answers that did not show the change yet.
    early_returns: usize,
    /// The largest answer, bytes.
    body_bytes: usize,
    /// A non-blocking read of the whole set, whole body.
    plain_read: Vec<Duration>,
}

struct Timed {
    index: u64,
    headers: Instant,
    first_chunk: Instant,
    done: Instant,
    /// The body's length, bytes.
    bytes: usize,
    /// Whether the body lists the instance looked for.
    lists: bool,
}

/// The query Waypost's watch sends, read to the end (and looked through for instance `id`)
/// but not kept: the plain client's memory must not count as Waypost's.
async fn health_query(
    http: &reqwest::Client,
    base: &str,
    index: Option<u64>,
    id: &str,
) -> Result<Timed, Box<dyn Error + Send + Sync>> {
    let mut url = format!("{base}/v1/health/service/{SERVICE}?passing=true");
    if let Some(index) = index {
        url.push_str(&format!("&index={index}&wait=300s"));
    }
    let mut resp = http.get(&url).send().await?.error_for_status()?;
    let headers = Instant::now();
    let index = resp
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or("no X-Consul-Index")?;
    let mut first_chunk = None;
    let mut last_chunk = None;
    // A `-dev` agent indents its JSON, others do not.
    let needles = [format!("\"ID\": \"{id}\""), format!("\"ID\":\"{id}\"")];
    let keep = needles.iter().map(String::len).max().unwrap_or(0);
    // The end of the previous chunk and this one: a needle may straddle the two.
    let mut window: Vec<u8> = Vec::new();
    let mut lists = false;
    let mut bytes = 0;
    while let Some(chunk) = resp.chunk().await? {
        // When the chunk came, before it is looked through (a few ms per 20 MB in all).
        let now = Instant::now();
        first_chunk.get_or_insert(now);
        last_chunk = Some(now);
        bytes += chunk.len();
        window.extend_from_slice(&chunk);
        // Two-way search (`str::contains`): a bytewise scan would take longer than the
        // transfer.
        let text = String::from_utf8_lossy(&window);
        lists = lists || needles.iter().any(|n| text.contains(n.as_str()));
        window.drain(..window.len().saturating_sub(keep));
    }
    let done = last_chunk.unwrap_or(headers);
    Ok(Timed {
        index,
        headers,
        first_chunk: first_chunk.unwrap_or(done),
        done,
        bytes,
        lists,
    })
}

/// Blocks on `index` until an answer shows `id` present (or absent); returns the answer and how
/// many answers came before it.
async fn block_until(
    http: reqwest::Client,
    base: String,
    mut index: u64,
    id: String,
    present: bool,
) -> Result<(Timed, usize), Box<dyn Error + Send + Sync>> {
    let mut early = 0;
    loop {
        let t = health_query(&http, &base, Some(index), &id).await?;
        if t.lists == present {
            return Ok((t, early));
        }
        early += 1;
        index = t.index.max(1);
    }
}

/// The agent's own answer times for adding and removing plain probe `i`.
async fn agent_times(
    consul: &waypost_consul::Consul,
    http: &reqwest::Client,
    base: &str,
    i: usize,
    out: &mut AgentTimes,
) -> Result<(), Box<dyn Error>> {
    // The dropped balancer's blocking query still waits in the agent: a write releases it.
    flush(http, base, i).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let id = format!("plain-{i}");
    let current = health_query(http, base, None, &id)
        .await
        .map_err(|e| e.to_string())?;
    out.plain_read.push(current.done - start);
    out.body_bytes = out.body_bytes.max(current.bytes);
    let mut index = current.index;
    let mut handle = None;
    for present in [true, false] {
        let waiter = tokio::spawn(block_until(
            http.clone(),
            base.to_owned(),
            index,
            id.clone(),
            present,
        ));
        // Let the query reach the agent and block there before the change.
        tokio::time::sleep(SETTLE).await;
        let called = Instant::now();
        if present {
            handle = Some(consul.register(probe(i, true)?).await?);
        } else if let Some(h) = handle.take() {
            h.shutdown().await?;
        }
        let (t, early) = tokio::time::timeout(BOUND, waiter)
            .await
            .map_err(|_| "the agent did not answer in time")??
            .map_err(|e| e.to_string())?;
        out.early_returns += early;
        out.headers.push(t.headers - called);
        out.first_chunk.push(t.first_chunk - called);
        out.whole_body.push(t.done - called);
        index = t.index;
    }
    Ok(())
}

/// Writes bulk instance 0 again with a new meta value, which answers every blocking query on
/// the service.
async fn flush(http: &reqwest::Client, base: &str, round: usize) -> Result<(), Box<dyn Error>> {
    let body = serde_json::json!({
        "Node": "bulk-0", "Address": bulk_host(0), "SkipNodeUpdate": true,
        "Service": {"ID": bulk_id(0), "Service": SERVICE, "Address": bulk_host(0),
                    "Port": 20_000, "Weights": {"Passing": 1, "Warning": 1},
                    "Meta": {"round": round.to_string()}}});
    put_json(http, base, "/v1/catalog/register", &body).await
}

/// `PUT <base><path>` with `body` as JSON; an error with the agent's answer unless it succeeds.
async fn put_json(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<(), Box<dyn Error>> {
    let resp = http.put(format!("{base}{path}")).json(body).send().await?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(format!("PUT {path}: {status}: {}", resp.text().await?).into());
    }
    Ok(())
}

/// The catalog operations for node `node` and its instances.
fn node_ops(node: usize, n: usize) -> Vec<serde_json::Value> {
    let name = format!("bulk-{node}");
    let host = bulk_host(node * PER_NODE);
    let mut ops = vec![
        serde_json::json!({"Node": {"Verb": "set", "Node": {
            "Node": name, "Address": host, "TaggedAddresses": {"lan": host, "wan": host},
            "Meta": {"consul-network-segment": ""}}}}),
        // Not `serfHealth`: the leader reaps catalog nodes with that check that are not in its
        // Serf cluster (within a minute), these with them.
        serde_json::json!({"Check": {"Verb": "set", "Check": {
            "Node": name, "CheckID": "node-health", "Name": "Node Health Status",
            "Status": "passing", "Output": "Agent alive and reachable"}}}),
    ];
    for i in node * PER_NODE..((node + 1) * PER_NODE).min(n) {
        let id = bulk_id(i);
        ops.push(
            serde_json::json!({"Service": {"Verb": "set", "Node": name, "Service": {
            "ID": id, "Service": SERVICE, "Address": bulk_host(i), "Port": 20_000 + (i % 10_000),
            "Weights": {"Passing": 1, "Warning": 1}}}}),
        );
        ops.push(serde_json::json!({"Check": {"Verb": "set", "Check": {
            "Node": name, "CheckID": format!("service:{id}"),
            "Name": format!("waypost health of {id}"), "Status": "passing",
            "ServiceID": id, "Output": "TTL check passed"}}}));
    }
    ops
}

async fn bulk_consul(http: &reqwest::Client, base: &str, n: usize) -> Result<(), Box<dyn Error>> {
    // Node by node, so that a node's operations come before its services'.
    for node in 0..n.div_ceil(PER_NODE) {
        for batch in node_ops(node, n).chunks(CONSUL_TXN_OPS) {
            put_json(
                http,
                base,
                "/v1/txn",
                &serde_json::Value::from(batch.to_vec()),
            )
            .await?;
        }
    }
    Ok(())
}

async fn bulk_etcd(
    etcd: &waypost_etcd::Etcd,
    endpoint: &str,
    n: usize,
) -> Result<(), Box<dyn Error>> {
    use waypost_etcd::etcd_client::{Client, Txn, TxnOp};
    let mut client = Client::connect([endpoint], None).await?;
    let service = ServiceName::new(SERVICE)?;
    let ids: Vec<usize> = (0..n).collect();
    for batch in ids.chunks(ETCD_TXN_OPS) {
        let mut ops = Vec::with_capacity(batch.len());
        for &i in batch {
            let inst = ServiceInstance::builder(SERVICE, bulk_id(i))
                .host(bulk_host(i))
                .port(20_000 + (i % 10_000) as u16)
                .build()?;
            ops.push(TxnOp::put(
                etcd.key(&service, inst.id()),
                waypost_etcd::encode_record(&inst),
                None,
            ));
        }
        client.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// p50, p95, max.
fn stats(samples: &[Duration]) -> (Duration, Duration, Duration) {
    let mut s = samples.to_vec();
    s.sort();
    (quantile(&s, 0.5), quantile(&s, 0.95), s[s.len() - 1])
}

fn row(what: &str, samples: &[Duration]) {
    let (p50, p95, max) = stats(samples);
    println!(
        "| {what} | {} | {} | {} | {} |",
        samples.len(),
        ms(p50),
        ms(p95),
        ms(max)
    );
}

fn report(name: &str, n: usize, c: &Changes, agent: Option<&AgentTimes>) {
    let changes = c.added_from_call.len();
    println!("### {name}: one service with {n} instances, {changes} adds and {changes} removes\n");
    println!("| measure | samples | p50 | p95 | max |");
    println!("|---|---:|---:|---:|---:|");
    // In turns with the agent's: add, remove, add, remove, ...
    let every: Vec<Duration> = c
        .added_from_call
        .iter()
        .zip(&c.removed_from_call)
        .flat_map(|(a, r)| [*a, *r])
        .collect();
    row("register called → balancer serves it", &c.added_from_call);
    row(
        "register returned → balancer serves it",
        &c.added_from_return,
    );
    row("shutdown called → balancer drops it", &c.removed_from_call);
    row(
        "shutdown returned → balancer drops it",
        &c.removed_from_return,
    );
    row("**every change, from the call**", &every);
    if let Some(a) = agent {
        let (adds, removes): (Vec<_>, Vec<_>) = a
            .whole_body
            .iter()
            .enumerate()
            .partition(|(k, _)| k % 2 == 0);
        let direction = |v: Vec<(usize, &Duration)>| -> Vec<Duration> {
            v.into_iter().map(|(_, d)| *d).collect()
        };
        row(
            "agent, plain client: register called → whole body",
            &direction(adds),
        );
        row(
            "agent, plain client: shutdown called → whole body",
            &direction(removes),
        );
        row("agent, plain client: call → answer's headers", &a.headers);
        row(
            "agent, plain client: call → first body chunk",
            &a.first_chunk,
        );
        row("**agent, plain client: call → whole body**", &a.whole_body);
        row(
            "agent, plain client: a read without index, whole body",
            &a.plain_read,
        );
    }
    row(
        "initial load: watch started → balancer serves all",
        &c.initial_load,
    );
    println!();
    println!("| client cost | value |");
    println!("|---|---:|");
    let per = (2 * changes) as f64;
    match c.cpu_ns {
        Some(ns) => println!(
            "| CPU per change (user + sys, all threads) | {:.2} ms |",
            ns as f64 / per / 1e6
        ),
        None => println!(
            "| CPU per change (user + sys, all threads) | threads came or went: see the ticks |"
        ),
    }
    println!(
        "| CPU per change (utime + stime, 10 ms ticks) | {:.1} ms |",
        c.cpu_ticks as f64 * 10.0 / per
    );
    println!(
        "| VmRSS / VmHWM before the first balancer | {:.1} / {:.1} MiB |",
        c.before.0, c.before.1
    );
    println!(
        "| VmRSS / VmHWM after an initial load (highest) | {:.1} / {:.1} MiB |",
        c.loaded.0, c.loaded.1
    );
    println!(
        "| VmRSS / VmHWM after changes (highest; peak since the initial load) | {:.1} / {:.1} MiB |",
        c.after.0, c.after.1
    );
    if let Some(a) = agent {
        let (w50, w95, _) = stats(&every);
        let (a50, a95, _) = stats(&a.whole_body);
        println!(
            "| Waypost / agent's whole body, p50 (p95) | {:.2}× ({:.2}×) |",
            w50.as_secs_f64() / a50.as_secs_f64(),
            w95.as_secs_f64() / a95.as_secs_f64()
        );
        // Change k of Waypost against change k of the plain client, measured next to it.
        let mut ratios: Vec<f64> = every
            .iter()
            .zip(&a.whole_body)
            .map(|(w, a)| w.as_secs_f64() / a.as_secs_f64())
            .collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "| Waypost / agent, change by change: median | {:.2}× |",
            ratios[ratios.len() / 2]
        );
        println!(
            "| the largest answer | {:.1} MiB |",
            a.body_bytes as f64 / 1_048_576.0
        );
        println!(
            "| blocking answers without the change (plain client) | {} |",
            a.early_returns
        );
    }
    println!();
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let out = f.await;
    eprintln!("{what} in {:.2} s", start.elapsed().as_secs_f64());
    out
}

async fn consul(n: usize, changes: usize) -> Result<(), Box<dyn Error>> {
    let server = ConsulServer::start().await;
    let base = server.http_url();
    let http = reqwest::Client::builder().no_proxy().build()?;
    timed("consul bulk load", bulk_consul(&http, &base, n)).await?;
    let consul = waypost_consul::Consul::builder().address(&base).build()?;
    let mut c = Changes::default();
    let mut a = AgentTimes::default();
    let started = Instant::now();
    for i in 0..changes {
        measure(&consul, n, i..i + 1, &mut c).await?;
        agent_times(&consul, &http, &base, i, &mut a).await?;
    }
    eprintln!(
        "consul changes measured in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    report("consul", n, &c, Some(&a));
    Ok(())
}

async fn etcd(n: usize, changes: usize) -> Result<(), Box<dyn Error>> {
    let server = EtcdServer::start().await;
    let etcd = waypost_etcd::Etcd::builder()
        .endpoints(server.endpoints())
        .connect()
        .await?;
    timed("etcd bulk load", bulk_etcd(&etcd, &server.endpoint(), n)).await?;
    let mut c = Changes::default();
    timed("etcd changes", measure(&etcd, n, 0..changes, &mut c)).await?;
    report("etcd", n, &c, None);
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    for backend in args.backends {
        match backend {
            Backend::Consul => consul(args.instances, args.changes).await?,
            Backend::Etcd => etcd(args.instances, args.changes).await?,
        }
    }
    Ok(())
}
