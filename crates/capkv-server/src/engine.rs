//! The raftstore engine (`--engine raftstore`): one `capkv_raftstore` engine thread drives
//! every partition's Raft group of this node; this module gives it capkv's state machine
//! and a transport over the peers' gRPC connections, and answers writes and reads.
//!
//! - Writes: each command is proposed to its partition's group; the engine puts every
//!   command of a group's turn in one Raft entry, and [`CapkvMachine`] gives each command
//!   its own revision (a per-partition counter) when the entry applies.
//! - Reads: with `--read-policy lease` (the default) a leader whose lease holds reads its
//!   state machine at once, on the caller's thread ([`EngineNode::lease_read_now`]);
//!   otherwise (no lease, or `--read-policy read-index`) the engine confirms leadership
//!   with raft-rs's ReadIndex (one round per group per engine turn), or its lease, and
//!   answers once the read index is applied. The lease is renewed by what a quorum
//!   acknowledges (committed proposals, ReadIndex rounds), see `capkv_raftstore::driver`.
//! - Transport: one client stream per peer (`RaftTransport.Engine`), one frame per engine
//!   turn and peer; frames are dropped when a peer's queue is full (Raft resends).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capkv_proto::raft::raft_transport_client::RaftTransportClient;
use capkv_proto::raft::{EngineFrame, EngineSnapshotChunk, SnapshotPair, SnapshotSession};
use capkv_raftstore::codec::{PeerBatch, WireMessage};
use capkv_raftstore::driver::{DriverConfig, GroupStatus, ProposeError};
use capkv_raftstore::node::{
    NodeConfig as EngineConfig, RaftNode, SnapshotDone, SnapshotImage, StateMachine, Transport,
};
use capkv_raftstore::storage::GroupId;
use capkv_replication::apply::Applier;
use capkv_replication::codec::{decode, encode};
use capkv_replication::{AppliedIndex, Command, CommandResponse, Faults, KeyCounts};
use capkv_storage::StorageEngine;
use capkv_types::{Hlc, NodeId, PartitionId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::GroupSettings;
use crate::transport::{PeerChannels, RAFT_MESSAGE_BYTES_MAX};

/// What a partition's state machine records besides data, on the raftstore engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct EngineApplied {
    /// The last Raft entry applied.
    index: u64,
    term: u64,
    /// The last revision given to a command (one per command; an entry carries many).
    revision: u64,
    /// The highest HLC stamp applied.
    last_hlc: u64,
    /// The partition's keys (DBSIZE, INFO keyspace). Missing from applied state written
    /// before capkv kept it: see [`EngineApplied::decode`].
    counts: KeyCounts,
}

impl EngineApplied {
    /// Decodes applied state; `false` when it was written without key counts (they are
    /// then counted from storage when the partition opens).
    fn decode(bytes: &[u8]) -> std::io::Result<(Self, bool)> {
        #[derive(Deserialize)]
        struct WithoutCounts {
            index: u64,
            term: u64,
            revision: u64,
            last_hlc: u64,
        }
        match decode::<EngineApplied>(bytes) {
            Ok(state) => Ok((state, true)),
            Err(e) => match decode::<WithoutCounts>(bytes) {
                Ok(old) => Ok((
                    EngineApplied {
                        index: old.index,
                        term: old.term,
                        revision: old.revision,
                        last_hlc: old.last_hlc,
                        counts: KeyCounts::default(),
                    },
                    false,
                )),
                Err(_) => Err(e),
            },
        }
    }

    /// Applied state as stored: `None` when there is none.
    fn load(bytes: Option<Vec<u8>>) -> std::io::Result<(Self, bool)> {
        match bytes {
            Some(b) => Self::decode(&b),
            None => Ok((EngineApplied::default(), true)),
        }
    }
}

struct PartitionMachine {
    applier: Applier,
    state: EngineApplied,
    applied_index: Arc<AppliedIndex>,
}

/// Snapshot chunks carry about this many bytes of data.
const SNAPSHOT_CHUNK_BYTES: usize = 256 * 1024;

/// A snapshot stream that has not finished in this long is abandoned (raft-rs then sends
/// another).
const SNAPSHOT_STREAM_TIMEOUT: Duration = Duration::from_secs(600);

/// A complete image whose `MsgSnapshot` has not been taken after this long may be replaced
/// by a new stream.
const STAGED_STALE_AFTER: Duration = Duration::from_secs(30);

