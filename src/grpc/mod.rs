//! Waypost as the channel of any tonic client (feature `grpc`).
//!
//! [`GrpcChannel`] is a `Clone` tower service that tonic-generated clients accept in place of
//! tonic's `Channel` (`UsersClient::new(channel)`). It is a [`Balanced`]
//! service over a Waypost [`Balancer`]: every call picks an instance with the balancer's
//! strategy (any of them, consistent hashing by a metadata key included, the resilience layer
//! too) and goes out on that instance's own lazily connecting tonic channel, so load-aware
//! strategies see real in-flight counts and latency, and an instance that left is never used
//! again, whether or not the channel was idle.
//!
//! - **Per instance**: one `tonic::transport::Channel` (`connect_lazy`), with the connect
//!   timeout and HTTP/2 keep-alive of the builder; `https` (rustls) when the instance's metadata
//!   says `scheme=https` or the builder says so for all, trusting the builder's CA and
//!   presenting its client certificate ([`identity`](GrpcChannelBuilder::identity)) to
//!   instances that require one. Or the channel of your own maker
//!   ([`channel_for`](GrpcChannelBuilder::channel_for)).
//! - **Outcomes**: [`GrpcStatus`] reads the status of each call:
//!   UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL and RESOURCE_EXHAUSTED, or a transport error, are
//!   failures of the instance. A call stays in flight until its response body ends, so that a
//!   stream counts for least-connections and p2c as long as it lasts; its latency is the time
//!   to its response's head. At the end, the same statuses in the trailers, or a stream that
//!   breaks, make the call a failure ([`GrpcStatus::of_trailers`]); a response dropped before
//!   its end is a success (the instance answered), unless the instance had gone quiet for the
//!   channel's [`stalled_after`](GrpcChannelBuilder::stalled_after).
//! - **Retries**, on another instance, within the attempts and the [`RetryBudget`]: after a
//!   connect error (the call never left) for any method, and after any failure for the methods
//!   marked [`idempotent`](GrpcChannelBuilder::idempotent). A request is repeatable when its
//!   body is complete when the call starts (every unary and server-streaming call); a streaming
//!   request body is never held back, and such a call is not retried.
//! - **Deadlines**: a call's `grpc-timeout` (tonic's `Request::set_timeout`) bounds the whole
//!   call, retries included, as gRPC's retry design wants: each retry tells the server the
//!   time that is left, none starts once it is gone, and the call then fails with
//!   DEADLINE_EXCEEDED ([`GrpcError::DeadlineExceeded`]), also when an answer comes after it
//!   (a tonic server answers its own expired deadline with CANCELLED). An attempt cut short by
//!   the deadline is a failure of its instance, as a time-out of the HTTP client's is. A
//!   [per-try timeout](GrpcChannelBuilder::per_try_timeout) bounds each attempt, so that an
//!   instance that hangs leaves time for another.
//! - **Hedges** ([`hedge`](GrpcChannelBuilder::hedge)): an idempotent call whose instance is
//!   slow to answer also goes to another instance, and the first answer wins.
//! - **No instance**: with none to call (none discovered, or every one tried busy), a call
//!   fails at once with UNAVAILABLE ([`GrpcError::Unavailable`]), the code gRPC clients treat
//!   as "try again later".

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ::tower::Service;
use bytes::Bytes;
use futures::FutureExt;
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use waypost_core::{Balancer, Outcome, PickContext, PickGuard, ServiceInstance};

use crate::retry::{GaveUp, Hedge, RetryBudget};
use crate::tower::{BalanceError, Balanced, Class, Classify, GrpcStatus, Retry, Route};

/// The metadata key whose value `https` makes the channel use TLS to an instance (shared with
/// the HTTP client).
pub use crate::SCHEME_METADATA;

/// Why a channel could not be built, or a call failed before or outside the instance.
///
/// ```
/// use waypost::grpc::{GrpcChannel, GrpcError};
/// use waypost::strategies::RoundRobin;
/// use waypost::Balancer;
///
/// let err = GrpcChannel::builder(Balancer::new(RoundRobin::new()))
///     .hash_key("not a key")
///     .build()
///     .unwrap_err();
/// assert!(matches!(err, GrpcError::Config { .. }));
/// assert!(err.to_string().contains("not a metadata key"), "{err}");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcError {
    /// A builder setting is unusable.
    #[error("invalid gRPC channel setting: {message}")]
    Config {
        /// What is wrong and what fits.
        message: String,
    },
    /// An instance's call failed; see the balancer's error for which instance and why it was
    /// not retried. A tonic client sees the status found in its causes (UNAVAILABLE for a
    /// connection that could not be made), else UNKNOWN.
    #[error(transparent)]
    Call(#[from] BalanceError<tonic::transport::Error>),
    /// No instance could take the call: none is known or serving, or every one tried was busy.
    /// A tonic client sees `status`, UNAVAILABLE, gRPC's code for a service that cannot be
    /// reached now and may be tried again later.
    ///
    /// ```
    /// use waypost::grpc::GrpcError;
    /// use waypost::tower::BalanceError;
    /// let busy = BalanceError::NotReady {
    ///     instance: "users-1".parse()?,
    ///     waited: std::time::Duration::from_secs(1),
    ///     tried: 2,
    /// };
    /// let status = tonic::Status::from_error(Box::new(GrpcError::unavailable(busy)));
    /// assert_eq!(status.code(), tonic::Code::Unavailable);
    /// assert!(status.message().contains("users-1"), "{status}");
    /// # Ok::<(), waypost::ValidationError>(())
    /// ```
    #[error("no instance could take the call: {cause}")]
    Unavailable {
        /// UNAVAILABLE, its message saying why.
        #[source]
        status: tonic::Status,
        /// Why no instance took it.
        cause: Box<BalanceError<tonic::transport::Error>>,
    },
    /// The call's deadline (its `grpc-timeout`) passed before an instance answered: an answer
    /// that comes after it is not used. Or the last attempt ran out of the channel's
    /// [per-try timeout](GrpcChannelBuilder::per_try_timeout) and no other was allowed. A tonic
    /// client sees `status`, DEADLINE_EXCEEDED, which also says what the last attempt came to.
    ///
    /// ```
    /// use waypost::grpc::GrpcError;
    /// use waypost::tower::BalanceError;
    /// let last = BalanceError::DeadlineExceeded { instance: "users-1".parse()?, attempts: 2 };
    /// let err = GrpcError::deadline_exceeded(last);
    /// let status = tonic::Status::from_error(Box::new(err));
    /// assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    /// assert!(status.message().contains("users-1"), "{status}");
    /// # Ok::<(), waypost::ValidationError>(())
    /// ```
    #[error("the call's {}", status.message())]
    DeadlineExceeded {
        /// DEADLINE_EXCEEDED, its message saying what the last attempt came to.
        #[source]
        status: tonic::Status,
        /// How the last attempt failed; `None` when it was answered, too late (a server that
        /// times out the call itself answers as its deadline passes).
        last: Option<Box<BalanceError<tonic::transport::Error>>>,
    },
}

