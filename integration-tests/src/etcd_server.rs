//! Real etcd servers for tests: a single node ([`EtcdServer`]) or a cluster ([`EtcdCluster`]),
//! on free loopback ports, with data in a temporary directory, stopped (and the directory
//! removed) on drop.
//!
//! The binary is `WAYPOST_ETCD_BIN`, else `etcd` on `PATH`; `eval "$(scripts/fetch-servers)"`
//! provides it. The examples of [`EtcdServer`] and [`EtcdCluster`] start them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::harness;

/// How long a member may take to report healthy (a cluster elects a leader in ~3 s).
const READY_LIMIT: Duration = Duration::from_secs(30);

/// The etcd binary: `WAYPOST_ETCD_BIN`, else `etcd` on `PATH`.
///
/// # Panics
/// When there is none, with a message saying how to get one.
pub fn etcd_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("WAYPOST_ETCD_BIN") {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return bin;
        }
        panic!("WAYPOST_ETCD_BIN={} is not a file; run `eval \"$(scripts/fetch-servers)\"` from the repository root", bin.display());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("etcd");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "no etcd binary: set WAYPOST_ETCD_BIN or put etcd on PATH; \
         run `eval \"$(scripts/fetch-servers)\"` from the repository root to fetch one"
    );
}

fn free_port() -> u16 {
    harness::free_port()
}

fn free_ports(n: usize) -> Vec<u16> {
    harness::free_ports(n, false)
}

/// A private directory under the system temp dir, removed by [`Members`]' drop.
fn temp_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "waypost-etcd-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("creating a temp dir for etcd");
    dir
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    tls: Option<Tls>,
    child: Option<Child>,
}

/// A TLS client listener next to the plain one (which the harness keeps for health checks).
#[derive(Clone)]
struct Tls {
    cert: PathBuf,
    key: PathBuf,
    port: u16,
}

impl Member {
    fn client_url(&self, port: u16) -> String {
        format!("http://127.0.0.1:{port}")
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn spawn(&mut self, initial_cluster: &str, token: &str, client_port: u16) {
        let mut client = self.client_url(client_port);
        let mut tls_args: Vec<std::ffi::OsString> = Vec::new();
        if let Some(tls) = &self.tls {
            client = format!("{client},https://127.0.0.1:{}", tls.port);
            tls_args.extend(["--cert-file".into(), tls.cert.clone().into_os_string()]);
            tls_args.extend(["--key-file".into(), tls.key.clone().into_os_string()]);
        }
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &self.peer_url()])
            .args(["--initial-advertise-peer-urls", &self.peer_url()])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", token])
            .args(["--logger", "zap", "--log-outputs"])
            .arg(&self.log)
            .args(&tls_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd {}: {e}", self.name));
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) with the system's `kill`.
    fn signal(&self, signal: &str) {
        let Some(child) = &self.child else { return };
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("running kill -{signal}: {e}"));
        assert!(status.success(), "kill -{signal} {} failed", child.id());
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// The members of one cluster (of one or more).
struct Members {
    dir: PathBuf,
    token: String,
    members: Mutex<Vec<Member>>,
    http: reqwest::Client,
}

impl Members {
    /// Starts `n` members on fresh ports. Another process can take a chosen port before etcd
    /// binds it: then the member exits, and the whole start is tried again on other ports.
    async fn start(n: usize, tls: Option<(&[u8], &[u8])>) -> Members {
        assert!(n >= 1, "a cluster needs at least one member");
        let mut attempt = 1;
        loop {
            match Members::try_start(n, tls).await {
                Ok(members) => return members,
                Err(why) if attempt < 3 && why.exited => attempt += 1,
                Err(why) => panic!("{}", why.message),
            }
        }
    }

