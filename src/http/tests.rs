//! The client against real HTTP servers on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode as AxumStatus;
use axum::response::IntoResponse;
use tokio::io::AsyncReadExt;
use waypost_core::{
    Balancer, Endpoint, PickContext, Picker, ServiceInstance, Strategy, WatchEvent,
};

use super::*;

// Always the first instance by id: makes "the failing one is tried first" deterministic.
use waypost_core::testing::First;

/// Remembers the hash of the last pick's context.
struct SeeKey(Arc<AtomicU64>);
struct SeeKeyPicker(Arc<AtomicU64>);
impl Strategy for SeeKey {
    fn name(&self) -> &str {
        "see-key"
    }
    fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(SeeKeyPicker(self.0.clone()))
    }
}
impl Picker for SeeKeyPicker {
    fn pick(&self, e: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        self.0.store(ctx.hash().unwrap_or(0), Ordering::SeqCst);
        (!e.is_empty()).then_some(0)
    }
}

#[derive(Clone, Copy)]
enum Behavior {
    /// 200 with the request body echoed.
    Ok,
    /// 500.
    Fail,
    /// Answers 200 after this long.
    Slow(Duration),
    /// Answers 200 with a body that breaks off after its first part.
    BreaksOff,
}

struct Server {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn server(behavior: Behavior) -> Server {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move |body: bytes::Bytes| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            match behavior {
                Behavior::Ok => (AxumStatus::OK, body).into_response(),
                Behavior::Fail => AxumStatus::INTERNAL_SERVER_ERROR.into_response(),
                Behavior::Slow(d) => {
                    tokio::time::sleep(d).await;
                    AxumStatus::OK.into_response()
                }
                Behavior::BreaksOff => {
                    use futures::StreamExt;
                    // The break comes after a pause, so that the head and the first part
                    // leave before it.
                    let first = futures::stream::once(async {
                        Ok(bytes::Bytes::from_static(b"the first part"))
                    });
                    let parts = first.chain(futures::stream::once(async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err(std::io::Error::other("the instance broke off"))
                    }));
                    (AxumStatus::OK, axum::body::Body::from_stream(parts)).into_response()
                }
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server { addr, hits }
}

/// A server that reads a request and closes the connection without answering.
async fn hang_up_server() -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            drop(sock);
        }
    });
    Server { addr, hits }
}

/// A loopback port nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn instance(id: &str, addr: SocketAddr) -> ServiceInstance {
    ServiceInstance::builder("svc", id)
        .host(addr.ip().to_string())
        .port(addr.port())
        .build()
        .unwrap()
}

fn balancer(strategy: impl Strategy, instances: Vec<ServiceInstance>) -> Balancer {
    let b = Balancer::new(strategy);
    b.apply(WatchEvent::Snapshot(instances));
    b
}

fn state(b: &Balancer, id: &str) -> Endpoint {
    b.endpoints()
        .into_iter()
        .find(|e| e.id().as_str() == id)
        .unwrap()
}

