//! tower's own `Balance` over `waypost::tower::discover` of a real Consul watch: an added
//! instance gets traffic, a removed one stops getting it, and a Consul outage fails no request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use tower::balance::p2c::Balance;
use tower::load::Constant;
use tower::{service_fn, Service, ServiceExt};
use waypost::consul::Consul;
use waypost::{Discovery, HealthCheck, Registration, Registry, ServiceInstance};
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::gate::Gate;

/// An HTTP server that answers every request with its name.
async fn named_server(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || async move { name });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn registration(id: &str, addr: SocketAddr) -> Registration {
    Registration::builder("tower-users", id)
        .host(addr.ip().to_string())
        .port(addr.port())
        .check(HealthCheck::ttl(Duration::from_secs(30)))
        .build()
        .unwrap()
}

type Call =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, reqwest::Error>> + Send>>;

/// The per-instance service: GET / on the instance, the body as the answer.
fn make(
    http: reqwest::Client,
) -> impl FnMut(
    &ServiceInstance,
) -> Constant<tower::util::BoxCloneSyncService<(), String, reqwest::Error>, u8> {
    move |instance: &ServiceInstance| {
        let url = format!("http://{}/", instance.authority());
        let http = http.clone();
        let svc = service_fn(move |()| -> Call {
            let (http, url) = (http.clone(), url.clone());
            Box::pin(async move { http.get(url).send().await?.text().await })
        });
        Constant::new(tower::util::BoxCloneSyncService::new(svc), 1)
    }
}

/// Sends `n` requests one after the other; counts the answers by server name, and the errors.
async fn send<S>(balance: &mut S, n: usize) -> (BTreeMap<String, usize>, usize)
where
    S: Service<(), Response = String>,
    S::Error: std::fmt::Display,
{
    let mut by = BTreeMap::new();
    let mut errors = 0;
    for _ in 0..n {
        let ready = tokio::time::timeout(Duration::from_secs(5), balance.ready())
            .await
            .expect("the balancer is ready within 5 s");
        match ready {
            Ok(svc) => match svc.call(()).await {
                Ok(name) => *by.entry(name).or_default() += 1,
                Err(e) => {
                    eprintln!("request failed: {e}");
                    errors += 1;
                }
            },
            Err(e) => {
                eprintln!("not ready: {e}");
                errors += 1;
            }
        }
    }
    (by, errors)
}

/// Sends rounds of 20 requests until `done` holds for one round (10 s at most).
async fn until<S>(
    balance: &mut S,
    what: &str,
    done: impl Fn(&BTreeMap<String, usize>, usize) -> bool,
) where
    S: Service<(), Response = String>,
    S::Error: std::fmt::Display,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (by, errors) = send(balance, 20).await;
        if done(&by, errors) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 10 s; last round {by:?}, {errors} errors"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_balance_follows_a_real_consul_watch() {
    let server = ConsulServer::start().await;
    let gate = Gate::start(server.addr().parse().unwrap()).await.unwrap();
    let consul = Consul::builder()
        .address(gate.addr().to_string())
        .retry_backoff(Duration::from_millis(50), Duration::from_secs(1))
        .build()
        .unwrap();
    let (a, b) = (named_server("a").await, named_server("b").await);
    let reg_a = consul.register(registration("a", a)).await.unwrap();

    // Counts the watch's errors on the way, so that the test knows the outage was noticed.
    let errors_seen = Arc::new(AtomicUsize::new(0));
    let seen = errors_seen.clone();
    let watch = consul
        .watch(&"tower-users".parse().unwrap())
        .inspect(move |item| {
            if item.is_err() {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        })
        .boxed();
    let mut balance = Balance::new(waypost::tower::discover(
        watch,
        make(reqwest::Client::new()),
    ));
    let (by, errors) = send(&mut balance, 20).await;
    assert_eq!((by.get("a"), errors), (Some(&20), 0), "{by:?}");

    // An added instance gets traffic.
    let reg_b = consul.register(registration("b", b)).await.unwrap();
    until(&mut balance, "b gets traffic", |by, errors| {
        by.contains_key("b") && errors == 0
    })
    .await;

    // A Consul outage: the watch errs, tower's balancer never hears of it, no request fails.
    gate.cut();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut sent = 0;
    while errors_seen.load(Ordering::Relaxed) == 0 {
        let (by, errors) = send(&mut balance, 10).await;
        assert_eq!(errors, 0, "a request failed during the outage: {by:?}");
        sent += 10;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch never noticed the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (by, errors) = send(&mut balance, 40).await;
    assert_eq!(
        errors, 0,
        "a request failed after the watch failed: {by:?} ({sent} before)"
    );
    assert_eq!(by.values().sum::<usize>(), 40);
    gate.mend();

    // A removed instance stops getting traffic.
    reg_a.shutdown().await.unwrap();
    until(&mut balance, "a gets no more traffic", |by, errors| {
        !by.contains_key("a") && by.get("b") == Some(&20) && errors == 0
    })
    .await;
    reg_b.shutdown().await.unwrap();
}

/// An HTTP server that answers every request with 500.
async fn failing_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down") });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypost_balanced_over_a_real_consul_balancer_retries_around_a_failing_instance() {
    use waypost::tower::{Balanced, Class, Retry};
    let server = ConsulServer::start().await;
    let consul = Consul::builder().address(server.addr()).build().unwrap();
    let (good, bad) = (named_server("good").await, failing_server().await);
    let _g = consul.register(registration("good", good)).await.unwrap();
    let _b = consul.register(registration("bad", bad)).await.unwrap();
    let balancer = waypost::Balancer::watch(
        &consul,
        &"tower-users".parse().unwrap(),
        waypost::strategies::RoundRobin::new(),
    );
    eventually_two(&balancer).await;

    let http = reqwest::Client::new();
    let make = move |i: &ServiceInstance| {
        let url = format!("http://{}/", i.authority());
        let http = http.clone();
        tower::util::BoxCloneSyncService::new(service_fn(move |()| -> Call {
            let (http, url) = (http.clone(), url.clone());
            Box::pin(async move {
                let r = http.get(url).send().await?.error_for_status()?;
                r.text().await
            })
        }))
    };
    let classify = |r: Result<&String, &reqwest::Error>| match r {
        Ok(_) => Class::SUCCESS,
        Err(e) if e.is_connect() => Class::failure(Retry::NotSent),
        Err(_) => Class::failure(Retry::IfIdempotent),
    };
    let svc = Balanced::builder(balancer.clone(), make)
        .classify(classify)
        .retries(
            2,
            waypost::retry::RetryBudget::new(1.0, 10).unwrap(),
            |_| Some(()),
            |_| true,
        )
        .build();
    for _ in 0..20 {
        let answer = svc.clone().oneshot(()).await.unwrap();
        assert_eq!(answer, "good");
    }
    let failures = |id: &str| {
        balancer
            .endpoints()
            .iter()
            .find(|e| e.id().as_str() == id)
            .map(|e| (e.state().successes(), e.state().failures()))
    };
    let (bad_ok, bad_failed) = failures("bad").unwrap();
    assert_eq!(bad_ok, 0);
    assert!(
        bad_failed > 0,
        "round-robin sent some requests to bad first"
    );
    assert_eq!(failures("good").unwrap().0, 20);
}

async fn eventually_two(balancer: &waypost::Balancer) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while balancer.instances().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            balancer.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
