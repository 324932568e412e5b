//! An HTTP client for a logical service (feature `http`): each request goes to an instance a
//! [`Balancer`] picks, and its outcome goes back to the balancer.
//!
//! - URLs are `http://<host:port><path>` of the picked instance (IPv6 hosts in brackets), or
//!   `https://` when the instance's metadata says [`scheme=https`](crate::SCHEME_METADATA) or
//!   the client was built with [`https(true)`](HttpClientBuilder::https). TLS is rustls':
//!   the server certificate must chain to a trusted CA (the built-in web roots, plus any
//!   [`ca_certificate`](HttpClientBuilder::ca_certificate)) and name the host the instance
//!   registered (an IP subject alternative name for an IP address); a client certificate for
//!   mutual TLS comes from [`identity`](HttpClientBuilder::identity). A failed handshake is a
//!   typed [`HttpError::Tls`] that says what to fix.
//! - Connections are pooled per instance (reqwest on rustls); connect, per-try and overall
//!   timeouts. Or bring your own [`reqwest::Client`]
//!   ([`reqwest_client`](HttpClientBuilder::reqwest_client)) for proxies, pool settings or a
//!   resolver of your choice.
//! - Outcomes reach the pick guard: a 5xx answer, a connect error or a timeout is a failure,
//!   any other answer a success, with its latency — so least-connections, P2C/EWMA and outlier
//!   ejection see real results. The latency is the time to the response's head; the call
//!   stays in flight until its body is read ([`Response::text`], `bytes`, `json`, or
//!   [`chunk`](Response::chunk) by chunk to its end), or the
//!   response is dropped or handed out with [`Response::into_inner`]. A body that breaks off
//!   (the connection lost, a timeout) is a failure of the instance.
//! - Retries go to a *different* instance ([`Balancer::pick_excluding`]), bounded by
//!   [`max_attempts`](HttpClientBuilder::max_attempts), by a [`RetryBudget`] and by the overall
//!   [`request_timeout`](HttpClientBuilder::request_timeout):
//!   - idempotent requests (GET, HEAD, PUT, DELETE, OPTIONS, TRACE, or any request marked with
//!     [`RequestBuilder::idempotent`]) are retried after a connect error, a timeout, a broken
//!     connection or a 5xx answer;
//!   - other requests (POST, PATCH) are retried **only** after a connect error, when the request
//!     provably never left this process; once sent they are never repeated.
//! - Idempotent requests can be [hedged](Hedge): a second attempt to another instance when the
//!   first has not answered after a delay; the first answer wins and the other attempt is
//!   cancelled. Hedges draw from the same attempts and budget as retries.
//!
//! # Which reqwest types are Waypost's API
//!
//! reqwest is the engine, and two of its types are part of this API on purpose: the
//! [`reqwest::Client`] a caller may hand in, and the [`reqwest::Response`] that
//! [`Response::into_inner`] hands out for streaming. Both are re-exported as
//! [`waypost::http::reqwest`](reqwest), so that a caller names the same version. Errors are
//! not: every failure is an [`HttpError`] whose transport cause is a [`TransportError`]
//! (reqwest's error inside, its chain kept as `source`), so code that matches on errors does
//! not change with the reqwest version. Methods, status codes and headers are the `http`
//! crate's types ([`Method`], [`StatusCode`], [`header`]), shared by the whole ecosystem.
//!
//! ```
//! use std::time::Duration;
//! use waypost::http::HttpClient;
//! use waypost::strategies::RoundRobin;
//! use waypost::{Balancer, ServiceInstance, WatchEvent};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A real HTTP server on loopback to talk to.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let port = listener.local_addr()?.port();
//! let app = axum::Router::new().route("/users", axum::routing::get(|| async { "[]" }));
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! // A balancer fed by hand here; usually `Balancer::watch(&discovery, &service, strategy)`.
//! let balancer = Balancer::new(RoundRobin::new());
//! let instance = ServiceInstance::builder("users", "users-1").host("127.0.0.1").port(port).build()?;
//! balancer.apply(WatchEvent::Snapshot(vec![instance]));
//!
//! let client = HttpClient::builder(balancer)
//!     .connect_timeout(Duration::from_secs(1))
//!     .request_timeout(Duration::from_secs(5))
//!     .build()?;
//! let response = client.get("/users").send().await?.error_for_status()?;
//! assert_eq!(response.instance().id().as_str(), "users-1");
//! assert_eq!(response.text().await?, "[]");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use waypost_core::Balancer;

