//! Waypost's backend conformance suite, and harnesses that start real Consul and etcd servers.
//!
//! The suite is a set of [`scenarios`], each an `async fn(&impl Backend)` that plays one or more
//! processes against a backend and checks what a [`Registry`] and a [`Discovery`] must do:
//! round-trips, watches (snapshot first, then only changes), TTL expiry, deregistration,
//! liveness, resync after a restart, several watchers, many instances and bad input. Every wait
//! is bounded polling (up to a deadline taken from the [`Backend`]), never a fixed sleep.
//!
//! # Running it against your own backend
//!
//! A backend crate (Waypost's own or a third party's) adds
//!
//! ```toml
//! [dev-dependencies]
//! waypost-conformance = "0.1"
//! ```
//!
//! implements [`Backend`] in an integration test and invokes [`conformance_tests!`] with an
//! `async fn` that starts a fresh backend. The macro expands to one `#[test]` per scenario
//! (each on its own multi-threaded Tokio runtime with two workers), named like the scenario, so
//! they run in parallel and fail individually. The crate using the macro needs no Tokio
//! dependency of its own.
//!
//! (The example is `no_run`: the macro expands to `#[test]` functions, which a doc test
//! compiles but never runs. This crate's `tests/memory.rs` runs the suite this way.)
//!
//! ```no_run
//! // tests/conformance.rs of a backend crate
//! use std::sync::Arc;
//! use waypost_conformance::{async_trait, conformance_tests, Backend};
//! use waypost_core::{Discovery, Registry};
//!
//! struct Mine {
//!     // A running server and what is needed to reach it; here the in-process backend.
//!     memory: waypost_memory::Memory,
//! }
//!
//! #[async_trait]
//! impl Backend for Mine {
//!     fn name(&self) -> &'static str {
//!         "mine"
//!     }
//!     fn registry(&self) -> Arc<dyn Registry> {
//!         Arc::new(self.memory.clone())
//!     }
//!     fn discovery(&self) -> Arc<dyn Discovery> {
//!         Arc::new(self.memory.clone())
//!     }
//!     async fn restart(&self) -> Result<(), String> {
//!         // Stop the server and start it again on the same address.
//!         self.memory.restart(std::time::Duration::from_millis(200)).await;
//!         Ok(())
//!     }
//! }
//!
//! /// A fresh backend for each scenario.
//! async fn start() -> Mine {
//!     Mine { memory: waypost_memory::Memory::new() }
//! }
//!
//! conformance_tests!(start);
//! # fn main() {}
//! ```
//!
//! A single scenario can also be called directly from any async test:
//! `waypost_conformance::scenarios::ttl_expiry(&backend).await`.
#![warn(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

pub use async_trait::async_trait;
use waypost_core::{Discovery, Registry};

#[cfg(feature = "servers")]
pub mod consul_server;
#[cfg(feature = "servers")]
pub mod consul_wan;
#[cfg(feature = "servers")]
pub mod etcd_server;
pub mod gate;
pub mod harness;
pub mod scenarios;
pub mod sockets;
pub mod watch_errors;

