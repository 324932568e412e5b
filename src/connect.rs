//! One call from configuration to a backend: [`connect`]`("consul://127.0.0.1:8500?dc=dc1")`.
//!
//! A [`BackendConfig`] is a typed backend URL: it parses ([`FromStr`]) and prints
//! ([`Display`](fmt::Display)) the same text, and [`connect`](BackendConfig::connect)s to a
//! [`Backend`], a registry and a discovery of whichever backend the URL names.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use waypost_core::{
    async_trait, Discovery, Error, Registration, RegistrationHandle, Registry, ServiceInstance,
    ServiceName, Watch,
};

/// The schemes [`BackendConfig`] knows, each with the Cargo feature that compiles it in.
const SCHEMES: &[(&str, bool)] = &[
    ("memory", cfg!(feature = "memory")),
    ("consul", cfg!(feature = "consul")),
    ("etcd", cfg!(feature = "etcd")),
];

/// Parses `url` as a [`BackendConfig`] and connects to it.
///
/// | URL | backend |
/// |---|---|
/// | `memory://` | a new in-process registry ([`memory::Memory`](crate::memory::Memory)) |
/// | `consul://127.0.0.1:8500?dc=dc1` | a Consul agent ([`ConsulConfig`] lists the parameters) |
/// | `consul://` | the agent `CONSUL_HTTP_ADDR` names, else `127.0.0.1:8500` |
/// | `etcd://h1:2379,h2:2379/prefix` | an etcd cluster ([`EtcdConfig`] lists the parameters) |
/// | `etcd://` | the endpoints `ETCD_ENDPOINTS` names, else `127.0.0.1:2379` |
///
/// Each scheme needs the Cargo feature of its name (`memory` is on by default); a URL whose
/// feature is off fails with [`ConfigError::FeatureDisabled`], which names it. The backend's
/// environment variables keep working beneath the URL: what the URL says wins over them.
///
/// ```
/// use waypost::{Discovery, Registration, Registry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = waypost::connect("memory://").await?;
/// assert_eq!(backend.name(), "memory");
/// let handle = backend
///     .register(Registration::builder("users", "u1").port(8080).build()?)
///     .await?;
/// assert_eq!(backend.instances(&"users".parse()?).await?.len(), 1);
/// handle.shutdown().await?;
///
/// let err = waypost::connect("zookeeper://10.0.0.1:2181").await.unwrap_err();
/// assert!(err.to_string().contains("memory, consul, etcd"), "{err}");
/// # Ok(())
/// # }
/// ```
pub async fn connect(url: &str) -> Result<Backend, ConnectError> {
    let config: BackendConfig = url.parse()?;
    config.connect().await
}

/// Where registrations go and discovery comes from: a backend and its settings, written as a
/// URL.
///
/// `FromStr` and `Display` are each other's inverse: `config.to_string().parse()` gives
/// `config` back (except for secrets given in code — [`ConsulConfig::token`],
/// [`EtcdConfig::auth`] — which a URL never carries and `Display` never writes). Each variant
/// exists with the Cargo feature of its name.
///
/// ```
/// use waypost::BackendConfig;
///
/// let config: BackendConfig = "consul://10.0.0.2:8500?dc=eu-1&passing=false".parse()?;
/// let BackendConfig::Consul(consul) = &config else { panic!("{config}") };
/// assert_eq!(consul.get_datacenter(), Some("eu-1"));
/// assert_eq!(config.to_string(), "consul://10.0.0.2:8500?dc=eu-1&passing=false");
///
/// let err = "consul://10.0.0.2:8500?datacenter=eu-1".parse::<BackendConfig>().unwrap_err();
/// assert!(err.to_string().contains("dc"), "the error lists the parameters: {err}");
/// # Ok::<(), waypost::ConfigError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendConfig {
    /// `memory://`: a new in-process registry on each [`connect`](Self::connect) (feature
    /// `memory`). Clone the [`Backend`] to share one.
    #[cfg(feature = "memory")]
    Memory,
    /// `consul://...`: a Consul agent (feature `consul`).
    #[cfg(feature = "consul")]
    Consul(ConsulConfig),
    /// `etcd://...`: an etcd cluster (feature `etcd`).
    #[cfg(feature = "etcd")]
    Etcd(EtcdConfig),
}

impl BackendConfig {
    /// The scheme: `memory`, `consul` or `etcd` (also [`Backend::name`] once connected).
    ///
    /// ```
    /// let config: waypost::BackendConfig = "memory://".parse()?;
    /// assert_eq!(config.name(), "memory");
    /// # Ok::<(), waypost::ConfigError>(())
    /// ```
    pub fn name(&self) -> &'static str {
        match *self {
            #[cfg(feature = "memory")]
            BackendConfig::Memory => "memory",
            #[cfg(feature = "consul")]
            BackendConfig::Consul(_) => "consul",
            #[cfg(feature = "etcd")]
            BackendConfig::Etcd(_) => "etcd",
        }
    }

    /// Builds the backend's client and connects: the backend's own builder checks the
    /// settings ([`Error::Config`]), and etcd reads once, so that an unreachable cluster
    /// ([`Error::Unavailable`]) or refused credentials ([`Error::PermissionDenied`]) show here.
    /// Consul's client connects on its first request: an unreachable agent or a refused token
    /// shows in the first call or watch event.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config: waypost::BackendConfig = "memory://".parse()?;
    /// let backend = config.connect().await?;
    /// assert!(backend.as_memory().is_some());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(&self) -> Result<Backend, ConnectError> {
        match *self {
            #[cfg(feature = "memory")]
            BackendConfig::Memory => Ok(Backend::from(crate::memory::Memory::new())),
            #[cfg(feature = "consul")]
            BackendConfig::Consul(ref c) => Ok(Backend::from(c.to_builder().build()?)),
            #[cfg(feature = "etcd")]
            BackendConfig::Etcd(ref e) => Ok(Backend::from(e.to_builder().connect().await?)),
        }
    }
}

impl FromStr for BackendConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let url = RawUrl::split(s)?;
        match url.scheme.as_str() {
            #[cfg(feature = "memory")]
            "memory" => {
                url.nothing_but_the_scheme("memory")?;
                Ok(BackendConfig::Memory)
            }
            #[cfg(feature = "consul")]
            "consul" => ConsulConfig::from_url(url).map(BackendConfig::Consul),
            #[cfg(feature = "etcd")]
            "etcd" => EtcdConfig::from_url(url).map(BackendConfig::Etcd),
            other => Err(match SCHEMES.iter().find(|(name, _)| *name == other) {
                Some((name, _)) => ConfigError::FeatureDisabled { scheme: name },
                None => ConfigError::UnknownScheme {
                    scheme: other.to_owned(),
                },
            }),
        }
    }
}

impl fmt::Display for BackendConfig {
    #[cfg_attr(
        not(any(feature = "memory", feature = "consul", feature = "etcd")),
        allow(unused_variables)
    )]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            #[cfg(feature = "memory")]
            BackendConfig::Memory => f.write_str("memory://"),
            #[cfg(feature = "consul")]
            BackendConfig::Consul(ref c) => fmt::Display::fmt(c, f),
            #[cfg(feature = "etcd")]
            BackendConfig::Etcd(ref e) => fmt::Display::fmt(e, f),
        }
    }
}

impl fmt::Debug for BackendConfig {
    // The URL form: it never holds a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendConfig({self})")
    }
}