/// A receiving stream waits at most this long for its next chunk.
pub const SNAPSHOT_CHUNK_WAIT: Duration = Duration::from_secs(60);

/// Where a partition's incoming snapshot is. Only the stream named by `Receiving` writes
/// the partition's staging; a stream that gave up leaves it `Clearing` until its staging is
/// gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbound {
    /// Stream number `stream` is writing its chunks into the staging.
    Receiving { stream: u64 },
    /// Staged whole; its `MsgSnapshot` went to the engine.
    Complete { index: u64, since: Instant },
    /// The engine took it: its next disk write installs it.
    Installing,
    /// Abandoned: its staging is being removed.
    Clearing,
}

/// The raftstore engine's snapshots on this node: the images being received (one per
/// partition at a time, staged in storage beside the live state machine) and byte counts.
#[derive(Debug, Default)]
pub struct Snapshots {
    inbound: Mutex<BTreeMap<GroupId, Inbound>>,
    /// Held across every write to, or clear of, a staging, with the check that the writer
    /// still owns it: an abandoned stream's late write finds `Clearing` (or another
    /// stream) and writes nothing, and a clear never interleaves with a write.
    staging: Mutex<()>,
    next_stream: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Streams under way, each way.
    pub sending: AtomicU64,
    pub receiving: AtomicU64,
}

impl Snapshots {
    fn inbound(&self) -> std::sync::MutexGuard<'_, BTreeMap<GroupId, Inbound>> {
        self.inbound.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn staging(&self) -> std::sync::MutexGuard<'_, ()> {
        self.staging.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether stream `stream` still owns partition `p`'s staging.
    fn owns(&self, p: GroupId, stream: u64) -> bool {
        self.inbound().get(&p) == Some(&Inbound::Receiving { stream })
    }

    /// Marks `p`'s staging abandoned and removes it on a thread of its own (a whole image
    /// may take a while; never on the engine thread or a runtime worker).
    fn abandon(self: &Arc<Self>, storage: &Arc<dyn StorageEngine>, p: GroupId) {
        self.inbound().insert(p, Inbound::Clearing);
        let (snapshots, storage) = (self.clone(), storage.clone());
        std::thread::spawn(move || {
            let cleared = {
                let _staging = snapshots.staging();
                storage.sm_stage_clear(PartitionId(p))
            };
            if let Err(e) = cleared {
                tracing::warn!(partition = p, "clearing an abandoned snapshot: {e}");
            }
            let mut inbound = snapshots.inbound();
            if inbound.get(&p) == Some(&Inbound::Clearing) {
                inbound.remove(&p);
            }
        });
    }
}

/// Every hosted partition's state machine. What a turn applies is written by
/// [`StateMachine::commit`] as one batch for all partitions.
pub struct CapkvMachine {
    engine: Arc<dyn StorageEngine>,
    partitions: BTreeMap<GroupId, PartitionMachine>,
    /// Partitions applied to since the last commit.
    dirty: std::collections::BTreeSet<GroupId>,
    hlc: Arc<Hlc>,
    session_ttl_ms: u64,
    snapshots: Arc<Snapshots>,
}

impl CapkvMachine {
    /// Opens the state machine of each partition in `partitions`; returns it with the
    /// index each has applied and its readable applied index.
    #[allow(clippy::type_complexity)]
    pub fn open(
        engine: &Arc<dyn StorageEngine>,
        partitions: &[PartitionId],
        hlc: &Arc<Hlc>,
        session_ttl_ms: u64,
        snapshots: &Arc<Snapshots>,
    ) -> std::io::Result<(
        Self,
        BTreeMap<GroupId, u64>,
        BTreeMap<PartitionId, Arc<AppliedIndex>>,
    )> {
        let mut machines = BTreeMap::new();
        let mut applied = BTreeMap::new();
        // Partitions whose keys were counted at open: their applied state is written with
        // the counts at the first commit, so the count is not repeated at every start.
        let mut recounted = std::collections::BTreeSet::new();
        // An image half received before the node stopped is of no use now.
        for p in partitions {
            engine.sm_stage_clear(*p)?;
        }
        let mut indexes = BTreeMap::new();
        for p in partitions {
            let (mut state, counted) = EngineApplied::load(engine.sm_applied(*p)?)?;
            let applier = Applier::open(
                engine.clone(),
                *p,
                hlc.clone(),
                session_ttl_ms,
                state.last_hlc,
                counted.then_some(state.counts),
            )?;
            state.counts = applier.counts();
            if !counted {
                recounted.insert(p.0);
            }
            let applied_index = Arc::new(AppliedIndex::default());
            applied_index.set_counts(state.counts);
            applied_index.set(state.index);
            applied.insert(p.0, state.index);
            indexes.insert(*p, applied_index.clone());
            machines.insert(
                p.0,
                PartitionMachine {
                    applier,
                    state,
                    applied_index,
                },
            );
        }
        Ok((
            CapkvMachine {
                engine: engine.clone(),
                partitions: machines,
                dirty: recounted,
                hlc: hlc.clone(),
                session_ttl_ms,
                snapshots: snapshots.clone(),
            },
            applied,
            indexes,
        ))
    }
}

