//! Waypost's etcd backend: registration with leases, discovery by prefix reads and watches that
//! resume by revision, proven against real etcd (one node and a three-member cluster).
//!
//! [`Etcd`] implements [`Registry`] and [`Discovery`]. Build it with [`Etcd::builder`].
//!
//! ```no_run
//! use futures::StreamExt;
//! use waypost_core::{Discovery, Registration, Registry, ServiceName};
//! use waypost_etcd::Etcd;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let etcd = Etcd::builder().endpoints(["http://127.0.0.1:2379"]).connect().await?;
//!
//! // Announce this process; the handle keeps the lease alive until shutdown.
//! let reg = Registration::builder("users", "users-1").port(8080).build()?;
//! let handle = etcd.register(reg).await?;
//!
//! // Find it, and follow the changes.
//! let users: ServiceName = "users".parse()?;
//! assert_eq!(etcd.instances(&users).await?.len(), 1);
//! let mut watch = etcd.watch(&users);
//! println!("{:?}", watch.next().await); // Some(Ok(Snapshot([...])))
//!
//! handle.shutdown().await?; // revokes the lease: the key disappears at once
//! # Ok(())
//! # }
//! ```
//!
//! # Data layout (for registering from other languages)
//!
//! One key per instance, `<prefix>/<service>/<instance-id>` (default prefix
//! `/waypost/services`, so e.g. `/waypost/services/users/users-1`), attached to a lease that the
//! registering process keeps alive. The value is a UTF-8 JSON object:
//!
//! | field | type | |
//! | --- | --- | --- |
//! | `schema` | number | must be `1` ([`SCHEMA_VERSION`]); other versions are skipped |
//! | `id` | string | the instance id; must equal the last key segment |
//! | `service` | string | the service name; must equal the middle key segment |
//! | `host` | string | host name or IP clients connect to |
//! | `port` | number | 1..=65535 |
//! | `tags` | array of strings | optional, default `[]` |
//! | `metadata` | object of strings | optional, default `{}` |
//! | `weight` | number or null | optional, 1..=1000000; default a `weight:N` tag, else 1 |
//! | `zone` | string or null | optional |
//!
//! ```json
//! {"schema":1,"id":"users-1","service":"users","host":"10.0.0.5","port":8080,
//!  "tags":["v1"],"metadata":{"version":"1.4.2"},"weight":3,"zone":"eu-1a"}
//! ```
//!
//! Unknown fields are ignored. Service names are 1 to 128 ASCII letters, digits, `-`, `_`, `.`;
//! instance ids are 1 to 128 printable characters without whitespace or `/`. A value under the
//! prefix that is not such a record (garbage, another schema, a key/record mismatch, an invalid
//! field) is skipped with a warning and counted in [`Etcd::skipped_records`]; it never hides the
//! valid instances. To register from another language: grant a lease, put the key with it, keep
//! the lease alive (every TTL/3), revoke it on shutdown.
//!
//! # Behaviour
//!
//! - **Registration**: grants a lease (see [`EtcdBuilder::lease_ttl`]), puts the key with it,
//!   and keeps it alive every TTL/3 with a deadline on each answer (a silent keep-alive stream is
//!   a dead one). When the lease is lost (expired, unknown, stream closed or silent) it grants a
//!   new lease and puts the key again, forever, with jittered backoff, reporting
//!   [`Liveness`](waypost_core::Liveness) meanwhile. It also watches its own key: a key deleted
//!   by someone else while the lease lives (`etcdctl del`, a clean-up script) is put back at
//!   once on the same lease (while that watch is down, each keep-alive round reads the key
//!   instead). An overwrite is left alone: a second registration of the same id takes over. `shutdown()` revokes the lease.
//! - **Watch**: reads the prefix (header revision R), then watches from R + 1 with `prev_kv`,
//!   progress notifications and `require_leader`; tracks the last revision (events and progress
//!   notifications) and resumes a broken, closed or cancelled stream from last + 1; after a
//!   compaction it re-lists and emits only the difference. An idle watch asks for progress every
//!   [`EtcdBuilder::progress_interval`]; a watch that does not answer is re-opened. Errors are
//!   yielded as `Err` items and the watch goes on (fail-static); it ends only when every clone
//!   of the [`Etcd`] client is dropped.
//! - **Several endpoints**: a request that fails with `Unavailable` (or no answer within the
//!   request timeout) is retried, reaching another member; watch and keep-alive streams are
//!   re-created when their member dies.
//! - **Auth and TLS**: [`EtcdBuilder::auth`] (a wrong password fails `connect` with
//!   [`Error::PermissionDenied`]; tokens are refreshed when they expire); `https://` endpoints
//!   and the `tls_*` options with the crate feature `tls` (rustls with ring: a C compiler, no
//!   system library). A server certificate the configured CA did not sign fails `connect` with
//!   [`Error::Config`].
//!
//! The underlying client crate is re-exported as [`etcd_client`] for administration tasks
//! Waypost does not cover (compaction, auth setup).
#![warn(missing_docs)]

