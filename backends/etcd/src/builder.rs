//! Configuring and connecting an [`Etcd`] client.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use waypost_core::Error;

use crate::error;
use crate::record::Layout;
use crate::{retry, Etcd, Shared};

/// The key prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "/waypost/services";
/// The lease TTL used for registrations whose health check etcd cannot run (HTTP, TCP).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// The environment variable [`EtcdBuilder::from_env`] reads: comma-separated endpoints.
pub const ENDPOINTS_ENV: &str = "ETCD_ENDPOINTS";

/// Builds an [`Etcd`] client; see [`Etcd::builder`].
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{Discovery, Error};
/// use waypost_etcd::Etcd;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = waypost_conformance::etcd_server::EtcdServer::start().await;
/// # let endpoint = server.endpoint(); // a real etcd the example started
/// let etcd = Etcd::builder()
///     .endpoints([endpoint.clone()])
///     .prefix("/my-company/services")
///     .lease_ttl(Duration::from_secs(15))
///     .request_timeout(Duration::from_secs(3))
///     .connect()
///     .await?;
/// assert!(etcd.instances(&"users".parse()?).await?.is_empty());
///
/// // A mistake is found before any I/O, and says what fits.
/// let none: [&str; 0] = [];
/// let err = Etcd::builder().endpoints(none).connect().await.unwrap_err();
/// assert!(matches!(err, Error::Config { .. }), "{err}");
/// assert!(err.to_string().contains("ETCD_ENDPOINTS"), "{err}");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[must_use]
pub struct EtcdBuilder {
    endpoints: Vec<String>,
    env_problem: Option<String>,
    prefix: String,
    lease_ttl: Option<Duration>,
    user: Option<(String, String)>,
    connect_timeout: Duration,
    request_timeout: Duration,
    progress_interval: Duration,
    default_host: Option<String>,
    #[cfg(feature = "tls")]
    tls: Tls,
}

#[cfg(feature = "tls")]
#[derive(Clone, Default)]
struct Tls {
    ca_pem: Option<Vec<u8>>,
    identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl Default for EtcdBuilder {
    fn default() -> Self {
        EtcdBuilder {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            env_problem: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            lease_ttl: None,
            user: None,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            progress_interval: Duration::from_secs(10),
            default_host: None,
            #[cfg(feature = "tls")]
            tls: Tls::default(),
        }
    }
}

impl fmt::Debug for EtcdBuilder {
    // By hand: the password must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("EtcdBuilder");
        d.field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("auth", &self.user.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("progress_interval", &self.progress_interval)
            .field("default_host", &self.default_host);
        #[cfg(feature = "tls")]
        d.field("tls_ca", &self.tls.ca_pem.is_some())
            .field(
                "tls_identity",
                &self.tls.identity_pem.as_ref().map(|_| "<redacted>"),
            )
            .field("tls_domain", &self.tls.domain);
        d.finish()
    }
}

impl EtcdBuilder {
    /// The cluster's client URLs (`http://host:port`, `https://host:port` with feature `tls`, or
    /// bare `host:port`). Replaces earlier ones. Default: `http://127.0.0.1:2379`.
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self.env_problem = None;
        self
    }

    /// Reads the endpoints from `ETCD_ENDPOINTS` (comma-separated) when it is set; keeps the
    /// configured ones otherwise. A set but empty or malformed variable fails [`connect`](Self::connect).
    ///
    /// ```
    /// let b = waypost_etcd::Etcd::builder().from_env();
    /// # drop(b);
    /// ```
    pub fn from_env(mut self) -> Self {
        if let Some(raw) = std::env::var_os(ENDPOINTS_ENV) {
            match raw.into_string() {
                Ok(s) => match parse_endpoints(&s) {
                    Ok(eps) => {
                        self.endpoints = eps;
                        self.env_problem = None;
                    }
                    Err(why) => self.env_problem = Some(format!("{ENDPOINTS_ENV}={s:?}: {why}")),
                },
                Err(_) => self.env_problem = Some(format!("{ENDPOINTS_ENV} is not UTF-8")),
            }
        }
        self
    }

