//! TLS against a real etcd serving clients over TLS (feature `tls`).
#![cfg(feature = "tls")]

use std::time::Duration;

use waypost_conformance::etcd_server::EtcdServer;
use waypost_core::{Discovery, Error, Registration, Registry, ServiceName};
use waypost_etcd::Etcd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_and_discovers_over_tls_and_refuses_an_untrusted_server() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_pem = cert.cert.pem();
    let server = EtcdServer::start_tls(
        cert_pem.as_bytes(),
        cert.key_pair.serialize_pem().as_bytes(),
    )
    .await;
    let endpoint = server.tls_endpoint().unwrap();

    let etcd = Etcd::builder()
        .endpoints([endpoint.clone()])
        .tls_ca_pem(cert_pem.clone())
        .request_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let h = etcd
        .register(
            Registration::builder("tls", "t-1")
                .host("127.0.0.1")
                .port(1)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let svc: ServiceName = "tls".parse().unwrap();
    assert_eq!(etcd.instances(&svc).await.unwrap().len(), 1);
    h.shutdown().await.unwrap();
    assert!(etcd.instances(&svc).await.unwrap().is_empty());

    // A CA that did not sign the server's certificate: a configuration error, not an outage.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let err = Etcd::builder()
        .endpoints([endpoint])
        .tls_ca_pem(other.cert.pem())
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
}
