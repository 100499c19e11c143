//! Three engines (one thread each) over real fjall disks and an in-process transport that
//! carries every batch through the wire encoding: groups elect leaders, proposals are
//! answered with their state-machine responses, every replica applies the same commands,
//! and after every node stops and reopens its disk the logs replay the same history.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capkv_raftstore::driver::ProposeError;
use capkv_raftstore::loopback::Loopback;
use capkv_raftstore::node::{NodeConfig, RaftNode, StateMachine};
use capkv_raftstore::storage::GroupId;
use capkv_storage::{FjallEngine, FjallOptions, StorageEngine};
use raft::StateRole;

/// (index, command) applied, per group.
type Applied = Arc<Mutex<BTreeMap<GroupId, Vec<(u64, Vec<u8>)>>>>;

struct RecordingSm(Applied);

impl StateMachine for RecordingSm {
    /// (index, position of the command in its entry)
    type Response = (u64, usize);

    fn apply(
        &mut self,
        group: GroupId,
        index: u64,
        _term: u64,
        commands: Vec<Vec<u8>>,
    ) -> Result<Vec<(u64, usize)>, String> {
        let mut a = self.0.lock().unwrap();
        let log = a.entry(group).or_default();
        let n = commands.len();
        for c in commands {
            log.push((index, c));
        }
        Ok((0..n).map(|i| (index, i)).collect())
    }
}

type Senders = Loopback<(u64, usize)>;

const GROUPS: u32 = 8;

fn start(
    id: u64,
    dir: &std::path::Path,
    senders: &Senders,
    applied: Applied,
) -> RaftNode<(u64, usize)> {
    try_start(id, dir, senders, applied, &BTreeMap::new()).unwrap()
}

fn try_start(
    id: u64,
    dir: &std::path::Path,
    senders: &Senders,
    applied: Applied,
    applied_index: &BTreeMap<GroupId, u64>,
) -> Result<RaftNode<(u64, usize)>, String> {
    let engine: Arc<dyn StorageEngine> =
        Arc::new(FjallEngine::open(dir, FjallOptions::default()).unwrap());
    let groups: BTreeMap<GroupId, Vec<u64>> = (0..GROUPS).map(|g| (g, vec![1, 2, 3])).collect();
    let mut cfg = NodeConfig::new(id);
    cfg.tick = Duration::from_millis(20);
    let node = RaftNode::start_on_engine(
        cfg,
        engine,
        &groups,
        applied_index,
        senders.clone(),
        RecordingSm(applied),
    )
    .map_err(|e| e.to_string())?;
    senders.register(id, node.sender());
    Ok(node)
}

