//! The served lists of a balancer are edited at the instances that changed rather than
//! rebuilt (see `Gap` and `edit_tier` in `src/balancer.rs`). These tests hold them to what a
//! rebuild makes: after any sequence of events, with and without fail-static, with a strategy
//! swap in between, and while another thread picks (which sometimes still holds the list an
//! update would edit); with one tier against a model, with three tiers whose ids overlap
//! against a twin balancer that is fed whole snapshots, which rebuild.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use waypost_core::testing::First;
use waypost_core::{Balancer, Endpoint, Health, ServiceInstance, WatchEvent};

fn inst(id: u8, port: u16, health: Health) -> ServiceInstance {
    ServiceInstance::builder("users", format!("i{id}"))
        .host("127.0.0.1")
        .port(port)
        .health(health)
        .build()
        .unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    Put(u8, u16, Health),
    Remove(u8),
    /// Puts (`Some`) and removes (`None`) applied together, as one watch answer's changes.
    Batch(Vec<(u8, Option<(u16, Health)>)>),
    Snapshot(Vec<(u8, u16, Health)>),
    SwapStrategy,
}

fn health() -> impl proptest::strategy::Strategy<Value = Health> {
    prop_oneof![
        3 => Just(Health::Passing),
        1 => Just(Health::Warning),
        2 => Just(Health::Critical),
    ]
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    let id = 0u8..12;
    prop_oneof![
        8 => (id.clone(), 1u16..4, health()).prop_map(|(i, p, h)| Op::Put(i, p, h)),
        5 => id.clone().prop_map(Op::Remove),
        3 => proptest::collection::vec(
            (id, proptest::option::of((1u16..4, health()))),
            2..10
        )
        .prop_map(Op::Batch),
        1 => proptest::collection::vec((0u8..12, 1u16..4, health()), 0..8).prop_map(Op::Snapshot),
        1 => Just(Op::SwapStrategy),
    ]
}

/// What a rebuild serves: the reported instances that are not critical, by id; or, when that
/// is empty and `keep` is on, what was served before.
struct Model {
    /// By id, as the balancer orders them.
    reported: BTreeMap<String, ServiceInstance>,
    served: Vec<ServiceInstance>,
    keep: bool,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Put(i, p, h) => {
                let inst = inst(*i, *p, *h);
                self.reported.insert(inst.id().to_string(), inst);
            }
            Op::Remove(i) => {
                self.reported.remove(&format!("i{i}"));
            }
            Op::Batch(changes) => {
                for (i, put) in changes {
                    match put {
                        Some((p, h)) => {
                            let inst = inst(*i, *p, *h);
                            self.reported.insert(inst.id().to_string(), inst);
                        }
                        None => {
                            self.reported.remove(&format!("i{i}"));
                        }
                    }
                }
            }
            Op::Snapshot(all) => {
                self.reported = all
                    .iter()
                    .map(|(i, p, h)| inst(*i, *p, *h))
                    .map(|inst| (inst.id().to_string(), inst))
                    .collect();
            }
            Op::SwapStrategy => return,
        }
        let healthy: Vec<ServiceInstance> = self
            .reported
            .values()
            .filter(|i| i.health().is_serving())
            .cloned()
            .collect();
        if !(healthy.is_empty() && self.keep && !self.served.is_empty()) {
            self.served = healthy;
        }
    }
}

fn events(op: &Op) -> Option<Vec<WatchEvent>> {
    Some(match op {
        Op::Put(i, p, h) => vec![WatchEvent::Updated(inst(*i, *p, *h))],
        Op::Remove(i) => vec![WatchEvent::Removed(inst(*i, 1, Health::Passing))],
        Op::Batch(changes) => changes
            .iter()
            .map(|(i, put)| match put {
                Some((p, h)) => WatchEvent::Updated(inst(*i, *p, *h)),
                None => WatchEvent::Removed(inst(*i, 1, Health::Passing)),
            })
            .collect(),
        Op::Snapshot(all) => vec![WatchEvent::Snapshot(
            all.iter()
                .map(|(i, p, h)| inst(*i, *p, *h))
                .map(|inst| (inst.id().to_string(), inst))
                .collect::<BTreeMap<_, _>>()
                .into_values()
                .collect(),
        )],
        Op::SwapStrategy => return None,
    })
}

