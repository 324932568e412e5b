//! Sends requests to a service through Waypost's balancer and HTTP client, and reports where
//! they went as one JSON object.
//!
//! ```text
//! cargo run --example client --features consul -- --backend consul --service user-service \
//!     --strategy weighted-round-robin --requests 600 --concurrency 4
//! cargo run --example client --features etcd -- --backend etcd --etcd-endpoints http://127.0.0.1:2379
//! ```
//!
//! Waits up to 10 s (`--wait`) for an instance, sends `GET /users/<n>` (n cycles through 1 to
//! 100) and prints:
//! `{"strategy":...,"requests":600,"ok":...,"errors":...,"by_instance":{"<id>":count,...},"by_tier":{"<tier>":count,...},"latency_ms":{"p50":...,"p99":...}}`
//! where `ok` counts 2xx answers, `errors` everything else (error statuses and failed
//! requests), `by_instance` the 2xx answers per instance id, `by_tier` the 2xx answers per
//! failover tier (one tier, named after the backend, without failover), and latencies are per
//! request, retries included. Diagnostics go to stderr; the exit status is 0 whenever the report is
//! printed.
//!
//! `--strategy` takes every name of `waypost::strategies::names()` (the opt-in ones need their
//! feature, e.g. `--features consul,p2c-ewma`). `--key` routes hashing strategies
//! (`consistent-hash`, `maglev`): `--key path` hashes the request path (`/users/<n>`);
//! `--key <header-name>` sends that header with value `user-<n>` and hashes it.
//!
//! Failover: `--backend consul --datacenter dc1 --failover dc2,dc3` balances over three tiers,
//! one per datacenter, through the local agent: dc1 takes all the traffic while enough of its
//! instances pass their checks, and spills to dc2 (then dc3) as they fail (Envoy's rule with
//! an overprovisioning factor of 1.4; see `waypost::BalancerBuilder::tier`).
//! `--failover-backend etcd` adds a second registry as the last tier (an instance registered
//! in both is served once).
//!
//! TLS: instances registered with metadata `scheme=https` (as `user-service --tls-cert F
//! --tls-key F` registers itself) are reached over HTTPS. `--ca ca.pem` trusts the CA that
//! signed their certificates; without it they are refused, and each failed request is logged
//! with the reason and the fix. `--client-cert client.pem --client-key client-key.pem`
//! presents a client certificate to instances that require one (`user-service
//! --tls-client-ca`).
//!
//! `--backend memory` starts three in-process instances (weights 1, 2, 3) to talk to, so the
//! client can be tried without any server.
//!
//! `--duration 30s` sends until that much time has passed instead of `--requests N` (the two
//! exclude each other; `requests` in the report then says how many were sent).
//! `--metrics-addr 127.0.0.1:9100` serves Waypost's metrics in Prometheus' text format at
//! `GET /metrics` while the client runs (port 0 picks a free port; the address is logged).
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`).

mod common;
// The tests serve HTTPS instances.
#[cfg(test)]
#[path = "common/tls.rs"]
mod tls;

use common::Report;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use waypost::http::{HashKey, HttpClient};
use waypost::ServiceName;

use common::{BackendArgs, LoadArgs};

#[derive(Debug, Parser)]
#[command(about = "Sends requests to a service through Waypost and reports where they went")]
struct Args {
    #[command(flatten)]
    backend: BackendArgs,
    /// Service to send to.
    #[arg(long, default_value = "user-service")]
    service: String,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    tls: common::ClientTlsArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    let args = Args::parse();
    common::print_report("client", run(args).await)
}

/// Starts, sends, stops.
async fn run(args: Args) -> Result<Report, String> {
    let session = Session::start(args).await?;
    let report = session.send().await;
    session.stop().await;
    report
}

/// A client ready to send: its metrics endpoint up (if asked for), its balancer ready, and with
/// the memory backend its own three instances serving.
struct Session {
    args: Args,
    client: HttpClient,
    hash_key: Option<HashKey>,
    demo: Demo,
    metrics: Option<common::MetricsServer>,
    /// Kept for as long as the session: the in-process registry lives only while it is held.
    backend: common::Backend,
}

impl Session {
    async fn start(args: Args) -> Result<Session, String> {
        // Bad input fails before anything listens or connects.
        let service = ServiceName::new(&args.service).map_err(|e| e.to_string())?;
        let hash_key = match args.load.key.as_deref() {
            None => None,
            Some("path") => Some(HashKey::Path),
            Some(header) => Some(HashKey::header(header).map_err(|e| e.to_string())?),
        };
        let strategy = args
            .load
            .strategy
            .parse::<waypost::strategies::StrategyKind>()
            .map_err(|e| e.to_string())?
            .build();
        let tls = args.tls.read()?;

        let metrics = match &args.load.metrics_addr {
            Some(addr) => Some(common::MetricsServer::start(addr).await?),
            None => None,
        };
        let backend = args.backend.connect().await?;
        let demo = demo_instances(&args, &backend).await?;

        let balancer = backend.balancer(&service, strategy);
        let start_one = format!(
            "cargo run --example user-service --features consul -- --backend consul --name {service} --port 0"
        );
        if let Err(why) = backend
            .ready(&balancer, &service, args.load.wait, &start_one)
            .await
        {
            stop_demo(demo).await;
            return Err(why);
        }
        let mut builder = HttpClient::builder(balancer).request_timeout(args.load.timeout);
        if let Some(limit) = args.load.per_try_timeout {
            builder = builder.per_try_timeout(limit);
        }
        if let Some(hedge) = args.load.hedge {
            builder = builder.hedge(hedge.hedge());
        }
        if let Some(key) = hash_key.clone() {
            builder = builder.hash_key(key);
        }
        if let Some(ca) = &tls.ca {
            builder = builder.ca_certificate(ca);
        }
        if let Some((cert, key)) = &tls.identity {
            builder = builder.identity(cert, key);
        }
        let client = match builder.build() {
            Ok(client) => client,
            Err(e) => {
                stop_demo(demo).await;
                return Err(e.to_string());
            }
        };
        Ok(Session {
            args,
            client,
            hash_key,
            demo,
            metrics,
            backend,
        })
    }

    /// Where the metrics endpoint listens, when `--metrics-addr` was given.
    #[cfg(test)]
    fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(common::MetricsServer::addr)
    }

    /// Sends `--requests` requests, or for `--duration`, `--concurrency` at a time.
    async fn send(&self) -> Result<Report, String> {
        let (client, hash_key) = (self.client.clone(), self.hash_key.clone());
        let tiers = Arc::new(self.backend.tier_names());
        self.args
            .load
            .drive(move |i| {
                let (client, hash_key, tiers) = (client.clone(), hash_key.clone(), tiers.clone());
                async move { one(&client, i, hash_key.as_ref(), &tiers).await }
            })
            .await
    }

    /// Deregisters and stops the demo instances, then the metrics endpoint.
    async fn stop(self) {
        stop_demo(self.demo).await;
        if let Some(metrics) = self.metrics {
            if let Err(e) = metrics.stop().await {
                tracing::warn!("the metrics endpoint failed: {e}");
            }
        }
    }
}

async fn stop_demo(demo: Demo) {
    for (registration, server) in demo {
        let _ = registration.shutdown().await;
        let _ = server.stop().await;
    }
}

/// One request: the instance that answered with 2xx (`None` otherwise), and its latency.
async fn one(
    client: &HttpClient,
    i: usize,
    key: Option<&HashKey>,
    tiers: &[String],
) -> (Option<common::Answered>, Duration) {
    let n = i % common::USERS as usize + 1;
    let mut request = client.get(format!("/users/{n}"));
    if let Some(HashKey::Header(name)) = key {
        request = request.header(name.clone(), format!("user-{n}"));
    }
    let started = Instant::now();
    let outcome = request.send().await;
    let latency = started.elapsed();
    match outcome {
        Ok(r) if r.status().is_success() => {
            let answered = common::Answered {
                instance: r.instance().id().to_string(),
                tier: tiers.get(r.tier()).cloned(),
            };
            (Some(answered), latency)
        }
        Ok(r) => {
            tracing::warn!(status = %r.status(), instance = %r.instance().id(), "error status");
            (None, latency)
        }
        Err(e) => {
            tracing::warn!("request failed: {e}");
            (None, latency)
        }
    }
}

type Demo = Vec<(waypost::RegistrationHandle, common::UserService)>;

/// With the in-process backend there is nobody else to register instances: start three.
#[cfg(feature = "memory")]
async fn demo_instances(args: &Args, backend: &common::Backend) -> Result<Demo, String> {
    if backend.memory.is_none() {
        return Ok(Vec::new());
    }
    tracing::info!(
        "memory backend: serving three in-process instances of {} (weights 1, 2, 3)",
        args.service
    );
    let mut demo = Vec::new();
    for weight in 1..=3u32 {
        let id = format!("{}-{weight}", args.service);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot listen on loopback: {e}"))?;
        let server = common::UserService::start(listener, &id).map_err(|e| e.to_string())?;
        let registration = waypost::Registration::builder(&args.service, &id)
            .host("127.0.0.1")
            .port(server.addr().port())
            .weight(weight)
            .build()
            .map_err(|e| e.to_string())?;
        let handle = backend
            .registry
            .register(registration)
            .await
            .map_err(|e| e.to_string())?;
        demo.push((handle, server));
    }
    Ok(demo)
}

#[cfg(not(feature = "memory"))]
async fn demo_instances(_: &Args, _: &common::Backend) -> Result<Demo, String> {
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use common::scrape::{self, Scrape};
    use waypost_conformance::scenarios::eventually;

    type Running = (waypost::RegistrationHandle, common::UserService);

    /// A user service on `listener` (plain or TLS), registered in `registry` as `id` of
    /// `service` at the port it bound, with `scheme=https` when `https`.
    async fn registered<L>(
        registry: &dyn waypost::Registry,
        service: &str,
        id: &str,
        listener: L,
        https: bool,
    ) -> Running
    where
        L: axum::serve::Listener<Addr = std::net::SocketAddr>,
    {
        let server = common::UserService::start(listener, id).unwrap();
        let mut reg = waypost::Registration::builder(service, id)
            .host("127.0.0.1")
            .port(server.addr().port());
        if https {
            reg = reg.meta(waypost::SCHEME_METADATA, "https");
        }
        (
            registry.register(reg.build().unwrap()).await.unwrap(),
            server,
        )
    }

    async fn loopback() -> tokio::net::TcpListener {
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
    }

    /// Deregisters and stops what `registered` started.
    async fn stop_all(running: Vec<Running>) {
        for (handle, server) in running {
            handle.shutdown().await.unwrap();
            server.stop().await.unwrap();
        }
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("client").chain(args.iter().copied()))
    }

    #[test]
    fn the_issue_command_line_parses_and_every_strategy_is_accepted() {
        let args = parse(&[
            "--backend",
            "consul",
            "--service",
            "user-service",
            "--strategy",
            "weighted-round-robin",
            "--requests",
            "600",
            "--concurrency",
            "4",
        ])
        .unwrap();
        assert_eq!(args.backend.backend, common::BackendKind::Consul);
        assert_eq!((args.load.requests, args.load.concurrency), (600, 4));
        for name in waypost::strategies::names() {
            assert_eq!(parse(&["--strategy", name]).unwrap().load.strategy, name);
        }
        let err = parse(&["--strategy", "fastest"]).unwrap_err().to_string();
        assert!(
            err.contains("round-robin"),
            "the error lists the valid names: {err}"
        );
        assert!(parse(&["--concurrency", "0"]).is_err());

        assert_eq!(
            parse(&["--hedge", "50ms"]).unwrap().load.hedge,
            Some(common::HedgeArg::After(Duration::from_millis(50)))
        );
        assert_eq!(
            parse(&["--hedge", "p95"]).unwrap().load.hedge,
            Some(common::HedgeArg::P95)
        );
        let err = parse(&["--hedge", "soon"]).unwrap_err().to_string();
        assert!(err.contains("or p95"), "{err}");
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        // common::percentile_ms, which the gRPC client's report uses too.
        use common::percentile_ms;
        assert_eq!(percentile_ms(&ms, 50), 50.0);
        assert_eq!(percentile_ms(&ms, 99), 99.0);
        assert_eq!(percentile_ms(&ms[..1], 99), 1.0);
        assert_eq!(percentile_ms(&[], 50), 0.0);
    }

    #[tokio::test]
    async fn the_report_follows_the_contract() {
        let args = parse(&[
            "--backend",
            "memory",
            "--strategy",
            "weighted-round-robin",
            "--requests",
            "60",
        ])
        .unwrap();
        let report = run(args).await.unwrap();
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.starts_with(r#"{"strategy":"weighted-round-robin","requests":60,"ok":60,"errors":0,"by_instance":{"#), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let by: BTreeMap<String, usize> = serde_json::from_value(v["by_instance"].clone()).unwrap();
        assert_eq!(
            by.keys().collect::<Vec<_>>(),
            ["user-service-1", "user-service-2", "user-service-3"]
        );
        assert_eq!(by.values().sum::<usize>(), 60);
        assert_eq!(v["by_tier"], serde_json::json!({"memory": 60}));
        let (p50, p99) = (
            v["latency_ms"]["p50"].as_f64().unwrap(),
            v["latency_ms"]["p99"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99, "{p50} {p99}");
    }

    #[tokio::test]
    async fn failover_flags_parse_and_name_consul_datacenters() {
        let args = parse(&[
            "--backend",
            "consul",
            "--datacenter",
            "dc1",
            "--failover",
            "dc2,dc3",
            "--failover-backend",
            "etcd",
        ])
        .unwrap();
        assert_eq!(args.backend.datacenter.as_deref(), Some("dc1"));
        assert_eq!(args.backend.failover, ["dc2", "dc3"]);
        assert_eq!(
            args.backend.failover_backend,
            Some(common::BackendKind::Etcd)
        );
        let err = run(parse(&["--backend", "memory", "--failover", "dc2"]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("--backend consul"), "{err}");
        let err = run(parse(&["--backend", "memory", "--failover-backend", "memory"]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("the other one"), "{err}");
    }

    #[tokio::test]
    async fn bad_input_and_a_missing_service_are_clear_errors() {
        let err = run(parse(&["--service", "bad/name"]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("service name"), "{err}");
        let err = run(parse(&["--key", "bad header"]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("header name"), "{err}");

        // An agent address where nothing listens: said so, with the address and what to do.
        #[cfg(feature = "consul")]
        {
            let closed = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let addr = closed.to_string();
            let args = parse(&[
                "--backend",
                "consul",
                "--consul-addr",
                &addr,
                "--wait",
                "300ms",
            ])
            .unwrap();
            let err = run(args).await.unwrap_err();
            assert!(
                err.contains(&format!(
                    "the consul backend at http://{addr}/ is unreachable"
                )),
                "{err}"
            );
            assert!(err.contains("--consul-addr"), "what to do: {err}");
            assert!(!err.contains("no instance"), "{err}");
        }
    }

    /// The three reasons for no instance, each against a real Consul agent: it refuses the
    /// token, it answers and has none, or (above) nothing listens at the address.
    #[cfg(feature = "consul")]
    #[tokio::test]
    async fn a_refused_token_and_a_service_nobody_registered_are_told_apart() {
        use waypost_conformance::consul_server::ConsulServer;
        let acl = ConsulServer::start_with_acl().await;
        let dir = std::env::temp_dir().join(format!("waypost-client-acl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wrong = dir.join("wrong-token");
        std::fs::write(&wrong, "00000000-0000-4000-8000-000000000bad").unwrap();
        let url = format!(
            "consul://{}?token_file={}",
            acl.addr(),
            wrong.to_str().unwrap()
        );
        let err = run(parse(&["--registry", &url, "--wait", "2s"]).unwrap())
            .await
            .unwrap_err();
        assert!(
            err.contains(&format!(
                "the consul backend at http://{}/ refused the credentials",
                acl.addr()
            )),
            "{err}"
        );
        assert!(err.contains("CONSUL_HTTP_TOKEN"), "what to do: {err}");
        assert!(err.contains("ACL not found"), "Consul's own answer: {err}");
        std::fs::remove_dir_all(&dir).unwrap();

        let consul = ConsulServer::start().await;
        let args = parse(&[
            "--backend",
            "consul",
            "--consul-addr",
            &consul.addr(),
            "--service",
            "nobody-here",
            "--wait",
            "1s",
        ])
        .unwrap();
        let err = run(args).await.unwrap_err();
        assert!(
            err.contains("no instance of nobody-here appeared within 1s"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_registry_url_replaces_the_backend_flags() {
        let report = run(parse(&["--registry", "memory://", "--requests", "6"]).unwrap())
            .await
            .unwrap();
        assert_eq!((report.ok, report.errors), (6, 0), "{report:?}");
        assert_eq!(
            report.by_tier,
            Some(BTreeMap::from([("memory".to_string(), 6)]))
        );
        let err = parse(&["--registry", "consul://h:1?datacenter=dc1"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown parameter"), "{err}");
        assert!(parse(&["--registry", "memory://", "--backend", "etcd"]).is_err());
    }

    /// Checks a scrape taken after `report`'s requests (none of them retried) and before the
    /// client stopped: per-outcome and per-instance counts, nothing left in flight, one
    /// duration sample per request in real histogram buckets, and the membership.
    fn check_metrics(scrape: &Scrape, service: &str, report: &Report, instances: usize) {
        let s = [("service", service)];
        let n = report.requests as f64;
        assert!(report.requests > 0, "{report:?}");
        assert_eq!(scrape.sum("waypost_requests_total", &s), n, "{report:?}");
        let ok = [("service", service), ("outcome", "success")];
        assert_eq!(
            scrape.sum("waypost_requests_total", &ok),
            report.ok as f64,
            "{report:?}"
        );
        for (id, count) in &report.by_instance {
            let labels = [
                ("service", service),
                ("instance", id.as_str()),
                ("outcome", "success"),
            ];
            assert_eq!(
                scrape.value("waypost_requests_total", &labels),
                Some(*count as f64),
                "{id}: {report:?}"
            );
        }
        assert_eq!(scrape.sum("waypost_requests_active", &s), 0.0);
        assert_eq!(
            scrape.sum("waypost_request_duration_seconds_count", &s),
            n,
            "one duration per request"
        );
        let inf = [("service", service), ("le", "+Inf")];
        assert_eq!(
            scrape.sum("waypost_request_duration_seconds_bucket", &inf),
            n,
            "rendered as a histogram with buckets"
        );
        assert_eq!(
            scrape.value("waypost_membership_total", &s),
            Some(instances as f64)
        );
        assert_eq!(
            scrape.value("waypost_membership_served", &s),
            Some(instances as f64)
        );
        assert_eq!(scrape.value("waypost_fail_static", &s), Some(0.0));
        let snapshots = [("service", service), ("kind", "snapshot")];
        assert!(
            scrape.sum("waypost_watch_events_total", &snapshots) >= 1.0,
            "the watch's first snapshot is counted"
        );
    }

    #[tokio::test]
    async fn the_metrics_endpoint_counts_what_the_report_says() {
        let service = "metrics-memory";
        let args = parse(&[
            "--backend",
            "memory",
            "--service",
            service,
            "--strategy",
            "weighted-round-robin",
            "--requests",
            "60",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .unwrap();
        let mut session = Session::start(args).await.unwrap();
        let addr = session.metrics_addr().unwrap();
        assert_ne!(addr.port(), 0, "the bound port, not the one asked for");
        let report = session.send().await.unwrap();
        assert_eq!((report.requests, report.ok), (60, 60), "{report:?}");
        // Weights 1, 2, 3 over 60 requests.
        let by: Vec<_> = report.by_instance.values().copied().collect();
        assert_eq!(by, [10, 20, 30], "{report:?}");
        let scrape = scrape::get(addr).await;
        check_metrics(&scrape, service, &report, 3);

        // The balancer still follows the registry: one instance leaves, and the membership
        // and the watch's removals say so.
        let (registration, server) = session.demo.remove(0);
        registration.shutdown().await.unwrap();
        server.stop().await.unwrap();
        let s = [("service", service)];
        let removed = [("service", service), ("kind", "removed")];
        eventually(Duration::from_secs(5), "one instance removed", || async {
            let scrape = scrape::get(addr).await;
            let seen = (
                scrape.value("waypost_membership_total", &s),
                scrape.sum("waypost_watch_events_total", &removed),
            );
            match seen {
                (Some(2.0), 1.0) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        session.stop().await;
        // The endpoint stopped with the client.
        assert!(reqwest::get(format!("http://{addr}/metrics"))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn duration_sends_until_the_time_is_up_and_the_report_counts_what_was_sent() {
        let service = "metrics-duration";
        let args = parse(&[
            "--service",
            service,
            "--duration",
            "400ms",
            "--concurrency",
            "2",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(args.load.duration, Some(Duration::from_millis(400)));
        let session = Session::start(args).await.unwrap();
        let started = Instant::now();
        let report = session.send().await.unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert!(took < Duration::from_secs(6), "{took:?}");
        assert!(report.requests > 2, "{report:?}");
        assert_eq!(report.ok + report.errors, report.requests, "{report:?}");
        assert_eq!(
            report.by_instance.values().sum::<usize>(),
            report.ok,
            "{report:?}"
        );
        let scrape = scrape::get(session.metrics_addr().unwrap()).await;
        check_metrics(&scrape, service, &report, 3);
        session.stop().await;
    }

    #[test]
    fn duration_and_requests_exclude_each_other() {
        let err = parse(&["--duration", "10s", "--requests", "5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--requests"), "{err}");
        assert_eq!(
            parse(&["--duration", "500ms"]).unwrap().load.duration,
            Some(Duration::from_millis(500))
        );
        assert!(parse(&["--duration", "soon"]).is_err());
        assert_eq!(parse(&[]).unwrap().load.duration, None);
    }

    #[tokio::test]
    async fn a_metrics_address_that_cannot_be_bound_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = run(parse(&["--metrics-addr", &addr]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("cannot listen for metrics on"), "{err}");
        let err = run(parse(&["--metrics-addr", "no-port"]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("no-port"), "{err}");
    }

    /// Serves two instances of `service` registered through `backend`, then checks the client's
    /// report and its metrics.
    #[cfg(any(feature = "consul", feature = "etcd"))]
    async fn exercise(service: &str, backend: &[&str]) {
        let mut args = vec![
            "--service",
            service,
            "--strategy",
            "round-robin",
            "--requests",
            "40",
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(backend);
        let args = parse(&args).unwrap();
        let connected = args.backend.connect().await.unwrap();
        let mut running = Vec::new();
        let ids = [format!("{service}-a"), format!("{service}-b")];
        for id in &ids {
            running
                .push(registered(&*connected.registry, service, id, loopback().await, false).await);
        }
        // Both are listed before the client starts, so round robin splits evenly.
        common::listed(&connected, service, 2).await;

        let session = Session::start(args).await.unwrap();
        let report = session.send().await.unwrap();
        assert_eq!((report.ok, report.errors), (40, 0), "{report:?}");
        assert_eq!(report.by_instance[&ids[0]], 20, "{report:?}");
        assert_eq!(report.by_instance[&ids[1]], 20, "{report:?}");
        let scrape = scrape::get(session.metrics_addr().unwrap()).await;
        check_metrics(&scrape, service, &report, 2);
        session.stop().await;
        stop_all(running).await;
    }

    /// `--per-try-timeout` and `--hedge`: of two instances in a real Consul agent, one accepts
    /// connections and never answers. With either flag every request is answered by the other (a
    /// per-try timeout ends the attempt as a failure, a hedge races it and drops it); without
    /// them, a request that goes to the hanging one first waits out `--timeout` and fails.
    #[cfg(feature = "consul")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_try_timeout_or_hedge_leaves_time_for_another_instance_when_one_hangs() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        let service = "users-hangs";
        let addr = consul.addr();
        let backend = ["--backend", "consul", "--consul-addr", addr.as_str()];
        let connected = parse(&backend).unwrap().backend.connect().await.unwrap();
        let works = registered(
            &*connected.registry,
            service,
            "works",
            loopback().await,
            false,
        )
        .await;
        let (hangs, listener) = common::register_hanging(&connected, service).await;
        common::listed(&connected, service, 2).await;
        let args = |flag: Option<[&'static str; 2]>| {
            parse(&common::hanging_run_args(service, &backend, flag)).unwrap()
        };

        for flag in [["--per-try-timeout", "200ms"], ["--hedge", "50ms"]] {
            let session = Session::start(args(Some(flag))).await.unwrap();
            let report = session.send().await.unwrap();
            assert_eq!((report.ok, report.errors), (4, 0), "{flag:?}: {report:?}");
            assert_eq!(report.by_instance.keys().collect::<Vec<_>>(), ["works"]);
            session.stop().await;
        }

        let session = Session::start(args(None)).await.unwrap();
        let report = session.send().await.unwrap();
        assert!(report.errors > 0, "{report:?}");
        session.stop().await;

        hangs.shutdown().await.unwrap();
        listener.abort();
        stop_all(vec![works]).await;
    }

    #[cfg(feature = "consul")]
    #[tokio::test]
    async fn reports_on_a_service_in_a_real_consul_agent() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        exercise(
            "users-consul",
            &["--backend", "consul", "--consul-addr", &consul.addr()],
        )
        .await;
    }

    #[cfg(feature = "consul")]
    #[tokio::test]
    async fn reports_on_a_service_in_a_real_consul_agent_named_by_a_url() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        let url = format!("consul://{}?dc=dc1", consul.addr());
        exercise("users-consul-url", &["--registry", &url]).await;
    }

    /// `--datacenter dc1 --failover dc2` on two real Consul datacenters joined over the WAN:
    /// with dc1 empty the report counts everything in dc2; once dc1 has an instance, there.
    #[cfg(feature = "consul")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failover_between_two_real_datacenters_is_reported_by_tier() {
        use waypost_conformance::consul_wan::ConsulDatacenters;
        let dcs = ConsulDatacenters::start(&["dc1", "dc2"]).await;
        let service = "users-failover";
        let start = |dc: &'static str| {
            let addr = dcs.addr(dc);
            async move {
                let consul = waypost::consul::Consul::builder()
                    .address(addr)
                    .build()
                    .unwrap();
                let id = format!("{service}-{dc}");
                registered(&consul, service, &id, loopback().await, false).await
            }
        };
        let dc1_addr = dcs.addr("dc1");
        let args = || {
            parse(&[
                "--backend",
                "consul",
                "--consul-addr",
                &dc1_addr,
                "--datacenter",
                "dc1",
                "--failover",
                "dc2",
                "--service",
                service,
                "--requests",
                "30",
            ])
            .unwrap()
        };
        let in_dc2 = start("dc2").await;
        let report = run(args()).await.unwrap();
        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(
            report.by_tier,
            Some(BTreeMap::from([("dc2".to_string(), 30)])),
            "{report:?}"
        );

        let in_dc1 = start("dc1").await;
        let report = run(args()).await.unwrap();
        assert_eq!(
            report.by_tier,
            Some(BTreeMap::from([("dc1".to_string(), 30)])),
            "{report:?}"
        );
        stop_all(vec![in_dc1, in_dc2]).await;
    }

    #[cfg(feature = "etcd")]
    #[tokio::test]
    async fn reports_on_a_service_in_a_real_etcd() {
        let etcd = waypost_conformance::etcd_server::EtcdServer::start().await;
        exercise(
            "users-etcd",
            &["--backend", "etcd", "--etcd-endpoints", &etcd.endpoint()],
        )
        .await;
    }

    /// `--ca`: two HTTPS instances registered with `scheme=https` in a real Consul agent (as
    /// `user-service --tls-cert --tls-key` registers itself) answer every request of a client
    /// that trusts their CA; a client without it gets none, and its error names `--ca`.
    #[cfg(feature = "consul")]
    #[tokio::test]
    async fn ca_trusts_https_instances_and_without_it_they_are_refused() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        let addr = consul.addr();
        let registry = waypost::consul::Consul::builder()
            .address(&addr)
            .build()
            .unwrap();
        let ca = tls::testing::Ca::new("client test CA");
        let issued = ca.server("127.0.0.1");
        let config =
            tls::server_config(issued.cert.as_bytes(), issued.key.as_bytes(), None).unwrap();
        let files = tls::testing::Files::new("client-ca");
        let ca_file = files.write("ca.pem", &ca.pem());

        let service = "users-https";
        let ids = [format!("{service}-a"), format!("{service}-b")];
        let mut running = Vec::new();
        for id in &ids {
            let listener = tls::TlsListener::new(loopback().await, config.clone()).unwrap();
            running.push(registered(&registry, service, id, listener, true).await);
        }
        let name: ServiceName = service.parse().unwrap();
        eventually(Duration::from_secs(10), "both listed", || async {
            match waypost::Discovery::instances(&registry, &name).await {
                Ok(v) if v.len() == 2 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let args = |ca: Option<&str>| {
            let mut args = vec![
                "--backend",
                "consul",
                "--consul-addr",
                &addr,
                "--service",
                service,
                "--requests",
                "20",
            ];
            if let Some(ca) = ca {
                args.extend_from_slice(&["--ca", ca]);
            }
            parse(&args).unwrap()
        };

        let report = run(args(Some(&ca_file))).await.unwrap();
        assert_eq!((report.ok, report.errors), (20, 0), "{report:?}");
        assert_eq!(report.by_instance[&ids[0]], 10, "{report:?}");
        assert_eq!(report.by_instance[&ids[1]], 10, "{report:?}");

        let session = Session::start(args(None)).await.unwrap();
        let report = session.send().await.unwrap();
        assert_eq!((report.ok, report.errors), (0, 20), "{report:?}");
        let err = session.client.get("/users/1").send().await.unwrap_err();
        assert!(matches!(err, waypost::http::HttpError::Tls { .. }), "{err}");
        assert!(err.to_string().contains("--ca FILE"), "{err}");
        session.stop().await;

        let missing = files.write("not-a-ca.pem", "no certificate here");
        let err = run(args(Some(&missing))).await.unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
        stop_all(running).await;
    }

    /// `--client-cert`/`--client-key`: an instance that requires a client certificate signed by
    /// its CA (as `user-service --tls-client-ca` does) answers a client that presents one, and
    /// refuses one that does not, saying so.
    #[cfg(feature = "consul")]
    #[tokio::test]
    async fn cert_and_key_present_a_client_certificate_to_instances_that_require_one() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        let addr = consul.addr();
        let registry = waypost::consul::Consul::builder()
            .address(&addr)
            .build()
            .unwrap();
        let ca = tls::testing::Ca::new("client test CA");
        let issued = ca.server("127.0.0.1");
        let config = tls::server_config(
            issued.cert.as_bytes(),
            issued.key.as_bytes(),
            Some(ca.pem().as_bytes()),
        )
        .unwrap();
        let client_cert = ca.client("client.waypost.test");
        let files = tls::testing::Files::new("client-mtls");
        let ca_file = files.write("ca.pem", &ca.pem());
        let cert_file = files.write("client.pem", &client_cert.cert);
        let key_file = files.write("client-key.pem", &client_cert.key);

        let service = "users-mtls";
        let listener = tls::TlsListener::new(loopback().await, config).unwrap();
        let running = registered(&registry, service, "users-mtls-a", listener, true).await;
        let base = [
            "--backend",
            "consul",
            "--consul-addr",
            &addr,
            "--service",
            service,
            "--requests",
            "10",
            "--ca",
            &ca_file,
        ];

        let mut with_cert = base.to_vec();
        with_cert.extend_from_slice(&["--client-cert", &cert_file, "--client-key", &key_file]);
        let report = run(parse(&with_cert).unwrap()).await.unwrap();
        assert_eq!((report.ok, report.errors), (10, 0), "{report:?}");

        let session = Session::start(parse(&base).unwrap()).await.unwrap();
        let err = session.client.get("/users/1").send().await.unwrap_err();
        assert!(matches!(err, waypost::http::HttpError::Tls { .. }), "{err}");
        assert!(err.to_string().contains("client certificate"), "{err}");
        session.stop().await;

        stop_all(vec![running]).await;
    }

    #[tokio::test]
    async fn tls_files_that_cannot_be_read_are_clear_errors() {
        let missing = std::env::temp_dir().join("waypost-client-no-such-dir/ca.pem");
        let missing = missing.to_str().unwrap();
        let args = parse(&["--ca", missing]).unwrap();
        assert_eq!(args.tls.ca.as_deref(), Some(std::path::Path::new(missing)));
        let err = run(args).await.unwrap_err();
        assert!(err.contains("cannot read the CA certificate"), "{err}");
        let err = run(parse(&["--client-cert", missing, "--client-key", missing]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("cannot read the client certificate"), "{err}");
        // A certificate goes with its key.
        assert!(parse(&["--client-cert", "c.pem"]).is_err());
        assert!(parse(&["--client-key", "k.pem"]).is_err());
    }
}