/// Starts nodes 1..=3 on `dirs` and has each group's first replica campaign.
fn start_all(
    dirs: &[tempfile::TempDir],
    senders: &Senders,
    applied: &BTreeMap<u64, Applied>,
) -> BTreeMap<u64, RaftNode<(u64, usize)>> {
    let nodes: BTreeMap<u64, RaftNode<(u64, usize)>> = (1..=3)
        .map(|id| {
            let dir = dirs[id as usize - 1].path();
            (id, start(id, dir, senders, applied[&id].clone()))
        })
        .collect();
    for g in 0..GROUPS {
        nodes[&(1 + u64::from(g) % 3)].campaign(g);
    }
    nodes
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn leader(nodes: &BTreeMap<u64, RaftNode<(u64, usize)>>, g: GroupId) -> Option<u64> {
    nodes
        .iter()
        .find(|(_, n)| n.status(g).is_some_and(|s| s.role == StateRole::Leader))
        .map(|(id, _)| *id)
}

#[test]
fn proposals_commit_apply_everywhere_and_survive_a_restart() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let senders: Senders = Loopback::default();
    let applied: BTreeMap<u64, Applied> = (1..=3).map(|id| (id, Applied::default())).collect();
    let mut nodes = start_all(&dirs, &senders, &applied);
    wait_until("a leader in every group", || {
        (0..GROUPS).all(|g| leader(&nodes, g).is_some())
    });

    // 400 commands, sent without waiting, retried on NotLeader or Dropped (never applied).
    let (rtx, rrx) = mpsc::channel();
    let send = |nodes: &BTreeMap<u64, RaftNode<(u64, usize)>>, i: u32| {
        let g = i % GROUPS;
        let to = leader(nodes, g).unwrap_or(1);
        let rtx = rtx.clone();
        nodes[&to].propose(
            g,
            format!("cmd-{i}").into_bytes(),
            Box::new(move |r| {
                let _ = rtx.send((i, r));
            }),
        );
    };
    for i in 0..400 {
        send(&nodes, i);
    }
    let mut done: BTreeMap<u32, (u64, usize)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.len() < 400 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, r) = rrx.recv_timeout(left).expect("every proposal is answered");
        match r {
            Ok(resp) => {
                done.insert(i, resp);
            }
            Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Dropped) => send(&nodes, i),
            Err(e) => panic!("proposal {i}: {e}"),
        }
    }
    let stats: Vec<_> = nodes.values().map(|n| n.stats()).collect();
    eprintln!("stats: {stats:?}");
    let proposals: u64 = stats.iter().map(|s| s.proposals).sum();
    let entries: u64 = stats.iter().map(|s| s.entries_proposed).sum();
    assert!(entries <= proposals && proposals >= 400);

    // Every replica applies the same commands in the same order, each once.
    let snapshot = |a: &Applied| a.lock().unwrap().clone();
    wait_until("every replica applied every command", || {
        applied
            .values()
            .all(|a| snapshot(a).values().map(Vec::len).sum::<usize>() >= 400)
    });
    let first = snapshot(&applied[&1]);
    for id in 2..=3 {
        wait_until("replicas agree", || snapshot(&applied[&id]) == first);
    }
    for (g, log) in &first {
        let mut seen = std::collections::BTreeSet::new();
        for (_, c) in log {
            assert!(seen.insert(c.clone()), "group {g}: {c:?} applied twice");
        }
    }
    // A proposal's response names the entry that carried it.
    for (i, (index, pos)) in &done {
        let g = i % GROUPS;
        let carried: Vec<_> = first[&g].iter().filter(|(ix, _)| ix == index).collect();
        assert_eq!(carried[*pos].1, format!("cmd-{i}").into_bytes());
    }

    // A read at the leader sees every acknowledged write: its index is at least the
    // index of every write answered before it began, and that much is applied here.
    let read = |node: &RaftNode<(u64, usize)>, g: GroupId| {
        let (tx, rx) = mpsc::channel();
        node.read(
            g,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv_timeout(Duration::from_secs(30))
            .expect("read answered")
    };
    for g in 0..GROUPS {
        let l = leader(&nodes, g).expect("leader");
        let acked = done
            .iter()
            .filter(|(i, _)| *i % GROUPS == g)
            .map(|(_, (index, _))| *index)
            .max()
            .unwrap_or(0);
        let index = read(&nodes[&l], g).expect("the leader confirms a read");
        assert!(
            index >= acked,
            "group {g}: read index {index} below acknowledged {acked}"
        );
        let applied_here = snapshot(&applied[&l]);
        let seen = applied_here[&g]
            .iter()
            .filter(|(ix, _)| *ix <= index)
            .count();
        let want = done.keys().filter(|i| *i % GROUPS == g).count();
        assert!(
            seen >= want,
            "group {g}: the read sees {seen} of {want} acknowledged writes"
        );
        let follower = (1..=3).find(|id| *id != l).unwrap();
        assert!(
            matches!(
                read(&nodes[&follower], g),
                Err(ProposeError::NotLeader { .. })
            ),
            "a follower does not serve linearizable reads by itself"
        );
    }

    // Left alone, every group falls asleep on every node; a proposal wakes its group.
    wait_until("every group asleep on every node", || {
        nodes
            .values()
            .all(|n| (0..GROUPS).all(|g| n.status(g).is_some_and(|s| s.quiet)))
    });
    let sleeping = nodes
        .values()
        .map(|n| n.stats().driver.quiesced)
        .sum::<u64>();
    assert!(sleeping >= u64::from(GROUPS) * 3);
    let g = 3;
    let l = leader(&nodes, g).expect("a sleeping group keeps its leader");
    let (wtx, wrx) = mpsc::channel();
    nodes[&l].propose(
        g,
        b"wake-up".to_vec(),
        Box::new(move |r| {
            let _ = wtx.send(r);
        }),
    );
    let r = wrx.recv_timeout(Duration::from_secs(30)).expect("answered");
    assert!(r.is_ok(), "the woken group commits: {r:?}");
    // A read of a sleeping group is confirmed too.
    let asleep = (0..GROUPS).find(|g| *g != 3).unwrap();
    wait_until("a group asleep at its leader", || {
        nodes.values().any(|n| {
            n.status(asleep)
                .is_some_and(|s| s.quiet && s.role == StateRole::Leader)
        })
    });
    let l = leader(&nodes, asleep).unwrap();
    assert!(read(&nodes[&l], asleep).is_ok());
    for n in nodes.values() {
        wait_until("the write reaches every replica", || {
            n.status(g)
                .is_some_and(|s| s.commit >= r.as_ref().unwrap().0)
        });
    }

    // Stop everything; reopen from disk with empty state machines: the logs replay the
    // same history once the groups commit again.
    for (_, n) in std::mem::take(&mut nodes) {
        n.stop();
    }
    senders.clear();
    let replay: BTreeMap<u64, Applied> = (1..=3).map(|id| (id, Applied::default())).collect();
    // Held (not dropped) while they replay.
    let _nodes = start_all(&dirs, &senders, &replay);
    for id in 1..=3 {
        wait_until("the restarted replica replays the history", || {
            let got = snapshot(&replay[&id]);
            first
                .iter()
                .all(|(g, log)| got.get(g).is_some_and(|l| l.starts_with(log)))
        });
    }
}

