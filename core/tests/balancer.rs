//! Balancer behaviour: fail-static, strategy swap, state across updates, concurrent picks.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use waypost_core::{
    Balancer, Endpoint, Error, FailStatic, PickContext, PickError, Picker, ServiceInstance,
    Strategy, WatchEvent,
};

/// Round robin in its simplest form, enough to exercise the balancer.
#[derive(Default)]
struct Rotate(Arc<AtomicUsize>);
struct RotatePicker(Arc<AtomicUsize>);
impl Strategy for Rotate {
    fn name(&self) -> &str {
        "rotate"
    }
    fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(RotatePicker(self.0.clone()))
    }
}
impl Picker for RotatePicker {
    fn pick(&self, eps: &[Endpoint], _: &PickContext<'_>) -> Option<usize> {
        (!eps.is_empty()).then(|| self.0.fetch_add(1, Ordering::Relaxed) % eps.len())
    }
}

/// Always the last instance (by id).
struct Last;
struct LastPicker;
impl Strategy for Last {
    fn name(&self) -> &str {
        "last"
    }
    fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(LastPicker)
    }
}
impl Picker for LastPicker {
    fn pick(&self, eps: &[Endpoint], _: &PickContext<'_>) -> Option<usize> {
        eps.len().checked_sub(1)
    }
}

fn inst(id: &str) -> ServiceInstance {
    ServiceInstance::builder("users", id)
        .host("127.0.0.1")
        .port(8000)
        .build()
        .unwrap()
}

fn ids(b: &Balancer) -> Vec<String> {
    b.instances().iter().map(|i| i.id().to_string()).collect()
}

#[test]
fn empty_balancer_says_why_it_cannot_pick() {
    let b = Balancer::new(Rotate::default());
    let err = b.pick().unwrap_err();
    assert!(matches!(err, PickError::NoInstances { .. }));
    assert!(err.to_string().contains("no instance"));
}

#[test]
fn removed_instances_are_never_picked() {
    let b = Balancer::new(Rotate::default());
    b.apply(WatchEvent::Snapshot(vec![inst("a"), inst("b"), inst("c")]));
    b.apply(WatchEvent::Removed(inst("b")));
    for _ in 0..100 {
        assert_ne!(b.pick().unwrap().instance().id().as_str(), "b");
    }
}

#[test]
fn empty_push_keeps_last_set_and_says_so() {
    let b = Balancer::new(Rotate::default());
    b.apply(WatchEvent::Snapshot(vec![inst("a"), inst("b")]));
    b.apply(WatchEvent::Snapshot(vec![]));
    assert_eq!(ids(&b), ["a", "b"]);
    let st = b.status();
    assert_eq!(st.fail_static, Some(FailStatic::EmptyPush));
    assert_eq!((st.serving, st.reported), (2, 0));
    assert!(b.pick().is_ok());
    // Instances coming back end fail-static.
    b.apply(WatchEvent::Added(inst("c")));
    assert_eq!(ids(&b), ["c"]);
    assert_eq!(b.status().fail_static, None);
}

#[test]
fn empty_push_empties_when_configured() {
    let b = Balancer::builder(Rotate::default())
        .keep_last_on_empty(false)
        .build();
    b.apply(WatchEvent::Snapshot(vec![inst("a")]));
    b.apply(WatchEvent::Removed(inst("a")));
    assert!(ids(&b).is_empty());
    assert!(b.pick().is_err());
}

#[test]
fn errors_keep_the_set_until_the_watch_recovers() {
    let b = Balancer::new(Rotate::default());
    b.apply(WatchEvent::Snapshot(vec![inst("a")]));
    b.report_error(&Error::unavailable("test", "watch", "connection refused"));
    assert_eq!(ids(&b), ["a"]);
    assert!(matches!(
        b.status().fail_static,
        Some(FailStatic::BackendError(ref m)) if m.contains("connection refused")
    ));
    assert!(!b.status().in_sync);
    // A change during the resync is applied, but is no proof that the watch caught up.
    b.apply(WatchEvent::Added(inst("b")));
    assert_eq!(ids(&b), ["a", "b"]);
    assert!(matches!(
        b.status().fail_static,
        Some(FailStatic::BackendError(_))
    ));
    b.apply(WatchEvent::Synced);
    assert_eq!(b.status().fail_static, None);
    assert!(b.status().in_sync);
}

