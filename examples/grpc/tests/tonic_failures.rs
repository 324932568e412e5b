//! What tonic's own balanced channel gets wrong (read `../shared/reference/ecosystem.md`), each
//! as a test of `waypost::grpc::GrpcChannel` against real tonic servers on loopback, with
//! instances found through the in-process registry:
//!
//! 1. load-aware strategies see real in-flight counts and latency: a slow instance gets clearly
//!    less p2c-ewma traffic (tonic's P2C reads a load of 0 for every connection: random);
//! 2. any Waypost strategy works, consistent-hash and maglev by a metadata key, and the
//!    resilience layer's zone preference by the channel's zone;
//! 3. TLS to the instances, mutual TLS too, and channels of one's own (tonic's balanced
//!    channel takes no custom connector);
//! 4. an instance removed while the channel is idle is never used afterwards, and changes are
//!    applied while idle, with no queue that grows;
//! 5. a dead instance stops getting traffic (outcomes plus the resilience wrapper's ejection)
//!    and gets it back after it recovers, and one that hangs costs a call only its per-try
//!    timeout, and one that is slow costs an idempotent call only the hedge's delay;
//! 6. a stream counts as in flight for as long as it lasts (least-connections sends other
//!    calls elsewhere meanwhile), and one that fails midway, its status in the trailers, is a
//!    failure of the instance; so is one given up on after its instance went quiet, with the
//!    channel's `stalled_after`.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use waypost::grpc::GrpcChannel;
use waypost::memory::Memory;
use waypost::retry::Hedge;
use waypost::strategies::resilience::{OutlierEjection, Resilient};
use waypost::strategies::{ConsistentHash, LeastConnections, Maglev, P2cEwma, RoundRobin};
use waypost::{
    Balancer, Discovery, HealthCheck, Registration, RegistrationHandle, Registry, ServiceName,
    Strategy,
};
use waypost_grpc_examples::users::users_client::UsersClient;
use waypost_grpc_examples::users::{GetUserRequest, ListUsersRequest, User};
use waypost_grpc_examples::{serve, server_tls, Control, Serving, UsersServer};

#[path = "../../common/test_ca.rs"]
mod test_ca;

struct Instance {
    serving: Serving,
    control: Control,
    registration: RegistrationHandle,
}

async fn instance(
    memory: &Memory,
    service: &str,
    id: &str,
    delay: Option<Duration>,
    tls: Option<(&str, &str)>,
) -> Instance {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = UsersServer::new(id, delay, false).unwrap();
    let control = server.control();
    let serving = serve(listener, server, tls.map(|(c, k)| server_tls(c, k)))
        .await
        .unwrap();
    let mut reg = Registration::builder(service, id)
        .host("127.0.0.1")
        .port(serving.addr().port())
        .check(HealthCheck::ttl(Duration::from_secs(30)));
    if tls.is_some() {
        reg = reg.meta("scheme", "https");
    }
    let registration = memory.register(reg.build().unwrap()).await.unwrap();
    Instance {
        serving,
        control,
        registration,
    }
}