/// A thread that picks from a balancer until stopped.
struct Picking {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Picking {
    fn start(b: &Balancer) -> Picking {
        let stop = Arc::new(AtomicBool::new(false));
        let (b, flag) = (b.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let _ = b.pick();
            }
        });
        Picking { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

/// The endpoints served now, by id.
fn served(b: &Balancer) -> BTreeMap<String, Endpoint> {
    b.endpoints()
        .into_iter()
        .map(|e| (e.id().to_string(), e))
        .collect()
}

/// Applies `ops` to a balancer and the model, comparing after each: the served instances, and
/// that an instance served before and after keeps its state (its counters and latency). Not
/// its endpoint: as with a rebuild, a served endpoint stays while its replacement is the same
/// instance with the same state, and a later update may bring in the replacement.
fn check(ops: &[Op], keep: bool, picking: bool) {
    let b = Balancer::builder(First).keep_last_on_empty(keep).build();
    let mut model = Model {
        reported: BTreeMap::new(),
        served: Vec::new(),
        keep,
    };
    let picker = picking.then(|| Picking::start(&b));
    for op in ops {
        let before = served(&b);
        match events(op) {
            Some(e) => b.apply_all(e),
            None => b.set_strategy(First),
        }
        model.apply(op);
        assert_eq!(b.instances(), model.served, "after {op:?}");
        for e in b.endpoints() {
            if let Some(old) = before.get(e.id().as_str()) {
                if old.instance() == e.instance() {
                    assert!(
                        Arc::ptr_eq(old.shared_state(), e.shared_state()),
                        "{}'s state lost by {op:?}",
                        e.id()
                    );
                }
            }
        }
    }
    if let Some(p) = picker {
        p.stop();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn edits_serve_what_a_rebuild_would(ops in proptest::collection::vec(op(), 1..60)) {
        check(&ops, false, false);
    }

    #[test]
    fn edits_serve_what_a_rebuild_would_with_fail_static(ops in proptest::collection::vec(op(), 1..60)) {
        check(&ops, true, false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// A picking thread sometimes still holds the list an update would edit: the update then
    /// copies the current list instead.
    #[test]
    fn edits_serve_what_a_rebuild_would_while_another_thread_picks(ops in proptest::collection::vec(op(), 1..60)) {
        check(&ops, true, true);
    }
}

/// The endpoints that leave are freed by the update side, edited out of the retired list.
#[test]
fn an_edit_frees_what_left_and_keeps_what_stayed() {
    let b = Balancer::new(First);
    let passing = |i| inst(i, 1, Health::Passing);
    b.apply(WatchEvent::Snapshot(vec![
        passing(1),
        passing(2),
        passing(3),
    ]));
    // Two updates, so that the retired list is the one an update edits.
    b.apply(WatchEvent::Added(passing(4)));
    b.apply(WatchEvent::Removed(passing(4)));
    let two = b.endpoints()[1].clone();
    assert_eq!(two.id().as_str(), "i2");
    let state = Arc::clone(two.shared_state());
    drop(two);
    b.apply(WatchEvent::Removed(passing(2)));
    assert!(
        Arc::strong_count(&state) > 1,
        "still in the retired snapshot"
    );
    b.apply(WatchEvent::Added(passing(5)));
    assert_eq!(
        Arc::strong_count(&state),
        1,
        "edited out by the next update"
    );
    let ids: Vec<String> = b.instances().iter().map(|i| i.id().to_string()).collect();
    assert_eq!(ids, ["i1", "i3", "i5"]);
}

/// Found by the property test: a batch that removes an instance and puts it back leaves the
/// same instance, with its state, in the list; a later whole snapshot keeps that state too.
#[test]
fn an_instance_removed_and_put_back_in_one_batch_keeps_its_state() {
    let put = |i, port| (i, Some((port, Health::Passing)));
    let ops = [
        Op::Batch(vec![put(6, 1), put(5, 3)]),
        Op::Batch(vec![(5, None), put(5, 3)]),
        Op::Snapshot(vec![(5, 3, Health::Passing)]),
    ];
    check(&ops, false, false);
}

/// One op of a balancer with tiers: `op` applied to tier `tier` (a strategy swap to them all).
#[derive(Clone, Debug)]
struct TierOp {
    tier: usize,
    op: Op,
}

const TIERS: usize = 3;

fn tier_op() -> impl proptest::strategy::Strategy<Value = TierOp> {
    (0..TIERS, op()).prop_map(|(tier, op)| TierOp { tier, op })
}

fn tiered(keep: bool) -> Balancer {
    let mut b = Balancer::builder(First).keep_last_on_empty(keep);
    for name in ["dc1", "dc2", "dc3"] {
        b = b.tier_from_watch(name, Box::pin(futures::stream::pending()));
    }
    b.build()
}

/// Applies `ops` to a balancer with three tiers whose ids overlap (an id that a higher tier
/// serves is left out of the lower ones), and the same sets as whole snapshots to a twin,
/// which rebuilds every tier below the changed one: after each op both serve the same
/// instances, report the same tiers (counts, shares, fail-static), and retry alike (a retry
/// tells the tier of its first attempt from each tier's reported ids), and an instance served
/// before and after keeps its state in one exactly when it does in the other (it does not when
/// another tier serves it now).
fn check_tiers(ops: &[TierOp], keep: bool, picking: bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let (edited, rebuilt) = (tiered(keep), tiered(keep));
    let mut reported: Vec<Model> = (0..TIERS)
        .map(|_| Model {
            reported: BTreeMap::new(),
            served: Vec::new(),
            keep,
        })
        .collect();
    let picker = picking.then(|| Picking::start(&edited));
    for TierOp { tier, op } in ops {
        let before = [served(&edited), served(&rebuilt)];
        reported[*tier].apply(op);
        match events(op) {
            Some(e) => {
                edited.apply_to(*tier, e);
                let all = reported[*tier].reported.values().cloned().collect();
                rebuilt.apply_to(*tier, [WatchEvent::Snapshot(all)]);
            }
            None => {
                edited.set_strategy(First);
                rebuilt.set_strategy(First);
            }
        }
        assert_eq!(
            edited.instances(),
            rebuilt.instances(),
            "after {tier}: {op:?}"
        );
        assert_eq!(edited.tiers(), rebuilt.tiers(), "after {tier}: {op:?}");
        // (Not while the other thread picks: a retry that finds its key's instance excluded
        // takes the least loaded of the rest, and that thread's picks load them.)
        for key in (0u8..4).filter(|_| !picking) {
            let ctx = waypost_core::PickContext::new().with_key(&[key]);
            for i in 0..12 {
                let tried = [waypost_core::InstanceId::new(format!("i{i}")).unwrap()];
                let id = |b: &Balancer| {
                    b.pick_excluding(&ctx, &tried)
                        .ok()
                        .map(|g| (g.tier(), g.instance().id().clone()))
                };
                assert_eq!(
                    id(&edited),
                    id(&rebuilt),
                    "retry after i{i}, after {tier}: {op:?}"
                );
            }
        }
        let after = [served(&edited), served(&rebuilt)];
        let kept = |b: usize, id: &str| {
            let (old, new) = (before[b].get(id)?, after[b].get(id)?);
            (old.instance() == new.instance())
                .then(|| Arc::ptr_eq(old.shared_state(), new.shared_state()))
        };
        for id in after[0].keys() {
            assert_eq!(
                kept(0, id),
                kept(1, id),
                "{id}'s state, after {tier}: {op:?}"
            );
        }
    }
    if let Some(p) = picker {
        p.stop();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn tier_edits_serve_what_a_rebuild_would(ops in proptest::collection::vec(tier_op(), 1..60)) {
        check_tiers(&ops, false, false);
    }

    #[test]
    fn tier_edits_serve_what_a_rebuild_would_with_fail_static(ops in proptest::collection::vec(tier_op(), 1..60)) {
        check_tiers(&ops, true, false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(30))]

    #[test]
    fn tier_edits_serve_what_a_rebuild_would_while_another_thread_picks(ops in proptest::collection::vec(tier_op(), 1..60)) {
        check_tiers(&ops, true, true);
    }
}
