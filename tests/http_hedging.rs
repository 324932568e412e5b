//! Hedged requests: a second attempt to another instance while the first is still out.
//!
//! The slow instance is a server that holds every request until the test releases it, and
//! notices when the client gives up on one (the connection closes): so every assertion is on
//! counts and states, none on time. A hedge after `Duration::ZERO` is due as soon as the call
//! starts, before any server can have answered.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use waypost::http::{Hedge, HttpClient, HttpClientBuilder, RetryBudget, StatusCode};
use waypost::{Balancer, ServiceInstance, WatchEvent};
use waypost_conformance::scenarios::eventually;
// Always the first instance by id, so that the held one ("a-held") is tried first.
use waypost::testing::First;

/// A server that reads each request and answers `200 held` only once released (or `500` once
/// told to fail); a request whose connection closes before that counts as cancelled.
struct Held {
    addr: SocketAddr,
    arrived: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
    fail: Arc<Semaphore>,
}

async fn held_server() -> Held {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Semaphore::new(0));
    let fail = Arc::new(Semaphore::new(0));
    let (a, c, r, f) = (
        arrived.clone(),
        cancelled.clone(),
        release.clone(),
        fail.clone(),
    );
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (arrived, cancelled, release, fail) = (a.clone(), c.clone(), r.clone(), f.clone());
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                tokio::select! {
                    permit = release.acquire() => {
                        permit.unwrap().forget();
                        let _ = sock
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nheld")
                            .await;
                    }
                    permit = fail.acquire() => {
                        permit.unwrap().forget();
                        let _ = sock
                            .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                    }
                    // The client closed the connection: it gave up on this request.
                    _ = sock.read(&mut buf) => {
                        cancelled.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    Held {
        addr,
        arrived,
        cancelled,
        release,
        fail,
    }
}

/// A server that answers `200 fast` at once (or `500` when `failing`), counting requests.
async fn quick_server(failing: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let count = count.clone();
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            if failing {
                (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "failing")
            } else {
                (axum::http::StatusCode::OK, "fast")
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

fn instance(id: &str, addr: SocketAddr) -> ServiceInstance {
    ServiceInstance::builder("users", id)
        .host(addr.ip().to_string())
        .port(addr.port())
        .build()
        .unwrap()
}

/// A client over "a-held" (picked first) and "b-fast", with the retry metrics of service
/// `users` recorded in a recorder of the test's own.
fn setup(
    held: &Held,
    fast: SocketAddr,
    configure: impl FnOnce(HttpClientBuilder) -> HttpClientBuilder,
) -> (HttpClient, Balancer, Snapshotter) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let (client, balancer) = metrics::with_local_recorder(&recorder, || {
        let balancer = Balancer::builder(First)
            .service("users".parse().unwrap())
            .build();
        balancer.apply(WatchEvent::Snapshot(vec![
            instance("a-held", held.addr),
            instance("b-fast", fast),
        ]));
        let client = configure(HttpClient::builder(balancer.clone()))
            .build()
            .unwrap();
        (client, balancer)
    });
    (client, balancer, snapshotter)
}

fn state(balancer: &Balancer, id: &str) -> (u64, u64, u64) {
    let e = balancer
        .endpoints()
        .into_iter()
        .find(|e| e.id().as_str() == id)
        .unwrap();
    let s = e.state();
    (s.in_flight(), s.successes(), s.failures())
}

/// The value of counter `name` for service `users` (the recorder drains what it hands out,
/// so take one snapshot per check).
fn counter(snapshotter: &Snapshotter, name: &str) -> u64 {
    snapshot(snapshotter).get(name).copied().unwrap_or(0)
}

/// Every counter of service `users`, by name, in one snapshot.
fn snapshot(snapshotter: &Snapshotter) -> std::collections::BTreeMap<String, u64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| {
            k.key()
                .labels()
                .any(|l| l.key() == "service" && l.value() == "users")
        })
        .filter_map(|(k, .., v)| match v {
            DebugValue::Counter(c) => Some((k.key().name().to_owned(), c)),
            _ => None,
        })
        .collect()
}

