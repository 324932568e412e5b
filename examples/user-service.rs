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
//! Options: `--id` (default `<name>-<random hex>`), `--host` (the address registered; default:
//! the backend's choice — Consul and etcd use this machine's first non-loopback IPv4, memory
//! uses 127.0.0.1), `--bind` (the address listened on; default `--host` when it is an IP, else
//! 0.0.0.0), `--ttl 10s` (TTL heartbeat check), `--zone`, and the backend options
//! `--consul-addr` (or `CONSUL_HTTP_ADDR`), `--etcd-endpoints` (or `ETCD_ENDPOINTS`).
//! `--backend memory` registers in-process: useful only to try the output contract.

mod common;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use waypost::{HealthCheck, Registration};

use common::{BackendArgs, UserService};

#[derive(Debug, Parser)]
#[command(about = "A user service that registers itself with Waypost")]
struct Args {
    #[command(flatten)]
    backend: BackendArgs,
    /// Service name to register under.
    #[arg(long, default_value = "user-service")]
    name: String,
    /// Instance id (default: <name>-<8 random hex digits>).
    #[arg(long)]
    id: Option<String>,
    /// Address to register (default: chosen by the backend).
    #[arg(long)]
    host: Option<String>,
    /// Address to listen on (default: --host when it is an IP address, else 0.0.0.0).
    #[arg(long)]
    bind: Option<IpAddr>,
    /// Port to listen on and register; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Balancing weight.
    #[arg(long, default_value_t = 1)]
    weight: u32,
    /// A tag (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Metadata as key=value (repeatable).
    #[arg(long = "meta", value_parser = parse_meta)]
    meta: Vec<(String, String)>,
    /// Zone.
    #[arg(long)]
    zone: Option<String>,
    /// TTL of the heartbeat check, e.g. 10s, 1500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = common::parse_duration)]
    ttl: Duration,
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args, shutdown_signal(), |line| println!("{line}")).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("user-service: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                eprintln!("user-service: cannot listen for SIGTERM ({e}); stop with Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// One output line; fields in the documented order.
#[derive(serde::Serialize)]
struct Event<'a> {
    event: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    addr: Option<&'a str>,
}

fn line(event: &Event<'_>) -> String {
    // Serializing borrowed strings into a String cannot fail.
    serde_json::to_string(event).unwrap_or_default()
}

