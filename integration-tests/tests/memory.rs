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
        /// The test harness's `restart()` does nothing at all.
        RestartDoesNothing,
        /// The watch turns a backend error into removals (an empty set) instead of an `Err`.
        ErrorsAsEmptySets,
        /// `instances()` of a service with no instances is an error.
        UnknownIsAnError,
        /// The watch loses one event in every eight.
        DropsEvents,
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
        fn heal_bound(&self) -> Duration {
            Duration::from_secs(4)
        }
        async fn restart(&self) -> Result<(), String> {
            if !matches!(self.0.flaw, Flaw::RestartDoesNothing) {
                self.0.memory.restart(Duration::from_millis(100)).await;
            }
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
            let list = self.memory.instances(service).await?;
            if list.is_empty() && matches!(self.flaw, Flaw::UnknownIsAnError) {
                return Err(Error::NotFound {
                    backend: "flawed memory",
                    what: format!("service {service}"),
                });
            }
            Ok(list)
        }
        fn watch(&self, service: &waypost_core::ServiceName) -> waypost_core::Watch {
            let watch = self.memory.watch(service);
            match self.flaw {
                Flaw::NeverResyncs => {
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
                Flaw::ErrorsAsEmptySets => {
                    let mut seen = waypost_core::InstanceSet::new();
                    watch
                        .flat_map(move |item| {
                            let out: Vec<Result<WatchEvent, Error>> = match item {
                                Ok(ev) => {
                                    seen.apply(&ev);
                                    vec![Ok(ev)]
                                }
                                // "Nothing is there": every instance removed, no error.
                                Err(_) => {
                                    let gone = seen.instances();
                                    seen = waypost_core::InstanceSet::new();
                                    seen.apply(&WatchEvent::Snapshot(vec![]));
                                    gone.into_iter()
                                        .map(|i| Ok(WatchEvent::Removed(i)))
                                        .collect()
                                }
                            };
                            futures::stream::iter(out)
                        })
                        .boxed()
                }
                Flaw::DropsEvents => {
                    let mut n = 0u32;
                    watch
                        .filter(move |item| {
                            let change =
                                matches!(item, Ok(WatchEvent::Added(_) | WatchEvent::Removed(_)));
                            n += u32::from(change);
                            std::future::ready(!(change && n % 8 == 0))
                        })
                        .boxed()
                }
                _ => watch,
            }
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
    #[should_panic(expected = "the watch yielded no error across the restart")]
    fn reconnect_resync_catches_a_restart_that_does_nothing() {
        run("reconnect_resync", with(Flaw::RestartDoesNothing), |b| {
            Box::pin(scenarios::reconnect_resync(b))
        });
    }

    #[test]
    #[should_panic(expected = "the balancer reports the outage")]
    fn outage_without_change_catches_a_watch_that_turns_errors_into_an_empty_set() {
        run(
            "outage_without_change",
            with(Flaw::ErrorsAsEmptySets),
            |b| Box::pin(scenarios::outage_without_change(b)),
        );
    }

    #[test]
    #[should_panic(expected = "must be Ok(empty), not an error")]
    fn unknown_service_catches_an_error_for_a_service_without_instances() {
        run("unknown_service", with(Flaw::UnknownIsAnError), |b| {
            Box::pin(scenarios::unknown_service(b))
        });
    }

    #[test]
    #[should_panic(expected = "churn watch")]
    fn bulk_churn_catches_a_watch_that_loses_events() {
        run("bulk_churn", with(Flaw::DropsEvents), |b| {
            Box::pin(scenarios::bulk_churn(b))
        });
    }

    #[test]
    fn the_unflawed_wrapper_passes() {
        run("ttl_expiry", with(Flaw::KeepsOnShutdown), |b| {
            Box::pin(scenarios::ttl_expiry(b))
        });
    }
}