#[test]
fn an_outage_without_a_change_ends_with_synced() {
    // The status bug: the set was the same before and after the outage, so no change event
    // came; the watch's Synced alone must clear the error.
    let b = Balancer::new(Rotate::default());
    b.apply_all([WatchEvent::Snapshot(vec![inst("a")]), WatchEvent::Synced]);
    assert!(b.status().in_sync);
    let updates = b.status().updates;
    b.report_error(&Error::unavailable("test", "watch", "connection refused"));
    assert!(!b.status().in_sync);
    b.apply(WatchEvent::Synced);
    let st = b.status();
    assert_eq!(st.fail_static, None);
    assert!(st.in_sync);
    assert_eq!(st.updates, updates, "Synced rebuilds nothing");
    assert_eq!(ids(&b), ["a"]);
}

#[test]
fn strategy_swap_takes_effect_and_keeps_state() {
    let b = Balancer::new(Rotate::default());
    b.apply(WatchEvent::Snapshot(vec![inst("a"), inst("b")]));
    let held = b.pick_with(&PickContext::new()).unwrap();
    let held_id = held.instance().id().clone();
    b.set_strategy(Last);
    assert_eq!(b.status().strategy, "last");
    for _ in 0..10 {
        assert_eq!(b.pick().unwrap().instance().id().as_str(), "b");
    }
    let ep = b
        .endpoints()
        .into_iter()
        .find(|e| e.id() == &held_id)
        .unwrap();
    assert_eq!(
        ep.state().in_flight(),
        1,
        "in-flight count survives the swap"
    );
    drop(held);
    assert_eq!(ep.state().in_flight(), 0);
}

#[test]
fn per_instance_state_survives_updates() {
    let b = Balancer::new(Last);
    b.apply(WatchEvent::Snapshot(vec![inst("a")]));
    let g1 = b.pick().unwrap();
    g1.failure();
    let _in_flight = b.pick().unwrap();
    // The instance changes (new tag), the set is re-sent whole, another instance comes and goes.
    let changed = inst("a").to_builder().tag("v2").build().unwrap();
    b.apply(WatchEvent::Updated(changed.clone()));
    b.apply(WatchEvent::Snapshot(vec![changed, inst("0")]));
    b.apply(WatchEvent::Removed(inst("0")));
    let ep = &b.endpoints()[0];
    assert!(ep.instance().has_tag("v2"));
    assert_eq!(ep.state().failures(), 1);
    assert_eq!(ep.state().in_flight(), 1);
}

#[test]
fn state_survives_an_empty_push_and_return() {
    let b = Balancer::new(Last);
    b.apply(WatchEvent::Snapshot(vec![inst("a")]));
    b.pick().unwrap().failure();
    b.apply(WatchEvent::Snapshot(vec![]));
    b.apply(WatchEvent::Added(inst("a")));
    assert_eq!(b.endpoints()[0].state().failures(), 1);
}

#[test]
fn concurrent_picks_during_updates_always_succeed() {
    let b = Balancer::new(Rotate::default());
    let all: Vec<_> = (0..64).map(|i| inst(&format!("i{i:02}"))).collect();
    b.apply(WatchEvent::Snapshot(all.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let pickers: Vec<_> = (0..2)
        .map(|_| {
            let b = b.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let g = b
                        .pick()
                        .expect("never empty: the updater keeps half the set");
                    assert!(g.instance().id().as_str().starts_with('i'));
                    n += 1;
                }
                n
            })
        })
        .collect();
    for round in 0..500 {
        // Remove and re-add a rotating half: the set shrinks and grows under the pickers.
        let half: Vec<_> = all.iter().skip(round % 2 * 32).take(32).cloned().collect();
        b.apply(WatchEvent::Snapshot(half));
    }
    stop.store(true, Ordering::Relaxed);
    for p in pickers {
        assert!(p.join().unwrap() > 0);
    }
    for ep in b.endpoints() {
        assert_eq!(ep.state().in_flight(), 0, "every guard was released");
    }
}

#[test]
fn pick_excluding_avoids_excluded_ids() {
    let b = Balancer::new(Last);
    b.apply(WatchEvent::Snapshot(vec![inst("a"), inst("b"), inst("c")]));
    let avoid = [inst("c").id().clone()];
    let g = b.pick_excluding(&PickContext::new(), &avoid).unwrap();
    assert_ne!(g.instance().id().as_str(), "c");
    let b1 = Balancer::new(Last);
    b1.apply(WatchEvent::Snapshot(vec![inst("c")]));
    // Nothing else exists: the excluded one is better than no answer.
    assert_eq!(
        b1.pick_excluding(&PickContext::new(), &avoid)
            .unwrap()
            .instance()
            .id()
            .as_str(),
        "c"
    );
}

#[test]
fn pick_excluding_falls_back_to_an_instance_that_is_not_ejected() {
    let b = Balancer::new(Last);
    b.apply(WatchEvent::Snapshot(vec![inst("a"), inst("b"), inst("c")]));
    // "c" (the strategy's choice) is excluded; "a" is ejected and less loaded than "b".
    let eps = b.endpoints();
    eps[0].state().eject_until(u64::MAX);
    let _busy = [eps[1].state(), eps[1].state()].map(|s| s.begin());
    let avoid = [inst("c").id().clone()];
    let g = b.pick_excluding(&PickContext::new(), &avoid).unwrap();
    assert_eq!(g.instance().id().as_str(), "b");
}

