//! What the examples share: the small user service they serve, the choice of backend from
//! command-line arguments, their logging, and their Prometheus metrics endpoint.
//!
//! Each example uses a different part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use waypost::{Discovery, Registry};

/// The header every answer carries: the id of the instance that served it.
pub const INSTANCE_HEADER: &str = "x-instance-id";

/// Users 1 to this number exist.
pub const USERS: u32 = 100;

/// A running user-service HTTP server.
pub struct UserService {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
}

impl UserService {
    /// Serves `GET /health`, `/users` and `/users/{id}` on `listener` (a `TcpListener`, or a
    /// `tls::TlsListener` for HTTPS), as instance `instance_id`.
    pub fn start<L>(listener: L, instance_id: &str) -> io::Result<UserService>
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let addr = axum::serve::Listener::local_addr(&listener)?;
        let id = HeaderValue::from_str(instance_id)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let app = Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/users", get(list_users))
            .route("/users/{id}", get(get_user))
            .layer(axum::middleware::map_response(move |mut r: Response| {
                let id = id.clone();
                async move {
                    r.headers_mut().insert(INSTANCE_HEADER, id);
                    r
                }
            }))
            .with_state(Arc::<str>::from(instance_id));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(UserService { addr, stop, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in progress finish, and waits for that.
    pub async fn stop(self) -> io::Result<()> {
        let _ = self.stop.send(());
        self.task.await.map_err(io::Error::other)?
    }
}

async fn list_users(State(instance): State<Arc<str>>) -> Json<serde_json::Value> {
    let users: Vec<_> = (1..=3).map(|id| user(id, &instance)).collect();
    Json(json!({ "users": users, "total": USERS }))
}

async fn get_user(State(instance): State<Arc<str>>, Path(id): Path<String>) -> impl IntoResponse {
    match id.parse::<u32>() {
        Ok(n) if (1..=USERS).contains(&n) => (StatusCode::OK, Json(user(n, &instance))),
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no user {id:?}: users are 1 to {USERS}") })),
        ),
    }
}

fn user(id: u32, instance: &str) -> serde_json::Value {
    json!({ "id": id, "name": format!("user-{id}"), "served_by": instance })
}

/// Which backend the examples use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// In-process: only this process sees its registrations.
    Memory,
    /// A Consul agent (`--consul-addr` or `CONSUL_HTTP_ADDR`; token from `CONSUL_HTTP_TOKEN`
    /// or `CONSUL_HTTP_TOKEN_FILE`).
    Consul,
    /// An etcd cluster (`--etcd-endpoints` or `ETCD_ENDPOINTS`).
    Etcd,
}

impl BackendKind {
    fn name(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
            BackendKind::Consul => "consul",
            BackendKind::Etcd => "etcd",
        }
    }
}

/// The backend options both examples accept.
#[derive(Clone, Debug, clap::Args)]
pub struct BackendArgs {
    /// Registry and discovery backend.
    #[arg(long, value_enum, default_value = "memory")]
    pub backend: BackendKind,
    /// The backend as a URL instead of --backend and its connection flags: memory://,
    /// consul://127.0.0.1:8500?dc=dc1 (also scheme, passing, tag, token_file, ca_cert, ...),
    /// etcd://h1:2379,h2:2379/prefix (see waypost::BackendConfig).
    #[arg(long, value_name = "URL",
          conflicts_with_all = ["backend", "consul_addr", "etcd_endpoints", "datacenter"])]
    pub registry: Option<waypost::BackendConfig>,
    /// Consul agent address (host:port or URL); default CONSUL_HTTP_ADDR, else 127.0.0.1:8500.
    #[arg(long)]
    pub consul_addr: Option<String>,
    /// etcd endpoints, comma-separated; default ETCD_ENDPOINTS, else http://127.0.0.1:2379.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Consul: the datacenter to discover in (default: the agent's own). Registrations always
    /// go to the agent's own datacenter.
    #[arg(long)]
    pub datacenter: Option<String>,
    /// Consul: datacenters to fail over to, in order, comma-separated (each one a tier after
    /// the first, queried through the same agent).
    #[arg(long, value_delimiter = ',')]
    pub failover: Vec<String>,
    /// A second backend as the last failover tier (e.g. `--backend consul --failover-backend
    /// etcd` while a service moves from one registry to the other); it uses the same
    /// connection flags.
    #[arg(long, value_enum)]
    pub failover_backend: Option<BackendKind>,
}

