//! Waypost's core: the types and traits every backend and strategy builds on.
//!
//! - [`ServiceInstance`], [`Registration`], [`HealthCheck`]: validated on construction, so bad
//!   input fails with a [`ValidationError`] naming the field before any I/O.
//! - [`Registry`]: register, and keep alive through a [`RegistrationHandle`].
//! - [`Discovery`]: the instances of a service now, and a [`Watch`] of [`WatchEvent`]s.
//! - [`Strategy`] / [`Picker`]: choose an instance for a request.
//! - [`Balancer`]: joins a watch to a strategy; lock-free picks, fail-static updates; failover
//!   across ordered tiers (datacenters, registries) with [`BalancerBuilder::tier`] (see
//!   [Failover tiers](#failover-tiers)).
//!
//! No backend code lives here: a custom backend depends on this crate alone.
//!
//! # Failover tiers
//!
//! A balancer with several tiers ([`BalancerBuilder::tier`], the first one preferred) shares
//! the traffic between them by the rule of Envoy's priority levels. Each tier's *health* is the
//! share of its instances that are not [critical](Health::Critical); an instance that a higher
//! tier serves is counted there only. The first tier takes `health × overprovisioning` of the
//! traffic ([`BalancerBuilder::overprovisioning`]: 140 % by default,
//! [`DEFAULT_OVERPROVISIONING`], so a tier with 72 % of its instances healthy still takes all
//! of it); what it cannot take spills to the next tier, by the same rule, and so on. When the
//! tiers together cannot take all of it, each takes a share in proportion to what it can take.
//! When no tier has a healthy instance (panic), the first tier that still serves a set (its
//! last one, kept fail-static) takes everything.
//!
//! [`Balancer::tiers`] reports each tier's health and share as a [`TierStatus`]; its example
//! shows a first tier with half of its instances healthy taking 70 % of the traffic.
//!
//! # Metrics (feature `metrics`)
//!
//! Waypost's metrics go through the [`metrics`](https://docs.rs/metrics) facade: the
//! application installs a recorder (a Prometheus exporter, say); with none installed, the
//! handles are no-ops. Handles are registered when a balancer, an endpoint or a registration is
//! created, never on the pick path: a pick then costs an atomic operation per series, and
//! allocates nothing. Without the feature nothing is recorded and every call compiles to
//! nothing.
//!
//! The names and labels (dashboards rely on them; the facade's README lists them all):
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `waypost_membership_total`, `waypost_membership_served`, `waypost_fail_static` | gauge | `service` |
//! | `waypost_watch_events_total` | counter | `service`, `kind` |
//! | `waypost_watch_errors_total` | counter | `service`, `backend` |
//! | `waypost_requests_total` | counter | `service`, `instance`, `outcome` |
//! | `waypost_requests_active` | gauge | `service`, `instance` |
//! | `waypost_request_duration_seconds` | histogram | `service`, `instance` |
//! | `waypost_tier_share` (a balancer with failover tiers only) | gauge | `service`, `tier` |
//! | `waypost_registration_live` | gauge | `service`, `instance`, `backend` |
//! | `waypost_heartbeat_failures_total` | counter | `service`, `instance`, `backend` |
//!
//! A balancer built with
//! [`metric_instance_labels(false)`](BalancerBuilder::metric_instance_labels) leaves the
//! `instance` label off its request series.
#![warn(missing_docs)]

mod backoff;
mod balancer;
mod clock;
mod discovery;
mod endpoint;
mod error;
mod event;
mod host;
mod instance;
mod metrics;
mod registration;
mod registry;
mod set;
mod strategy;
#[cfg(feature = "test-util")]
pub mod testing;
mod tiers;

pub use backoff::Backoff;
pub use balancer::{
    Balancer, BalancerBuilder, BalancerStatus, FailStatic, NotReady, PickError, PickGuard,
};
pub use discovery::Discovery;
pub use endpoint::{clock_nanos, Endpoint, EndpointState, Outcome, EWMA_DECAY};
pub use error::{Cause, Error, Field, Problem, ValidationError};
pub use event::{Watch, WatchEvent};
pub use host::local_ipv4;
pub use instance::{Health, InstanceBuilder, InstanceId, ServiceInstance, ServiceName, Weight};
pub use registration::{CheckTls, HealthCheck, Registration, RegistrationBuilder};
pub use registry::{KeepAlive, Liveness, RegistrationHandle, Registry, StopMode};
pub use set::InstanceSet;
pub use strategy::{PickContext, Picker, Strategy};
pub use tiers::{TierStatus, DEFAULT_OVERPROVISIONING};

/// Re-exported so that implementors use the same `async_trait` as the traits.
pub use async_trait::async_trait;
