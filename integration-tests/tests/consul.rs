//! The Consul backend against a real `consul agent -dev`: the conformance suite, then what is
//! specific to Consul (weights/tags/meta on the wire, TTL checks, checks run by Consul, agent
//! restarts, ACLs).
//!
//! Needs a `consul` binary: `eval "$(scripts/fetch-servers)"`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::gate::Gate;
use waypost_conformance::scenarios::{eventually, Mirror};
use waypost_conformance::{async_trait, Backend};
use waypost_consul::{Consul, ConsulBuilder};
use waypost_core::{
    Discovery, Error, HealthCheck, Registration, Registry, ServiceInstance, ServiceName,
};

/// A generous bound for anything that settles in milliseconds on an idle machine.
const SETTLE: Duration = Duration::from_secs(10);

/// A client for `server`, with a short backoff cap so that healing after a restart is quick.
fn builder(server: &ConsulServer) -> ConsulBuilder {
    Consul::builder()
        .address(server.addr())
        .retry_backoff(Duration::from_millis(50), Duration::from_secs(1))
}

fn client(server: &ConsulServer) -> Consul {
    builder(server).build().unwrap()
}

/// A real agent, reached through a [`Gate`] so that scenarios can cut the clients off.
struct ConsulBackend {
    server: ConsulServer,
    gate: Gate,
    /// The clients' blocking-query slots: the default, or 0 (every watch shares the feed).
    max_blocking_watches: usize,
}

impl ConsulBackend {
    fn client(&self) -> Consul {
        builder(&self.server)
            .address(self.gate.addr().to_string())
            .max_blocking_watches(self.max_blocking_watches)
            .build()
            .unwrap()
    }
}

#[async_trait]
impl Backend for ConsulBackend {
    fn name(&self) -> &'static str {
        "consul"
    }
    fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(self.client())
    }
    fn discovery(&self) -> Arc<dyn Discovery> {
        Arc::new(self.client())
    }
    async fn partition(&self) -> Result<(), String> {
        self.gate.cut();
        Ok(())
    }
    async fn heal(&self) -> Result<(), String> {
        self.gate.mend();
        Ok(())
    }
    fn retry_period(&self) -> Duration {
        // The backoff cap of `builder`.
        Duration::from_secs(1)
    }
    fn expiry_bound(&self) -> Duration {
        // Consul marks the TTL check critical ttl after the last pass; the rest is CI slack.
        self.ttl() + Duration::from_secs(6)
    }
    async fn restart(&self) -> Result<(), String> {
        self.server.restart().await;
        Ok(())
    }
}

async fn start() -> ConsulBackend {
    start_with(waypost_consul::DEFAULT_MAX_BLOCKING_WATCHES).await
}

async fn start_with(max_blocking_watches: usize) -> ConsulBackend {
    let server = ConsulServer::start().await;
    let agent = server
        .addr()
        .parse()
        .expect("the harness's address is host:port");
    let gate = Gate::start(agent)
        .await
        .expect("a free loopback port for the gate");
    ConsulBackend {
        server,
        gate,
        max_blocking_watches,
    }
}

waypost_conformance::conformance_tests!(start);

/// The whole suite again with every watch on the shared feed (the two datacenter-wide blocking
/// queries) instead of a blocking query of its own.
mod shared_watch {
    use super::*;

    async fn start() -> ConsulBackend {
        start_with(0).await
    }

    waypost_conformance::conformance_tests!(start);
}

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

fn ttl_registration(service: &str, id: &str, port: u16) -> Registration {
    Registration::builder(service, id)
        .host("127.0.0.1")
        .port(port)
        .check(HealthCheck::ttl(Duration::from_secs(2)))
        .build()
        .unwrap()
}

async fn ids(d: &Consul, service: &str) -> Result<Vec<String>, String> {
    d.instances(&name(service))
        .await
        .map(|v| v.iter().map(|i| i.id().to_string()).collect())
        .map_err(|e| e.to_string())
}

