//! Waypost inside tower stacks (feature `tower`).
//!
//! Two ways in:
//! - [`Balanced`] (or [`BalanceLayer`]): a `Service` that picks through a Waypost
//!   [`Balancer`](waypost_core::Balancer), with any strategy and the resilience layer, for each
//!   request, records outcomes and latency through a [`Classify`] (HTTP and gRPC classifiers
//!   included), routes by a key from the request, and retries on another instance within the
//!   same budget as the HTTP client.
//! - [`discover`]: a watch as a tower `Discover`, for tower's own balancer.
//!
//! [`discover`] turns any backend's [`Watch`](waypost_core::Watch) into a tower
//! [`Discover`](::tower::discover::Discover), so that tower's own balancer (or anything else
//! that consumes one) follows Consul, etcd or the in-process registry: watch errors never
//! reach it, the last instance is kept when the backend reports none, and an instance is
//! replaced only when its address changes.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tower::balance::p2c::Balance;
//! use tower::load::Constant;
//! use tower::{service_fn, ServiceExt};
//! use waypost::memory::Memory;
//! use waypost::{Discovery, Registration, Registry, ServiceInstance};
//!
//! let memory = Memory::new();
//! let reg = Registration::builder("echo", "echo-1").host("127.0.0.1").port(7).build()?;
//! let _handle = memory.register(reg).await?;
//!
//! // One service per instance; here one that names the instance it was made for.
//! let make = |i: &ServiceInstance| {
//!     let id = i.id().to_string();
//!     Constant::new(
//!         service_fn(move |()| std::future::ready(Ok::<_, std::convert::Infallible>(id.clone()))),
//!         1u8,
//!     )
//! };
//! let discover = waypost::tower::discover(memory.watch(&"echo".parse()?), make);
//! let balance = Balance::new(discover);
//! let answer = tokio::time::timeout(Duration::from_secs(5), balance.oneshot(())).await?;
//! assert_eq!(answer.map_err(|e| e.to_string())?, "echo-1");
//! # Ok(())
//! # }
//! ```

mod classify;
mod discover;
mod service;

pub use classify::{Class, Classify, ErrIsFailure, GrpcStatus, HttpStatus, Retry};
pub use discover::{discover, Discover};
pub use service::{
    BalanceError, BalanceLayer, Balanced, BalancedBuilder, NoRetries, Route, WithRetries,
};

#[cfg(test)]
mod tests;
