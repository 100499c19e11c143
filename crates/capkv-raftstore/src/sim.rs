//! A seeded simulation of many nodes' drivers in one thread: messages lost, delayed,
//! reordered and duplicated, partitions, disk syncs that take time, and crashes that lose
//! whatever no completed sync covered. After every event it checks Raft's safety
//! properties; a violation stops the run with the seed and the step.
//!
//! Properties checked (Raft paper, figure 3):
//! - election safety: at most one leader per group and term;
//! - log matching: two logs with an entry of the same index and term agree on every entry
//!   up to it;
//! - leader completeness: a leader's log holds every entry committed before its term;
//! - state machine safety: no two nodes apply different entries at one index.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use raft::eraftpb::Message;
use raft::StateRole;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::driver::{Driver, DriverConfig, PlantedBugs};
use crate::storage::{Disk, GroupId, MemDisk};

/// What a run does.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: u64,
    pub groups: u32,
    /// Replicas per group (placed round-robin over the nodes).
    pub replicas: u64,
    pub steps: u64,
    /// Per mille: messages lost, duplicated.
    pub loss_permille: u32,
    pub dup_permille: u32,
    /// Per step, per mille: a node crashes (when fewer than a minority are down).
    pub crash_permille: u32,
    /// Per step, per mille: the network splits in two, or one link fails one way, for 5
    /// to 50 ticks.
    pub partition_permille: u32,
    /// Per step, per mille: a node pauses (handles nothing, while its clock runs on) for 3
    /// to 30 ticks, as a process stopped by the OS or a long GC pause.
    pub pause_permille: u32,
    pub planted: PlantedBugs,
    /// After `steps`, the faults stop (the network heals, crashed nodes restart) and
    /// every group must commit a new proposal within this many ticks of simulated time
    /// (liveness, with groups asleep and woken); 0 skips it.
    pub heal_ticks: u64,
    /// Then nothing is proposed and nothing lost for this many ticks: every group must
    /// fall asleep on every replica; 0 skips it.
    pub idle_ticks: u64,
    /// The leaders' lease, in simulated time ([`DriverConfig::lease`]); 0: none. Ticks
    /// come every 7.5 to 12.5 units, so followers refuse votes for at least 67.5 units
    /// after hearing from a leader: a lease longer than that is unsafe.
    pub lease: u64,
}

/// The lease the simulation runs with by default: half of the nominal time followers
/// refuse votes ((election ticks - 1) x 10), as the server sets it.
pub const SIM_LEASE: u64 = 45;

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            nodes: 3,
            groups: 16,
            replicas: 3,
            steps: 20_000,
            loss_permille: 50,
            dup_permille: 20,
            crash_permille: 3,
            partition_permille: 2,
            pause_permille: 1,
            planted: PlantedBugs::default(),
            heal_ticks: 300,
            idle_ticks: 100,
            lease: SIM_LEASE,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimReport {
    pub steps: u64,
    /// Entries applied, summed over nodes.
    pub applied: u64,
    /// Distinct (group, term) leaders seen.
    pub leaders: u64,
    pub crashes: u64,
    /// Groups put to sleep and woken, summed over nodes.
    pub quiesced: u64,
    pub woken: u64,
    /// (group, replica) pairs asleep at the end of the idle phase.
    pub asleep_at_end: u64,
    /// Snapshots installed by followers that fell behind a compacted log.
    pub snapshots_installed: u64,
    /// Checks (after an event) that found a leader holding a lease, summed over groups.
    pub leases_seen: u64,
    /// Vote requests that restarted nodes held back.
    pub votes_held: u64,
    /// Leadership transfers started.
    pub transfers: u64,
    pub violation: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Tick(u64),
    Deliver {
        from: u64,
        to: u64,
        group: GroupId,
        msg_index: usize,
    },
    SyncDone {
        node: u64,
        epoch: u64,
    },
    Propose {
        node: u64,
        group: GroupId,
    },
    /// A linearizable read through ReadIndex (which renews the leader's lease).
    Read {
        node: u64,
        group: GroupId,
    },
    /// The group's leader on `node` (if it leads) hands leadership to `to`: its campaign
    /// is forced past the followers' refusal, so the leader must give up its lease.
    Transfer {
        node: u64,
        group: GroupId,
        to: u64,
    },
    Restart(u64),
    Ping {
        from: u64,
        to: u64,
    },
    Client,
}

