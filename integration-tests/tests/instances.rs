//! One service with 10,000 instances against real servers (issue 13, part 4): every instance
//! arrives in the watch's first snapshot, and a change after them is told as that one change.
//! How long it takes is measured by `examples/instances.rs` (see BENCHMARKS.md), not here.
//!
//! Also: one etcd watch response that carries several changes tells each of them, and only
//! them (the watch applies a response's events one key at a time, not as a new whole set).
//!
//! Needs the server binaries: `eval "$(scripts/fetch-servers)"`.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::etcd_server::EtcdServer;
use waypost_core::{
    Discovery, HealthCheck, Registration, Registry, ServiceInstance, ServiceName, Watch, WatchEvent,
};
use waypost_etcd::etcd_client::{Client, Txn, TxnOp};
use waypost_etcd::{encode_record, Etcd};

const N: usize = 10_000;
/// A bound on each wait, far above what it takes (a watch that stalls fails the test).
const BOUND: Duration = Duration::from_secs(60);

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

fn bulk_id(i: usize) -> String {
    format!("i-{i:05}")
}

fn bulk_host(i: usize) -> String {
    format!("10.{}.{}.{}", 1 + i / 65_536, (i / 256) % 256, i % 256)
}

fn instance(service: &str, id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::builder(service, id)
        .host("127.0.0.1")
        .port(port)
        .build()
        .unwrap()
}

async fn next(watch: &mut Watch) -> WatchEvent {
    tokio::time::timeout(BOUND, watch.next())
        .await
        .expect("the watch said nothing within the bound")
        .expect("the watch ended")
        .expect("the watch failed")
}

/// The first snapshot holds exactly the bulk instances, in id order, then `Synced` follows.
async fn first_snapshot_is_the_bulk(watch: &mut Watch, service: &str) {
    let WatchEvent::Snapshot(all) = next(watch).await else {
        panic!("the watch did not start with a snapshot");
    };
    assert_eq!(all.len(), N);
    for (i, inst) in all.iter().enumerate() {
        assert_eq!(inst.id().as_str(), bulk_id(i));
        assert_eq!(inst.service().as_str(), service);
        assert_eq!(inst.host(), bulk_host(i));
        assert_eq!(inst.port(), 20_000 + (i % 10_000) as u16);
    }
    assert_eq!(next(watch).await, WatchEvent::Synced);
}

