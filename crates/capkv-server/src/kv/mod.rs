//! The request logic of a node, in capkv's own types: validation at the edge, routing a
//! key to its partition, proposing writes to the partition's Raft group (`write`), serving
//! reads at the requested consistency level (`read`), merging scans across partitions
//! (`scan`), and the node's view of its partitions (`status`).

mod read;
mod scan;
mod status;
mod write;

pub use read::SESSION_WAIT;
pub use scan::{
    prefix_end, PartitionRows, PartitionScan, ScanPage, ScanParams, SCAN_DEFAULT_LIMIT,
};
pub use status::PartitionView;
pub use write::rejection_error;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capkv_placement::PartitionMap;
use capkv_proto::kv::{kv_client::KvClient, GetRequest, ScanRequest};
use capkv_replication::{
    AppliedIndex, Command, CommandResponse, Condition, Faults, Idempotency, Op, Rejection, Update,
};
use capkv_storage::{StorageEngine, StoredValue};
use capkv_types::{Hlc, KvError, Limits, NodeId, PartitionId, ReadConsistency, SessionToken};

use capkv_raftstore::driver::ProposeError;
use capkv_raftstore::StateRole;

use crate::config::ReadPolicyChoice;
use crate::engine::EngineNode;
use crate::metrics::Metrics;
use crate::read_plan::{self, Bound, Plan, Proof, ReadAsk, ReplicaState};
use crate::transport::PeerChannels;

/// One partition replica hosted by this node (its Raft group runs on the node's engine).
pub struct Replica {
    pub partition: PartitionId,
    pub applied: Arc<AppliedIndex>,
    /// The freshest commit index a leader confirmed to this node for the partition, and
    /// when the round that confirmed it began (bounded-staleness reads serve from it).
    pub proof: std::sync::Mutex<Option<(Instant, u64)>>,
}

impl Replica {
    pub fn new(partition: PartitionId, applied: Arc<AppliedIndex>) -> Self {
        Replica {
            partition,
            applied,
            proof: std::sync::Mutex::new(None),
        }
    }

    /// A leader confirmed `index` as its commit index in a round that began at `began`.
    fn proven(&self, began: Instant, index: u64) {
        let mut p = self.proof.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none_or(|(at, _)| at < began) {
            *p = Some((began, index));
        }
    }

    fn proof(&self) -> Option<Proof> {
        let p = *self.proof.lock().unwrap_or_else(|e| e.into_inner());
        p.map(|(at, index)| Proof {
            age_us: at.elapsed().as_micros() as u64,
            index,
        })
    }
}

/// A replica's role as this node sees it now.
#[derive(Debug, Clone, Copy)]
struct RoleView {
    leader: bool,
    known_leader: Option<NodeId>,
    term: u64,
}

/// Where a response was served from (for the response header).
#[derive(Debug, Clone, Copy, Default)]
pub struct Served {
    pub partition: PartitionId,
    /// The node whose replica served it (another than this one for a forwarded read).
    pub served_by: NodeId,
    pub term: u64,
    pub applied_index: u64,
    /// Bounded reads: how stale the answer may be.
    pub bound: Bound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: StoredValue,
}

/// What a node's request logic is made of (see [`KvCore::new`]).
pub struct KvParts {
    pub id: NodeId,
    pub map: PartitionMap,
    pub replicas: BTreeMap<PartitionId, Replica>,
    /// The node's replication engine: every replica's Raft group.
    pub raft_engine: Arc<EngineNode>,
    pub storage: Arc<dyn StorageEngine>,
    pub hlc: Arc<Hlc>,
    pub peers: Arc<PeerChannels>,
    pub faults: Arc<Faults>,
    pub metrics: Arc<Metrics>,
    pub settings: KvSettings,
    pub endpoints: Endpoints,
}

/// Where this node's front ends listen (for `status`).
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub http: Option<std::net::SocketAddr>,
    pub resp: Option<std::net::SocketAddr>,
    pub json: Option<std::net::SocketAddr>,
}

