//! What Waypost's gRPC examples share: the `users` protocol (generated from
//! `proto/users.proto`), a [`UsersServer`] implementing it, and [`serve`] to run one on a
//! listener until its [`Serving`] handle is stopped or dropped.
//!
//! ```no_run
//! use std::time::Duration;
//! use waypost_grpc_examples::{serve, UsersServer};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! // Instance "users-a", answering every call after 50 ms.
//! let server = UsersServer::new("users-a", Some(Duration::from_millis(50)), false)?;
//! let control = server.control();
//! let serving = serve(listener, server, None).await?;
//! println!("serving at {}", serving.addr());
//! control.set_unavailable(true); // from now on every call fails with UNAVAILABLE
//! serving.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::errors::InvalidMetadataValue;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};
use waypost::grpc::error_chain;

/// The messages, the client (`users::users_client::UsersClient`) and the server
/// (`users::users_server::{Users, UsersServer}`) generated from `proto/users.proto`.
pub mod users {
    tonic::include_proto!("users");
}

/// The standard health protocol's `Check` (`grpc.health.v1`, from `proto/health.proto`),
/// which [`serve`] serves beside `users`: what a Consul gRPC check
/// (`waypost::HealthCheck::grpc`) calls.
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

use health::health_check_response::ServingStatus;
use health::{HealthCheckRequest, HealthCheckResponse};
use users::{GetUserRequest, ListUsersRequest, ListUsersResponse, User};

/// The response metadata key every reply (and every error status) carries: the id of the
/// instance that served the call.
pub const INSTANCE_METADATA: &str = "x-instance-id";

/// Users 1 to this number exist.
pub const USERS: u32 = 100;

/// The gRPC path of `Users.GetUser` (e.g. for `GrpcChannelBuilder::idempotent`).
pub const GET_USER: &str = "/users.Users/GetUser";
/// The gRPC path of `Users.ListUsers`.
pub const LIST_USERS: &str = "/users.Users/ListUsers";
/// The gRPC path of `Users.WatchUsers` (server streaming).
pub const WATCH_USERS: &str = "/users.Users/WatchUsers";

/// User `id` as served by `instance`.
pub fn user(id: u32, instance: &str) -> User {
    User {
        id,
        name: format!("user-{id}"),
        instance: instance.to_owned(),
    }
}

/// The `Users` service as one instance serves it.
///
/// Every call is counted (see [`Control::calls`]), then waits the artificial delay if there is
/// one, then fails with `UNAVAILABLE` while the instance is switched to unavailable
/// ([`Control::set_unavailable`]), else answers. Replies and error statuses carry the
/// instance id in the `instance` field (replies) and in the metadata [`INSTANCE_METADATA`].
#[derive(Clone, Debug)]
pub struct UsersServer {
    instance: Arc<str>,
    instance_value: AsciiMetadataValue,
    delay: Option<Duration>,
    control: Control,
}

/// Switches and counters of a [`UsersServer`] that stay reachable after it was moved into
/// [`serve`]. Clones share them.
#[derive(Clone, Debug, Default)]
pub struct Control {
    inner: Arc<ControlInner>,
}

#[derive(Debug, Default)]
struct ControlInner {
    unavailable: AtomicBool,
    calls: AtomicU64,
}

impl Control {
    /// While `true`, every call fails with `UNAVAILABLE` (after the delay, if any), and a
    /// stream already under way fails so at its next message.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.inner.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Whether calls fail with `UNAVAILABLE` now.
    pub fn is_unavailable(&self) -> bool {
        self.inner.unavailable.load(Ordering::SeqCst)
    }

    /// Calls received so far (failed ones included; a stream counts once).
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::SeqCst)
    }
}

impl UsersServer {
    /// Instance `instance`; with `delay`, every call waits that long before it answers (and a
    /// stream as long again before each further message); with `unavailable`, calls fail with
    /// `UNAVAILABLE` until [`Control::set_unavailable`]`(false)`.
    ///
    /// The id travels as ASCII metadata, so it must be visible ASCII (no control characters).
    pub fn new(
        instance: impl Into<String>,
        delay: Option<Duration>,
        unavailable: bool,
    ) -> Result<UsersServer, InvalidMetadataValue> {
        let instance: String = instance.into();
        let instance_value = AsciiMetadataValue::try_from(instance.as_str())?;
        let control = Control::default();
        control.set_unavailable(unavailable);
        Ok(UsersServer {
            instance: instance.into(),
            instance_value,
            delay,
            control,
        })
    }

