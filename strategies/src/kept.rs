//! The last few builds a hash strategy keeps, so that its next build redoes only what changed.
//!
//! A balancer with failover tiers builds every tier's picker with one strategy, and a change
//! rebuilds only the tier it touches. With a single kept build, each tier's update would be
//! compared with another tier's set and start from scratch; with one kept per tier, each finds
//! its own.

/// How many builds a strategy keeps: one per tier, for up to four tiers.
pub(crate) const KEPT: usize = 4;

/// Which of `kept` holds most of a few sampled endpoints of a new set of `n` (the first, the
/// middle and the last), if any holds one: a balancer's tiers are disjoint, so this tells them
/// apart. `holds(build, at)` tells whether `build` has the new set's endpoint `at`. Of builds
/// that hold as many, the latest (kept are in order, the latest first).
pub(crate) fn closest<T>(kept: &[T], n: usize, holds: impl Fn(&T, usize) -> bool) -> Option<usize> {
    let samples: &[usize] = match n {
        0 => return None,
        1 => &[0],
        _ => &[0, n / 2, n - 1],
    };
    kept.iter()
        .enumerate()
        .map(|(i, build)| (samples.iter().filter(|&&at| holds(build, at)).count(), i))
        .filter(|&(shared, _)| shared > 0)
        .max_by_key(|&(shared, i)| (shared, std::cmp::Reverse(i)))
        .map(|(_, i)| i)
}

/// Puts `build` first among `kept`, keeping at most [`KEPT`].
pub(crate) fn keep<T>(kept: &mut Vec<T>, build: T) {
    kept.insert(0, build);
    kept.truncate(KEPT);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_holding_most_samples_wins_and_ties_go_to_the_latest() {
        // Builds as the sets of sample positions they hold.
        let kept: Vec<Vec<usize>> = vec![vec![0], vec![0, 5, 9], vec![5, 9], vec![]];
        let holds = |b: &Vec<usize>, at: usize| b.contains(&at);
        assert_eq!(closest(&kept, 10, holds), Some(1));
        assert_eq!(closest(&kept[2..], 10, holds), Some(0));
        assert_eq!(closest(&kept[3..], 10, holds), None);
        assert_eq!(closest(&kept, 0, holds), None);
        // One endpoint: the first two hold it; the latest wins.
        assert_eq!(closest(&kept, 1, holds), Some(0));
        let mut kept = kept;
        for b in 10..16 {
            keep(&mut kept, vec![b]);
        }
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0], vec![15]);
    }
}