/// A connected backend.
pub struct Backend {
    /// The backend of `--backend` / `--registry`.
    pub connected: waypost::Backend,
    pub registry: Arc<dyn Registry>,
    pub discovery: Arc<dyn Discovery>,
    /// What the client balances over, in failover order: one tier (`discovery`) unless
    /// `--failover` or `--failover-backend` was given.
    pub tiers: Vec<(String, Arc<dyn Discovery>)>,
    /// Set for the in-process backend.
    #[cfg(feature = "memory")]
    pub memory: Option<waypost::memory::Memory>,
}

impl Backend {
    /// A balancer over the backend's tiers: a plain one for one tier, else one that fails over
    /// from each tier to the next (see `waypost::BalancerBuilder::tier`).
    pub fn balancer(
        &self,
        service: &waypost::ServiceName,
        strategy: impl waypost::Strategy,
    ) -> waypost::Balancer {
        if self.tiers.len() == 1 {
            return waypost::Balancer::watch(&*self.discovery, service, strategy);
        }
        let mut b = waypost::Balancer::builder(strategy);
        for (name, discovery) in &self.tiers {
            b = b.tier(name.clone(), &**discovery, service);
        }
        b.build()
    }

    /// The tiers' names, in order (what `PickGuard::tier` and `Response::tier` index).
    pub fn tier_names(&self) -> Vec<String> {
        self.tiers.iter().map(|(name, _)| name.clone()).collect()
    }

    /// Where the backend of `--backend` / `--registry` is: the Consul agent's URL, the etcd
    /// endpoints, or "in-process".
    pub fn address(&self) -> String {
        #[cfg(feature = "consul")]
        if let Some(consul) = self.connected.as_consul() {
            return consul.address().to_owned();
        }
        #[cfg(feature = "etcd")]
        if let Some(etcd) = self.connected.as_etcd() {
            return etcd.endpoints().join(",");
        }
        "in-process".into()
    }

    /// Why no instance came, when the backend is the reason: unreachable, or the credentials
    /// refused, with what to do. `None` when the backend answered (and had no instance).
    pub fn explain(&self, why: &waypost::NotReady) -> Option<String> {
        let error = why.error()?;
        let name = error.backend().unwrap_or(self.connected.name());
        let at = if name == self.connected.name() {
            format!(" at {}", self.address())
        } else {
            String::new()
        };
        let fix = |consul: &'static str, etcd: &'static str| match name {
            "consul" => consul,
            "etcd" => etcd,
            _ => "check the backend's configuration",
        };
        Some(match error {
            waypost::Error::Unavailable { .. } => format!(
                "the {name} backend{at} is unreachable: start it, or point {} at it ({error})",
                fix(
                    "--consul-addr (or CONSUL_HTTP_ADDR, or --registry consul://host:port)",
                    "--etcd-endpoints (or ETCD_ENDPOINTS, or --registry etcd://host:port)",
                )
            ),
            waypost::Error::PermissionDenied { .. } => format!(
                "the {name} backend{at} refused the credentials: {} ({error})",
                fix(
                    "give an ACL token that may read the service, with CONSUL_HTTP_TOKEN, \
                     CONSUL_HTTP_TOKEN_FILE or --registry consul://...?token_file=<path>",
                    "the etcd user needs read permission on the prefix",
                )
            ),
            other => format!("the {name} backend{at} fails: {other}"),
        })
    }

    /// Waits up to `wait` for an instance of `service`, and then (within the same `wait`) for
    /// every tier's watch to be in sync, so that with failover tiers the first tier to answer
    /// does not take the preferred tier's first requests. If no instance came, says why, for a
    /// person: the backend first (unreachable, credentials refused), then what it reported,
    /// then "start one" with `start_one`, a command that would.
    pub async fn ready(
        &self,
        balancer: &waypost::Balancer,
        service: &waypost::ServiceName,
        wait: Duration,
        start_one: &str,
    ) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        if let Err(why) = balancer.ready_within(wait).await {
            // "No instance" would send the user looking for a service that may well be
            // running, when the backend is the reason.
            if let Some(explained) = self.explain(&why) {
                return Err(explained);
            }
            if why.reported() > 0 {
                return Err(why.to_string());
            }
            return Err(format!(
                "no instance of {service} appeared within {wait:?}; start one, e.g. {start_one}"
            ));
        }
        let mut seen = balancer.generation();
        while !balancer.status().in_sync {
            let left = wait.saturating_sub(started.elapsed());
            // A tier's first Synced may leave the set as it is: wake up now and then as well.
            let step = left.min(Duration::from_millis(50));
            if step.is_zero() {
                break;
            }
            if let Ok(now) = tokio::time::timeout(step, balancer.changed(seen)).await {
                seen = now;
            }
        }
        Ok(())
    }
}

