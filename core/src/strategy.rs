//! Choosing an instance for a request.

use std::sync::Arc;

use crate::endpoint::{clock_nanos, Endpoint};

/// A load-balancing strategy: prepares a [`Picker`] for each new instance set.
///
/// `build` runs on every instance-set update, off the request path; it may precompute tables
/// (prefix sums, hash rings). State that must outlive updates (a round-robin position) lives in
/// the strategy and is shared with the pickers it builds; per-instance state (in-flight counts,
/// latency) lives in each [`Endpoint`]'s state.
///
/// ```
/// use waypost_core::{Endpoint, PickContext, Picker, Strategy};
///
/// /// Always the first instance (by id): the smallest strategy.
/// struct First;
/// struct FirstPicker;
///
/// impl Strategy for First {
///     fn name(&self) -> &str { "first" }
///     fn build(&self, _endpoints: &[Endpoint]) -> Box<dyn Picker> { Box::new(FirstPicker) }
/// }
/// impl Picker for FirstPicker {
///     fn pick(&self, endpoints: &[Endpoint], _: &PickContext<'_>) -> Option<usize> {
///         (!endpoints.is_empty()).then_some(0)
///     }
/// }
/// assert_eq!(First.name(), "first");
/// ```
pub trait Strategy: Send + Sync + 'static {
    /// The strategy's name, as the examples and metrics spell it (`round-robin`, ...).
    ///
    /// ```
    /// # use waypost_core::{Endpoint, PickContext, Picker, ServiceInstance, Strategy};
    /// # struct First; struct FirstPicker;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(FirstPicker) } }
    /// # impl Picker for FirstPicker { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// # let eps: Vec<Endpoint> = ["a", "b"].iter().map(|id| Endpoint::fresh(ServiceInstance::builder("s", *id).host("h").port(1).build().unwrap())).collect();
    /// assert_eq!(First.name(), "first");
    /// let balancer = waypost_core::Balancer::new(First);
    /// assert_eq!(balancer.status().strategy, "first");
    /// ```
    fn name(&self) -> &str;

    /// Prepares a picker for `endpoints` (sorted by id, never empty when the balancer calls).
    ///
    /// ```
    /// # use waypost_core::{Endpoint, PickContext, Picker, ServiceInstance, Strategy};
    /// # struct First; struct FirstPicker;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(FirstPicker) } }
    /// # impl Picker for FirstPicker { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// # let eps: Vec<Endpoint> = ["a", "b"].iter().map(|id| Endpoint::fresh(ServiceInstance::builder("s", *id).host("h").port(1).build().unwrap())).collect();
    /// let picker = First.build(&eps);
    /// assert_eq!(picker.pick(&eps, &PickContext::new()), Some(0));
    /// ```
    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker>;
}

impl<S: Strategy + ?Sized> Strategy for Arc<S> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        (**self).build(endpoints)
    }
}

impl<S: Strategy + ?Sized> Strategy for Box<S> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Picker> {
        (**self).build(endpoints)
    }
}

