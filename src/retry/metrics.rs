//! The retry series of a client (feature `metrics`): `waypost_retries_total` and
//! `waypost_retry_budget_exhausted_total`, labelled `service`. Registered when the client is
//! built; no-ops without a recorder, absent without the feature.

#[cfg(feature = "metrics")]
#[derive(Debug)]
pub(crate) struct RetryMetrics {
    retries: metrics::Counter,
    exhausted: metrics::Counter,
}

#[cfg(feature = "metrics")]
impl RetryMetrics {
    pub(crate) fn new(service: Option<&str>) -> Self {
        let Some(service) = service else {
            return RetryMetrics {
                retries: metrics::Counter::noop(),
                exhausted: metrics::Counter::noop(),
            };
        };
        let m = RetryMetrics {
            retries: metrics::counter!("waypost_retries_total", "service" => service.to_owned()),
            exhausted: metrics::counter!("waypost_retry_budget_exhausted_total", "service" => service.to_owned()),
        };
        // Present at 0 from the start, for dashboards and alerts.
        m.retries.increment(0);
        m.exhausted.increment(0);
        m
    }

    pub(crate) fn retry(&self) {
        self.retries.increment(1);
    }

    pub(crate) fn budget_exhausted(&self) {
        self.exhausted.increment(1);
    }
}

#[cfg(not(feature = "metrics"))]
#[derive(Debug)]
pub(crate) struct RetryMetrics;

#[cfg(not(feature = "metrics"))]
impl RetryMetrics {
    pub(crate) fn new(_: Option<&str>) -> Self {
        RetryMetrics
    }
    pub(crate) fn retry(&self) {}
    pub(crate) fn budget_exhausted(&self) {}
}
