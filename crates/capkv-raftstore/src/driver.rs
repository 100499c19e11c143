//! The node-level driver: one loop over every group's raft-rs `RawNode`.
//!
//! A turn ([`Driver::run`]) takes every group that has a `Ready` and
//! - sends at once the messages raft-rs allows before persistence (a leader's appends:
//!   Raft thesis 10.2.1),
//! - writes every group's new entries and hard state into **one** [`WriteBatch`] and asks
//!   the disk for **one** sync,
//! - holds back the messages that must wait for persistence (votes, a follower's append
//!   acknowledgements) until that sync completes ([`Driver::on_synced`]),
//! - hands committed entries, which raft-rs releases only once persisted locally, to the
//!   caller's state machine.
//!
//! Nothing here reads a clock, a socket or a file: ticks, inbound messages, sync
//! completions and the disk come from the caller, which is what lets one thread simulate
//! many nodes from a seed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use raft::eraftpb::{Entry, Message, MessageType};
use raft::{Config, RawNode, StateRole};

use crate::storage::{
    Disk, GroupId, GroupStorage, GroupWrite, LogState, SnapshotRecord, WriteBatch,
};

/// Raft settings of every group on a node.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Randomized election timeout range, in ticks: `[min, max)`. The simulation sets a
    /// single value and jitters the ticks themselves (raft-rs draws the timeout from an
    /// unseeded generator).
    pub min_election_ticks: usize,
    pub max_election_ticks: usize,
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
    /// A leader whose group has been idle (everything committed, applied and replicated
    /// to every follower, nothing pending) this many ticks puts it to sleep; 0: never.
    pub quiesce_after_ticks: usize,
    /// How long a leader trusts a quorum's acknowledgement for lease reads, in the units
    /// of the caller's clock ([`Driver::set_time`]); 0: no lease reads. Safe only while it is less than the time followers refuse votes
    /// after hearing from a leader, `election_ticks - 1` ticks, by the margin clock rates
    /// need (see [`Driver::lease_read`]).
    pub lease: u64,
    /// A node restarting with a term refuses votes for an election timeout (see
    /// [`Driver::step`]). Needed wherever any node of the cluster serves lease reads, not
    /// only this one: the leader whose lease counted on this node's refusal is elsewhere.
    pub vote_hold: bool,
    /// The caller tells when a snapshot it was handed reached its follower, or failed
    /// ([`Driver::report_snapshot`]), as when it streams the state machine separately;
    /// false: a snapshot sent counts as delivered (its data is in the message).
    pub caller_reports_snapshots: bool,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            election_ticks: 10,
            heartbeat_ticks: 2,
            min_election_ticks: 10,
            max_election_ticks: 20,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            quiesce_after_ticks: 6,
            lease: 0,
            vote_hold: false,
            caller_reports_snapshots: false,
        }
    }
}

/// Bugs the driver can be built with on purpose, to show the simulation catches them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// Grant votes (send the vote response) before the vote is durable.
    pub vote_before_persist: bool,
}

/// A committed entry handed to the state machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub group: GroupId,
    pub entry: Entry,
}

struct Group {
    node: RawNode<GroupStorage>,
    storage: GroupStorage,
    /// Asleep: not ticked, sends nothing, until something wakes it (see `tick`).
    quiet: bool,
    /// Ticks the leader has seen the group idle.
    idle_ticks: usize,
    /// The other voters (for liveness wake-ups and quiesce messages).
    peers: Vec<u64>,
    lease: Lease,
    /// Restarted with a term: refuses votes for the first election timeout (see
    /// [`Driver::step`]).
    hold_votes: bool,
}

/// A leader's lease on its group: what was sent when, and what a quorum acknowledged.
///
/// A follower that accepts a leader's append or heartbeat resets its election timer and,
/// with raft-rs's `check_quorum`, ignores vote and pre-vote requests of later terms until
/// `election_ticks` of its ticks have passed (a transfer's forced campaign aside). So once a
/// quorum acknowledged something this leader sent at time `at` (an entry it proposed then
/// committed, a ReadIndex heartbeat it confirmed), no other leader can be elected before
/// `at` plus those ticks, and the leader reads locally until `at + lease`.
#[derive(Default)]
struct Lease {
    term: u64,
    /// Exclusive, in the caller's clock.
    until: u64,
    /// A leadership transfer started in this term: the transferee's campaign is forced
    /// through the followers' refusal, so no lease in this term any more.
    barred_term: u64,
    /// This term's leader has applied its first entry of the term (and so every write of
    /// earlier terms): lease reads may start.
    ready_term: u64,
    /// The leader's last index when it was first seen leading in `seen_term`: at or past
    /// its first entry of that term.
    seen_term: u64,
    seen_last: u64,
    /// Entries proposed in this term and not yet committed: (index, term, time sent).
    proposed: VecDeque<(u64, u64, u64)>,
    /// ReadIndex requests not yet confirmed: (context, term, time asked).
    reads: VecDeque<(Vec<u8>, u64, u64)>,
}

/// At most this many proposals and reads are remembered per group for renewing its lease
/// (the oldest are forgotten: a renewal missed, never an unsafe one).
const LEASE_PENDING_MAX: usize = 4096;

/// A lease read the leader may serve now: from its state machine once it has applied
/// `index` (the commit index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRead {
    pub index: u64,
    /// When the lease ends, in the caller's clock.
    pub until: u64,
}

/// The context of the heartbeat a leader sends to put a follower's group to sleep. Its
/// response carries the same context and does not wake the leader.
pub const QUIESCE_CONTEXT: &[u8] = b"capkv:quiesce";

/// Node-level liveness of one peer: ticks since anything arrived from it.
#[derive(Debug, Clone, Copy, Default)]
struct PeerLiveness {
    silent_ticks: usize,
    down: bool,
}

/// Whether a peer may send `m`: raft-rs's local-only messages (which capkv never sends
/// between nodes) are refused, and so are ReadIndex messages without the one entry
/// raft-rs reads from them unchecked (it would panic on network input).
fn from_peer_ok(m: &Message) -> bool {
    match m.msg_type {
        MessageType::MsgHup
        | MessageType::MsgBeat
        | MessageType::MsgPropose
        | MessageType::MsgUnreachable
        | MessageType::MsgSnapStatus
        | MessageType::MsgCheckQuorum => false,
        MessageType::MsgReadIndex | MessageType::MsgReadIndexResp => m.entries.len() == 1,
        _ => true,
    }
}

