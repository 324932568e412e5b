//! Waypost's metrics through the `metrics` facade (names, labels and cost: the crate docs).

use std::time::Duration;

use crate::endpoint::Outcome;
use crate::event::WatchEvent;

#[cfg(feature = "metrics")]
mod on {
    use super::*;
    use ::metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

    /// The series of one instance's requests.
    #[derive(Clone)]
    pub(crate) struct RequestMetrics {
        success: Counter,
        failure: Counter,
        cancelled: Counter,
        active: Gauge,
        duration: Histogram,
    }

    impl RequestMetrics {
        /// `instance: None` leaves the `instance` label off (very large sets).
        pub(crate) fn new(service: &str, instance: Option<&str>) -> Self {
            let s = service.to_owned();
            match instance {
                Some(i) => {
                    let i = i.to_owned();
                    let total = |outcome: &'static str| counter!("waypost_requests_total", "service" => s.clone(), "instance" => i.clone(), "outcome" => outcome);
                    RequestMetrics {
                        success: total("success"),
                        failure: total("failure"),
                        cancelled: total("cancelled"),
                        active: gauge!("waypost_requests_active", "service" => s.clone(), "instance" => i.clone()),
                        duration: histogram!("waypost_request_duration_seconds", "service" => s.clone(), "instance" => i.clone()),
                    }
                }
                None => {
                    let total = |outcome: &'static str| counter!("waypost_requests_total", "service" => s.clone(), "outcome" => outcome);
                    RequestMetrics {
                        success: total("success"),
                        failure: total("failure"),
                        cancelled: total("cancelled"),
                        active: gauge!("waypost_requests_active", "service" => s.clone()),
                        duration: histogram!("waypost_request_duration_seconds", "service" => s.clone()),
                    }
                }
            }
        }

        pub(crate) fn none() -> Self {
            RequestMetrics {
                success: Counter::noop(),
                failure: Counter::noop(),
                cancelled: Counter::noop(),
                active: Gauge::noop(),
                duration: Histogram::noop(),
            }
        }

        #[inline]
        pub(crate) fn begin(&self) {
            self.active.increment(1.0);
        }

        #[inline]
        pub(crate) fn end(&self, outcome: Option<(Outcome, Duration)>) {
            self.active.decrement(1.0);
            match outcome {
                Some((outcome, latency)) => {
                    match outcome {
                        Outcome::Success => self.success.increment(1),
                        Outcome::Failure => self.failure.increment(1),
                    }
                    self.duration.record(latency.as_secs_f64());
                }
                None => self.cancelled.increment(1),
            }
        }
    }

    /// The series of one balancer's membership and watch.
    pub(crate) struct BalancerMetrics {
        service: String,
        total: Gauge,
        served: Gauge,
        fail_static: Gauge,
        snapshot: Counter,
        added: Counter,
        updated: Counter,
        removed: Counter,
        tier_share: Vec<Gauge>,
    }

    impl BalancerMetrics {
        /// `tiers`: the tiers' names, for `waypost_tier_share` (empty without tiers).
        pub(crate) fn new(service: Option<&str>, tiers: &[String]) -> Self {
            let Some(service) = service else {
                return BalancerMetrics {
                    service: String::new(),
                    total: Gauge::noop(),
                    served: Gauge::noop(),
                    fail_static: Gauge::noop(),
                    snapshot: Counter::noop(),
                    added: Counter::noop(),
                    updated: Counter::noop(),
                    removed: Counter::noop(),
                    tier_share: Vec::new(),
                };
            };
            let s = service.to_owned();
            let events = |kind: &'static str| counter!("waypost_watch_events_total", "service" => s.clone(), "kind" => kind);
            let m = BalancerMetrics {
                total: gauge!("waypost_membership_total", "service" => s.clone()),
                served: gauge!("waypost_membership_served", "service" => s.clone()),
                fail_static: gauge!("waypost_fail_static", "service" => s.clone()),
                snapshot: events("snapshot"),
                added: events("added"),
                updated: events("updated"),
                removed: events("removed"),
                tier_share: tiers
                    .iter()
                    .map(|t| gauge!("waypost_tier_share", "service" => s.clone(), "tier" => t.clone()))
                    .collect(),
                service: s,
            };
            // Present from the start, so that dashboards and alerts see 0 rather than nothing.
            m.total.set(0.0);
            m.served.set(0.0);
            m.fail_static.set(0.0);
            for g in &m.tier_share {
                g.set(0.0);
            }
            m
        }

