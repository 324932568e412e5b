//! The client configuration: address, token, TLS, query options, and the `CONSUL_*` variables.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderValue;
use reqwest::Url;
use waypost_core::Error;

use crate::api::Api;
use crate::{Consul, BACKEND};

/// The agent address used when none is configured (Consul's own default).
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8500";

/// The longest blocking wait the server honours.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Builds a [`Consul`] client; see [`Consul::builder`].
///
/// Nothing here does I/O except reading the TLS files named with [`ca_cert`](Self::ca_cert) /
/// [`client_cert`](Self::client_cert) in [`build`](Self::build). The token never appears in
/// `Debug` output.
///
/// ```
/// use std::time::Duration;
/// use waypost_consul::Consul;
///
/// let consul = Consul::builder()
///     .address("https://consul.internal:8501")
///     .token("s3cr3t")
///     .datacenter("eu-1")
///     .tags(["v1"])
///     .stale(true)
///     .wait(Duration::from_secs(60))
///     .build()?;
/// assert!(!format!("{consul:?}").contains("s3cr3t"));
/// # Ok::<(), waypost_core::Error>(())
/// ```
#[derive(Clone)]
#[must_use]
pub struct ConsulBuilder {
    pub(crate) address: Option<String>,
    pub(crate) ssl: bool,
    pub(crate) token: Option<String>,
    pub(crate) token_file: Option<PathBuf>,
    pub(crate) datacenter: Option<String>,
    pub(crate) passing_only: bool,
    pub(crate) tags: Vec<String>,
    pub(crate) stale: bool,
    pub(crate) cached: bool,
    pub(crate) wait: Duration,
    pub(crate) ca_cert: Option<PathBuf>,
    pub(crate) client_cert: Option<(PathBuf, PathBuf)>,
    pub(crate) tls_server_name: Option<String>,
    pub(crate) default_host: Option<String>,
    pub(crate) request_timeout: Duration,
    pub(crate) backoff: (Duration, Duration),
    pub(crate) rate_limit: (u32, Duration),
    pub(crate) max_blocking_watches: usize,
}

/// How many watches of one client hold a blocking query of their own, unless
/// [`ConsulBuilder::max_blocking_watches`] says otherwise.
///
/// ```
/// // With the shared watch's two queries and its reads, well under an agent's 200 connections
/// // per client address.
/// let in_flight = waypost_consul::DEFAULT_MAX_BLOCKING_WATCHES + 2 + waypost_consul::SHARED_WATCH_READS;
/// assert!(in_flight < 100);
/// ```
pub const DEFAULT_MAX_BLOCKING_WATCHES: usize = 32;

/// How many ordinary requests (registrations, heartbeats, deregistrations, reads that do not
/// block) one client has in flight at most; more wait for a turn. Each takes a connection,
/// and an agent closes the connections of one client address past its limit
/// (`limits.http_max_conns_per_client`, 200 by default): with the blocking queries'
/// [`DEFAULT_MAX_BLOCKING_WATCHES`] and the shared watch's,
/// a client stays well under it, however many registrations beat at once.
///
/// ```
/// let most = waypost_consul::ORDINARY_REQUESTS
///     + waypost_consul::DEFAULT_MAX_BLOCKING_WATCHES
///     + 2
///     + waypost_consul::SHARED_WATCH_READS;
/// assert!(most <= 120, "{most}");
/// ```
pub const ORDINARY_REQUESTS: usize = 64;

/// How many re-reads the watches on a client's shared watch make at once (after a change that
/// names no service, every one of them re-reads).
///
/// ```
/// assert_eq!(waypost_consul::SHARED_WATCH_READS, 16);
/// ```
pub const SHARED_WATCH_READS: usize = 16;

