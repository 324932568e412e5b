//! Errors: one enum for backend and runtime failures, one struct for bad input.

use std::fmt;
use std::sync::Arc;

/// A cause attached to an [`Error`]. Shared so that errors can be cloned into every watcher.
///
/// ```
/// use std::error::Error as _;
/// use std::sync::Arc;
/// use waypost_core::{Cause, Error};
///
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let cause: Cause = Arc::new(refused);
/// let err = Error::Unavailable {
///     backend: "consul",
///     operation: "GET /v1/health/service/users".into(),
///     message: "no answer".into(),
///     source: Some(cause),
/// };
/// // Every clone (one per watcher) shares the cause, and `source()` reaches it.
/// let copy = err.clone();
/// assert_eq!(copy.source().map(|s| s.to_string()).as_deref(), Some("connection refused"));
/// ```
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The field of a [`ServiceInstance`](crate::ServiceInstance) or
/// [`Registration`](crate::Registration) that failed validation.
///
/// ```
/// use waypost_core::{Field, ServiceName};
/// let err = ServiceName::new("").unwrap_err();
/// assert_eq!(err.field(), &Field::ServiceName);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Field {
    /// The logical service name.
    ServiceName,
    /// The instance id.
    InstanceId,
    /// The host (name or IP) clients connect to.
    Host,
    /// The port clients connect to.
    Port,
    /// One tag, by position.
    Tag(usize),
    /// A metadata key.
    MetadataKey(String),
    /// The value of the named metadata key.
    MetadataValue(String),
    /// The balancing weight.
    Weight,
    /// The zone.
    Zone,
    /// The health check's TTL.
    CheckTtl,
    /// The health check's interval.
    CheckInterval,
    /// The health check's timeout.
    CheckTimeout,
    /// The URL of an HTTP health check.
    CheckUrl,
    /// The address of a TCP health check.
    CheckAddress,
    /// How long after turning critical the backend removes the instance.
    DeregisterAfter,
    /// An instance's health status.
    Health,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::ServiceName => f.write_str("service name"),
            Field::InstanceId => f.write_str("instance id"),
            Field::Host => f.write_str("host"),
            Field::Port => f.write_str("port"),
            Field::Tag(i) => write!(f, "tag #{i}"),
            Field::MetadataKey(k) => write!(f, "metadata key {k:?}"),
            Field::MetadataValue(k) => write!(f, "metadata value of {k:?}"),
            Field::Weight => f.write_str("weight"),
            Field::Zone => f.write_str("zone"),
            Field::CheckTtl => f.write_str("health check TTL"),
            Field::CheckInterval => f.write_str("health check interval"),
            Field::CheckTimeout => f.write_str("health check timeout"),
            Field::CheckUrl => f.write_str("health check URL"),
            Field::CheckAddress => f.write_str("health check address"),
            Field::DeregisterAfter => f.write_str("deregister-critical-after"),
            Field::Health => f.write_str("health"),
        }
    }
}

/// What is wrong with a field: the second half of a [`ValidationError`], for a caller that
/// reacts to the kind of mistake rather than shows the message.
///
/// ```
/// use waypost_core::{Field, Problem, ServiceInstance, ServiceName};
///
/// let err = ServiceName::new("").unwrap_err();
/// assert_eq!(err.problem(), &Problem::Empty);
///
/// let err = ServiceInstance::builder("users", "u1").host("10.0.0.1").port(80).tag("a\nb").build().unwrap_err();
/// assert_eq!(err.field(), &Field::Tag(0));
/// assert_eq!(err.problem(), &Problem::ControlCharacter { at: 1 });
/// assert_eq!(err.to_string(), "invalid tag #0: it contains a control character at byte 1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The value is empty.
    Empty,
    /// The value is longer than allowed.
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// The bytes are not UTF-8.
    NotUtf8,
    /// A control character (newline, NUL, ...) at this byte offset.
    ControlCharacter {
        /// Byte offset of the character.
        at: usize,
    },
    /// A character that this field does not allow.
    InvalidCharacter {
        /// The character.
        ch: char,
        /// Byte offset of the character.
        at: usize,
        /// What the field allows.
        allowed: &'static str,
    },
    /// Zero where only a positive value makes sense.
    Zero,
    /// A number outside its range.
    OutOfRange {
        /// The value given.
        value: u64,
        /// The smallest allowed.
        min: u64,
        /// The largest allowed.
        max: u64,
    },
    /// Too many entries (tags, metadata pairs).
    TooMany {
        /// How many were given.
        count: usize,
        /// The most allowed.
        max: usize,
    },
    /// The same entry twice.
    Duplicate,
    /// Anything else, said in words.
    Invalid(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Empty => f.write_str("it is empty"),
            Problem::TooLong { len, max } => {
                write!(f, "it is {len} bytes long, the limit is {max}")
            }
            Problem::NotUtf8 => f.write_str("it is not valid UTF-8"),
            Problem::ControlCharacter { at } => {
                write!(f, "it contains a control character at byte {at}")
            }
            Problem::InvalidCharacter { ch, at, allowed } => {
                write!(
                    f,
                    "character {ch:?} at byte {at} is not allowed (allowed: {allowed})"
                )
            }
            Problem::Zero => f.write_str("it is 0; it must be at least 1"),
            Problem::OutOfRange { value, min, max } => {
                write!(f, "{value} is outside {min}..={max}")
            }
            Problem::TooMany { count, max } => write!(f, "{count} given, the limit is {max}"),
            Problem::Duplicate => f.write_str("it is given twice"),
            Problem::Invalid(why) => f.write_str(why),
        }
    }
}