        /// Each tier's share of the traffic (0 to 1), in tier order.
        pub(crate) fn tier_shares(&self, shares: &[f64]) {
            for (g, s) in self.tier_share.iter().zip(shares) {
                g.set(*s);
            }
        }

        pub(crate) fn event(&self, event: &WatchEvent) {
            match event {
                WatchEvent::Snapshot(_) => self.snapshot.increment(1),
                WatchEvent::Added(_) => self.added.increment(1),
                WatchEvent::Updated(_) => self.updated.increment(1),
                WatchEvent::Removed(_) => self.removed.increment(1),
                WatchEvent::Synced => {}
            }
        }

        pub(crate) fn error(&self, backend: &'static str) {
            if !self.service.is_empty() {
                counter!("waypost_watch_errors_total", "service" => self.service.clone(), "backend" => backend).increment(1);
            }
        }

        pub(crate) fn membership(&self, reported: usize, served: usize, fail_static: bool) {
            self.total.set(reported as f64);
            self.served.set(served as f64);
            self.fail_static.set(if fail_static { 1.0 } else { 0.0 });
        }
    }

    /// The series of one registration.
    #[derive(Debug)]
    pub(crate) struct RegistrationMetrics {
        live: Gauge,
        failures: Counter,
    }

    impl RegistrationMetrics {
        pub(crate) fn new(service: &str, instance: &str, backend: &'static str) -> Self {
            let (s, i) = (service.to_owned(), instance.to_owned());
            let m = RegistrationMetrics {
                live: gauge!("waypost_registration_live", "service" => s.clone(), "instance" => i.clone(), "backend" => backend),
                failures: counter!("waypost_heartbeat_failures_total", "service" => s, "instance" => i, "backend" => backend),
            };
            m.live.set(0.0);
            m.failures.increment(0);
            m
        }

        pub(crate) fn live(&self, live: bool) {
            self.live.set(if live { 1.0 } else { 0.0 });
        }

        pub(crate) fn failure(&self) {
            self.failures.increment(1);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod off {
    use super::*;

    #[derive(Clone)]
    pub(crate) struct RequestMetrics;

    impl RequestMetrics {
        pub(crate) fn new(_: &str, _: Option<&str>) -> Self {
            RequestMetrics
        }
        pub(crate) fn none() -> Self {
            RequestMetrics
        }
        #[inline]
        pub(crate) fn begin(&self) {}
        #[inline]
        pub(crate) fn end(&self, _: Option<(Outcome, Duration)>) {}
    }

    pub(crate) struct BalancerMetrics;

    impl BalancerMetrics {
        pub(crate) fn new(_: Option<&str>, _: &[String]) -> Self {
            BalancerMetrics
        }
        pub(crate) fn tier_shares(&self, _: &[f64]) {}
        pub(crate) fn event(&self, _: &WatchEvent) {}
        pub(crate) fn error(&self, _: &'static str) {}
        pub(crate) fn membership(&self, _: usize, _: usize, _: bool) {}
    }

    #[derive(Debug)]
    pub(crate) struct RegistrationMetrics;

    impl RegistrationMetrics {
        pub(crate) fn new(_: &str, _: &str, _: &'static str) -> Self {
            RegistrationMetrics
        }
        pub(crate) fn live(&self, _: bool) {}
        pub(crate) fn failure(&self) {}
    }
}

#[cfg(not(feature = "metrics"))]
pub(crate) use off::*;
#[cfg(feature = "metrics")]
pub(crate) use on::*;