/// Writes `N` instances of `service` into the catalog, on nodes of 100, through `PUT /v1/txn`
/// (at most 64 operations each): fast, and not through the code under test.
async fn consul_bulk(base: &str, service: &str) {
    let http = reqwest::Client::new();
    for node in 0..N / 100 {
        let node_name = format!("bulk-{node}");
        let mut ops = vec![serde_json::json!({"Node": {"Verb": "set", "Node": {
            "Node": node_name, "Address": bulk_host(node * 100)}}})];
        for i in node * 100..(node + 1) * 100 {
            ops.push(
                serde_json::json!({"Service": {"Verb": "set", "Node": node_name,
                "Service": {"ID": bulk_id(i), "Service": service, "Address": bulk_host(i),
                            "Port": 20_000 + (i % 10_000)}}}),
            );
        }
        for batch in ops.chunks(64) {
            let resp = http
                .put(format!("{base}/v1/txn"))
                .json(&batch)
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{:?}", resp.text().await);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_ten_thousand_instances_arrive_and_a_change_after_them_is_told() {
    let server = ConsulServer::start().await;
    consul_bulk(&server.http_url(), "big").await;
    let consul = waypost_consul::Consul::builder()
        .address(server.http_url())
        .build()
        .unwrap();
    let mut watch = consul.watch(&name("big"));
    first_snapshot_is_the_bulk(&mut watch, "big").await;

    let probe = Registration::builder("big", "probe")
        .host("127.0.0.1")
        .port(30_000)
        .check(HealthCheck::ttl(Duration::from_secs(10)))
        .build()
        .unwrap();
    a_probe_after_the_bulk_is_told(&consul, &mut watch, probe).await;
}

/// Registers `probe` (of "big", port 30,000) and shuts it down: `watch` tells exactly one
/// `Added` and one `Removed`, and a read in between has the bulk and the probe.
async fn a_probe_after_the_bulk_is_told<B: Registry + Discovery>(
    backend: &B,
    watch: &mut Watch,
    probe: Registration,
) {
    let handle = backend.register(probe).await.unwrap();
    assert_eq!(
        next(watch).await,
        WatchEvent::Added(instance("big", "probe", 30_000))
    );
    assert_eq!(backend.instances(&name("big")).await.unwrap().len(), N + 1);
    handle.shutdown().await.unwrap();
    assert_eq!(
        next(watch).await,
        WatchEvent::Removed(instance("big", "probe", 30_000))
    );
}

async fn etcd_bulk(etcd: &Etcd, raw: &mut Client, service: &str) {
    let service_name = name(service);
    let ids: Vec<usize> = (0..N).collect();
    // etcd's default limit of operations in one transaction.
    for batch in ids.chunks(128) {
        let ops: Vec<TxnOp> = batch
            .iter()
            .map(|&i| {
                let inst = ServiceInstance::builder(service, bulk_id(i))
                    .host(bulk_host(i))
                    .port(20_000 + (i % 10_000) as u16)
                    .build()
                    .unwrap();
                TxnOp::put(
                    etcd.key(&service_name, inst.id()),
                    encode_record(&inst),
                    None,
                )
            })
            .collect();
        raw.txn(Txn::new().and_then(ops)).await.unwrap();
    }
}

/// Waypost's client for `server`, and a plain one that writes as another tool would.
async fn clients(server: &EtcdServer) -> (Etcd, Client) {
    let etcd = Etcd::builder()
        .endpoints(server.endpoints())
        .connect()
        .await
        .unwrap();
    let raw = Client::connect([server.endpoint()], None).await.unwrap();
    (etcd, raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_ten_thousand_instances_arrive_and_a_change_after_them_is_told() {
    let server = EtcdServer::start().await;
    let (etcd, mut raw) = clients(&server).await;
    etcd_bulk(&etcd, &mut raw, "big").await;
    let mut watch = etcd.watch(&name("big"));
    first_snapshot_is_the_bulk(&mut watch, "big").await;

    let probe = Registration::builder("big", "probe")
        .host("127.0.0.1")
        .port(30_000)
        .build()
        .unwrap();
    a_probe_after_the_bulk_is_told(&etcd, &mut watch, probe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_one_response_with_several_changes_tells_each_and_only_them() {
    let server = EtcdServer::start().await;
    let (etcd, mut raw) = clients(&server).await;
    let svc = name("multi");
    let key = |id: &str| etcd.key(&svc, &id.parse().unwrap());
    let (kept, updated, deleted, spoiled) = (
        instance("multi", "kept", 1),
        instance("multi", "updated", 2),
        instance("multi", "deleted", 3),
        instance("multi", "spoiled", 4),
    );
    for inst in [&kept, &updated, &deleted, &spoiled] {
        raw.put(key(inst.id().as_str()), encode_record(inst), None)
            .await
            .unwrap();
    }
    let mut watch = etcd.watch(&svc);
    let WatchEvent::Snapshot(all) = next(&mut watch).await else {
        panic!("the watch did not start with a snapshot");
    };
    assert_eq!(all.len(), 4);
    assert_eq!(next(&mut watch).await, WatchEvent::Synced);

    // One revision, so one watch response: an add, an update, a delete, a value that is no
    // longer an instance, a key that names no valid id, and a write that changes nothing.
    let added = instance("multi", "added", 5);
    let updated2 = instance("multi", "updated", 20);
    let ops = vec![
        TxnOp::put(key("added"), encode_record(&added), None),
        TxnOp::put(key("updated"), encode_record(&updated2), None),
        TxnOp::delete(key("deleted"), None),
        TxnOp::put(key("spoiled"), "{not a record", None),
        TxnOp::put(
            format!("{}/multi/no id here", etcd.prefix()),
            encode_record(&kept),
            None,
        ),
        TxnOp::put(key("kept"), encode_record(&kept), None),
    ];
    raw.txn(Txn::new().and_then(ops)).await.unwrap();
    let mut told = Vec::new();
    for _ in 0..4 {
        told.push(format!("{:?}", next(&mut watch).await));
    }
    let told: BTreeSet<String> = told.into_iter().collect();
    let want: BTreeSet<String> = [
        WatchEvent::Added(added.clone()),
        WatchEvent::Updated(updated2.clone()),
        WatchEvent::Removed(deleted),
        WatchEvent::Removed(spoiled),
    ]
    .iter()
    .map(|e| format!("{e:?}"))
    .collect();
    assert_eq!(told, want);

    // Nothing else was told: the next event is the next change.
    raw.delete(key("kept"), None).await.unwrap();
    assert_eq!(next(&mut watch).await, WatchEvent::Removed(kept));
    let mut now = etcd.instances(&svc).await.unwrap();
    now.sort_by(|a, b| a.id().cmp(b.id()));
    assert_eq!(now, vec![added, updated2]);
}
