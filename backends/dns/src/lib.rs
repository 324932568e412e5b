//! Waypost discovery over DNS SRV records: Consul's DNS interface, or any zone with SRV
//! records (`_http._tcp.example.com`). Discovery only: DNS has no registration.
//!
//! - [`Discovery::instances`] asks for the SRV records of `<service>.service.<domain>` (the
//!   [name template](DnsBuilder::name_template) is configurable) and turns each into a
//!   [`ServiceInstance`]: id `host:port` (IPv6 in brackets), host the target's IP address, port
//!   the SRV port, weight the SRV weight (0 counts as 1). The target's address comes from the
//!   answer's additional section when it is there (Consul puts it there, for
//!   `<node>.node.<dc>.consul.` and `<hex>.addr.<dc>.consul.` targets alike), else from an
//!   A/AAAA question for the target; a target with several addresses gives its lowest IPv4
//!   address, else its lowest IPv6 address. A target without an address, or one the server
//!   refuses to resolve (Consul without recursors refuses the host name a service was
//!   registered with), is left out. Only the records of the lowest priority value that has a
//!   target with an address are used (RFC 2782: the others are backups); a `.` target or port 0
//!   means no server; records naming the same address and port are one instance with their
//!   weights added. The list is sorted by id. DNS carries no tags, metadata or zone: instances
//!   have none.
//! - An unknown service (NXDOMAIN, or no SRV records) has no instances: `Ok(vec![])`. A server
//!   that cannot be reached, does not answer within the [query
//!   timeout](DnsBuilder::query_timeout), or answers SERVFAIL / REFUSED is
//!   [`Error::Unavailable`] (backend `dns`) with what to check; an answer that cannot be read is
//!   [`Error::Protocol`].
//! - [`Discovery::watch`] polls (every 5 s by default, [`DnsBuilder::poll_interval`]): a
//!   [`Snapshot`](waypost_core::WatchEvent::Snapshot) and
//!   [`Synced`](waypost_core::WatchEvent::Synced) as soon as the first answer arrives, then only
//!   the real changes. A failed poll yields its error, keeps what was delivered (an outage is
//!   never an empty set), and retries with [`waypost_core::Backoff`] ([`DnsBuilder::backoff`]);
//!   the first good answer after errors says `Synced` again, changed or not. The watch never
//!   ends by itself; it holds the DNS client, so it runs for as long as its stream is held, also
//!   after the [`Dns`] that made it is dropped. An outage that falls between two polls is not
//!   seen (there is nothing to see: the next poll gets an answer).
//! - Every question goes to the servers: there is no cache (a change shows within one poll
//!   interval, whatever the records' TTLs) and no hosts file. Names are asked fully qualified,
//!   without search domains.
//!
//! With Consul, ask the agent's DNS port (8600 by default) over TCP when a service can have
//! more than three instances: over UDP Consul trims answers to three records without marking
//! them truncated (unless its `dns_config.enable_truncate` is set).
//!
//! ```
//! use std::time::Duration;
//! use futures::StreamExt;
//! use waypost_core::{Discovery, Registration, Registry, ServiceName, WatchEvent};
//! use waypost_dns::{Dns, Protocol};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A real Consul agent (`consul agent -dev`, started by the test harness) with one instance.
//! let agent = waypost_conformance::consul_server::ConsulServer::start().await;
//! let consul = waypost_consul::Consul::builder().address(agent.addr()).build()?;
//! let reg = Registration::builder("users", "users-1").host("127.0.0.1").port(8080).build()?;
//! let handle = consul.register(reg).await?;
//!
//! let dns = Dns::builder()
//!     .server(agent.dns_addr()) // the agent's DNS interface (port 8600 by default)
//!     .domain("consul")
//!     .protocol(Protocol::Tcp)
//!     .build()?;
//! let users: ServiceName = "users".parse()?;
//! // Consul answers for the instance once its check passed.
//! let found = waypost_conformance::scenarios::eventually(Duration::from_secs(10), "users over DNS", || async {
//!     match dns.instances(&users).await {
//!         Ok(list) if !list.is_empty() => Ok(list),
//!         other => Err(format!("{other:?}")),
//!     }
//! })
//! .await;
//! // DNS carries no instance id: the id is the address.
//! assert_eq!(found[0].id().as_str(), "127.0.0.1:8080");
//! assert_eq!(found[0].authority(), "127.0.0.1:8080");
//!
//! let mut watch = dns.watch(&users);
//! assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Snapshot(all))) if all == found));
//! assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Synced)))); // then only changes
//! # handle.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! A server that is not there is an [`Error::Unavailable`] that says what to check:
//!
//! ```
//! use waypost_core::{Discovery, Error, ServiceName};
//! use waypost_dns::{Dns, Protocol};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A loopback port nobody listens on.
//! let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
//! let dns = Dns::builder()
//!     .server(([127, 0, 0, 1], port).into())
//!     .protocol(Protocol::Tcp)
//!     .build()?;
//! let err = dns.instances(&ServiceName::new("users")?).await.unwrap_err();
//! assert!(matches!(err, Error::Unavailable { backend: "dns", .. }));
//! assert!(err.to_string().contains("check that the DNS server runs"));
//! assert!(err.is_retryable());
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod config;
mod lookup;
mod name;
mod watch;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use waypost_core::{async_trait, Discovery, Error, ServiceInstance, ServiceName, Watch};

