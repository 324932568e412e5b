//! A tower `Service` that picks an instance through a [`Balancer`] for every request.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ::tower::{Layer, Service, ServiceExt};
use futures::FutureExt;
use waypost_core::{Balancer, InstanceId, PickContext, PickError, PickGuard, ServiceInstance};

use super::classify::{Classify, ErrIsFailure, Retry};
use crate::retry::{GaveUp, Hedge, Next, Race, RetryBudget, RetryPolicy};

/// How many instances a call tries when the ones it picks are not ready, before it waits for
/// the last one (for at most the ready timeout).
const NOT_READY_TRIES: usize = 3;

/// Why a [`Balanced`] call failed.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower::{service_fn, ServiceExt};
/// use waypost::retry::GaveUp;
/// use waypost::strategies::RoundRobin;
/// use waypost::tower::{BalanceError, Balanced};
/// use waypost::{Balancer, ServiceInstance, WatchEvent};
///
/// let balancer = Balancer::new(RoundRobin::new());
/// let failing = |_: &ServiceInstance| service_fn(|_: ()| async { Err::<(), _>(std::io::Error::other("boom")) });
/// let svc = Balanced::builder(balancer.clone(), failing).build();
///
/// // No instance yet.
/// let err = svc.clone().oneshot(()).await.unwrap_err();
/// assert!(matches!(err, BalanceError::NoInstance(_)));
///
/// let a = ServiceInstance::builder("users", "a").host("10.0.0.1").port(80).build()?;
/// balancer.apply(WatchEvent::Snapshot(vec![a]));
/// match svc.oneshot(()).await {
///     Err(BalanceError::Inner { instance, gave_up, source }) => {
///         assert_eq!(instance.as_str(), "a");
///         assert_eq!(gave_up, GaveUp::AttemptsExhausted); // no retries configured
///         assert_eq!(source.to_string(), "boom");
///     }
///     other => panic!("expected the instance's error, got {other:?}"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BalanceError<E> {
    /// No instance could be picked.
    #[error(transparent)]
    NoInstance(#[from] PickError),
    /// The picked instances were not ready, and the last one did not become ready in time.
    #[error("instance {instance} was not ready within {waited:?} (and {tried} others before it were not ready either); the service looks overloaded")]
    NotReady {
        /// The instance waited for.
        instance: InstanceId,
        /// How long.
        waited: Duration,
        /// How many other instances were not ready before it.
        tried: usize,
    },
    /// The request's deadline ([`BalancedBuilder::deadline`]) passed while `instance` had not
    /// answered: the attempt was ended there, a failure of that instance.
    #[error("instance {instance} had not answered when the request's deadline passed ({attempts} attempt(s) in all)")]
    DeadlineExceeded {
        /// The instance of the attempt that was ended.
        instance: InstanceId,
        /// How many attempts the call made.
        attempts: u32,
    },
    /// The attempt at `instance` ran out of its per-try timeout
    /// ([`BalancedBuilder::per_try_timeout`]), a failure of that instance, and `gave_up` says
    /// why no other instance was tried.
    #[error("instance {instance} had not answered within the per-try timeout of {after:?} ({attempts} attempt(s) in all; {gave_up})")]
    AttemptTimedOut {
        /// The instance of the last attempt.
        instance: InstanceId,
        /// The per-try timeout.
        after: Duration,
        /// How many attempts the call made.
        attempts: u32,
        /// Why no other instance was tried.
        gave_up: GaveUp,
    },
    /// The instance's service failed; `gave_up` says why it was not retried.
    #[error("instance {instance} failed ({gave_up}): {source}")]
    Inner {
        /// The instance that failed last.
        instance: InstanceId,
        /// Why no other instance was tried.
        gave_up: GaveUp,
        /// Its error.
        #[source]
        source: E,
    },
}

/// Routes a request: the hash key (for consistent-hash and maglev) and the caller's zone,
/// borrowed from the request or from the route itself (a zone fixed for the whole client).
/// Implemented for `Fn(&Req) -> PickContext<'_>`; `()` routes nothing.
///
/// Write it as a `fn`: a closure's return type cannot borrow from its argument, so a closure
/// does not implement the trait (the compiler then says that `Balanced` is no `Service`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower::{service_fn, ServiceExt};
/// use waypost::tower::Balanced;
/// use waypost::{Balancer, PickContext, ServiceInstance, WatchEvent};
/// # use waypost::{Endpoint, Picker, Strategy};
/// # /// Picks by the request's hash alone (consistent-hash and maglev also keep keys in place
/// # /// when the set changes).
/// # struct ByHash;
/// # struct ByHashPicker;
/// # impl Strategy for ByHash {
/// #     fn name(&self) -> &str { "by-hash" }
/// #     fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> { Box::new(ByHashPicker) }
/// # }
/// # impl Picker for ByHashPicker {
/// #     fn pick(&self, e: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
/// #         Some((ctx.hash()? % e.len() as u64) as usize)
/// #     }
/// # }
///
/// /// A request for one user's data.
/// struct Get {
///     user: String,
/// }
///
/// let balancer = Balancer::new(ByHash); // waypost::strategies::ConsistentHash, say
/// let inst = |id: &str| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build();
/// balancer.apply(WatchEvent::Snapshot(vec![inst("a")?, inst("b")?, inst("c")?]));
/// let make = |i: &ServiceInstance| {
///     let id = i.id().to_string();
///     service_fn(move |_: Get| std::future::ready(Ok::<_, std::io::Error>(id.clone())))
/// };
/// fn by_user(req: &Get) -> PickContext<'_> {
///     PickContext::new().with_key(req.user.as_bytes())
/// }
/// let svc = Balanced::builder(balancer, make).route(by_user).build();
///
/// let first = svc.clone().oneshot(Get { user: "u-42".into() }).await?;
/// for _ in 0..5 {
///     // The same user, the same instance.
///     assert_eq!(svc.clone().oneshot(Get { user: "u-42".into() }).await?, first);
/// }
/// # Ok(())
/// # }
/// ```
pub trait Route<Req>: Send + Sync + 'static {
    /// The pick context of `request`.
    ///
    /// ```
    /// use waypost::tower::Route;
    /// use waypost::PickContext;
    ///
    /// fn by_user(user: &String) -> PickContext<'_> {
    ///     PickContext::new().with_key(user.as_bytes()).with_zone("eu-1")
    /// }
    /// let user = "u-42".to_string();
    /// let ctx = by_user.route(&user);
    /// assert_eq!(ctx.hash(), PickContext::new().with_key(b"u-42").hash());
    /// assert_eq!(ctx.zone(), Some("eu-1"));
    ///
    /// // `()` routes nothing: no key, no zone.
    /// let ctx = Route::<String>::route(&(), &user);
    /// assert_eq!((ctx.hash(), ctx.zone()), (None, None));
    /// ```
    fn route<'r>(&'r self, request: &'r Req) -> PickContext<'r>;
}

