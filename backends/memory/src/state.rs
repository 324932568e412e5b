//! The shared state: the registrations of every service, their deadlines and health, and the
//! signals that wake watchers and the reaper.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use waypost_core::{Error, HealthCheck, InstanceId, ServiceInstance, ServiceName};

use crate::BACKEND;

/// One registration as the backend holds it.
#[derive(Debug)]
struct Entry {
    instance: ServiceInstance,
    /// Distinguishes this registration from an earlier one of the same id, so that the probe
    /// of a replaced registration stops instead of judging its successor.
    token: u64,
    /// Whether the health check passes; only passing entries are listed.
    passing: bool,
    /// TTL checks: when the entry expires unless a heartbeat comes first.
    expires: Option<Instant>,
}

impl Entry {
    fn listed(&self, now: Instant) -> bool {
        self.passing && self.expires.map_or(true, |at| at > now)
    }
}

#[derive(Debug, Default)]
struct State {
    available: bool,
    services: HashMap<ServiceName, BTreeMap<InstanceId, Entry>>,
    /// One change signal per watched service.
    notifiers: HashMap<ServiceName, watch::Sender<()>>,
}

impl State {
    fn notify(&mut self, service: &ServiceName) {
        if let Some(tx) = self.notifiers.get(service) {
            if tx.receiver_count() == 0 {
                self.notifiers.remove(service);
            } else {
                tx.send_replace(());
            }
        }
    }

    #[cfg(any(test, feature = "test-util"))]
    fn notify_all(&mut self) {
        self.notifiers.retain(|_, tx| tx.receiver_count() > 0);
        for tx in self.notifiers.values() {
            tx.send_replace(());
        }
    }

    fn unavailable(&self, operation: impl FnOnce() -> String) -> Result<(), Error> {
        if self.available {
            Ok(())
        } else {
            Err(Error::unavailable(
                BACKEND,
                operation(),
                "the in-process registry is down (Memory::set_available(false) or a restart)",
            ))
        }
    }
}

