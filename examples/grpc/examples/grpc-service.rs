//! The gRPC twin of `user-service`: serves the `users.Users` gRPC service, registers itself, and
//! deregisters on SIGTERM/SIGINT.
//!
//! ```text
//! cargo run -p waypost-grpc-examples --example grpc-service -- --backend consul \
//!     --name user-grpc --port 0 --weight 2 --tag v1 --meta zone=a
//! cargo run -p waypost-grpc-examples --example grpc-service -- --backend etcd \
//!     --etcd-endpoints http://127.0.0.1:2379 --port 0
//! ```
//!
//! Serves `GetUser` (users 1 to 100; any other id is `NOT_FOUND`), `ListUsers` and the
//! server-streaming `WatchUsers` of `proto/users.proto`; every reply names the instance that
//! served it (field `instance`, and response metadata `x-instance-id`). Prints one JSON line
//! once registered: `{"event":"registered","id":"...","service":"...","addr":"ip:port"}`, and
//! on SIGTERM or SIGINT deregisters, prints `{"event":"deregistered","id":"..."}` and exits 0.
//! `--port 0` binds an ephemeral port and registers that port. The registration carries the
//! metadata `protocol=grpc` (so `--meta protocol=...` is refused, as is `--meta scheme=...`).
//!
//! `--grpc-check 5s` registers a gRPC health check instead of the TTL heartbeat: the backend
//! (the Consul agent) asks the service's own `grpc.health.v1` `Check` every 5 s. With
//! `--tls-cert` the check is made over TLS, and the agent verifies the certificate (see
//! `waypost::CheckTls::Verify` for what a Consul agent trusts and expects), unless
//! `--grpc-check-skip-verify` is given too. With `--tls-client-ca` as well, the agent must
//! present a certificate that CA signed: its `cert_file`, under `enable_agent_tls_for_checks`.
//!
//! `--tls-cert cert.pem --tls-key key.pem` serves TLS instead of plaintext and registers the
//! metadata `scheme=https` too, so that clients know to connect with TLS. `--tls-client-ca
//! ca.pem` also requires every client to present a certificate signed by that CA (mutual TLS;
//! `grpc-client --client-cert F --client-key F`).
//!
//! The other options are `user-service`'s: `--id` (default `<name>-<random hex>`), `--host`
//! (the address registered; default: the backend's choice — Consul and etcd use this machine's
//! first IPv4 that is neither loopback nor link-local, memory uses 127.0.0.1), `--bind` (the
//! address listened on; default `--host` when it is an IP, else 0.0.0.0), `--weight`, `--tag`
//! and `--meta k=v` (repeatable), `--zone`, `--ttl 10s` (TTL heartbeat check), the backend
//! options `--consul-addr` (or `CONSUL_HTTP_ADDR`), `--etcd-endpoints` (or `ETCD_ENDPOINTS`),
//! and `--metrics-addr
//! 127.0.0.1:9100` (the registration's metrics in Prometheus' text format at `GET /metrics`;
//! port 0 picks a free port; the bound address is logged). `--backend memory` registers
//! in-process: useful only to try the output contract. Logs go to stderr, filtered by `RUST_LOG`
//! (default `info`).

#[path = "../../common/mod.rs"]
mod common;
#[cfg(test)]
#[path = "../../common/test_ca.rs"]
mod test_ca;

use std::future::Future;
use std::process::ExitCode;

use clap::Parser;
use waypost_grpc_examples::{serve, server_tls, Serving, UsersServer};

use common::{line, BackendArgs, Event, InstanceArgs};
use waypost::CheckTls;

#[derive(Debug, Parser)]
#[command(about = "A gRPC user service that registers itself with Waypost")]
struct Args {
    #[command(flatten)]
    backend: BackendArgs,
    /// Service name to register under.
    #[arg(long, default_value = "user-grpc")]
    name: String,
    #[command(flatten)]
    instance: InstanceArgs,
    #[command(flatten)]
    tls: common::ServeTlsArgs,
    /// Register a gRPC health check instead of the TTL heartbeat: the backend asks this
    /// service's grpc.health.v1 Check for users.Users at --host (127.0.0.1 without one) every
    /// INTERVAL, e.g. 5s. Over TLS, the certificate verified, when serving TLS (--tls-cert).
    #[arg(long, value_name = "INTERVAL", value_parser = common::parse_duration)]
    grpc_check: Option<std::time::Duration>,
    /// With --grpc-check over TLS: the backend does not verify this service's certificate.
    #[arg(long, requires_all = ["grpc_check", "tls_cert"])]
    grpc_check_skip_verify: bool,
}

