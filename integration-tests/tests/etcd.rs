//! The etcd backend against real etcd: the conformance suite, and what only etcd has (leases,
//! revisions, compaction, members, auth).
//!
//! Needs an etcd binary: `eval "$(scripts/fetch-servers)"`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use waypost_conformance::etcd_server::{EtcdCluster, EtcdServer};
use waypost_conformance::gate::Gate;
use waypost_conformance::{async_trait, Backend};
use waypost_core::{
    Discovery, Error, HealthCheck, InstanceSet, Liveness, Registration, RegistrationHandle,
    Registry, ServiceInstance, ServiceName, WatchEvent,
};
use waypost_etcd::etcd_client;
use waypost_etcd::{encode_record, Etcd};

// ---------------------------------------------------------------------------------------------
// The conformance suite.

/// A real etcd, reached through a [`Gate`] so that scenarios can cut the clients off.
struct EtcdBackend {
    server: EtcdServer,
    gate: Gate,
    etcd: Etcd,
}

#[async_trait]
impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }
    fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(self.etcd.clone())
    }
    fn discovery(&self) -> Arc<dyn Discovery> {
        Arc::new(self.etcd.clone())
    }
    async fn restart(&self) -> Result<(), String> {
        self.server.restart().await;
        Ok(())
    }
    async fn partition(&self) -> Result<(), String> {
        self.gate.cut();
        Ok(())
    }
    async fn heal(&self) -> Result<(), String> {
        self.gate.mend();
        Ok(())
    }
}

async fn start() -> EtcdBackend {
    let server = EtcdServer::start().await;
    let member = server.endpoint();
    let addr = member
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .expect("the harness's endpoint is http://host:port");
    let gate = Gate::start(addr)
        .await
        .expect("a free loopback port for the gate");
    let etcd = client(&[format!("http://{}", gate.addr())]).await;
    EtcdBackend { server, gate, etcd }
}

waypost_conformance::conformance_tests!(start);

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A client with short timeouts, so that outages are noticed quickly.
async fn client(endpoints: &[String]) -> Etcd {
    Etcd::builder()
        .endpoints(endpoints.to_vec())
        .connect_timeout(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(2))
        .progress_interval(Duration::from_secs(2))
        .connect()
        .await
        .expect("connecting to etcd")
}

async fn raw(endpoint: &str) -> etcd_client::Client {
    etcd_client::Client::connect([endpoint], None)
        .await
        .expect("raw etcd client")
}

fn name(s: &str) -> ServiceName {
    s.parse().unwrap()
}

fn instance(service: &str, id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::builder(service, id)
        .host("127.0.0.1")
        .port(port)
        .build()
        .unwrap()
}

fn registration(service: &str, id: &str, port: u16, ttl: Duration) -> Registration {
    Registration::new(instance(service, id, port), HealthCheck::ttl(ttl)).unwrap()
}

fn key(service: &str, id: &str) -> String {
    format!("/waypost/services/{service}/{id}")
}

/// Reads a watch on a task of its own (as a real consumer would, keeping the stream polled
/// through outages) and forwards every item.
fn collect(etcd: &Etcd, service: &str) -> mpsc::UnboundedReceiver<Result<WatchEvent, Error>> {
    let mut watch = etcd.watch(&name(service));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(item) = watch.next().await {
            if tx.send(item).is_err() {
                return;
            }
        }
    });
    rx
}

/// What a watch consumer saw: the changes (errors and `Synced` counted apart) and the
/// resulting set.
#[derive(Default)]
struct Seen {
    events: Vec<WatchEvent>,
    errors: usize,
    synced: usize,
    set: InstanceSet,
}

impl Seen {
    /// Takes items until `done` holds, for at most `bound`.
    async fn until(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Result<WatchEvent, Error>>,
        bound: Duration,
        what: &str,
        done: impl Fn(&Seen) -> bool,
    ) {
        let deadline = Instant::now() + bound;
        while !done(self) {
            match timeout(deadline - Instant::now(), rx.recv()).await {
                Ok(Some(Ok(WatchEvent::Synced))) => self.synced += 1,
                Ok(Some(Ok(ev))) => {
                    self.set.apply(&ev);
                    self.events.push(ev);
                }
                Ok(Some(Err(_))) => self.errors += 1,
                Ok(None) => panic!("{what}: the watch ended"),
                Err(_) => panic!(
                    "{what}: not reached within {bound:?}; saw {:?} ({} errors)",
                    self.events, self.errors
                ),
            }
        }
    }

