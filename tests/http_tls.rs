//! The HTTP client over TLS, against real rustls servers on loopback: instances registered with
//! `scheme=https` (in the memory backend and in a real Consul agent) are reached over HTTPS
//! with the CA that signed their certificates, and refused with a typed error that says what
//! to do without it; mutual TLS with a server that requires a client certificate; and a
//! reqwest client of the caller's own. And the other way round: `HealthCheck::https`, the agent
//! checking an HTTPS server's health with the CA it was configured with, or not verifying it.

#[path = "../examples/common/tls.rs"]
mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::get;
use tokio_rustls::rustls::ServerConfig;
use waypost::http::{reqwest, GaveUp, HttpClient, HttpError};
use waypost::memory::Memory;
use waypost::strategies::RoundRobin;
use waypost::{Balancer, Registration, Registry, ServiceInstance, ServiceName, WatchEvent};

use tls::testing::Ca;

/// A running HTTPS server: `GET /who` answers its name and counts the requests it served.
struct Https {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
}

async fn https_server(name: &'static str, config: Arc<ServerConfig>) -> Https {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let app = axum::Router::new().route(
        "/who",
        get(move |headers: HeaderMap| {
            let count = count.clone();
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                // What a client of the caller's own added, to tell that it was used.
                match headers.get("x-own-client") {
                    Some(v) => format!("{name} for {}", v.to_str().unwrap_or("?")),
                    None => name.to_owned(),
                }
            }
        }),
    );
    let listener = tls::TlsListener::new(listener, config).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Https { addr, served }
}

/// A server certificate for 127.0.0.1 signed by `ca`, served without client authentication.
fn plain_tls(ca: &Ca) -> Arc<ServerConfig> {
    let issued = ca.server("127.0.0.1");
    tls::server_config(issued.cert.as_bytes(), issued.key.as_bytes(), None).unwrap()
}

fn https_instance(id: &str, addr: SocketAddr) -> ServiceInstance {
    ServiceInstance::builder("users", id)
        .host(addr.ip().to_string())
        .port(addr.port())
        .meta(waypost::http::SCHEME_METADATA, "https")
        .build()
        .unwrap()
}

fn balancer_of(instances: Vec<ServiceInstance>) -> Balancer {
    let balancer = Balancer::new(RoundRobin::new());
    balancer.apply(WatchEvent::Snapshot(instances));
    balancer
}

/// The TLS error of a call that should fail for want of trust, with the reason it gives.
fn tls_reason(err: &HttpError) -> &str {
    match err {
        HttpError::Tls { reason, .. } => reason,
        other => panic!("expected a TLS error, got {other}"),
    }
}

/// Sends `GET /who` through a client built from `builder`, trusting `ca`, and through one
/// that does not: the first gets the server's answer, the second a TLS error that names the
/// missing CA, and the server served nothing to it.
async fn trusted_and_untrusted(balancer: Balancer, ca: &Ca, server: &Https, expected: &str) {
    let trusting = HttpClient::builder(balancer.clone())
        .ca_certificate(ca.pem())
        .build()
        .unwrap();
    let response = trusting.get("/who").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), expected);
    assert_eq!(server.served.load(Ordering::SeqCst), 1);

    let untrusting = HttpClient::builder(balancer)
        .max_attempts(2)
        .build()
        .unwrap();
    let err = untrusting.get("/who").send().await.unwrap_err();
    let reason = tls_reason(&err);
    assert!(
        reason.contains("not signed by a CA this client trusts"),
        "{err}"
    );
    assert!(reason.contains("ca_certificate"), "{err}");
    assert!(err.to_string().contains("--ca"), "{err}");
    assert_eq!(err.gave_up(), Some(&GaveUp::AttemptsExhausted), "{err}");
    // The handshake failed, so nothing was served; and the cause is still on the chain.
    assert_eq!(server.served.load(Ordering::SeqCst), 1);
    let source = std::error::Error::source(&err).unwrap();
    assert!(source.to_string().contains("UnknownIssuer"), "{source}");
}

