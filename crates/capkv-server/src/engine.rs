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
use std::sync::Arc;
use std::time::Duration;

use capkv_proto::raft::raft_transport_client::RaftTransportClient;
use capkv_proto::raft::EngineFrame;
use capkv_raftstore::codec::PeerBatch;
use capkv_raftstore::driver::{DriverConfig, GroupStatus, ProposeError};
use capkv_raftstore::node::{NodeConfig as EngineConfig, RaftNode, StateMachine, Transport};
use capkv_raftstore::storage::GroupId;
use capkv_replication::apply::Applier;
use capkv_replication::codec::{decode, encode};
use capkv_replication::state_machine::AppliedIndex;
use capkv_replication::{Command, CommandResponse, Faults, GroupSettings};
use capkv_storage::StorageEngine;
use capkv_types::{Hlc, NodeId, PartitionId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

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
}

struct PartitionMachine {
    applier: Applier,
    state: EngineApplied,
    applied_index: Arc<AppliedIndex>,
}

/// Every hosted partition's state machine. What a turn applies is written by
/// [`StateMachine::commit`] as one batch for all partitions.
pub struct CapkvMachine {
    engine: Arc<dyn StorageEngine>,
    partitions: BTreeMap<GroupId, PartitionMachine>,
    /// Partitions applied to since the last commit.
    dirty: std::collections::BTreeSet<GroupId>,
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
    ) -> std::io::Result<(
        Self,
        BTreeMap<GroupId, u64>,
        BTreeMap<PartitionId, Arc<AppliedIndex>>,
    )> {
        let mut machines = BTreeMap::new();
        let mut applied = BTreeMap::new();
        let mut indexes = BTreeMap::new();
        for p in partitions {
            let state: EngineApplied = match engine.sm_applied(*p)? {
                Some(bytes) => decode(&bytes)?,
                None => EngineApplied::default(),
            };
            let applier = Applier::open(
                engine.clone(),
                *p,
                hlc.clone(),
                session_ttl_ms,
                state.last_hlc,
            )?;
            let applied_index = Arc::new(AppliedIndex::default());
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
                dirty: Default::default(),
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
            responses.push(
                m.applier
                    .execute(m.state.revision, cmd)
                    .map_err(|e| e.to_string())?,
            );
        }
        m.state.index = index;
        m.state.term = term;
        m.state.last_hlc = m.applier.last_hlc();
        self.dirty.insert(group);
        Ok(responses)
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
/// interval, elections after the same timeouts as openraft's; leaders trust a lease of
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
        ..DriverConfig::default()
    };
    c
}

/// This node's running engine.
pub struct EngineNode {
    pub id: NodeId,
    node: RaftNode<CommandResponse>,
}

/// Why a write or read on the engine failed.
pub type EngineError = ProposeError;

impl EngineNode {
    pub fn new(id: NodeId, node: RaftNode<CommandResponse>) -> Self {
        EngineNode { id, node }
    }

    /// Proposes `cmd` to partition `p`; the answer comes once it applied (or failed).
    pub async fn write(
        &self,
        p: PartitionId,
        cmd: &Command,
    ) -> Result<CommandResponse, EngineError> {
        let bytes = encode(cmd).map_err(|e| ProposeError::Poisoned(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.node.propose(
            p.0,
            bytes,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        // A dropped reply means the engine stopped with the proposal in flight.
        rx.await.unwrap_or(Err(ProposeError::Stopped))
    }

    /// Confirms leadership of `p` with a quorum (ReadIndex) and waits until the state
    /// machine applied the read index.
    pub async fn read_index(&self, p: PartitionId) -> Result<u64, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.node.read(
            p.0,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or(Err(ProposeError::Stopped))
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
}

impl EngineTransport {
    /// Starts one sender task per peer in `peers` (id, address). Must be called inside
    /// the runtime.
    pub fn start(
        id: NodeId,
        session_ttl_ms: u64,
        lease_read_ms: u64,
        faults: Arc<Faults>,
        channels: &Arc<PeerChannels>,
        peers: &[(NodeId, String)],
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let mut senders = BTreeMap::new();
        for (peer, addr) in peers {
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
