//! The resilience layer's series, read back from a recorder: an ejection is counted, the active
//! ejections, the served set and panic mode follow the healthy counts.
#![cfg(all(feature = "resilience", feature = "round-robin", feature = "metrics"))]

use std::time::Duration;

use metrics::with_local_recorder;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use waypost_core::{Balancer, ServiceInstance, WatchEvent};
use waypost_strategies::resilience::{ManualClock, OutlierEjection, Resilient};
use waypost_strategies::RoundRobin;

fn instances(n: usize) -> Vec<ServiceInstance> {
    (0..n)
        .map(|i| {
            ServiceInstance::builder("users", format!("i{i}"))
                .host("10.0.0.1")
                .port(8000 + i as u16)
                .build()
                .unwrap()
        })
        .collect()
}

/// Folds a snapshot into `seen`. The debugging recorder drains what it hands out, so counters
/// are summed; gauges take the value of the last snapshot (each step below sets the gauges it
/// checks).
fn read(snap: &metrics_util::debugging::Snapshotter, seen: &mut Vec<(String, f64)>) {
    for (key, _, _, v) in snap.snapshot().into_vec() {
        let name = key.key().name().to_owned();
        let (v, add) = match v {
            DebugValue::Counter(c) => (c as f64, true),
            DebugValue::Gauge(g) => (g.into_inner(), false),
            DebugValue::Histogram(_) => continue,
        };
        match seen.iter_mut().find(|(n, _)| *n == name) {
            Some((_, old)) if add => *old += v,
            Some((_, old)) => *old = v,
            None => seen.push((name, v)),
        }
    }
}

fn get(seen: &[(String, f64)], name: &str) -> Option<f64> {
    seen.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

#[test]
fn ejections_served_set_and_panic_mode_are_reported() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let mut seen = Vec::new();
    let clock = ManualClock::new();
    let policy = OutlierEjection {
        consecutive_failures: 1,
        base_ejection_time: Duration::from_secs(30),
        max_ejected_share: 0.5,
        ..OutlierEjection::default()
    };
    let balancer = with_local_recorder(&recorder, || {
        let b = Balancer::builder(
            Resilient::new(RoundRobin::new())
                .outlier_ejection(policy)
                .panic_threshold(0.6)
                .clock(clock.clock()),
        )
        .service("users".parse().unwrap())
        .build();
        b.apply(WatchEvent::Snapshot(instances(4)));
        b
    });
    read(&snap, &mut seen);
    assert_eq!(get(&seen, "waypost_ejections_total"), Some(0.0));
    assert_eq!(get(&seen, "waypost_ejections_active"), Some(0.0));
    assert_eq!(get(&seen, "waypost_panic_mode"), Some(0.0));
    assert_eq!(get(&seen, "waypost_membership_served"), Some(4.0));

    // i0 fails once, and its next pick ejects it.
    let fail = |id: &str| {
        for _ in 0..16 {
            let g = balancer.pick().unwrap();
            if g.instance().id().as_str() == id {
                g.failure();
                return;
            }
            g.success();
        }
        panic!("{id} was never picked");
    };
    fail("i0");
    for _ in 0..8 {
        balancer.pick().unwrap().success();
    }
    read(&snap, &mut seen);
    assert_eq!(get(&seen, "waypost_ejections_total"), Some(1.0));
    assert_eq!(get(&seen, "waypost_ejections_active"), Some(1.0));
    assert_eq!(get(&seen, "waypost_membership_served"), Some(3.0));
    assert_eq!(get(&seen, "waypost_panic_mode"), Some(0.0));

    // A second ejection leaves 2 of 4 healthy: below the 60 % threshold, so panic mode serves
    // all four again.
    fail("i1");
    for _ in 0..8 {
        balancer.pick().unwrap().success();
    }
    read(&snap, &mut seen);
    assert_eq!(get(&seen, "waypost_ejections_total"), Some(2.0));
    assert_eq!(get(&seen, "waypost_ejections_active"), Some(2.0));
    assert_eq!(get(&seen, "waypost_panic_mode"), Some(1.0));
    assert_eq!(get(&seen, "waypost_membership_served"), Some(4.0));

    // The ejections end: the next pick recounts.
    clock.advance(Duration::from_secs(31));
    balancer.pick().unwrap().success();
    read(&snap, &mut seen);
    assert_eq!(get(&seen, "waypost_ejections_active"), Some(0.0));
    assert_eq!(get(&seen, "waypost_panic_mode"), Some(0.0));
    assert_eq!(get(&seen, "waypost_membership_served"), Some(4.0));
}
