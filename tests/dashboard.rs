//! The Grafana dashboard (`dashboards/waypost.json`) queries only metrics that exist: every
//! metric name in its PromQL appears in a real scrape of a small workload, served by the same
//! recorder and endpoint the examples use (`examples/common`, with the same histogram buckets).
//!
//! The workload (memory backend): a healthy and a failing (500) instance behind a balancer with
//! outlier ejection, so that requests fail, are retried elsewhere and the failing instance is
//! ejected; a client without retry budget on a second service, so that a retry is refused; and
//! one injected watch error, since the in-process backend never fails on its own; a balancer
//! with two failover tiers; and a hedging client beside an instance that never answers.

#[path = "../examples/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::StatusCode;
use futures::StreamExt;
use waypost::http::{Hedge, HttpClient, RetryBudget};
use waypost::memory::Memory;
use waypost::strategies::resilience::{OutlierEjection, Resilient};
use waypost::strategies::RoundRobin;
use waypost::{Balancer, Discovery, Error, Registration, Registry, ServiceName};

use common::scrape::{self, Scrape};

/// The metrics the library documents (README, "Observability"): the dashboard shows each.
const DOCUMENTED: &[&str] = &[
    "waypost_requests_total",
    "waypost_requests_active",
    "waypost_request_duration_seconds",
    "waypost_membership_total",
    "waypost_membership_served",
    "waypost_fail_static",
    "waypost_tier_share",
    "waypost_watch_events_total",
    "waypost_watch_errors_total",
    "waypost_retries_total",
    "waypost_retry_budget_exhausted_total",
    "waypost_hedges_total",
    "waypost_hedges_won_total",
    "waypost_ejections_active",
    "waypost_panic_mode",
    "waypost_ejections_total",
    "waypost_registration_live",
    "waypost_heartbeat_failures_total",
];

fn dashboard() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/waypost.json");
    let text = std::fs::read_to_string(path).expect("dashboards/waypost.json is readable");
    serde_json::from_str(&text).expect("dashboards/waypost.json is JSON")
}

/// Every string under a key `expr` (panel queries) or `definition`/`query` (template variables).
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The `waypost_[a-z_]+` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("waypost_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// A histogram's series name back to the metric's name.
fn base_name(series: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .unwrap_or(series)
}

#[test]
fn the_dashboard_is_importable_and_filtered_by_service() {
    let d = dashboard();
    assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(d["__inputs"][0]["pluginId"], "prometheus");
    let vars = d["templating"]["list"].as_array().unwrap();
    let service = vars.iter().find(|v| v["name"] == "service").unwrap();
    assert_eq!(service["datasource"]["uid"], "${DS_PROMETHEUS}");
    let panels: Vec<_> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    assert!(panels.len() >= 10, "{}", panels.len());
    let mut ids = BTreeSet::new();
    for p in &panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "unique panel ids");
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains(r#"service=~"$service""#), "{expr}");
        }
    }
    let titles: Vec<_> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "Traffic share per instance",
        "Failures",
        "Latency percentiles",
        "Membership: total vs served",
        "Fail-static",
        "Failover tier share",
        "Ejections",
        "Panic mode",
        "Registration liveness",
    ] {
        assert!(titles.contains(&wanted), "{wanted} in {titles:?}");
    }

    // Each documented metric is on the dashboard, and nothing else is.
    let mut exprs = Vec::new();
    queries(&d, &mut exprs);
    let used: BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .map(|n| base_name(&n).to_owned())
        .collect();
    let documented: BTreeSet<String> = DOCUMENTED.iter().map(|s| s.to_string()).collect();
    assert_eq!(used, documented);
}