mod error;
mod request;
mod response;
#[cfg(test)]
mod tests;

pub use crate::retry::Hedge;
pub use crate::retry::RetryBudget;
use crate::retry::RetryPolicy;
pub use error::{GaveUp, HttpError, TransportError};
pub use request::RequestBuilder;
pub use response::Response;

/// The metadata key whose value `https` makes the client use TLS to an instance (shared with
/// the gRPC channel).
pub use crate::SCHEME_METADATA;

/// The reqwest this client is built on, for [`HttpClientBuilder::reqwest_client`] and
/// [`Response::into_inner`]: name its types through this path so that they are the version
/// Waypost uses.
///
/// ```
/// use waypost::http::{reqwest, HttpClient};
/// use waypost::strategies::RoundRobin;
/// use waypost::Balancer;
///
/// let own = reqwest::Client::builder().pool_max_idle_per_host(4).build()?;
/// let client = HttpClient::builder(Balancer::new(RoundRobin::new()))
///     .reqwest_client(own)
///     .build()?;
/// assert_eq!(client.balancer().status().strategy, "round-robin");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub use reqwest;

/// Re-exported from `reqwest` (the `http` crate's types): request methods, status codes and
/// header names and values.
pub use reqwest::{header, Method, StatusCode};

/// Where a request's hash key comes from, for hashing strategies (`consistent-hash`, `maglev`):
/// equal keys go to the same instance. A key set on the request with [`RequestBuilder::key`]
/// wins over this.
///
/// ```
/// use waypost::http::HashKey;
/// let by_user = HashKey::header("x-user-id")?;
/// assert_eq!(format!("{by_user:?}"), "Header(\"x-user-id\")");
/// # Ok::<(), waypost::http::HttpError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// The request path without its query (`/users/42`).
    Path,
    /// The value of this request header; a request without it has no key (hashing strategies
    /// then pick at random).
    Header(header::HeaderName),
}

impl HashKey {
    /// The value of header `name`. Fails if `name` is not a valid header name.
    pub fn header(name: &str) -> Result<Self, HttpError> {
        header::HeaderName::try_from(name)
            .map(HashKey::Header)
            .map_err(|e| HttpError::Config {
                message: format!("{name:?} is not a valid header name for a hash key: {e}"),
            })
    }
}

/// Sends HTTP requests to the instances of one service, picked by a [`Balancer`]. Cheap to
/// clone; clones share the connection pool, the balancer and the retry budget.
///
/// Built with [`HttpClient::builder`]; see the [module docs](self) for the retry rules.
///
/// ```
/// use waypost::http::HttpClient;
/// use waypost::strategies::RoundRobin;
/// use waypost::Balancer;
///
/// let client = HttpClient::new(Balancer::new(RoundRobin::new()))?;
/// assert_eq!(client.balancer().status().strategy, "round-robin");
/// # Ok::<(), waypost::http::HttpError>(())
/// ```
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<Inner>,
}

struct Inner {
    balancer: Balancer,
    http: reqwest::Client,
    request_timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    retry: RetryPolicy,
    hash_key: Option<HashKey>,
    zone: Option<String>,
    https: bool,
    hedge: Option<Hedge>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("HttpClient")
            .field("balancer", &i.balancer)
            .field("request_timeout", &i.request_timeout)
            .field("per_try_timeout", &i.per_try_timeout)
            .field("max_attempts", &i.retry.max_attempts)
            .field("budget", &i.retry.budget)
            .field("hash_key", &i.hash_key)
            .field("zone", &i.zone)
            .field("https", &i.https)
            .field("hedge", &i.hedge)
            .finish()
    }
}

