//! Waypost's Consul backend: registration through the local agent with a health check, and
//! discovery through health queries and blocking-query watches.
//!
//! - [`Registry`]: `PUT /v1/agent/service/register` with id, name, address, port, tags, metadata
//!   (the zone goes into `Meta.zone`), `Weights` and a check: a TTL heartbeat (registered
//!   passing, passed every TTL/3 by the handle), or an HTTP / TCP check that Consul runs, with
//!   `DeregisterCriticalServiceAfter` as the safety net. The handle heals the registration when
//!   the agent forgets it (agent restart), retrying forever with jittered backoff, and reports
//!   whether it is live. `shutdown()` deregisters.
//! - [`Discovery`]: `GET /v1/health/service/<name>` (passing only by default; tag filters,
//!   datacenter, `?stale`, `?cached`). Watches use blocking queries that follow Consul's rules
//!   (index tracking and reset, token-bucket pacing, diff before emitting, fail-static retries).
//!   A client's first [`max_blocking_watches`](ConsulBuilder::max_blocking_watches) watches
//!   (32 by default) hold a blocking query each; every further one waits on two
//!   datacenter-wide blocking queries that tell which services changed, and then re-reads its
//!   service, so that a process can watch a thousand services through one agent, which accepts
//!   200 connections from one address by default.
//! - Configuration the Consul CLI's way: `CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`,
//!   `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_HTTP_SSL`, `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`,
//!   `CONSUL_CLIENT_KEY`, `CONSUL_TLS_SERVER_NAME` (see [`ConsulBuilder::from_env`]).
//!
//! ```no_run
//! use futures::StreamExt;
//! use waypost_consul::Consul;
//! use waypost_core::{Discovery, Registration, Registry, ServiceName};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let consul = Consul::from_env()?;
//! let handle = consul
//!     .register(Registration::builder("users", "users-1").port(8080).weight(2).build()?)
//!     .await?;
//! let mut watch = consul.watch(&ServiceName::new("users")?);
//! println!("{:?}", watch.next().await);
//! handle.shutdown().await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod api;
mod backoff;
mod config;
mod feed;
mod registry;
mod watch;
mod wire;

use std::fmt;
use std::sync::Arc;

use waypost_core::{
    async_trait, Discovery, Error, Registration, RegistrationHandle, Registry, ServiceInstance,
    ServiceName, Watch,
};

pub use config::{
    ConsulBuilder, DEFAULT_ADDRESS, DEFAULT_MAX_BLOCKING_WATCHES, ORDINARY_REQUESTS,
    SHARED_WATCH_READS,
};
pub use wire::{WEIGHT_META_KEY, ZONE_META_KEY};

use api::{Api, HealthQuery};

/// The backend name in errors.
const BACKEND: &str = "consul";

/// A Consul client: a [`Registry`] and a [`Discovery`] over the agent's HTTP API.
///
/// Cheap to clone; clones share one connection pool. A watch runs for as long as its stream is
/// held, independently of the client that made it.
///
/// ```
/// use waypost_consul::Consul;
/// let consul = Consul::builder().address("127.0.0.1:8500").token("secret").build()?;
/// assert!(!format!("{consul:?}").contains("secret"));
/// # Ok::<(), waypost_core::Error>(())
/// ```
#[derive(Clone)]
pub struct Consul {
    api: Arc<Api>,
    /// The agent address as configured, credentials redacted: with a TLS server name the
    /// requests' URLs name the server name instead.
    address: Arc<str>,
    tls_server_name: Option<Arc<str>>,
    query: HealthQuery,
    wait: std::time::Duration,
    rate_limit: (u32, std::time::Duration),
    /// Blocking-query slots and the shared watch, common to every clone.
    feed: Arc<feed::Feed>,
}

impl fmt::Debug for Consul {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consul")
            .field("address", &self.address)
            .field("tls_server_name", &self.tls_server_name)
            .field("token", &self.api.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.api.datacenter)
            .field("query", &self.query)
            .field("wait", &self.wait)
            .field("max_blocking_watches", &self.feed.max_blocking())
            .finish_non_exhaustive()
    }
}

impl Consul {
    /// A builder with Consul's defaults (agent at [`DEFAULT_ADDRESS`], no token, passing
    /// instances only, 5 min blocking waits).
    ///
    /// ```
    /// let consul = waypost_consul::Consul::builder().address("http://127.0.0.1:8500").build()?;
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    pub fn builder() -> ConsulBuilder {
        ConsulBuilder::default()
    }

    /// A client configured from the `CONSUL_*` environment variables
    /// (see [`ConsulBuilder::from_env`]).
    ///
    /// ```
    /// let consul = waypost_consul::Consul::from_env()?;
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    pub fn from_env() -> Result<Consul, Error> {
        ConsulBuilder::default().from_env().build()
    }

    /// The agent's address as configured (a URL, credentials in it redacted), for messages:
    /// with a [TLS server name](ConsulBuilder::tls_server_name) requests still go there.
    ///
    /// ```
    /// let consul = waypost_consul::Consul::builder().address("10.0.0.2:8500").build()?;
    /// assert_eq!(consul.address(), "http://10.0.0.2:8500/");
    /// # Ok::<(), waypost_core::Error>(())
    /// ```
    pub fn address(&self) -> &str {
        &self.address
    }

    fn new(api: Arc<Api>, address: String, b: ConsulBuilder) -> Self {
        let feed = Arc::new(feed::Feed::new(
            api.clone(),
            b.stale,
            b.wait_clamped(),
            b.rate_limit,
            b.max_blocking_watches,
        ));
        Consul {
            feed,
            address: address.into(),
            tls_server_name: b.tls_server_name.as_deref().map(Arc::from),
            query: HealthQuery {
                passing_only: b.passing_only,
                tags: b.tags.clone(),
                stale: b.stale,
                cached: b.cached,
            },
            wait: b.wait_clamped(),
            rate_limit: b.rate_limit,
            api,
        }
    }

    #[cfg(test)]
    fn api(&self) -> &Api {
        &self.api
    }
}

#[async_trait]
impl Registry for Consul {
    /// Registers with the agent and keeps the registration alive; see the crate docs.
    async fn register(&self, registration: Registration) -> Result<RegistrationHandle, Error> {
        registry::register(self.api.clone(), registration).await
    }
}

#[async_trait]
impl Discovery for Consul {
    async fn instances(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
        let answer = self.api.health(service, &self.query, 0, self.wait).await?;
        Ok(answer.instances)
    }

    fn watch(&self, service: &ServiceName) -> Watch {
        watch::watch(
            self.api.clone(),
            &self.feed,
            service.clone(),
            watch::WatchConfig {
                query: self.query.clone(),
                wait: self.wait,
                rate_limit: self.rate_limit,
            },
        )
    }
}
