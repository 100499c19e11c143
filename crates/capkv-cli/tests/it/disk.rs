//! A node whose fsync fails stops acknowledging anything, says why (status, /health,
//! metrics), while the others keep serving; restarted, it recovers from what is on disk
//! and catches up, and no acknowledged write is lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capkv_proto::kv::{kv_client::KvClient, PutRequest};
use capkv_proto::status::from_status;
use capkv_testkit::Faults;
use capkv_types::ErrorCode;

use crate::fixture::{wait_until, Cluster, Opts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_poisons_the_node_until_it_restarts_and_loses_nothing() {
    let mut cluster = Cluster::start(Opts {
        extra_args: vec!["--unsafe-fault-injection".into()],
        ..Opts::default()
    })
    .await;
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, acked, stop) = (cluster.client().await, acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let key = format!("disk-{w}");
            let mut v = 0u64;
            while !stop.load(Ordering::Relaxed) {
                v += 1;
                if client.put(key.clone(), v.to_string()).await.is_ok() {
                    acked.lock().unwrap().insert(key.clone(), v);
                }
            }
        }));
    }
    wait_until(
        Duration::from_secs(20),
        "the writers get acknowledgements",
        || async { !acked.lock().unwrap().is_empty() },
    )
    .await;
    let sick = 2;
    cluster
        .set_faults(
            sick,
            Faults {
                fsync_fail_next: true,
                ..Faults::default()
            },
        )
        .await;
    wait_until(
        Duration::from_secs(20),
        "node 2 reports its storage poisoned",
        || async { matches!(cluster.status(sick).await, Some(s) if !s.storage_error.is_empty()) },
    )
    .await;
    let why = cluster.status(sick).await.unwrap().storage_error;
    assert!(why.contains("fsync"), "{why}");
    let (code, health) = cluster.http_get(sick, "/health").await;
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("storage-poisoned"), "{health}");
    let (_, metrics) = cluster.http_get(sick, "/metrics").await;
    assert_eq!(
        crate::fixture::metric(&metrics, "capkv_storage_poisoned", ""),
        1,
        "{metrics}"
    );
    assert!(
        cluster
            .log_tail(sick, 400)
            .contains("fsync failed: storage is poisoned"),
        "the node logs why it stopped"
    );
    // It refuses writes outright (certainly not applied) ...
    let mut raw = KvClient::connect(format!("http://{}", cluster.node(sick).addr))
        .await
        .unwrap();
    let refused = raw
        .put(PutRequest {
            key: b"to-the-sick-node".to_vec(),
            value: b"x".to_vec(),
            if_revision: None,
            if_absent: false,
            idempotency: None,
            session_token: vec![],
        })
        .await
        .unwrap_err();
    let err = from_status(&refused);
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    assert!(err.to_string().contains("poisoned"), "{err}");
    // ... and the others keep serving: writes keep being acknowledged.
    let before = acked.lock().unwrap().values().sum::<u64>();
    wait_until(
        Duration::from_secs(30),
        "writes go on without node 2",
        || async { acked.lock().unwrap().values().sum::<u64>() > before + 20 },
    )
    .await;

    // Restarted, it recovers from its disk and catches up.
    cluster.kill(sick);
    cluster.spawn(sick);
    wait_until(
        Duration::from_secs(60),
        "node 2 is back with healthy storage",
        || async { matches!(cluster.status(sick).await, Some(s) if s.storage_error.is_empty()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
    }
    let acked = acked.lock().unwrap().clone();
    let client = cluster.client().await;
    for (key, v) in &acked {
        let got: u64 = client
            .get(key.clone())
            .await
            .unwrap()
            .map(|kv| String::from_utf8_lossy(&kv.value).parse().unwrap())
            .unwrap_or(0);
        assert!(got >= *v, "{key}: {got} after {v} was acknowledged");
    }
    // Node 2's own replicas catch up with the leaders.
    wait_until(
        Duration::from_secs(60),
        "node 2 applies what the leaders committed",
        || async {
            let Some(mine) = cluster.status(sick).await else {
                return false;
            };
            let mut caught_up = true;
            for p in &mine.partitions {
                let Some(leader) = cluster.leader_of(p.id).await else {
                    return false;
                };
                let Some(ls) = cluster.status(leader).await else {
                    return false;
                };
                let commit = ls
                    .partitions
                    .iter()
                    .find(|x| x.id == p.id)
                    .map_or(0, |x| x.commit_index);
                caught_up &= p.applied_index >= commit;
            }
            caught_up
        },
    )
    .await;
}