impl HttpClient {
    /// A client with default options: 3 s connect timeout, 30 s overall timeout, 3 attempts,
    /// the default [`RetryBudget`].
    pub fn new(balancer: Balancer) -> Result<Self, HttpError> {
        Self::builder(balancer).build()
    }

    /// Options; then [`build`](HttpClientBuilder::build).
    pub fn builder(balancer: Balancer) -> HttpClientBuilder {
        HttpClientBuilder {
            balancer,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Some(Duration::from_secs(30)),
            per_try_timeout: None,
            max_attempts: 3,
            budget: None,
            hash_key: None,
            zone: None,
            pool_idle_timeout: Duration::from_secs(30),
            https: false,
            ca: Vec::new(),
            identity: None,
            built_in_roots: true,
            own_client: None,
            transport_options: Vec::new(),
            hedge: None,
        }
    }

    /// A request with `method` to `path` (which starts with `/` and may carry a query).
    pub fn request(&self, method: Method, path: impl Into<String>) -> RequestBuilder {
        RequestBuilder::new(self.clone(), method, path.into())
    }

    /// A GET request.
    pub fn get(&self, path: impl Into<String>) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    /// A HEAD request.
    pub fn head(&self, path: impl Into<String>) -> RequestBuilder {
        self.request(Method::HEAD, path)
    }

    /// A POST request (not retried once sent unless marked idempotent).
    pub fn post(&self, path: impl Into<String>) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    /// A PUT request.
    pub fn put(&self, path: impl Into<String>) -> RequestBuilder {
        self.request(Method::PUT, path)
    }

    /// A PATCH request (not retried once sent unless marked idempotent).
    pub fn patch(&self, path: impl Into<String>) -> RequestBuilder {
        self.request(Method::PATCH, path)
    }

    /// A DELETE request.
    pub fn delete(&self, path: impl Into<String>) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }

    /// The balancer requests go through (for its status, or to swap the strategy).
    pub fn balancer(&self) -> &Balancer {
        &self.inner.balancer
    }

    /// The retry budget shared by this client's requests.
    pub fn retry_budget(&self) -> &RetryBudget {
        &self.inner.retry.budget
    }
}

/// Options of an [`HttpClient`]; see [`HttpClient::builder`].
///
/// ```
/// use std::time::Duration;
/// use waypost::http::{HashKey, HttpClient, RetryBudget};
/// use waypost::strategies::RoundRobin;
/// use waypost::Balancer;
///
/// let client = HttpClient::builder(Balancer::new(RoundRobin::new()))
///     .connect_timeout(Duration::from_millis(500))
///     .request_timeout(Duration::from_secs(10))
///     .per_try_timeout(Duration::from_secs(2))
///     .max_attempts(2)
///     .retry_budget(RetryBudget::new(0.1, 5)?)
///     .hash_key(HashKey::Path)
///     .build()?;
/// let shown = format!("{client:?}");
/// assert!(shown.contains("max_attempts: 2"), "{shown}");
/// assert!(shown.contains("per_try_timeout: Some(2s)"), "{shown}");
/// // 5 retries per second over the 10 s window, before any request.
/// assert_eq!(client.retry_budget().available(), 50);
/// # Ok::<(), waypost::http::HttpError>(())
/// ```
#[must_use]
pub struct HttpClientBuilder {
    balancer: Balancer,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    max_attempts: u32,
    budget: Option<RetryBudget>,
    hash_key: Option<HashKey>,
    zone: Option<String>,
    pool_idle_timeout: Duration,
    https: bool,
    ca: Vec<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    built_in_roots: bool,
    own_client: Option<reqwest::Client>,
    /// The options given that configure the reqwest client Waypost builds (so they cannot go
    /// with [`reqwest_client`](Self::reqwest_client)).
    transport_options: Vec<&'static str>,
    hedge: Option<Hedge>,
}