#[tokio::test]
async fn outcomes_reach_the_endpoint_state() {
    let ok = server(Behavior::Ok).await;
    let bad = server(Behavior::Fail).await;
    let b = balancer(First, vec![instance("a-ok", ok.addr)]);
    let client = HttpClient::builder(b.clone())
        .max_attempts(1)
        .build()
        .unwrap();
    for _ in 0..3 {
        let r = client.get("/x").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let a = state(&b, "a-ok");
    assert_eq!((a.state().successes(), a.state().failures()), (3, 0));
    assert_eq!(a.state().in_flight(), 0);
    assert!(a.state().ewma_latency().is_some());

    // A 5xx answer is a failure for the balancer, and still an answer for the caller.
    b.apply(WatchEvent::Snapshot(vec![instance("b-bad", bad.addr)]));
    let r = client.get("/x").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(matches!(
        r.error_for_status(),
        Err(HttpError::Status { .. })
    ));
    let s = state(&b, "b-bad");
    assert_eq!((s.state().successes(), s.state().failures()), (0, 1));
    assert_eq!(s.state().in_flight(), 0);
}

/// The call is in flight until its body is read, and a body that breaks off is a failure of
/// the instance; one read whole, or dropped unread, a success.
#[tokio::test]
async fn a_call_lasts_until_its_body_is_read_and_a_broken_body_is_a_failure() {
    let ok = server(Behavior::Ok).await;
    let broken = server(Behavior::BreaksOff).await;
    let b = balancer(First, vec![instance("a", ok.addr)]);
    let client = HttpClient::builder(b.clone())
        .max_attempts(1)
        .build()
        .unwrap();
    let counts = |id: &str| {
        let e = state(&b, id);
        let s = e.state();
        (s.in_flight(), s.successes(), s.failures())
    };

    let r = client.post("/x").body("hello").send().await.unwrap();
    assert_eq!(counts("a"), (1, 0, 0), "in flight until the body is read");
    assert_eq!(r.text().await.unwrap(), "hello");
    assert_eq!(counts("a"), (0, 1, 0));
    drop(client.get("/x").send().await.unwrap());
    assert_eq!(
        counts("a"),
        (0, 2, 0),
        "dropped unread: the instance answered"
    );
    let not_json = client.post("/x").body("{not json").send().await.unwrap();
    assert!(not_json.json::<serde_json::Value>().await.is_err());
    assert_eq!(
        counts("a"),
        (0, 3, 0),
        "read whole: the caller's type is not the instance's fault"
    );

    // Chunk by chunk: in flight until the end.
    let mut r = client.post("/x").body("chunks").send().await.unwrap();
    assert_eq!(r.chunk().await.unwrap().as_deref(), Some(&b"chunks"[..]));
    assert_eq!(counts("a").0, 1);
    assert_eq!(r.chunk().await.unwrap(), None);
    assert_eq!(counts("a"), (0, 4, 0));

    b.apply(WatchEvent::Snapshot(vec![instance("b", broken.addr)]));
    let r = client.get("/x").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(counts("b"), (1, 0, 0));
    let err = r.bytes().await.unwrap_err();
    assert!(matches!(err, HttpError::Body { .. }), "{err:?}");
    assert_eq!(
        counts("b"),
        (0, 0, 1),
        "a body that broke off is the instance's failure"
    );
    // The same read chunk by chunk: the part that came, then the break.
    let mut r = client.get("/x").send().await.unwrap();
    assert_eq!(
        r.chunk().await.unwrap().as_deref(),
        Some(&b"the first part"[..])
    );
    assert_eq!(counts("b"), (1, 0, 1));
    let err = r.chunk().await.unwrap_err();
    assert!(matches!(err, HttpError::Body { .. }), "{err:?}");
    assert_eq!(counts("b"), (0, 0, 2));
}

#[tokio::test]
async fn a_failing_get_is_retried_on_another_instance() {
    let bad = server(Behavior::Fail).await;
    let ok = server(Behavior::Ok).await;
    let b = balancer(
        First,
        vec![instance("a-bad", bad.addr), instance("b-ok", ok.addr)],
    );
    let client = HttpClient::new(b.clone()).unwrap();
    let r = client.get("/users").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.instance().id().as_str(), "b-ok");
    assert_eq!(r.attempts(), 2);
    assert_eq!(bad.hits.load(Ordering::SeqCst), 1);
    assert_eq!(state(&b, "a-bad").state().failures(), 1);
    r.text().await.unwrap(); // the call ends with its body
    assert_eq!(state(&b, "b-ok").state().successes(), 1);
}

