//! The tower service over hand-fed balancers and in-process services.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ::tower::{Service, ServiceExt};
use waypost_core::{
    Balancer, Endpoint, PickContext, Picker, ServiceInstance, Strategy, WatchEvent,
};

use super::*;
use crate::retry::{GaveUp, Hedge, RetryBudget};

/// Always the first instance by id (so "the failing one is tried first" is deterministic),
/// or, with a hash, the instance `hash % n`.
struct First;
struct FirstPicker;
impl Strategy for First {
    fn name(&self) -> &str {
        "first"
    }
    fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(FirstPicker)
    }
}
impl Picker for FirstPicker {
    fn pick(&self, e: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        if e.is_empty() {
            return None;
        }
        Some(ctx.hash().map_or(0, |h| (h % e.len() as u64) as usize))
    }
}

fn inst(id: &str) -> ServiceInstance {
    ServiceInstance::builder("users", id)
        .host("10.0.0.1")
        .port(80)
        .build()
        .unwrap()
}

fn balancer(ids: &[&str]) -> Balancer {
    let b = Balancer::builder(First)
        .service("users".parse().unwrap())
        .build();
    b.apply(WatchEvent::Snapshot(ids.iter().map(|i| inst(i)).collect()));
    b
}

fn state(b: &Balancer, id: &str) -> Endpoint {
    b.endpoints()
        .into_iter()
        .find(|e| e.id().as_str() == id)
        .unwrap()
}

/// How an instance's fake service behaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Act {
    Answer,
    Fail,
    /// Fails as if it never connected.
    Refuse,
    Hang,
    /// Answers after 100 ms.
    Slow,
    NeverReady,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum FakeError {
    #[error("failed")]
    Failed,
    #[error("refused")]
    Refused,
}

/// A fake per-instance service: answers with its id, fails, hangs, or is never ready; counts
/// calls per id and live clones.
#[derive(Clone)]
struct Fake {
    id: String,
    act: Act,
    calls: Arc<Mutex<BTreeMap<String, usize>>>,
    _alive: Arc<()>,
}

impl Service<String> for Fake {
    type Response = String;
    type Error = FakeError;
    type Future = Pin<Box<dyn Future<Output = Result<String, FakeError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), FakeError>> {
        match self.act {
            Act::NeverReady => Poll::Pending,
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, _req: String) -> Self::Future {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(self.id.clone())
            .or_default() += 1;
        let (id, act) = (self.id.clone(), self.act);
        Box::pin(async move {
            match act {
                Act::Answer => Ok(id),
                Act::Fail => Err(FakeError::Failed),
                Act::Refuse => Err(FakeError::Refused),
                Act::Hang => std::future::pending().await,
                Act::Slow => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(id)
                }
                // Never ready, so never called; were it called, that would be a failure.
                Act::NeverReady => Err(FakeError::Failed),
            }
        })
    }
}

struct World {
    acts: BTreeMap<&'static str, Act>,
    calls: Arc<Mutex<BTreeMap<String, usize>>>,
    alive: Arc<()>,
    made: Arc<AtomicUsize>,
}

