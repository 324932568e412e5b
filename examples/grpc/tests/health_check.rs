//! `HealthCheck::grpc` against a real Consul agent: the agent calls the tonic server's
//! `grpc.health.v1.Health/Check`, and the instance is listed while the answer is SERVING.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use waypost::consul::Consul;
use waypost::{Discovery, HealthCheck, Registration, RegistrationHandle, Registry, ServiceName};
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::scenarios::eventually;
use waypost_grpc_examples::{serve, UsersServer};

const SERVICE: &str = "grpc-health";

async fn register(
    consul: &Consul,
    id: &str,
    addr: SocketAddr,
    target: String,
) -> RegistrationHandle {
    let registration = Registration::builder(SERVICE, id)
        .host("127.0.0.1")
        .port(addr.port())
        .check(HealthCheck::grpc(target, Duration::from_secs(1)))
        .build()
        .unwrap();
    consul.register(registration).await.unwrap()
}

/// Waits until the passing instances are exactly `want`.
async fn listed(consul: &Consul, want: &[&str]) {
    let name: ServiceName = SERVICE.parse().unwrap();
    eventually(Duration::from_secs(20), "the passing instances", || async {
        let ids: Vec<String> = consul
            .instances(&name)
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(|i| i.id().to_string())
            .collect();
        if ids == want {
            Ok(())
        } else {
            Err(format!("{ids:?}, not {want:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_check_lists_the_instance_while_its_health_service_says_serving() {
    let agent = ConsulServer::start().await;
    let consul = Consul::builder().address(agent.addr()).build().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = UsersServer::new("health", None, false).unwrap();
    let control = server.control();
    let serving = serve(listener, server, None).await.unwrap();
    let addr = serving.addr();

    // The server as a whole, its one service, and a service it does not have (NOT_FOUND:
    // never passing).
    let _whole = register(&consul, "whole", addr, addr.to_string()).await;
    let _users = register(&consul, "users", addr, format!("{addr}/users.Users")).await;
    let _unknown = register(&consul, "unknown", addr, format!("{addr}/no.Such")).await;
    listed(&consul, &["users", "whole"]).await;

    // NOT_SERVING: the agent marks both critical, and passing-only discovery drops them.
    control.set_unavailable(true);
    listed(&consul, &[]).await;
    control.set_unavailable(false);
    listed(&consul, &["users", "whole"]).await;
    serving.stop().await.unwrap();
}
