//! Faults on a seeded schedule: network partitions, SIGKILL + restart, SIGSTOP + SIGCONT.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Mutex;

use crate::cluster::Cluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Partition,
    Kill,
    Pause,
}

impl FaultKind {
    pub fn parse_list(s: &str) -> Result<Vec<FaultKind>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            out.push(match part {
                "partition" => FaultKind::Partition,
                "kill" => FaultKind::Kill,
                "pause" => FaultKind::Pause,
                "none" => continue,
                other => {
                    return Err(format!(
                        "unknown nemesis {other:?}; expected partition, kill, pause or none"
                    ))
                }
            });
        }
        Ok(out)
    }

    pub fn needs_processes(self) -> bool {
        matches!(self, FaultKind::Kill | FaultKind::Pause)
    }

    /// Faults between nodes: nothing to cut on a one-node cluster.
    pub fn needs_peers(self) -> bool {
        matches!(self, FaultKind::Partition)
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Partition => "partition",
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
        }
    }
}

/// One planned fault: start at `at`, heal after `hold`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub at: Duration,
    pub hold: Duration,
    pub fault: Fault,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Cut node (index into the node list) off from all others.
    IsolateNode(usize),
    /// Split the nodes in two at a random point of a shuffled order.
    Split {
        seed: u64,
    },
    /// Cut off the node leading partition `p` at the time.
    IsolateLeader(u32),
    Kill(usize),
    Pause(usize),
}

/// The whole schedule for a run, a pure function of the seed and parameters.
/// `partitions` are the partitions the workload touches; leader faults aim at them.
pub fn plan(
    seed: u64,
    kinds: &[FaultKind],
    nodes: usize,
    partitions: &[u32],
    duration: Duration,
) -> Vec<Planned> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    if kinds.is_empty() || nodes == 0 {
        return out;
    }
    let mut t = Duration::from_millis(rng.random_range(1000..3000));
    while t + Duration::from_secs(1) < duration {
        let hold = Duration::from_millis(rng.random_range(2000..6000));
        let fault = match kinds[rng.random_range(0..kinds.len())] {
            FaultKind::Partition => match rng.random_range(0..3) {
                0 => Fault::IsolateNode(rng.random_range(0..nodes)),
                1 => Fault::Split { seed: rng.random() },
                _ => Fault::IsolateLeader(
                    partitions
                        .get(rng.random_range(0..partitions.len().max(1)))
                        .copied()
                        .unwrap_or(0),
                ),
            },
            FaultKind::Kill => Fault::Kill(rng.random_range(0..nodes)),
            FaultKind::Pause => Fault::Pause(rng.random_range(0..nodes)),
        };
        let hold = hold.min(duration.saturating_sub(t));
        out.push(Planned { at: t, hold, fault });
        t += hold + Duration::from_millis(rng.random_range(1000..3000));
    }
    out
}

/// Carries out a schedule against the cluster until `deadline`; counts injected faults.
pub async fn execute(
    cluster: Arc<Mutex<Cluster>>,
    schedule: Vec<Planned>,
    start: Instant,
    injected: Arc<AtomicU64>,
) {
    for p in schedule {
        let at = start + p.at;
        tokio::time::sleep_until(at.into()).await;
        let description = {
            let mut c = cluster.lock().await;
            let ids = c.ids();
            let result = match &p.fault {
                Fault::IsolateNode(i) => {
                    let id = ids[*i % ids.len()];
                    let rest: Vec<u64> = ids.iter().copied().filter(|x| *x != id).collect();
                    c.partition(&[vec![id], rest])
                        .await
                        .map(|_| format!("isolate node {id}"))
                }
                Fault::Split { seed } => {
                    let mut order = ids.clone();
                    let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.random_range(0..=i));
                    }
                    let cut = (order.len() / 2).max(1);
                    let (a, b) = order.split_at(cut);
                    c.partition(&[a.to_vec(), b.to_vec()])
                        .await
                        .map(|_| format!("split {a:?} | {b:?}"))
                }
                Fault::IsolateLeader(part) => match c.leader_of(*part).await {
                    Some(id) => {
                        let rest: Vec<u64> = ids.iter().copied().filter(|x| *x != id).collect();
                        c.partition(&[vec![id], rest])
                            .await
                            .map(|_| format!("isolate node {id}, leader of partition {part}"))
                    }
                    None => Ok(format!("no leader of partition {part} to isolate")),
                },
                Fault::Kill(i) => {
                    let id = ids[*i % ids.len()];
                    c.kill(id).await.map(|_| format!("SIGKILL node {id}"))
                }
                Fault::Pause(i) => {
                    let id = ids[*i % ids.len()];
                    c.pause(id).map(|_| format!("SIGSTOP node {id}"))
                }
            };
            match result {
                Ok(d) => {
                    injected.fetch_add(1, Ordering::Relaxed);
                    d
                }
                Err(e) => format!("fault not injected: {e:#}"),
            }
        };
        tracing::info!(at_ms = p.at.as_millis() as u64, "nemesis: {description}");
        tokio::time::sleep_until((at + p.hold).into()).await;
        let mut c = cluster.lock().await;
        if let Err(e) = c.heal_all().await {
            tracing::warn!(error = %e, "nemesis: heal failed");
        }
        tracing::info!("nemesis: healed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_a_function_of_the_seed() {
        let kinds = [FaultKind::Partition, FaultKind::Kill, FaultKind::Pause];
        let a = plan(42, &kinds, 3, &[0, 3, 5], Duration::from_secs(60));
        assert_eq!(a, plan(42, &kinds, 3, &[0, 3, 5], Duration::from_secs(60)));
        assert_ne!(a, plan(43, &kinds, 3, &[0, 3, 5], Duration::from_secs(60)));
        assert!(a.len() >= 5, "a minute holds several faults: {}", a.len());
        for w in a.windows(2) {
            assert!(w[0].at + w[0].hold < w[1].at, "faults do not overlap");
        }
        assert!(a.iter().all(|p| p.at + p.hold <= Duration::from_secs(60)));
        assert!(plan(1, &[], 3, &[0], Duration::from_secs(60)).is_empty());
        assert_eq!(
            FaultKind::parse_list("partition,kill").unwrap(),
            vec![FaultKind::Partition, FaultKind::Kill]
        );
        assert!(FaultKind::parse_list("flood").is_err());
    }
}