impl Args {
    /// Refuses the metadata the service registers itself.
    fn checked(self) -> Result<Args, clap::Error> {
        for (k, _) in &self.instance.meta {
            let why = match k.as_str() {
                "protocol" => "the service registers protocol=grpc itself",
                "scheme" => {
                    "the service registers scheme=https itself when it serves TLS (--tls-cert, --tls-key)"
                }
                _ => continue,
            };
            return Err(clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("--meta {k}=...: {why}\n"),
            ));
        }
        Ok(self)
    }
}
#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    let args = Args::parse().checked().unwrap_or_else(|e| e.exit());
    match run(args, common::shutdown_signal(), |line| println!("{line}")).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grpc-service: {e}");
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

/// The TLS a service serves, from the files' contents: its certificate, and with a client CA,
/// mutual TLS.
fn server_tls_of(pem: common::ServerPem) -> tonic::transport::ServerTlsConfig {
    let tls = server_tls(pem.cert, pem.key);
    match pem.client_ca {
        Some(ca) => tls.client_ca_root(tonic::transport::Certificate::from_pem(ca)),
        None => tls,
    }
}

/// A registered, serving gRPC user service.
struct Service {
    name: String,
    id: String,
    handle: waypost::RegistrationHandle,
    server: Serving,
    metrics: Option<common::MetricsServer>,
    /// Kept until the end: the in-process registry lives only while it is held.
    backend: common::Backend,
}