impl GrpcError {
    /// The error of a call that no instance could take, for `cause`.
    pub fn unavailable(cause: BalanceError<tonic::transport::Error>) -> GrpcError {
        GrpcError::Unavailable {
            status: tonic::Status::unavailable(error_chain(&cause)),
            cause: Box::new(cause),
        }
    }

    /// The error of a call whose deadline passed, `last` being how its last attempt ended.
    pub fn deadline_exceeded(last: BalanceError<tonic::transport::Error>) -> GrpcError {
        GrpcError::DeadlineExceeded {
            status: tonic::Status::deadline_exceeded(format!(
                "deadline exceeded: {}",
                error_chain(&last)
            )),
            last: Some(Box::new(last)),
        }
    }

    /// The error of a call answered after its deadline, `answer` being the answer's head.
    fn answered_too_late(answer: &http::Response<Body>) -> GrpcError {
        let said = match answer.headers().get("grpc-status") {
            Some(code) => format!(" (grpc-status {})", code.to_str().unwrap_or("?")),
            None => String::new(),
        };
        GrpcError::DeadlineExceeded {
            status: tonic::Status::deadline_exceeded(format!(
                "deadline exceeded: the instance answered after it{said}"
            )),
            last: None,
        }
    }
}

/// The request of a call, as tonic's generated clients send it.
type Request = http::Request<Body>;

/// A request body that was complete when the call started, kept for another attempt.
#[derive(Clone)]
struct Buffered(Bytes);

/// When the call must be answered by, from its `grpc-timeout` when it started.
#[derive(Clone, Copy)]
struct Deadline(Instant);

/// Routes a call: the value of one metadata key hashed, and the caller's zone.
struct Routing {
    /// The metadata key whose value is hashed.
    key: Option<http::HeaderName>,
    /// The caller's zone, for every call.
    zone: Option<String>,
}

impl Route<Request> for Routing {
    fn route<'r>(&'r self, request: &'r Request) -> PickContext<'r> {
        let ctx = match self.key.as_ref().and_then(|k| request.headers().get(k)) {
            Some(value) => PickContext::new().with_key(value.as_bytes()),
            None => PickContext::new(),
        };
        match &self.zone {
            Some(zone) => ctx.with_zone(zone),
            None => ctx,
        }
    }
}

/// [`GrpcStatus`], and transport errors that prove the call never left (a refused or timed-out
/// connection) as retryable for every method. A response classified a success keeps its call
/// in flight until its body ends ([`Streamed`]).
struct Classifier {
    /// [`GrpcChannelBuilder::stalled_after`].
    stalled_after: Option<Duration>,
}

impl Classify<http::Response<Body>, tonic::transport::Error> for Classifier {
    fn classify(&self, result: Result<&http::Response<Body>, &tonic::transport::Error>) -> Class {
        match result {
            Err(e) if never_connected(e) => Class::failure(Retry::NotSent),
            other => GrpcStatus.classify(other),
        }
    }

    fn finish(&self, response: http::Response<Body>, guard: PickGuard) -> http::Response<Body> {
        response.map(|body| {
            Body::new(Streamed {
                body,
                call: Some(guard),
                stall: self.stalled_after.map(|after| Stall {
                    after,
                    last: Instant::now(),
                }),
            })
        })
    }
}

/// A response body that holds its call until it ends: then the trailers' status is the
/// call's outcome ([`GrpcStatus::of_trailers`]), and a body that breaks (a reset stream, a
/// lost connection) a failure. Dropped before its end, the call is a success: the instance
/// answered (see [`PickGuard::responded`]); with a stall limit, a failure when nothing came
/// from the instance for that long.
struct Streamed {
    body: Body,
    call: Option<PickGuard>,
    stall: Option<Stall>,
}

/// How long an instance may send nothing before a stream dropped meanwhile counts as its
/// failure, and when the last frame was read.
struct Stall {
    after: Duration,
    last: Instant,
}

