//! Consul against real agents: instances with failing checks listed with their health
//! (`passing_only(false)`), and discovery across two datacenters joined over the WAN, with an
//! outage of the remote one.
//!
//! Needs a `consul` binary: `eval "$(scripts/fetch-servers)"`.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::consul_wan::ConsulDatacenters;
use waypost_conformance::scenarios::{eventually, Mirror};
use waypost_consul::{Consul, ConsulBuilder};
use waypost_core::{
    Discovery, Health, HealthCheck, Registration, Registry, ServiceInstance, ServiceName,
    WatchEvent,
};

/// A generous bound for anything that settles in milliseconds on an idle machine.
const SETTLE: Duration = Duration::from_secs(10);

/// A client of the agent at `addr`, with a short backoff cap so that recovery is quick.
fn builder(addr: String) -> ConsulBuilder {
    Consul::builder()
        .address(addr)
        .retry_backoff(Duration::from_millis(50), Duration::from_secs(1))
}

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

fn ttl_registration(service: &str, id: &str, port: u16, ttl: Duration) -> Registration {
    Registration::builder(service, id)
        .host("127.0.0.1")
        .port(port)
        .check(HealthCheck::ttl(ttl))
        .build()
        .unwrap()
}

/// `(id, health)` of every instance `d` lists.
async fn healths(d: &Consul, service: &str) -> Result<Vec<(String, Health)>, String> {
    d.instances(&name(service))
        .await
        .map(|v| v.iter().map(|i| (i.id().to_string(), i.health())).collect())
        .map_err(|e| e.to_string())
}

async fn healths_are(d: &Consul, service: &str, want: &[(&str, Health)]) -> Result<(), String> {
    let got = healths(d, service).await?;
    let want: Vec<(String, Health)> = want.iter().map(|(i, h)| ((*i).to_owned(), *h)).collect();
    if got == want {
        Ok(())
    } else {
        Err(format!("{got:?}"))
    }
}

