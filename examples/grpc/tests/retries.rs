//! `GrpcChannel`'s retries on another instance: after a connect error for any method (the call
//! never left), and after UNAVAILABLE only for the methods marked idempotent; within the
//! call's deadline; and the codes a tonic client sees when no attempt can succeed.

use std::time::Duration;

use tokio::net::TcpListener;
use waypost::grpc::GrpcChannel;
use waypost::strategies::RoundRobin;
use waypost::{Balancer, ServiceInstance, WatchEvent};
use waypost_grpc_examples::users::users_client::UsersClient;
use waypost_grpc_examples::users::GetUserRequest;
use waypost_grpc_examples::{serve, Serving, UsersServer, GET_USER};

async fn server(id: &str, unavailable: bool) -> Serving {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve(
        listener,
        UsersServer::new(id, None, unavailable).unwrap(),
        None,
    )
    .await
    .unwrap()
}

fn at(id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::builder("retries", id)
        .host("127.0.0.1")
        .port(port)
        .build()
        .unwrap()
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

fn balancer(instances: Vec<ServiceInstance>) -> Balancer {
    let b = Balancer::builder(RoundRobin::new())
        .service("retries".parse().unwrap())
        .build();
    b.apply(WatchEvent::Snapshot(instances));
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_error_is_retried_on_another_instance_for_any_method() {
    let live = server("live", false).await;
    let b = balancer(vec![
        at("a-dead", closed_port().await),
        at("b-live", live.addr().port()),
    ]);
    // GetUser is not marked idempotent: only the connect error makes it safe to repeat.
    let channel = GrpcChannel::builder(b.clone())
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let mut client = UsersClient::new(channel);
    for id in 1..=10 {
        let r = client.get_user(GetUserRequest { id }).await;
        assert_eq!(
            r.map(|r| r.into_inner().instance).ok().as_deref(),
            Some("live")
        );
    }
    let dead = b
        .endpoints()
        .into_iter()
        .find(|e| e.id().as_str() == "a-dead")
        .unwrap();
    assert!(
        dead.state().failures() > 0,
        "the refused attempts were recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_is_retried_only_for_idempotent_methods() {
    let (down, up) = (server("down", true).await, server("up", false).await);
    let instances = vec![
        at("a-down", down.addr().port()),
        at("b-up", up.addr().port()),
    ];

    // Not marked: the UNAVAILABLE answer comes back whenever a-down is picked.
    let plain = GrpcChannel::builder(balancer(instances.clone()))
        .build()
        .unwrap();
    let mut client = UsersClient::new(plain);
    let mut unavailable = 0;
    for id in 1..=10 {
        if let Err(status) = client.get_user(GetUserRequest { id }).await {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
            unavailable += 1;
        }
    }
    assert!(
        unavailable >= 4,
        "round-robin sent half to a-down: {unavailable}"
    );

    // Marked idempotent: every call ends on b-up.
    let retrying = GrpcChannel::builder(balancer(instances))
        .idempotent(GET_USER)
        .build()
        .unwrap();
    let mut client = UsersClient::new(retrying);
    for id in 1..=10 {
        let r = client.get_user(GetUserRequest { id }).await.unwrap();
        assert_eq!(r.into_inner().instance, "up");
    }
}

/// The call's deadline (tonic's `Request::set_timeout`, sent as `grpc-timeout`) bounds the
/// whole call, retries included: an attempt that outlives it is not followed by another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_ends_the_call_and_its_retries() {
    let slow = Some(Duration::from_secs(2));
    let servers = [
        UsersServer::new("slow-a", slow, false).unwrap(),
        UsersServer::new("slow-b", slow, false).unwrap(),
        UsersServer::new("slow-c", slow, false).unwrap(),
    ];
    let controls: Vec<_> = servers.iter().map(UsersServer::control).collect();
    let mut serving = Vec::new();
    let mut instances = Vec::new();
    for (i, s) in servers.into_iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        serving.push(serve(listener, s, None).await.unwrap());
        instances.push(at(&format!("slow-{i}"), port));
    }
    let channel = GrpcChannel::builder(balancer(instances))
        .idempotent(GET_USER)
        .max_attempts(3)
        .build()
        .unwrap();
    let mut client = UsersClient::new(channel);
    let mut request = tonic::Request::new(GetUserRequest { id: 1 });
    request.set_timeout(Duration::from_millis(300));
    let status = client.get_user(request).await.unwrap_err();
    // Long enough for two more attempts, had they been made.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let calls: u64 = controls.iter().map(|c| c.calls()).sum();
    assert_eq!(calls, 1, "one attempt, within the deadline: {status:?}");
    // Whether the channel's timer or the server's own answer to the deadline (tonic's says
    // CANCELLED) comes first, the caller is told DEADLINE_EXCEEDED.
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline"), "{status:?}");

    // Time enough left: a failure is retried on another instance as without a deadline.
    let (down, up) = (server("down", true).await, server("up", false).await);
    let channel = GrpcChannel::builder(balancer(vec![
        at("a-down", down.addr().port()),
        at("b-up", up.addr().port()),
    ]))
    .idempotent(GET_USER)
    .build()
    .unwrap();
    let mut client = UsersClient::new(channel);
    for id in 1..=4 {
        let mut request = tonic::Request::new(GetUserRequest { id });
        request.set_timeout(Duration::from_secs(10));
        let user = client.get_user(request).await.unwrap().into_inner();
        assert_eq!(user.instance, "up");
    }
}

/// With no instance to call (none discovered yet), a tonic client sees UNAVAILABLE, saying
/// why, as gRPC clients expect of a service they cannot reach now; then the call goes through
/// once one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_is_unavailable_to_a_tonic_client() {
    let b = balancer(vec![]);
    let mut client = UsersClient::new(GrpcChannel::builder(b.clone()).build().unwrap());
    let status = client.get_user(GetUserRequest { id: 1 }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no instance"), "{status:?}");

    let live = server("live", false).await;
    b.apply(WatchEvent::Snapshot(vec![at("live", live.addr().port())]));
    let user = client.get_user(GetUserRequest { id: 1 }).await.unwrap();
    assert_eq!(user.into_inner().instance, "live");
}