/// A backend under test: a running server (or in-process state) and clients for it.
///
/// Every scenario gets a fresh `Backend` from the factory given to [`conformance_tests!`], so
/// scenarios run in parallel without sharing servers. The bounds below are correctness bounds
/// (how long a scenario waits before it fails), not speed targets: scenarios return as soon as
/// the expected state is reached.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use waypost_conformance::{async_trait, Backend};
/// use waypost_core::{Discovery, Registry};
/// use waypost_memory::Memory;
///
/// struct InProcess(Memory);
///
/// #[async_trait]
/// impl Backend for InProcess {
///     fn name(&self) -> &'static str { "memory" }
///     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
///     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
///     fn ttl(&self) -> Duration { Duration::from_secs(1) }
///     async fn restart(&self) -> Result<(), String> {
///         self.0.restart(Duration::from_millis(100)).await;
///         Ok(())
///     }
/// }
///
/// let b = InProcess(Memory::new());
/// assert_eq!(b.expiry_bound(), Duration::from_secs(4));
/// ```
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for messages (`memory`, `consul`, `etcd`).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let backend = InProcess(Memory::new());
    /// assert_eq!(backend.name(), "memory");
    /// // Messages about the backend name it, like the default partition()'s:
    /// let err = backend.partition().await.unwrap_err();
    /// assert!(err.contains("the memory test harness"), "{err}");
    /// # Ok(())
    /// # }
    /// ```
    fn name(&self) -> &'static str;

    /// A registry client (a new one each call: scenarios use several to play several processes).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use waypost_core::Registration;
    ///
    /// let backend = InProcess(Memory::new());
    /// // Two processes, two clients: both instances are listed.
    /// let one = backend.registry().register(Registration::builder("users", "u1").port(80).build()?).await?;
    /// let two = backend.registry().register(Registration::builder("users", "u2").port(81).build()?).await?;
    /// assert_eq!(backend.discovery().instances(&"users".parse()?).await?.len(), 2);
    /// # one.shutdown().await?;
    /// # two.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    fn registry(&self) -> Arc<dyn Registry>;

    /// A discovery client.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// use waypost_core::{Registration, WatchEvent};
    ///
    /// let backend = InProcess(Memory::new());
    /// let handle = backend.registry().register(Registration::builder("users", "u1").port(80).build()?).await?;
    /// handle.wait_live().await;
    /// // What the registry announced, the discovery finds: now, and as a watch's snapshot.
    /// let users = "users".parse()?;
    /// assert_eq!(backend.discovery().instances(&users).await?.len(), 1);
    /// let mut watch = backend.discovery().watch(&users);
    /// assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Snapshot(all))) if all.len() == 1));
    /// # handle.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    fn discovery(&self) -> Arc<dyn Discovery>;

    /// The TTL the expiry scenario registers with (the shortest the backend honours well).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// /// A backend that expires a registration 1 s after its last heartbeat.
    /// struct Quick(InProcess);
    /// #[async_trait]
    /// impl Backend for Quick {
    ///     fn name(&self) -> &'static str { "quick" }
    ///     fn registry(&self) -> Arc<dyn Registry> { self.0.registry() }
    ///     fn discovery(&self) -> Arc<dyn Discovery> { self.0.discovery() }
    ///     async fn restart(&self) -> Result<(), String> { self.0.restart().await }
    ///     fn ttl(&self) -> Duration { Duration::from_secs(1) }
    /// }
    /// let quick = Quick(InProcess(Memory::new()));
    /// assert_eq!(quick.ttl(), Duration::from_secs(1));
    /// assert_eq!(quick.0.ttl(), Duration::from_secs(2)); // the default
    /// ```
    fn ttl(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// How long after an abandoned registration's last heartbeat the backend must have removed
    /// it: a correctness bound, generous enough for a loaded CI machine.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// let backend = InProcess(Memory::new());
    /// // The default: the TTL plus 3 s of slack.
    /// assert_eq!(backend.expiry_bound(), backend.ttl() + Duration::from_secs(3));
    /// ```
    fn expiry_bound(&self) -> Duration {
        self.ttl() + Duration::from_secs(3)
    }

    /// Makes the backend unavailable and brings it back the way a real restart does (a Consul
    /// `-dev` agent forgets everything; etcd keeps its data). Returns when it serves again.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use waypost_core::Registration;
    ///
    /// let backend = InProcess(Memory::new());
    /// let users = "users".parse()?;
    /// let handle = backend.registry().register(Registration::builder("users", "u1").port(80).build()?).await?;
    /// backend.restart().await?;
    /// // It serves again, and (like a Consul -dev agent) forgot the registration, which the handle
    /// // makes again on its next heartbeat.
    /// assert!(backend.discovery().instances(&users).await?.is_empty());
    /// # handle.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    async fn restart(&self) -> Result<(), String>;

    /// Cuts the clients from [`registry`](Self::registry) and [`discovery`](Self::discovery)
    /// off from the backend without losing any of its data, as a network partition does: calls
    /// fail and watches yield errors until [`heal`](Self::heal). For a server, put a
    /// [`Gate`](crate::gate::Gate) between the clients and it.
    ///
    /// The default fails, naming the method: a backend's test harness that cannot do this fails
    /// the `outage_without_change` scenario rather than pass it unchecked.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// #     async fn partition(&self) -> Result<(), String> { self.0.set_available(false); Ok(()) }
    /// #     async fn heal(&self) -> Result<(), String> { self.0.set_available(true); Ok(()) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use waypost_core::{Error, Registration};
    ///
    /// // Here partition() and heal() switch the in-process registry off and on
    /// // (Memory::set_available): it stops answering, and keeps its data.
    /// let backend = InProcess(Memory::new());
    /// let users = "users".parse()?;
    /// let handle = backend.registry().register(Registration::builder("users", "u1").port(80).build()?).await?;
    /// backend.partition().await?;
    /// assert!(matches!(backend.discovery().instances(&users).await, Err(Error::Unavailable { .. })));
    /// backend.heal().await?;
    /// assert_eq!(backend.discovery().instances(&users).await?.len(), 1); // nothing was lost
    /// # handle.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    async fn partition(&self) -> Result<(), String> {
        Err(format!(
            "the {} test harness does not implement Backend::partition",
            self.name()
        ))
    }

    /// Ends a [`partition`](Self::partition).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// /// A harness that cannot cut its clients off.
    /// struct NoGate(InProcess);
    /// #[async_trait]
    /// impl Backend for NoGate {
    ///     fn name(&self) -> &'static str { "no-gate" }
    ///     fn registry(&self) -> Arc<dyn Registry> { self.0.registry() }
    ///     fn discovery(&self) -> Arc<dyn Discovery> { self.0.discovery() }
    ///     async fn restart(&self) -> Result<(), String> { self.0.restart().await }
    /// }
    /// // The defaults fail, naming what is missing.
    /// let backend = NoGate(InProcess(Memory::new()));
    /// let err = backend.heal().await.unwrap_err();
    /// assert_eq!(err, "the no-gate test harness does not implement Backend::heal");
    /// # Ok(())
    /// # }
    /// ```
    async fn heal(&self) -> Result<(), String> {
        Err(format!(
            "the {} test harness does not implement Backend::heal",
            self.name()
        ))
    }

    /// The longest a watch or a registration waits between two attempts while the backend is
    /// unreachable (its backoff cap). After a [`heal`](Self::heal), a watch must say it is in
    /// sync again within this period (plus two seconds of slack for a loaded machine).
    /// Default 5 s.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// assert_eq!(InProcess(Memory::new()).retry_period(), Duration::from_secs(5));
    /// ```
    fn retry_period(&self) -> Duration {
        Duration::from_secs(5)
    }

    /// How long a change (a registration, a deregistration) may take to show in
    /// [`Discovery::instances`] and in a watch. Default 10 s.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use waypost_conformance::scenarios::eventually;
    /// use waypost_core::Registration;
    ///
    /// let backend = InProcess(Memory::new());
    /// assert_eq!(backend.settle_bound(), Duration::from_secs(10));
    /// // How scenarios wait for a change: polling, for at most the bound.
    /// let handle = backend.registry().register(Registration::builder("users", "u1").port(80).build()?).await?;
    /// let users = "users".parse()?;
    /// let listed = eventually(backend.settle_bound(), "u1 is listed", || async {
    ///     match backend.discovery().instances(&users).await {
    ///         Ok(list) if !list.is_empty() => Ok(list.len()),
    ///         other => Err(format!("{other:?}")),
    ///     }
    /// })
    /// .await;
    /// assert_eq!(listed, 1);
    /// # handle.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    fn settle_bound(&self) -> Duration {
        Duration::from_secs(10)
    }

    /// How long after [`restart`](Self::restart) returns the registrations and watches may take
    /// to heal (reconnect backoff included). Default 30 s.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// assert_eq!(InProcess(Memory::new()).heal_bound(), Duration::from_secs(30));
    /// ```
    fn heal_bound(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// The host scenarios register their instances with. Default `127.0.0.1`.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// let backend = InProcess(Memory::new());
    /// assert_eq!(backend.host(), "127.0.0.1");
    /// ```
    fn host(&self) -> String {
        "127.0.0.1".to_owned()
    }

    /// `Some(reason)` for a backend that only discovers (DNS, say): the scenarios whose subject
    /// is the registry ([`scenarios::REGISTRATION`]) are skipped, printing `reason`, and
    /// [`registry`](Self::registry) must return the test's *fixture*: a registry that puts
    /// instances where this backend's discovery finds them. Default `None`.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// use waypost_conformance::{run, scenarios};
    ///
    /// /// A discovery that only reads what something else wrote (DNS records, say); here the
    /// /// in-process registry plays both the fixture and the records.
    /// struct ReadOnly(InProcess);
    /// #[async_trait]
    /// impl Backend for ReadOnly {
    ///     fn name(&self) -> &'static str { "read-only" }
    ///     fn registry(&self) -> Arc<dyn Registry> { self.0.registry() }
    ///     fn discovery(&self) -> Arc<dyn Discovery> { self.0.discovery() }
    ///     async fn restart(&self) -> Result<(), String> { self.0.restart().await }
    ///     fn discovery_only(&self) -> Option<&'static str> {
    ///         Some("it only reads records; the registry is a test fixture")
    ///     }
    /// }
    /// assert_eq!(InProcess(Memory::new()).discovery_only(), None); // the default
    /// // A registration scenario is skipped for it, with the reason printed.
    /// assert!(scenarios::REGISTRATION.contains(&"duplicate_ids"));
    /// run(
    ///     "duplicate_ids",
    ///     || async { ReadOnly(InProcess(Memory::new())) },
    ///     |backend| Box::pin(scenarios::duplicate_ids(backend)),
    /// );
    /// ```
    fn discovery_only(&self) -> Option<&'static str> {
        None
    }

    /// What the discovery reports of an instance, so that scenarios compare only that.
    /// Default [`Describes::Everything`].
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use waypost_conformance::{async_trait, Backend};
    /// # use waypost_core::{Discovery, Registry};
    /// # use waypost_memory::Memory;
    /// # /// The in-process backend, as its own conformance test sets it up.
    /// # struct InProcess(Memory);
    /// # #[async_trait]
    /// # impl Backend for InProcess {
    /// #     fn name(&self) -> &'static str { "memory" }
    /// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
    /// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
    /// #     async fn restart(&self) -> Result<(), String> {
    /// #         self.0.restart(Duration::from_millis(50)).await;
    /// #         Ok(())
    /// #     }
    /// # }
    /// use waypost_conformance::Describes;
    /// assert_eq!(InProcess(Memory::new()).describes(), Describes::Everything);
    /// ```
    fn describes(&self) -> Describes {
        Describes::Everything
    }
}

