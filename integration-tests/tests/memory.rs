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

/// The suite must fail backends that break the contract: these wrap the memory backend with
/// one flaw each and check that the matching scenario catches it.
mod flawed {
    use super::*;
    use waypost_conformance::{run, scenarios};
    use waypost_core::{Error, Registration, RegistrationHandle, StopMode};

    #[derive(Clone, Copy)]
    enum Flaw {
        /// `shutdown()` leaves the registration in place.
        KeepsOnShutdown,
        /// An abandoned registration keeps heart-beating: nothing ever expires.
        NeverExpires,
    }

    struct Flawed {
        memory: Memory,
        flaw: Flaw,
    }

    #[async_trait]
    impl Registry for Flawed {
        async fn register(&self, registration: Registration) -> Result<RegistrationHandle, Error> {
            let inner = self.memory.register(registration).await?;
            let flaw = self.flaw;
            Ok(RegistrationHandle::spawn(
                "flawed-memory",
                inner.instance().clone(),
                move |mut keep_alive| async move {
                    keep_alive.set_live();
                    match (keep_alive.stopped().await, flaw) {
                        (StopMode::Deregister, Flaw::KeepsOnShutdown) => inner.abandon().await,
                        (StopMode::Abandon, Flaw::NeverExpires) => {
                            // A leaked handle heart-beats until the runtime ends.
                            std::mem::forget(inner);
                            Ok(())
                        }
                        (StopMode::Deregister, _) => inner.shutdown().await,
                        (StopMode::Abandon, _) => inner.abandon().await,
                    }
                },
            ))
        }
    }

    struct FlawedBackend(Arc<Flawed>);

    #[async_trait]
    impl Backend for FlawedBackend {
        fn name(&self) -> &'static str {
            "flawed memory"
        }
        fn registry(&self) -> Arc<dyn Registry> {
            self.0.clone()
        }
        fn discovery(&self) -> Arc<dyn Discovery> {
            Arc::new(self.0.memory.clone())
        }
        fn ttl(&self) -> Duration {
            Duration::from_secs(1)
        }
        fn settle_bound(&self) -> Duration {
            Duration::from_secs(2)
        }
        async fn restart(&self) -> Result<(), String> {
            self.0.memory.restart(Duration::from_millis(100)).await;
            Ok(())
        }
    }

    fn with(flaw: Flaw) -> impl FnOnce() -> std::future::Ready<FlawedBackend> {
        move || {
            std::future::ready(FlawedBackend(Arc::new(Flawed {
                memory: Memory::new(),
                flaw,
            })))
        }
    }

    #[test]
    #[should_panic(expected = "a removed after shutdown")]
    fn deregister_on_shutdown_catches_a_backend_that_keeps_the_instance() {
        run("deregister_on_shutdown", with(Flaw::KeepsOnShutdown), |b| {
            Box::pin(scenarios::deregister_on_shutdown(b))
        });
    }

    #[test]
    #[should_panic(expected = "the abandoned instance expires")]
    fn ttl_expiry_catches_a_backend_that_never_expires() {
        run("ttl_expiry", with(Flaw::NeverExpires), |b| {
            Box::pin(scenarios::ttl_expiry(b))
        });
    }

    #[test]
    fn the_unflawed_wrapper_passes() {
        run("ttl_expiry", with(Flaw::KeepsOnShutdown), |b| {
            Box::pin(scenarios::ttl_expiry(b))
        });
    }
}
