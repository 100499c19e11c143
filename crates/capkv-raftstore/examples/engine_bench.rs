//! The node-level engine alone, before it serves clients: three engines in this process
//! (each its own fjall data dir, group-commit fsync and engine thread), joined by the
//! in-process transport, `--groups N` Raft groups on all three.
//!
//! Prints one line: time for every group to elect a leader and then fall asleep, CPU of
//! the whole process while idle (share of one core) and its RSS, then closed-loop
//! 16-byte proposals from `--clients` threads: ops/s, p50/p99 latency, and per proposal
//! the fsyncs, disk writes, Raft entries and message batches.
//!
//!   cargo run --release -p capkv-raftstore --example engine_bench -- --groups 1024
//!   (--idle-secs 10 --write-secs 10 --clients 64 --quiesce-after 6; 0 never sleeps)
//!
//! CPU is read from /proc/self/stat (clock ticks of 10 ms), so it is Linux only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use capkv_raftstore::loopback::Loopback;
use capkv_raftstore::node::{NodeConfig, NodeStats, RaftNode, StateMachine};
use capkv_raftstore::storage::GroupId;
use capkv_storage::{FjallEngine, FjallOptions, StorageEngine};
use raft::StateRole;

/// Counts what it applies (the engine's cost, not a state machine's).
struct CountingSm;

impl StateMachine for CountingSm {
    type Response = ();
    fn apply(
        &mut self,
        _: GroupId,
        _: u64,
        _: u64,
        commands: Vec<Vec<u8>>,
    ) -> Result<Vec<()>, String> {
        Ok(vec![(); commands.len()])
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time of this process so far (user + system).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    // Fields from the state (field 3) on; utime and stime are fields 14 and 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        f.get(n - 3)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ticks = field(14) + field(15);
    Duration::from_millis(ticks * 10)
}

fn rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

fn sum(nodes: &[RaftNode<()>]) -> NodeStats {
    let mut t = NodeStats::default();
    for n in nodes {
        let s = n.stats();
        t.proposals += s.proposals;
        t.entries_proposed += s.entries_proposed;
        t.batches_sent += s.batches_sent;
        t.messages_sent += s.messages_sent;
        t.driver.syncs += s.driver.syncs;
        t.driver.writes += s.driver.writes;
        t.driver.entries_written += s.driver.entries_written;
    }
    t
}

fn main() {
    let groups = arg("--groups", 64) as u32;
    let idle_secs = arg("--idle-secs", 10);
    let write_secs = arg("--write-secs", 10);
    let clients = arg("--clients", 64);
    // `--quiesce-after 0` keeps idle groups awake (to see what sleeping saves).
    let quiesce_after = arg("--quiesce-after", 6) as usize;
    let dir = tempfile::tempdir().expect("temp dir");
    let net: Loopback<()> = Loopback::default();
    let members: BTreeMap<GroupId, Vec<u64>> = (0..groups).map(|g| (g, vec![1, 2, 3])).collect();
    let mut engines = Vec::new();
    let mut nodes = Vec::new();
    let started = Instant::now();
    for id in 1..=3u64 {
        let engine: Arc<dyn StorageEngine> = Arc::new(
            FjallEngine::open(&dir.path().join(format!("n{id}")), FjallOptions::default())
                .expect("open fjall"),
        );
        let mut config = NodeConfig::new(id);
        config.driver.quiesce_after_ticks = quiesce_after;
        let node = RaftNode::start_on_engine(
            config,
            engine.clone(),
            &members,
            &BTreeMap::new(),
            net.clone(),
            CountingSm,
        )
        .expect("start engine");
        net.register(id, node.sender());
        engines.push(engine);
        nodes.push(node);
    }
    for g in 0..groups {
        nodes[(g % 3) as usize].campaign(g);
    }
    let leader = |nodes: &[RaftNode<()>], g: GroupId| {
        nodes
            .iter()
            .position(|n| n.status(g).is_some_and(|s| s.role == StateRole::Leader))
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !f() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("leaders", &|| {
        (0..groups).all(|g| leader(&nodes, g).is_some())
    });
    let formed = started.elapsed();
    wait("asleep", &|| {
        quiesce_after == 0
            || nodes
                .iter()
                .all(|n| (0..groups).all(|g| n.status(g).is_some_and(|s| s.quiet)))
    });
    let asleep = started.elapsed();

    let (c0, t0) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle_cpu = (cpu() - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let rss = rss_mb();

    // Closed-loop writers.
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let nodes = Arc::new(nodes);
    let before = sum(&nodes);
    let fsyncs_before: u64 = engines
        .iter()
        .map(|e| e.group_commit().stats().syncs.load(Ordering::Relaxed))
        .sum();
    let (c1, t1) = (cpu(), Instant::now());
    let mut threads = Vec::new();
    for c in 0..clients {
        let (nodes, stop, ops) = (nodes.clone(), stop.clone(), ops.clone());
        threads.push(std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut x = c.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let (tx, rx) = mpsc::channel();
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let g = (x % u64::from(groups)) as GroupId;
                let Some(l) = leader(&nodes, g) else { continue };
                let t = Instant::now();
                let tx = tx.clone();
                nodes[l].propose(
                    g,
                    x.to_be_bytes().repeat(2),
                    Box::new(move |r| {
                        let _ = tx.send(r.is_ok());
                    }),
                );
                if rx.recv_timeout(Duration::from_secs(5)) == Ok(true) {
                    lat.push(t.elapsed());
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    std::thread::sleep(Duration::from_secs(write_secs));
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap_or_default())
        .collect();
    let secs = t1.elapsed().as_secs_f64();
    let write_cpu = (cpu() - c1).as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let n = ops.load(Ordering::Relaxed).max(1) as f64;
    let after = sum(&nodes);
    let fsyncs: u64 = engines
        .iter()
        .map(|e| e.group_commit().stats().syncs.load(Ordering::Relaxed))
        .sum::<u64>()
        - fsyncs_before;
    println!(
        "groups={groups} formed={:.1}s asleep={:.1}s idle_cpu={:.1}% rss={rss}MB | clients={clients} ops/s={:.0} p50={:.2}ms p99={:.2}ms cpu/op={:.0}us fsyncs/op={:.3} entries/op={:.3} proposals/entry={:.1} batches/op={:.2}",
        formed.as_secs_f64(),
        asleep.as_secs_f64(),
        idle_cpu * 100.0,
        n / secs,
        pct(0.5),
        pct(0.99),
        write_cpu / n * 1e6,
        fsyncs as f64 / n,
        (after.driver.entries_written - before.driver.entries_written) as f64 / n,
        (after.proposals - before.proposals) as f64
            / (after.entries_proposed - before.entries_proposed).max(1) as f64,
        (after.batches_sent - before.batches_sent) as f64 / n,
    );
    drop(nodes);
}
