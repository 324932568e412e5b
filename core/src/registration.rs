//! What a process announces about itself, and how the backend checks that it is alive.

use std::time::Duration;

use crate::error::{Field, Problem, ValidationError};
use crate::instance::{InstanceBuilder, InstanceId, ServiceInstance, ServiceName};

/// How the backend decides that a registered instance is healthy.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::HealthCheck;
/// let ttl = HealthCheck::ttl(Duration::from_secs(9));
/// assert_eq!(ttl.heartbeat_interval(), Some(Duration::from_secs(3)));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthCheck {
    /// The registering process heart-beats; the backend expires it `ttl` after the last beat.
    Ttl {
        /// Time to live after the last heartbeat.
        ttl: Duration,
    },
    /// The backend (e.g. the Consul agent) polls an HTTP URL; 2xx is healthy.
    Http {
        /// The URL to GET.
        url: String,
        /// Time between checks.
        interval: Duration,
        /// Time limit of one check.
        timeout: Duration,
        /// How the certificate of an `https://` URL is treated. Only
        /// [`CheckTls::Verify`] is valid for an `http://` URL.
        tls: CheckTls,
    },
    /// The backend opens a TCP connection to `address`; success is healthy.
    Tcp {
        /// `host:port` to connect to.
        address: String,
        /// Time between checks.
        interval: Duration,
        /// Time limit of one check.
        timeout: Duration,
    },
    /// The backend asks the server's gRPC health service (`grpc.health.v1.Health/Check`);
    /// SERVING is healthy.
    Grpc {
        /// `host:port`, or `host:port/service` to ask about one service of the server.
        target: String,
        /// Time between checks.
        interval: Duration,
        /// Time limit of one check.
        timeout: Duration,
        /// `None`: plaintext HTTP/2. `Some`: over TLS, the server's certificate treated as it
        /// says.
        tls: Option<CheckTls>,
    },
}

/// How a check the backend runs over TLS ([`HealthCheck::grpc_tls`], [`HealthCheck::https`])
/// treats the server's certificate.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{CheckTls, HealthCheck};
/// let check = HealthCheck::grpc_tls("10.0.0.7:50051", Duration::from_secs(5), CheckTls::Verify);
/// assert!(matches!(check, HealthCheck::Grpc { tls: Some(CheckTls::Verify), .. }));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CheckTls {
    /// The certificate must be signed by a root the backend trusts and carry the name it
    /// expects. A Consul agent (1.8) trusts the system's roots and expects the target's host.
    /// With `enable_agent_tls_for_checks = true` in its configuration it trusts its own
    /// `ca_file` instead, expects its `server_name` (by default its node name) whatever the
    /// target, and presents its own `cert_file` to servers that ask for a client certificate.
    Verify,
    /// Any certificate is accepted (Consul's `TLSSkipVerify`): the check proves that the server
    /// answers over TLS and says SERVING, not who it is.
    SkipVerify,
}

impl HealthCheck {
    /// A TTL heartbeat check. Any positive TTL up to 24 hours is valid here; a backend that
    /// counts whole seconds (etcd leases) rounds a shorter one up, never down.
    pub fn ttl(ttl: Duration) -> Self {
        HealthCheck::Ttl { ttl }
    }

    /// An HTTP check every `interval`, each with a time limit of `interval` (at most 10 s).
    pub fn http(url: impl Into<String>, interval: Duration) -> Self {
        HealthCheck::Http {
            url: url.into(),
            interval,
            timeout: interval.min(Duration::from_secs(10)),
            tls: CheckTls::Verify,
        }
    }

    /// [`http`](Self::http) for an `https://` URL, its certificate treated as `tls` says:
    /// verified ([`http`](Self::http) does the same) or not.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::{CheckTls, HealthCheck, Registration};
    /// let every = Duration::from_secs(5);
    /// let check = HealthCheck::https("https://10.0.0.7:8443/health", every, CheckTls::SkipVerify);
    /// assert!(Registration::builder("users", "u1").port(8443).check(check).build().is_ok());
    /// // Over plain HTTP there is no certificate to skip.
    /// let plain = HealthCheck::https("http://10.0.0.7:8080/health", every, CheckTls::SkipVerify);
    /// let err = Registration::builder("users", "u1").port(8080).check(plain).build().unwrap_err();
    /// assert!(err.to_string().contains("https://"), "{err}");
    /// ```
    pub fn https(url: impl Into<String>, interval: Duration, tls: CheckTls) -> Self {
        HealthCheck::Http {
            url: url.into(),
            interval,
            timeout: interval.min(Duration::from_secs(10)),
            tls,
        }
    }

