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

    async fn partition(&self) -> Result<(), String> {
        self.memory.set_available(false);
        Ok(())
    }

    async fn heal(&self) -> Result<(), String> {
        self.memory.set_available(true);
        Ok(())
    }

    fn retry_period(&self) -> Duration {
        // Watches re-read on the availability signal itself; handles retry within a second.
        Duration::from_secs(1)
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
    use futures::StreamExt;
    use waypost_conformance::{run, scenarios};
    use waypost_core::{Error, Registration, RegistrationHandle, StopMode, WatchEvent};

    #[derive(Clone, Copy)]
    enum Flaw {
        /// `shutdown()` leaves the registration in place.
        KeepsOnShutdown,
        /// An abandoned registration keeps heart-beating: nothing ever expires.
        NeverExpires,
        /// The watch says `Synced` after its snapshot only, never after an outage.
        NeverResyncs,
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
            self.0.clone()
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
        async fn partition(&self) -> Result<(), String> {
            self.0.memory.set_available(false);
            Ok(())
        }
        async fn heal(&self) -> Result<(), String> {
            self.0.memory.set_available(true);
            Ok(())
        }
        fn retry_period(&self) -> Duration {
            Duration::from_secs(1)
        }
    }

    #[async_trait]
    impl Discovery for Flawed {
        async fn instances(
            &self,
            service: &waypost_core::ServiceName,
        ) -> Result<Vec<waypost_core::ServiceInstance>, Error> {
            self.memory.instances(service).await
        }
        fn watch(&self, service: &waypost_core::ServiceName) -> waypost_core::Watch {
            let watch = self.memory.watch(service);
            if !matches!(self.flaw, Flaw::NeverResyncs) {
                return watch;
            }
            let mut first = true;
            watch
                .filter(move |item| {
                    let keep = !matches!(item, Ok(WatchEvent::Synced)) || first;
                    if matches!(item, Ok(WatchEvent::Synced)) {
                        first = false;
                    }
                    std::future::ready(keep)
                })
                .boxed()
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
    #[should_panic(expected = "no Synced within")]
    fn outage_without_change_catches_a_watch_that_never_says_it_is_in_sync_again() {
        run("outage_without_change", with(Flaw::NeverResyncs), |b| {
            Box::pin(scenarios::outage_without_change(b))
        });
    }

    #[test]
    fn the_unflawed_wrapper_passes() {
        run("ttl_expiry", with(Flaw::KeepsOnShutdown), |b| {
            Box::pin(scenarios::ttl_expiry(b))
        });
    }
}