struct SimNode {
    driver: Option<Driver<MemDisk>>,
    /// The disk of a crashed node.
    parked_disk: Option<MemDisk>,
    /// Bumped on every crash, so events for an earlier life are ignored.
    epoch: u64,
    /// Applied entries per group: index -> (term, data).
    applied: BTreeMap<GroupId, BTreeMap<u64, (u64, Vec<u8>)>>,
}

pub struct Sim {
    cfg: SimConfig,
    driver_cfg: DriverConfig,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    nodes: BTreeMap<u64, SimNode>,
    /// Messages in flight, by index (events refer to them).
    messages: Vec<Option<Message>>,
    /// Node sides of a partition (empty: none), a link failing one way (from, to), and
    /// until when.
    side: BTreeMap<u64, u8>,
    cut: Option<(u64, u64)>,
    partition_until: u64,
    /// Paused nodes, until when.
    paused: BTreeMap<u64, u64>,
    /// (group, term) -> leader.
    leaders: BTreeMap<(GroupId, u64), u64>,
    /// (group, index) -> (term, data) of entries known committed.
    committed: BTreeMap<(GroupId, u64), (u64, Vec<u8>)>,
    /// (group, index) -> (term, data) of applied entries, the first node's.
    applied: BTreeMap<(GroupId, u64), (u64, Vec<u8>)>,
    /// (node, group) -> committed index already folded into `committed`.
    checked_commit: BTreeMap<(u64, GroupId), u64>,
    report: SimReport,
    next_value: u64,
    /// Healing or idle: no new faults; `quiet_net`: no loss either.
    calm: bool,
    quiet_net: bool,
    /// Idle phase: no proposals.
    idle: bool,
    /// Heal phase: proposals go to each group's leader.
    to_leaders: bool,
}