/// The request logic's settings.
#[derive(Debug, Clone)]
pub struct KvSettings {
    pub limits: Limits,
    pub write_timeout: Duration,
    pub read_timeout: Duration,
    pub read_policy: ReadPolicyChoice,
    /// The level of reads that name none (`--default-consistency`).
    pub default_consistency: ReadConsistency,
    /// Planted bug `stale-reads` (TESTING ONLY): linearizable reads skip confirmation.
    pub unsafe_local_reads: bool,
    /// Planted bug `ignore-session-token` (TESTING ONLY): session reads do not wait for
    /// the session's position.
    pub unsafe_ignore_session: bool,
    /// Planted bug `ignore-staleness-bound` (TESTING ONLY): bounded reads are served by
    /// the local replica as it is.
    pub unsafe_ignore_bound: bool,
    /// How long this node's replicas refuse votes after hearing from a leader (the
    /// engine's election ticks); peers may trust their lease for at most half of it.
    pub vote_refusal_ms: u64,
    /// How long a lease read trusts a quorum acknowledgement (see `lease_read_ms`).
    pub lease_read: Duration,
    /// The client-session TTL (a state-machine rule every replica must share).
    pub session_ttl_ms: u64,
}

/// A node's request logic: validation, routing a key to its partition's replica, the
/// write path (`write.rs`), the read path at each level (`read.rs`, planned by
/// `read_plan`), scans (`scan.rs`) and the status view (`status.rs`). Front ends reach it
/// through [`crate::router::Router`] (the protocols without a routing client) or call it
/// directly (gRPC, whose clients route themselves).
pub struct KvCore {
    id: NodeId,
    map: PartitionMap,
    replicas: BTreeMap<PartitionId, Replica>,
    raft_engine: Arc<EngineNode>,
    engine: Arc<dyn StorageEngine>,
    hlc: Arc<Hlc>,
    limits: Limits,
    write_timeout: Duration,
    read_timeout: Duration,
    read_policy: ReadPolicyChoice,
    default_consistency: ReadConsistency,
    unsafe_local_reads: bool,
    unsafe_ignore_session: bool,
    unsafe_ignore_bound: bool,
    vote_refusal_ms: u64,
    lease_read: Duration,
    peers: Arc<PeerChannels>,
    faults: Arc<Faults>,
    metrics: Arc<Metrics>,
    session_ttl_ms: u64,
    endpoints: Endpoints,
    /// When a refusal of each peer's messages was last logged (at most once a minute).
    refusals_logged: std::sync::Mutex<std::collections::HashMap<NodeId, std::time::Instant>>,
}

