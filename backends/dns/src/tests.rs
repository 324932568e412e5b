//! The discovery and the watch against the fake server: answers, failures, the watch contract.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RecordType;
use waypost_core::{Discovery, Error, InstanceSet, ServiceName, Watch, WatchEvent};

use crate::fake::{addr, srv, FakeDns, Reply};
use crate::{Dns, DnsBuilder, Protocol};

const USERS: &str = "users.service.consul";

fn users() -> ServiceName {
    ServiceName::new("users").expect("valid")
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn builder(server: &FakeDns, protocol: Protocol) -> DnsBuilder {
    Dns::builder()
        .server(server.addr())
        .protocol(protocol)
        .poll_interval(Duration::from_millis(50))
        .query_timeout(Duration::from_millis(400))
        .backoff(Duration::from_millis(20), Duration::from_millis(80))
}

fn dns(server: &FakeDns, protocol: Protocol) -> Dns {
    builder(server, protocol).build().expect("valid config")
}

fn ids(list: &[waypost_core::ServiceInstance]) -> Vec<String> {
    list.iter().map(|i| i.id().to_string()).collect()
}

/// Two instances on two nodes, as Consul answers: SRV records and the targets' A records in
/// the additional section.
fn two_nodes(server: &FakeDns) {
    server.set_srv(
        USERS,
        vec![
            srv(USERS, 1, 3, 8080, "node-b.node.dc1.consul"),
            srv(USERS, 1, 1, 8081, "7f000001.addr.dc1.consul"),
        ],
        vec![
            addr("node-b.node.dc1.consul", v4(10, 0, 0, 2)),
            addr("7f000001.addr.dc1.consul", v4(127, 0, 0, 1)),
        ],
    );
}

#[tokio::test]
async fn srv_records_become_instances_with_addresses_from_the_answer() {
    let server = FakeDns::start().await;
    two_nodes(&server);
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let before = server.questions();
        let list = dns(&server, protocol)
            .instances(&users())
            .await
            .expect("answer");
        assert_eq!(
            ids(&list),
            vec!["10.0.0.2:8080", "127.0.0.1:8081"],
            "{protocol}"
        );
        assert_eq!(list[0].host(), "10.0.0.2");
        assert_eq!(list[0].port(), 8080);
        assert_eq!(list[0].weight().get(), 3);
        assert_eq!(list[1].weight().get(), 1);
        assert!(list
            .iter()
            .all(|i| i.service() == &users() && i.tags().is_empty()));
        // The additional section was enough: one question.
        assert_eq!(server.questions() - before, 1, "{protocol}");
    }
}

#[tokio::test]
async fn targets_missing_from_the_answer_are_asked_for() {
    let server = FakeDns::start().await;
    server.set_srv(
        USERS,
        vec![
            srv(USERS, 1, 0, 80, "a.example"),
            srv(USERS, 1, 2, 81, "v6.example"),
            srv(USERS, 1, 1, 82, "gone.example"),
            srv(USERS, 1, 1, 83, "a.example"),
        ],
        vec![],
    );
    server.set(
        "a.example",
        RecordType::A,
        Reply::Records {
            answers: vec![
                addr("a.example", v4(10, 1, 0, 7)),
                addr("a.example", v4(10, 1, 0, 3)),
            ],
            additionals: vec![],
        },
    );
    server.set(
        "v6.example",
        RecordType::AAAA,
        Reply::Records {
            answers: vec![addr("v6.example", IpAddr::V6(Ipv6Addr::LOCALHOST))],
            additionals: vec![],
        },
    );
    let list = dns(&server, Protocol::Tcp)
        .instances(&users())
        .await
        .expect("answer");
    // gone.example has no address: its record is left out. a.example's lowest address is used,
    // for both of its records; weight 0 counts as 1.
    assert_eq!(ids(&list), vec!["10.1.0.3:80", "10.1.0.3:83", "[::1]:81"]);
    assert_eq!(list[0].weight().get(), 1);
    assert_eq!(list[2].host(), "::1");
    assert_eq!(list[2].authority(), "[::1]:81");
    assert_eq!(list[2].weight().get(), 2);
}