/// A leader hands its group to a replica at most this many entries behind.
pub const TRANSFER_LAG_MAX: u64 = 64;

/// A group as one node sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStatus {
    pub role: StateRole,
    pub term: u64,
    /// 0: none known.
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    /// The log holds entries after this index (its last compaction).
    pub log_start: u64,
    /// Asleep (quiesced) on this node.
    pub quiet: bool,
    /// This leader may serve lease reads until then (the caller's clock, see
    /// [`Driver::lease_read`]); 0: no lease.
    pub lease_until: u64,
}

/// A confirmed ReadIndex: once `group` has applied `index`, a read that asked with
/// `context` may be served from the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReady {
    pub group: GroupId,
    pub index: u64,
    pub context: Vec<u8>,
}

/// A snapshot installed from the leader: the caller's state machine must become `data`
/// (the image at `index`) before it applies anything after `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub group: GroupId,
    pub index: u64,
    pub data: Vec<u8>,
}

/// Where a leader may compact its log (see [`Driver::compaction_point`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPoint {
    /// The log holds entries after this index.
    pub start: u64,
    /// Every voter holds the log up to here.
    pub all_hold: u64,
    /// Every voter not far behind holds the log up to here.
    pub near_hold: u64,
}

/// A message for a peer, tagged with its group.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub to: u64,
    pub group: GroupId,
    pub message: Message,
}

/// Why a proposal was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("no such group {0}")]
    NoGroup(GroupId),
    #[error("not the leader of group {group} (leader: {leader:?})")]
    NotLeader { group: GroupId, leader: Option<u64> },
    /// The proposal's entry was replaced by another leader's: it was not applied and
    /// never will be (safe to retry).
    #[error("the proposal was dropped by a leader change; it was not applied")]
    Dropped,
    /// The node stopped (or skipped the entry by a snapshot) before learning the
    /// outcome: the proposal may or may not have been applied.
    #[error("the outcome of the proposal is unknown")]
    Stopped,
    /// A read's leadership confirmation did not come in time (leadership lost, or the
    /// leader has not committed in its term yet): retry, perhaps elsewhere.
    #[error("the read could not be confirmed by a quorum in time")]
    ReadTimedOut,
    /// The disk failed; the node acknowledges nothing until it restarts.
    #[error("storage failed: {0}")]
    Poisoned(String),
}

/// A sync requested and not completed: its id, the readies it makes durable (group, ready
/// number), and the messages that wait for it.
type PendingSync = (u64, Vec<PendingReady>, Vec<Outgoing>);

/// A ready waiting for its sync: group, ready number, and the index of the snapshot it
/// installs (the state machine then counts as applied up to it).
type PendingReady = (GroupId, u64, Option<u64>);

pub struct Driver<D: Disk> {
    id: u64,
    groups: BTreeMap<GroupId, Group>,
    disk: D,
    /// Messages to send now, drained by the caller.
    outbox: Vec<Outgoing>,
    /// Syncs requested and not completed, in order.
    in_flight: VecDeque<PendingSync>,
    next_sync: u64,
    committed: Vec<Committed>,
    planted: PlantedBugs,
    /// Set by the first disk failure: from then on the driver does nothing (no message,
    /// no acknowledgement, no apply), since what it wrote may not be on disk.
    poisoned: Option<String>,
    /// Groups that had a ready since [`Driver::take_touched`] last ran.
    touched: Vec<GroupId>,
    /// Groups that may have a ready (stepped, ticked, proposed to, persisted, applied):
    /// a turn looks at these only, so idle groups cost nothing per turn.
    dirty: BTreeSet<GroupId>,
    liveness: BTreeMap<u64, PeerLiveness>,
    pings: Vec<u64>,
    read_states: Vec<ReadReady>,
    /// Snapshots installed this turn, for the caller's state machine.
    restored: Vec<Restored>,
    /// Log compactions asked for since the last turn, written with its batch.
    compactions: BTreeMap<GroupId, SnapshotRecord>,
    ticks: u64,
    /// The caller's clock (see [`Driver::set_time`]).
    now: u64,
    config: DriverConfig,
    stats: DriverStats,
    logger: slog::Logger,
}

/// Counters of the driver, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DriverStats {
    /// Groups put to sleep / woken, in total.
    pub quiesced: u64,
    pub woken: u64,
    /// Disk writes and syncs requested.
    pub writes: u64,
    pub syncs: u64,
    /// Entries written to the log.
    pub entries_written: u64,
    /// Vote and pre-vote requests ignored while restarting (see [`Driver::step`]).
    pub votes_held: u64,
    /// Messages from peers dropped as malformed or local-only (see [`Driver::step`]).
    pub malformed: u64,
}

fn raft_config(id: u64, c: &DriverConfig, applied: u64) -> Config {
    Config {
        id,
        election_tick: c.election_ticks,
        heartbeat_tick: c.heartbeat_ticks,
        min_election_tick: c.min_election_ticks,
        max_election_tick: c.max_election_ticks,
        max_size_per_msg: c.max_size_per_msg,
        max_inflight_msgs: c.max_inflight_msgs,
        applied,
        // Bounds what one turn applies (and the state machine's batch for it) when a
        // replica catches up on a long log.
        max_committed_size_per_ready: 16 << 20,
        pre_vote: true,
        check_quorum: true,
        ..Default::default()
    }
}

impl<D: Disk> Driver<D> {
    /// Starts node `id` on `disk`, with every group the disk holds (recovered from what
    /// is durable). Committed entries are handed out again from the start of each log:
    /// the state machine is the caller's and must be rebuilt (it is not persisted here).
    pub fn start(
        id: u64,
        disk: D,
        config: &DriverConfig,
        planted: PlantedBugs,
    ) -> Result<Self, raft::Error> {
        Self::start_applied(id, disk, config, planted, &BTreeMap::new())
    }

