//! The set of instances a watcher has delivered, and the difference to a newer set.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::event::WatchEvent;
use crate::instance::{InstanceId, ServiceInstance};

/// The instances of one service, keyed by id: what a watch has delivered so far.
///
/// Backends use it to turn "here is the whole set now" (a Consul answer, an etcd re-list after a
/// reconnect or compaction) into the events that describe only the real difference, and to say
/// [`WatchEvent::Synced`] when the watch has caught up: after the first snapshot, and after
/// every error the watch reported (see [`interrupted`](Self::interrupted)).
///
/// ```
/// use waypost_core::{InstanceSet, ServiceInstance, WatchEvent};
/// let a = ServiceInstance::builder("s", "a").host("h").port(1).build()?;
/// let b = ServiceInstance::builder("s", "b").host("h").port(2).build()?;
/// let mut delivered = InstanceSet::new();
/// assert_eq!(
///     delivered.sync(vec![a.clone()]),
///     vec![WatchEvent::Snapshot(vec![a.clone()]), WatchEvent::Synced]
/// );
/// assert_eq!(delivered.sync(vec![a.clone(), b.clone()]), vec![WatchEvent::Added(b)]);
/// assert_eq!(delivered.sync(vec![a.clone()]).len(), 1); // b removed
/// assert!(delivered.sync(vec![a.clone()]).is_empty()); // nothing changed, nothing to say
///
/// // An outage: the watch yields its error and notes it; the first good answer after it says
/// // that the watch is in sync again, even though the set did not change.
/// delivered.interrupted();
/// assert!(!delivered.is_in_sync());
/// assert_eq!(delivered.sync(vec![a]), vec![WatchEvent::Synced]);
/// assert!(delivered.is_in_sync());
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceSet {
    by_id: BTreeMap<InstanceId, ServiceInstance>,
    snapshot_sent: bool,
    in_sync: bool,
}

