//! The gRPC twin of `client`: sends `GetUser` calls to a service through a
//! `waypost::grpc::GrpcChannel` over a Waypost balancer, and reports where they went as one JSON
//! object.
//!
//! ```text
//! cargo run -p waypost-grpc-examples --example grpc-client -- --backend consul \
//!     --service user-grpc --strategy weighted-round-robin --requests 600 --concurrency 4
//! cargo run -p waypost-grpc-examples --example grpc-client -- --backend etcd \
//!     --etcd-endpoints http://127.0.0.1:2379 --strategy consistent-hash --key path
//! ```
//!
//! Waits up to 10 s (`--wait`) for an instance, sends `GetUser(id = n)` (n cycles through 1 to
//! 100) and prints:
//! `{"strategy":...,"requests":600,"ok":...,"errors":...,"by_instance":{"<id>":count,...},"latency_ms":{"p50":...,"p99":...}}`
//! where `ok` counts the calls answered with status OK, `errors` everything else (error
//! statuses, failed connections, timeouts), `by_instance` the OK answers per instance id as the
//! reply's `instance` field says, and latencies are per call, retries included. Diagnostics go
//! to stderr; the exit status is 0 whenever the report is printed.
//!
//! `--strategy` takes every name of `waypost::strategies::names()`. `--key` routes hashing
//! strategies (`consistent-hash`, `maglev`): `--key path` hashes the requested user id (sent as
//! metadata `x-user-id: <n>`); `--key <metadata-key>` sends that metadata key with value
//! `user-<n>` and hashes it. `GetUser` is declared idempotent, so a call may be retried on
//! another instance. `--ca ca.pem` trusts that CA for instances registered with metadata
//! `scheme=https` (as `grpc-service --tls-cert ... --tls-key ...` registers them), and
//! `--client-cert F --client-key F` presents a client certificate to instances that require
//! one (mutual TLS).
//!
//! `--backend memory` starts three in-process instances (weights 1, 2, 3) to talk to, so the
//! client can be tried without any server. `--duration 30s` sends until that much time has
//! passed instead of `--requests N` (the report's `requests` then says how many were sent).
//! `--metrics-addr 127.0.0.1:9100` serves Waypost's metrics in Prometheus' text format at
//! `GET /metrics` while the client runs (port 0 picks a free port; the address is logged). Logs
//! go to stderr, filtered by `RUST_LOG` (default `info`).

#[path = "../../common/mod.rs"]
mod common;
#[cfg(test)]
#[path = "../../common/test_ca.rs"]
mod test_ca;

use common::Report;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use waypost::grpc::GrpcChannel;
use waypost::ServiceName;
use waypost_grpc_examples::users::users_client::UsersClient;
use waypost_grpc_examples::users::GetUserRequest;
use waypost_grpc_examples::{serve, Serving, UsersServer, GET_USER, USERS};

use common::{BackendArgs, LoadArgs};

/// The metadata key `--key path` sends the requested user id in (and hashes).
const USER_ID_METADATA: &str = "x-user-id";

#[derive(Debug, Parser)]
#[command(about = "Sends gRPC calls to a service through Waypost and reports where they went")]
struct Args {
    #[command(flatten)]
    backend: BackendArgs,
    /// Service to call.
    #[arg(long, default_value = "user-grpc")]
    service: String,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    tls: common::ClientTlsArgs,
}

/// What a call hashes on.
#[derive(Clone, Debug)]
enum Key {
    /// The user id, as metadata `x-user-id: <n>`.
    Path,
    /// This metadata key, with value `user-<n>`.
    Metadata(AsciiMetadataKey),
}

impl Key {
    fn parse(key: &str) -> Result<Key, String> {
        if key == "path" {
            return Ok(Key::Path);
        }
        // `-bin` keys carry binary values; this one carries text.
        match key.parse::<AsciiMetadataKey>() {
            Ok(k) if !k.as_str().ends_with("-bin") => Ok(Key::Metadata(k)),
            _ => Err(format!(
                "--key {key:?} is neither `path` nor a valid (ASCII, non -bin) gRPC metadata key"
            )),
        }
    }

