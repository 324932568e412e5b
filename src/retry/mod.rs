//! Retries and hedges on another instance: when one is allowed, and the budget that bounds
//! them. One policy serves the HTTP client (`waypost::http`) and the tower service
//! (`waypost::tower`, under the gRPC channel too).
//!
//! A failed attempt is retried on a different instance only if all of these hold:
//! - the request was never sent (a connect error), or it is idempotent;
//! - attempts are left (`max_attempts`, default 3) and so is time (the caller's deadline);
//! - the [`RetryBudget`] has a token: retries stay a share of recent requests, so a failing
//!   service sees about 20 % more load, not three times as much.

mod budget;
mod hedge;
mod metrics;
mod race;

use std::fmt;

pub use budget::{InvalidRetry, RetryBudget};
pub use hedge::Hedge;
pub(crate) use hedge::HEDGE_WITH_ONE_ATTEMPT;
pub(crate) use metrics::RetryMetrics;
pub(crate) use race::{Next, Race};

/// Why a client (the HTTP client, the tower service) stopped trying: part of every error that
/// followed an attempt.
///
/// ```
/// use waypost::retry::GaveUp;
/// assert!(GaveUp::BudgetExhausted.to_string().contains("budget"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GaveUp {
    /// The request was sent and is not idempotent: repeating it could apply it twice.
    NotIdempotent,
    /// Every allowed attempt was made.
    AttemptsExhausted,
    /// The retry budget is spent: many requests needed retries recently.
    BudgetExhausted,
    /// The overall request timeout ran out.
    Deadline,
    /// The failure is not one another instance would fix (the classifier said so: a gRPC
    /// DEADLINE_EXCEEDED, say).
    NotRetryable,
    /// The request could not be copied for another attempt (a streaming body).
    NotCopyable,
}

impl fmt::Display for GaveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GaveUp::NotIdempotent => {
                "not retried: the request was sent and is not idempotent (mark it .idempotent(true) if repeating it is safe)"
            }
            GaveUp::AttemptsExhausted => "every allowed attempt failed (raise max_attempts, or check the service's instances)",
            GaveUp::BudgetExhausted => {
                "not retried: the retry budget is spent because many requests failed recently (the service looks unhealthy; check its instances)"
            }
            GaveUp::Deadline => "the request timeout ran out (raise request_timeout, or find out why the instances are slow)",
            GaveUp::NotRetryable => "not retried: the failure is not one another instance would fix",
            GaveUp::NotCopyable => "not retried: the request could not be copied for another attempt (buffer its body to allow retries)",
        })
    }
}

/// The retry decision of one client: attempts, budget and the retry metrics of its service.
#[derive(Debug)]
pub(crate) struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) budget: RetryBudget,
    metrics: RetryMetrics,
}

impl RetryPolicy {
    pub(crate) fn new(max_attempts: u32, budget: RetryBudget, service: Option<&str>) -> Self {
        RetryPolicy {
            max_attempts,
            budget,
            metrics: RetryMetrics::new(service),
        }
    }

    /// Records a request (once per call, not per attempt).
    pub(crate) fn request(&self) {
        self.budget.deposit();
    }

    /// After attempt number `attempts` failed: `None` to retry (a token is taken and the retry
    /// counted), or why not. `sent`: the request may have reached the instance (anything but a
    /// connect error); `idempotent`: repeating it is safe; `out_of_time`: the caller's deadline
    /// has passed.
    pub(crate) fn decide(
        &self,
        attempts: u32,
        sent: bool,
        idempotent: bool,
        out_of_time: bool,
    ) -> Option<GaveUp> {
        let stop = if sent && !idempotent {
            Some(GaveUp::NotIdempotent)
        } else if attempts >= self.max_attempts {
            Some(GaveUp::AttemptsExhausted)
        } else if out_of_time {
            Some(GaveUp::Deadline)
        } else if !self.budget.try_withdraw() {
            self.metrics.budget_exhausted();
            Some(GaveUp::BudgetExhausted)
        } else {
            None
        };
        if stop.is_none() {
            self.metrics.retry();
        }
        stop
    }

    /// Whether a hedge may go out now, after `attempts` attempts, to an instance the call has
    /// not tried: attempts, the deadline and the budget allow another attempt (a token is
    /// taken when they do).
    pub(crate) fn hedge(&self, attempts: u32, deadline: Option<std::time::Instant>) -> bool {
        let out_of_time = deadline.is_some_and(|d| std::time::Instant::now() >= d);
        match self.decide(attempts, true, true, out_of_time) {
            None => {
                self.metrics.hedge();
                true
            }
            Some(why) => {
                tracing::debug!(%why, "no hedge");
                false
            }
        }
    }

    /// Records that a hedge's answer was the call's.
    pub(crate) fn hedge_won(&self) {
        self.metrics.hedge_won();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision_follows_the_rules_in_order() {
        let p = RetryPolicy::new(3, RetryBudget::new(1.0, 0).unwrap(), None);
        p.request();
        p.request();
        // A sent, non-idempotent request is never repeated, whatever is left.
        assert_eq!(p.decide(1, true, false, false), Some(GaveUp::NotIdempotent));
        // A connect error proves nothing was sent: retried even for a POST.
        assert_eq!(p.decide(1, false, false, false), None);
        assert_eq!(
            p.decide(3, false, true, false),
            Some(GaveUp::AttemptsExhausted)
        );
        assert_eq!(p.decide(1, true, true, true), Some(GaveUp::Deadline));
        assert_eq!(p.decide(2, true, true, false), None);
        // Two deposits paid for two retries; the third finds the budget spent.
        assert_eq!(
            p.decide(1, true, true, false),
            Some(GaveUp::BudgetExhausted)
        );
    }
}