impl StateMachine for CapkvMachine {
    type Response = CommandResponse;

    fn apply(
        &mut self,
        group: GroupId,
        index: u64,
        term: u64,
        commands: Vec<Vec<u8>>,
    ) -> Result<Vec<CommandResponse>, String> {
        let m = self
            .partitions
            .get_mut(&group)
            .ok_or_else(|| format!("no state machine for partition {group}"))?;
        let mut responses = Vec::with_capacity(commands.len());
        for bytes in commands {
            // Encoded by a capkv leader and committed by a quorum: unreadable means the
            // log is not what this node can apply, and guessing would diverge.
            let cmd: Command = decode(&bytes)
                .map_err(|e| format!("command in entry {index} of partition {group}: {e}"))?;
            m.state.revision += 1;
            let mut response = m
                .applier
                .execute(m.state.revision, cmd)
                .map_err(|e| e.to_string())?;
            // A stored answer to a retry belongs to an earlier entry.
            if !response.deduplicated {
                response.log_index = index;
            }
            responses.push(response);
        }
        m.state.index = index;
        m.state.term = term;
        m.state.last_hlc = m.applier.last_hlc();
        m.state.counts = m.applier.counts();
        self.dirty.insert(group);
        Ok(responses)
    }

    fn snapshot(&mut self, group: GroupId) -> Result<Option<SnapshotImage>, String> {
        self.engine
            .sm_snapshot(PartitionId(group))
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn snapshot_ready(&mut self, group: GroupId, index: u64) -> bool {
        let mut inbound = self.snapshots.inbound();
        match inbound.get(&group) {
            Some(Inbound::Complete { index: i, .. }) if *i == index => {
                inbound.insert(group, Inbound::Installing);
                // The install makes the image visible before `restored` publishes it.
                if let Some(m) = self.partitions.get(&group) {
                    m.applied_index.begin(index);
                }
                true
            }
            _ => false,
        }
    }

    /// Reloads the partition's state machine from what the install wrote.
    fn restored(&mut self, group: GroupId, index: u64) -> Result<(), String> {
        self.snapshots.inbound().remove(&group);
        let p = PartitionId(group);
        let m = self
            .partitions
            .get_mut(&group)
            .ok_or_else(|| format!("no state machine for partition {group}"))?;
        let (mut state, counted) =
            EngineApplied::load(self.engine.sm_applied(p).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        if state.index != index {
            return Err(format!(
                "the image installed for partition {p} is at index {}, its snapshot at {index}",
                state.index
            ));
        }
        m.applier = Applier::open(
            self.engine.clone(),
            p,
            self.hlc.clone(),
            self.session_ttl_ms,
            state.last_hlc,
            counted.then_some(state.counts),
        )
        .map_err(|e| e.to_string())?;
        state.counts = m.applier.counts();
        m.state = state;
        m.applied_index.set_counts(state.counts);
        m.applied_index.set(state.index);
        self.dirty.remove(&group);
        tracing::info!(
            partition = group,
            index,
            term = state.term,
            "installed snapshot"
        );
        Ok(())
    }

    fn snapshot_dropped(&mut self, group: GroupId) {
        let installing = self.snapshots.inbound().get(&group) == Some(&Inbound::Installing);
        if installing {
            self.snapshots.abandon(&self.engine, group);
        }
    }

    /// Writes what every partition applied since the last commit as one storage batch,
    /// then publishes the applied indexes (a reader who sees one sees its writes).
    fn commit(&mut self) -> Result<(), String> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let mut writes = Vec::with_capacity(self.dirty.len());
        for g in &self.dirty {
            let Some(m) = self.partitions.get_mut(g) else {
                continue;
            };
            // Readers may see the write as soon as it is made: raise the bound first.
            m.applied_index.begin(m.state.index);
            let state = encode(&m.state).map_err(|e| e.to_string())?;
            let write = m.applier.take_write(state).map_err(|e| e.to_string())?;
            writes.push((PartitionId(*g), write));
        }
        self.engine
            .sm_write_many(writes)
            .map_err(|e| e.to_string())?;
        for g in std::mem::take(&mut self.dirty) {
            if let Some(m) = self.partitions.get_mut(&g) {
                m.applier.written();
                m.applied_index.set_counts(m.state.counts);
                m.applied_index.set(m.state.index);
            }
        }
        Ok(())
    }
}

/// The engine's tick, in ms: half the heartbeat interval.
fn tick_ms(raft: &GroupSettings) -> u64 {
    (raft.heartbeat_interval_ms / 2).max(1)
}

/// How long a follower on the engine refuses votes after hearing from a leader, at least
/// (its clock running at the nominal rate): raft-rs ignores vote requests until
/// `election_ticks` ticks have passed, and the first of them may come at once.
pub fn engine_vote_refusal_ms(raft: &GroupSettings) -> u64 {
    let election_ticks = engine_config(NodeId(0), raft, 0).driver.election_ticks as u64;
    (election_ticks - 1) * tick_ms(raft)
}

/// The engine's settings from the node's Raft timings: ticks of half the heartbeat
/// interval, elections after `--election-timeout-ms` to twice that; leaders trust a lease of
/// `lease_ms` (0: no lease reads).
pub fn engine_config(id: NodeId, raft: &GroupSettings, lease_ms: u64) -> EngineConfig {
    let tick_ms = tick_ms(raft);
    let ticks = |ms: u64| ((ms / tick_ms).max(2)) as usize;
    let mut c = EngineConfig::new(id.0);
    c.tick = Duration::from_millis(tick_ms);
    c.driver = DriverConfig {
        election_ticks: ticks(raft.election_timeout_min_ms),
        heartbeat_ticks: ticks(raft.heartbeat_interval_ms)
            .min(ticks(raft.election_timeout_min_ms) - 1),
        min_election_ticks: ticks(raft.election_timeout_min_ms),
        max_election_ticks: ticks(raft.election_timeout_max_ms)
            .max(ticks(raft.election_timeout_min_ms) + 1),
        lease: lease_ms.saturating_mul(1000),
        // Whatever this node's own read policy: a peer's lease may count on it.
        vote_hold: true,
        // Snapshots stream beside the Raft messages (`EngineSnapshot`).
        caller_reports_snapshots: true,
        ..DriverConfig::default()
    };
    // Logs are compacted every `--snapshot-every` entries, at most
    // every 1,024 entries: the engine keeps each group's log in memory.
    c.compact_after_entries = raft
        .snapshot_every_entries
        .clamp(1, capkv_raftstore::node::COMPACT_AFTER_ENTRIES);
    c
}

/// This node's running engine.
pub struct EngineNode {
    pub id: NodeId,
    node: RaftNode<CommandResponse>,
    storage: Arc<dyn StorageEngine>,
    pub snapshots: Arc<Snapshots>,
}

/// Why a write or read on the engine failed.
pub type EngineError = ProposeError;

/// An incoming snapshot being staged; dropped before [`SnapshotReceiver::finish`], it
/// abandons what it staged.
pub struct SnapshotReceiver {
    engine: Arc<EngineNode>,
    partition: PartitionId,
    stream: u64,
    finished: bool,
}

impl SnapshotReceiver {
    /// Stages one chunk (values and sessions must decode); returns its bytes.
    pub async fn put(
        &mut self,
        data: Vec<SnapshotPair>,
        sessions: Vec<SnapshotSession>,
    ) -> Result<u64, String> {
        let p = self.partition;
        let data: Vec<(Vec<u8>, Vec<u8>)> = data.into_iter().map(|d| (d.key, d.value)).collect();
        let sessions: Vec<(u64, Vec<u8>)> = sessions
            .into_iter()
            .map(|s| (s.client_id, s.session))
            .collect();
        for (client, bytes) in &sessions {
            decode::<capkv_replication::sessions::Session>(bytes).map_err(|e| {
                format!("snapshot of partition {p}: session of client {client}: {e}")
            })?;
        }
        let bytes: u64 = data
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .chain(sessions.iter().map(|(_, s)| 8 + s.len() as u64))
            .sum();
        self.engine
            .staged(p, self.stream, move |storage| {
                storage
                    .sm_stage_put(p, &data, &sessions)
                    .map_err(|e| format!("staging a snapshot chunk of partition {p}: {e}"))
            })
            .await?;
        self.engine
            .snapshots
            .bytes_received
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(bytes)
    }