    /// The metadata key the channel hashes.
    fn metadata_key(&self) -> &str {
        match self {
            Key::Path => USER_ID_METADATA,
            Key::Metadata(k) => k.as_str(),
        }
    }

    /// The metadata entry a call for user `n` carries.
    fn entry(&self, n: u32) -> (AsciiMetadataKey, AsciiMetadataValue) {
        match self {
            Key::Path => (
                AsciiMetadataKey::from_static(USER_ID_METADATA),
                AsciiMetadataValue::from(n),
            ),
            Key::Metadata(k) => (k.clone(), user_value(n)),
        }
    }
}

/// `user-<n>` as a metadata value.
fn user_value(n: u32) -> AsciiMetadataValue {
    // Digits and a dash are always a valid metadata value.
    format!("user-{n}")
        .parse()
        .unwrap_or_else(|_| AsciiMetadataValue::from(n))
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    let args = Args::parse();
    common::print_report("grpc-client", run(args).await)
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
    client: UsersClient<GrpcChannel>,
    key: Option<Key>,
    demo: Demo,
    metrics: Option<common::MetricsServer>,
    /// Kept for as long as the session: the in-process registry lives only while it is held.
    _backend: common::Backend,
}

impl Session {
    async fn start(args: Args) -> Result<Session, String> {
        // Bad input fails before anything listens or connects.
        let service = ServiceName::new(&args.service).map_err(|e| e.to_string())?;
        let key = args.load.key.as_deref().map(Key::parse).transpose()?;
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
            "cargo run -p waypost-grpc-examples --example grpc-service -- --backend consul \
             --name {service} --port 0"
        );
        if let Err(why) = backend
            .ready(&balancer, &service, args.load.wait, &start_one)
            .await
        {
            stop_demo(demo).await;
            return Err(why);
        }
        let mut builder = GrpcChannel::builder(balancer)
            .connect_timeout(args.load.timeout.min(Duration::from_secs(1)))
            .idempotent(GET_USER);
        if let Some(limit) = args.load.per_try_timeout {
            builder = builder.per_try_timeout(limit);
        }
        if let Some(hedge) = args.load.hedge {
            builder = builder.hedge(hedge.hedge());
        }
        if let Some(key) = &key {
            builder = builder.hash_key(key.metadata_key());
        }
        if let Some(ca) = tls.ca {
            builder = builder.ca_certificate(ca);
        }
        if let Some((cert, key)) = &tls.identity {
            builder = builder.identity(cert, key);
        }
        let channel = match builder.build() {
            Ok(channel) => channel,
            Err(e) => {
                stop_demo(demo).await;
                return Err(format!("cannot build the gRPC channel: {e}"));
            }
        };
        Ok(Session {
            args,
            client: UsersClient::new(channel),
            key,
            demo,
            metrics,
            _backend: backend,
        })
    }

    /// Where the metrics endpoint listens, when `--metrics-addr` was given.
    #[cfg(test)]
    fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(common::MetricsServer::addr)
    }

    /// Sends `--requests` calls, or for `--duration`, `--concurrency` at a time.
    async fn send(&self) -> Result<Report, String> {
        let (client, key, timeout) = (
            self.client.clone(),
            self.key.clone(),
            self.args.load.timeout,
        );
        self.args
            .load
            .drive(move |i| {
                let (mut client, key) = (client.clone(), key.clone());
                async move { one(&mut client, i, key.as_ref(), timeout).await }
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

/// Call `i`: `GetUser(n)`, n cycling through 1 to 100. Returns the instance that answered OK
/// (`None` otherwise), and the latency.
async fn one(
    client: &mut UsersClient<GrpcChannel>,
    i: usize,
    key: Option<&Key>,
    timeout: Duration,
) -> (Option<common::Answered>, Duration) {
    let n = (i % USERS as usize) as u32 + 1;
    let mut request = tonic::Request::new(GetUserRequest { id: n });
    request.set_timeout(timeout);
    if let Some(key) = key {
        let (k, v) = key.entry(n);
        request.metadata_mut().insert(k, v);
    }
    let started = Instant::now();
    // The channel ends the call, retries included, at its deadline (DEADLINE_EXCEEDED).
    let outcome = client.get_user(request).await;
    let latency = started.elapsed();
    match outcome {
        Ok(r) => (Some(common::Answered::by(r.into_inner().instance)), latency),
        Err(status) => {
            tracing::warn!(code = ?status.code(), message = status.message(), "call failed");
            (None, latency)
        }
    }
}

type Demo = Vec<(waypost::RegistrationHandle, Serving)>;

/// With the in-process backend there is nobody else to register instances: start three.
async fn demo_instances(args: &Args, backend: &common::Backend) -> Result<Demo, String> {
    if backend.memory.is_none() {
        return Ok(Vec::new());
    }
    tracing::info!(
        "memory backend: serving three in-process gRPC instances of {} (weights 1, 2, 3)",
        args.service
    );
    let mut demo = Vec::new();
    for weight in 1..=3u32 {
        let id = format!("{}-{weight}", args.service);
        let started = async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| format!("cannot listen on loopback: {e}"))?;
            let users = UsersServer::new(id.as_str(), None, false).map_err(|e| e.to_string())?;
            let server = serve(listener, users, None)
                .await
                .map_err(|e| e.to_string())?;
            let registration = waypost::Registration::builder(&args.service, &id)
                .host("127.0.0.1")
                .port(server.addr().port())
                .weight(weight)
                .meta("protocol", "grpc")
                .build()
                .map_err(|e| e.to_string())?;
            let handle = backend
                .registry
                .register(registration)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((handle, server))
        };
        match started.await {
            Ok(instance) => demo.push(instance),
            Err(e) => {
                stop_demo(demo).await;
                return Err(e);
            }
        }
    }
    Ok(demo)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use common::scrape::{self, Scrape};
    use std::path::PathBuf;
    use waypost_conformance::scenarios::eventually;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("grpc-client").chain(args.iter().copied()))
    }

    #[test]
    fn the_client_command_line_parses_and_every_strategy_is_accepted() {
        let args = parse(&[
            "--backend",
            "consul",
            "--service",
            "user-grpc",
            "--strategy",
            "weighted-round-robin",
            "--requests",
            "600",
            "--concurrency",
            "4",
            "--key",
            "path",
            "--ca",
            "ca.pem",
        ])
        .unwrap();
        assert_eq!(args.backend.backend, common::BackendKind::Consul);
        assert_eq!((args.load.requests, args.load.concurrency), (600, 4));
        assert_eq!(args.tls.ca, Some(PathBuf::from("ca.pem")));
        let names = waypost::strategies::names();
        assert!(
            names.contains(&"maglev") && names.contains(&"p2c-ewma"),
            "{names:?}"
        );
        for name in names {
            assert_eq!(parse(&["--strategy", name]).unwrap().load.strategy, name);
        }
        let err = parse(&["--strategy", "fastest"]).unwrap_err().to_string();
        assert!(
            err.contains("round-robin"),
            "the error lists the valid names: {err}"
        );
        assert!(parse(&["--concurrency", "0"]).is_err());
    }

    #[test]
    fn keys_are_path_or_text_metadata_keys() {
        let path = Key::parse("path").unwrap();
        assert_eq!(path.metadata_key(), USER_ID_METADATA);
        let (k, v) = path.entry(42);
        assert_eq!((k.as_str(), v.to_str().unwrap()), ("x-user-id", "42"));

        let tenant = Key::parse("X-Tenant").unwrap();
        assert_eq!(tenant.metadata_key(), "x-tenant");
        let (k, v) = tenant.entry(7);
        assert_eq!((k.as_str(), v.to_str().unwrap()), ("x-tenant", "user-7"));

        for bad in ["bad key", "x-data-bin", "", "ü"] {
            let err = Key::parse(bad).unwrap_err();
            assert!(err.contains("metadata key"), "{bad:?}: {err}");
        }
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
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            [
                "by_instance",
                "errors",
                "latency_ms",
                "ok",
                "requests",
                "strategy"
            ]
        );
        let by: BTreeMap<String, usize> = serde_json::from_value(v["by_instance"].clone()).unwrap();
        // Counted by the replies' instance field; weights 1, 2, 3.
        assert_eq!(
            by.into_iter().collect::<Vec<_>>(),
            [
                ("user-grpc-1".to_owned(), 10),
                ("user-grpc-2".to_owned(), 20),
                ("user-grpc-3".to_owned(), 30)
            ]
        );
        let (p50, p99) = (
            v["latency_ms"]["p50"].as_f64().unwrap(),
            v["latency_ms"]["p99"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99, "{p50} {p99}");
    }

    #[tokio::test]
    async fn every_strategy_sends_and_reports() {
        for name in waypost::strategies::names() {
            let mut args = vec!["--strategy", name, "--requests", "30", "--concurrency", "3"];
            if matches!(name, "consistent-hash" | "maglev") {
                args.extend_from_slice(&["--key", "path"]);
            }
            let report = run(parse(&args).unwrap()).await.unwrap();
            assert_eq!(report.strategy, name);
            assert_eq!(
                (report.requests, report.ok, report.errors),
                (30, 30, 0),
                "{report:?}"
            );
            assert_eq!(report.by_instance.values().sum::<usize>(), 30);
            for id in report.by_instance.keys() {
                assert!(
                    ["user-grpc-1", "user-grpc-2", "user-grpc-3"].contains(&id.as_str()),
                    "{name}: {report:?}"
                );
            }
        }
    }

    /// Which instance answers each user id 1 to 100, one call at a time.
    async fn routes(session: &Session) -> BTreeMap<u32, String> {
        let mut client = session.client.clone();
        let mut routes = BTreeMap::new();
        for i in 0..USERS as usize {
            let (answered, _) =
                one(&mut client, i, session.key.as_ref(), Duration::from_secs(5)).await;
            routes.insert(i as u32 + 1, answered.expect("answered OK").instance);
        }
        routes
    }

    #[tokio::test]
    async fn hashing_strategies_send_each_key_to_one_instance() {
        for strategy in ["consistent-hash", "maglev"] {
            for key in ["path", "x-tenant"] {
                let args = parse(&["--strategy", strategy, "--key", key]).unwrap();
                let session = Session::start(args).await.unwrap();
                let first = routes(&session).await;
                let again = routes(&session).await;
                assert_eq!(first, again, "{strategy} --key {key}: every id sticks");
                let used: std::collections::BTreeSet<_> = first.values().collect();
                assert!(
                    used.len() > 1,
                    "{strategy} --key {key}: 100 keys spread over the instances: {used:?}"
                );
                session.stop().await;
            }
        }
    }

    #[tokio::test]
    async fn bad_input_and_a_missing_service_are_clear_errors() {
        let err = run(parse(&["--service", "bad/name"]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("service name"), "{err}");
        let err = run(parse(&["--key", "bad key"]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("metadata key"), "{err}");
        let missing = std::env::temp_dir().join("waypost-grpc-no-such-dir/ca.pem");
        let err = run(parse(&["--ca", missing.to_str().unwrap()]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("cannot read the CA"), "{err}");

        // An agent address where nothing listens: the client says so, not "no instance".
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
        assert!(err.contains("unreachable"), "{err}");
        assert!(err.contains(&addr), "{err}");
    }

    /// Checks a scrape taken after `report`'s calls (none of them retried) and before the
    /// client stopped: per-outcome and per-instance counts, nothing left in flight, one
    /// duration sample per call, and the membership.
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
            "one duration per call"
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
    }

    #[tokio::test]
    async fn the_metrics_endpoint_counts_what_the_report_says() {
        let service = "grpc-metrics-memory";
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
        let by: Vec<_> = report.by_instance.values().copied().collect();
        assert_eq!(by, [10, 20, 30], "{report:?}");
        let scrape = scrape::get(addr).await;
        check_metrics(&scrape, service, &report, 3);

        // One instance leaves; the balancer follows, and the calls go to the two others.
        let (registration, server) = session.demo.remove(0);
        registration.shutdown().await.unwrap();
        server.stop().await.unwrap();
        let s = [("service", service)];
        eventually(Duration::from_secs(5), "one instance removed", || async {
            match scrape::get(addr)
                .await
                .value("waypost_membership_total", &s)
            {
                Some(2.0) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let report = session.send().await.unwrap();
        assert_eq!((report.requests, report.ok), (60, 60), "{report:?}");
        assert!(
            !report.by_instance.contains_key("grpc-metrics-memory-1"),
            "{report:?}"
        );
        session.stop().await;
        // The endpoint stopped with the client.
        assert!(reqwest::get(format!("http://{addr}/metrics"))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn duration_sends_until_the_time_is_up_and_the_report_counts_what_was_sent() {
        let args = parse(&[
            "--service",
            "grpc-duration",
            "--duration",
            "400ms",
            "--concurrency",
            "2",
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
        session.stop().await;
        let err = parse(&["--duration", "10s", "--requests", "5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--requests"), "{err}");
    }

    /// Serves instance `id` of `service` (over TLS with `tls`) and registers it through
    /// `backend` as `grpc-service` would.
    async fn instance(
        backend: &common::Backend,
        service: &str,
        id: &str,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> (waypost::RegistrationHandle, Serving) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https = tls.is_some();
        let server = serve(listener, UsersServer::new(id, None, false).unwrap(), tls)
            .await
            .unwrap();
        let mut reg = waypost::Registration::builder(service, id)
            .host("127.0.0.1")
            .port(server.addr().port())
            .meta("protocol", "grpc");
        if https {
            reg = reg.meta("scheme", "https");
        }
        let handle = backend
            .registry
            .register(reg.build().unwrap())
            .await
            .unwrap();
        (handle, server)
    }

    /// Serves two instances of `service` registered through `backend`, then checks the client's
    /// report and its metrics.
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
        let ids = [format!("{service}-a"), format!("{service}-b")];
        let mut running = Vec::new();
        for id in &ids {
            running.push(instance(&connected, service, id, None).await);
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
        for (handle, server) in running {
            handle.shutdown().await.unwrap();
            server.stop().await.unwrap();
        }
    }

    /// `--per-try-timeout` and `--hedge`: of two instances in a real Consul agent, one accepts
    /// connections and never answers. With either flag every GetUser call is answered by the other (a
    /// per-try timeout ends the attempt as a failure, a hedge races it and drops it); without
    /// them, a GetUser call that goes to the hanging one first waits out `--timeout` and fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_try_timeout_or_hedge_leaves_time_for_another_instance_when_one_hangs() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        let service = "grpc-hangs";
        let addr = consul.addr();
        let backend = ["--backend", "consul", "--consul-addr", addr.as_str()];
        let connected = parse(&backend).unwrap().backend.connect().await.unwrap();
        let (works, serving) = instance(&connected, service, "works", None).await;
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
        works.shutdown().await.unwrap();
        serving.stop().await.unwrap();
    }

    #[tokio::test]
    async fn reports_on_a_service_in_a_real_consul_agent() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        exercise(
            "grpc-consul",
            &["--backend", "consul", "--consul-addr", &consul.addr()],
        )
        .await;
    }

    #[tokio::test]
    async fn reports_on_a_service_in_a_real_etcd() {
        let etcd = waypost_conformance::etcd_server::EtcdServer::start().await;
        exercise(
            "grpc-etcd",
            &["--backend", "etcd", "--etcd-endpoints", &etcd.endpoint()],
        )
        .await;
    }

    #[tokio::test]
    async fn ca_trusts_https_instances_in_a_real_consul_agent() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        let consul_addr = consul.addr();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
        let dir = std::env::temp_dir().join(format!(
            "waypost-grpc-ca-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &cert_pem).unwrap();

        let service = "grpc-tls";
        let base = ["--backend", "consul", "--consul-addr", &consul_addr];
        let connected = parse(&base).unwrap().backend.connect().await.unwrap();
        let ids = ["grpc-tls-a", "grpc-tls-b"];
        let mut running = Vec::new();
        for id in ids {
            let tls = waypost_grpc_examples::server_tls(&cert_pem, &key_pem);
            running.push(instance(&connected, service, id, Some(tls)).await);
        }
        common::listed(&connected, service, 2).await;

        let mut args = base.to_vec();
        args.extend_from_slice(&["--service", service, "--requests", "20", "--ca"]);
        args.push(ca_file.to_str().unwrap());
        let report = run(parse(&args).unwrap()).await.unwrap();
        assert_eq!((report.ok, report.errors), (20, 0), "{report:?}");
        assert_eq!(
            report
                .by_instance
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ids,
            "{report:?}"
        );

        // Without the CA the instances' certificate is not trusted: nothing is answered.
        let mut args = base.to_vec();
        args.extend_from_slice(&["--service", service, "--requests", "4", "--timeout", "2s"]);
        let report = run(parse(&args).unwrap()).await.unwrap();
        assert_eq!((report.ok, report.errors), (0, 4), "{report:?}");

        for (handle, server) in running {
            handle.shutdown().await.unwrap();
            server.stop().await.unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    #[tokio::test]
    async fn a_client_certificate_reaches_instances_that_require_one_in_a_real_consul_agent() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        let consul_addr = consul.addr();
        let ca = test_ca::Ca::new("grpc-client test CA");
        let clients = test_ca::Ca::new("grpc-client test client CA");
        let server = ca.server("127.0.0.1");
        let me = clients.client("grpc-client.waypost.test");
        let files = test_ca::Files::new("grpc-client-mtls");
        let ca_file = files.write("ca.pem", &ca.pem());
        let cert_file = files.write("client.pem", &me.cert);
        let key_file = files.write("client-key.pem", &me.key);

        let service = "grpc-mtls";
        let base = ["--backend", "consul", "--consul-addr", &consul_addr];
        let connected = parse(&base).unwrap().backend.connect().await.unwrap();
        let tls = waypost_grpc_examples::server_tls(&server.cert, &server.key)
            .client_ca_root(tonic::transport::Certificate::from_pem(clients.pem()));
        let (handle, serving) = instance(&connected, service, "grpc-mtls-a", Some(tls)).await;
        common::listed(&connected, service, 1).await;

        let mut args = base.to_vec();
        args.extend_from_slice(&["--service", service, "--requests", "10", "--ca", &ca_file]);
        let mut with_cert = args.clone();
        with_cert.extend_from_slice(&["--client-cert", &cert_file, "--client-key", &key_file]);
        let report = run(parse(&with_cert).unwrap()).await.unwrap();
        assert_eq!((report.ok, report.errors), (10, 0), "{report:?}");

        // Without the certificate the instance refuses the handshake: nothing is answered.
        args.extend_from_slice(&["--timeout", "2s"]);
        let report = run(parse(&args).unwrap()).await.unwrap();
        assert_eq!(report.ok, 0, "{report:?}");
        assert!(report.errors > 0, "{report:?}");

        handle.shutdown().await.unwrap();
        serving.stop().await.unwrap();
    }
}