    /// A TCP connect check every `interval`, each with a time limit of `interval` (at most 10 s).
    pub fn tcp(address: impl Into<String>, interval: Duration) -> Self {
        HealthCheck::Tcp {
            address: address.into(),
            interval,
            timeout: interval.min(Duration::from_secs(10)),
        }
    }

    /// A gRPC health check every `interval`, each with a time limit of `interval` (at most
    /// 10 s): the backend calls `grpc.health.v1.Health/Check` on `target` (`host:port`, or
    /// `host:port/service` to name the service asked about), over plaintext HTTP/2.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::{HealthCheck, Registration};
    /// let check = HealthCheck::grpc("10.0.0.7:50051/users.Users", Duration::from_secs(5));
    /// assert_eq!(check.heartbeat_interval(), None); // the backend runs it
    /// assert!(Registration::builder("users", "u1").port(50051).check(check).build().is_ok());
    /// let bad = HealthCheck::grpc("10.0.0.7", Duration::from_secs(5));
    /// let err = Registration::builder("users", "u1").port(50051).check(bad).build().unwrap_err();
    /// assert!(err.to_string().contains("host:port"), "{err}");
    /// ```
    pub fn grpc(target: impl Into<String>, interval: Duration) -> Self {
        HealthCheck::Grpc {
            target: target.into(),
            interval,
            timeout: interval.min(Duration::from_secs(10)),
            tls: None,
        }
    }

    /// [`grpc`](Self::grpc) over TLS, for a server that serves only TLS: the backend verifies
    /// the server's certificate, or not, as `tls` says. The memory backend connects over TCP
    /// only, as for every gRPC check.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::{CheckTls, HealthCheck, Registration};
    /// let check = HealthCheck::grpc_tls("users.internal:50051", Duration::from_secs(5), CheckTls::SkipVerify);
    /// let reg = Registration::builder("users", "u1").port(50051).check(check).build()?;
    /// assert!(matches!(reg.check(), HealthCheck::Grpc { tls: Some(CheckTls::SkipVerify), .. }));
    /// # Ok::<(), waypost_core::ValidationError>(())
    /// ```
    pub fn grpc_tls(target: impl Into<String>, interval: Duration, tls: CheckTls) -> Self {
        HealthCheck::Grpc {
            target: target.into(),
            interval,
            timeout: interval.min(Duration::from_secs(10)),
            tls: Some(tls),
        }
    }

    /// How often the registering process must heart-beat: a third of the TTL, so that two beats
    /// may be lost before the backend expires the instance. `None` for checks the backend runs.
    pub fn heartbeat_interval(&self) -> Option<Duration> {
        match self {
            HealthCheck::Ttl { ttl } => Some(*ttl / 3),
            _ => None,
        }
    }

    fn validate(&self) -> Result<(), ValidationError> {
        let positive = |field: Field, d: Duration| {
            if d.is_zero() {
                Err(ValidationError::new(field, Problem::Zero))
            } else if d > Duration::from_secs(24 * 3600) {
                Err(ValidationError::new(
                    field,
                    Problem::Invalid("longer than 24 hours".into()),
                ))
            } else {
                Ok(())
            }
        };
        // No control character or space: the value goes into the backend's JSON as it is.
        let printable = |field: Field, value: &str| match value
            .char_indices()
            .find(|(_, c)| c.is_control() || c.is_whitespace())
        {
            Some((at, _)) => Err(ValidationError::new(
                field,
                Problem::ControlCharacter { at },
            )),
            None => Ok(()),
        };
        match self {
            // Precision is the backend's: one that counts whole seconds (etcd leases) rounds a
            // shorter TTL up, never down (see BACKENDS.md).
            HealthCheck::Ttl { ttl } => positive(Field::CheckTtl, *ttl),
            HealthCheck::Http {
                url,
                interval,
                timeout,
                tls,
            } => {
                positive(Field::CheckInterval, *interval)?;
                positive(Field::CheckTimeout, *timeout)?;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(ValidationError::new(
                        Field::CheckUrl,
                        Problem::Invalid(format!("{url:?} is not an http:// or https:// URL")),
                    ));
                }
                if *tls != CheckTls::Verify && !url.starts_with("https://") {
                    return Err(ValidationError::new(
                        Field::CheckUrl,
                        Problem::Invalid(format!(
                            "{url:?} is plain HTTP: {tls:?} applies to an https:// URL only"
                        )),
                    ));
                }
                printable(Field::CheckUrl, url)
            }
            HealthCheck::Tcp {
                address,
                interval,
                timeout,
            } => {
                positive(Field::CheckInterval, *interval)?;
                positive(Field::CheckTimeout, *timeout)?;
                host_port(address)
            }
            HealthCheck::Grpc {
                target,
                interval,
                timeout,
                tls: _,
            } => {
                positive(Field::CheckInterval, *interval)?;
                positive(Field::CheckTimeout, *timeout)?;
                printable(Field::CheckAddress, target)?;
                match target.split_once('/') {
                    Some((_, "")) => Err(ValidationError::new(
                        Field::CheckAddress,
                        Problem::Invalid(format!(
                            "{target:?} names no service after '/': give host:port or \
                             host:port/service"
                        )),
                    )),
                    Some((address, _)) => host_port(address),
                    None => host_port(target),
                }
            }
        }
    }
}

