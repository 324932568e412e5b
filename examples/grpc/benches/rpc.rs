//! One unary call through Waypost's gRPC channel against one through tonic's own balanced
//! channel (`Channel::balance_list`), over the same three local servers, in the same run.
//!
//! ```text
//! cargo bench -p waypost-grpc-examples --bench rpc
//! ```
//!
//! Benchmark ids:
//! - `rpc/tonic-balance-list`: `UsersClient::get_user` over `Channel::balance_list` of the three
//!   addresses (tonic's P2C; its connections report no load).
//! - `rpc/waypost/<strategy>`: the same call over `GrpcChannel` on a `Balancer` holding the same
//!   three instances: pick, per-instance tonic channel, outcome and latency recorded, a copy of
//!   the request kept for a retry; `round-robin-1-attempt` without retries (no copy).
//! - `rpc/waypost-hyper/round-robin`: an experiment, `waypost::tower::Balanced` over a plain hyper
//!   HTTP/2 client per instance (no tonic `Buffer` worker), with the gRPC classifier.
//! - `rpc/tonic-one-endpoint` and `rpc/waypost/one-instance`: the same call to one server, through
//!   one lazily connecting tonic channel, and through `GrpcChannel` on a one-instance balancer.
//! - `rpc/waypost/round-robin/hedged`: `GetUser` marked idempotent and hedged after 5 s, so
//!   that every call arms a hedge's timer that never fires.
//! - `rpc/tonic-balance-list/deadline` and `rpc/waypost/round-robin/deadline`: the first two
//!   with a deadline on every call (`Request::set_timeout(5 s)`): tonic's channel times each
//!   call, Waypost's also bounds its retries by it.
//!
//! Calls are sequential, one in flight; the servers run on the same runtime: a multi-threaded
//! one with two workers (`rpc/...`), and a current-thread one (`rpc_1thread/...`). Settings as in the strategies' benches (warm-up 300 ms,
//! measurement 2 s, 20 samples).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use waypost::grpc::GrpcChannel;
use waypost::retry::Hedge;
use waypost::{Balancer, ServiceInstance, Strategy, WatchEvent};
use waypost_grpc_examples::users::users_client::UsersClient;
use waypost_grpc_examples::users::GetUserRequest;
use waypost_grpc_examples::{serve, Serving, UsersServer};

/// The `.../deadline` benches' timeout per call: never reached.
const DEADLINE: Option<Duration> = Some(Duration::from_secs(5));

fn servers(rt: &tokio::runtime::Runtime) -> Vec<Serving> {
    rt.block_on(async {
        let mut all = Vec::new();
        for i in 0..3 {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
            let server = UsersServer::new(format!("bench-{i}"), None, false).expect("a valid id");
            all.push(serve(listener, server, None).await.expect("serving"));
        }
        all
    })
}

fn balancer(strategy: impl Strategy, servers: &[Serving]) -> Balancer {
    let b = Balancer::builder(strategy)
        .service("bench".parse().expect("a valid name"))
        .build();
    let instances = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            ServiceInstance::builder("bench", format!("bench-{i}"))
                .host("127.0.0.1")
                .port(s.addr().port())
                .build()
                .expect("a valid instance")
        })
        .collect();
    b.apply(WatchEvent::Snapshot(instances));
    b
}

/// `iters` sequential calls; the elapsed time.
async fn calls<T>(client: &mut UsersClient<T>, iters: u64) -> Duration
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    calls_within(client, iters, None).await
}

/// [`calls`], each with `deadline` as its timeout.
async fn calls_within<T>(
    client: &mut UsersClient<T>,
    iters: u64,
    deadline: Option<Duration>,
) -> Duration
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let start = Instant::now();
    for i in 0..iters {
        let mut request = tonic::Request::new(GetUserRequest {
            id: 1 + (i % 100) as u32,
        });
        if let Some(d) = deadline {
            request.set_timeout(d);
        }
        let r = client.get_user(request).await;
        assert!(r.is_ok(), "a benchmark call failed: {r:?}");
    }
    start.elapsed()
}

/// The calls on a two-worker runtime (`rpc/...`).
fn rpc(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    on(c, "rpc", &rt);
}

/// The calls on a current-thread runtime (`rpc_1thread/...`): no wake-up crosses threads.
fn rpc_1thread(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    on(c, "rpc_1thread", &rt);
}

