//! Deciding from a response whether the call succeeded, and whether it may be retried.

use waypost_core::{Outcome, PickGuard};

/// What a finished call tells the balancer: its [`Outcome`] (for load-aware strategies and
/// outlier ejection) and whether another instance may be tried.
///
/// ```
/// use waypost::tower::{Class, Retry};
/// use waypost::Outcome;
/// let c = Class::failure(Retry::IfIdempotent);
/// assert_eq!(c.outcome, Outcome::Failure);
/// assert_eq!(Class::SUCCESS.retry, Retry::Never);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Class {
    /// Recorded on the instance.
    pub outcome: Outcome,
    /// Whether the call may be repeated on another instance (within attempts and budget).
    pub retry: Retry,
}

impl Class {
    /// A success: recorded as such, never retried.
    pub const SUCCESS: Class = Class {
        outcome: Outcome::Success,
        retry: Retry::Never,
    };

    /// A failure, retried as `retry` says.
    pub const fn failure(retry: Retry) -> Class {
        Class {
            outcome: Outcome::Failure,
            retry,
        }
    }
}

/// Whether a failed call may be repeated on another instance.
///
/// Only [`NotSent`](Retry::NotSent) lets a request that is not idempotent (a POST) go to
/// another instance: with [`IfIdempotent`](Retry::IfIdempotent) the request may have been
/// applied, so repeating it could apply it twice.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::io::{Error, ErrorKind};
/// use tower::{service_fn, ServiceExt};
/// use waypost::retry::{GaveUp, RetryBudget};
/// use waypost::strategies::RoundRobin;
/// use waypost::tower::{BalanceError, Balanced, Class, Retry};
/// use waypost::{Balancer, ServiceInstance, WatchEvent};
///
/// let balancer = Balancer::new(RoundRobin::new());
/// let inst = |id: &str| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build();
/// balancer.apply(WatchEvent::Snapshot(vec![inst("a")?, inst("b")?]));
/// // Instance a refuses every connection; b answers with its id.
/// let make = |i: &ServiceInstance| {
///     let id = i.id().to_string();
///     service_fn(move |_post: &'static str| {
///         let id = id.clone();
///         async move {
///             match id.as_str() {
///                 "a" => Err(Error::from(ErrorKind::ConnectionRefused)),
///                 _ => Ok(id),
///             }
///         }
///     })
/// };
/// // A refused connection proves that the request never left: NotSent.
/// let by_kind = |r: Result<&String, &Error>| match r {
///     Ok(_) => Class::SUCCESS,
///     Err(e) if e.kind() == ErrorKind::ConnectionRefused => Class::failure(Retry::NotSent),
///     Err(_) => Class::failure(Retry::IfIdempotent),
/// };
/// let posts = Balanced::builder(balancer.clone(), make)
///     .classify(by_kind)
///     // Two attempts in all; no request is idempotent here.
///     .retries(2, RetryBudget::default(), |r| Some(*r), |_| false)
///     .build();
/// for _ in 0..2 {
///     // One of the two goes to a first, and then to b: it was never sent.
///     assert_eq!(posts.clone().oneshot("POST /users").await?, "b");
/// }
///
/// // Told only that the call failed, the POST that went to a is not repeated.
/// let any_failure = |r: Result<&String, &Error>| match r {
///     Ok(_) => Class::SUCCESS,
///     Err(_) => Class::failure(Retry::IfIdempotent),
/// };
/// let cautious = Balanced::builder(balancer, make)
///     .classify(any_failure)
///     .retries(2, RetryBudget::default(), |r| Some(*r), |_| false)
///     .build();
/// let mut not_repeated = 0;
/// for _ in 0..2 {
///     match cautious.clone().oneshot("POST /users").await {
///         Ok(id) => assert_eq!(id, "b"),
///         Err(BalanceError::Inner { gave_up, .. }) => {
///             assert_eq!(gave_up, GaveUp::NotIdempotent);
///             not_repeated += 1;
///         }
///         Err(other) => return Err(other.into()),
///     }
/// }
/// assert_eq!(not_repeated, 1); // round robin: one of the two went to a
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retry {
    /// Never (a success, or a failure that another instance would repeat, like a bad request).
    Never,
    /// If the request is idempotent: it may have reached the instance.
    IfIdempotent,
    /// Always: the request provably never left this process (a connect error).
    NotSent,
}