impl InstanceSet {
    /// An empty set that has delivered nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the set with `current` (the backend's whole answer) and returns what a watcher
    /// must be told: a [`WatchEvent::Snapshot`] and [`WatchEvent::Synced`] the first time,
    /// afterwards the adds, updates and removals (in id order; nothing when nothing changed),
    /// followed by `Synced` when the watch had been [`interrupted`](Self::interrupted).
    pub fn sync(&mut self, current: impl IntoIterator<Item = ServiceInstance>) -> Vec<WatchEvent> {
        // Collecting sorts (one pass over an answer already in id order) and builds the tree
        // in bulk; of one id the last one wins.
        let next: BTreeMap<InstanceId, ServiceInstance> = current
            .into_iter()
            .map(|inst| (inst.id().clone(), inst))
            .collect();
        if !self.snapshot_sent {
            self.snapshot_sent = true;
            self.in_sync = true;
            self.by_id = next;
            return vec![WatchEvent::Snapshot(self.instances()), WatchEvent::Synced];
        }
        // Both sides in id order: one walk over the two finds the difference. Removals are
        // told first, then the adds and updates.
        let mut events = Vec::new();
        let mut arrived = Vec::new();
        let mut old = self.by_id.iter().peekable();
        let mut new = next.iter().peekable();
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((a, _)), Some((b, _))) => a.cmp(b),
            };
            match order {
                Ordering::Less => {
                    if let Some((_, gone)) = old.next() {
                        events.push(WatchEvent::Removed(gone.clone()));
                    }
                }
                Ordering::Greater => {
                    if let Some((_, added)) = new.next() {
                        arrived.push(WatchEvent::Added(added.clone()));
                    }
                }
                Ordering::Equal => {
                    if let (Some((_, was)), Some((_, now))) = (old.next(), new.next()) {
                        if was != now {
                            arrived.push(WatchEvent::Updated(now.clone()));
                        }
                    }
                }
            }
        }
        events.append(&mut arrived);
        self.by_id = next;
        if !self.in_sync {
            self.in_sync = true;
            events.push(WatchEvent::Synced);
        }
        events
    }

    /// Notes that the watch reported an error to its consumer (call it when yielding the
    /// `Err`): the next [`sync`](Self::sync) ends with [`WatchEvent::Synced`], so that the
    /// consumer learns the outage is over even if the set did not change.
    pub fn interrupted(&mut self) {
        self.in_sync = false;
    }

    /// Whether the last [`sync`](Self::sync) came after the last
    /// [`interrupted`](Self::interrupted) (false before the first sync).
    pub fn is_in_sync(&self) -> bool {
        self.in_sync
    }

    /// Applies one event to the set (what a consumer of a watch does). Returns whether the set
    /// changed (`Synced` changes none; it marks the set [in sync](Self::is_in_sync)).
    pub fn apply(&mut self, event: &WatchEvent) -> bool {
        match event {
            WatchEvent::Snapshot(all) => {
                let next: BTreeMap<_, _> =
                    all.iter().map(|i| (i.id().clone(), i.clone())).collect();
                self.snapshot_sent = true;
                let changed = next != self.by_id;
                self.by_id = next;
                changed
            }
            WatchEvent::Added(i) | WatchEvent::Updated(i) => {
                self.by_id.insert(i.id().clone(), i.clone()).as_ref() != Some(i)
            }
            WatchEvent::Removed(i) => self.by_id.remove(i.id()).is_some(),
            WatchEvent::Synced => {
                self.in_sync = true;
                false
            }
        }
    }

    /// The instances, sorted by id.
    pub fn instances(&self) -> Vec<ServiceInstance> {
        self.by_id.values().cloned().collect()
    }

    /// The instance with this id.
    pub fn get(&self, id: &str) -> Option<&ServiceInstance> {
        self.by_id.get(id)
    }

    /// How many instances.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Iterates in id order.
    pub fn iter(&self) -> impl Iterator<Item = &ServiceInstance> {
        self.by_id.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, port: u16) -> ServiceInstance {
        ServiceInstance::builder("s", id)
            .host("h")
            .port(port)
            .build()
            .unwrap()
    }

    #[test]
    fn sync_reports_only_real_differences() {
        let mut s = InstanceSet::new();
        s.sync(vec![inst("a", 1), inst("b", 1)]);
        let ev = s.sync(vec![inst("b", 2), inst("c", 1)]);
        assert_eq!(
            ev,
            vec![
                WatchEvent::Removed(inst("a", 1)),
                WatchEvent::Updated(inst("b", 2)),
                WatchEvent::Added(inst("c", 1)),
            ]
        );
        assert!(s.sync(vec![inst("c", 1), inst("b", 2)]).is_empty());
    }

    #[test]
    fn removals_come_first_then_adds_and_updates_in_id_order() {
        let mut s = InstanceSet::new();
        s.sync(vec![inst("b", 1), inst("c", 1), inst("e", 1)]);
        // Given out of order, with an add before a removal in id order.
        let ev = s.sync(vec![inst("d", 1), inst("c", 2), inst("a", 1)]);
        assert_eq!(
            ev,
            vec![
                WatchEvent::Removed(inst("b", 1)),
                WatchEvent::Removed(inst("e", 1)),
                WatchEvent::Added(inst("a", 1)),
                WatchEvent::Updated(inst("c", 2)),
                WatchEvent::Added(inst("d", 1)),
            ]
        );
        assert_eq!(
            s.instances(),
            vec![inst("a", 1), inst("c", 2), inst("d", 1)]
        );
    }

    #[test]
    fn of_one_id_given_twice_the_last_counts() {
        let mut s = InstanceSet::new();
        s.sync(vec![inst("a", 1), inst("a", 2)]);
        assert_eq!(s.instances(), vec![inst("a", 2)]);
        assert_eq!(
            s.sync(vec![inst("a", 2), inst("a", 3)]),
            vec![WatchEvent::Updated(inst("a", 3))]
        );
        assert!(s.sync(vec![inst("a", 1), inst("a", 3)]).is_empty());
    }

    #[test]
    fn synced_follows_the_first_snapshot_and_every_recovery() {
        let mut s = InstanceSet::new();
        assert!(!s.is_in_sync());
        assert_eq!(
            s.sync(vec![inst("a", 1)]),
            vec![WatchEvent::Snapshot(vec![inst("a", 1)]), WatchEvent::Synced]
        );
        // No error: an unchanged answer says nothing, a change says only the change.
        assert!(s.sync(vec![inst("a", 1)]).is_empty());
        assert_eq!(
            s.sync(vec![inst("a", 2)]),
            vec![WatchEvent::Updated(inst("a", 2))]
        );
        // After an error the difference comes first, then Synced; then silence again.
        s.interrupted();
        assert_eq!(
            s.sync(vec![inst("a", 2), inst("b", 1)]),
            vec![WatchEvent::Added(inst("b", 1)), WatchEvent::Synced]
        );
        assert!(s.sync(vec![inst("a", 2), inst("b", 1)]).is_empty());
        // Errors before the first answer: still one Snapshot, then Synced.
        let mut fresh = InstanceSet::new();
        fresh.interrupted();
        assert_eq!(
            fresh.sync(vec![]),
            vec![WatchEvent::Snapshot(vec![]), WatchEvent::Synced]
        );
    }

    #[test]
    fn apply_follows_events() {
        let mut s = InstanceSet::new();
        assert!(s.apply(&WatchEvent::Snapshot(vec![inst("a", 1)])));
        assert!(s.apply(&WatchEvent::Added(inst("b", 1))));
        assert!(!s.apply(&WatchEvent::Updated(inst("b", 1))));
        assert!(s.apply(&WatchEvent::Removed(inst("a", 1))));
        assert_eq!(s.instances(), vec![inst("b", 1)]);
    }

    proptest::proptest! {
        // Replaying what sync emits onto a mirror always reproduces the latest set.
        #[test]
        fn replaying_sync_events_reproduces_the_set(rounds in proptest::collection::vec(proptest::collection::btree_map(0u8..12, 1u16..4, 0..10), 1..8)) {
            let mut source = InstanceSet::new();
            let mut mirror = InstanceSet::new();
            for round in rounds {
                let set: Vec<_> = round.iter().map(|(id, port)| inst(&format!("i{id}"), *port)).collect();
                for ev in source.sync(set.clone()) {
                    mirror.apply(&ev);
                }
                let mut want = set;
                want.sort_by(|a, b| a.id().cmp(b.id()));
                proptest::prop_assert_eq!(mirror.instances(), want);
            }
        }
    }
}
