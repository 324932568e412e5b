//! Waypost's in-process registry and discovery: the embedded default, and the reference
//! behaviour the Consul and etcd backends are measured against.
//!
//! [`Memory`] implements both [`Registry`] and [`Discovery`] over state shared by all its
//! clones. It needs no server, and it behaves like one:
//!
//! - **TTL checks** ([`HealthCheck::Ttl`]): the handle heart-beats every TTL/3; an instance
//!   whose heartbeats stop (the handle was [abandoned](RegistrationHandle::abandon), the process
//!   hung) expires TTL after its last beat, and watchers see it removed.
//! - **TCP checks** ([`HealthCheck::Tcp`]): the backend connects to the address every interval;
//!   the instance is listed while the connection succeeds (from the first successful probe on).
//! - **HTTP checks** ([`HealthCheck::Http`]) and **gRPC checks** ([`HealthCheck::Grpc`]) are
//!   run **as TCP-connect checks** to the URL's or the target's host and port: the in-process
//!   backend carries no HTTP, gRPC or TLS client, so a check over TLS
//!   ([`HealthCheck::grpc_tls`]) is a TCP connect too. Consul runs real HTTP and gRPC checks.
//! - [`Registration::deregister_critical_after`] is not used: a TTL registration expires after
//!   its TTL anyway, and a checked one stays registered (unlisted while failing) for as long as
//!   its handle lives, since the handle would register it again at once.
//! - A registration without a host is registered at `127.0.0.1`. Registering an id again
//!   replaces the earlier registration (watchers see `Updated`).
//! - [`RegistrationHandle::shutdown`] removes the instance at once; dropping the handle does the
//!   same in the background.
//! - [`Discovery::instances`] lists the passing instances sorted by id;
//!   [`Discovery::watch`] delivers a snapshot at once, then only changes, and reports outages as
//!   errors without ending.
//!
//! For tests, with the crate feature `test-util` (off by default, like tokio's), it can
//! simulate what real servers do: `Memory::set_available` (an outage) and `Memory::restart`
//! (an outage that loses every registration, like a Consul `-dev` agent restart). Handles
//! recover by themselves, with jittered backoff, and watchers resync.
//!
//! ```toml
//! [dev-dependencies]
//! waypost-memory = { version = "0.1", features = ["test-util"] }
//! ```
//!
//! Background work (the TTL reaper, TCP probes, keep-alives) holds only weak references: it
//! ends once the last `Memory` clone is dropped.
//!
//! ```
//! use futures::StreamExt;
//! use waypost_core::{Discovery, Registration, Registry, WatchEvent};
//! use waypost_memory::Memory;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let memory = Memory::new();
//! let mut watch = memory.watch(&"users".parse()?);
//! assert_eq!(watch.next().await.transpose()?, Some(WatchEvent::Snapshot(vec![])));
//! assert_eq!(watch.next().await.transpose()?, Some(WatchEvent::Synced));
//!
//! let handle = memory
//!     .register(Registration::builder("users", "users-1").port(8080).weight(2).build()?)
//!     .await?;
//! assert!(matches!(watch.next().await.transpose()?, Some(WatchEvent::Added(i)) if i.authority() == "127.0.0.1:8080"));
//!
//! handle.shutdown().await?;
//! assert!(matches!(watch.next().await.transpose()?, Some(WatchEvent::Removed(_))));
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod check;
mod keepalive;
mod state;
mod watch;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use waypost_core::{
    Discovery, Error, HealthCheck, Registration, RegistrationHandle, Registry, ServiceInstance,
    ServiceName, Watch,
};

use state::Inner;

/// The backend name in errors.
pub(crate) const BACKEND: &str = "memory";

/// The host of a registration that names none.
///
/// ```
/// use waypost_core::{Registration, Registry};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let memory = waypost_memory::Memory::new();
/// let handle = memory.register(Registration::builder("users", "u1").port(80).build()?).await?;
/// assert_eq!(handle.instance().host(), waypost_memory::DEFAULT_HOST);
/// # Ok(())
/// # }
/// ```
pub const DEFAULT_HOST: &str = "127.0.0.1";

/// The in-process registry and discovery. Cheap to clone; clones share one registry.
///
/// See the [crate docs](crate) for its behaviour.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{Discovery, HealthCheck, Registration, Registry};
/// use waypost_memory::Memory;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let memory = Memory::new();
/// let reg = Registration::builder("orders", "orders-1")
///     .port(9000)
///     .tag("v2")
///     .check(HealthCheck::ttl(Duration::from_secs(5)))
///     .build()?;
/// let handle = memory.clone().register(reg).await?;
/// assert!(handle.wait_live().await.is_live());
/// let found = memory.instances(&"orders".parse()?).await?;
/// assert_eq!(found[0].tags(), ["v2"]);
/// # drop(handle);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Memory {
    inner: Arc<Inner>,
}

