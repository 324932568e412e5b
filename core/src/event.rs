//! What a watch delivers.

use futures::stream::BoxStream;

use crate::error::Error;
use crate::instance::{InstanceId, ServiceInstance};

/// One change in the set of instances of a service, or word that the watch is in sync.
///
/// A watch delivers a [`Snapshot`](WatchEvent::Snapshot) and a [`Synced`](WatchEvent::Synced)
/// first, then only changes, keyed by instance id. After every error it yields, it says
/// `Synced` again once it has caught up with the backend, also when nothing changed.
///
/// ```
/// use waypost_core::{ServiceInstance, WatchEvent};
/// let i = ServiceInstance::builder("users", "u1").host("h").port(1).build()?;
/// let ev = WatchEvent::Added(i);
/// assert_eq!(ev.id().map(|id| id.as_str()), Some("u1"));
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The whole current set. First on every watch; sorted by id.
    Snapshot(Vec<ServiceInstance>),
    /// A new instance.
    Added(ServiceInstance),
    /// An instance whose description (address, tags, metadata, weight, zone) changed.
    Updated(ServiceInstance),
    /// An instance that left, as it was last seen.
    Removed(ServiceInstance),
    /// Everything the backend holds has been delivered: the watch is in sync with it.
    ///
    /// Sent after the first [`Snapshot`](WatchEvent::Snapshot), and after every recovery from
    /// an error (after the difference, which may be empty). It is how a consumer learns that an
    /// outage is over when the set did not change; a consumer that shows the watch's health
    /// (the [`Balancer`](crate::Balancer)'s status, a readiness probe) clears its error on it.
    /// [`InstanceSet::sync`](crate::InstanceSet::sync) emits it for a backend.
    Synced,
}

impl WatchEvent {
    /// The instance id an add / update / remove is about; `None` for a snapshot or `Synced`.
    pub fn id(&self) -> Option<&InstanceId> {
        match self {
            WatchEvent::Snapshot(_) | WatchEvent::Synced => None,
            WatchEvent::Added(i) | WatchEvent::Updated(i) | WatchEvent::Removed(i) => Some(i.id()),
        }
    }
}

/// The stream returned by [`Discovery::watch`](crate::Discovery::watch).
///
/// An `Err` item reports a backend problem (an outage, a bad answer) and does **not** end the
/// stream: the watch keeps retrying with backoff, and what it delivered last stays valid. After
/// a reconnect it delivers only the real difference from what it delivered before, then
/// [`WatchEvent::Synced`].
///
/// A consumer reads it to the end (it ends only when the backend's client is gone), counting
/// an error as a moment of the watch, not its end:
///
/// ```
/// use futures::{executor::block_on, stream, StreamExt};
/// use waypost_core::{Error, ServiceInstance, Watch, WatchEvent};
///
/// let a = ServiceInstance::builder("users", "a").host("10.0.0.1").port(80).build()?;
/// let mut watch: Watch = stream::iter([
///     Ok(WatchEvent::Snapshot(vec![a])),
///     Ok(WatchEvent::Synced),
///     Err(Error::unavailable("consul", "watch users", "connection refused")),
///     // Back: nothing changed meanwhile, so only word that the watch caught up.
///     Ok(WatchEvent::Synced),
/// ])
/// .boxed();
///
/// let (mut errors, mut synced, mut instances) = (0, 0, 0);
/// block_on(async {
///     while let Some(item) = watch.next().await {
///         match item {
///             Ok(WatchEvent::Snapshot(all)) => instances = all.len(),
///             Ok(WatchEvent::Synced) => synced += 1,
///             Ok(_) => {}
///             Err(e) => {
///                 assert!(e.is_retryable()); // an outage: the watch retries by itself
///                 errors += 1;
///             }
///         }
///     }
/// });
/// assert_eq!((instances, errors, synced), (1, 1, 2));
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
pub type Watch = BoxStream<'static, Result<WatchEvent, Error>>;
