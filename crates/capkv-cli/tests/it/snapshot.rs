//! Test 4: a follower that was down while the log was snapshotted and purged catches up
//! by installing a snapshot, and then holds exactly the leader's data. The leaders compact
//! past the down follower once their logs are long (twice `--snapshot-every` past their
//! start), and stream it the state machine in chunks.

use std::time::Duration;

use capkv_client::ScanOptions;
use capkv_proto::kv::{kv_client::KvClient, Consistency, ScanRequest};

use crate::fixture::{wait_until, Cluster, Opts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    // The engine batches a turn's writes into one entry (~100 entries per partition
    // here): compact often so that the logs pass twice the threshold.
    let opts = Opts {
        extra_args: vec!["--snapshot-every".into(), "20".into()],
        ..Default::default()
    };
    let mut cluster = Cluster::start(opts).await;
    let client = cluster.client().await;
    for i in 0..40 {
        client.put(format!("snap-{i:04}"), "before").await.unwrap();
    }
    cluster.kill(3);
    let client = cluster.client_for(&[1, 2]).await;

    // ~150 entries per partition: several snapshots, logs purged far past node 3.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..150 {
                let n = w * 150 + i;
                client
                    .put(format!("snap-{n:04}"), format!("v{n}"))
                    .await
                    .unwrap();
            }
            for i in (0..150).step_by(10) {
                client
                    .delete(format!("snap-{:04}", w * 150 + i))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Node 3 stopped after ~40 writes (a handful of entries per partition); once the
    // leaders' logs are purged past that, it can only catch up from a snapshot. Both nodes
    // must purge every partition while node 3 is down: a leader compacts past a voter that
    // is down once its log is twice the threshold past its start.
    wait_until(
        Duration::from_secs(120),
        "nodes 1 and 2 purged every partition's log past node 3's position",
        || async {
            let mut purged: Vec<Vec<u64>> = Vec::new();
            for id in [1, 2] {
                match cluster.status(id).await {
                    Some(s) => purged.push(s.partitions.iter().map(|p| p.purged_index).collect()),
                    None => return false,
                }
            }
            let done = purged.iter().all(|n| n.iter().all(|i| *i >= 30));
            if !done {
                eprintln!("snapshot: waiting for purges past 30 on nodes 1 and 2: {purged:?}");
            }
            done
        },
    )
    .await;

    cluster.spawn(3);
    let leader_view = cluster.client_for(&[1, 2]).await;
    let expected = leader_view
        .scan_all(&ScanOptions::default(), 100_000)
        .await
        .unwrap();
    assert_eq!(expected.len(), 1200 - 120);
    let commits = {
        let mut m = std::collections::BTreeMap::new();
        for id in [1, 2] {
            for p in cluster.status(id).await.unwrap().partitions {
                let e = m.entry(p.id).or_insert(0);
                *e = (*e).max(p.commit_index);
            }
        }
        m
    };
    wait_until(
        Duration::from_secs(120),
        "node 3 applies every partition up to the leaders' commit",
        || async {
            cluster.status(3).await.is_some_and(|s| {
                s.partitions
                    .iter()
                    .all(|p| p.applied_index >= commits[&p.id])
            })
        },
    )
    .await;
    let installs = std::fs::read_to_string(&cluster.node(3).log)
        .unwrap()
        .matches("installed snapshot")
        .count();
    assert!(
        installs > 0,
        "node 3 caught up without installing a snapshot; the test did not test anything"
    );
    eprintln!("snapshot: node 3 installed {installs} partition snapshots");
    // The engine streams the images beside Raft, and `capkv status` counts them.
    let received = cluster.status(3).await.unwrap().snapshot_bytes_received;
    let mut sent = 0;
    for id in [1, 2] {
        sent += cluster.status(id).await.unwrap().snapshot_bytes_sent;
    }
    eprintln!("snapshot: {sent} bytes sent, {received} received");
    assert!(
        received > 0 && sent >= received,
        "status counts the streamed images: {sent} bytes sent, {received} received"
    );

    // Node 3's own replicas (prefix reads are served locally) equal the leaders' data.
    let mut raw = KvClient::connect(format!("http://{}", cluster.node(3).addr))
        .await
        .unwrap();
    let mut local = Vec::new();
    let mut continuation = vec![];
    loop {
        let page = raw
            .scan(ScanRequest {
                limit: 500,
                continuation: continuation.clone(),
                consistency: Consistency::Prefix as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        local.extend(
            page.kvs
                .into_iter()
                .map(|kv| (kv.key, kv.value, kv.mod_revision)),
        );
        if page.continuation.is_empty() {
            break;
        }
        continuation = page.continuation;
    }
    let expected: Vec<_> = expected
        .into_iter()
        .map(|kv| (kv.key, kv.value, kv.mod_revision))
        .collect();
    assert_eq!(local.len(), expected.len());
    assert!(local == expected, "node 3's data differs from the leaders'");
}
