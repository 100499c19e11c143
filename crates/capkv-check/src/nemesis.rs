//! Faults on a seeded schedule.
//!
//! | nemesis | what it does | healed by |
//! |---|---|---|
//! | `partition` | cuts one node, the leader of a workload partition, or a random half off (both directions) | clearing the drops |
//! | `oneway` | one node stops hearing or stops being heard (all peers or one), a leader preferred | clearing the drops |
//! | `kill` | SIGKILL a node | a restart 2–6 s later |
//! | `restart` | SIGKILL a node, preferring the leader of a workload partition, and start it again 0–300 ms later, inside its followers' lease; half the time as a power loss: its fsyncs stall 1.5 s and the power goes 0.5 s later, and it starts without the writes no fsync covered | (restarted at once) |
//! | `pause` | SIGSTOP a node | SIGCONT |
//! | `clock` | jumps a node's wall clock (the one its HLC reads) 1–30 s forward or back; or restarts a node with its clocks running at 0.6x–1.5x (libfaketime; the rate stays until the run ends), and once it leads again isolates it | clearing the jump or the isolation (the rate stays) |
//! | `disk` | fsyncs of a node stall 50–500 ms; or its next fsync fails (its storage is then poisoned); or a power cut: with every disk slow (fsyncs stalling 1.5 s, the cut 0.5 s later), every node is killed at once and started again without the writes no fsync covered | clearing the stall; a restart of the poisoned node; (restarted at once) |
//!
//! Faults do not overlap, except a clock rate, which stays with its node (as a bad
//! oscillator would) while later faults run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capkv_testkit::Faults;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Mutex;