impl<Req> Route<Req> for () {
    fn route<'r>(&'r self, _: &'r Req) -> PickContext<'r> {
        PickContext::new()
    }
}

impl<Req, F> Route<Req> for F
where
    F: for<'r> Fn(&'r Req) -> PickContext<'r> + Send + Sync + 'static,
{
    fn route<'r>(&'r self, request: &'r Req) -> PickContext<'r> {
        self(request)
    }
}

/// Copies a request for another attempt (`None`: it cannot be copied).
type CloneRequest<Req> = Box<dyn Fn(&Req) -> Option<Req> + Send + Sync>;

/// When a request must be answered by, read from the request.
type DeadlineOf<Req> = Box<dyn Fn(&Req) -> Option<Instant> + Send + Sync>;

/// Retries: the shared policy, how to copy a request, and which requests are idempotent.
struct Retries<Req> {
    policy: RetryPolicy,
    clone: CloneRequest<Req>,
    idempotent: Box<dyn Fn(&Req) -> bool + Send + Sync>,
}

/// The services made for instances, dropped when their instance leaves the balancer.
struct Cache<S> {
    generation: u64,
    by_id: HashMap<InstanceId, (String, S)>,
}

struct Inner<M, S, C, X, Req> {
    balancer: Balancer,
    make: M,
    cache: Mutex<Cache<S>>,
    classify: C,
    route: X,
    retries: Option<Retries<Req>>,
    deadline: Option<DeadlineOf<Req>>,
    per_try_timeout: Option<Duration>,
    hedge: Option<Hedge>,
    ready_timeout: Duration,
}

/// A tower [`Service`] that sends each request to an instance a [`Balancer`] picks (any
/// strategy, any backend), through a service `make` builds for that instance.
///
/// - **Per-instance services** are built lazily, on the first request an instance gets, cached
///   by id and dropped once the instance leaves the balancer (or is replaced by one at another
///   address). Each call uses a clone, so `S` should be cheap to clone (a tonic `Channel`, a
///   hyper client handle, a `BoxCloneService`).
/// - **Outcomes**: when the response future completes, the [`Classify`] decides success or
///   failure and the latency is recorded, for load-aware strategies and outlier ejection. A
///   future dropped before it completes (a timeout around the call, a client that went away)
///   counts as cancelled. A success ends there too, unless the classifier keeps the call in
///   flight in its response until the response is done with ([`Classify::finish`]: a stream).
/// - **Routing**: the hash key and the zone come from the request, through a [`Route`].
/// - **Retries** (off unless [`retries`](BalancedBuilder::retries) is set): a failure the
///   classifier allows is repeated on another instance, within the attempts and the shared
///   [`RetryBudget`] (the same policy as the HTTP client's), and only for idempotent requests
///   once one was sent.
/// - **Deadlines** (off unless [`deadline`](BalancedBuilder::deadline) is set): a request's
///   deadline bounds all of its attempts; none starts after it. A
///   [per-try timeout](BalancedBuilder::per_try_timeout) bounds each attempt, so that an
///   instance that hangs leaves time for another.
/// - **Hedges** (off unless [`hedge`](BalancedBuilder::hedge) is set): an idempotent request
///   that has no answer within the hedge's delay also goes to an instance it has not tried, and
///   the first answer wins.
///
/// **`poll_ready` and the pick.** `poll_ready` is always ready: the instance is picked in
/// `call`, per request, so a ready signal from one instance would say nothing about the next
/// pick, and holding one would pin every request to it. Readiness is checked on the instance
/// picked: if its service is not ready at once, another instance is picked (up to three), and
/// only then does the call wait for the last one, for at most the ready timeout (default 1 s),
/// failing with [`BalanceError::NotReady`] rather than hang. No `Buffer` is needed: the service
/// is cheap to clone and clones share everything.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower::{service_fn, ServiceExt};
/// use waypost::strategies::RoundRobin;
/// use waypost::tower::Balanced;
/// use waypost::{Balancer, ServiceInstance, WatchEvent};
///
/// let balancer = Balancer::new(RoundRobin::new());
/// let inst = |id: &str| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build();
/// balancer.apply(WatchEvent::Snapshot(vec![inst("a")?, inst("b")?]));
///
/// // Each instance's "client" answers with the instance id.
/// let make = |i: &ServiceInstance| {
///     let id = i.id().to_string();
///     service_fn(move |_req: &'static str| {
///         let id = id.clone();
///         async move { Ok::<_, std::io::Error>(id) }
///     })
/// };
/// let svc = Balanced::builder(balancer.clone(), make).build();
/// let mut answers = Vec::new();
/// for _ in 0..4 {
///     answers.push(svc.clone().oneshot("GET /users").await?);
/// }
/// answers.sort();
/// assert_eq!(answers, ["a", "a", "b", "b"]);
/// // Outcomes were recorded on the instances.
/// assert_eq!(balancer.endpoints().iter().map(|e| e.state().successes()).sum::<u64>(), 4);
/// # Ok(())
/// # }
/// ```
pub struct Balanced<M, S, Req, C = ErrIsFailure, X = ()> {
    inner: Arc<Inner<M, S, C, X, Req>>,
    _request: PhantomData<fn(Req)>,
}