/// What a backend's discovery reports of a registered instance; see [`Backend::describes`].
///
/// ```
/// use waypost_conformance::Describes;
/// assert_ne!(Describes::Everything, Describes::Address);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Describes {
    /// The id, address, tags, metadata, weight and zone, as registered.
    Everything,
    /// The address only (DNS SRV records): an instance's id is its `host:port` (as
    /// [`ServiceInstance::authority`](waypost_core::ServiceInstance::authority) writes it), and
    /// tags, metadata, weight and zone are not compared. A change of anything but the address
    /// is invisible, and a change of address is a removal and an addition.
    Address,
}

#[async_trait]
impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn registry(&self) -> Arc<dyn Registry> {
        (**self).registry()
    }
    fn discovery(&self) -> Arc<dyn Discovery> {
        (**self).discovery()
    }
    fn ttl(&self) -> Duration {
        (**self).ttl()
    }
    fn expiry_bound(&self) -> Duration {
        (**self).expiry_bound()
    }
    async fn restart(&self) -> Result<(), String> {
        (**self).restart().await
    }
    async fn partition(&self) -> Result<(), String> {
        (**self).partition().await
    }
    async fn heal(&self) -> Result<(), String> {
        (**self).heal().await
    }
    fn retry_period(&self) -> Duration {
        (**self).retry_period()
    }
    fn settle_bound(&self) -> Duration {
        (**self).settle_bound()
    }
    fn heal_bound(&self) -> Duration {
        (**self).heal_bound()
    }
    fn host(&self) -> String {
        (**self).host()
    }
    fn discovery_only(&self) -> Option<&'static str> {
        (**self).discovery_only()
    }
    fn describes(&self) -> Describes {
        (**self).describes()
    }
}