const TICK: u64 = 10;
/// A node compacts a group's log once it applied this many entries past the log's start,
/// keeping the last `COMPACT_KEEP`.
const COMPACT_AFTER: u64 = 12;
const COMPACT_KEEP: u64 = 2;

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let mut groups: BTreeMap<GroupId, Vec<u64>> = BTreeMap::new();
        for g in 0..cfg.groups {
            let voters = (0..cfg.replicas.min(cfg.nodes))
                .map(|r| 1 + (u64::from(g) + r) % cfg.nodes)
                .collect::<BTreeSet<u64>>();
            groups.insert(g, voters.into_iter().collect());
        }
        let driver_cfg = DriverConfig {
            election_ticks: 10,
            heartbeat_ticks: 2,
            // raft-rs draws election timeouts from an unseeded generator: one value, and
            // the simulation jitters the ticks instead.
            min_election_ticks: 10,
            max_election_ticks: 11,
            lease: cfg.lease,
            vote_hold: cfg.lease > 0,
            ..DriverConfig::default()
        };
        let mut nodes = BTreeMap::new();
        for id in 1..=cfg.nodes {
            let mine: BTreeMap<GroupId, Vec<u64>> = groups
                .iter()
                .filter(|(_, v)| v.contains(&id))
                .map(|(g, v)| (*g, v.clone()))
                .collect();
            let driver = Driver::start(id, MemDisk::bootstrap(&mine), &driver_cfg, cfg.planted)
                .expect("a fresh driver starts");
            nodes.insert(
                id,
                SimNode {
                    driver: Some(driver),
                    parked_disk: None,
                    epoch: 0,
                    applied: BTreeMap::new(),
                },
            );
        }
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut sim = Sim {
            cfg,
            driver_cfg,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            messages: Vec::new(),
            side: BTreeMap::new(),
            cut: None,
            partition_until: 0,
            paused: BTreeMap::new(),
            leaders: BTreeMap::new(),
            committed: BTreeMap::new(),
            applied: BTreeMap::new(),
            checked_commit: BTreeMap::new(),
            report: SimReport::default(),
            next_value: 0,
            calm: false,
            quiet_net: false,
            idle: false,
            to_leaders: false,
        };
        let ids: Vec<u64> = sim.nodes.keys().copied().collect();
        for id in ids {
            let first = sim.rng.random_range(1..TICK);
            sim.schedule(first, Event::Tick(id));
        }
        sim.schedule(1, Event::Client);
        sim
    }

    fn schedule(&mut self, after: u64, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq, e)));
    }

    /// Whether a message from `a` reaches `b` now.
    fn connected(&self, a: u64, b: u64) -> bool {
        self.side.get(&a).copied().unwrap_or(0) == self.side.get(&b).copied().unwrap_or(0)
            && self.cut != Some((a, b))
    }

    /// The node an event is handled by, if it is one that a pause holds back.
    fn target(event: &Event) -> Option<u64> {
        match event {
            Event::Tick(id) | Event::Restart(id) => Some(*id),
            Event::Deliver { to, .. } | Event::Ping { to, .. } => Some(*to),
            Event::SyncDone { node, .. }
            | Event::Propose { node, .. }
            | Event::Read { node, .. }
            | Event::Transfer { node, .. } => Some(*node),
            Event::Client => None,
        }
    }

    /// Runs `cfg`; a panic inside raft-rs (its own assertions, e.g. a commit index past
    /// the end of a log that lost acknowledged entries) is reported as a violation.
    pub fn run_seed(cfg: SimConfig) -> SimReport {
        let seed = cfg.seed;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Sim::new(cfg).run())) {
            Ok(r) => r,
            Err(p) => {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                SimReport {
                    violation: Some(format!("seed {seed}: raft-rs panicked: {what}")),
                    ..SimReport::default()
                }
            }
        }
    }

    /// Runs until the configured steps or the first violation, then the heal and idle
    /// phases.
    pub fn run(mut self) -> SimReport {
        self.steps(self.cfg.steps, u64::MAX);
        if self.cfg.heal_ticks > 0 && self.report.violation.is_none() {
            self.heal();
        }
        if self.cfg.idle_ticks > 0 && self.report.violation.is_none() {
            self.idle = true;
            self.quiet_net = true;
            self.steps(u64::MAX, self.now + self.cfg.idle_ticks * TICK);
            let mut asleep = 0;
            let mut awake = Vec::new();
            for (id, n) in &self.nodes {
                let Some(d) = n.driver.as_ref() else { continue };
                for g in 0..self.cfg.groups {
                    if d.role(g).is_none() {
                        continue;
                    }
                    if d.is_quiet(g) {
                        asleep += 1;
                    } else {
                        awake.push((*id, g));
                    }
                }
            }
            self.report.asleep_at_end = asleep;
            if !awake.is_empty() && self.report.violation.is_none() {
                self.report.violation = Some(format!(
                    "seed {}: after {} idle ticks, (node, group) still awake: {awake:?}",
                    self.cfg.seed, self.cfg.idle_ticks
                ));
            }
        }
        for n in self.nodes.values() {
            if let Some(d) = n.driver.as_ref() {
                self.report.quiesced += d.stats().quiesced;
                self.report.woken += d.stats().woken;
            }
        }
        self.report.leaders = self.leaders.len() as u64;
        for n in self.nodes.values() {
            if let Some(d) = &n.driver {
                self.report.votes_held += d.stats().votes_held;
            }
        }
        self.report
    }

    /// Runs `n` more steps, or until simulated time `until`.
    fn steps(&mut self, n: u64, until: u64) {
        let end = self.report.steps.saturating_add(n);
        while self.report.steps < end && self.now < until && self.report.violation.is_none() {
            self.report.steps += 1;
            if !self.calm {
                self.maybe_fault();
            }
            let Some(Reverse((at, _, event))) = self.queue.pop() else {
                break;
            };
            self.now = at;
            // A paused node takes its events when it resumes, in order.
            if let Some(until) = Self::target(&event).and_then(|id| self.paused.get(&id).copied()) {
                if until > at {
                    self.seq += 1;
                    self.queue.push(Reverse((until, self.seq, event)));
                    continue;
                }
            }
            for n in self.nodes.values_mut() {
                if let Some(d) = n.driver.as_mut() {
                    d.set_time(at);
                }
            }
            let touched = self.handle(event);
            if let Some(id) = touched {
                self.turn(id);
            }
            // The log-matching scan reads whole logs: every 64 steps (a mismatch persists).
            let full = self.report.steps.is_multiple_of(64);
            if let Err(v) = self.check(full) {
                self.report.violation = Some(format!(
                    "seed {} step {} (time {}): {v}",
                    self.cfg.seed, self.report.steps, self.now
                ));
            }
        }
    }

    /// Faults stop: every group must then commit something new (an entry with data) in
    /// `heal_steps`.
    fn heal(&mut self) {
        self.calm = true;
        self.to_leaders = true;
        self.side.clear();
        self.cut = None;
        self.paused.clear();
        let down: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.driver.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in down {
            self.schedule(1, Event::Restart(id));
        }
        let mark: BTreeMap<GroupId, u64> = (0..self.cfg.groups)
            .map(|g| {
                let top = self
                    .committed
                    .range((g, 0)..(g + 1, 0))
                    .next_back()
                    .map_or(0, |((_, i), _)| *i);
                (g, top)
            })
            .collect();
        self.steps(u64::MAX, self.now + self.cfg.heal_ticks * TICK);
        if self.report.violation.is_some() {
            return;
        }
        let stuck: Vec<GroupId> = (0..self.cfg.groups)
            .filter(|g| {
                !self
                    .committed
                    .range((*g, mark[g] + 1)..(*g + 1, 0))
                    .any(|(_, (_, data))| !data.is_empty())
            })
            .collect();
        if !stuck.is_empty() {
            let views: Vec<String> = stuck
                .iter()
                .take(2)
                .map(|g| {
                    let per_node: Vec<String> = self
                        .nodes
                        .iter()
                        .filter_map(|(id, n)| {
                            let d = n.driver.as_ref()?;
                            let st = d.status(*g)?;
                            Some(format!(
                                "n{id}:{:?} t{} l{} c{} last{}{}",
                                st.role,
                                st.term,
                                st.leader,
                                st.commit,
                                st.last_index,
                                if d.is_quiet(*g) { " quiet" } else { "" }
                            ))
                        })
                        .collect();
                    format!("group {g}: {}", per_node.join(", "))
                })
                .collect();
            self.report.violation = Some(format!(
                "seed {}: liveness: groups {stuck:?} committed nothing new in {} ticks (time {}) after the faults stopped; {}",
                self.cfg.seed, self.cfg.heal_ticks, self.now, views.join("; ")
            ));
        }
    }

    fn maybe_fault(&mut self) {
        if self.rng.random_range(0..1000) < self.cfg.crash_permille {
            let down = self.nodes.values().filter(|n| n.driver.is_none()).count() as u64;
            if down < (self.cfg.nodes - 1) / 2 + 1 && down + 1 < self.cfg.nodes {
                let id = self.rng.random_range(1..=self.cfg.nodes);
                self.crash(id);
            }
        }
        // A split lasts 5 to 50 ticks of simulated time: long enough, often, for the side
        // with a majority to elect a leader while the old one is still on the other.
        if !self.side.is_empty() || self.cut.is_some() {
            if self.now >= self.partition_until {
                self.side.clear();
                self.cut = None;
            }
        } else if self.rng.random_range(0..1000) < self.cfg.partition_permille {
            if self.rng.random_range(0..2) == 0 {
                for id in 1..=self.cfg.nodes {
                    let s = self.rng.random_range(0..2u8);
                    self.side.insert(id, s);
                }
            } else {
                let from = self.rng.random_range(1..=self.cfg.nodes);
                let to = self.rng.random_range(1..=self.cfg.nodes);
                self.cut = (from != to).then_some((from, to));
            }
            self.partition_until = self.now + self.rng.random_range(5 * TICK..50 * TICK);
        }
        self.paused.retain(|_, until| *until > self.now);
        if self.paused.is_empty() && self.rng.random_range(0..1000) < self.cfg.pause_permille {
            let id = self.rng.random_range(1..=self.cfg.nodes);
            let until = self.now + self.rng.random_range(3 * TICK..30 * TICK);
            self.paused.insert(id, until);
        }
    }

    /// The clients: a proposal every few time units (not per step, so the load does not
    /// grow with the number of events), to a random node or, once healing, the leader.
    fn client(&mut self) {
        let delay = self.rng.random_range(1..5);
        self.schedule(delay, Event::Client);
        if !self.idle {
            let mut node = self.rng.random_range(1..=self.cfg.nodes);
            let group = self.rng.random_range(0..self.cfg.groups);
            if self.to_leaders || self.rng.random_range(0..2) == 0 {
                if let Some(l) = self.nodes.iter().find_map(|(id, n)| {
                    n.driver
                        .as_ref()
                        .and_then(|d| d.role(group))
                        .filter(|r| r.0 == StateRole::Leader)
                        .map(|_| *id)
                }) {
                    node = l;
                }
            }
            let delay = self.rng.random_range(0..TICK);
            if self.rng.random_range(0..40) == 0 {
                let to = self.rng.random_range(1..=self.cfg.nodes);
                self.schedule(delay, Event::Transfer { node, group, to });
            } else if self.rng.random_range(0..3) == 0 {
                self.schedule(delay, Event::Read { node, group });
            } else {
                self.schedule(delay, Event::Propose { node, group });
            }
        }
    }

    fn crash(&mut self, id: u64) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some(driver) = n.driver.take() else {
            return;
        };
        self.report.votes_held += driver.stats().votes_held;
        let mut disk = driver.disk().clone();
        disk.crash();
        n.parked_disk = Some(disk);
        n.epoch += 1;
        n.applied.clear();
        self.checked_commit.retain(|(node, _), _| *node != id);
        self.report.crashes += 1;
        // Some restart at once (within a lease), most after a while.
        let after = if self.rng.random_range(0..4) == 0 {
            self.rng.random_range(1..3 * TICK)
        } else {
            self.rng.random_range(5 * TICK..40 * TICK)
        };
        self.schedule(after, Event::Restart(id));
    }

    /// Handles one event; returns the node whose driver should run a turn.
    fn handle(&mut self, event: Event) -> Option<u64> {
        match event {
            Event::Tick(id) => {
                let jitter = self.rng.random_range(0..=TICK / 2);
                self.schedule(TICK - TICK / 4 + jitter, Event::Tick(id));
                let d = self.nodes.get_mut(&id)?.driver.as_mut()?;
                d.tick();
                Some(id)
            }
            Event::Deliver {
                from,
                to,
                group,
                msg_index,
            } => {
                let msg = self.messages.get_mut(msg_index)?.take()?;
                if !self.connected(from, to) {
                    return None;
                }
                let d = self.nodes.get_mut(&to)?.driver.as_mut()?;
                d.heard_from(from);
                d.step(group, msg);
                Some(to)
            }
            Event::SyncDone { node, epoch } => {
                let n = self.nodes.get_mut(&node)?;
                if n.epoch != epoch {
                    return None;
                }
                let d = n.driver.as_mut()?;
                let id = d.disk_mut().complete_sync()?;
                d.on_synced(id);
                Some(node)
            }
            Event::Propose { node, group } => {
                self.next_value += 1;
                let value = self.next_value.to_be_bytes().to_vec();
                let d = self.nodes.get_mut(&node)?.driver.as_mut()?;
                let _ = d.propose(group, value);
                Some(node)
            }
            Event::Transfer { node, group, to } => {
                let d = self.nodes.get_mut(&node)?.driver.as_mut()?;
                if d.transfer_leader(group, to) {
                    self.report.transfers += 1;
                }
                Some(node)
            }
            Event::Read { node, group } => {
                self.next_value += 1;
                let ctx = self.next_value.to_be_bytes().to_vec();
                let d = self.nodes.get_mut(&node)?.driver.as_mut()?;
                let _ = d.read_index(group, ctx);
                Some(node)
            }
            Event::Client => {
                self.client();
                None
            }
            Event::Ping { from, to } => {
                if !self.connected(from, to) {
                    return None;
                }
                let d = self.nodes.get_mut(&to)?.driver.as_mut()?;
                d.heard_from(from);
                None
            }
            Event::Restart(id) => {
                let n = self.nodes.get_mut(&id)?;
                let disk = n.parked_disk.take()?;
                // The state machine comes back from the snapshot on disk; the log after it
                // is applied again as raft-rs hands it out.
                let mut applied = BTreeMap::new();
                for (g, st) in disk.load() {
                    if st.snapshot_index == 0 {
                        continue;
                    }
                    let image: Vec<(u64, u64, Vec<u8>)> =
                        postcard::from_bytes(&st.snapshot_data).unwrap_or_default();
                    n.applied
                        .insert(g, image.into_iter().map(|(i, t, d)| (i, (t, d))).collect());
                    applied.insert(g, st.snapshot_index);
                }
                match Driver::start_applied(id, disk, &self.driver_cfg, self.cfg.planted, &applied)
                {
                    Ok(d) => {
                        n.driver = Some(d);
                        Some(id)
                    }
                    Err(e) => {
                        self.report.violation = Some(format!(
                            "seed {}: node {id} cannot restart from its disk: {e}",
                            self.cfg.seed
                        ));
                        None
                    }
                }
            }
        }
    }

    /// Runs `id`'s driver, routes what it sends, schedules its syncs, applies what it
    /// committed.
    fn turn(&mut self, id: u64) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        let epoch = n.epoch;
        let Some(d) = n.driver.as_mut() else { return };
        let syncs_before = d.stats().syncs;
        d.run();
        let requested = d.stats().syncs - syncs_before;
        let out = d.take_outbox();
        let pings = d.take_pings();
        let restored = d.take_restored();
        let committed = d.take_committed();
        // Reads are not served here; what matters is the lease they renew.
        d.take_read_states();
        // Each sync requested completes after a while (in order: each completion event
        // completes the oldest).
        for _ in 0..requested {
            let delay = self.rng.random_range(1..8);
            self.schedule(delay, Event::SyncDone { node: id, epoch });
        }
        // A snapshot from the leader: this node's state machine becomes its image, which
        // must agree with what every node applied.
        for r in restored {
            let image: Vec<(u64, u64, Vec<u8>)> = match postcard::from_bytes(&r.data) {
                Ok(i) => i,
                Err(e) => {
                    self.report.violation = Some(format!(
                        "seed {}: node {id} got an unreadable snapshot of group {}: {e}",
                        self.cfg.seed, r.group
                    ));
                    return;
                }
            };
            if let Err(v) = self.agree(id, r.group, &image) {
                self.report.violation = Some(v);
                return;
            }
            self.report.snapshots_installed += 1;
            let n = self.nodes.get_mut(&id).expect("node exists");
            n.applied.insert(
                r.group,
                image.into_iter().map(|(i, t, d)| (i, (t, d))).collect(),
            );
        }
        let mut applied_to: BTreeMap<GroupId, u64> = BTreeMap::new();
        for c in committed {
            let (index, term) = (c.entry.index, c.entry.term);
            let data = c.entry.data.to_vec();
            let n = self.nodes.get_mut(&id).expect("node exists");
            let log = n.applied.entry(c.group).or_default();
            // Each node applies every index once, in order.
            let prev = log.keys().next_back().copied().unwrap_or(0);
            if index != prev + 1 {
                self.report.violation = Some(format!(
                    "seed {}: node {id} applied index {index} of group {} after {prev}",
                    self.cfg.seed, c.group
                ));
                return;
            }
            log.insert(index, (term, data.clone()));
            self.report.applied += 1;
            match self.applied.get(&(c.group, index)) {
                Some(first) if *first != (term, data.clone()) => {
                    self.report.violation = Some(format!(
                        "seed {}: state machine safety: node {id} applied {:?} at index {index} of group {}, another node applied {:?}",
                        self.cfg.seed,
                        (term, &data),
                        c.group,
                        first
                    ));
                }
                Some(_) => {}
                None => {
                    self.applied.insert((c.group, index), (term, data));
                }
            }
            applied_to.insert(c.group, index);
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(d) = n.driver.as_mut() {
                for (g, i) in applied_to {
                    d.applied(g, i);
                    // Keep logs short, so that followers that fall behind need snapshots.
                    let first = d.log(g).map_or(1, |(l, _)| l.first_index());
                    if i >= first + COMPACT_AFTER {
                        let upto = i - COMPACT_KEEP;
                        let image: Vec<(u64, u64, Vec<u8>)> = n
                            .applied
                            .get(&g)
                            .map(|m| {
                                m.range(..=upto)
                                    .map(|(i, (t, d))| (*i, *t, d.clone()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let data = postcard::to_stdvec(&image).unwrap_or_default();
                        if let Err(e) = d.compact(g, upto, data) {
                            self.report.violation =
                                Some(format!("seed {}: node {id}: {e}", self.cfg.seed));
                            return;
                        }
                    }
                }
            }
        }
        let loss = if self.quiet_net {
            0
        } else {
            self.cfg.loss_permille
        };
        for to in pings {
            if self.rng.random_range(0..1000) < loss {
                continue;
            }
            let delay = self.rng.random_range(1..6);
            self.schedule(delay, Event::Ping { from: id, to });
        }
        for o in out {
            if self.rng.random_range(0..1000) < loss {
                continue;
            }
            let copies =
                if !self.quiet_net && self.rng.random_range(0..1000) < self.cfg.dup_permille {
                    2
                } else {
                    1
                };
            for _ in 0..copies {
                self.messages.push(Some(o.message.clone()));
                let msg_index = self.messages.len() - 1;
                let delay = self.rng.random_range(1..6);
                self.schedule(
                    delay,
                    Event::Deliver {
                        from: id,
                        to: o.to,
                        group: o.group,
                        msg_index,
                    },
                );
            }
        }
    }

    /// State machine safety for an image: every entry in it agrees with what any node
    /// applied at that index.
    fn agree(
        &mut self,
        id: u64,
        group: GroupId,
        image: &[(u64, u64, Vec<u8>)],
    ) -> Result<(), String> {
        for (index, term, data) in image {
            match self.applied.get(&(group, *index)) {
                Some(known) if *known != (*term, data.clone()) => {
                    return Err(format!(
                        "seed {}: state machine safety: node {id} installed a snapshot of group {group} with index {index} = term {term}, another node applied term {}",
                        self.cfg.seed, known.0
                    ))
                }
                Some(_) => {}
                None => {
                    self.applied.insert((group, *index), (*term, data.clone()));
                }
            }
        }
        Ok(())
    }

    /// Checks the safety properties over every live node.
    fn check(&mut self, full: bool) -> Result<(), String> {
        let live: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.driver.is_some())
            .map(|(id, _)| *id)
            .collect();
        for g in 0..self.cfg.groups {
            let mut logs = Vec::new();
            for id in &live {
                let d = self.nodes[id].driver.as_ref().expect("live");
                let Some((role, term, _)) = d.role(g) else {
                    continue;
                };
                let Some((log, commit)) = d.log(g) else {
                    continue;
                };
                // Election safety.
                if role == StateRole::Leader {
                    match self.leaders.get(&(g, term)) {
                        Some(other) if other != id => {
                            return Err(format!(
                                "election safety: nodes {other} and {id} both led group {g} in term {term}"
                            ))
                        }
                        Some(_) => {}
                        None => {
                            self.leaders.insert((g, term), *id);
                            // Leader completeness: every entry committed so far is in its log.
                            for ((cg, index), (cterm, data)) in self.committed.range((g, 0)..(g + 1, 0)) {
                                debug_assert_eq!(*cg, g);
                                match log.entry(*index) {
                                    Some(e) if e.term == *cterm && e.data.as_ref() == data.as_slice() => {}
                                    _ if *index <= log.snapshot_index => {}
                                    other => {
                                        return Err(format!(
                                            "leader completeness: node {id}, new leader of group {g} in term {term}, lacks committed entry {index} (term {cterm}); it has {:?}",
                                            other.map(|e| e.term)
                                        ))
                                    }
                                }
                            }
                        }
                    }
                }
                // What this node knows committed joins the committed set.
                let from = self
                    .checked_commit
                    .get(&(*id, g))
                    .map_or(log.first_index(), |c| c + 1)
                    .max(log.first_index());
                let upto = commit.min(log.last_index());
                if upto >= from {
                    self.checked_commit.insert((*id, g), upto);
                }
                for index in from..=upto {
                    if let Some(e) = log.entry(index) {
                        let v = (e.term, e.data.to_vec());
                        match self.committed.get(&(g, index)) {
                            Some(known) if *known != v => {
                                return Err(format!(
                                    "committed entries differ: group {g} index {index}: node {id} holds term {} committed, another term {}",
                                    v.0, known.0
                                ))
                            }
                            Some(_) => {}
                            None => {
                                self.committed.insert((g, index), v);
                            }
                        }
                    }
                }
                if full {
                    logs.push((*id, log));
                }
            }
            // Lease safety: while a leader's lease holds, no later term has a leader or a
            // committed entry (a lease read would miss its writes).
            for id in &live {
                let d = self.nodes[id].driver.as_ref().expect("live");
                let (Some(lease), Some((_, term, _))) = (d.lease_read(g), d.role(g)) else {
                    continue;
                };
                self.report.leases_seen += 1;
                if let Some(((_, later), other)) =
                    self.leaders.range((g, term + 1)..(g + 1, 0)).next()
                {
                    return Err(format!(
                        "lease safety: node {id} leads group {g} in term {term} with a lease until {} (now {}), while node {other} was elected in term {later}",
                        lease.until, self.now
                    ));
                }
                if let Some(((_, index), (t, _))) = self
                    .committed
                    .range((g, lease.index + 1)..(g + 1, 0))
                    .find(|(_, (t, _))| *t > term)
                {
                    return Err(format!(
                        "lease safety: node {id} holds a lease of group {g} in term {term} until {} (now {}), while entry {index} of term {t} is committed",
                        lease.until, self.now
                    ));
                }
            }
            // Log matching.
            for (i, (a_id, a)) in logs.iter().enumerate() {
                for (b_id, b) in &logs[i + 1..] {
                    let last = a.last_index().min(b.last_index());
                    let first = a.first_index().max(b.first_index());
                    // The highest index where both agree on the term...
                    let mut agree = None;
                    for index in (first..=last).rev() {
                        if a.entry(index).map(|e| e.term) == b.entry(index).map(|e| e.term) {
                            agree = Some(index);
                            break;
                        }
                    }
                    // ...must have every entry up to it identical.
                    if let Some(top) = agree {
                        for index in first..=top {
                            let (x, y) = (a.entry(index), b.entry(index));
                            if x.map(|e| (e.term, e.data.to_vec()))
                                != y.map(|e| (e.term, e.data.to_vec()))
                            {
                                return Err(format!(
                                    "log matching: group {g}: nodes {a_id} and {b_id} agree at index {top} but differ at {index}"
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