impl World {
    fn new(acts: &[(&'static str, Act)]) -> World {
        World {
            acts: acts.iter().copied().collect(),
            calls: Arc::default(),
            alive: Arc::new(()),
            made: Arc::default(),
        }
    }

    fn make(&self) -> impl Fn(&ServiceInstance) -> Fake + Send + Sync + 'static {
        let (acts, calls, alive, made) = (
            self.acts.clone(),
            self.calls.clone(),
            self.alive.clone(),
            self.made.clone(),
        );
        move |i: &ServiceInstance| {
            made.fetch_add(1, Ordering::SeqCst);
            Fake {
                id: i.id().to_string(),
                act: acts.get(i.id().as_str()).copied().unwrap_or(Act::Answer),
                calls: calls.clone(),
                _alive: alive.clone(),
            }
        }
    }

    fn calls(&self) -> BTreeMap<String, usize> {
        self.calls.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn outcomes_and_cancellation_reach_the_endpoint_state() {
    let w = World::new(&[("a", Act::Fail), ("b", Act::Hang)]);
    let b = balancer(&["a", "b"]);
    let svc = Balanced::builder(b.clone(), w.make()).build();
    let err = svc.clone().oneshot("x".into()).await.unwrap_err();
    assert!(
        matches!(
            err,
            BalanceError::Inner {
                source: FakeError::Failed,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(state(&b, "a").state().failures(), 1);

    // b hangs: a timeout around the call drops the future, which counts as cancelled.
    b.apply(WatchEvent::Removed(inst("a")));
    let r = tokio::time::timeout(Duration::from_millis(50), svc.clone().oneshot("x".into())).await;
    assert!(r.is_err(), "b hangs");
    let s = state(&b, "b");
    assert_eq!(
        (
            s.state().in_flight(),
            s.state().successes(),
            s.state().failures()
        ),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn a_failure_is_retried_on_another_instance_within_the_budget() {
    let w = World::new(&[("a", Act::Fail)]);
    let b = balancer(&["a", "b"]);
    let svc = Balanced::builder(b.clone(), w.make())
        .retries(
            3,
            RetryBudget::new(1.0, 0).unwrap(),
            |r: &String| Some(r.clone()),
            |_| true,
        )
        .build();
    assert_eq!(svc.clone().oneshot("x".into()).await.unwrap(), "b");
    assert_eq!(
        w.calls(),
        BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
    );
    assert_eq!(state(&b, "a").state().failures(), 1);
    assert_eq!(state(&b, "b").state().successes(), 1);
}

#[tokio::test]
async fn a_sent_request_that_is_not_idempotent_is_not_retried_but_a_refused_one_is() {
    let w = World::new(&[("a", Act::Fail), ("c", Act::Refuse)]);
    let b = balancer(&["a", "b"]);
    // A connect error is the one failure that proves nothing was sent.
    let refused_is_not_sent = |r: Result<&String, &FakeError>| match r {
        Ok(_) => Class::SUCCESS,
        Err(FakeError::Refused) => Class::failure(Retry::NotSent),
        Err(FakeError::Failed) => Class::failure(Retry::IfIdempotent),
    };
    let svc = Balanced::builder(b.clone(), w.make())
        .classify(refused_is_not_sent)
        .retries(
            3,
            RetryBudget::new(10.0, 0).unwrap(),
            |r: &String| Some(r.clone()),
            |_| false,
        )
        .build();
    let err = svc.clone().oneshot("POST".into()).await.unwrap_err();
    assert!(
        matches!(
            err,
            BalanceError::Inner {
                gave_up: GaveUp::NotIdempotent,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(w.calls().get("b"), None);

    let b = balancer(&["c", "d"]);
    let svc = Balanced::builder(b, w.make())
        .classify(refused_is_not_sent)
        .retries(
            3,
            RetryBudget::new(10.0, 0).unwrap(),
            |r: &String| Some(r.clone()),
            |_| false,
        )
        .build();
    assert_eq!(svc.oneshot("POST".into()).await.unwrap(), "d");
}

#[tokio::test]
async fn an_instance_that_is_not_ready_leads_to_another_and_never_to_a_hang() {
    let w = World::new(&[("a", Act::NeverReady)]);
    let svc = Balanced::builder(balancer(&["a", "b"]), w.make()).build();
    assert_eq!(svc.oneshot("x".into()).await.unwrap(), "b");

    // Nobody is ready: the call fails after the ready timeout, it does not wait forever.
    let w = World::new(&[("a", Act::NeverReady), ("b", Act::NeverReady)]);
    let b = balancer(&["a", "b"]);
    let svc = Balanced::builder(b.clone(), w.make())
        .ready_timeout(Duration::from_millis(100))
        .build();
    let r = tokio::time::timeout(Duration::from_secs(5), svc.oneshot("x".into()))
        .await
        .expect("bounded by the ready timeout");
    assert!(matches!(r, Err(BalanceError::NotReady { .. })), "{r:?}");
    let in_flight: u64 = b.endpoints().iter().map(|e| e.state().in_flight()).sum();
    assert_eq!(in_flight, 0);
}

#[tokio::test]
async fn the_hash_key_comes_from_the_request() {
    fn route(r: &String) -> PickContext<'_> {
        PickContext::new().with_key(r.as_bytes())
    }
    let w = World::new(&[]);
    let svc = Balanced::builder(balancer(&["a", "b", "c", "d"]), w.make())
        .route(route)
        .build();
    for key in ["user-1", "user-2", "user-3"] {
        let first = svc.clone().oneshot(key.to_string()).await.unwrap();
        for _ in 0..5 {
            assert_eq!(svc.clone().oneshot(key.to_string()).await.unwrap(), first);
        }
    }
}

#[tokio::test]
async fn services_are_made_once_per_instance_and_dropped_when_it_leaves() {
    let w = World::new(&[]);
    let b = balancer(&["a"]);
    let svc = Balanced::builder(b.clone(), w.make()).build();
    for _ in 0..5 {
        svc.clone().oneshot("x".into()).await.unwrap();
    }
    assert_eq!(w.made.load(Ordering::SeqCst), 1, "made lazily, once");
    // Alive: the world's reference, the maker's, and the one cached service.
    assert_eq!(Arc::strong_count(&w.alive), 3);
    b.apply(WatchEvent::Added(inst("b")));
    b.apply(WatchEvent::Removed(inst("a")));
    assert_eq!(svc.clone().oneshot("x".into()).await.unwrap(), "b");
    assert_eq!(
        Arc::strong_count(&w.alive),
        3,
        "a's service was dropped when b's was made"
    );
    // Readiness is never the pick: the service is always ready itself.
    let mut s = svc.clone();
    let ready = std::future::poll_fn(|cx| s.poll_ready(cx)).await;
    assert!(ready.is_ok());
}

/// A per-try timeout ends an attempt that hangs, as a failure of its instance: an idempotent
/// request goes on to another instance, one that is not fails with `AttemptTimedOut`, and so
/// does one whose attempts are all spent. A deadline that comes first is the deadline's.
#[tokio::test]
async fn a_per_try_timeout_ends_a_hanging_attempt_and_leaves_time_for_another() {
    let w = World::new(&[("a", Act::Hang)]);
    let b = balancer(&["a", "b"]);
    let svc = |idempotent: bool, attempts: u32| {
        Balanced::builder(b.clone(), w.make())
            .per_try_timeout(Duration::from_millis(30))
            .retries(
                attempts,
                RetryBudget::new(10.0, 0).unwrap(),
                |r: &String| Some(r.clone()),
                move |_| idempotent,
            )
            .build()
    };
    // First pick is "a" (by id), which hangs: the retry goes to "b".
    assert_eq!(svc(true, 2).oneshot("GET".into()).await.unwrap(), "b");
    assert_eq!(state(&b, "a").state().failures(), 1);
    assert_eq!(state(&b, "a").state().in_flight(), 0);

    let err = svc(false, 2).oneshot("POST".into()).await.unwrap_err();
    assert!(
        matches!(
            err,
            BalanceError::AttemptTimedOut {
                attempts: 1,
                gave_up: GaveUp::NotIdempotent,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("per-try timeout of 30ms"), "{err}");

    let only_a = balancer(&["a"]);
    let svc = Balanced::builder(only_a.clone(), w.make())
        .per_try_timeout(Duration::from_millis(30))
        .build();
    let err = svc.oneshot("GET".into()).await.unwrap_err();
    assert!(
        matches!(
            err,
            BalanceError::AttemptTimedOut {
                attempts: 1,
                gave_up: GaveUp::AttemptsExhausted,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(state(&only_a, "a").state().failures(), 1);

    // The deadline is earlier than the per-try timeout: it is the deadline that ends the call.
    let svc = Balanced::builder(only_a, w.make())
        .per_try_timeout(Duration::from_secs(60))
        .deadline(|_: &String| Some(std::time::Instant::now() + Duration::from_millis(30)))
        .build();
    let err = svc.oneshot("GET".into()).await.unwrap_err();
    assert!(
        matches!(err, BalanceError::DeadlineExceeded { attempts: 1, .. }),
        "{err}"
    );
}

/// A service over `b` that retries and hedges (after `delay`) up to `attempts` attempts in
/// all, with a budget of `tokens` per request.
fn hedging(
    w: &World,
    b: &Balancer,
    attempts: u32,
    tokens: f64,
    idempotent: bool,
    delay: Duration,
) -> Balanced<impl Fn(&ServiceInstance) -> Fake + Send + Sync + 'static, Fake, String> {
    Balanced::builder(b.clone(), w.make())
        .retries(
            attempts,
            RetryBudget::new(tokens, 0).unwrap(),
            |r: &String| Some(r.clone()),
            move |_| idempotent,
        )
        .hedge(Hedge::after(delay))
        .build()
}

/// The answer of `call`, which must come within 5 s.
async fn answered<E: std::fmt::Debug>(call: impl Future<Output = Result<String, E>>) -> String {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("an answer within 5 s")
        .unwrap()
}

/// (in flight, successes, failures) of instance `id`.
fn counts(b: &Balancer, id: &str) -> (u64, u64, u64) {
    let s = state(b, id);
    let s = s.state();
    (s.in_flight(), s.successes(), s.failures())
}

/// An instance that has not answered within the hedge's delay gets company: the first
/// answer wins, and the attempt still out is dropped, as cancelled (neither a success nor a
/// failure of its instance).
#[tokio::test]
async fn a_hedge_goes_to_another_instance_and_the_first_answer_wins() {
    let w = World::new(&[("a", Act::Hang)]);
    let b = balancer(&["a", "b"]);
    let svc = hedging(&w, &b, 3, 10.0, true, Duration::from_millis(5));
    // "a" is picked first (by id), and hangs.
    assert_eq!(answered(svc.oneshot("GET".into())).await, "b");
    assert_eq!(
        w.calls(),
        BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
    );
    assert_eq!(counts(&b, "a"), (0, 0, 0), "cancelled");
    assert_eq!(counts(&b, "b"), (0, 1, 0));
}

/// No hedge goes out before its delay: an answer that comes first ends the call.
#[tokio::test]
async fn no_hedge_before_its_delay() {
    let w = World::new(&[("a", Act::Slow)]);
    let b = balancer(&["a", "b"]);
    let svc = hedging(&w, &b, 3, 10.0, true, Duration::from_secs(60));
    assert_eq!(answered(svc.oneshot("GET".into())).await, "a");
    assert_eq!(w.calls(), BTreeMap::from([("a".into(), 1)]));
}

/// Only idempotent requests are hedged. (Without retries a builder has no `hedge` at all: see
/// the `compile_fail` example of `BalancedBuilder::hedge`.)
#[tokio::test]
async fn only_idempotent_requests_are_hedged() {
    let w = World::new(&[("a", Act::Hang)]);
    let b = balancer(&["a", "b"]);
    let svc = hedging(&w, &b, 3, 10.0, false, Duration::ZERO);
    let r = tokio::time::timeout(Duration::from_millis(100), svc.oneshot("POST".into())).await;
    assert!(r.is_err(), "waited for the hanging instance: {r:?}");
    assert_eq!(w.calls(), BTreeMap::from([("a".into(), 1)]));
    assert_eq!(counts(&b, "a"), (0, 0, 0));
}

/// Hedges are attempts: `max_attempts` bounds them with the retries, and each takes a token
/// of the retry budget.
#[tokio::test]
async fn hedges_count_as_attempts_and_take_from_the_budget() {
    let acts = [("a", Act::Hang), ("b", Act::Hang), ("c", Act::Hang)];
    // Three attempts at most: a, then hedges to b and c; d, which would answer, is never
    // reached.
    let w = World::new(&acts);
    let b = balancer(&["a", "b", "c", "d"]);
    let svc = hedging(&w, &b, 3, 10.0, true, Duration::ZERO);
    let r = tokio::time::timeout(Duration::from_millis(100), svc.oneshot("GET".into())).await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(
        w.calls(),
        BTreeMap::from([("a".into(), 1), ("b".into(), 1), ("c".into(), 1)])
    );

    // One token per request: one hedge.
    let w = World::new(&acts);
    let svc = hedging(&w, &b, 4, 1.0, true, Duration::ZERO);
    let r = tokio::time::timeout(Duration::from_millis(100), svc.oneshot("GET".into())).await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(
        w.calls(),
        BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
    );
    let in_flight: u64 = b.endpoints().iter().map(|e| e.state().in_flight()).sum();
    assert_eq!(in_flight, 0);
}

/// A hedge that fails does not end the call while the first attempt is still out: that one's
/// answer is the call's. And a failure beside a hedge still out is retried elsewhere.
#[tokio::test]
async fn a_failed_hedge_leaves_the_call_to_the_attempt_still_out() {
    let w = World::new(&[("a", Act::Slow), ("b", Act::Fail)]);
    let b = balancer(&["a", "b"]);
    // Two attempts: a, the hedge to b; b's failure leaves none to retry with.
    let svc = hedging(&w, &b, 2, 10.0, true, Duration::ZERO);
    assert_eq!(answered(svc.oneshot("GET".into())).await, "a");
    assert_eq!(counts(&b, "a"), (0, 1, 0));
    assert_eq!(counts(&b, "b"), (0, 0, 1));

    // Three attempts: b's failure is retried on c while a is still out, and c answers first.
    let w = World::new(&[("a", Act::Slow), ("b", Act::Fail)]);
    let b = balancer(&["a", "b", "c"]);
    let svc = hedging(&w, &b, 3, 10.0, true, Duration::ZERO);
    assert_eq!(answered(svc.oneshot("GET".into())).await, "c");
    assert_eq!(counts(&b, "a"), (0, 0, 0), "cancelled");
    assert_eq!(counts(&b, "b"), (0, 0, 1));
}

/// The request of a retry is copied when the retry starts, not before the attempt it follows:
/// a copy that carries the time left (gRPC's `grpc-timeout`) carries it from then.
#[tokio::test]
async fn a_retry_is_copied_when_it_starts() {
    use std::time::Instant;
    let failed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let received: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let (f, r) = (failed_at.clone(), received.clone());
    let make = move |i: &ServiceInstance| {
        let (fails, failed_at, received) = (i.id().as_str() == "a", f.clone(), r.clone());
        ::tower::service_fn(move |copied: Instant| {
            let (failed_at, received) = (failed_at.clone(), received.clone());
            async move {
                if fails {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    *failed_at.lock().unwrap() = Some(Instant::now());
                    return Err(FakeError::Failed);
                }
                received.lock().unwrap().push(copied);
                Ok(())
            }
        })
    };
    let svc = Balanced::builder(balancer(&["a", "b"]), make)
        .retries(
            2,
            RetryBudget::new(10.0, 0).unwrap(),
            // A copy says when it was made.
            |_: &Instant| Some(Instant::now()),
            |_| true,
        )
        .build();
    svc.oneshot(Instant::now()).await.unwrap();
    let failed_at = failed_at.lock().unwrap().expect("a was tried first");
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    assert!(received[0] >= failed_at, "copied before a's attempt ended");
}

/// A hedge counts in `waypost_hedges_total` when it is sent, and in `waypost_hedges_won_total`
/// when its answer is the call's.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn hedges_sent_and_won_are_counted() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let (w, b) = (World::new(&[("a", Act::Hang)]), balancer(&["a", "b"]));
    let svc =
        metrics::with_local_recorder(&recorder, || hedging(&w, &b, 3, 10.0, true, Duration::ZERO));
    assert_eq!(answered(svc.clone().oneshot("GET".into())).await, "b");
    // "a" answers slowly, and its hedge to "b" fails: sent, not won.
    let w = World::new(&[("a", Act::Slow), ("b", Act::Fail)]);
    let svc =
        metrics::with_local_recorder(&recorder, || hedging(&w, &b, 2, 10.0, true, Duration::ZERO));
    assert_eq!(answered(svc.oneshot("GET".into())).await, "a");
    let counters: BTreeMap<String, u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(k, .., v)| match v {
            DebugValue::Counter(c) => Some((k.key().name().to_owned(), c)),
            _ => None,
        })
        .collect();
    assert_eq!(counters.get("waypost_hedges_total"), Some(&2));
    assert_eq!(counters.get("waypost_hedges_won_total"), Some(&1));
}