fn on(c: &mut Criterion, group: &str, rt: &tokio::runtime::Runtime) {
    let servers = servers(rt);

    let endpoints: Vec<Endpoint> = servers
        .iter()
        .map(|s| Endpoint::from_shared(format!("http://{}", s.addr())).expect("a valid URI"))
        .collect();
    let mut tonic_client =
        rt.block_on(async { UsersClient::new(Channel::balance_list(endpoints.into_iter())) });
    // Connect everything before measuring.
    rt.block_on(calls(&mut tonic_client, 50));
    c.bench_function(&format!("{group}/tonic-balance-list"), |b| {
        b.iter_custom(|iters| rt.block_on(calls(&mut tonic_client, iters)))
    });
    c.bench_function(&format!("{group}/tonic-balance-list/deadline"), |b| {
        b.iter_custom(|iters| rt.block_on(calls_within(&mut tonic_client, iters, DEADLINE)))
    });

    for (name, strategy, attempts) in [
        (
            "round-robin",
            Box::new(waypost::strategies::RoundRobin::new()) as Box<dyn Strategy>,
            3,
        ),
        ("p2c-ewma", Box::new(waypost::strategies::P2cEwma::new()), 3),
        // No retries: no copy of the request is kept for another attempt.
        (
            "round-robin-1-attempt",
            Box::new(waypost::strategies::RoundRobin::new()),
            1,
        ),
    ] {
        let channel = GrpcChannel::builder(balancer(strategy, &servers))
            .max_attempts(attempts)
            .build()
            .expect("a channel");
        let mut client = UsersClient::new(channel);
        rt.block_on(calls(&mut client, 50));
        c.bench_function(&format!("{group}/waypost/{name}"), |b| {
            b.iter_custom(|iters| rt.block_on(calls(&mut client, iters)))
        });
        if name == "round-robin" {
            c.bench_function(&format!("{group}/waypost/{name}/deadline"), |b| {
                b.iter_custom(|iters| rt.block_on(calls_within(&mut client, iters, DEADLINE)))
            });
        }
    }
    // A hedge armed on every call that never fires: what a hedge costs a call answered in time.
    let hedged = GrpcChannel::builder(balancer(waypost::strategies::RoundRobin::new(), &servers))
        .idempotent("/users.Users/GetUser")
        .hedge(Hedge::after(Duration::from_secs(5)))
        .build()
        .expect("a channel");
    let mut client = UsersClient::new(hedged);
    rt.block_on(calls(&mut client, 50));
    c.bench_function(&format!("{group}/waypost/round-robin/hedged"), |b| {
        b.iter_custom(|iters| rt.block_on(calls(&mut client, iters)))
    });
    // The experiment: `Balanced` over a hyper HTTP/2 client per instance, no `Buffer` worker.
    {
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        let b = balancer(waypost::strategies::RoundRobin::new(), &servers);
        let make = |i: &ServiceInstance| {
            let authority = i.authority();
            let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
            connector.set_nodelay(true);
            let client: Client<_, tonic::body::Body> = Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector);
            tower::util::MapRequest::new(client, move |mut r: http::Request<tonic::body::Body>| {
                let path = r
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                *r.uri_mut() = format!("http://{authority}{path}").parse().expect("a URI");
                r
            })
        };
        let svc = waypost::tower::Balanced::builder(b, make)
            .classify(waypost::tower::GrpcStatus)
            .build();
        let mut client = UsersClient::new(svc);
        rt.block_on(calls(&mut client, 50));
        c.bench_function(&format!("{group}/waypost-hyper/round-robin"), |bench| {
            bench.iter_custom(|iters| rt.block_on(calls(&mut client, iters)))
        });
    }

    // One instance each way: one `Buffer` worker on both sides.
    let one = Endpoint::from_shared(format!("http://{}", servers[0].addr())).expect("a valid URI");
    let mut tonic_one = rt.block_on(async { UsersClient::new(one.connect_lazy()) });
    rt.block_on(calls(&mut tonic_one, 50));
    c.bench_function(&format!("{group}/tonic-one-endpoint"), |b| {
        b.iter_custom(|iters| rt.block_on(calls(&mut tonic_one, iters)))
    });
    let channel = GrpcChannel::builder(balancer(
        waypost::strategies::RoundRobin::new(),
        &servers[..1],
    ))
    .build()
    .expect("a channel");
    let mut waypost_one = UsersClient::new(channel);
    rt.block_on(calls(&mut waypost_one, 50));
    c.bench_function(&format!("{group}/waypost/one-instance"), |b| {
        b.iter_custom(|iters| rt.block_on(calls(&mut waypost_one, iters)))
    });
    drop(servers);
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = rpc, rpc_1thread
}
criterion_main!(benches);