    /// Like [`Driver::start`], for a state machine that kept its own state: committed
    /// entries of each group are handed out from after `applied[group]` (0 if absent).
    /// An applied index past the durable commit index (the state machine's write reached
    /// the disk, the hard state that preceded it in the journal did too, but raft-rs
    /// had not yet written the later commit) raises the commit: those entries were
    /// committed, or they could not have been applied.
    pub fn start_applied(
        id: u64,
        disk: D,
        config: &DriverConfig,
        planted: PlantedBugs,
        applied: &BTreeMap<GroupId, u64>,
    ) -> Result<Self, raft::Error> {
        let logger = slog::Logger::root(crate::log::TracingDrain, slog::o!());
        let mut groups = BTreeMap::new();
        let mut liveness = BTreeMap::new();
        let mut dirty = BTreeSet::new();
        for (gid, mut state) in disk.load() {
            let applied = applied.get(&gid).copied().unwrap_or(0);
            if applied > state.last_index() {
                return Err(raft::Error::Store(raft::StorageError::Other(
                    format!(
                        "group {gid}: state machine applied {applied}, past the log's end {}",
                        state.last_index()
                    )
                    .into(),
                )));
            }
            if applied < state.snapshot_index {
                // The log before its start is gone; only the state machine held it.
                return Err(raft::Error::Store(raft::StorageError::Other(
                    format!(
                        "group {gid}: state machine applied {applied}, before the log's start {}: \
                         the entries between are gone",
                        state.snapshot_index + 1
                    )
                    .into(),
                )));
            }
            if applied > state.hard_state.commit {
                state.hard_state.commit = applied;
            }
            let peers: Vec<u64> = state
                .conf_state
                .voters
                .iter()
                .chain(state.conf_state.learners.iter())
                .copied()
                .filter(|p| *p != id)
                .collect();
            for p in &peers {
                liveness.entry(*p).or_insert_with(PeerLiveness::default);
            }
            // This node may have acknowledged a leader of that term shortly before it
            // stopped, and forgot when: it holds its vote for an election timeout.
            let hold_votes = config.vote_hold && state.hard_state.term > 0;
            let storage = GroupStorage::new(state);
            let node = RawNode::new(&raft_config(id, config, applied), storage.clone(), &logger)?;
            dirty.insert(gid);
            groups.insert(
                gid,
                Group {
                    node,
                    storage,
                    quiet: false,
                    idle_ticks: 0,
                    peers,
                    lease: Lease::default(),
                    hold_votes,
                },
            );
        }
        Ok(Driver {
            id,
            groups,
            disk,
            outbox: Vec::new(),
            in_flight: VecDeque::new(),
            next_sync: 1,
            committed: Vec::new(),
            planted,
            poisoned: None,
            touched: Vec::new(),
            dirty,
            liveness,
            pings: Vec::new(),
            read_states: Vec::new(),
            restored: Vec::new(),
            compactions: BTreeMap::new(),
            ticks: 0,
            now: 0,
            config: config.clone(),
            stats: DriverStats::default(),
            logger,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn disk(&self) -> &D {
        &self.disk
    }

    pub fn disk_mut(&mut self) -> &mut D {
        &mut self.disk
    }

    pub fn groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups.keys().copied()
    }

    /// One tick of the logical clock for every group.
    /// One tick of the logical clock: every awake group ticks, leaders of idle groups put
    /// them to sleep, and peers silent for an election timeout count as down, which
    /// wakes every group they share with this node.
    pub fn tick(&mut self) {
        // A stopped driver falls silent, pings included, so that its peers count it down
        // and elect other leaders for the groups it led (asleep or not).
        if self.poisoned.is_some() {
            return;
        }
        self.ticks += 1;
        if self
            .ticks
            .is_multiple_of(self.config.heartbeat_ticks.max(1) as u64)
        {
            self.pings = self.liveness.keys().copied().collect();
        }
        let election = self.config.election_ticks;
        let mut newly_down = Vec::new();
        for (p, l) in self.liveness.iter_mut() {
            l.silent_ticks += 1;
            if l.silent_ticks >= election && !l.down {
                l.down = true;
                newly_down.push(*p);
            }
        }
        for p in newly_down {
            self.wake_groups_of(p);
        }
        let any_down = self.liveness.values().any(|l| l.down);
        let quiesce_after = self.config.quiesce_after_ticks;
        for (&gid, g) in self.groups.iter_mut() {
            if g.quiet {
                continue;
            }
            // Idle is judged before the tick: a tick makes heartbeats (a ready) even in a
            // group with nothing to do.
            let idle = quiesce_after > 0
                && idle_leader(&g.node)
                && (!any_down
                    || g.peers
                        .iter()
                        .all(|p| self.liveness.get(p).is_none_or(|l| !l.down)));
            if idle {
                g.idle_ticks += 1;
            } else {
                g.idle_ticks = 0;
            }
            if quiesce_after == 0 || g.idle_ticks < quiesce_after {
                g.node.tick();
                self.dirty.insert(gid);
            } else {
                // Instead of this tick (whose heartbeat could overtake the quiesce
                // message and wake the follower again):
                // Tell every follower to sleep (a heartbeat it answers as usual), then
                // sleep. A follower that misses it times out, campaigns, and its pre-vote
                // wakes the group: no harm, just a wake-up.
                let r = &g.node.raft;
                for &p in &g.peers {
                    let matched = r.prs().get(p).map_or(0, |pr| pr.matched);
                    let mut m = Message::default();
                    m.set_msg_type(MessageType::MsgHeartbeat);
                    m.to = p;
                    m.from = self.id;
                    m.term = r.term;
                    m.commit = matched.min(r.raft_log.committed);
                    m.context = QUIESCE_CONTEXT.to_vec().into();
                    self.outbox.push(Outgoing {
                        to: p,
                        group: gid,
                        message: m,
                    });
                }
                g.quiet = true;
                g.idle_ticks = 0;
                self.stats.quiesced += 1;
                self.touched.push(gid);
            }
        }
    }

    /// Anything arrived from `peer` (a message of any group, or the node-level ping).
    pub fn heard_from(&mut self, peer: u64) {
        if let Some(l) = self.liveness.get_mut(&peer) {
            l.silent_ticks = 0;
            l.down = false;
        }
    }

    /// Peers to ping now (node-level liveness: once per heartbeat interval, whether or not
    /// any group has something to say to them). Drained.
    pub fn take_pings(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pings)
    }

    /// Whether this node counts `peer` as down.
    pub fn peer_down(&self, peer: u64) -> bool {
        self.liveness.get(&peer).is_some_and(|l| l.down)
    }

    fn wake_groups_of(&mut self, peer: u64) {
        for (&gid, g) in self.groups.iter_mut() {
            if g.quiet && g.peers.contains(&peer) {
                g.quiet = false;
                g.idle_ticks = 0;
                self.stats.woken += 1;
                self.dirty.insert(gid);
                self.touched.push(gid);
            }
        }
    }

    fn wake(&mut self, group: GroupId) {
        if let Some(g) = self.groups.get_mut(&group) {
            if g.quiet {
                g.quiet = false;
                self.stats.woken += 1;
                self.touched.push(group);
            }
            g.idle_ticks = 0;
        }
    }

    /// Ticks left of the vote hold after this node's restart (see [`Driver::step`]); 0 if
    /// it ended or none of its groups holds.
    pub fn vote_hold_ticks(&self) -> u64 {
        let e = self.config.election_ticks as u64;
        if self.ticks >= e || !self.groups.values().any(|g| g.hold_votes) {
            return 0;
        }
        e - self.ticks
    }

    /// Whether `group` is asleep here.
    pub fn is_quiet(&self, group: GroupId) -> bool {
        self.groups.get(&group).is_some_and(|g| g.quiet)
    }

    /// Groups asleep here.
    pub fn quiet_count(&self) -> usize {
        self.groups.values().filter(|g| g.quiet).count()
    }

    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// A message from a peer. Messages for unknown groups are dropped.
    ///
    /// Any message wakes a sleeping group, except the two halves of putting it to sleep:
    /// the leader's quiesce heartbeat (which puts this follower to sleep if it is fully
    /// caught up with that leader) and the follower's answer to it.
    pub fn step(&mut self, group: GroupId, message: Message) {
        if !from_peer_ok(&message) {
            self.stats.malformed += 1;
            return;
        }
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        // A node that restarted may have acknowledged a leader just before, promising (by
        // resetting its election timer) to vote for no one else for an election timeout;
        // that timer is gone, so it refuses votes of later terms for one timeout from its
        // start. A transfer's forced campaign passes: its leader gave up its lease.
        if g.hold_votes {
            if self.ticks >= self.config.election_ticks as u64 {
                g.hold_votes = false;
            } else if matches!(
                message.msg_type,
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
            ) && message.term > g.node.raft.term
                && message.context.as_ref() != raft::CAMPAIGN_TRANSFER
            {
                self.stats.votes_held += 1;
                return;
            }
        }
        // capkv never asks a leader to hand over by message (transfers start locally, where
        // the lease is given up first); raft-rs would take one from any peer.
        if message.msg_type == MessageType::MsgTransferLeader {
            return;
        }
        let quiesce = message.context.as_ref() == QUIESCE_CONTEXT;
        let is_hb = message.msg_type == MessageType::MsgHeartbeat;
        let from = message.from;
        let term = message.term;
        // Heartbeats (and their answers) that say nothing new do not wake a sleeping
        // group: ones sent just before the leader fell asleep can arrive after its quiesce
        // message.
        let idle_chatter = g.quiet && {
            let r = &g.node.raft;
            let last = r.raft_log.last_index();
            r.term == term
                && match message.msg_type {
                    MessageType::MsgHeartbeat => {
                        r.state == StateRole::Follower
                            && r.leader_id == from
                            && message.commit <= r.raft_log.committed
                            && r.raft_log.committed == last
                    }
                    MessageType::MsgHeartbeatResponse => {
                        r.state == StateRole::Leader
                            && message.context.is_empty()
                            && r.prs().get(from).is_some_and(|p| p.matched == last)
                    }
                    _ => false,
                }
        };
        if !quiesce && !idle_chatter && g.quiet {
            g.quiet = false;
            g.idle_ticks = 0;
            self.stats.woken += 1;
            self.touched.push(group);
        }
        // An error here is a message raft-rs refuses (e.g. from a removed peer).
        let _ = g.node.step(message);
        self.dirty.insert(group);
        if quiesce && is_hb {
            let r = &g.node.raft;
            let caught_up = r.state == StateRole::Follower
                && r.term == term
                && r.leader_id == from
                && r.raft_log.committed == r.raft_log.last_index()
                && r.raft_log.persisted == r.raft_log.last_index();
            if caught_up && !g.quiet {
                g.quiet = true;
                self.stats.quiesced += 1;
                self.touched.push(group);
            }
        }
    }

    /// `group`, woken and marked to run this turn (if the driver is not poisoned).
    fn woken(&mut self, group: GroupId) -> Result<&mut Group, ProposeError> {
        if let Some(why) = &self.poisoned {
            return Err(ProposeError::Poisoned(why.clone()));
        }
        self.wake(group);
        self.dirty.insert(group);
        self.groups
            .get_mut(&group)
            .ok_or(ProposeError::NoGroup(group))
    }

    /// `group`, woken, if this node leads it (and the driver is not poisoned).
    fn leading(&mut self, group: GroupId) -> Result<&mut Group, ProposeError> {
        let g = self.woken(group)?;
        if g.node.raft.state != StateRole::Leader {
            let leader = g.node.raft.leader_id;
            return Err(ProposeError::NotLeader {
                group,
                leader: (leader != 0).then_some(leader),
            });
        }
        Ok(g)
    }

    /// Proposes `data` in `group`; it is committed later, or dropped if leadership moves.
    /// Returns the index and term the entry has in this leader's log: it was applied if
    /// and only if the entry applied at that index has that term.
    pub fn propose(&mut self, group: GroupId, data: Vec<u8>) -> Result<(u64, u64), ProposeError> {
        let (now, lease) = (self.now, self.config.lease);
        let g = self.leading(group)?;
        g.node
            .propose(vec![], data)
            .map_err(|_| ProposeError::NotLeader {
                group,
                leader: None,
            })?;
        let (index, term) = (g.node.raft.raft_log.last_index(), g.node.raft.term);
        if lease > 0 {
            push_bounded(&mut g.lease.proposed, (index, term, now));
        }
        Ok((index, term))
    }

    /// Sets the caller's clock: a monotonic time, in the unit of [`DriverConfig::lease`],
    /// read before the turn that sends what is proposed or asked after it.
    pub fn set_time(&mut self, now: u64) {
        self.now = self.now.max(now);
    }

    /// A linearizable read `group`'s leader (this node) may serve without asking a quorum:
    /// its lease holds now, it has committed an entry of its term and applied what that
    /// covered, and it is not handing its leadership over. `None`: ask with
    /// [`Driver::read_index`].
    ///
    /// Safe as long as no follower's clock runs so much faster than this node's that its
    /// `election_ticks - 1` ticks take less than the lease; the caller chooses the lease
    /// with a margin for that.
    pub fn lease_read(&self, group: GroupId) -> Option<LeaseRead> {
        let until = self.lease_until(group)?;
        (self.now < until).then(|| LeaseRead {
            index: self.groups[&group].node.raft.raft_log.committed,
            until,
        })
    }

    /// The end of `group`'s lease, if this node may serve lease reads in it until then
    /// (see [`Driver::lease_read`]); the time is not compared with now.
    fn lease_until(&self, group: GroupId) -> Option<u64> {
        if self.config.lease == 0 || self.poisoned.is_some() {
            return None;
        }
        let g = self.groups.get(&group)?;
        let r = &g.node.raft;
        let l = &g.lease;
        (r.state == StateRole::Leader
            && l.term == r.term
            && l.ready_term == r.term
            && l.barred_term != r.term
            && r.lead_transferee.is_none())
        .then_some(l.until)
    }

    /// Renews `group`'s lease from what a quorum acknowledged: proposals of this term now
    /// committed, and ReadIndex requests in `confirmed` (their contexts).
    fn renew_lease(&mut self, group: GroupId, confirmed: &[Vec<u8>]) {
        let lease = self.config.lease;
        if lease == 0 {
            return;
        }
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let r = &g.node.raft;
        let l = &mut g.lease;
        if r.state != StateRole::Leader {
            l.proposed.clear();
            l.reads.clear();
            return;
        }
        let (term, committed) = (r.term, r.raft_log.committed);
        let mut sent = None;
        while let Some(&(index, t, at)) = l.proposed.front() {
            if t == term && index > committed {
                break;
            }
            l.proposed.pop_front();
            if t == term {
                sent = sent.max(Some(at));
            }
        }
        for ctx in confirmed {
            // Confirmed in order: every request up to this one is confirmed too.
            if let Some(pos) = l.reads.iter().position(|(c, _, _)| c == ctx) {
                for (_, t, at) in l.reads.drain(..=pos) {
                    if t == term {
                        sent = sent.max(Some(at));
                    }
                }
            }
        }
        if let Some(at) = sent {
            if l.term != term {
                l.term = term;
                l.until = 0;
            }
            l.until = l.until.max(at.saturating_add(lease));
        }
        if l.ready_term != term {
            if l.seen_term != term {
                l.seen_term = term;
                l.seen_last = r.raft_log.last_index();
            }
            // Applied past an index of this term: the term's first entry is applied, and
            // with it everything earlier leaders committed. (Waiting for applied to reach
            // the commit index instead could take long under steady writes: commits arrive
            // between turns, applies within them.)
            if r.raft_log.applied >= l.seen_last && r.commit_to_current_term() {
                l.ready_term = term;
            }
        }
    }

    /// Asks the leader of `group` (this node) to confirm its leadership with a quorum for a
    /// read; the answer comes as a [`ReadReady`] with `context` ([`Driver::take_read_states`]),
    /// or never (leadership lost, or nothing committed yet in this leader's term): the
    /// caller times out.
    pub fn read_index(&mut self, group: GroupId, context: Vec<u8>) -> Result<(), ProposeError> {
        let now = self.now;
        let lease = self.config.lease;
        let g = self.leading(group)?;
        if lease > 0 {
            let term = g.node.raft.term;
            push_bounded(&mut g.lease.reads, (context.clone(), term, now));
        }
        g.node.read_index(context);
        Ok(())
    }

    /// Asks `group`'s leader, through this replica whatever its role, to confirm its
    /// commit index with a quorum (raft-rs forwards a follower's ReadIndex to the leader,
    /// which answers once a quorum acknowledged its leadership). The answer comes as a
    /// [`ReadReady`] with `context`, or never (no leader answered): the caller times out.
    /// Refused at once when this replica knows no leader.
    pub fn read_index_anywhere(
        &mut self,
        group: GroupId,
        context: Vec<u8>,
    ) -> Result<(), ProposeError> {
        let g = self.woken(group)?;
        let r = &g.node.raft;
        if r.state != StateRole::Leader && r.leader_id == 0 {
            return Err(ProposeError::NotLeader {
                group,
                leader: None,
            });
        }
        g.node.read_index(context);
        Ok(())
    }

    /// Snapshots installed since last asked (see [`Restored`]).
    pub fn take_restored(&mut self) -> Vec<Restored> {
        std::mem::take(&mut self.restored)
    }

    /// Drops `group`'s log up to `index` (applied here), whose effect the state machine's
    /// image `data` holds; a follower that needs entries before it gets that image as a
    /// snapshot. Does nothing if the log starts after `index` already.
    pub fn compact(&mut self, group: GroupId, index: u64, data: Vec<u8>) -> Result<(), String> {
        let g = self
            .groups
            .get_mut(&group)
            .ok_or_else(|| format!("no group {group}"))?;
        let applied = g.node.raft.raft_log.applied;
        if index > applied {
            return Err(format!(
                "group {group}: compaction to {index} past the applied index {applied}"
            ));
        }
        let mut st = g.storage.write();
        if index <= st.snapshot_index {
            return Ok(());
        }
        let term = st
            .entry(index)
            .map(|e| e.term)
            .ok_or_else(|| format!("group {group}: no entry {index} to compact to"))?;
        let record = SnapshotRecord {
            index,
            term,
            conf_state: st.conf_state.clone(),
            data,
        };
        st.compact(&record);
        drop(st);
        self.compactions.insert(group, record);
        Ok(())
    }

    /// Confirmed reads (see [`Driver::read_index`]).
    pub fn take_read_states(&mut self) -> Vec<ReadReady> {
        std::mem::take(&mut self.read_states)
    }

    /// Makes this node campaign in `group` (e.g. at bootstrap).
    pub fn campaign(&mut self, group: GroupId) {
        // Voting for itself is a vote too (see the hold in `step`).
        if self
            .groups
            .get(&group)
            .is_some_and(|g| g.hold_votes && self.ticks < self.config.election_ticks as u64)
        {
            return;
        }
        self.wake(group);
        self.dirty.insert(group);
        if let Some(g) = self.groups.get_mut(&group) {
            let _ = g.node.campaign();
        }
    }

    /// On a leader, hands `group`'s leadership to `to` if `to` is live and holds the log but
    /// for at most [`TRANSFER_LAG_MAX`] entries (raft-rs sends it the rest, then
    /// `TimeoutNow`; a transfer that does not finish within an election timeout is
    /// dropped). Returns whether a transfer started.
    pub fn transfer_leader(&mut self, group: GroupId, to: u64) -> bool {
        let ready = self.groups.get(&group).is_some_and(|g| {
            let r = &g.node.raft;
            r.state == StateRole::Leader
                && r.id != to
                && r.lead_transferee.is_none()
                && self
                    .liveness
                    .get(&to)
                    .is_some_and(|l| !l.down && l.silent_ticks <= 2 * self.config.heartbeat_ticks)
                // Caught up but for the last few entries (under steady writes it is never
                // exactly caught up); raft-rs sends it the rest before `TimeoutNow`, and
                // proposals wait meanwhile.
                && r.prs()
                    .get(to)
                    .is_some_and(|pr| pr.matched + TRANSFER_LAG_MAX >= r.raft_log.last_index())
        });
        if !ready {
            return false;
        }
        self.wake(group);
        self.dirty.insert(group);
        if let Some(g) = self.groups.get_mut(&group) {
            // The transferee's campaign is forced past the followers' refusal to vote: no
            // lease reads in this term from now on (even if the transfer fails).
            g.lease.barred_term = g.node.raft.term;
            g.node.transfer_leader(to);
        }
        true
    }

    /// The role, term and leader this node sees in `group`.
    pub fn role(&self, group: GroupId) -> Option<(StateRole, u64, u64)> {
        self.groups
            .get(&group)
            .map(|g| (g.node.raft.state, g.node.raft.term, g.node.raft.leader_id))
    }

    /// The group's log as this node holds it now (durable or not) and its commit index.
    pub fn log(&self, group: GroupId) -> Option<(std::sync::RwLockReadGuard<'_, LogState>, u64)> {
        self.groups
            .get(&group)
            .map(|g| (g.storage.read(), g.node.raft.raft_log.committed))
    }

    /// Messages to send now.
    pub fn take_outbox(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outbox)
    }