impl<M, S, Req, C, X> Clone for Balanced<M, S, Req, C, X> {
    fn clone(&self) -> Self {
        Balanced {
            inner: self.inner.clone(),
            _request: PhantomData,
        }
    }
}

impl<M, S, Req, C, X> fmt::Debug for Balanced<M, S, Req, C, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balanced")
            .field("balancer", &self.inner.balancer)
            .field("retries", &self.inner.retries.as_ref().map(|r| &r.policy))
            .field("hedge", &self.inner.hedge)
            .field("ready_timeout", &self.inner.ready_timeout)
            .finish_non_exhaustive()
    }
}

/// Options of a [`Balanced`] service; see [`Balanced::builder`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::task::{Context, Poll};
/// use std::time::Duration;
/// use tower::ServiceExt;
/// use waypost::strategies::RoundRobin;
/// use waypost::tower::{BalanceError, Balanced, HttpStatus};
/// use waypost::{Balancer, ServiceInstance, WatchEvent};
///
/// /// An instance's client that never becomes ready (every connection slot taken).
/// #[derive(Clone)]
/// struct Saturated;
/// impl tower::Service<http::Request<()>> for Saturated {
///     type Response = http::Response<()>;
///     type Error = std::io::Error;
///     type Future = std::future::Ready<Result<http::Response<()>, std::io::Error>>;
///     fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
///         Poll::Pending
///     }
///     fn call(&mut self, _: http::Request<()>) -> Self::Future {
///         std::future::ready(Ok(http::Response::new(())))
///     }
/// }
///
/// let balancer = Balancer::new(RoundRobin::new());
/// let inst = |id: &str| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build();
/// balancer.apply(WatchEvent::Snapshot(vec![inst("a")?, inst("b")?]));
/// let svc = Balanced::builder(balancer.clone(), |_: &ServiceInstance| Saturated)
///     .classify(HttpStatus) // a 5xx is a failure of the instance
///     .ready_timeout(Duration::from_millis(20))
///     .build();
///
/// let request = http::Request::get("/users/1").body(())?;
/// match svc.oneshot(request).await {
///     Err(BalanceError::NotReady { waited, .. }) => assert_eq!(waited, Duration::from_millis(20)),
///     other => panic!("expected NotReady, got {other:?}"),
/// }
/// // Not ready in time counts against the instance waited for.
/// let failures: u64 = balancer.endpoints().iter().map(|e| e.state().failures()).sum();
/// assert_eq!(failures, 1);
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct BalancedBuilder<M, S, Req, C = ErrIsFailure, X = (), R = NoRetries> {
    balancer: Balancer,
    make: M,
    classify: C,
    route: X,
    retries: R,
    deadline: Option<DeadlineOf<Req>>,
    per_try_timeout: Option<Duration>,
    hedge: Option<Hedge>,
    ready_timeout: Duration,
    _service: PhantomData<fn() -> S>,
}

impl<M, S, Req> Balanced<M, S, Req>
where
    M: Fn(&ServiceInstance) -> S,
{
    /// A service over `balancer`, `make` building each instance's service.
    pub fn builder(balancer: Balancer, make: M) -> BalancedBuilder<M, S, Req> {
        BalancedBuilder {
            balancer,
            make,
            classify: ErrIsFailure,
            route: (),
            retries: NoRetries,
            deadline: None,
            per_try_timeout: None,
            hedge: None,
            ready_timeout: Duration::from_secs(1),
            _service: PhantomData,
        }
    }
}

impl<M, S, Req, C, X, R> BalancedBuilder<M, S, Req, C, X, R> {
    /// How results are classified (default [`ErrIsFailure`]; see also
    /// [`HttpStatus`](super::HttpStatus) and [`GrpcStatus`](super::GrpcStatus)).
    pub fn classify<C2>(self, classify: C2) -> BalancedBuilder<M, S, Req, C2, X, R> {
        BalancedBuilder {
            balancer: self.balancer,
            make: self.make,
            classify,
            route: self.route,
            retries: self.retries,
            deadline: self.deadline,
            per_try_timeout: self.per_try_timeout,
            hedge: self.hedge,
            ready_timeout: self.ready_timeout,
            _service: PhantomData,
        }
    }

    /// Where the hash key and the zone of a request come from.
    pub fn route<X2>(self, route: X2) -> BalancedBuilder<M, S, Req, C, X2, R> {
        BalancedBuilder {
            balancer: self.balancer,
            make: self.make,
            classify: self.classify,
            route,
            retries: self.retries,
            deadline: self.deadline,
            per_try_timeout: self.per_try_timeout,
            hedge: self.hedge,
            ready_timeout: self.ready_timeout,
            _service: PhantomData,
        }
    }