impl Streamed {
    fn end(&mut self, outcome: Outcome) {
        if let Some(call) = self.call.take() {
            call.record(outcome);
        }
    }
}

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        if let Some(stall) = &mut self.stall {
            stall.last = Instant::now();
        }
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    self.end(GrpcStatus::of_trailers(trailers).outcome);
                }
            }
            Some(Err(_)) => self.end(Outcome::Failure),
            None => self.end(Outcome::Success),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Streamed {
    /// With a stall limit, a stream dropped before its end is looked at once more: a frame
    /// already there means the instance was sending (the caller was the one that waited), its
    /// trailers give the outcome, and nothing there for the limit since the last frame read
    /// means the instance went quiet: a failure. (Frames that arrived unread would be there,
    /// so the time since the last one read is at least how long the instance was quiet.)
    fn drop(&mut self) {
        let Some(stall) = &self.stall else {
            return;
        };
        if self.call.is_none() {
            return;
        }
        let quiet = stall.last.elapsed() >= stall.after;
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match http_body::Body::poll_frame(Pin::new(&mut self.body), &mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    self.end(GrpcStatus::of_trailers(trailers).outcome);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(Outcome::Failure),
            Poll::Ready(None) => {}
            Poll::Pending if quiet => self.end(Outcome::Failure),
            Poll::Pending => {}
        }
        // Otherwise the call's guard, dropped with it, counts the answered call a success.
    }
}

/// Whether `error` is a failure to connect (so nothing was sent), judged by its sources.
fn never_connected(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionRefused | TimedOut | NotFound | AddrNotAvailable
            ) {
                return true;
            }
        }
        if e.to_string().contains("tcp connect error") {
            return true;
        }
        current = e.source();
    }
    false
}

/// `error` and its sources as one line, `: `-separated, each source left out when the line
/// already says it: tonic's transport errors say little on their own ("transport error"), and
/// their sources often repeat each other.
///
/// ```
/// use std::{error::Error, fmt};
///
/// #[derive(Debug)]
/// struct Outer(std::io::Error);
/// impl fmt::Display for Outer {
///     fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
///         f.write_str("transport error")
///     }
/// }
/// impl Error for Outer {
///     fn source(&self) -> Option<&(dyn Error + 'static)> {
///         Some(&self.0)
///     }
/// }
///
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// assert_eq!(
///     waypost::grpc::error_chain(&Outer(refused)),
///     "transport error: connection refused"
/// );
/// ```
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !line.contains(&more) {
            line.push_str(": ");
            line.push_str(&more);
        }
        source = s.source();
    }
    line
}

/// Makes each instance's lazily connecting channel.
struct Maker {
    connect_timeout: Duration,
    keep_alive: Duration,
    https: bool,
    tls: Option<ClientTlsConfig>,
}

/// An address no connection can be made to: the channel of an instance whose own cannot be
/// set up, so that its calls fail as connect errors (and go elsewhere).
const UNCONNECTABLE: &str = "http://127.0.0.1:0";

impl Maker {
    fn channel(&self, instance: &ServiceInstance) -> Channel {
        let https = self.https
            || instance
                .metadata()
                .get(SCHEME_METADATA)
                .is_some_and(|s| s.eq_ignore_ascii_case("https"));
        let scheme = if https { "https" } else { "http" };
        let uri = format!("{scheme}://{}", instance.authority());
        let endpoint = match Endpoint::from_shared(uri.clone()) {
            Ok(e) => e,
            // An instance's host and port always make a valid authority; should one not, the
            // channel to port 0, where no connection can be made, fails its calls as connect
            // errors.
            Err(e) => {
                tracing::warn!(%uri, error = %e, "an instance address that is no URI");
                Endpoint::from_static(UNCONNECTABLE)
            }
        };
        let mut endpoint = endpoint
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(self.keep_alive)
            .keep_alive_timeout(self.keep_alive)
            .keep_alive_while_idle(true);
        if https {
            let tls = self.tls.clone().unwrap_or_default();
            endpoint = match endpoint.tls_config(tls) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(%uri, error = %e, "TLS setup failed; calls to this instance will fail");
                    Endpoint::from_static(UNCONNECTABLE)
                }
            };
        }
        endpoint.connect_lazy()
    }
}

/// Makes an instance's channel.
type MakeChannel = Box<dyn Fn(&ServiceInstance) -> Channel + Send + Sync>;

type Inner = Balanced<MakeChannel, Channel, Request, Classifier, Routing>;

/// A channel for tonic clients that balances every call over a Waypost [`Balancer`]; see the
/// [module docs](self). Cheap to clone; clones share everything.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower::ServiceExt;
/// use waypost::grpc::{GrpcChannel, GrpcError};
/// use waypost::strategies::P2cEwma;
///
/// let balancer = waypost::Balancer::builder(P2cEwma::new())
///     .service("users".parse()?)
///     .build();
/// let channel = GrpcChannel::builder(balancer)
///     .connect_timeout(Duration::from_secs(1))
///     .hash_key("x-user-id")
///     .idempotent("/users.Users/GetUser")
///     .build()?;
/// // A tonic client takes it as its channel: `UsersClient::new(channel.clone())`. With no
/// // instance discovered yet, a call fails at once, saying so.
/// let call = http::Request::new(tonic::body::Body::empty());
/// let err = channel.oneshot(call).await.unwrap_err();
/// assert!(matches!(err, GrpcError::Unavailable { .. }));
/// assert!(err.to_string().contains("no instance of users"));
/// // What a tonic client sees.
/// assert_eq!(tonic::Status::from_error(Box::new(err)).code(), tonic::Code::Unavailable);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct GrpcChannel {
    inner: Inner,
}

impl fmt::Debug for GrpcChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcChannel")
            .field("balanced", &self.inner)
            .finish()
    }
}

