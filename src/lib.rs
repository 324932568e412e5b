//! Waypost: service registration, discovery and client-side load balancing over Consul, etcd or
//! an in-process backend.
//!
//! This is the facade crate: it re-exports [`waypost_core`] at its root and, depending on its
//! Cargo features, the backends, the strategies and an HTTP client.
//!
//! # A short tour
//!
//! - A process announces itself with a [`Registration`] to a [`Registry`]; the
//!   [`RegistrationHandle`] keeps it alive in the background and deregisters on
//!   [`shutdown`](RegistrationHandle::shutdown).
//! - Clients find instances through a [`Discovery`]: [`instances`](Discovery::instances) now, or
//!   a [`Watch`] — a snapshot, then only the changes.
//! - A [`Balancer`] follows a watch and picks an instance per request with a [`Strategy`] (see
//!   [`strategies`]). Picks are lock-free; the [`PickGuard`] records in-flight count, outcome and
//!   latency, which load-aware strategies use.
//! - [`connect`] turns a backend URL (`memory://`, `consul://127.0.0.1:8500?dc=dc1`,
//!   `etcd://h1:2379,h2:2379/prefix`) into a [`Backend`]: a registry and a discovery of any
//!   backend, the typed form being [`BackendConfig`].
//! - With feature `http`, [`http::HttpClient`] sends HTTP requests to a logical service through a
//!   balancer, with timeouts and budgeted retries on another instance.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::Duration;
//! use waypost::memory::Memory;
//! use waypost::strategies::WeightedRoundRobin;
//! use waypost::{Balancer, Registration, Registry, ServiceName};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The in-process backend: a registry and a discovery in one.
//! let memory = Memory::new();
//! let light = Registration::builder("users", "users-a").host("10.0.0.1").port(8080).weight(1).build()?;
//! let heavy = Registration::builder("users", "users-b").host("10.0.0.2").port(8080).weight(3).build()?;
//! let a = memory.register(light).await?;
//! let b = memory.register(heavy).await?;
//!
//! // A balancer following the service, picking in proportion to weight.
//! let users: ServiceName = "users".parse()?;
//! let balancer = Balancer::watch(&memory, &users, WeightedRoundRobin::new());
//! assert!(balancer.wait_ready(Duration::from_secs(5)).await);
//!
//! let mut picks = BTreeMap::new();
//! for _ in 0..8 {
//!     let guard = balancer.pick()?;
//!     *picks.entry(guard.instance().id().to_string()).or_insert(0) += 1;
//!     guard.success(); // the call went well: recorded for load-aware strategies
//! }
//! assert_eq!(picks["users-a"], 2);
//! assert_eq!(picks["users-b"], 6);
//!
//! a.shutdown().await?; // deregisters
//! b.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! | feature | default | gives |
//! |---|---|---|
//! | `memory` | yes | [`memory`]: the in-process backend |
//! | `consul` | no | `consul`: the Consul backend |
//! | `etcd` | no | `etcd`: the etcd backend (needs `protoc` to build) |
//! | `dns` | no | `dns`: discovery from DNS SRV records |
//! | `classic` | yes | `round-robin`, `random`, `weighted-round-robin`, `least-connections` |
//! | `weighted-random`, `p2c`, `p2c-ewma`, `consistent-hash`, `maglev` | no | one strategy each |
//! | `resilience` | no | outlier ejection, slow start, panic threshold, zone preference, filters |
//! | `http` | yes | `http`: the HTTP client |
//! | `metrics` | yes | metrics through the `metrics` facade (nothing is recorded without a recorder) |
//! | `tower` | no | `tower`: a balancing tower `Service`, and a watch as a tower `Discover` |
//! | `grpc` | no | `grpc`: a channel for tonic clients, balanced by a `Balancer` |
//! | `full` | no | everything but `test-util` |
//! | `test-util` | no | test aids: the in-process backend's `Memory::set_available` and `Memory::restart`, and `testing::First` |
#![warn(missing_docs)]

