//! A user service that registers itself, serves HTTP, and deregisters on SIGTERM/SIGINT.
//!
//! ```text
//! cargo run --example user-service --features consul -- --backend consul --name user-service \
//!     --port 0 --weight 2 --tag v1 --meta zone=a
//! cargo run --example user-service --features etcd -- --backend etcd --etcd-endpoints http://127.0.0.1:2379
//! ```
//!
//! Serves `GET /health`, `/users` and `/users/{id}`, each answer with header `x-instance-id`.
//! Prints one JSON line once registered:
//! `{"event":"registered","id":"...","service":"...","addr":"ip:port"}`, and on SIGTERM or
//! SIGINT deregisters, prints `{"event":"deregistered","id":"..."}` and exits 0. `--port 0`
//! binds an ephemeral port and registers that port.
//!
//! `--tls-cert cert.pem --tls-key key.pem` serves HTTPS instead of plain HTTP and registers the
//! metadata `scheme=https` too (`waypost::SCHEME_METADATA`), so that clients connect with TLS;
//! `client --ca ca.pem` trusts the CA that signed the certificate. `--tls-client-ca ca.pem`
//! also requires every client to present a certificate signed by that CA (mutual TLS; `client
//! --client-cert F --client-key F`). `--meta scheme=...` is refused: the service says what it
//! serves.
//!
//! Options: `--id` (default `<name>-<random hex>`), `--host` (the address registered; default:
//! the backend's choice — Consul and etcd use this machine's first IPv4 that is neither
//! loopback nor link-local, memory uses 127.0.0.1), `--bind` (the address listened on; default
//! `--host` when it is an IP, else 0.0.0.0), `--ttl 10s` (TTL heartbeat check), `--zone`, and
//! the backend options `--consul-addr` (or `CONSUL_HTTP_ADDR`), `--etcd-endpoints` (or
//! `ETCD_ENDPOINTS`).
//! `--backend memory` registers in-process: useful only to try the output contract.
//!
//! `--http-check 5s` registers an HTTP health check instead of the TTL heartbeat: the backend
//! (the Consul agent) GETs the service's own `/health` every 5 s. With `--tls-cert` it does so
//! over HTTPS and verifies the certificate (see `waypost::CheckTls::Verify` for what a Consul
//! agent trusts and expects), unless `--http-check-skip-verify` is given too.
//!
//! `--metrics-addr 127.0.0.1:9100` serves Waypost's metrics (the registration's liveness and
//! heartbeat failures) in Prometheus' text format at `GET /metrics`; port 0 picks a free port.
//! The bound address is logged, not printed: stdout has only the two JSON lines. Logs go to
//! stderr, filtered by `RUST_LOG` (default `info`).

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::future::Future;
use std::process::ExitCode;

use clap::Parser;

use common::{line, BackendArgs, Event, InstanceArgs, UserService};
use waypost::{CheckTls, HealthCheck};

