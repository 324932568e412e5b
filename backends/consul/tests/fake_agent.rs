//! HTTP-level edge cases against a small fake agent (axum), in addition to the real-agent tests
//! in `integration-tests/tests/consul.rs`: answers a real agent does not give on demand (500s,
//! HTML, truncated bodies, an index that goes backwards or is 0).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use waypost_consul::{Consul, ConsulBuilder};
use waypost_core::{
    Discovery, Error, HealthCheck, Liveness, Registration, Registry, ServiceName, WatchEvent,
};

/// One request the fake agent received.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: String,
    token: Option<String>,
}

impl Seen {
    fn param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then(|| v.to_owned())
        })
    }
}

type Respond = Arc<dyn Fn(Seen, usize) -> BoxFuture<'static, Response> + Send + Sync>;

#[derive(Clone)]
struct Fake {
    seen: Arc<Mutex<Vec<Seen>>>,
    respond: Respond,
}

async fn handle(State(fake): State<Fake>, req: Request) -> Response {
    let seen = Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or("").to_owned(),
        token: req
            .headers()
            .get("X-Consul-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    let n = {
        let mut log = fake.seen.lock().unwrap();
        log.push(seen.clone());
        log.len() - 1
    };
    (fake.respond)(seen, n).await
}

/// Starts a fake agent; `respond(request, n)` answers the n-th request (from 0).
async fn fake<F>(respond: F) -> (String, Arc<Mutex<Vec<Seen>>>)
where
    F: Fn(Seen, usize) -> BoxFuture<'static, Response> + Send + Sync + 'static,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let state = Fake {
        seen: seen.clone(),
        respond: Arc::new(respond),
    };
    let app = axum::Router::new().fallback(handle).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

fn health(index: u64, entries: Value) -> Response {
    let mut r = Response::new(Body::from(entries.to_string()));
    r.headers_mut()
        .insert("Content-Type", HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert("X-Consul-Index", HeaderValue::from(index));
    r
}

fn status(code: u16, body: &'static str, content_type: &'static str) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r.headers_mut()
        .insert("Content-Type", HeaderValue::from_static(content_type));
    r
}

fn entry(id: &str, port: u16) -> Value {
    json!({"Node": {"Node": "n1", "Address": "10.0.0.1"},
           "Service": {"ID": id, "Service": "users", "Address": "127.0.0.1", "Port": port,
                       "Tags": [], "Meta": {}, "Weights": {"Passing": 1, "Warning": 1}},
           "Checks": []})
}

fn ready(r: Response) -> BoxFuture<'static, Response> {
    async move { r }.boxed()
}

fn client(addr: &str) -> ConsulBuilder {
    Consul::builder()
        .address(addr)
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
}

fn users() -> ServiceName {
    ServiceName::new("users").unwrap()
}

fn ids(ev: &WatchEvent) -> Vec<String> {
    match ev {
        WatchEvent::Snapshot(all) => all.iter().map(|i| i.id().to_string()).collect(),
        other => vec![other.id().map(|i| i.to_string()).unwrap_or_default()],
    }
}

/// The next item as it comes, `Synced` included.
async fn next_item(watch: &mut waypost_core::Watch) -> Result<WatchEvent, Error> {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the watch yields within 10 s")
        .expect("the watch never ends")
}

/// The next change or error (`Synced` skipped).
async fn next(watch: &mut waypost_core::Watch) -> Result<WatchEvent, Error> {
    loop {
        match next_item(watch).await {
            Ok(WatchEvent::Synced) => continue,
            other => return other,
        }
    }
}

