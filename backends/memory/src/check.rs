//! Health checks the backend runs itself: a TCP connect every interval.
//!
//! HTTP and gRPC checks are run as TCP-connect checks to the URL's or the target's host and
//! port: the memory backend carries no HTTP or gRPC client (it must stay small enough to embed
//! anywhere). An HTTP endpoint that accepts connections but answers 5xx, or a gRPC server
//! that says NOT_SERVING, therefore counts as passing here, unlike in Consul.

use std::sync::Weak;
use std::time::Duration;

use tokio::net::TcpStream;
use waypost_core::{HealthCheck, InstanceId, ServiceName};

use crate::state::Inner;

/// What to probe and how often, for checks the backend runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Probe {
    /// `host:port` to connect to.
    pub(crate) target: Option<String>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

impl Probe {
    /// The probe for `check`, or `None` for a TTL check (the registering process heart-beats).
    pub(crate) fn for_check(check: &HealthCheck) -> Option<Probe> {
        match check {
            HealthCheck::Tcp {
                address,
                interval,
                timeout,
            } => Some(Probe {
                target: Some(address.clone()),
                interval: *interval,
                timeout: *timeout,
            }),
            HealthCheck::Http {
                url,
                interval,
                timeout,
                tls: _,
            } => Some(Probe {
                target: http_target(url),
                interval: *interval,
                timeout: *timeout,
            }),
            // The address part of `host:port/service`.
            HealthCheck::Grpc {
                target,
                interval,
                timeout,
                tls: _,
            } => Some(Probe {
                target: Some(
                    target
                        .split_once('/')
                        .map_or(&target[..], |(a, _)| a)
                        .to_owned(),
                ),
                interval: *interval,
                timeout: *timeout,
            }),
            _ => None,
        }
    }
}

/// The `host:port` an HTTP(S) URL points at (default ports 80 and 443); `None` if the URL has
/// no usable authority.
pub(crate) fn http_target(url: &str) -> Option<String> {
    let (rest, default_port) = if let Some(rest) = url.strip_prefix("http://") {
        (rest, 80)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (rest, 443)
    } else {
        return None;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // Drop user information (`user:pass@host`).
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    if host_port.is_empty() {
        return None;
    }
    let has_port = match host_port.rfind(']') {
        // `[v6]` or `[v6]:port`
        Some(close) => host_port[close..].contains(':'),
        None => host_port.contains(':'),
    };
    if has_port {
        Some(host_port.to_owned())
    } else {
        Some(format!("{host_port}:{default_port}"))
    }
}

/// Probes until the registration identified by `token` is gone or replaced, or the backend is
/// dropped. The first probe runs at once, so a healthy instance is listed without delay.
pub(crate) async fn run_probe(
    inner: Weak<Inner>,
    service: ServiceName,
    id: InstanceId,
    token: u64,
    probe: Probe,
) {
    loop {
        let passing = match &probe.target {
            Some(target) => matches!(
                tokio::time::timeout(probe.timeout, TcpStream::connect(target.as_str())).await,
                Ok(Ok(_))
            ),
            None => false,
        };
        match inner.upgrade() {
            Some(inner) if inner.set_passing(&service, &id, token, passing) => {}
            _ => return,
        }
        tokio::time::sleep(probe.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_targets() {
        let t = |u: &str| http_target(u);
        assert_eq!(
            t("http://127.0.0.1:8080/health").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(t("http://example/health").as_deref(), Some("example:80"));
        assert_eq!(t("https://example?x=1").as_deref(), Some("example:443"));
        assert_eq!(t("http://u:p@h:9/").as_deref(), Some("h:9"));
        assert_eq!(t("http://[::1]/").as_deref(), Some("[::1]:80"));
        assert_eq!(t("http://[::1]:81/").as_deref(), Some("[::1]:81"));
        assert_eq!(t("http:///path"), None);
        assert_eq!(t("ftp://h/"), None);
    }
}