    /// The instance id it answers with.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The artificial per-call delay.
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }

    /// Its switches and counters (shared with every clone).
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// The generated tonic service around it, for a `tonic::transport::Server` of one's own.
    pub fn into_service(self) -> users::users_server::UsersServer<UsersServer> {
        users::users_server::UsersServer::new(self)
    }

    /// What every call does first: count, wait, fail if unavailable.
    async fn begin(&self) -> Result<(), Status> {
        self.control.inner.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        if self.control.is_unavailable() {
            return Err(self.status(
                Code::Unavailable,
                format!("instance {} is unavailable", self.instance),
            ));
        }
        Ok(())
    }

    fn metadata(&self) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(INSTANCE_METADATA, self.instance_value.clone());
        metadata
    }

    fn status(&self, code: Code, message: String) -> Status {
        Status::with_metadata(code, message, self.metadata())
    }

    fn response<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        *response.metadata_mut() = self.metadata();
        response
    }
}

/// The stream `WatchUsers` answers with.
pub type UserStream = Pin<Box<dyn Stream<Item = Result<User, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl users::users_server::Users for UsersServer {
    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        self.begin().await?;
        let id = request.get_ref().id;
        if !(1..=USERS).contains(&id) {
            return Err(self.status(
                Code::NotFound,
                format!("no user {id}: users are 1 to {USERS}"),
            ));
        }
        Ok(self.response(user(id, &self.instance)))
    }

    async fn list_users(
        &self,
        _: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        self.begin().await?;
        Ok(self.response(ListUsersResponse {
            users: (1..=USERS).map(|id| user(id, &self.instance)).collect(),
            instance: self.instance.to_string(),
        }))
    }

    type WatchUsersStream = UserStream;

    async fn watch_users(
        &self,
        _: Request<ListUsersRequest>,
    ) -> Result<Response<UserStream>, Status> {
        self.begin().await?;
        let server = self.clone();
        // The first message is sent at once (`begin` waited already), the others after the
        // delay each. Once the instance is unavailable, the stream fails at its next message
        // (the status goes in the trailers).
        let stream = futures::stream::unfold(1u32, move |id| {
            let server = server.clone();
            async move {
                if id > USERS {
                    return None;
                }
                if let Some(delay) = server.delay.filter(|_| id > 1) {
                    tokio::time::sleep(delay).await;
                }
                if id > 1 && server.control.is_unavailable() {
                    let failed = server.status(
                        Code::Unavailable,
                        format!("instance {} became unavailable", server.instance),
                    );
                    return Some((Err(failed), USERS + 1));
                }
                Some((Ok(user(id, &server.instance)), id + 1))
            }
        });
        Ok(self.response(Box::pin(stream) as UserStream))
    }
}

/// The health of a [`UsersServer`]: SERVING, or NOT_SERVING while it is unavailable
/// ([`Control::set_unavailable`]), for the server as a whole (`""`) and for `users.Users`;
/// any other service is NOT_FOUND, as the health protocol says.
#[tonic::async_trait]
impl health::health_server::Health for UsersServer {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.get_ref().service.as_str();
        if !matches!(service, "" | "users.Users") {
            return Err(Status::not_found(format!(
                "no service {service:?} here: ask about \"\" or \"users.Users\""
            )));
        }
        let status = if self.control.is_unavailable() {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        Ok(Response::new(HealthCheckResponse {
            status: status.into(),
        }))
    }
}

/// The TLS configuration of a server with this certificate (chain) and private key, both PEM.
pub fn server_tls(cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> ServerTlsConfig {
    ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem))
}