#[tokio::test]
async fn http_500_is_a_protocol_error_and_the_watch_keeps_going() {
    let (addr, seen) = fake(|_, n| match n {
        0 => ready(status(
            500,
            "unexpected: the state store is corrupt",
            "text/plain",
        )),
        1 => ready(health(10, json!([entry("a", 1)]))),
        2..=4 => ready(status(
            500,
            "unexpected: the state store is corrupt",
            "text/plain",
        )),
        _ => async move {
            // Later blocking queries find nothing new: hold them a little, like a real agent.
            tokio::time::sleep(Duration::from_millis(100)).await;
            health(11, json!([entry("a", 1), entry("b", 2)]))
        }
        .boxed(),
    })
    .await;
    let consul = client(&addr).build().unwrap();
    let err = consul.instances(&users()).await.unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    assert!(err.to_string().contains("500") && err.to_string().contains("corrupt"));

    let mut watch = consul.watch(&users());
    assert_eq!(ids(&next_item(&mut watch).await.unwrap()), ["a"]);
    assert_eq!(next_item(&mut watch).await.unwrap(), WatchEvent::Synced);
    // Three failures: reported, nothing removed (fail-static), then only the real difference,
    // then word that the watch is in sync again.
    for _ in 0..3 {
        let err = next_item(&mut watch).await.unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
    }
    let ev = next_item(&mut watch).await.unwrap();
    assert!(
        matches!(&ev, WatchEvent::Added(i) if i.id().as_str() == "b"),
        "{ev:?}"
    );
    assert_eq!(next_item(&mut watch).await.unwrap(), WatchEvent::Synced);
    // After the outage the watch reads afresh (the agent may have restarted with a lower
    // index), then blocks again on the index it got.
    let seen = seen.lock().unwrap().clone();
    let index: Vec<Option<String>> = seen
        .iter()
        .skip(1)
        .take(5)
        .map(|s| s.param("index"))
        .collect();
    assert_eq!(
        index,
        [None, Some("10".into()), None, None, None],
        "{seen:?}"
    );
}

#[tokio::test]
async fn html_instead_of_json_is_a_protocol_error() {
    let (addr, _) = fake(|_, _| {
        ready(status(
            200,
            "<html><body>Welcome to the proxy</body></html>",
            "text/html",
        ))
    })
    .await;
    let err = client(&addr)
        .build()
        .unwrap()
        .instances(&users())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("text/html") && msg.contains("Welcome to the proxy"),
        "{msg}"
    );
}

#[tokio::test]
async fn truncated_bodies_are_protocol_errors() {
    // Valid JSON syntax cut short, with a matching length.
    let (addr, _) = fake(|_, _| ready(health(3, Value::String("x".into())))).await;
    let err = client(&addr)
        .build()
        .unwrap()
        .instances(&users())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    let (addr, _) = fake(|_, _| {
        let mut r = status(
            200,
            r#"[{"Node":{"Address":"10.0.0.1"},"Serv"#,
            "application/json",
        );
        r.headers_mut()
            .insert("X-Consul-Index", HeaderValue::from(3));
        ready(r)
    })
    .await;
    let err = client(&addr)
        .build()
        .unwrap()
        .instances(&users())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");

    // A connection that closes before the promised Content-Length.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 5\r\nContent-Length: 400\r\n\r\n[{\"Node\":")
                .await;
            let _ = s.shutdown().await;
        }
    });
    let err = client(&addr)
        .build()
        .unwrap()
        .instances(&users())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    assert!(err.to_string().contains("cut off"), "{err}");
}

#[tokio::test]
async fn invalid_entries_are_skipped_and_valid_ones_kept() {
    let (addr, _) = fake(|_, _| {
        ready(health(
            7,
            json!([
                entry("b", 2),
                entry("zero-port", 0),
                {"Service": {"ID": "x"}},
                "not an object",
                entry("a", 1),
                entry("a", 1),
            ]),
        ))
    })
    .await;
    let got = client(&addr)
        .build()
        .unwrap()
        .instances(&users())
        .await
        .unwrap();
    let got: Vec<&str> = got.iter().map(|i| i.id().as_str()).collect();
    assert_eq!(got, ["a", "b"]);
}