/// An instance whose every answer is 500.
async fn failing_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async { StatusCode::INTERNAL_SERVER_ERROR });
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, task)
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_in_a_real_scrape() {
    let mut exprs = Vec::new();
    queries(&dashboard(), &mut exprs);
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(
        wanted.contains("waypost_request_duration_seconds_bucket"),
        "{wanted:?}"
    );

    // The recorder first: handles made before it would record nowhere.
    let endpoint = common::MetricsServer::start("127.0.0.1:0").await.unwrap();

    let memory = Memory::new();
    let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good = common::UserService::start(good, "dash-good").unwrap();
    let (bad_addr, bad_task) = failing_server().await;
    let register = |service: &str, id: &str, port: u16| {
        Registration::builder(service, id)
            .host("127.0.0.1")
            .port(port)
            .build()
            .unwrap()
    };
    let mut handles = Vec::new();
    for service in ["dash", "dash-budget"] {
        handles.push(
            memory
                .register(register(service, "dash-good", good.addr().port()))
                .await
                .unwrap(),
        );
        handles.push(
            memory
                .register(register(service, "dash-bad", bad_addr.port()))
                .await
                .unwrap(),
        );
    }

    // Service `dash`: one watch error, then the memory watch; ejection after one failure.
    let dash: ServiceName = "dash".parse().unwrap();
    let outage = Error::unavailable("injected", "watch", "an outage injected by the test");
    let watch = futures::stream::once(async move { Err(outage) })
        .chain(memory.watch(&dash))
        .boxed();
    let strategy = Resilient::new(RoundRobin::new()).outlier_ejection(OutlierEjection {
        consecutive_failures: 1,
        ..OutlierEjection::default()
    });
    let balancer = Balancer::builder(strategy)
        .service(dash.clone())
        .build_from_watch(watch);
    assert!(balancer.wait_ready(Duration::from_secs(5)).await);
    let client = HttpClient::builder(balancer)
        .request_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for n in 1..=10 {
        let r = client.get(format!("/users/{n}")).send().await.unwrap();
        // A 500 is retried on the healthy instance.
        assert_eq!(r.status(), 200);
    }

    // Service `dash-budget`: no retry budget, so the failing instance's 500 is not retried.
    let budget: ServiceName = "dash-budget".parse().unwrap();
    let balancer = Balancer::watch(&memory, &budget, RoundRobin::new());
    assert!(balancer.wait_ready(Duration::from_secs(5)).await);
    let stingy = HttpClient::builder(balancer)
        .retry_budget(RetryBudget::none())
        .build()
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(
            stingy
                .get("/users/1")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    statuses.sort();
    assert_eq!(statuses, [200, 500]);

    // Service `dash-tiers`: two failover tiers over the same registry.
    let tiered: ServiceName = "dash-tiers".parse().unwrap();
    handles.push(
        memory
            .register(register("dash-tiers", "dash-good", good.addr().port()))
            .await
            .unwrap(),
    );
    let balancer = Balancer::builder(RoundRobin::new())
        .tier("near", &memory, &tiered)
        .tier("far", &memory, &tiered)
        .build();
    assert!(balancer.wait_ready(Duration::from_secs(5)).await);

    // Service `dash-hedge`: one instance accepts and never answers, so that the requests that
    // go to it first are hedged, and the hedge's answer wins.
    let hangs = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hangs_port = hangs.local_addr().unwrap().port();
    let hangs_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hangs.accept().await {
            held.push(socket);
        }
    });
    let hedged: ServiceName = "dash-hedge".parse().unwrap();
    for (id, port) in [
        ("dash-good", good.addr().port()),
        ("dash-hangs", hangs_port),
    ] {
        handles.push(
            memory
                .register(register("dash-hedge", id, port))
                .await
                .unwrap(),
        );
    }
    let balancer = Balancer::watch(&memory, &hedged, RoundRobin::new());
    assert!(balancer.wait_ready(Duration::from_secs(5)).await);
    let hedging = HttpClient::builder(balancer)
        .request_timeout(Duration::from_secs(5))
        .hedge(Hedge::after(Duration::from_millis(20)))
        .build()
        .unwrap();
    for _ in 0..4 {
        let r = hedging.get("/users/1").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    let scrape = scrape::get(endpoint.addr()).await;
    let present = scrape.names();
    let missing: Vec<_> = wanted
        .iter()
        .filter(|n| !present.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, absent from the scrape:\n{}",
        scrape.text
    );

    // And the workload is what made them: the interesting ones moved.
    check_workload(&scrape);

    for h in handles {
        h.shutdown().await.unwrap();
    }
    good.stop().await.unwrap();
    bad_task.abort();
    hangs_task.abort();
    endpoint.stop().await.unwrap();
}

fn check_workload(scrape: &Scrape) {
    let dash = [("service", "dash")];
    let failures = [("service", "dash"), ("outcome", "failure")];
    assert!(scrape.sum("waypost_requests_total", &failures) >= 1.0);
    assert!(scrape.value("waypost_retries_total", &dash).unwrap() >= 1.0);
    assert!(scrape.value("waypost_ejections_total", &dash).unwrap() >= 1.0);
    assert_eq!(scrape.value("waypost_ejections_active", &dash), Some(1.0));
    assert_eq!(scrape.value("waypost_membership_total", &dash), Some(2.0));
    assert_eq!(scrape.value("waypost_membership_served", &dash), Some(1.0));
    let injected = [("service", "dash"), ("backend", "injected")];
    assert_eq!(
        scrape.value("waypost_watch_errors_total", &injected),
        Some(1.0)
    );
    assert_eq!(scrape.value("waypost_fail_static", &dash), Some(0.0));
    let near = [("service", "dash-tiers"), ("tier", "near")];
    let far = [("service", "dash-tiers"), ("tier", "far")];
    assert_eq!(scrape.value("waypost_tier_share", &near), Some(1.0));
    assert_eq!(scrape.value("waypost_tier_share", &far), Some(0.0));
    let budget = [("service", "dash-budget")];
    assert_eq!(
        scrape.value("waypost_retry_budget_exhausted_total", &budget),
        Some(1.0)
    );
    let hedge = [("service", "dash-hedge")];
    let hedges = scrape.value("waypost_hedges_total", &hedge).unwrap();
    let won = scrape.value("waypost_hedges_won_total", &hedge).unwrap();
    assert!(hedges >= 1.0 && won >= 1.0, "{hedges} hedges, {won} won");
    let live = [("service", "dash"), ("instance", "dash-good")];
    assert_eq!(scrape.value("waypost_registration_live", &live), Some(1.0));
    let buckets = scrape.select("waypost_request_duration_seconds_bucket", &dash);
    assert!(buckets.count() > common::REQUEST_DURATION_BUCKETS.len());
}