#[test]
fn a_compacted_log_restarts_from_the_state_machine() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let senders: Senders = Loopback::default();
    let applied: BTreeMap<u64, Applied> = (1..=3).map(|id| (id, Applied::default())).collect();
    let mut nodes = start_all(&dirs, &senders, &applied);
    let g: GroupId = 0;
    wait_until("a leader", || leader(&nodes, g).is_some());
    // One command per entry, each answered before the next: enough entries for the
    // leader to compact every replica's log at least once.
    let total = 2 * raft_store_compact_after() + 200;
    let mut i = 0;
    while i < total {
        let to = leader(&nodes, g).unwrap_or(1);
        let (tx, rx) = mpsc::channel();
        nodes[&to].propose(
            g,
            format!("c{i}").into_bytes(),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        match rx.recv_timeout(Duration::from_secs(30)).expect("answered") {
            Ok(_) => i += 1,
            Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Dropped) => {}
            Err(e) => panic!("proposal {i}: {e}"),
        }
    }
    wait_until("every replica compacted its log", || {
        nodes.values().all(|n| n.stats().compactions >= 1)
    });
    for n in nodes.values() {
        let start = n.status(g).map_or(0, |s| s.log_start);
        assert!(
            start >= raft_store_compact_after(),
            "the log starts after {start}"
        );
    }
    let snapshot = |a: &Applied| a.lock().unwrap().clone();
    wait_until("every replica applied every command", || {
        applied
            .values()
            .all(|a| snapshot(a).get(&g).map_or(0, Vec::len) >= total as usize)
    });
    // What each state machine applied, as it would have recorded it (the last index
    // applied per group; a group with no command yet counts its leader's empty entry).
    // The status is published at the end of the engine's turn, after the recording
    // state machine saw the entries: wait until it covers them.
    for (id, n) in &nodes {
        let recorded = snapshot(&applied[id]);
        wait_until(
            "the published applied index covers what was recorded",
            || {
                recorded.iter().all(|(gr, log)| {
                    let last = log.last().map_or(0, |(ix, _)| *ix);
                    n.status(*gr).is_some_and(|s| s.applied >= last)
                })
            },
        );
    }
    let applied_index: BTreeMap<u64, BTreeMap<GroupId, u64>> = nodes
        .iter()
        .map(|(id, n)| {
            let per_group = (0..GROUPS)
                .map(|gr| (gr, n.status(gr).map_or(0, |s| s.applied)))
                .collect();
            (*id, per_group)
        })
        .collect();
    for (_, n) in std::mem::take(&mut nodes) {
        n.stop();
    }
    senders.clear();
    // A state machine that lost what it applied cannot restart on a compacted log.
    let err = try_start(
        1,
        dirs[0].path(),
        &senders,
        Applied::default(),
        &BTreeMap::new(),
    )
    .err()
    .expect("refused");
    assert!(err.contains("before the log's start"), "{err}");
    senders.clear();
    // With what they applied, the replicas start, replay nothing they applied, and commit.
    let replay: BTreeMap<u64, Applied> = (1..=3).map(|id| (id, Applied::default())).collect();
    let nodes: BTreeMap<u64, RaftNode<(u64, usize)>> = (1..=3)
        .map(|id| {
            let node = try_start(
                id,
                dirs[id as usize - 1].path(),
                &senders,
                replay[&id].clone(),
                &applied_index[&id],
            )
            .unwrap();
            (id, node)
        })
        .collect();
    nodes[&1].campaign(g);
    wait_until("a leader after the restart", || leader(&nodes, g).is_some());
    let (tx, rx) = mpsc::channel();
    let l = leader(&nodes, g).unwrap();
    nodes[&l].propose(
        g,
        b"after".to_vec(),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    let r = rx.recv_timeout(Duration::from_secs(30)).expect("answered");
    assert!(r.is_ok(), "{r:?}");
    for id in 1..=3 {
        wait_until("the new command reaches every replica", || {
            snapshot(&replay[&id])
                .get(&g)
                .is_some_and(|l| l.iter().any(|(_, c)| c == b"after"))
        });
        let replayed = snapshot(&replay[&id]).get(&g).map_or(0, Vec::len);
        assert_eq!(replayed, 1, "node {id} applied again what it had applied");
    }
}