/// Waits until the held server has `n` requests in hand.
async fn arrived(held: &Held, n: usize) {
    eventually(
        Duration::from_secs(10),
        "the request reached the held server",
        || async {
            match held.arrived.load(Ordering::SeqCst) {
                seen if seen >= n => Ok(()),
                seen => Err(format!("{seen} arrived")),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn the_hedge_wins_and_the_slow_attempt_is_cancelled() {
    let held = held_server().await;
    let (fast, fast_hits) = quick_server(false).await;
    let (client, balancer, metrics) = setup(&held, fast, |b| b.hedge(Hedge::after(Duration::ZERO)));

    let response = client.get("/users/7").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.instance().id().as_str(), "b-fast");
    assert_eq!(response.attempts(), 2);
    assert_eq!(response.text().await.unwrap(), "fast");
    assert_eq!(fast_hits.load(Ordering::SeqCst), 1);

    // The held server got its copy, and saw the client give up on it.
    eventually(
        Duration::from_secs(10),
        "the slow attempt cancelled",
        || async {
            match held.cancelled.load(Ordering::SeqCst) {
                1 => Ok(()),
                n => Err(format!("{n} cancelled")),
            }
        },
    )
    .await;
    assert_eq!(held.arrived.load(Ordering::SeqCst), 1);
    // The loser is neither a success nor a failure of its instance: cancelled.
    assert_eq!(state(&balancer, "a-held"), (0, 0, 0));
    assert_eq!(state(&balancer, "b-fast"), (0, 1, 0));
    let snapshot = snapshot(&metrics);
    assert_eq!(snapshot.get("waypost_hedges_total"), Some(&1));
    assert_eq!(snapshot.get("waypost_hedges_won_total"), Some(&1));
}

#[tokio::test]
async fn no_hedge_before_its_delay() {
    let held = held_server().await;
    let (fast, fast_hits) = quick_server(false).await;
    let (client, balancer, _) = setup(&held, fast, |b| {
        b.hedge(Hedge::after(Duration::from_secs(3600)))
    });
    let call = tokio::spawn(async move { client.get("/users/7").send().await });
    arrived(&held, 1).await;
    held.release.add_permits(1);
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.instance().id().as_str(), "a-held");
    assert_eq!(response.attempts(), 1);
    assert_eq!(fast_hits.load(Ordering::SeqCst), 0);
    // In flight until its body is read.
    assert_eq!(state(&balancer, "a-held"), (1, 0, 0));
    response.text().await.unwrap();
    assert_eq!(state(&balancer, "a-held"), (0, 1, 0));
}

#[tokio::test]
async fn the_observed_p95_is_the_delay_once_known() {
    let held = held_server().await;
    let (fast, fast_hits) = quick_server(false).await;
    // Until 20 answers were seen the delay is an hour: only the observed one can fire.
    let (client, balancer, _) = setup(&held, fast, |b| {
        b.hedge(Hedge::p95(Duration::from_secs(3600)))
    });
    // Warm up on the fast instance alone.
    balancer.apply(WatchEvent::Snapshot(vec![instance("b-fast", fast)]));
    for _ in 0..20 {
        client.get("/warm-up").send().await.unwrap();
    }
    balancer.apply(WatchEvent::Snapshot(vec![
        instance("a-held", held.addr),
        instance("b-fast", fast),
    ]));
    let response = client.get("/users/7").send().await.unwrap();
    assert_eq!(response.instance().id().as_str(), "b-fast");
    assert_eq!(response.attempts(), 2);
    assert_eq!(fast_hits.load(Ordering::SeqCst), 21);
    assert_eq!(held.arrived.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn hedges_take_retry_budget_and_a_spent_budget_sends_none() {
    // One token per call: the hedge takes it.
    let held = held_server().await;
    let (fast, _) = quick_server(false).await;
    let budget = RetryBudget::new(1.0, 0).unwrap();
    let shared = budget.clone();
    let (client, _, metrics) = setup(&held, fast, move |b| {
        b.hedge(Hedge::after(Duration::ZERO)).retry_budget(shared)
    });
    let response = client.get("/users/7").send().await.unwrap();
    assert_eq!(response.attempts(), 2);
    assert_eq!(budget.available(), 0, "the hedge took the call's token");
    assert_eq!(counter(&metrics, "waypost_retries_total"), 1);

    // No budget: the hedge is refused (and counted so), the call waits for the held server.
    let held = held_server().await;
    let (fast, fast_hits) = quick_server(false).await;
    let (client, _, metrics) = setup(&held, fast, |b| {
        b.hedge(Hedge::after(Duration::ZERO))
            .retry_budget(RetryBudget::none())
    });
    let call = tokio::spawn(async move { client.get("/users/7").send().await });
    arrived(&held, 1).await;
    eventually(Duration::from_secs(10), "the hedge refused", || async {
        match counter(&metrics, "waypost_retry_budget_exhausted_total") {
            0 => Err("not yet".to_owned()),
            n => Ok(n),
        }
    })
    .await;
    held.release.add_permits(1);
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.instance().id().as_str(), "a-held");
    assert_eq!(response.attempts(), 1);
    assert_eq!(fast_hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn only_idempotent_requests_are_hedged_and_attempts_bound_them() {
    let held = held_server().await;
    let (fast, fast_hits) = quick_server(false).await;
    let (client, _, _) = setup(&held, fast, |b| b.hedge(Hedge::after(Duration::ZERO)));

    // A POST is not repeated: it waits for the instance it went to.
    let post = client.clone();
    let call = tokio::spawn(async move { post.post("/users").body("ada").send().await });
    arrived(&held, 1).await;
    held.release.add_permits(1);
    let response = call.await.unwrap().unwrap();
    assert_eq!(
        (response.instance().id().as_str(), response.attempts()),
        ("a-held", 1)
    );
    assert_eq!(fast_hits.load(Ordering::SeqCst), 0);

    // Marked idempotent, it is.
    let response = client
        .post("/users")
        .body("ada")
        .idempotent(true)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (response.instance().id().as_str(), response.attempts()),
        ("b-fast", 2)
    );

    // The held copy of that POST was given up on; once the server saw it go, the next
    // release can only answer the next request.
    eventually(
        Duration::from_secs(10),
        "the held POST cancelled",
        || async {
            match held.cancelled.load(Ordering::SeqCst) {
                1 => Ok(()),
                n => Err(format!("{n} cancelled")),
            }
        },
    )
    .await;

    // One attempt in all leaves no room for a hedge: such a client is refused.
    let err = HttpClient::builder(Balancer::new(First))
        .hedge(Hedge::after(Duration::ZERO))
        .max_attempts(1)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max_attempts is 1"), "{err}");
}

#[tokio::test]
async fn a_failed_hedge_leaves_the_call_to_the_first_attempt() {
    // The hedge goes to a failing instance; with no budget left for a retry, the call still
    // gets the answer of the attempt that was out first.
    let held = held_server().await;
    let (failing, failing_hits) = quick_server(true).await;
    let (client, balancer, metrics) = setup(&held, failing, |b| {
        b.hedge(Hedge::after(Duration::ZERO)).max_attempts(2)
    });
    let call = tokio::spawn(async move { client.get("/users/7").send().await });
    arrived(&held, 1).await;
    eventually(Duration::from_secs(10), "the hedge failed", || async {
        match failing_hits.load(Ordering::SeqCst) {
            0 => Err("not yet".to_owned()),
            n => Ok(n),
        }
    })
    .await;
    held.release.add_permits(1);
    let response = call.await.unwrap().unwrap();
    assert_eq!(
        (response.instance().id().as_str(), response.attempts()),
        ("a-held", 2)
    );
    assert_eq!(response.text().await.unwrap(), "held");
    assert_eq!(state(&balancer, "b-fast"), (0, 0, 1));
    assert_eq!(state(&balancer, "a-held"), (0, 1, 0));
    // Sent, and not the answer.
    let snapshot = snapshot(&metrics);
    assert_eq!(snapshot.get("waypost_hedges_total"), Some(&1));
    assert_eq!(snapshot.get("waypost_hedges_won_total"), Some(&0));
}

#[tokio::test]
async fn a_hedge_still_out_is_waited_for_when_no_instance_is_left_to_retry_on() {
    // Both attempts are out when the instances leave the balancer; the first then fails, and
    // its retry finds no instance: the call still gets the hedge's answer.
    let first = held_server().await;
    let hedge = held_server().await;
    let balancer = Balancer::builder(First).keep_last_on_empty(false).build();
    balancer.apply(WatchEvent::Snapshot(vec![
        instance("a-held", first.addr),
        instance("b-held", hedge.addr),
    ]));
    let a = balancer.endpoints()[0].clone();
    assert_eq!(a.id().as_str(), "a-held");
    let client = HttpClient::builder(balancer.clone())
        .hedge(Hedge::after(Duration::ZERO))
        .build()
        .unwrap();
    let call = tokio::spawn(async move { client.get("/users/7").send().await });
    arrived(&first, 1).await;
    arrived(&hedge, 1).await;
    balancer.apply(WatchEvent::Snapshot(Vec::new()));
    assert!(balancer.endpoints().is_empty());

    first.fail.add_permits(1);
    eventually(
        Duration::from_secs(10),
        "the first attempt failed",
        || async {
            match a.state().failures() {
                1 => Ok(()),
                n => Err(format!("{n} failures")),
            }
        },
    )
    .await;
    hedge.release.add_permits(1);
    let response = call.await.unwrap().unwrap();
    assert_eq!(
        (response.instance().id().as_str(), response.attempts()),
        ("b-held", 2)
    );
    assert_eq!(response.text().await.unwrap(), "held");
}