#[test]
fn the_update_side_frees_replaced_snapshots() {
    // A replaced snapshot is kept until the next update drops it, so that a concurrent pick
    // holding the last reference never has to free 10,000 endpoints on the request path.
    let b = Balancer::new(Last);
    b.apply(WatchEvent::Snapshot(vec![inst("a"), inst("b")]));
    let a_state = Arc::clone(b.endpoints()[0].shared_state());
    b.apply(WatchEvent::Removed(inst("a")));
    assert!(
        Arc::strong_count(&a_state) > 1,
        "still held by the retired snapshot"
    );
    b.apply(WatchEvent::Added(inst("c")));
    assert_eq!(Arc::strong_count(&a_state), 1, "freed by the next update");
}

#[tokio::test]
async fn follows_a_watch_reports_errors_and_stops_with_the_balancer() {
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<WatchEvent, Error>>();
    let b = Balancer::builder(Rotate::default()).build_from_watch(rx.boxed());
    assert!(!b.wait_ready(Duration::from_millis(50)).await);
    tx.unbounded_send(Ok(WatchEvent::Snapshot(vec![inst("a")])))
        .unwrap();
    assert!(b.wait_ready(Duration::from_secs(5)).await);
    tx.unbounded_send(Err(Error::unavailable("test", "watch", "down")))
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.status().fail_static.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "error never reported"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(ids(&b), ["a"]);
    tx.unbounded_send(Ok(WatchEvent::Synced)).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.status().fail_static.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Synced never cleared the error"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(b.status().in_sync);
    drop(b);
    // The task holds only a weak reference: once the balancer is gone, it ends and drops the
    // receiver, so sending fails.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tx.unbounded_send(Ok(WatchEvent::Added(inst("b")))).is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watch task outlived the balancer"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn a_call_given_up_on_after_the_threshold_counts_as_a_slow_failure() {
    let b = Balancer::builder(Rotate::default())
        .cancel_is_failure_after(Duration::from_millis(20))
        .build();
    b.apply(WatchEvent::Snapshot(vec![inst("a")]));
    // Given up on at once: cancelled, no outcome.
    drop(b.pick().unwrap());
    let state = b.endpoints()[0].clone();
    assert_eq!(
        (state.state().failures(), state.state().in_flight()),
        (0, 0)
    );
    assert_eq!(state.state().ewma_latency(), None);
    // Given up on after the threshold: a failure, with its latency.
    let guard = b.pick().unwrap();
    std::thread::sleep(Duration::from_millis(40));
    drop(guard);
    assert_eq!(state.state().failures(), 1);
    assert!(state.state().ewma_latency() >= Some(Duration::from_millis(40)));
    // An outcome recorded in time is kept as it is.
    let guard = b.pick().unwrap();
    std::thread::sleep(Duration::from_millis(40));
    guard.success();
    assert_eq!(
        (state.state().failures(), state.state().successes()),
        (1, 1)
    );
}

#[test]
fn a_guard_s_own_deadline_turns_a_late_cancel_into_a_failure() {
    let b = Balancer::new(Rotate::default());
    b.apply(WatchEvent::Snapshot(vec![inst("a")]));
    let mut early = b.pick().unwrap();
    early.set_deadline(std::time::Instant::now() + Duration::from_secs(60));
    drop(early);
    let mut late = b.pick().unwrap();
    late.set_deadline(std::time::Instant::now());
    drop(late);
    assert_eq!(b.endpoints()[0].state().failures(), 1);
}

/// A streamed answer: the latency ends at the first response, the call stays in flight until
/// the stream ends, and a failure at the end counts; dropped after its response, past the
/// threshold and the deadline, the call is the instance's success.
#[test]
fn a_responded_call_keeps_its_latency_and_stays_in_flight_until_its_end() {
    let b = Balancer::builder(Rotate::default())
        .cancel_is_failure_after(Duration::ZERO)
        .build();
    b.apply(WatchEvent::Snapshot(vec![inst("a")]));
    let state = b.endpoints()[0].clone();

    let mut guard = b.pick().unwrap();
    guard.responded();
    let to_response = guard.elapsed();
    std::thread::sleep(Duration::from_millis(30));
    guard.responded(); // a second mark moves nothing
    assert_eq!(state.state().in_flight(), 1, "in flight while it streams");
    guard.failure(); // the stream failed at its end
    assert_eq!(
        (state.state().in_flight(), state.state().failures()),
        (0, 1)
    );
    let recorded = state.state().ewma_latency().unwrap();
    assert!(recorded <= to_response, "{recorded:?} > {to_response:?}");

    let mut dropped = b.pick().unwrap();
    dropped.set_deadline(std::time::Instant::now());
    dropped.responded();
    std::thread::sleep(Duration::from_millis(5));
    drop(dropped);
    assert_eq!(
        (
            state.state().in_flight(),
            state.state().failures(),
            state.state().successes()
        ),
        (0, 1, 1),
        "dropped after its response: a success, not a timeout"
    );
}