use crate::cluster::Cluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Partition,
    Oneway,
    Kill,
    Restart,
    Pause,
    Clock,
    Disk,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::Partition,
        FaultKind::Oneway,
        FaultKind::Kill,
        FaultKind::Restart,
        FaultKind::Pause,
        FaultKind::Clock,
        FaultKind::Disk,
    ];

    /// `all`, `none`, or a comma-separated list of names.
    pub fn parse_list(s: &str) -> Result<Vec<FaultKind>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "none" {
                continue;
            }
            if part == "all" {
                for k in FaultKind::ALL {
                    if !out.contains(&k) {
                        out.push(k);
                    }
                }
                continue;
            }
            match FaultKind::ALL.iter().find(|k| k.name() == part) {
                Some(k) if out.contains(k) => {}
                Some(k) => out.push(*k),
                None => {
                    return Err(format!(
                        "unknown nemesis {part:?}; expected all, none, or any of {}",
                        FaultKind::ALL.map(|k| k.name()).join(", ")
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Faults that kill, stop or restart processes, or need a restart to heal.
    pub fn needs_processes(self) -> bool {
        matches!(
            self,
            FaultKind::Kill | FaultKind::Pause | FaultKind::Restart | FaultKind::Disk
        )
    }

    /// Faults between nodes: nothing to cut on a one-node cluster.
    pub fn needs_peers(self) -> bool {
        matches!(self, FaultKind::Partition | FaultKind::Oneway)
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Partition => "partition",
            FaultKind::Oneway => "oneway",
            FaultKind::Kill => "kill",
            FaultKind::Restart => "restart",
            FaultKind::Pause => "pause",
            FaultKind::Clock => "clock",
            FaultKind::Disk => "disk",
        }
    }
}

/// Which node a fault hits: a fixed one (index into the node list), or whichever leads a
/// partition the workload uses when the fault starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Node(usize),
    LeaderOf(u32),
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
    /// Cut a node off from all others.
    Isolate(Target),
    /// Split the nodes in two at a random point of a shuffled order.
    Split {
        seed: u64,
    },
    /// The node's messages (and answers) to `to` are lost (`None`: to every peer); it
    /// still hears them.
    Mute {
        node: Target,
        to: Option<usize>,
    },
    /// Messages from `from` (`None`: every peer) to the node are lost; it is still heard.
    Deafen {
        node: Target,
        from: Option<usize>,
    },
    Kill(usize),
    /// SIGKILL, then start again after `delay_ms`; with `power_loss`, without the writes
    /// no fsync covered (the machine lost power and came back).
    Restart {
        node: Target,
        delay_ms: u64,
        power_loss: bool,
    },
    Pause(usize),
    /// The node's wall clock jumps by `offset_ms`.
    ClockJump {
        node: Target,
        offset_ms: i64,
    },
    /// The node restarts with its clocks running at `rate_percent` % of real time.
    ClockRate {
        node: Target,
        rate_percent: u32,
    },
    FsyncStall {
        node: Target,
        stall_ms: u32,
    },
    FsyncFail {
        node: Target,
    },
    /// Every node loses power at once: killed, and started again without the writes no
    /// fsync covered.
    PowerCut,
}

/// How a run can skew clock rates: the `libfaketime` preload library, if installed.
pub fn faketime_library() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// The whole schedule for a run, a pure function of the seed and parameters.
/// `partitions` are the partitions the workload touches; leader faults aim at them.
/// `clock_rates`: whether clock-rate skew is available (libfaketime).
pub fn plan(
    seed: u64,
    kinds: &[FaultKind],
    nodes: usize,
    partitions: &[u32],
    duration: Duration,
    clock_rates: bool,
) -> Vec<Planned> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    if kinds.is_empty() || nodes == 0 {
        return out;
    }
    let mut t = Duration::from_millis(rng.random_range(1000..3000));
    while t + Duration::from_secs(1) < duration {
        let mut hold = Duration::from_millis(rng.random_range(2000..6000));
        let leader = |rng: &mut ChaCha8Rng| {
            Target::LeaderOf(
                partitions
                    .get(rng.random_range(0..partitions.len().max(1)))
                    .copied()
                    .unwrap_or(0),
            )
        };
        let target = |rng: &mut ChaCha8Rng| {
            if rng.random_bool(0.5) {
                leader(rng)
            } else {
                Target::Node(rng.random_range(0..nodes))
            }
        };
        let peer = |rng: &mut ChaCha8Rng| {
            if rng.random_bool(0.5) {
                None
            } else {
                Some(rng.random_range(0..nodes))
            }
        };
        let fault = match kinds[rng.random_range(0..kinds.len())] {
            FaultKind::Partition => match rng.random_range(0..3) {
                0 => Fault::Isolate(Target::Node(rng.random_range(0..nodes))),
                1 => Fault::Split { seed: rng.random() },
                _ => Fault::Isolate(leader(&mut rng)),
            },
            FaultKind::Oneway => {
                let node = target(&mut rng);
                if rng.random_bool(0.5) {
                    Fault::Mute {
                        node,
                        to: peer(&mut rng),
                    }
                } else {
                    Fault::Deafen {
                        node,
                        from: peer(&mut rng),
                    }
                }
            }
            FaultKind::Kill => Fault::Kill(rng.random_range(0..nodes)),
            FaultKind::Restart => {
                // Short spacing: the fault is over once the node is back.
                hold = Duration::from_millis(rng.random_range(1000..3000));
                Fault::Restart {
                    node: if rng.random_bool(0.8) {
                        leader(&mut rng)
                    } else {
                        Target::Node(rng.random_range(0..nodes))
                    },
                    delay_ms: rng.random_range(0..=300),
                    power_loss: rng.random_bool(0.5),
                }
            }
            FaultKind::Pause => Fault::Pause(rng.random_range(0..nodes)),
            FaultKind::Clock => {
                let node = target(&mut rng);
                if clock_rates && rng.random_bool(0.5) {
                    // A leader's clock running slow is what threatens a lease: it trusts
                    // its lease longer in real time than its followers hold their votes.
                    // Rates near 1 test nothing: a clock is clearly slow or clearly fast,
                    // within the 2x the lease assumes (one node off, the others at 1x).
                    let slow = matches!(node, Target::LeaderOf(_)) || rng.random_bool(0.5);
                    let rate_percent = if slow {
                        rng.random_range(60..=75)
                    } else {
                        rng.random_range(130..=150)
                    };
                    Fault::ClockRate { node, rate_percent }
                } else {
                    let magnitude = rng.random_range(1_000..=30_000);
                    let offset_ms = if rng.random_bool(0.5) {
                        magnitude
                    } else {
                        -magnitude
                    };
                    Fault::ClockJump { node, offset_ms }
                }
            }
            FaultKind::Disk => {
                let node = target(&mut rng);
                match rng.random_range(0..10) {
                    0..4 => Fault::FsyncStall {
                        node,
                        stall_ms: rng.random_range(50..=500),
                    },
                    4..7 => Fault::FsyncFail { node },
                    _ => Fault::PowerCut,
                }
            }
        };
        let hold = hold.min(duration.saturating_sub(t));
        out.push(Planned { at: t, hold, fault });
        t += hold + Duration::from_millis(rng.random_range(1000..3000));
    }
    out
}

