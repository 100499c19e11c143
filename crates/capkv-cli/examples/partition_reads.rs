//! What each read level does during a network partition (docs/benchmarks.md): starts 3
//! nodes on loopback, writes keys, reads each once at `bounded:0ms` on nodes 1 and 3 (so
//! they hold fresh proofs, as nodes serving bounded reads do), cuts node 3 off from the
//! other two, and for a few
//! seconds reads the keys at every level from node 1 (majority side; a read it sends to
//! the leader goes to node 2 if that leads) and from node 3 (minority side), one request
//! at a time per side and level, without retries. Prints, per level and side, the reads
//! served and refused, and for bounded reads the largest staleness bound a served answer
//! gave.
//!
//!   cargo run --release -p capkv --example partition_reads -- [SECONDS]
//!
//! Uses target/release/capkv (build it first).

use std::path::Path;
use std::time::{Duration, Instant};

use capkv_client::{Client, ClientConfig};
use capkv_proto::consistency::to_wire;
use capkv_proto::kv::{kv_client::KvClient, GetRequest};
use capkv_testkit::{ClusterOptions, LocalCluster};
use capkv_types::ReadConsistency;

const LEVELS: [&str; 8] = [
    "linearizable",
    "linearizable-follower",
    "bounded:5",
    "bounded:100ms",
    "bounded:10s",
    "session",
    "prefix",
    "eventual",
];

#[derive(Default, Clone, Copy)]
struct Count {
    served: u64,
    refused: u64,
    stale_ms_max: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().nth(1).map_or(Ok(5), |s| s.parse())?;
    let exe = Path::new("target/release/capkv").canonicalize()?;
    let dir = tempfile::Builder::new()
        .prefix("capkv-partition-reads-")
        .tempdir()?;
    let mut options = ClusterOptions::new(3, 8);
    options.server_log = Some("warn".into());
    options.extra_args = ["--unsafe-fault-injection", "--read-timeout-ms", "500"]
        .map(String::from)
        .to_vec();
    let cluster = LocalCluster::start(&exe, dir.path(), options).await?;
    let client = Client::connect(ClientConfig::new(cluster.endpoints())).await?;
    let keys: Vec<String> = (0..64).map(|i| format!("key-{i:03}")).collect();
    for k in &keys {
        client.put(k.as_str(), "v").await?;
    }
    // Each node takes one bounded read of every key (a node serving bounded reads holds
    // proofs; each waits for the node to apply what was committed), then node 3 is cut
    // off.
    for node in [1u64, 3] {
        let mut raw = KvClient::connect(format!("http://{}", cluster.node(node)?.addr)).await?;
        let w = to_wire(ReadConsistency::Bounded(capkv_types::Staleness::Millis(0)));
        for k in &keys {
            let _ = raw
                .get(GetRequest {
                    key: k.as_bytes().to_vec(),
                    consistency: w.consistency,
                    max_staleness_ms: w.max_staleness_ms,
                    ..Default::default()
                })
                .await;
        }
    }
    cluster.partition(&[vec![1, 2], vec![3]]).await?;
    let cut = Instant::now();

    let levels: Vec<ReadConsistency> = LEVELS.iter().map(|l| l.parse().unwrap()).collect();
    let mut tasks = Vec::new();
    for node in [1u64, 3] {
        for (li, level) in levels.iter().copied().enumerate() {
            let addr = format!("http://{}", cluster.node(node)?.addr);
            let other = format!("http://{}", cluster.node(2)?.addr);
            let keys = keys.clone();
            tasks.push(tokio::spawn(async move {
                let mut raw = KvClient::connect(addr).await?;
                let mut node2 = KvClient::connect(other).await?;
                let mut count = Count::default();
                let w = to_wire(level);
                let mut i = 0;
                while cut.elapsed() < Duration::from_secs(seconds) {
                    let request = GetRequest {
                        key: keys[i % keys.len()].as_bytes().to_vec(),
                        consistency: w.consistency,
                        max_lag_positions: w.max_lag_positions,
                        max_staleness_ms: w.max_staleness_ms,
                        follower_read: w.follower_read,
                        ..Default::default()
                    };
                    i += 1;
                    let mut answer =
                        tokio::time::timeout(Duration::from_secs(2), raw.get(request.clone()))
                            .await;
                    // The majority side: node 1 names node 2 as the leader.
                    if let Ok(Err(status)) = &answer {
                        let named_2 = matches!(
                            capkv_proto::status::from_status(status),
                            capkv_types::KvError::NotLeader {
                                leader_id: Some(capkv_types::NodeId(2)),
                                ..
                            }
                        );
                        if node == 1 && named_2 {
                            answer =
                                tokio::time::timeout(Duration::from_secs(2), node2.get(request))
                                    .await;
                        }
                    }
                    match answer {
                        Ok(Ok(r)) => {
                            count.served += 1;
                            let stale = r.into_inner().header.and_then(|h| h.stale_ms_at_most);
                            count.stale_ms_max = count.stale_ms_max.max(stale);
                        }
                        _ => {
                            count.refused += 1;
                            // A refused read may have waited its whole timeout; pace the
                            // ones refused at once.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                anyhow::Ok((node, li, count))
            }));
        }
    }
    let mut counts = vec![[Count::default(); 2]; levels.len()];
    for t in tasks {
        let (node, li, c) = t.await??;
        counts[li][usize::from(node == 3)] = c;
    }
    println!(
        "node 3 cut off from nodes 1 and 2 for {seconds} s; reads sent to one node, no retries"
    );
    println!();
    println!("| level | majority (node 1): served / refused | minority (node 3): served / refused | largest stale_ms_at_most (1 / 3) |");
    println!("|---|---|---|---|");
    for (li, name) in LEVELS.iter().enumerate() {
        let [a, b] = counts[li];
        let stale = |c: Count| c.stale_ms_max.map_or("-".into(), |s| s.to_string());
        println!(
            "| {name} | {} / {} | {} / {} | {} / {} |",
            a.served,
            a.refused,
            b.served,
            b.refused,
            stale(a),
            stale(b)
        );
    }
    Ok(())
}
