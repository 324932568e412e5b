//! The strategies by name: for configuration files, command lines and environment variables.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use waypost_core::Strategy;

/// A strategy chosen by name, with its default settings.
///
/// Each variant exists only with the Cargo feature of the same name (`round-robin`,
/// `weighted-random`, ...; the facade `waypost` has the same features, the first four in its
/// default `classic`). Parsing the name of a strategy whose feature is off fails with
/// [`ParseStrategyError::NotCompiledIn`], which names the feature to enable.
///
/// | variant | name | feature |
/// |---|---|---|
/// | `RoundRobin` | `round-robin` | `round-robin` |
/// | `Random` | `random` | `random` |
/// | `WeightedRoundRobin` | `weighted-round-robin` | `weighted-round-robin` |
/// | `LeastConnections` | `least-connections` | `least-connections` |
/// | `WeightedRandom` | `weighted-random` | `weighted-random` |
/// | `P2c` | `p2c` | `p2c` |
/// | `P2cEwma` | `p2c-ewma` | `p2c-ewma` |
/// | `ConsistentHash` | `consistent-hash` | `consistent-hash` |
/// | `Maglev` | `maglev` | `maglev` |
///
/// ```
/// use waypost_strategies::StrategyKind;
///
/// let kind: StrategyKind = "weighted-round-robin".parse()?;
/// assert_eq!(kind, StrategyKind::WeightedRoundRobin);
/// assert_eq!(kind.to_string(), "weighted-round-robin");
/// let strategy = kind.build();
/// assert_eq!(strategy.name(), "weighted-round-robin");
///
/// let err = "fastest".parse::<StrategyKind>().unwrap_err();
/// assert!(err.to_string().contains("round-robin"), "the error lists the names: {err}");
/// # Ok::<(), waypost_strategies::ParseStrategyError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum StrategyKind {
    /// [`RoundRobin`](crate::RoundRobin): each instance in turn (feature `round-robin`).
    #[cfg(feature = "round-robin")]
    RoundRobin,
    /// [`Random`](crate::Random): uniformly at random (feature `random`).
    #[cfg(feature = "random")]
    Random,
    /// [`WeightedRoundRobin`](crate::WeightedRoundRobin): in turn, in proportion to weight (feature
    /// `weighted-round-robin`).
    #[cfg(feature = "weighted-round-robin")]
    WeightedRoundRobin,
    /// [`LeastConnections`](crate::LeastConnections): fewest calls in flight per unit of weight (feature
    /// `least-connections`).
    #[cfg(feature = "least-connections")]
    LeastConnections,
    /// [`WeightedRandom`](crate::WeightedRandom): at random, in proportion to weight (feature `weighted-random`).
    #[cfg(feature = "weighted-random")]
    WeightedRandom,
    /// [`P2c`](crate::P2c): the less loaded of two random instances (feature `p2c`).
    #[cfg(feature = "p2c")]
    P2c,
    /// [`P2cEwma`](crate::P2cEwma): the faster of two random instances (feature `p2c-ewma`).
    #[cfg(feature = "p2c-ewma")]
    P2cEwma,
    /// [`ConsistentHash`](crate::ConsistentHash): by request key on a ring (feature `consistent-hash`).
    #[cfg(feature = "consistent-hash")]
    ConsistentHash,
    /// [`Maglev`](crate::Maglev): by request key in a Maglev table (feature `maglev`).
    #[cfg(feature = "maglev")]
    Maglev,
}

