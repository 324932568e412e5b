//! Unit tests of the memory backend: expiry, outage, restart, checks, replacement, teardown.
//!
//! TTL tests run on a paused Tokio clock (time advances by itself when every task waits), so
//! they follow seconds of TTL deterministically and instantly. TCP-check tests use real time
//! and real loopback sockets, with bounded polling.

use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;
use waypost_core::{
    CheckTls, Discovery, Error, HealthCheck, InstanceSet, Liveness, Registration,
    RegistrationHandle, Registry, ServiceName, Watch, WatchEvent,
};

use crate::Memory;

fn name(s: &str) -> ServiceName {
    s.parse().unwrap()
}

fn ttl_reg(service: &str, id: &str, ttl_secs: u64) -> Registration {
    Registration::builder(service, id)
        .port(8080)
        .check(HealthCheck::ttl(Duration::from_secs(ttl_secs)))
        .build()
        .unwrap()
}

/// The next change, skipping errors and `Synced`; panics if none comes within `bound` (virtual
/// time in paused tests).
async fn next_event(watch: &mut Watch, bound: Duration) -> WatchEvent {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(Ok(WatchEvent::Synced))) => continue,
            Ok(Some(Ok(ev))) => return ev,
            Ok(Some(Err(_))) => continue,
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("no event within {bound:?}"),
        }
    }
}

/// Applies events to `mirror` until it holds exactly `ids`, checking that each event is
/// consistent with what was delivered before.
async fn follow_until(watch: &mut Watch, mirror: &mut InstanceSet, ids: &[&str], bound: Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let have: Vec<String> = mirror.iter().map(|i| i.id().to_string()).collect();
        if have == ids {
            return;
        }
        let ev = match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(Ok(ev))) => ev,
            Ok(Some(Err(_))) => continue,
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("watch shows {have:?}, wanted {ids:?}"),
        };
        match &ev {
            WatchEvent::Added(i) => assert!(mirror.get(i.id().as_str()).is_none(), "{ev:?} twice"),
            WatchEvent::Updated(i) | WatchEvent::Removed(i) => {
                assert!(
                    mirror.get(i.id().as_str()).is_some(),
                    "{ev:?} for an absent id"
                )
            }
            WatchEvent::Snapshot(_) => assert!(mirror.is_empty(), "a second snapshot"),
            WatchEvent::Synced => {}
        }
        mirror.apply(&ev);
    }
}

/// Consumes `watch` continuously in a task (as a balancer does), so that the backend's reads
/// happen as changes occur rather than when the test looks.
fn eager(mut watch: Watch) -> Watch {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tokio::spawn(async move {
        while let Some(item) = watch.next().await {
            if tx.unbounded_send(item).is_err() {
                return;
            }
        }
    });
    rx.boxed()
}

/// The next item must be `Synced`, within a second.
async fn expect_synced(watch: &mut Watch) {
    let item = tokio::time::timeout(Duration::from_secs(1), watch.next()).await;
    assert!(
        matches!(item, Ok(Some(Ok(WatchEvent::Synced)))),
        "expected Synced, got {item:?}"
    );
}

async fn no_event_for(watch: &mut Watch, period: Duration) {
    if let Ok(item) = tokio::time::timeout(period, watch.next()).await {
        panic!("expected silence, got {item:?}");
    }
}