impl Memory {
    /// An empty, available registry. Needs no runtime; background tasks start on the runtime
    /// of the first registration.
    ///
    /// ```
    /// use waypost_core::Discovery;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let memory = waypost_memory::Memory::new();
    /// assert!(memory.instances(&"users".parse()?).await?.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn new() -> Self {
        Memory {
            inner: Arc::new(Inner::new()),
        }
    }

    /// **Test aid** (feature `test-util`): simulates an outage (`false`) and its end (`true`).
    ///
    /// While unavailable, every call fails with [`Error::Unavailable`]; watches yield that
    /// error once and keep going; heartbeats fail, so handles report
    /// [`Liveness::Recovering`](waypost_core::Liveness::Recovering) and retry with backoff.
    /// TTLs keep running meanwhile, as on a real server cut off from its clients: an outage
    /// longer than a TTL expires the registration, and its handle registers again afterwards.
    ///
    /// ```
    /// use waypost_core::{Discovery, Error};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let memory = waypost_memory::Memory::new();
    /// let users = "users".parse()?;
    /// memory.set_available(false);
    /// assert!(matches!(memory.instances(&users).await, Err(Error::Unavailable { .. })));
    /// memory.set_available(true);
    /// assert!(memory.instances(&users).await?.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(any(test, feature = "test-util"))]
    pub fn set_available(&self, available: bool) {
        self.inner.set_available(available);
    }

    /// Whether the registry answers: `false` during a simulated outage (feature `test-util`:
    /// `set_available(false)`, `restart`); always `true` without that feature.
    ///
    /// ```
    /// let memory = waypost_memory::Memory::new();
    /// assert!(memory.is_available());
    /// ```
    pub fn is_available(&self) -> bool {
        self.inner.is_available()
    }

    /// **Test aid** (feature `test-util`): a server restart that loses its state, like a
    /// Consul `-dev` agent's.
    ///
    /// The registry becomes unavailable, forgets every registration, stays down for `downtime`
    /// and serves again. Live handles notice on their next heartbeat (the registration is not
    /// found) and register again by themselves; watchers resync and tell only the real
    /// difference.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::{Discovery, Registration, Registry};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let memory = waypost_memory::Memory::new();
    /// let users = "users".parse()?;
    /// let handle = memory.register(Registration::builder("users", "u1").port(80).build()?).await?;
    /// memory.restart(Duration::from_millis(10)).await;
    /// // Forgotten until the handle's next heartbeat registers it again.
    /// assert!(memory.instances(&users).await?.is_empty());
    /// # drop(handle);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(any(test, feature = "test-util"))]
    pub async fn restart(&self, downtime: std::time::Duration) {
        self.inner.set_available(false);
        self.inner.forget_all();
        tokio::time::sleep(downtime).await;
        self.inner.set_available(true);
    }
}

impl Default for Memory {
    fn default() -> Self {
        Memory::new()
    }
}

impl fmt::Debug for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memory")
            .field("available", &self.is_available())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Registry for Memory {
    /// Stores the registration (at [`DEFAULT_HOST`] if it names no host) and spawns its
    /// keep-alive. Fails with [`Error::Unavailable`] during a simulated outage.
    async fn register(&self, registration: Registration) -> Result<RegistrationHandle, Error> {
        let instance = registration.instance_or_host(DEFAULT_HOST)?;
        let check: HealthCheck = registration.check().clone();
        // The first registration in its own span. The keep-alive task is spawned outside it:
        // core runs that task in a "registration" span with the same fields, which would
        // otherwise nest under this one.
        tracing::info_span!(
            "register",
            service = %instance.service(),
            instance = %instance.id(),
            backend = BACKEND,
        )
        .in_scope(
            || match keepalive::install(&self.inner, &instance, &check) {
                Ok(()) => {
                    tracing::debug!(address = %instance.authority(), "registered in memory");
                    Ok(())
                }
                Err(e) => {
                    tracing::debug!(error = %e, "registering in memory failed");
                    Err(e)
                }
            },
        )?;
        let inner = Arc::downgrade(&self.inner);
        let task_instance = instance.clone();
        Ok(RegistrationHandle::spawn(
            BACKEND,
            instance,
            move |keep_alive| keepalive::run(inner, task_instance, check, keep_alive),
        ))
    }
}

#[async_trait]
impl Discovery for Memory {
    async fn instances(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
        self.inner.list(service)
    }

    fn watch(&self, service: &ServiceName) -> Watch {
        watch::watch(&self.inner, service)
    }
}

#[cfg(test)]
mod tests;