impl BackendArgs {
    /// The backend of `--registry`, or the one `--backend` and its connection flags name.
    pub fn config(&self) -> Result<waypost::BackendConfig, String> {
        match &self.registry {
            Some(config) => Ok(config.clone()),
            None => self.config_of(self.backend),
        }
    }

    /// Connects to the chosen backend, and with `--failover` / `--failover-backend` to its
    /// tiers. A backend not compiled in is an error that says which feature to enable.
    pub async fn connect(&self) -> Result<Backend, String> {
        let config = self.config()?;
        if (self.datacenter.is_some() || !self.failover.is_empty()) && config.name() != "consul" {
            return Err(
                "--datacenter and --failover name Consul datacenters: give --backend consul too"
                    .into(),
            );
        }
        if self.failover_backend.map(BackendKind::name) == Some(config.name()) {
            return Err(format!(
                "--failover-backend {} is the --backend already: name the other one",
                config.name()
            ));
        }
        let connected = config.connect().await.map_err(|e| e.to_string())?;
        let mut tiers = self.tiers(&config, &connected).await?;
        if let Some(kind) = self.failover_backend {
            let next = self.config_of(kind)?;
            let next = next.connect().await.map_err(|e| e.to_string())?;
            tiers.push((next.name().to_owned(), next.discovery()));
        }
        Ok(Backend {
            registry: connected.registry(),
            discovery: connected.discovery(),
            tiers,
            #[cfg(feature = "memory")]
            memory: connected.as_memory().cloned(),
            connected,
        })
    }

    /// One tier for the backend, or with `--failover` (or a failover backend after Consul) one
    /// per Consul datacenter, each listing critical instances too: a tier's health is the share
    /// of its instances that are not critical.
    #[cfg_attr(not(feature = "consul"), allow(unused_variables))]
    async fn tiers(
        &self,
        config: &waypost::BackendConfig,
        connected: &waypost::Backend,
    ) -> Result<Vec<(String, Arc<dyn Discovery>)>, String> {
        #[cfg(feature = "consul")]
        if let waypost::BackendConfig::Consul(consul) = config {
            if !self.failover.is_empty() || self.failover_backend.is_some() {
                let first = consul.get_datacenter().map(str::to_owned);
                let named =
                    std::iter::once((first.clone().unwrap_or_else(|| "consul".into()), first))
                        .chain(
                            self.failover
                                .iter()
                                .map(|dc| (dc.clone(), Some(dc.clone()))),
                        );
                let mut tiers = Vec::new();
                for (name, dc) in named {
                    let mut tier = consul.clone().passing_only(false);
                    if let Some(dc) = dc {
                        tier = tier.datacenter(dc);
                    }
                    let tier = waypost::BackendConfig::Consul(tier)
                        .connect()
                        .await
                        .map_err(|e| e.to_string())?;
                    tiers.push((name, tier.discovery()));
                }
                return Ok(tiers);
            }
        }
        Ok(vec![(connected.name().to_owned(), connected.discovery())])
    }