/// Every strategy name this crate knows, each with its feature and whether it is compiled in,
/// in the documented order.
const KNOWN: &[(&str, bool)] = &[
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

impl StrategyKind {
    /// The strategies compiled in, in the documented order.
    ///
    /// ```
    /// use waypost_strategies::StrategyKind;
    /// assert_eq!(StrategyKind::ALL[0], StrategyKind::RoundRobin);
    /// for kind in StrategyKind::ALL {
    ///     assert_eq!(kind.name().parse::<StrategyKind>(), Ok(*kind));
    /// }
    /// ```
    pub const ALL: &'static [StrategyKind] = &[
        #[cfg(feature = "round-robin")]
        StrategyKind::RoundRobin,
        #[cfg(feature = "random")]
        StrategyKind::Random,
        #[cfg(feature = "weighted-round-robin")]
        StrategyKind::WeightedRoundRobin,
        #[cfg(feature = "least-connections")]
        StrategyKind::LeastConnections,
        #[cfg(feature = "weighted-random")]
        StrategyKind::WeightedRandom,
        #[cfg(feature = "p2c")]
        StrategyKind::P2c,
        #[cfg(feature = "p2c-ewma")]
        StrategyKind::P2cEwma,
        #[cfg(feature = "consistent-hash")]
        StrategyKind::ConsistentHash,
        #[cfg(feature = "maglev")]
        StrategyKind::Maglev,
    ];

    /// The name, as [`FromStr`] accepts it and the built strategy reports it
    /// ([`Strategy::name`]). It is also the name of the strategy's Cargo feature.
    ///
    /// ```
    /// assert_eq!(waypost_strategies::StrategyKind::LeastConnections.name(), "least-connections");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "round-robin")]
            StrategyKind::RoundRobin => "round-robin",
            #[cfg(feature = "random")]
            StrategyKind::Random => "random",
            #[cfg(feature = "weighted-round-robin")]
            StrategyKind::WeightedRoundRobin => "weighted-round-robin",
            #[cfg(feature = "least-connections")]
            StrategyKind::LeastConnections => "least-connections",
            #[cfg(feature = "weighted-random")]
            StrategyKind::WeightedRandom => "weighted-random",
            #[cfg(feature = "p2c")]
            StrategyKind::P2c => "p2c",
            #[cfg(feature = "p2c-ewma")]
            StrategyKind::P2cEwma => "p2c-ewma",
            #[cfg(feature = "consistent-hash")]
            StrategyKind::ConsistentHash => "consistent-hash",
            #[cfg(feature = "maglev")]
            StrategyKind::Maglev => "maglev",
        }
    }

    /// A new strategy of this kind with its default settings (each strategy's `new()`); for
    /// other settings, build the strategy type itself.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::{Balancer, ServiceInstance, WatchEvent};
    /// use waypost_strategies::StrategyKind;
    ///
    /// let balancer = Balancer::new(StrategyKind::RoundRobin.build());
    /// let a = ServiceInstance::builder("users", "a").host("10.0.0.1").port(80).build()?;
    /// balancer.apply(WatchEvent::Snapshot(vec![a]));
    /// assert_eq!(balancer.pick()?.instance().id().as_str(), "a");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn build(self) -> Box<dyn Strategy> {
        match self {
            #[cfg(feature = "round-robin")]
            StrategyKind::RoundRobin => Box::new(crate::RoundRobin::new()),
            #[cfg(feature = "random")]
            StrategyKind::Random => Box::new(crate::Random::new()),
            #[cfg(feature = "weighted-round-robin")]
            StrategyKind::WeightedRoundRobin => Box::new(crate::WeightedRoundRobin::new()),
            #[cfg(feature = "least-connections")]
            StrategyKind::LeastConnections => Box::new(crate::LeastConnections::new()),
            #[cfg(feature = "weighted-random")]
            StrategyKind::WeightedRandom => Box::new(crate::WeightedRandom::new()),
            #[cfg(feature = "p2c")]
            StrategyKind::P2c => Box::new(crate::P2c::new()),
            #[cfg(feature = "p2c-ewma")]
            StrategyKind::P2cEwma => Box::new(crate::P2cEwma::new()),
            #[cfg(feature = "consistent-hash")]
            StrategyKind::ConsistentHash => Box::new(crate::ConsistentHash::new()),
            #[cfg(feature = "maglev")]
            StrategyKind::Maglev => Box::new(crate::Maglev::new()),
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StrategyKind {
    type Err = ParseStrategyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(kind) = StrategyKind::ALL.iter().find(|k| k.name() == s) {
            return Ok(*kind);
        }
        match KNOWN.iter().find(|(name, _)| *name == s) {
            Some((name, _)) => Err(ParseStrategyError::NotCompiledIn { name }),
            None => Err(ParseStrategyError::Unknown { name: s.to_owned() }),
        }
    }
}

