//! What can go wrong with a request, and why it was not retried.

use std::error::Error as _;
use std::fmt;
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
        source: TransportError,
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
        source: TransportError,
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
        source: TransportError,
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
        source: TransportError,
    },

    /// An option of the client or of the retry budget is unusable.
    #[error("invalid HTTP client configuration: {message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },

    /// The underlying HTTP client could not be created (its TLS setup failed: a CA or client
    /// certificate that rustls does not accept, say).
    #[error("the HTTP client could not be built: {source}")]
    Build {
        /// What failed.
        #[source]
        source: TransportError,
    },

    /// TLS with the last instance tried failed: its certificate was not trusted, it wanted a
    /// client certificate this client did not present (or did not trust the one presented),
    /// or it does not speak TLS. `reason` says which, and what to do.
    ///
    /// A handshake that failed sent nothing, so it is retried on another instance for every
    /// method, like a connect error. A refusal that comes after the client's side of the
    /// handshake (in TLS 1.3, a server that wants a client certificate) may follow the
    /// request out, so it counts as sent: only idempotent requests are retried after it.
    #[error("{method} {path}: TLS with {instance} at {authority} failed (attempt {attempts}): {reason}; {gave_up}")]
    Tls {
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
        /// What TLS said, and what to do about it.
        reason: String,
        /// The transport error, whose sources end with rustls' error.
        #[source]
        source: TransportError,
    },
}

impl HttpError {
    /// The instance the error is about, if it happened at one.
    pub fn instance(&self) -> Option<&InstanceId> {
        match self {
            HttpError::Connect { instance, .. }
            | HttpError::Tls { instance, .. }
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
            | HttpError::Tls { gave_up, .. }
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

/// A failure of the transport under the client (reqwest, hyper, rustls, the operating
/// system): the source of [`HttpError`]'s connect, TLS, timeout, transport, body and build
/// errors.
///
/// It wraps reqwest's error rather than exposing it, so that matching on a Waypost error does
/// not tie the caller's code to the reqwest version underneath. Its message is reqwest's,
/// followed by the root cause (`connection refused`, `invalid peer certificate: UnknownIssuer`);
/// [`source`](std::error::Error::source) goes on down the chain (hyper's, then the I/O or
/// rustls error) for whoever needs the details.
///
/// ```
/// use waypost::http::{HttpClient, HttpError};
/// use waypost::strategies::RoundRobin;
/// use waypost::{Balancer, ServiceInstance, WatchEvent};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // An instance whose port nothing listens on.
/// let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
/// let balancer = Balancer::new(RoundRobin::new());
/// let gone = ServiceInstance::builder("users", "gone").host("127.0.0.1").port(closed.port()).build()?;
/// balancer.apply(WatchEvent::Snapshot(vec![gone]));
///
/// let client = HttpClient::builder(balancer).max_attempts(1).build()?;
/// match client.get("/users").send().await {
///     Err(HttpError::Connect { source, .. }) => {
///         assert!(source.is_connect());
///         assert!(!source.is_timeout());
///         assert!(source.to_string().to_lowercase().contains("refused"), "{source}");
///         assert!(std::error::Error::source(&source).is_some());
///     }
///     other => panic!("expected a connect error, got {other:?}"),
/// }
/// # Ok(())
/// # }
/// ```
pub struct TransportError {
    inner: reqwest::Error,
}

impl TransportError {
    pub(crate) fn new(inner: reqwest::Error) -> Self {
        TransportError { inner }
    }

    /// No connection could be opened (refused, unreachable, timed out while connecting, or a
    /// failed TLS handshake): the request was not sent.
    pub fn is_connect(&self) -> bool {
        self.inner.is_connect()
    }

    /// A time limit ran out (the connect timeout, or a per-try or overall one).
    pub fn is_timeout(&self) -> bool {
        self.inner.is_timeout()
    }

    /// The rustls error among the sources, if TLS is what failed.
    pub(crate) fn tls(&self) -> Option<&rustls::Error> {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(&self.inner);
        while let Some(e) = current {
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Some(tls);
            }
            // tokio-rustls hands rustls' error on inside an io::Error (which the connector
            // wraps in another one), and an io::Error's `source` skips the error it wraps:
            // look inside.
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if let Some(wrapped) = io.get_ref() {
                    current = Some(wrapped);
                    continue;
                }
            }
            current = e.source();
        }
        None
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)?;
        // reqwest's own message rarely says why ("error sending request for url (...)"); the
        // innermost source does.
        let mut root = self.inner.source();
        while let Some(next) = root.and_then(|e| e.source()) {
            root = Some(next);
        }
        match root {
            Some(root) => write!(f, ": {root}"),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

/// What a TLS failure means for this client, and what to do about it.
pub(crate) fn explain_tls(error: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError, Error as Tls};
    match error {
        Tls::InvalidCertificate(CertificateError::UnknownIssuer)
        | Tls::InvalidCertificate(CertificateError::BadSignature) => format!(
            "the instance's certificate is not signed by a CA this client trusts ({error}); \
             trust the CA that issued it with HttpClientBuilder::ca_certificate (the client \
             example's --ca FILE)"
        ),
        Tls::InvalidCertificate(CertificateError::NotValidForName)
        | Tls::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => format!(
            "the instance's certificate does not name the address it is registered with \
             ({error}); issue it for that host (an IP address needs an IP subject alternative \
             name)"
        ),
        Tls::InvalidCertificate(CertificateError::Expired)
        | Tls::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            format!("the instance's certificate has expired ({error}); renew it")
        }
        Tls::InvalidCertificate(_) => {
            format!("the instance's certificate was refused ({error})")
        }
        Tls::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::AccessDenied,
        ) => format!(
            "the instance wants a client certificate it trusts ({error}); present one with \
             HttpClientBuilder::identity"
        ),
        Tls::InvalidMessage(_) | Tls::InappropriateMessage { .. } => format!(
            "the instance did not answer in TLS ({error}); it probably serves plain HTTP: check \
             the `{}` metadata it registers, or the client's https setting",
            crate::SCHEME_METADATA
        ),
        other => other.to_string(),
    }
}
