//! Registering an instance and keeping the registration alive.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::Error;
use crate::instance::ServiceInstance;
use crate::metrics::RegistrationMetrics;
use crate::registration::Registration;

/// Announces instances to a backend.
///
/// `register` validates nothing more (a [`Registration`] is valid by construction), performs the
/// first registration, and returns a handle whose background task keeps the registration alive
/// (heartbeats, lease keep-alive, re-registration after the server forgot it) until
/// [`RegistrationHandle::shutdown`].
///
/// ```
/// use waypost_core::{Error, Registration, RegistrationHandle, Registry};
///
/// /// A registry that accepts everything and keeps nothing: the smallest implementation.
/// struct Nowhere;
///
/// #[async_trait::async_trait]
/// impl Registry for Nowhere {
///     async fn register(&self, registration: Registration) -> Result<RegistrationHandle, Error> {
///         let instance = registration.instance_or_host("127.0.0.1")?;
///         Ok(RegistrationHandle::spawn("nowhere", instance, |mut keep_alive| async move {
///             keep_alive.set_live();
///             keep_alive.stopped().await; // no heartbeat needed
///             Ok(())
///         }))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let reg = Registration::builder("users", "users-1").port(8080).build()?;
/// let handle = Nowhere.register(reg).await?;
/// handle.wait_live().await;
/// assert!(handle.is_live());
/// handle.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait Registry: Send + Sync {
    /// Registers `registration` and keeps it alive in the background.
    ///
    /// Fails if the first attempt fails (bad permission, unreachable server): the caller decides
    /// whether to try again. Once registered, the handle heals by itself.
    ///
    /// ```
    /// use waypost_core::{async_trait, Error, Registration, RegistrationHandle, Registry};
    ///
    /// /// A registry whose server refuses the token.
    /// struct Denied;
    ///
    /// #[async_trait]
    /// impl Registry for Denied {
    ///     async fn register(&self, registration: Registration) -> Result<RegistrationHandle, Error> {
    ///         Err(Error::PermissionDenied {
    ///             backend: "example",
    ///             operation: format!("register {}", registration.id()),
    ///             message: "ACL not found".into(),
    ///         })
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// let reg = Registration::builder("users", "users-1").port(8080).build()?;
    /// let err = Denied.register(reg).await.unwrap_err();
    /// // Not something that trying again fixes: the caller supplies another token.
    /// assert!(!err.is_retryable());
    /// assert!(err.to_string().contains("register users-1"));
    /// # Ok(())
    /// # }
    /// ```
    async fn register(&self, registration: Registration) -> Result<RegistrationHandle, Error>;
}

#[async_trait]
impl<T: Registry + ?Sized> Registry for Arc<T> {
    async fn register(&self, registration: Registration) -> Result<RegistrationHandle, Error> {
        (**self).register(registration).await
    }
}

/// Whether a registration is currently known to the backend.
///
/// ```
/// use waypost_core::Liveness;
/// assert!(Liveness::Live.is_live());
/// assert!(!Liveness::Recovering { reason: "agent restarted".into() }.is_live());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Liveness {
    /// Not confirmed yet.
    Pending,
    /// The backend lists the instance and the last heartbeat succeeded.
    Live,
    /// The last heartbeat failed or the backend forgot the instance; the handle is re-registering.
    Recovering {
        /// Why, in words.
        reason: String,
    },
    /// Shut down (deregistered) or abandoned.
    Stopped,
}

impl Liveness {
    /// Whether this is [`Liveness::Live`].
    pub fn is_live(&self) -> bool {
        matches!(self, Liveness::Live)
    }
}

/// How a registration's background task is asked to end: what [`KeepAlive::stopped`] says.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use waypost_core::{Error, RegistrationHandle, ServiceInstance, StopMode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// for abandon in [false, true] {
///     let instance = ServiceInstance::builder("users", "u1").host("10.0.0.1").port(80).build()?;
///     let seen = seen.clone();
///     let handle = RegistrationHandle::spawn("example", instance, move |mut keep_alive| async move {
///         keep_alive.set_live();
///         let mode = keep_alive.stopped().await;
///         seen.lock().unwrap().push(mode); // a backend deregisters on StopMode::Deregister
///         Ok(())
///     });
///     handle.wait_live().await;
///     if abandon {
///         handle.abandon().await?;
///     } else {
///         handle.shutdown().await?;
///     }
/// }
/// assert_eq!(*seen.lock().unwrap(), [StopMode::Deregister, StopMode::Abandon]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Deregister from the backend, then end (shutdown, or the handle was dropped).
    Deregister,
    /// End without deregistering, as a crashed process would: the backend's TTL or lease removes
    /// the instance.
    Abandon,
}