async fn ids(memory: &Memory, service: &str) -> Vec<String> {
    let list = memory.instances(&name(service)).await.unwrap();
    list.iter().map(|i| i.id().to_string()).collect()
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_a_ttl_entry_and_abandoning_expires_it() {
    let memory = Memory::new();
    let mut watch = memory.watch(&name("s"));
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(1)).await,
        WatchEvent::Snapshot(vec![])
    );
    let h = memory.register(ttl_reg("s", "a", 3)).await.unwrap();
    assert!(matches!(
        next_event(&mut watch, Duration::from_secs(1)).await,
        WatchEvent::Added(_)
    ));

    // Ten TTLs of heartbeats: never removed.
    no_event_for(&mut watch, Duration::from_secs(30)).await;
    assert_eq!(ids(&memory, "s").await, ["a"]);

    let abandoned_at = tokio::time::Instant::now();
    h.abandon().await.unwrap();
    let ev = next_event(&mut watch, Duration::from_secs(10)).await;
    assert!(
        matches!(ev, WatchEvent::Removed(ref i) if i.id().as_str() == "a"),
        "{ev:?}"
    );
    // Expired by the TTL after the last beat (at most TTL/3 before the abandonment), not earlier.
    assert!(abandoned_at.elapsed() >= Duration::from_secs(2));
    assert!(ids(&memory, "s").await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn outage_fails_calls_reports_recovering_and_heals() {
    let memory = Memory::new();
    let h = memory.register(ttl_reg("s", "a", 3)).await.unwrap();
    assert_eq!(h.wait_live().await, Liveness::Live);
    let mut watch = memory.watch(&name("s"));
    assert!(
        matches!(next_event(&mut watch, Duration::from_secs(1)).await, WatchEvent::Snapshot(v) if v.len() == 1)
    );
    expect_synced(&mut watch).await;

    memory.set_available(false);
    assert!(matches!(
        memory.instances(&name("s")).await,
        Err(Error::Unavailable { .. })
    ));
    assert!(matches!(
        memory.register(ttl_reg("s", "b", 3)).await,
        Err(Error::Unavailable { .. })
    ));
    // The watch reports the outage once and goes on.
    let item = tokio::time::timeout(Duration::from_secs(1), watch.next())
        .await
        .unwrap();
    assert!(
        matches!(item, Some(Err(Error::Unavailable { .. }))),
        "{item:?}"
    );
    no_event_for(&mut watch, Duration::from_millis(500)).await;
    // The next heartbeat fails.
    let mut live = h.subscribe();
    live.wait_for(|l| matches!(l, Liveness::Recovering { .. }))
        .await
        .unwrap();

    // Back within the TTL: the entry never expired, so the watch has nothing to say but that
    // it is in sync again.
    memory.set_available(true);
    live.wait_for(Liveness::is_live).await.unwrap();
    expect_synced(&mut watch).await;
    no_event_for(&mut watch, Duration::from_secs(5)).await;
    assert_eq!(ids(&memory, "s").await, ["a"]);
    h.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn outage_longer_than_the_ttl_expires_and_the_handle_registers_again() {
    let memory = Memory::new();
    let h = memory.register(ttl_reg("s", "a", 3)).await.unwrap();
    let mut watch = eager(memory.watch(&name("s")));
    let mut mirror = InstanceSet::new();
    follow_until(&mut watch, &mut mirror, &["a"], Duration::from_secs(1)).await;

    memory.set_available(false);
    tokio::time::sleep(Duration::from_secs(10)).await;
    memory.set_available(true);
    // Expired during the outage: the watch shows it gone once the backend answers again; the
    // handle notices NotFound on its next heartbeat and registers again.
    follow_until(&mut watch, &mut mirror, &[], Duration::from_secs(10)).await;
    follow_until(&mut watch, &mut mirror, &["a"], Duration::from_secs(10)).await;
    assert!(h.is_live());
    no_event_for(&mut watch, Duration::from_secs(10)).await;
    assert_eq!(ids(&memory, "s").await, ["a"]);
    h.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn restart_forgets_and_handles_register_again_while_watchers_resync() {
    let memory = Memory::new();
    let a = memory.register(ttl_reg("s", "a", 3)).await.unwrap();
    let b = memory.register(ttl_reg("s", "b", 3)).await.unwrap();
    let mut watch = eager(memory.watch(&name("s")));
    let mut mirror = InstanceSet::new();
    follow_until(&mut watch, &mut mirror, &["a", "b"], Duration::from_secs(1)).await;

    memory.restart(Duration::from_millis(500)).await;
    // Forgotten now ...
    assert!(ids(&memory, "s").await.is_empty());
    // ... and healed by the handles themselves.
    for h in [&a, &b] {
        h.subscribe().wait_for(Liveness::is_live).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ids(&memory, "s").await.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "not healed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The watch saw the loss, then the healing, with consistent events, and stays there.
    follow_until(&mut watch, &mut mirror, &[], Duration::from_secs(10)).await;
    follow_until(
        &mut watch,
        &mut mirror,
        &["a", "b"],
        Duration::from_secs(10),
    )
    .await;
    no_event_for(&mut watch, Duration::from_secs(5)).await;
    a.shutdown().await.unwrap();
    let ev = next_event(&mut watch, Duration::from_secs(1)).await;
    assert!(
        matches!(ev, WatchEvent::Removed(ref i) if i.id().as_str() == "a"),
        "{ev:?}"
    );
    drop(b);
}

#[tokio::test(start_paused = true)]
async fn missing_host_defaults_and_reregistering_updates() {
    let memory = Memory::new();
    let mut watch = memory.watch(&name("s"));
    next_event(&mut watch, Duration::from_secs(1)).await;
    let h1 = memory.register(ttl_reg("s", "a", 3)).await.unwrap();
    assert_eq!(h1.instance().host(), "127.0.0.1");
    assert!(matches!(
        next_event(&mut watch, Duration::from_secs(1)).await,
        WatchEvent::Added(_)
    ));

    let v2 = Registration::builder("s", "a")
        .host("10.0.0.9")
        .port(8080)
        .weight(4)
        .check(HealthCheck::ttl(Duration::from_secs(3)))
        .build()
        .unwrap();
    let h2 = memory.register(v2).await.unwrap();
    let ev = next_event(&mut watch, Duration::from_secs(1)).await;
    assert!(
        matches!(ev, WatchEvent::Updated(ref i) if i.host() == "10.0.0.9" && i.weight().get() == 4),
        "{ev:?}"
    );
    // The first handle's heartbeats keep the id alive; abandoning it changes nothing.
    h1.abandon().await.unwrap();
    no_event_for(&mut watch, Duration::from_secs(10)).await;
    h2.shutdown().await.unwrap();
    assert!(matches!(
        next_event(&mut watch, Duration::from_secs(1)).await,
        WatchEvent::Removed(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_handle_deregisters_at_once() {
    let memory = Memory::new();
    // A TTL far longer than the test's waits: only deregistration can explain the removal.
    let h = memory.register(ttl_reg("s", "a", 3600)).await.unwrap();
    let mut watch = memory.watch(&name("s"));
    assert!(
        matches!(next_event(&mut watch, Duration::from_secs(1)).await, WatchEvent::Snapshot(v) if v.len() == 1)
    );
    drop(h);
    let ev = next_event(&mut watch, Duration::from_secs(1)).await;
    assert!(
        matches!(ev, WatchEvent::Removed(ref i) if i.id().as_str() == "a"),
        "{ev:?}"
    );
    assert!(ids(&memory, "s").await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_an_outage_reports_the_error() {
    let memory = Memory::new();
    let h = memory.register(ttl_reg("s", "a", 3)).await.unwrap();
    memory.set_available(false);
    assert!(matches!(h.shutdown().await, Err(Error::Unavailable { .. })));
    memory.set_available(true);
    // Not deregistered, so the TTL removes it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(ids(&memory, "s").await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_clone_ends_watches_and_keep_alives() {
    let memory = Memory::new();
    let h: RegistrationHandle = memory.register(ttl_reg("s", "a", 3)).await.unwrap();
    let mut watch = memory.clone().watch(&name("s"));
    next_event(&mut watch, Duration::from_secs(1)).await;
    expect_synced(&mut watch).await;
    let mut live = h.subscribe();
    drop(memory);
    let end = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap();
    assert!(
        end.is_none(),
        "the watch ends with its backend, got {end:?}"
    );
    live.wait_for(|l| *l == Liveness::Stopped).await.unwrap();
    assert!(matches!(h.shutdown().await, Err(Error::Closed { .. })));
}

/// Polls (real time) until the listed ids of `service` equal `want`.
async fn wait_ids(memory: &Memory, service: &str, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = ids(memory, service).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service}: {got:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tcp_check_lists_the_instance_while_it_accepts_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let memory = Memory::new();
    let reg = Registration::builder("tcp", "t1")
        .port(addr.port())
        .check(HealthCheck::tcp(
            addr.to_string(),
            Duration::from_millis(50),
        ))
        .build()
        .unwrap();
    let h = memory.register(reg).await.unwrap();
    wait_ids(&memory, "tcp", &["t1"]).await;
    let mut watch = memory.watch(&name("tcp"));
    assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Snapshot(v))) if v.len() == 1));
    expect_synced(&mut watch).await;

    drop(listener);
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap();
    assert!(matches!(ev, Some(Ok(WatchEvent::Removed(_)))), "{ev:?}");
    assert!(
        h.is_live(),
        "a failing check does not unregister: the instance is just not listed"
    );

    let listener = TcpListener::bind(addr).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap();
    assert!(matches!(ev, Some(Ok(WatchEvent::Added(_)))), "{ev:?}");
    h.shutdown().await.unwrap();
    drop(listener);
}

/// HTTP and gRPC checks run as TCP connects to their host and port (the URL's, the target's
/// before any `/service`), over TLS or not.
#[tokio::test]
async fn http_and_grpc_checks_run_as_a_tcp_connect() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let memory = Memory::new();
    /// A check of one kind on an address.
    type Check = fn(&str) -> HealthCheck;
    const EVERY: Duration = Duration::from_millis(50);
    let kinds: [(&str, Check); 4] = [
        ("http", |a| {
            HealthCheck::http(format!("http://{a}/health"), EVERY)
        }),
        ("https", |a| {
            HealthCheck::https(format!("https://{a}/health"), EVERY, CheckTls::SkipVerify)
        }),
        ("grpc", |a| {
            HealthCheck::grpc(format!("{a}/users.Users"), EVERY)
        }),
        ("grpc-tls", |a| {
            HealthCheck::grpc_tls(a, EVERY, CheckTls::Verify)
        }),
    ];
    for (service, check) in kinds {
        let reg = |id: &str, address: String| {
            let check = check(&address);
            assert_eq!(check.heartbeat_interval(), None);
            Registration::builder(service, id)
                .port(addr.port())
                .check(check)
                .build()
                .unwrap()
        };
        let up = memory.register(reg("up", addr.to_string())).await.unwrap();
        // Nothing listens on port 1 of loopback: never listed.
        let down = memory
            .register(reg("down", "127.0.0.1:1".into()))
            .await
            .unwrap();
        wait_ids(&memory, service, &["up"]).await;
        up.shutdown().await.unwrap();
        down.shutdown().await.unwrap();
        wait_ids(&memory, service, &[]).await;
    }
}

#[tokio::test]
async fn checked_registrations_heal_after_a_restart() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let memory = Memory::new();
    let reg = Registration::builder("tcp", "t1")
        .port(addr.port())
        .check(HealthCheck::tcp(
            addr.to_string(),
            Duration::from_millis(50),
        ))
        .build()
        .unwrap();
    let h = memory.register(reg).await.unwrap();
    wait_ids(&memory, "tcp", &["t1"]).await;
    memory.restart(Duration::from_millis(10)).await;
    assert!(ids(&memory, "tcp").await.is_empty());
    wait_ids(&memory, "tcp", &["t1"]).await;
    h.shutdown().await.unwrap();
}