    /// Committed entries to apply, in log order per group.
    pub fn take_committed(&mut self) -> Vec<Committed> {
        std::mem::take(&mut self.committed)
    }

    /// Groups that had a ready (role, commit or log may have changed) since last asked.
    pub fn take_touched(&mut self) -> Vec<GroupId> {
        std::mem::take(&mut self.touched)
    }

    /// What the node's status shows of `group`.
    pub fn status(&self, group: GroupId) -> Option<GroupStatus> {
        self.groups.get(&group).map(|g| {
            let r = &g.node.raft;
            GroupStatus {
                role: r.state,
                term: r.term,
                leader: r.leader_id,
                commit: r.raft_log.committed,
                applied: r.raft_log.applied,
                last_index: r.raft_log.last_index(),
                log_start: g.storage.read().snapshot_index,
                quiet: g.quiet,
                lease_until: self.lease_until(group).unwrap_or(0),
            }
        })
    }

    /// Whether a sync is outstanding.
    pub fn syncing(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// One turn: handles every group's ready (see the module comment).
    pub fn run(&mut self) {
        if self.poisoned.is_some() {
            return;
        }
        let mut batch = WriteBatch::default();
        let mut readies: Vec<PendingReady> = Vec::new();
        let compactions = std::mem::take(&mut self.compactions);
        let mut after_sync: Vec<Outgoing> = Vec::new();
        let dirty = std::mem::take(&mut self.dirty);
        for gid in dirty {
            // Stepped, applied or persisted: the commit index may have moved.
            self.renew_lease(gid, &[]);
            let Some(g) = self.groups.get_mut(&gid) else {
                continue;
            };
            if !g.node.has_ready() {
                continue;
            }
            let mut rd = g.node.ready();
            let mut snapshots_sent = Vec::new();
            for m in rd.take_messages() {
                if m.msg_type == MessageType::MsgSnapshot {
                    snapshots_sent.push(m.to);
                }
                self.outbox.push(Outgoing {
                    to: m.to,
                    group: gid,
                    message: m,
                });
            }
            // A snapshot from the leader replaces the log; the caller installs its data in
            // the state machine (`take_restored`), written with this turn's batch.
            let mut installs = None;
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot();
                let meta = snap.get_metadata();
                let record = SnapshotRecord {
                    index: meta.index,
                    term: meta.term,
                    conf_state: meta.get_conf_state().clone(),
                    data: snap.data.to_vec(),
                };
                g.storage.write().restore(&record);
                installs = Some(record.index);
                self.restored.push(Restored {
                    group: gid,
                    index: record.index,
                    data: record.data.clone(),
                });
                batch.groups.entry(gid).or_default().restore = Some(record);
            }
            let entries = rd.take_entries();
            let hard_state = rd.hs().cloned();
            if !entries.is_empty() || hard_state.is_some() {
                let mut st = g.storage.write();
                st.append(&entries);
                if let Some(hs) = &hard_state {
                    st.hard_state = hs.clone();
                }
                drop(st);
                let w = batch.groups.entry(gid).or_insert_with(GroupWrite::default);
                w.entries.extend(entries);
                if hard_state.is_some() {
                    w.hard_state = hard_state;
                }
            }
            for m in rd.take_persisted_messages() {
                let out = Outgoing {
                    to: m.to,
                    group: gid,
                    message: m,
                };
                let is_vote = out.message.msg_type == MessageType::MsgRequestVoteResponse;
                if self.planted.vote_before_persist && is_vote {
                    self.outbox.push(out);
                } else {
                    after_sync.push(out);
                }
            }
            let mut confirmed = Vec::new();
            for rs in rd.take_read_states() {
                if self.config.lease > 0 {
                    confirmed.push(rs.request_ctx.clone());
                }
                self.read_states.push(ReadReady {
                    group: gid,
                    index: rs.index,
                    context: rs.request_ctx,
                });
            }
            for entry in rd.take_committed_entries() {
                self.committed.push(Committed { group: gid, entry });
            }
            readies.push((gid, rd.number(), installs));
            self.touched.push(gid);
            g.node.advance_append_async(rd);
            if !confirmed.is_empty() {
                self.renew_lease(gid, &confirmed);
            }
            let Some(g) = self.groups.get_mut(&gid) else {
                continue;
            };
            // Unless the caller reports it, count a snapshot delivered once sent. If it was
            // lost, the follower rejects the next append and gets another.
            if !self.config.caller_reports_snapshots {
                for to in snapshots_sent {
                    g.node.report_snapshot(to, raft::SnapshotStatus::Finish);
                    self.dirty.insert(gid);
                }
            }
        }
        // Compactions go to disk with the turn's batch (durable with its sync, or a later
        // one: until then the disk just keeps entries it no longer needs).
        let compacting = !compactions.is_empty();
        for (gid, record) in compactions {
            batch.groups.entry(gid).or_default().compact = Some(record);
        }
        if readies.is_empty() {
            if compacting {
                self.stats.writes += 1;
                if let Err(e) = self.disk.write(batch) {
                    self.poison(e);
                }
            }
            return;
        }
        // One write and one sync for every group of the turn. A turn that wrote nothing
        // still waits for the syncs before it, since raft-rs persists readies in order.
        if !batch.is_empty() || !self.in_flight.is_empty() {
            if !batch.is_empty() {
                self.stats.writes += 1;
                self.stats.entries_written += batch
                    .groups
                    .values()
                    .map(|w| w.entries.len() as u64)
                    .sum::<u64>();
                if let Err(e) = self.disk.write(batch) {
                    self.poison(e);
                    return;
                }
            }
            let id = self.next_sync;
            self.next_sync += 1;
            self.disk.sync(id);
            self.stats.syncs += 1;
            self.in_flight.push_back((id, readies, after_sync));
        } else {
            self.persisted(readies, after_sync);
        }
    }

