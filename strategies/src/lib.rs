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
//! [`StrategyKind`] names them (`FromStr`, `Display`, [`build`](StrategyKind::build)), for
//! configuration files and CLIs; [`by_name`] and [`names`] are shorthands over it.
#![warn(missing_docs)]

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

#[cfg(any(feature = "consistent-hash", feature = "maglev"))]
mod kept;

mod kind;
pub use kind::{by_name, names, ParseStrategyError, StrategyKind};

mod rng;
pub use rng::Rng;

#[cfg(any(feature = "p2c", feature = "p2c-ewma"))]
mod two_choices;