#[tokio::test]
async fn a_sent_post_is_not_retried() {
    let bad = server(Behavior::Fail).await;
    let ok = server(Behavior::Ok).await;
    let b = balancer(
        First,
        vec![instance("a-bad", bad.addr), instance("b-ok", ok.addr)],
    );
    let client = HttpClient::new(b.clone()).unwrap();
    let r = client.post("/users").body("x").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.attempts(), 1);
    assert_eq!(ok.hits.load(Ordering::SeqCst), 0);

    // The connection breaks after the request went out: still not repeated.
    let hangup = hang_up_server().await;
    b.apply(WatchEvent::Snapshot(vec![
        instance("a-hangup", hangup.addr),
        instance("b-ok", ok.addr),
    ]));
    let err = client.post("/users").body("x").send().await.unwrap_err();
    assert!(
        matches!(
            err,
            HttpError::Transport {
                gave_up: GaveUp::NotIdempotent,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("idempotent"), "{err}");
    assert_eq!(ok.hits.load(Ordering::SeqCst), 0);
    assert_eq!(hangup.hits.load(Ordering::SeqCst), 1);

    // The same GET is retried.
    let r = client.get("/users").send().await.unwrap();
    assert_eq!(r.instance().id().as_str(), "b-ok");
}

#[tokio::test]
async fn a_post_marked_idempotent_is_retried() {
    let bad = server(Behavior::Fail).await;
    let ok = server(Behavior::Ok).await;
    let b = balancer(
        First,
        vec![instance("a-bad", bad.addr), instance("b-ok", ok.addr)],
    );
    let client = HttpClient::new(b).unwrap();
    let r = client
        .post("/users")
        .body("payload")
        .idempotent(true)
        .send()
        .await
        .unwrap();
    assert_eq!(r.instance().id().as_str(), "b-ok");
    // The body is sent again in full on the retry.
    assert_eq!(r.text().await.unwrap(), "payload");
}

#[tokio::test]
async fn a_connect_error_is_retried_even_for_post() {
    let dead = closed_port().await;
    let ok = server(Behavior::Ok).await;
    let b = balancer(
        First,
        vec![instance("a-dead", dead), instance("b-ok", ok.addr)],
    );
    let client = HttpClient::new(b.clone()).unwrap();
    let r = client.post("/users").body("x").send().await.unwrap();
    assert_eq!(r.instance().id().as_str(), "b-ok");
    assert_eq!(state(&b, "a-dead").state().failures(), 1);

    // With nowhere else to go the error says what happened and why it stopped.
    let only_dead = balancer(First, vec![instance("a-dead", dead)]);
    let client = HttpClient::builder(only_dead)
        .max_attempts(2)
        .build()
        .unwrap();
    let err = client.post("/users").send().await.unwrap_err();
    match &err {
        HttpError::Connect {
            attempts, gave_up, ..
        } => {
            assert_eq!(*attempts, 2);
            assert_eq!(gave_up, &GaveUp::AttemptsExhausted);
        }
        other => panic!("expected a connect error, got {other}"),
    }
    assert!(err.to_string().contains("could not connect"), "{err}");
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() {
    let a = server(Behavior::Fail).await;
    let c = server(Behavior::Fail).await;
    let b = balancer(First, vec![instance("a", a.addr), instance("c", c.addr)]);
    let budget = RetryBudget::new(0.2, 0).unwrap();
    let client = HttpClient::builder(b)
        .max_attempts(3)
        .retry_budget(budget.clone())
        .build()
        .unwrap();
    let mut gave_up_for_budget = 0;
    for _ in 0..100 {
        let r = client.get("/").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        if r.attempts() == 1 {
            gave_up_for_budget += 1;
        }
    }
    let hits = a.hits.load(Ordering::SeqCst) + c.hits.load(Ordering::SeqCst);
    // Without a budget: 300 hits. With it: the 100 calls plus about 20 % retries.
    assert!((101..=121).contains(&hits), "{hits} hits");
    assert!(gave_up_for_budget > 50, "{gave_up_for_budget}");
    assert_eq!(budget.available(), 0);
}

#[tokio::test]
async fn a_hanging_instance_is_left_after_the_per_try_timeout() {
    let slow = server(Behavior::Slow(Duration::from_secs(30))).await;
    let ok = server(Behavior::Ok).await;
    let b = balancer(
        First,
        vec![instance("a-slow", slow.addr), instance("b-ok", ok.addr)],
    );
    let client = HttpClient::builder(b.clone())
        .per_try_timeout(Duration::from_millis(300))
        .request_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let r = client.get("/").send().await.unwrap();
    assert_eq!(r.instance().id().as_str(), "b-ok");
    assert_eq!(state(&b, "a-slow").state().failures(), 1);
}

#[tokio::test]
async fn the_overall_timeout_gives_a_typed_error() {
    let slow = server(Behavior::Slow(Duration::from_secs(30))).await;
    let b = balancer(First, vec![instance("a-slow", slow.addr)]);
    let client = HttpClient::builder(b).build().unwrap();
    let err = client
        .get("/")
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    match &err {
        HttpError::Timeout {
            gave_up, attempts, ..
        } => {
            assert_eq!(gave_up, &GaveUp::Deadline);
            assert_eq!(*attempts, 1);
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(err.to_string().contains("request_timeout"), "{err}");
}

#[tokio::test]
async fn hash_keys_come_from_the_path_or_a_header() {
    let ok = server(Behavior::Ok).await;
    let seen = Arc::new(AtomicU64::new(0));
    let b = balancer(SeeKey(seen.clone()), vec![instance("a", ok.addr)]);
    let hash = |k: &[u8]| PickContext::new().with_key(k).hash().unwrap();

    let by_path = HttpClient::builder(b.clone())
        .hash_key(HashKey::Path)
        .build()
        .unwrap();
    by_path.get("/users/7?verbose=1").send().await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), hash(b"/users/7"));
    by_path
        .get("/users/7")
        .key("explicit")
        .send()
        .await
        .unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), hash(b"explicit"));

    let by_header = HttpClient::builder(b)
        .hash_key(HashKey::header("x-user").unwrap())
        .build()
        .unwrap();
    by_header
        .get("/")
        .header("x-user", "ada")
        .send()
        .await
        .unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), hash(b"ada"));
    by_header.get("/").send().await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 0, "no header, no key");
}

