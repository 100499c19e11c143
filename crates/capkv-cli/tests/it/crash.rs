//! Test 3: SIGKILL every node while clients write; after restart every acknowledged
//! write is readable. Two rounds with seeded kill times.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::fixture::{seed, wait_until, Cluster, Opts};

const WRITERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_killing_every_node() {
    kill_every_node_under_load(Opts::default(), "crash").await;
}

async fn kill_every_node_under_load(opts: Opts, seed_name: &str) {
    let mut rng = seed(seed_name) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut cluster = Cluster::start(opts).await;
    for round in 0..2 {
        let client = cluster.client().await;
        let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let client = client.clone();
            let acked = acked.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("crash-{round}-{w}-{i}");
                    let value = format!("value-{round}-{w}-{i}");
                    if client.put(key.clone(), value.clone()).await.is_ok() {
                        acked.lock().unwrap().push((key, value));
                    }
                    i += 1;
                }
            }));
        }
        // Kill once a seeded number of writes were acknowledged: mid-load, at a point that
        // depends on the seed rather than on how fast this machine is.
        let kill_after = 500 + (next() % 2500) as usize;
        let what = format!("{kill_after} writes acknowledged");
        wait_until(Duration::from_secs(120), &what, || async {
            acked.lock().unwrap().len() >= kill_after
        })
        .await;
        for id in 1..=3 {
            cluster.kill(id);
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        let acked = acked.lock().unwrap().clone();
        assert!(
            !acked.is_empty(),
            "round {round}: no write was acknowledged before the kill"
        );

        for id in 1..=3 {
            cluster.spawn(id);
        }
        cluster.wait_ready(Duration::from_secs(60)).await;
        let client = cluster.client().await;
        let mut present = 0usize;
        let mut missing = Vec::new();
        for chunk in acked.chunks(64) {
            let reads = chunk.iter().map(|(k, _)| client.get(k.clone()));
            for ((k, v), r) in chunk.iter().zip(futures::future::join_all(reads).await) {
                match r {
                    Ok(Some(kv)) if kv.value == v.as_bytes() => present += 1,
                    other => missing.push(format!("{k}: {other:?}")),
                }
            }
        }
        eprintln!(
            "crash round {round}: killed all nodes after {} acknowledged writes; acked={} present={}",
            kill_after,
            acked.len(),
            present
        );
        assert_eq!(
            present,
            acked.len(),
            "lost acknowledged writes: {:?}",
            &missing[..missing.len().min(10)]
        );
    }
}