/// Why a backend URL was refused.
///
/// ```
/// use waypost::{BackendConfig, ConfigError};
/// let err = "consul://ops:hunter2@10.0.0.2:8500".parse::<BackendConfig>().unwrap_err();
/// assert!(matches!(err, ConfigError::Credentials { .. }));
/// assert!(!err.to_string().contains("hunter2"), "{err}");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not `<scheme>://...`.
    NotAUrl {
        /// The text given.
        input: String,
    },
    /// A scheme this crate does not know.
    UnknownScheme {
        /// The scheme given.
        scheme: String,
    },
    /// A scheme of this crate whose Cargo feature (of the same name) is off.
    FeatureDisabled {
        /// The scheme, which is also its feature's name.
        scheme: &'static str,
    },
    /// A user name or password in the URL: secrets stay out of URLs, which end up in logs
    /// and process lists.
    Credentials {
        /// The scheme.
        scheme: &'static str,
    },
    /// Something the scheme has no place for (a host for `memory://`, a path for
    /// `consul://`, a fragment).
    Unexpected {
        /// The scheme.
        scheme: &'static str,
        /// What it was: "a host", "a path", "a fragment", "parameters".
        what: &'static str,
        /// The text.
        text: String,
    },
    /// A host or `host:port` that is not one.
    BadAddress {
        /// The scheme.
        scheme: &'static str,
        /// The text given.
        address: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A query parameter the scheme does not take.
    UnknownParameter {
        /// The scheme.
        scheme: &'static str,
        /// The parameter given.
        name: String,
        /// The parameters it takes.
        known: &'static [&'static str],
    },
    /// A parameter given twice (other than a list such as Consul's `tag`).
    RepeatedParameter {
        /// The scheme.
        scheme: &'static str,
        /// The parameter.
        name: &'static str,
    },
    /// A parameter's value that is not of its kind.
    BadValue {
        /// The scheme.
        scheme: &'static str,
        /// The parameter.
        name: &'static str,
        /// The value given.
        value: String,
        /// What the parameter takes.
        expected: &'static str,
    },
    /// A `%` not followed by two hexadecimal digits, or an escape that is not UTF-8.
    BadEscape {
        /// The text around it.
        text: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let schemes = || {
            SCHEMES
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            ConfigError::NotAUrl { input } => write!(
                f,
                "{input:?} is not a backend URL: write <scheme>://..., the scheme one of {}",
                schemes()
            ),
            ConfigError::UnknownScheme { scheme } => write!(
                f,
                "unknown backend scheme {scheme:?}: use one of {}",
                schemes()
            ),
            ConfigError::FeatureDisabled { scheme } => write!(
                f,
                "the {scheme} backend is not compiled in: enable waypost's Cargo feature \
                 \"{scheme}\""
            ),
            ConfigError::Credentials { scheme } => write!(
                f,
                "{scheme}:// URL: a user name or password does not belong in a URL (it ends up \
                 in logs); {}",
                match *scheme {
                    "consul" =>
                        "use token_file=<path>, CONSUL_HTTP_TOKEN_FILE or CONSUL_HTTP_TOKEN",
                    _ => "give credentials in code",
                }
            ),
            ConfigError::Unexpected { scheme, what, text } => {
                write!(f, "{scheme}:// URL: {what} {text:?} has no meaning here")
            }
            ConfigError::BadAddress {
                scheme,
                address,
                problem,
            } => write!(f, "{scheme}:// URL: address {address:?}: {problem}"),
            ConfigError::UnknownParameter {
                scheme,
                name,
                known,
            } => {
                write!(f, "{scheme}:// URL: unknown parameter {name:?}; ")?;
                if known.is_empty() {
                    f.write_str("it takes none")
                } else {
                    write!(f, "it takes {}", known.join(", "))
                }
            }
            ConfigError::RepeatedParameter { scheme, name } => {
                write!(f, "{scheme}:// URL: parameter {name:?} is given twice")
            }
            ConfigError::BadValue {
                scheme,
                name,
                value,
                expected,
            } => write!(f, "{scheme}:// URL: {name}={value:?} is not {expected}"),
            ConfigError::BadEscape { text } => write!(
                f,
                "{text:?}: a % must start an escape of two hexadecimal digits (%25 is a %), \
                 of UTF-8 text"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Why [`connect`] or [`BackendConfig::connect`] failed.
///
/// ```
/// use waypost::ConnectError;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let err = waypost::connect("memory://somewhere").await.unwrap_err();
/// assert!(matches!(err, ConnectError::Config(_)));
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL was refused before anything connected.
    Config(ConfigError),
    /// The backend refused the settings ([`Error::Config`]), could not be reached
    /// ([`Error::Unavailable`]) or refused the credentials ([`Error::PermissionDenied`]).
    Backend(Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Config(e) => fmt::Display::fmt(e, f),
            ConnectError::Backend(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Config(e) => Some(e),
            ConnectError::Backend(e) => Some(e),
        }
    }
}

impl From<ConfigError> for ConnectError {
    fn from(e: ConfigError) -> Self {
        ConnectError::Config(e)
    }
}

impl From<Error> for ConnectError {
    fn from(e: Error) -> Self {
        ConnectError::Backend(e)
    }
}

/// A connected backend: a [`Registry`] and a [`Discovery`] (it is both), and the backend's own
/// client for what only that backend offers.
///
/// Cheap to clone; clones share the client (and, for `memory://`, the registry).
///
/// ```
/// use std::time::Duration;
/// use waypost::{Balancer, Registration, Registry, ServiceName};
/// use waypost::strategies::RoundRobin;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = waypost::connect("memory://").await?;
/// let handle = backend
///     .register(Registration::builder("users", "u1").host("10.0.0.1").port(80).build()?)
///     .await?;
/// let users: ServiceName = "users".parse()?;
/// let balancer = Balancer::watch(&backend, &users, RoundRobin::new());
/// balancer.ready_within(Duration::from_secs(5)).await?;
/// assert_eq!(balancer.pick()?.instance().id().as_str(), "u1");
/// # drop(handle);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Backend {
    registry: Arc<dyn Registry>,
    discovery: Arc<dyn Discovery>,
    client: Client,
}

#[derive(Clone)]
enum Client {
    #[cfg(feature = "memory")]
    Memory(crate::memory::Memory),
    #[cfg(feature = "consul")]
    Consul(crate::consul::Consul),
    #[cfg(feature = "etcd")]
    Etcd(crate::etcd::Etcd),
}

impl Backend {
    /// The backend's name: `memory`, `consul` or `etcd`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// assert_eq!(waypost::connect("memory://").await?.name(), "memory");
    /// # Ok(())
    /// # }
    /// ```
    pub fn name(&self) -> &'static str {
        match self.client {
            #[cfg(feature = "memory")]
            Client::Memory(_) => "memory",
            #[cfg(feature = "consul")]
            Client::Consul(_) => "consul",
            #[cfg(feature = "etcd")]
            Client::Etcd(_) => "etcd",
        }
    }

    /// The registry, shared.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let backend = waypost::connect("memory://").await?;
    /// let registry: std::sync::Arc<dyn waypost::Registry> = backend.registry();
    /// let handle = registry
    ///     .register(waypost::Registration::builder("users", "u1").port(80).build()?)
    ///     .await?;
    /// assert_eq!(handle.instance().host(), "127.0.0.1");
    /// # Ok(())
    /// # }
    /// ```
    pub fn registry(&self) -> Arc<dyn Registry> {
        self.registry.clone()
    }

    /// The discovery, shared.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let backend = waypost::connect("memory://").await?;
    /// let discovery: std::sync::Arc<dyn waypost::Discovery> = backend.discovery();
    /// assert!(discovery.instances(&"users".parse()?).await?.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn discovery(&self) -> Arc<dyn Discovery> {
        self.discovery.clone()
    }

    /// The in-process registry, for `memory://`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// assert!(waypost::connect("memory://").await?.as_memory().is_some());
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "memory")]
    pub fn as_memory(&self) -> Option<&crate::memory::Memory> {
        #[allow(unreachable_patterns)]
        match &self.client {
            Client::Memory(m) => Some(m),
            _ => None,
        }
    }

    /// The Consul client, for `consul://`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Builds the client only: Consul's first request connects.
    /// let backend = waypost::connect("consul://127.0.0.1:8500").await?;
    /// assert!(backend.as_consul().is_some() && backend.as_memory().is_none());
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "consul")]
    pub fn as_consul(&self) -> Option<&crate::consul::Consul> {
        #[allow(unreachable_patterns)]
        match &self.client {
            Client::Consul(c) => Some(c),
            _ => None,
        }
    }

    /// The etcd client, for `etcd://` (whose connect needs a running cluster, so here only
    /// the other case).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// assert!(waypost::connect("memory://").await?.as_etcd().is_none());
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "etcd")]
    pub fn as_etcd(&self) -> Option<&crate::etcd::Etcd> {
        #[allow(unreachable_patterns)]
        match &self.client {
            Client::Etcd(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(feature = "memory")]
impl From<crate::memory::Memory> for Backend {
    fn from(m: crate::memory::Memory) -> Self {
        Backend {
            registry: Arc::new(m.clone()),
            discovery: Arc::new(m.clone()),
            client: Client::Memory(m),
        }
    }
}

#[cfg(feature = "consul")]
impl From<crate::consul::Consul> for Backend {
    fn from(c: crate::consul::Consul) -> Self {
        Backend {
            registry: Arc::new(c.clone()),
            discovery: Arc::new(c.clone()),
            client: Client::Consul(c),
        }
    }
}

#[cfg(feature = "etcd")]
impl From<crate::etcd::Etcd> for Backend {
    fn from(e: crate::etcd::Etcd) -> Self {
        Backend {
            registry: Arc::new(e.clone()),
            discovery: Arc::new(e.clone()),
            client: Client::Etcd(e),
        }
    }
}

impl fmt::Debug for Backend {
    #[cfg_attr(
        not(any(feature = "memory", feature = "consul", feature = "etcd")),
        allow(unused_variables)
    )]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.client {
            #[cfg(feature = "memory")]
            Client::Memory(ref m) => f.debug_tuple("Backend").field(m).finish(),
            #[cfg(feature = "consul")]
            Client::Consul(ref c) => f.debug_tuple("Backend").field(c).finish(),
            #[cfg(feature = "etcd")]
            Client::Etcd(ref e) => f.debug_tuple("Backend").field(e).finish(),
        }
    }
}

