//! The series a balancer and a registration emit, read back from a recorder.

use std::time::Duration;

use metrics::with_local_recorder;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use waypost_core::testing::First;
use waypost_core::{Balancer, Error, RegistrationHandle, ServiceInstance, ServiceName, WatchEvent};

fn inst(id: &str) -> ServiceInstance {
    ServiceInstance::builder("users", id)
        .host("10.0.0.1")
        .port(80)
        .build()
        .unwrap()
}

/// What a recorder has seen so far. The debugging recorder's snapshots drain what they hand
/// out, so counters, histogram sample counts and the one gauge that is moved by increments
/// (`waypost_requests_active`) are summed here; gauges that are set are replaced.
#[derive(Default)]
struct Seen(Vec<(CompositeKey, f64)>);

impl Seen {
    fn take(&mut self, s: &Snapshotter) -> &Self {
        for (key, _, _, v) in s.snapshot().into_vec() {
            let (delta, replace) = match v {
                DebugValue::Counter(c) => (c as f64, false),
                DebugValue::Gauge(g) => (
                    g.into_inner(),
                    key.key().name() != "waypost_requests_active",
                ),
                DebugValue::Histogram(h) => (h.len() as f64, false),
            };
            match self.0.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) if replace => *v = delta,
                Some((_, v)) => *v += delta,
                None => self.0.push((key, delta)),
            }
        }
        self
    }

    /// The value of the series `name` whose labels include every pair of `labels`, and that has
    /// exactly `label_count` labels.
    fn value(&self, name: &str, labels: &[(&str, &str)], label_count: usize) -> Option<f64> {
        self.0.iter().find_map(|(key, v)| {
            let k = key.key();
            let matches = k.name() == name
                && k.labels().count() == label_count
                && labels
                    .iter()
                    .all(|(n, want)| k.labels().any(|l| l.key() == *n && l.value() == *want));
            matches.then_some(*v)
        })
    }
}

#[test]
fn a_balancer_reports_membership_watch_and_requests() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let mut seen = Seen::default();
    let service: ServiceName = "users".parse().unwrap();
    let balancer = with_local_recorder(&recorder, || {
        let b = Balancer::builder(First).service(service).build();
        b.apply_all([
            WatchEvent::Snapshot(vec![inst("a"), inst("b")]),
            WatchEvent::Synced,
        ]);
        b
    });
    let r = seen.take(&snap);
    let svc = [("service", "users")];
    assert_eq!(r.value("waypost_membership_total", &svc, 1), Some(2.0));
    assert_eq!(r.value("waypost_membership_served", &svc, 1), Some(2.0));
    assert_eq!(r.value("waypost_fail_static", &svc, 1), Some(0.0));
    assert_eq!(
        r.value("waypost_watch_events_total", &[("kind", "snapshot")], 2),
        Some(1.0)
    );

    // Requests: handles were registered with the endpoints, so picks need no recorder.
    balancer.pick().unwrap().success();
    balancer.pick().unwrap().failure();
    let cancelled = balancer.pick().unwrap();
    let r = seen.take(&snap);
    let a = [("service", "users"), ("instance", "a")];
    assert_eq!(r.value("waypost_requests_active", &a, 2), Some(1.0));
    drop(cancelled);
    let r = seen.take(&snap);
    for outcome in ["success", "failure", "cancelled"] {
        let labels = [a[0], a[1], ("outcome", outcome)];
        assert_eq!(
            r.value("waypost_requests_total", &labels, 3),
            Some(1.0),
            "{outcome}"
        );
    }
    assert_eq!(r.value("waypost_requests_active", &a, 2), Some(0.0));
    assert_eq!(
        r.value("waypost_request_duration_seconds", &a, 2),
        Some(2.0),
        "one sample per recorded outcome, none for the cancelled call"
    );

    // An outage: fail-static and an error counted by backend, until Synced.
    with_local_recorder(&recorder, || {
        balancer.report_error(&Error::unavailable("consul", "watch", "refused"))
    });
    let r = seen.take(&snap);
    assert_eq!(r.value("waypost_fail_static", &svc, 1), Some(1.0));
    assert_eq!(
        r.value("waypost_watch_errors_total", &[("backend", "consul")], 2),
        Some(1.0)
    );
    balancer.apply_all([WatchEvent::Removed(inst("b")), WatchEvent::Synced]);
    let r = seen.take(&snap);
    assert_eq!(r.value("waypost_fail_static", &svc, 1), Some(0.0));
    assert_eq!(r.value("waypost_membership_total", &svc, 1), Some(1.0));
    assert_eq!(
        r.value("waypost_watch_events_total", &[("kind", "removed")], 2),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_balancer_with_tiers_reports_each_tier_s_share() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let mut seen = Seen::default();
    let idle = || futures::StreamExt::boxed(futures::stream::pending());
    let balancer = with_local_recorder(&recorder, || {
        Balancer::builder(First)
            .service("users".parse().unwrap())
            .tier_from_watch("dc1", idle())
            .tier_from_watch("dc2", idle())
            .build()
    });
    let dc = |t| [("service", "users"), ("tier", t)];
    let r = seen.take(&snap);
    assert_eq!(r.value("waypost_tier_share", &dc("dc1"), 2), Some(0.0));
    let critical = inst("a2")
        .to_builder()
        .health(waypost_core::Health::Critical)
        .build()
        .unwrap();
    balancer.apply_to(0, [WatchEvent::Snapshot(vec![inst("a1"), critical])]);
    balancer.apply_to(1, [WatchEvent::Snapshot(vec![inst("b1")])]);
    let r = seen.take(&snap);
    let share = |t| r.value("waypost_tier_share", &dc(t), 2).unwrap();
    assert!((share("dc1") - 0.7).abs() < 1e-9, "{}", share("dc1"));
    assert!((share("dc2") - 0.3).abs() < 1e-9, "{}", share("dc2"));
    assert_eq!(
        r.value("waypost_membership_total", &dc("dc1")[..1], 1),
        Some(3.0)
    );
}