mod builder;
mod error;
mod record;
mod registry;
mod retry;
mod watch;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::Instrument;
use waypost_core::{
    Discovery, Error, HealthCheck, InstanceId, Registration, RegistrationHandle, Registry,
    ServiceInstance, ServiceName, Watch,
};

pub use builder::{EtcdBuilder, DEFAULT_LEASE_TTL, DEFAULT_PREFIX, ENDPOINTS_ENV};
pub use etcd_client;
pub use record::{decode_record, encode_record, record_key, RecordError, SCHEMA_VERSION};

/// A client of an etcd cluster: a [`Registry`] and a [`Discovery`]. Cheap to clone; clones
/// share the connection and the counters.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::{Discovery, HealthCheck, Registration, Registry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = waypost_conformance::etcd_server::EtcdServer::start().await;
/// # std::env::set_var("ETCD_ENDPOINTS", server.endpoint());
/// // ETCD_ENDPOINTS names the cluster (here: a real etcd the example started).
/// let etcd = waypost_etcd::Etcd::builder().from_env().connect().await?;
/// let registration = Registration::builder("users", "users-1")
///     .host("10.0.0.5")
///     .port(8080)
///     .check(HealthCheck::ttl(Duration::from_secs(10))) // the lease's TTL
///     .build()?;
/// let handle = etcd.register(registration).await?;
/// let listed = etcd.instances(&"users".parse()?).await?;
/// assert_eq!(listed[0].authority(), "10.0.0.5:8080");
/// assert_eq!(etcd.skipped_records(), 0);
/// handle.shutdown().await?; // revokes the lease: the key goes at once
/// assert!(etcd.instances(&"users".parse()?).await?.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Etcd {
    shared: Arc<Shared>,
}

/// What the background work (keep-alives, watches) needs; outlives the [`Etcd`] handles.
pub(crate) struct Ctx {
    pub(crate) client: etcd_client::Client,
    pub(crate) endpoints: Vec<String>,
    pub(crate) layout: record::Layout,
    pub(crate) default_host: String,
    pub(crate) lease_ttl: Option<Duration>,
    pub(crate) request_timeout: Duration,
    pub(crate) progress_interval: Duration,
    /// How often a request is tried while members are unavailable.
    pub(crate) attempts: u32,
    pub(crate) skipped: AtomicU64,
}

/// Owned by the [`Etcd`] handles only: when the last one goes, `closed` drops and every watch
/// ends.
struct Shared {
    ctx: Arc<Ctx>,
    closed: tokio::sync::watch::Sender<()>,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    fn new(
        client: etcd_client::Client,
        endpoints: Vec<String>,
        layout: record::Layout,
        default_host: String,
        lease_ttl: Option<Duration>,
        request_timeout: Duration,
        progress_interval: Duration,
        attempts: u32,
    ) -> Self {
        Shared {
            ctx: Arc::new(Ctx {
                client,
                endpoints,
                layout,
                default_host,
                lease_ttl,
                request_timeout,
                progress_interval,
                attempts,
                skipped: AtomicU64::new(0),
            }),
            closed: tokio::sync::watch::channel(()).0,
        }
    }
}

impl Etcd {
    /// A builder with the defaults: endpoint `http://127.0.0.1:2379`, prefix
    /// [`DEFAULT_PREFIX`], connect timeout 3 s, request timeout 5 s.
    ///
    /// ```
    /// let b = waypost_etcd::Etcd::builder().prefix("/apps/services");
    /// assert!(format!("{b:?}").contains("/apps/services"));
    /// ```
    pub fn builder() -> EtcdBuilder {
        EtcdBuilder::default()
    }

    /// How many values under the prefix were skipped because they are not valid instance
    /// records (counted each time one is read: by a list, a watch event or a re-list).
    pub fn skipped_records(&self) -> u64 {
        self.shared.ctx.skipped.load(Ordering::Relaxed)
    }

