//! A thousand services watched from one process through one real agent with its default limits
//! (`limits.http_max_conns_per_client` = 200): every balancer gets its instance, no watch
//! reports an error, the process holds far fewer connections than the agent allows, and a
//! change to any one service reaches its balancer. Timings are in BENCHMARKS.md ("Many
//! services"), not asserted here.
//!
//! Needs a `consul` binary: `eval "$(scripts/fetch-servers)"`.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::scenarios::eventually;
use waypost_conformance::sockets::established_to;
use waypost_conformance::watch_errors::CountingDiscovery;
use waypost_consul::{Consul, DEFAULT_MAX_BLOCKING_WATCHES};
use waypost_core::{Balancer, ServiceName};
use waypost_strategies::RoundRobin;

const SERVICES: usize = 1000;

/// Guards against a hang only; how long it takes is measured by the `services` example.
const BOUND: Duration = Duration::from_secs(60);

/// The agent's default per-client connection limit.
const AGENT_LIMIT: usize = 200;

fn service(i: usize) -> String {
    format!("svc-{i:04}")
}

fn register_body(service: &str, id: &str, port: u16) -> serde_json::Value {
    json!({"ID": id, "Name": service, "Address": "127.0.0.1", "Port": port,
        "Check": {"TTL": "10m", "Status": "passing"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_services_through_one_agent_with_default_limits() {
    let server = ConsulServer::start().await;
    futures::stream::iter(0..SERVICES)
        .map(|i| {
            let server = &server;
            async move {
                let name = service(i);
                server
                    .put(
                        "/v1/agent/service/register",
                        register_body(&name, &format!("{name}-1"), 1000 + i as u16),
                    )
                    .await;
                Ok::<_, ()>(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();

    let port: u16 = server
        .addr()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the harness's address is host:port");
    let before = established_to(port).unwrap();
    let consul = Consul::builder().address(server.addr()).build().unwrap();
    let discovery = CountingDiscovery::new(Arc::new(consul));
    let errors = discovery.errors();
    let balancers: Vec<Balancer> = (0..SERVICES)
        .map(|i| {
            let name = ServiceName::new(service(i)).unwrap();
            Balancer::watch(&discovery, &name, RoundRobin::default())
        })
        .collect();

    let ready = futures::future::join_all(balancers.iter().map(|b| b.ready_within(BOUND))).await;
    let not_ready = ready.iter().filter(|r| r.is_err()).count();
    assert_eq!(not_ready, 0, "balancers without their instance");
    for (i, b) in balancers.iter().enumerate() {
        let ids: Vec<String> = b
            .endpoints()
            .iter()
            .map(|e| e.instance().id().to_string())
            .collect();
        assert_eq!(ids, [format!("{}-1", service(i))]);
        assert!(b.status().in_sync, "{}: {:?}", service(i), b.status());
    }
    assert_eq!(errors.total(), 0, "watch errors: {:?}", errors.messages());

    // In flight at once: the client's own blocking queries and the shared watch's two; its
    // re-reads are over, and the pool keeps no more idle connections than it makes at once.
    let bound = DEFAULT_MAX_BLOCKING_WATCHES + 2 + waypost_consul::SHARED_WATCH_READS;
    let held = established_to(port).unwrap().difference(&before).count();
    eprintln!("{held} connections to the agent");
    assert!(
        held <= bound,
        "{held} connections to the agent, more than {bound}"
    );
    assert!(held <= AGENT_LIMIT / 4, "{held} connections to the agent");

    // A change to a service on the shared watch (beyond the first 32), and one with a query of
    // its own, each reach their balancer and no other.
    for i in [7, 777] {
        let name = service(i);
        server
            .put(
                "/v1/agent/service/register",
                register_body(&name, &format!("{name}-2"), 9000),
            )
            .await;
        eventually(
            BOUND,
            format!("{name}'s second instance is served"),
            || async {
                match balancers[i].endpoints().len() {
                    2 => Ok(()),
                    n => Err(format!("{n} instances")),
                }
            },
        )
        .await;
        server
            .put(&format!("/v1/agent/service/deregister/{name}-2"), json!({}))
            .await;
        eventually(
            BOUND,
            format!("{name}'s second instance is dropped"),
            || async {
                match balancers[i].endpoints().len() {
                    1 => Ok(()),
                    n => Err(format!("{n} instances")),
                }
            },
        )
        .await;
    }
    assert!(balancers.iter().all(|b| b.endpoints().len() == 1));
    assert_eq!(errors.total(), 0, "watch errors: {:?}", errors.messages());
}
