//! `CONSUL_TLS_SERVER_NAME` / `tls_server_name`: an agent reached at an address its
//! certificate does not name is verified against the configured server name instead.
//!
//! The fake agent listens on 127.0.0.2 with the fixture certificate of `tests/tls/` (valid for
//! 127.0.0.1 and `localhost` only).

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::{self, ServerConfig};
use waypost_consul::Consul;
use waypost_core::{Discovery, Error, ServiceName};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

/// An HTTPS fake agent on 127.0.0.2 answering every request with an empty health list, and
/// the SNI names it was sent.
async fn agent_on_another_loopback_address(
) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixture("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(fixture("server-key.pem")).unwrap();
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sni_tx, sni_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, sni_tx) = (acceptor.clone(), sni_tx.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Some(name) = tls.get_ref().1.server_name() {
                    let _ = sni_tx.send(name.to_owned());
                }
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (format!("https://{addr}"), sni_rx)
}

#[tokio::test]
async fn the_certificate_is_verified_against_the_server_name_and_sni_carries_it() {
    let (url, mut sni) = agent_on_another_loopback_address().await;
    let users = ServiceName::new("users").unwrap();
    let builder = || Consul::builder().address(&url).ca_cert(fixture("ca.pem"));

    // The certificate does not name 127.0.0.2: refused.
    let by_address = builder().build().unwrap();
    let err = by_address.instances(&users).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");

    // It names `localhost`: accepted, and the connection still went to 127.0.0.2.
    let by_name = builder().tls_server_name("localhost").build().unwrap();
    assert!(by_name.instances(&users).await.unwrap().is_empty());
    assert_eq!(sni.recv().await.as_deref(), Some("localhost"));

    // A name the certificate does not carry is refused too: the name is what is verified.
    let wrong = builder().tls_server_name("consul.example").build().unwrap();
    assert!(wrong.instances(&users).await.is_err());
}