/// Options of a [`GrpcChannel`]; see [`GrpcChannel::builder`].
///
/// ```
/// use std::time::Duration;
/// use waypost::grpc::GrpcChannel;
/// use waypost::strategies::RoundRobin;
/// use waypost::Balancer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let channel = GrpcChannel::builder(Balancer::new(RoundRobin::new()))
///     .connect_timeout(Duration::from_millis(500))
///     .hash_key("x-user-id")
///     .idempotent("/users.Users/GetUser")
///     .max_attempts(3)
///     .build();
/// assert!(channel.is_ok());
/// // Retries need at least the first attempt.
/// let none = GrpcChannel::builder(Balancer::new(RoundRobin::new())).max_attempts(0).build();
/// assert!(none.unwrap_err().to_string().contains("max_attempts"));
/// # }
/// ```
#[must_use]
pub struct GrpcChannelBuilder {
    balancer: Balancer,
    connect_timeout: Duration,
    keep_alive: Duration,
    https: bool,
    ca: Vec<Vec<u8>>,
    tls_domain: Option<String>,
    /// The client certificate (chain) and its private key, PEM, for mutual TLS.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The caller's own maker of each instance's channel ([`GrpcChannelBuilder::channel_for`]).
    own_channels: Option<MakeChannel>,
    /// The options given that configure the channels Waypost makes, refused with
    /// `own_channels`.
    channel_options: Vec<&'static str>,
    hash_key: Option<String>,
    zone: Option<String>,
    idempotent: HashSet<String>,
    max_attempts: u32,
    budget: RetryBudget,
    per_try_timeout: Option<Duration>,
    stalled_after: Option<Duration>,
    hedge: Option<Hedge>,
}

impl fmt::Debug for GrpcChannelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcChannelBuilder")
            .field("connect_timeout", &self.connect_timeout)
            .field("https", &self.https)
            .field("ca_certificates", &self.ca.len())
            .field("identity", &self.identity.is_some())
            .field("own_channels", &self.own_channels.is_some())
            .field("hash_key", &self.hash_key)
            .field("zone", &self.zone)
            .field("idempotent", &self.idempotent)
            .field("max_attempts", &self.max_attempts)
            .field("per_try_timeout", &self.per_try_timeout)
            .field("stalled_after", &self.stalled_after)
            .field("hedge", &self.hedge)
            .finish_non_exhaustive()
    }
}

impl GrpcChannel {
    /// A channel over `balancer`, with defaults: 1 s connect timeout, 20 s HTTP/2 keep-alive,
    /// plain HTTP/2 unless an instance says `scheme=https`, 3 attempts, the default budget.
    ///
    /// ```
    /// use waypost::grpc::GrpcChannel;
    /// use waypost::strategies::RoundRobin;
    /// let balancer = waypost::Balancer::new(RoundRobin::new());
    /// let bad = GrpcChannel::builder(balancer).hash_key("not a header name").build();
    /// assert!(bad.unwrap_err().to_string().contains("hash_key"));
    /// ```
    pub fn builder(balancer: Balancer) -> GrpcChannelBuilder {
        GrpcChannelBuilder {
            balancer,
            connect_timeout: Duration::from_secs(1),
            keep_alive: Duration::from_secs(20),
            https: false,
            ca: Vec::new(),
            tls_domain: None,
            identity: None,
            own_channels: None,
            channel_options: Vec::new(),
            hash_key: None,
            zone: None,
            idempotent: HashSet::new(),
            max_attempts: 3,
            budget: RetryBudget::default(),
            per_try_timeout: None,
            stalled_after: None,
            hedge: None,
        }
    }
}