    /// The disk failed (a write or a sync): the driver stops for good. Messages waiting
    /// for a sync are dropped and nothing more is handed out; the node must restart and
    /// recover from what really is on disk.
    pub fn poison(&mut self, why: String) {
        if self.poisoned.is_none() {
            self.poisoned = Some(why);
        }
        self.in_flight.clear();
        self.outbox.clear();
        self.committed.clear();
        self.read_states.clear();
        self.restored.clear();
        self.pings.clear();
    }

    /// Why the driver stopped, if it did.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// The disk made sync `id` durable (syncs complete in the order requested).
    pub fn on_synced(&mut self, id: u64) {
        if self.poisoned.is_some() {
            return;
        }
        while let Some((front, _, _)) = self.in_flight.front() {
            if *front > id {
                break;
            }
            let (_, readies, msgs) = self.in_flight.pop_front().expect("front exists");
            self.persisted(readies, msgs);
        }
    }

    fn persisted(&mut self, readies: Vec<PendingReady>, msgs: Vec<Outgoing>) {
        for (gid, number, installed) in readies {
            if let Some(g) = self.groups.get_mut(&gid) {
                g.node.on_persist_ready(number);
                if let Some(index) = installed {
                    g.node.advance_apply_to(index);
                }
                self.dirty.insert(gid);
            }
        }
        self.outbox.extend(msgs);
    }