impl Service {
    /// Starts the metrics endpoint (if asked for), serves, and registers.
    async fn start(args: Args) -> Result<Service, String> {
        // Bad input fails before anything listens or connects.
        waypost::ServiceName::new(&args.name).map_err(|e| e.to_string())?;
        let tls = args.tls.read()?.map(server_tls_of);
        let id = args.instance.id_for(&args.name);
        let users = UsersServer::new(id.as_str(), None, false)
            .map_err(|e| format!("instance id {id:?} cannot be sent as gRPC metadata: {e}"))?;

        let metrics = match &args.instance.metrics_addr {
            Some(addr) => Some(common::MetricsServer::start(addr).await?),
            None => None,
        };
        let backend = args.backend.connect().await?;
        if args.backend.backend == common::BackendKind::Memory {
            tracing::info!("memory backend: the registration is visible only inside this process");
        }

        let listener = args.instance.listen().await?;
        let https = tls.is_some();
        let server = serve(listener, users, tls)
            .await
            .map_err(|e| format!("cannot serve: {e}"))?;

        let mut registration = args
            .instance
            .registration(&args.name, &id, server.addr().port())
            .meta("protocol", "grpc");
        if https {
            registration = registration.meta("scheme", "https");
        }
        if let Some(every) = args.grpc_check {
            let authority = args.instance.check_authority(server.addr().port());
            let target = format!("{authority}/users.Users");
            let check = match (https, args.grpc_check_skip_verify) {
                (false, _) => waypost::HealthCheck::grpc(target, every),
                (true, false) => waypost::HealthCheck::grpc_tls(target, every, CheckTls::Verify),
                (true, true) => waypost::HealthCheck::grpc_tls(target, every, CheckTls::SkipVerify),
            };
            registration = registration.check(check);
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
            backend,
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

    /// Deregisters, lets calls in progress finish, stops serving (metrics last).
    async fn stop(self) -> Result<(), String> {
        let deregistered = self.handle.shutdown().await;
        let stopped = self.server.stop().await;
        if let Some(metrics) = self.metrics {
            if let Err(e) = metrics.stop().await {
                tracing::warn!("the metrics endpoint failed: {e}");
            }
        }
        drop(self.backend);
        deregistered.map_err(|e| format!("deregistration of {} failed: {e}", self.id))?;
        stopped.map_err(|e| format!("the gRPC server failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use common::scrape::{self, Scrape};
    use serde_json::json;
    use std::path::PathBuf;
    use std::sync::Arc;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
    use tonic::Code;
    use waypost_conformance::scenarios::eventually;
    use waypost_grpc_examples::users::users_client::UsersClient;
    use waypost_grpc_examples::users::{GetUserRequest, ListUsersRequest};
    use waypost_grpc_examples::{INSTANCE_METADATA, USERS};

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("grpc-service").chain(args.iter().copied()))
            .and_then(Args::checked)
    }

    #[test]
    fn the_user_service_command_line_parses() {
        let args = parse(&[
            "--backend",
            "consul",
            "--name",
            "user-grpc",
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
            "--zone",
            "z1",
            "--bind",
            "127.0.0.1",
        ])
        .unwrap();
        assert_eq!(args.backend.backend, common::BackendKind::Consul);
        assert_eq!((args.instance.port, args.instance.weight), (0, 2));
        assert_eq!(args.instance.tags, ["v1"]);
        assert_eq!(args.instance.meta, [("zone".to_owned(), "a".to_owned())]);
        assert_eq!(args.instance.ttl, Duration::from_secs(10));
        assert_eq!(args.instance.zone.as_deref(), Some("z1"));
        assert_eq!(args.tls.tls_cert, None);

        let args = parse(&[
            "--backend",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:1,http://127.0.0.1:2",
        ])
        .unwrap();
        assert_eq!(args.backend.etcd_endpoints.len(), 2);
        assert!(parse(&["--meta", "novalue"]).is_err());
        for taken in ["protocol=http", "scheme=https"] {
            let err = parse(&["--meta", taken]).unwrap_err().to_string();
            assert!(err.contains("registers"), "{taken}: {err}");
        }
        assert!(parse(&["--ttl", "10 parsecs"]).is_err());
        // TLS needs both files.
        assert!(parse(&["--tls-cert", "c.pem"]).is_err());
        assert!(parse(&["--tls-key", "k.pem"]).is_err());
        let args = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        assert_eq!(args.tls.tls_key, Some(PathBuf::from("k.pem")));
        // A client CA only with a certificate to serve.
        assert!(parse(&["--tls-client-ca", "ca.pem"]).is_err());
        let args = parse(&["--grpc-check", "5s"]).unwrap();
        assert_eq!(args.grpc_check, Some(Duration::from_secs(5)));
        let tls = ["--grpc-check", "5s", "--tls-cert", "c", "--tls-key", "k"];
        assert!(!parse(&tls).unwrap().grpc_check_skip_verify);
        let skip = [&tls[..], &["--grpc-check-skip-verify"]].concat();
        assert!(parse(&skip).unwrap().grpc_check_skip_verify);
        // Skipping the verification needs a check, over TLS.
        assert!(parse(&["--grpc-check-skip-verify"]).is_err());
        assert!(parse(&["--grpc-check", "5s", "--grpc-check-skip-verify"]).is_err());
        assert!(parse(&[
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--grpc-check-skip-verify"
        ])
        .is_err());
    }

    /// A service running in a task, its output lines on a channel.
    struct Running {
        stop: tokio::sync::oneshot::Sender<()>,
        lines: tokio::sync::mpsc::UnboundedReceiver<String>,
        task: tokio::task::JoinHandle<Result<(), String>>,
        metrics: Option<SocketAddr>,
        /// The service's own backend: what it registered with.
        discovery: Arc<dyn waypost::Discovery>,
    }

    /// Starts a service as `run` does (`Service::start`, then `serve` in a task).
    async fn spawn(args: &[&str]) -> Running {
        let service = Service::start(parse(args).unwrap()).await.unwrap();
        let metrics = service.metrics.as_ref().map(common::MetricsServer::addr);
        let discovery = service.backend.discovery.clone();
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
            discovery,
        }
    }

    fn instance_of(metadata: &tonic::metadata::MetadataMap) -> String {
        metadata
            .get(INSTANCE_METADATA)
            .expect("x-instance-id is set")
            .to_str()
            .unwrap()
            .to_owned()
    }

    async fn plaintext(addr: &str) -> UsersClient<Channel> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        UsersClient::new(channel)
    }

    /// The registered line: checks its shape, returns the registered address.
    fn registered(raw: &str, id: &str, name: &str) -> String {
        // Fields in the documented order, for readers that do not parse JSON.
        let prefix =
            format!(r#"{{"event":"registered","id":"{id}","service":"{name}","addr":"127.0.0.1:"#);
        assert!(raw.starts_with(&prefix), "{raw}");
        let registered: serde_json::Value = serde_json::from_str(raw).unwrap();
        assert_eq!(registered.as_object().unwrap().len(), 4, "{raw}");
        let addr = registered["addr"].as_str().unwrap().to_owned();
        assert!(
            !addr.ends_with(":0"),
            "the bound port is registered: {addr}"
        );
        addr
    }

    /// What the backend lists for `name`, once it lists something.
    async fn listed(d: &Arc<dyn waypost::Discovery>, name: &str) -> Vec<waypost::ServiceInstance> {
        let service: waypost::ServiceName = name.parse().unwrap();
        eventually(Duration::from_secs(10), "listed", || async {
            match d.instances(&service).await {
                Ok(v) if !v.is_empty() => Ok(v),
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }

    /// Stops a running service: checks the deregistered line, the exit, and that the backend
    /// no longer lists it.
    async fn shut_down(mut running: Running, id: &str, name: &str) {
        running.stop.send(()).unwrap();
        let deregistered: serde_json::Value =
            serde_json::from_str(&running.lines.recv().await.unwrap()).unwrap();
        assert_eq!(deregistered, json!({"event": "deregistered", "id": id}));
        running.task.await.unwrap().unwrap();
        let service: waypost::ServiceName = name.parse().unwrap();
        let d = running.discovery;
        eventually(Duration::from_secs(10), "deregistered", || async {
            match d.instances(&service).await {
                Ok(v) if v.is_empty() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    /// Starts instance `id` of service `name` on loopback with the flags `more`, and reads
    /// its registered line: the service and the address it registered.
    async fn start_registered(name: &str, id: &str, more: &[&str]) -> (Running, String) {
        let mut args = vec!["--name", name, "--id", id, "--host", "127.0.0.1"];
        args.extend_from_slice(more);
        let mut running = spawn(&args).await;
        let addr = registered(&running.lines.recv().await.unwrap(), id, name);
        (running, addr)
    }

    /// Runs the README's command line (plus `--metrics-addr 127.0.0.1:0`) as service `name`
    /// against `backend` (whose short name is `backend_name`) and checks the output contract,
    /// the gRPC service, what the backend lists, the registration's metrics and the shutdown.
    async fn exercise(name: &str, backend_name: &str, backend: &[&str]) {
        let id = format!("{name}-1");
        let mut args = vec![
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
        let (running, addr) = start_registered(name, &id, &args).await;

        // It serves gRPC where it registered, and says who answered.
        let mut c = plaintext(&addr).await;
        let r = c.get_user(GetUserRequest { id: 7 }).await.unwrap();
        assert_eq!(instance_of(r.metadata()), id);
        let user = r.into_inner();
        assert_eq!((user.id, user.name.as_str()), (7, "user-7"));
        assert_eq!(user.instance, id);
        for missing in [0, USERS + 1] {
            let status = c
                .get_user(GetUserRequest { id: missing })
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{missing}: {status:?}");
        }
        let list = c
            .list_users(ListUsersRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((list.users.len(), list.instance.as_str()), (100, &*id));
        let mut stream = c
            .watch_users(ListUsersRequest {})
            .await
            .unwrap()
            .into_inner();
        let mut streamed = 0;
        while let Some(u) = stream.message().await.unwrap() {
            assert_eq!(u.instance, id);
            streamed += 1;
        }
        assert_eq!(streamed, USERS);
        drop(c);

        // The backend lists what was registered, marked as gRPC over plaintext.
        let listed = listed(&running.discovery, name).await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        let i = &listed[0];
        assert_eq!(
            (i.id().as_str(), i.authority()),
            (id.as_str(), addr.clone())
        );
        assert_eq!(i.weight().get(), 2);
        assert!(i.has_tag("v1"), "{i:?}");
        assert_eq!(
            i.metadata().get("protocol").map(String::as_str),
            Some("grpc"),
            "{i:?}"
        );
        assert_eq!(i.metadata().get("scheme"), None, "{i:?}");
        // Consul keeps the zone in `Meta.zone`, so there `zone=a` reads back as the zone.
        let zone = i.metadata().get("zone").map(String::as_str).or(i.zone());
        assert_eq!(zone, Some("a"), "{i:?}");

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

        shut_down(running, &id, name).await;

        // The gRPC server stopped with it, and so did the metrics endpoint; the recorder (read
        // directly now) says the registration is no longer live.
        assert!(
            tokio::net::TcpStream::connect(&addr).await.is_err(),
            "{addr}"
        );
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
        exercise("grpc-memory", "memory", &["--backend", "memory"]).await;
    }

    #[tokio::test]
    async fn the_json_contract_with_a_real_consul_agent() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        exercise(
            "grpc-consul",
            "consul",
            &["--backend", "consul", "--consul-addr", &consul.addr()],
        )
        .await;
    }

    /// With `--grpc-check`, the agent lists the service only once its own gRPC check passes:
    /// a call to the example's grpc.health.v1 Check.
    #[tokio::test]
    async fn grpc_check_is_run_by_a_real_consul_agent_against_the_services_health() {
        let consul = waypost_conformance::consul_server::ConsulServer::start().await;
        let (name, id) = ("grpc-checked", "grpc-checked-1");
        let (running, _) = start_registered(
            name,
            id,
            &[
                "--grpc-check",
                "1s",
                "--backend",
                "consul",
                "--consul-addr",
                &consul.addr(),
            ],
        )
        .await;
        // Consul starts a gRPC check critical, and lists passing instances only.
        let listed = listed(&running.discovery, name).await;
        assert_eq!(listed[0].id().as_str(), id);
        shut_down(running, id, name).await;
    }

    /// With `--grpc-check` and `--tls-cert`, the agent checks over TLS: verifying the
    /// certificate with the CA it was configured with, or, with `--grpc-check-skip-verify`, not
    /// verifying it.
    #[tokio::test]
    async fn grpc_check_over_tls_is_verified_by_the_agent_or_skipped() {
        let ca = test_ca::Ca::new("grpc-service check CA");
        let files = test_ca::Files::new("grpc-service-check-ca");
        let ca_file = files.write("ca.pem", &ca.pem());
        // A Consul 1.8 agent checks the name in its server_name, whatever the target.
        let name_checked = "users.waypost.test";
        let trusting = waypost_conformance::consul_server::ConsulServer::start_with_config(
            &format!(
                r#"ca_file = "{ca_file}" server_name = "{name_checked}" enable_agent_tls_for_checks = true"#
            ),
        )
        .await;
        let plain = waypost_conformance::consul_server::ConsulServer::start().await;
        let cases = [
            ("grpc-tls-verified", &trusting, &[][..]),
            (
                "grpc-tls-unverified",
                &plain,
                &["--grpc-check-skip-verify"][..],
            ),
        ];
        for (name, agent, skip) in cases {
            let id = format!("{name}-1");
            let mut more = vec!["--grpc-check", "1s", "--backend", "consul"];
            let addr = agent.addr();
            more.extend(["--consul-addr", &addr]);
            more.extend_from_slice(skip);
            let (running, _) = spawn_tls(name, &id, &ca.server(name_checked), None, &more).await;
            // Consul starts a gRPC check critical, and lists passing instances only.
            let listed = listed(&running.discovery, name).await;
            assert_eq!(listed[0].id().as_str(), id);
            shut_down(running, &id, name).await;
        }
    }

    #[tokio::test]
    async fn the_json_contract_with_a_real_etcd() {
        let etcd = waypost_conformance::etcd_server::EtcdServer::start().await;
        exercise(
            "grpc-etcd",
            "etcd",
            &["--backend", "etcd", "--etcd-endpoints", &etcd.endpoint()],
        )
        .await;
    }

    /// One GetUser call over TLS to `addr`, trusting `ca`, presenting `identity`: the
    /// instance that answered, or why none did.
    async fn get_user_over_tls(
        addr: &str,
        ca: &str,
        identity: Option<&test_ca::Issued>,
    ) -> Result<String, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("127.0.0.1");
        if let Some(i) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(&i.cert, &i.key));
        }
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        UsersClient::new(channel)
            .get_user(GetUserRequest { id: 9 })
            .await
            .map(|r| r.into_inner().instance)
            .map_err(|status| status.to_string())
    }

    /// Starts a service that serves TLS with `server`'s certificate (requiring client
    /// certificates signed by `client_ca`, if given); its registered address.
    async fn spawn_tls(
        name: &str,
        id: &str,
        server: &test_ca::Issued,
        client_ca: Option<&str>,
        more: &[&str],
    ) -> (Running, String) {
        let files = test_ca::Files::new(&format!("grpc-service-{id}"));
        let cert = files.write("cert.pem", &server.cert);
        let key = files.write("key.pem", &server.key);
        let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
        let client_ca = client_ca.map(|pem| files.write("client-ca.pem", pem));
        if let Some(ca) = &client_ca {
            args.extend(["--tls-client-ca", ca.as_str()]);
        }
        args.extend_from_slice(more);
        start_registered(name, id, &args).await
    }

    #[tokio::test]
    async fn tls_client_ca_requires_clients_to_present_a_certificate() {
        let ca = test_ca::Ca::new("grpc-service test CA");
        let clients = test_ca::Ca::new("grpc-service test client CA");
        let server = ca.server("127.0.0.1");
        let (name, id) = ("grpc-mtls", "grpc-mtls-1");
        let (running, addr) = spawn_tls(name, id, &server, Some(&clients.pem()), &[]).await;

        let me = clients.client("client.waypost.test");
        let answered = get_user_over_tls(&addr, &ca.pem(), Some(&me)).await;
        assert_eq!(answered.as_deref(), Ok(id));
        let stranger = test_ca::Ca::new("another CA").client("client.waypost.test");
        for identity in [None, Some(&stranger)] {
            let refused = get_user_over_tls(&addr, &ca.pem(), identity).await;
            assert!(refused.is_err(), "{refused:?}");
        }
        shut_down(running, id, name).await;
    }

    #[tokio::test]
    async fn tls_serves_to_a_client_with_the_ca_and_registers_scheme_https() {
        let ca = test_ca::Ca::new("grpc-service test CA");
        let (name, id) = ("grpc-tls", "grpc-tls-1");
        let (running, addr) = spawn_tls(name, id, &ca.server("127.0.0.1"), None, &[]).await;
        let cert_pem = ca.pem();

        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&cert_pem))
                    .domain_name("127.0.0.1"),
            )
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        let r = UsersClient::new(channel)
            .get_user(GetUserRequest { id: 9 })
            .await
            .unwrap();
        assert_eq!(instance_of(r.metadata()), id);
        assert_eq!(r.into_inner().instance, id);

        // Plaintext gRPC gets no answer from a TLS port.
        let plain = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await;
        let outcome = match plain {
            Err(e) => Err(e.to_string()),
            Ok(channel) => UsersClient::new(channel)
                .get_user(GetUserRequest { id: 9 })
                .await
                .map_err(|status| status.to_string()),
        };
        assert!(outcome.is_err(), "{outcome:?}");

        let listed = listed(&running.discovery, name).await;
        let meta = listed[0].metadata();
        assert_eq!(meta.get("scheme").map(String::as_str), Some("https"));
        assert_eq!(meta.get("protocol").map(String::as_str), Some("grpc"));
        shut_down(running, id, name).await;
    }

    #[tokio::test]
    async fn bad_input_is_a_clear_error() {
        let err = run(
            parse(&["--name", "bad/name", "--host", "127.0.0.1"]).unwrap(),
            async {},
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(err.contains("service name"), "{err}");

        let missing = std::env::temp_dir().join("waypost-grpc-no-such-dir/cert.pem");
        let missing = missing.to_str().unwrap();
        let err = run(
            parse(&["--tls-cert", missing, "--tls-key", missing]).unwrap(),
            async {},
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(err.contains("cannot read the TLS certificate"), "{err}");

        let files = test_ca::Files::new("grpc-service-bad-tls");
        let junk = files.write("junk.pem", "not PEM");
        let junk = junk.as_str();
        let err = run(
            parse(&["--host", "127.0.0.1", "--tls-cert", junk, "--tls-key", junk]).unwrap(),
            async {},
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(err.contains("bad TLS configuration"), "{err}");

        let err = run(
            parse(&["--id", "bad\u{7f}id", "--host", "127.0.0.1"]).unwrap(),
            async {},
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(err.contains("cannot be sent as gRPC metadata"), "{err}");
    }
}