    /// When each request must be answered by, read from the request (`None`: no deadline);
    /// gRPC's comes from its `grpc-timeout` header. The deadline bounds the whole call: an
    /// attempt still running at it is ended there, as a failure of its instance
    /// ([`BalanceError::DeadlineExceeded`]), and no retry starts after it
    /// ([`GaveUp::Deadline`]). A wait for a busy instance to become ready ends there too, as
    /// cancelled (nothing was sent).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::{Duration, Instant};
    /// use tower::{service_fn, ServiceExt};
    /// use waypost::strategies::RoundRobin;
    /// use waypost::tower::{BalanceError, Balanced};
    /// use waypost::{Balancer, ServiceInstance, WatchEvent};
    ///
    /// let balancer = Balancer::new(RoundRobin::new());
    /// let a = ServiceInstance::builder("users", "a").host("10.0.0.1").port(80).build()?;
    /// balancer.apply(WatchEvent::Snapshot(vec![a]));
    /// // An instance that never answers; each request says how long it may take.
    /// let hangs = |_: &ServiceInstance| service_fn(|_: Duration| std::future::pending::<Result<(), std::io::Error>>());
    /// let svc = Balanced::builder(balancer.clone(), hangs)
    ///     .deadline(|within: &Duration| Some(Instant::now() + *within))
    ///     .build();
    /// let err = svc.oneshot(Duration::from_millis(20)).await.unwrap_err();
    /// assert!(matches!(err, BalanceError::DeadlineExceeded { attempts: 1, .. }), "{err}");
    /// assert_eq!(balancer.endpoints()[0].state().failures(), 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn deadline(
        mut self,
        deadline: impl Fn(&Req) -> Option<Instant> + Send + Sync + 'static,
    ) -> Self {
        self.deadline = Some(Box::new(deadline));
        self
    }

    /// The longest one attempt may take (within what is left of the deadline, if any): an
    /// attempt still running then is ended, as a failure of its instance, and repeated on
    /// another instance when [`retries`](Self::retries) allow it (the request was sent, so
    /// only an idempotent one), else the call fails with [`BalanceError::AttemptTimedOut`].
    /// Off by default. The instance is not told: its work goes on until its own limit.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower::{service_fn, ServiceExt};
    /// use waypost::retry::RetryBudget;
    /// use waypost::strategies::RoundRobin;
    /// use waypost::tower::Balanced;
    /// use waypost::{Balancer, ServiceInstance, WatchEvent};
    ///
    /// let balancer = Balancer::new(RoundRobin::new());
    /// let inst = |id: &str| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build();
    /// balancer.apply(WatchEvent::Snapshot(vec![inst("hangs")?, inst("works")?]));
    /// let make = |i: &ServiceInstance| {
    ///     let hangs = i.id().as_str() == "hangs";
    ///     service_fn(move |_: ()| async move {
    ///         if hangs {
    ///             std::future::pending::<()>().await;
    ///         }
    ///         Ok::<_, std::io::Error>("answered")
    ///     })
    /// };
    /// let svc = Balanced::builder(balancer.clone(), make)
    ///     .per_try_timeout(Duration::from_millis(20))
    ///     .retries(2, RetryBudget::default(), |_: &()| Some(()), |_: &()| true)
    ///     .build();
    /// for _ in 0..4 {
    ///     // Whichever instance comes first, the call is answered.
    ///     assert_eq!(svc.clone().oneshot(()).await?, "answered");
    /// }
    /// let hung = balancer.endpoints().into_iter().find(|e| e.id().as_str() == "hangs").unwrap();
    /// assert!(hung.state().failures() >= 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn per_try_timeout(mut self, timeout: Duration) -> Self {
        self.per_try_timeout = Some(timeout);
        self
    }

    /// How long a call waits for a picked instance's service to become ready when the
    /// instances it tried first were not (default 1 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The service, with the retries `retries` makes of the builder's setting.
    fn finish(self, retries: impl FnOnce(R) -> Option<Retries<Req>>) -> Balanced<M, S, Req, C, X> {
        Balanced {
            inner: Arc::new(Inner {
                balancer: self.balancer,
                make: self.make,
                cache: Mutex::new(Cache {
                    generation: u64::MAX,
                    by_id: HashMap::new(),
                }),
                classify: self.classify,
                route: self.route,
                retries: retries(self.retries),
                deadline: self.deadline,
                per_try_timeout: self.per_try_timeout,
                hedge: self.hedge,
                ready_timeout: self.ready_timeout,
            }),
            _request: PhantomData,
        }
    }
}

impl<M, S, Req, C, X> BalancedBuilder<M, S, Req, C, X, NoRetries> {
    /// The service: one attempt per request.
    pub fn build(self) -> Balanced<M, S, Req, C, X> {
        self.finish(|NoRetries| None)
    }

    /// Retries on another instance: at most `max_attempts` attempts in all (1 turns retries
    /// off), within `budget` (shared by its clones, as with the HTTP client). `clone` copies
    /// a request for the next attempt (`None`: this one cannot be repeated, as with a
    /// streaming body); `idempotent` says whether repeating it is safe once it was sent.
    pub fn retries(
        self,
        max_attempts: u32,
        budget: RetryBudget,
        clone: impl Fn(&Req) -> Option<Req> + Send + Sync + 'static,
        idempotent: impl Fn(&Req) -> bool + Send + Sync + 'static,
    ) -> BalancedBuilder<M, S, Req, C, X, WithRetries<Req>> {
        let service = self.balancer.status().service;
        let retries = Retries {
            policy: RetryPolicy::new(
                max_attempts.max(1),
                budget,
                service.as_ref().map(|s| s.as_str()),
            ),
            clone: Box::new(clone),
            idempotent: Box::new(idempotent),
        };
        BalancedBuilder {
            balancer: self.balancer,
            make: self.make,
            classify: self.classify,
            route: self.route,
            retries: WithRetries(retries),
            deadline: self.deadline,
            per_try_timeout: self.per_try_timeout,
            hedge: self.hedge,
            ready_timeout: self.ready_timeout,
            _service: PhantomData,
        }
    }
}

