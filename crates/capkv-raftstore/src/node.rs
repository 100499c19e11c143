//! A node's engine on its own thread: the driver's loop over real time, the node's disk,
//! a transport and the state machine of every group.
//!
//! Each turn the loop takes every input that is waiting (proposals, peer batches, sync
//! completions) without blocking, ticks every group if a tick is due, proposes the
//! commands each group received this turn as **one** Raft entry, runs the driver (one
//! disk write and one sync for all groups), sends what it produced as one
//! [`PeerBatch`] per peer, and applies what committed, answering each proposal with its
//! command's response. It blocks only when nothing is waiting, until the next tick.
//!
//! A proposal's answer is exact: the entry at the index it was given either has its term
//! (then it was applied, and the state machine's response is returned) or not (then it
//! never will be: [`ProposeError::Dropped`]). A node that stops with proposals pending
//! answers them [`ProposeError::Stopped`]: they may still commit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use raft::eraftpb::{Entry, EntryType, Message, MessageType};
use serde::{Deserialize, Serialize};

use crate::codec::{PeerBatch, WireMessage};
use crate::driver::{Driver, DriverConfig, GroupStatus, PlantedBugs, ProposeError};
use crate::storage::{Disk, GroupId};

/// Sends a batch to its peer (`batch.to`). Must not block the loop: a transport that
/// cannot keep up drops (raft-rs resends what matters).
pub trait Transport: Send + 'static {
    fn send(&self, batch: PeerBatch);

    /// Streams `image` (the state machine of `group` at `message`'s snapshot index) to
    /// peer `to`, then delivers `message` (the `MsgSnapshot`) to it, and calls `done`
    /// with whether all of it arrived. Must not block the loop.
    fn send_snapshot(
        &self,
        to: u64,
        group: GroupId,
        message: Message,
        image: SnapshotImage,
        done: SnapshotDone,
    ) {
        let _ = (to, group, message, image);
        done(false);
    }
}

/// A consistent view of one group's state machine, to stream to a follower.
pub type SnapshotImage = Box<dyn capkv_storage::SmSnapshot>;

/// Told whether a snapshot reached its follower.
pub type SnapshotDone = Box<dyn FnOnce(bool) + Send>;

/// Every group's replicated state machine on this node.
pub trait StateMachine: Send + 'static {
    type Response: Send + 'static;
    /// Applies the commands of the committed entry `index` (of `term`) of `group`, in
    /// order, returning one response per command. Raft's own entries (a new leader's
    /// empty entry) come with no commands. Called in log order per group. An error (the
    /// state machine's storage failed) stops the engine: it acknowledges nothing more
    /// until restarted.
    fn apply(
        &mut self,
        group: GroupId,
        index: u64,
        term: u64,
        commands: Vec<Vec<u8>>,
    ) -> Result<Vec<Self::Response>, String>;

    /// Makes everything applied since the last call visible to readers (e.g. one storage
    /// write for every group a turn applied to). The engine answers the turn's proposals
    /// and reads only after this returns; an error stops the engine like one from
    /// `apply`.
    fn commit(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// A view of `group`'s state machine as applied so far (everything committed by
    /// [`StateMachine::commit`]), to send to a follower behind the log's start; `None` if
    /// this state machine cannot make one.
    fn snapshot(&mut self, group: GroupId) -> Result<Option<SnapshotImage>, String> {
        let _ = group;
        Ok(None)
    }

    /// Whether an image of `group` at `index`, received from a peer, is ready to install;
    /// if so it is held for the install (a `MsgSnapshot` without one is dropped).
    fn snapshot_ready(&mut self, group: GroupId, index: u64) -> bool {
        let _ = (group, index);
        false
    }

    /// The disk installed the image of `group` at `index` (with the snapshot's log, in
    /// one write): the state machine must reload it before applying anything after.
    fn restored(&mut self, group: GroupId, index: u64) -> Result<(), String> {
        Err(format!(
            "a snapshot of group {group} at {index} arrived, and this state machine cannot install one"
        ))
    }

    /// Raft did not take the snapshot of `group` that was ready (e.g. it was stale): drop
    /// the image.
    fn snapshot_dropped(&mut self, group: GroupId) {
        let _ = group;
    }
}

/// The answer to one proposal.
pub type Reply<R> = Box<dyn FnOnce(Result<R, ProposeError>) + Send>;

/// The answer to a linearizable read: the read index, which the state machine has
/// applied by the time this is called, so a read of it now is linearizable.
pub type ReadReply = Box<dyn FnOnce(Result<u64, ProposeError>) + Send>;

/// Commands of one turn go into one entry up to this many bytes (a single larger command
/// gets an entry of its own).
const ENTRY_BYTES_MAX: usize = 4 << 20;

/// A leader proposes compacting its group's log once every voter holds this many entries
/// past its start.
pub const COMPACT_AFTER_ENTRIES: u64 = 1024;

/// What one Raft entry carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum EntryPayload {
    /// The commands proposed to its group in one turn (as byte strings: postcard writes
    /// them whole, the same bytes a sequence of `u8` gives, element by element).
    Commands(Vec<serde_bytes::ByteBuf>),
    /// Every replica drops its log up to `upto` when it applies this entry. The leader
    /// proposes it only when every voter holds `upto`, so no voter ever needs a snapshot
    /// for it; the state machine is durable past `upto` by then (its writes precede the
    /// compaction in the one journal the node writes).
    CompactLog { upto: u64 },
}