/// Serves, registers, waits for `shutdown`, deregisters. Emits the JSON lines through `emit`.
async fn run(
    args: Args,
    shutdown: impl Future<Output = ()>,
    mut emit: impl FnMut(String),
) -> Result<(), String> {
    // Bad input fails before anything listens or connects.
    waypost::ServiceName::new(&args.name).map_err(|e| e.to_string())?;
    let backend = args.backend.connect().await?;
    if args.backend.backend == common::BackendKind::Memory {
        eprintln!(
            "user-service: memory backend: the registration is visible only inside this process"
        );
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{:08x}", args.name, fastrand::u32(..)));

    let bind = args
        .bind
        .or_else(|| args.host.as_deref().and_then(|h| h.parse().ok()))
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(bind, args.port))
        .await
        .map_err(|e| format!("cannot listen on {bind}:{}: {e}", args.port))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?
        .port();
    let server = UserService::start(listener, &id).map_err(|e| format!("cannot serve: {e}"))?;

    let mut registration = Registration::builder(&args.name, &id)
        .port(port)
        .weight(args.weight)
        .check(HealthCheck::ttl(args.ttl));
    if let Some(host) = &args.host {
        registration = registration.host(host);
    }
    for tag in &args.tags {
        registration = registration.tag(tag);
    }
    for (k, v) in &args.meta {
        registration = registration.meta(k, v);
    }
    if let Some(zone) = &args.zone {
        registration = registration.zone(zone);
    }
    let registration = registration.build().map_err(|e| e.to_string())?;
    let handle = backend
        .registry
        .register(registration)
        .await
        .map_err(|e| format!("registration failed: {e}"))?;
    emit(line(&Event {
        event: "registered",
        id: &id,
        service: Some(&args.name),
        addr: Some(&handle.instance().authority()),
    }));

    shutdown.await;
    let deregistered = handle.shutdown().await;
    // Requests in progress finish before the server stops.
    let stopped = server.stop().await;
    deregistered.map_err(|e| format!("deregistration of {id} failed: {e}"))?;
    emit(line(&Event {
        event: "deregistered",
        id: &id,
        service: None,
        addr: None,
    }));
    stopped.map_err(|e| format!("the HTTP server failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!((args.port, args.weight), (0, 2));
        assert_eq!(args.tags, ["v1"]);
        assert_eq!(args.meta, [("zone".to_owned(), "a".to_owned())]);
        assert_eq!(args.ttl, Duration::from_secs(10));

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
    }

    /// A user service running in a task, its output lines on a channel.
    struct Running {
        stop: tokio::sync::oneshot::Sender<()>,
        lines: tokio::sync::mpsc::UnboundedReceiver<String>,
        task: tokio::task::JoinHandle<Result<(), String>>,
    }

    fn spawn(args: &[&str]) -> Running {
        let args =
            Args::try_parse_from(std::iter::once("user-service").chain(args.iter().copied()))
                .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (lines_tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(run(
            args,
            async move {
                let _ = stopped.await;
            },
            move |line| {
                let _ = lines_tx.send(line);
            },
        ));
        Running { stop, lines, task }
    }

    /// Runs the issue's command line against `backend` and checks the output contract, the
    /// HTTP service, and (given a discovery of the same backend) what the backend lists.
    async fn exercise(backend: &[&str], discovery: Option<std::sync::Arc<dyn waypost::Discovery>>) {
        let mut args = vec![
            "--name",
            "users",
            "--id",
            "users-1",
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
        ];
        args.extend_from_slice(backend);
        let mut running = spawn(&args);

        let raw = running.lines.recv().await.unwrap();
        // Fields in the documented order, for readers that do not parse JSON.
        assert!(
            raw.starts_with(
                r#"{"event":"registered","id":"users-1","service":"users","addr":"127.0.0.1:"#
            ),
            "{raw}"
        );
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
        assert_eq!(r.headers()[common::INSTANCE_HEADER], "users-1");
        let user: serde_json::Value = r.json().await.unwrap();
        assert_eq!(user["id"], 7);
        for path in ["/health", "/users"] {
            let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
            assert!(r.status().is_success(), "{path}");
        }

        let users: waypost::ServiceName = "users".parse().unwrap();
        if let Some(d) = &discovery {
            let listed = eventually(Duration::from_secs(10), "users-1 listed", || async {
                match d.instances(&users).await {
                    Ok(v) if !v.is_empty() => Ok(v),
                    other => Err(format!("{other:?}")),
                }
            })
            .await;
            assert_eq!(listed.len(), 1, "{listed:?}");
            let i = &listed[0];
            assert_eq!((i.id().as_str(), i.authority()), ("users-1", addr.clone()));
            assert_eq!(i.weight().get(), 2);
            assert!(i.has_tag("v1"), "{i:?}");
            // Consul keeps the zone in `Meta.zone`, so there `zone=a` reads back as the zone.
            let zone = i.metadata().get("zone").map(String::as_str).or(i.zone());
            assert_eq!(zone, Some("a"), "{i:?}");
        }

        running.stop.send(()).unwrap();
        let deregistered: serde_json::Value =
            serde_json::from_str(&running.lines.recv().await.unwrap()).unwrap();
        assert_eq!(
            deregistered,
            json!({"event": "deregistered", "id": "users-1"})
        );
        running.task.await.unwrap().unwrap();
        if let Some(d) = &discovery {
            eventually(Duration::from_secs(10), "users-1 deregistered", || async {
                match d.instances(&users).await {
                    Ok(v) if v.is_empty() => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            })
            .await;
        }
    }

    #[tokio::test]
    async fn the_json_contract_with_the_memory_backend() {
        exercise(&["--backend", "memory"], None).await;
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
            &["--backend", "etcd", "--etcd-endpoints", &endpoint],
            Some(std::sync::Arc::new(discovery)),
        )
        .await;
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
}
