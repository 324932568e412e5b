//! Failover tiers: shares by health, spill, panic, fail-static per tier, retries across tiers,
//! and one instance in two tiers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use waypost_core::{
    Balancer, Endpoint, Error, FailStatic, Health, InstanceId, PickContext, PickError, Picker,
    ServiceInstance, Strategy, Watch, WatchEvent,
};

/// Round robin in its simplest form (by the key's hash when there is one).
#[derive(Default)]
struct Rotate;
struct RotatePicker(Arc<AtomicUsize>);
impl Strategy for Rotate {
    fn name(&self) -> &str {
        "rotate"
    }
    fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(RotatePicker(Arc::default()))
    }
}
impl Picker for RotatePicker {
    fn pick(&self, eps: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        if eps.is_empty() {
            return None;
        }
        Some(match ctx.hash() {
            Some(h) => (h % eps.len() as u64) as usize,
            None => self.0.fetch_add(1, Ordering::Relaxed) % eps.len(),
        })
    }
}

fn inst(id: &str, health: Health) -> ServiceInstance {
    ServiceInstance::builder("users", id)
        .host("127.0.0.1")
        .port(8000)
        .health(health)
        .build()
        .unwrap()
}

fn up(id: &str) -> ServiceInstance {
    inst(id, Health::Passing)
}

fn down(id: &str) -> ServiceInstance {
    inst(id, Health::Critical)
}

fn idle() -> Watch {
    futures::stream::pending().boxed()
}

/// A balancer with tiers fed by hand through `apply_to`.
fn tiered(names: &[&str]) -> Balancer {
    let mut b = Balancer::builder(Rotate).service("users".parse().unwrap());
    for n in names {
        b = b.tier_from_watch(*n, idle());
    }
    b.build()
}

fn feed(b: &Balancer, tier: usize, set: Vec<ServiceInstance>) {
    b.apply_to(tier, [WatchEvent::Snapshot(set), WatchEvent::Synced]);
}

/// How many of `n` picks each tier served, and each instance.
fn spread(b: &Balancer, n: usize) -> (Vec<usize>, BTreeMap<String, usize>) {
    let mut tiers = vec![0; b.tiers().len()];
    let mut ids = BTreeMap::new();
    for _ in 0..n {
        let g = b.pick().unwrap();
        tiers[g.tier()] += 1;
        *ids.entry(g.instance().id().to_string()).or_insert(0) += 1;
        g.success();
    }
    (tiers, ids)
}

#[test]
fn a_plain_balancer_never_picks_a_critical_instance_and_counts_it() {
    let b = Balancer::new(Rotate);
    b.apply(WatchEvent::Snapshot(vec![up("a"), down("b"), up("c")]));
    let (_, ids) = spread(&b, 300);
    assert_eq!(ids.keys().collect::<Vec<_>>(), ["a", "c"]);
    let s = b.status();
    assert_eq!((s.serving, s.reported), (2, 3));
    assert_eq!(b.tiers()[0].healthy, 2);

    // Every instance critical: the last healthy set is kept, and the status says so.
    b.apply(WatchEvent::Snapshot(vec![down("a"), down("b"), down("c")]));
    assert_eq!(b.status().fail_static, Some(FailStatic::NoneHealthy));
    assert_eq!(b.status().serving, 2);
    b.apply(WatchEvent::Updated(up("b")));
    assert_eq!(b.status().fail_static, None);
    assert_eq!(b.instances().len(), 1);
}

#[tokio::test]
async fn a_healthy_first_tier_takes_all_the_traffic() {
    let b = tiered(&["dc1", "dc2"]);
    feed(&b, 0, vec![up("a1"), up("a2"), up("a3")]);
    feed(&b, 1, vec![up("b1"), up("b2"), up("b3")]);
    let (tiers, _) = spread(&b, 3000);
    assert_eq!(tiers, [3000, 0]);
    assert_eq!(b.tiers()[0].share, 1.0);
    assert_eq!(b.status().serving, 6);
}