#[async_trait]
impl Registry for Backend {
    async fn register(&self, registration: Registration) -> Result<RegistrationHandle, Error> {
        self.registry.register(registration).await
    }
}

#[async_trait]
impl Discovery for Backend {
    async fn instances(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
        self.discovery.instances(service).await
    }

    fn watch(&self, service: &ServiceName) -> Watch {
        self.discovery.watch(service)
    }
}

/// `consul://[host[:port]][?parameters]`: a Consul agent (feature `consul`).
///
/// Without a host, the agent `CONSUL_HTTP_ADDR` names, else `127.0.0.1:8500`; without a port,
/// 8500 (8501 with `scheme=https`). The Consul CLI's variables apply beneath the URL
/// (`CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_HTTP_SSL`, `CONSUL_CACERT`,
/// `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`, `CONSUL_TLS_SERVER_NAME`; see
/// [`ConsulBuilder::from_env`](crate::consul::ConsulBuilder::from_env)); what the URL says
/// wins.
///
/// | parameter | value | builder method |
/// |---|---|---|
/// | `scheme` | `http` (default) or `https` | [`https`](Self::https) |
/// | `dc` | the datacenter to discover in (default: the agent's) | [`datacenter`](Self::datacenter) |
/// | `passing` | `true` (default): passing instances only; `false`: all, with their health | [`passing_only`](Self::passing_only) |
/// | `tag` | only instances with this tag (repeatable: all of them) | [`tag`](Self::tag) |
/// | `stale` | `true`: any server answers | [`stale`](Self::stale) |
/// | `cached` | `true`: the agent's cache answers | [`cached`](Self::cached) |
/// | `wait` | blocking-query wait, e.g. `60s`, `5m` | [`wait`](Self::wait) |
/// | `token_file` | a file holding the ACL token | [`token_file`](Self::token_file) |
/// | `ca_cert` | a PEM file of CAs to trust | [`ca_cert`](Self::ca_cert) |
/// | `client_cert`, `client_key` | PEM files of a client certificate and its key (both) | [`client_cert`](Self::client_cert) |
/// | `tls_server_name` | the name to verify the agent's certificate against | [`tls_server_name`](Self::tls_server_name) |
/// | `default_host` | the address of registrations that name no host | [`default_host`](Self::default_host) |
/// | `max_blocking_watches` | watches with a blocking query of their own (default 32); the rest share two | [`max_blocking_watches`](Self::max_blocking_watches) |
///
/// Values are percent-encoded where they hold `&`, `=`, `%`, `#` or spaces. An ACL token
/// itself never goes into a URL: give a `token_file`, the variables, or
/// [`token`](Self::token) in code.
///
/// ```
/// use std::time::Duration;
/// use waypost::{BackendConfig, ConsulConfig};
///
/// let typed = ConsulConfig::new()
///     .address("10.0.0.2:8501")
///     .https(true)
///     .datacenter("dc2")
///     .passing_only(false)
///     .tag("v2")
///     .wait(Duration::from_secs(60))
///     .token_file("/run/secrets/consul token");
/// let url = "consul://10.0.0.2:8501?scheme=https&dc=dc2&passing=false&tag=v2&wait=1m&token_file=/run/secrets/consul%20token";
/// assert_eq!(typed.to_string(), url);
/// assert_eq!(url.parse::<BackendConfig>()?, BackendConfig::Consul(typed));
/// # Ok::<(), waypost::ConfigError>(())
/// ```
#[cfg(feature = "consul")]
#[derive(Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct ConsulConfig {
    address: Option<String>,
    https: Option<bool>,
    datacenter: Option<String>,
    passing_only: Option<bool>,
    tags: Vec<String>,
    stale: Option<bool>,
    cached: Option<bool>,
    wait: Option<Duration>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
    tls_server_name: Option<String>,
    default_host: Option<String>,
    max_blocking_watches: Option<usize>,
}

#[cfg(feature = "consul")]
const CONSUL_PARAMETERS: &[&str] = &[
    "scheme",
    "dc",
    "passing",
    "tag",
    "stale",
    "cached",
    "wait",
    "token_file",
    "ca_cert",
    "client_cert",
    "client_key",
    "tls_server_name",
    "default_host",
    "max_blocking_watches",
];

#[cfg(feature = "consul")]
impl ConsulConfig {
    /// Nothing set: the environment's agent, else Consul's defaults.
    ///
    /// ```
    /// assert_eq!(waypost::ConsulConfig::new().to_string(), "consul://");
    /// ```
    pub fn new() -> Self {
        ConsulConfig::default()
    }

    /// The agent: `host:port` (a bare host gets port 8500, or 8501 over https). An
    /// `http://` or `https://` prefix sets [`https`](Self::https) too.
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().address("https://consul.internal:8501");
    /// assert_eq!(c.to_string(), "consul://consul.internal:8501?scheme=https");
    /// ```
    pub fn address(mut self, address: impl Into<String>) -> Self {
        let address: String = address.into();
        let (https, rest) = if let Some(rest) = address.strip_prefix("https://") {
            (Some(true), rest)
        } else if let Some(rest) = address.strip_prefix("http://") {
            (Some(false), rest)
        } else {
            (None, address.as_str())
        };
        if https.is_some() {
            self.https = https;
        }
        self.address = Some(rest.trim_end_matches('/').to_owned());
        self
    }

    /// The agent address, as given (`host:port`).
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().address("10.0.0.2:8500");
    /// assert_eq!(c.get_address(), Some("10.0.0.2:8500"));
    /// ```
    pub fn get_address(&self) -> Option<&str> {
        self.address.as_deref()
    }

    /// Over `https` (`scheme=https`).
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().address("h:8501").https(true);
    /// assert_eq!(c.to_string(), "consul://h:8501?scheme=https");
    /// ```
    pub fn https(mut self, yes: bool) -> Self {
        self.https = Some(yes);
        self
    }

