//! `GrpcChannel`'s retries on another instance: after a connect error for any method (the call
//! never left), and after UNAVAILABLE only for the methods marked idempotent.

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