#[tokio::test]
async fn a_degraded_tier_spills_in_the_documented_proportion() {
    let b = tiered(&["dc1", "dc2"]);
    feed(&b, 0, vec![up("a1"), down("a2"), down("a3")]);
    feed(&b, 1, vec![up("b1"), up("b2"), up("b3")]);
    // One of three healthy: 1/3 × 1.4 of the traffic stays, the rest spills.
    let want = 1.4 / 3.0;
    let t = b.tiers();
    assert!((t[0].share - want).abs() < 1e-9, "{t:?}");
    let n = 30_000;
    let (tiers, ids) = spread(&b, n);
    let got = tiers[0] as f64 / n as f64;
    assert!((got - want).abs() < 0.002, "{got} against {want}");
    assert_eq!(ids.get("a1").copied(), Some(tiers[0]));
    assert!(!ids.contains_key("a2"));
    // Spilled traffic is spread over the whole second tier.
    for id in ["b1", "b2", "b3"] {
        assert!(ids[id] * 3 >= tiers[1] - 3, "{ids:?}");
    }

    // Overprovisioning 100 %: the first tier keeps exactly its healthy share.
    let strict = Balancer::builder(Rotate)
        .tier_from_watch("dc1", idle())
        .tier_from_watch("dc2", idle())
        .overprovisioning(100)
        .build();
    feed(&strict, 0, vec![up("a1"), down("a2"), down("a3")]);
    feed(&strict, 1, vec![up("b1")]);
    assert!((strict.tiers()[0].share - 1.0 / 3.0).abs() < 1e-9);
}

#[tokio::test]
async fn a_tier_that_is_gone_sends_everything_on_and_takes_it_back_when_it_returns() {
    let b = tiered(&["dc1", "dc2", "dc3"]);
    feed(&b, 0, vec![up("a1"), up("a2")]);
    feed(&b, 1, vec![up("b1")]);
    feed(&b, 2, vec![up("c1")]);
    let before = b.generation();

    feed(&b, 0, vec![down("a1"), down("a2")]);
    assert_ne!(b.generation(), before, "the shares moved");
    let (tiers, _) = spread(&b, 1000);
    assert_eq!(tiers, [0, 1000, 0]);
    // The first tier keeps its last healthy set, fail-static, for a panic.
    assert_eq!(b.tiers()[0].fail_static, Some(FailStatic::NoneHealthy));

    feed(&b, 0, vec![up("a1"), down("a2")]);
    let (tiers, _) = spread(&b, 1000);
    assert!(tiers[0] > 600 && tiers[0] < 800, "{tiers:?}");
    feed(&b, 0, vec![up("a1"), up("a2")]);
    assert_eq!(spread(&b, 1000).0, [1000, 0, 0]);
}

#[tokio::test]
async fn when_no_tier_is_healthy_the_first_one_that_serves_takes_everything() {
    let b = tiered(&["dc1", "dc2"]);
    feed(&b, 0, vec![up("a1")]);
    feed(&b, 1, vec![up("b1")]);
    feed(&b, 0, vec![down("a1")]);
    feed(&b, 1, vec![down("b1")]);
    let (tiers, ids) = spread(&b, 100);
    assert_eq!(tiers, [100, 0]);
    assert_eq!(ids.keys().collect::<Vec<_>>(), ["a1"]);

    // A balancer that was never given a healthy instance has nothing to pick.
    let empty = tiered(&["dc1", "dc2"]);
    feed(&empty, 0, vec![down("a1")]);
    assert!(matches!(
        empty.pick().unwrap_err(),
        PickError::NoInstances { .. }
    ));
}

#[tokio::test]
async fn each_tier_is_fail_static_on_its_own() {
    let b = tiered(&["dc1", "dc2"]);
    feed(&b, 0, vec![up("a1")]);
    feed(&b, 1, vec![up("b1")]);
    b.report_error_to(1, &Error::unavailable("consul", "watch", "refused"));
    let t = b.tiers();
    assert!(t[0].in_sync && t[0].fail_static.is_none());
    assert!(!t[1].in_sync);
    assert!(matches!(
        t[1].fail_static,
        Some(FailStatic::BackendError(_))
    ));
    assert_eq!(t[1].serving, 1, "the last set is kept");
    assert!(!b.status().in_sync);
    assert!(matches!(
        b.status().fail_static,
        Some(FailStatic::BackendError(_))
    ));
    assert_eq!(spread(&b, 100).0, [100, 0]);

    b.apply_to(1, [WatchEvent::Synced]);
    assert!(b.status().in_sync && b.status().fail_static.is_none());
    // An empty push keeps a tier's last set too, but it no longer counts as healthy.
    feed(&b, 0, vec![]);
    let t = b.tiers();
    assert_eq!(t[0].fail_static, Some(FailStatic::EmptyPush));
    assert_eq!((t[0].serving, t[0].share, t[1].share), (1, 0.0, 1.0));
}