impl fmt::Debug for HttpClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Certificates and keys are left out: a private key has no place in a log.
        f.debug_struct("HttpClientBuilder")
            .field("balancer", &self.balancer)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("per_try_timeout", &self.per_try_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("hash_key", &self.hash_key)
            .field("zone", &self.zone)
            .field("https", &self.https)
            .field("ca_certificates", &self.ca.len())
            .field("built_in_roots", &self.built_in_roots)
            .field("identity", &self.identity.is_some())
            .field("own_client", &self.own_client.is_some())
            .field("hedge", &self.hedge)
            .finish_non_exhaustive()
    }
}

impl HttpClientBuilder {
    /// Time limit for opening a TCP connection (default 3 s). A connect failure is retried on
    /// another instance for every method, since nothing was sent.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self.transport_options.push("connect_timeout");
        self
    }

    /// Time limit for a whole call, retries included, until the response body is read
    /// (default 30 s). [`RequestBuilder::timeout`] overrides it per request.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// No overall time limit (per-try and connect timeouts still apply).
    pub fn no_request_timeout(mut self) -> Self {
        self.request_timeout = None;
        self
    }

    /// Time limit for each attempt (default: none beyond the overall one). Set it below the
    /// request timeout so that a hanging instance leaves time to retry on another one.
    pub fn per_try_timeout(mut self, timeout: Duration) -> Self {
        self.per_try_timeout = Some(timeout);
        self
    }

    /// Attempts per call, the first one included (default 3; 1 disables retries).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The retry budget (default [`RetryBudget::default`]). Clones of one budget are shared:
    /// give several clients the same one to bound their retries together.
    pub fn retry_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Where hashing strategies take the request's key from (default: nowhere).
    pub fn hash_key(mut self, key: HashKey) -> Self {
        self.hash_key = Some(key);
        self
    }

    /// This client's zone, passed to zone-aware strategies in the pick context.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// How long an idle pooled connection is kept (default 30 s).
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self.transport_options.push("pool_idle_timeout");
        self
    }

    /// Use TLS to every instance, not only to those whose metadata says
    /// [`scheme=https`](crate::SCHEME_METADATA) (default: only to those).
    ///
    /// ```
    /// # use waypost::http::HttpClient;
    /// # use waypost::strategies::RoundRobin;
    /// # use waypost::{Balancer, ServiceInstance, WatchEvent};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // A plain HTTP server: a client that insists on TLS cannot talk to it.
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let port = listener.local_addr()?.port();
    /// tokio::spawn(async move { axum::serve(listener, axum::Router::new()).await });
    /// let balancer = Balancer::new(RoundRobin::new());
    /// balancer.apply(WatchEvent::Snapshot(vec![
    ///     ServiceInstance::builder("users", "u1").host("127.0.0.1").port(port).build()?,
    /// ]));
    /// let client = HttpClient::builder(balancer).https(true).max_attempts(1).build()?;
    /// let err = client.get("/").send().await.unwrap_err();
    /// assert!(matches!(err, waypost::http::HttpError::Tls { .. }), "{err}");
    /// assert!(err.to_string().contains("plain HTTP"), "{err}");
    /// # Ok(())
    /// # }
    /// ```
    pub fn https(mut self, on: bool) -> Self {
        self.https = on;
        self
    }

    /// Trusts the CA certificates in `pem` (one or more PEM `CERTIFICATE` blocks) for the
    /// instances' TLS certificates, besides the built-in web roots (see
    /// [`tls_built_in_roots`](Self::tls_built_in_roots)). Repeatable. PEM without a
    /// certificate makes [`build`](Self::build) fail.
    ///
    /// ```
    /// use waypost::http::{HttpClient, HttpError};
    /// use waypost::strategies::RoundRobin;
    /// use waypost::Balancer;
    ///
    /// let err = HttpClient::builder(Balancer::new(RoundRobin::new()))
    ///     .ca_certificate("not a certificate")
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(err, HttpError::Config { .. }));
    /// assert!(err.to_string().contains("ca_certificate"), "{err}");
    /// ```
    pub fn ca_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.ca.push(pem.as_ref().to_vec());
        self.transport_options.push("ca_certificate");
        self
    }

    /// Whether to trust the built-in web roots (Mozilla's, as webpki-roots ships them) too
    /// (default `true`). Turn them off so that only the
    /// [`ca_certificate`](Self::ca_certificate)s are trusted, as a private service mesh
    /// usually wants.
    ///
    /// ```
    /// use waypost::http::HttpClient;
    /// use waypost::strategies::RoundRobin;
    /// use waypost::Balancer;
    ///
    /// let builder = HttpClient::builder(Balancer::new(RoundRobin::new())).tls_built_in_roots(false);
    /// assert!(format!("{builder:?}").contains("built_in_roots: false"));
    /// assert!(builder.build().is_ok());
    /// ```
    pub fn tls_built_in_roots(mut self, on: bool) -> Self {
        self.built_in_roots = on;
        self.transport_options.push("tls_built_in_roots");
        self
    }

    /// The client certificate (chain) and its private key, both PEM, presented to instances
    /// that ask for one (mutual TLS). The key may be PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    /// Unusable PEM makes [`build`](Self::build) fail.
    ///
    /// ```
    /// use waypost::http::{HttpClient, HttpError};
    /// use waypost::strategies::RoundRobin;
    /// use waypost::Balancer;
    ///
    /// let err = HttpClient::builder(Balancer::new(RoundRobin::new()))
    ///     .identity("no certificate", "no key")
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(err, HttpError::Config { .. }));
    /// assert!(err.to_string().contains("identity"), "{err}");
    /// ```
    pub fn identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        self.identity = Some((cert_pem.as_ref().to_vec(), key_pem.as_ref().to_vec()));
        self.transport_options.push("identity");
        self
    }

    /// Sends through `client` instead of a reqwest client of Waypost's own: for a proxy, pool
    /// settings, default headers, a custom resolver or TLS setup, or middleware built into
    /// the client. Everything else — picking, outcomes, timeouts per call and per try,
    /// retries, hedges — stays Waypost's. The options that configure the client Waypost would
    /// build ([`connect_timeout`](Self::connect_timeout),
    /// [`pool_idle_timeout`](Self::pool_idle_timeout), [`ca_certificate`](Self::ca_certificate),
    /// [`identity`](Self::identity), [`tls_built_in_roots`](Self::tls_built_in_roots)) are
    /// then set on your client instead, and [`build`](Self::build) refuses them here.
    ///
    /// Waypost's own client follows no redirects, since a redirect leaves the instance the
    /// balancer picked; reqwest's default policy follows up to 10, so set
    /// `.redirect(reqwest::redirect::Policy::none())` on yours to keep that. A TLS failure is
    /// reported as [`HttpError::Tls`] only when your client uses rustls (reqwest's
    /// `rustls-tls` features); with another TLS stack it is a connect error.
    ///
    /// ```
    /// use waypost::http::{reqwest, HttpClient, HttpError};
    /// use waypost::strategies::RoundRobin;
    /// use waypost::Balancer;
    ///
    /// let own = reqwest::Client::builder()
    ///     .redirect(reqwest::redirect::Policy::none())
    ///     .build()?;
    /// let balancer = Balancer::new(RoundRobin::new());
    /// assert!(HttpClient::builder(balancer.clone()).reqwest_client(own.clone()).build().is_ok());
    ///
    /// let err = HttpClient::builder(balancer)
    ///     .reqwest_client(own)
    ///     .ca_certificate("...")
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(err, HttpError::Config { .. }));
    /// assert!(err.to_string().contains("reqwest::ClientBuilder"), "{err}");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reqwest_client(mut self, client: reqwest::Client) -> Self {
        self.own_client = Some(client);
        self
    }

    /// Hedges idempotent requests (default: never); see [`Hedge`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost::http::{Hedge, HttpClient};
    /// use waypost::strategies::RoundRobin;
    /// use waypost::Balancer;
    ///
    /// let builder = HttpClient::builder(Balancer::new(RoundRobin::new()))
    ///     .hedge(Hedge::after(Duration::from_millis(20)));
    /// assert!(format!("{builder:?}").contains("Fixed(20ms)"));
    ///
    /// // A hedge is a second attempt: one attempt in all leaves no room for it.
    /// let err = HttpClient::builder(Balancer::new(RoundRobin::new()))
    ///     .hedge(Hedge::after(Duration::from_millis(20)))
    ///     .max_attempts(1)
    ///     .build()
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("max_attempts"), "{err}");
    /// ```
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        self.hedge = Some(hedge);
        self
    }

    /// Checks the options and builds the client (which needs no runtime until it sends).
    pub fn build(self) -> Result<HttpClient, HttpError> {
        let zero = |what: &str| HttpError::Config {
            message: format!(
                "{what} is 0: no request could ever complete; give a positive duration"
            ),
        };
        if self.connect_timeout.is_zero() {
            return Err(zero("connect_timeout"));
        }
        if self.request_timeout.is_some_and(|t| t.is_zero()) {
            return Err(zero("request_timeout"));
        }
        if self.per_try_timeout.is_some_and(|t| t.is_zero()) {
            return Err(zero("per_try_timeout"));
        }
        if self.max_attempts == 0 {
            return Err(HttpError::Config {
                message: "max_attempts is 0: give at least 1 (1 disables retries)".into(),
            });
        }
        if self.hedge.is_some() && self.max_attempts == 1 {
            return Err(HttpError::Config {
                message: crate::retry::HEDGE_WITH_ONE_ATTEMPT.into(),
            });
        }
        let http = match self.own_client {
            Some(own) => {
                if !self.transport_options.is_empty() {
                    let mut given = self.transport_options.clone();
                    given.sort_unstable();
                    given.dedup();
                    return Err(HttpError::Config {
                        message: format!(
                            "{} configure the reqwest client Waypost builds, and reqwest_client \
                             brings your own: set them on your reqwest::ClientBuilder instead",
                            given.join(", ")
                        ),
                    });
                }
                own
            }
            None => own_client(
                self.connect_timeout,
                self.pool_idle_timeout,
                &self.ca,
                self.identity.as_ref(),
                self.built_in_roots,
            )?,
        };
        Ok(HttpClient {
            inner: Arc::new(Inner {
                retry: RetryPolicy::new(
                    self.max_attempts,
                    self.budget.unwrap_or_default(),
                    self.balancer.status().service.as_ref().map(|s| s.as_str()),
                ),
                balancer: self.balancer,
                http,
                request_timeout: self.request_timeout,
                per_try_timeout: self.per_try_timeout,
                hash_key: self.hash_key,
                zone: self.zone,
                https: self.https,
                hedge: self.hedge,
            }),
        })
    }
}