/// The node a target names now (`None`: no such node, or the partition has no leader).
async fn resolve(c: &Cluster, ids: &[u64], target: Target) -> Option<u64> {
    match target {
        Target::Node(i) => ids.get(i % ids.len().max(1)).copied(),
        Target::LeaderOf(p) => c.leader_of(p).await,
    }
}

fn others(ids: &[u64], id: u64) -> Vec<u64> {
    ids.iter().copied().filter(|x| *x != id).collect()
}

/// Carries out one fault; returns what was done.
async fn inject(
    c: &mut Cluster,
    fault: &Fault,
    faketime: Option<&PathBuf>,
) -> anyhow::Result<String> {
    let ids = c.ids();
    if ids.is_empty() {
        anyhow::bail!("the cluster has no nodes");
    }
    let pick = |i: usize| ids[i % ids.len()];
    let Some(node) = (match fault {
        Fault::Isolate(t)
        | Fault::Mute { node: t, .. }
        | Fault::Deafen { node: t, .. }
        | Fault::Restart { node: t, .. }
        | Fault::ClockJump { node: t, .. }
        | Fault::ClockRate { node: t, .. }
        | Fault::FsyncStall { node: t, .. }
        | Fault::FsyncFail { node: t } => resolve(c, &ids, *t).await,
        Fault::Kill(i) | Fault::Pause(i) => Some(pick(*i)),
        Fault::Split { .. } | Fault::PowerCut => Some(ids[0]),
    }) else {
        return Ok(format!("no node to hit for {fault:?} (no leader)"));
    };
    Ok(match fault {
        Fault::Isolate(_) => {
            c.partition(&[vec![node], others(&ids, node)]).await?;
            format!("isolate node {node}")
        }
        Fault::Split { seed } => {
            let mut order = ids.clone();
            let mut rng = ChaCha8Rng::seed_from_u64(*seed);
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            let cut = (order.len() / 2).max(1);
            let (a, b) = order.split_at(cut);
            c.partition(&[a.to_vec(), b.to_vec()]).await?;
            format!("split {a:?} | {b:?}")
        }
        Fault::Mute { to, .. } => {
            let peers = match to {
                Some(i) if pick(*i) != node => vec![pick(*i)],
                _ => others(&ids, node),
            };
            let f = Faults {
                drop_to: peers.clone(),
                ..Faults::default()
            };
            c.set_faults(node, f).await?;
            format!("node {node} is not heard by {peers:?} (one way)")
        }
        Fault::Deafen { from, .. } => {
            let peers = match from {
                Some(i) if pick(*i) != node => vec![pick(*i)],
                _ => others(&ids, node),
            };
            let f = Faults {
                drop_from: peers.clone(),
                ..Faults::default()
            };
            c.set_faults(node, f).await?;
            format!("node {node} does not hear {peers:?} (one way)")
        }
        Fault::Kill(_) => {
            c.kill(node)?;
            format!("SIGKILL node {node}")
        }
        Fault::Restart {
            delay_ms,
            power_loss,
            ..
        } => {
            if *power_loss {
                // The disk is slow as the power fails: writes pile up unsynced first.
                slow_disks(c, &[node]).await?;
            }
            c.kill(node)?;
            tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
            if *power_loss {
                c.restart_losing_unsynced_writes(node)?;
            } else {
                c.restart(node)?;
            }
            let how = if *power_loss {
                " without its unsynced writes"
            } else {
                ""
            };
            format!("SIGKILL node {node}, started again{how} after {delay_ms} ms")
        }
        Fault::Pause(_) => {
            c.pause(node)?;
            format!("SIGSTOP node {node}")
        }
        Fault::ClockJump { offset_ms, .. } => {
            let f = Faults {
                wall_clock_offset_ms: *offset_ms,
                ..Faults::default()
            };
            c.set_faults(node, f).await?;
            format!("node {node}'s wall clock jumps {offset_ms:+} ms")
        }
        Fault::ClockRate { rate_percent, .. } => {
            let Some(lib) = faketime else {
                return Ok("clock rates need libfaketime (not installed); skipped".into());
            };
            c.kill(node)?;
            c.restart_with_clock_rate(node, lib, *rate_percent)?;
            // A skewed clock matters to a lease when leadership moves: once the node leads
            // again (leaders go back to their preferred replicas within seconds), it is
            // cut off for the rest of the fault, and its peers elect others.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let mut leads = false;
            while !leads && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                leads = c.leaders().await.contains(&Some(node));
            }
            if leads {
                c.partition(&[vec![node], others(&ids, node)]).await?;
                // At least long enough for its peers to elect others and serve writes
                // (the schedule's hold may have passed while it waited to lead).
                tokio::time::sleep(Duration::from_secs(3)).await;
                format!(
                    "node {node} restarted with its clocks at {rate_percent} % of real time, \
                     then isolated while leading"
                )
            } else {
                format!("node {node} restarted with its clocks at {rate_percent} % of real time")
            }
        }
        Fault::FsyncStall { stall_ms, .. } => {
            let f = Faults {
                fsync_stall_ms: *stall_ms,
                ..Faults::default()
            };
            c.set_faults(node, f).await?;
            format!("node {node}'s fsyncs stall {stall_ms} ms")
        }
        Fault::PowerCut => {
            slow_disks(c, &ids).await?;
            c.power_cut_all()?;
            "power cut: every node killed and started again without its unsynced writes".into()
        }
        Fault::FsyncFail { .. } => {
            let f = Faults {
                fsync_fail_next: true,
                ..Faults::default()
            };
            c.set_faults(node, f).await?;
            format!("node {node}'s next fsync fails")
        }
    })
}

