//! A registration keeps its key, against a real etcd: a key deleted by someone else while the
//! lease lives is put back at once (long before the next keep-alive), on the same lease; after
//! shutdown it stays gone.

use std::time::Duration;

use waypost_conformance::etcd_server::EtcdServer;
use waypost_conformance::scenarios::eventually;
use waypost_core::{HealthCheck, Registration, Registry};
use waypost_etcd::{etcd_client, Etcd};

/// Far below the keep-alive interval (TTL 30 s / 3): a restore within it is the watch's doing.
const PROMPT: Duration = Duration::from_secs(5);

/// The key's value and lease, or `None` when it is absent.
async fn read(raw: &mut etcd_client::Client, key: &str) -> Option<(String, i64)> {
    let resp = raw.get(key, None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| (kv.value_str().unwrap().to_owned(), kv.lease()))
}

#[tokio::test]
async fn a_key_deleted_by_someone_else_is_put_back_on_its_lease() {
    let server = EtcdServer::start().await;
    let etcd = Etcd::builder()
        .endpoints(server.endpoints())
        .connect()
        .await
        .unwrap();
    let mut raw = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap();
    let reg = Registration::builder("guarded", "g-1")
        .host("127.0.0.1")
        .port(9200)
        .check(HealthCheck::ttl(Duration::from_secs(30)))
        .build()
        .unwrap();
    let handle = etcd.register(reg).await.unwrap();
    let key = etcd.key(handle.instance().service(), handle.instance().id());
    let (value, lease) = read(&mut raw, &key).await.expect("registered");
    assert_ne!(lease, 0);

    raw.delete(key.as_str(), None).await.unwrap();
    eventually(PROMPT, "the deleted key back", || {
        let (mut raw, key) = (raw.clone(), key.clone());
        let want = (value.clone(), lease);
        async move {
            match read(&mut raw, &key).await {
                Some(got) if got == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    // An overwrite is how a second registration of the id takes over: left alone. When that
    // one's key goes, this registration's comes back.
    raw.put(key.as_str(), "{\"not\":\"ours\"}", None)
        .await
        .unwrap();
    assert_eq!(
        read(&mut raw, &key).await.map(|(v, _)| v).as_deref(),
        Some("{\"not\":\"ours\"}")
    );
    raw.delete(key.as_str(), None).await.unwrap();
    eventually(PROMPT, "the key back after the overwriter's went", || {
        let (mut raw, key) = (raw.clone(), key.clone());
        let want = (value.clone(), lease);
        async move {
            match read(&mut raw, &key).await {
                Some(got) if got == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(handle.liveness().is_live(), "{:?}", handle.liveness());

    // Shutdown revokes the lease: the key goes, and nobody puts it back.
    handle.shutdown().await.unwrap();
    assert_eq!(read(&mut raw, &key).await, None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read(&mut raw, &key).await, None);
}