#[tokio::test]
async fn bad_input_fails_before_sending() {
    let ok = server(Behavior::Ok).await;
    let b = balancer(First, vec![instance("a", ok.addr)]);
    let client = HttpClient::new(b).unwrap();
    let err = client.get("users").send().await.unwrap_err();
    assert!(matches!(err, HttpError::InvalidRequest { .. }), "{err}");
    let err = client
        .get("/")
        .header("bad header", "v")
        .send()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("header name"), "{err}");
    assert_eq!(ok.hits.load(Ordering::SeqCst), 0);

    assert!(HashKey::header("bad header").is_err());
    let empty = Balancer::new(First);
    assert!(matches!(
        HttpClient::builder(empty.clone()).max_attempts(0).build(),
        Err(HttpError::Config { .. })
    ));
    assert!(HttpClient::builder(empty.clone())
        .connect_timeout(Duration::ZERO)
        .build()
        .is_err());
    let err = HttpClient::new(empty)
        .unwrap()
        .get("/")
        .send()
        .await
        .unwrap_err();
    assert!(matches!(err, HttpError::NoInstance { .. }), "{err}");
}

#[cfg(feature = "metrics")]
#[tokio::test]
async fn retries_and_an_exhausted_budget_are_counted_per_service() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let a = server(Behavior::Fail).await;
    let c = server(Behavior::Fail).await;
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let client = ::metrics::with_local_recorder(&recorder, || {
        let b = Balancer::builder(First)
            .service("svc".parse().unwrap())
            .build();
        b.apply(WatchEvent::Snapshot(vec![
            instance("a", a.addr),
            instance("c", c.addr),
        ]));
        HttpClient::builder(b)
            .max_attempts(3)
            .retry_budget(RetryBudget::new(0.2, 0).unwrap())
            .build()
            .unwrap()
    });
    let (mut calls, mut retried) = (0u64, 0u64);
    for _ in 0..20 {
        let r = client.get("/").send().await.unwrap();
        calls += 1;
        retried += u64::from(r.attempts() - 1);
    }
    // One snapshot: the debugging recorder drains what it hands out.
    let rows = snap.snapshot().into_vec();
    let count = |name: &str| {
        rows.iter()
            .find(|(k, ..)| {
                k.key().name() == name
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "service" && l.value() == "svc")
            })
            .map(|(.., v)| match v {
                DebugValue::Counter(c) => *c,
                other => panic!("{name} is not a counter: {other:?}"),
            })
    };
    assert!(retried > 0, "the budget allows some retries");
    assert_eq!(count("waypost_retries_total"), Some(retried));
    // Every call that failed with attempts left but was not retried was stopped by the budget.
    let exhausted = count("waypost_retry_budget_exhausted_total");
    assert!(
        exhausted.is_some_and(|n| n > 0 && n <= calls),
        "{exhausted:?}"
    );
}

/// The case: a caller's `tokio::time::timeout` around each call to a slow instance.
/// Without a threshold the ten give-ups are cancelled calls and the instance shows no failure;
/// with one, each is a failure with its latency, so ejection and load-aware strategies learn.
#[tokio::test]
async fn calls_given_up_on_from_outside_count_as_failures_past_the_threshold() {
    let slow = server(Behavior::Slow(Duration::from_secs(5))).await;
    let timeout = Duration::from_millis(50);
    for threshold in [None, Some(Duration::from_millis(40))] {
        let mut builder = Balancer::builder(First);
        if let Some(t) = threshold {
            builder = builder.cancel_is_failure_after(t);
        }
        let b = builder.build();
        b.apply(WatchEvent::Snapshot(vec![instance("slow", slow.addr)]));
        let client = HttpClient::new(b.clone()).unwrap();
        for _ in 0..10 {
            let given_up = tokio::time::timeout(timeout, client.get("/").send()).await;
            assert!(given_up.is_err(), "the slow instance answered");
        }
        let failures = state(&b, "slow").state().failures();
        match threshold {
            None => assert_eq!(failures, 0),
            Some(_) => assert_eq!(failures, 10),
        }
    }
}