#[derive(Debug, Parser)]
#[command(about = "A user service that registers itself with Waypost")]
struct Args {
    #[command(flatten)]
    backend: BackendArgs,
    /// Service name to register under.
    #[arg(long, default_value = "user-service")]
    name: String,
    #[command(flatten)]
    instance: InstanceArgs,
    #[command(flatten)]
    tls: common::ServeTlsArgs,
    /// Register an HTTP health check instead of the TTL heartbeat: the backend GETs this
    /// service's /health at --host (127.0.0.1 without one) every INTERVAL, e.g. 5s. Over HTTPS,
    /// the certificate verified, when serving TLS (--tls-cert).
    #[arg(long, value_name = "INTERVAL", value_parser = common::parse_duration)]
    http_check: Option<std::time::Duration>,
    /// With --http-check over HTTPS: the backend does not verify this service's certificate.
    #[arg(long, requires_all = ["http_check", "tls_cert"])]
    http_check_skip_verify: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    let args = Args::parse();
    match run(args, common::shutdown_signal(), |line| println!("{line}")).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("user-service: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves, registers, waits for `shutdown`, deregisters. Emits the JSON lines through `emit`.
async fn run(
    args: Args,
    shutdown: impl Future<Output = ()>,
    emit: impl FnMut(String),
) -> Result<(), String> {
    Service::start(args).await?.serve(shutdown, emit).await
}

/// A registered, serving user service.
struct Service {
    name: String,
    id: String,
    handle: waypost::RegistrationHandle,
    server: UserService,
    metrics: Option<common::MetricsServer>,
    /// Kept until the end: the in-process registry lives only while it is held.
    _backend: common::Backend,
}

impl Service {
    /// Starts the metrics endpoint (if asked for), serves, and registers.
    async fn start(args: Args) -> Result<Service, String> {
        // Bad input fails before anything listens or connects.
        waypost::ServiceName::new(&args.name).map_err(|e| e.to_string())?;
        if args
            .instance
            .meta
            .iter()
            .any(|(k, _)| k == waypost::SCHEME_METADATA)
        {
            return Err(format!(
                "--meta {}=...: the service registers scheme=https itself when it serves TLS \
                 (--tls-cert, --tls-key)",
                waypost::SCHEME_METADATA
            ));
        }
        let tls = match args.tls.read()? {
            Some(pem) => Some(tls::server_config(
                &pem.cert,
                &pem.key,
                pem.client_ca.as_deref(),
            )?),
            None => None,
        };
        let metrics = match &args.instance.metrics_addr {
            Some(addr) => Some(common::MetricsServer::start(addr).await?),
            None => None,
        };
        let backend = args.backend.connect().await?;
        if args.backend.backend == common::BackendKind::Memory {
            tracing::info!("memory backend: the registration is visible only inside this process");
        }
        let id = args.instance.id_for(&args.name);
        let listener = args.instance.listen().await?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?
            .port();
        let https = tls.is_some();
        let server = match tls {
            Some(config) => tls::TlsListener::new(listener, config)
                .and_then(|listener| UserService::start(listener, &id)),
            None => UserService::start(listener, &id),
        }
        .map_err(|e| format!("cannot serve: {e}"))?;

        let mut registration = args.instance.registration(&args.name, &id, port);
        if https {
            registration = registration.meta(waypost::SCHEME_METADATA, "https");
        }
        if let Some(every) = args.http_check {
            let authority = args.instance.check_authority(port);
            registration = registration.check(if https {
                let tls = match args.http_check_skip_verify {
                    false => CheckTls::Verify,
                    true => CheckTls::SkipVerify,
                };
                HealthCheck::https(format!("https://{authority}/health"), every, tls)
            } else {
                HealthCheck::http(format!("http://{authority}/health"), every)
            });
        }
        let registration = registration.build().map_err(|e| e.to_string())?;
        let handle = backend
            .registry
            .register(registration)
            .await
            .map_err(|e| format!("registration failed: {e}"))?;
        Ok(Service {
            name: args.name,
            id,
            handle,
            server,
            metrics,
            _backend: backend,
        })
    }

    /// Emits the registered line, waits for `shutdown`, deregisters and stops, and emits the
    /// deregistered line.
    async fn serve(
        self,
        shutdown: impl Future<Output = ()>,
        mut emit: impl FnMut(String),
    ) -> Result<(), String> {
        emit(line(&Event {
            event: "registered",
            id: &self.id,
            service: Some(&self.name),
            addr: Some(&self.handle.instance().authority()),
        }));
        shutdown.await;
        let id = self.id.clone();
        self.stop().await?;
        emit(line(&Event {
            event: "deregistered",
            id: &id,
            service: None,
            addr: None,
        }));
        Ok(())
    }

    /// Where the metrics endpoint listens, when `--metrics-addr` was given.
    #[cfg(test)]
    fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(common::MetricsServer::addr)
    }

    /// Deregisters, lets requests in progress finish, stops serving (metrics last).
    async fn stop(self) -> Result<(), String> {
        let deregistered = self.handle.shutdown().await;
        let stopped = self.server.stop().await;
        if let Some(metrics) = self.metrics {
            if let Err(e) = metrics.stop().await {
                tracing::warn!("the metrics endpoint failed: {e}");
            }
        }
        deregistered.map_err(|e| format!("deregistration of {} failed: {e}", self.id))?;
        stopped.map_err(|e| format!("the HTTP server failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use common::scrape::{self, Scrape};
    use serde_json::json;
    use waypost_conformance::scenarios::eventually;

    #[test]
    fn the_issue_command_line_parses() {
        let args = Args::try_parse_from([
            "user-service",
            "--backend",
            "consul",
            "--name",
            "user-service",
            "--port",
            "0",
            "--weight",
            "2",
            "--tag",
            "v1",
            "--meta",
            "zone=a",
            "--ttl",
            "10s",
        ])
        .unwrap();
        assert_eq!(args.backend.backend, common::BackendKind::Consul);
        assert_eq!((args.instance.port, args.instance.weight), (0, 2));
        assert_eq!(args.instance.tags, ["v1"]);
        assert_eq!(args.instance.meta, [("zone".to_owned(), "a".to_owned())]);
        assert_eq!(args.instance.ttl, Duration::from_secs(10));

        let args = Args::try_parse_from([
            "user-service",
            "--backend",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:1,http://127.0.0.1:2",
        ])
        .unwrap();
        assert_eq!(args.backend.etcd_endpoints.len(), 2);
        assert!(Args::try_parse_from(["user-service", "--meta", "novalue"]).is_err());
        assert!(Args::try_parse_from(["user-service", "--ttl", "10 parsecs"]).is_err());
        assert_eq!(
            common::parse_duration("1500ms"),
            Ok(Duration::from_millis(1500))
        );

        let parse = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("user-service").chain(args.iter().copied()))
        };
        let args = parse(&["--http-check", "5s"]).unwrap();
        assert_eq!(args.http_check, Some(Duration::from_secs(5)));
        let tls = ["--http-check", "5s", "--tls-cert", "c", "--tls-key", "k"];
        assert!(!parse(&tls).unwrap().http_check_skip_verify);
        let skip = [&tls[..], &["--http-check-skip-verify"]].concat();
        assert!(parse(&skip).unwrap().http_check_skip_verify);
        // Skipping the verification needs a check, over HTTPS.
        assert!(parse(&["--http-check-skip-verify"]).is_err());
        assert!(parse(&["--http-check", "5s", "--http-check-skip-verify"]).is_err());
    }

    /// With `--http-check`, a real agent GETs the service's /health: over plain HTTP, and with
    /// `--tls-cert` over HTTPS, verifying the certificate (which an agent that does not trust
    /// its CA refuses) unless `--http-check-skip-verify` is given.
    #[cfg(feature = "consul")]
    #[tokio::test]
    async fn http_check_is_run_by_a_real_consul_agent_over_http_or_https() {
        let agent = waypost_conformance::consul_server::ConsulServer::start().await;
        let consul_addr = agent.addr();
        let files = TlsFiles::new("http-check");
        let https = ["--tls-cert", &files.cert, "--tls-key", &files.key];
        let cases: [(&str, Vec<&str>, bool); 3] = [
            ("users-checked-http", vec![], true),
            (
                "users-checked-unverified",
                [&https[..], &["--http-check-skip-verify"]].concat(),
                true,
            ),
            ("users-checked-verified", https.to_vec(), false),
        ];
        let discovery = waypost::consul::Consul::builder()
            .address(&consul_addr)
            .build()
            .unwrap();
        for (id, more, passes) in cases {
            let mut args = vec!["--name", "users-checked", "--id", id, "--host", "127.0.0.1"];
            args.extend(["--backend", "consul", "--consul-addr", &consul_addr]);
            args.extend(["--http-check", "1s"]);
            args.extend(more);
            let mut running = spawn(&args).await;
            running.lines.recv().await.unwrap();
            let check = agent
                .check_once_run(&format!("service:{id}"), Duration::from_secs(20))
                .await;
            if passes {
                // Consul starts the check critical; the first run may still be one before
                // the server answered.
                let name: waypost::ServiceName = "users-checked".parse().unwrap();
                eventually(Duration::from_secs(20), format!("{id} passing"), || async {
                    let listed = waypost::Discovery::instances(&discovery, &name)
                        .await
                        .map_err(|e| e.to_string())?;
                    match listed.iter().any(|i| i.id().as_str() == id) {
                        true => Ok(()),
                        false => Err(format!("{listed:?}; {check:?}")),
                    }
                })
                .await;
            } else {
                // The agent trusts only the system's roots, not the test CA.
                assert_eq!(check.status, "critical", "{check:?}");
                assert!(check.output.contains("unknown authority"), "{check:?}");
            }
            running.stop.send(()).unwrap();
            running.task.await.unwrap().unwrap();
        }
    }

    /// A user service running in a task, its output lines on a channel.
    struct Running {
        stop: tokio::sync::oneshot::Sender<()>,
        lines: tokio::sync::mpsc::UnboundedReceiver<String>,
        task: tokio::task::JoinHandle<Result<(), String>>,
        metrics: Option<SocketAddr>,
        /// The instance as registered.
        instance: waypost::ServiceInstance,
    }

    /// Starts a user service as `run` does (`Service::start`, then `serve` in a task).
    async fn spawn(args: &[&str]) -> Running {
        let args =
            Args::try_parse_from(std::iter::once("user-service").chain(args.iter().copied()))
                .unwrap();
        let service = Service::start(args).await.unwrap();
        let metrics = service.metrics_addr();
        let instance = service.handle.instance().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (lines_tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(service.serve(
            async move {
                let _ = stopped.await;
            },
            move |line| {
                let _ = lines_tx.send(line);
            },
        ));
        Running {
            stop,
            lines,
            task,
            metrics,
            instance,
        }
    }

    /// Runs the issue's command line (plus `--metrics-addr 127.0.0.1:0`) as service `name`
    /// against `backend` (whose short name is `backend_name`) and checks the output contract,
    /// the HTTP service, the registration's metrics, and (given a discovery of the same
    /// backend) what the backend lists.
    async fn exercise(
        name: &str,
        backend_name: &str,
        backend: &[&str],
        discovery: Option<std::sync::Arc<dyn waypost::Discovery>>,
    ) {
        let id = format!("{name}-1");
        let mut args = vec![
            "--name",
            name,
            "--id",
            &id,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--weight",
            "2",
            "--tag",
            "v1",
            "--meta",
            "zone=a",
            "--ttl",
            "10s",
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(backend);
        let mut running = spawn(&args).await;

        let raw = running.lines.recv().await.unwrap();
        // Fields in the documented order, for readers that do not parse JSON.
        let prefix =
            format!(r#"{{"event":"registered","id":"{id}","service":"{name}","addr":"127.0.0.1:"#);
        assert!(raw.starts_with(&prefix), "{raw}");
        let registered: serde_json::Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(registered.as_object().unwrap().len(), 4);
        let addr = registered["addr"].as_str().unwrap().to_owned();
        assert!(
            !addr.ends_with(":0"),
            "the bound port is registered: {addr}"
        );

        // It serves what it registered, and says who answered.
        let r = reqwest::get(format!("http://{addr}/users/7"))
            .await
            .unwrap();
        assert_eq!(r.headers()[common::INSTANCE_HEADER], id.as_str());
        let user: serde_json::Value = r.json().await.unwrap();
        assert_eq!(user["id"], 7);
        for path in ["/health", "/users"] {
            let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
            assert!(r.status().is_success(), "{path}");
        }

        // While registered, the registration is live; no heartbeat has failed.
        let metrics = running.metrics.unwrap();
        assert_ne!(metrics.port(), 0, "the bound port, not the one asked for");
        let labels = [
            ("service", name),
            ("instance", id.as_str()),
            ("backend", backend_name),
        ];
        let scrape = eventually(Duration::from_secs(10), "registration live", || async {
            let scrape = scrape::get(metrics).await;
            match scrape.value("waypost_registration_live", &labels) {
                Some(1.0) => Ok(scrape),
                other => Err(format!("{other:?} in\n{}", scrape.text)),
            }
        })
        .await;
        assert_eq!(
            scrape.sum("waypost_heartbeat_failures_total", &labels),
            0.0,
            "{}",
            scrape.text
        );

        let service: waypost::ServiceName = name.parse().unwrap();
        if let Some(d) = &discovery {
            let listed = eventually(Duration::from_secs(10), "listed", || async {
                match d.instances(&service).await {
                    Ok(v) if !v.is_empty() => Ok(v),
                    other => Err(format!("{other:?}")),
                }
            })
            .await;
            assert_eq!(listed.len(), 1, "{listed:?}");
            let i = &listed[0];
            assert_eq!(
                (i.id().as_str(), i.authority()),
                (id.as_str(), addr.clone())
            );
            assert_eq!(i.weight().get(), 2);
            assert!(i.has_tag("v1"), "{i:?}");
            // Consul keeps the zone in `Meta.zone`, so there `zone=a` reads back as the zone.
            let zone = i.metadata().get("zone").map(String::as_str).or(i.zone());
            assert_eq!(zone, Some("a"), "{i:?}");
        }

        running.stop.send(()).unwrap();
        let deregistered: serde_json::Value =
            serde_json::from_str(&running.lines.recv().await.unwrap()).unwrap();
        assert_eq!(deregistered, json!({"event": "deregistered", "id": id}));
        running.task.await.unwrap().unwrap();
        if let Some(d) = &discovery {
            eventually(Duration::from_secs(10), "deregistered", || async {
                match d.instances(&service).await {
                    Ok(v) if v.is_empty() => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            })
            .await;
        }

        // The endpoint stopped with the service; the recorder (read directly now) says the
        // registration is no longer live.
        assert!(reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .is_err());
        let after = Scrape::parse(&common::prometheus().unwrap().render());
        assert_eq!(
            after.value("waypost_registration_live", &labels),
            Some(0.0),
            "{}",
            after.text
        );
    }

    #[tokio::test]
    async fn the_json_contract_with_the_memory_backend() {
        exercise("users-memory", "memory", &["--backend", "memory"], None).await;
    }

    #[cfg(feature = "consul")]
    #[tokio::test]
    async fn the_json_contract_with_a_real_consul_agent() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        let addr = consul.addr();
        let discovery = waypost::consul::Consul::builder()
            .address(&addr)
            .build()
            .unwrap();
        exercise(
            "users-consul",
            "consul",
            &["--backend", "consul", "--consul-addr", &addr],
            Some(std::sync::Arc::new(discovery)),
        )
        .await;
    }

    #[cfg(feature = "etcd")]
    #[tokio::test]
    async fn the_json_contract_with_a_real_etcd() {
        let etcd = waypost_conformance::etcd_server::EtcdServer::start().await;
        let endpoint = etcd.endpoint();
        let discovery = waypost::etcd::Etcd::builder()
            .endpoints([endpoint.clone()])
            .connect()
            .await
            .unwrap();
        exercise(
            "users-etcd",
            "etcd",
            &["--backend", "etcd", "--etcd-endpoints", &endpoint],
            Some(std::sync::Arc::new(discovery)),
        )
        .await;
    }

    #[test]
    fn metrics_addr_is_an_option() {
        let args = Args::try_parse_from(["user-service", "--metrics-addr", "127.0.0.1:0"]).unwrap();
        assert_eq!(args.instance.metrics_addr.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(
            Args::try_parse_from(["user-service"])
                .unwrap()
                .instance
                .metrics_addr,
            None
        );
    }

    #[tokio::test]
    async fn a_backend_not_compiled_in_is_a_clear_error() {
        #[cfg(not(feature = "etcd"))]
        {
            let args = Args::try_parse_from(["user-service", "--backend", "etcd"]).unwrap();
            let err = run(args, async {}, |_| {}).await.unwrap_err();
            assert!(err.contains("--features etcd"), "{err}");
        }
        let args =
            Args::try_parse_from(["user-service", "--name", "bad/name", "--host", "127.0.0.1"])
                .unwrap();
        let err = run(args, async {}, |_| {}).await.unwrap_err();
        assert!(err.contains("service name"), "{err}");
    }

    /// A CA, and a certificate for 127.0.0.1 it signed and its key, in files of their own.
    struct TlsFiles {
        _dir: tls::testing::Files,
        authority: tls::testing::Ca,
        ca: String,
        ca_file: String,
        cert: String,
        key: String,
    }

    impl TlsFiles {
        fn new(what: &str) -> TlsFiles {
            let authority = tls::testing::Ca::new("user-service test CA");
            let issued = authority.server("127.0.0.1");
            let dir = tls::testing::Files::new(what);
            TlsFiles {
                ca: authority.pem(),
                ca_file: dir.write("ca.pem", &authority.pem()),
                cert: dir.write("cert.pem", &issued.cert),
                key: dir.write("key.pem", &issued.key),
                authority,
                _dir: dir,
            }
        }
    }

    #[tokio::test]
    async fn tls_flags_serve_https_and_register_scheme_https() {
        use waypost::http::{HttpClient, HttpError};
        let files = TlsFiles::new("tls");
        let (name, id) = ("users-tls", "users-tls-1");
        let mut running = spawn(&[
            "--name",
            name,
            "--id",
            id,
            "--host",
            "127.0.0.1",
            "--tls-cert",
            &files.cert,
            "--tls-key",
            &files.key,
        ])
        .await;
        let registered: serde_json::Value =
            serde_json::from_str(&running.lines.recv().await.unwrap()).unwrap();
        assert_eq!(registered["event"], "registered");
        let addr = registered["addr"].as_str().unwrap().to_owned();
        assert_eq!(
            running.instance.metadata().get(waypost::SCHEME_METADATA),
            Some(&"https".to_owned()),
            "{:?}",
            running.instance
        );

        // Waypost's client reaches it over HTTPS with the CA, as `client --ca` does...
        let balancer = waypost::Balancer::new(waypost::strategies::RoundRobin::new());
        balancer.apply(waypost::WatchEvent::Snapshot(vec![running
            .instance
            .clone()]));
        let client = HttpClient::builder(balancer.clone())
            .ca_certificate(&files.ca)
            .build()
            .unwrap();
        let r = client.get("/users/7").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[common::INSTANCE_HEADER], id);
        let user: serde_json::Value = r.json().await.unwrap();
        assert_eq!(user["id"], 7);

        // ...and without it is refused, saying so; plain HTTP gets no answer.
        let untrusting = HttpClient::builder(balancer)
            .max_attempts(1)
            .build()
            .unwrap();
        let err = untrusting.get("/users/7").send().await.unwrap_err();
        assert!(matches!(err, HttpError::Tls { .. }), "{err}");
        assert!(err.to_string().contains("--ca"), "{err}");
        assert!(reqwest::get(format!("http://{addr}/users/7"))
            .await
            .is_err());

        running.stop.send(()).unwrap();
        let deregistered: serde_json::Value =
            serde_json::from_str(&running.lines.recv().await.unwrap()).unwrap();
        assert_eq!(deregistered, json!({"event": "deregistered", "id": id}));
        running.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn tls_flags_are_checked_before_anything_listens() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("user-service").chain(args.iter().copied()))
        };
        assert!(parse(&["--tls-cert", "c.pem"]).is_err());
        assert!(parse(&["--tls-key", "k.pem"]).is_err());
        let args = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        assert_eq!(
            args.tls.tls_cert.as_deref(),
            Some(std::path::Path::new("c.pem"))
        );
        assert_eq!(parse(&[]).unwrap().tls.tls_cert, None);

        let missing = std::env::temp_dir().join("waypost-user-service-no-such-dir/cert.pem");
        let missing = missing.to_str().unwrap();
        let err = run(
            parse(&[
                "--host",
                "127.0.0.1",
                "--tls-cert",
                missing,
                "--tls-key",
                missing,
            ])
            .unwrap(),
            async {},
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(err.contains("cannot read the TLS certificate"), "{err}");

        let files = TlsFiles::new("junk");
        std::fs::write(&files.cert, "not PEM").unwrap();
        let err = run(
            parse(&[
                "--host",
                "127.0.0.1",
                "--tls-cert",
                &files.cert,
                "--tls-key",
                &files.key,
            ])
            .unwrap(),
            async {},
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");

        let err = run(
            parse(&["--host", "127.0.0.1", "--meta", "scheme=https"]).unwrap(),
            async {},
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(err.contains("--tls-cert"), "{err}");
    }

    #[tokio::test]
    async fn tls_client_ca_requires_clients_to_present_a_certificate() {
        use waypost::http::{HttpClient, HttpError};
        let files = TlsFiles::new("mtls");
        let mut running = spawn(&[
            "--name",
            "users-mtls",
            "--id",
            "users-mtls-1",
            "--host",
            "127.0.0.1",
            "--tls-cert",
            &files.cert,
            "--tls-key",
            &files.key,
            "--tls-client-ca",
            &files.ca_file,
        ])
        .await;
        running.lines.recv().await.unwrap();
        let balancer = waypost::Balancer::new(waypost::strategies::RoundRobin::new());
        balancer.apply(waypost::WatchEvent::Snapshot(vec![running
            .instance
            .clone()]));

        let without = HttpClient::builder(balancer.clone())
            .ca_certificate(&files.ca)
            .max_attempts(1)
            .build()
            .unwrap();
        let err = without.get("/users/7").send().await.unwrap_err();
        assert!(matches!(err, HttpError::Tls { .. }), "{err}");
        assert!(err.to_string().contains("identity"), "{err}");

        let client_cert = files.authority.client("client.waypost.test");
        let with = HttpClient::builder(balancer)
            .ca_certificate(&files.ca)
            .identity(&client_cert.cert, &client_cert.key)
            .build()
            .unwrap();
        let r = with.get("/users/7").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[common::INSTANCE_HEADER], "users-mtls-1");

        running.stop.send(()).unwrap();
        running.lines.recv().await.unwrap();
        running.task.await.unwrap().unwrap();

        // Client certificates are asked for only by a service that serves TLS.
        let parse = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("user-service").chain(args.iter().copied()))
        };
        assert!(parse(&["--tls-client-ca", &files.ca_file]).is_err());
    }
}
