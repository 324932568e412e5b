//! An HTTP client for a logical service (feature `http`): each request goes to an instance a
//! [`Balancer`] picks, and its outcome goes back to the balancer.
//!
//! - URLs are `http://<host:port><path>` of the picked instance (IPv6 hosts in brackets).
//! - Connections are pooled per instance (reqwest on rustls); connect, per-try and overall
//!   timeouts.
//! - Outcomes reach the pick guard: a 5xx answer, a connect error or a timeout is a failure,
//!   any other answer a success, with its latency — so least-connections, P2C/EWMA and outlier
//!   ejection see real results. The outcome is recorded when the response headers arrive: the
//!   in-flight count and the latency cover the time to the first byte of the answer, not the
//!   time the caller takes to read the body.
//! - Retries go to a *different* instance ([`Balancer::pick_excluding`]), bounded by
//!   [`max_attempts`](HttpClientBuilder::max_attempts), by a [`RetryBudget`] and by the overall
//!   [`request_timeout`](HttpClientBuilder::request_timeout):
//!   - idempotent requests (GET, HEAD, PUT, DELETE, OPTIONS, TRACE, or any request marked with
//!     [`RequestBuilder::idempotent`]) are retried after a connect error, a timeout, a broken
//!     connection or a 5xx answer;
//!   - other requests (POST, PATCH) are retried **only** after a connect error, when the request
//!     provably never left this process; once sent they are never repeated.
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

pub use crate::retry::RetryBudget;
use crate::retry::RetryPolicy;
pub use error::{GaveUp, HttpError};
pub use request::RequestBuilder;
pub use response::Response;

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
/// # let _ = client;
/// # Ok::<(), waypost::http::HttpError>(())
/// ```
#[derive(Debug)]
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
}

impl HttpClientBuilder {
    /// Time limit for opening a TCP connection (default 3 s). A connect failure is retried on
    /// another instance for every method, since nothing was sent.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
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
        let http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(self.pool_idle_timeout)
            // Instances are addressed by IP and port from the registry; a redirect would leave
            // the balancer's control (and its outcome accounting), so it is the caller's call.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|source| HttpError::Build { source })?;
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
            }),
        })
    }
}