async fn balancer(memory: &Memory, service: &str, strategy: impl Strategy, n: usize) -> Balancer {
    let name: ServiceName = service.parse().unwrap();
    let b = Balancer::watch(memory, &name, strategy);
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.instances().len() != n {
        assert!(Instant::now() < deadline, "{:?}", b.status());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b
}

/// Sends `n` GetUser calls, `concurrency` at a time; counts the replies by the instance that
/// served them, and the errors.
async fn send(
    channel: &GrpcChannel,
    n: usize,
    concurrency: usize,
) -> (BTreeMap<String, usize>, usize) {
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut client = UsersClient::new(channel.clone());
        let share = n / concurrency + usize::from(t < n % concurrency);
        tasks.push(tokio::spawn(async move {
            let mut by = BTreeMap::<String, usize>::new();
            let mut errors = 0;
            for i in 0..share {
                match client
                    .get_user(GetUserRequest {
                        id: 1 + (i % 100) as u32,
                    })
                    .await
                {
                    Ok(r) => *by.entry(r.into_inner().instance).or_default() += 1,
                    Err(_) => errors += 1,
                }
            }
            (by, errors)
        }));
    }
    let mut by = BTreeMap::new();
    let mut errors = 0;
    for t in tasks {
        let (b, e) = t.await.unwrap();
        for (k, v) in b {
            *by.entry(k).or_default() += v;
        }
        errors += e;
    }
    (by, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_sends_clearly_less_to_a_slow_instance() {
    let memory = Memory::new();
    let _a = instance(&memory, "load", "fast-a", None, None).await;
    let _b = instance(&memory, "load", "fast-b", None, None).await;
    let _s = instance(
        &memory,
        "load",
        "slow",
        Some(Duration::from_millis(25)),
        None,
    )
    .await;
    let b = balancer(&memory, "load", P2cEwma::new(), 3).await;
    let channel = GrpcChannel::builder(b.clone()).build().unwrap();
    let (by, errors) = send(&channel, 300, 6).await;
    assert_eq!(errors, 0, "{by:?}");
    eprintln!("waypost p2c-ewma: {by:?}");
    let slow = *by.get("slow").unwrap_or(&0);
    // A fair third would be 100; random-in-effect balancing gives about that.
    assert!(slow < 45, "the slow instance got {slow} of 300: {by:?}");
    assert!(
        by.contains_key("fast-a") && by.contains_key("fast-b"),
        "{by:?}"
    );

    // The same load through tonic's own balanced channel over the same three servers: its
    // P2C sees no load, so the slow instance gets about a third. (What the test above would
    // catch.)
    let endpoints = b.instances().into_iter().map(|i| {
        tonic::transport::Endpoint::from_shared(format!("http://{}", i.authority())).unwrap()
    });
    let tonic_channel = tonic::transport::Channel::balance_list(endpoints);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut client = UsersClient::new(tonic_channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut slow = 0;
            for i in 0..50 {
                let r = client.get_user(GetUserRequest { id: 1 + i }).await.unwrap();
                slow += usize::from(r.into_inner().instance == "slow");
            }
            slow
        }));
    }
    let mut tonic_slow = 0;
    for t in tasks {
        tonic_slow += t.await.unwrap();
    }
    eprintln!("tonic balance_list: slow got {tonic_slow} of 300");
    assert!(
        tonic_slow > 60,
        "tonic's channel sent the slow instance only {tonic_slow} of 300"
    );
}