/// Picks one endpoint of an immutable set. Runs on every request: must not lock, allocate or
/// block. Always called with the same `endpoints` slice it was built for.
///
/// ```
/// use waypost_core::{Endpoint, PickContext, Picker, ServiceInstance};
///
/// /// The endpoint whose index is the key's hash modulo the set's size.
/// struct ByHash;
/// impl Picker for ByHash {
///     fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
///         let n = endpoints.len() as u64;
///         (n > 0).then(|| (ctx.hash().unwrap_or(0) % n) as usize)
///     }
/// }
/// let eps: Vec<Endpoint> = ["a", "b", "c"]
///     .iter()
///     .map(|id| Endpoint::fresh(ServiceInstance::builder("s", *id).host("h").port(1).build().unwrap()))
///     .collect();
/// let ctx = PickContext::new().with_key(b"user-42");
/// assert_eq!(ByHash.pick(&eps, &ctx), ByHash.pick(&eps, &ctx));
/// assert_eq!(ByHash.pick(&[], &ctx), None);
/// ```
pub trait Picker: Send + Sync + 'static {
    /// The index into `endpoints` to use, or `None` if none fits the context.
    ///
    /// ```
    /// # use waypost_core::{Endpoint, PickContext, Picker, ServiceInstance, Strategy};
    /// # struct First; struct FirstPicker;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(FirstPicker) } }
    /// # impl Picker for FirstPicker { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// # let eps: Vec<Endpoint> = ["a", "b"].iter().map(|id| Endpoint::fresh(ServiceInstance::builder("s", *id).host("h").port(1).build().unwrap())).collect();
    /// assert_eq!(FirstPicker.pick(&eps, &PickContext::new()), Some(0));
    /// assert_eq!(FirstPicker.pick(&[], &PickContext::new()), None);
    /// ```
    fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize>;

    /// The index to use for a retry that must avoid every endpoint for which `excluded(i)` is
    /// true (those already tried), or `None` if every endpoint is excluded or none fits the
    /// context. [`Balancer::pick_excluding`](crate::Balancer::pick_excluding) calls it. Same
    /// rules as [`pick`](Self::pick): no lock, no allocation, no blocking; `excluded` is cheap
    /// and may be called any number of times.
    ///
    /// A strategy answers with its next candidate after the excluded ones, by its own rule: a
    /// hashing strategy the next instance on its ring or in its table (so that a retry of a
    /// key lands on the same instance on every client), round robin the next in turn (one
    /// step of its rotation), weighted strategies in proportion to weight among the rest,
    /// load-aware ones the least loaded of the rest. Every strategy of waypost-strategies, and
    /// its resilience layer (which also skips ejected instances, on its own clock), does.
    ///
    /// The default, for pickers that do not say, asks `pick` up to four times for an endpoint
    /// that is not excluded, then takes the one with the fewest calls in flight among those
    /// not excluded, preferring those not ejected (an
    /// [`ejected_until`](crate::EndpointState::ejected_until) ahead of [`clock_nanos`]).
    ///
    /// ```
    /// use waypost_core::{Endpoint, PickContext, Picker, ServiceInstance};
    ///
    /// /// Always the first instance: a picker without an answer of its own for retries.
    /// struct FirstPicker;
    /// impl Picker for FirstPicker {
    ///     fn pick(&self, endpoints: &[Endpoint], _: &PickContext<'_>) -> Option<usize> {
    ///         (!endpoints.is_empty()).then_some(0)
    ///     }
    /// }
    /// let eps: Vec<Endpoint> = ["a", "b", "c"]
    ///     .iter()
    ///     .map(|id| Endpoint::fresh(ServiceInstance::builder("s", *id).host("h").port(1).build().unwrap()))
    ///     .collect();
    /// eps[1].state().begin(); // "b" is busy
    /// let ctx = PickContext::new();
    /// assert_eq!(FirstPicker.pick_excluding(&eps, &ctx, &|i| i == 1), Some(0));
    /// assert_eq!(FirstPicker.pick_excluding(&eps, &ctx, &|i| i == 0), Some(2));
    /// assert_eq!(FirstPicker.pick_excluding(&eps, &ctx, &|_| true), None);
    /// ```
    fn pick_excluding(
        &self,
        endpoints: &[Endpoint],
        ctx: &PickContext<'_>,
        excluded: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        for _ in 0..4 {
            if let Some(i) = self.pick(endpoints, ctx) {
                if i < endpoints.len() && !excluded(i) {
                    return Some(i);
                }
            }
        }
        let now = clock_nanos();
        let least_loaded = |ok: &dyn Fn(usize) -> bool| {
            (0..endpoints.len())
                .filter(|&i| !excluded(i) && ok(i))
                .min_by_key(|&i| endpoints[i].state().in_flight())
        };
        least_loaded(&|i| endpoints[i].state().ejected_until() <= now)
            .or_else(|| least_loaded(&|_| true))
    }

    /// How many of `endpoints` picks choose from now (the `waypost_membership_served` gauge):
    /// all of them, unless the picker leaves some out (filtered, ejected; all again in panic
    /// mode). Read on the update side, never per pick.
    ///
    /// ```
    /// # use waypost_core::{Endpoint, PickContext, Picker, ServiceInstance, Strategy};
    /// # struct First; struct FirstPicker;
    /// # impl Strategy for First { fn name(&self) -> &str { "first" } fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(FirstPicker) } }
    /// # impl Picker for FirstPicker { fn pick(&self, e: &[Endpoint], _: &PickContext<'_>) -> Option<usize> { (!e.is_empty()).then_some(0) } }
    /// # let eps: Vec<Endpoint> = ["a", "b"].iter().map(|id| Endpoint::fresh(ServiceInstance::builder("s", *id).host("h").port(1).build().unwrap())).collect();
    /// assert_eq!(FirstPicker.serving(&eps), 2); // the default: every endpoint
    /// ```
    fn serving(&self, endpoints: &[Endpoint]) -> usize {
        endpoints.len()
    }
}

/// What a request tells the strategy: a hash key for consistent hashing, the caller's zone.
///
/// ```
/// use waypost_core::PickContext;
/// let ctx = PickContext::new().with_key(b"user-42");
/// assert_eq!(ctx.hash(), PickContext::new().with_key(b"user-42").hash());
/// assert!(PickContext::new().hash().is_none());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct PickContext<'a> {
    hash: Option<u64>,
    zone: Option<&'a str>,
}

impl<'a> PickContext<'a> {
    /// No key, no zone.
    pub const fn new() -> Self {
        PickContext {
            hash: None,
            zone: None,
        }
    }

    /// Routes by `key` (a user id, a session): hashing strategies send equal keys to the same
    /// instance. The hash (XXH3) is stable across processes and versions.
    pub fn with_key(self, key: &[u8]) -> Self {
        self.with_hash(xxhash_rust::xxh3::xxh3_64(key))
    }

    /// Routes by a hash the caller computed.
    pub const fn with_hash(mut self, hash: u64) -> Self {
        self.hash = Some(hash);
        self
    }

    /// The caller's zone, for zone-aware balancing.
    pub const fn with_zone(mut self, zone: &'a str) -> Self {
        self.zone = Some(zone);
        self
    }

    /// The request's hash, if it has a key.
    pub const fn hash(&self) -> Option<u64> {
        self.hash
    }

    /// The caller's zone.
    pub const fn zone(&self) -> Option<&'a str> {
        self.zone
    }
}