impl Default for ConsulBuilder {
    fn default() -> Self {
        ConsulBuilder {
            address: None,
            ssl: false,
            token: None,
            token_file: None,
            datacenter: None,
            passing_only: true,
            tags: Vec::new(),
            stale: false,
            cached: false,
            wait: Duration::from_secs(300),
            ca_cert: None,
            client_cert: None,
            tls_server_name: None,
            default_host: None,
            request_timeout: Duration::from_secs(10),
            backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            rate_limit: (5, Duration::from_secs(3)),
            max_blocking_watches: DEFAULT_MAX_BLOCKING_WATCHES,
        }
    }
}

impl fmt::Debug for ConsulBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulBuilder")
            .field("address", &self.address.as_deref().map(redact_userinfo))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("datacenter", &self.datacenter)
            .field("passing_only", &self.passing_only)
            .field("tags", &self.tags)
            .field("stale", &self.stale)
            .field("cached", &self.cached)
            .field("wait", &self.wait)
            .field("max_blocking_watches", &self.max_blocking_watches)
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("tls_server_name", &self.tls_server_name)
            .field("default_host", &self.default_host)
            .finish_non_exhaustive()
    }
}

impl ConsulBuilder {
    /// The agent's HTTP address: `host:port`, or an `http://` / `https://` URL
    /// (default [`DEFAULT_ADDRESS`]).
    ///
    /// ```
    /// let consul = waypost_consul::Consul::builder().address("https://10.0.0.2:8501").build()?;
    /// assert!(format!("{consul:?}").contains("https://10.0.0.2:8501"));
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Whether an address given as `host:port` is reached over `https` (`CONSUL_HTTP_SSL`;
    /// default `false`). An address given as a URL says so itself.
    ///
    /// ```
    /// let consul = waypost_consul::Consul::builder().address("10.0.0.2:8501").https(true).build()?;
    /// assert!(format!("{consul:?}").contains("https://10.0.0.2:8501"));
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    pub fn https(mut self, yes: bool) -> Self {
        self.ssl = yes;
        self
    }

    /// The ACL token, sent as `X-Consul-Token`. Never logged nor shown in `Debug`. Replaces a
    /// [`token_file`](Self::token_file) given before.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self.token_file = None;
        self
    }

