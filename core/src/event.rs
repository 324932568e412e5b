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
pub type Watch = BoxStream<'static, Result<WatchEvent, Error>>;
