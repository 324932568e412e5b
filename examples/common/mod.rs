//! What the examples share: the small user service they serve, and the choice of backend from
//! command-line arguments.
//!
//! Each example uses a different part of this module.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
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
    /// Serves `GET /health`, `/users` and `/users/{id}` on `listener`, as instance `instance_id`.
    pub fn start(listener: TcpListener, instance_id: &str) -> io::Result<UserService> {
        let addr = listener.local_addr()?;
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
    /// A Consul agent (`--consul-addr` or `CONSUL_HTTP_ADDR`; token from `CONSUL_HTTP_TOKEN`).
    Consul,
    /// An etcd cluster (`--etcd-endpoints` or `ETCD_ENDPOINTS`).
    Etcd,
}

/// The backend options both examples accept.
#[derive(Clone, Debug, clap::Args)]
pub struct BackendArgs {
    /// Registry and discovery backend.
    #[arg(long, value_enum, default_value = "memory")]
    pub backend: BackendKind,
    /// Consul agent address (host:port or URL); default CONSUL_HTTP_ADDR, else 127.0.0.1:8500.
    #[arg(long)]
    pub consul_addr: Option<String>,
    /// etcd endpoints, comma-separated; default ETCD_ENDPOINTS, else http://127.0.0.1:2379.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
}

/// A connected backend.
pub struct Backend {
    pub registry: Arc<dyn Registry>,
    pub discovery: Arc<dyn Discovery>,
    /// Set for the in-process backend.
    #[cfg(feature = "memory")]
    pub memory: Option<waypost::memory::Memory>,
}

impl BackendArgs {
    /// Connects to the chosen backend. A backend not compiled in is an error that says which
    /// feature to enable.
    pub async fn connect(&self) -> Result<Backend, String> {
        match self.backend {
            BackendKind::Memory => memory(),
            BackendKind::Consul => self.consul(),
            BackendKind::Etcd => self.etcd().await,
        }
    }

    #[cfg(feature = "consul")]
    fn consul(&self) -> Result<Backend, String> {
        let mut b = waypost::consul::Consul::builder().from_env();
        if let Some(addr) = &self.consul_addr {
            b = b.address(addr.clone());
        }
        let consul = Arc::new(b.build().map_err(|e| e.to_string())?);
        Ok(Backend {
            registry: consul.clone(),
            discovery: consul,
            #[cfg(feature = "memory")]
            memory: None,
        })
    }

    #[cfg(not(feature = "consul"))]
    fn consul(&self) -> Result<Backend, String> {
        Err(missing_feature("consul"))
    }

    #[cfg(feature = "etcd")]
    async fn etcd(&self) -> Result<Backend, String> {
        let mut b = waypost::etcd::Etcd::builder().from_env();
        if !self.etcd_endpoints.is_empty() {
            b = b.endpoints(self.etcd_endpoints.clone());
        }
        let etcd = Arc::new(b.connect().await.map_err(|e| e.to_string())?);
        Ok(Backend {
            registry: etcd.clone(),
            discovery: etcd,
            #[cfg(feature = "memory")]
            memory: None,
        })
    }

    #[cfg(not(feature = "etcd"))]
    async fn etcd(&self) -> Result<Backend, String> {
        Err(missing_feature("etcd"))
    }
}

#[cfg(feature = "memory")]
fn memory() -> Result<Backend, String> {
    let memory = waypost::memory::Memory::new();
    Ok(Backend {
        registry: Arc::new(memory.clone()),
        discovery: Arc::new(memory.clone()),
        memory: Some(memory),
    })
}

#[cfg(not(feature = "memory"))]
fn memory() -> Result<Backend, String> {
    Err(missing_feature("memory"))
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