/// Before a power loss: fsyncs of `nodes` stall for longer than the 500 ms until the power
/// goes, so that every write of those 500 ms is still unsynced then, as on a disk busy at
/// that moment. A node that acknowledges only what an fsync covered acknowledges none of
/// them, and loses nothing it acknowledged.
async fn slow_disks(c: &Cluster, nodes: &[u64]) -> anyhow::Result<()> {
    for id in nodes {
        let stall = Faults {
            fsync_stall_ms: 1500,
            ..Faults::default()
        };
        c.set_faults(*id, stall).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// Carries out a schedule against the cluster until `deadline`; counts injected faults.
pub async fn execute(
    cluster: Arc<Mutex<Cluster>>,
    schedule: Vec<Planned>,
    start: Instant,
    injected: Arc<AtomicU64>,
) {
    let faketime = faketime_library();
    for p in schedule {
        let at = start + p.at;
        tokio::time::sleep_until(at.into()).await;
        let description = {
            let mut c = cluster.lock().await;
            match inject(&mut c, &p.fault, faketime.as_ref()).await {
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
        let kinds = FaultKind::ALL;
        let a = plan(42, &kinds, 3, &[0, 3, 5], Duration::from_secs(60), true);
        assert_eq!(
            a,
            plan(42, &kinds, 3, &[0, 3, 5], Duration::from_secs(60), true)
        );
        assert_ne!(
            a,
            plan(43, &kinds, 3, &[0, 3, 5], Duration::from_secs(60), true)
        );
        assert!(a.len() >= 5, "a minute holds several faults: {}", a.len());
        for w in a.windows(2) {
            assert!(w[0].at + w[0].hold < w[1].at, "faults do not overlap");
        }
        assert!(a.iter().all(|p| p.at + p.hold <= Duration::from_secs(60)));
        assert!(plan(1, &[], 3, &[0], Duration::from_secs(60), true).is_empty());
        assert!(plan(1, &kinds, 0, &[0], Duration::from_secs(60), true).is_empty());
    }

    #[test]
    fn every_nemesis_appears_in_a_long_schedule_within_its_bounds() {
        let a = plan(
            7,
            &FaultKind::ALL,
            3,
            &[1, 2],
            Duration::from_secs(3600),
            true,
        );
        let has = |f: fn(&Fault) -> bool| a.iter().any(|p| f(&p.fault));
        assert!(has(|f| matches!(
            f,
            Fault::Isolate(_) | Fault::Split { .. }
        )));
        assert!(has(|f| matches!(f, Fault::Mute { .. })));
        assert!(has(|f| matches!(f, Fault::Deafen { .. })));
        assert!(has(|f| matches!(f, Fault::Kill(_))));
        assert!(has(|f| matches!(f, Fault::Pause(_))));
        assert!(has(|f| matches!(f, Fault::FsyncFail { .. })));
        assert!(has(|f| matches!(f, Fault::PowerCut)));
        for p in &a {
            match &p.fault {
                Fault::Restart { delay_ms, .. } => assert!(*delay_ms <= 300),
                Fault::ClockJump { offset_ms, .. } => {
                    assert!((1_000..=30_000).contains(&offset_ms.abs()))
                }
                Fault::ClockRate { rate_percent, .. } => {
                    assert!((60..=150).contains(rate_percent))
                }
                Fault::FsyncStall { stall_ms, .. } => assert!((50..=500).contains(stall_ms)),
                _ => {}
            }
        }
        assert!(has(|f| matches!(
            f,
            Fault::Restart {
                node: Target::LeaderOf(_),
                ..
            }
        )));
        assert!(has(|f| matches!(f, Fault::ClockRate { .. })));
        assert!(has(|f| matches!(f, Fault::ClockJump { .. })));
        assert!(has(|f| matches!(f, Fault::FsyncStall { .. })));
        let no_rates = plan(
            7,
            &[FaultKind::Clock],
            3,
            &[1],
            Duration::from_secs(600),
            false,
        );
        assert!(no_rates
            .iter()
            .all(|p| matches!(p.fault, Fault::ClockJump { .. })));
    }

    #[test]
    fn nemesis_names_parse() {
        assert_eq!(
            FaultKind::parse_list("partition,kill").unwrap(),
            vec![FaultKind::Partition, FaultKind::Kill]
        );
        assert_eq!(
            FaultKind::parse_list("all").unwrap(),
            FaultKind::ALL.to_vec()
        );
        assert_eq!(FaultKind::parse_list("none").unwrap(), vec![]);
        assert_eq!(
            FaultKind::parse_list("kill,pause,kill").unwrap(),
            vec![FaultKind::Kill, FaultKind::Pause]
        );
        assert_eq!(
            FaultKind::parse_list("disk,all").unwrap().len(),
            FaultKind::ALL.len()
        );
        let err = FaultKind::parse_list("flood").unwrap_err();
        assert!(err.contains("oneway") && err.contains("disk"), "{err}");
    }
}
