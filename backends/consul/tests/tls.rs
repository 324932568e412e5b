//! HTTPS to the agent: a custom CA (`CONSUL_CACERT`) and a client certificate
//! (`CONSUL_CLIENT_CERT` / `CONSUL_CLIENT_KEY`), against a small TLS fake agent.
//!
//! The certificates in `tests/tls/` are test fixtures (a throw-away CA, a server certificate for
//! 127.0.0.1 and a client certificate), valid until 2126.

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use waypost_consul::Consul;
use waypost_core::{Discovery, Error, ServiceName};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

fn certs(name: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(fixture(name))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// An HTTPS fake agent on 127.0.0.1 answering every request with an empty health list;
/// `require_client_cert` makes it demand a certificate signed by the test CA.
async fn tls_agent(require_client_cert: bool) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = RootCertStore::empty();
        for c in certs("ca.pem") {
            roots.add(c).unwrap();
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let key = PrivateKeyDer::from_pem_file(fixture("server-key.pem")).unwrap();
    let config = builder.with_single_cert(certs("server.pem"), key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    format!("https://{addr}")
}

fn users() -> ServiceName {
    ServiceName::new("users").unwrap()
}

#[tokio::test]
async fn custom_ca_is_trusted_and_required() {
    let url = tls_agent(false).await;
    let trusting = Consul::builder()
        .address(&url)
        .ca_cert(fixture("ca.pem"))
        .build()
        .unwrap();
    assert!(trusting.instances(&users()).await.unwrap().is_empty());

    // Without the CA the server's certificate is not trusted: the agent is unreachable.
    let plain = Consul::builder().address(&url).build().unwrap();
    let err = plain.instances(&users()).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
}

#[tokio::test]
async fn client_certificate_is_presented() {
    let url = tls_agent(true).await;
    let with_cert = Consul::builder()
        .address(&url)
        .ca_cert(fixture("ca.pem"))
        .client_cert(fixture("client.pem"), fixture("client-key.pem"))
        .build()
        .unwrap();
    assert!(with_cert.instances(&users()).await.unwrap().is_empty());

    let without = Consul::builder()
        .address(&url)
        .ca_cert(fixture("ca.pem"))
        .build()
        .unwrap();
    assert!(without.instances(&users()).await.is_err());
}