/// Everything a [`Memory`](crate::Memory) and its clones share.
#[derive(Debug)]
pub(crate) struct Inner {
    state: Mutex<State>,
    next_token: AtomicU64,
    /// Tells the reaper that a deadline may have moved earlier; dropping it ends the reaper.
    wake_reaper: watch::Sender<()>,
    reaper: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    pub(crate) fn new() -> Self {
        Inner {
            state: Mutex::new(State {
                available: true,
                ..State::default()
            }),
            next_token: AtomicU64::new(1),
            wake_reaper: watch::channel(()).0,
            reaper: Mutex::new(None),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the maps half-updated (each operation is a single
        // insert or remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores (or replaces) a registration. Returns its token. TTL entries start passing (the
    /// registering process is alive right now); checked ones start failing until the first probe.
    pub(crate) fn put(
        &self,
        instance: &ServiceInstance,
        check: &HealthCheck,
    ) -> Result<u64, Error> {
        let mut state = self.state();
        state.unavailable(|| format!("register {}", instance.id()))?;
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (passing, expires) = match check {
            HealthCheck::Ttl { ttl } => (true, Some(Instant::now() + *ttl)),
            _ => (false, None),
        };
        let entry = Entry {
            instance: instance.clone(),
            token,
            passing,
            expires,
        };
        state
            .services
            .entry(instance.service().clone())
            .or_default()
            .insert(instance.id().clone(), entry);
        state.notify(instance.service());
        drop(state);
        if expires.is_some() {
            self.wake_reaper.send_replace(());
        }
        Ok(token)
    }

    /// A heartbeat: pushes the entry's deadline `ttl` ahead. `NotFound` when the backend does
    /// not hold the registration (it expired, or a restart forgot it).
    pub(crate) fn beat(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let mut state = self.state();
        state.unavailable(|| format!("heartbeat of {id}"))?;
        let now = Instant::now();
        let not_found = || Error::NotFound {
            backend: BACKEND,
            what: format!("instance {id} of {service}"),
        };
        let Some(entries) = state.services.get_mut(service) else {
            return Err(not_found());
        };
        let Some(entry) = entries.get_mut(id) else {
            return Err(not_found());
        };
        match (entry.expires, ttl) {
            // Expired but not reaped yet: it is gone as far as anyone can tell; a late beat
            // must not revive it silently, so remove it now and let the handle register again.
            (Some(at), _) if at <= now => {
                entries.remove(id);
                state.notify(service);
                Err(not_found())
            }
            (Some(_), Some(ttl)) => {
                entry.expires = Some(now + ttl);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Deregisters. Removing what is not there is not an error.
    pub(crate) fn remove(&self, service: &ServiceName, id: &InstanceId) -> Result<(), Error> {
        let mut state = self.state();
        state.unavailable(|| format!("deregister {id}"))?;
        let Some(entries) = state.services.get_mut(service) else {
            return Ok(());
        };
        if entries.remove(id).is_some() {
            if entries.is_empty() {
                state.services.remove(service);
            }
            state.notify(service);
        }
        Ok(())
    }

    /// The listed (passing, unexpired) instances of `service`, sorted by id.
    pub(crate) fn list(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
        let state = self.state();
        state.unavailable(|| format!("list {service}"))?;
        let now = Instant::now();
        Ok(state
            .services
            .get(service)
            .map(|entries| {
                entries
                    .values()
                    .filter(|e| e.listed(now))
                    .map(|e| e.instance.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Records a probe result. Returns `false` when the registration the probe belongs to is
    /// gone or replaced, so the probe stops.
    pub(crate) fn set_passing(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        token: u64,
        passing: bool,
    ) -> bool {
        let mut state = self.state();
        let Some(entry) = state
            .services
            .get_mut(service)
            .and_then(|entries| entries.get_mut(id))
            .filter(|e| e.token == token)
        else {
            return false;
        };
        if entry.passing != passing {
            entry.passing = passing;
            state.notify(service);
        }
        true
    }

    /// A change signal for `service`, already marked as seen.
    pub(crate) fn subscribe(&self, service: &ServiceName) -> watch::Receiver<()> {
        let mut state = self.state();
        // Signals of services nobody watches any more are dropped here and in `notify`.
        state.notifiers.retain(|_, tx| tx.receiver_count() > 0);
        state
            .notifiers
            .entry(service.clone())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe()
    }

    #[cfg(any(test, feature = "test-util"))]
    pub(crate) fn set_available(&self, available: bool) {
        let mut state = self.state();
        if state.available != available {
            state.available = available;
            state.notify_all();
        }
    }

    pub(crate) fn is_available(&self) -> bool {
        self.state().available
    }

    /// Forgets every registration, as a restarted server without persistence does.
    #[cfg(any(test, feature = "test-util"))]
    pub(crate) fn forget_all(&self) {
        let mut state = self.state();
        state.services.clear();
        state.notify_all();
    }

    /// Removes expired entries (telling their watchers) and returns the next deadline.
    fn reap(&self, now: Instant) -> Option<Instant> {
        let mut state = self.state();
        let mut touched = Vec::new();
        let mut next: Option<Instant> = None;
        for (service, entries) in state.services.iter_mut() {
            let before = entries.len();
            entries.retain(|_, e| e.expires.map_or(true, |at| at > now));
            if entries.len() != before {
                touched.push(service.clone());
            }
            for at in entries.values().filter_map(|e| e.expires) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        state.services.retain(|_, entries| !entries.is_empty());
        for service in &touched {
            state.notify(service);
        }
        next
    }

    /// Starts the reaper on the current runtime unless one runs already. Called from async
    /// contexts only (registration), so a runtime is present.
    pub(crate) fn ensure_reaper(self: &Arc<Self>) {
        let mut reaper = self.reaper.lock().unwrap_or_else(PoisonError::into_inner);
        // A reaper spawned on a runtime that has since shut down counts as finished.
        if reaper.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let wake = self.wake_reaper.subscribe();
        *reaper = Some(tokio::spawn(run_reaper(Arc::downgrade(self), wake)));
    }
}

/// Sleeps until the earliest deadline (or until woken because an earlier one appeared) and
/// removes what expired. Holds only a weak reference, and ends when the backend is dropped.
async fn run_reaper(inner: Weak<Inner>, mut wake: watch::Receiver<()>) {
    loop {
        let next = match inner.upgrade() {
            Some(inner) => inner.reap(Instant::now()),
            None => return,
        };
        let woken = match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => Ok(()),
                    woken = wake.changed() => woken,
                }
            }
            None => wake.changed().await,
        };
        if woken.is_err() {
            return; // the backend is gone
        }
    }
}
