//! Secrets never reach a log line or a `Debug` output, and the backends' spans carry what an
//! operator needs (service, instance, backend) on registration, heartbeats and watches.
//!
//! One test, so that nothing else in this binary runs while it sets `CONSUL_HTTP_TOKEN`, and so
//! that the global subscriber (TRACE for every target, also the `log` records of reqwest)
//! captures the logs of every task, spawned or not. It starts a Consul agent with ACLs and an
//! etcd with authentication on free ports, uses them with the right and with wrong
//! credentials, restarts each server (so that the error and recovery paths log too), formats
//! every value that holds a secret with `{:?}`, then searches the logs and those strings for
//! every secret.
//!
//! Needs `consul` and `etcd` binaries: `eval "$(scripts/fetch-servers)"`.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::etcd_server::EtcdServer;
use waypost_conformance::scenarios::{eventually, Mirror};
use waypost_consul::Consul;
use waypost_core::{Discovery, Error, HealthCheck, Registration, Registry, ServiceName};
use waypost_etcd::{etcd_client, Etcd};
use waypost_memory::Memory;

/// A Consul ACL token the agent does not know.
const WRONG_TOKEN: &str = "wrong-consul-token-7c1e4b9a-never-logged";
/// The etcd root password.
const PASSWORD: &str = "etcd-root-password-3f9d2a61-never-logged";
/// A wrong one.
const WRONG_PASSWORD: &str = "wrong-etcd-password-b84e07c5-never-logged";

/// A bound for anything that settles in well under a second on an idle machine.
const SETTLE: Duration = Duration::from_secs(20);

/// Everything the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits until a line holds `message` and every one of `context`.
    async fn wait_for(&self, message: &str, context: &[&str]) {
        eventually(
            SETTLE,
            format!("a log line {message:?} in {context:?}"),
            || {
                let found = find_line(&self.text(), message, context).is_some();
                async move {
                    if found {
                        Ok(())
                    } else {
                        Err("not logged yet".to_owned())
                    }
                }
            },
        )
        .await;
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

fn find_line<'a>(logs: &'a str, message: &str, context: &[&str]) -> Option<&'a str> {
    logs.lines()
        .find(|l| l.contains(message) && context.iter().all(|c| l.contains(c)))
}

/// The line holding `message` and all of `context`; panics with the candidates otherwise.
fn line<'a>(logs: &'a str, message: &str, context: &[&str]) -> &'a str {
    find_line(logs, message, context).unwrap_or_else(|| {
        let candidates: Vec<&str> = logs.lines().filter(|l| l.contains(message)).collect();
        panic!(
            "no log line {message:?} within {context:?}; lines with the message: {candidates:#?}"
        )
    })
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../backends/consul/tests/tls")
        .join(name)
}

fn service(name: &str) -> ServiceName {
    name.parse().expect("a valid service name")
}

fn registration(service: &str, id: &str, port: u16) -> Registration {
    Registration::builder(service, id)
        .host("127.0.0.1")
        .port(port)
        .check(HealthCheck::ttl(Duration::from_secs(3)))
        .build()
        .expect("a valid registration")
}

/// Reads the watch until it has yielded an error (the restart) and then said `Synced`.
async fn error_then_in_sync(mirror: &mut Mirror) {
    let until = tokio::time::Instant::now() + SETTLE;
    while mirror.errors() == 0 {
        if mirror.next_until(until).await.is_err() {
            panic!("the watch yielded no error within {SETTLE:?} of a server restart");
        }
    }
    mirror
        .wait_in_sync(SETTLE, "in sync after the restart")
        .await;
}

/// Runs `phase` on a runtime of its own, shut down afterwards: every task it spawned has ended
/// (and logged what it logs) when this returns.
fn run<T>(phase: impl Future<Output = T>) -> T {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let out = rt.block_on(phase);
    rt.shutdown_timeout(Duration::from_secs(10));
    out
}