    /// The etcd key of instance `id` of `service`: `<prefix>/<service>/<id>`.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let etcd = waypost_etcd::Etcd::builder().connect().await?;
    /// let key = etcd.key(&"users".parse()?, &"users-1".parse()?);
    /// assert_eq!(key, "/waypost/services/users/users-1");
    /// # Ok(())
    /// # }
    /// ```
    pub fn key(&self, service: &ServiceName, id: &InstanceId) -> String {
        self.shared.ctx.layout.key(service, id)
    }

    /// The cluster's client URLs, as configured.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), waypost_core::Error> {
    /// let etcd = waypost_etcd::Etcd::builder().endpoints(["127.0.0.1:2379"]).connect().await?;
    /// assert_eq!(etcd.endpoints(), ["127.0.0.1:2379"]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn endpoints(&self) -> &[String] {
        &self.shared.ctx.endpoints
    }

    /// The key prefix, without a trailing slash.
    pub fn prefix(&self) -> &str {
        self.shared.ctx.layout.prefix()
    }

    /// The host announced by registrations that name none.
    pub fn default_host(&self) -> &str {
        &self.shared.ctx.default_host
    }
}

impl fmt::Debug for Etcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ctx = &self.shared.ctx;
        f.debug_struct("Etcd")
            .field("endpoints", &ctx.endpoints)
            .field("prefix", &ctx.layout.prefix())
            .field("default_host", &ctx.default_host)
            .field("skipped_records", &self.skipped_records())
            .finish_non_exhaustive()
    }
}

/// The lease TTL of a registration: the builder's, else its TTL check's, else
/// [`DEFAULT_LEASE_TTL`]; whole seconds, rounded up.
fn lease_ttl_secs(configured: Option<Duration>, check: &HealthCheck) -> i64 {
    let ttl = configured.unwrap_or(match check {
        HealthCheck::Ttl { ttl } => *ttl,
        // etcd runs no checks of its own: the lease is the only liveness signal.
        _ => DEFAULT_LEASE_TTL,
    });
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.clamp(1, i64::MAX as u64) as i64
}

#[async_trait]
impl Registry for Etcd {
    async fn register(&self, registration: Registration) -> Result<RegistrationHandle, Error> {
        let ctx = self.shared.ctx.clone();
        let instance = registration.instance_or_host(&ctx.default_host)?;
        let entry = registry::Entry {
            key: ctx.layout.key(instance.service(), instance.id()),
            value: encode_record(&instance),
            ttl_secs: lease_ttl_secs(ctx.lease_ttl, registration.check()),
        };
        // The first registration in its own span. The keep-alive task is spawned outside it:
        // core runs that task in a "registration" span with the same fields, which would
        // otherwise nest under this one.
        let span = tracing::info_span!(
            "register",
            service = %instance.service(),
            instance = %instance.id(),
            backend = error::BACKEND,
        );
        let lease = async {
            match registry::establish(&ctx, &entry).await {
                Ok(lease) => {
                    tracing::info!(key = %entry.key, lease, ttl = entry.ttl_secs, "registered in etcd");
                    Ok(lease)
                }
                Err(e) => {
                    tracing::debug!(key = %entry.key, error = %e, "registering in etcd failed");
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await?;
        Ok(RegistrationHandle::spawn(
            error::BACKEND,
            instance,
            move |ka| registry::keep(ctx, entry, lease, ka),
        ))
    }
}

#[async_trait]
impl Discovery for Etcd {
    async fn instances(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
        let (_, by_key) = watch::list(&self.shared.ctx, service).await?;
        let mut all: Vec<ServiceInstance> = by_key.into_values().collect();
        all.sort_by(|a, b| a.id().cmp(b.id()));
        Ok(all)
    }

    fn watch(&self, service: &ServiceName) -> Watch {
        watch::watch(
            self.shared.ctx.clone(),
            self.shared.closed.subscribe(),
            service.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttl_prefers_the_builder_then_the_check_and_rounds_up() {
        let ttl = |s| HealthCheck::ttl(Duration::from_secs(s));
        let http = HealthCheck::http("http://h/", Duration::from_secs(1));
        assert_eq!(lease_ttl_secs(None, &ttl(4)), 4);
        assert_eq!(lease_ttl_secs(Some(Duration::from_secs(7)), &ttl(4)), 7);
        assert_eq!(lease_ttl_secs(None, &http), 10);
        assert_eq!(lease_ttl_secs(Some(Duration::from_millis(2500)), &http), 3);
        // Leases count whole seconds: a TTL under one (valid in core) becomes one, not zero.
        let short = HealthCheck::ttl(Duration::from_millis(300));
        assert_eq!(lease_ttl_secs(None, &short), 1);
    }
}