/// A running server (see [`serve`]). Dropping it starts a graceful shutdown in the background;
/// [`stop`](Serving::stop) does the same and waits for it.
#[derive(Debug)]
pub struct Serving {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Serving {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections, lets calls in progress finish (streams included), and waits
    /// for that.
    pub async fn stop(mut self) -> io::Result<()> {
        drop(self.stop.take());
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(io::Error::other)?
                .map_err(|e| io::Error::other(error_chain(&e))),
            None => Ok(()),
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        // Dropping the sender is the shutdown signal; the task finishes on its own.
        drop(self.stop.take());
    }
}

/// Serves `server` on `listener` (over TLS when `tls` is given; it must carry an identity, as
/// [`server_tls`] makes) until the returned handle is stopped or dropped, with its [`health`]
/// service beside it.
///
/// A TLS configuration whose certificate or key cannot be read is an
/// [`io::ErrorKind::InvalidInput`] error.
pub async fn serve(
    listener: TcpListener,
    server: UsersServer,
    tls: Option<ServerTlsConfig>,
) -> io::Result<Serving> {
    let addr = listener.local_addr()?;
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad TLS configuration: {}", error_chain(&e)),
            )
        })?;
    }
    let health = health::health_server::HealthServer::new(server.clone());
    let router = builder
        .add_service(server.into_service())
        .add_service(health);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stopped.await;
    }));
    Ok(Serving {
        addr,
        stop: Some(stop),
        task: Some(task),
    })
}

#[cfg(test)]
mod tests {
    use super::users::users_client::UsersClient;
    use super::*;
    use std::time::Instant;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