#[test]
fn instance_labels_can_be_switched_off() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let mut seen = Seen::default();
    with_local_recorder(&recorder, || {
        let b = Balancer::builder(First)
            .service("users".parse().unwrap())
            .metric_instance_labels(false)
            .build();
        b.apply(WatchEvent::Snapshot(vec![inst("a"), inst("b")]));
        b.pick().unwrap().success();
    });
    let r = seen.take(&snap);
    let labels = [("service", "users"), ("outcome", "success")];
    assert_eq!(r.value("waypost_requests_total", &labels, 2), Some(1.0));
    assert!(
        r.0.iter()
            .all(|(k, _)| k.key().labels().all(|l| l.key() != "instance")),
        "no series carries an instance label"
    );
    assert!(r
        .0
        .iter()
        .any(|(k, _)| k.kind() == MetricKind::Histogram && k.key().labels().count() == 1));
}

#[test]
fn a_registration_reports_liveness_and_heartbeat_failures() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let mut seen = Seen::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let labels = [("service", "users"), ("instance", "a"), ("backend", "test")];
    rt.block_on(async {
        let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<()>();
        let handle = with_local_recorder(&recorder, || {
            RegistrationHandle::spawn("test", inst("a"), |mut ka| async move {
                ka.set_live();
                let _ = fail_rx.await;
                ka.set_recovering("heartbeat refused");
                ka.stopped().await;
                Ok(())
            })
        });
        handle.wait_live().await;
        assert_eq!(
            seen.take(&snap)
                .value("waypost_registration_live", &labels, 3),
            Some(1.0)
        );
        let mut live = handle.subscribe();
        fail_tx.send(()).unwrap();
        live.wait_for(|l| !l.is_live()).await.unwrap();
        let r = seen.take(&snap);
        assert_eq!(r.value("waypost_registration_live", &labels, 3), Some(0.0));
        assert_eq!(
            r.value("waypost_heartbeat_failures_total", &labels, 3),
            Some(1.0)
        );
        tokio::time::timeout(Duration::from_secs(5), handle.shutdown())
            .await
            .unwrap()
            .unwrap();
    });
}
