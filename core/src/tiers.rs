//! Failover tiers: how a balancer with several tiers shares traffic between them (the rule is
//! in the crate docs, "Failover tiers").

use std::fmt;

use crate::balancer::FailStatic;

/// The overprovisioning factor, in percent, that a balancer with tiers uses unless told
/// otherwise: Envoy's 1.4.
pub const DEFAULT_OVERPROVISIONING: u32 = 140;

/// `1.0` of traffic in the fixed-point scale that picks compare with: a pick draws a 32-bit
/// number and takes the first tier whose cumulative threshold lies above it.
pub(crate) const WHOLE: u64 = 1 << 32;

/// One tier's counts, the input of [`shares`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Instances the tier reports that no higher tier serves.
    pub(crate) reported: usize,
    /// Those of them that are not critical.
    pub(crate) healthy: usize,
    /// Instances the tier serves now (its last set, when fail-static).
    pub(crate) serving: usize,
}

/// Each tier's share of the traffic, as fractions that sum to 1 (or all 0 when no tier serves
/// anything).
pub(crate) fn shares(counts: &[Counts], overprovisioning: u32) -> Vec<f64> {
    let factor = f64::from(overprovisioning.max(1)) / 100.0;
    let able: Vec<f64> = counts
        .iter()
        .map(|c| {
            if c.reported == 0 || c.serving == 0 {
                0.0
            } else {
                (c.healthy as f64 / c.reported as f64 * factor).min(1.0)
            }
        })
        .collect();
    let total: f64 = able.iter().sum();
    if total <= 0.0 {
        // Panic: no tier has a healthy instance. The first one that serves anything (fail-static)
        // takes everything.
        let mut out = vec![0.0; counts.len()];
        if let Some(i) = counts.iter().position(|c| c.serving > 0) {
            out[i] = 1.0;
        }
        return out;
    }
    if total < 1.0 {
        return able.iter().map(|a| a / total).collect();
    }
    let mut left = 1.0_f64;
    able.iter()
        .map(|a| {
            let take = a.min(left);
            left -= take;
            take
        })
        .collect()
}