    /// The caller's report on a snapshot of `group` it sent to `to` (see
    /// [`DriverConfig::caller_reports_snapshots`]): delivered and installed, or failed
    /// (raft-rs then probes the follower again, and sends another if still needed).
    pub fn report_snapshot(&mut self, group: GroupId, to: u64, delivered: bool) {
        if let Some(g) = self.groups.get_mut(&group) {
            let status = if delivered {
                raft::SnapshotStatus::Finish
            } else {
                raft::SnapshotStatus::Failure
            };
            g.node.report_snapshot(to, status);
            self.wake(group);
            self.dirty.insert(group);
        }
    }

    /// For a leader: its log's start, the highest index every voter holds and this node
    /// applied (a log compacted up to it never needs to send a voter a snapshot), and the
    /// same over the voters at most `lag` entries behind what it applied (compacting to
    /// that sends the others a snapshot). `None` on a follower.
    pub fn compaction_point(&self, group: GroupId, lag: u64) -> Option<CompactionPoint> {
        let g = self.groups.get(&group)?;
        let r = &g.node.raft;
        if r.state != StateRole::Leader {
            return None;
        }
        let applied = r.raft_log.applied;
        let held: Vec<u64> = r
            .prs()
            .iter()
            .map(|(id, pr)| {
                if *id == r.id {
                    r.raft_log.persisted
                } else {
                    pr.matched
                }
            })
            .collect();
        let all_hold = held.iter().copied().min()?.min(applied);
        let near_hold = held
            .iter()
            .copied()
            .filter(|m| m.saturating_add(lag) >= applied)
            .min()
            .unwrap_or(applied)
            .min(applied);
        Some(CompactionPoint {
            start: g.storage.read().snapshot_index,
            all_hold,
            near_hold,
        })
    }