pub enum Input<R> {
    Propose {
        group: GroupId,
        command: Vec<u8>,
        reply: Reply<R>,
    },
    /// A batch from a peer, decoded (an empty one is the node-level ping).
    Peer {
        from: u64,
        messages: Vec<(GroupId, Message)>,
    },
    Synced {
        id: u64,
        result: Result<(), String>,
    },
    /// A linearizable read of `group` (ReadIndex through its leader, this node).
    Read {
        group: GroupId,
        reply: ReadReply,
    },
    /// The commit index of `group`'s leader, wherever it is, confirmed by it with a quorum
    /// after this was asked (a ReadIndex through any replica; answered on confirmation).
    ReadIndex {
        group: GroupId,
        reply: ReadReply,
    },
    Campaign(GroupId),
    /// The tick thread's beat: the driver ticks once in the turn that takes it.
    Tick,
    /// Hand the group's leadership to this node, if this node leads it and the other
    /// holds the whole log.
    TransferLeader(GroupId, u64),
    /// Lease reads of the group are being served outside the loop and its lease is past
    /// half: renew it (one ReadIndex round) before it runs out.
    RenewLease(GroupId),
    /// A snapshot of the group streamed to the peer arrived (or not).
    SnapshotDone {
        group: GroupId,
        to: u64,
        delivered: bool,
    },
    Stop,
}

/// Settings of a node's engine.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub tick: Duration,
    /// `driver.lease` is in microseconds of this node's monotonic clock.
    pub driver: DriverConfig,
    /// At most this many inputs are taken in one turn (keeps turns short under load).
    pub max_inputs_per_turn: usize,
    /// A leader compacts its group's log once every voter holds this many entries past
    /// its start, or, once it has applied twice as many, up to what the voters not further
    /// behind than this hold (the others then get a snapshot, if snapshots can be sent).
    pub compact_after_entries: u64,
    pub planted: PlantedBugs,
}

impl NodeConfig {
    pub fn new(id: u64) -> Self {
        NodeConfig {
            id,
            tick: Duration::from_millis(50),
            driver: DriverConfig::default(),
            max_inputs_per_turn: 4096,
            compact_after_entries: COMPACT_AFTER_ENTRIES,
            planted: PlantedBugs::default(),
        }
    }
}

/// Counters, for metrics and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NodeStats {
    pub turns: u64,
    pub proposals: u64,
    /// Raft entries proposed (each carries every proposal of its group's turn).
    pub entries_proposed: u64,
    pub batches_sent: u64,
    pub messages_sent: u64,
    /// Log compactions applied.
    pub compactions: u64,
    /// Leadership transfers started.
    pub leader_transfers: u64,
    /// Snapshots streamed to followers (delivered, failed) and installed here.
    pub snapshots_sent: u64,
    pub snapshots_failed: u64,
    pub snapshots_installed: u64,
    /// Linearizable reads served under the leader's lease: by the loop, and by callers'
    /// threads ([`RaftNode::lease_read_now`]); reads that took a ReadIndex round; rounds
    /// asked only to renew a lease.
    pub lease_reads: u64,
    pub lease_reads_outside: u64,
    pub read_index_reads: u64,
    /// Read-index asks through any replica (follower reads, bounded staleness).
    pub read_index_asks: u64,
    pub lease_renewals: u64,
    pub driver: crate::driver::DriverStats,
}

/// What other threads can read of a running node.
#[derive(Debug, Default)]
pub struct Shared {
    pub groups: BTreeMap<GroupId, GroupStatus>,
    pub stats: NodeStats,
    pub poisoned: Option<String>,
    /// Ticks left of the vote hold after a restart.
    pub vote_hold_ticks: u64,
}

/// Why a node's engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] capkv_storage::StorageError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

/// A handle on a running node's engine.
pub struct RaftNode<R> {
    tx: mpsc::Sender<Input<R>>,
    shared: Arc<RwLock<Shared>>,
    /// Peer batches handed to the engine and not yet taken by its loop.
    peer_backlog: Arc<AtomicUsize>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The zero of the engine's clock (leases are in microseconds since).
    epoch: Instant,
    lease_us: u64,
    /// Per group, when a caller last asked the loop to renew its lease.
    renew_asked: Arc<BTreeMap<GroupId, AtomicU64>>,
    lease_reads_outside: AtomicU64,
    tick: Duration,
}