impl KvCore {
    pub fn new(parts: KvParts) -> Self {
        let KvParts {
            id,
            map,
            replicas,
            raft_engine,
            storage,
            hlc,
            peers,
            faults,
            metrics,
            settings: s,
            endpoints,
        } = parts;
        KvCore {
            id,
            map,
            replicas,
            raft_engine,
            engine: storage,
            hlc,
            limits: s.limits,
            write_timeout: s.write_timeout,
            read_timeout: s.read_timeout,
            read_policy: s.read_policy,
            default_consistency: s.default_consistency,
            unsafe_local_reads: s.unsafe_local_reads,
            unsafe_ignore_session: s.unsafe_ignore_session,
            unsafe_ignore_bound: s.unsafe_ignore_bound,
            vote_refusal_ms: s.vote_refusal_ms,
            lease_read: s.lease_read,
            peers,
            faults,
            metrics,
            session_ttl_ms: s.session_ttl_ms,
            endpoints,
            refusals_logged: Default::default(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn map(&self) -> &PartitionMap {
        &self.map
    }

    /// The partitions this node holds a replica of.
    pub fn hosted(&self) -> impl Iterator<Item = PartitionId> + '_ {
        self.replicas.keys().copied()
    }

    pub fn raft_engine(&self) -> &Arc<EngineNode> {
        &self.raft_engine
    }

    pub fn storage(&self) -> &Arc<dyn StorageEngine> {
        &self.engine
    }

    pub fn hlc(&self) -> &Hlc {
        &self.hlc
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn read_policy(&self) -> ReadPolicyChoice {
        self.read_policy
    }

    pub fn default_consistency(&self) -> ReadConsistency {
        self.default_consistency
    }

    pub fn lease_read(&self) -> Duration {
        self.lease_read
    }

    pub fn vote_refusal_ms(&self) -> u64 {
        self.vote_refusal_ms
    }

    pub fn session_ttl_ms(&self) -> u64 {
        self.session_ttl_ms
    }

    pub fn peers(&self) -> &Arc<PeerChannels> {
        &self.peers
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where this node's front ends listen.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// How long a write may take to commit before it is answered `Ambiguous`.
    pub fn write_timeout(&self) -> Duration {
        self.write_timeout
    }
}

impl KvCore {
    /// Why this node's storage is poisoned (a failed fsync), if it is.
    pub fn storage_error(&self) -> Option<String> {
        self.engine
            .group_commit()
            .poisoned()
            .map(|e| e.to_string())
            .or_else(|| self.raft_engine.poisoned())
    }

    /// Refuses service once storage is poisoned: nothing this node wrote since the failed
    /// fsync can be trusted, so it answers nothing until restarted.
    fn check_storage(&self) -> Result<(), KvError> {
        match self.storage_error() {
            None => Ok(()),
            Some(e) => Err(KvError::Unavailable(format!("node {}: {e}", self.id))),
        }
    }

    /// Logs, at most once a minute per peer, why this node refuses a peer's messages (a
    /// cluster whose timings break the lease margin does not form; a person must look).
    pub fn log_refused_peer(&self, peer: NodeId, why: &str) {
        let mut logged = self
            .refusals_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if logged
            .get(&peer)
            .is_none_or(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            logged.insert(peer, now);
            tracing::error!(
                node = self.id.0,
                peer = peer.0,
                "refusing Raft messages: {why}"
            );
        }
    }

    /// Time left of this node's vote hold, in ms (0 once it ended or if there was none).
    pub fn vote_hold_remaining_ms(&self) -> u64 {
        self.raft_engine.vote_hold_remaining().as_millis() as u64
    }
}

impl KvCore {
    fn replica(&self, p: PartitionId) -> Result<&Replica, KvError> {
        self.check_storage()?;
        match self.replicas.get(&p) {
            Some(r) => Ok(r),
            None => {
                // Not hosted here: point at a node that holds it.
                let hint = self.map.replicas(p).first().copied();
                Err(self.not_leader(p, hint))
            }
        }
    }

    /// The node to send a write of `p` to first: this node if it leads `p`, else the
    /// leader it knows, else (no leader known, or no replica here) a replica of `p`.
    pub fn leader_guess(&self, p: PartitionId) -> NodeId {
        if self.replicas.contains_key(&p) {
            let role = self.role(p);
            if role.leader {
                return self.id;
            }
            if let Some(l) = role.known_leader {
                return l;
            }
            return self.id;
        }
        self.map.replicas(p).first().copied().unwrap_or(self.id)
    }

    fn not_leader(&self, p: PartitionId, leader: Option<NodeId>) -> KvError {
        KvError::NotLeader {
            partition: p.0,
            leader_id: leader,
            leader_addr: leader.and_then(|l| self.map.addr_of(l).map(str::to_string)),
        }
    }

    /// This node does not lead `p`: `NotLeader` naming the leader it knows (0 or itself:
    /// none), else `Unavailable`.
    fn leader_elsewhere(&self, p: PartitionId, leader: Option<u64>) -> KvError {
        match leader {
            Some(l) if l != 0 && NodeId(l) != self.id => self.not_leader(p, Some(NodeId(l))),
            _ => KvError::Unavailable(format!(
                "partition {p} has no leader that node {} can reach (election in progress or quorum lost)",
                self.id
            )),
        }
    }

    fn role(&self, p: PartitionId) -> RoleView {
        let s = self.raft_engine.status(p).unwrap_or_default();
        RoleView {
            leader: s.role == StateRole::Leader,
            known_leader: (s.leader != 0).then_some(NodeId(s.leader)),
            term: s.term,
        }
    }

    fn served(&self, r: &Replica, bound: Bound) -> Served {
        Served {
            partition: r.partition,
            served_by: self.id,
            term: self.role(r.partition).term,
            // Taken after the read: at least the position of whatever it saw.
            applied_index: r.applied.upper(),
            bound,
        }
    }

    /// The error for a proposal or read the engine did not carry out.
    fn engine_error(&self, p: PartitionId, e: ProposeError) -> KvError {
        match e {
            ProposeError::NotLeader { leader, .. } => self.leader_elsewhere(p, leader),
            ProposeError::NoGroup(_) => self.not_leader(p, self.map.replicas(p).first().copied()),
            ProposeError::Dropped => KvError::Unavailable(format!(
                "partition {p}: leadership changed before the write committed; it was not applied"
            )),
            ProposeError::Stopped => KvError::Ambiguous(format!(
                "partition {p}: the replica stopped while writing; retry with the same \
                 (client_id, sequence) to learn its outcome"
            )),
            ProposeError::ReadTimedOut => KvError::Unavailable(format!(
                "partition {p}: could not confirm leadership with a quorum"
            )),
            ProposeError::Poisoned(why) => {
                KvError::Unavailable(format!("node {}: storage failed: {why}", self.id))
            }
        }
    }
}

/// How long a leader on this node trusts a quorum acknowledgement for lease reads, in ms:
/// half of the time followers refuse votes after hearing from a leader (`vote_refusal_ms`);
/// the other half is margin for clocks that run at different rates. 0 when this node
/// serves no lease reads.
pub fn lease_read_ms(policy: ReadPolicyChoice, vote_refusal_ms: u64) -> u64 {
    match policy {
        ReadPolicyChoice::Lease => vote_refusal_ms / 2,
        ReadPolicyChoice::ReadIndex => 0,
    }
}

/// Whether this node may take Raft messages from a peer that trusts its lease for
/// `peer_lease_read_ms`: only if this node refuses votes after hearing from a leader
/// (`vote_lease_ms`, its election timeout maximum) for at least twice that. The factor 2 is
/// the margin the lease read relies on: clocks may run at rates up to 2x apart (docs/
/// consistency.md). A peer that trusted longer could serve lease reads while this node,
/// its clock running fast, already helps elect another leader.
pub fn check_peer_lease(
    peer: NodeId,
    peer_lease_read_ms: u64,
    local: NodeId,
    vote_lease_ms: u64,
) -> Result<(), String> {
    if peer_lease_read_ms.saturating_mul(LEASE_CLOCK_RATE_MARGIN) > vote_lease_ms {
        return Err(format!(
            "node {peer} trusts its leader lease for {peer_lease_read_ms} ms, more than half of \
             the {vote_lease_ms} ms node {local} refuses votes after hearing from a leader: lease \
             reads would have no margin for clock rates. Give every node the same \
             --election-timeout-ms."
        ));
    }
    Ok(())
}

/// Clocks of different nodes may run at rates this far apart (the lease's assumption).
pub const LEASE_CLOCK_RATE_MARGIN: u64 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_may_trust_its_lease_for_at_most_half_of_this_nodes_vote_hold() {
        let (a, b) = (NodeId(1), NodeId(2));
        // The same settings on both sides: a leader trusts half the vote lease, exactly the
        // documented margin.
        let same = lease_read_ms(ReadPolicyChoice::Lease, 1000);
        assert_eq!(same, 500);
        assert!(check_peer_lease(a, same, b, 1000).is_ok());
        // A peer with a shorter election timeout is fine.
        assert!(check_peer_lease(a, lease_read_ms(ReadPolicyChoice::Lease, 600), b, 1000).is_ok());
        // A peer whose lease read equals this node's vote lease has no margin at all
        // (this was accepted before): refused, with both figures and the fix.
        let err =
            check_peer_lease(a, lease_read_ms(ReadPolicyChoice::Lease, 2000), b, 1000).unwrap_err();
        assert!(
            err.contains("1000 ms") && err.contains("more than half"),
            "{err}"
        );
        assert!(err.contains("--election-timeout-ms"), "{err}");
        // One ms over the margin is refused too.
        assert!(check_peer_lease(a, 501, b, 1000).is_err());
        // A ReadIndex node trusts no lease and is always accepted.
        let read_index = lease_read_ms(ReadPolicyChoice::ReadIndex, 60_000);
        assert_eq!(read_index, 0);
        assert!(check_peer_lease(a, read_index, b, 100).is_ok());
    }
}