    /// The datacenter to discover in (`dc=`). Registrations always go to the agent's own.
    ///
    /// ```
    /// assert_eq!(waypost::ConsulConfig::new().datacenter("dc2").to_string(), "consul://?dc=dc2");
    /// ```
    pub fn datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = Some(dc.into());
        self
    }

    /// The datacenter to discover in, if one is set.
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().datacenter("dc2");
    /// assert_eq!(c.get_datacenter(), Some("dc2"));
    /// ```
    pub fn get_datacenter(&self) -> Option<&str> {
        self.datacenter.as_deref()
    }

    /// Passing instances only (`true`, the default) or all with their health (`passing=false`;
    /// see [`ConsulBuilder::passing_only`](crate::consul::ConsulBuilder::passing_only)).
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().passing_only(false);
    /// assert_eq!(c.to_string(), "consul://?passing=false");
    /// ```
    pub fn passing_only(mut self, yes: bool) -> Self {
        self.passing_only = Some(yes);
        self
    }

    /// Only instances carrying `tag` (`tag=`); several calls: all of the tags.
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().tag("v2").tag("canary");
    /// assert_eq!(c.to_string(), "consul://?tag=v2&tag=canary");
    /// ```
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Any server may answer discovery queries (`stale=true`).
    ///
    /// ```
    /// assert_eq!(waypost::ConsulConfig::new().stale(true).to_string(), "consul://?stale=true");
    /// ```
    pub fn stale(mut self, yes: bool) -> Self {
        self.stale = Some(yes);
        self
    }

    /// The agent's cache may answer discovery queries (`cached=true`).
    ///
    /// ```
    /// assert_eq!(waypost::ConsulConfig::new().cached(true).to_string(), "consul://?cached=true");
    /// ```
    pub fn cached(mut self, yes: bool) -> Self {
        self.cached = Some(yes);
        self
    }

    /// How long a watch's blocking query waits (`wait=`).
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().wait(std::time::Duration::from_secs(120));
    /// assert_eq!(c.to_string(), "consul://?wait=2m");
    /// ```
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// The ACL token itself. Never written by `Display` nor `Debug`: a URL never carries it.
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().address("10.0.0.2:8500").token("s3cr3t");
    /// assert_eq!(c.to_string(), "consul://10.0.0.2:8500");
    /// assert!(!format!("{c:?}").contains("s3cr3t"));
    /// ```
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret(token.into()));
        self.token_file = None;
        self
    }

    /// A file holding the ACL token (`token_file=`), read on connect; it wins over
    /// `CONSUL_HTTP_TOKEN` and `CONSUL_HTTP_TOKEN_FILE`.
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().token_file("/run/secrets/consul");
    /// assert_eq!(c.to_string(), "consul://?token_file=/run/secrets/consul");
    /// ```
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self.token = None;
        self
    }

    /// A PEM file of CA certificates to trust (`ca_cert=`).
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().ca_cert("/etc/consul/ca.pem");
    /// assert_eq!(c.to_string(), "consul://?ca_cert=/etc/consul/ca.pem");
    /// ```
    pub fn ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    /// A client certificate and its key, both PEM files (`client_cert=`, `client_key=`).
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().client_cert("/c.pem", "/k.pem");
    /// assert_eq!(c.to_string(), "consul://?client_cert=/c.pem&client_key=/k.pem");
    /// ```
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// The name to verify the agent's certificate against, sent as SNI
    /// (`tls_server_name=`; see
    /// [`ConsulBuilder::tls_server_name`](crate::consul::ConsulBuilder::tls_server_name)).
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().tls_server_name("server.dc1.consul");
    /// assert_eq!(c.to_string(), "consul://?tls_server_name=server.dc1.consul");
    /// ```
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls_server_name = Some(name.into());
        self
    }

    /// The address of registrations that name no host (`default_host=`).
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().default_host("203.0.113.7");
    /// assert_eq!(c.to_string(), "consul://?default_host=203.0.113.7");
    /// ```
    pub fn default_host(mut self, host: impl Into<String>) -> Self {
        self.default_host = Some(host.into());
        self
    }

    /// How many watches hold a blocking query of their own (`max_blocking_watches=`; see
    /// [`ConsulBuilder::max_blocking_watches`](crate::consul::ConsulBuilder::max_blocking_watches)).
    ///
    /// ```
    /// let c = waypost::ConsulConfig::new().max_blocking_watches(8);
    /// assert_eq!(c.to_string(), "consul://?max_blocking_watches=8");
    /// assert_eq!(
    ///     "consul://?max_blocking_watches=8".parse::<waypost::BackendConfig>()?,
    ///     waypost::BackendConfig::Consul(c)
    /// );
    /// assert!("consul://?max_blocking_watches=many".parse::<waypost::BackendConfig>().is_err());
    /// # Ok::<(), waypost::ConfigError>(())
    /// ```
    pub fn max_blocking_watches(mut self, max: usize) -> Self {
        self.max_blocking_watches = Some(max);
        self
    }

    /// The Consul builder this configuration makes: the environment's variables, then what
    /// this configuration sets. For settings a URL has no parameter for.
    ///
    /// ```
    /// use std::time::Duration;
    /// let config: waypost::BackendConfig = "consul://10.0.0.2:8500?dc=dc2".parse()?;
    /// let waypost::BackendConfig::Consul(consul) = config else { unreachable!() };
    /// let client = consul.to_builder().request_timeout(Duration::from_secs(3)).build()?;
    /// assert!(format!("{client:?}").contains("dc2"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn to_builder(&self) -> crate::consul::ConsulBuilder {
        let mut b = crate::consul::Consul::builder().from_env();
        if let Some(https) = self.https {
            b = b.https(https);
        }
        if let Some(address) = &self.address {
            b = b.address(with_port(address, consul_port(self.https)));
        }
        if let Some(dc) = &self.datacenter {
            b = b.datacenter(dc.clone());
        }
        if let Some(yes) = self.passing_only {
            b = b.passing_only(yes);
        }
        if !self.tags.is_empty() {
            b = b.tags(self.tags.iter().cloned());
        }
        if let Some(yes) = self.stale {
            b = b.stale(yes);
        }
        if let Some(yes) = self.cached {
            b = b.cached(yes);
        }
        if let Some(wait) = self.wait {
            b = b.wait(wait);
        }
        if let Some(Secret(token)) = &self.token {
            b = b.token(token.clone());
        }
        if let Some(path) = &self.token_file {
            b = b.token_file(path.clone());
        }
        if let Some(path) = &self.ca_cert {
            b = b.ca_cert(path.clone());
        }
        if let Some((cert, key)) = &self.client_cert {
            b = b.client_cert(cert.clone(), key.clone());
        }
        if let Some(name) = &self.tls_server_name {
            b = b.tls_server_name(name.clone());
        }
        if let Some(host) = &self.default_host {
            b = b.default_host(host.clone());
        }
        if let Some(max) = self.max_blocking_watches {
            b = b.max_blocking_watches(max);
        }
        b
    }

    fn from_url(url: RawUrl) -> Result<Self, ConfigError> {
        const S: &str = "consul";
        if url.authority.contains(',') {
            return Err(ConfigError::BadAddress {
                scheme: S,
                address: url.authority,
                problem: "one agent per URL (a Consul client talks to its local agent)".into(),
            });
        }
        url.no_path(S)?;
        let mut c = ConsulConfig::new();
        if !url.authority.is_empty() {
            check_host_port(S, &url.authority)?;
            c.address = Some(url.authority.clone());
        }
        let mut params = Params::new(S, CONSUL_PARAMETERS, url.query)?;
        c.https = params
            .one("scheme")?
            .map(|v| match v.as_str() {
                "https" => Ok(true),
                "http" => Ok(false),
                _ => Err(bad_value(S, "scheme", v, "http or https")),
            })
            .transpose()?;
        c.datacenter = params.text("dc")?;
        c.passing_only = params.flag("passing")?;
        c.tags = params.all("tag");
        c.stale = params.flag("stale")?;
        c.cached = params.flag("cached")?;
        c.wait = params.duration("wait")?;
        c.token_file = params.text("token_file")?.map(PathBuf::from);
        c.ca_cert = params.text("ca_cert")?.map(PathBuf::from);
        c.client_cert = match (params.text("client_cert")?, params.text("client_key")?) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((cert.into(), key.into())),
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::BadValue {
                    scheme: S,
                    name: "client_cert",
                    value: String::new(),
                    expected: "given together with client_key (both or neither)",
                })
            }
        };
        c.tls_server_name = params.text("tls_server_name")?;
        c.default_host = params.text("default_host")?;
        c.max_blocking_watches = params.count("max_blocking_watches")?;
        Ok(c)
    }
}

