//! A real `consul agent -dev` on free loopback ports, for tests.
//!
//! The binary comes from `WAYPOST_CONSUL_BIN` or `PATH`; without one, starting panics with the
//! command that fetches it (a test never skips silently). Each server gets its own ports, picked
//! by binding port 0, so tests run in parallel. The agent is killed (and waited for) on drop.
//! [`ConsulServer`]'s example starts one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::harness::{self, ProcessGuard};

/// How long an agent may take to elect itself leader (about 0.1 s when idle; CI is loaded).
const READY_BOUND: Duration = Duration::from_secs(30);

static NEXT: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, Debug)]
pub(crate) struct Ports {
    pub(crate) http: u16,
    /// DNS, TCP and UDP (Consul answers SRV queries for `<service>.service.consul`).
    pub(crate) dns: u16,
    pub(crate) serf_lan: u16,
    pub(crate) serf_wan: u16,
    pub(crate) server: u16,
}

/// One `consul agent -dev` process on its own ports, with its log file: what [`ConsulServer`]
/// and [`ConsulDatacenters`](crate::consul_wan::ConsulDatacenters) are made of. Killed (and
/// waited for) on drop, which also removes the log.
pub(crate) struct Agent {
    pub(crate) bin: PathBuf,
    pub(crate) ports: Ports,
    pub(crate) log: PathBuf,
    child: Mutex<Option<ProcessGuard>>,
}

impl Agent {
    /// An agent (not started) on fresh free ports, logging to a fresh file.
    pub(crate) fn new(bin: PathBuf) -> Agent {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let log =
            std::env::temp_dir().join(format!("waypost-consul-{}-{n}.log", std::process::id()));
        Agent {
            bin,
            ports: free_ports(),
            log,
            child: Mutex::new(None),
        }
    }

