//! Test 2: kill -9 the leader of a partition; a new leader is elected and writes to that
//! partition succeed again. Prints how long it took.

use std::time::{Duration, Instant};

use capkv_types::partition_for_key;

use crate::fixture::{wait_until, Cluster, Opts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_leader_elects_a_new_one() {
    let mut cluster = Cluster::start(Opts::default()).await;
    let client = cluster.client().await;
    let key = "failover-key";
    client.put(key, "before").await.unwrap();
    let p = partition_for_key(key.as_bytes(), cluster.partitions).0;
    let old_leader = cluster.leader_of(p).await.expect("partition has a leader");

    cluster.kill(old_leader);
    let killed_at = Instant::now();
    let survivors = cluster.running();
    let client = cluster.client_for(&survivors).await;
    let mut attempts = 0;
    let write = loop {
        attempts += 1;
        match client.put(key, "after").await {
            Ok(w) => break w,
            Err(e) if killed_at.elapsed() < Duration::from_secs(60) => {
                eprintln!("failover: attempt {attempts} failed: {e}");
            }
            Err(e) => panic!("partition {p} still not writable 60 s after its leader died: {e}"),
        }
    };
    let took = killed_at.elapsed();
    eprintln!(
        "failover: partition {p} writable again {} ms after SIGKILL of leader node {old_leader}",
        took.as_millis()
    );
    let new_leader = cluster.leader_of(p).await.expect("new leader");
    assert_ne!(new_leader, old_leader);
    assert_eq!(client.get(key).await.unwrap().unwrap().value, b"after");

    // The old leader comes back as a follower and catches up.
    cluster.spawn(old_leader);
    let what = format!(
        "node {old_leader} applies partition {p} up to revision {}",
        write.revision
    );
    wait_until(Duration::from_secs(60), &what, || async {
        match cluster.status(old_leader).await {
            Some(s) => s
                .partitions
                .iter()
                .any(|x| x.id == p && x.applied_index >= write.revision),
            None => false,
        }
    })
    .await;
}