#[tokio::test]
async fn permission_denied_names_the_operation_and_is_not_retried() {
    let (addr, seen) = fake(|_, _| ready(status(403, "ACL not found", "text/plain"))).await;
    let consul = client(&addr).token("the-token").build().unwrap();
    let reg = Registration::builder("users", "u-1")
        .host("127.0.0.1")
        .port(80)
        .build()
        .unwrap();
    let err = consul.register(reg).await.unwrap_err();
    match &err {
        Error::PermissionDenied {
            operation, message, ..
        } => {
            assert!(operation.contains("register u-1"), "{err}");
            assert!(message.contains("ACL not found"), "{err}");
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    assert!(!err.to_string().contains("the-token"));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "a 403 is not retried: {seen:?}");
    assert_eq!(seen[0].method, "PUT");
    assert_eq!(seen[0].path, "/v1/agent/service/register");
    assert_eq!(seen[0].token.as_deref(), Some("the-token"));
}

#[tokio::test]
async fn index_going_backwards_resets_to_a_fresh_read() {
    let (addr, seen) = fake(|_, n| match n {
        0 => ready(health(100, json!([entry("a", 1)]))),
        1 => ready(health(50, json!([entry("a", 1)]))), // went backwards (agent restored)
        2 => ready(health(50, json!([entry("a", 1)]))),
        3 => ready(health(51, json!([entry("a", 1), entry("b", 2)]))),
        _ => async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            health(51, json!([entry("a", 1), entry("b", 2)]))
        }
        .boxed(),
    })
    .await;
    let consul = client(&addr).wait(Duration::from_secs(30)).build().unwrap();
    let mut watch = consul.watch(&users());
    assert_eq!(ids(&next(&mut watch).await.unwrap()), ["a"]);
    assert_eq!(ids(&next(&mut watch).await.unwrap()), ["b"]);
    let seen = seen.lock().unwrap().clone();
    let index: Vec<Option<String>> = seen.iter().take(4).map(|s| s.param("index")).collect();
    assert_eq!(
        index,
        [None, Some("100".into()), None, Some("50".into())],
        "{seen:?}"
    );
    assert_eq!(seen[1].param("wait").as_deref(), Some("30s"));
    assert_eq!(seen[1].param("passing").as_deref(), Some("true"));
}

#[tokio::test]
async fn index_zero_is_never_sent_and_churn_is_rate_limited() {
    // A broken agent: answers at once, always with index 0 and the same set.
    let (addr, seen) = fake(|_, _| ready(health(0, json!([entry("a", 1)])))).await;
    let consul = client(&addr)
        .watch_rate_limit(3, Duration::from_millis(500))
        .build()
        .unwrap();
    let mut watch = consul.watch(&users());
    assert_eq!(ids(&next(&mut watch).await.unwrap()), ["a"]);
    assert_eq!(next_item(&mut watch).await.unwrap(), WatchEvent::Synced);
    // Nothing changes, so nothing is emitted; meanwhile the watch keeps querying.
    let quiet = tokio::time::timeout(Duration::from_secs(2), watch.next()).await;
    assert!(quiet.is_err(), "no event without a change: {quiet:?}");
    drop(watch);
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|s| s.param("index").as_deref() != Some("0")),
        "index 0 must be sent as 1: {seen:?}"
    );
    assert_eq!(seen[1].param("index").as_deref(), Some("1"));
    // Burst of 3, then one per 500 ms over ~2 s: about 8; without pacing, thousands.
    assert!(seen.len() <= 12, "{} queries in 2 s", seen.len());
    assert!(seen.len() >= 3, "the watch kept querying: {}", seen.len());
}