    async fn try_start(n: usize, tls: Option<(&[u8], &[u8])>) -> Result<Members, NotHealthy> {
        let dir = temp_dir();
        let tls = tls.map(|(cert, key)| {
            let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&cert_path, cert).expect("writing the server certificate");
            std::fs::write(&key_path, key).expect("writing the server key");
            (cert_path, key_path)
        });
        let token = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "waypost".into());
        let ports = free_ports(3 * n);
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[3 * i],
                peer_port: ports[3 * i + 1],
                data_dir: dir.join(format!("m{i}.data")),
                log: dir.join(format!("m{i}.log")),
                tls: tls.as_ref().map(|(cert, key)| Tls {
                    cert: cert.clone(),
                    key: key.clone(),
                    port: ports[3 * i + 2],
                }),
                child: None,
            })
            .collect();
        let initial = initial_cluster(&members);
        for m in &mut members {
            let port = m.client_port;
            m.spawn(&initial, &token, port);
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("building an HTTP client");
        let this = Members {
            dir,
            token,
            members: Mutex::new(members),
            http,
        };
        for i in 0..n {
            this.healthy(i, None).await?;
        }
        Ok(this)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn endpoints(&self) -> Vec<String> {
        self.lock()
            .iter()
            .map(|m| m.client_url(m.client_port))
            .collect()
    }

    /// Waits until member `i` answers `/health` with `true` on `port` (default its own).
    ///
    /// # Panics
    /// When it does not, with the end of its log.
    async fn wait_healthy(&self, i: usize, port: Option<u16>) {
        if let Err(why) = self.healthy(i, port).await {
            panic!("{}", why.message);
        }
    }

    async fn healthy(&self, i: usize, port: Option<u16>) -> Result<(), NotHealthy> {
        let url = {
            let ms = self.lock();
            format!(
                "{}/health",
                ms[i].client_url(port.unwrap_or(ms[i].client_port))
            )
        };
        let started = Instant::now();
        loop {
            if let Ok(resp) = self.http.get(&url).send().await {
                if let Ok(v) = resp.json::<serde_json::Value>().await {
                    if v["health"] == "true" {
                        return Ok(());
                    }
                }
            }
            let exited = {
                let mut ms = self.lock();
                ms[i]
                    .child
                    .as_mut()
                    .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                    .unwrap_or(true)
            };
            if exited || started.elapsed() > READY_LIMIT {
                let ms = self.lock();
                return Err(NotHealthy {
                    exited,
                    message: format!(
                        "etcd member {} did not become healthy at {url} ({}); its log ends with:\n{}",
                        ms[i].name,
                        if exited { "it exited" } else { "time limit" },
                        ms[i].log_tail()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&self, i: usize) {
        self.lock()[i].kill();
    }

    async fn start_member(&self, i: usize, port: Option<u16>) {
        {
            let mut ms = self.lock();
            let initial = initial_cluster(&ms);
            let m = &mut ms[i];
            m.kill();
            let port = port.unwrap_or(m.client_port);
            m.spawn(&initial, &self.token, port);
        }
        self.wait_healthy(i, port).await;
    }

    /// The index of the member that is the leader, as the members themselves report it.
    async fn leader(&self) -> Option<usize> {
        let urls: Vec<Option<String>> = self
            .lock()
            .iter()
            .map(|m| m.child.as_ref().map(|_| m.client_url(m.client_port)))
            .collect();
        for (i, url) in urls.iter().enumerate() {
            let Some(url) = url else { continue };
            let Ok(resp) = self
                .http
                .post(format!("{url}/v3/maintenance/status"))
                .body("{}")
                .send()
                .await
            else {
                continue;
            };
            let Ok(v) = resp.json::<serde_json::Value>().await else {
                continue;
            };
            if v["leader"].is_string() && v["leader"] == v["header"]["member_id"] {
                return Some(i);
            }
        }
        None
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for m in self.lock().iter_mut() {
            m.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Why a member did not come up.
struct NotHealthy {
    /// The process ended (e.g. its port was taken), as opposed to running but not healthy.
    exited: bool,
    message: String,
}

fn initial_cluster(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url()))
        .collect::<Vec<_>>()
        .join(",")
}

/// One etcd server on free loopback ports. Killed, and its data removed, on drop.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use waypost_conformance::etcd_server::EtcdServer;
///
/// let server = EtcdServer::start().await; // returns once it is healthy
/// let health = reqwest::get(format!("{}/health", server.endpoint())).await?.text().await?;
/// assert!(health.contains(r#""health":"true""#), "{health}");
///
/// server.stop(); // killed; its data stays for resume()
/// assert!(reqwest::get(format!("{}/health", server.endpoint())).await.is_err());
/// # Ok(())
/// # }
/// ```
pub struct EtcdServer {
    members: Members,
}

impl EtcdServer {
    /// Starts a server and waits until it is healthy.
    ///
    /// # Panics
    /// Without an etcd binary (see [`etcd_binary`]), or when it does not become healthy.
    pub async fn start() -> EtcdServer {
        EtcdServer {
            members: Members::start(1, None).await,
        }
    }

    /// Starts a server that also serves clients over TLS with the given PEM certificate and
    /// key, at [`tls_endpoint`](Self::tls_endpoint).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub async fn start_tls(cert_pem: &[u8], key_pem: &[u8]) -> EtcdServer {
        EtcdServer {
            members: Members::start(1, Some((cert_pem, key_pem))).await,
        }
    }

    /// The `https://127.0.0.1:<port>` client URL of a server started with
    /// [`start_tls`](Self::start_tls).
    pub fn tls_endpoint(&self) -> Option<String> {
        let ms = self.members.lock();
        ms[0]
            .tls
            .as_ref()
            .map(|t| format!("https://127.0.0.1:{}", t.port))
    }

    /// The client URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        self.members.endpoints().remove(0)
    }

    /// [`endpoint`](Self::endpoint) as a list.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.endpoints()
    }

    /// Kills the server (as a crash would; etcd's data survives) and starts it again on the same
    /// ports; returns once it is healthy.
    pub async fn restart(&self) {
        self.members.start_member(0, None).await;
    }

    /// Kills the server; its data stays for [`resume`](Self::resume).
    pub fn stop(&self) {
        self.members.kill(0);
    }

    /// Starts the (stopped) server with its data on another client port, which it returns:
    /// clients of [`endpoint`](Self::endpoint) cannot reach it meanwhile. For changing data
    /// while a watcher is cut off.
    pub async fn start_isolated(&self) -> String {
        let port = free_port();
        self.members.start_member(0, Some(port)).await;
        format!("http://127.0.0.1:{port}")
    }

    /// Starts the server again on its own ports (after [`stop`](Self::stop) or
    /// [`start_isolated`](Self::start_isolated)).
    pub async fn resume(&self) {
        self.members.start_member(0, None).await;
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, as with a
    /// hung or partitioned member.
    pub fn freeze(&self) {
        self.members.lock()[0].signal("STOP");
    }

    /// Lets a [`freeze`](Self::freeze)d server go on (SIGCONT).
    pub fn thaw(&self) {
        self.members.lock()[0].signal("CONT");
    }

    /// The directory with the server's data and log.
    pub fn dir(&self) -> &Path {
        &self.members.dir
    }
}

/// A cluster of etcd members on free loopback ports. Every member is killed, and the data
/// removed, on drop.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use waypost_conformance::etcd_server::EtcdCluster;
///
/// let cluster = EtcdCluster::start(3).await;
/// assert_eq!(cluster.endpoints().len(), 3);
/// let old = cluster.kill_leader().await;
/// // The two members left elect another leader.
/// let mut new = None;
/// for _ in 0..300 {
///     new = cluster.leader().await;
///     if new.is_some() {
///         break;
///     }
///     tokio::time::sleep(Duration::from_millis(100)).await;
/// }
/// assert!(new.is_some_and(|new| new != old), "no new leader after {old} was killed");
/// # }
/// ```
pub struct EtcdCluster {
    members: Members,
}

impl EtcdCluster {
    /// Starts `n` members and waits until each is healthy (a leader is elected).
    ///
    /// # Panics
    /// Without an etcd binary, or when the cluster does not become healthy.
    pub async fn start(n: usize) -> EtcdCluster {
        EtcdCluster {
            members: Members::start(n, None).await,
        }
    }

    /// The client URLs of all members (stopped ones included).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.endpoints()
    }

    /// The index of the current leader, if the running members agree on one.
    pub async fn leader(&self) -> Option<usize> {
        self.members.leader().await
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill_member(&self, i: usize) {
        self.members.kill(i);
    }

    /// Waits for a leader (up to 30 s), kills it, and returns its index.
    ///
    /// # Panics
    /// When no leader shows up in time.
    pub async fn kill_leader(&self) -> usize {
        let started = Instant::now();
        loop {
            if let Some(i) = self.leader().await {
                self.kill_member(i);
                return i;
            }
            assert!(
                started.elapsed() < READY_LIMIT,
                "the etcd cluster has no leader"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts member `i` again with its data; returns once it is healthy.
    pub async fn restart_member(&self, i: usize) {
        self.members.start_member(i, None).await;
    }

    /// Restarts every member, one after the other.
    pub async fn restart(&self) {
        let n = self.members.lock().len();
        for i in 0..n {
            self.restart_member(i).await;
        }
    }
}
