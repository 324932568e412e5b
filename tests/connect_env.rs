//! The backends' environment variables beneath `waypost::connect`'s URLs, against real
//! servers: `consul://` and `etcd://` alone follow them, and what a URL says wins over them.
//!
//! One test in its own binary: it sets process-wide variables.
#![cfg(all(feature = "consul", feature = "etcd"))]

use waypost::{ConnectError, Discovery, Error, Registration, Registry, ServiceName};
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::etcd_server::EtcdServer;

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn consul_and_etcd_variables_apply_beneath_the_url() {
    let consul = ConsulServer::start_with_acl().await;
    let etcd = EtcdServer::start().await;
    let dir = std::env::temp_dir().join(format!("waypost-connect-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, consul.acl_token().unwrap()).unwrap();
    let users: ServiceName = "env-users".parse().unwrap();

    // CONSUL_HTTP_ADDR names the agent; CONSUL_HTTP_TOKEN_FILE wins over a wrong
    // CONSUL_HTTP_TOKEN, as in Consul's own client.
    std::env::set_var("CONSUL_HTTP_ADDR", consul.addr());
    std::env::set_var("CONSUL_HTTP_TOKEN", "not-the-token");
    std::env::set_var("CONSUL_HTTP_TOKEN_FILE", &token_file);
    let backend = waypost::connect("consul://").await.unwrap();
    let reg = Registration::builder(&users, "env-1")
        .port(9100)
        .build()
        .unwrap();
    let handle = backend.register(reg).await.unwrap();
    assert_eq!(backend.instances(&users).await.unwrap().len(), 1);
    handle.shutdown().await.unwrap();

    // Without the file the wrong token is sent: the agent refuses it.
    std::env::remove_var("CONSUL_HTTP_TOKEN_FILE");
    let refused = waypost::connect("consul://").await.unwrap();
    let err = refused.instances(&users).await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err}");

    // The URL's address and token file win over the variables.
    std::env::set_var("CONSUL_HTTP_ADDR", format!("127.0.0.1:{}", closed_port()));
    let url = waypost::BackendConfig::Consul(
        waypost::ConsulConfig::new()
            .address(consul.addr())
            .token_file(&token_file),
    )
    .to_string();
    let backend = waypost::connect(&url).await.unwrap();
    assert!(backend.instances(&users).await.unwrap().is_empty());
    std::env::remove_var("CONSUL_HTTP_ADDR");
    std::env::remove_var("CONSUL_HTTP_TOKEN");

    // ETCD_ENDPOINTS names the cluster for `etcd://`; hosts in the URL win over it.
    std::env::set_var("ETCD_ENDPOINTS", etcd.endpoint());
    let backend = waypost::connect("etcd://").await.unwrap();
    let reg = Registration::builder(&users, "env-2")
        .port(9101)
        .build()
        .unwrap();
    let handle = backend.register(reg).await.unwrap();
    assert_eq!(backend.instances(&users).await.unwrap().len(), 1);
    handle.shutdown().await.unwrap();
    let url = format!(
        "etcd://127.0.0.1:{}?connect_timeout=300ms&request_timeout=500ms",
        closed_port()
    );
    let err = waypost::connect(&url).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::Backend(Error::Unavailable { .. })),
        "{err}"
    );
    std::env::remove_var("ETCD_ENDPOINTS");
    std::fs::remove_dir_all(&dir).unwrap();
}