impl GrpcChannelBuilder {
    /// The time limit for connecting to an instance (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self.channel_options.push("connect_timeout");
        self
    }

    /// HTTP/2 keep-alive: a ping this often, and a connection whose ping goes unanswered as
    /// long is closed (default 20 s).
    pub fn keep_alive(mut self, interval: Duration) -> Self {
        self.keep_alive = interval;
        self.channel_options.push("keep_alive");
        self
    }

    /// Use TLS to every instance, not only to those whose metadata says `scheme=https`.
    pub fn https(mut self, on: bool) -> Self {
        self.https = on;
        self.channel_options.push("https");
        self
    }

    /// Trusts `pem` (one or more PEM certificates) for TLS instances, besides nothing else: a
    /// TLS channel without a CA trusts no server.
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca.push(pem.into());
        self.channel_options.push("ca_certificate");
        self
    }

    /// Presents this client certificate (chain) and its private key, both PEM, to TLS
    /// instances that ask for one (mutual TLS). An unusable pair fails
    /// [`build`](Self::build) with [`GrpcError::Config`].
    ///
    /// ```
    /// use waypost::grpc::{GrpcChannel, GrpcError};
    /// use waypost::strategies::RoundRobin;
    /// let balancer = waypost::Balancer::new(RoundRobin::new());
    /// let err = GrpcChannel::builder(balancer)
    ///     .identity("no certificate", "no key")
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(err, GrpcError::Config { .. }));
    /// assert!(err.to_string().contains("identity"), "{err}");
    /// ```
    pub fn identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        self.identity = Some((cert_pem.as_ref().to_vec(), key_pem.as_ref().to_vec()));
        self.channel_options.push("identity");
        self
    }

    /// The name the instances' TLS certificates must carry, when it is not their host.
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        self.tls_domain = Some(name.into());
        self.channel_options.push("tls_domain");
        self
    }

    /// Makes each instance's tonic `Channel` with `make` instead of Waypost's own: for a
    /// connector of your own (a proxy, a Unix socket, another TLS setup), or channel settings
    /// Waypost does not expose. Picking, outcomes, streams and retries stay Waypost's. `make`
    /// is called on the first call an instance gets, from within that call, so it should
    /// return at once with a lazily connecting channel (`Endpoint::connect_lazy`,
    /// `connect_with_connector_lazy`). The options that configure Waypost's own channels
    /// ([`connect_timeout`](Self::connect_timeout), [`keep_alive`](Self::keep_alive),
    /// [`https`](Self::https), [`ca_certificate`](Self::ca_certificate),
    /// [`identity`](Self::identity), [`tls_domain`](Self::tls_domain)) then belong on your
    /// endpoints, and [`build`](Self::build) refuses them here.
    ///
    /// ```
    /// use tonic::transport::Endpoint;
    /// use waypost::grpc::{GrpcChannel, GrpcError};
    /// use waypost::strategies::RoundRobin;
    /// use waypost::{Balancer, ServiceInstance};
    ///
    /// let own = |i: &ServiceInstance| {
    ///     Endpoint::from_shared(format!("http://{}", i.authority()))
    ///         .expect("an instance's address is a URI")
    ///         .initial_stream_window_size(1 << 20)
    ///         .connect_lazy()
    /// };
    /// let balancer = Balancer::new(RoundRobin::new());
    /// assert!(GrpcChannel::builder(balancer.clone()).channel_for(own).build().is_ok());
    ///
    /// let err = GrpcChannel::builder(balancer)
    ///     .channel_for(own)
    ///     .ca_certificate("...")
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(err, GrpcError::Config { .. }));
    /// assert!(err.to_string().contains("set them on your endpoints"), "{err}");
    /// ```
    pub fn channel_for(
        mut self,
        make: impl Fn(&ServiceInstance) -> Channel + Send + Sync + 'static,
    ) -> Self {
        self.own_channels = Some(Box::new(make));
        self
    }

    /// Consistent-hash and Maglev route by the value of this request metadata key (calls
    /// without it pick as unkeyed).
    pub fn hash_key(mut self, key: impl Into<String>) -> Self {
        self.hash_key = Some(key.into());
        self
    }

    /// This client's zone, passed to zone-aware strategies with every call: the resilience
    /// layer's zone preference keeps calls to instances of the same zone while enough of them
    /// are healthy.
    ///
    /// ```
    /// use waypost::grpc::GrpcChannel;
    /// use waypost::strategies::resilience::Resilient;
    /// use waypost::strategies::RoundRobin;
    /// use waypost::Balancer;
    ///
    /// let balancer = Balancer::new(Resilient::new(RoundRobin::new())); // zone preference on
    /// let channel = GrpcChannel::builder(balancer).zone("eu-west-1a").build()?;
    /// assert!(format!("{channel:?}").contains("GrpcChannel"));
    /// # Ok::<(), waypost::grpc::GrpcError>(())
    /// ```
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Marks a method (`/package.Service/Method`) safe to repeat after it was sent: it is
    /// retried on another instance after any retryable failure, not only a connect error.
    pub fn idempotent(mut self, path: impl Into<String>) -> Self {
        self.idempotent.insert(path.into());
        self
    }

    /// Attempts per call, in all (default 3; 1 turns retries off).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The retry budget (default [`RetryBudget::default`]; clones share one).
    pub fn retry_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// The longest one attempt may take before its answer's head (within what is left of the
    /// call's deadline): an attempt still waiting then is ended, as a failure of its instance,
    /// and repeated on another instance for the [idempotent](Self::idempotent) methods while
    /// attempts and the budget allow; otherwise the call fails with DEADLINE_EXCEEDED
    /// ([`GrpcError::DeadlineExceeded`]). Set it below the callers' deadlines, so that an
    /// instance that hangs leaves time to try another one. Off by default. The instance is not
    /// told (its `grpc-timeout` is the call's): its work goes on until the call's deadline.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost::grpc::GrpcChannel;
    /// use waypost::strategies::RoundRobin;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let channel = GrpcChannel::builder(waypost::Balancer::new(RoundRobin::new()))
    ///     .per_try_timeout(Duration::from_millis(300))
    ///     .idempotent("/users.Users/GetUser")
    ///     .build();
    /// assert!(channel.is_ok());
    /// let zero = GrpcChannel::builder(waypost::Balancer::new(RoundRobin::new()))
    ///     .per_try_timeout(Duration::ZERO)
    ///     .build();
    /// assert!(zero.unwrap_err().to_string().contains("per_try_timeout"));
    /// # }
    /// ```
    pub fn per_try_timeout(mut self, timeout: Duration) -> Self {
        self.per_try_timeout = Some(timeout);
        self
    }

    /// Hedges the calls of the [idempotent](Self::idempotent) methods (default: never; see
    /// [`Hedge`]): a call whose instance has not sent its answer's head within the hedge's
    /// delay goes, as a copy, to an instance the call has not tried too, and the first answer
    /// wins; the other attempt is then dropped (hyper resets its HTTP/2 stream), neither a success
    /// nor a failure of its instance. Hedges count as attempts
    /// ([`max_attempts`](Self::max_attempts)) and take from the
    /// [retry budget](Self::retry_budget). Each copy carries the time left of the call's
    /// deadline. A call whose request streams is never hedged: it cannot be copied.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost::grpc::GrpcChannel;
    /// use waypost::retry::Hedge;
    /// use waypost::strategies::RoundRobin;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let channel = GrpcChannel::builder(waypost::Balancer::new(RoundRobin::new()))
    ///     .hedge(Hedge::p95(Duration::from_millis(50)))
    ///     .idempotent("/users.Users/GetUser")
    ///     .build()
    ///     .unwrap();
    /// assert!(format!("{channel:?}").contains("P95"));
    ///
    /// // A hedge is a second attempt: one attempt in all leaves no room for it.
    /// let err = GrpcChannel::builder(waypost::Balancer::new(RoundRobin::new()))
    ///     .hedge(Hedge::after(Duration::from_millis(50)))
    ///     .max_attempts(1)
    ///     .build()
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("max_attempts"), "{err}");
    /// # }
    /// ```
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        self.hedge = Some(hedge);
        self
    }

    /// A streamed answer that the caller drops before its end counts as a failure of the
    /// instance, not a success, when nothing had come from the instance for at least `after`:
    /// the instance stalled, and the caller gave up on it (its own idle timeout, say). A message
    /// that came but was not read yet counts as something that came. Off by default: a
    /// stream that is quiet by design (a watch that sends only changes) would count its every
    /// early drop as a failure with a limit shorter than its quiet spells.
    ///
    /// ```
    /// use std::time::Duration;
    /// use waypost::grpc::GrpcChannel;
    /// use waypost::strategies::RoundRobin;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let channel = GrpcChannel::builder(waypost::Balancer::new(RoundRobin::new()))
    ///     .stalled_after(Duration::from_secs(10))
    ///     .build();
    /// assert!(channel.is_ok());
    /// let zero = GrpcChannel::builder(waypost::Balancer::new(RoundRobin::new()))
    ///     .stalled_after(Duration::ZERO)
    ///     .build();
    /// assert!(zero.unwrap_err().to_string().contains("stalled_after"));
    /// # }
    /// ```
    pub fn stalled_after(mut self, after: Duration) -> Self {
        self.stalled_after = Some(after);
        self
    }

    /// The channel.
    pub fn build(self) -> Result<GrpcChannel, GrpcError> {
        let hash_key =
            match &self.hash_key {
                None => None,
                Some(k) => Some(http::HeaderName::try_from(k.to_ascii_lowercase()).map_err(
                    |e| GrpcError::Config {
                        message: format!("hash_key {k:?} is not a metadata key: {e}"),
                    },
                )?),
            };
        if self.max_attempts == 0 {
            return Err(GrpcError::Config {
                message: "max_attempts is 0: give at least 1 (1 disables retries)".into(),
            });
        }
        if self.hedge.is_some() && self.max_attempts == 1 {
            return Err(GrpcError::Config {
                message: crate::retry::HEDGE_WITH_ONE_ATTEMPT.into(),
            });
        }
        if self.per_try_timeout == Some(Duration::ZERO) {
            return Err(GrpcError::Config {
                message: "per_try_timeout is 0, which would end every attempt at once: give the \
                          longest an instance may take to answer"
                    .into(),
            });
        }
        if self.stalled_after == Some(Duration::ZERO) {
            return Err(GrpcError::Config {
                message: "stalled_after is 0, which would make every early drop a failure: \
                          give the longest quiet spell the instance's streams may have"
                    .into(),
            });
        }
        if self.own_channels.is_some() && !self.channel_options.is_empty() {
            let mut given = self.channel_options.clone();
            given.sort_unstable();
            given.dedup();
            return Err(GrpcError::Config {
                message: format!(
                    "{} configure the channels Waypost makes, and channel_for makes your own: \
                     set them on your endpoints instead",
                    given.join(", ")
                ),
            });
        }
        let configured =
            !self.ca.is_empty() || self.tls_domain.is_some() || self.identity.is_some();
        let tls = configured.then(|| {
            let mut tls =
                ClientTlsConfig::new().ca_certificates(self.ca.iter().map(Certificate::from_pem));
            if let Some(d) = &self.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            tls
        });
        if let Some(tls) = &tls {
            // Parsed here, so that a bad certificate or key is this error and not, later,
            // every call to a TLS instance failing.
            Endpoint::from_static("https://127.0.0.1")
                .tls_config(tls.clone())
                .map_err(|e| GrpcError::Config {
                    message: format!(
                        "the TLS settings (ca_certificate, tls_domain, identity) are unusable: \
                         {}; give PEM certificates and a PEM private key",
                        error_chain(&e)
                    ),
                })?;
        }
        let make: MakeChannel = match self.own_channels {
            Some(own) => own,
            None => {
                let maker = Maker {
                    connect_timeout: self.connect_timeout,
                    keep_alive: self.keep_alive,
                    https: self.https,
                    tls,
                };
                Box::new(move |i: &ServiceInstance| maker.channel(i))
            }
        };
        let idempotent = Arc::new(self.idempotent);
        let inner = Balanced::builder(self.balancer, make)
            .classify(Classifier {
                stalled_after: self.stalled_after,
            })
            .route(Routing {
                key: hash_key,
                zone: self.zone,
            })
            .retries(
                self.max_attempts,
                self.budget,
                copy_request,
                move |r: &Request| idempotent.contains(r.uri().path()),
            )
            .deadline(|r: &Request| r.extensions().get::<Deadline>().map(|d| d.0));
        let inner = match self.per_try_timeout {
            Some(timeout) => inner.per_try_timeout(timeout),
            None => inner,
        };
        let inner = match self.hedge {
            Some(hedge) => inner.hedge(hedge),
            None => inner,
        }
        .build();
        Ok(GrpcChannel { inner })
    }
}

