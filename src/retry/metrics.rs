//! The retry series of a client (feature `metrics`): `waypost_retries_total`,
//! `waypost_retry_budget_exhausted_total`, `waypost_hedges_total` and
//! `waypost_hedges_won_total`, labelled `service`. Registered when the client is built; no-ops
//! without a recorder, absent without the feature.

#[cfg(feature = "metrics")]
#[derive(Debug)]
pub(crate) struct RetryMetrics {
    retries: metrics::Counter,
    exhausted: metrics::Counter,
    hedges: metrics::Counter,
    hedges_won: metrics::Counter,
}

#[cfg(feature = "metrics")]
impl RetryMetrics {
    pub(crate) fn new(service: Option<&str>) -> Self {
        let Some(service) = service else {
            return RetryMetrics {
                retries: metrics::Counter::noop(),
                exhausted: metrics::Counter::noop(),
                hedges: metrics::Counter::noop(),
                hedges_won: metrics::Counter::noop(),
            };
        };
        let m = RetryMetrics {
            retries: metrics::counter!("waypost_retries_total", "service" => service.to_owned()),
            exhausted: metrics::counter!("waypost_retry_budget_exhausted_total", "service" => service.to_owned()),
            hedges: metrics::counter!("waypost_hedges_total", "service" => service.to_owned()),
            hedges_won: metrics::counter!("waypost_hedges_won_total", "service" => service.to_owned()),
        };
        // Present at 0 from the start, for dashboards and alerts.
        m.retries.increment(0);
        m.exhausted.increment(0);
        m.hedges.increment(0);
        m.hedges_won.increment(0);
        m
    }

    pub(crate) fn retry(&self) {
        self.retries.increment(1);
    }

    pub(crate) fn budget_exhausted(&self) {
        self.exhausted.increment(1);
    }

    pub(crate) fn hedge(&self) {
        self.hedges.increment(1);
    }

    pub(crate) fn hedge_won(&self) {
        self.hedges_won.increment(1);
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
    pub(crate) fn hedge(&self) {}
    pub(crate) fn hedge_won(&self) {}
}