#[tokio::test]
async fn blocking_request_timeout_covers_the_servers_wait_jitter() {
    let wait = Duration::from_secs(4);
    let (addr, seen) = fake(move |req, _| {
        async move {
            if req.param("index").is_some() {
                // The longest a real agent holds a blocking query: wait + wait/16.
                tokio::time::sleep(wait * 17 / 16).await;
            }
            health(9, json!([entry("a", 1)]))
        }
        .boxed()
    })
    .await;
    // A short ordinary timeout: a client that used `wait` (plus it) as the limit would fail.
    let consul = client(&addr)
        .wait(wait)
        .request_timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let mut watch = consul.watch(&users());
    assert_eq!(ids(&next(&mut watch).await.unwrap()), ["a"]);
    assert_eq!(next_item(&mut watch).await.unwrap(), WatchEvent::Synced);
    let quiet = tokio::time::timeout(wait + Duration::from_millis(900), watch.next()).await;
    assert!(
        quiet.is_err(),
        "an idle blocking query must not time out: {quiet:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "{seen:?}");
    assert_eq!(seen[1].param("wait").as_deref(), Some("4s"));
}

#[tokio::test]
async fn unreachable_agent_is_unavailable_and_the_watch_never_ends() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let consul = client(&addr).build().unwrap();
    let err = consul.instances(&users()).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(err.is_retryable());
    let mut watch = consul.watch(&users());
    for _ in 0..3 {
        let err = next(&mut watch).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    }
}

#[tokio::test]
async fn forgotten_check_reregisters_and_shutdown_deregisters() {
    // The agent answers the second heartbeat the way Consul 1.8 does after a restart.
    let passes = Arc::new(AtomicUsize::new(0));
    let p = passes.clone();
    let (addr, seen) = fake(move |req, _| {
        let r = if req.path.starts_with("/v1/agent/check/pass/")
            && p.fetch_add(1, Ordering::SeqCst) == 1
        {
            status(
                500,
                "CheckID \"service:u-1?\" does not have associated TTL",
                "text/plain",
            )
        } else {
            status(200, "", "text/plain")
        };
        ready(r)
    })
    .await;
    let consul = client(&addr).build().unwrap();
    // '?' is allowed in ids and must be escaped in paths.
    let reg = Registration::builder("users", "u-1?")
        .host("127.0.0.1")
        .port(80)
        .check(HealthCheck::ttl(Duration::from_secs(1)))
        .build()
        .unwrap();
    let h = consul.register(reg).await.unwrap();
    let mut live = h.subscribe();
    let bound = Duration::from_secs(10);
    tokio::time::timeout(
        bound,
        live.wait_for(|l| matches!(l, Liveness::Recovering { .. })),
    )
    .await
    .expect("the lost check is noticed")
    .unwrap();
    tokio::time::timeout(bound, live.wait_for(Liveness::is_live))
        .await
        .expect("the registration heals")
        .unwrap();
    h.shutdown().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let calls: Vec<(&str, &str)> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.path.as_str()))
        .collect();
    let register = ("PUT", "/v1/agent/service/register");
    let pass = ("PUT", "/v1/agent/check/pass/service:u-1%3F");
    // register, pass, failed pass, register again, pass, ... deregister.
    assert_eq!(
        calls[..5],
        [register, pass, pass, register, pass],
        "{calls:?}"
    );
    assert_eq!(
        calls.last(),
        Some(&("PUT", "/v1/agent/service/deregister/u-1%3F"))
    );
    assert!(
        seen.iter().all(|s| s.token.is_none()),
        "no token configured, none sent"
    );
}

#[tokio::test]
async fn query_options_reach_the_agent() {
    let (addr, seen) = fake(|_, _| ready(health(4, json!([])))).await;
    let consul = client(&addr)
        .token("t0k")
        .datacenter("eu-1")
        .tags(["v1", "blue"])
        .stale(true)
        .cached(true)
        .passing_only(false)
        .build()
        .unwrap();
    consul.instances(&users()).await.unwrap();
    let default = client(&addr).build().unwrap();
    default.instances(&users()).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].path, "/v1/health/service/users");
    assert_eq!(seen[0].query, "tag=v1&tag=blue&dc=eu-1&stale&cached");
    assert_eq!(seen[0].token.as_deref(), Some("t0k"));
    assert_eq!(seen[1].query, "passing=true");
    assert_eq!(seen[1].token, None);
}