    /// The backend URL that `kind` and the connection flags make.
    fn config_of(&self, kind: BackendKind) -> Result<waypost::BackendConfig, String> {
        let mut params = Vec::new();
        let url = match kind {
            BackendKind::Memory => "memory://".to_owned(),
            BackendKind::Consul => {
                let (scheme, addr) = match &self.consul_addr {
                    Some(addr) => split_scheme(addr),
                    None => (None, ""),
                };
                if let Some(scheme) = scheme {
                    params.push(format!("scheme={scheme}"));
                }
                if let Some(dc) = &self.datacenter {
                    params.push(format!("dc={}", plain("--datacenter", dc)?));
                }
                format!("consul://{addr}")
            }
            BackendKind::Etcd => {
                let split: Vec<_> = self
                    .etcd_endpoints
                    .iter()
                    .map(|e| split_scheme(e))
                    .collect();
                if let Some((scheme, _)) = split.first() {
                    if split.iter().any(|(s, _)| s != scheme) {
                        return Err("--etcd-endpoints mixes http:// and https://: use one".into());
                    }
                    if let Some(scheme) = scheme {
                        params.push(format!("scheme={scheme}"));
                    }
                }
                let hosts: Vec<&str> = split.iter().map(|(_, h)| *h).collect();
                format!("etcd://{}", hosts.join(","))
            }
        };
        let url = if params.is_empty() {
            url
        } else {
            format!("{url}?{}", params.join("&"))
        };
        url.parse().map_err(|e| match e {
            waypost::ConfigError::FeatureDisabled { scheme } => missing_feature(scheme),
            e => format!("--backend {}: {e}", kind.name()),
        })
    }
}

/// `http://host:port` → (`http`, `host:port`); `host:port` → (none, `host:port`).
fn split_scheme(address: &str) -> (Option<&'static str>, &str) {
    let address = address.trim().trim_end_matches('/');
    if let Some(rest) = address.strip_prefix("https://") {
        (Some("https"), rest)
    } else if let Some(rest) = address.strip_prefix("http://") {
        (Some("http"), rest)
    } else {
        (None, address)
    }
}

/// A flag's value that goes into a URL as it is: letters, digits, `-`, `_`, `.`.
fn plain<'a>(flag: &str, value: &'a str) -> Result<&'a str, String> {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(value)
    } else {
        Err(format!(
            "{flag} {value:?} is not a datacenter name (letters, digits, '-', '_', '.')"
        ))
    }
}

fn missing_feature(name: &str) -> String {
    format!(
        "this example was built without the `{name}` backend: run it with `--features {name}` \
         (e.g. cargo run --example <name> --features {name} -- --backend {name} ...)"
    )
}

/// Parses `10s`, `1500ms`, `1m` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 1500ms or 1m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    }
}

/// `--hedge`'s value: a fixed delay, or the observed 95th percentile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HedgeArg {
    After(Duration),
    P95,
}

impl HedgeArg {
    /// The hedge it stands for.
    pub fn hedge(self) -> waypost::retry::Hedge {
        match self {
            HedgeArg::After(delay) => waypost::retry::Hedge::after(delay),
            HedgeArg::P95 => waypost::retry::Hedge::p95(Duration::from_millis(100)),
        }
    }
}

/// Parses `--hedge`: `p95`, or a duration as [`parse_duration`] reads it.
pub fn parse_hedge(s: &str) -> Result<HedgeArg, String> {
    if s.eq_ignore_ascii_case("p95") {
        return Ok(HedgeArg::P95);
    }
    parse_duration(s)
        .map(HedgeArg::After)
        .map_err(|e| format!("{e}, or p95"))
}

/// Installs the examples' log output: `RUST_LOG` filters (default `info`), and everything goes to
/// stderr, since stdout carries the examples' JSON lines. Colours only on a terminal. A second
/// call (or a subscriber installed by someone else first) leaves the first in place.
pub fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{EnvFilter, LevelFilter};

    let builder = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into());
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(directives) => builder.parse(&directives).unwrap_or_else(|e| {
            eprintln!("ignoring RUST_LOG={directives:?} ({e}); logging at info");
            EnvFilter::new("info")
        }),
        Err(_) => builder.parse_lossy(""),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .try_init();
}

/// Upper bounds (seconds) of the `waypost_request_duration_seconds` histogram's buckets: from
/// 100 µs (a loopback call) to 10 s. Without them the exporter would render the histogram as a
/// summary, and the dashboard's `histogram_quantile` needs the `_bucket` series.
pub const REQUEST_DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The media type of Prometheus' text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// The process's Prometheus recorder, installed on first use (a `metrics` recorder is global to
/// the process, so there is at most one), with a thread that runs its upkeep every 5 s.
pub fn prometheus() -> Result<PrometheusHandle, String> {
    static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    RECORDER
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("waypost_request_duration_seconds".into()),
                    REQUEST_DURATION_BUCKETS,
                )
                .map_err(|e| format!("bad histogram buckets: {e}"))?
                .install_recorder()
                .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
            Ok(handle)
        })
        .clone()
}