#[cfg(feature = "consul")]
fn consul_port(https: Option<bool>) -> u16 {
    if https == Some(true) {
        8501
    } else {
        8500
    }
}

#[cfg(feature = "consul")]
impl fmt::Display for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "consul://{}", self.address.as_deref().unwrap_or(""))?;
        let mut q = Query::new(f);
        if let Some(https) = self.https {
            q.pair("scheme", if https { "https" } else { "http" })?;
        }
        q.opt("dc", self.datacenter.as_deref())?;
        q.flag("passing", self.passing_only)?;
        for tag in &self.tags {
            q.pair("tag", tag)?;
        }
        q.flag("stale", self.stale)?;
        q.flag("cached", self.cached)?;
        q.duration("wait", self.wait)?;
        q.path("token_file", self.token_file.as_ref())?;
        q.path("ca_cert", self.ca_cert.as_ref())?;
        if let Some((cert, key)) = &self.client_cert {
            q.path("client_cert", Some(cert))?;
            q.path("client_key", Some(key))?;
        }
        q.opt("tls_server_name", self.tls_server_name.as_deref())?;
        q.opt("default_host", self.default_host.as_deref())?;
        q.opt(
            "max_blocking_watches",
            self.max_blocking_watches.map(|n| n.to_string()).as_deref(),
        )
    }
}

#[cfg(feature = "consul")]
impl fmt::Debug for ConsulConfig {
    // The URL form, which never holds the token; whether one was given in code.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("url", &self.to_string())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `etcd://[host[:port][,host[:port]...]][/prefix][?parameters]`: an etcd cluster (feature
/// `etcd`).
///
/// Without hosts, the endpoints `ETCD_ENDPOINTS` names, else `127.0.0.1:2379`; without a port,
/// 2379. Without a prefix, [`DEFAULT_PREFIX`](crate::etcd::DEFAULT_PREFIX)
/// (`/waypost/services`); every process of a system must use the same one.
///
/// | parameter | value | builder method |
/// |---|---|---|
/// | `scheme` | `http` (default) or `https` (waypost-etcd's feature `tls`), for every host | [`https`](Self::https) |
/// | `lease_ttl` | lease TTL of registrations, e.g. `15s` | [`lease_ttl`](Self::lease_ttl) |
/// | `request_timeout` | time limit of one request, e.g. `5s` | [`request_timeout`](Self::request_timeout) |
/// | `connect_timeout` | time limit of opening a connection, e.g. `3s` | [`connect_timeout`](Self::connect_timeout) |
/// | `default_host` | the address of registrations that name no host | [`default_host`](Self::default_host) |
///
/// A user and password never go into the URL: give them with [`auth`](Self::auth) in code.
///
/// ```
/// use std::time::Duration;
/// use waypost::{BackendConfig, EtcdConfig};
///
/// let typed = EtcdConfig::new()
///     .endpoint("10.0.0.1:2379")
///     .endpoint("10.0.0.2:2379")
///     .prefix("/apps/services")
///     .lease_ttl(Duration::from_secs(15));
/// let url = "etcd://10.0.0.1:2379,10.0.0.2:2379/apps/services?lease_ttl=15s";
/// assert_eq!(typed.to_string(), url);
/// assert_eq!(url.parse::<BackendConfig>()?, BackendConfig::Etcd(typed));
/// # Ok::<(), waypost::ConfigError>(())
/// ```
#[cfg(feature = "etcd")]
#[derive(Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct EtcdConfig {
    endpoints: Vec<String>,
    https: Option<bool>,
    prefix: Option<String>,
    lease_ttl: Option<Duration>,
    request_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    default_host: Option<String>,
    auth: Option<(String, Secret)>,
}

#[cfg(feature = "etcd")]
const ETCD_PARAMETERS: &[&str] = &[
    "scheme",
    "lease_ttl",
    "request_timeout",
    "connect_timeout",
    "default_host",
];

#[cfg(feature = "etcd")]
impl EtcdConfig {
    /// Nothing set: the environment's endpoints, else etcd's defaults.
    ///
    /// ```
    /// assert_eq!(waypost::EtcdConfig::new().to_string(), "etcd://");
    /// ```
    pub fn new() -> Self {
        EtcdConfig::default()
    }