/// Bad input, caught before any I/O: names the field and says what is wrong with it.
///
/// ```
/// use waypost_core::{Field, ServiceInstance};
/// let err = ServiceInstance::builder("users", "u-1").host("10.0.0.1").port(0).build().unwrap_err();
/// assert_eq!(err.field(), &Field::Port);
/// assert!(err.to_string().contains("port"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {problem}")]
pub struct ValidationError {
    field: Field,
    problem: Problem,
}

impl ValidationError {
    /// A new error for `field`.
    pub fn new(field: Field, problem: Problem) -> Self {
        Self { field, problem }
    }

    /// The field that failed.
    pub fn field(&self) -> &Field {
        &self.field
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

/// Every failure a registry, a discovery or a watch can report.
///
/// Each variant says which backend and operation failed and what to do about it. Errors are
/// `Clone` so that one failure can be delivered to every watcher.
///
/// ```
/// use waypost_core::Error;
/// let err = Error::unavailable("consul", "GET /v1/health/service/users", "connection refused");
/// assert!(err.is_retryable());
/// assert!(err.to_string().contains("consul"));
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input was rejected before any I/O.
    #[error(transparent)]
    Invalid(#[from] ValidationError),

    /// The backend could not be reached or did not answer in time. Watches and registrations retry
    /// these by themselves; check that the server runs at the configured address.
    #[error("{backend} is unreachable during {operation}: {message} (check that it runs at the configured address; waypost retries with backoff)")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// What was being done.
        operation: String,
        /// What happened.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Cause>,
    },

    /// The backend refused the operation for lack of permission. Not retried: supply a token or
    /// credentials that grant it.
    #[error("{backend} denied permission for {operation}: {message} (supply a token or credentials that allow it)")]
    PermissionDenied {
        /// Which backend.
        backend: &'static str,
        /// What was being done.
        operation: String,
        /// What the server said.
        message: String,
    },

    /// The backend answered, but not with what the protocol promises (an HTTP 500, HTML instead of
    /// JSON, a truncated body). Retried by watches; if it persists, check the server's logs.
    #[error("{backend} gave an unexpected answer to {operation}: {message}")]
    Protocol {
        /// Which backend.
        backend: &'static str,
        /// What was being done.
        operation: String,
        /// What was wrong with the answer.
        message: String,
    },

    /// The backend does not know a registration it was asked about (it expired, or the server
    /// lost its state). Registrations heal by registering again.
    #[error("{backend} has no registration for {what}: it expired or the server restarted; register again")]
    NotFound {
        /// Which backend.
        backend: &'static str,
        /// What was looked for.
        what: String,
    },

    /// The client configuration is unusable (a bad address, an unreadable certificate).
    #[error("invalid {backend} configuration: {message}")]
    Config {
        /// Which backend.
        backend: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// The backend (or the registration) was shut down and cannot be used any more.
    #[error("{what} was shut down")]
    Closed {
        /// What was closed.
        what: String,
    },
}

impl Error {
    /// A [`Error::Unavailable`] without a source.
    pub fn unavailable(
        backend: &'static str,
        operation: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Unavailable {
            backend,
            operation: operation.into(),
            message: message.into(),
            source: None,
        }
    }

    /// A [`Error::Protocol`].
    pub fn protocol(
        backend: &'static str,
        operation: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Protocol {
            backend,
            operation: operation.into(),
            message: message.into(),
        }
    }

    /// The backend the error comes from, when it names one.
    ///
    /// ```
    /// let e = waypost_core::Error::unavailable("consul", "watch", "connection refused");
    /// assert_eq!(e.backend(), Some("consul"));
    /// ```
    pub fn backend(&self) -> Option<&'static str> {
        match self {
            Error::Unavailable { backend, .. }
            | Error::PermissionDenied { backend, .. }
            | Error::Protocol { backend, .. }
            | Error::NotFound { backend, .. }
            | Error::Config { backend, .. } => Some(backend),
            _ => None,
        }
    }

    /// Whether trying again later can succeed (an outage or a bad answer), as opposed to a
    /// mistake that needs a change (bad input, no permission, bad configuration).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::Protocol { .. } | Error::NotFound { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_backend_and_operation() {
        let e = Error::PermissionDenied {
            backend: "consul",
            operation: "register users-1".into(),
            message: "ACL not found".into(),
        };
        let s = e.to_string();
        assert!(s.contains("consul") && s.contains("register users-1") && s.contains("token"));
        assert!(!e.is_retryable());
        assert!(Error::protocol("etcd", "get", "garbage").is_retryable());
    }

    #[test]
    fn validation_error_displays_field_and_problem() {
        let e = ValidationError::new(Field::Tag(2), Problem::ControlCharacter { at: 3 });
        assert_eq!(
            e.to_string(),
            "invalid tag #2: it contains a control character at byte 3"
        );
    }
}