async fn same_key_same_instance(strategy: impl Strategy) {
    let memory = Memory::new();
    let mut held = Vec::new();
    for id in ["h-a", "h-b", "h-c", "h-d"] {
        held.push(instance(&memory, "hash", id, None, None).await);
    }
    let b = balancer(&memory, "hash", strategy, 4).await;
    let channel = GrpcChannel::builder(b)
        .hash_key("x-user-id")
        .build()
        .unwrap();
    let mut client = UsersClient::new(channel);
    let mut owners = BTreeMap::new();
    for key in 1..=20 {
        for _ in 0..5 {
            let mut req = tonic::Request::new(GetUserRequest { id: key });
            req.metadata_mut()
                .insert("x-user-id", format!("user-{key}").parse().unwrap());
            let served = client.get_user(req).await.unwrap().into_inner().instance;
            let first = owners.entry(key).or_insert_with(|| served.clone());
            assert_eq!(*first, served, "key user-{key} moved between instances");
        }
    }
    let distinct: std::collections::BTreeSet<_> = owners.values().collect();
    assert!(
        distinct.len() >= 2,
        "20 keys all on one instance: {owners:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_by_a_metadata_key_keeps_a_key_on_one_instance() {
    same_key_same_instance(ConsistentHash::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_by_a_metadata_key_keeps_a_key_on_one_instance() {
    same_key_same_instance(Maglev::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_instances_with_a_custom_ca() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    let memory = Memory::new();
    let _a = instance(&memory, "tls", "tls-a", None, Some((&cert_pem, &key_pem))).await;
    let _b = instance(&memory, "tls", "tls-b", None, Some((&cert_pem, &key_pem))).await;
    let b = balancer(&memory, "tls", RoundRobin::new(), 2).await;

    let trusting = GrpcChannel::builder(b.clone())
        .ca_certificate(cert_pem.clone())
        .build()
        .unwrap();
    let (by, errors) = send(&trusting, 20, 2).await;
    assert_eq!(errors, 0, "{by:?}");
    assert_eq!(by.values().sum::<usize>(), 20);
    assert_eq!(by.len(), 2, "both TLS instances served: {by:?}");

    // Without the CA the instances' certificate is not trusted: every call fails.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let untrusting = GrpcChannel::builder(b)
        .ca_certificate(other.cert.pem())
        .max_attempts(1)
        .build()
        .unwrap();
    let mut client = UsersClient::new(untrusting);
    let err = client.get_user(GetUserRequest { id: 1 }).await.unwrap_err();
    assert!(matches!(err.code(), tonic::Code::Unavailable), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_channels_client_certificate() {
    let ca = test_ca::Ca::new("grpc test CA");
    let clients = test_ca::Ca::new("grpc client CA");
    let issued = ca.server("127.0.0.1");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls = server_tls(&issued.cert, &issued.key)
        .client_ca_root(tonic::transport::Certificate::from_pem(clients.pem()));
    let server = UsersServer::new("mtls", None, false).unwrap();
    let serving = serve(listener, server, Some(tls)).await.unwrap();
    let memory = Memory::new();
    let reg = Registration::builder("mtls", "mtls")
        .host("127.0.0.1")
        .port(serving.addr().port())
        .meta("scheme", "https")
        .build()
        .unwrap();
    let _registration = memory.register(reg).await.unwrap();
    let b = balancer(&memory, "mtls", RoundRobin::new(), 1).await;

    let me = clients.client("client.waypost.test");
    let with_identity = GrpcChannel::builder(b.clone())
        .ca_certificate(ca.pem())
        .identity(&me.cert, &me.key)
        .build()
        .unwrap();
    let (by, errors) = send(&with_identity, 10, 2).await;
    assert_eq!((errors, by.get("mtls")), (0, Some(&10)), "{by:?}");

    // Without a client certificate, and with one the server's CA did not sign, the server
    // refuses the handshake: every call fails.
    let stranger = test_ca::Ca::new("another CA").client("client.waypost.test");
    for channel in [
        GrpcChannel::builder(b.clone()).ca_certificate(ca.pem()),
        GrpcChannel::builder(b.clone())
            .ca_certificate(ca.pem())
            .identity(&stranger.cert, &stranger.key),
    ] {
        let (by, errors) = send(&channel.max_attempts(1).build().unwrap(), 4, 1).await;
        assert_eq!(errors, 4, "{by:?}");
    }
    assert!(GrpcChannel::builder(b)
        .identity(&me.cert, "not a key")
        .build()
        .is_err());
}

/// The registry says where an instance is; a maker of one's own may send its calls elsewhere
/// (here: the real server, where the registry names a port nothing listens on, as a proxy or
/// a sidecar would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_for_makes_each_instances_channel() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = UsersServer::new("real", None, false).unwrap();
    let serving = serve(listener, server, None).await.unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let memory = Memory::new();
    let reg = Registration::builder("own", "own-a")
        .host("127.0.0.1")
        .port(closed.port())
        .build()
        .unwrap();
    let _registration = memory.register(reg).await.unwrap();
    let b = balancer(&memory, "own", RoundRobin::new(), 1).await;

    let real = serving.addr();
    let made = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = made.clone();
    let own = GrpcChannel::builder(b.clone())
        .channel_for(move |i| {
            seen.lock().unwrap().push(i.id().to_string());
            tonic::transport::Endpoint::from_shared(format!("http://{real}"))
                .unwrap()
                .connect_lazy()
        })
        .build()
        .unwrap();
    let (by, errors) = send(&own, 10, 2).await;
    assert_eq!((errors, by.get("real")), (0, Some(&10)), "{by:?}");
    assert_eq!(*made.lock().unwrap(), ["own-a"], "one channel per instance");

    // Waypost's own channel goes where the registry says: nothing answers there.
    let plain = GrpcChannel::builder(b).max_attempts(1).build().unwrap();
    let (by, errors) = send(&plain, 2, 1).await;
    assert_eq!(errors, 2, "{by:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_removed_while_idle_is_never_used_again() {
    let memory = Memory::new();
    let a = instance(&memory, "idle", "idle-a", None, None).await;
    let _b = instance(&memory, "idle", "idle-b", None, None).await;
    let b = balancer(&memory, "idle", RoundRobin::new(), 2).await;
    let channel = GrpcChannel::builder(b.clone()).build().unwrap();
    let (by, _) = send(&channel, 10, 1).await;
    assert_eq!(by.len(), 2, "{by:?}");

    // While the channel is idle: a leaves (and its server stops), and a third instance comes
    // and goes a hundred times.
    a.registration.shutdown().await.unwrap();
    a.serving.stop().await.unwrap();
    let name: ServiceName = "idle".parse().unwrap();
    for i in 0..100 {
        let reg = Registration::builder("idle", "churn")
            .host("127.0.0.1")
            .port(9)
            .meta("round", i.to_string())
            .build()
            .unwrap();
        let h = memory.register(reg).await.unwrap();
        h.shutdown().await.unwrap();
    }
    // Applied while idle, by the balancer's own task: no call was needed to see them.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ids: Vec<String> = b.instances().iter().map(|i| i.id().to_string()).collect();
        if ids == ["idle-b"] {
            break;
        }
        assert!(Instant::now() < deadline, "the balancer shows {ids:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        memory.instances(&name).await.unwrap().len(),
        1,
        "the registry agrees"
    );
    let (by, errors) = send(&channel, 30, 3).await;
    assert_eq!((errors, by.get("idle-a")), (0, None), "{by:?}");
    assert_eq!(by.get("idle-b"), Some(&30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_stops_getting_traffic_and_gets_it_back_after_it_recovers() {
    let memory = Memory::new();
    let _a = instance(&memory, "dead", "d-a", None, None).await;
    let _b = instance(&memory, "dead", "d-b", None, None).await;
    let c = instance(&memory, "dead", "d-c", None, None).await;
    let strategy = Resilient::new(RoundRobin::new()).outlier_ejection(OutlierEjection {
        consecutive_failures: 2,
        base_ejection_time: Duration::from_millis(500),
        max_ejection_time: Duration::from_secs(1),
        ..OutlierEjection::default()
    });
    let b = balancer(&memory, "dead", strategy, 3).await;
    // One attempt per call, so that the test sees what the instance did.
    let channel = GrpcChannel::builder(b.clone())
        .max_attempts(1)
        .build()
        .unwrap();

    c.control.set_unavailable(true);
    let (_, errors) = send(&channel, 30, 1).await;
    assert!(
        errors >= 2,
        "d-c failed some calls before it was ejected: {errors}"
    );
    assert!(
        errors <= 6,
        "ejected after its consecutive failures: {errors} errors"
    );
    let failures = b
        .endpoints()
        .iter()
        .find(|e| e.id().as_str() == "d-c")
        .map(|e| e.state().failures());
    assert_eq!(
        failures,
        Some(errors as u64),
        "every UNAVAILABLE was recorded on d-c"
    );
    // Ejected: it gets nothing now.
    let calls_before = c.control.calls();
    let (by, errors) = send(&channel, 30, 1).await;
    assert_eq!((errors, by.get("d-c")), (0, None), "{by:?}");
    assert_eq!(c.control.calls(), calls_before);

    // It recovers: once its ejection ends it is picked again and, answering, stays in.
    c.control.set_unavailable(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (by, errors) = send(&channel, 30, 1).await;
        assert_eq!(errors, 0, "{by:?}");
        if by.get("d-c").is_some_and(|&n| n >= 5) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "d-c never got traffic back: {by:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A caller that gives up on a slow instance (`tokio::time::timeout` around the call, as a
/// tower `Timeout` would) teaches a balancer with `cancel_is_failure_after` that the instance
/// is slow: each give-up is a failure with its latency. Without it, the same calls are
/// cancelled and the instance looks healthy (the "0 failures after 10 timeouts").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_given_up_on_past_the_threshold_count_as_failures_of_the_slow_instance() {
    let memory = Memory::new();
    let _slow = instance(
        &memory,
        "given-up",
        "slow",
        Some(Duration::from_secs(5)),
        None,
    )
    .await;
    let name: ServiceName = "given-up".parse().unwrap();
    let timeout = Duration::from_millis(50);
    for threshold in [None, Some(Duration::from_millis(40))] {
        let mut builder = Balancer::builder(RoundRobin::new());
        if let Some(t) = threshold {
            builder = builder.cancel_is_failure_after(t);
        }
        let b = builder.watch(&memory, &name);
        assert!(b.wait_ready(Duration::from_secs(5)).await);
        let mut client = UsersClient::new(GrpcChannel::builder(b.clone()).build().unwrap());
        for id in 1..=10 {
            let call = client.get_user(GetUserRequest { id });
            let outcome = tokio::time::timeout(timeout, call).await;
            assert!(outcome.is_err(), "the slow instance answered: {outcome:?}");
        }
        let state = b.endpoints()[0].state().failures();
        match threshold {
            None => assert_eq!(state, 0, "cancelled calls are no outcome"),
            Some(_) => assert_eq!(state, 10, "each give-up is a failure"),
        }
    }
}

/// The endpoint of instance `id`: (in flight, successes, failures).
fn counts(b: &Balancer, id: &str) -> (u64, u64, u64) {
    let endpoints = b.endpoints();
    let e = endpoints
        .iter()
        .find(|e| e.id().as_str() == id)
        .unwrap_or_else(|| panic!("no endpoint {id}: {:?}", b.status()));
    let s = e.state();
    (s.in_flight(), s.successes(), s.failures())
}

/// Starts a `WatchUsers` stream and reads its first message.
async fn open_stream(
    client: &mut UsersClient<GrpcChannel>,
) -> (tonic::codec::Streaming<User>, User) {
    let mut stream = client
        .watch_users(ListUsersRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first message");
    (stream, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_in_flight_until_it_ends_and_its_trailers_give_its_outcome() {
    let memory = Memory::new();
    // 5 ms between messages: a stream of 100 lasts about half a second.
    let s = instance(&memory, "stream", "s", Some(Duration::from_millis(5)), None).await;
    let b = balancer(&memory, "stream", RoundRobin::new(), 1).await;
    let mut client = UsersClient::new(GrpcChannel::builder(b.clone()).build().unwrap());

    // Read to its end: in flight until then, then a success.
    let mut stream = open_stream(&mut client).await.0;
    assert_eq!(counts(&b, "s"), (1, 0, 0), "in flight while it streams");
    let mut read = 1;
    while stream.message().await.unwrap().is_some() {
        read += 1;
    }
    assert_eq!(read, 100);
    assert_eq!(counts(&b, "s"), (0, 1, 0));

    // Fails midway: UNAVAILABLE in the trailers, after messages.
    let mut stream = open_stream(&mut client).await.0;
    s.control.set_unavailable(true);
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended well after its instance became unavailable"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(counts(&b, "s"), (0, 1, 1), "a failure of the instance");
    s.control.set_unavailable(false);

    // Dropped midway by the caller: the instance answered, a success.
    let stream = open_stream(&mut client).await.0;
    drop(stream);
    assert_eq!(counts(&b, "s"), (0, 2, 1));

    // A unary call ends with its trailers too (status OK): a success, nothing left in flight.
    let user = client.get_user(GetUserRequest { id: 7 }).await.unwrap();
    assert_eq!(user.into_inner().id, 7);
    assert_eq!(counts(&b, "s"), (0, 3, 1));
}

/// A per-try timeout ends an attempt at an instance that hangs, as its failure, and the
/// idempotent call goes on to another instance well within its deadline; a call that may not
/// be repeated, with nowhere else to go, is DEADLINE_EXCEEDED and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_leaves_time_to_try_another_instance() {
    let memory = Memory::new();
    // "hangs" answers after 30 s, far past every deadline here.
    let _hangs = instance(
        &memory,
        "per-try",
        "hangs",
        Some(Duration::from_secs(30)),
        None,
    )
    .await;
    let _works = instance(&memory, "per-try", "works", None, None).await;
    let b = balancer(&memory, "per-try", RoundRobin::new(), 2).await;
    let channel = GrpcChannel::builder(b.clone())
        .per_try_timeout(Duration::from_millis(200))
        .idempotent("/users.Users/GetUser")
        .build()
        .unwrap();
    let mut client = UsersClient::new(channel);
    for id in 1..=6 {
        let mut request = tonic::Request::new(GetUserRequest { id });
        // Without the per-try timeout, every call that went to "hangs" first would use all of
        // this and fail.
        request.set_timeout(Duration::from_secs(3));
        let user = client.get_user(request).await.unwrap().into_inner();
        assert_eq!(user.instance, "works");
    }
    let (in_flight, _, failures) = counts(&b, "hangs");
    assert_eq!(in_flight, 0);
    assert!(
        failures >= 2,
        "round-robin sent some calls to it first: {failures}"
    );

    let only_hangs = Memory::new();
    let _hangs = instance(
        &only_hangs,
        "per-try",
        "hangs",
        Some(Duration::from_secs(30)),
        None,
    )
    .await;
    let b = balancer(&only_hangs, "per-try", RoundRobin::new(), 1).await;
    let channel = GrpcChannel::builder(b.clone())
        .per_try_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let status = UsersClient::new(channel)
        .get_user(GetUserRequest { id: 1 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("per-try timeout"), "{status:?}");
    assert_eq!(counts(&b, "hangs"), (0, 0, 1));
}

/// A hedge sends an idempotent call whose instance is slow to answer to another instance too,
/// and the first answer wins: every call is answered by the fast instance, well within a
/// deadline the slow one would overrun, and the slow instance's attempts end as cancelled,
/// neither successes nor failures. A method not marked idempotent is not hedged: the call that
/// goes to the slow instance first runs into its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_is_answered_by_another_instance_while_the_first_is_slow() {
    let memory = Memory::new();
    // "slow" answers after 30 s, far past every deadline here.
    let slow = instance(
        &memory,
        "hedged",
        "slow",
        Some(Duration::from_secs(30)),
        None,
    )
    .await;
    let _fast = instance(&memory, "hedged", "fast", None, None).await;
    let b = balancer(&memory, "hedged", RoundRobin::new(), 2).await;
    let hedged = GrpcChannel::builder(b.clone())
        .hedge(Hedge::after(Duration::from_millis(50)))
        .idempotent("/users.Users/GetUser")
        .build()
        .unwrap();
    let mut client = UsersClient::new(hedged);
    for id in 1..=6 {
        let mut request = tonic::Request::new(GetUserRequest { id });
        request.set_timeout(Duration::from_secs(3));
        let user = client.get_user(request).await.unwrap().into_inner();
        assert_eq!(user.instance, "fast");
    }
    // Round-robin sent some of the calls to "slow" first (how many depends on where the
    // hedges' picks leave its counter).
    let sent_to_slow = slow.control.calls();
    assert!(sent_to_slow >= 1, "{sent_to_slow}");
    assert_eq!(counts(&b, "slow"), (0, 0, 0), "its attempts were cancelled");
    assert_eq!(counts(&b, "fast"), (0, 6, 0));

    let not_idempotent = GrpcChannel::builder(b.clone())
        .hedge(Hedge::after(Duration::from_millis(50)))
        .build()
        .unwrap();
    let mut client = UsersClient::new(not_idempotent);
    let mut codes = Vec::new();
    for id in 1..=2 {
        let mut request = tonic::Request::new(GetUserRequest { id });
        request.set_timeout(Duration::from_millis(300));
        codes.push(match client.get_user(request).await {
            Ok(user) => {
                assert_eq!(user.into_inner().instance, "fast");
                tonic::Code::Ok
            }
            Err(status) => status.code(),
        });
    }
    codes.sort_by_key(|c| *c as i32);
    assert_eq!(codes, [tonic::Code::Ok, tonic::Code::DeadlineExceeded]);
    assert_eq!(slow.control.calls(), sent_to_slow + 1);
}

/// With `stalled_after`, a stream the caller drops after its instance sent nothing for that
/// long is a failure of the instance; dropped right after a message, or with a message that
/// came but was not read (the caller was the slow one), it is a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_given_up_on_after_its_instance_went_quiet_is_a_failure() {
    let memory = Memory::new();
    // A message at once, then one a second: quiet for a second after each.
    let s = instance(&memory, "quiet", "s", Some(Duration::from_secs(1)), None).await;
    let b = balancer(&memory, "quiet", RoundRobin::new(), 1).await;
    let channel = GrpcChannel::builder(b.clone())
        .stalled_after(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut client = UsersClient::new(channel);

    let (stream, _) = open_stream(&mut client).await;
    drop(stream);
    assert_eq!(counts(&b, "s"), (0, 1, 0), "dropped right after a message");

    let (stream, _) = open_stream(&mut client).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(stream);
    assert_eq!(
        counts(&b, "s"),
        (0, 1, 1),
        "dropped after 500 ms of nothing"
    );

    // The second message comes after a second and waits, unread, until the drop.
    let (stream, _) = open_stream(&mut client).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    drop(stream);
    assert_eq!(counts(&b, "s"), (0, 2, 1), "a message was there, unread");
    assert_eq!(s.control.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_sends_calls_away_from_an_instance_busy_with_a_stream() {
    let memory = Memory::new();
    let _a = instance(&memory, "busy", "a", Some(Duration::from_millis(50)), None).await;
    let _b = instance(&memory, "busy", "b", Some(Duration::from_millis(50)), None).await;
    let b = balancer(&memory, "busy", LeastConnections::new(), 2).await;
    let mut client = UsersClient::new(GrpcChannel::builder(b.clone()).build().unwrap());

    let (stream, first) = open_stream(&mut client).await;
    let streaming = first.instance;
    let other = if streaming == "a" { "b" } else { "a" };
    // One at a time, while the stream stays open: each call sees the stream's instance with
    // one call in flight and the other with none.
    for _ in 0..6 {
        let served = client
            .get_user(GetUserRequest { id: 1 })
            .await
            .unwrap()
            .into_inner()
            .instance;
        assert_eq!(
            served, other,
            "a call went to {streaming}, busy with a stream"
        );
    }
    assert_eq!(counts(&b, &streaming).0, 1);
    drop(stream);
    assert_eq!(counts(&b, &streaming).0, 0);
}

/// The channel's zone reaches the resilience layer with every call: calls stay in the
/// caller's zone, and a channel without a zone uses every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channels_zone_keeps_calls_in_that_zone() {
    let mut servers = Vec::new();
    let mut instances = Vec::new();
    for (id, zone) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = serve(listener, UsersServer::new(id, None, false).unwrap(), None)
            .await
            .unwrap();
        instances.push(
            waypost::ServiceInstance::builder("zoned", id)
                .host("127.0.0.1")
                .port(served.addr().port())
                .zone(zone)
                .build()
                .unwrap(),
        );
        servers.push(served);
    }
    let b = Balancer::new(Resilient::new(RoundRobin::new()));
    b.apply(waypost::WatchEvent::Snapshot(instances));

    let in_b = GrpcChannel::builder(b.clone()).zone("b").build().unwrap();
    let (by, errors) = send(&in_b, 40, 2).await;
    assert_eq!(errors, 0);
    assert_eq!(by.keys().collect::<Vec<_>>(), ["b1", "b2"], "{by:?}");

    let anywhere = GrpcChannel::builder(b).build().unwrap();
    let (by, _) = send(&anywhere, 40, 2).await;
    assert_eq!(by.len(), 4, "{by:?}");
}