impl<M, S, Req, C, X> BalancedBuilder<M, S, Req, C, X, WithRetries<Req>> {
    /// The service, with its retries (and hedges).
    pub fn build(self) -> Balanced<M, S, Req, C, X> {
        self.finish(|WithRetries(retries)| Some(retries))
    }

    /// Hedges idempotent requests (default: never; see [`Hedge`]): when an attempt has not
    /// answered within the hedge's delay, a copy of the request goes to an instance the call
    /// has not tried, and the first answer wins. The attempts still out are then dropped,
    /// and their guards count them as cancelled. A hedge is an attempt, so it is set after
    /// [`retries`](BalancedBuilder::retries), which copy the request, say which requests are
    /// idempotent, and bound every attempt by `max_attempts` and the budget. A failed answer
    /// does not end the call while a hedge is still out.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower::{service_fn, ServiceExt};
    /// use waypost::retry::{Hedge, RetryBudget};
    /// use waypost::strategies::RoundRobin;
    /// use waypost::tower::Balanced;
    /// use waypost::{Balancer, ServiceInstance, WatchEvent};
    ///
    /// let balancer = Balancer::new(RoundRobin::new());
    /// let inst = |id: &str| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build();
    /// balancer.apply(WatchEvent::Snapshot(vec![inst("slow")?, inst("fast")?]));
    /// let make = |i: &ServiceInstance| {
    ///     let id = i.id().to_string();
    ///     service_fn(move |_: ()| {
    ///         let id = id.clone();
    ///         async move {
    ///             if id == "slow" {
    ///                 std::future::pending::<()>().await;
    ///             }
    ///             Ok::<_, std::io::Error>(id)
    ///         }
    ///     })
    /// };
    /// let svc = Balanced::builder(balancer.clone(), make)
    ///     .retries(2, RetryBudget::default(), |_: &()| Some(()), |_: &()| true)
    ///     .hedge(Hedge::after(Duration::from_millis(10)))
    ///     .build();
    /// for _ in 0..4 {
    ///     // Whichever instance comes first, "fast" answers.
    ///     assert_eq!(svc.clone().oneshot(()).await?, "fast");
    /// }
    /// let slow = balancer.endpoints().into_iter().find(|e| e.id().as_str() == "slow").unwrap();
    /// // The slow instance's attempts were dropped: cancelled, not failed.
    /// assert_eq!((slow.state().failures(), slow.state().in_flight()), (0, 0));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Without retries there is nothing to hedge with, and the builder has no `hedge`:
    ///
    /// ```compile_fail
    /// # use std::time::Duration;
    /// # use tower::service_fn;
    /// # use waypost::retry::Hedge;
    /// # use waypost::strategies::RoundRobin;
    /// # use waypost::tower::Balanced;
    /// # use waypost::{Balancer, ServiceInstance};
    /// let make = |_: &ServiceInstance| service_fn(|_: ()| async { Ok::<_, std::io::Error>(()) });
    /// let svc: Balanced<_, _, ()> = Balanced::builder(Balancer::new(RoundRobin::new()), make)
    ///     .hedge(Hedge::after(Duration::from_millis(10)))
    ///     .build();
    /// ```
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        self.hedge = Some(hedge);
        self
    }
}

/// A [`BalancedBuilder`] without retries: every request gets one attempt, and there is no
/// `hedge` (see [`WithRetries`]).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower::{service_fn, ServiceExt};
/// use waypost::retry::GaveUp;
/// use waypost::strategies::RoundRobin;
/// use waypost::tower::{BalanceError, Balanced, BalancedBuilder, ErrIsFailure, NoRetries};
/// use waypost::{Balancer, ServiceInstance, WatchEvent};
///
/// let balancer = Balancer::new(RoundRobin::new());
/// let inst = |id: &str| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build();
/// balancer.apply(WatchEvent::Snapshot(vec![inst("a")?, inst("b")?]));
/// let failing = |_: &ServiceInstance| service_fn(|_: ()| async { Err::<(), _>(std::io::Error::other("down")) });
/// let builder: BalancedBuilder<_, _, (), ErrIsFailure, (), NoRetries> = Balanced::builder(balancer, failing);
/// // One attempt: the first instance's failure is the call's.
/// let err = builder.build().oneshot(()).await.unwrap_err();
/// assert!(matches!(err, BalanceError::Inner { gave_up: GaveUp::AttemptsExhausted, .. }), "{err}");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct NoRetries;