    fn ids(&self) -> BTreeSet<String> {
        self.set.iter().map(|i| i.id().to_string()).collect()
    }
}

/// Retries `put` until it succeeds (the server may be restarting), for at most 30 s.
async fn put_until_ok(c: &mut etcd_client::Client, key: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match timeout(Duration::from_secs(1), c.put(key, value, None)).await {
            Ok(Ok(_)) => return,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("put {key} kept failing: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// etcd-specific behaviour.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_layout_default_host_and_revoke_on_shutdown() {
    let server = EtcdServer::start().await;
    let etcd = client(&server.endpoints()).await;
    let mut rawc = raw(&server.endpoint()).await;
    let mut rx = collect(&etcd, "layout");
    let mut seen = Seen::default();
    seen.until(&mut rx, Duration::from_secs(10), "snapshot", |s| {
        !s.events.is_empty()
    })
    .await;
    assert_eq!(seen.events[0], WatchEvent::Snapshot(vec![]));

    // No host given: the machine's first IPv4 neither loopback nor link-local (or 127.0.0.1),
    // never 0.0.0.0.
    let reg = Registration::builder("layout", "l-1")
        .port(8080)
        .tag("v1")
        .meta("version", "1.2.3")
        .weight(3)
        .zone("z1")
        .build()
        .unwrap();
    let handle = etcd.register(reg).await.unwrap();
    let host = handle.instance().host().to_owned();
    assert_eq!(host, etcd.default_host());
    let ip: std::net::Ipv4Addr = host.parse().expect("an IPv4 address");
    assert!(!ip.is_unspecified());

    // The documented layout: one key, a JSON record with a schema version, on a lease.
    let resp = rawc.get(key("layout", "l-1"), None).await.unwrap();
    let kv = &resp.kvs()[0];
    assert!(kv.lease() != 0, "the key must hang on a lease");
    let json: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
    assert_eq!(json["schema"], 1);
    assert_eq!(json["id"], "l-1");
    assert_eq!(json["service"], "layout");
    assert_eq!(json["port"], 8080);
    assert_eq!(json["weight"], 3);
    assert_eq!(json["zone"], "z1");
    assert_eq!(json["tags"][0], "v1");
    assert_eq!(json["metadata"]["version"], "1.2.3");
    assert_eq!(
        etcd.key(&name("layout"), handle.instance().id()),
        key("layout", "l-1")
    );

    seen.until(&mut rx, Duration::from_secs(10), "added", |s| {
        s.set.len() == 1
    })
    .await;
    assert_eq!(seen.events[1], WatchEvent::Added(handle.instance().clone()));

    // Shutdown revokes the lease: the key is gone at once, and the watch says so.
    let registered = handle.instance().clone();
    handle.shutdown().await.unwrap();
    assert_eq!(
        rawc.get(key("layout", "l-1"), None)
            .await
            .unwrap()
            .kvs()
            .len(),
        0
    );
    seen.until(&mut rx, Duration::from_secs(10), "removed", |s| {
        s.set.is_empty()
    })
    .await;
    assert_eq!(seen.events[2], WatchEvent::Removed(registered));

    // An explicit default host wins.
    let other = Etcd::builder()
        .endpoints(server.endpoints())
        .default_host("10.9.8.7")
        .connect()
        .await
        .unwrap();
    let h = other
        .register(
            Registration::builder("layout", "l-2")
                .port(1)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(h.instance().host(), "10.9.8.7");
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_registration_expires_within_ttl_and_kept_one_stays() {
    let server = EtcdServer::start().await;
    let etcd = client(&server.endpoints()).await;
    let ttl = Duration::from_secs(2);
    let mut rx = collect(&etcd, "expiry");
    let kept = etcd
        .register(registration("expiry", "kept", 1, ttl))
        .await
        .unwrap();
    let gone = etcd
        .register(registration("expiry", "gone", 2, ttl))
        .await
        .unwrap();
    let registered_at = Instant::now();
    let mut seen = Seen::default();
    seen.until(&mut rx, Duration::from_secs(10), "both listed", |s| {
        s.set.len() == 2
    })
    .await;

    // A process that stops keeping alive (as if it crashed) disappears within TTL + 1 s. The
    // bound below adds a margin for a loaded CI machine: it is a correctness bound.
    gone.abandon().await.unwrap();
    let bound = ttl + Duration::from_secs(1) + Duration::from_secs(2);
    seen.until(&mut rx, bound, "abandoned instance removed", |s| {
        s.set.get("gone").is_none()
    })
    .await;

    // The one kept alive outlives several TTLs.
    let outlive = registered_at + ttl * 2 + Duration::from_secs(1);
    tokio::time::sleep_until(outlive).await;
    let ids: Vec<_> = etcd
        .instances(&name("expiry"))
        .await
        .unwrap()
        .iter()
        .map(|i| i.id().to_string())
        .collect();
    assert_eq!(ids, vec!["kept"]);
    assert!(kept.is_live());
    assert!(!seen
        .events
        .iter()
        .any(|e| matches!(e, WatchEvent::Removed(i) if i.id().as_str() == "kept")));
    kept.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_is_replaced_by_a_new_one_and_the_key_put_again() {
    let server = EtcdServer::start().await;
    let etcd = client(&server.endpoints()).await;
    let mut c = raw(&server.endpoint()).await;
    let handle = etcd
        .register(registration("lease", "l-1", 1, Duration::from_secs(3)))
        .await
        .unwrap();
    let mut rx = collect(&etcd, "lease");
    let mut seen = Seen::default();
    seen.until(&mut rx, Duration::from_secs(10), "listed", |s| {
        s.set.len() == 1
    })
    .await;
    let old_lease = c.get(key("lease", "l-1"), None).await.unwrap().kvs()[0].lease();

    // The lease vanishes behind the registration's back (as after an expiry): the next
    // keep-alive learns it, and the registration grants a new lease and puts the key again.
    c.lease_revoke(old_lease).await.unwrap();
    seen.until(&mut rx, Duration::from_secs(10), "removed", |s| {
        s.set.is_empty()
    })
    .await;
    seen.until(&mut rx, Duration::from_secs(10), "back", |s| {
        s.set.len() == 1
    })
    .await;
    let kvs = c.get(key("lease", "l-1"), None).await.unwrap();
    let new_lease = kvs.kvs()[0].lease();
    assert!(new_lease != 0 && new_lease != old_lease);
    let mut live = handle.subscribe();
    let back = timeout(Duration::from_secs(10), live.wait_for(Liveness::is_live))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(back, "{:?}", handle.liveness());
    handle.shutdown().await.unwrap();
    assert!(c
        .get(key("lease", "l-1"), None)
        .await
        .unwrap()
        .kvs()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_is_noticed_by_keep_alive_and_watch() {
    let server = EtcdServer::start().await;
    let etcd = Etcd::builder()
        .endpoints(server.endpoints())
        .request_timeout(Duration::from_secs(1))
        .progress_interval(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    // Keep-alives every 2 s, each answer due within 1 s (the request timeout).
    let ttl = Duration::from_secs(6);
    let handle = etcd
        .register(registration("frozen", "f-1", 1, ttl))
        .await
        .unwrap();
    let mut live = handle.subscribe();
    let mut rx = collect(&etcd, "frozen");
    let mut seen = Seen::default();
    seen.until(&mut rx, Duration::from_secs(10), "snapshot", |s| {
        s.set.len() == 1 && s.synced == 1
    })
    .await;

    // Connections stay open, nothing answers: only deadlines can tell.
    server.freeze();
    let noticed = timeout(
        Duration::from_secs(8),
        live.wait_for(|l| matches!(l, Liveness::Recovering { .. })),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    // Progress requests (every idle second, each due within 1 s) notice it in about 2 s; the
    // bound stays below what HTTP/2 pings alone would take (10 s interval), so it is the watch's
    // own check that is tested.
    let watch_noticed = timeout(Duration::from_secs(5), rx.recv()).await;
    server.thaw();
    assert!(
        noticed,
        "a silent keep-alive stream went unnoticed: {:?}",
        handle.liveness()
    );
    assert!(
        matches!(watch_noticed, Ok(Some(Err(_)))),
        "a silent watch went unnoticed: {watch_noticed:?}"
    );

    // Once the server answers again the registration is live, and the instance never left.
    let back = timeout(Duration::from_secs(20), live.wait_for(Liveness::is_live))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        back,
        "not live again after the server came back: {:?}",
        handle.liveness()
    );
    assert_eq!(etcd.instances(&name("frozen")).await.unwrap().len(), 1);
    // Nothing changed: the watch says only that it is in sync again.
    seen.until(
        &mut rx,
        Duration::from_secs(10),
        "in sync again, still listed",
        |s| s.set.len() == 1 && s.synced >= 2,
    )
    .await;
    assert!(
        seen.events.len() == 1,
        "no event expected: {:?}",
        seen.events
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_watch_loses_and_duplicates_nothing() {
    let server = Arc::new(EtcdServer::start().await);
    let etcd = client(&server.endpoints()).await;
    let mut rx = collect(&etcd, "stream");
    let mut seen = Seen::default();
    seen.until(&mut rx, Duration::from_secs(10), "snapshot", |s| {
        !s.events.is_empty()
    })
    .await;

    const N: usize = 60;
    let endpoint = server.endpoint();
    let writer = tokio::spawn(async move {
        let mut c = raw(&endpoint).await;
        for i in 0..N {
            let inst = instance("stream", &format!("s-{i:02}"), 1000 + i as u16);
            put_until_ok(
                &mut c,
                &key("stream", inst.id().as_str()),
                &encode_record(&inst),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    });
    // Restart while the writes go on.
    seen.until(&mut rx, Duration::from_secs(20), "some writes seen", |s| {
        s.set.len() >= 15
    })
    .await;
    server.restart().await;
    writer.await.unwrap();
    // A last write: anything lost or repeated before it would show by the time it arrives.
    let mut c = raw(&server.endpoint()).await;
    let last = instance("stream", "zz-last", 9);
    put_until_ok(&mut c, &key("stream", "zz-last"), &encode_record(&last)).await;
    seen.until(&mut rx, Duration::from_secs(30), "every write seen", |s| {
        s.set.get("zz-last").is_some()
    })
    .await;

    let mut added: BTreeMap<String, usize> = BTreeMap::new();
    for ev in &seen.events[1..] {
        match ev {
            WatchEvent::Added(i) => *added.entry(i.id().to_string()).or_default() += 1,
            other => panic!("only additions expected after the snapshot, got {other:?}"),
        }
    }
    assert_eq!(added.len(), N + 1, "every write seen: {added:?}");
    assert!(
        added.values().all(|n| *n == 1),
        "each write seen once: {added:?}"
    );
    assert!(
        seen.errors > 0,
        "the restart should have been reported on the watch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_disconnected_resyncs_with_removals() {
    let server = EtcdServer::start().await;
    let etcd = client(&server.endpoints()).await;
    let mut c = raw(&server.endpoint()).await;
    for (id, port) in [("a", 1), ("b", 2), ("c", 3)] {
        let v = encode_record(&instance("compact", id, port));
        c.put(key("compact", id), v, None).await.unwrap();
    }
    let mut rx = collect(&etcd, "compact");
    let mut seen = Seen::default();
    seen.until(&mut rx, Duration::from_secs(10), "snapshot", |s| {
        s.set.len() == 3
    })
    .await;
    drop(c);

    // Cut the watcher off, change things and compact the history it would resume from.
    server.stop();
    let isolated = server.start_isolated().await;
    let mut c = raw(&isolated).await;
    c.delete(key("compact", "a"), None).await.unwrap();
    let b2 = instance("compact", "b", 20);
    c.put(key("compact", "b"), encode_record(&b2), None)
        .await
        .unwrap();
    let d = instance("compact", "d", 4);
    c.put(key("compact", "d"), encode_record(&d), None)
        .await
        .unwrap();
    let e = instance("compact", "e", 5);
    c.put(key("compact", "e"), encode_record(&e), None)
        .await
        .unwrap();
    let resp = c.delete(key("compact", "e"), None).await.unwrap();
    let revision = resp.header().unwrap().revision();
    c.compact(
        revision,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
    drop(c);
    server.resume().await;

    let before = seen.events.len();
    seen.until(&mut rx, Duration::from_secs(30), "resynced", |s| {
        s.ids() == BTreeSet::from(["b".into(), "c".into(), "d".into()])
            && s.set.get("b").map(|i| i.port()) == Some(20)
    })
    .await;
    // Give a late duplicate the chance to show: a marker write after the resync.
    let mut c = raw(&server.endpoint()).await;
    let m = instance("compact", "marker", 6);
    c.put(key("compact", "marker"), encode_record(&m), None)
        .await
        .unwrap();
    seen.until(&mut rx, Duration::from_secs(10), "marker", |s| {
        s.set.get("marker").is_some()
    })
    .await;
    let after: Vec<_> = seen.events[before..].to_vec();
    assert_eq!(
        after,
        vec![
            WatchEvent::Removed(instance("compact", "a", 1)),
            WatchEvent::Updated(b2),
            WatchEvent::Added(d),
            WatchEvent::Added(m),
        ],
        "only the difference, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_watch_keeps_delivering_and_registration_stays_live() {
    let cluster = EtcdCluster::start(3).await;
    let endpoints = cluster.endpoints();
    let etcd = client(&endpoints).await;
    let ttl = Duration::from_secs(5);
    let handle = etcd
        .register(registration("pay", "p-live", 1, ttl))
        .await
        .unwrap();
    let mut rx = collect(&etcd, "pay");
    let mut seen = Seen::default();
    seen.until(&mut rx, Duration::from_secs(10), "snapshot", |s| {
        s.set.len() == 1
    })
    .await;

    let killed = cluster.kill_leader().await;

    // Another process registers through the surviving members while the cluster elects.
    let writer = client(&endpoints).await;
    let mut handles: Vec<RegistrationHandle> = Vec::new();
    for i in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reg = registration("pay", &format!("p-{i}"), 10 + i, ttl);
            match writer.register(reg).await {
                Ok(h) => break handles.push(h),
                Err(e) if Instant::now() < deadline => {
                    assert!(e.is_retryable(), "{e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("registering through the survivors kept failing: {e}"),
            }
        }
    }
    seen.until(
        &mut rx,
        Duration::from_secs(30),
        "writes after the kill delivered",
        |s| s.set.len() == 6,
    )
    .await;

    // Requests that the client sends to the dead member fail at once with Unavailable; they
    // are retried on another member, so none of these fails.
    for _ in 0..50 {
        let listed = etcd.instances(&name("pay")).await;
        assert!(listed.is_ok_and(|l| l.len() == 6));
    }

    // The registration heals on the survivors and stays listed for longer than its TTL.
    let live_by = Instant::now() + Duration::from_secs(30);
    while !handle.is_live() {
        assert!(
            Instant::now() < live_by,
            "registration not live: {:?}",
            handle.liveness()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    let ids: BTreeSet<String> = etcd
        .instances(&name("pay"))
        .await
        .unwrap()
        .iter()
        .map(|i| i.id().to_string())
        .collect();
    assert!(ids.contains("p-live"), "{ids:?}");
    seen.until(&mut rx, Duration::from_secs(5), "still six", |s| {
        s.set.len() == 6
    })
    .await;
    assert!(
        !seen
            .events
            .iter()
            .any(|e| matches!(e, WatchEvent::Removed(i) if i.id().as_str() == "p-live")),
        "the registration vanished after the leader (member {killed}) was killed: {:?}",
        seen.events
    );
    for h in handles {
        h.shutdown().await.unwrap();
    }
    handle.shutdown().await.unwrap();
}

/// Connecting needs a member that answers, not a leader: a service that starts while its
/// cluster has lost the quorum comes up, reports the outage, and catches up once a leader is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_a_quorum_succeeds_and_reports_the_outage_until_it_ends() {
    let cluster = EtcdCluster::start(3).await;
    let endpoints = cluster.endpoints();
    let before = client(&endpoints).await;
    let kept = before
        .register(registration("quorum", "q-1", 1, Duration::from_secs(30)))
        .await
        .unwrap();
    let killed = cluster.kill_leader().await;
    let also = (killed + 1) % 3;
    cluster.kill_member(also);

    let etcd = client(&endpoints).await;
    let err = etcd.instances(&name("quorum")).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let mut rx = collect(&etcd, "quorum");
    let mut seen = Seen::default();
    seen.until(&mut rx, Duration::from_secs(15), "an error", |s| {
        s.errors > 0
    })
    .await;
    assert!(seen.events.is_empty(), "{:?}", seen.events);

    cluster.restart_member(also).await;
    seen.until(
        &mut rx,
        Duration::from_secs(30),
        "the set once a leader is back",
        |s| s.synced > 0 && s.set.len() == 1,
    )
    .await;
    assert_eq!(seen.ids(), BTreeSet::from(["q-1".to_string()]));
    let listed = etcd.instances(&name("quorum")).await.unwrap();
    assert_eq!(listed.len(), 1);
    kept.shutdown().await.unwrap();
}

/// With `auth`, etcd hands out the token through its quorum: connecting with credentials
/// while the quorum is lost fails (retryable), as `EtcdBuilder::connect` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_credentials_needs_a_quorum() {
    let cluster = EtcdCluster::start(3).await;
    let endpoints = cluster.endpoints();
    let mut admin = etcd_client::Client::connect(endpoints.clone(), None)
        .await
        .unwrap();
    let _ = admin.role_add("root").await;
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let connect = || {
        Etcd::builder()
            .endpoints(endpoints.clone())
            .auth("root", "root-pw")
            .connect_timeout(Duration::from_millis(500))
            .request_timeout(Duration::from_secs(2))
            .connect()
    };
    assert!(connect().await.is_ok(), "with a quorum");
    let killed = cluster.kill_leader().await;
    cluster.kill_member((killed + 1) % 3);
    let err = connect().await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_skipped_and_counted() {
    let server = EtcdServer::start().await;
    let etcd = client(&server.endpoints()).await;
    let mut c = raw(&server.endpoint()).await;
    let ok = instance("inv", "ok", 1);
    let foreign = [
        (key("inv", "garbage"), "not json at all".to_owned()),
        (
            key("inv", "future"),
            r#"{"schema":2,"id":"future","service":"inv","host":"h","port":1}"#.to_owned(),
        ),
        (
            key("inv", "mismatch"),
            encode_record(&instance("inv", "other", 1)),
        ),
        (
            key("inv", "nested/deeper"),
            encode_record(&instance("inv", "x", 1)),
        ),
        (
            key("inv", "port0"),
            r#"{"schema":1,"id":"port0","service":"inv","host":"h","port":0}"#.to_owned(),
        ),
        (key("inv", "ok"), encode_record(&ok)),
        // Another service whose name starts the same: not part of "inv".
        (key("inv2", "ok"), encode_record(&instance("inv2", "ok", 1))),
    ];
    for (k, v) in &foreign {
        c.put(k.as_str(), v.as_str(), None).await.unwrap();
    }
    assert_eq!(
        etcd.instances(&name("inv")).await.unwrap(),
        vec![ok.clone()]
    );
    assert_eq!(etcd.skipped_records(), 5);

    let mut rx = collect(&etcd, "inv");
    let mut seen = Seen::default();
    seen.until(&mut rx, Duration::from_secs(10), "snapshot", |s| {
        !s.events.is_empty()
    })
    .await;
    assert_eq!(seen.events[0], WatchEvent::Snapshot(vec![ok.clone()]));
    assert_eq!(etcd.skipped_records(), 10);

    // A valid instance overwritten with garbage is gone; a valid one after it still arrives.
    c.put(key("inv", "ok"), "{broken", None).await.unwrap();
    let ok2 = instance("inv", "ok2", 2);
    c.put(key("inv", "ok2"), encode_record(&ok2), None)
        .await
        .unwrap();
    seen.until(&mut rx, Duration::from_secs(10), "ok2", |s| {
        s.set.get("ok2").is_some()
    })
    .await;
    assert_eq!(
        seen.events[1..].to_vec(),
        vec![WatchEvent::Removed(ok), WatchEvent::Added(ok2)]
    );
    assert_eq!(etcd.skipped_records(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_wrong_password_is_a_clear_error_and_right_one_works() {
    let server = EtcdServer::start().await;
    let mut admin = raw(&server.endpoint()).await;
    let _ = admin.role_add("root").await;
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.user_add("guest", "guest-pw", None).await.unwrap();
    admin.auth_enable().await.unwrap();

    let connect = |user: &str, pw: &str| {
        Etcd::builder()
            .endpoints(server.endpoints())
            .auth(user, pw)
            .request_timeout(Duration::from_secs(2))
            .connect()
    };
    let err = connect("root", "wrong-pw").await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err}");
    assert!(err.to_string().contains("password"), "{err}");
    assert!(!err.is_retryable());

    // No credentials at all, and a user without any role: refused, not retried forever.
    let err = Etcd::builder()
        .endpoints(server.endpoints())
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err}");
    let err = connect("guest", "guest-pw").await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err}");

    let etcd = connect("root", "root-pw").await.unwrap();
    assert!(!format!("{etcd:?}").contains("root-pw"));
    let h = etcd
        .register(registration("secure", "s-1", 1, Duration::from_secs(5)))
        .await
        .unwrap();
    let mut rx = collect(&etcd, "secure");
    let mut seen = Seen::default();
    seen.until(&mut rx, Duration::from_secs(10), "listed", |s| {
        s.set.len() == 1
    })
    .await;
    h.shutdown().await.unwrap();
    seen.until(&mut rx, Duration::from_secs(10), "removed", |s| {
        s.set.is_empty()
    })
    .await;
}