/// A running `GET /metrics` endpoint (Prometheus text format) over the process's recorder.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
}

impl MetricsServer {
    /// Installs the recorder (once per process), listens on `addr` (`host:port`; port 0 picks a
    /// free one) and serves `GET /metrics`. Logs the bound address at info.
    pub async fn start(addr: &str) -> Result<MetricsServer, String> {
        let handle = prometheus()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the metrics address: {e}"))?;
        let app = Router::new().route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move { ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], handle.render()) }
            }),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
        Ok(MetricsServer { addr, stop, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (scrapes in progress finish) and waits for that.
    pub async fn stop(self) -> io::Result<()> {
        let _ = self.stop.send(());
        self.task.await.map_err(io::Error::other)?
    }
}

/// For tests: scrape a metrics endpoint and read the text format.
/// Registers instance `hangs` of `service` through `backend`, on a loopback listener that
/// accepts connections and never answers on them. The listener ends with the returned task.
#[cfg(test)]
pub async fn register_hanging(
    backend: &Backend,
    service: &str,
) -> (waypost::RegistrationHandle, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let port = listener.local_addr().expect("its address").port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let registration = waypost::Registration::builder(service, "hangs")
        .host("127.0.0.1")
        .port(port)
        .build()
        .expect("a valid registration");
    let handle = backend
        .registry
        .register(registration)
        .await
        .expect("registered");
    (handle, task)
}

/// The client flags of the twins' hanging-instance test: four requests, one at a time, each
/// within 1 s, to `service` on `backend`, with `flag` (`--per-try-timeout`, `--hedge`) if any.
#[cfg(test)]
pub fn hanging_run_args<'a>(
    service: &'a str,
    backend: &[&'a str],
    flag: Option<[&'a str; 2]>,
) -> Vec<&'a str> {
    let mut args = vec![
        "--service",
        service,
        "--requests",
        "4",
        "--concurrency",
        "1",
    ];
    args.extend(["--timeout", "1s"]);
    args.extend(flag.into_iter().flatten());
    args.extend_from_slice(backend);
    args
}

/// Waits until `backend` lists `n` instances of `service`.
#[cfg(test)]
pub async fn listed(backend: &Backend, service: &str, n: usize) {
    let name: waypost::ServiceName = service.parse().expect("a valid service name");
    waypost_conformance::scenarios::eventually(Duration::from_secs(10), "all listed", || async {
        match backend.discovery.instances(&name).await {
            Ok(v) if v.len() == n => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[cfg(test)]
pub mod scrape {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::SocketAddr;

    /// One sample line: `name{labels} value`.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    /// Every sample of one scrape.
    #[derive(Clone, Debug)]
    pub struct Scrape {
        pub text: String,
        pub samples: Vec<Sample>,
    }

    /// `GET http://{addr}/metrics`: checks the status and the media type, and parses the body.
    pub async fn get(addr: SocketAddr) -> Scrape {
        let r = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("the metrics endpoint answers");
        assert_eq!(r.status(), 200);
        let media_type = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert_eq!(media_type, super::PROMETHEUS_TEXT);
        Scrape::parse(&r.text().await.unwrap())
    }

    impl Scrape {
        /// Parses the text exposition format (enough of it for what the exporter writes:
        /// comments, `name value` and `name{k="v",...} value`, label values with `\"`, `\\`
        /// and `\n` escapes).
        pub fn parse(text: &str) -> Scrape {
            let mut samples = Vec::new();
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                samples.push(parse_line(line).unwrap_or_else(|| panic!("bad line {line:?}")));
            }
            Scrape {
                text: text.to_owned(),
                samples,
            }
        }

        /// The samples of metric `name` whose labels include all of `labels`.
        pub fn select<'a>(
            &'a self,
            name: &'a str,
            labels: &'a [(&'a str, &'a str)],
        ) -> impl Iterator<Item = &'a Sample> + 'a {
            self.samples.iter().filter(move |s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
        }

        /// The sum over the matching samples (0 when there are none).
        pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
            self.select(name, labels).map(|s| s.value).sum()
        }

        /// The value of the one matching sample; `None` when there is none. Panics when
        /// several match.
        pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
            let found: Vec<_> = self.select(name, labels).collect();
            assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
            found.first().map(|s| s.value)
        }

        /// The metric names that have at least one sample.
        pub fn names(&self) -> BTreeSet<&str> {
            self.samples.iter().map(|s| s.name.as_str()).collect()
        }
    }

    fn parse_line(line: &str) -> Option<Sample> {
        let name_end = line.find(['{', ' '])?;
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(mut inner) = rest.strip_prefix('{') {
            loop {
                inner = inner.trim_start_matches([',', ' ']);
                if let Some(after) = inner.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (key, after) = inner.split_once("=\"")?;
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next()? {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            c => value.push(c),
                        },
                        (_, c) => value.push(c),
                    }
                };
                labels.insert(key.trim().to_owned(), value);
                inner = &after[end + 1..];
            }
        }
        // A sample may end with a timestamp; the exporter writes none, but skip it if present.
        let value = rest.split_whitespace().next()?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().ok()?,
        };
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    #[test]
    fn the_text_format_parses() {
        let s = Scrape::parse(
            "# TYPE a counter\na 3\nb{x=\"1\",y=\"q\\\"uo\\\\te\"} 2.5\nc_bucket{le=\"+Inf\"} 7\n\n",
        );
        assert_eq!(s.value("a", &[]), Some(3.0));
        assert_eq!(s.value("b", &[("x", "1")]), Some(2.5));
        assert_eq!(s.select("b", &[]).next().unwrap().labels["y"], "q\"uo\\te");
        assert_eq!(s.sum("c_bucket", &[("le", "+Inf")]), 7.0);
        assert_eq!(s.value("b", &[("x", "2")]), None);
        assert_eq!(
            s.names().into_iter().collect::<Vec<_>>(),
            ["a", "b", "c_bucket"]
        );
    }
}