pub use waypost_core::*;

mod connect;
#[cfg(feature = "consul")]
pub use connect::ConsulConfig;
#[cfg(feature = "etcd")]
pub use connect::EtcdConfig;
pub use connect::{connect, Backend, BackendConfig, ConfigError, ConnectError};

/// Load-balancing strategies: the ones this crate's features compile in.
///
/// [`StrategyKind`](strategies::StrategyKind) names them (`"p2c".parse()?`, `build()`);
/// [`by_name`](strategies::by_name) turns a name (`round-robin`, ...) into a strategy, and
/// [`names`](strategies::names) lists the names compiled in.
///
/// ```
/// let names = waypost::strategies::names();
/// assert!(names.contains(&"weighted-round-robin"));
/// for name in names {
///     let strategy = waypost::strategies::by_name(name).expect("every listed name resolves");
///     assert_eq!(strategy.name(), name);
/// }
/// ```
pub mod strategies {
    pub use waypost_strategies::*;
}

/// The in-process backend (feature `memory`): registry and discovery with TTL semantics, for
/// single-process use, tests and the quickstart.
///
/// ```
/// use waypost::memory::Memory;
/// use waypost::{Discovery, Registration, Registry, ServiceName};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let memory = Memory::new();
/// let handle = memory
///     .register(Registration::builder("users", "u1").host("127.0.0.1").port(8080).build()?)
///     .await?;
/// let users: ServiceName = "users".parse()?;
/// assert_eq!(memory.instances(&users).await?.len(), 1);
/// handle.shutdown().await?;
/// assert!(memory.instances(&users).await?.is_empty());
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "memory")]
pub mod memory {
    pub use waypost_memory::*;
}

/// The Consul backend (feature `consul`): agent registration with TTL/HTTP/TCP checks, health
/// queries and blocking-query watches. Configured from `CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`
/// and friends, or a builder.
#[cfg(feature = "consul")]
pub mod consul {
    pub use waypost_consul::*;
}

/// The etcd backend (feature `etcd`): one key per instance under a lease kept alive in the
/// background, prefix reads and revision-resumed watches. Endpoints from a builder or
/// `ETCD_ENDPOINTS`.
#[cfg(feature = "etcd")]
pub mod etcd {
    pub use waypost_etcd::*;
}

/// The DNS backend (feature `dns`): discovery only, from SRV records (a Consul agent's DNS
/// interface, or any `_service._proto.domain` zone), with polling watches. A server and domain
/// from a builder, or the system resolver configuration.
#[cfg(feature = "dns")]
pub mod dns {
    pub use waypost_dns::*;
}

#[cfg(feature = "http")]
pub mod http;

/// The instance metadata key that says how to reach an instance: with value `https`, the HTTP
/// client ([`http::HttpClient`], feature `http`) and the gRPC channel (`grpc::GrpcChannel`,
/// feature `grpc`) connect to it with TLS; without it, or with any other value, in plaintext.
///
/// A service that serves TLS registers it like any metadata: Consul keeps it in the service's
/// `Meta`, etcd in the instance's record.
///
/// ```
/// use waypost::{Registration, SCHEME_METADATA};
/// let registration = Registration::builder("users", "users-1")
///     .host("10.0.0.1")
///     .port(8443)
///     .meta(SCHEME_METADATA, "https")
///     .build()?;
/// let announced = registration.instance_or_host("10.0.0.1")?;
/// assert_eq!(announced.metadata()["scheme"], "https");
/// # Ok::<(), waypost::ValidationError>(())
/// ```
#[cfg(any(feature = "http", feature = "grpc"))]
pub const SCHEME_METADATA: &str = "scheme";

/// The README's Rust examples, compiled as doc tests so that they stay true.
#[cfg(all(doctest, feature = "memory", feature = "http", feature = "classic"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(feature = "tower")]
pub mod tower;

#[cfg(any(feature = "http", feature = "tower"))]
pub mod retry;

#[cfg(feature = "grpc")]
pub mod grpc;