/// Runs one scenario the way [`conformance_tests!`] does: on a fresh multi-threaded Tokio
/// runtime with two workers (what `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`
/// sets up), against a backend from `factory`, within
/// [`scenario_time_limit`](scenarios::scenario_time_limit) so that a hung backend fails the
/// test instead of hanging the run. Panics (fails the test) when the scenario does.
///
/// Useful to run a scenario against a backend set up differently from the macro's factory.
///
/// ```
/// use std::sync::Arc;
/// use waypost_conformance::{async_trait, run, scenarios, Backend};
/// use waypost_core::{Discovery, Registry};
///
/// struct InProcess(waypost_memory::Memory);
/// #[async_trait]
/// impl Backend for InProcess {
///     fn name(&self) -> &'static str { "memory" }
///     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
///     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
///     async fn restart(&self) -> Result<(), String> { Ok(()) }
/// }
///
/// run(
///     "bad_input",
///     || async { InProcess(waypost_memory::Memory::new()) },
///     |backend| Box::pin(scenarios::bad_input(backend)),
/// );
/// ```
pub fn run<B, F, Fut, S>(name: &str, factory: F, scenario: S)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = B>,
    S: for<'a> FnOnce(&'a B) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>,
    B: Backend,
{
    run_skipping(name, &[], factory, scenario)
}

