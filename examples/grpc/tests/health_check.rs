//! `HealthCheck::grpc` against a real Consul agent: the agent calls the tonic server's
//! `grpc.health.v1.Health/Check`, and the instance is listed while the answer is SERVING.
//! `HealthCheck::grpc_tls`: the same over TLS, the certificate verified with the CA the agent
//! is configured with, or not verified; and mutual TLS, with the agent's own certificate.

#[path = "../../common/test_ca.rs"]
mod test_ca;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use waypost::consul::Consul;
use waypost::{
    CheckTls, Discovery, HealthCheck, Registration, RegistrationHandle, Registry, ServiceName,
};
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::scenarios::eventually;
use waypost_grpc_examples::{serve, server_tls, Serving, UsersServer};

const SERVICE: &str = "grpc-health";

async fn register(
    consul: &Consul,
    id: &str,
    addr: SocketAddr,
    target: String,
) -> RegistrationHandle {
    register_checked(
        consul,
        id,
        addr,
        HealthCheck::grpc(target, Duration::from_secs(1)),
    )
    .await
}

async fn register_checked(
    consul: &Consul,
    id: &str,
    addr: SocketAddr,
    check: HealthCheck,
) -> RegistrationHandle {
    let registration = Registration::builder(SERVICE, id)
        .host("127.0.0.1")
        .port(addr.port())
        .check(check)
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

/// The name in the TLS servers' certificates. A Consul 1.8 agent with
/// `enable_agent_tls_for_checks` verifies its checks' certificates against its `server_name`
/// (by default its node name), whatever the target's host.
const CHECKED_NAME: &str = "users.waypost.test";

/// The agent configuration that makes checks trust `ca_file` and expect [`CHECKED_NAME`].
fn agent_tls(ca_file: &str) -> String {
    format!(
        r#"ca_file = "{ca_file}" server_name = "{CHECKED_NAME}" enable_agent_tls_for_checks = true"#
    )
}

/// A users server on loopback that serves only TLS, with a certificate for [`CHECKED_NAME`]
/// and 127.0.0.1 (what an agent without `enable_agent_tls_for_checks` expects) signed by `ca`;
/// with `clients`, only to clients presenting a certificate that CA signed.
async fn serve_tls(ca: &test_ca::Ca, clients: Option<&test_ca::Ca>) -> Serving {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cert = ca.server_for(&[CHECKED_NAME, "127.0.0.1"]);
    let mut tls = server_tls(&cert.cert, &cert.key);
    if let Some(clients) = clients {
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(clients.pem()));
    }
    let server = UsersServer::new("tls", None, false).unwrap();
    serve(listener, server, Some(tls)).await.unwrap()
}

/// What the agent's first run of instance `id`'s check said: its status and output.
async fn check_result(agent: &ConsulServer, id: &str) -> (String, String) {
    let check = agent
        .check_once_run(&format!("service:{id}"), Duration::from_secs(20))
        .await;
    (check.status, check.output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_check_over_tls_verifies_the_certificate_with_the_agents_ca_or_skips_it() {
    let ca = test_ca::Ca::new("health check test CA");
    let files = test_ca::Files::new("grpc-check-tls");
    let ca_file = files.write("ca.pem", &ca.pem());
    // An agent that trusts the test CA for its checks, and one that knows only the system's
    // roots.
    let trusting = ConsulServer::start_with_config(&agent_tls(&ca_file)).await;
    let plain = ConsulServer::start().await;
    let serving = serve_tls(&ca, None).await;
    let addr = serving.addr();
    let every = Duration::from_secs(1);
    let tls = |how| HealthCheck::grpc_tls(addr.to_string(), every, how);

    let consul = Consul::builder().address(trusting.addr()).build().unwrap();
    let _verified = register_checked(&consul, "verified", addr, tls(CheckTls::Verify)).await;
    // Plaintext to a TLS-only server never passes: TLS is really what the first one uses.
    let _plaintext = register(&consul, "plaintext", addr, addr.to_string()).await;
    listed(&consul, &["verified"]).await;
    let (status, output) = check_result(&trusting, "plaintext").await;
    assert_eq!(status, "critical", "{output}");

    // Without the CA, the certificate is refused, unless the check skips verifying it.
    let consul = Consul::builder().address(plain.addr()).build().unwrap();
    let _unknown = register_checked(&consul, "unknown-ca", addr, tls(CheckTls::Verify)).await;
    let _skipped = register_checked(&consul, "skipped", addr, tls(CheckTls::SkipVerify)).await;
    listed(&consul, &["skipped"]).await;
    let (status, output) = check_result(&plain, "unknown-ca").await;
    assert_eq!(status, "critical", "{output}");
    assert!(output.contains("unknown authority"), "{output}");
    serving.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_check_over_mutual_tls_presents_the_agents_own_certificate() {
    let ca = test_ca::Ca::new("health check test CA");
    let clients = test_ca::Ca::new("health check test client CA");
    let files = test_ca::Files::new("grpc-check-mtls");
    let ca_file = files.write("ca.pem", &ca.pem());
    let agent_cert = clients.client("consul-agent.waypost.test");
    let cert_file = files.write("agent.pem", &agent_cert.cert);
    let key_file = files.write("agent-key.pem", &agent_cert.key);
    let with_cert = ConsulServer::start_with_config(&format!(
        r#"{} cert_file = "{cert_file}" key_file = "{key_file}""#,
        agent_tls(&ca_file)
    ))
    .await;
    let without = ConsulServer::start().await;
    let serving = serve_tls(&ca, Some(&clients)).await;
    let addr = serving.addr();
    let every = Duration::from_secs(1);

    let consul = Consul::builder().address(with_cert.addr()).build().unwrap();
    let check = HealthCheck::grpc_tls(addr.to_string(), every, CheckTls::Verify);
    let _mutual = register_checked(&consul, "mutual", addr, check).await;
    listed(&consul, &["mutual"]).await;

    // An agent with no certificate of its own is refused, even when it skips verifying the
    // server's.
    let consul = Consul::builder().address(without.addr()).build().unwrap();
    let check = HealthCheck::grpc_tls(addr.to_string(), every, CheckTls::SkipVerify);
    let _anonymous = register_checked(&consul, "anonymous", addr, check).await;
    let (status, output) = check_result(&without, "anonymous").await;
    assert_eq!(status, "critical", "{output}");
    serving.stop().await.unwrap();
}
