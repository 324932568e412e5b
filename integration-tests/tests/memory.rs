//! The conformance suite against the in-process backend.

use std::sync::Arc;
use std::time::Duration;

use waypost_conformance::{async_trait, conformance_tests, Backend};
use waypost_core::{Discovery, Registry};
use waypost_memory::Memory;

/// A fresh in-process registry per scenario, with a short TTL so that expiry is quick.
struct InProcess {
    memory: Memory,
}

#[async_trait]
impl Backend for InProcess {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(self.memory.clone())
    }

    fn discovery(&self) -> Arc<dyn Discovery> {
        Arc::new(self.memory.clone())
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// A Consul `-dev`-like restart: down for a moment, every registration forgotten.
    async fn restart(&self) -> Result<(), String> {
        self.memory.restart(Duration::from_millis(300)).await;
        Ok(())
    }
}

async fn start() -> InProcess {
    InProcess {
        memory: Memory::new(),
    }
}

conformance_tests!(start);