    /// The HTTP address, `127.0.0.1:<port>`.
    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.ports.http)
    }

    /// The HTTP base URL, `http://127.0.0.1:<port>`.
    pub(crate) fn http_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `consul agent -dev` named `node` in `datacenter` (Consul's default `dc1` when `None`),
    /// on this agent's ports, all on 127.0.0.1, gRPC off, no update check.
    pub(crate) fn command(&self, node: &str, datacenter: Option<&str>) -> Command {
        let p = self.ports;
        let mut cmd = Command::new(&self.bin);
        cmd.args(["agent", "-dev", "-node", node, "-bind", "127.0.0.1"])
            .args(["-client", "127.0.0.1", "-grpc-port", "-1"])
            .args(["-dns-port", &p.dns.to_string()])
            .args(["-http-port", &p.http.to_string()])
            .args(["-serf-lan-port", &p.serf_lan.to_string()])
            .args(["-serf-wan-port", &p.serf_wan.to_string()])
            .args(["-server-port", &p.server.to_string()])
            // Loopback only: no update check.
            .args(["-hcl", "disable_update_check = true"])
            .env("CHECKPOINT_DISABLE", "1");
        if let Some(dc) = datacenter {
            cmd.args(["-datacenter", dc]);
        }
        cmd
    }

    /// Runs `cmd` (from [`command`](Self::command)) under a guard, output to the log, and waits
    /// until the agent has a leader. On failure the agent is killed and the error carries the
    /// log's tail.
    pub(crate) async fn spawn_and_wait(&self, mut cmd: Command) -> Result<(), String> {
        let log =
            File::create(&self.log).map_err(|e| format!("log {}: {e}", self.log.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = ProcessGuard::spawn(&mut cmd)
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let http = reqwest::Client::new();
        let url = format!("{}/v1/status/leader", self.http_url());
        let deadline = Instant::now() + READY_BOUND;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "agent exited ({status}); log:\n{}",
                    self.log_tail()
                ));
            }
            if let Ok(resp) = http.get(&url).timeout(Duration::from_secs(2)).send().await {
                if let Ok(text) = resp.text().await {
                    // `""` until a leader is elected, then `"127.0.0.1:<server port>"`.
                    if text.trim().trim_matches('"').contains(':') {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "no leader within {READY_BOUND:?}; log:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the agent and starts it again with `command` on the same ports, a few times if
    /// the ports were not released yet.
    pub(crate) async fn respawn(&self, command: impl Fn() -> Command) -> Result<(), String> {
        self.kill();
        let mut last = String::new();
        // The ports were just released; a few tries cover a slow release on a loaded machine.
        for _ in 0..5 {
            match self.spawn_and_wait(command()).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        Err(last)
    }

    /// Kills the agent and waits for it to exit. Idempotent.
    pub(crate) fn kill(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(child) = guard.take() {
            child.kill();
        }
    }

    /// Whether the agent process runs (it was started, not killed, and has not exited).
    pub(crate) fn is_running(&self) -> bool {
        self.exited().is_none()
            && self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
    }

    fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let status = guard.as_ref().and_then(ProcessGuard::exited);
        if status.is_some() {
            *guard = None;
        }
        status
    }

    /// The last lines of the agent's log.
    pub(crate) fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A running single-node Consul agent in dev mode (in-memory state, nothing on disk).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use waypost_conformance::consul_server::ConsulServer;
///
/// let server = ConsulServer::start().await; // returns once the agent has a leader
/// let leader = reqwest::get(format!("{}/v1/status/leader", server.http_url())).await?;
/// assert!(leader.text().await?.contains("127.0.0.1:"));
///
/// server.kill(); // as a crash would; dropping the server does the same
/// assert!(reqwest::get(format!("{}/v1/status/leader", server.http_url())).await.is_err());
/// # Ok(())
/// # }
/// ```
pub struct ConsulServer {
    agent: Agent,
    acl_token: Option<String>,
    /// Configuration added by [`start_with_config`](Self::start_with_config), kept for restarts.
    config: Option<String>,
    /// For [`put`](Self::put): one client, so that a test's many writes share connections.
    http: reqwest::Client,
}

impl std::fmt::Debug for ConsulServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulServer")
            .field("ports", &self.agent.ports)
            .field("acl_token", &self.acl_token.as_ref().map(|_| "<redacted>"))
            .field("log", &self.agent.log)
            .finish_non_exhaustive()
    }
}

impl ConsulServer {
    /// Starts an agent and waits until it has a leader.
    ///
    /// # Panics
    /// When no `consul` binary is found, or the agent does not come up.
    pub async fn start() -> ConsulServer {
        Self::start_inner(None, None).await
    }

    /// Starts an agent with `hcl` added to its configuration (one `-hcl` argument, kept for
    /// [`restart`](Self::restart)): for what a test needs of the agent itself, such as the TLS
    /// files its health checks use.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use waypost_conformance::consul_server::ConsulServer;
    ///
    /// let server = ConsulServer::start_with_config(r#"node_meta { rack = "r7" }"#).await;
    /// let me = reqwest::get(format!("{}/v1/agent/self", server.http_url())).await?;
    /// let me: serde_json::Value = me.json().await?;
    /// assert_eq!(me["Meta"]["rack"], "r7");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Panics
    /// As [`start`](Self::start); also when the agent refuses the configuration.
    pub async fn start_with_config(hcl: &str) -> ConsulServer {
        Self::start_inner(None, Some(hcl.to_owned())).await
    }

    /// Starts an agent with ACLs enabled, default policy `deny`, and a bootstrap (master)
    /// token, available from [`acl_token`](Self::acl_token).
    pub async fn start_with_acl() -> ConsulServer {
        let token = format!(
            "00000000-0000-4000-8000-{:012x}",
            u64::from(std::process::id()) << 16 | u64::from(NEXT.fetch_add(1, Ordering::Relaxed))
        );
        Self::start_inner(Some(token), None).await
    }

    async fn start_inner(acl_token: Option<String>, config: Option<String>) -> ConsulServer {
        let bin = consul_bin();
        let mut last_error = String::new();
        // Free ports are picked by binding port 0 and releasing it: another process may grab one
        // in between, so try a few sets.
        for _ in 0..3 {
            let server = ConsulServer {
                agent: Agent::new(bin.clone()),
                acl_token: acl_token.clone(),
                config: config.clone(),
                http: reqwest::Client::builder()
                    .no_proxy()
                    .build()
                    .expect("a plain HTTP client builds"),
            };
            match server.agent.spawn_and_wait(server.command()).await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("consul agent did not start: {last_error}");
    }

    /// The HTTP address, `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        self.agent.addr()
    }

    /// The agent's DNS interface (TCP and UDP on the same port), answering for the `consul.`
    /// domain: `<service>.service.consul` SRV queries list the passing instances.
    pub fn dns_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.agent.ports.dns))
    }

    /// The HTTP base URL, `http://127.0.0.1:<port>`.
    pub fn http_url(&self) -> String {
        self.agent.http_url()
    }

    /// `PUT <path>` on the agent's HTTP API with `body` as JSON (with the bootstrap token, if
    /// the agent has ACLs): what a test does by hand to register, fail a check or deregister.
    ///
    /// # Panics
    /// Unless the agent answers with a success.
    pub async fn put(&self, path: &str, body: serde_json::Value) {
        let mut req = self
            .http
            .put(format!("{}{path}", self.http_url()))
            .json(&body);
        if let Some(token) = &self.acl_token {
            req = req.header("X-Consul-Token", token);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {path}: {e}"));
        assert!(resp.status().is_success(), "PUT {path}: {}", resp.status());
    }

    /// Check `check_id` as the agent has it now (`GET /v1/agent/checks`); `None` when the
    /// agent has no such check. A Waypost registration's check is `service:<instance id>`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use waypost_conformance::consul_server::ConsulServer;
    ///
    /// let server = ConsulServer::start().await;
    /// let check = serde_json::json!({"ID": "beat", "Name": "beat", "TTL": "30s"});
    /// server.put("/v1/agent/check/register", check).await;
    /// let beat = server.check("beat").await.unwrap();
    /// assert_eq!(beat.status, "critical"); // a TTL check starts critical
    /// assert_eq!(server.check("no-such-check").await, None);
    /// # }
    /// ```
    ///
    /// # Panics
    /// When the agent does not answer with its checks.
    pub async fn check(&self, check_id: &str) -> Option<AgentCheck> {
        let mut req = self
            .http
            .get(format!("{}/v1/agent/checks", self.http_url()));
        if let Some(token) = &self.acl_token {
            req = req.header("X-Consul-Token", token);
        }
        let checks: serde_json::Value = req
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("GET /v1/agent/checks: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET /v1/agent/checks: {e}"));
        let check = checks.get(check_id)?;
        let text = |field: &str| check[field].as_str().unwrap_or_default().to_owned();
        Some(AgentCheck {
            status: text("Status"),
            output: text("Output"),
        })
    }

    /// Waits, up to `within`, until the agent has run check `check_id` (an HTTP, TCP or gRPC
    /// check, which it runs itself) at least once, and returns what the run said.
    ///
    /// # Panics
    /// When the check has not run within `within`.
    pub async fn check_once_run(&self, check_id: &str, within: Duration) -> AgentCheck {
        let what = format!("a run of check {check_id}");
        crate::scenarios::eventually(within, what, || async {
            match self.check(check_id).await {
                // Registered with no output: every run writes one.
                Some(check) if !check.output.is_empty() => Ok(check),
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }

    /// The bootstrap token of an agent started with [`start_with_acl`](Self::start_with_acl).
    pub fn acl_token(&self) -> Option<&str> {
        self.acl_token.as_deref()
    }

    /// Kills the agent (as a crash would) and starts it again on the same ports; returns when
    /// it has a leader. A `-dev` agent forgets every registration.
    ///
    /// # Panics
    /// When the agent does not come back.
    pub async fn restart(&self) {
        if let Err(last) = self.agent.respawn(|| self.command()).await {
            panic!("consul agent did not come back after a restart: {last}");
        }
    }

    /// Kills the agent and waits for it to exit. Idempotent.
    pub fn kill(&self) {
        self.agent.kill();
    }

    fn command(&self) -> Command {
        let mut cmd = self.agent.command("waypost-test", None);
        if let Some(hcl) = &self.config {
            cmd.args(["-hcl", hcl]);
        }
        if let Some(token) = &self.acl_token {
            cmd.args([
                "-hcl",
                &format!(
                    r#"acl {{ enabled = true default_policy = "deny" enable_token_persistence = false tokens {{ master = "{token}" agent = "{token}" }} }}"#
                ),
            ]);
        }
        cmd
    }
}

/// A check as a Consul agent has it ([`ConsulServer::check`]).
///
/// ```
/// use waypost_conformance::consul_server::AgentCheck;
/// let check = AgentCheck { status: "passing".into(), output: "HTTP GET ...: 200 OK".into() };
/// assert!(check.is_passing());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCheck {
    /// `passing`, `warning` or `critical`.
    pub status: String,
    /// What its last run said; empty until a check the agent runs itself has run.
    pub output: String,
}

impl AgentCheck {
    /// Whether the status is `passing`.
    pub fn is_passing(&self) -> bool {
        self.status == "passing"
    }
}

/// The binary from `WAYPOST_CONSUL_BIN`, else `consul` on `PATH`.
pub(crate) fn consul_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WAYPOST_CONSUL_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return bin;
        }
        panic!(
            "WAYPOST_CONSUL_BIN={} is not a file; run `eval \"$(scripts/fetch-servers)\"` to fetch consul",
            bin.display()
        );
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("consul");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "no consul binary: these tests need a real Consul agent. Run `eval \"$(scripts/fetch-servers)\"` \
         in the repository (it fetches Consul into .cache/servers and sets WAYPOST_CONSUL_BIN), or put consul on PATH"
    );
}

/// Five distinct free ports (TCP and, for DNS and Serf, UDP too).
fn free_ports() -> Ports {
    let p = harness::free_ports(5, true);
    Ports {
        http: p[0],
        dns: p[1],
        serf_lan: p[2],
        serf_wan: p[3],
        server: p[4],
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