/// The reqwest client Waypost builds: rustls, the builder's timeouts and TLS material, no
/// redirects.
fn own_client(
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    ca: &[Vec<u8>],
    identity: Option<&(Vec<u8>, Vec<u8>)>,
    built_in_roots: bool,
) -> Result<reqwest::Client, HttpError> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(pool_idle_timeout)
        // Instances are addressed by IP and port from the registry; a redirect would leave
        // the balancer's control (and its outcome accounting), so it is the caller's call.
        .redirect(reqwest::redirect::Policy::none())
        .tls_built_in_root_certs(built_in_roots);
    for pem in ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| HttpError::Config {
            message: format!("ca_certificate is not PEM: {}", TransportError::new(e)),
        })?;
        if certs.is_empty() {
            return Err(HttpError::Config {
                message: "ca_certificate has no PEM certificate (a block starting with \
                          -----BEGIN CERTIFICATE-----): give the CA's certificate file"
                    .into(),
            });
        }
        for cert in certs {
            b = b.add_root_certificate(cert);
        }
    }
    if let Some((cert, key)) = identity {
        let mut pem = cert.clone();
        pem.push(b'\n');
        pem.extend_from_slice(key);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| HttpError::Config {
            message: format!(
                "identity: {}; give the client certificate and its private key as PEM",
                TransportError::new(e)
            ),
        })?;
        b = b.identity(identity);
    }
    b.build().map_err(|e| HttpError::Build {
        source: TransportError::new(e),
    })
}