/// The background side of a [`RegistrationHandle`]: what a backend's keep-alive task uses to
/// report liveness and to learn that it should stop.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
/// use std::time::Duration;
/// use waypost_core::{Error, KeepAlive, RegistrationHandle, ServiceInstance, StopMode};
///
/// /// A backend's keep-alive: a heartbeat every 3 s until asked to stop.
/// async fn heartbeat_loop(mut keep_alive: KeepAlive, beats: Arc<AtomicU32>) -> Result<(), Error> {
///     loop {
///         // ... send a heartbeat; on success:
///         beats.fetch_add(1, Ordering::Relaxed);
///         keep_alive.set_live();
///         if let Some(mode) = keep_alive.sleep(Duration::from_secs(3)).await {
///             assert_eq!(mode, StopMode::Deregister); // what shutdown() asks for
///             // ... deregister
///             return Ok(());
///         }
///     }
/// }
///
/// // Tokio's paused clock: the 10 s below pass at once, and exactly.
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Error> {
/// let beats = Arc::new(AtomicU32::new(0));
/// let instance = ServiceInstance::builder("users", "u1").host("10.0.0.1").port(80).build()?;
/// let counted = beats.clone();
/// let handle = RegistrationHandle::spawn("example", instance, move |ka| heartbeat_loop(ka, counted));
/// handle.wait_live().await;
/// tokio::time::sleep(Duration::from_secs(10)).await;
/// handle.shutdown().await?; // the loop's assertion failing would fail this
/// assert_eq!(beats.load(Ordering::Relaxed), 4); // at 0, 3, 6 and 9 s
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct KeepAlive {
    live: watch::Sender<Liveness>,
    stop: oneshot::Receiver<StopMode>,
    stopped: Option<StopMode>,
    metrics: Arc<RegistrationMetrics>,
    failures: Arc<AtomicU64>,
}

impl KeepAlive {
    /// Reports that the backend lists the instance.
    pub fn set_live(&self) {
        self.metrics.live(true);
        self.live.send_if_modified(|l| {
            let changed = !l.is_live();
            *l = Liveness::Live;
            changed
        });
    }

    /// Reports that the registration is lost and being re-established: call it for every failed
    /// heartbeat or re-registration (each counts in `waypost_heartbeat_failures_total`).
    pub fn set_recovering(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.metrics.live(false);
        self.metrics.failure();
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.live.send_if_modified(|l| {
            let next = Liveness::Recovering { reason };
            let changed = *l != next;
            *l = next;
            changed
        });
    }

    /// Resolves when the handle asks the task to stop. Cancel-safe: use it in `select!`.
    pub async fn stopped(&mut self) -> StopMode {
        if let Some(mode) = self.stopped {
            return mode;
        }
        // A dropped sender without a message means the handle vanished without `Drop` running
        // (a leak via mem::forget): the registration then simply lives on until the runtime ends,
        // so wait forever rather than deregister.
        let mode = match (&mut self.stop).await {
            Ok(mode) => mode,
            Err(_) => std::future::pending().await,
        };
        self.stopped = Some(mode);
        mode
    }

    /// Sleeps for `d`; returns early with the stop mode if asked to stop.
    pub async fn sleep(&mut self, d: Duration) -> Option<StopMode> {
        tokio::select! {
            mode = self.stopped() => Some(mode),
            _ = tokio::time::sleep(d) => None,
        }
    }
}

/// A live registration. Keeps it alive in the background until [`shutdown`](Self::shutdown)
/// (which deregisters) or [`abandon`](Self::abandon) (which does not). Dropping the handle
/// deregisters in the background, best effort.
///
/// A [`Registry`] returns one; a backend makes it with [`spawn`](Self::spawn).
///
/// ```
/// use waypost_core::{Error, Liveness, RegistrationHandle, ServiceInstance};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let instance = ServiceInstance::builder("users", "u1").host("10.0.0.1").port(8080).build()?;
/// // A keep-alive that reports the instance listed at once, then waits to be stopped.
/// let handle = RegistrationHandle::spawn("example", instance, |mut keep_alive| async move {
///     keep_alive.set_live();
///     keep_alive.stopped().await;
///     Ok(())
/// });
/// let liveness = handle.subscribe(); // for a health endpoint
/// assert_eq!(handle.wait_live().await, Liveness::Live);
/// assert_eq!(handle.instance().authority(), "10.0.0.1:8080");
/// assert_eq!(handle.backend(), "example");
///
/// handle.shutdown().await?; // stops the keep-alive (which deregisters) and waits for it
/// assert_eq!(*liveness.borrow(), Liveness::Stopped);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[must_use = "dropping the handle deregisters the instance"]
pub struct RegistrationHandle {
    backend: &'static str,
    failures: Arc<AtomicU64>,
    instance: ServiceInstance,
    live: watch::Receiver<Liveness>,
    stop: Option<oneshot::Sender<StopMode>>,
    task: Option<JoinHandle<Result<(), Error>>>,
}

impl RegistrationHandle {
    /// Spawns the keep-alive task of backend `backend` (a short name such as `consul`, used in
    /// logs and metrics) for `instance` on the current Tokio runtime and returns its handle. The
    /// task runs `keep_alive` until it returns; it should report liveness through the
    /// [`KeepAlive`] and stop (deregistering if asked) when [`KeepAlive::stopped`] resolves.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn<F, Fut>(backend: &'static str, instance: ServiceInstance, keep_alive: F) -> Self
    where
        F: FnOnce(KeepAlive) -> Fut,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let (live_tx, live_rx) = watch::channel(Liveness::Pending);
        let (stop_tx, stop_rx) = oneshot::channel();
        let failures = Arc::new(AtomicU64::new(0));
        let metrics = Arc::new(RegistrationMetrics::new(
            instance.service().as_str(),
            instance.id().as_str(),
            backend,
        ));
        let ctx = KeepAlive {
            live: live_tx.clone(),
            stop: stop_rx,
            stopped: None,
            metrics: metrics.clone(),
            failures: failures.clone(),
        };
        // Everything the keep-alive logs (heartbeats, re-registrations) carries these fields.
        let span = tracing::info_span!(
            "registration",
            service = %instance.service(),
            instance = %instance.id(),
            backend,
        );
        let fut = keep_alive(ctx);
        let task = tokio::spawn(
            async move {
                let result = fut.await;
                metrics.live(false);
                let _ = live_tx.send(Liveness::Stopped);
                result
            }
            .instrument(span),
        );
        RegistrationHandle {
            backend,
            failures,
            instance,
            live: live_rx,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// The backend's short name, as given to [`spawn`](Self::spawn).
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The instance as registered (with the host the backend filled in).
    pub fn instance(&self) -> &ServiceInstance {
        &self.instance
    }

    /// Whether the backend currently lists the instance.
    pub fn is_live(&self) -> bool {
        self.live.borrow().is_live()
    }

    /// How many heartbeats or re-registrations have failed so far (every
    /// [`KeepAlive::set_recovering`]): a lost registration shows here even when it was
    /// re-established before anyone looked at [`liveness`](Self::liveness).
    ///
    /// ```
    /// # use waypost_core::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// let inst = ServiceInstance::builder("users", "u1").host("h").port(1).build()?;
    /// let handle = RegistrationHandle::spawn("example", inst, |mut ka| async move {
    ///     ka.set_recovering("the server forgot us");
    ///     ka.set_live(); // registered again at once
    ///     ka.stopped().await;
    ///     Ok(())
    /// });
    /// handle.wait_live().await;
    /// assert_eq!(handle.failures(), 1);
    /// handle.shutdown().await
    /// # }
    /// ```
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The current liveness.
    pub fn liveness(&self) -> Liveness {
        self.live.borrow().clone()
    }

    /// A receiver that sees every liveness change (for health endpoints and metrics).
    pub fn subscribe(&self) -> watch::Receiver<Liveness> {
        self.live.clone()
    }

    /// Waits until the registration is live (or stopped).
    pub async fn wait_live(&self) -> Liveness {
        let mut rx = self.live.clone();
        let result = rx
            .wait_for(|l| l.is_live() || *l == Liveness::Stopped)
            .await
            .map(|l| l.clone());
        result.unwrap_or(Liveness::Stopped)
    }

    /// Stops the keep-alive, deregisters, and waits for both. Returns the deregistration's error,
    /// if any (the backend's TTL then removes the instance).
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.finish(StopMode::Deregister).await
    }

    /// Stops the keep-alive **without** deregistering, as a crashed process would; the backend's
    /// TTL or lease removes the instance later. For tests of expiry and for hand-over.
    pub async fn abandon(mut self) -> Result<(), Error> {
        self.finish(StopMode::Abandon).await
    }

    async fn finish(&mut self, mode: StopMode) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(mode);
        }
        match self.task.take() {
            Some(task) => match task.await {
                Ok(result) => result,
                Err(join) => Err(Error::Closed {
                    what: format!(
                        "registration of {} (task failed: {join})",
                        self.instance.id()
                    ),
                }),
            },
            None => Ok(()),
        }
    }
}

