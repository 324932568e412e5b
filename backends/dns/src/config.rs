//! The builder: which server to ask, over which protocol, which names to ask for, how often.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    NameServerConfig, NameServerConfigGroup, ResolverOpts, ServerOrderingStrategy,
};
use hickory_resolver::name_server::{NameServerPool, TokioConnectionProvider};
use hickory_resolver::proto::xfer::{DnsRequestOptions, Protocol as WireProtocol, RetryDnsHandle};
use waypost_core::Error;

use crate::name::Template;
use crate::{Dns, Inner, BACKEND};

/// The name template used when none is given: Consul's `<service>.service.<domain>`.
///
/// ```
/// let dns = waypost_dns::Dns::builder().server("127.0.0.1:8600".parse()?).build()?;
/// assert_eq!(waypost_dns::DEFAULT_TEMPLATE, "{service}.service.{domain}");
/// assert_eq!(dns.srv_name(&"api".parse()?)?, "api.service.consul.");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub const DEFAULT_TEMPLATE: &str = "{service}.service.{domain}";
/// The domain used when none is given: Consul's.
///
/// ```
/// assert_eq!(waypost_dns::DEFAULT_DOMAIN, "consul");
/// ```
pub const DEFAULT_DOMAIN: &str = "consul";
/// How often a watch asks when none is given (DNS has no push).
///
/// ```
/// assert_eq!(waypost_dns::DEFAULT_POLL_INTERVAL, std::time::Duration::from_secs(5));
/// ```
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// How long one DNS question may take when nothing else is configured.
///
/// ```
/// assert_eq!(waypost_dns::DEFAULT_QUERY_TIMEOUT, std::time::Duration::from_secs(3));
/// ```
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// The transport to the DNS server.
///
/// ```
/// use waypost_dns::Protocol;
/// assert_eq!(Protocol::default(), Protocol::Udp);
/// assert_eq!(Protocol::Tcp.to_string(), "tcp");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// UDP, retried over TCP when the server marks an answer truncated (the default). Note that
    /// Consul trims UDP answers to 3 records **without** marking them truncated unless its
    /// `dns_config.enable_truncate` is set: use [`Tcp`](Protocol::Tcp) with Consul when a
    /// service can have more instances than that.
    #[default]
    Udp,
    /// TCP only: whole answers of any size, one connection per server kept open.
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        })
    }
}

/// Builds a [`Dns`] discovery; see [`Dns::builder`].
///
/// Nothing here does I/O, except that [`build`](Self::build) reads the system resolver
/// configuration (`/etc/resolv.conf`) when no [`server`](Self::server) was given.
///
/// ```
/// use std::time::Duration;
/// use waypost_dns::{Dns, Protocol};
///
/// let dns = Dns::builder()
///     .server("127.0.0.1:8600".parse()?)
///     .domain("consul")
///     .protocol(Protocol::Tcp)
///     .poll_interval(Duration::from_secs(2))
///     .query_timeout(Duration::from_secs(1))
///     .build()?;
/// assert_eq!(dns.srv_name(&"users".parse()?)?, "users.service.consul.");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct DnsBuilder {
    servers: Vec<SocketAddr>,
    domain: String,
    template: String,
    protocol: Protocol,
    poll_interval: Duration,
    query_timeout: Duration,
    backoff: (Duration, Duration),
}

impl Default for DnsBuilder {
    fn default() -> Self {
        DnsBuilder {
            servers: Vec::new(),
            domain: DEFAULT_DOMAIN.to_owned(),
            template: DEFAULT_TEMPLATE.to_owned(),
            protocol: Protocol::Udp,
            poll_interval: DEFAULT_POLL_INTERVAL,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
            backoff: (Duration::from_millis(250), Duration::from_secs(10)),
        }
    }
}