    /// The image is whole at log `index`: checks that its applied state is at that index
    /// and that `message` (an encoded batch from `from`) is exactly this partition's
    /// `MsgSnapshot` at that index, marks the image complete and hands the message to the
    /// engine, which installs it. Nothing that does not check out is staged as complete,
    /// so a bad stream costs a retry, never the node.
    pub async fn finish(
        mut self,
        from: u64,
        index: u64,
        applied: Vec<u8>,
        message: &[u8],
    ) -> Result<(), String> {
        let p = self.partition;
        let (state, _) = EngineApplied::decode(&applied)
            .map_err(|e| format!("snapshot of partition {p}: applied state: {e}"))?;
        if state.index != index {
            return Err(format!(
                "snapshot of partition {p}: its applied state is at {}, the image claims {index}",
                state.index
            ));
        }
        let (sender, to, messages) = PeerBatch::decode(message, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| format!("snapshot of partition {p}: message: {e}"))?;
        let fits = sender == from
            && to == self.engine.id.0
            && messages.len() == 1
            && messages[0].0 == p.0
            && messages[0].1.msg_type == capkv_raftstore::RaftMessageType::MsgSnapshot
            && messages[0].1.get_snapshot().get_metadata().index == index;
        if !fits {
            return Err(format!(
                "snapshot of partition {p}: the message is not this partition's MsgSnapshot at {index}"
            ));
        }
        let snapshots = self.engine.snapshots.clone();
        self.engine
            .staged(p, self.stream, move |storage| {
                storage
                    .sm_stage_finish(p, index, &applied)
                    .map_err(|e| format!("completing the snapshot of partition {p}: {e}"))?;
                snapshots.inbound().insert(
                    p.0,
                    Inbound::Complete {
                        index,
                        since: Instant::now(),
                    },
                );
                Ok(())
            })
            .await?;
        self.finished = true;
        self.engine.node.receive(from, messages);
        Ok(())
    }
}

impl Drop for SnapshotReceiver {
    fn drop(&mut self) {
        let snapshots = &self.engine.snapshots;
        snapshots.receiving.fetch_sub(1, Ordering::Relaxed);
        if !self.finished && snapshots.owns(self.partition.0, self.stream) {
            snapshots.abandon(&self.engine.storage, self.partition.0);
        }
    }
}

impl EngineNode {
    pub fn new(
        id: NodeId,
        node: RaftNode<CommandResponse>,
        storage: Arc<dyn StorageEngine>,
        snapshots: Arc<Snapshots>,
    ) -> Self {
        EngineNode {
            id,
            node,
            storage,
            snapshots,
        }
    }