    async fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").await.unwrap()
    }

    async fn client(addr: SocketAddr) -> UsersClient<Channel> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        UsersClient::new(channel)
    }

    fn instance_of(metadata: &MetadataMap) -> &str {
        metadata
            .get(INSTANCE_METADATA)
            .expect("x-instance-id is set")
            .to_str()
            .unwrap()
    }

    #[tokio::test]
    async fn answers_every_method_and_says_which_instance_served() {
        let serving = serve(
            listener().await,
            UsersServer::new("users-a", None, false).unwrap(),
            None,
        )
        .await
        .unwrap();
        let mut c = client(serving.addr()).await;

        let r = c.get_user(GetUserRequest { id: 7 }).await.unwrap();
        assert_eq!(instance_of(r.metadata()), "users-a");
        assert_eq!(r.into_inner(), user(7, "users-a"));
        assert_eq!(user(7, "users-a").name, "user-7");

        for id in [0, USERS + 1, u32::MAX] {
            let status = c.get_user(GetUserRequest { id }).await.unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{id}: {status:?}");
            assert_eq!(instance_of(status.metadata()), "users-a");
        }
        let last = c.get_user(GetUserRequest { id: USERS }).await.unwrap();
        assert_eq!(last.into_inner().id, USERS);

        let r = c.list_users(ListUsersRequest {}).await.unwrap();
        assert_eq!(instance_of(r.metadata()), "users-a");
        let list = r.into_inner();
        assert_eq!(list.instance, "users-a");
        assert_eq!(list.users.len(), USERS as usize);
        assert_eq!(list.users[41], user(42, "users-a"));

        let r = c.watch_users(ListUsersRequest {}).await.unwrap();
        assert_eq!(instance_of(r.metadata()), "users-a");
        let mut stream = r.into_inner();
        let mut seen = Vec::new();
        while let Some(u) = stream.message().await.unwrap() {
            assert_eq!(u.instance, "users-a");
            seen.push(u.id);
        }
        assert_eq!(seen, (1..=USERS).collect::<Vec<_>>());
        serving.stop().await.unwrap();
    }

    #[tokio::test]
    async fn the_unavailable_switch_and_the_call_count() {
        let server = UsersServer::new("users-dead", None, true).unwrap();
        let control = server.control();
        assert!(control.is_unavailable());
        let serving = serve(listener().await, server, None).await.unwrap();
        let mut c = client(serving.addr()).await;
        for _ in 0..2 {
            let status = c.get_user(GetUserRequest { id: 1 }).await.unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(instance_of(status.metadata()), "users-dead");
        }
        let status = c.watch_users(ListUsersRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let status = c.list_users(ListUsersRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(control.calls(), 4);

        control.set_unavailable(false);
        let r = c.get_user(GetUserRequest { id: 1 }).await.unwrap();
        assert_eq!(r.into_inner().instance, "users-dead");
        assert_eq!(control.calls(), 5);
        serving.stop().await.unwrap();
    }

    #[tokio::test]
    async fn the_delay_holds_every_call_and_every_further_message() {
        let delay = Duration::from_millis(150);
        let server = UsersServer::new("users-slow", Some(delay), false).unwrap();
        assert_eq!(server.delay(), Some(delay));
        assert_eq!(server.instance(), "users-slow");
        let serving = serve(listener().await, server, None).await.unwrap();
        let mut c = client(serving.addr()).await;
        let started = Instant::now();
        c.get_user(GetUserRequest { id: 3 }).await.unwrap();
        assert!(started.elapsed() >= delay, "{:?}", started.elapsed());

        let started = Instant::now();
        let mut stream = c
            .watch_users(ListUsersRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stream.message().await.unwrap().unwrap().id, 1);
        assert_eq!(stream.message().await.unwrap().unwrap().id, 2);
        assert!(started.elapsed() >= delay * 2, "{:?}", started.elapsed());
        drop(stream);

        // A delayed call fails as late as it would have answered.
        let switch = UsersServer::new("users-slow-dead", Some(delay), true).unwrap();
        let serving2 = serve(listener().await, switch, None).await.unwrap();
        let mut c2 = client(serving2.addr()).await;
        let started = Instant::now();
        let status = c2.get_user(GetUserRequest { id: 3 }).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
        serving.stop().await.unwrap();
        serving2.stop().await.unwrap();
    }

    #[tokio::test]
    async fn stopping_or_dropping_the_handle_stops_serving() {
        for stop in [true, false] {
            let serving = serve(
                listener().await,
                UsersServer::new("users-a", None, false).unwrap(),
                None,
            )
            .await
            .unwrap();
            let addr = serving.addr();
            client(addr)
                .await
                .get_user(GetUserRequest { id: 1 })
                .await
                .unwrap();
            if stop {
                serving.stop().await.unwrap();
            } else {
                drop(serving);
            }
            // The listener closes with the server: connecting is refused (polled, since a
            // dropped handle's shutdown finishes in the background).
            let until = Instant::now() + Duration::from_secs(10);
            while tokio::net::TcpStream::connect(addr).await.is_ok() {
                assert!(Instant::now() < until, "still accepting at {addr}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    #[test]
    fn an_instance_id_that_cannot_be_metadata_is_an_error() {
        assert!(UsersServer::new("bad\nid", None, false).is_err());
        assert!(UsersServer::new("good-id.1", None, false).is_ok());
    }

    #[tokio::test]
    async fn serves_tls_to_a_client_that_trusts_the_ca_only() {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
        let serving = serve(
            listener().await,
            UsersServer::new("users-tls", None, false).unwrap(),
            Some(server_tls(&cert_pem, &key_pem)),
        )
        .await
        .unwrap();
        let url = format!("https://{}", serving.addr());
        let tls = |ca: &str| {
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("127.0.0.1")
        };

        let channel = Endpoint::from_shared(url.clone())
            .unwrap()
            .tls_config(tls(&cert_pem))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let r = UsersClient::new(channel)
            .get_user(GetUserRequest { id: 5 })
            .await
            .unwrap();
        assert_eq!(r.into_inner(), user(5, "users-tls"));

        // A CA that did not sign it: the handshake fails.
        let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let untrusted = Endpoint::from_shared(url)
            .unwrap()
            .tls_config(tls(&other.cert.pem()))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await;
        assert!(untrusted.is_err(), "{untrusted:?}");

        // Plaintext gRPC to a TLS port gets no answer.
        let plain = Endpoint::from_shared(format!("http://{}", serving.addr()))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await;
        let outcome = match plain {
            Err(e) => Err(e.to_string()),
            Ok(channel) => UsersClient::new(channel)
                .get_user(GetUserRequest { id: 5 })
                .await
                .map_err(|status| status.to_string()),
        };
        assert!(outcome.is_err(), "{outcome:?}");
        serving.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_bad_tls_identity_is_an_invalid_input_error() {
        let err = serve(
            listener().await,
            UsersServer::new("users-a", None, false).unwrap(),
            Some(server_tls("not a certificate", "not a key")),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains("bad TLS configuration"), "{err}");
    }
}