    /// The key prefix under which instances live (default [`DEFAULT_PREFIX`]); trailing
    /// slashes are ignored. Every process of a system must use the same one.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The lease TTL of every registration made through this client, in whole seconds
    /// (rounded up, at least 1 s). When not set, a registration's
    /// [`HealthCheck::Ttl`](waypost_core::HealthCheck::Ttl) is used, and for checks etcd cannot
    /// run (HTTP, TCP, gRPC) [`DEFAULT_LEASE_TTL`]. Keep-alives go out every TTL/3.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let b = waypost_etcd::Etcd::builder().lease_ttl(Duration::from_secs(30));
    /// assert!(format!("{b:?}").contains("30s"));
    /// ```
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = Some(ttl);
        self
    }

    /// Authenticate as `user` with `password` (etcd's auth must be enabled). Never logged, not
    /// shown by `Debug`. A wrong password makes [`connect`](Self::connect) fail with
    /// [`Error::PermissionDenied`].
    ///
    /// ```
    /// let b = waypost_etcd::Etcd::builder().auth("svc-users", "s3cret");
    /// assert!(!format!("{b:?}").contains("s3cret"));
    /// ```
    pub fn auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    /// Time limit of opening a connection to one member (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time limit of one request, and of one keep-alive or progress answer (default 5 s). A
    /// request without an answer by then counts as a failure and is retried.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long a watch may be idle before it asks the server for a progress notification
    /// (default 10 s). A watch whose progress request is not answered within the request
    /// timeout is considered stuck and re-opened from its last revision.
    pub fn progress_interval(mut self, interval: Duration) -> Self {
        self.progress_interval = interval;
        self
    }

    /// The host announced by registrations that name none. Default
    /// [`waypost_core::local_ipv4`]: this machine's first IPv4 address that is neither loopback
    /// nor link-local, or `127.0.0.1`.
    pub fn default_host(mut self, host: impl Into<String>) -> Self {
        self.default_host = Some(host.into());
        self
    }

    /// Trust this PEM CA bundle for `https://` endpoints.
    #[cfg(feature = "tls")]
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca_pem = Some(pem.into());
        self
    }

    /// Present this PEM client certificate and key (mutual TLS). Not shown by `Debug`.
    #[cfg(feature = "tls")]
    pub fn tls_identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.tls.identity_pem = Some((cert.into(), key.into()));
        self
    }

    /// The name to verify the servers' certificates against (default: the endpoint's host).
    #[cfg(feature = "tls")]
    pub fn tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.tls.domain = Some(domain.into());
        self
    }

    /// Checks the configuration, connects, and reads the prefix once, so that an unreachable
    /// cluster ([`Error::Unavailable`]), wrong credentials or missing read permission
    /// ([`Error::PermissionDenied`]) and a bad configuration ([`Error::Config`]) show up here
    /// rather than later.
    ///
    /// The read needs a member that answers, not a leader: connecting while the cluster elects
    /// one, or while it has lost its quorum, succeeds, and the outage shows up in what the
    /// watch yields and in the calls that need the quorum. With `auth`, though, etcd hands out
    /// the token through its quorum: connecting with credentials fails until it has one.
    pub async fn connect(self) -> Result<Etcd, Error> {
        if let Some(problem) = &self.env_problem {
            return Err(error::config(problem.clone()));
        }
        let endpoints = self.checked_endpoints()?;
        self.check_durations()?;
        if self.prefix.chars().any(char::is_control) {
            return Err(error::config("the prefix contains a control character"));
        }
        let options = self.connect_options()?;
        let wait = self.connect_timeout + self.request_timeout;
        let client = match tokio::time::timeout(
            wait,
            etcd_client::Client::connect(&endpoints, Some(options)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(error::map("connect", e)),
            Err(_) => return Err(error::timed_out("connect", wait)),
        };
        let default_host = self
            .default_host
            .clone()
            .unwrap_or_else(|| waypost_core::local_ipv4().to_string());
        let layout = Layout::new(&self.prefix);
        let attempts = 2 + endpoints.len() as u32;
        // A cheap read of the prefix: proves that a member answers and that we may read. It is
        // serializable (answered from the member's own state) so that a cluster that is
        // electing a leader, or has lost its quorum for now, is an outage that the watch and
        // the registrations survive and report, not a start-up failure. etcd checks read
        // permission on serializable reads too.
        let probe_key = format!("{}/", layout.prefix());
        let probe = |mut c: etcd_client::Client| {
            let key = probe_key.clone();
            async move {
                c.get(
                    key,
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only()
                            .with_serializable(),
                    ),
                )
                .await
            }
        };
        let probed = retry::call(
            &client,
            "connect: read the prefix",
            self.request_timeout,
            attempts,
            probe,
        )
        .await;
        match probed {
            Ok(_) => {}
            // The client's balancer may have sent every attempt to a dead member (it picks at
            // random among them): ask each member on its own before calling the cluster
            // unreachable, so that one that answers is always found.
            Err(e @ Error::Unavailable { .. }) if endpoints.len() > 1 => {
                if !self.one_member_answers(&endpoints, probe).await? {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        Ok(Etcd {
            shared: Arc::new(Shared::new(
                client,
                endpoints,
                layout,
                default_host,
                self.lease_ttl,
                self.request_timeout,
                self.progress_interval,
                attempts,
            )),
        })
    }

    /// Asks each of `endpoints` on its own, a client of its own each, until one answers
    /// `probe`: `true` then, `false` when none does, and the error of one that answers with a
    /// refusal (a permission, say).
    async fn one_member_answers<F, Fut, T>(
        &self,
        endpoints: &[String],
        probe: F,
    ) -> Result<bool, Error>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let wait = self.connect_timeout + self.request_timeout;
        let options = self.connect_options()?;
        for endpoint in endpoints {
            let one = etcd_client::Client::connect([endpoint], Some(options.clone()));
            let Ok(Ok(one)) = tokio::time::timeout(wait, one).await else {
                continue;
            };
            match tokio::time::timeout(self.request_timeout, probe(one)).await {
                Ok(Ok(_)) => return Ok(true),
                Ok(Err(refused)) => {
                    let refused = error::map("connect: read the prefix", refused);
                    if !matches!(refused, Error::Unavailable { .. }) {
                        return Err(refused);
                    }
                }
                Err(_) => {}
            }
        }
        Ok(false)
    }

    fn checked_endpoints(&self) -> Result<Vec<String>, Error> {
        if self.endpoints.is_empty() {
            return Err(error::config(
                "no endpoints: give .endpoints([...]) or set ETCD_ENDPOINTS",
            ));
        }
        for e in &self.endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .unwrap_or(e);
            if rest.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(error::config(format!(
                    "endpoint {e:?} is not a URL like http://127.0.0.1:2379"
                )));
            }
            if e.starts_with("https://") && !cfg!(feature = "tls") {
                return Err(error::config(format!(
                    "endpoint {e:?} needs TLS: enable waypost-etcd's feature \"tls\""
                )));
            }
        }
        Ok(self.endpoints.clone())
    }

    fn check_durations(&self) -> Result<(), Error> {
        for (what, d) in [
            ("connect timeout", self.connect_timeout),
            ("request timeout", self.request_timeout),
            ("progress interval", self.progress_interval),
        ] {
            if d.is_zero() {
                return Err(error::config(format!("the {what} is 0")));
            }
        }
        if let Some(ttl) = self.lease_ttl {
            if ttl < Duration::from_secs(1) {
                return Err(error::config(format!(
                    "lease TTL {ttl:?} is below etcd's 1 s granularity"
                )));
            }
        }
        Ok(())
    }

    fn connect_options(&self) -> Result<etcd_client::ConnectOptions, Error> {
        let mut o = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            // HTTP/2 pings find a dead connection; etcd refuses pings more often than every 5 s.
            .with_keep_alive(Duration::from_secs(10), self.request_timeout)
            // A member cut off from the leader refuses the request instead of serving stale data
            // or keeping a watch that never fires.
            .with_require_leader(true);
        if let Some((user, password)) = &self.user {
            o = o
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        #[cfg(feature = "tls")]
        {
            let wants_tls = self.tls.ca_pem.is_some()
                || self.tls.identity_pem.is_some()
                || self.tls.domain.is_some();
            if wants_tls {
                if self.endpoints.iter().any(|e| e.starts_with("http://")) {
                    return Err(error::config(
                        "TLS options are set but an endpoint is http://: use https:// endpoints",
                    ));
                }
                let mut tls = etcd_client::TlsOptions::new();
                if let Some(ca) = &self.tls.ca_pem {
                    tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
                }
                if let Some((cert, key)) = &self.tls.identity_pem {
                    tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
                }
                if let Some(domain) = &self.tls.domain {
                    tls = tls.domain_name(domain.clone());
                }
                o = o.with_tls(tls);
            }
        }
        Ok(o)
    }
}