/// Classifies the result of a call. Implemented for closures
/// `Fn(Result<&Res, &E>) -> Class`.
///
/// ```
/// use waypost::tower::{Class, Classify, Retry};
/// let by_len = |r: Result<&String, &std::io::Error>| match r {
///     Ok(body) if !body.is_empty() => Class::SUCCESS,
///     _ => Class::failure(Retry::IfIdempotent),
/// };
/// assert_eq!(by_len.classify(Ok(&"hi".to_string())), Class::SUCCESS);
/// assert_eq!(by_len.classify(Ok(&String::new())).retry, Retry::IfIdempotent);
/// ```
pub trait Classify<Res, E>: Send + Sync + 'static {
    /// The class of `result`: the call's response or error, borrowed, as the instance's
    /// service returned it.
    ///
    /// ```
    /// use std::io::{Error, ErrorKind};
    /// use waypost::tower::{Class, Classify, HttpStatus, Retry};
    ///
    /// let unavailable = http::Response::builder().status(503).body(()).unwrap();
    /// let class = Classify::<_, Error>::classify(&HttpStatus, Ok(&unavailable));
    /// assert_eq!(class, Class::failure(Retry::IfIdempotent));
    ///
    /// let refused = Error::from(ErrorKind::ConnectionRefused);
    /// let class = Classify::<http::Response<()>, _>::classify(&HttpStatus, Err(&refused));
    /// assert_eq!(class, Class::failure(Retry::IfIdempotent));
    /// ```
    fn classify(&self, result: Result<&Res, &E>) -> Class;

    /// Hands on the response of a call classified a success, with the call's guard, which
    /// has taken the latency at the response ([`PickGuard::responded`]); the call is in
    /// flight while the guard lives. The default records the success at once. A classifier
    /// of responses that stream on keeps the guard in the response instead, so that the call
    /// counts as in flight until the stream ends, and a failure at its end counts (as
    /// `waypost::grpc::GrpcChannel` does with the status in a gRPC stream's trailers).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::io::Error;
    /// use tower::{service_fn, ServiceExt};
    /// use waypost::strategies::RoundRobin;
    /// use waypost::tower::{Balanced, Class, Classify, Retry};
    /// use waypost::{Balancer, PickGuard, ServiceInstance, WatchEvent};
    ///
    /// /// An answer that streams on after it arrived: the call lasts as long as it does.
    /// struct Streaming {
    ///     call: Option<PickGuard>,
    /// }
    ///
    /// struct KeepsTheCall;
    ///
    /// impl Classify<Streaming, Error> for KeepsTheCall {
    ///     fn classify(&self, result: Result<&Streaming, &Error>) -> Class {
    ///         match result {
    ///             Ok(_) => Class::SUCCESS,
    ///             Err(_) => Class::failure(Retry::IfIdempotent),
    ///         }
    ///     }
    ///     fn finish(&self, mut response: Streaming, guard: PickGuard) -> Streaming {
    ///         response.call = Some(guard); // a failure at the end would call guard.failure()
    ///         response
    ///     }
    /// }
    ///
    /// let balancer = Balancer::new(RoundRobin::new());
    /// let a = ServiceInstance::builder("feed", "a").host("10.0.0.1").port(80).build()?;
    /// balancer.apply(WatchEvent::Snapshot(vec![a]));
    /// let make = |_: &ServiceInstance| service_fn(|_: ()| async { Ok::<_, Error>(Streaming { call: None }) });
    /// let svc = Balanced::builder(balancer.clone(), make).classify(KeepsTheCall).build();
    ///
    /// let stream = svc.oneshot(()).await?;
    /// let state = balancer.endpoints()[0].clone();
    /// assert_eq!(state.state().in_flight(), 1, "in flight while it streams");
    /// drop(stream);
    /// assert_eq!((state.state().in_flight(), state.state().successes()), (0, 1));
    /// # Ok(())
    /// # }
    /// ```
    fn finish(&self, response: Res, guard: PickGuard) -> Res {
        guard.success();
        response
    }
}

impl<F, Res, E> Classify<Res, E> for F
where
    F: Fn(Result<&Res, &E>) -> Class + Send + Sync + 'static,
{
    fn classify(&self, result: Result<&Res, &E>) -> Class {
        self(result)
    }
}

/// The default: `Ok` is a success, `Err` a failure that may be retried if the request is
/// idempotent.
///
/// ```
/// use waypost::tower::{Classify, ErrIsFailure, Retry};
/// assert_eq!(Classify::<(), ()>::classify(&ErrIsFailure, Err(&())).retry, Retry::IfIdempotent);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrIsFailure;

