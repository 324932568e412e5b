//! The settings of each resilience mechanism, with the defaults that production proxies use.

use std::time::Duration;

/// Passive outlier ejection: an instance that fails `consecutive_failures` calls in a row (as
/// reported through the pick guard) is left out of picks for `base_ejection_time × n`, capped
/// at `max_ejection_time`, where n is its ejection count, this ejection included. Afterwards
/// it returns on probation: for `probation` a single failure ejects it again (for longer,
/// since n grew).
///
/// The count is Envoy's: each ejection adds one (until the ejection reaches
/// `max_ejection_time`, then it stops growing), and every `base_ejection_time` the instance
/// spends back without being ejected takes one away. An instance that misbehaved once long
/// ago thus gets a short ejection again, and one ejected often gets there after at most
/// `max_ejection_time / base_ejection_time` healthy intervals (10 with the defaults, five
/// minutes). Envoy counts the intervals of its sweep timer (`interval`, 10 s by default);
/// this layer has no timer and counts base intervals when it next ejects.
/// At most `max_ejected_share` of the instances are ejected at once: past that, failures are
/// more likely the caller's problem or a wide outage than a few bad instances.
///
/// Defaults follow Envoy: 5 failures, 30 s, capped at 300 s, 50 %; probation lasts 30 s.
///
/// Failures are noticed on the pick path: the first pick that lands on an instance whose
/// failures call for ejection ejects it (and picks again), so an instance nobody picks is never
/// ejected, and needs not be. The share limit counts the instances that pass the
/// [`Filter`](super::Filter). Ejecting is a compare-and-swap on the instance's state, so that
/// two pickers deciding at once (the old and the new strategy during a `set_strategy`) eject
/// it once. Calls still in flight when an instance is ejected can fail after the ejection and
/// count toward its probation.
///
/// ```
/// use std::time::Duration;
/// use waypost_strategies::resilience::OutlierEjection;
/// let strict = OutlierEjection {
///     consecutive_failures: 3,
///     base_ejection_time: Duration::from_secs(10),
///     ..OutlierEjection::default()
/// };
/// assert_eq!(strict.max_ejected_share, 0.5);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierEjection {
    /// Failures in a row that eject an instance (0 is taken as 1).
    pub consecutive_failures: u32,
    /// The first ejection's length; one with a count of n lasts n times as long. Also the
    /// period after which an instance back from ejection has one ejection forgiven.
    pub base_ejection_time: Duration,
    /// The longest an ejection lasts.
    pub max_ejection_time: Duration,
    /// The largest share of the instances ejected at once, 0.0 to 1.0 (out-of-range values are
    /// clamped, NaN means the default). An ejection that would exceed it does not happen.
    pub max_ejected_share: f64,
    /// How long after an ejection ends a single failure ejects again (zero: no probation).
    pub probation: Duration,
}

impl Default for OutlierEjection {
    fn default() -> Self {
        OutlierEjection {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejected_share: 0.5,
            probation: Duration::from_secs(30),
        }
    }
}

/// Slow start: an instance that appears after the balancer started gets a share of traffic that
/// grows over `window`, from `min_weight_share` of its weight's share to all of it, so that a
/// cold instance (empty caches, JIT) is not flooded. The ramp is
/// `max(min_weight_share, (age / window)^(1 / aggression))`: aggression 1.0 is linear, larger
/// values ramp up faster at first. Instances present when the balancer started are not slowed
/// (there is nothing warmer to send traffic to).
///
/// Implemented by rejection in the picker: a pick that lands on a ramping instance is kept with
/// the ramp's probability, otherwise the inner strategy picks again (a bounded number of times).
///
/// ```
/// use std::time::Duration;
/// use waypost_strategies::resilience::SlowStart;
/// let s = SlowStart { window: Duration::from_secs(120), ..SlowStart::default() };
/// assert_eq!(s.aggression, 1.0);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SlowStart {
    /// How long the ramp lasts.
    pub window: Duration,
    /// The ramp's curvature (> 0; 1.0 is linear). Invalid values mean 1.0.
    pub aggression: f64,
    /// The share of its weight a new instance starts with, 0.0 to 1.0 (clamped; NaN means the
    /// default).
    pub min_weight_share: f64,
}

impl Default for SlowStart {
    fn default() -> Self {
        SlowStart {
            window: Duration::from_secs(60),
            aggression: 1.0,
            min_weight_share: 0.1,
        }
    }
}

/// Zone preference: a request whose [`PickContext`](waypost_core::PickContext) names a zone goes
/// to instances in that zone, as long as at least `min_healthy` of them, and at least
/// `min_healthy_share` of them, are healthy (not ejected); otherwise to all instances.
///
/// ```
/// use waypost_strategies::resilience::ZonePreference;
/// let z = ZonePreference { min_healthy: 2, ..ZonePreference::default() };
/// assert_eq!(z.min_healthy_share, 0.7);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ZonePreference {
    /// The fewest healthy instances in the caller's zone for the zone to be preferred (0 is
    /// taken as 1).
    pub min_healthy: usize,
    /// The smallest healthy share of the zone's instances for it to be preferred, 0.0 to 1.0
    /// (clamped; NaN means the default). 0.7 matches Envoy's overprovisioning factor of 1.4.
    pub min_healthy_share: f64,
}

impl Default for ZonePreference {
    fn default() -> Self {
        ZonePreference {
            min_healthy: 1,
            min_healthy_share: 0.7,
        }
    }
}

/// `share` in 0.0..=1.0, or `default` for NaN.
pub(super) fn share(share: f64, default: f64) -> f64 {
    if share.is_nan() {
        default
    } else {
        share.clamp(0.0, 1.0)
    }
}