/// A copy of a request whose body was kept ([`Buffered`]); `None` for a streaming one. With
/// a deadline, the copy's `grpc-timeout` is the time left.
fn copy_request(request: &Request) -> Option<Request> {
    let kept = request.extensions().get::<Buffered>()?.clone();
    let mut copy = http::Request::new(Body::new(http_body_util::Full::new(kept.0.clone())));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy.extensions_mut().insert(kept);
    if let Some(deadline) = request.extensions().get::<Deadline>().copied() {
        let left = deadline.0.saturating_duration_since(Instant::now());
        copy.headers_mut()
            .insert(timeout::HEADER, timeout::encode(left));
        copy.extensions_mut().insert(deadline);
    }
    Some(copy)
}

/// Takes the body's frames that are there already; if it ended, the request is repeatable
/// and keeps a copy of its bytes. A body still being produced (a client stream) is passed on
/// as it is, the frames taken put back in front.
fn keep_if_complete(request: Request) -> Request {
    let (parts, mut body) = request.into_parts();
    let mut data: Vec<Bytes> = Vec::new();
    let mut rest: Vec<http_body::Frame<Bytes>> = Vec::new();
    loop {
        match body.frame().now_or_never() {
            // Ended: every frame is here.
            Some(None) => {
                // A unary request is one frame: keep it as it is, without a copy.
                let bytes = if data.len() == 1 {
                    data.swap_remove(0)
                } else {
                    let mut all = bytes::BytesMut::new();
                    for d in &data {
                        all.extend_from_slice(d);
                    }
                    all.freeze()
                };
                let mut request = http::Request::from_parts(
                    parts,
                    Body::new(http_body_util::Full::new(bytes.clone())),
                );
                if rest.is_empty() {
                    request.extensions_mut().insert(Buffered(bytes));
                }
                return request;
            }
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => data.push(d),
                Err(trailers) => rest.push(trailers),
            },
            // An error, or not complete yet: stream it as it comes.
            Some(Some(Err(_))) | None => {
                let taken = data
                    .into_iter()
                    .map(http_body::Frame::data)
                    .chain(rest)
                    .map(Ok::<_, tonic::Status>);
                let head = http_body_util::StreamBody::new(futures::stream::iter(taken));
                let joined = head.chain_body(body);
                return http::Request::from_parts(parts, Body::new(joined));
            }
        }
    }
}