    /// Adds a member: `host:port` (a bare host gets port 2379). An `http://` or `https://`
    /// prefix sets [`https`](Self::https) too.
    ///
    /// ```
    /// let e = waypost::EtcdConfig::new().endpoint("10.0.0.1:2379").endpoint("10.0.0.2");
    /// assert_eq!(e.to_string(), "etcd://10.0.0.1:2379,10.0.0.2");
    /// ```
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        let endpoint: String = endpoint.into();
        let rest = if let Some(rest) = endpoint.strip_prefix("https://") {
            self.https = Some(true);
            rest
        } else if let Some(rest) = endpoint.strip_prefix("http://") {
            self.https = Some(false);
            rest
        } else {
            endpoint.as_str()
        };
        self.endpoints.push(rest.trim_end_matches('/').to_owned());
        self
    }

    /// The members given, as `host:port`.
    ///
    /// ```
    /// let e = waypost::EtcdConfig::new().endpoint("http://10.0.0.1:2379");
    /// assert_eq!(e.get_endpoints(), ["10.0.0.1:2379"]);
    /// ```
    pub fn get_endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Over `https` (`scheme=https`; needs waypost-etcd's feature `tls`).
    ///
    /// ```
    /// let e = waypost::EtcdConfig::new().endpoint("h:2379").https(true);
    /// assert_eq!(e.to_string(), "etcd://h:2379?scheme=https");
    /// ```
    pub fn https(mut self, yes: bool) -> Self {
        self.https = Some(yes);
        self
    }

    /// The key prefix (the URL's path): it starts with `/` (added if missing, as in a URL);
    /// trailing slashes are ignored; `/` alone is the default prefix.
    ///
    /// ```
    /// let e = waypost::EtcdConfig::new().endpoint("10.0.0.1:2379").prefix("apps/services/");
    /// assert_eq!(e.to_string(), "etcd://10.0.0.1:2379/apps/services");
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix: String = prefix.into();
        let trimmed = prefix.trim_matches('/');
        self.prefix = (!trimmed.is_empty()).then(|| format!("/{trimmed}"));
        self
    }

    /// The lease TTL of registrations (`lease_ttl=`; see
    /// [`EtcdBuilder::lease_ttl`](crate::etcd::EtcdBuilder::lease_ttl)).
    ///
    /// ```
    /// let e = waypost::EtcdConfig::new().lease_ttl(std::time::Duration::from_secs(15));
    /// assert_eq!(e.to_string(), "etcd://?lease_ttl=15s");
    /// ```
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = Some(ttl);
        self
    }

    /// The time limit of one request (`request_timeout=`).
    ///
    /// ```
    /// let e = waypost::EtcdConfig::new().request_timeout(std::time::Duration::from_millis(1500));
    /// assert_eq!(e.to_string(), "etcd://?request_timeout=1500ms");
    /// ```
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// The time limit of opening a connection (`connect_timeout=`).
    ///
    /// ```
    /// let e = waypost::EtcdConfig::new().connect_timeout(std::time::Duration::from_secs(2));
    /// assert_eq!(e.to_string(), "etcd://?connect_timeout=2s");
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// The address of registrations that name no host (`default_host=`).
    ///
    /// ```
    /// let e = waypost::EtcdConfig::new().default_host("203.0.113.7");
    /// assert_eq!(e.to_string(), "etcd://?default_host=203.0.113.7");
    /// ```
    pub fn default_host(mut self, host: impl Into<String>) -> Self {
        self.default_host = Some(host.into());
        self
    }

    /// Authenticate as `user` with `password`. Never written by `Display` nor `Debug`.
    ///
    /// ```
    /// let e = waypost::EtcdConfig::new().endpoint("10.0.0.1:2379").auth("svc", "s3cr3t");
    /// assert_eq!(e.to_string(), "etcd://10.0.0.1:2379");
    /// assert!(!format!("{e:?}").contains("s3cr3t"));
    /// ```
    pub fn auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Some((user.into(), Secret(password.into())));
        self
    }

    /// The etcd builder this configuration makes: `ETCD_ENDPOINTS`, then what this
    /// configuration sets. For settings a URL has no parameter for.
    ///
    /// ```
    /// use std::time::Duration;
    /// let config: waypost::BackendConfig = "etcd://10.0.0.1:2379/apps".parse()?;
    /// let waypost::BackendConfig::Etcd(etcd) = config else { unreachable!() };
    /// let builder = etcd.to_builder().progress_interval(Duration::from_secs(5));
    /// assert!(format!("{builder:?}").contains("/apps"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn to_builder(&self) -> crate::etcd::EtcdBuilder {
        let mut b = crate::etcd::Etcd::builder().from_env();
        if !self.endpoints.is_empty() {
            let scheme = if self.https == Some(true) {
                "https"
            } else {
                "http"
            };
            b = b.endpoints(
                self.endpoints
                    .iter()
                    .map(|e| format!("{scheme}://{}", with_port(e, 2379))),
            );
        }
        if let Some(prefix) = &self.prefix {
            b = b.prefix(prefix.clone());
        }
        if let Some(ttl) = self.lease_ttl {
            b = b.lease_ttl(ttl);
        }
        if let Some(t) = self.request_timeout {
            b = b.request_timeout(t);
        }
        if let Some(t) = self.connect_timeout {
            b = b.connect_timeout(t);
        }
        if let Some(host) = &self.default_host {
            b = b.default_host(host.clone());
        }
        if let Some((user, Secret(password))) = &self.auth {
            b = b.auth(user.clone(), password.clone());
        }
        b
    }

    fn from_url(url: RawUrl) -> Result<Self, ConfigError> {
        const S: &str = "etcd";
        let mut e = EtcdConfig::new();
        if !url.authority.is_empty() {
            for member in url.authority.split(',') {
                check_host_port(S, member)?;
                e.endpoints.push(member.to_owned());
            }
        }
        let path = percent_decode(&url.path)?;
        if path.chars().any(char::is_control) {
            return Err(ConfigError::Unexpected {
                scheme: S,
                what: "a control character in the prefix",
                text: path,
            });
        }
        e = e.prefix(path);
        let mut params = Params::new(S, ETCD_PARAMETERS, url.query)?;
        e.https = params
            .one("scheme")?
            .map(|v| match v.as_str() {
                "https" => Ok(true),
                "http" => Ok(false),
                _ => Err(bad_value(S, "scheme", v, "http or https")),
            })
            .transpose()?;
        if e.https.is_some() && e.endpoints.is_empty() {
            return Err(ConfigError::BadValue {
                scheme: S,
                name: "scheme",
                value: if e.https == Some(true) {
                    "https"
                } else {
                    "http"
                }
                .into(),
                expected: "given with the hosts it applies to (etcd://host:2379?scheme=https); \
                           ETCD_ENDPOINTS names its own",
            });
        }
        e.lease_ttl = params.duration("lease_ttl")?;
        e.request_timeout = params.duration("request_timeout")?;
        e.connect_timeout = params.duration("connect_timeout")?;
        e.default_host = params.text("default_host")?;
        Ok(e)
    }
}

#[cfg(feature = "etcd")]
impl fmt::Display for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd://{}", self.endpoints.join(","))?;
        if let Some(prefix) = &self.prefix {
            f.write_str(&percent_encode(prefix, true))?;
        }
        let mut q = Query::new(f);
        if let Some(https) = self.https {
            q.pair("scheme", if https { "https" } else { "http" })?;
        }
        q.duration("lease_ttl", self.lease_ttl)?;
        q.duration("request_timeout", self.request_timeout)?;
        q.duration("connect_timeout", self.connect_timeout)?;
        q.opt("default_host", self.default_host.as_deref())
    }
}

#[cfg(feature = "etcd")]
impl fmt::Debug for EtcdConfig {
    // The URL form, which never holds the password; whether credentials were given in code.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("url", &self.to_string())
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A secret given in code: compared, never shown.
#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(not(any(feature = "consul", feature = "etcd")), allow(dead_code))]
struct Secret(String);

/// A URL cut into its parts, before the scheme's own rules.
struct RawUrl {
    /// Lower case.
    scheme: String,
    authority: String,
    path: String,
    query: Option<String>,
}

impl RawUrl {
    fn split(s: &str) -> Result<RawUrl, ConfigError> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(ConfigError::NotAUrl {
                input: s.to_owned(),
            });
        };
        let scheme = scheme.to_ascii_lowercase();
        let known = SCHEMES
            .iter()
            .find(|(name, _)| *name == scheme)
            .map(|(n, _)| *n);
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(ConfigError::NotAUrl {
                input: s.to_owned(),
            });
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q.to_owned())),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some(scheme) = known {
            if authority.contains('@') {
                return Err(ConfigError::Credentials { scheme });
            }
            if let Some(i) = s.find('#') {
                return Err(ConfigError::Unexpected {
                    scheme,
                    what: "a fragment",
                    text: s[i..].to_owned(),
                });
            }
        }
        Ok(RawUrl {
            scheme,
            authority: authority.to_owned(),
            path: path.to_owned(),
            query,
        })
    }

    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    fn nothing_but_the_scheme(&self, scheme: &'static str) -> Result<(), ConfigError> {
        if !self.authority.is_empty() {
            return Err(ConfigError::Unexpected {
                scheme,
                what: "a host",
                text: self.authority.clone(),
            });
        }
        self.no_path(scheme)?;
        match &self.query {
            Some(q) if !q.is_empty() => {
                let name = q.split(['&', '=']).next().unwrap_or_default().to_owned();
                Err(ConfigError::UnknownParameter {
                    scheme,
                    name,
                    known: &[],
                })
            }
            _ => Ok(()),
        }
    }

    fn no_path(&self, scheme: &'static str) -> Result<(), ConfigError> {
        if self.path.is_empty() || self.path == "/" {
            Ok(())
        } else {
            Err(ConfigError::Unexpected {
                scheme,
                what: "a path",
                text: self.path.clone(),
            })
        }
    }
}

/// Checks `host[:port]`: a DNS name or IPv4 address, or an IPv6 address in brackets; a port
/// from 1 to 65535.
#[cfg_attr(not(any(feature = "consul", feature = "etcd")), allow(dead_code))]
fn check_host_port(scheme: &'static str, s: &str) -> Result<(), ConfigError> {
    let bad = |problem: &str| ConfigError::BadAddress {
        scheme,
        address: s.to_owned(),
        problem: problem.to_owned(),
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 address opened with [ is not closed with ]"))?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address between the brackets"))?;
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(bad("expected :port after the ]")),
            },
        }
    } else {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if host.contains(':') {
            return Err(bad("an IPv6 address goes in brackets: [::1]:8500"));
        }
        (Some(host), port)
    };
    if let Some(host) = host {
        if host.is_empty() {
            return Err(bad("no host before the port"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(bad("a host is a DNS name or an IP address"));
        }
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(bad("the port is a number from 1 to 65535")),
        }
    }
    Ok(())
}