/// A client example's JSON report; fields in the documented order.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub strategy: String,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub by_instance: BTreeMap<String, usize>,
    /// The 2xx answers per failover tier (by name), when the client knows the tier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_tier: Option<BTreeMap<String, usize>>,
    pub latency_ms: Latency,
}

/// Who answered one call: the instance, and the failover tier when the client knows it.
#[derive(Debug)]
pub struct Answered {
    pub instance: String,
    pub tier: Option<String>,
}

impl Answered {
    /// An answer from `instance`, tier unknown.
    pub fn by(instance: impl Into<String>) -> Self {
        Answered {
            instance: instance.into(),
            tier: None,
        }
    }
}

/// The report's latency percentiles, in milliseconds.
#[derive(Debug, serde::Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

/// The report of a run: each result is who answered (`None`: an error) and the call's
/// latency.
pub fn report(strategy: String, results: Vec<(Option<Answered>, Duration)>) -> Report {
    let requests = results.len();
    let mut by_instance = BTreeMap::new();
    let mut by_tier: Option<BTreeMap<String, usize>> = None;
    let mut latencies: Vec<Duration> = Vec::with_capacity(results.len());
    for (answered_by, latency) in results {
        latencies.push(latency);
        if let Some(a) = answered_by {
            *by_instance.entry(a.instance).or_insert(0) += 1;
            if let Some(tier) = a.tier {
                *by_tier
                    .get_or_insert_with(BTreeMap::new)
                    .entry(tier)
                    .or_insert(0) += 1;
            }
        }
    }
    latencies.sort();
    let ok: usize = by_instance.values().sum();
    Report {
        strategy,
        requests,
        ok,
        errors: requests - ok,
        by_instance,
        by_tier,
        latency_ms: Latency {
            p50: percentile_ms(&latencies, 50),
            p99: percentile_ms(&latencies, 99),
        },
    }
}

/// Nearest-rank percentile of sorted latencies, in milliseconds with 3 decimals.
pub fn percentile_ms(sorted: &[Duration], p: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    let ms = sorted[rank - 1].as_secs_f64() * 1000.0;
    (ms * 1000.0).round() / 1000.0
}