impl<Res, E> Classify<Res, E> for ErrIsFailure {
    fn classify(&self, result: Result<&Res, &E>) -> Class {
        match result {
            Ok(_) => Class::SUCCESS,
            Err(_) => Class::failure(Retry::IfIdempotent),
        }
    }
}

/// For HTTP: a 5xx answer or an `Err` is a failure (retried if idempotent); anything else,
/// 4xx included, a success of the instance.
///
/// ```
/// use waypost::tower::{Classify, HttpStatus};
/// use waypost::Outcome;
/// let ok = http::Response::builder().status(404).body(()).unwrap();
/// let bad = http::Response::builder().status(503).body(()).unwrap();
/// assert_eq!(Classify::<_, ()>::classify(&HttpStatus, Ok(&ok)).outcome, Outcome::Success);
/// assert_eq!(Classify::<_, ()>::classify(&HttpStatus, Ok(&bad)).outcome, Outcome::Failure);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpStatus;

impl<B, E> Classify<http::Response<B>, E> for HttpStatus
where
    B: 'static,
    E: 'static,
{
    fn classify(&self, result: Result<&http::Response<B>, &E>) -> Class {
        match result {
            Ok(r) if r.status().is_server_error() => Class::failure(Retry::IfIdempotent),
            Ok(_) => Class::SUCCESS,
            Err(_) => Class::failure(Retry::IfIdempotent),
        }
    }
}

/// For gRPC: a `grpc-status` of UNAVAILABLE (14), DEADLINE_EXCEEDED (4), INTERNAL (13) or
/// RESOURCE_EXHAUSTED (8) in the response headers, or an `Err`, is a failure of the instance;
/// any other status (the caller's own errors, like NOT_FOUND) a success. UNAVAILABLE is
/// retried if the method is idempotent, the others never.
///
/// It reads the headers, where a call that fails before any message carries its status (a
/// "trailers-only" response, which is how servers answer most errors). A status that arrives
/// in the trailers after messages (a stream that fails midway) is not seen by it:
/// `waypost::grpc::GrpcChannel` reads that one too, at the stream's end, with
/// [`GrpcStatus::of_trailers`].
///
/// ```
/// use waypost::tower::{Classify, GrpcStatus};
/// use waypost::Outcome;
/// let unavailable = http::Response::builder().header("grpc-status", "14").body(()).unwrap();
/// let not_found = http::Response::builder().header("grpc-status", "5").body(()).unwrap();
/// assert_eq!(Classify::<_, ()>::classify(&GrpcStatus, Ok(&unavailable)).outcome, Outcome::Failure);
/// assert_eq!(Classify::<_, ()>::classify(&GrpcStatus, Ok(&not_found)).outcome, Outcome::Success);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcStatus;

impl<B, E> Classify<http::Response<B>, E> for GrpcStatus
where
    B: 'static,
    E: 'static,
{
    fn classify(&self, result: Result<&http::Response<B>, &E>) -> Class {
        let response = match result {
            Ok(r) => r,
            Err(_) => return Class::failure(Retry::IfIdempotent),
        };
        match GrpcStatus::of_status(response.headers()) {
            Some(class) => class,
            None if response.status().is_server_error() => Class::failure(Retry::IfIdempotent),
            None => Class::SUCCESS,
        }
    }
}

impl GrpcStatus {
    /// The class of a gRPC stream's trailers (the status of a call that ended after its
    /// messages): a failure for the statuses above, else (OK, the caller's own errors, no
    /// status) a success. A stream that already sent messages is never retried, so the
    /// class says [`Retry::Never`].
    ///
    /// ```
    /// use waypost::tower::{Class, GrpcStatus, Retry};
    /// let mut trailers = http::HeaderMap::new();
    /// trailers.insert("grpc-status", "14".parse().unwrap());
    /// assert_eq!(GrpcStatus::of_trailers(&trailers), Class::failure(Retry::Never));
    /// trailers.insert("grpc-status", "0".parse().unwrap());
    /// assert_eq!(GrpcStatus::of_trailers(&trailers), Class::SUCCESS);
    /// ```
    pub fn of_trailers(trailers: &http::HeaderMap) -> Class {
        match GrpcStatus::of_status(trailers) {
            Some(_) => Class::failure(Retry::Never),
            None => Class::SUCCESS,
        }
    }

    /// The class its `grpc-status` gives, if it is one of the instance's failures.
    fn of_status(headers: &http::HeaderMap) -> Option<Class> {
        let code = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        match code {
            Some(14) => Some(Class::failure(Retry::IfIdempotent)),
            Some(4 | 8 | 13) => Some(Class::failure(Retry::Never)),
            _ => None,
        }
    }
}