/// A [`BalancedBuilder`] with [`retries`](BalancedBuilder::retries): a request may be repeated
/// on another instance, and [hedged](BalancedBuilder::hedge).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower::{service_fn, ServiceExt};
/// use waypost::retry::RetryBudget;
/// use waypost::strategies::RoundRobin;
/// use waypost::tower::{Balanced, BalancedBuilder, ErrIsFailure, WithRetries};
/// use waypost::{Balancer, ServiceInstance, WatchEvent};
///
/// let balancer = Balancer::new(RoundRobin::new());
/// let inst = |id: &str| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build();
/// balancer.apply(WatchEvent::Snapshot(vec![inst("a")?, inst("b")?]));
/// let make = |i: &ServiceInstance| {
///     let up = i.id().as_str() == "b";
///     service_fn(move |_: ()| async move {
///         if up { Ok("b") } else { Err(std::io::Error::other("down")) }
///     })
/// };
/// let builder: BalancedBuilder<_, _, (), ErrIsFailure, (), WithRetries<()>> =
///     Balanced::builder(balancer, make).retries(2, RetryBudget::default(), |_: &()| Some(()), |_: &()| true);
/// let svc = builder.build();
/// for _ in 0..4 {
///     // Whichever instance comes first, "b" answers.
///     assert_eq!(svc.clone().oneshot(()).await?, "b");
/// }
/// # Ok(())
/// # }
/// ```
pub struct WithRetries<Req>(Retries<Req>);

impl<Req> fmt::Debug for WithRetries<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WithRetries").field(&self.0.policy).finish()
    }
}

impl<M, S, C, X, Req> Inner<M, S, C, X, Req>
where
    M: Fn(&ServiceInstance) -> S,
    S: Clone,
{
    fn cache(&self) -> MutexGuard<'_, Cache<S>> {
        // Every write leaves the map consistent; a panic elsewhere is no reason to stop.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The service of `instance`: cached, or made now. Drops the services of instances that
    /// left whenever the balancer's set changed.
    fn service_for(&self, instance: &ServiceInstance) -> S {
        let generation = self.balancer.generation();
        let mut cache = self.cache();
        if cache.generation != generation {
            let current: HashMap<InstanceId, String> = self
                .balancer
                .endpoints()
                .iter()
                .map(|e| (e.id().clone(), e.instance().authority()))
                .collect();
            cache
                .by_id
                .retain(|id, (addr, _)| current.get(id) == Some(addr));
            cache.generation = generation;
        }
        // Cached services match the current set: an address change bumps the generation, and
        // the pruning above then drops the service made for the old address.
        if let Some((_, svc)) = cache.by_id.get(instance.id()) {
            return svc.clone();
        }
        let address = instance.authority();
        let svc = (self.make)(instance);
        cache
            .by_id
            .insert(instance.id().clone(), (address, svc.clone()));
        svc
    }
}

type Boxed<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// An instance picked for one call: ready, or to be waited for (after `usize` others that
/// were not ready).
enum Picked<S> {
    Ready(PickGuard, S),
    Wait(PickGuard, S, usize),
}

impl<S> Picked<S> {
    fn instance(&self) -> &ServiceInstance {
        match self {
            Picked::Ready(guard, _) | Picked::Wait(guard, _, _) => guard.instance(),
        }
    }
}

impl<M, S, Req, C, X> Service<Req> for Balanced<M, S, Req, C, X>
where
    M: Fn(&ServiceInstance) -> S + Send + Sync + 'static,
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    Req: Send + 'static,
    C: Classify<S::Response, S::Error>,
    X: Route<Req>,
{
    type Response = S::Response;
    type Error = BalanceError<S::Error>;
    type Future = Boxed<S::Response, BalanceError<S::Error>>;

    /// Always ready: the instance is picked in `call` (see the type's docs).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.send(request).await })
    }
}

