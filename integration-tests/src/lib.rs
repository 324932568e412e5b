//! Waypost's backend conformance suite, and harnesses that start real Consul and etcd servers.
//!
//! A backend crate runs the whole suite against its own backend by implementing [`Backend`] and
//! invoking [`conformance_tests!`] in an integration test:
//!
//! ```ignore
//! // tests/conformance.rs of a third-party backend crate, with
//! // [dev-dependencies] waypost-conformance = "0.1"
//! struct Mine { /* a running server, a client */ }
//! #[waypost_conformance::async_trait]
//! impl waypost_conformance::Backend for Mine { /* ... */ }
//! async fn start() -> Mine { /* start a fresh server */ }
//! waypost_conformance::conformance_tests!(start);
//! ```
#![warn(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

pub use async_trait::async_trait;
use waypost_core::{Discovery, Registry};

/// A backend under test: a running server (or in-process state) and clients for it.
///
/// Every scenario gets a fresh `Backend` from the factory given to [`conformance_tests!`], so
/// scenarios run in parallel without sharing servers.
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
}