/// Why a name is not a [`StrategyKind`].
///
/// ```
/// use waypost_strategies::{ParseStrategyError, StrategyKind};
/// let err = "round_robin".parse::<StrategyKind>().unwrap_err();
/// assert!(matches!(err, ParseStrategyError::Unknown { .. }));
/// assert_eq!(err.to_string(), format!(
///     "no strategy is called \"round_robin\"; the strategies compiled in are {}",
///     waypost_strategies::names().join(", "),
/// ));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseStrategyError {
    /// No strategy has this name.
    Unknown {
        /// The name given.
        name: String,
    },
    /// A strategy of this crate, whose Cargo feature (of the same name) is off.
    NotCompiledIn {
        /// The strategy's name, which is also its feature's.
        name: &'static str,
    },
}

impl fmt::Display for ParseStrategyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseStrategyError::Unknown { name } => {
                write!(f, "no strategy is called {name:?}; ")?;
                let names = names();
                if names.is_empty() {
                    f.write_str("no strategy is compiled in (enable one of the features ")?;
                    let all: Vec<&str> = KNOWN.iter().map(|(n, _)| *n).collect();
                    write!(f, "{})", all.join(", "))
                } else {
                    write!(f, "the strategies compiled in are {}", names.join(", "))
                }
            }
            ParseStrategyError::NotCompiledIn { name } => write!(
                f,
                "strategy {name:?} is not compiled in: enable the Cargo feature \"{name}\" \
                 (of waypost, or of waypost-strategies)"
            ),
        }
    }
}

impl std::error::Error for ParseStrategyError {}

/// The names of the strategies compiled in, as [`by_name`] and [`StrategyKind`]'s `FromStr`
/// accept them.
///
/// ```
/// assert!(waypost_strategies::names().contains(&"round-robin"));
/// ```
pub fn names() -> Vec<&'static str> {
    StrategyKind::ALL.iter().map(|k| k.name()).collect()
}

/// The strategy called `name` with default settings, or `None` if no compiled-in strategy has
/// that name (see [`names`]). [`StrategyKind`]'s `FromStr` says why a name is refused.
///
/// ```
/// let s = waypost_strategies::by_name("round-robin").expect("compiled in by default");
/// assert_eq!(s.name(), "round-robin");
/// assert!(waypost_strategies::by_name("no-such-strategy").is_none());
/// ```
pub fn by_name(name: &str) -> Option<Arc<dyn Strategy>> {
    let kind: StrategyKind = name.parse().ok()?;
    Some(Arc::from(kind.build()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_name_round_trips_or_names_its_feature() {
        for (name, compiled_in) in KNOWN {
            match name.parse::<StrategyKind>() {
                Ok(kind) => {
                    assert!(compiled_in, "{name}");
                    assert_eq!(kind.to_string(), *name);
                    assert_eq!(kind.build().name(), *name, "the built strategy's own name");
                    assert_eq!(
                        by_name(name).map(|s| s.name().to_owned()),
                        Some(name.to_string())
                    );
                }
                Err(e) => {
                    assert!(!compiled_in, "{name}: {e}");
                    assert_eq!(e, ParseStrategyError::NotCompiledIn { name });
                    assert!(
                        e.to_string().contains(&format!("feature \"{name}\"")),
                        "{e}"
                    );
                    assert!(by_name(name).is_none());
                }
            }
        }
        assert_eq!(names().len(), KNOWN.iter().filter(|(_, on)| *on).count());
        assert_eq!(StrategyKind::ALL.len(), names().len());
    }

    #[test]
    fn names_are_exact_and_unknown_ones_list_the_choices() {
        for bad in ["", "Round-Robin", " round-robin", "round_robin", "fastest"] {
            let err = bad.parse::<StrategyKind>().unwrap_err();
            assert_eq!(
                err,
                ParseStrategyError::Unknown {
                    name: bad.to_owned()
                }
            );
            for name in names() {
                assert!(err.to_string().contains(name), "{err}");
            }
        }
    }
}