/// `host:port` as given, or `host` with `port` added.
#[cfg_attr(not(any(feature = "consul", feature = "etcd")), allow(dead_code))]
fn with_port(address: &str, port: u16) -> String {
    let has_port = match address.rfind(']') {
        Some(close) => address[close..].contains(':'),
        None => address.contains(':'),
    };
    if has_port {
        address.to_owned()
    } else {
        format!("{address}:{port}")
    }
}

/// The query's parameters, checked against the scheme's list on the way in.
struct Params {
    scheme: &'static str,
    pairs: Vec<(String, String)>,
}

#[cfg_attr(not(any(feature = "consul", feature = "etcd")), allow(dead_code))]
impl Params {
    fn new(
        scheme: &'static str,
        known: &'static [&'static str],
        query: Option<String>,
    ) -> Result<Params, ConfigError> {
        let mut pairs = Vec::new();
        for part in query.as_deref().unwrap_or("").split('&') {
            if part.is_empty() {
                continue;
            }
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            let name = percent_decode(name)?;
            if !known.contains(&name.as_str()) {
                return Err(ConfigError::UnknownParameter {
                    scheme,
                    name,
                    known,
                });
            }
            pairs.push((name, percent_decode(value)?));
        }
        Ok(Params { scheme, pairs })
    }

    /// The value of `name` if given once (an error if given twice).
    fn one(&mut self, name: &'static str) -> Result<Option<String>, ConfigError> {
        let mut values = self.all(name);
        match values.len() {
            0 => Ok(None),
            1 => Ok(values.pop()),
            _ => Err(ConfigError::RepeatedParameter {
                scheme: self.scheme,
                name,
            }),
        }
    }

    /// Every value of `name`, in order.
    fn all(&mut self, name: &str) -> Vec<String> {
        let (mine, rest): (Vec<_>, Vec<_>) = self.pairs.drain(..).partition(|(n, _)| n == name);
        self.pairs = rest;
        mine.into_iter().map(|(_, v)| v).collect()
    }

    /// A non-empty text without control characters.
    fn text(&mut self, name: &'static str) -> Result<Option<String>, ConfigError> {
        match self.one(name)? {
            Some(v) if v.is_empty() || v.chars().any(char::is_control) => Err(bad_value(
                self.scheme,
                name,
                v,
                "a non-empty text without control characters",
            )),
            other => Ok(other),
        }
    }

    #[cfg_attr(not(feature = "consul"), allow(dead_code))] // Consul's parameters only.
    fn flag(&mut self, name: &'static str) -> Result<Option<bool>, ConfigError> {
        self.one(name)?
            .map(|v| match v.as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(bad_value(self.scheme, name, v, "true or false")),
            })
            .transpose()
    }

    #[cfg_attr(not(feature = "consul"), allow(dead_code))] // Consul's parameters only.
    fn count(&mut self, name: &'static str) -> Result<Option<usize>, ConfigError> {
        self.one(name)?
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| bad_value(self.scheme, name, v, "a whole number such as 0 or 32"))
            })
            .transpose()
    }

    fn duration(&mut self, name: &'static str) -> Result<Option<Duration>, ConfigError> {
        self.one(name)?
            .map(|v| {
                parse_duration(&v).ok_or_else(|| {
                    bad_value(
                        self.scheme,
                        name,
                        v,
                        "a duration above zero such as 500ms, 10s, 5m or 1h",
                    )
                })
            })
            .transpose()
    }
}

#[cfg_attr(not(any(feature = "consul", feature = "etcd")), allow(dead_code))]
fn bad_value(
    scheme: &'static str,
    name: &'static str,
    value: String,
    expected: &'static str,
) -> ConfigError {
    ConfigError::BadValue {
        scheme,
        name,
        value,
        expected,
    }
}

/// Writes `?a=b&c=d`, percent-encoding the values.
#[cfg_attr(not(any(feature = "consul", feature = "etcd")), allow(dead_code))]
struct Query<'a, 'b> {
    f: &'a mut fmt::Formatter<'b>,
    first: bool,
}

#[cfg_attr(not(any(feature = "consul", feature = "etcd")), allow(dead_code))]
impl<'a, 'b> Query<'a, 'b> {
    fn new(f: &'a mut fmt::Formatter<'b>) -> Self {
        Query { f, first: true }
    }

    fn pair(&mut self, name: &str, value: &str) -> fmt::Result {
        let sep = if self.first { '?' } else { '&' };
        self.first = false;
        write!(self.f, "{sep}{name}={}", percent_encode(value, false))
    }

    fn opt(&mut self, name: &str, value: Option<&str>) -> fmt::Result {
        match value {
            Some(v) => self.pair(name, v),
            None => Ok(()),
        }
    }

    #[cfg_attr(not(feature = "consul"), allow(dead_code))] // Consul's parameters only.
    fn flag(&mut self, name: &str, value: Option<bool>) -> fmt::Result {
        match value {
            Some(v) => self.pair(name, if v { "true" } else { "false" }),
            None => Ok(()),
        }
    }

    fn duration(&mut self, name: &str, value: Option<Duration>) -> fmt::Result {
        match value {
            Some(d) => self.pair(name, &format_duration(d)),
            None => Ok(()),
        }
    }

    #[cfg_attr(not(feature = "consul"), allow(dead_code))] // Consul's parameters only.
    fn path(&mut self, name: &str, value: Option<&PathBuf>) -> fmt::Result {
        match value {
            Some(p) => self.pair(name, &p.to_string_lossy()),
            None => Ok(()),
        }
    }
}