impl<M, S, C, X, Req> Inner<M, S, C, X, Req>
where
    M: Fn(&ServiceInstance) -> S,
    S: Service<Req> + Clone,
    C: Classify<S::Response, S::Error>,
    X: Route<Req>,
{
    /// Picks an instance whose service is ready at once, trying up to [`NOT_READY_TRIES`];
    /// if none is, the last one picked, to be waited for. Synchronous: the request is only
    /// borrowed here, never across an await.
    fn pick(
        &self,
        request: &Req,
        tried: &[InstanceId],
    ) -> Result<Picked<S>, BalanceError<S::Error>> {
        let ctx = self.route.route(request);
        let mut not_ready: Vec<InstanceId> = Vec::new();
        loop {
            let exclude: Vec<InstanceId> = tried.iter().chain(&not_ready).cloned().collect();
            let guard = if exclude.is_empty() {
                self.balancer.pick_with(&ctx)?
            } else {
                self.balancer.pick_excluding(&ctx, &exclude)?
            };
            let mut svc = self.service_for(guard.instance());
            // One look without waiting: a ready service is used at once.
            match svc.ready().now_or_never() {
                Some(Ok(_)) => return Ok(Picked::Ready(guard, svc)),
                Some(Err(e)) => {
                    // The instance's service is broken: a failure of the instance.
                    let instance = guard.instance().id().clone();
                    guard.failure();
                    return Err(BalanceError::Inner {
                        instance,
                        gave_up: GaveUp::AttemptsExhausted,
                        source: e,
                    });
                }
                None => {}
            }
            let id = guard.instance().id().clone();
            if not_ready.len() + 1 < NOT_READY_TRIES && !not_ready.contains(&id) {
                // Not ready: try another instance rather than queue behind this one. The guard
                // ends as cancelled: nothing was sent.
                not_ready.push(id);
                drop(guard);
                continue;
            }
            return Ok(Picked::Wait(guard, svc, not_ready.len()));
        }
    }

    /// [`pick`](Self::pick), then the bounded wait if every instance tried was busy.
    async fn ready_instance(
        &self,
        picked: Picked<S>,
    ) -> Result<(PickGuard, S), BalanceError<S::Error>> {
        let (guard, mut svc, tried) = match picked {
            Picked::Ready(guard, svc) => return Ok((guard, svc)),
            Picked::Wait(guard, svc, tried) => (guard, svc, tried),
        };
        let instance = guard.instance().id().clone();
        match tokio::time::timeout(self.ready_timeout, svc.ready()).await {
            Ok(Ok(_)) => Ok((guard, svc)),
            Ok(Err(e)) => {
                guard.failure();
                Err(BalanceError::Inner {
                    instance,
                    gave_up: GaveUp::AttemptsExhausted,
                    source: e,
                })
            }
            Err(_) => {
                // Not ready in time counts against the instance: it is overloaded.
                guard.failure();
                Err(BalanceError::NotReady {
                    instance,
                    waited: self.ready_timeout,
                    tried,
                })
            }
        }
    }

    /// Whether another attempt may follow a failed one, taking its request out of `spare`
    /// (left there when not), or why none does.
    fn next_attempt(
        &self,
        attempts: u32,
        retry: Retry,
        spare: &mut Option<Req>,
        idempotent: bool,
        deadline: Option<Instant>,
    ) -> Result<Req, GaveUp> {
        let Some(r) = &self.retries else {
            return Err(GaveUp::AttemptsExhausted);
        };
        if retry == Retry::Never {
            return Err(GaveUp::NotRetryable);
        }
        if spare.is_none() {
            return Err(GaveUp::NotCopyable);
        }
        let sent = retry != Retry::NotSent;
        let out_of_time = deadline.is_some_and(|at| Instant::now() >= at);
        match r.policy.decide(attempts, sent, idempotent, out_of_time) {
            None => spare.take().ok_or(GaveUp::NotCopyable),
            Some(gave_up) => Err(gave_up),
        }
    }

    /// The request that attempt number `attempt` sends, made from `spare` (a copy made now,
    /// so that one that carries the time left carries it from now), and the spare kept for
    /// the attempts that may follow (none after the last one).
    fn request_from(&self, spare: Req, attempt: u32) -> (Req, Option<Req>) {
        let Some(r) = &self.retries else {
            return (spare, None);
        };
        let fresh = (r.clone)(&spare);
        match fresh {
            Some(fresh) if attempt < r.policy.max_attempts => (fresh, Some(spare)),
            Some(fresh) => (fresh, None),
            None => (spare, None),
        }
    }

    /// One attempt: the wait for the picked instance to be ready, then the call, within the
    /// per-try timeout and the deadline. Dropped before it ends (another attempt answered
    /// first), its guard counts it as cancelled.
    async fn attempt(
        &self,
        picked: Picked<S>,
        request: Req,
        deadline: Option<Instant>,
    ) -> Ended<S::Response, S::Error> {
        let ready = match deadline {
            None => self.ready_instance(picked).await,
            // Ended by the deadline, the wait's guard counts as cancelled: nothing was sent.
            Some(at) => match tokio::time::timeout_at(at.into(), self.ready_instance(picked)).await
            {
                Ok(ready) => ready,
                Err(_) => return Ended::Deadline,
            },
        };
        let (mut guard, mut svc) = match ready {
            Ok(ready) => ready,
            Err(refused) => return Ended::Refused(refused),
        };
        // The attempt ends at its per-try timeout or at the deadline, whichever comes first.
        let per_try = self.per_try_timeout.map(|d| (d, Instant::now() + d));
        let until = match (per_try, deadline) {
            (Some((_, a)), Some(b)) => Some(a.min(b)),
            (a, b) => a.map(|(_, at)| at).or(b),
        };
        let call = svc.call(request);
        let result = match until {
            None => call.await,
            Some(at) => match tokio::time::timeout_at(at.into(), call).await {
                Ok(result) => result,
                Err(_) => {
                    guard.failure();
                    return match per_try.filter(|_| deadline != Some(at)) {
                        Some((after, _)) => Ended::TimedOut(after),
                        None => Ended::Deadline,
                    };
                }
            },
        };
        // The latency ends here, even if the response streams on.
        guard.responded();
        Ended::Answered(guard, result)
    }

    async fn send(&self, request: Req) -> Result<S::Response, BalanceError<S::Error>> {
        let retries = self.retries.as_ref();
        if let Some(r) = retries {
            r.policy.request();
        }
        let deadline = self.deadline.as_ref().and_then(|of| of(&request));
        let idempotent = retries.is_some_and(|r| (r.idempotent)(&request));
        let max_attempts = retries.map_or(1, |r| r.policy.max_attempts);
        let hedge = self.hedge.as_ref().filter(|_| idempotent);
        let hedge_from = |now: Instant| hedge.map(|h| now + h.delay());

        let mut tried: Vec<InstanceId> = Vec::new();
        let mut race = Race::new();
        let picked = self.pick(&request, &tried)?;
        // A copy for the attempts that may follow, made only when one may.
        let mut spare = retries
            .filter(|r| r.policy.max_attempts > 1)
            .and_then(|r| (r.clone)(&request));
        let instance = picked.instance().id().clone();
        tried.push(instance.clone());
        race.push((instance, false), self.attempt(picked, request, deadline));
        let mut attempts: u32 = 1;
        let mut next_hedge = hedge_from(Instant::now());
        loop {
            let hedge_at = next_hedge.filter(|_| attempts < max_attempts);
            let ((instance, hedged), ended) = match race.next(hedge_at).await {
                Next::Ended(started, ended) => (started, ended),
                Next::Hedge => {
                    next_hedge = None;
                    let (Some(r), Some(copy)) = (retries, spare.take()) else {
                        continue;
                    };
                    // Only to an instance not tried yet: a hedge to one already waited on
                    // would only add load.
                    match self.pick(&copy, &tried) {
                        Ok(picked)
                            if !tried.contains(picked.instance().id())
                                && r.policy.hedge(attempts, deadline) =>
                        {
                            let instance = picked.instance().id().clone();
                            tracing::debug!(%instance, attempt = attempts + 1, "hedging on another instance");
                            attempts += 1;
                            let (request, kept) = self.request_from(copy, attempts);
                            spare = kept;
                            tried.push(instance.clone());
                            race.push((instance, true), self.attempt(picked, request, deadline));
                            next_hedge = hedge_from(Instant::now());
                        }
                        // Only tried instances fit (the untried ones are filtered out or
                        // ejected), or none: no hedge; an unused guard counts as cancelled.
                        _ => spare = Some(copy),
                    }
                    continue;
                }
            };
            let (retry, failed) = match ended {
                Ended::Answered(guard, result) => {
                    if let Some(h) = hedge {
                        h.observe(guard.elapsed());
                    }
                    let class = self.classify.classify(result.as_ref());
                    if class.outcome == waypost_core::Outcome::Success {
                        if let Some(r) = retries.filter(|_| hedged) {
                            r.policy.hedge_won();
                        }
                        // The attempts still out are dropped with the race, as cancelled.
                        return match result {
                            Ok(response) => Ok(self.classify.finish(response, guard)),
                            Err(source) => {
                                guard.success();
                                Err(BalanceError::Inner {
                                    instance,
                                    gave_up: GaveUp::AttemptsExhausted,
                                    source,
                                })
                            }
                        };
                    }
                    guard.record(class.outcome);
                    (class.retry, Failed::Answer(result))
                }
                // Sent and not answered in time: another instance may answer.
                Ended::TimedOut(after) => (Retry::IfIdempotent, Failed::TimedOut(after)),
                // No time is left for another attempt, and a refusal is not retried; another
                // attempt still out may yet answer.
                Ended::Deadline if !race.is_empty() => continue,
                Ended::Deadline => {
                    return Err(BalanceError::DeadlineExceeded { instance, attempts })
                }
                Ended::Refused(_) if !race.is_empty() => continue,
                Ended::Refused(refused) => return Err(refused),
            };
            match self.next_attempt(attempts, retry, &mut spare, idempotent, deadline) {
                Ok(copy) => {
                    tracing::debug!(%instance, attempt = attempts, "retrying on another instance");
                    match self.pick(&copy, &tried) {
                        Ok(picked) => {
                            attempts += 1;
                            let (request, kept) = self.request_from(copy, attempts);
                            spare = kept;
                            let instance = picked.instance().id().clone();
                            tried.push(instance.clone());
                            race.push((instance, false), self.attempt(picked, request, deadline));
                            // The retry is the newest attempt: a hedge waits for it.
                            next_hedge = hedge_from(Instant::now());
                        }
                        Err(e) if race.is_empty() => return Err(e),
                        // The instances went away, but a hedge is still out.
                        Err(_) => spare = Some(copy),
                    }
                }
                // Another attempt is still out and may yet answer.
                Err(_) if !race.is_empty() => {}
                Err(gave_up) => {
                    return match failed {
                        // A failed answer (a 5xx, say) is still the answer.
                        Failed::Answer(Ok(response)) => Ok(response),
                        Failed::Answer(Err(source)) => Err(BalanceError::Inner {
                            instance,
                            gave_up,
                            source,
                        }),
                        Failed::TimedOut(after) => Err(BalanceError::AttemptTimedOut {
                            instance,
                            after,
                            attempts,
                            gave_up,
                        }),
                    };
                }
            }
        }
    }
}

