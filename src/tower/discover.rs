//! A Waypost [`Watch`] as a tower [`Discover`](::tower::discover::Discover).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::tower::discover::Change;
use futures::Stream;
use waypost_core::{InstanceId, ServiceInstance, Watch, WatchEvent};

/// Turns `watch` into a tower [`Discover`](::tower::discover::Discover): a stream of
/// [`Change`]s keyed by instance id, `make` building the service for each instance.
///
/// - The snapshot and every `Added` instance become `Change::Insert`; `Removed` becomes
///   `Change::Remove`.
/// - An `Updated` instance is replaced (a new `Insert` under the same id, which tower's
///   balancer takes as a replacement) only when its address changed: a change of tags, weight
///   or metadata keeps the service, and its connections.
/// - Watch errors are logged and never yielded (tower's `Balance` fails every request on a
///   discover error); what was discovered stays, as fail-static. `Synced` needs no change.
/// - Fail-static on an empty set too, as a Waypost [`Balancer`](waypost_core::Balancer) does:
///   the removal of the last instance is held back until another instance arrives (a stale
///   instance fails one request; an empty balancer fails them all).
///
/// The stream ends when the watch does (a backend's watch ends only when its client is gone).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use futures::{stream, StreamExt};
/// use tower::discover::Change;
/// use waypost::{ServiceInstance, WatchEvent};
///
/// let a = ServiceInstance::builder("users", "a").host("10.0.0.1").port(80).build()?;
/// let moved = ServiceInstance::builder("users", "a").host("10.0.0.2").port(80).build()?;
/// let retagged = moved.to_builder().tag("v2").build()?;
/// let watch = stream::iter([
///     Ok(WatchEvent::Snapshot(vec![a])),
///     Ok(WatchEvent::Synced),
///     Err(waypost::Error::unavailable("consul", "watch", "connection refused")),
///     Ok(WatchEvent::Updated(moved)),
///     Ok(WatchEvent::Updated(retagged)), // same address: nothing to do
///     Ok(WatchEvent::Removed(ServiceInstance::builder("users", "a").host("10.0.0.2").port(80).build()?)),
/// ])
/// .boxed();
/// // The "service" of each instance is its address here; in a stack, a client for it.
/// let changes: Vec<_> = waypost::tower::discover(watch, |i: &ServiceInstance| i.authority())
///     .collect()
///     .await;
/// let changes: Vec<String> = changes
///     .into_iter()
///     .map(|c| match c {
///         Ok(Change::Insert(id, addr)) => format!("insert {id} {addr}"),
///         Ok(Change::Remove(id)) => format!("remove {id}"),
///         Err(never) => match never {},
///     })
///     .collect();
/// // The removal of the last instance is held back (fail-static).
/// assert_eq!(changes, ["insert a 10.0.0.1:80", "insert a 10.0.0.2:80"]);
/// # Ok(())
/// # }
/// ```
pub fn discover<S, F>(watch: Watch, make: F) -> Discover<S, F>
where
    F: FnMut(&ServiceInstance) -> S,
{
    Discover {
        watch,
        make,
        addresses: HashMap::new(),
        held: None,
        pending: VecDeque::new(),
    }
}

/// The stream [`discover`] returns; a tower `Discover` (tower implements it for every such
/// stream), keyed by [`InstanceId`].
///
/// The last instance's removal is held back until another instance arrives, and then
/// delivered:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use futures::{stream, StreamExt};
/// use tower::discover::Change;
/// use waypost::{InstanceId, ServiceInstance, WatchEvent};
///
/// /// What tower's balancers take.
/// fn tower_discover<D: tower::discover::Discover<Key = InstanceId>>(d: D) -> D {
///     d
/// }
///
/// let inst = |id: &str| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build();
/// let (a, b) = (inst("a")?, inst("b")?);
/// let watch = stream::iter([
///     Ok(WatchEvent::Snapshot(vec![a.clone()])),
///     Ok(WatchEvent::Removed(a)), // the last instance: held back
///     Ok(WatchEvent::Added(b)),   // now a can go
/// ])
/// .boxed();
/// let discover = tower_discover(waypost::tower::discover(watch, |i: &ServiceInstance| i.authority()));
/// let changes: Vec<String> = discover
///     .map(|c| match c {
///         Ok(Change::Insert(id, _)) => format!("+{id}"),
///         Ok(Change::Remove(id)) => format!("-{id}"),
///         Err(never) => match never {},
///     })
///     .collect()
///     .await;
/// assert_eq!(changes, ["+a", "+b", "-a"]);
/// # Ok(())
/// # }
/// ```
pub struct Discover<S, F> {
    watch: Watch,
    make: F,
    /// The address each discovered instance was made with.
    addresses: HashMap<InstanceId, String>,
    /// The last instance, removed by the backend but kept until another one arrives.
    held: Option<InstanceId>,
    pending: VecDeque<Change<InstanceId, S>>,
}

impl<S, F> fmt::Debug for Discover<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discover")
            .field("instances", &self.addresses.len())
            .finish_non_exhaustive()
    }
}