/// The flags of a service example's instance, shared by `user-service` and `grpc-service`.
#[derive(Debug, clap::Args)]
pub struct InstanceArgs {
    /// Instance id (default: <name>-<8 random hex digits>).
    #[arg(long)]
    pub id: Option<String>,
    /// Address to register (default: chosen by the backend).
    #[arg(long)]
    pub host: Option<String>,
    /// Address to listen on (default: --host when it is an IP address, else 0.0.0.0).
    #[arg(long)]
    pub bind: Option<std::net::IpAddr>,
    /// Port to listen on and register; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Balancing weight.
    #[arg(long, default_value_t = 1)]
    pub weight: u32,
    /// A tag (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Metadata as key=value (repeatable).
    #[arg(long = "meta", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// Zone.
    #[arg(long)]
    pub zone: Option<String>,
    /// TTL of the heartbeat check, e.g. 10s, 1500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (port 0: a free one).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

/// The TLS flags of a service example: serve TLS, and register metadata `scheme=https` so that
/// clients connect with TLS; optionally require client certificates.
#[derive(Debug, Default, clap::Args)]
pub struct ServeTlsArgs {
    /// Serve TLS with this certificate (chain), PEM; registers metadata scheme=https.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert, PEM.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Require clients to present a certificate signed by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

/// What a service serves TLS with, PEM.
pub struct ServerPem {
    /// The certificate (chain).
    pub cert: Vec<u8>,
    /// Its private key.
    pub key: Vec<u8>,
    /// The CA that client certificates must be signed by, for mutual TLS.
    pub client_ca: Option<Vec<u8>>,
}

impl ServeTlsArgs {
    /// The files' contents, when TLS was asked for.
    pub fn read(&self) -> Result<Option<ServerPem>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        Ok(Some(ServerPem {
            cert: read_pem(cert, "TLS certificate")?,
            key: read_pem(key, "TLS key")?,
            client_ca: self
                .tls_client_ca
                .as_ref()
                .map(|ca| read_pem(ca, "client CA certificate"))
                .transpose()?,
        }))
    }
}

/// The TLS flags of a client example: the CA that signed the instances' certificates, and a
/// client certificate for instances that require one.
#[derive(Debug, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// Trust this CA (PEM) for instances registered with metadata scheme=https.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Present this client certificate (PEM) to instances that require one (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<std::path::PathBuf>,
    /// The private key of --client-cert, PEM.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,
}

/// What a client trusts and presents, PEM.
#[derive(Default)]
pub struct ClientPem {
    /// The CA of the instances' certificates.
    pub ca: Option<Vec<u8>>,
    /// The client certificate and its private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTlsArgs {
    /// The files' contents.
    pub fn read(&self) -> Result<ClientPem, String> {
        let ca = self
            .ca
            .as_ref()
            .map(|path| read_pem(path, "CA certificate"))
            .transpose()?;
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some((
                read_pem(cert, "client certificate")?,
                read_pem(key, "client key")?,
            )),
            _ => None,
        };
        Ok(ClientPem { ca, identity })
    }
}

fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

/// `key=value`, for `--meta`.
pub fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

impl InstanceArgs {
    /// Where a check the backend runs reaches the service on `port`: `--host`, or 127.0.0.1
    /// (the agent runs beside it), as `host:port` (`[v6]:port`).
    pub fn check_authority(&self, port: u16) -> String {
        match self.host.as_deref().unwrap_or("127.0.0.1") {
            v6 if v6.contains(':') => format!("[{v6}]:{port}"),
            host => format!("{host}:{port}"),
        }
    }

    /// The instance id: `--id`, or `<name>-<8 random hex digits>`.
    pub fn id_for(&self, name: &str) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("{name}-{:08x}", fastrand::u32(..)))
    }

    /// Listens on `--bind` (or `--host` when it is an IP address, else every address) and
    /// `--port`.
    pub async fn listen(&self) -> Result<TcpListener, String> {
        use std::net::{IpAddr, Ipv4Addr};
        let bind = self
            .bind
            .or_else(|| self.host.as_deref().and_then(|h| h.parse().ok()))
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        TcpListener::bind(SocketAddr::new(bind, self.port))
            .await
            .map_err(|e| format!("cannot listen on {bind}:{}: {e}", self.port))
    }

    /// The registration of instance `id` of `name` on `port`, from the flags: weight, TTL
    /// check, host, tags, metadata, zone.
    pub fn registration(&self, name: &str, id: &str, port: u16) -> waypost::RegistrationBuilder {
        let mut registration = waypost::Registration::builder(name, id)
            .port(port)
            .weight(self.weight)
            .check(waypost::HealthCheck::ttl(self.ttl));
        if let Some(host) = &self.host {
            registration = registration.host(host);
        }
        for tag in &self.tags {
            registration = registration.tag(tag);
        }
        for (k, v) in &self.meta {
            registration = registration.meta(k, v);
        }
        if let Some(zone) = &self.zone {
            registration = registration.zone(zone);
        }
        registration
    }
}

