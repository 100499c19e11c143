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

use std::collections::{BTreeMap, VecDeque};

use raft::eraftpb::{Entry, Message, MessageType};
use raft::{Config, RawNode, StateRole};

use crate::storage::{Disk, GroupId, GroupStorage, GroupWrite, LogState, WriteBatch};

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
}

/// A group as one node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupStatus {
    pub role: StateRole,
    pub term: u64,
    /// 0: none known.
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
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
    /// The disk failed; the node acknowledges nothing until it restarts.
    #[error("storage failed: {0}")]
    Poisoned(String),
}

/// A sync requested and not completed: its id, the readies it makes durable (group, ready
/// number), and the messages that wait for it.
type PendingSync = (u64, Vec<(GroupId, u64)>, Vec<Outgoing>);

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
    logger: slog::Logger,
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
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut groups = BTreeMap::new();
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
            if applied > state.hard_state.commit {
                state.hard_state.commit = applied;
            }
            let storage = GroupStorage::new(state);
            let node = RawNode::new(&raft_config(id, config, applied), storage.clone(), &logger)?;
            groups.insert(gid, Group { node, storage });
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
    pub fn tick(&mut self) {
        for g in self.groups.values_mut() {
            g.node.tick();
        }
    }

    /// A message from a peer. Messages for unknown groups are dropped.
    pub fn step(&mut self, group: GroupId, message: Message) {
        if let Some(g) = self.groups.get_mut(&group) {
            // An error here is a message raft-rs refuses (e.g. from a removed peer).
            let _ = g.node.step(message);
        }
    }

    /// Proposes `data` in `group`; it is committed later, or dropped if leadership moves.
    /// Returns the index and term the entry has in this leader's log: it was applied if
    /// and only if the entry applied at that index has that term.
    pub fn propose(&mut self, group: GroupId, data: Vec<u8>) -> Result<(u64, u64), ProposeError> {
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(ProposeError::NoGroup(group))?;
        if g.node.raft.state != StateRole::Leader {
            let leader = g.node.raft.leader_id;
            return Err(ProposeError::NotLeader {
                group,
                leader: (leader != 0).then_some(leader),
            });
        }
        g.node
            .propose(vec![], data)
            .map_err(|_| ProposeError::NotLeader {
                group,
                leader: None,
            })?;
        Ok((g.node.raft.raft_log.last_index(), g.node.raft.term))
    }

    /// Makes this node campaign in `group` (e.g. at bootstrap).
    pub fn campaign(&mut self, group: GroupId) {
        if let Some(g) = self.groups.get_mut(&group) {
            let _ = g.node.campaign();
        }
    }

    /// The role, term and leader this node sees in `group`.
    pub fn role(&self, group: GroupId) -> Option<(StateRole, u64, u64)> {
        self.groups
            .get(&group)
            .map(|g| (g.node.raft.state, g.node.raft.term, g.node.raft.leader_id))
    }

    /// The group's log as this node holds it now (durable or not) and its commit index.
    pub fn log(&self, group: GroupId) -> Option<(LogState, u64)> {
        self.groups
            .get(&group)
            .map(|g| (g.storage.read().clone(), g.node.raft.raft_log.committed))
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
        let mut readies: Vec<(GroupId, u64)> = Vec::new();
        let mut after_sync: Vec<Outgoing> = Vec::new();
        for (&gid, g) in self.groups.iter_mut() {
            if !g.node.has_ready() {
                continue;
            }
            let mut rd = g.node.ready();
            for m in rd.take_messages() {
                self.outbox.push(Outgoing {
                    to: m.to,
                    group: gid,
                    message: m,
                });
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
            for entry in rd.take_committed_entries() {
                self.committed.push(Committed { group: gid, entry });
            }
            readies.push((gid, rd.number()));
            self.touched.push(gid);
            g.node.advance_append_async(rd);
        }
        if readies.is_empty() {
            return;
        }
        // One write and one sync for every group of the turn. A turn that wrote nothing
        // still waits for the syncs before it, since raft-rs persists readies in order.
        if !batch.is_empty() || !self.in_flight.is_empty() {
            if !batch.is_empty() {
                if let Err(e) = self.disk.write(batch) {
                    self.poison(e);
                    return;
                }
            }
            let id = self.next_sync;
            self.next_sync += 1;
            self.disk.sync(id);
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

    fn persisted(&mut self, readies: Vec<(GroupId, u64)>, msgs: Vec<Outgoing>) {
        for (gid, number) in readies {
            if let Some(g) = self.groups.get_mut(&gid) {
                g.node.on_persist_ready(number);
            }
        }
        self.outbox.extend(msgs);
    }

    /// Tells raft-rs the caller applied `group` up to `index`.
    pub fn applied(&mut self, group: GroupId, index: u64) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.node.advance_apply_to(index);
        }
    }

    #[doc(hidden)]
    pub fn logger(&self) -> &slog::Logger {
        &self.logger
    }
}