    /// Runs `f` on a blocking thread, holding the staging lock, if stream `stream` still
    /// owns `p`'s staging (see [`Snapshots`]).
    async fn staged<T: Send + 'static>(
        self: &Arc<Self>,
        p: PartitionId,
        stream: u64,
        f: impl FnOnce(&dyn StorageEngine) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let engine = self.clone();
        tokio::task::spawn_blocking(move || {
            let _staging = engine.snapshots.staging();
            if !engine.snapshots.owns(p.0, stream) {
                return Err(format!(
                    "the snapshot stream of partition {p} was abandoned"
                ));
            }
            f(&*engine.storage)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Starts receiving a snapshot of `p`: at most one per partition at a time (a complete
    /// image whose message the engine never took is replaced after a while). Clears what
    /// an earlier stream may have left staged.
    pub async fn receive_snapshot(
        self: &Arc<Self>,
        p: PartitionId,
    ) -> Result<SnapshotReceiver, String> {
        if self.node.status(p.0).is_none() {
            return Err(format!("partition {p} has no replica on node {}", self.id));
        }
        let stream = self.snapshots.next_stream.fetch_add(1, Ordering::Relaxed);
        {
            let mut inbound = self.snapshots.inbound();
            match inbound.get(&p.0) {
                None => {}
                Some(Inbound::Complete { since, .. }) if since.elapsed() > STAGED_STALE_AFTER => {}
                Some(_) => {
                    return Err(format!(
                    "a snapshot of partition {p} is already being received, installed or cleared"
                ))
                }
            }
            inbound.insert(p.0, Inbound::Receiving { stream });
        }
        self.snapshots.receiving.fetch_add(1, Ordering::Relaxed);
        let receiver = SnapshotReceiver {
            engine: self.clone(),
            partition: p,
            stream,
            finished: false,
        };
        self.staged(p, stream, move |storage| {
            storage
                .sm_stage_clear(p)
                .map_err(|e| format!("clearing the staging of partition {p}: {e}"))
        })
        .await?;
        Ok(receiver)
    }

    /// Proposes `cmd` to partition `p`; the answer comes once it applied (or failed).
    pub async fn write(
        &self,
        p: PartitionId,
        cmd: &Command,
    ) -> Result<CommandResponse, EngineError> {
        let bytes = encode(cmd).map_err(|e| ProposeError::Poisoned(e.to_string()))?;
        answer(|reply| self.node.propose(p.0, bytes, reply)).await
    }

    /// Confirms leadership of `p` with a quorum (ReadIndex) and waits until the state
    /// machine applied the read index.
    pub async fn read_index(&self, p: PartitionId) -> Result<u64, EngineError> {
        answer(|reply| self.node.read(p.0, reply)).await
    }

    /// `p`'s commit index as its leader (here or elsewhere) confirmed it with a quorum
    /// after this call (see `RaftNode::read_index`); not waiting for this replica to apply.
    pub async fn commit_index_confirmed(&self, p: PartitionId) -> Result<u64, EngineError> {
        answer(|reply| self.node.read_index(p.0, reply)).await
    }

    /// Whether this node may serve a linearizable read of `p` from its state machine now,
    /// under its lease (see `RaftNode::lease_read_now`).
    pub fn lease_read_now(&self, p: PartitionId) -> bool {
        self.node.lease_read_now(p.0)
    }

    /// Time left of the vote hold after this node's restart.
    pub fn vote_hold_remaining(&self) -> Duration {
        self.node.vote_hold_remaining()
    }

    pub fn status(&self, p: PartitionId) -> Option<GroupStatus> {
        self.node.status(p.0)
    }

    pub fn stats(&self) -> capkv_raftstore::node::NodeStats {
        self.node.stats()
    }

    pub fn poisoned(&self) -> Option<String> {
        self.node.poisoned()
    }

    /// Stops the engine thread and waits for it.
    pub fn stop(&self) {
        self.node.stop()
    }

    pub fn campaign(&self, p: PartitionId) {
        self.node.campaign(p.0)
    }

    /// Hands `p`'s leadership to `to` if this node leads it and `to` is caught up.
    pub fn transfer_leader(&self, p: PartitionId, to: NodeId) {
        self.node.transfer_leader(p.0, to.0)
    }

    /// Decodes a batch that peer `from` sent and hands it to the engine.
    pub fn deliver(&self, from: u64, bytes: &[u8]) -> Result<(), String> {
        let (sender, to, messages) = PeerBatch::decode(bytes, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| format!("malformed engine batch: {e}"))?;
        if sender != from || to != self.id.0 {
            return Err(format!(
                "a batch from node {sender} to node {to} came on node {from}'s stream to node {}",
                self.id
            ));
        }
        if let Some((g, m)) = messages
            .iter()
            .find(|(_, m)| m.from != from || m.to != self.id.0)
        {
            return Err(format!(
                "a message of partition {g} from node {} to node {} came in node {from}'s batch to node {}",
                m.from, m.to, self.id
            ));
        }
        self.node.receive(from, messages);
        Ok(())
    }

    /// Peer batches waiting for the engine's loop.
    pub fn peer_backlog(&self) -> usize {
        self.node.peer_backlog()
    }
}

/// Frames queued per peer before new ones are dropped.
const PEER_QUEUE_FRAMES: usize = 256;

/// Sends the engine's batches to peers, through the injected network faults.
pub struct EngineTransport {
    id: NodeId,
    session_ttl_ms: u64,
    lease_read_ms: u64,
    faults: Arc<Faults>,
    peers: BTreeMap<u64, mpsc::Sender<EngineFrame>>,
    channels: BTreeMap<u64, tonic::transport::Channel>,
    runtime: tokio::runtime::Handle,
    snapshots: Arc<Snapshots>,
}

impl EngineTransport {
    /// Starts one sender task per peer in `peers` (id, address); every frame carries the
    /// node's session TTL and lease (ms). Must be called inside the runtime.
    pub fn start(
        id: NodeId,
        (session_ttl_ms, lease_read_ms): (u64, u64),
        faults: Arc<Faults>,
        channels: &Arc<PeerChannels>,
        peers: &[(NodeId, String)],
        shutdown: watch::Receiver<bool>,
        snapshots: Arc<Snapshots>,
    ) -> Self {
        let mut senders = BTreeMap::new();
        let mut peer_channels = BTreeMap::new();
        for (peer, addr) in peers {
            peer_channels.insert(peer.0, channels.channel(addr));
            let (tx, rx) = mpsc::channel(PEER_QUEUE_FRAMES);
            tokio::spawn(run_peer(
                *peer,
                channels.channel(addr),
                rx,
                shutdown.clone(),
            ));
            senders.insert(peer.0, tx);
        }
        EngineTransport {
            id,
            session_ttl_ms,
            lease_read_ms,
            faults,
            peers: senders,
            channels: peer_channels,
            runtime: tokio::runtime::Handle::current(),
            snapshots,
        }
    }
}

impl Transport for EngineTransport {
    fn send(&self, batch: PeerBatch) {
        if self.faults.drops_to(NodeId(batch.to)) {
            return;
        }
        let Some(tx) = self.peers.get(&batch.to) else {
            return;
        };
        let _ = tx.try_send(EngineFrame {
            from_node: self.id.0,
            to_node: batch.to,
            session_ttl_ms: self.session_ttl_ms,
            lease_read_ms: self.lease_read_ms,
            batch: batch.encode(),
        });
    }

    fn send_snapshot(
        &self,
        to: u64,
        group: GroupId,
        message: capkv_raftstore::RaftMessage,
        image: SnapshotImage,
        done: SnapshotDone,
    ) {
        let Some(channel) = self.channels.get(&to).cloned() else {
            done(false);
            return;
        };
        if self.faults.drops_to(NodeId(to)) {
            done(false);
            return;
        }
        let header = EngineSnapshotChunk {
            from_node: self.id.0,
            to_node: to,
            partition: group,
            session_ttl_ms: self.session_ttl_ms,
            lease_read_ms: self.lease_read_ms,
            ..Default::default()
        };
        let index = message.get_snapshot().get_metadata().index;
        let batch = PeerBatch {
            from: self.id.0,
            to,
            messages: vec![(group, WireMessage::from(&message))],
        }
        .encode();
        let snapshots = self.snapshots.clone();
        self.runtime.spawn(async move {
            snapshots.sending.fetch_add(1, Ordering::Relaxed);
            let sent = tokio::time::timeout(
                SNAPSHOT_STREAM_TIMEOUT,
                stream_snapshot(channel, header, image, index, batch, snapshots.clone()),
            )
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            snapshots.sending.fetch_sub(1, Ordering::Relaxed);
            match &sent {
                Ok(bytes) => tracing::info!(partition = group, to, index, bytes, "sent snapshot"),
                Err(e) => tracing::warn!(partition = group, to, index, "snapshot not sent: {e}"),
            }
            done(sent.is_ok());
        });
    }
}

/// Streams a partition's image to a peer in chunks (read from the storage snapshot on a
/// blocking thread, two chunks ahead at most), the last one carrying the `MsgSnapshot`.
/// Returns the bytes of data and sessions sent.
async fn stream_snapshot(
    channel: tonic::transport::Channel,
    header: EngineSnapshotChunk,
    image: SnapshotImage,
    index: u64,
    message: Vec<u8>,
    snapshots: Arc<Snapshots>,
) -> Result<u64, String> {
    let (tx, rx) = mpsc::channel::<EngineSnapshotChunk>(2);
    let producer = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let mut bytes = 0u64;
        let closed = || "the stream closed".to_string();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = image
                .data_page(after.as_deref(), SNAPSHOT_CHUNK_BYTES)
                .map_err(|e| e.to_string())?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            let n: u64 = page.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
            bytes += n;
            snapshots.bytes_sent.fetch_add(n, Ordering::Relaxed);
            let mut chunk = header.clone();
            chunk.data = page
                .into_iter()
                .map(|(key, value)| SnapshotPair { key, value })
                .collect();
            tx.blocking_send(chunk).map_err(|_| closed())?;
        }
        let mut after: Option<u64> = None;
        loop {
            let page = image
                .sessions_page(after, SNAPSHOT_CHUNK_BYTES)
                .map_err(|e| e.to_string())?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(*last);
            let n: u64 = page.iter().map(|(_, s)| 8 + s.len() as u64).sum();
            bytes += n;
            snapshots.bytes_sent.fetch_add(n, Ordering::Relaxed);
            let mut chunk = header.clone();
            chunk.sessions = page
                .into_iter()
                .map(|(client_id, session)| SnapshotSession { client_id, session })
                .collect();
            tx.blocking_send(chunk).map_err(|_| closed())?;
        }
        let mut chunk = header;
        chunk.last = true;
        chunk.index = index;
        chunk.applied = image
            .applied()
            .map_err(|e| e.to_string())?
            .ok_or("the state machine has no applied state")?;
        chunk.message = message;
        tx.blocking_send(chunk).map_err(|_| closed())?;
        Ok(bytes)
    });
    let mut client = RaftTransportClient::new(channel)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    let sent = client
        .engine_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| e.message().to_string());
    let produced = producer.await.map_err(|e| e.to_string())?;
    sent?;
    produced
}

