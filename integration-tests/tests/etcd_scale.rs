//! 1,000 services watched through one etcd client (issue 13, part 4), against a real etcd: every
//! balancer becomes ready, every watch delivers a later change to its own balancer, no watch
//! yields an error, and the process holds one connection to etcd for all of them. How fast is
//! measured in BENCHMARKS.md (`--example services`), not here: the bound below only stops a
//! hang.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use waypost_conformance::etcd_server::EtcdServer;
use waypost_conformance::sockets::established_to;
use waypost_conformance::watch_errors::CountingDiscovery;
use waypost_core::{Balancer, ServiceInstance, ServiceName};
use waypost_etcd::etcd_client;
use waypost_strategies::RoundRobin;

const SERVICES: usize = 1000;
/// Only against a hang: on an idle machine every balancer is ready within half a second.
const HANG_BOUND: Duration = Duration::from_secs(60);

type BoxError = Box<dyn Error + Send + Sync>;

fn service(i: usize) -> String {
    format!("svc-{i:04}")
}

/// Puts instance `id` of every service straight into etcd (Waypost's record, no lease), 32 at a
/// time: a `Registry` would keep a lease and a watch per registration in this process.
async fn put_all(client: &etcd_client::Client, id: &str) -> Result<(), BoxError> {
    futures::stream::iter(0..SERVICES)
        .map(|i| {
            let mut client = client.clone();
            async move {
                let instance = ServiceInstance::builder(service(i).as_str(), id)
                    .host("127.0.0.1")
                    .port(10_000 + i as u16)
                    .build()?;
                let key = waypost_etcd::record_key(
                    waypost_etcd::DEFAULT_PREFIX,
                    instance.service(),
                    instance.id(),
                );
                client
                    .put(key, waypost_etcd::encode_record(&instance), None)
                    .await?;
                Ok::<(), BoxError>(())
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await
}

/// The ids `balancer` serves, sorted.
fn ids(balancer: &Balancer) -> Vec<String> {
    balancer
        .instances()
        .iter()
        .map(|i| i.id().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_services_through_one_client_on_one_connection() -> Result<(), BoxError> {
    let server = EtcdServer::start().await;
    let endpoint = server.endpoint();
    let port: u16 = endpoint
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| format!("no port in {endpoint}"))?;
    let writer = etcd_client::Client::connect(server.endpoints(), None).await?;
    put_all(&writer, "a").await?;

    // The writer's connection and the harness's health-check client are not the watches'.
    let before = established_to(port)?;
    let etcd = waypost_etcd::Etcd::builder()
        .endpoints(server.endpoints())
        .connect()
        .await?;
    let discovery = CountingDiscovery::new(Arc::new(etcd));
    let errors = discovery.errors();
    let balancers: Vec<Balancer> = (0..SERVICES)
        .map(|i| {
            Ok(Balancer::watch(
                &discovery,
                &ServiceName::new(service(i))?,
                RoundRobin::default(),
            ))
        })
        .collect::<Result<_, waypost_core::Error>>()?;

    let ready = futures::future::join_all(balancers.iter().map(|b| b.ready_within(HANG_BOUND)));
    let not_ready: Vec<String> = ready
        .await
        .into_iter()
        .filter_map(|r| r.err().map(|why| why.to_string()))
        .collect();
    assert!(
        not_ready.is_empty(),
        "{} of {SERVICES} balancers not ready, e.g. {:?}",
        not_ready.len(),
        not_ready.first()
    );
    for (i, b) in balancers.iter().enumerate() {
        assert_eq!(ids(b), ["a"], "{}", service(i));
    }
    let connections = established_to(port)?.difference(&before).count();
    assert_eq!(
        connections, 1,
        "the client holds {connections} connections to etcd for {SERVICES} watches"
    );

    // Every watch is open, and each delivers to its own balancer only.
    put_all(&writer, "b").await?;
    let both = futures::future::join_all(balancers.iter().map(|b| async move {
        loop {
            let seen = b.generation();
            if ids(b) == ["a", "b"] {
                return;
            }
            b.changed(seen).await;
        }
    }));
    if tokio::time::timeout(HANG_BOUND, both).await.is_err() {
        let behind = balancers.iter().filter(|b| ids(b) != ["a", "b"]).count();
        panic!("{behind} of {SERVICES} balancers did not see their second instance");
    }

    assert_eq!(
        errors.total(),
        0,
        "the watches yielded errors: {:?}",
        errors.messages()
    );
    for b in &balancers {
        let status = b.status();
        assert!(status.in_sync && status.fail_static.is_none(), "{status:?}");
    }
    let connections = established_to(port)?.difference(&before).count();
    assert_eq!(
        connections, 1,
        "{connections} connections after the changes"
    );
    Ok(())
}