/// `head` then `tail`, as one body.
trait Chain: Sized {
    fn chain_body(self, tail: Body) -> Chained<Self>;
}

impl<B> Chain for B
where
    B: http_body::Body<Data = Bytes, Error = tonic::Status> + Unpin,
{
    fn chain_body(self, tail: Body) -> Chained<Self> {
        Chained {
            head: Some(self),
            tail,
        }
    }
}

struct Chained<B> {
    head: Option<B>,
    tail: Body,
}

impl<B> http_body::Body for Chained<B>
where
    B: http_body::Body<Data = Bytes, Error = tonic::Status> + Unpin,
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if let Some(head) = self.head.as_mut() {
            match Pin::new(head).poll_frame(cx) {
                Poll::Ready(None) => self.head = None,
                other => return other,
            }
        }
        Pin::new(&mut self.tail).poll_frame(cx)
    }
}

type CallFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, GrpcError>> + Send>>;

impl Service<Request> for GrpcChannel {
    type Response = http::Response<Body>;
    type Error = GrpcError;
    type Future = CallFuture;

    /// Always ready: each call picks its instance (see [`Balanced`]).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GrpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> CallFuture {
        let mut inner = self.inner.clone();
        let mut request = keep_if_complete(request);
        let deadline = timeout::of(request.headers()).map(|left| Instant::now() + left);
        if let Some(at) = deadline {
            request.extensions_mut().insert(Deadline(at));
        }
        Box::pin(async move {
            let result = inner.call(request).await;
            outcome(result, deadline.is_some_and(|at| Instant::now() >= at))
        })
    }
}

/// What the caller is told of a call's `result`; `past`: its deadline has passed.
fn outcome(
    result: Result<http::Response<Body>, BalanceError<tonic::transport::Error>>,
    past: bool,
) -> Result<http::Response<Body>, GrpcError> {
    match result {
        // It lost the race with the deadline, as a server's own answer to its expired deadline
        // does (tonic's says CANCELLED): the caller is told DEADLINE_EXCEEDED, as its own timer
        // would have.
        Ok(response) if past => Err(GrpcError::answered_too_late(&response)),
        Ok(response) => Ok(response),
        // However the last attempt ended (the per-instance channel's own time-out, the
        // balancer's deadline), past the deadline it is DEADLINE_EXCEEDED.
        Err(e) if past => Err(GrpcError::deadline_exceeded(e)),
        Err(
            e @ (BalanceError::Inner {
                gave_up: GaveUp::Deadline,
                ..
            }
            | BalanceError::AttemptTimedOut { .. }),
        ) => Err(GrpcError::deadline_exceeded(e)),
        Err(e @ (BalanceError::NoInstance(_) | BalanceError::NotReady { .. })) => {
            Err(GrpcError::unavailable(e))
        }
        Err(e) => Err(e.into()),
    }
}

/// gRPC's `grpc-timeout` header: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
mod timeout {
    use std::time::Duration;

    pub(super) const HEADER: &str = "grpc-timeout";

    /// The timeout a request carries; `None` without one or for a value that is not one (as
    /// tonic's own channel reads it).
    pub(super) fn of(headers: &http::HeaderMap) -> Option<Duration> {
        let value = headers.get(HEADER)?.to_str().ok()?;
        let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
        if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        Some(match unit {
            "H" => Duration::from_secs(n * 3600),
            "M" => Duration::from_secs(n * 60),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        })
    }

