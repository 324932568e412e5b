//! Turning `etcd-client` failures into Waypost's typed [`Error`].

use std::sync::Arc;

use tonic::Code;
use waypost_core::Error;

pub(crate) const BACKEND: &str = "etcd";

/// Maps a failure of `operation` to the [`Error`] variant that tells the caller what to do.
pub(crate) fn map(operation: &str, err: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    match err {
        E::GRpcStatus(status) => {
            let message = status.message().to_owned();
            if message.contains("invalid peer certificate") {
                // Not an outage: trying again will not make the certificate trusted.
                return Error::Config {
                    backend: BACKEND,
                    message: format!(
                        "{operation}: TLS handshake failed: {message} (check tls_ca_pem and \
                         tls_domain against the servers' certificates)"
                    ),
                };
            }
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Unknown
                | Code::Internal => unavailable(operation, message, status),
                Code::PermissionDenied | Code::Unauthenticated => Error::PermissionDenied {
                    backend: BACKEND,
                    operation: operation.to_owned(),
                    message,
                },
                Code::InvalidArgument if message.contains("user name is empty") => {
                    Error::PermissionDenied {
                        backend: BACKEND,
                        operation: operation.to_owned(),
                        message: format!(
                            "{message} (authentication is enabled: give .auth(user, password))"
                        ),
                    }
                }
                Code::InvalidArgument if message.contains("authentication failed") => {
                    Error::PermissionDenied {
                        backend: BACKEND,
                        operation: operation.to_owned(),
                        message: format!("{message} (wrong user name or password)"),
                    }
                }
                Code::FailedPrecondition if message.contains("authentication is not enabled") => {
                    Error::Config {
                        backend: BACKEND,
                        message: format!(
                            "credentials were given but the server answered {message:?}: \
                             remove .auth(..) or enable authentication on the cluster"
                        ),
                    }
                }
                Code::NotFound => Error::NotFound {
                    backend: BACKEND,
                    what: format!("{operation} ({message})"),
                },
                _ => Error::protocol(
                    BACKEND,
                    operation,
                    format!("{:?}: {message}", status.code()),
                ),
            }
        }
        E::TransportError(e) => {
            let message = e.to_string();
            unavailable(operation, message, e)
        }
        E::IoError(e) => {
            let message = e.to_string();
            unavailable(operation, message, e)
        }
        E::LeaseKeepAliveError(m) if m.contains("not found") => Error::NotFound {
            backend: BACKEND,
            what: format!("{operation} (lease not found)"),
        },
        E::LeaseKeepAliveError(m) | E::WatchError(m) => Error::unavailable(BACKEND, operation, m),
        E::InvalidArgs(m) | E::EndpointError(m) => Error::Config {
            backend: BACKEND,
            message: format!("{operation}: {m}"),
        },
        E::InvalidUri(e) => Error::Config {
            backend: BACKEND,
            message: format!("{operation}: invalid endpoint URI: {e}"),
        },
        other => Error::protocol(BACKEND, operation, other.to_string()),
    }
}

fn unavailable(
    operation: &str,
    message: String,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        operation: operation.to_owned(),
        message,
        source: Some(Arc::new(source)),
    }
}

/// A request that got no answer in time.
pub(crate) fn timed_out(operation: &str, after: std::time::Duration) -> Error {
    Error::unavailable(BACKEND, operation, format!("no answer within {after:?}"))
}

/// A configuration mistake.
pub(crate) fn config(message: impl Into<String>) -> Error {
    Error::Config {
        backend: BACKEND,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, msg: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg))
    }

    #[test]
    fn statuses_map_to_actionable_variants() {
        assert!(matches!(
            map("put", status(Code::Unavailable, "x")),
            Error::Unavailable { .. }
        ));
        let e = map(
            "connect",
            status(
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
        );
        assert!(matches!(e, Error::PermissionDenied { .. }), "{e}");
        assert!(e.to_string().contains("password"));
        assert!(matches!(
            map(
                "get",
                status(Code::PermissionDenied, "etcdserver: permission denied")
            ),
            Error::PermissionDenied { .. }
        ));
        assert!(matches!(
            map(
                "connect",
                status(
                    Code::FailedPrecondition,
                    "etcdserver: authentication is not enabled"
                )
            ),
            Error::Config { .. }
        ));
        assert!(matches!(
            map(
                "keep-alive",
                status(Code::NotFound, "etcdserver: requested lease not found")
            ),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            map("get", status(Code::OutOfRange, "compacted")),
            Error::Protocol { .. }
        ));
        assert!(matches!(
            map(
                "x",
                etcd_client::Error::InvalidArgs("empty endpoints".into())
            ),
            Error::Config { .. }
        ));
    }
}
