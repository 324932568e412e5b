//! Waypost's core: the types and traits every backend and strategy builds on.
//!
//! - [`ServiceInstance`], [`Registration`], [`HealthCheck`]: validated on construction, so bad
//!   input fails with a [`ValidationError`] naming the field before any I/O.
//! - [`Registry`]: register, and keep alive through a [`RegistrationHandle`].
//! - [`Discovery`]: the instances of a service now, and a [`Watch`] of [`WatchEvent`]s.
//! - [`Strategy`] / [`Picker`]: choose an instance for a request.
//! - [`Balancer`]: joins a watch to a strategy; lock-free picks, fail-static updates; failover
//!   across ordered tiers (datacenters, registries) with [`BalancerBuilder::tier`].
//!
//! No backend code lives here: a custom backend depends on this crate alone.
#![warn(missing_docs)]

mod backoff;
mod balancer;
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
pub use registration::{HealthCheck, Registration, RegistrationBuilder};
pub use registry::{KeepAlive, Liveness, RegistrationHandle, Registry, StopMode};
pub use set::InstanceSet;
pub use strategy::{PickContext, Picker, Strategy};
pub use tiers::{TierStatus, DEFAULT_OVERPROVISIONING};

/// Re-exported so that implementors use the same `async_trait` as the traits.
pub use async_trait::async_trait;