/// A watch on the shared watch (no blocking-query slot) whose datacenter-wide queries are
/// refused while its own service's reads are answered (a token that may read the service but
/// not the checks list): it reads at once rather than wait for a baseline that never comes,
/// and then polls at the backoff's longest delay instead of going stale until `wait` (5 min).
#[tokio::test]
async fn a_shared_watch_whose_feed_is_refused_polls_its_service() {
    let since = std::time::Instant::now();
    let (addr, seen) = fake(move |req, _| {
        let r = match req.path.as_str() {
            "/v1/health/state/any" | "/v1/catalog/services" => {
                status(403, "Permission denied", "text/plain")
            }
            _ if since.elapsed() < Duration::from_millis(300) => health(5, json!([entry("a", 1)])),
            _ => health(6, json!([entry("a", 1), entry("b", 2)])),
        };
        ready(r)
    })
    .await;
    // A watch that waited for the baseline would wait a request timeout, longer than `next`
    // waits for the first answer.
    let consul = client(&addr)
        .max_blocking_watches(0)
        .request_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut watch = consul.watch(&users());
    assert_eq!(ids(&next(&mut watch).await.unwrap()), ["a"]);
    let ev = next(&mut watch).await.unwrap();
    assert!(
        matches!(&ev, WatchEvent::Added(i) if i.id().as_str() == "b"),
        "{ev:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().any(|s| s.path == "/v1/health/state/any"));
    // Reads of the service itself never block: the feed, not the read, waits for changes.
    let reads: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path == "/v1/health/service/users")
        .collect();
    assert!(reads.len() >= 2, "{seen:?}");
    assert!(
        reads.iter().all(|s| s.param("index").is_none()),
        "{reads:?}"
    );
}

/// A watch on the shared watch reads its service only once both datacenter-wide queries have
/// their first answer, the baseline that later answers are compared with. Had it read before, a
/// change landing between its read and the baseline would be in neither diff, and missed until
/// the next `wait`. Here the checks query answers 300 ms late: the watch's first read comes
/// after both answers, not at once.
#[tokio::test]
async fn a_shared_watch_reads_its_service_after_the_feeds_baseline() {
    let answered = Arc::new(AtomicUsize::new(0));
    let at_first_read: Arc<Mutex<Option<usize>>> = Arc::new(Mutex::new(None));
    let (addr, _) = fake({
        let (answered, at_first_read) = (answered.clone(), at_first_read.clone());
        move |req, _| {
            let (answered, at_first_read) = (answered.clone(), at_first_read.clone());
            async move {
                let blocking = req.param("index").is_some();
                match req.path.as_str() {
                    "/v1/health/state/any" | "/v1/catalog/services" if blocking => {
                        // Nothing changes: a blocking query waits (longer than the test).
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        health(5, json!([]))
                    }
                    "/v1/health/state/any" => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        answered.fetch_add(1, Ordering::SeqCst);
                        health(5, json!([]))
                    }
                    "/v1/catalog/services" => {
                        answered.fetch_add(1, Ordering::SeqCst);
                        health(5, json!({}))
                    }
                    _ => {
                        at_first_read
                            .lock()
                            .unwrap()
                            .get_or_insert(answered.load(Ordering::SeqCst));
                        health(5, json!([entry("a", 1)]))
                    }
                }
            }
            .boxed()
        }
    })
    .await;
    let consul = client(&addr).max_blocking_watches(0).build().unwrap();
    let mut watch = consul.watch(&users());
    assert_eq!(ids(&next(&mut watch).await.unwrap()), ["a"]);
    assert_eq!(*at_first_read.lock().unwrap(), Some(2));
}
