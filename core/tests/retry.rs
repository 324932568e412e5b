//! How `Balancer::pick_excluding` uses the strategy's answer for retries
//! (`Picker::pick_excluding`): it asks the picker, never takes an excluded answer, keeps its
//! fall-back, and does not ask when every instance was tried.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use waypost_core::{
    Balancer, Endpoint, InstanceId, PickContext, Picker, ServiceInstance, Strategy, WatchEvent,
};

/// Picks the first instance; for a retry, the last one not excluded (or, when told to
/// misbehave, always the last one). Counts the retries it is asked for.
struct Backwards {
    asked: Arc<AtomicUsize>,
    misbehave: bool,
}
struct BackwardsPicker {
    asked: Arc<AtomicUsize>,
    misbehave: bool,
}
impl Strategy for Backwards {
    fn name(&self) -> &str {
        "backwards"
    }
    fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(BackwardsPicker {
            asked: self.asked.clone(),
            misbehave: self.misbehave,
        })
    }
}
impl Picker for BackwardsPicker {
    fn pick(&self, eps: &[Endpoint], _: &PickContext<'_>) -> Option<usize> {
        (!eps.is_empty()).then_some(0)
    }
    fn pick_excluding(
        &self,
        eps: &[Endpoint],
        _: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        if self.misbehave {
            return eps.len().checked_sub(1);
        }
        (0..eps.len()).rev().find(|&i| !excluded(i))
    }
}

fn balancer(misbehave: bool) -> (Balancer, Arc<AtomicUsize>) {
    let asked = Arc::new(AtomicUsize::new(0));
    let b = Balancer::new(Backwards {
        asked: asked.clone(),
        misbehave,
    });
    let set = ["a", "b", "c", "d"]
        .map(|id| {
            ServiceInstance::builder("users", id)
                .host("127.0.0.1")
                .port(8000)
                .build()
                .unwrap()
        })
        .to_vec();
    b.apply(WatchEvent::Snapshot(set));
    (b, asked)
}

fn ids(names: &[&str]) -> Vec<InstanceId> {
    names.iter().map(|n| InstanceId::new(n).unwrap()).collect()
}

fn retry(b: &Balancer, tried: &[&str]) -> String {
    let g = b.pick_excluding(&PickContext::new(), &ids(tried)).unwrap();
    g.instance().id().to_string()
}

#[test]
fn a_retry_goes_where_the_strategy_says() {
    let (b, asked) = balancer(false);
    // The strategy's own rule, not a re-pick (which would say "a") nor the least loaded.
    assert_eq!(retry(&b, &["a"]), "d");
    assert_eq!(retry(&b, &["a", "d"]), "c");
    assert_eq!(retry(&b, &["d", "c", "b"]), "a");
    assert_eq!(asked.load(Ordering::Relaxed), 3);
}

#[test]
fn an_excluded_answer_is_not_taken() {
    let (b, _) = balancer(true);
    // The picker answers "d", which was tried: the balancer's fall-back (the first instance)
    // serves instead.
    assert_eq!(retry(&b, &["d"]), "a");
}

#[test]
fn with_every_instance_tried_the_strategy_is_not_asked() {
    let (b, asked) = balancer(false);
    // Duplicates in the list do not make it look complete.
    assert_eq!(retry(&b, &["a", "a", "b", "c"]), "d");
    assert_eq!(asked.load(Ordering::Relaxed), 1);
    // All tried: the fall-back, an excluded one rather than nothing, without asking.
    assert_eq!(retry(&b, &["d", "c", "b", "a"]), "a");
    assert_eq!(asked.load(Ordering::Relaxed), 1);
}