impl<R: Send + 'static> RaftNode<R> {
    /// Starts the engine thread. `applied` is what the state machine already holds per
    /// group; `inputs` must be the receiving end of [`RaftNode::sender`]'s channel (the
    /// disk's sync notifications go to it too, so it is made before the disk).
    pub fn start<D, T, S>(
        config: NodeConfig,
        disk: D,
        applied: &BTreeMap<GroupId, u64>,
        transport: T,
        sm: S,
        inputs: (mpsc::Sender<Input<R>>, mpsc::Receiver<Input<R>>),
    ) -> Result<Self, raft::Error>
    where
        D: Disk + Send + 'static,
        T: Transport,
        S: StateMachine<Response = R>,
    {
        let driver =
            Driver::start_applied(config.id, disk, &config.driver, config.planted, applied)?;
        let shared = Arc::new(RwLock::new(Shared::default()));
        let peer_backlog = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = inputs;
        let epoch = Instant::now();
        let lease_us = config.driver.lease;
        let tick = config.tick;
        let renew_asked: Arc<BTreeMap<GroupId, AtomicU64>> =
            Arc::new(driver.groups().map(|g| (g, AtomicU64::new(0))).collect());
        let mut lp = Loop {
            epoch,
            tx: tx.clone(),
            sending_snapshots: BTreeSet::new(),
            snapshots_stepped: BTreeSet::new(),
            tick_due: false,
            renewing: BTreeMap::new(),
            peer_backlog: peer_backlog.clone(),
            compacting: BTreeMap::new(),
            answers: Vec::new(),
            driver,
            config,
            rx,
            transport,
            sm,
            shared: shared.clone(),
            pending: BTreeMap::new(),
            queued: BTreeMap::new(),
            queued_reads: BTreeMap::new(),
            reads_confirming: BTreeMap::new(),
            queued_read_indexes: BTreeMap::new(),
            answer_on_confirm: BTreeSet::new(),
            reads_applying: BTreeMap::new(),
            next_read: read_context_seed(),
            stats: NodeStats::default(),
        };
        lp.publish(lp.driver.groups().collect());
        let on_panic = shared.clone();
        // Ticks come from a thread that sleeps, not from a timed wait of the loop: a sleep
        // is relative, while std's timed waits (`recv_timeout`) wait for an absolute
        // CLOCK_MONOTONIC deadline, which a process under libfaketime (the clock nemesis's
        // rate skew) computes from its faked clock: the loop then slept for good, and a
        // node with no peer traffic (one node) never elected. It stops when the loop ends.
        let ticker_tx = tx.clone();
        std::thread::Builder::new()
            .name("capkv-tick".into())
            .spawn(move || loop {
                std::thread::sleep(tick);
                if ticker_tx.send(Input::Tick).is_err() {
                    return;
                }
            })
            .map_err(|e| raft::Error::Io(std::io::Error::other(e.to_string())))?;
        let thread = std::thread::Builder::new()
            .name("capkv-raft".into())
            .spawn(move || {
                // raft-rs stops on what it holds impossible (e.g. a peer's message that
                // contradicts this node's log). Whatever the cause, the node must not look
                // healthy while nothing drives its groups: it counts as poisoned, and
                // everything waiting is answered (its replies are dropped: `Stopped`).
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(move || lp.run())) {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    let mut s = on_panic.write().unwrap_or_else(|e| e.into_inner());
                    s.poisoned = Some(format!("the Raft engine stopped: {why}"));
                }
            })
            .map_err(|e| raft::Error::Io(std::io::Error::other(e.to_string())))?;
        Ok(RaftNode {
            tx,
            shared,
            peer_backlog,
            thread: std::sync::Mutex::new(Some(thread)),
            epoch,
            lease_us,
            renew_asked,
            lease_reads_outside: AtomicU64::new(0),
            tick,
        })
    }

    /// Starts the engine over the node's storage engine: every group of `groups` (with
    /// its voters, used when the group is new on this disk), each disk turn one atomic
    /// write and one group-commit fsync.
    pub fn start_on_engine<T, S>(
        config: NodeConfig,
        engine: Arc<dyn capkv_storage::StorageEngine>,
        groups: &BTreeMap<GroupId, Vec<u64>>,
        applied: &BTreeMap<GroupId, u64>,
        transport: T,
        sm: S,
    ) -> Result<Self, StartError>
    where
        T: Transport,
        S: StateMachine<Response = R>,
    {
        let (tx, rx) = mpsc::channel();
        let sync_tx = std::sync::Mutex::new(tx.clone());
        let notify: crate::engine_disk::SyncNotify = Arc::new(move |id, result| {
            let sync_tx = sync_tx.lock().unwrap_or_else(|e| e.into_inner());
            let _ = sync_tx.send(Input::Synced {
                id,
                result: result.map_err(|e| e.to_string()),
            });
        });
        let disk = crate::engine_disk::EngineDisk::open(engine, groups, notify)?;
        Ok(Self::start(config, disk, applied, transport, sm, (tx, rx))?)
    }

    /// Where inputs go (proposals, peer messages, sync completions).
    pub fn sender(&self) -> mpsc::Sender<Input<R>> {
        self.tx.clone()
    }

    pub fn propose(&self, group: GroupId, command: Vec<u8>, reply: Reply<R>) {
        if let Err(mpsc::SendError(Input::Propose { reply, .. })) = self.tx.send(Input::Propose {
            group,
            command,
            reply,
        }) {
            reply(Err(ProposeError::Stopped));
        }
    }

    /// Hands a batch received from `from` to the engine (decoded; see [`PeerBatch::decode`]).
    pub fn receive(&self, from: u64, messages: Vec<(GroupId, Message)>) {
        self.peer_backlog.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Input::Peer { from, messages }).is_err() {
            self.peer_backlog.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Peer batches received and not yet taken by the engine's loop: a receiver should
    /// stop reading from the network while this is high, so peers cannot fill memory.
    pub fn peer_backlog(&self) -> usize {
        self.peer_backlog.load(Ordering::Relaxed)
    }

    /// Confirms with a quorum that this node leads `group`, waits until the state machine
    /// applied the read index, then calls `reply` with it. Every read of a group in one
    /// turn shares one confirmation round.
    pub fn read(&self, group: GroupId, reply: ReadReply) {
        if let Err(mpsc::SendError(Input::Read { reply, .. })) =
            self.tx.send(Input::Read { group, reply })
        {
            reply(Err(ProposeError::Stopped));
        }
    }

    /// Asks `group`'s leader (this node or another) for its commit index with a ReadIndex
    /// round, and calls `reply` with it as soon as the leader confirmed it with a quorum,
    /// without waiting for this replica to apply it. Every write acknowledged before this
    /// call is at or below the index: a replica that has applied it may serve a
    /// linearizable read (a follower read), and one a little behind it a bounded-staleness
    /// read. Reads of a group in one turn share one round.
    pub fn read_index(&self, group: GroupId, reply: ReadReply) {
        if let Err(mpsc::SendError(Input::ReadIndex { reply, .. })) =
            self.tx.send(Input::ReadIndex { group, reply })
        {
            reply(Err(ProposeError::Stopped));
        }
    }

    /// Whether a linearizable read of `group` may be served on the caller's thread now,
    /// from the state machine as it is (without the loop): this node leads the group with a
    /// lease that holds now, and its state machine holds every write of earlier terms
    /// (and, as the loop writes it before answering, every write it acknowledged). Stale by
    /// at most one engine turn, which is safe: the lease is a fact about the other nodes
    /// (none can be elected before it ends) and a transfer, which ends it early, is
    /// published before it starts. Past half the lease, asks the loop to renew it.
    pub fn lease_read_now(&self, group: GroupId) -> bool {
        if self.lease_us == 0 {
            return false;
        }
        let until = {
            let s = self.shared.read().unwrap_or_else(|e| e.into_inner());
            if s.poisoned.is_some() {
                return false;
            }
            s.groups.get(&group).map_or(0, |g| g.lease_until)
        };
        let now = self.epoch.elapsed().as_micros() as u64;
        if now >= until {
            return false;
        }
        if until - now < self.lease_us / 2 {
            if let Some(asked) = self.renew_asked.get(&group) {
                if now.saturating_sub(asked.load(Ordering::Relaxed)) >= self.lease_us / 4 {
                    asked.store(now, Ordering::Relaxed);
                    let _ = self.tx.send(Input::RenewLease(group));
                }
            }
        }
        self.lease_reads_outside.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn campaign(&self, group: GroupId) {
        let _ = self.tx.send(Input::Campaign(group));
    }

    /// Hands `group`'s leadership to node `to` if this node leads it and `to` holds the
    /// whole log; otherwise does nothing.
    pub fn transfer_leader(&self, group: GroupId, to: u64) {
        let _ = self.tx.send(Input::TransferLeader(group, to));
    }

    pub fn status(&self, group: GroupId) -> Option<GroupStatus> {
        self.shared
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .groups
            .get(&group)
            .copied()
    }

    pub fn stats(&self) -> NodeStats {
        let mut stats = self.shared.read().unwrap_or_else(|e| e.into_inner()).stats;
        stats.lease_reads_outside = self.lease_reads_outside.load(Ordering::Relaxed);
        stats
    }

    /// Time left of the vote hold after this node's restart (at least: ticks may come
    /// late, never early).
    pub fn vote_hold_remaining(&self) -> Duration {
        let ticks = self
            .shared
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .vote_hold_ticks;
        self.tick * ticks as u32
    }

    pub fn poisoned(&self) -> Option<String> {
        self.shared
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .poisoned
            .clone()
    }

    /// Stops the loop and waits for it. Pending proposals are answered `Stopped`; later
    /// ones too. Stopping twice is fine.
    pub fn stop(&self) {
        let _ = self.tx.send(Input::Stop);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl<R> Drop for RaftNode<R> {
    fn drop(&mut self) {
        let _ = self.tx.send(Input::Stop);
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// What the entry applied at an index says of a proposal waiting for its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The proposal's own entry: applied.
    Applied,
    /// Another entry took its index, or an entry of a later term was applied before its
    /// index (terms never decrease along a log): it never commits.
    Dropped,
    /// Its index passed without being applied here (a snapshot covered it).
    Unknown,
    Wait,
}

/// `pending` and `applied` are (index, term).
fn outcome(pending: (u64, u64), applied: (u64, u64)) -> Outcome {
    let ((pi, pt), (index, term)) = (pending, applied);
    if pi == index && pt == term {
        Outcome::Applied
    } else if pi == index || (pi > index && pt < term) {
        Outcome::Dropped
    } else if pi < index {
        Outcome::Unknown
    } else {
        Outcome::Wait
    }
}

/// A proposal's reply and what it is told.
type Answer<R> = (Reply<R>, Result<R, ProposeError>);

/// A group's commands received in one turn, with their replies.
type Queued<R> = (Vec<Vec<u8>>, Vec<Reply<R>>);

/// A proposal waiting for its entry: index, term, and the replies of its commands.
type Pending<R> = (u64, u64, Vec<Reply<R>>);

struct Loop<D: Disk, T, S: StateMachine> {
    driver: Driver<D>,
    config: NodeConfig,
    rx: mpsc::Receiver<Input<S::Response>>,
    transport: T,
    sm: S,
    shared: Arc<RwLock<Shared>>,
    peer_backlog: Arc<AtomicUsize>,
    /// Per group, the compaction point proposed and not yet applied here.
    compacting: BTreeMap<GroupId, u64>,
    /// Answers of proposals applied this turn, sent once the state machine committed.
    answers: Vec<Answer<S::Response>>,
    pending: BTreeMap<GroupId, VecDeque<Pending<S::Response>>>,
    /// Commands received this turn, per group, with their replies.
    queued: BTreeMap<GroupId, Queued<S::Response>>,
    /// Reads received this turn, per group.
    queued_reads: BTreeMap<GroupId, Vec<ReadReply>>,
    /// Read-index asks received this turn, per group (see [`RaftNode::read_index`]).
    queued_read_indexes: BTreeMap<GroupId, Vec<ReadReply>>,
    /// Reads whose confirmation is under way, by context: group, when asked, replies.
    reads_confirming: BTreeMap<u64, (GroupId, Instant, Vec<ReadReply>)>,
    /// Contexts in `reads_confirming` answered on confirmation, not once applied.
    answer_on_confirm: BTreeSet<u64>,
    /// Confirmed reads waiting for the state machine to apply their index.
    reads_applying: BTreeMap<GroupId, Vec<(u64, Vec<ReadReply>)>>,
    next_read: u64,
    stats: NodeStats,
    /// The zero of the driver's clock.
    epoch: Instant,
    /// Per group, the context of the ReadIndex round asked only to renew its lease.
    renewing: BTreeMap<GroupId, u64>,
    /// The loop's own inputs (for snapshot streams to report back).
    tx: mpsc::Sender<Input<S::Response>>,
    /// Snapshots being streamed: (group, peer).
    sending_snapshots: BTreeSet<(GroupId, u64)>,
    /// Groups given a `MsgSnapshot` this turn (whose image is held for the install).
    snapshots_stepped: BTreeSet<GroupId>,
    /// A tick arrived this turn.
    tick_due: bool,
}

/// Where a node's read contexts start. They must not repeat across its restarts (a leader
/// drops a ReadIndex whose context it still has pending, and an answer to the previous
/// process's ask would be taken for the new one's), so the start is random: the
/// process's hasher keys, mixed with the time and the process id.
fn read_context_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    // Leave room to count up without wrapping.
    h.finish() >> 1
}

impl<D: Disk, T: Transport, S: StateMachine> Loop<D, T, S> {
    fn run(mut self) {
        'outer: loop {
            let first = match self.rx.recv() {
                Ok(i) => Some(i),
                Err(_disconnected) => break,
            };
            let mut taken = 0;
            let mut next = first;
            while let Some(input) = next {
                if !self.handle(input) {
                    break 'outer;
                }
                taken += 1;
                if taken >= self.config.max_inputs_per_turn {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            if std::mem::take(&mut self.tick_due) {
                self.driver.tick();
            }
            self.turn();
        }
        // Stopping: what is pending may still commit elsewhere.
        self.fail_all(|| ProposeError::Stopped);
    }

    /// Answers everything waiting with `err`: proposals (they may still commit
    /// elsewhere) and reads.
    fn fail_all(&mut self, err: impl Fn() -> ProposeError) {
        for (_, q) in std::mem::take(&mut self.pending) {
            for (_, _, replies) in q {
                for r in replies {
                    r(Err(err()));
                }
            }
        }
        for (_, (_, replies)) in std::mem::take(&mut self.queued) {
            for r in replies {
                r(Err(err()));
            }
        }
        self.answer_on_confirm.clear();
        let reads = std::mem::take(&mut self.queued_reads)
            .into_values()
            .flatten()
            .chain(
                std::mem::take(&mut self.queued_read_indexes)
                    .into_values()
                    .flatten(),
            )
            .chain(
                std::mem::take(&mut self.reads_confirming)
                    .into_values()
                    .flat_map(|(_, _, r)| r),
            )
            .chain(
                std::mem::take(&mut self.reads_applying)
                    .into_values()
                    .flatten()
                    .flat_map(|(_, r)| r),
            );
        for r in reads {
            r(Err(err()));
        }
    }

    /// Takes one input; false to stop.
    fn handle(&mut self, input: Input<S::Response>) -> bool {
        match input {
            Input::Propose {
                group,
                command,
                reply,
            } => {
                let q = self.queued.entry(group).or_default();
                q.0.push(command);
                q.1.push(reply);
            }
            Input::Peer { from, messages } => {
                self.peer_backlog.fetch_sub(1, Ordering::Relaxed);
                self.driver.heard_from(from);
                for (g, m) in messages {
                    if m.msg_type == MessageType::MsgSnapshot {
                        // Its image comes separately and must be here, whole, first.
                        let index = m.get_snapshot().get_metadata().index;
                        if !self.sm.snapshot_ready(g, index) {
                            continue;
                        }
                        self.snapshots_stepped.insert(g);
                    }
                    self.driver.step(g, m);
                }
            }
            Input::Synced { id, result } => match result {
                Ok(()) => self.driver.on_synced(id),
                Err(e) => self.driver.poison(e),
            },
            Input::Read { group, reply } => self.queued_reads.entry(group).or_default().push(reply),
            Input::ReadIndex { group, reply } => self
                .queued_read_indexes
                .entry(group)
                .or_default()
                .push(reply),
            Input::Campaign(g) => self.driver.campaign(g),
            Input::TransferLeader(g, to) => {
                if self.driver.transfer_leader(g, to) {
                    self.stats.leader_transfers += 1;
                    // The lease ends now, before the transferee can be told to campaign:
                    // lease reads outside the loop must see that first.
                    self.publish(vec![g]);
                }
            }
            Input::RenewLease(g) => self.renew_lease(g),
            Input::SnapshotDone {
                group,
                to,
                delivered,
            } => {
                self.sending_snapshots.remove(&(group, to));
                if delivered {
                    self.stats.snapshots_sent += 1;
                } else {
                    self.stats.snapshots_failed += 1;
                }
                self.driver.report_snapshot(group, to, delivered);
            }
            Input::Stop => return false,
            Input::Tick => self.tick_due = true,
        }
        true
    }

    /// A ReadIndex context: this node's id, then a number it never used before. Leaders
    /// see contexts of every replica in one queue (and drop a repeated one), so they must
    /// differ between nodes.
    fn read_context(&self, n: u64) -> Vec<u8> {
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.config.id.to_be_bytes());
        ctx.extend_from_slice(&n.to_be_bytes());
        ctx
    }

    /// The number in one of this node's read contexts.
    fn own_read_context(&self, ctx: &[u8]) -> Option<u64> {
        let (node, n) = ctx.split_first_chunk::<8>()?;
        let n = <[u8; 8]>::try_from(n).ok()?;
        (u64::from_be_bytes(*node) == self.config.id).then_some(u64::from_be_bytes(n))
    }

    /// The driver's clock: microseconds since the loop started.
    fn clock(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Asks a ReadIndex round for `group` with no read waiting, to renew its lease, if it
    /// is past half and no renewal is under way.
    fn renew_lease(&mut self, group: GroupId) {
        let Some(lease) = self.driver.lease_read(group) else {
            return;
        };
        let now = self.clock();
        if lease.until.saturating_sub(now) >= self.config.driver.lease / 2
            || self.renewing.contains_key(&group)
        {
            return;
        }
        let ctx = self.next_read;
        self.next_read += 1;
        if self
            .driver
            .read_index(group, self.read_context(ctx))
            .is_ok()
        {
            self.stats.lease_renewals += 1;
            self.renewing.insert(group, ctx);
            self.reads_confirming
                .insert(ctx, (group, Instant::now(), Vec::new()));
        }
    }

    fn turn(&mut self) {
        self.stats.turns += 1;
        // Everything proposed or asked from here is sent after this time.
        self.driver.set_time(self.clock());
        // Every group's commands of this turn become one entry (more than one only past
        // ENTRY_BYTES_MAX: raft-rs sends at least a whole entry per message, so an entry
        // must stay well under what a peer accepts).
        for (group, (commands, replies)) in std::mem::take(&mut self.queued) {
            self.stats.proposals += commands.len() as u64;
            let mut items = commands.into_iter().zip(replies).peekable();
            while items.peek().is_some() {
                let mut chunk = Vec::new();
                let mut chunk_replies = Vec::new();
                let mut bytes = 0usize;
                while let Some((c, _)) = items.peek() {
                    if !chunk.is_empty() && bytes + c.len() > ENTRY_BYTES_MAX {
                        break;
                    }
                    bytes += c.len();
                    if let Some((c, r)) = items.next() {
                        chunk.push(c);
                        chunk_replies.push(r);
                    }
                }
                self.propose_entry(group, chunk, chunk_replies);
            }
        }
        // Every group's reads of this turn share one confirmation, or the leader's lease.
        for (group, replies) in std::mem::take(&mut self.queued_reads) {
            if let Some(lease) = self.driver.lease_read(group) {
                self.stats.lease_reads += replies.len() as u64;
                self.reads_applying
                    .entry(group)
                    .or_default()
                    .push((lease.index, replies));
                self.renew_lease(group);
                continue;
            }
            self.stats.read_index_reads += replies.len() as u64;
            let ctx = self.next_read;
            self.next_read += 1;
            match self.driver.read_index(group, self.read_context(ctx)) {
                Ok(()) => {
                    self.reads_confirming
                        .insert(ctx, (group, Instant::now(), replies));
                }
                Err(e) => {
                    for r in replies {
                        r(Err(e.clone()));
                    }
                }
            }
        }
        // Read-index asks (follower reads, bounded staleness): one round per group,
        // through its leader wherever it is.
        for (group, replies) in std::mem::take(&mut self.queued_read_indexes) {
            self.stats.read_index_asks += replies.len() as u64;
            let ctx = self.next_read;
            self.next_read += 1;
            match self
                .driver
                .read_index_anywhere(group, self.read_context(ctx))
            {
                Ok(()) => {
                    self.reads_confirming
                        .insert(ctx, (group, Instant::now(), replies));
                    self.answer_on_confirm.insert(ctx);
                }
                Err(e) => {
                    for r in replies {
                        r(Err(e.clone()));
                    }
                }
            }
        }
        self.driver.run();
        // Snapshots installed by this turn's write: the state machine reloads them before
        // anything after them is applied.
        let mut installed = BTreeSet::new();
        for r in self.driver.take_restored() {
            if self.driver.poisoned().is_some() {
                break;
            }
            if let Err(e) = self.sm.restored(r.group, r.index) {
                self.driver.poison(format!(
                    "installing the snapshot of group {} at {}: {e}",
                    r.group, r.index
                ));
                break;
            }
            self.stats.snapshots_installed += 1;
            installed.insert(r.group);
            // Proposals at indexes the snapshot covers: their entries may or may not be
            // the ones it holds.
            if let Some(q) = self.pending.get_mut(&r.group) {
                let (covered, rest): (VecDeque<_>, VecDeque<_>) =
                    q.drain(..).partition(|(pi, _, _)| *pi <= r.index);
                *q = rest;
                for (_, _, replies) in covered {
                    for reply in replies {
                        reply(Err(ProposeError::Stopped));
                    }
                }
            }
        }
        for g in std::mem::take(&mut self.snapshots_stepped) {
            if !installed.contains(&g) {
                self.sm.snapshot_dropped(g);
            }
        }
        let out = self.driver.take_outbox();
        let pings = self.driver.take_pings();
        if !out.is_empty() || !pings.is_empty() {
            let mut per_peer: BTreeMap<u64, Vec<(GroupId, WireMessage)>> = BTreeMap::new();
            for o in out {
                if o.message.msg_type == MessageType::MsgSnapshot
                    && self.config.driver.caller_reports_snapshots
                {
                    self.send_snapshot(o.to, o.group, o.message);
                    continue;
                }
                per_peer
                    .entry(o.to)
                    .or_default()
                    .push((o.group, WireMessage::from(&o.message)));
            }
            // A peer that gets nothing else this turn gets an empty batch: the ping.
            for p in pings {
                per_peer.entry(p).or_default();
            }
            for (to, messages) in per_peer {
                self.stats.batches_sent += 1;
                self.stats.messages_sent += messages.len() as u64;
                self.transport.send(PeerBatch {
                    from: self.config.id,
                    to,
                    messages,
                });
            }
        }
        let mut applied_groups = BTreeSet::new();
        for c in self.driver.take_committed() {
            if self.driver.poisoned().is_some() {
                break;
            }
            applied_groups.insert(c.group);
            self.apply(c.group, c.entry);
        }
        if self.driver.poisoned().is_none() {
            if let Err(e) = self.sm.commit() {
                self.driver.poison(format!(
                    "writing what the state machine applied failed: {e}"
                ));
            }
        }
        if self.driver.poisoned().is_some() {
            // Not visible to readers: these may not be acknowledged as applied (they are
            // committed in the log, so they may still be: unknown).
            for (r, _) in self.answers.drain(..) {
                r(Err(ProposeError::Stopped));
            }
        } else {
            for (r, answer) in self.answers.drain(..) {
                r(answer);
            }
        }
        for g in applied_groups {
            self.maybe_compact(g);
        }
        // A poisoned engine answers no read: its applied index may count entries the state
        // machine could not write, so a read "at" it could miss them.
        if self.driver.poisoned().is_some() {
            self.fail_all(|| ProposeError::Stopped);
        } else {
            self.finish_reads();
        }
        let touched = self.driver.take_touched();
        self.publish(touched);
    }

    /// Streams the state machine of `group` to `to` with `message` (the leader's
    /// `MsgSnapshot`), its metadata moved to the state machine's applied index: the image
    /// is the state machine as committed, which is at that index, not at the log's start
    /// raft-rs named (the log holds everything between, so the follower goes on from
    /// there). One stream per group and peer at a time.
    fn send_snapshot(&mut self, to: u64, group: GroupId, mut message: Message) {
        if self.sending_snapshots.contains(&(group, to)) {
            return;
        }
        let image = match self.sm.snapshot(group) {
            Ok(Some(image)) => image,
            Ok(None) | Err(_) => {
                self.stats.snapshots_failed += 1;
                self.driver.report_snapshot(group, to, false);
                return;
            }
        };
        let Some(applied) = self.driver.status(group).map(|s| s.applied) else {
            return;
        };
        let term = self.driver.log(group).and_then(|(log, _)| {
            if applied == log.snapshot_index {
                Some(log.snapshot_term)
            } else {
                log.entry(applied).map(|e| e.term)
            }
        });
        let Some(term) = term else {
            self.driver.report_snapshot(group, to, false);
            return;
        };
        let meta = message.mut_snapshot().mut_metadata();
        meta.index = applied;
        meta.term = term;
        self.sending_snapshots.insert((group, to));
        let tx = self.tx.clone();
        self.transport.send_snapshot(
            to,
            group,
            message,
            image,
            Box::new(move |delivered| {
                let _ = tx.send(Input::SnapshotDone {
                    group,
                    to,
                    delivered,
                });
            }),
        );
    }

    /// On a leader, proposes compacting `group`'s log (one proposal in flight at a time)
    /// once every voter holds `compact_after_entries` past its start; or, once it applied
    /// twice as many, up to what the voters not further behind than that hold (a
    /// voter that is down or far behind then gets a snapshot, instead of holding back
    /// every other replica's log) when snapshots can be sent.
    fn maybe_compact(&mut self, group: GroupId) {
        let n = self.config.compact_after_entries.max(1);
        let Some(point) = self.driver.compaction_point(group, n) else {
            return;
        };
        let start = point.start;
        let upto = if point.all_hold >= start + n {
            point.all_hold
        } else if self.config.driver.caller_reports_snapshots
            && point.near_hold >= start + 2 * n
            // A voter being sent a snapshot counts as holding none of the log yet; the
            // log past the image must stay, or it needs another snapshot at once.
            && !self.sending_snapshots.iter().any(|(g, _)| *g == group)
        {
            point.near_hold
        } else {
            return;
        };
        if self.compacting.get(&group).is_some_and(|&p| p >= upto) {
            return;
        }
        let data = postcard::to_stdvec(&EntryPayload::CompactLog { upto }).unwrap_or_default();
        if self.driver.propose(group, data).is_ok() {
            self.compacting.insert(group, upto);
        }
    }

    /// Proposes `commands` as one entry of `group`; their replies wait for its outcome.
    fn propose_entry(
        &mut self,
        group: GroupId,
        commands: Vec<Vec<u8>>,
        replies: Vec<Reply<S::Response>>,
    ) {
        let commands = commands
            .into_iter()
            .map(serde_bytes::ByteBuf::from)
            .collect();
        let data = postcard::to_stdvec(&EntryPayload::Commands(commands)).unwrap_or_default();
        match self.driver.propose(group, data) {
            Ok((index, term)) => {
                self.stats.entries_proposed += 1;
                self.pending
                    .entry(group)
                    .or_default()
                    .push_back((index, term, replies));
            }
            Err(e) => {
                for r in replies {
                    r(Err(e.clone()));
                }
            }
        }
    }

    fn apply(&mut self, group: GroupId, entry: Entry) {
        let (index, term) = (entry.index, entry.term);
        let mut compact_to = None;
        let commands = if entry.entry_type == EntryType::EntryNormal && !entry.data.is_empty() {
            match postcard::from_bytes::<EntryPayload>(&entry.data) {
                Ok(EntryPayload::Commands(c)) => {
                    c.into_iter().map(serde_bytes::ByteBuf::into_vec).collect()
                }
                Ok(EntryPayload::CompactLog { upto }) => {
                    compact_to = Some(upto.min(index));
                    Vec::new()
                }
                // Written by this engine and agreed by a quorum: unreadable means the
                // node must not go on guessing.
                Err(e) => {
                    self.driver.poison(format!(
                        "committed entry {index} of group {group} is unreadable: {e}"
                    ));
                    return;
                }
            }
        } else {
            Vec::new()
        };
        let mut responses = match self.sm.apply(group, index, term, commands) {
            Ok(r) => r.into_iter(),
            Err(e) => {
                self.driver.poison(format!(
                    "applying entry {index} of group {group} failed: {e}"
                ));
                return;
            }
        };
        self.driver.applied(group, index);
        if let Some(upto) = compact_to {
            // The log's image at `upto` is the state machine itself (in the node's
            // storage), so the compaction carries no copy of it.
            if let Err(e) = self.driver.compact(group, upto, Vec::new()) {
                self.driver
                    .poison(format!("compacting group {group}'s log: {e}"));
                return;
            }
            self.compacting.remove(&group);
            self.stats.compactions += 1;
        }
        let Some(q) = self.pending.get_mut(&group) else {
            return;
        };
        // Not sorted by index: a leader that lost its log's tail and was elected again
        // proposes at indexes it had used before. So every waiting proposal is looked at.
        let mut keep = VecDeque::with_capacity(q.len());
        for (pi, pt, replies) in q.drain(..) {
            let err = match outcome((pi, pt), (index, term)) {
                Outcome::Applied => {
                    // Answered once the state machine committed the turn.
                    for r in replies {
                        match responses.next() {
                            Some(resp) => self.answers.push((r, Ok(resp))),
                            // The state machine answered fewer commands than it got.
                            None => self.answers.push((r, Err(ProposeError::Stopped))),
                        }
                    }
                    continue;
                }
                Outcome::Wait => {
                    keep.push_back((pi, pt, replies));
                    continue;
                }
                Outcome::Dropped => ProposeError::Dropped,
                Outcome::Unknown => ProposeError::Stopped,
            };
            for r in replies {
                r(Err(err.clone()));
            }
        }
        *q = keep;
    }

    /// Moves confirmed reads on to waiting for their index, answers those whose index is
    /// applied, and gives up on confirmations that took longer than two election
    /// timeouts (raft-rs drops a ReadIndex silently when leadership is lost).
    fn finish_reads(&mut self) {
        for rs in self.driver.take_read_states() {
            let Some(ctx) = self.own_read_context(&rs.context) else {
                continue;
            };
            if self.renewing.get(&rs.group) == Some(&ctx) {
                self.renewing.remove(&rs.group);
            }
            if self.answer_on_confirm.remove(&ctx) {
                if let Some((_, _, replies)) = self.reads_confirming.remove(&ctx) {
                    for r in replies {
                        r(Ok(rs.index));
                    }
                }
                continue;
            }
            if let Some((group, _, replies)) = self.reads_confirming.remove(&ctx) {
                debug_assert_eq!(group, rs.group);
                self.reads_applying
                    .entry(group)
                    .or_default()
                    .push((rs.index, replies));
            }
        }
        let driver = &self.driver;
        self.reads_applying.retain(|group, waiting| {
            let applied = driver.status(*group).map_or(0, |s| s.applied);
            waiting.retain_mut(|(index, replies)| {
                if *index > applied {
                    return true;
                }
                for r in replies.drain(..) {
                    r(Ok(*index));
                }
                false
            });
            !waiting.is_empty()
        });
        if !self.reads_confirming.is_empty() {
            let limit = self.config.tick * (2 * self.config.driver.election_ticks as u32);
            let now = Instant::now();
            let expired: Vec<u64> = self
                .reads_confirming
                .iter()
                .filter(|(_, (_, at, _))| now.duration_since(*at) > limit)
                .map(|(ctx, _)| *ctx)
                .collect();
            for ctx in expired {
                self.answer_on_confirm.remove(&ctx);
                if let Some((group, _, replies)) = self.reads_confirming.remove(&ctx) {
                    if self.renewing.get(&group) == Some(&ctx) {
                        self.renewing.remove(&group);
                    }
                    for r in replies {
                        r(Err(ProposeError::ReadTimedOut));
                    }
                }
            }
        }
    }

    fn publish(&mut self, groups: Vec<GroupId>) {
        let mut s = self.shared.write().unwrap_or_else(|e| e.into_inner());
        for g in groups {
            if let Some(st) = self.driver.status(g) {
                s.groups.insert(g, st);
            }
        }
        self.stats.driver = self.driver.stats();
        s.stats = self.stats;
        s.vote_hold_ticks = self.driver.vote_hold_ticks();
        if s.poisoned.is_none() {
            s.poisoned = self.driver.poisoned().map(str::to_string);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{outcome, Outcome};

    #[test]
    fn a_proposal_learns_its_fate_from_the_entries_applied() {
        // Own entry, another leader's entry at its index, not there yet.
        assert_eq!(outcome((13, 5), (13, 5)), Outcome::Applied);
        assert_eq!(outcome((13, 2), (13, 5)), Outcome::Dropped);
        assert_eq!(outcome((14, 5), (13, 5)), Outcome::Wait);
        // A leader of term 2 proposed 11..=15, lost its tail back to 11, was elected again
        // in term 5 and proposed at 13: once (13, 5) is applied, (14, 2) and (15, 2) can
        // never commit (a log's terms never decrease), while (14, 5) may.
        assert_eq!(outcome((14, 2), (13, 5)), Outcome::Dropped);
        assert_eq!(outcome((15, 2), (13, 5)), Outcome::Dropped);
        // Skipped by a snapshot: unknown.
        assert_eq!(outcome((10, 5), (13, 5)), Outcome::Unknown);
    }
}