/// The flags of a client example's load, shared by `client` and `grpc-client`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Balancing strategy.
    #[arg(long, default_value = "round-robin",
          value_parser = clap::builder::PossibleValuesParser::new(waypost::strategies::names()))]
    pub strategy: String,
    /// Requests (calls) to send.
    #[arg(long, default_value_t = 600)]
    pub requests: usize,
    /// Send until this much time has passed (e.g. 10s, 500ms), instead of --requests.
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Requests (calls) in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Hash key for hashing strategies: `path` (the requested user), or a header name (HTTP) or
    /// metadata key (gRPC) whose value `user-<n>` is sent and hashed.
    #[arg(long)]
    pub key: Option<String>,
    /// How long to wait for a first instance.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub wait: Duration,
    /// Time limit per request (call), retries included.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Time limit per attempt, so that an instance that hangs leaves time to retry on another
    /// one (GETs, GetUser); set it below --timeout.
    #[arg(long, value_parser = parse_duration)]
    pub per_try_timeout: Option<Duration>,
    /// Hedge GETs (GetUser): when an attempt has no answer after DELAY (e.g. 50ms), or after
    /// the 95th percentile of the answers so far (`p95`; 100 ms until 20 were seen), send the
    /// request to another instance too; the first answer wins.
    #[arg(long, value_name = "DELAY|p95", value_parser = parse_hedge)]
    pub hedge: Option<HedgeArg>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics while running (port 0: a free one).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed at once, before the future is
/// polled, so that a signal that comes while the service starts is not lost.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match handlers {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!("cannot listen for SIGTERM/SIGINT ({e}); stop with Ctrl-C");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// One output line of a service example; fields in the documented order.
#[derive(serde::Serialize)]
pub struct Event<'a> {
    pub event: &'static str,
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<&'a str>,
}

pub fn line(event: &Event<'_>) -> String {
    // Serializing borrowed strings into a String cannot fail.
    serde_json::to_string(event).unwrap_or_default()
}

impl LoadArgs {
    /// Sends the load: `--concurrency` workers call `one(i)` for i = 0, 1, 2, ... until
    /// `--requests` calls were made or `--duration` has passed; then the report. `one` returns
    /// who answered (`None`: an error) and the call's latency.
    pub async fn drive<F, Fut>(&self, one: F) -> Result<Report, String>
    where
        F: Fn(usize) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = (Option<Answered>, Duration)> + Send + 'static,
    {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::time::Instant;
        let next = Arc::new(AtomicUsize::new(0));
        let (total, until) = match self.duration {
            Some(d) => (usize::MAX, Some(Instant::now() + d)),
            None => (self.requests, None),
        };
        let workers: Vec<_> = (0..self.concurrency)
            .map(|_| {
                let (one, next) = (one.clone(), next.clone());
                tokio::spawn(async move {
                    let mut results = Vec::new();
                    loop {
                        if until.is_some_and(|until| Instant::now() >= until) {
                            return results;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            return results;
                        }
                        results.push(one(i).await);
                    }
                })
            })
            .collect();
        let mut results = Vec::with_capacity(self.duration.map_or(self.requests, |_| 0));
        for w in workers {
            results.extend(w.await.map_err(|e| format!("a request task failed: {e}"))?);
        }
        Ok(report(self.strategy.clone(), results))
    }
}

/// A client example's end: the report as one JSON line on stdout, or the error on stderr.
pub fn print_report(example: &str, report: Result<Report, String>) -> std::process::ExitCode {
    use std::process::ExitCode;
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            eprintln!("{example}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match serde_json::to_string(&report) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{example}: cannot encode the report: {e}");
            ExitCode::FAILURE
        }
    }
}
