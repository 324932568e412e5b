//! A [`Discovery`] that counts every error its watches yield: for tests and measurements that
//! must know whether any watch failed at any time, which a balancer's status shows only until
//! the watch is in sync again.
//!
//! See [`CountingDiscovery`] for an example.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use waypost_core::{async_trait, Discovery, Error, ServiceInstance, ServiceName, Watch};

/// Wraps a discovery; its watches record every `Err` they yield in [`errors`](Self::errors).
///
/// ```
/// use std::sync::Arc;
/// use futures::StreamExt;
/// use waypost_conformance::watch_errors::CountingDiscovery;
/// use waypost_core::Discovery;
/// use waypost_memory::Memory;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let memory = Memory::new();
/// let counting = CountingDiscovery::new(Arc::new(memory.clone()));
/// let errors = counting.errors();
/// let mut watch = counting.watch(&"users".parse()?);
/// assert!(watch.next().await.is_some_and(|item| item.is_ok())); // the snapshot
/// memory.set_available(false);
/// while let Some(Ok(_)) = watch.next().await {}
/// assert_eq!((errors.total(), errors.services()), (1, 1));
/// assert!(errors.messages().keys().all(|m| m.contains("<service>")));
/// # Ok(())
/// # }
/// ```
pub struct CountingDiscovery {
    inner: Arc<dyn Discovery>,
    errors: Arc<WatchErrors>,
}

impl CountingDiscovery {
    /// Counts the errors of `inner`'s watches.
    pub fn new(inner: Arc<dyn Discovery>) -> Self {
        CountingDiscovery {
            inner,
            errors: Arc::new(WatchErrors::default()),
        }
    }

    /// What the watches made through this discovery have yielded so far.
    pub fn errors(&self) -> Arc<WatchErrors> {
        self.errors.clone()
    }
}

#[async_trait]
impl Discovery for CountingDiscovery {
    async fn instances(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
        self.inner.instances(service).await
    }

    fn watch(&self, service: &ServiceName) -> Watch {
        let errors = self.errors.clone();
        let name = service.to_string();
        self.inner
            .watch(service)
            .inspect(move |item| {
                if let Err(e) = item {
                    errors.record(&name, e);
                }
            })
            .boxed()
    }
}

/// The errors the watches of a [`CountingDiscovery`] yielded (an example with errors is on
/// [`CountingDiscovery`]).
///
/// ```
/// use std::sync::Arc;
/// use waypost_conformance::watch_errors::CountingDiscovery;
///
/// let counting = CountingDiscovery::new(Arc::new(waypost_memory::Memory::new()));
/// let errors = counting.errors();
/// assert_eq!((errors.total(), errors.services()), (0, 0));
/// assert!(errors.messages().is_empty());
/// ```
#[derive(Default)]
pub struct WatchErrors {
    total: AtomicU64,
    services: Mutex<BTreeSet<String>>,
    messages: Mutex<BTreeMap<String, u64>>,
}

impl WatchErrors {
    fn record(&self, service: &str, error: &Error) {
        self.total.fetch_add(1, Ordering::Relaxed);
        lock(&self.services).insert(service.to_owned());
        let message = without_index(&error.to_string().replace(service, "<service>"));
        *lock(&self.messages).entry(message).or_default() += 1;
    }

    /// Errors yielded, by every watch together.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// How many services' watches yielded at least one.
    pub fn services(&self) -> usize {
        lock(&self.services).len()
    }

    /// Each distinct message with how often it came, the service's name written `<service>`
    /// and a Consul index `index=<n>`, so that one failure of many watches reads as one.
    pub fn messages(&self) -> BTreeMap<String, u64> {
        lock(&self.messages).clone()
    }
}

/// `message` with every `index=<digits>` written `index=<n>`.
fn without_index(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("index=") {
        let (head, tail) = rest.split_at(at + "index=".len());
        out.push_str(head);
        out.push_str("<n>");
        rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counts stay meaningful after a panic elsewhere: every update is one operation.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_are_written_alike() {
        assert_eq!(
            without_index("GET /x?index=42&wait=5m failed; index=7"),
            "GET /x?index=<n>&wait=5m failed; index=<n>"
        );
        assert_eq!(without_index("no index here"), "no index here");
    }
}