/// [`run`], unless `skip` names the scenario (with the reason) or the backend is
/// [discovery-only](Backend::discovery_only) and the scenario is one of
/// [`scenarios::REGISTRATION`]: then it prints `conformance: <scenario> skipped for <backend>:
/// <reason>` to the terminal (past the test harness's output capture, so that `cargo test`
/// shows it) and returns. What [`conformance_tests!`]'s `skip` list calls.
///
/// ```
/// use std::sync::Arc;
/// use waypost_conformance::{async_trait, run_skipping, scenarios, Backend};
/// use waypost_core::{Discovery, Registry};
///
/// struct InProcess(waypost_memory::Memory);
/// #[async_trait]
/// impl Backend for InProcess {
///     fn name(&self) -> &'static str { "memory" }
///     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
///     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
///     async fn restart(&self) -> Result<(), String> { Ok(()) }
/// }
///
/// // Skipped: the scenario does not run (it would fail: restart() above does nothing).
/// run_skipping(
///     "reconnect_resync",
///     &[("reconnect_resync", "this example's restart() does nothing")],
///     || async { InProcess(waypost_memory::Memory::new()) },
///     |backend| Box::pin(scenarios::reconnect_resync(backend)),
/// );
/// ```
pub fn run_skipping<B, F, Fut, S>(name: &str, skip: &[(&str, &str)], factory: F, scenario: S)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = B>,
    S: for<'a> FnOnce(&'a B) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>,
    B: Backend,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("scenario {name}: cannot build a Tokio runtime: {e}"),
    };
    rt.block_on(async {
        let backend = factory().await;
        let reason = skip
            .iter()
            .find(|(s, _)| *s == name)
            .map(|(_, why)| *why)
            .or_else(|| {
                backend
                    .discovery_only()
                    .filter(|_| scenarios::REGISTRATION.contains(&name))
            });
        if let Some(reason) = reason {
            use std::io::Write;
            // Straight to the terminal: `cargo test` captures print! output of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "conformance: {name} skipped for {}: {reason}",
                backend.name()
            );
            return;
        }
        let limit = scenarios::scenario_time_limit(&backend);
        if tokio::time::timeout(limit, scenario(&backend))
            .await
            .is_err()
        {
            panic!(
                "[{}] scenario {name} did not finish within {limit:?}",
                backend.name()
            );
        }
    });
}