/// The Consul part: a token from `CONSUL_HTTP_TOKEN` and from the builder, a wrong token, a
/// client certificate and key, an agent restart. Returns the secrets used.
async fn consul(logs: &Captured, shown: &mut Vec<String>) -> Vec<String> {
    let server = ConsulServer::start_with_acl().await;
    let token = server
        .acl_token()
        .expect("an agent started with ACLs has a token")
        .to_owned();
    let mut secrets = vec![token.clone(), WRONG_TOKEN.to_owned()];
    // Every line of the client key's PEM body.
    let key = std::fs::read_to_string(fixture("client-key.pem")).expect("the client key fixture");
    secrets.extend(
        key.lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(str::to_owned),
    );

    // The environment the Consul CLI's way. Nothing else runs in this test binary, and no task
    // of this runtime is running yet.
    std::env::set_var("CONSUL_HTTP_ADDR", server.addr());
    std::env::set_var("CONSUL_HTTP_TOKEN", &token);
    let from_env = Consul::builder()
        .from_env()
        .retry_backoff(Duration::from_millis(50), Duration::from_secs(1));
    shown.push(format!("{from_env:?}"));
    let consul = from_env.build().expect("a client from the environment");
    std::env::remove_var("CONSUL_HTTP_TOKEN");
    std::env::remove_var("CONSUL_HTTP_ADDR");
    shown.push(format!("{consul:?}"));
    let by_builder = Consul::builder()
        .address(server.addr())
        .token(token.as_str());
    shown.push(format!("{by_builder:?}"));
    shown.push(format!("{:?}", by_builder.build().expect("a client")));

    let name = service("secrets-consul");
    let handle = consul
        .register(registration("secrets-consul", "c-1", 9801))
        .await
        .expect("registering with the right token");
    shown.push(format!("{handle:?}"));
    let mut mirror = Mirror::new("consul watch", consul.watch(&name));
    mirror
        .wait_until(SETTLE, "c-1 listed", |s| s.get("c-1").is_some())
        .await;
    // A TTL of 3 s: a heartbeat every second.
    logs.wait_for(
        "consul heartbeat passed",
        &[r#"registration{service=secrets-consul instance=c-1 backend="consul"}:heartbeat{"#],
    )
    .await;

    // A wrong token: every call is refused, and the error paths log.
    let wrong = Consul::builder()
        .address(server.addr())
        .token(WRONG_TOKEN)
        .build()
        .expect("a client with a wrong token");
    shown.push(format!("{wrong:?}"));
    let err = wrong
        .register(registration("secrets-consul", "c-2", 9802))
        .await
        .expect_err("a wrong token cannot register");
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err}");
    shown.extend([format!("{err:?}"), err.to_string()]);
    let err = wrong
        .instances(&name)
        .await
        .expect_err("a wrong token cannot read");
    shown.extend([format!("{err:?}"), err.to_string()]);
    let mut refused = wrong.watch(&name);
    match tokio::time::timeout(SETTLE, refused.next()).await {
        Ok(Some(Err(e))) => shown.extend([format!("{e:?}"), e.to_string()]),
        other => panic!("a watch with a wrong token must yield an error first, got {other:?}"),
    }
    drop(refused);

    // TLS with a client certificate against a plain-HTTP agent: the handshake fails.
    let tls = Consul::builder()
        .address(format!("https://{}", server.addr()))
        .token(token.as_str())
        .ca_cert(fixture("ca.pem"))
        .client_cert(fixture("client.pem"), fixture("client-key.pem"));
    shown.push(format!("{tls:?}"));
    let tls = tls.build().expect("the fixture certificate and key load");
    shown.push(format!("{tls:?}"));
    let err = tls
        .instances(&name)
        .await
        .expect_err("https to a plain-HTTP agent fails");
    shown.extend([format!("{err:?}"), err.to_string()]);

    // An agent restart (a -dev agent forgets everything): the watch fails and recovers, the
    // handle registers again, all with the token on every request.
    server.restart().await;
    logs.wait_for(
        "consul watch recovered",
        &[r#"watch{service=secrets-consul backend="consul"}:resync{attempt="#],
    )
    .await;
    logs.wait_for("registered with consul again", &["instance=c-1"])
        .await;
    error_then_in_sync(&mut mirror).await;
    mirror
        .wait_until(SETTLE, "c-1 listed after the restart", |s| {
            s.get("c-1").is_some()
        })
        .await;
    handle.shutdown().await.expect("deregistering");
    secrets
}

/// The etcd part: authentication with the right and a wrong password, a server restart.
/// Returns the secrets used.
async fn etcd(logs: &Captured, shown: &mut Vec<String>) -> Vec<String> {
    let server = EtcdServer::start().await;
    let mut admin = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("an admin client");
    let _ = admin.role_add("root").await;
    admin
        .user_add("root", PASSWORD, None)
        .await
        .expect("adding the root user");
    admin
        .user_grant_role("root", "root")
        .await
        .expect("granting root");
    admin.auth_enable().await.expect("enabling auth");

    let builder = |password: &str| {
        Etcd::builder()
            .endpoints(server.endpoints())
            .auth("root", password)
            .request_timeout(Duration::from_secs(2))
    };
    shown.push(format!("{:?}", builder(WRONG_PASSWORD)));
    let err = builder(WRONG_PASSWORD)
        .connect()
        .await
        .expect_err("a wrong password cannot connect");
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err}");
    shown.extend([format!("{err:?}"), err.to_string()]);

    let right = builder(PASSWORD);
    shown.push(format!("{right:?}"));
    let etcd = right.connect().await.expect("the right password connects");
    shown.push(format!("{etcd:?}"));

    let name = service("secrets-etcd");
    let handle = etcd
        .register(registration("secrets-etcd", "e-1", 9803))
        .await
        .expect("registering with the right password");
    shown.push(format!("{handle:?}"));
    let mut mirror = Mirror::new("etcd watch", etcd.watch(&name));
    mirror
        .wait_until(SETTLE, "e-1 listed", |s| s.get("e-1").is_some())
        .await;
    // A lease of 3 s: a keep-alive every second.
    logs.wait_for(
        "etcd lease kept alive",
        &[r#"registration{service=secrets-etcd instance=e-1 backend="etcd"}:keep_alive{lease="#],
    )
    .await;

    // A restart: the watch and the keep-alive break, then recover (re-authenticating).
    server.restart().await;
    logs.wait_for(
        "etcd watch recovered",
        &[r#"watch{service=secrets-etcd backend="etcd"}:relist{reason="error""#],
    )
    .await;
    logs.wait_for(
        "etcd registration restored",
        &[r#"registration{service=secrets-etcd instance=e-1 backend="etcd"}"#],
    )
    .await;
    error_then_in_sync(&mut mirror).await;
    mirror
        .wait_until(SETTLE, "e-1 listed after the restart", |s| {
            s.get("e-1").is_some()
        })
        .await;
    handle.shutdown().await.expect("revoking the lease");
    vec![PASSWORD.to_owned(), WRONG_PASSWORD.to_owned()]
}

/// The memory part (no secrets): the spans of a registration and of a watch through an outage.
async fn memory(logs: &Captured, shown: &mut Vec<String>) {
    let memory = Memory::new();
    let name = service("secrets-memory");
    let handle = memory
        .register(registration("secrets-memory", "m-1", 9804))
        .await
        .expect("registering in memory");
    let mut mirror = Mirror::new("memory watch", memory.watch(&name));
    mirror
        .wait_until(SETTLE, "m-1 listed", |s| s.get("m-1").is_some())
        .await;
    memory.set_available(false);
    logs.wait_for(
        "memory watch failed",
        &[r#"watch{service=secrets-memory backend="memory"}"#],
    )
    .await;
    memory.set_available(true);
    logs.wait_for(
        "memory watch recovered",
        &[r#"watch{service=secrets-memory backend="memory"}:resync"#],
    )
    .await;
    logs.wait_for(
        "memory heartbeat passed",
        &[r#"registration{service=secrets-memory instance=m-1 backend="memory"}:heartbeat"#],
    )
    .await;
    shown.push(format!("{memory:?}"));
    handle.shutdown().await.expect("deregistering from memory");
}

#[test]
fn secrets_never_reach_logs_or_debug_output() {
    let logs = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("trace"))
        .with_writer(logs.clone())
        .with_ansi(false)
        // Span creation is a line too, with the span's fields.
        .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
        .finish()
        // Global (every thread, every task) and with the `log` bridge (reqwest logs that way).
        .try_init()
        .expect("the only subscriber of this test binary");

    let mut shown = Vec::new();
    let mut secrets = run(consul(&logs, &mut shown));
    secrets.extend(run(etcd(&logs, &mut shown)));
    run(memory(&logs, &mut shown));

    let text = logs.text();
    assert!(
        text.lines().count() > 100,
        "the logs at TRACE should be plentiful: {text}"
    );

    // The events and spans an operator relies on.
    line(
        &text,
        "registered with consul",
        &[r#"register{service=secrets-consul instance=c-1 backend="consul"}"#],
    );
    line(
        &text,
        "consul watch failed",
        &[r#"watch{service=secrets-consul backend="consul"}"#],
    );
    line(&text, "deregistered from consul", &["instance=c-1"]);
    line(
        &text,
        "registered in etcd",
        &[r#"register{service=secrets-etcd instance=e-1 backend="etcd"}"#],
    );
    line(
        &text,
        "etcd watch interrupted",
        &[r#"watch{service=secrets-etcd backend="etcd"}"#],
    );
    line(
        &text,
        "registered in memory",
        &[r#"register{service=secrets-memory instance=m-1 backend="memory"}"#],
    );
    // The first registration's span and core's keep-alive span are never nested.
    for l in text.lines() {
        assert!(
            !((l.contains(" register{") || l.contains(":register{"))
                && l.contains("registration{")),
            "nested registration spans: {l}"
        );
    }

    // No secret anywhere.
    assert!(!shown.is_empty());
    let debug = shown.join("\n");
    for secret in &secrets {
        assert!(
            !debug.contains(secret.as_str()),
            "secret {secret:?} in a Debug or error string:\n{debug}"
        );
        let leaks: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(secret.as_str()))
            .collect();
        assert!(leaks.is_empty(), "secret {secret:?} logged: {leaks:#?}");
    }
    assert!(debug.contains("<redacted>"), "{debug}");
}
