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

pub mod consul_server;
pub mod etcd_server;
pub mod gate;
pub mod scenarios;

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
    fn name(&self) -> &'static str;

    /// A registry client (a new one each call: scenarios use several to play several processes).
    fn registry(&self) -> Arc<dyn Registry>;

    /// A discovery client.
    fn discovery(&self) -> Arc<dyn Discovery>;

    /// The TTL the expiry scenario registers with (the shortest the backend honours well).
    fn ttl(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// How long after an abandoned registration's last heartbeat the backend must have removed
    /// it: a correctness bound, generous enough for a loaded CI machine.
    fn expiry_bound(&self) -> Duration {
        self.ttl() + Duration::from_secs(3)
    }

    /// Makes the backend unavailable and brings it back the way a real restart does (a Consul
    /// `-dev` agent forgets everything; etcd keeps its data). Returns when it serves again.
    async fn restart(&self) -> Result<(), String>;

    /// Cuts the clients from [`registry`](Self::registry) and [`discovery`](Self::discovery)
    /// off from the backend without losing any of its data, as a network partition does: calls
    /// fail and watches yield errors until [`heal`](Self::heal). For a server, put a
    /// [`Gate`](crate::gate::Gate) between the clients and it.
    ///
    /// The default fails, naming the method: a backend's test harness that cannot do this fails
    /// the `outage_without_change` scenario rather than pass it unchecked.
    async fn partition(&self) -> Result<(), String> {
        Err(format!(
            "the {} test harness does not implement Backend::partition",
            self.name()
        ))
    }

    /// Ends a [`partition`](Self::partition).
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
    fn retry_period(&self) -> Duration {
        Duration::from_secs(5)
    }

    /// How long a change (a registration, a deregistration) may take to show in
    /// [`Discovery::instances`] and in a watch. Default 10 s.
    fn settle_bound(&self) -> Duration {
        Duration::from_secs(10)
    }

    /// How long after [`restart`](Self::restart) returns the registrations and watches may take
    /// to heal (reconnect backoff included). Default 30 s.
    fn heal_bound(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// The host scenarios register their instances with. Default `127.0.0.1`.
    fn host(&self) -> String {
        "127.0.0.1".to_owned()
    }
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
            bad_input,
        );
    };
    (@each $factory:path; $($scenario:ident),+ $(,)?) => {
        $(
            #[test]
            fn $scenario() {
                $crate::run(
                    ::core::stringify!($scenario),
                    $factory,
                    |backend| ::std::boxed::Box::pin($crate::scenarios::$scenario(backend)),
                );
            }
        )+
    };
}