// Nothing is pinned in place: the watch is a boxed stream.
impl<S, F> Unpin for Discover<S, F> {}

impl<S, F> Discover<S, F>
where
    F: FnMut(&ServiceInstance) -> S,
{
    fn insert(&mut self, instance: &ServiceInstance) {
        if self.held.as_ref() == Some(instance.id()) {
            self.held = None; // back before anything replaced it
        }
        let address = instance.authority();
        if self.addresses.get(instance.id()) != Some(&address) {
            let service = (self.make)(instance);
            self.addresses.insert(instance.id().clone(), address);
            self.pending
                .push_back(Change::Insert(instance.id().clone(), service));
        }
        // Another instance is there now: the held-back removal can go.
        if let Some(held) = self.held.take() {
            self.addresses.remove(&held);
            self.pending.push_back(Change::Remove(held));
        }
    }

    fn remove(&mut self, id: &InstanceId) {
        if !self.addresses.contains_key(id) {
            return;
        }
        if self.addresses.len() == 1 {
            if self.held.is_none() {
                tracing::warn!(instance = %id, "the backend reports no instances; keeping the last one");
            }
            self.held = Some(id.clone());
            return;
        }
        self.addresses.remove(id);
        self.pending.push_back(Change::Remove(id.clone()));
    }

    fn apply(&mut self, event: WatchEvent) {
        match event {
            WatchEvent::Snapshot(all) => {
                // The first event of a watch; should a consumer hand over a watch that already
                // delivered, the snapshot still replaces what was known.
                let keep: std::collections::HashSet<&InstanceId> =
                    all.iter().map(ServiceInstance::id).collect();
                let gone: Vec<InstanceId> = self
                    .addresses
                    .keys()
                    .filter(|id| !keep.contains(id))
                    .cloned()
                    .collect();
                for id in gone {
                    self.remove(&id);
                }
                for instance in &all {
                    self.insert(instance);
                }
            }
            WatchEvent::Added(i) | WatchEvent::Updated(i) => self.insert(&i),
            WatchEvent::Removed(i) => self.remove(i.id()),
            WatchEvent::Synced => {}
        }
    }
}

impl<S, F> Stream for Discover<S, F>
where
    F: FnMut(&ServiceInstance) -> S,
{
    type Item = Result<Change<InstanceId, S>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match this.watch.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Ok(event))) => this.apply(event),
                Poll::Ready(Some(Err(error))) => {
                    // Fail-static: keep what was discovered; tower's Balance would fail every
                    // request on an error from its Discover.
                    tracing::warn!(%error, "watch error; keeping the discovered instances");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::{stream, StreamExt};

    use super::*;

    fn inst(id: &str, host: &str) -> ServiceInstance {
        ServiceInstance::builder("s", id)
            .host(host)
            .port(80)
            .build()
            .unwrap()
    }

    /// The changes `events` turn into, as `insert <id> <addr>` / `remove <id>`.
    fn changes(events: Vec<WatchEvent>) -> Vec<String> {
        let watch = stream::iter(events.into_iter().map(Ok)).boxed();
        let d = discover(watch, |i: &ServiceInstance| i.authority());
        futures::executor::block_on(d.collect::<Vec<_>>())
            .into_iter()
            .map(|c| match c {
                Ok(Change::Insert(id, addr)) => format!("insert {id} {addr}"),
                Ok(Change::Remove(id)) => format!("remove {id}"),
                Err(never) => match never {},
            })
            .collect()
    }

    #[test]
    fn the_last_instance_is_kept_until_another_arrives() {
        let got = changes(vec![
            WatchEvent::Snapshot(vec![inst("a", "h1"), inst("b", "h2")]),
            WatchEvent::Removed(inst("a", "h1")),
            WatchEvent::Removed(inst("b", "h2")), // the last one: held back
            WatchEvent::Added(inst("c", "h3")),   // now b can go
        ]);
        assert_eq!(
            got,
            [
                "insert a h1:80",
                "insert b h2:80",
                "remove a",
                "insert c h3:80",
                "remove b"
            ]
        );
    }

    #[test]
    fn a_held_instance_that_comes_back_is_kept_as_it_is() {
        let got = changes(vec![
            WatchEvent::Snapshot(vec![inst("a", "h1")]),
            WatchEvent::Removed(inst("a", "h1")),
            WatchEvent::Added(inst("a", "h1")),
            WatchEvent::Added(inst("b", "h2")),
        ]);
        assert_eq!(got, ["insert a h1:80", "insert b h2:80"]);
    }

    #[test]
    fn only_an_address_change_replaces_a_service() {
        let tagged = inst("a", "h1").to_builder().tag("v2").build().unwrap();
        let got = changes(vec![
            WatchEvent::Snapshot(vec![inst("a", "h1")]),
            WatchEvent::Synced,
            WatchEvent::Updated(tagged),
            WatchEvent::Updated(inst("a", "h9")),
        ]);
        assert_eq!(got, ["insert a h1:80", "insert a h9:80"]);
    }
}