/// Expands to one test per conformance scenario, run against the backend that `$factory`
/// (a path to an `async fn() -> B` with `B:` [`Backend`]) starts afresh for each test.
///
/// Each test is named like its scenario (see [`scenarios`]) and runs on its own
/// multi-threaded Tokio runtime with two worker threads, so the scenarios run in parallel
/// and report individually. See the [crate docs](crate) for a full example.
///
/// A scenario the backend cannot meet for a reason of its own is skipped by name, with the
/// reason, which `cargo test` prints (see [`run_skipping`]); a test checks that every name in
/// the list is a scenario:
///
/// ```text
/// waypost_conformance::conformance_tests!(start, skip = [
///     ttl_expiry => "the registry keeps entries until told otherwise; it has no TTL",
/// ]);
/// ```
///
/// A [discovery-only](Backend::discovery_only) backend needs no list for the registration
/// scenarios: they are skipped with the reason the backend gives.
///
/// (`no_run`: the expansion is `#[test]` functions, which a doc test does not run.)
///
/// ```no_run
/// # use std::sync::Arc;
/// # use waypost_conformance::{async_trait, Backend};
/// # use waypost_core::{Discovery, Registry};
/// # struct Mine(waypost_memory::Memory);
/// # #[async_trait]
/// # impl Backend for Mine {
/// #     fn name(&self) -> &'static str { "mine" }
/// #     fn registry(&self) -> Arc<dyn Registry> { Arc::new(self.0.clone()) }
/// #     fn discovery(&self) -> Arc<dyn Discovery> { Arc::new(self.0.clone()) }
/// #     async fn restart(&self) -> Result<(), String> { Ok(()) }
/// # }
/// async fn start() -> Mine {
///     Mine(waypost_memory::Memory::new())
/// }
/// waypost_conformance::conformance_tests!(start);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($factory:path) => {
        $crate::conformance_tests!($factory, skip = []);
    };
    ($factory:path, skip = [$($skip:ident => $reason:literal),* $(,)?]) => {
        const CONFORMANCE_SKIPS: &[(&str, &str)] = &[$((::core::stringify!($skip), $reason)),*];

        /// Every scenario the skip list names exists (a misspelt name would skip nothing).
        #[test]
        fn conformance_skips_name_real_scenarios() {
            for (name, reason) in CONFORMANCE_SKIPS {
                assert!(
                    $crate::scenarios::ALL.contains(name),
                    "the skip list names {name:?}, which is no scenario (reason given: {reason})"
                );
                assert!(!reason.trim().is_empty(), "skipping {name} needs a reason");
            }
        }

        $crate::conformance_tests!(@each $factory;
            register_then_discover,
            watch_starts_with_snapshot,
            watch_add_update_remove,
            ttl_expiry,
            deregister_on_shutdown,
            drop_deregisters,
            liveness_is_reported,
            reconnect_resync,
            outage_without_change,
            several_watchers_same_service,
            many_instances,
            unknown_service,
            duplicate_ids,
            bulk_churn,
            bad_input,
        );
    };
    (@each $factory:path; $($scenario:ident),+ $(,)?) => {
        $(
            #[test]
            fn $scenario() {
                $crate::run_skipping(
                    ::core::stringify!($scenario),
                    CONFORMANCE_SKIPS,
                    $factory,
                    |backend| ::std::boxed::Box::pin($crate::scenarios::$scenario(backend)),
                );
            }
        )+
    };
}