impl DnsBuilder {
    /// Adds a DNS server to ask (call again for more: they are asked one at a time, the one
    /// that has answered best so far first, the next when one fails). Without any, the system resolver configuration (`/etc/resolv.conf`) is
    /// used. Consul agents answer on port 8600 by default.
    ///
    /// ```
    /// let dns = waypost_dns::Dns::builder()
    ///     .server("10.0.0.2:8600".parse()?)
    ///     .server("10.0.0.3:8600".parse()?)
    ///     .build()?;
    /// assert!(format!("{dns:?}").contains("10.0.0.3:8600"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn server(mut self, server: SocketAddr) -> Self {
        self.servers.push(server);
        self
    }

    /// The domain put into the name template's `{domain}` (default [`DEFAULT_DOMAIN`],
    /// `consul`). A trailing dot is allowed.
    ///
    /// ```
    /// let dns = waypost_dns::Dns::builder().domain("internal.example.com.").build()?;
    /// assert_eq!(dns.srv_name(&"users".parse()?)?, "users.service.internal.example.com.");
    /// assert!(waypost_dns::Dns::builder().domain("bad domain").build().is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = domain.into();
        self
    }

    /// The SRV name asked for a service: `{service}` is replaced by the service name,
    /// `{domain}` by the [`domain`](Self::domain); default [`DEFAULT_TEMPLATE`]
    /// (`{service}.service.{domain}`, Consul's). `{service}` is required; names are always
    /// asked fully qualified (no search domains).
    ///
    /// RFC 2782 names work too, with the service name as the `_service` label:
    ///
    /// ```
    /// let dns = waypost_dns::Dns::builder()
    ///     .name_template("_{service}._tcp.{domain}")
    ///     .domain("example.com")
    ///     .build()?;
    /// assert_eq!(dns.srv_name(&"http".parse()?)?, "_http._tcp.example.com.");
    /// let no_service = waypost_dns::Dns::builder().name_template("_http._tcp.example.com").build();
    /// assert!(no_service.is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn name_template(mut self, template: impl Into<String>) -> Self {
        self.template = template.into();
        self
    }

    /// The transport (default [`Protocol::Udp`]). It applies to the servers given with
    /// [`server`](Self::server) and, without any, to the system's.
    ///
    /// ```
    /// use waypost_dns::{Dns, Protocol};
    /// let dns = Dns::builder().server("127.0.0.1:8600".parse()?).protocol(Protocol::Tcp).build()?;
    /// assert!(format!("{dns:?}").contains("Tcp"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// How long a watch waits between two questions while all is well (default
    /// [`DEFAULT_POLL_INTERVAL`], 5 s; at least 10 ms). A change shows in a watch within about
    /// this long.
    ///
    /// ```
    /// use std::time::Duration;
    /// let dns = waypost_dns::Dns::builder()
    ///     .server("127.0.0.1:8600".parse()?)
    ///     .poll_interval(Duration::from_millis(500))
    ///     .build()?;
    /// assert!(format!("{dns:?}").contains("poll_interval: 500ms"));
    /// let too_short = waypost_dns::Dns::builder().poll_interval(Duration::from_millis(1)).build();
    /// assert!(too_short.unwrap_err().to_string().contains("at least 10 ms"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long one DNS question may take, a UDP retransmission or a reconnect included
    /// (default [`DEFAULT_QUERY_TIMEOUT`], 3 s; at least 10 ms). An SRV question and, for
    /// targets whose addresses the answer does not carry, their address questions each get this
    /// long.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::{Discovery, Error, ServiceName};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // A UDP port nobody answers on: the question fails within the timeout.
    /// let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    /// let dns = waypost_dns::Dns::builder()
    ///     .server(([127, 0, 0, 1], port).into())
    ///     .query_timeout(Duration::from_millis(200))
    ///     .build()?;
    /// let started = std::time::Instant::now();
    /// let err = dns.instances(&ServiceName::new("users")?).await.unwrap_err();
    /// assert!(matches!(err, Error::Unavailable { backend: "dns", .. }));
    /// assert!(started.elapsed() < Duration::from_secs(2));
    /// # Ok(())
    /// # }
    /// ```
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// The jittered backoff ([`waypost_core::Backoff`]) of a watch whose questions fail: the
    /// first retry after about `min`, doubling up to `max` (default 250 ms to 10 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let ok = waypost_dns::Dns::builder()
    ///     .backoff(Duration::from_millis(100), Duration::from_secs(1))
    ///     .build();
    /// assert!(ok.is_ok());
    /// let inverted = waypost_dns::Dns::builder()
    ///     .backoff(Duration::from_secs(2), Duration::from_secs(1))
    ///     .build();
    /// assert!(inverted.is_err());
    /// ```
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = (min, max);
        self
    }

    /// Validates the configuration and builds the discovery. Fails with
    /// [`Error::Config`] naming what to fix: a bad domain or template, a poll interval or
    /// timeout under 10 ms, an inverted backoff, or (without a server) an unreadable system
    /// resolver configuration.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost_core::Error;
    ///
    /// let err = waypost_dns::Dns::builder().poll_interval(Duration::ZERO).build().unwrap_err();
    /// assert!(matches!(err, Error::Config { backend: "dns", .. }));
    /// assert!(err.to_string().contains("poll interval"));
    /// ```
    pub fn build(self) -> Result<Dns, Error> {
        let min = Duration::from_millis(10);
        if self.poll_interval < min {
            return Err(config_error(format!(
                "the poll interval {:?} is too short; give at least 10 ms (DnsBuilder::poll_interval)",
                self.poll_interval
            )));
        }
        if self.query_timeout < min {
            return Err(config_error(format!(
                "the query timeout {:?} is too short; give at least 10 ms (DnsBuilder::query_timeout)",
                self.query_timeout
            )));
        }
        let (backoff_min, backoff_max) = self.backoff;
        if backoff_min.is_zero() || backoff_max < backoff_min {
            return Err(config_error(format!(
                "the backoff {backoff_min:?}..{backoff_max:?} must start above zero and not end \
                 before it starts (DnsBuilder::backoff)"
            )));
        }
        let template = Template::new(&self.template, &self.domain)?;
        let (client, request, servers) = self.client()?;
        Ok(Dns {
            inner: Arc::new(Inner {
                client,
                request,
                servers,
                protocol: self.protocol,
                template,
                poll_interval: self.poll_interval,
                query_timeout: self.query_timeout,
                backoff: self.backoff,
            }),
        })
    }

    /// The name servers to ask, the options to ask them with, and the servers for messages.
    fn plan(&self) -> Result<(Vec<NameServerConfig>, ResolverOpts, Servers), Error> {
        let wire = match self.protocol {
            Protocol::Udp => WireProtocol::Udp,
            Protocol::Tcp => WireProtocol::Tcp,
        };
        let (name_servers, mut opts, servers) = if self.servers.is_empty() {
            let (system, opts) =
                hickory_resolver::system_conf::read_system_conf().map_err(|e| {
                    config_error(format!(
                        "no DNS server given and the system resolver configuration cannot be read \
                     ({e}); give one with DnsBuilder::server"
                    ))
                })?;
            // The system lists every server for UDP and TCP: keep what the protocol allows
            // (UDP keeps TCP too, for truncated answers).
            let mut name_servers = Vec::new();
            let mut addrs = Vec::new();
            for ns in system.name_servers() {
                let keep = ns.protocol == wire
                    || (wire == WireProtocol::Udp && ns.protocol == WireProtocol::Tcp);
                if keep {
                    name_servers.push(ns.clone());
                    if !addrs.contains(&ns.socket_addr) {
                        addrs.push(ns.socket_addr);
                    }
                }
            }
            if addrs.is_empty() {
                return Err(config_error(
                    "no DNS server given and the system resolver configuration lists none; give \
                     one with DnsBuilder::server",
                ));
            }
            (name_servers, opts, Servers::System(addrs))
        } else {
            let mut name_servers: Vec<NameServerConfig> = self
                .servers
                .iter()
                .map(|&addr| NameServerConfig::new(addr, wire))
                .collect();
            if self.protocol == Protocol::Udp {
                // Truncated UDP answers are asked again over TCP.
                name_servers.extend(
                    self.servers
                        .iter()
                        .map(|&addr| NameServerConfig::new(addr, WireProtocol::Tcp)),
                );
            }
            (
                name_servers,
                ResolverOpts::default(),
                Servers::Given(self.servers.clone()),
            )
        };
        // One retry (a lost datagram, a connection the server closed while idle), both tries
        // within the query timeout; the watch retries beyond that with its backoff.
        opts.attempts = RETRIES;
        opts.timeout = self.query_timeout / 2;
        // One server at a time, the best by hickory's statistics (answers, failures, round-trip
        // time) first: a dead server stops costing a timeout on every poll.
        opts.server_ordering_strategy = ServerOrderingStrategy::QueryStatistics;
        opts.num_concurrent_reqs = 1;
        // Larger UDP answers (Consul sizes its UDP answers to the EDNS buffer).
        opts.edns0 = true;
        Ok((name_servers, opts, servers))
    }

    /// The client: the name server pool (connections kept per server) with one retry. There is
    /// no cache in between: every poll must ask the server, or a change would hide for a
    /// record's TTL (and a new service for its negative TTL).
    fn client(&self) -> Result<(Client, DnsRequestOptions, Servers), Error> {
        let (name_servers, opts, servers) = self.plan()?;
        let mut request = DnsRequestOptions::default();
        request.use_edns = opts.edns0;
        request.recursion_desired = opts.recursion_desired;
        let attempts = opts.attempts;
        let pool = NameServerPool::from_config(
            NameServerConfigGroup::from(name_servers),
            opts,
            TokioConnectionProvider::default(),
        );
        Ok((RetryDnsHandle::new(pool, attempts), request, servers))
    }
}