    /// A file holding the ACL token (`CONSUL_HTTP_TOKEN_FILE`), read by
    /// [`build`](Self::build); surrounding whitespace is ignored. Replaces a
    /// [`token`](Self::token) given before. A missing, unreadable or empty file fails `build`
    /// with [`Error::Config`] naming the file (never its content).
    ///
    /// ```
    /// use waypost_core::Error;
    /// let dir = std::env::temp_dir().join(format!("waypost-doc-token-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir).unwrap();
    /// let file = dir.join("token");
    /// std::fs::write(&file, "s3cr3t\n").unwrap();
    /// let consul = waypost_consul::Consul::builder().token_file(&file).build()?;
    /// assert!(!format!("{consul:?}").contains("s3cr3t"));
    ///
    /// std::fs::write(&file, "  \n").unwrap();
    /// let err = waypost_consul::Consul::builder().token_file(&file).build().unwrap_err();
    /// assert!(matches!(err, Error::Config { .. }) && err.to_string().contains("empty"), "{err}");
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), Error>(())
    /// ```
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self.token = None;
        self
    }

    /// The datacenter to query (default: the agent's own).
    pub fn datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = Some(dc.into());
        self
    }

    /// Whether discovery lists only instances whose checks all pass (default `true`, Consul's
    /// `?passing`: every instance listed is [`Health::Passing`](waypost_core::Health::Passing)).
    ///
    /// With `false`, instances with a warning or critical check are listed too, each with its
    /// [`Health`](waypost_core::Health): the worst status among all of the entry's checks, the
    /// node's own (`serfHealth`) included; a status this crate does not know counts as
    /// critical. A [`Balancer`](waypost_core::Balancer) over such a discovery sends traffic to
    /// passing and warning instances and never to critical ones, and a failover
    /// [tier](waypost_core::BalancerBuilder::tier) counts the critical ones against its
    /// healthy share. A watch reports a change of health as an `Updated` event.
    ///
    /// ```
    /// // Also list instances whose checks are warning or critical, marked with their health.
    /// let all = waypost_consul::Consul::builder().passing_only(false).build()?;
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    pub fn passing_only(mut self, yes: bool) -> Self {
        self.passing_only = yes;
        self
    }

    /// Discovery lists only instances carrying **all** of these tags.
    ///
    /// ```
    /// // Only instances tagged both "v2" and "canary".
    /// let canaries = waypost_consul::Consul::builder().tags(["v2", "canary"]).build()?;
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Lets any server answer discovery queries (`?stale`): survives the loss of the leader, at
    /// the price of possibly slightly old data.
    pub fn stale(mut self, yes: bool) -> Self {
        self.stale = yes;
        self
    }

    /// Lets the agent answer discovery queries from its cache (`?cached`).
    pub fn cached(mut self, yes: bool) -> Self {
        self.cached = yes;
        self
    }

    /// How long a watch's blocking query waits for a change (default 5 min, at most 10 min).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// A PEM file of CA certificates to trust for `https` (`CONSUL_CACERT`).
    pub fn ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    /// A client certificate and its private key, both PEM (`CONSUL_CLIENT_CERT`,
    /// `CONSUL_CLIENT_KEY`).
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// The name to verify the agent's certificate against, and to send as SNI, over `https`
    /// (`CONSUL_TLS_SERVER_NAME`); default: the address's host. For an agent reached by IP
    /// address, or through a name its certificate does not carry (Consul's own certificates
    /// name `server.<datacenter>.consul` or `localhost`). The connection still goes to the
    /// configured address. Plain `http` ignores it, as the Consul CLI does.
    ///
    /// ```
    /// let consul = waypost_consul::Consul::builder()
    ///     .address("https://10.0.0.2:8501")
    ///     .tls_server_name("server.dc1.consul")
    ///     .build()?;
    /// let shown = format!("{consul:?}");
    /// assert!(shown.contains("10.0.0.2:8501") && shown.contains("server.dc1.consul"), "{shown}");
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls_server_name = Some(name.into());
        self
    }

    /// The address registered for registrations that name no host (default
    /// [`waypost_core::local_ipv4`]: this machine's first IPv4 address that is neither loopback
    /// nor link-local, or `127.0.0.1` when it has none).
    ///
    /// ```
    /// // Behind NAT: announce the address clients can reach.
    /// let consul = waypost_consul::Consul::builder().default_host("203.0.113.7").build()?;
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    pub fn default_host(mut self, host: impl Into<String>) -> Self {
        self.default_host = Some(host.into());
        self
    }

    /// Time limit of one ordinary request (default 10 s). Blocking queries get `wait × 17/16`
    /// plus this.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Bounds of the jittered exponential backoff after a failure (default 100 ms to 10 s).
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = (min, max);
        self
    }

    /// How fast a watch may repeat blocking queries that bring no change: `burst` at once, then
    /// one per `refill` (default 5, then one per 3 s). Queries after a real change are not
    /// limited.
    pub fn watch_rate_limit(mut self, burst: u32, refill: Duration) -> Self {
        self.rate_limit = (burst, refill);
        self
    }

    /// How many of this client's watches (its clones' included) hold a blocking query of their
    /// own (default [`DEFAULT_MAX_BLOCKING_WATCHES`]). Each holds one connection to the agent,
    /// and an agent accepts 200 from one address by default (`limits.http_max_conns_per_client`),
    /// so that a process watching hundreds of services cannot give each its own.
    ///
    /// Every further watch shares two datacenter-wide blocking queries that tell which services
    /// changed (`/v1/health/state/any`, `/v1/catalog/services`) and re-reads its service only
    /// then, at most 16 reads at a time. A change reaches it a few milliseconds later than a
    /// blocking query of its own would bring it (the shared query's answer and one more read;
    /// 6–10 ms p50 against about 1 ms in BENCHMARKS.md); 0 makes every watch share them.
    /// The shared queries run in a task on the runtime of the watch that started them; if that
    /// runtime shuts down while other watches remain, the next of them starts the task again.
    ///
    /// ```
    /// let consul = waypost_consul::Consul::builder().max_blocking_watches(0).build()?;
    /// assert_eq!(format!("{consul:?}").contains("max_blocking_watches: 0"), true);
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    pub fn max_blocking_watches(mut self, max: usize) -> Self {
        self.max_blocking_watches = max;
        self
    }

    /// Applies the Consul CLI's environment variables that are set: `CONSUL_HTTP_ADDR`,
    /// `CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_TOKEN_FILE` (which wins over `CONSUL_HTTP_TOKEN`, as
    /// in Consul's own client), `CONSUL_HTTP_SSL`, `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`,
    /// `CONSUL_CLIENT_KEY`, `CONSUL_TLS_SERVER_NAME`. Builder calls after this one override
    /// them.
    ///
    /// ```
    /// // CONSUL_HTTP_ADDR etc. if set, but always this datacenter.
    /// let consul = waypost_consul::Consul::builder().from_env().datacenter("dc1").build()?;
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    // Named like the Consul clients' `from_env`; it layers the environment onto this builder.
    #[allow(clippy::wrong_self_convention)]
    pub fn from_env(self) -> Self {
        self.apply_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    pub(crate) fn apply_vars(mut self, var: impl Fn(&str) -> Option<String>) -> Self {
        if let Some(addr) = var("CONSUL_HTTP_ADDR") {
            self.address = Some(addr);
        }
        if let Some(token) = var("CONSUL_HTTP_TOKEN") {
            self = self.token(token);
        }
        if let Some(file) = var("CONSUL_HTTP_TOKEN_FILE") {
            self = self.token_file(file);
        }
        if let Some(ssl) = var("CONSUL_HTTP_SSL") {
            self.ssl = matches!(ssl.to_ascii_lowercase().as_str(), "1" | "true" | "yes");
        }
        if let Some(ca) = var("CONSUL_CACERT") {
            self.ca_cert = Some(ca.into());
        }
        if let (Some(cert), Some(key)) = (var("CONSUL_CLIENT_CERT"), var("CONSUL_CLIENT_KEY")) {
            self.client_cert = Some((cert.into(), key.into()));
        }
        if let Some(name) = var("CONSUL_TLS_SERVER_NAME") {
            self.tls_server_name = Some(name);
        }
        self
    }

    /// Checks the configuration and builds the client. No network I/O: the first request
    /// connects.
    ///
    /// ```
    /// use waypost_core::Error;
    /// let err = waypost_consul::Consul::builder().address("unix:///run/consul.sock").build();
    /// assert!(matches!(err, Err(Error::Config { .. })));
    /// ```
    pub fn build(self) -> Result<Consul, Error> {
        let mut base = parse_address(self.address.as_deref().unwrap_or(DEFAULT_ADDRESS), self.ssl)?;
        let from_file;
        let token = match (&self.token_file, &self.token) {
            (Some(path), _) => {
                let bytes = read(path, "ACL token file")?;
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| config(format!("ACL token file {}: not UTF-8", path.display())))?;
                from_file = text.trim().to_owned();
                if from_file.is_empty() {
                    return Err(config(format!(
                        "ACL token file {} is empty: write the token into it, or unset \
                         CONSUL_HTTP_TOKEN_FILE",
                        path.display()
                    )));
                }
                Some(&from_file)
            }
            (None, token) => token.as_ref(),
        };
        let token = match token {
            None => None,
            Some(t) if t.is_empty() => None,
            Some(t) => {
                let mut v = HeaderValue::from_str(t).map_err(|_| {
                    config("the ACL token contains characters not allowed in an HTTP header")
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        if self.wait.is_zero() {
            return Err(config("the blocking-query wait must be above zero"));
        }
        if self.request_timeout.is_zero() {
            return Err(config("the request timeout must be above zero"));
        }
        if let Some(dc) = &self.datacenter {
            if dc.is_empty() || dc.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(config(format!(
                    "datacenter {dc:?} is not a datacenter name"
                )));
            }
        }
        if let Some(host) = &self.default_host {
            if host.is_empty() || host.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(config(format!(
                    "default host {host:?} is not a host name or IP"
                )));
            }
        }
        let mut http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(3))
            // A request that finds no idle connection opens one, and keeps it if an idle one
            // came back first: without a cap, a burst of re-reads leaves the pool holding up to
            // twice the requests in flight, against an agent's limit per client address.
            .pool_max_idle_per_host(SHARED_WATCH_READS)
            .user_agent(concat!("waypost-consul/", env!("CARGO_PKG_VERSION")));
        let shown_address = redact_userinfo(base.as_str()).into_owned();
        if let (Some(name), "https") = (&self.tls_server_name, base.scheme()) {
            http = http.dns_resolver(Arc::new(server_name(&mut base, name)?));
        }
        if let Some(path) = &self.ca_cert {
            let pem = read(path, "CA certificate")?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| config(format!("CA certificate {}: not PEM: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(config(format!(
                    "CA certificate {}: no certificate in the file",
                    path.display()
                )));
            }
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        if let Some((cert, key)) = &self.client_cert {
            let mut pem = read(cert, "client certificate")?;
            pem.push(b'\n');
            pem.extend(read(key, "client key")?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                config(format!(
                    "client certificate {} / key {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
            http = http.identity(identity);
        }
        let http = http
            .build()
            .map_err(|e| config(format!("cannot set up the HTTP client: {e}")))?;
        let api = Api {
            http,
            base,
            token,
            datacenter: self.datacenter.clone(),
            request_timeout: self.request_timeout,
            default_host: self.default_host.clone(),
            detected_host: Default::default(),
            backoff: self.backoff,
            ordinary: tokio::sync::Semaphore::new(ORDINARY_REQUESTS),
        };
        Ok(Consul::new(Arc::new(api), shown_address, self))
    }

    pub(crate) fn wait_clamped(&self) -> Duration {
        self.wait.min(MAX_WAIT)
    }
}

/// Points `base` at the TLS server name `name` (what rustls verifies and sends as SNI) and
/// returns the resolver that sends connections for that name to the host `base` had.
fn server_name(base: &mut Url, name: &str) -> Result<ServerNameResolver, Error> {
    let bad = || {
        config(format!(
            "TLS server name {name:?} is not a host name (CONSUL_TLS_SERVER_NAME or \
             .tls_server_name())"
        ))
    };
    if name.is_empty()
        || name.contains(|c: char| c.is_whitespace() || c.is_control() || "/:@?#[]".contains(c))
    {
        return Err(bad());
    }
    // An IPv6 host comes in brackets, which a lookup does not take.
    let real = match base.host_str() {
        Some(h) => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
        None => return Err(config("the agent address names no host")),
    };
    base.set_host(Some(name)).map_err(|_| bad())?;
    Ok(ServerNameResolver {
        name: name.to_ascii_lowercase(),
        real,
    })
}

/// Resolves the TLS server name to the configured agent host; any other name as usual.
struct ServerNameResolver {
    name: String,
    real: String,
}

impl reqwest::dns::Resolve for ServerNameResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = if name.as_str().eq_ignore_ascii_case(&self.name) {
            self.real.clone()
        } else {
            name.as_str().to_owned()
        };
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port in.
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn config(message: impl Into<String>) -> Error {
    Error::Config {
        backend: BACKEND,
        message: message.into(),
    }
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| config(format!("cannot read {what} {}: {e}", path.display())))
}

/// `host:port`, `http://host:port` or `https://host:port[/prefix]` → the base URL.
fn parse_address(address: &str, ssl: bool) -> Result<Url, Error> {
    let address = address.trim();
    // Credentials in the URL (`http://user:password@host`) stay out of error messages.
    let shown = redact_userinfo(address);
    if address.is_empty() {
        return Err(config(
            "the agent address is empty; give host:port or an http(s) URL",
        ));
    }
    let with_scheme = if address.contains("://") {
        address.to_owned()
    } else if ssl {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| {
        config(format!(
            "agent address {shown:?} is not host:port or an http(s) URL: {e}"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(config(format!(
            "agent address {shown:?}: scheme {:?} is not supported (use http or https)",
            url.scheme()
        )));
    }
    if url.host_str().map_or(true, str::is_empty) {
        return Err(config(format!("agent address {shown:?} names no host")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(config(format!(
            "agent address {shown:?} must not have a query or fragment"
        )));
    }
    Ok(url)
}

/// `address` with the user information of its authority (`user:password@`, which reqwest sends
/// as basic auth) replaced by `<redacted>`, for `Debug` output and error messages.
pub(crate) fn redact_userinfo(address: &str) -> Cow<'_, str> {
    let start = address.find("://").map_or(0, |i| i + 3);
    let rest = &address[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => Cow::Owned(format!("{}<redacted>{}", &address[..start], &rest[at..])),
        None => Cow::Borrowed(address),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn addresses_are_parsed_the_cli_way() {
        let ok = |a: &str, ssl: bool| parse_address(a, ssl).unwrap().to_string();
        assert_eq!(ok("127.0.0.1:8500", false), "http://127.0.0.1:8500/");
        assert_eq!(ok("consul:8501", true), "https://consul:8501/");
        assert_eq!(
            ok("https://c.example:8501", false),
            "https://c.example:8501/"
        );
        assert_eq!(ok("http://[::1]:8500", false), "http://[::1]:8500/");
        for bad in [
            "",
            "unix:///var/run/consul.sock",
            "http://",
            "ftp://x:1",
            "http://h:1/?a=b",
        ] {
            let err = parse_address(bad, false).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn environment_variables_are_read_and_builder_calls_win() {
        let vars: HashMap<&str, &str> = [
            ("CONSUL_HTTP_ADDR", "10.1.2.3:8501"),
            ("CONSUL_HTTP_TOKEN", "tok"),
            ("CONSUL_HTTP_SSL", "true"),
            ("CONSUL_CACERT", "/ca.pem"),
            ("CONSUL_CLIENT_CERT", "/c.pem"),
            ("CONSUL_CLIENT_KEY", "/k.pem"),
        ]
        .into();
        let b = ConsulBuilder::default().apply_vars(|n| vars.get(n).map(|v| v.to_string()));
        assert_eq!(b.address.as_deref(), Some("10.1.2.3:8501"));
        assert_eq!(b.token.as_deref(), Some("tok"));
        assert!(b.ssl);
        assert_eq!(b.ca_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            b.client_cert,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        let b = b.address("127.0.0.1:1");
        assert_eq!(b.address.as_deref(), Some("127.0.0.1:1"));
        // The missing CA file is reported as a configuration error naming the file.
        let err = b.build().unwrap_err();
        assert!(err.to_string().contains("/ca.pem"), "{err}");
    }

    #[test]
    fn the_token_file_wins_over_the_token_and_the_tls_server_name_is_read() {
        let dir = std::env::temp_dir().join(format!("waypost-consul-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  from-the-file\n").unwrap();
        let path = file.to_str().unwrap().to_owned();
        let vars: HashMap<&str, &str> = [
            ("CONSUL_HTTP_TOKEN", "from-the-variable"),
            ("CONSUL_HTTP_TOKEN_FILE", path.as_str()),
            ("CONSUL_TLS_SERVER_NAME", "server.dc1.consul"),
        ]
        .into();
        let b = ConsulBuilder::default().apply_vars(|n| vars.get(n).map(|v| v.to_string()));
        assert_eq!(b.token_file.as_deref(), Some(file.as_path()));
        assert_eq!(b.token, None);
        assert_eq!(b.tls_server_name.as_deref(), Some("server.dc1.consul"));
        let consul = b.clone().build().unwrap();
        assert_eq!(
            consul.api().token.as_ref().map(|t| t.as_bytes().to_vec()),
            Some(b"from-the-file".to_vec()),
            "read and trimmed"
        );
        assert!(!format!("{consul:?}").contains("from-the-file"));
        // A builder call after the environment wins, either way round.
        let consul = b.clone().token("from-code").build().unwrap();
        assert_eq!(
            consul.api().token.as_ref().map(|t| t.as_bytes().to_vec()),
            Some(b"from-code".to_vec())
        );
        // A file that is missing or empty is a configuration error naming it, not no token.
        std::fs::write(&file, "\n").unwrap();
        let err = b.clone().build().unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        assert!(
            err.to_string().contains("empty") && err.to_string().contains(&path),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let err = b.build().unwrap_err();
        assert!(err.to_string().contains(&path), "{err}");
    }

    #[test]
    fn a_tls_server_name_applies_to_https_only_and_must_be_a_host_name() {
        let https = || ConsulBuilder::default().address("https://127.0.0.1:8501");
        let consul = https()
            .tls_server_name("server.dc1.consul")
            .build()
            .unwrap();
        assert_eq!(
            consul.api().base.as_str(),
            "https://server.dc1.consul:8501/"
        );
        let shown = format!("{consul:?}");
        assert!(
            shown.contains("\"https://127.0.0.1:8501/\""),
            "the real address: {shown}"
        );
        let plain = ConsulBuilder::default()
            .address("http://127.0.0.1:8500")
            .tls_server_name("server.dc1.consul")
            .build()
            .unwrap();
        assert_eq!(plain.api().base.as_str(), "http://127.0.0.1:8500/");
        for bad in ["", "a b", "h:1", "a/b", "[::1]"] {
            let err = https().tls_server_name(bad).build().unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn token_is_redacted_and_bad_values_are_config_errors() {
        let b = ConsulBuilder::default().token("very-secret-token");
        assert!(!format!("{b:?}").contains("very-secret-token"));
        let consul = b.build().unwrap();
        assert!(!format!("{consul:?}").contains("very-secret-token"));

        let bad_token = ConsulBuilder::default().token("a\nb").build().unwrap_err();
        assert!(matches!(bad_token, Error::Config { .. }));
        assert!(!bad_token.to_string().contains("a\nb"));
        let zero_wait = ConsulBuilder::default().wait(Duration::ZERO).build();
        assert!(matches!(zero_wait, Err(Error::Config { .. })));
        let bad_dc = ConsulBuilder::default().datacenter("d c").build();
        assert!(matches!(bad_dc, Err(Error::Config { .. })));
    }

    #[test]
    fn credentials_in_the_address_are_redacted() {
        assert_eq!(
            redact_userinfo("https://ops:pa55w0rd@consul:8501/x@y"),
            "https://<redacted>@consul:8501/x@y"
        );
        assert_eq!(
            redact_userinfo("tok3n@consul:8500"),
            "<redacted>@consul:8500"
        );
        assert_eq!(redact_userinfo("http://consul:8500"), "http://consul:8500");
        let b = ConsulBuilder::default().address("http://ops:pa55w0rd@127.0.0.1:8500");
        assert!(!format!("{b:?}").contains("pa55w0rd"), "{b:?}");
        let consul = b.build().unwrap();
        let shown = format!("{consul:?}");
        assert!(
            !shown.contains("pa55w0rd") && shown.contains("127.0.0.1:8500"),
            "{shown}"
        );
        let err = ConsulBuilder::default()
            .address("ftp://ops:pa55w0rd@127.0.0.1:8500")
            .build()
            .unwrap_err();
        assert!(!err.to_string().contains("pa55w0rd"), "{err}");
        assert!(
            err.to_string().contains("<redacted>@127.0.0.1:8500"),
            "{err}"
        );
    }

    #[test]
    fn unreadable_or_bad_pem_is_a_config_error() {
        let dir = std::env::temp_dir().join(format!("waypost-consul-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let err = ConsulBuilder::default()
            .ca_cert(&garbage)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        let err = ConsulBuilder::default()
            .client_cert(&garbage, &garbage)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