#[tokio::test]
async fn instances_registered_with_scheme_https_in_memory_are_reached_with_their_ca() {
    let ca = Ca::new("waypost test CA");
    let server = https_server("users-tls", plain_tls(&ca)).await;
    let memory = Memory::new();
    let registration = Registration::builder("users", "users-tls")
        .host("127.0.0.1")
        .port(server.addr.port())
        .meta(waypost::SCHEME_METADATA, "https")
        .build()
        .unwrap();
    let handle = memory.register(registration).await.unwrap();
    let service: ServiceName = "users".parse().unwrap();
    let balancer = Balancer::watch(&memory, &service, RoundRobin::new());
    assert!(balancer.wait_ready(Duration::from_secs(5)).await);

    trusted_and_untrusted(balancer.clone(), &ca, &server, "users-tls").await;

    // Trusting only the CA (no web roots) is enough.
    let only_ca = HttpClient::builder(balancer)
        .ca_certificate(ca.pem())
        .tls_built_in_roots(false)
        .build()
        .unwrap();
    let response = only_ca.get("/who").send().await.unwrap();
    assert_eq!(response.instance().id().as_str(), "users-tls");
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn instances_registered_with_scheme_https_in_a_real_consul_are_reached_with_their_ca() {
    let consul_server = waypost_conformance::consul_server::ConsulServer::start().await;
    let consul = waypost::consul::Consul::builder()
        .address(consul_server.addr())
        .build()
        .unwrap();
    let ca = Ca::new("waypost test CA");
    let server = https_server("users-consul-tls", plain_tls(&ca)).await;
    let registration = Registration::builder("users-tls", "users-consul-tls")
        .host("127.0.0.1")
        .port(server.addr.port())
        .meta(waypost::SCHEME_METADATA, "https")
        .build()
        .unwrap();
    let handle = consul.register(registration).await.unwrap();
    let service: ServiceName = "users-tls".parse().unwrap();
    let balancer = Balancer::watch(&consul, &service, RoundRobin::new());
    assert!(balancer.wait_ready(Duration::from_secs(10)).await);
    // Consul keeps the scheme in the service's Meta, and gives it back.
    let listed = balancer.instances();
    assert_eq!(
        listed[0].metadata().get("scheme").map(String::as_str),
        Some("https"),
        "{listed:?}"
    );

    trusted_and_untrusted(balancer, &ca, &server, "users-consul-tls").await;
    handle.shutdown().await.unwrap();
}

/// A real agent checks an HTTPS instance: `HealthCheck::http` verifies the certificate (with
/// the system's roots, or the agent's own CA and `server_name` under
/// `enable_agent_tls_for_checks`), `HealthCheck::https(.., SkipVerify)` does not.
#[tokio::test]
async fn an_https_check_verifies_with_the_agents_ca_or_skips_verifying() {
    use waypost::{CheckTls, HealthCheck};
    use waypost_conformance::consul_server::ConsulServer;

    let ca = Ca::new("https check CA");
    // A Consul 1.8 agent under enable_agent_tls_for_checks expects its server_name; others
    // the URL's host. The certificate has both, so that only the CA tells them apart.
    let name = "users.waypost.test";
    let issued = ca.server_for(&[name, "127.0.0.1"]);
    let config = tls::server_config(issued.cert.as_bytes(), issued.key.as_bytes(), None).unwrap();
    let server = https_server("checked", config).await;
    let files = tls::testing::Files::new("https-check");
    let ca_file = files.write("ca.pem", &ca.pem());
    let trusting = ConsulServer::start_with_config(&format!(
        r#"ca_file = "{ca_file}" server_name = "{name}" enable_agent_tls_for_checks = true"#
    ))
    .await;
    let plain = ConsulServer::start().await;
    let url = format!("https://{}/who", server.addr);
    let every = Duration::from_secs(1);
    let cases = [
        (&trusting, "verified", HealthCheck::http(&url, every), true),
        (&plain, "unknown-ca", HealthCheck::http(&url, every), false),
        (
            &plain,
            "skipped",
            HealthCheck::https(&url, every, CheckTls::SkipVerify),
            true,
        ),
    ];
    let mut handles = Vec::new();
    for (agent, id, check, _) in &cases {
        let consul = waypost::consul::Consul::builder()
            .address(agent.addr())
            .build()
            .unwrap();
        let registration = Registration::builder("users-checked", *id)
            .host("127.0.0.1")
            .port(server.addr.port())
            .check(check.clone())
            .build()
            .unwrap();
        handles.push(consul.register(registration).await.unwrap());
    }
    for (agent, id, _, passes) in &cases {
        let check_id = format!("service:{id}");
        let check = waypost_conformance::scenarios::eventually(
            Duration::from_secs(20),
            format!("{id}: a check that passes: {passes}"),
            || async {
                let check = agent
                    .check_once_run(&check_id, Duration::from_secs(20))
                    .await;
                if check.is_passing() == *passes {
                    Ok(check)
                } else {
                    Err(format!("{check:?}"))
                }
            },
        )
        .await;
        if !passes {
            assert!(
                check.output.contains("unknown authority"),
                "{id}: {check:?}"
            );
        }
    }
    assert!(server.served.load(Ordering::SeqCst) > 0);
    for handle in handles {
        handle.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn mutual_tls_a_server_that_requires_a_client_certificate_gets_one() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let issued = server_ca.server("127.0.0.1");
    let config = tls::server_config(
        issued.cert.as_bytes(),
        issued.key.as_bytes(),
        Some(client_ca.pem().as_bytes()),
    )
    .unwrap();
    let server = https_server("users-mtls", config).await;
    let balancer = balancer_of(vec![https_instance("users-mtls", server.addr)]);

    let client_cert = client_ca.client("client.waypost.test");
    let with_identity = HttpClient::builder(balancer.clone())
        .ca_certificate(server_ca.pem())
        .identity(&client_cert.cert, &client_cert.key)
        .build()
        .unwrap();
    let response = with_identity.get("/who").send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "users-mtls");
    assert_eq!(server.served.load(Ordering::SeqCst), 1);

    // Without a certificate, and with one the server does not trust, the server refuses the
    // client and the error says to present one it trusts.
    let stranger = Ca::new("stranger CA").client("client.waypost.test");
    let without = HttpClient::builder(balancer.clone())
        .ca_certificate(server_ca.pem())
        .max_attempts(1)
        .build()
        .unwrap();
    let untrusted = HttpClient::builder(balancer)
        .ca_certificate(server_ca.pem())
        .identity(&stranger.cert, &stranger.key)
        .max_attempts(1)
        .build()
        .unwrap();
    for client in [&without, &untrusted] {
        let err = client.get("/who").send().await.unwrap_err();
        let reason = tls_reason(&err);
        assert!(reason.contains("client certificate"), "{err}");
        assert!(reason.contains("HttpClientBuilder::identity"), "{err}");
    }
    assert_eq!(server.served.load(Ordering::SeqCst), 1);

    // In TLS 1.3 the server refuses the client after the client's side of the handshake is
    // done and its request is on the way: such a request counts as sent, so a POST is not
    // repeated elsewhere.
    let err = without.post("/who").body("x").send().await.unwrap_err();
    tls_reason(&err);
    assert_eq!(err.gave_up(), Some(&GaveUp::NotIdempotent), "{err}");
}

#[tokio::test]
async fn https_for_all_reaches_instances_registered_without_the_scheme() {
    let ca = Ca::new("waypost test CA");
    let server = https_server("users-bare", plain_tls(&ca)).await;
    let bare = ServiceInstance::builder("users", "users-bare")
        .host("127.0.0.1")
        .port(server.addr.port())
        .build()
        .unwrap();
    let client = HttpClient::builder(balancer_of(vec![bare]))
        .https(true)
        .ca_certificate(ca.pem())
        .build()
        .unwrap();
    let response = client.get("/who").send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "users-bare");
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused_with_what_to_fix() {
    let ca = Ca::new("waypost test CA");
    let issued = ca.server("users.internal.example");
    let config = tls::server_config(issued.cert.as_bytes(), issued.key.as_bytes(), None).unwrap();
    let server = https_server("users-misnamed", config).await;
    let client = HttpClient::builder(balancer_of(vec![https_instance(
        "users-misnamed",
        server.addr,
    )]))
    .ca_certificate(ca.pem())
    .max_attempts(1)
    .build()
    .unwrap();
    let err = client.get("/who").send().await.unwrap_err();
    assert!(
        tls_reason(&err).contains("does not name the address"),
        "{err}"
    );
    assert_eq!(server.served.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_reqwest_client_of_ones_own_sends_the_requests() {
    let ca = Ca::new("waypost test CA");
    let server = https_server("users-own", plain_tls(&ca)).await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-own-client", "caller".parse().unwrap());
    let own = reqwest::Client::builder()
        .default_headers(headers)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let balancer = balancer_of(vec![https_instance("users-own", server.addr)]);
    let client = HttpClient::builder(balancer.clone())
        .reqwest_client(own.clone())
        .build()
        .unwrap();
    let response = client.get("/who").send().await.unwrap();
    assert_eq!(response.instance().id().as_str(), "users-own");
    assert_eq!(response.text().await.unwrap(), "users-own for caller");
    // Outcomes still reach the balancer.
    let state = balancer.endpoints()[0].state().successes();
    assert_eq!(state, 1);

    // Options for the client Waypost would build are refused with one of one's own.
    let err = HttpClient::builder(balancer)
        .reqwest_client(own)
        .connect_timeout(Duration::from_secs(1))
        .identity("c", "k")
        .build()
        .unwrap_err();
    assert!(matches!(err, HttpError::Config { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("connect_timeout, identity configure"),
        "{err}"
    );
}

#[tokio::test]
async fn unusable_tls_material_is_a_configuration_error() {
    let balancer = Balancer::new(RoundRobin::new());
    let err = HttpClient::builder(balancer.clone())
        .ca_certificate("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        .build()
        .unwrap_err();
    assert!(matches!(err, HttpError::Config { .. }), "{err}");
    assert!(
        err.to_string().contains("ca_certificate is not PEM"),
        "{err}"
    );
    let err = HttpClient::builder(balancer.clone())
        .ca_certificate("a file of something else")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");

    let ca = Ca::new("waypost test CA");
    let cert = ca.client("client.waypost.test");
    let err = HttpClient::builder(balancer)
        .identity(&cert.cert, "not a key")
        .build()
        .unwrap_err();
    assert!(matches!(err, HttpError::Config { .. }), "{err}");
    assert!(err.to_string().contains("identity"), "{err}");
}