/// Splits `a,b,c` into endpoints, trimming spaces; empty entries are an error.
pub(crate) fn parse_endpoints(s: &str) -> Result<Vec<String>, String> {
    let eps: Vec<String> = s.split(',').map(|e| e.trim().to_owned()).collect();
    if eps.iter().any(String::is_empty) {
        return Err(
            "expected comma-separated URLs like http://10.0.0.1:2379,http://10.0.0.2:2379".into(),
        );
    }
    Ok(eps)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `connect`'s fallback: each member asked on its own finds the one that answers, wherever
    /// it is in the list; none answering is `false`.
    #[tokio::test]
    async fn each_member_asked_on_its_own_finds_the_one_that_answers() {
        let server = waypost_conformance::etcd_server::EtcdServer::start().await;
        let mut dead = Vec::new();
        for _ in 0..2 {
            // A port that was free a moment ago: connections to it are refused.
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            dead.push(format!("http://{}", listener.local_addr().unwrap()));
        }
        let builder = Etcd::builder()
            .connect_timeout(Duration::from_millis(300))
            .request_timeout(Duration::from_secs(1));
        let probe = |mut c: etcd_client::Client| async move { c.get("probe", None).await };
        let mut listed = dead.clone();
        listed.push(server.endpoint());
        assert!(builder.one_member_answers(&listed, probe).await.unwrap());
        assert!(!builder.one_member_answers(&dead, probe).await.unwrap());
    }

    #[test]
    fn endpoints_from_a_comma_separated_list() {
        assert_eq!(
            parse_endpoints("http://a:1, http://b:2").unwrap(),
            vec!["http://a:1", "http://b:2"]
        );
        assert!(parse_endpoints("").is_err());
        assert!(parse_endpoints("http://a:1,,http://b:2").is_err());
    }

    #[test]
    fn from_env_reads_etcd_endpoints() {
        // The only test in this crate that touches the variable.
        std::env::set_var(ENDPOINTS_ENV, "http://127.0.0.1:1,http://127.0.0.1:2");
        let b = Etcd::builder().from_env();
        assert_eq!(
            b.endpoints,
            vec!["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
        std::env::set_var(ENDPOINTS_ENV, " , ");
        let b = Etcd::builder().from_env();
        assert!(b.env_problem.is_some());
        std::env::remove_var(ENDPOINTS_ENV);
        let b = Etcd::builder().endpoints(["x:1"]).from_env();
        assert_eq!(b.endpoints, vec!["x:1"]);
    }

    #[test]
    fn debug_never_shows_the_password() {
        let b = Etcd::builder().auth("alice", "s3cr3t-pw");
        let s = format!("{b:?}");
        assert!(!s.contains("s3cr3t-pw") && !s.contains("alice"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[tokio::test]
    async fn bad_configuration_is_a_config_error_before_any_io() {
        let cases = [
            Etcd::builder().endpoints(Vec::<String>::new()),
            Etcd::builder().endpoints(["http://"]),
            Etcd::builder().endpoints(["http://a b:1"]),
            Etcd::builder().request_timeout(Duration::ZERO),
            Etcd::builder().lease_ttl(Duration::from_millis(300)),
            Etcd::builder().prefix("/a\nb"),
        ];
        for b in cases {
            let shown = format!("{b:?}");
            let err = b.connect().await.unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{shown}: {err}");
        }
        #[cfg(not(feature = "tls"))]
        {
            let err = Etcd::builder()
                .endpoints(["https://127.0.0.1:2379"])
                .connect()
                .await
                .unwrap_err();
            assert!(err.to_string().contains("feature \"tls\""), "{err}");
        }
    }

    #[cfg(feature = "tls")]
    #[tokio::test]
    async fn tls_options_need_https_endpoints_and_hide_the_key() {
        let b = Etcd::builder()
            .endpoints(["http://127.0.0.1:2379"])
            .tls_identity_pem("CERT", "PRIVATE-KEY-BYTES")
            .tls_domain("etcd.local");
        assert!(!format!("{b:?}").contains("PRIVATE-KEY-BYTES"));
        let err = b.connect().await.unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        assert!(err.to_string().contains("https://"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_cluster_is_unavailable() {
        // A port that was free a moment ago: connection refused, no server needed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = Etcd::builder()
            .endpoints([format!("http://127.0.0.1:{port}")])
            .connect_timeout(Duration::from_millis(300))
            .request_timeout(Duration::from_millis(500))
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err}");
        assert!(err.is_retryable());
    }
}