/// `address` is `host:port`, with a port from 1 up.
fn host_port(address: &str) -> Result<(), ValidationError> {
    match address.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err(ValidationError::new(
            Field::CheckAddress,
            Problem::Invalid(format!("{address:?} is not host:port")),
        )),
    }
}

impl Default for HealthCheck {
    /// A 10 s TTL heartbeat.
    fn default() -> Self {
        HealthCheck::ttl(Duration::from_secs(10))
    }
}

/// What a process announces about itself: the instance (its host may be left for the backend to
/// fill in) and the health check that keeps it listed.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{HealthCheck, Registration};
/// let reg = Registration::builder("users", "users-1")
///     .port(8080)
///     .weight(2)
///     .check(HealthCheck::ttl(Duration::from_secs(5)))
///     .build()?;
/// assert_eq!(reg.host(), None); // the backend fills in this machine's address
/// assert_eq!(reg.instance_or_host("10.0.0.7")?.authority(), "10.0.0.7:8080");
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    // Validated with a placeholder host when none was given; `host_given` says which.
    instance: ServiceInstance,
    host_given: bool,
    check: HealthCheck,
    deregister_critical_after: Option<Duration>,
}

/// The host used to validate a registration that leaves its host to the backend.
const PLACEHOLDER_HOST: &str = "0.0.0.0";

impl Registration {
    /// Starts a registration of instance `id` of `service`. A port is required.
    ///
    /// As with [`ServiceInstance::builder`], the names are validated once, here: give a
    /// [`ServiceName`] / [`InstanceId`] you already have, or any string, whose problem
    /// [`build`](RegistrationBuilder::build) reports.
    ///
    /// ```
    /// use waypost_core::{Field, Registration, ServiceName};
    /// let users: ServiceName = "users".parse()?;
    /// let reg = Registration::builder(&users, format!("users-{}", 1)).port(8080).build()?;
    /// assert_eq!(reg.service(), &users);
    /// let bad = Registration::builder("users/admin", "u1").port(8080).build();
    /// assert_eq!(bad.unwrap_err().field(), &Field::ServiceName);
    /// # Ok::<(), waypost_core::ValidationError>(())
    /// ```
    pub fn builder(
        service: impl TryInto<ServiceName, Error: Into<ValidationError>>,
        id: impl TryInto<InstanceId, Error: Into<ValidationError>>,
    ) -> RegistrationBuilder {
        RegistrationBuilder {
            instance: ServiceInstance::builder(service, id),
            host_given: false,
            check: HealthCheck::default(),
            deregister_critical_after: None,
        }
    }

    /// Registers exactly `instance` (its host included) with `check`.
    pub fn new(instance: ServiceInstance, check: HealthCheck) -> Result<Self, ValidationError> {
        check.validate()?;
        Ok(Registration {
            instance,
            host_given: true,
            check,
            deregister_critical_after: None,
        })
    }

    /// The service name.
    pub fn service(&self) -> &ServiceName {
        self.instance.service()
    }
    /// The instance id.
    pub fn id(&self) -> &InstanceId {
        self.instance.id()
    }
    /// The host, if the registration names one.
    pub fn host(&self) -> Option<&str> {
        self.host_given.then(|| self.instance.host())
    }
    /// The port.
    pub fn port(&self) -> u16 {
        self.instance.port()
    }
    /// The health check.
    pub fn check(&self) -> &HealthCheck {
        &self.check
    }
    /// How long after turning critical the backend should drop the instance (its safety net
    /// for a process that died without deregistering).
    pub fn deregister_critical_after(&self) -> Option<Duration> {
        self.deregister_critical_after
    }

    /// The instance as announced, with `default_host` where the registration names no host.
    pub fn instance_or_host(&self, default_host: &str) -> Result<ServiceInstance, ValidationError> {
        if self.host_given {
            Ok(self.instance.clone())
        } else {
            self.instance.to_builder().host(default_host).build()
        }
    }
}