/// How one attempt ended.
enum Ended<R, E> {
    /// The instance's service answered, with a response or its error (not yet recorded).
    Answered(PickGuard, Result<R, E>),
    /// The per-try timeout ran out (recorded as a failure of the instance).
    TimedOut(Duration),
    /// The deadline passed: in the call (recorded as a failure), or while waiting for the
    /// instance to be ready (cancelled: nothing was sent).
    Deadline,
    /// The instance could not take the call: not ready in time, or its service broke
    /// (recorded as a failure).
    Refused(BalanceError<E>),
}

/// A failed attempt that another may follow.
enum Failed<R, E> {
    Answer(Result<R, E>),
    TimedOut(Duration),
}

/// A tower [`Layer`] that turns a `Fn(&ServiceInstance) -> S` (the per-instance service
/// maker) into a [`Balanced`] service over a balancer, with default options.
///
/// ```
/// use tower::{service_fn, Layer};
/// use waypost::strategies::RoundRobin;
/// use waypost::tower::BalanceLayer;
/// use waypost::{Balancer, ServiceInstance};
///
/// let make = |_: &ServiceInstance| service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req) });
/// let svc = BalanceLayer::<u32>::new(Balancer::new(RoundRobin::new())).layer(make);
/// assert!(format!("{svc:?}").contains("Balanced"));
/// ```
#[derive(Clone, Debug)]
pub struct BalanceLayer<Req> {
    balancer: Balancer,
    _request: PhantomData<fn(Req)>,
}

impl<Req> BalanceLayer<Req> {
    /// A layer over `balancer`.
    pub fn new(balancer: Balancer) -> Self {
        BalanceLayer {
            balancer,
            _request: PhantomData,
        }
    }
}

impl<M, S, Req> Layer<M> for BalanceLayer<Req>
where
    M: Fn(&ServiceInstance) -> S,
{
    type Service = Balanced<M, S, Req>;

    fn layer(&self, make: M) -> Self::Service {
        Balanced::builder(self.balancer.clone(), make).build()
    }
}