#[tokio::test]
async fn an_instance_in_two_tiers_is_served_and_counted_once() {
    let b = tiered(&["consul", "etcd"]);
    feed(&b, 0, vec![up("m"), up("a")]);
    feed(&b, 1, vec![up("m"), up("e")]);
    let ids: Vec<String> = b.instances().iter().map(|i| i.id().to_string()).collect();
    assert_eq!(ids, ["a", "m", "e"]);
    let t = b.tiers();
    assert_eq!((t[0].reported, t[1].reported, t[1].serving), (2, 1, 1));

    // "m" leaves the first registry: the second one serves it now.
    feed(&b, 0, vec![up("a")]);
    let t = b.tiers();
    assert_eq!((t[1].reported, t[1].serving), (2, 2));
    assert_eq!(b.instances().len(), 3);

    // The first registry empties (kept fail-static): the second one takes all the traffic,
    // and each instance is listed once.
    feed(&b, 0, vec![]);
    let t = b.tiers();
    assert_eq!(t[0].fail_static, Some(FailStatic::EmptyPush));
    assert_eq!((t[0].share, t[1].share, t[1].serving), (0.0, 1.0, 2));
    let (tiers, ids) = spread(&b, 100);
    assert_eq!(tiers, [0, 100]);
    assert_eq!(ids.keys().collect::<Vec<_>>(), ["e", "m"]);
    let ids: Vec<String> = b.instances().iter().map(|i| i.id().to_string()).collect();
    assert_eq!(ids, ["a", "e", "m"]);
}

/// With three tiers an instance may be in several: the highest tier that has it healthy serves
/// it, whichever tier changes (a change to a lower tier leaves the higher ones as they were; a
/// change to a higher one redraws the lower ones).
#[tokio::test]
async fn an_instance_in_three_tiers_is_served_by_the_highest_that_has_it_healthy() {
    let b = tiered(&["dc1", "dc2", "dc3"]);
    let ids = |b: &Balancer| -> Vec<String> {
        b.instances().iter().map(|i| i.id().to_string()).collect()
    };
    let serving = |b: &Balancer| -> Vec<usize> { b.tiers().iter().map(|t| t.serving).collect() };
    feed(&b, 0, vec![up("a"), up("m")]);
    feed(&b, 1, vec![up("m"), up("x"), up("b")]);
    feed(&b, 2, vec![up("c"), up("m"), up("x")]);
    assert_eq!(ids(&b), ["a", "m", "b", "x", "c"]);
    assert_eq!(serving(&b), [2, 2, 1]);
    // A change to the lowest tier alone.
    feed(&b, 2, vec![up("c"), up("m"), up("x"), up("z")]);
    assert_eq!(ids(&b), ["a", "m", "b", "x", "c", "z"]);
    assert_eq!(serving(&b), [2, 2, 2]);
    // "m" critical in the first tier: the second serves it; "x" leaves the second: the third.
    feed(&b, 0, vec![up("a"), down("m")]);
    assert_eq!(ids(&b), ["a", "b", "m", "x", "c", "z"]);
    feed(&b, 1, vec![up("m"), up("b")]);
    assert_eq!(ids(&b), ["a", "b", "m", "c", "x", "z"]);
    assert_eq!(serving(&b), [1, 2, 3]);
    let reported: Vec<usize> = b.tiers().iter().map(|t| t.reported).collect();
    assert_eq!(reported, [2, 2, 3]);
}

/// An instance at either end of a lower tier's ids, also in a higher tier, is left to the
/// higher one (the higher tier's part within the lower's range is found by its ends).
#[tokio::test]
async fn an_instance_at_the_ends_of_a_lower_tier_is_left_to_the_higher_one() {
    let b = tiered(&["dc1", "dc2"]);
    feed(&b, 0, vec![up("a"), up("m"), up("z")]);
    feed(&b, 1, vec![up("m"), up("p"), up("z")]);
    let ids: Vec<String> = b.instances().iter().map(|i| i.id().to_string()).collect();
    assert_eq!(ids, ["a", "m", "z", "p"]);
    let t = b.tiers();
    assert_eq!((t[1].reported, t[1].serving), (1, 1));
    feed(&b, 1, vec![up("a"), up("b"), up("m")]);
    let t = b.tiers();
    assert_eq!((t[1].reported, t[1].serving), (1, 1));
    assert_eq!(b.instances().len(), 4);
}