/// Keeps one `Engine` stream open to a peer and forwards its frames, reconnecting after a
/// failure. Frames that arrive while there is no connection wait in the queue (or are
/// dropped when it is full).
async fn run_peer(
    peer: NodeId,
    channel: tonic::transport::Channel,
    mut rx: mpsc::Receiver<EngineFrame>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tx_in, rx_in) = mpsc::channel::<EngineFrame>(PEER_QUEUE_FRAMES);
        let mut client = RaftTransportClient::new(channel.clone())
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX);
        let call = client.engine(tokio_stream::wrappers::ReceiverStream::new(rx_in));
        tokio::pin!(call);
        loop {
            tokio::select! {
                r = &mut call => {
                    if let Err(e) = r {
                        tracing::debug!(peer = peer.0, error = %e, "engine stream ended");
                    }
                    break;
                }
                f = rx.recv() => match f {
                    None => return,
                    // Full: the connection is not keeping up; Raft resends what matters.
                    Some(f) => if let Err(mpsc::error::TrySendError::Closed(_)) = tx_in.try_send(f) {
                        break;
                    },
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Hands `ask` a reply callback for the engine and waits for the answer. A reply the
/// engine drops unanswered means it stopped with the request in flight.
async fn answer<T: Send + 'static>(
    ask: impl FnOnce(Box<dyn FnOnce(Result<T, ProposeError>) + Send>),
) -> Result<T, ProposeError> {
    let (tx, rx) = oneshot::channel();
    ask(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    rx.await.unwrap_or(Err(ProposeError::Stopped))
}

#[cfg(test)]
mod tests {
    #[test]
    fn applied_state_written_without_key_counts_still_opens() {
        #[derive(Serialize)]
        struct WithoutCounts(u64, u64, u64, u64);
        let old = encode(&WithoutCounts(12, 3, 40, 99)).unwrap();
        let (state, counted) = super::EngineApplied::decode(&old).unwrap();
        assert!(!counted, "the counts must be recounted from storage");
        assert_eq!(
            (state.index, state.term, state.revision, state.last_hlc),
            (12, 3, 40, 99)
        );
        let new = super::EngineApplied {
            counts: KeyCounts {
                keys: 5,
                expiring: 2,
            },
            ..state
        };
        assert_eq!(
            super::EngineApplied::decode(&encode(&new).unwrap()).unwrap(),
            (new, true)
        );
        assert!(super::EngineApplied::decode(&[1, 2]).is_err());
    }

    use super::*;

    /// The lease is half of what followers refuse (the first tick after a leader's message
    /// may come at once), and a restarted node holds its vote whatever its own read
    /// policy: with `--read-policy read-index` it serves no lease reads, but its peers may,
    /// counting on its refusal. (Before, the hold followed the node's own lease, so a node
    /// restarted with read-index reads voted at once.)
    #[test]
    fn the_engine_holds_votes_whatever_its_read_policy() {
        let raft = GroupSettings::default();
        let refusal = engine_vote_refusal_ms(&raft);
        assert_eq!(refusal, 450, "9 ticks of 50 ms at the default timings");
        for lease_ms in [0, refusal / 2] {
            let c = engine_config(NodeId(1), &raft, lease_ms);
            assert!(c.driver.vote_hold, "lease {lease_ms} ms");
            assert_eq!(c.driver.lease, lease_ms * 1000);
            assert!(c.driver.caller_reports_snapshots);
        }
    }
}
