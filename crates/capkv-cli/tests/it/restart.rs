//! A leader killed under write load and started again within 300 ms, before its followers'
//! lease ran out, must not come back as leader with a stale view: every read still sees
//! every acknowledged write, no acknowledged write is lost, and all replicas end up with
//! the same data. (openraft's leader restore, which capkv's first engine had on by default,
//! let a restarted leader resume its leadership at once with a commit index below writes
//! it had acknowledged; this test caught it. raft-rs restarts every node as a follower.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capkv_proto::kv::{kv_client::KvClient, Consistency, ScanRequest};
use capkv_types::{partition_for_key, ReadConsistency};
use rand::{Rng, SeedableRng};

use crate::fixture::{seed, wait_until, Cluster, Opts};

const KEYS: usize = 4;

/// Per key: the highest value whose write was acknowledged (values only grow per key).
type Acked = Arc<Mutex<BTreeMap<String, u64>>>;

/// Every key/value of partition `p` on node `id`, read from its own replica.
async fn replica_data(cluster: &Cluster, id: u64, p: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut kv = KvClient::connect(format!("http://{}", cluster.node(id).addr))
        .await
        .unwrap();
    let page = kv
        .scan(ScanRequest {
            start: vec![],
            end: vec![],
            prefix: vec![],
            limit: 10_000,
            continuation: vec![],
            consistency: Consistency::Prefix as i32,
            partition_id: Some(p),
            session_token: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    page.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

pub async fn leader_restarts_keep_every_acknowledged_write(
    extra_args: &[&str],
) -> Result<(), String> {
    let seed = seed("leader_restart");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut args = vec!["--unsafe-fault-injection".to_string()];
    args.extend(extra_args.iter().map(|s| s.to_string()));
    let mut cluster = Cluster::start(Opts {
        extra_args: args,
        ..Opts::default()
    })
    .await;
    let p = partition_for_key(b"restart-0", cluster.partitions).0;
    let keys: Vec<String> = (0..)
        .map(|i| format!("restart-{i}"))
        .filter(|k| partition_for_key(k.as_bytes(), cluster.partitions).0 == p)
        .take(KEYS)
        .collect();
    let acked: Acked = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    // One writer per key (values grow per key), and readers that check each read against
    // what was acknowledged before it began.
    for key in keys.clone() {
        let (client, acked, stop) = (cluster.client().await, acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut v = 0u64;
            while !stop.load(Ordering::Relaxed) {
                v += 1;
                if client.put(key.clone(), v.to_string()).await.is_ok() {
                    let mut a = acked.lock().unwrap();
                    let e = a.entry(key.clone()).or_default();
                    *e = (*e).max(v);
                }
            }
        }));
    }
    for r in 0..2 {
        let (client, acked, stop, violations, keys) = (
            cluster.client().await,
            acked.clone(),
            stop.clone(),
            violations.clone(),
            keys.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                let key = &keys[i % keys.len()];
                i += 1;
                let floor = acked.lock().unwrap().get(key).copied().unwrap_or(0);
                if let Ok(read) = client.get_with(key.clone(), ReadConsistency::Linearizable).await {
                    let got: u64 = read
                        .map(|kv| String::from_utf8_lossy(&kv.value).parse().unwrap_or(0))
                        .unwrap_or(0);
                    if got < floor {
                        violations.lock().unwrap().push(format!(
                            "stale read of {key}: {got}, but {floor} was acknowledged before the read began"
                        ));
                    }
                }
            }
        }));
    }

    // Acknowledged progress: the sum of the highest acknowledged value per key.
    let progress = || acked.lock().unwrap().values().sum::<u64>();
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(800..1500))).await;
        let Some(leader) = cluster.leader_of(p).await else {
            continue;
        };
        // The leader loses power: its disk is slow (writes pile up unsynced while its
        // followers commit them), then it dies, and it comes back without what no fsync
        // covered, within its followers' lease.
        cluster
            .set_faults(
                leader,
                capkv_testkit::Faults {
                    fsync_stall_ms: 1500,
                    ..Default::default()
                },
            )
            .await;
        // Writes acknowledged from now on sit unsynced on the leader (its fsync stalls
        // while its followers commit them).
        let before = progress();
        wait_until(
            Duration::from_secs(20),
            "writes acknowledged during the stall",
            || async { progress() >= before + 3 },
        )
        .await;
        let delay = Duration::from_millis(rng.random_range(0..=300));
        cluster.kill(leader);
        tokio::time::sleep(delay).await;
        cluster.spawn_with(leader, &["--unsafe-lose-unsynced-writes"]);
        eprintln!(
            "round {round}: leader {leader} of partition {p} lost power, restarted after {} ms",
            delay.as_millis()
        );
    }
    // The partition takes writes again after the last restart.
    let before = progress();
    wait_until(
        Duration::from_secs(30),
        "writes acknowledged after the last restart",
        || async { progress() >= before + 20 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    cluster.wait_ready(Duration::from_secs(60)).await;

    // Every replica converges on the same data, which holds every acknowledged write.
    let final_acked = acked.lock().unwrap().clone();
    let started = Instant::now();
    let mut last = Vec::new();
    let converged = loop {
        let mut data = Vec::new();
        for id in 1..=3 {
            data.push(replica_data(&cluster, id, p).await);
        }
        if data.iter().all(|d| *d == data[0]) {
            break Some(data.remove(0));
        }
        last = data;
        if started.elapsed() > Duration::from_secs(30) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut problems = violations.lock().unwrap().clone();
    match converged {
        None => problems.push(format!(
            "replicas of partition {p} differ after 30 s: {last:?}"
        )),
        Some(data) => {
            let values: BTreeMap<String, u64> = data
                .iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).parse().unwrap_or(0),
                    )
                })
                .collect();
            for (k, v) in &final_acked {
                let have = values.get(k).copied().unwrap_or(0);
                if have < *v {
                    problems.push(format!(
                        "lost write: {k} holds {have}, {v} was acknowledged"
                    ));
                }
            }
        }
    }
    // The cluster serves linearizable reads of what it holds.
    let client = cluster.client().await;
    wait_until(
        Duration::from_secs(30),
        "reads are served again",
        || async { client.get(keys[0].clone()).await.is_ok() },
    )
    .await;
    if problems.is_empty() {
        eprintln!("acknowledged: {final_acked:?}");
        Ok(())
    } else {
        Err(format!("seed {seed}: {}", problems.join("\n")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_within_its_lease_does_not_resume_with_a_stale_view() {
    if let Err(e) = leader_restarts_keep_every_acknowledged_write(&[]).await {
        panic!("{e}");
    }
}