#[tokio::test]
async fn a_key_lands_in_the_same_tier_and_instance_every_time() {
    let b = tiered(&["dc1", "dc2"]);
    feed(&b, 0, vec![up("a1"), down("a2")]);
    feed(&b, 1, vec![up("b1"), up("b2")]);
    let mut per_tier = [0; 2];
    for user in 0..2000u32 {
        let key = user.to_be_bytes();
        let ctx = PickContext::new().with_key(&key);
        let first = b.pick_with(&ctx).unwrap();
        let again = b.pick_with(&ctx).unwrap();
        assert_eq!(first.instance().id(), again.instance().id());
        assert_eq!(first.tier(), again.tier());
        per_tier[first.tier()] += 1;
    }
    // 1/2 × 1.4 = 70 % of the keys stay in the first tier.
    assert!((1300..1500).contains(&per_tier[0]), "{per_tier:?}");
}

#[tokio::test]
async fn a_retry_stays_in_its_tier_once_then_moves_on() {
    let b = tiered(&["dc1", "dc2"]);
    feed(&b, 0, vec![up("a1"), up("a2"), up("a3")]);
    feed(&b, 1, vec![up("b1"), up("b2")]);
    let ctx = PickContext::new();
    let first = b.pick().unwrap();
    assert_eq!(first.tier(), 0);
    let mut tried: Vec<InstanceId> = vec![first.instance().id().clone()];
    let second = b.pick_excluding(&ctx, &tried).unwrap();
    assert_eq!(second.tier(), 0, "one retry in the same tier");
    assert!(!tried.contains(second.instance().id()));
    tried.push(second.instance().id().clone());
    let third = b.pick_excluding(&ctx, &tried).unwrap();
    assert_eq!(third.tier(), 1, "then the next tier");
    tried.push(third.instance().id().clone());
    let fourth = b.pick_excluding(&ctx, &tried).unwrap();
    assert_eq!(fourth.tier(), 1);
    assert!(!tried.contains(fourth.instance().id()));
    tried.push(fourth.instance().id().clone());
    // Both tiers spent: what is left anywhere.
    let fifth = b.pick_excluding(&ctx, &tried).unwrap();
    assert!(!tried.contains(fifth.instance().id()));
    tried.push(fifth.instance().id().clone());
    // Nothing left: an excluded one rather than nothing.
    assert!(b.pick_excluding(&ctx, &tried).is_ok());
}

#[tokio::test]
async fn tiers_follow_their_own_watches() {
    let (tx1, rx1) = futures::channel::mpsc::unbounded();
    let (tx2, rx2) = futures::channel::mpsc::unbounded();
    let b = Balancer::builder(Rotate)
        .tier_from_watch("dc1", rx1.boxed())
        .tier_from_watch("dc2", rx2.boxed())
        .build();
    tx2.unbounded_send(Ok(WatchEvent::Snapshot(vec![up("b1")])))
        .unwrap();
    b.ready().await;
    let g = b.pick().unwrap();
    assert_eq!((g.tier(), g.instance().id().as_str()), (1, "b1"));
    drop(g);
    tx1.unbounded_send(Ok(WatchEvent::Snapshot(vec![up("a1")])))
        .unwrap();
    tx1.unbounded_send(Ok(WatchEvent::Synced)).unwrap();
    while b.tiers()[0].share < 1.0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(b.pick().unwrap().tier(), 0);
    assert_eq!(b.tiers()[0].name, "dc1");
}

#[tokio::test]
async fn a_tier_dying_between_attempts_still_sends_the_third_attempt_on() {
    let b = tiered(&["dc1", "dc2"]);
    feed(&b, 0, vec![up("a1"), up("a2"), up("a3")]);
    feed(&b, 1, vec![up("b1"), up("b2")]);
    let ctx = PickContext::new();
    // a1 failed, then turned critical (it left dc1's served set); a2 failed too.
    feed(&b, 0, vec![down("a1"), up("a2"), up("a3")]);
    let tried: Vec<InstanceId> = ["a1", "a2"].iter().map(|i| i.parse().unwrap()).collect();
    let third = b.pick_excluding(&ctx, &tried).unwrap();
    assert_eq!(third.tier(), 1, "{}", third.instance().id());
    // Both tried ones critical now: still placed in dc1, so the call moves on.
    feed(&b, 0, vec![down("a1"), down("a2"), up("a3")]);
    let third = b.pick_excluding(&ctx, &tried).unwrap();
    assert_eq!(third.tier(), 1, "{}", third.instance().id());
    // The first retry of a call still stays home.
    let first: Vec<InstanceId> = vec!["a2".parse().unwrap()];
    assert_eq!(b.pick_excluding(&ctx, &first).unwrap().tier(), 0);
}