pub use config::{
    DnsBuilder, Protocol, DEFAULT_DOMAIN, DEFAULT_POLL_INTERVAL, DEFAULT_QUERY_TIMEOUT,
    DEFAULT_TEMPLATE,
};

use config::Servers;
use name::Template;

/// The backend name in errors, logs and spans.
const BACKEND: &str = "dns";

/// A discovery over DNS SRV records; see the [crate docs](crate) for how answers become
/// instances.
///
/// Cheap to clone; clones share one DNS client (and its connections). `Debug` shows the servers,
/// the domain and the settings.
///
/// ```
/// use waypost_dns::Dns;
/// let dns = Dns::builder().server("127.0.0.1:8600".parse()?).domain("consul").build()?;
/// let shown = format!("{dns:?}");
/// assert!(shown.contains("127.0.0.1:8600") && shown.contains("consul"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Dns {
    inner: Arc<Inner>,
}

/// What a `Dns` and its watches share.
pub(crate) struct Inner {
    pub(crate) client: config::Client,
    pub(crate) request: hickory_resolver::proto::xfer::DnsRequestOptions,
    pub(crate) servers: Servers,
    pub(crate) protocol: Protocol,
    pub(crate) template: Template,
    pub(crate) poll_interval: Duration,
    pub(crate) query_timeout: Duration,
    pub(crate) backoff: (Duration, Duration),
}

impl fmt::Debug for Dns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("Dns")
            .field("servers", &format_args!("{}", i.servers))
            .field("domain", &i.template.domain())
            .field("protocol", &i.protocol)
            .field("poll_interval", &i.poll_interval)
            .field("query_timeout", &i.query_timeout)
            .finish_non_exhaustive()
    }
}

impl Dns {
    /// A builder with the defaults: the system's DNS servers, domain `consul`, names
    /// `{service}.service.{domain}`, UDP, a 5 s poll interval, a 3 s query timeout.
    ///
    /// ```
    /// let dns = waypost_dns::Dns::builder().server("127.0.0.1:8600".parse()?).build()?;
    /// assert_eq!(dns.srv_name(&"web".parse()?)?, "web.service.consul.");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn builder() -> DnsBuilder {
        DnsBuilder::default()
    }

    /// The fully qualified SRV name asked for `service`. Fails with [`Error::Invalid`] (field
    /// service name) for a service name DNS cannot carry: a label over 63 bytes, or an empty
    /// label (`a..b`).
    ///
    /// ```
    /// use waypost_core::{Error, ServiceName};
    /// let dns = waypost_dns::Dns::builder()
    ///     .server("127.0.0.1:53".parse()?)
    ///     .name_template("_{service}._tcp.{domain}")
    ///     .domain("example.com")
    ///     .build()?;
    /// assert_eq!(dns.srv_name(&ServiceName::new("ldap")?)?, "_ldap._tcp.example.com.");
    /// let long = ServiceName::new("x".repeat(64))?;
    /// assert!(matches!(dns.srv_name(&long), Err(Error::Invalid(_))));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn srv_name(&self, service: &ServiceName) -> Result<String, Error> {
        Ok(self.inner.template.render(service)?.to_ascii())
    }
}

#[async_trait]
impl Discovery for Dns {
    /// Asks for the SRV records of the service (and the addresses of targets the answer does
    /// not carry); see the [crate docs](crate) for the rules and the errors.
    async fn instances(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
        lookup::instances(&self.inner, service).await
    }

    /// A polling watch; see the [crate docs](crate). It runs for as long as the stream is held.
    fn watch(&self, service: &ServiceName) -> Watch {
        watch::watch(self.inner.clone(), service.clone())
    }
}