async fn agent_get(server: &ConsulServer, path: &str, token: Option<&str>) -> serde_json::Value {
    let mut req = reqwest::Client::new().get(format!("{}{path}", server.http_url()));
    if let Some(t) = token {
        req = req.header("X-Consul-Token", t);
    }
    req.send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_tags_meta_and_zone_round_trip() {
    let server = ConsulServer::start().await;
    let consul = client(&server);
    let reg = Registration::builder("users", "users-1")
        .host("127.0.0.1")
        .port(8081)
        .tag("v1")
        .tag("blue")
        .meta("version", "1.4.2")
        .weight(3)
        .zone("eu-1a")
        .build()
        .unwrap();
    let h = consul.register(reg).await.unwrap();

    // On the wire: Weights, Meta.zone, Tags, and a TTL check registered passing.
    let svc = agent_get(&server, "/v1/agent/service/users-1", None).await;
    assert_eq!(svc["Weights"], json!({"Passing": 3, "Warning": 1}));
    assert_eq!(svc["Meta"], json!({"version": "1.4.2", "zone": "eu-1a"}));
    assert_eq!(svc["Tags"], json!(["v1", "blue"]));
    let checks = agent_get(&server, "/v1/agent/checks", None).await;
    assert_eq!(checks["service:users-1"]["Status"], "passing");

    // Read back: exactly the registered instance (passing at once: no wait for a heartbeat).
    let got = consul.instances(&name("users")).await.unwrap();
    assert_eq!(got, vec![h.instance().clone()]);
    assert_eq!(got[0].weight().get(), 3);
    assert_eq!(got[0].zone(), Some("eu-1a"));
    assert!(!got[0].metadata().contains_key("zone"));

    // Tag filters: every tag must match.
    let both = builder(&server).tags(["v1", "blue"]).build().unwrap();
    assert_eq!(both.instances(&name("users")).await.unwrap().len(), 1);
    let other = builder(&server).tags(["v1", "green"]).build().unwrap();
    assert!(other.instances(&name("users")).await.unwrap().is_empty());

    // The read options the agent understands: stale reads, the agent cache, the datacenter.
    let relaxed = builder(&server)
        .stale(true)
        .cached(true)
        .datacenter("dc1")
        .build()
        .unwrap();
    assert_eq!(relaxed.instances(&name("users")).await.unwrap(), got);
    let elsewhere = builder(&server).datacenter("nowhere").build().unwrap();
    let err = elsewhere.instances(&name("users")).await.unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    assert!(
        err.to_string().contains("nowhere") || err.to_string().contains("datacenter"),
        "{err}"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_registrations_weight_fallbacks_and_bad_entries() {
    let server = ConsulServer::start().await;
    let consul = client(&server);
    // Registered by some other tool: no Address (Node.Address is used), weight in Meta or a tag.
    server
        .put(
            "/v1/agent/service/register",
            json!({"ID": "meta-w", "Name": "legacy", "Port": 9001, "Meta": {"weight": "7"}}),
        )
        .await;
    server.put("/v1/agent/service/register",
        json!({"ID": "tag-w", "Name": "legacy", "Address": "127.0.0.2", "Port": 9002, "Tags": ["weight:4"]})).await;
    // Bad data that Consul accepts: must be skipped, never hide the valid ones.
    server
        .put(
            "/v1/agent/service/register",
            json!({"ID": "bad id", "Name": "legacy", "Address": "127.0.0.3", "Port": 9003}),
        )
        .await;
    server.put("/v1/agent/service/register",
        json!({"ID": "bad-weight", "Name": "legacy", "Address": "127.0.0.3", "Port": 9004, "Meta": {"weight": "heavy"}})).await;

    let got = consul.instances(&name("legacy")).await.unwrap();
    let summary: Vec<(String, String, u32)> = got
        .iter()
        .map(|i| (i.id().to_string(), i.host().to_owned(), i.weight().get()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("meta-w".into(), "127.0.0.1".into(), 7),
            ("tag-w".into(), "127.0.0.2".into(), 4),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_instance_goes_critical_leaves_passing_set_and_comes_back() {
    let server = ConsulServer::start().await;
    let consul = client(&server);
    let all = builder(&server).passing_only(false).build().unwrap();
    let h = consul
        .register(ttl_registration("ttl", "t-1", 9100))
        .await
        .unwrap();
    assert_eq!(ids(&consul, "ttl").await.unwrap(), ["t-1"]);

    h.abandon().await.unwrap(); // heart-beating stops, nothing deregisters
    eventually(SETTLE, "t-1 leaves the passing set", || async {
        let now = ids(&consul, "ttl").await?;
        if now.is_empty() {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .await;
    // Critical, not gone: a client that wants every instance still sees it.
    assert_eq!(ids(&all, "ttl").await.unwrap(), ["t-1"]);

    let h = consul
        .register(ttl_registration("ttl", "t-1", 9100))
        .await
        .unwrap();
    assert_eq!(ids(&consul, "ttl").await.unwrap(), ["t-1"]);
    // And it stays passing: the handle heart-beats (several TTLs go by).
    let mut mirror = Mirror::new("ttl watch", consul.watch(&name("ttl")));
    mirror
        .hold(
            Duration::from_secs(5),
            "t-1 stays listed while heart-beating",
            |s| s.get("t-1").is_some(),
        )
        .await;
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_run_by_consul_follow_the_target() {
    let server = ConsulServer::start().await;
    let consul = client(&server);
    // A TCP check against a listener, and an HTTP check against a tiny HTTP server.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let http_server = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = http.accept().await {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        }
    });
    let interval = Duration::from_secs(1);
    let reg_tcp = Registration::builder("checked", "by-tcp")
        .host("127.0.0.1")
        .port(tcp_addr.port())
        .check(HealthCheck::tcp(tcp_addr.to_string(), interval))
        .build()
        .unwrap();
    let reg_http = Registration::builder("checked", "by-http")
        .host("127.0.0.1")
        .port(http_addr.port())
        .check(HealthCheck::http(
            format!("http://{http_addr}/health"),
            interval,
        ))
        .build()
        .unwrap();
    let h1 = consul.register(reg_tcp).await.unwrap();
    let h2 = consul.register(reg_http).await.unwrap();
    eventually(SETTLE, "both pass once Consul ran their checks", || async {
        let now = ids(&consul, "checked").await?;
        if now == ["by-http", "by-tcp"] {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .await;
    drop(tcp);
    http_server.abort();
    eventually(
        SETTLE,
        "both turn critical once their targets are gone",
        || async {
            let now = ids(&consul, "checked").await?;
            if now.is_empty() {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        },
    )
    .await;
    h1.shutdown().await.unwrap();
    h2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_a_registration_promptly() {
    let server = ConsulServer::start().await;
    let consul = client(&server);
    let mut mirror = Mirror::new("watch", consul.watch(&name("fast")));
    mirror
        .wait_until(SETTLE, "the (empty) snapshot", |s| s.is_empty())
        .await;
    let h = consul
        .register(ttl_registration("fast", "f-1", 9200))
        .await
        .unwrap();
    // The blocking query returns within milliseconds of the change; 5 s is a correctness bound
    // (a watch that polls on a timer, or waits for the blocking wait to expire, would miss it).
    mirror
        .wait_until(Duration::from_secs(5), "f-1 is added", |s| {
            s.get("f-1").is_some()
        })
        .await;
    assert_eq!(mirror.set().get("f-1"), Some(h.instance()));
    h.shutdown().await.unwrap();
    mirror
        .wait_until(Duration::from_secs(5), "f-1 is removed", |s| s.is_empty())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_mid_watch_heals_registration_and_watch() {
    let server = ConsulServer::start().await;
    let consul = client(&server);
    let mut mirror = Mirror::new("watch", consul.watch(&name("healing")));
    let h = consul
        .register(ttl_registration("healing", "h-1", 9300))
        .await
        .unwrap();
    mirror
        .wait_until(SETTLE, "h-1 listed", |s| s.get("h-1").is_some())
        .await;
    let mut live = h.subscribe();

    server.restart().await; // -dev: the agent forgot h-1
                            // The handle notices (heartbeat fails), re-registers, and is live again.
    tokio::time::timeout(SETTLE, live.wait_for(|l| !l.is_live()))
        .await
        .expect("the handle reports the lost registration")
        .unwrap();
    tokio::time::timeout(SETTLE * 2, live.wait_for(|l| l.is_live()))
        .await
        .expect("the handle heals")
        .unwrap();
    eventually(SETTLE, "h-1 listed again after the restart", || async {
        let now = ids(&consul, "healing").await?;
        if now == ["h-1"] {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .await;
    // The watch resumed (the mirror checks: no second snapshot, no duplicate add) and shows it.
    mirror
        .wait_until(SETTLE, "h-1 in the resumed watch", |s| {
            s.get("h-1") == Some(h.instance())
        })
        .await;
    // Changes after the restart still arrive.
    let h2 = consul
        .register(ttl_registration("healing", "h-2", 9301))
        .await
        .unwrap();
    mirror
        .wait_until(SETTLE, "h-2 added after the restart", |s| {
            s.get("h-2").is_some()
        })
        .await;
    let want = consul.instances(&name("healing")).await.unwrap();
    mirror
        .wait_until(SETTLE, "watch equals instances()", |s| {
            s.instances() == want
        })
        .await;
    h.shutdown().await.unwrap();
    h2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_agent_denies_without_token_and_works_with_it() {
    let server = ConsulServer::start_with_acl().await;
    let token = server.acl_token().unwrap().to_owned();

    let anonymous = client(&server);
    let err = anonymous
        .register(ttl_registration("secured", "s-1", 9400))
        .await
        .unwrap_err();
    match &err {
        Error::PermissionDenied { operation, .. } => {
            assert!(operation.contains("register s-1"), "{err}")
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("token"), "{err}");

    let authorized = builder(&server).token(token.as_str()).build().unwrap();
    assert!(!format!("{authorized:?}").contains(&token));
    let h = authorized
        .register(ttl_registration("secured", "s-1", 9400))
        .await
        .unwrap();
    assert_eq!(ids(&authorized, "secured").await.unwrap(), ["s-1"]);
    // ACLs filter reads: without the token the instance is invisible, not an error.
    assert!(ids(&anonymous, "secured").await.unwrap().is_empty());
    let mut mirror = Mirror::new("acl watch", authorized.watch(&name("secured")));
    mirror
        .wait_until(SETTLE, "s-1 in the watch", |s| s.get("s-1").is_some())
        .await;
    h.shutdown().await.unwrap();
    assert!(ids(&authorized, "secured").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_host_is_filled_and_overridable() {
    let server = ConsulServer::start().await;
    let reg = || {
        Registration::builder("hosts", "auto")
            .port(9500)
            .build()
            .unwrap()
    };
    let h = client(&server).register(reg()).await.unwrap();
    let host: std::net::Ipv4Addr = h.instance().host().parse().expect("an IPv4 address");
    assert!(!host.is_unspecified());
    let listed: Vec<ServiceInstance> = client(&server).instances(&name("hosts")).await.unwrap();
    assert_eq!(listed[0].host(), h.instance().host());
    h.shutdown().await.unwrap();

    let custom = builder(&server).default_host("10.9.8.7").build().unwrap();
    let h = custom.register(reg()).await.unwrap();
    assert_eq!(
        custom.instances(&name("hosts")).await.unwrap()[0].host(),
        "10.9.8.7"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_agent_is_unavailable_and_watch_keeps_trying() {
    let server = ConsulServer::start().await;
    let consul = client(&server);
    let h = consul
        .register(ttl_registration("down", "d-1", 9600))
        .await
        .unwrap();
    let mut mirror = Mirror::new("watch", consul.watch(&name("down")));
    mirror
        .wait_until(SETTLE, "d-1 listed", |s| s.get("d-1").is_some())
        .await;
    server.kill();
    let err = consul.instances(&name("down")).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    // Fail-static: errors are reported, the last good set stays, and the watch does not end.
    let until = Instant::now() + SETTLE;
    while mirror.errors() < 2 {
        mirror
            .next_until(until)
            .await
            .expect("the watch reports the outage");
    }
    assert!(mirror.set().get("d-1").is_some());
    h.abandon().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_under_a_second_is_honoured() {
    // Core leaves TTL precision to the backend; Consul parses "700ms" and the handle beats
    // every third of it.
    let server = ConsulServer::start().await;
    let consul = client(&server);
    let reg = Registration::builder("short-ttl", "s-1")
        .host("127.0.0.1")
        .port(9)
        .check(HealthCheck::ttl(Duration::from_millis(700)))
        .build()
        .unwrap();
    let handle = consul.register(reg).await.unwrap();
    eventually(SETTLE, "s-1 is listed", || {
        ids_are(&consul, "short-ttl", &["s-1"])
    })
    .await;
    // Several TTLs long: still listed, so the beats keep it passing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ids(&consul, "short-ttl").await.unwrap(), ["s-1"]);
    assert!(handle.is_live());
    handle.abandon().await.unwrap();
    // Without beats it goes critical within about a TTL (Consul's reaper aside, `?passing`
    // hides it).
    eventually(SETTLE, "s-1 expires", || ids_are(&consul, "short-ttl", &[])).await;
}

async fn ids_are(consul: &Consul, service: &str, want: &[&str]) -> Result<(), String> {
    let got = ids(consul, service).await?;
    if got == want {
        Ok(())
    } else {
        Err(format!("{got:?}"))
    }
}

/// Watches beyond the client's blocking queries learn every kind of change from the shared
/// feed within seconds, though each would otherwise re-read only every `wait` (5 min here):
/// registrations with and without a check (the latter named by no check: a sweep), a port
/// change without a check, a health change, deregistrations of both kinds, and a tag change.
/// A service nobody changed keeps its set, and every watch stays on its own service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_watches_see_every_kind_of_change() {
    let server = ConsulServer::start().await;
    let consul = builder(&server).max_blocking_watches(0).build().unwrap();
    let register = |body: serde_json::Value| server.put("/v1/agent/service/register", body);
    register(json!({"ID": "still-1", "Name": "still", "Port": 1})).await;
    let mut plain = Mirror::new("plain", consul.watch(&name("plain")));
    let mut checked = Mirror::new("checked", consul.watch(&name("checked")));
    let mut still = Mirror::new("still", consul.watch(&name("still")));
    still
        .wait_until(SETTLE, "the untouched service's snapshot", |s| s.len() == 1)
        .await;
    plain.wait_until(SETTLE, "a first answer", |_| true).await;
    checked.wait_until(SETTLE, "a first answer", |_| true).await;

    register(json!({"ID": "plain-1", "Name": "plain", "Port": 1001})).await;
    plain
        .wait_until(SETTLE, "a registration without a check", |s| {
            s.get("plain-1").is_some_and(|i| i.port() == 1001)
        })
        .await;
    register(json!({"ID": "plain-1", "Name": "plain", "Port": 1002})).await;
    plain
        .wait_until(SETTLE, "a port change without a check", |s| {
            s.get("plain-1").is_some_and(|i| i.port() == 1002)
        })
        .await;
    register(json!({"ID": "plain-1", "Name": "plain", "Port": 1002, "Tags": ["blue"]})).await;
    plain
        .wait_until(SETTLE, "a tag change", |s| {
            s.get("plain-1").is_some_and(|i| i.has_tag("blue"))
        })
        .await;

    register(json!({"ID": "checked-1", "Name": "checked", "Port": 2001,
        "Check": {"TTL": "60s", "Status": "passing"}}))
    .await;
    checked
        .wait_until(SETTLE, "a registration with a check", |s| {
            s.get("checked-1").is_some()
        })
        .await;
    server
        .put("/v1/agent/check/fail/service:checked-1", json!({}))
        .await;
    checked
        .wait_until(SETTLE, "a failing check hides the instance", |s| {
            s.is_empty()
        })
        .await;
    server
        .put("/v1/agent/check/pass/service:checked-1", json!({}))
        .await;
    checked
        .wait_until(SETTLE, "a passing check shows it again", |s| s.len() == 1)
        .await;
    server
        .put("/v1/agent/service/deregister/checked-1", json!({}))
        .await;
    checked
        .wait_until(SETTLE, "a deregistration with a check", |s| s.is_empty())
        .await;
    server
        .put("/v1/agent/service/deregister/plain-1", json!({}))
        .await;
    plain
        .wait_until(SETTLE, "a deregistration without a check", |s| s.is_empty())
        .await;

    assert_eq!(still.ids(), ["still-1"]);
    assert_eq!(
        (plain.errors(), checked.errors(), still.errors()),
        (0, 0, 0)
    );
    assert!(plain
        .log()
        .iter()
        .all(|e| e.id().map_or(true, |id| id.as_str() == "plain-1")));
}

/// The shared watch's loops run in a task on the runtime of the first watch that subscribed.
/// When that runtime shuts down while watches remain, the task ends with it. The next watch to
/// wait starts it again on its own runtime, so the watches kept (and new ones) still learn of
/// changes within seconds. Without that they would re-read only every `wait` (5 min here) or,
/// taking the task for failing, every backoff's longest delay (60 s here).
#[test]
fn a_shared_watch_outlives_the_runtime_that_started_it() {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = main.block_on(ConsulServer::start());
    let consul = Consul::builder()
        .address(server.addr())
        .retry_backoff(Duration::from_millis(50), Duration::from_secs(60))
        .max_blocking_watches(0)
        .build()
        .unwrap();
    let first = tokio::runtime::Runtime::new().unwrap();
    let early = first.block_on(async {
        let mut early = consul.watch(&name("early"));
        let answer = tokio::time::timeout(SETTLE, futures::StreamExt::next(&mut early))
            .await
            .expect("a first answer within SETTLE");
        assert!(matches!(answer, Some(Ok(_))), "{answer:?}");
        // The watch as it was, its first event put back.
        let watch: waypost_core::Watch = Box::pin(futures::StreamExt::chain(
            futures::stream::iter(answer),
            early,
        ));
        watch
    });
    drop(first);

    main.block_on(async {
        let mut early = Mirror::new("early", early);
        let mut late = Mirror::new("late", consul.watch(&name("late")));
        late.wait_until(SETTLE, "a first answer", |_| true).await;
        let register = |body: serde_json::Value| server.put("/v1/agent/service/register", body);
        register(json!({"ID": "late-1", "Name": "late", "Port": 1})).await;
        late.wait_until(
            SETTLE,
            "a registration, told by the restarted shared watch",
            |s| s.get("late-1").is_some(),
        )
        .await;
        register(json!({"ID": "early-1", "Name": "early", "Port": 2,
            "Check": {"TTL": "60s", "Status": "passing"}}))
        .await;
        early
            .wait_until(SETTLE, "a registration, seen by the watch kept", |s| {
                s.get("early-1").is_some()
            })
            .await;
        assert_eq!(late.ids(), ["late-1"]);
    });
}

/// A shutdown that finds the agent unreachable for a moment (here every connection is closed
/// at once, as an agent does past its per-client connection limit) deregisters once it is
/// reachable again, within the request timeout, instead of failing on its first attempt.
#[tokio::test]
async fn a_shutdown_deregisters_after_a_moment_without_the_agent() {
    let backend = start().await;
    let registry = backend.client();
    let direct = client(&backend.server);
    let svc = name("blip");
    let handle = registry
        .register(ttl_registration("blip", "blip-1", 7000))
        .await
        .unwrap();
    eventually(SETTLE, "listed", || async {
        match direct.instances(&svc).await {
            Ok(v) if v.len() == 1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    backend.gate.cut();
    let shutdown = tokio::spawn(handle.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !shutdown.is_finished(),
        "the shutdown gave up while the agent could not be reached: {:?}",
        shutdown.await
    );
    backend.gate.mend();
    shutdown
        .await
        .unwrap()
        .expect("deregistered once the agent was back");
    let left = direct.instances(&svc).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// One client registering 300 instances at once, and shutting them all down at once: past
/// the agent's 200 connections per client address had each request its own connection, but
/// the client keeps its ordinary requests to `ORDINARY_REQUESTS` in flight, so every one
/// succeeds.
#[tokio::test]
async fn a_burst_of_registrations_stays_within_the_agents_connection_limit() {
    let server = ConsulServer::start().await;
    let consul = client(&server);
    let svc = name("burst");
    let registrations =
        (0..300u16).map(|n| ttl_registration("burst", &format!("b{n:03}"), 7000 + n));
    let registered = futures::future::join_all(registrations.map(|r| consul.register(r))).await;
    let mut handles = Vec::new();
    for r in registered {
        handles.push(r.expect("every registration of the burst succeeds"));
    }
    eventually(SETTLE, "all 300 listed", || async {
        match consul.instances(&svc).await {
            Ok(v) if v.len() == 300 => Ok(()),
            Ok(v) => Err(format!("{} listed", v.len())),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let stopped = futures::future::join_all(handles.into_iter().map(|h| h.shutdown())).await;
    for r in stopped {
        r.expect("every shutdown of the burst succeeds");
    }
    let left = consul.instances(&svc).await.unwrap();
    assert!(left.is_empty(), "{} left", left.len());
}
