//! `waypost::connect(url)` against real servers: each scheme reaches its backend, and each URL
//! parameter that changes what the backend does is seen to change it.
#![cfg(all(
    feature = "memory",
    feature = "consul",
    feature = "etcd",
    feature = "http"
))]

use std::time::Duration;

use waypost::etcd::etcd_client;
use waypost::strategies::RoundRobin;
use waypost::{
    Backend, BackendConfig, Balancer, ConnectError, Discovery, Error, Health, Registration,
    Registry, ServiceName,
};
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::etcd_server::EtcdServer;
use waypost_conformance::scenarios::eventually;

const BOUND: Duration = Duration::from_secs(20);

fn name(s: &str) -> ServiceName {
    s.parse().unwrap()
}

/// Registers `id` of `service` at 127.0.0.1:`port` and waits until `backend` lists it.
async fn register_and_find(
    backend: &Backend,
    service: &str,
    id: &str,
    port: u16,
) -> waypost::RegistrationHandle {
    let reg = Registration::builder(service, id)
        .host("127.0.0.1")
        .port(port)
        .build()
        .unwrap();
    let handle = backend.register(reg).await.unwrap();
    let svc = name(service);
    eventually(BOUND, "listed", || async {
        match backend.instances(&svc).await {
            Ok(v) if v.iter().any(|i| i.id().as_str() == id) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    handle
}

/// A port where nothing listens (it was free a moment ago).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn memory_urls_make_a_registry_that_a_balancer_follows() {
    let backend = waypost::connect("memory://").await.unwrap();
    assert_eq!(backend.name(), "memory");
    let handle = register_and_find(&backend, "mem-users", "m1", 8080).await;
    let balancer = Balancer::watch(&backend, &name("mem-users"), RoundRobin::new());
    balancer.ready_within(BOUND).await.unwrap();
    assert_eq!(balancer.pick().unwrap().instance().id().as_str(), "m1");
    // A second connect is a second registry: it does not see the first one's instance.
    let other = waypost::connect("memory://").await.unwrap();
    assert!(other
        .instances(&name("mem-users"))
        .await
        .unwrap()
        .is_empty());
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_consul_url_registers_and_discovers_through_a_real_agent() {
    let consul = ConsulServer::start().await;
    let url = format!("consul://{}?dc=dc1", consul.addr());
    let backend = waypost::connect(&url).await.unwrap();
    assert_eq!(backend.name(), "consul");
    assert!(backend.as_consul().is_some());
    let handle = register_and_find(&backend, "c-users", "c1", 9001).await;

    // The registry and discovery handed out are the same agent's.
    let listed = backend
        .discovery()
        .instances(&name("c-users"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].authority(), "127.0.0.1:9001");
    let balancer = Balancer::watch(&backend, &name("c-users"), RoundRobin::new());
    balancer.ready_within(BOUND).await.unwrap();

    // `dc` is applied: a datacenter the agent does not know fails the query.
    let elsewhere = waypost::connect(&format!("consul://{}?dc=nowhere", consul.addr()))
        .await
        .unwrap();
    let err = elsewhere.instances(&name("c-users")).await.unwrap_err();
    assert!(err.to_string().contains("No path to datacenter"), "{err}");
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn passing_false_lists_the_critical_instances_with_their_health() {
    let consul = ConsulServer::start().await;
    // A TTL check registered without a status starts critical (registered by hand: Waypost
    // registers its own TTL checks passing).
    let body = serde_json::json!({
        "ID": "crit-1", "Name": "c-health", "Address": "127.0.0.1", "Port": 9002,
        "Check": { "CheckID": "crit-1-ttl", "TTL": "60s" }
    });
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/agent/service/register", consul.http_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{resp:?}");

    let passing = waypost::connect(&format!("consul://{}", consul.addr()))
        .await
        .unwrap();
    let all = waypost::connect(&format!("consul://{}?passing=false", consul.addr()))
        .await
        .unwrap();
    let svc = name("c-health");
    eventually(BOUND, "the critical instance listed", || async {
        match all.instances(&svc).await {
            Ok(v) if v.len() == 1 && v[0].health() == Health::Critical => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(passing.instances(&svc).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_token_file_in_the_url_is_sent_and_without_it_the_agent_refuses() {
    let consul = ConsulServer::start_with_acl().await;
    let token = consul.acl_token().unwrap().to_owned();
    let dir = std::env::temp_dir().join(format!("waypost-connect-acl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("consul token");
    std::fs::write(&file, format!("{token}\n")).unwrap();

    let config = BackendConfig::Consul(
        waypost::ConsulConfig::new()
            .address(consul.addr())
            .token_file(&file),
    );
    let url = config.to_string();
    assert!(
        url.contains("token_file=") && url.contains("%20token"),
        "{url}"
    );
    let backend = waypost::connect(&url).await.unwrap();
    let handle = register_and_find(&backend, "acl-users", "a1", 9003).await;

    // Without the token: reads are filtered to nothing, writes refused.
    let anonymous = waypost::connect(&format!("consul://{}", consul.addr()))
        .await
        .unwrap();
    assert!(anonymous
        .instances(&name("acl-users"))
        .await
        .unwrap()
        .is_empty());
    let reg = Registration::builder("acl-users", "a2")
        .port(9003)
        .build()
        .unwrap();
    let err = anonymous.register(reg).await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err}");
    handle.shutdown().await.unwrap();

    // A token file that is gone fails the connect, naming the file.
    std::fs::remove_dir_all(&dir).unwrap();
    let err = waypost::connect(&url).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::Backend(Error::Config { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("consul token"), "{err}");
}

#[tokio::test]
async fn an_etcd_url_registers_under_its_prefix_in_a_real_cluster() {
    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let hostport = endpoint.trim_start_matches("http://");
    // The same member twice: a list of hosts, as a cluster's URL has.
    let url = format!("etcd://{hostport},{hostport}/connect-test/services?lease_ttl=3s");
    let backend = waypost::connect(&url).await.unwrap();
    assert_eq!(backend.name(), "etcd");
    let client = backend.as_etcd().unwrap();
    assert_eq!(client.prefix(), "/connect-test/services");
    let handle = register_and_find(&backend, "e-users", "e1", 9004).await;

    // The key is where the URL's path says, on a lease of the URL's TTL.
    let mut raw = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .unwrap();
    let got = raw
        .get("/connect-test/services/e-users/e1", None)
        .await
        .unwrap();
    let kv = got.kvs().first().expect("the key under the URL's prefix");
    let ttl = raw.lease_time_to_live(kv.lease(), None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 3);

    // Another prefix is another system: it sees nothing.
    let other = waypost::connect(&format!("etcd://{hostport}/other"))
        .await
        .unwrap();
    assert!(other.instances(&name("e-users")).await.unwrap().is_empty());
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_etcd_fails_the_connect_and_a_bad_url_fails_before_it() {
    let url = format!(
        "etcd://127.0.0.1:{}?connect_timeout=300ms&request_timeout=500ms",
        closed_port()
    );
    let err = waypost::connect(&url).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::Backend(Error::Unavailable { .. })),
        "{err}"
    );
    let err = waypost::connect("etcd://127.0.0.1:2379?lease=5s")
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Config(_)), "{err}");
    assert!(err.to_string().contains("lease_ttl"), "{err}");
}