fn raft_store_compact_after() -> u64 {
    capkv_raftstore::node::COMPACT_AFTER_ENTRIES
}

/// Commits only while `ok` holds; counts what it applied.
struct CommitSm {
    ok: Arc<std::sync::atomic::AtomicBool>,
}

impl StateMachine for CommitSm {
    type Response = u64;

    fn apply(
        &mut self,
        _: GroupId,
        index: u64,
        _: u64,
        c: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, String> {
        Ok(vec![index; c.len()])
    }

    fn commit(&mut self) -> Result<(), String> {
        if self.ok.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err("disk gone".into())
        }
    }
}

#[test]
fn a_proposal_is_answered_only_once_the_state_machine_committed_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine: Arc<dyn StorageEngine> =
        Arc::new(FjallEngine::open(dir.path(), FjallOptions::default()).unwrap());
    let groups: BTreeMap<GroupId, Vec<u64>> = BTreeMap::from([(0, vec![1])]);
    let ok = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut cfg = NodeConfig::new(1);
    cfg.tick = Duration::from_millis(20);
    let senders: Loopback<u64> = Loopback::default();
    let node = RaftNode::start_on_engine(
        cfg,
        engine,
        &groups,
        &BTreeMap::new(),
        senders.clone(),
        CommitSm { ok: ok.clone() },
    )
    .unwrap();
    node.campaign(0);
    wait_until("a leader", || {
        node.status(0).is_some_and(|s| s.role == StateRole::Leader)
    });
    let propose = |cmd: &[u8]| {
        let (tx, rx) = mpsc::channel();
        node.propose(
            0,
            cmd.to_vec(),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv_timeout(Duration::from_secs(30)).expect("answered")
    };
    assert!(propose(b"one").is_ok());
    // The state machine cannot make the next one visible: it is not acknowledged, and the
    // node stops acknowledging anything.
    ok.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(propose(b"two"), Err(ProposeError::Stopped)));
    // Published at the end of the engine's turn, just after the answers.
    wait_until("the node reports why it stopped", || {
        node.poisoned().is_some()
    });
    let why = node.poisoned().unwrap_or_default();
    assert!(why.contains("disk gone"), "{why}");
    assert!(propose(b"three").is_err());
}
