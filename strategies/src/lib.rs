//! Waypost's load-balancing strategies, each behind a Cargo feature of the same name.
//!
//! | feature | type | picks |
//! |---|---|---|
//! | `round-robin` | `RoundRobin` | each instance in turn |
//! | `random` | `Random` | uniformly at random |
//! | `weighted-round-robin` | `WeightedRoundRobin` | in turn, in proportion to weight, smoothly interleaved |
//! | `least-connections` | `LeastConnections` | fewest calls in flight per unit of weight |
//! | `weighted-random` | `WeightedRandom` | at random, in proportion to weight |
//! | `p2c` | `P2c` | the less loaded of two random instances |
//! | `p2c-ewma` | `P2cEwma` | the faster of two random instances (peak-EWMA latency × load) |
//! | `consistent-hash` | `ConsistentHash` | by request key on a ring (Ketama) |
//! | `maglev` | `Maglev` | by request key in a Maglev table |
//!
//! [`by_name`] turns a strategy's name into a strategy, for configuration files and CLIs.
#![warn(missing_docs)]

use std::sync::Arc;

use waypost_core::Strategy;

#[cfg(feature = "random")]
mod random;
#[cfg(feature = "random")]
pub use random::Random;

#[cfg(feature = "round-robin")]
mod round_robin;
#[cfg(feature = "round-robin")]
pub use round_robin::RoundRobin;

#[cfg(feature = "weighted-round-robin")]
mod weighted_round_robin;
#[cfg(feature = "weighted-round-robin")]
pub use weighted_round_robin::WeightedRoundRobin;

#[cfg(feature = "least-connections")]
mod least_connections;
#[cfg(feature = "least-connections")]
pub use least_connections::LeastConnections;

#[cfg(feature = "weighted-random")]
mod weighted_random;
#[cfg(feature = "weighted-random")]
pub use weighted_random::WeightedRandom;

#[cfg(feature = "p2c")]
mod p2c;
#[cfg(feature = "p2c")]
pub use p2c::P2c;

#[cfg(feature = "p2c-ewma")]
mod p2c_ewma;
#[cfg(feature = "p2c-ewma")]
pub use p2c_ewma::P2cEwma;

#[cfg(feature = "consistent-hash")]
mod consistent_hash;
#[cfg(feature = "consistent-hash")]
pub use consistent_hash::ConsistentHash;

#[cfg(feature = "maglev")]
mod maglev;
#[cfg(feature = "maglev")]
pub use maglev::Maglev;

#[cfg(feature = "resilience")]
pub mod resilience;

mod rng;
pub use rng::Rng;

#[cfg(any(feature = "p2c", feature = "p2c-ewma"))]
mod two_choices;

/// The names of the strategies compiled in, as [`by_name`] accepts them.
///
/// ```
/// assert!(waypost_strategies::names().contains(&"round-robin"));
/// ```
pub fn names() -> Vec<&'static str> {
    const ALL: &[(&str, bool)] = &[
        ("round-robin", cfg!(feature = "round-robin")),
        ("random", cfg!(feature = "random")),
        (
            "weighted-round-robin",
            cfg!(feature = "weighted-round-robin"),
        ),
        ("least-connections", cfg!(feature = "least-connections")),
        ("weighted-random", cfg!(feature = "weighted-random")),
        ("p2c", cfg!(feature = "p2c")),
        ("p2c-ewma", cfg!(feature = "p2c-ewma")),
        ("consistent-hash", cfg!(feature = "consistent-hash")),
        ("maglev", cfg!(feature = "maglev")),
    ];
    ALL.iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect()
}

/// The strategy called `name` with default settings, or `None` if no compiled-in strategy has
/// that name (see [`names`]).
///
/// ```
/// let s = waypost_strategies::by_name("round-robin").expect("compiled in by default");
/// assert_eq!(s.name(), "round-robin");
/// assert!(waypost_strategies::by_name("no-such-strategy").is_none());
/// ```
pub fn by_name(name: &str) -> Option<Arc<dyn Strategy>> {
    match name {
        #[cfg(feature = "round-robin")]
        "round-robin" => Some(Arc::new(RoundRobin::new())),
        #[cfg(feature = "random")]
        "random" => Some(Arc::new(Random::new())),
        #[cfg(feature = "weighted-round-robin")]
        "weighted-round-robin" => Some(Arc::new(WeightedRoundRobin::new())),
        #[cfg(feature = "least-connections")]
        "least-connections" => Some(Arc::new(LeastConnections::new())),
        #[cfg(feature = "weighted-random")]
        "weighted-random" => Some(Arc::new(WeightedRandom::new())),
        #[cfg(feature = "p2c")]
        "p2c" => Some(Arc::new(P2c::new())),
        #[cfg(feature = "p2c-ewma")]
        "p2c-ewma" => Some(Arc::new(P2cEwma::new())),
        #[cfg(feature = "consistent-hash")]
        "consistent-hash" => Some(Arc::new(ConsistentHash::new())),
        #[cfg(feature = "maglev")]
        "maglev" => Some(Arc::new(Maglev::new())),
        _ => None,
    }
}
