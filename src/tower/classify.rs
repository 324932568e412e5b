//! Deciding from a response whether the call succeeded, and whether it may be retried.

use waypost_core::Outcome;

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
    /// The class of `result`.
    fn classify(&self, result: Result<&Res, &E>) -> Class;
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
/// in the trailers after messages (a stream that fails midway) is not seen here.
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
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        match code {
            Some(14) => Class::failure(Retry::IfIdempotent),
            Some(4 | 8 | 13) => Class::failure(Retry::Never),
            _ if response.status().is_server_error() => Class::failure(Retry::IfIdempotent),
            _ => Class::SUCCESS,
        }
    }
}