#[tokio::test]
async fn a_target_the_server_will_not_resolve_is_left_out() {
    let server = FakeDns::start().await;
    server.set_srv(
        USERS,
        vec![
            srv(USERS, 1, 1, 80, "ok.example"),
            srv(USERS, 1, 1, 81, "refused.example"),
            srv(USERS, 1, 1, 82, "broken.example"),
        ],
        vec![addr("ok.example", v4(10, 0, 0, 1))],
    );
    // Consul without recursors refuses names outside its domain (a service registered with a
    // host name); a server may fail one name. The other instances are still served.
    server.set(
        "refused.example",
        RecordType::A,
        Reply::Code(ResponseCode::Refused),
    );
    server.set(
        "broken.example",
        RecordType::A,
        Reply::Code(ResponseCode::ServFail),
    );
    let list = dns(&server, Protocol::Tcp)
        .instances(&users())
        .await
        .expect("an answer");
    assert_eq!(ids(&list), vec!["10.0.0.1:80"]);
}

#[tokio::test]
async fn a_target_whose_address_question_gets_no_answer_times_out() {
    let server = FakeDns::start().await;
    server.set_srv(USERS, vec![srv(USERS, 1, 1, 80, "mute.example")], vec![]);
    server.set("mute.example", RecordType::A, Reply::Silence);
    let err = dns(&server, Protocol::Udp)
        .instances(&users())
        .await
        .expect_err("no address, no answer");
    assert!(
        matches!(err, Error::Unavailable { backend: "dns", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("A mute.example."), "{err}");
    assert!(err.to_string().contains("within"), "{err}");
}

#[tokio::test]
async fn an_unknown_service_has_no_instances() {
    let server = FakeDns::start().await;
    // NXDOMAIN.
    let d = dns(&server, Protocol::Udp);
    assert!(d
        .instances(&users())
        .await
        .expect("NXDOMAIN is an answer")
        .is_empty());
    // NOERROR without SRV records.
    server.set(USERS, RecordType::TXT, Reply::Code(ResponseCode::NoError));
    assert!(d
        .instances(&users())
        .await
        .expect("no records is an answer")
        .is_empty());
    // Only a "." target: decidedly no service.
    server.set_srv(USERS, vec![srv(USERS, 0, 0, 0, ".")], vec![]);
    assert!(d.instances(&users()).await.expect("answer").is_empty());
}

#[tokio::test]
async fn the_lowest_priority_with_an_address_is_used() {
    let server = FakeDns::start().await;
    server.set_srv(
        USERS,
        vec![
            srv(USERS, 20, 1, 80, "backup.example"),
            srv(USERS, 10, 1, 80, "main.example"),
        ],
        vec![
            addr("backup.example", v4(10, 0, 0, 20)),
            addr("main.example", v4(10, 0, 0, 10)),
        ],
    );
    let d = dns(&server, Protocol::Udp);
    assert_eq!(
        ids(&d.instances(&users()).await.expect("answer")),
        vec!["10.0.0.10:80"]
    );
    // When the primaries leave, the backups serve.
    server.set_srv(
        USERS,
        vec![srv(USERS, 20, 1, 80, "backup.example")],
        vec![addr("backup.example", v4(10, 0, 0, 20))],
    );
    assert_eq!(
        ids(&d.instances(&users()).await.expect("answer")),
        vec!["10.0.0.20:80"]
    );
    // So they do while the primaries have no address (NXDOMAIN for gone.example).
    server.set_srv(
        USERS,
        vec![
            srv(USERS, 20, 1, 80, "backup.example"),
            srv(USERS, 10, 1, 80, "gone.example"),
        ],
        vec![addr("backup.example", v4(10, 0, 0, 20))],
    );
    assert_eq!(
        ids(&d.instances(&users()).await.expect("answer")),
        vec!["10.0.0.20:80"]
    );
}

#[tokio::test]
async fn servfail_and_refused_are_unavailable_and_say_what_to_check() {
    let server = FakeDns::start().await;
    let d = dns(&server, Protocol::Udp);
    for (code, says) in [
        (ResponseCode::ServFail, "SERVFAIL"),
        (ResponseCode::Refused, "REFUSED"),
    ] {
        server.set(USERS, RecordType::SRV, Reply::Code(code));
        let err = d.instances(&users()).await.expect_err("an error");
        assert!(
            matches!(err, Error::Unavailable { backend: "dns", .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(says) && text.contains(&server.addr().to_string()),
            "{text}"
        );
        assert!(text.contains("SRV users.service.consul."), "{text}");
        assert!(err.is_retryable());
    }
    server.set(USERS, RecordType::SRV, Reply::Code(ResponseCode::NotImp));
    let err = d.instances(&users()).await.expect_err("an error");
    assert!(
        matches!(err, Error::Protocol { backend: "dns", .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_silent_server_times_out_within_the_query_timeout() {
    let server = FakeDns::start().await;
    server.silent(true);
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let d = builder(&server, protocol)
            .query_timeout(Duration::from_millis(300))
            .build()
            .expect("valid");
        let started = tokio::time::Instant::now();
        let err = d.instances(&users()).await.expect_err("no answer");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{protocol}: took {took:?}");
        assert!(
            matches!(err, Error::Unavailable { backend: "dns", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("300ms"), "{err}");
        assert!(err.to_string().contains("query_timeout"), "{err}");
    }
}

#[tokio::test]
async fn nobody_listening_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let d = Dns::builder()
        .server(SocketAddr::from(([127, 0, 0, 1], port)))
        .protocol(Protocol::Tcp)
        .query_timeout(Duration::from_millis(500))
        .build()
        .expect("valid");
    let err = d.instances(&users()).await.expect_err("refused");
    assert!(
        matches!(err, Error::Unavailable { backend: "dns", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

#[tokio::test]
async fn a_server_that_is_down_is_passed_over_for_the_next() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let server = FakeDns::start().await;
    two_nodes(&server);
    let d = Dns::builder()
        .server(dead)
        .server(server.addr())
        .protocol(Protocol::Tcp)
        .query_timeout(Duration::from_secs(2))
        .build()
        .expect("valid");
    for n in 0..3 {
        let list = d.instances(&users()).await;
        assert!(
            matches!(&list, Ok(l) if l.len() == 2),
            "question {n}: {list:?}"
        );
    }
    let shown = format!("{d:?}");
    assert!(shown.contains(&dead.to_string()) && shown.contains(&server.addr().to_string()));
}

#[tokio::test]
async fn truncated_udp_answers_are_asked_again_over_tcp() {
    let server = FakeDns::start().await;
    two_nodes(&server);
    server.udp_truncates(true);
    let list = dns(&server, Protocol::Udp)
        .instances(&users())
        .await
        .expect("the TCP answer");
    assert_eq!(list.len(), 2);
}

#[tokio::test]
async fn connections_the_server_closes_are_reopened_without_an_error() {
    let server = FakeDns::start().await;
    two_nodes(&server);
    server.tcp_one_shot(true);
    let d = dns(&server, Protocol::Tcp);
    for n in 0..5 {
        let list = d.instances(&users()).await;
        assert!(
            matches!(&list, Ok(l) if l.len() == 2),
            "question {n}: {list:?}"
        );
    }
}

#[tokio::test]
async fn every_question_reaches_the_server() {
    let server = FakeDns::start().await;
    let d = dns(&server, Protocol::Udp);
    // A negative answer is not remembered...
    assert!(d.instances(&users()).await.expect("answer").is_empty());
    two_nodes(&server);
    assert_eq!(d.instances(&users()).await.expect("answer").len(), 2);
    // ... nor a positive one.
    server.remove(USERS);
    assert!(d.instances(&users()).await.expect("answer").is_empty());
    assert_eq!(server.questions(), 3);
}

#[tokio::test]
async fn a_service_name_dns_cannot_carry_is_invalid_input() {
    let server = FakeDns::start().await;
    let d = dns(&server, Protocol::Udp);
    let long = ServiceName::new("x".repeat(64)).expect("a valid service name");
    assert!(matches!(d.instances(&long).await, Err(Error::Invalid(_))));
    assert_eq!(server.questions(), 0, "rejected before any I/O");
}

/// The next item within `bound`.
async fn next(watch: &mut Watch, bound: Duration) -> Result<WatchEvent, Error> {
    match tokio::time::timeout(bound, watch.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("nothing within {bound:?}"),
    }
}

/// Collects items for `period`.
async fn during(watch: &mut Watch, period: Duration) -> Vec<Result<WatchEvent, Error>> {
    let until = tokio::time::Instant::now() + period;
    let mut items = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout_at(until, watch.next()).await {
        items.push(item);
    }
    items
}

#[tokio::test]
async fn the_watch_starts_with_snapshot_and_synced_at_once_then_tells_changes() {
    let server = FakeDns::start().await;
    two_nodes(&server);
    // A long poll interval: the snapshot must not wait for it.
    let d = builder(&server, Protocol::Udp)
        .poll_interval(Duration::from_secs(3600))
        .build()
        .expect("valid");
    let mut watch = d.watch(&users());
    let first = next(&mut watch, Duration::from_secs(2)).await;
    assert!(
        matches!(&first, Ok(WatchEvent::Snapshot(v)) if ids(v) == ["10.0.0.2:8080", "127.0.0.1:8081"]),
        "{first:?}"
    );
    assert!(matches!(
        next(&mut watch, Duration::from_secs(2)).await,
        Ok(WatchEvent::Synced)
    ));

    let d = dns(&server, Protocol::Udp);
    let mut watch = d.watch(&users());
    let mut set = InstanceSet::new();
    for _ in 0..2 {
        set.apply(
            &next(&mut watch, Duration::from_secs(2))
                .await
                .expect("no error"),
        );
    }
    // Unchanged answers say nothing.
    let quiet = during(&mut watch, Duration::from_millis(300)).await;
    assert!(quiet.is_empty(), "{quiet:?}");
    // A weight change is an update, a new record an add, a gone one a removal.
    server.set_srv(
        USERS,
        vec![
            srv(USERS, 1, 9, 8080, "node-b.node.dc1.consul"),
            srv(USERS, 1, 1, 9090, "node-c.node.dc1.consul"),
        ],
        vec![
            addr("node-b.node.dc1.consul", v4(10, 0, 0, 2)),
            addr("node-c.node.dc1.consul", v4(10, 0, 0, 3)),
        ],
    );
    let mut changes = Vec::new();
    while changes.len() < 3 {
        let ev = next(&mut watch, Duration::from_secs(2))
            .await
            .expect("no error");
        assert!(set.apply(&ev), "{ev:?} changes nothing");
        changes.push(ev);
    }
    assert!(matches!(&changes[0], WatchEvent::Removed(i) if i.id().as_str() == "127.0.0.1:8081"));
    assert!(matches!(&changes[1], WatchEvent::Updated(i) if i.weight().get() == 9));
    assert!(matches!(&changes[2], WatchEvent::Added(i) if i.id().as_str() == "10.0.0.3:9090"));
    let quiet = during(&mut watch, Duration::from_millis(300)).await;
    assert!(quiet.is_empty(), "{quiet:?}");
    // The service goes away: removals, not an error.
    server.remove(USERS);
    for _ in 0..2 {
        let ev = next(&mut watch, Duration::from_secs(2))
            .await
            .expect("no error");
        assert!(matches!(ev, WatchEvent::Removed(_)), "{ev:?}");
        set.apply(&ev);
    }
    assert!(set.is_empty());
}

#[tokio::test]
async fn an_outage_yields_errors_keeps_the_set_and_ends_with_synced() {
    let server = FakeDns::start().await;
    two_nodes(&server);
    let d = dns(&server, Protocol::Tcp);
    let mut watch = d.watch(&users());
    let mut set = InstanceSet::new();
    for _ in 0..2 {
        set.apply(
            &next(&mut watch, Duration::from_secs(2))
                .await
                .expect("no error"),
        );
    }
    assert!(set.is_in_sync());

    server.set(USERS, RecordType::SRV, Reply::Code(ResponseCode::ServFail));
    let outage = during(&mut watch, Duration::from_millis(600)).await;
    assert!(
        outage.len() >= 2,
        "each failed poll is an error: {outage:?}"
    );
    for item in &outage {
        match item {
            Err(Error::Unavailable { backend: "dns", .. }) => {}
            other => panic!("only errors during the outage, got {other:?}"),
        }
    }
    // Backed off: within 600 ms, with 20..80 ms of backoff, far fewer than one per millisecond.
    assert!(outage.len() < 40, "{} errors", outage.len());

    two_nodes(&server);
    // Nothing changed: only Synced says that the outage is over.
    let back = next(&mut watch, Duration::from_secs(2)).await;
    assert!(matches!(back, Ok(WatchEvent::Synced)), "{back:?}");
    let quiet = during(&mut watch, Duration::from_millis(300)).await;
    assert!(quiet.is_empty(), "{quiet:?}");

    // An outage with a change: the difference, then Synced.
    server.silent(true);
    assert!(next(&mut watch, Duration::from_secs(3)).await.is_err());
    server.set_srv(
        USERS,
        vec![srv(USERS, 1, 3, 8080, "node-b.node.dc1.consul")],
        vec![addr("node-b.node.dc1.consul", v4(10, 0, 0, 2))],
    );
    server.silent(false);
    let mut after = Vec::new();
    loop {
        match next(&mut watch, Duration::from_secs(3)).await {
            Err(_) => continue, // a poll still in flight when the server came back
            Ok(WatchEvent::Synced) => break,
            Ok(ev) => after.push(ev),
        }
    }
    assert!(
        matches!(after.as_slice(), [WatchEvent::Removed(i)] if i.id().as_str() == "127.0.0.1:8081"),
        "{after:?}"
    );
}

#[tokio::test]
async fn errors_before_the_first_answer_come_before_the_snapshot() {
    let server = FakeDns::start().await;
    server.set(USERS, RecordType::SRV, Reply::Code(ResponseCode::ServFail));
    let d = dns(&server, Protocol::Udp);
    let mut watch = d.watch(&users());
    assert!(next(&mut watch, Duration::from_secs(2)).await.is_err());
    two_nodes(&server);
    loop {
        match next(&mut watch, Duration::from_secs(2)).await {
            Err(_) => continue,
            Ok(WatchEvent::Snapshot(v)) => {
                assert_eq!(v.len(), 2);
                break;
            }
            Ok(other) => panic!("the snapshot comes first, got {other:?}"),
        }
    }
    assert!(matches!(
        next(&mut watch, Duration::from_secs(2)).await,
        Ok(WatchEvent::Synced)
    ));
}

#[tokio::test]
async fn the_watch_outlives_its_dns() {
    let server = FakeDns::start().await;
    let d = dns(&server, Protocol::Udp);
    let mut watch = d.watch(&users());
    drop(d);
    assert!(matches!(
        next(&mut watch, Duration::from_secs(2)).await,
        Ok(WatchEvent::Snapshot(v)) if v.is_empty()
    ));
    assert!(matches!(
        next(&mut watch, Duration::from_secs(2)).await,
        Ok(WatchEvent::Synced)
    ));
    two_nodes(&server);
    assert!(matches!(
        next(&mut watch, Duration::from_secs(2)).await,
        Ok(WatchEvent::Added(_))
    ));
}

#[tokio::test]
async fn debug_shows_servers_and_domain() {
    let server = FakeDns::start().await;
    let d = builder(&server, Protocol::Tcp)
        .domain("example.internal")
        .build()
        .expect("valid");
    let shown = format!("{d:?}");
    assert!(shown.contains(&server.addr().to_string()), "{shown}");
    assert!(shown.contains("example.internal"), "{shown}");
    assert!(shown.contains("Tcp"), "{shown}");
}

/// Log lines of the watch, captured.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_watch_logs_failures_and_recovery_in_its_span() {
    // tracing caches each callsite's interest the first time any thread reaches it, and with
    // one dispatcher registered it asks only that thread's default (tokio-rs/tracing#3611): a
    // sibling test without a subscriber could turn these events off for good. With a second
    // live dispatcher it asks every registered one, this test's capture among them.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = FakeDns::start().await;
    server.set(USERS, RecordType::SRV, Reply::Code(ResponseCode::ServFail));
    let d = dns(&server, Protocol::Udp);
    let mut watch = d.watch(&users());
    assert!(next(&mut watch, Duration::from_secs(2)).await.is_err());
    two_nodes(&server);
    while !matches!(
        next(&mut watch, Duration::from_secs(2)).await,
        Ok(WatchEvent::Synced)
    ) {}

    let text = String::from_utf8(logs.0.lock().map(|v| v.clone()).unwrap_or_default())
        .expect("utf-8 logs");
    let failed = text
        .lines()
        .find(|l| l.contains("dns watch failed"))
        .unwrap_or_else(|| panic!("no failure logged:\n{text}"));
    assert!(failed.contains("WARN"), "{failed}");
    assert!(
        failed.contains("watch{service=users backend=\"dns\"}"),
        "{failed}"
    );
    assert!(failed.contains("SERVFAIL"), "{failed}");
    let recovered = text
        .lines()
        .find(|l| l.contains("dns watch recovered"))
        .unwrap_or_else(|| panic!("no recovery logged:\n{text}"));
    assert!(recovered.contains("INFO"), "{recovered}");
    assert!(recovered.contains("backend=\"dns\""), "{recovered}");
}