    /// `left` as a header value: the finest unit whose count fits in 8 digits, rounded down,
    /// so that the server never thinks it has more time than the call.
    pub(super) fn encode(left: Duration) -> http::HeaderValue {
        const MAX: u128 = 99_999_999;
        let nanos = left.as_nanos();
        let (n, unit) = [
            (1, 'n'),
            (1_000, 'u'),
            (1_000_000, 'm'),
            (1_000_000_000, 'S'),
            (60_000_000_000, 'M'),
            (3_600_000_000_000, 'H'),
        ]
        .into_iter()
        .map(|(per, unit)| (nanos / per, unit))
        .find(|(n, _)| *n <= MAX)
        .unwrap_or((MAX, 'H'));
        http::HeaderValue::from_str(&format!("{n}{unit}"))
            .unwrap_or_else(|_| http::HeaderValue::from_static("99999999H"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values_read_and_write_as_the_spec_says() {
        let read = |v: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(timeout::HEADER, http::HeaderValue::from_static(v));
            timeout::of(&h)
        };
        assert_eq!(read("300m"), Some(Duration::from_millis(300)));
        assert_eq!(read("2S"), Some(Duration::from_secs(2)));
        assert_eq!(read("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(read("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S", "10"] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        assert_eq!(timeout::of(&http::HeaderMap::new()), None);

        let write = |d: Duration| timeout::encode(d).to_str().unwrap().to_owned();
        assert_eq!(write(Duration::from_nanos(5)), "5n");
        assert_eq!(write(Duration::from_millis(300)), "300000u");
        assert_eq!(write(Duration::from_secs(30)), "30000000u");
        assert_eq!(write(Duration::from_secs(200_000)), "200000S");
        assert_eq!(write(Duration::ZERO), "0n");
        // Rounded down, never up; and what is written reads back.
        let odd = Duration::new(123, 456_789_012);
        assert_eq!(write(odd), "123456m");
        let mut h = http::HeaderMap::new();
        h.insert(timeout::HEADER, timeout::encode(odd));
        assert!(timeout::of(&h).unwrap() <= odd);
    }

    #[test]
    fn a_complete_body_is_kept_and_copied_and_a_stream_is_not() {
        let req = http::Request::builder()
            .uri("http://x/users.Users/GetUser")
            .header("x-user-id", "7")
            .body(Body::new(http_body_util::Full::new(Bytes::from_static(
                b"abc",
            ))))
            .unwrap();
        let kept = keep_if_complete(req);
        let copy = copy_request(&kept).expect("a complete body is repeatable");
        assert_eq!(copy.uri().path(), "/users.Users/GetUser");
        assert_eq!(copy.headers()["x-user-id"], "7");
        let body = futures::executor::block_on(copy.into_body().collect())
            .unwrap()
            .to_bytes();
        assert_eq!(body, Bytes::from_static(b"abc"));

        // A body that is still being produced stays a stream, and cannot be repeated.
        let (tx, rx) =
            futures::channel::mpsc::unbounded::<Result<http_body::Frame<Bytes>, tonic::Status>>();
        tx.unbounded_send(Ok(http_body::Frame::data(Bytes::from_static(b"first"))))
            .unwrap();
        let req = http::Request::new(Body::new(http_body_util::StreamBody::new(rx)));
        let streaming = keep_if_complete(req);
        assert!(copy_request(&streaming).is_none());
        tx.unbounded_send(Ok(http_body::Frame::data(Bytes::from_static(b"second"))))
            .unwrap();
        drop(tx);
        let body = futures::executor::block_on(streaming.into_body().collect())
            .unwrap()
            .to_bytes();
        assert_eq!(
            body,
            Bytes::from_static(b"firstsecond"),
            "nothing lost or reordered"
        );
    }

    #[test]
    fn a_copy_for_a_retry_carries_the_time_left_of_the_deadline() {
        let mut req = http::Request::builder()
            .uri("http://x/users.Users/GetUser")
            .header(timeout::HEADER, "60S")
            .body(Body::new(http_body_util::Full::new(Bytes::from_static(
                b"abc",
            ))))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        req.extensions_mut().insert(Deadline(deadline));
        let kept = keep_if_complete(req);
        std::thread::sleep(Duration::from_millis(20));
        let copy = copy_request(&kept).unwrap();
        let left = timeout::of(copy.headers()).unwrap();
        assert!(
            left < Duration::from_secs(60) && left > Duration::ZERO,
            "{left:?}"
        );
        assert!(
            copy.extensions().get::<Deadline>().is_some(),
            "and so does its copy"
        );
        // Without a deadline the header is left alone.
        let plain = keep_if_complete(
            http::Request::builder()
                .header(timeout::HEADER, "300m")
                .body(Body::new(http_body_util::Full::new(Bytes::new())))
                .unwrap(),
        );
        let copy = copy_request(&plain).unwrap();
        assert_eq!(copy.headers()[timeout::HEADER], "300m");
    }

    #[tokio::test]
    async fn the_fallback_address_takes_no_connection() {
        let channel = Endpoint::from_static(UNCONNECTABLE)
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await;
        let err = channel.unwrap_err();
        assert!(never_connected(&err), "{}", error_chain(&err));
    }

    #[test]
    fn an_answer_after_the_deadline_is_deadline_exceeded() {
        let answer = || {
            let mut r = http::Response::new(Body::empty());
            r.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("1"));
            Ok(r)
        };
        // In time, the answer is the instance's own, CANCELLED here.
        assert!(outcome(answer(), false).is_ok());
        let late = outcome(answer(), true).unwrap_err();
        let status = tonic::Status::from_error(Box::new(late));
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("grpc-status 1"), "{status}");
        // An error is told as the deadline too, once it has passed.
        let busy = BalanceError::NotReady {
            instance: "a".parse().unwrap(),
            waited: Duration::from_secs(1),
            tried: 0,
        };
        let late = tonic::Status::from_error(Box::new(outcome(Err(busy), true).unwrap_err()));
        assert_eq!(late.code(), tonic::Code::DeadlineExceeded);
    }

    #[test]
    fn a_refused_connection_is_a_call_that_never_left() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(never_connected(&refused));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!never_connected(&reset));
    }
}