/// `s` with every byte outside the URL-safe set as `%XX`; `/` and `:` stay, and in a path
/// also nothing else.
fn percent_encode(s: &str, in_path: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/' | b':')
            || (in_path && matches!(b, b',' | b'@' | b'=' | b'+'));
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Result<String, ConfigError> {
    let bad = || ConfigError::BadEscape { text: s.to_owned() };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// `500ms`, `10s`, `5m`, `1h` (also `ns`, `us`); above zero.
#[cfg_attr(not(any(feature = "consul", feature = "etcd")), allow(dead_code))]
fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "ns" => Duration::from_nanos(n),
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

/// The largest unit that writes `d` exactly, so that [`parse_duration`] gives it back.
#[cfg_attr(not(any(feature = "consul", feature = "etcd")), allow(dead_code))]
fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    for (unit, size) in [
        ("h", 3_600_000_000_000u128),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if nanos >= size && nanos % size == 0 {
            return format!("{}{unit}", nanos / size);
        }
    }
    format!("{nanos}ns")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<BackendConfig, ConfigError> {
        s.parse()
    }

    #[test]
    #[cfg(feature = "consul")]
    fn max_blocking_watches_reaches_the_client_builder() {
        let Ok(BackendConfig::Consul(c)) = parse("consul://?max_blocking_watches=0") else {
            panic!("a consul URL");
        };
        let builder = format!("{:?}", c.to_builder());
        assert!(builder.contains("max_blocking_watches: 0"), "{builder}");
        let err = parse("consul://?max_blocking_watches=-1").unwrap_err();
        assert!(err.to_string().contains("max_blocking_watches"), "{err}");
    }

    #[test]
    #[cfg(all(feature = "memory", feature = "consul", feature = "etcd"))]
    fn every_scheme_round_trips_through_display() {
        for url in [
            "memory://",
            "consul://",
            "consul://127.0.0.1:8500",
            "consul://[::1]:8500?dc=dc1",
            "consul://consul.internal:8501?scheme=https&dc=eu-1&passing=false&tag=v2&tag=canary&stale=true&cached=false&wait=90s&token_file=/run/t&ca_cert=/etc/ca%20bundle.pem&client_cert=/c.pem&client_key=/k.pem&tls_server_name=server.eu-1.consul&default_host=10.0.0.7&max_blocking_watches=0",
            "consul://h:1?tag=a%26b%3Dc%25",
            "etcd://",
            "etcd://127.0.0.1:2379",
            "etcd://h1:2379,h2:2379,[::1]:2379/apps/services?scheme=https&lease_ttl=15s&request_timeout=1500ms&connect_timeout=2m&default_host=10.0.0.7",
            "etcd://h1/with%20space",
        ] {
            let config = parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(config.to_string(), url);
            assert_eq!(parse(&config.to_string()).unwrap(), config);
        }
    }

    #[test]
    #[cfg(all(feature = "memory", feature = "consul", feature = "etcd"))]
    fn equivalent_spellings_parse_to_the_same_config() {
        let same =
            |a: &str, b: &str| assert_eq!(parse(a).unwrap(), parse(b).unwrap(), "{a} vs {b}");
        same("MEMORY://", "memory://");
        same("memory:///", "memory://");
        same("consul://h:1/", "consul://h:1");
        same("consul://h:1?", "consul://h:1");
        same("consul://h:1?wait=60s", "consul://h:1?wait=1m");
        same("etcd://h:1/apps/", "etcd://h:1/apps");
        same("etcd://h:1/", "etcd://h:1");
        // The typed builders say the same as the URLs.
        assert_eq!(
            parse("consul://h:8501?scheme=https&dc=dc2").unwrap(),
            BackendConfig::Consul(
                ConsulConfig::new()
                    .address("https://h:8501")
                    .datacenter("dc2")
            )
        );
        assert_eq!(
            parse("etcd://a:1,b:2/p?scheme=http").unwrap(),
            BackendConfig::Etcd(
                EtcdConfig::new()
                    .endpoint("a:1")
                    .endpoint("http://b:2")
                    .https(false)
                    .prefix("/p/")
            ),
            "an http:// endpoint sets the scheme"
        );
    }

    #[test]
    #[cfg(all(feature = "memory", feature = "consul", feature = "etcd"))]
    fn every_mistake_is_typed_and_says_what_is_wrong() {
        let err = |s: &str| parse(s).unwrap_err();
        assert!(matches!(err("127.0.0.1:8500"), ConfigError::NotAUrl { .. }));
        assert!(matches!(err(""), ConfigError::NotAUrl { .. }));
        let e = err("zk://h:2181");
        assert_eq!(
            e,
            ConfigError::UnknownScheme {
                scheme: "zk".into()
            }
        );
        assert!(e.to_string().contains("memory, consul, etcd"), "{e}");
        assert!(matches!(
            err("memory://host"),
            ConfigError::Unexpected { what: "a host", .. }
        ));
        assert!(matches!(
            err("memory://?x=1"),
            ConfigError::UnknownParameter { .. }
        ));
        assert!(matches!(
            err("consul://h:1/v1"),
            ConfigError::Unexpected { what: "a path", .. }
        ));
        assert!(matches!(
            err("consul://h:1#frag"),
            ConfigError::Unexpected {
                what: "a fragment",
                ..
            }
        ));
        assert!(matches!(
            err("consul://a:1,b:2"),
            ConfigError::BadAddress { .. }
        ));
        for bad in [
            "consul://h:0",
            "consul://h:99999",
            "consul://:8500",
            "consul://::1:8500",
            "consul://[::1",
            "consul://[zz]:1",
            "consul://h!:1",
            "etcd://a:1,,b:2",
        ] {
            assert!(
                matches!(err(bad), ConfigError::BadAddress { .. }),
                "{bad}: {:?}",
                err(bad)
            );
        }
        let e = err("consul://h:1?datacenter=dc1");
        assert!(matches!(e, ConfigError::UnknownParameter { .. }));
        assert!(e.to_string().contains("dc, passing"), "{e}");
        assert_eq!(
            err("consul://h:1?dc=a&dc=b"),
            ConfigError::RepeatedParameter {
                scheme: "consul",
                name: "dc"
            }
        );
        let e = err("consul://h:1?passing=no");
        assert!(e.to_string().contains("true or false"), "{e}");
        let e = err("consul://h:1?wait=soon");
        assert!(e.to_string().contains("500ms"), "{e}");
        assert!(matches!(
            err("consul://h:1?wait=0s"),
            ConfigError::BadValue { name: "wait", .. }
        ));
        assert!(matches!(
            err("consul://h:1?scheme=ftp"),
            ConfigError::BadValue { name: "scheme", .. }
        ));
        assert!(matches!(
            err("consul://h:1?dc="),
            ConfigError::BadValue { name: "dc", .. }
        ));
        assert!(matches!(
            err("consul://h:1?client_cert=/c.pem"),
            ConfigError::BadValue {
                name: "client_cert",
                ..
            }
        ));
        assert!(matches!(
            err("consul://h:1?tag=%zz"),
            ConfigError::BadEscape { .. }
        ));
        assert!(matches!(
            err("consul://h:1?tag=%ff"),
            ConfigError::BadEscape { .. }
        ));
        assert!(matches!(
            err("etcd://?scheme=https"),
            ConfigError::BadValue { name: "scheme", .. }
        ));
        assert!(matches!(
            err("etcd://h/a%0Ab"),
            ConfigError::Unexpected { .. }
        ));
        // Credentials never reach the message.
        for url in ["consul://tok3n@h:1", "etcd://root:pa55@h:2379"] {
            let e = err(url);
            assert!(matches!(e, ConfigError::Credentials { .. }), "{e:?}");
            assert!(
                !e.to_string().contains("tok3n") && !e.to_string().contains("pa55"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_scheme_parses_exactly_when_its_feature_is_on() {
        for (scheme, on) in SCHEMES {
            match parse(&format!("{scheme}://")) {
                Ok(config) => {
                    assert!(on, "{scheme}");
                    assert_eq!(config.name(), *scheme);
                }
                Err(e) => {
                    assert!(!on, "{scheme}: {e}");
                    assert_eq!(e, ConfigError::FeatureDisabled { scheme });
                    assert!(
                        e.to_string().contains(&format!("feature \"{scheme}\"")),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    #[cfg(all(feature = "memory", feature = "consul", feature = "etcd"))]
    fn secrets_given_in_code_are_never_shown() {
        let c = BackendConfig::Consul(ConsulConfig::new().address("h:1").token("s3cr3t-token"));
        let e = BackendConfig::Etcd(EtcdConfig::new().endpoint("h:1").auth("u", "s3cr3t-pw"));
        for shown in [
            c.to_string(),
            format!("{c:?}"),
            e.to_string(),
            format!("{e:?}"),
        ] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
        assert!(format!("{:?}", ConsulConfig::new().token("x")).contains("redacted"));
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit() {
        for (d, s) in [
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(7), "7us"),
            (Duration::from_nanos(5), "5ns"),
        ] {
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(s), Some(d));
        }
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "-1s",
            "0ms",
            "10 s",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    #[cfg(all(feature = "memory", feature = "consul", feature = "etcd"))]
    fn a_bare_host_gets_the_backends_port() {
        assert_eq!(with_port("h", 8500), "h:8500");
        assert_eq!(with_port("h:1", 8500), "h:1");
        assert_eq!(with_port("[::1]", 2379), "[::1]:2379");
        assert_eq!(with_port("[::1]:5", 2379), "[::1]:5");
        let c = parse("consul://consul.internal?scheme=https").unwrap();
        let BackendConfig::Consul(c) = c else {
            unreachable!()
        };
        let client = c.to_builder().build().unwrap();
        assert!(
            format!("{client:?}").contains("https://consul.internal:8501/"),
            "{client:?}"
        );
    }
}
