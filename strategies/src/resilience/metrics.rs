//! The resilience layer's series (feature `metrics`): `waypost_ejections_active`,
//! `waypost_ejections_total`, `waypost_panic_mode` and, between instance-set updates,
//! `waypost_membership_served` (all labelled `service`). Registered once per strategy, on its
//! first non-empty build; set only when an ejection happens or the healthy counts are taken
//! again, never per pick.

#[cfg(feature = "metrics")]
mod on {
    use metrics::{counter, gauge, Counter, Gauge};

    #[derive(Debug)]
    pub(crate) struct ResilienceMetrics {
        ejections: Counter,
        active: Gauge,
        panic: Gauge,
        served: Gauge,
    }

    impl ResilienceMetrics {
        pub(crate) fn new(service: &str) -> Self {
            let s = service.to_owned();
            let m = ResilienceMetrics {
                ejections: counter!("waypost_ejections_total", "service" => s.clone()),
                active: gauge!("waypost_ejections_active", "service" => s.clone()),
                panic: gauge!("waypost_panic_mode", "service" => s.clone()),
                served: gauge!("waypost_membership_served", "service" => s),
            };
            m.ejections.increment(0);
            m
        }

        pub(crate) fn ejected(&self) {
            self.ejections.increment(1);
        }

        /// The counts of the whole (filtered) set: `len` members, `healthy` not ejected.
        pub(crate) fn counts(&self, len: usize, healthy: usize, panic: bool) {
            self.active.set(len.saturating_sub(healthy) as f64);
            self.panic.set(if panic { 1.0 } else { 0.0 });
            self.served.set(if panic { len } else { healthy } as f64);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod off {
    #[derive(Debug)]
    pub(crate) struct ResilienceMetrics;

    impl ResilienceMetrics {
        pub(crate) fn new(_: &str) -> Self {
            ResilienceMetrics
        }
        pub(crate) fn ejected(&self) {}
        pub(crate) fn counts(&self, _: usize, _: usize, _: bool) {}
    }
}

#[cfg(not(feature = "metrics"))]
pub(crate) use off::*;
#[cfg(feature = "metrics")]
pub(crate) use on::*;