    /// Tells raft-rs the caller applied `group` up to `index`.
    pub fn applied(&mut self, group: GroupId, index: u64) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.node.advance_apply_to(index);
            self.dirty.insert(group);
        }
    }

    #[doc(hidden)]
    pub fn logger(&self) -> &slog::Logger {
        &self.logger
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= LEASE_PENDING_MAX {
        q.pop_front();
    }
    q.push_back(item);
}

/// Whether a leader's group has nothing in flight: everything proposed is persisted,
/// committed and applied here and matched by every follower, no read, no leadership
/// transfer and no membership change is pending.
fn idle_leader(node: &RawNode<GroupStorage>) -> bool {
    let r = &node.raft;
    if r.state != StateRole::Leader || r.lead_transferee.is_some() {
        return false;
    }
    let last = r.raft_log.last_index();
    r.raft_log.committed == last
        && r.raft_log.persisted == last
        && r.raft_log.applied == last
        && r.pending_conf_index <= r.raft_log.applied
        && r.pending_read_count() == 0
        && r.ready_read_count() == 0
        && r.prs()
            .iter()
            .all(|(id, pr)| *id == r.id || pr.matched == last)
        && !node.has_ready()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemDisk;
    use raft::eraftpb::HardState;

    /// Runs turns and completes every sync until the driver has nothing more to do;
    /// returns what it sent.
    fn settle(d: &mut Driver<MemDisk>) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for _ in 0..8 {
            d.run();
            while let Some(id) = d.disk_mut().complete_sync() {
                d.on_synced(id);
            }
            out.extend(d.take_outbox());
        }
        out
    }

    fn granted(out: &[Outgoing]) -> bool {
        out.iter()
            .any(|o| o.message.msg_type == MessageType::MsgRequestVoteResponse && !o.message.reject)
    }

    /// A node restarting with a term may have acknowledged a leader just before it stopped
    /// (and a lease counts on its refusal to vote): it ignores vote requests of later terms
    /// for an election timeout, except a transfer's forced campaign. Without the hold it
    /// votes at once, as raft-rs does.
    #[test]
    fn a_restarted_node_holds_its_vote_for_an_election_timeout() {
        let mut disk = MemDisk::bootstrap(&[(0, vec![1, 2, 3])].into());
        let mut batch = WriteBatch::default();
        batch.groups.entry(0).or_default().hard_state = Some(HardState {
            term: 3,
            vote: 2,
            commit: 0,
            ..Default::default()
        });
        disk.write(batch).unwrap();
        disk.sync(1);
        disk.complete_sync();
        let vote = |term: u64, forced: bool| {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgRequestVote);
            m.from = 3;
            m.to = 1;
            m.term = term;
            if forced {
                m.context = raft::CAMPAIGN_TRANSFER.to_vec().into();
            }
            m
        };
        let leased = DriverConfig {
            vote_hold: true,
            ..DriverConfig::default()
        };
        let mut d = Driver::start(1, disk.clone(), &leased, PlantedBugs::default()).unwrap();
        d.step(0, vote(4, false));
        assert!(!granted(&settle(&mut d)), "no vote right after a restart");
        assert_eq!(d.stats().votes_held, 1);
        for _ in 0..leased.election_ticks - 1 {
            d.tick();
        }
        d.step(0, vote(4, false));
        assert!(!granted(&settle(&mut d)), "still held before the timeout");
        d.tick();
        d.step(0, vote(5, false));
        assert!(granted(&settle(&mut d)), "votes once the timeout passed");

        let mut d = Driver::start(1, disk.clone(), &leased, PlantedBugs::default()).unwrap();
        d.step(0, vote(4, true));
        assert!(
            granted(&settle(&mut d)),
            "a transfer's campaign passes the hold"
        );

        let mut d =
            Driver::start(1, disk, &DriverConfig::default(), PlantedBugs::default()).unwrap();
        d.step(0, vote(4, false));
        assert!(
            granted(&settle(&mut d)),
            "no hold configured: votes at once"
        );
    }

    /// Messages raft-rs would panic on (a ReadIndex without its entry, a proposal with
    /// none) and local-only ones are dropped when they come from a peer; the group goes
    /// on serving.
    #[test]
    fn malformed_or_local_messages_from_peers_are_dropped() {
        let disk = MemDisk::bootstrap(&[(0, vec![1])].into());
        let mut d =
            Driver::start(1, disk, &DriverConfig::default(), PlantedBugs::default()).unwrap();
        d.campaign(0);
        settle(&mut d);
        assert_eq!(d.status(0).unwrap().role, StateRole::Leader);
        d.propose(0, b"x".to_vec()).unwrap();
        settle(&mut d);
        for t in [
            MessageType::MsgReadIndex,
            MessageType::MsgReadIndexResp,
            MessageType::MsgPropose,
            MessageType::MsgHup,
        ] {
            let mut m = Message::default();
            m.set_msg_type(t);
            m.from = 1;
            m.to = 1;
            d.step(0, m);
            settle(&mut d);
        }
        assert_eq!(d.stats().malformed, 4);
        // A well-formed ReadIndex of its own still gets its answer.
        d.read_index_anywhere(0, b"ctx".to_vec()).unwrap();
        settle(&mut d);
        let states = d.take_read_states();
        assert_eq!(states.len(), 1, "{states:?}");
        assert_eq!(states[0].context, b"ctx".to_vec());
    }

    /// A driver whose disk failed must fall silent, node-level pings included: its peers
    /// then count it down and wake the groups it led, even sleeping ones.
    #[test]
    fn a_poisoned_driver_stops_pinging() {
        let disk = MemDisk::bootstrap(&[(0, vec![1, 2, 3])].into());
        let config = DriverConfig::default();
        let mut d = Driver::start(1, disk, &config, PlantedBugs::default()).unwrap();
        for _ in 0..config.heartbeat_ticks {
            d.tick();
        }
        assert_eq!(d.take_pings(), vec![2, 3], "a healthy node pings its peers");
        d.poison("fsync failed".into());
        for _ in 0..config.heartbeat_ticks * 3 {
            d.tick();
            d.run();
        }
        assert!(d.take_pings().is_empty());
        assert!(d.take_outbox().is_empty());
        assert!(matches!(
            d.propose(0, b"x".to_vec()),
            Err(ProposeError::Poisoned(_))
        ));
    }
}