/// `inst` as it was registered: the same in every respect but the health Consul reports.
fn as_passing(inst: &ServiceInstance) -> ServiceInstance {
    inst.to_builder().health(Health::Passing).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_ttl_is_listed_critical_with_passing_only_false_and_dropped_by_default() {
    let server = ConsulServer::start().await;
    let passing = builder(server.addr()).build().unwrap();
    let all = builder(server.addr()).passing_only(false).build().unwrap();
    let mut all_watch = Mirror::new("passing_only(false) watch", all.watch(&name("expiring")));
    let mut passing_watch = Mirror::new("default watch", passing.watch(&name("expiring")));

    let h = passing
        .register(ttl_registration(
            "expiring",
            "e-1",
            9800,
            Duration::from_secs(1),
        ))
        .await
        .unwrap();
    let registered = h.instance().clone();
    assert_eq!(registered.health(), Health::Passing);
    // Registered passing: both discoveries list it, as registered.
    assert_eq!(
        all.instances(&name("expiring")).await.unwrap(),
        std::slice::from_ref(&registered)
    );
    assert_eq!(
        passing.instances(&name("expiring")).await.unwrap(),
        std::slice::from_ref(&registered)
    );
    for mirror in [&mut all_watch, &mut passing_watch] {
        mirror
            .wait_until(SETTLE, "e-1 listed passing", |s| {
                s.get("e-1") == Some(&registered)
            })
            .await;
    }

    // The heart-beating stops, nothing deregisters: Consul turns the TTL check critical about
    // a second after the last pass (and reaps the service only a minute or more later).
    h.abandon().await.unwrap();
    eventually(SETTLE, "e-1 listed critical by instances()", || {
        healths_are(&all, "expiring", &[("e-1", Health::Critical)])
    })
    .await;
    let critical = all.instances(&name("expiring")).await.unwrap();
    assert_eq!(
        as_passing(&critical[0]),
        registered,
        "only the health changed"
    );
    // The default discovery (Consul's ?passing) drops it.
    assert_eq!(healths(&passing, "expiring").await.unwrap(), []);

    // The watch of every instance says so with an Updated event, not a removal.
    all_watch
        .wait_until(SETTLE, "e-1 critical in the watch", |s| {
            s.get("e-1").map(ServiceInstance::health) == Some(Health::Critical)
        })
        .await;
    let last = all_watch.log().last().cloned();
    match last {
        Some(WatchEvent::Updated(i)) => {
            assert_eq!(i.health(), Health::Critical);
            assert_eq!(as_passing(&i), registered);
        }
        other => panic!("expected Updated(e-1 critical), got {other:?}"),
    }
    assert!(
        !all_watch
            .log()
            .iter()
            .any(|ev| matches!(ev, WatchEvent::Removed(_))),
        "a critical instance is not removed: {:?}",
        all_watch.log()
    );
    // The default watch removes it.
    passing_watch
        .wait_until(SETTLE, "e-1 removed from the default watch", |s| {
            s.is_empty()
        })
        .await;
    assert!(matches!(
        passing_watch.log().last(),
        Some(WatchEvent::Removed(i)) if i.id().as_str() == "e-1"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_check_is_listed_warning_and_recovers_to_passing() {
    let server = ConsulServer::start().await;
    let passing = builder(server.addr()).build().unwrap();
    let all = builder(server.addr()).passing_only(false).build().unwrap();
    // Registered by another tool, its TTL check set to warning.
    server
        .put(
            "/v1/agent/service/register",
            json!({"ID": "w-1", "Name": "warned", "Address": "127.0.0.1", "Port": 9801,
            "Check": {"CheckID": "service:w-1", "TTL": "60s", "Status": "warning"}}),
        )
        .await;
    healths_are(&all, "warned", &[("w-1", Health::Warning)])
        .await
        .unwrap();
    // Consul's ?passing hides warning instances too.
    healths_are(&passing, "warned", &[]).await.unwrap();

    let mut all_watch = Mirror::new("passing_only(false) watch", all.watch(&name("warned")));
    all_watch
        .wait_until(SETTLE, "w-1 listed warning", |s| {
            s.get("w-1").map(ServiceInstance::health) == Some(Health::Warning)
        })
        .await;
    server
        .put("/v1/agent/check/pass/service:w-1", json!({}))
        .await;
    all_watch
        .wait_until(SETTLE, "w-1 passing", |s| {
            s.get("w-1").map(ServiceInstance::health) == Some(Health::Passing)
        })
        .await;
    assert!(matches!(
        all_watch.log().last(),
        Some(WatchEvent::Updated(i)) if i.health() == Health::Passing
    ));
    healths_are(&passing, "warned", &[("w-1", Health::Passing)])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_datacenter_is_discovered_through_the_local_agent_and_its_outage_reported() {
    let started = Instant::now();
    let dcs = ConsulDatacenters::start(&["dc1", "dc2"]).await;
    eprintln!(
        "two datacenters joined over the WAN in {:?}",
        started.elapsed()
    );
    assert_eq!(dcs.names(), ["dc1", "dc2"]);

    // An instance in each datacenter, each registered through its own agent.
    let in_dc2 = builder(dcs.addr("dc2")).build().unwrap();
    let in_dc1 = builder(dcs.addr("dc1")).build().unwrap();
    let remote = in_dc2
        .register(ttl_registration(
            "wan",
            "remote-1",
            9900,
            Duration::from_secs(3),
        ))
        .await
        .unwrap();
    let local = in_dc1
        .register(ttl_registration(
            "wan",
            "local-1",
            9901,
            Duration::from_secs(3),
        ))
        .await
        .unwrap();

    // dc2's instance, asked of dc1's agent.
    let dc2_via_dc1 = builder(dcs.addr("dc1")).datacenter("dc2").build().unwrap();
    assert_eq!(
        dc2_via_dc1.instances(&name("wan")).await.unwrap(),
        [remote.instance().clone()]
    );
    let mut watch = Mirror::new("dc2 through dc1", dc2_via_dc1.watch(&name("wan")));
    watch
        .wait_until(SETTLE, "remote-1 in the dc2 watch", |s| {
            s.get("remote-1") == Some(remote.instance())
        })
        .await;
    // dc1's own data is dc1's.
    assert_eq!(
        in_dc1.instances(&name("wan")).await.unwrap(),
        [local.instance().clone()]
    );

    // dc2 goes down: dc1 cannot answer for it, and the watch reports it.
    dcs.stop("dc2");
    let stopped = Instant::now();
    let err = dc2_via_dc1.instances(&name("wan")).await.unwrap_err();
    eprintln!(
        "instances() of dc2 through dc1 failed {:?} after dc2 stopped: {err}",
        stopped.elapsed()
    );
    assert!(err.is_retryable(), "{err}");
    let until = Instant::now() + SETTLE;
    while watch.errors() == 0 {
        watch
            .next_until(until)
            .await
            .expect("the dc2 watch reports the outage");
    }
    eprintln!(
        "the dc2 watch yielded an Err {:?} after dc2 stopped",
        stopped.elapsed()
    );
    // Fail-static: the last known instance stays.
    assert_eq!(watch.set().get("remote-1"), Some(remote.instance()));
    // dc1's own data still answers.
    assert_eq!(
        in_dc1.instances(&name("wan")).await.unwrap(),
        [local.instance().clone()]
    );

    // dc2 comes back empty (-dev); the handle re-registers and the watch recovers.
    let again = Instant::now();
    dcs.start_again("dc2").await;
    eprintln!("dc2 back and re-joined in {:?}", again.elapsed());
    watch
        .wait_in_sync(SETTLE * 2, "the dc2 watch recovers")
        .await;
    eventually(SETTLE * 2, "remote-1 listed in dc2 again", || async {
        let got = dc2_via_dc1
            .instances(&name("wan"))
            .await
            .map_err(|e| e.to_string())?;
        if got == [remote.instance().clone()] {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    watch
        .wait_until(SETTLE, "remote-1 in the recovered watch", |s| {
            s.get("remote-1") == Some(remote.instance())
        })
        .await;
    remote.shutdown().await.unwrap();
    local.shutdown().await.unwrap();
}