impl Drop for RegistrationHandle {
    fn drop(&mut self) {
        // Best effort: the task deregisters on its own if the runtime is still running.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(StopMode::Deregister);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn inst() -> ServiceInstance {
        ServiceInstance::builder("s", "i")
            .host("h")
            .port(1)
            .build()
            .unwrap()
    }

    fn counting_task(
        deregistered: Arc<AtomicUsize>,
    ) -> impl FnOnce(KeepAlive) -> std::pin::Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>
    {
        move |mut ka| {
            Box::pin(async move {
                ka.set_live();
                if ka.stopped().await == StopMode::Deregister {
                    deregistered.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn shutdown_deregisters_and_abandon_does_not() {
        let n = Arc::new(AtomicUsize::new(0));
        let h = RegistrationHandle::spawn("test", inst(), counting_task(n.clone()));
        assert_eq!(h.wait_live().await, Liveness::Live);
        h.shutdown().await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);

        let h = RegistrationHandle::spawn("test", inst(), counting_task(n.clone()));
        h.wait_live().await;
        let rx = h.subscribe();
        h.abandon().await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(*rx.borrow(), Liveness::Stopped);
    }

    #[tokio::test]
    async fn drop_deregisters_in_background() {
        let n = Arc::new(AtomicUsize::new(0));
        let h = RegistrationHandle::spawn("test", inst(), counting_task(n.clone()));
        h.wait_live().await;
        let mut rx = h.subscribe();
        drop(h);
        rx.wait_for(|l| *l == Liveness::Stopped).await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