/// The cumulative thresholds picks compare with, in the [`WHOLE`] scale; the last one that
/// has a share is raised to `WHOLE` so that rounding never leaves a pick without a tier.
pub(crate) fn thresholds(shares: &[f64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(shares.len());
    let mut sum = 0.0_f64;
    for s in shares {
        sum += s;
        out.push(((sum * WHOLE as f64) as u64).min(WHOLE));
    }
    if let Some(last) = shares.iter().rposition(|s| *s > 0.0) {
        for t in &mut out[last..] {
            *t = WHOLE;
        }
    }
    out
}

/// Mixes a request's hash before choosing a tier with it, so that the keys a tier receives are
/// not one slice of the hash space (which would unbalance a consistent-hash ring inside it).
pub(crate) fn mix(hash: u64) -> u32 {
    // splitmix64's finalizer.
    let mut z = hash ^ 0x5851_F42D_4C95_7F2D;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

/// The `n`-th point of a Weyl sequence: picks without a key spread over the tiers in exactly
/// their shares, without a random number generator.
pub(crate) fn weyl(n: u64) -> u32 {
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// One tier of a balancer, as [`Balancer::tiers`](crate::Balancer::tiers) reports it.
///
/// ```
/// use waypost_core::{Balancer, Health, ServiceInstance, Watch, WatchEvent};
/// # struct First; struct P;
/// # use waypost_core::{Endpoint, PickContext, Picker, Strategy};
/// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(P) } }
/// # impl Picker for P { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let inst = |id: &str, health| ServiceInstance::builder("users", id).host("h").port(1).health(health).build();
/// // dc1: one of two instances healthy (50 % × 1.4 = 70 % of the traffic); dc2 takes the rest.
/// let dc1 = vec![inst("a", Health::Passing)?, inst("b", Health::Critical)?];
/// let dc2 = vec![inst("c", Health::Passing)?];
/// let watch = |set| -> Watch { Box::pin(futures::stream::iter([Ok(WatchEvent::Snapshot(set)), Ok(WatchEvent::Synced)]).chain(futures::stream::pending())) };
/// # use futures::StreamExt;
/// let balancer = Balancer::builder(First)
///     .tier_from_watch("dc1", watch(dc1))
///     .tier_from_watch("dc2", watch(dc2))
///     .build();
/// balancer.ready().await;
/// # while balancer.tiers()[1].serving == 0 { tokio::task::yield_now().await; }
/// let tiers = balancer.tiers();
/// assert_eq!((tiers[0].name.as_str(), tiers[0].healthy, tiers[0].reported), ("dc1", 1, 2));
/// assert!((tiers[0].share - 0.7).abs() < 1e-9 && (tiers[1].share - 0.3).abs() < 1e-9);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TierStatus {
    /// The name given when the tier was added.
    pub name: String,
    /// Instances the tier reports that no higher tier serves.
    pub reported: usize,
    /// Those of them that are not critical.
    pub healthy: usize,
    /// Instances picks in this tier choose from now.
    pub serving: usize,
    /// The share of the traffic the tier takes now (0 to 1).
    pub share: f64,
    /// Set when the tier serves a set other than the one its backend reported last, and why.
    pub fail_static: Option<FailStatic>,
    /// Whether the tier's watch is in sync with its backend.
    pub in_sync: bool,
}

impl fmt::Display for TierStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}/{} healthy, {:.0} % of the traffic",
            self.name,
            self.healthy,
            self.reported,
            self.share * 100.0
        )?;
        if let Some(why) = &self.fail_static {
            write!(f, " ({why})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(reported: usize, healthy: usize) -> Counts {
        Counts {
            reported,
            healthy,
            serving: healthy.max(usize::from(reported > 0)),
        }
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn a_healthy_first_tier_takes_everything() {
        assert!(close(&shares(&[c(3, 3), c(3, 3)], 140), &[1.0, 0.0]));
        // 72 % healthy × 1.4 > 100 %: still everything.
        assert!(close(&shares(&[c(100, 72), c(3, 3)], 140), &[1.0, 0.0]));
    }

    #[test]
    fn a_degraded_tier_spills_by_health_times_overprovisioning() {
        let s = shares(&[c(3, 1), c(3, 3)], 140);
        assert!(close(&s, &[1.4 / 3.0, 1.0 - 1.4 / 3.0]), "{s:?}");
        let s = shares(&[c(10, 5), c(10, 2), c(10, 10)], 140);
        assert!(close(&s, &[0.7, 0.28, 0.02]), "{s:?}");
    }

    #[test]
    fn tiers_that_cannot_take_everything_share_in_proportion() {
        let s = shares(&[c(10, 2), c(10, 1)], 140);
        assert!(close(&s, &[2.0 / 3.0, 1.0 / 3.0]), "{s:?}");
    }

    #[test]
    fn an_empty_or_unhealthy_tier_takes_nothing() {
        assert!(close(&shares(&[c(0, 0), c(2, 2)], 140), &[0.0, 1.0]));
        assert!(close(&shares(&[c(2, 0), c(2, 2)], 140), &[0.0, 1.0]));
    }

    #[test]
    fn panic_sends_everything_to_the_first_tier_that_serves() {
        let kept = Counts {
            reported: 2,
            healthy: 0,
            serving: 2,
        };
        assert!(close(
            &shares(&[c(0, 0), kept, kept], 140),
            &[0.0, 1.0, 0.0]
        ));
        assert!(close(&shares(&[c(0, 0), c(0, 0)], 140), &[0.0, 0.0]));
    }

    #[test]
    fn thresholds_end_at_whole_and_weyl_points_land_in_the_shares() {
        let s = shares(&[c(3, 1), c(3, 3)], 140);
        let t = thresholds(&s);
        assert_eq!(t[1], WHOLE);
        let n = 30_000u64;
        let first = (0..n).filter(|i| u64::from(weyl(*i)) < t[0]).count() as f64;
        assert!((first / n as f64 - s[0]).abs() < 0.001, "{first}");
        assert_eq!(thresholds(&[0.0, 1.0, 0.0]), vec![0, WHOLE, WHOLE]);
    }

    #[test]
    fn mixed_hashes_spread_evenly() {
        let below = (0..10_000u64).filter(|h| mix(*h) < u32::MAX / 2).count();
        assert!((4_700..5_300).contains(&below), "{below}");
    }
}
