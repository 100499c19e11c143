//! Test 5: cut one node off from the other two with the transport's fault-injection hook
//! (`--unsafe-fault-injection`; both directions dropped at the isolated node). On that node
//! linearizable reads and writes fail with Unavailable/NotLeader within a bounded time,
//! the majority keeps serving, and after healing the node converges.

use std::time::{Duration, Instant};

use capkv_proto::kv::{kv_client::KvClient, Consistency, GetRequest, PutRequest};
use capkv_proto::status::from_status;
use capkv_types::{partition_for_key, ErrorCode};

use crate::fixture::{wait_until, Cluster, Opts};

/// One key in each partition.
fn key_per_partition(partitions: u32) -> Vec<String> {
    let mut keys: Vec<Option<String>> = vec![None; partitions as usize];
    let mut i = 0;
    while keys.iter().any(Option::is_none) {
        let k = format!("iso-{i}");
        let p = partition_for_key(k.as_bytes(), partitions).0 as usize;
        keys[p].get_or_insert(k);
        i += 1;
    }
    keys.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_node_refuses_linearizable_ops_and_converges_after_healing() {
    let cluster = Cluster::start(Opts {
        extra_args: [
            "--unsafe-fault-injection",
            "--write-timeout-ms",
            "1500",
            "--read-timeout-ms",
            "1500",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await;
    let keys = key_per_partition(cluster.partitions);
    let client = cluster.client().await;
    for k in &keys {
        client.put(k.clone(), "v0").await.unwrap();
    }
    // Isolate the node that leads the most partitions, so the cut hits live leaders.
    let mut led = [0usize; 4];
    for p in 0..cluster.partitions {
        led[cluster.leader_of(p).await.unwrap() as usize] += 1;
    }
    let cut = (1..=3u64).max_by_key(|id| led[*id as usize]).unwrap();
    let others: Vec<u64> = (1..=3u64).filter(|id| *id != cut).collect();
    assert!(led[cut as usize] > 0);

    cluster.set_blocked(cut, &others).await;
    let cut_at = Instant::now();
    let mut raw = KvClient::connect(format!("http://{}", cluster.node(cut).addr))
        .await
        .unwrap();
    let any_write_succeeded = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    wait_until(
        Duration::from_secs(30),
        "the isolated node refuses every linearizable read and write",
        || {
            let raw = raw.clone();
            let keys = keys.clone();
            let any = any_write_succeeded.clone();
            async move {
                let probes = keys.iter().map(|k| {
                    let mut raw = raw.clone();
                    let key = k.as_bytes().to_vec();
                    async move {
                        let get = raw
                            .get(GetRequest {
                                key: key.clone(),
                                consistency: Consistency::Linearizable as i32,
                                session_token: vec![],
                                ..Default::default()
                            })
                            .await;
                        let put = raw
                            .put(PutRequest {
                                key,
                                value: b"minority".to_vec(),
                                ..Default::default()
                            })
                            .await;
                        (get.map(|_| ()), put.map(|_| ()))
                    }
                });
                let mut all_refused = true;
                for (get, put) in futures::future::join_all(probes).await {
                    if put.is_ok() {
                        any.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    for r in [get, put] {
                        match r {
                            Ok(()) => all_refused = false,
                            Err(s) => {
                                let code = from_status(&s).code();
                                all_refused &=
                                    matches!(code, ErrorCode::Unavailable | ErrorCode::NotLeader);
                            }
                        }
                    }
                }
                all_refused
            }
        },
    )
    .await;
    assert!(
        !any_write_succeeded.load(std::sync::atomic::Ordering::SeqCst),
        "a write on the isolated node was acknowledged"
    );
    eprintln!(
        "isolation: node {cut} (leader of {} partitions) refused all linearizable ops {} ms after the cut",
        led[cut as usize],
        cut_at.elapsed().as_millis()
    );

    // Weaker reads are still served on the minority side.
    let r = raw
        .get(GetRequest {
            key: keys[0].as_bytes().to_vec(),
            consistency: Consistency::Prefix as i32,
            session_token: vec![],
            ..Default::default()
        })
        .await;
    assert!(
        r.is_ok(),
        "prefix reads stay available on an isolated node: {r:?}"
    );

    // The majority serves every partition.
    let majority = cluster.client_for(&others).await;
    for k in &keys {
        majority.put(k.clone(), "v1").await.unwrap();
        assert_eq!(majority.get(k.clone()).await.unwrap().unwrap().value, b"v1");
    }

    cluster.set_blocked(cut, &[]).await;
    wait_until(
        Duration::from_secs(60),
        "the isolated node converges after healing",
        || {
            let mut raw = raw.clone();
            let keys = keys.clone();
            async move {
                for k in &keys {
                    let r = raw
                        .get(GetRequest {
                            key: k.as_bytes().to_vec(),
                            consistency: Consistency::Prefix as i32,
                            session_token: vec![],
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(resp)
                            if resp
                                .get_ref()
                                .kv
                                .as_ref()
                                .is_some_and(|kv| kv.value == b"v1") => {}
                        _ => return false,
                    }
                }
                true
            }
        },
    )
    .await;
    // Nothing written on the minority side survived.
    for k in &keys {
        assert_eq!(majority.get(k.clone()).await.unwrap().unwrap().value, b"v1");
    }
    let client1 = cluster.client_for(&[cut]).await;
    client1.put("after-heal", "ok").await.unwrap();
    raw.put(PutRequest {
        key: b"x".to_vec(),
        value: b"y".to_vec(),
        ..Default::default()
    })
    .await
    .ok();
}