/// What asks the DNS servers.
pub(crate) type Client = RetryDnsHandle<NameServerPool<TokioConnectionProvider>>;

/// Retries of a failed question within one query timeout.
const RETRIES: usize = 1;

/// The servers a [`Dns`] asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Servers {
    Given(Vec<SocketAddr>),
    System(Vec<SocketAddr>),
}

impl fmt::Display for Servers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (addrs, system) = match self {
            Servers::Given(a) => (a, false),
            Servers::System(a) => (a, true),
        };
        for (i, a) in addrs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{a}")?;
        }
        if system {
            f.write_str(" (from the system resolver configuration)")?;
        }
        Ok(())
    }
}

pub(crate) fn config_error(message: impl Into<String>) -> Error {
    Error::Config {
        backend: BACKEND,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(b: DnsBuilder) -> String {
        match b.build() {
            Ok(dns) => panic!("{dns:?} should have been rejected"),
            Err(e) => {
                assert!(matches!(e, Error::Config { backend: "dns", .. }), "{e:?}");
                e.to_string()
            }
        }
    }

    fn local() -> DnsBuilder {
        DnsBuilder::default().server(SocketAddr::from(([127, 0, 0, 1], 8600)))
    }

    #[test]
    fn bad_settings_are_config_errors_naming_the_setting() {
        assert!(err(local().poll_interval(Duration::from_millis(9))).contains("poll interval"));
        assert!(err(local().query_timeout(Duration::ZERO)).contains("query timeout"));
        assert!(err(local().backoff(Duration::ZERO, Duration::from_secs(1))).contains("backoff"));
        assert!(
            err(local().backoff(Duration::from_secs(2), Duration::from_secs(1)))
                .contains("backoff")
        );
    }

    #[test]
    fn defaults() {
        let b = DnsBuilder::default();
        assert_eq!(b.domain, "consul");
        assert_eq!(b.template, DEFAULT_TEMPLATE);
        assert_eq!(b.protocol, Protocol::Udp);
        assert_eq!(b.poll_interval, Duration::from_secs(5));
        assert_eq!(b.query_timeout, Duration::from_secs(3));
    }

    #[test]
    fn the_plan_fits_retries_in_the_timeout_and_keeps_tcp_for_truncated_answers() {
        let (name_servers, opts, servers) = local()
            .query_timeout(Duration::from_secs(2))
            .plan()
            .expect("valid");
        assert_eq!(opts.attempts, 1);
        assert_eq!(opts.timeout, Duration::from_secs(1));
        assert!(opts.edns0);
        assert_eq!(
            servers,
            Servers::Given(vec![SocketAddr::from(([127, 0, 0, 1], 8600))])
        );
        // UDP asks over UDP first and keeps TCP for truncated answers.
        let protocols: Vec<_> = name_servers.iter().map(|ns| ns.protocol).collect();
        assert_eq!(protocols, vec![WireProtocol::Udp, WireProtocol::Tcp]);
        let (name_servers, _, _) = local().protocol(Protocol::Tcp).plan().expect("valid");
        let protocols: Vec<_> = name_servers.iter().map(|ns| ns.protocol).collect();
        assert_eq!(protocols, vec![WireProtocol::Tcp]);
    }

    #[test]
    fn servers_display_lists_them() {
        let a = SocketAddr::from(([10, 0, 0, 1], 53));
        let b = SocketAddr::from(([10, 0, 0, 2], 53));
        assert_eq!(
            Servers::Given(vec![a, b]).to_string(),
            "10.0.0.1:53, 10.0.0.2:53"
        );
        assert!(Servers::System(vec![a]).to_string().contains("system"));
    }
}
