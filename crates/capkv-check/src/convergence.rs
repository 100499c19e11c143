//! Convergence: once the faults are healed and writes have stopped, every replica of every
//! partition holds the same data (the `eventual` contract, and a check every run gets).
//! Each node's own replica is read directly (`Client::replica_data`, at `eventual`), so
//! what is compared is what each replica has applied, not what a leader would answer.

use std::time::{Duration, Instant};

use capkv_client::{Client, KeyValue};
use capkv_types::{ErrorCode, PartitionId};

/// Keys read per replica at most (the workloads use a handful).
const KEYS_MAX: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converged {
    pub partitions: u32,
    /// Replica copies compared, over all partitions.
    pub replicas: usize,
    pub keys: usize,
    pub waited: Duration,
}

/// Waits up to `limit` until, in every partition, every node that holds a replica holds
/// the same keys, values and revisions. The error says where they still differ.
pub async fn replicas_converge(
    client: &Client,
    nodes: &[String],
    partitions: u32,
    limit: Duration,
) -> Result<Converged, String> {
    let started = Instant::now();
    loop {
        let mut differ = None;
        let (mut replicas, mut keys) = (0, 0);
        'partitions: for p in 0..partitions {
            let mut first: Option<(&str, Vec<KeyValue>)> = None;
            for addr in nodes {
                let data = match client.replica_data(addr, PartitionId(p), KEYS_MAX).await {
                    Ok(d) => d,
                    // The node holds no replica of this partition.
                    Err(e) if e.code() == ErrorCode::NotLeader => continue,
                    Err(e) => {
                        differ = Some(format!("partition {p}: node {addr} did not answer: {e}"));
                        break 'partitions;
                    }
                };
                replicas += 1;
                match &first {
                    None => {
                        keys += data.len();
                        first = Some((addr, data));
                    }
                    Some((a, d)) if *d != data => {
                        differ = Some(describe(p, a, d, addr, &data));
                        break 'partitions;
                    }
                    Some(_) => {}
                }
            }
        }
        match differ {
            None => {
                return Ok(Converged {
                    partitions,
                    replicas,
                    keys,
                    waited: started.elapsed(),
                })
            }
            Some(why) if started.elapsed() >= limit => {
                return Err(format!(
                    "replicas still differ {} s after healing: {why}",
                    limit.as_secs()
                ))
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn describe(p: u32, a: &str, da: &[KeyValue], b: &str, db: &[KeyValue]) -> String {
    let first_diff = da
        .iter()
        .zip(db)
        .find(|(x, y)| x != y)
        .map(|(x, y)| {
            format!(
                "; first difference at key {:?}: revision {} vs {}",
                String::from_utf8_lossy(&x.key),
                x.mod_revision,
                y.mod_revision
            )
        })
        .unwrap_or_default();
    format!(
        "partition {p}: node {a} holds {} keys, node {b} {}{first_diff}",
        da.len(),
        db.len()
    )
}
