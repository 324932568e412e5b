//! What can go wrong with a request, and why it was not retried.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use waypost_core::{InstanceId, PickError};

pub use crate::retry::GaveUp;

/// Every failure of an [`HttpClient`](super::HttpClient) call. Each message says what happened
/// and what to do.
///
/// An HTTP answer, even a 5xx one, is not an error: it comes back as a
/// [`Response`](super::Response); [`Response::error_for_status`](super::Response::error_for_status)
/// turns 4xx/5xx answers into [`HttpError::Status`].
///
/// ```
/// use waypost::http::HttpClient;
/// use waypost::strategies::RoundRobin;
/// use waypost::Balancer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = HttpClient::new(Balancer::new(RoundRobin::new()))?;
/// let err = client.get("/users").send().await.unwrap_err(); // nothing registered
/// assert!(matches!(err, waypost::http::HttpError::NoInstance { .. }));
/// assert!(err.to_string().contains("no instance"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The balancer had no instance to send to.
    #[error("cannot send {method} {path}: {source}")]
    NoInstance {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// What the balancer said.
        #[source]
        source: PickError,
    },

    /// The request itself is unusable (a path without a leading `/`, a bad header, a body that
    /// would not serialize); nothing was sent.
    #[error("invalid request {method} {path}: {reason}")]
    InvalidRequest {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// No connection could be opened to the last instance tried; the request was not sent.
    #[error("{method} {path}: could not connect to {instance} at {authority} (attempt {attempts}): {source}; {gave_up}. Check that the instance runs and that its registered address is reachable from here")]
    Connect {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The instance of the last attempt.
        instance: InstanceId,
        /// Its `host:port`.
        authority: String,
        /// Attempts made.
        attempts: u32,
        /// Why there was no further attempt.
        gave_up: GaveUp,
        /// The connect error.
        #[source]
        source: reqwest::Error,
    },

    /// The last attempt ran out of time (per-try or overall timeout).
    #[error("{method} {path}: {instance} at {authority} did not answer within {after:?} (attempt {attempts}); {gave_up}")]
    Timeout {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The instance of the last attempt.
        instance: InstanceId,
        /// Its `host:port`.
        authority: String,
        /// The time limit of that attempt.
        after: Duration,
        /// Attempts made.
        attempts: u32,
        /// Why there was no further attempt.
        gave_up: GaveUp,
        /// The timeout error.
        #[source]
        source: reqwest::Error,
    },

    /// The connection broke after the request was (perhaps partly) sent.
    #[error("{method} {path}: the exchange with {instance} at {authority} failed (attempt {attempts}): {source}; {gave_up}")]
    Transport {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The instance of the last attempt.
        instance: InstanceId,
        /// Its `host:port`.
        authority: String,
        /// Attempts made.
        attempts: u32,
        /// Why there was no further attempt.
        gave_up: GaveUp,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },

    /// The instance answered with a 4xx or 5xx status (from
    /// [`Response::error_for_status`](super::Response::error_for_status)).
    #[error("{method} {path}: {instance} answered {status} (after {attempts} attempt(s))")]
    Status {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The instance that answered.
        instance: InstanceId,
        /// The status.
        status: StatusCode,
        /// Attempts made.
        attempts: u32,
    },

    /// The response body could not be read or decoded.
    #[error("{method} {path}: could not read the answer of {instance}: {source}")]
    Body {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The instance that answered.
        instance: InstanceId,
        /// The read or decode error.
        #[source]
        source: reqwest::Error,
    },

    /// An option of the client or of the retry budget is unusable.
    #[error("invalid HTTP client configuration: {message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },

    /// The underlying HTTP client could not be created (its TLS setup failed).
    #[error("the HTTP client could not be built: {source}")]
    Build {
        /// reqwest's error.
        #[source]
        source: reqwest::Error,
    },
}

impl HttpError {
    /// The instance the error is about, if it happened at one.
    pub fn instance(&self) -> Option<&InstanceId> {
        match self {
            HttpError::Connect { instance, .. }
            | HttpError::Timeout { instance, .. }
            | HttpError::Transport { instance, .. }
            | HttpError::Status { instance, .. }
            | HttpError::Body { instance, .. } => Some(instance),
            _ => None,
        }
    }

    /// Why the client stopped retrying, for errors that followed an attempt.
    pub fn gave_up(&self) -> Option<&GaveUp> {
        match self {
            HttpError::Connect { gave_up, .. }
            | HttpError::Timeout { gave_up, .. }
            | HttpError::Transport { gave_up, .. } => Some(gave_up),
            _ => None,
        }
    }
}

impl From<crate::retry::InvalidRetry> for HttpError {
    fn from(e: crate::retry::InvalidRetry) -> Self {
        HttpError::Config {
            message: e.to_string(),
        }
    }
}