/// Builds a validated [`Registration`]; see [`Registration::builder`].
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{Field, HealthCheck, Registration};
///
/// let reg = Registration::builder("users", "users-1")
///     .port(8080) // no host: the backend announces the machine's address
///     .tag("v1")
///     .weight(3)
///     .check(HealthCheck::ttl(Duration::from_secs(10)))
///     .deregister_critical_after(Duration::from_secs(90))
///     .build()?;
/// assert_eq!((reg.host(), reg.port()), (None, 8080));
/// assert_eq!(reg.instance_or_host("10.0.0.7")?.authority(), "10.0.0.7:8080");
///
/// // A bad value fails here, before any I/O, naming the field.
/// let err = Registration::builder("users", "users-1").port(0).build().unwrap_err();
/// assert_eq!(err.field(), &Field::Port);
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct RegistrationBuilder {
    instance: InstanceBuilder,
    host_given: bool,
    check: HealthCheck,
    deregister_critical_after: Option<Duration>,
}

impl RegistrationBuilder {
    /// The host clients connect to; leave it out to let the backend use this machine's address.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.instance = self.instance.host(host);
        self.host_given = true;
        self
    }
    /// The port clients connect to.
    pub fn port(mut self, port: u16) -> Self {
        self.instance = self.instance.port(port);
        self
    }
    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.instance = self.instance.tag(tag);
        self
    }
    /// Adds a metadata pair.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.instance = self.instance.meta(key, value);
        self
    }
    /// The balancing weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.instance = self.instance.weight(weight);
        self
    }
    /// The zone.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.instance = self.instance.zone(zone);
        self
    }
    /// The health check (default: a 10 s TTL heartbeat).
    pub fn check(mut self, check: HealthCheck) -> Self {
        self.check = check;
        self
    }
    /// The backend's safety net for a process that died: drop the instance this long after it
    /// turned critical.
    pub fn deregister_critical_after(mut self, after: Duration) -> Self {
        self.deregister_critical_after = Some(after);
        self
    }

    /// Validates everything; the error names the first bad field.
    pub fn build(self) -> Result<Registration, ValidationError> {
        let builder = if self.host_given {
            self.instance
        } else {
            self.instance.host(PLACEHOLDER_HOST)
        };
        let instance = builder.build()?;
        self.check.validate()?;
        if let Some(d) = self.deregister_critical_after {
            if d.is_zero() {
                return Err(ValidationError::new(Field::DeregisterAfter, Problem::Zero));
            }
        }
        Ok(Registration {
            instance,
            host_given: self.host_given,
            check: self.check,
            deregister_critical_after: self.deregister_critical_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_are_validated() {
        let reg = |c: HealthCheck| Registration::builder("s", "i").port(1).check(c).build();
        assert_eq!(
            reg(HealthCheck::ttl(Duration::ZERO)).unwrap_err().field(),
            &Field::CheckTtl
        );
        // Under a second is the backend's business (etcd rounds up to whole seconds).
        assert!(reg(HealthCheck::ttl(Duration::from_millis(200))).is_ok());
        assert_eq!(
            reg(HealthCheck::http("ftp://x", Duration::from_secs(1)))
                .unwrap_err()
                .field(),
            &Field::CheckUrl
        );
        assert_eq!(
            reg(HealthCheck::http("http://x/", Duration::ZERO))
                .unwrap_err()
                .field(),
            &Field::CheckInterval
        );
        assert_eq!(
            reg(HealthCheck::tcp("nohost", Duration::from_secs(1)))
                .unwrap_err()
                .field(),
            &Field::CheckAddress
        );
        assert!(reg(HealthCheck::tcp("127.0.0.1:80", Duration::from_secs(1))).is_ok());
        let grpc = |target: &str| reg(HealthCheck::grpc(target, Duration::from_secs(1)));
        assert!(grpc("127.0.0.1:50051").is_ok());
        assert!(grpc("127.0.0.1:50051/users.Users").is_ok());
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0/users",
            "127.0.0.1:50051/",
            "h:1/a b",
            ":1/x",
        ] {
            assert_eq!(
                grpc(bad).unwrap_err().field(),
                &Field::CheckAddress,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn missing_host_is_filled_by_backend_and_instance_fields_are_validated() {
        let r = Registration::builder("s", "i").port(9).build().unwrap();
        assert_eq!(r.host(), None);
        assert_eq!(r.instance_or_host("1.2.3.4").unwrap().host(), "1.2.3.4");
        let r = Registration::builder("s", "i")
            .host("h")
            .port(9)
            .build()
            .unwrap();
        assert_eq!(r.instance_or_host("1.2.3.4").unwrap().host(), "h");
        let e = Registration::builder("s", "i").build().unwrap_err();
        assert_eq!(e.field(), &Field::Port);
    }
}