/// The guard's clock is not `Instant` (a calibrated CPU counter where there is one): the
/// latency it records must still agree with `Instant`, between the same call measured from
/// inside and from outside the guard's life, within 0.1 % and a microsecond.
#[test]
fn a_recorded_latency_agrees_with_instant() {
    let b = Balancer::new(Rotate::default());
    b.apply(WatchEvent::Snapshot(vec![inst("a")]));
    let state = b.endpoints()[0].clone();
    for ms in [2, 10, 30] {
        let outer = std::time::Instant::now();
        let guard = b.pick().unwrap();
        let inner = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(ms));
        let inner = inner.elapsed();
        let elapsed = guard.elapsed();
        guard.success(); // each sample is longer than the last, so it replaces the estimate
        let outer = outer.elapsed();
        let recorded = state.state().ewma_latency().unwrap();
        let slack = |d: Duration| d / 1000 + Duration::from_micros(1);
        assert!(
            recorded + slack(inner) >= inner && recorded <= outer + slack(outer),
            "recorded {recorded:?}; Instant saw {inner:?} inside, {outer:?} outside"
        );
        assert!(
            elapsed <= recorded + slack(recorded),
            "{elapsed:?} > {recorded:?}"
        );
    }
}

#[tokio::test]
async fn ready_within_says_why_no_instance_came() {
    let wait = Duration::from_millis(20);
    let b = Balancer::builder(Rotate::default())
        .service("users".parse().unwrap())
        .build();
    let why = b.ready_within(wait).await.unwrap_err();
    assert!(why.to_string().contains("not answered yet"), "{why}");

    b.apply_all([WatchEvent::Snapshot(vec![]), WatchEvent::Synced]);
    let why = b.ready_within(wait).await.unwrap_err();
    assert!(why.to_string().contains("reports none"), "{why}");

    let critical = inst("a")
        .to_builder()
        .health(waypost_core::Health::Critical)
        .build()
        .unwrap();
    b.apply(WatchEvent::Snapshot(vec![critical]));
    let why = b.ready_within(wait).await.unwrap_err();
    assert_eq!(why.reported(), 1);
    assert!(why.to_string().contains("none passing"), "{why}");

    b.report_error(&Error::PermissionDenied {
        backend: "consul",
        operation: "watch".into(),
        message: "ACL not found".into(),
    });
    let why = b.ready_within(wait).await.unwrap_err();
    assert!(why.to_string().contains("ACL not found"), "{why}");
    assert!(std::error::Error::source(&why).is_some());

    b.apply_all([WatchEvent::Snapshot(vec![inst("b")]), WatchEvent::Synced]);
    assert!(b.ready_within(wait).await.is_ok());
}

#[tokio::test]
async fn changed_wakes_on_a_new_set_and_not_on_a_resync_that_changes_nothing() {
    let b = Balancer::new(Rotate::default());
    b.apply(WatchEvent::Snapshot(vec![inst("a")]));
    let seen = b.generation();
    b.apply(WatchEvent::Synced);
    b.apply(WatchEvent::Snapshot(vec![inst("a")]));
    let quiet = tokio::time::timeout(Duration::from_millis(50), b.changed(seen)).await;
    assert!(quiet.is_err(), "nothing changed");
    b.apply(WatchEvent::Added(inst("b")));
    let now = b.changed(seen).await;
    assert_ne!(now, seen);
    // Handing back what it returned, the next call waits for the next change.
    let next = tokio::time::timeout(Duration::from_millis(50), b.changed(now)).await;
    assert!(next.is_err());
}

#[test]
fn a_retry_given_up_on_past_the_threshold_is_a_failure_too() {
    let b = Balancer::builder(Rotate::default())
        .cancel_is_failure_after(Duration::ZERO)
        .build();
    b.apply(WatchEvent::Snapshot(vec![inst("a"), inst("b")]));
    let tried = vec!["a".parse().unwrap()];
    let retry = b.pick_excluding(&PickContext::new(), &tried).unwrap();
    assert_eq!(retry.instance().id().as_str(), "b");
    drop(retry);
    assert_eq!(b.endpoints()[1].state().failures(), 1);
}
