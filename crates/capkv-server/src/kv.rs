//! The request logic of a node, in capkv's own types: validation at the edge, routing a
//! key to its partition, proposing writes to the partition's Raft group, serving reads at
//! the requested consistency level, and merging scans across partitions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use capkv_placement::PartitionMap;
use capkv_proto::kv::{kv_client::KvClient, Consistency as WireConsistency, ScanRequest};
use capkv_replication::state_machine::AppliedIndex;
use capkv_replication::{
    Command, CommandResponse, Condition, Faults, Idempotency, Op, PartitionRaft, Rejection,
    TypeConfig, VoteHold,
};
use capkv_storage::{StorageEngine, StoredValue};
use capkv_types::{Hlc, KvError, Limits, NodeId, PartitionId, ReadConsistency};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, ForwardToLeader, LinearizableReadError, RaftError};
use openraft::raft::linearizable_read::LinearizerOption;
use openraft::{Instant as _, ReadPolicy, ServerState};

use capkv_raftstore::driver::ProposeError;
use capkv_raftstore::StateRole;

use crate::config::ReadPolicyChoice;
use crate::confirm::LeaderConfirmer;
use crate::engine::EngineNode;
use crate::metrics::Metrics;
use crate::transport::PeerChannels;

/// One partition replica hosted by this node.
pub struct Replica {
    pub partition: PartitionId,
    pub group: Group,
    pub applied: Arc<AppliedIndex>,
}

/// The replica's Raft group, on the replication engine the node runs.
pub enum Group {
    /// A group of its own (openraft: its own tasks, log writes and messages).
    Openraft(PartitionRaft),
    /// A group of the node's raftstore engine (`--engine raftstore`).
    Engine(Arc<EngineNode>),
}

/// A replica's role as this node sees it now.
#[derive(Debug, Clone, Copy)]
struct RoleView {
    leader: bool,
    known_leader: Option<NodeId>,
    term: u64,
}

impl Replica {
    /// The openraft group, when the node runs openraft.
    pub fn openraft(&self) -> Option<&PartitionRaft> {
        match &self.group {
            Group::Openraft(r) => Some(r),
            Group::Engine(_) => None,
        }
    }

    fn role(&self) -> RoleView {
        match &self.group {
            Group::Openraft(raft) => {
                let rx = raft.metrics();
                let m = rx.borrow_watched();
                RoleView {
                    leader: m.state == ServerState::Leader,
                    known_leader: m.current_leader.map(NodeId),
                    term: m.current_term,
                }
            }
            Group::Engine(e) => {
                let s = e.status(self.partition).unwrap_or_default();
                RoleView {
                    leader: s.role == StateRole::Leader,
                    known_leader: (s.leader != 0).then_some(NodeId(s.leader)),
                    term: s.term,
                }
            }
        }
    }
}

/// Where a response was served from (for the response header).
#[derive(Debug, Clone, Copy, Default)]
pub struct Served {
    pub partition: PartitionId,
    pub term: u64,
    pub applied_index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: StoredValue,
}

/// A scan request, after decoding.
#[derive(Debug, Clone, Default)]
pub struct ScanParams {
    pub start: Vec<u8>,
    /// Exclusive; `None` = to the last key.
    pub end: Option<Vec<u8>>,
    pub prefix: Vec<u8>,
    pub limit: u32,
    pub continuation: Vec<u8>,
    pub consistency: ReadConsistency,
}

/// One partition's share of a scan: `[start, end)`, at most `limit` keys, read at `level`.
#[derive(Debug, Clone, Copy)]
pub struct PartitionScan<'a> {
    pub partition: PartitionId,
    pub start: &'a [u8],
    /// Exclusive; `None` = to the partition's last key.
    pub end: Option<&'a [u8]>,
    pub limit: u32,
    pub level: ReadConsistency,
}

#[derive(Debug, Clone, Default)]
pub struct ScanPage {
    pub kvs: Vec<KeyValue>,
    /// Empty when the range is exhausted.
    pub continuation: Vec<u8>,
}

pub const SCAN_DEFAULT_LIMIT: u32 = 1000;
const CONTINUATION_V1: u8 = 1;

pub struct KvCore {
    pub id: NodeId,
    pub map: PartitionMap,
    pub replicas: BTreeMap<PartitionId, Replica>,
    /// The node's raftstore engine, when it runs one (`--engine raftstore`).
    pub raft_engine: Option<Arc<EngineNode>>,
    pub engine: Arc<dyn StorageEngine>,
    pub hlc: Arc<Hlc>,
    pub limits: Limits,
    pub write_timeout: Duration,
    pub read_timeout: Duration,
    pub read_policy: ReadPolicyChoice,
    /// Planted bug `stale-reads` (TESTING ONLY): linearizable reads skip confirmation.
    pub unsafe_local_reads: bool,
    /// How long a leader may go without a quorum acknowledging it before reads on it fail
    /// fast (openraft's leader lease: the maximum election timeout).
    pub quorum_lease_ms: u64,
    /// How long a lease read trusts a quorum acknowledgement (see `lease_read_ms`).
    pub lease_read: Duration,
    /// Vote hold after a restart (keeps lease reads of other leaders safe).
    pub vote_hold: VoteHold,
    pub peers: Arc<PeerChannels>,
    pub faults: Arc<Faults>,
    pub metrics: Arc<Metrics>,
    /// Batched leadership confirmations for ReadIndex reads (all partitions at once).
    pub confirmer: LeaderConfirmer,
    /// The client-session TTL (a state-machine rule every replica must share).
    pub session_ttl_ms: u64,
    /// When a refusal of each peer's messages was last logged (at most once a minute).
    pub refusals_logged: std::sync::Mutex<std::collections::HashMap<NodeId, std::time::Instant>>,
}

impl KvCore {
    /// Why this node's storage is poisoned (a failed fsync), if it is.
    pub fn storage_error(&self) -> Option<String> {
        self.engine
            .group_commit()
            .poisoned()
            .map(|e| e.to_string())
            .or_else(|| self.raft_engine.as_ref().and_then(|e| e.poisoned()))
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
        if let Some(engine) = &self.raft_engine {
            return engine.vote_hold_remaining().as_millis() as u64;
        }
        self.vote_hold
            .remaining()
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None` if there is
/// none (the prefix is all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn decode_continuation(token: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
    match token.split_first() {
        None => Ok(None),
        Some((&CONTINUATION_V1, last_key)) => Ok(Some(last_key.to_vec())),
        Some(_) => Err(KvError::InvalidArgument(
            "continuation token is not one this server issued".into(),
        )),
    }
}

fn encode_continuation(last_key: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(1 + last_key.len());
    t.push(CONTINUATION_V1);
    t.extend_from_slice(last_key);
    t
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

    fn not_leader(&self, p: PartitionId, leader: Option<NodeId>) -> KvError {
        KvError::NotLeader {
            partition: p.0,
            leader_id: leader,
            leader_addr: leader.and_then(|l| self.map.addr_of(l).map(str::to_string)),
        }
    }

    fn forward_error(&self, p: PartitionId, f: &ForwardToLeader<TypeConfig>) -> KvError {
        self.leader_elsewhere(p, f.leader_id)
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

    fn served(&self, r: &Replica) -> Served {
        Served {
            partition: r.partition,
            term: r.role().term,
            applied_index: r.applied.get(),
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

    pub async fn put(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        condition: Condition,
        idempotency: Option<Idempotency>,
    ) -> Result<(Served, CommandResponse), KvError> {
        self.limits.check_key(&key)?;
        self.limits.check_value(&value)?;
        check_condition(condition)?;
        let p = self.map.partition_for_key(&key);
        self.propose(
            p,
            Op::Put {
                key,
                value,
                condition,
            },
            idempotency,
        )
        .await
    }

    pub async fn delete(
        &self,
        key: Vec<u8>,
        condition: Condition,
        idempotency: Option<Idempotency>,
    ) -> Result<(Served, CommandResponse), KvError> {
        self.limits.check_key(&key)?;
        check_condition(condition)?;
        let p = self.map.partition_for_key(&key);
        self.propose(p, Op::Delete { key, condition }, idempotency)
            .await
    }

    async fn propose(
        &self,
        p: PartitionId,
        op: Op,
        idempotency: Option<Idempotency>,
    ) -> Result<(Served, CommandResponse), KvError> {
        let replica = self.replica(p)?;
        let cmd = Command {
            hlc: self.hlc.now().0,
            idempotency: idempotency.filter(|i| i.client_id != 0),
            op,
        };
        let ambiguous = || {
            KvError::Ambiguous(format!(
                "partition {p}: the write was proposed but not committed within {} ms; retry with the same \
                 (client_id, sequence) to learn its outcome",
                self.write_timeout.as_millis()
            ))
        };
        let raft = match &replica.group {
            Group::Openraft(raft) => raft,
            Group::Engine(engine) => {
                let result = tokio::time::timeout(self.write_timeout, engine.write(p, &cmd)).await;
                return match result {
                    Err(_elapsed) => Err(ambiguous()),
                    Ok(Ok(resp)) => match resp.rejected {
                        None => Ok((self.served(replica), resp)),
                        Some(why) => Err(rejection_error(p, why, idempotency)),
                    },
                    Ok(Err(e)) => Err(self.engine_error(p, e)),
                };
            }
        };
        let result = tokio::time::timeout(self.write_timeout, raft.client_write(cmd)).await;
        match result {
            Err(_elapsed) => Err(ambiguous()),            Ok(Ok(resp)) => match resp.data.rejected {
                None => Ok((self.served(replica), resp.data)),
                Some(why) => Err(rejection_error(p, why, idempotency)),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(self.forward_error(p, &f)),
            Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))) => Err(KvError::Ambiguous(format!(
                "partition {p}: leadership changed after the write was proposed; retry with the same \
                 (client_id, sequence) to learn its outcome"
            ))),
            Ok(Err(RaftError::APIError(e))) => Err(KvError::Internal(format!("partition {p}: {e}"))),
            Ok(Err(RaftError::Fatal(f))) => {
                Err(KvError::Ambiguous(format!("partition {p}: replica stopped while writing: {f}")))
            }
        }
    }

    /// Waits until the local replica may serve a read at `level`.
    async fn read_barrier(
        &self,
        p: PartitionId,
        level: ReadConsistency,
    ) -> Result<&Replica, KvError> {
        let replica = self.replica(p)?;
        if level == ReadConsistency::Prefix || self.unsafe_local_reads {
            return Ok(replica);
        }
        let raft = match &replica.group {
            Group::Openraft(raft) => raft,
            Group::Engine(engine) => {
                // Under the leader's lease: at once, on this thread.
                if self.read_policy == ReadPolicyChoice::Lease && engine.lease_read_now(p) {
                    return Ok(replica);
                }
                // Fail fast where the answer is known: a follower names its leader.
                let role = replica.role();
                if !role.leader {
                    return Err(self.leader_elsewhere(p, role.known_leader.map(|n| n.0)));
                }
                return match tokio::time::timeout(self.read_timeout, engine.read_index(p)).await {
                    Err(_elapsed) => Err(KvError::Unavailable(format!(
                        "partition {p}: could not confirm leadership with a quorum within {} ms",
                        self.read_timeout.as_millis()
                    ))),
                    Ok(Ok(_index)) => Ok(replica),
                    // A read has no outcome to be unsure of.
                    Ok(Err(ProposeError::Stopped)) => Err(KvError::Unavailable(format!(
                        "partition {p}: the replica stopped"
                    ))),
                    Ok(Err(e)) => Err(self.engine_error(p, e)),
                };
            }
        };
        let deadline = tokio::time::Instant::now() + self.read_timeout;
        let read_point: Option<(u64, u64)>;
        {
            // Fail fast where the answer is already known, instead of waiting out the
            // read timeout: a follower names its leader; a leader whose quorum has been
            // silent for a whole lease cannot confirm leadership now.
            // Copy out the three fields needed; cloning all metrics per read is wasteful.
            let (state, leader, quorum_silent) = {
                let rx = raft.metrics();
                let m = rx.borrow_watched();
                // A leader that is its group's only voter is a quorum by itself: it needs
                // no peer's acknowledgement (openraft never refreshes `last_quorum_acked`
                // for it, so the age check below would fail every read of an RF 1 group).
                let self_quorum = {
                    let mut voters = m.membership_config.voter_ids();
                    voters.next() == Some(self.id.0) && voters.next().is_none()
                };
                let silent = !self_quorum
                    && m.last_quorum_acked
                        .as_ref()
                        .is_some_and(|t| t.elapsed() > Duration::from_millis(self.quorum_lease_ms));
                // The read point: the commit index now, usable once the leader has
                // committed an entry of its own term (then it covers every write
                // acknowledged by earlier leaders).
                read_point = m
                    .local_committed
                    .as_ref()
                    .filter(|c| c.leader_id.term == m.current_term)
                    .map(|c| (m.current_term, c.index));
                (m.state, m.current_leader, silent)
            };
            if state != ServerState::Leader {
                return match leader {
                    Some(l) if NodeId(l) != self.id => Err(self.not_leader(p, Some(NodeId(l)))),
                    _ => Err(KvError::Unavailable(format!(
                        "partition {p} has no known leader"
                    ))),
                };
            }
            if quorum_silent {
                return Err(KvError::Unavailable(format!(
                    "partition {p}: this leader has not heard from a quorum for over {} ms",
                    self.quorum_lease_ms
                )));
            }
        }
        if let (ReadPolicyChoice::ReadIndex, Some((term, read_index))) =
            (self.read_policy, read_point)
        {
            // Batched node-level confirmation (see `confirm.rs`); if it does not confirm,
            // openraft's own ReadIndex below decides, with its precise errors.
            let fast = async {
                self.confirmer.confirm(p, term).await
                    && (replica.applied.get() >= read_index
                        || raft
                            .wait(Some(self.read_timeout))
                            .applied_index_at_least(Some(read_index), "linearizable read")
                            .await
                            .is_ok())
            };
            if let Ok(true) = tokio::time::timeout_at(deadline, fast).await {
                return Ok(replica);
            }
        }
        let policy = match self.read_policy {
            ReadPolicyChoice::ReadIndex => LinearizerOption::from(ReadPolicy::ReadIndex),
            // An older acknowledgement does not fail the read: a heartbeat goes out at once
            // and the read waits for its quorum, as ReadIndex would.
            ReadPolicyChoice::Lease => LinearizerOption::new(Some(self.lease_read), true)
                .with_wait_timeout(deadline.saturating_duration_since(tokio::time::Instant::now())),
        };
        let confirmed = async {
            match raft.get_read_linearizer(policy).await {
                Err(e) => Err(e),
                Ok(linearizer) => linearizer
                    .await_ready(raft)
                    .await
                    .map(|_| ())
                    .map_err(RaftError::Fatal),
            }
        };
        match tokio::time::timeout_at(deadline, confirmed).await {
            Err(_elapsed) => Err(KvError::Unavailable(format!(
                "partition {p}: could not confirm leadership with a quorum within {} ms",
                self.read_timeout.as_millis()
            ))),
            Ok(Ok(())) => Ok(replica),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(self.forward_error(p, &f))
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e)))) => {
                Err(KvError::Unavailable(format!("partition {p}: {e}")))
            }
            Ok(Err(RaftError::Fatal(f))) => Err(KvError::Unavailable(format!(
                "partition {p}: replica stopped: {f}"
            ))),
        }
    }

    pub async fn get(
        &self,
        key: &[u8],
        level: ReadConsistency,
    ) -> Result<(Served, Option<StoredValue>), KvError> {
        self.limits.check_key(key)?;
        let p = self.map.partition_for_key(key);
        let replica = self.read_barrier(p, level).await?;
        let value = self
            .engine
            .sm_get(p, key)
            .map_err(|e| KvError::Internal(e.to_string()))?;
        Ok((self.served(replica), value))
    }

    /// Scans one partition on this node. Returns the page and whether the partition has
    /// more keys after it.
    pub async fn scan_partition_local(
        &self,
        scan: PartitionScan<'_>,
    ) -> Result<(Vec<KeyValue>, bool), KvError> {
        let PartitionScan {
            partition: p,
            start,
            end,
            limit,
            level,
        } = scan;
        if p.0 >= self.map.partition_count {
            return Err(KvError::InvalidArgument(format!(
                "partition {p} does not exist (the cluster has {})",
                self.map.partition_count
            )));
        }
        self.read_barrier(p, level).await?;
        let want = limit as usize;
        let bytes_max = self.limits.scan_page_bytes_max;
        let mut rows = self
            .engine
            .sm_scan(p, start, end, want + 1, bytes_max)
            .map_err(|e| KvError::Internal(e.to_string()))?;
        let bytes: usize = rows.iter().map(|(k, v)| k.len() + v.value.len()).sum();
        let more = rows.len() > want || bytes >= bytes_max;
        rows.truncate(want);
        Ok((
            rows.into_iter()
                .map(|(key, value)| KeyValue { key, value })
                .collect(),
            more,
        ))
    }

    async fn scan_partition_anywhere(
        &self,
        scan: PartitionScan<'_>,
    ) -> Result<(Vec<KeyValue>, bool), KvError> {
        let p = scan.partition;
        let mut target: Option<NodeId> = None;
        if let Some(r) = self.replicas.get(&p) {
            let role = r.role();
            if scan.level == ReadConsistency::Prefix || role.leader {
                return self.scan_partition_local(scan).await;
            }
            target = role.known_leader;
        }
        let mut target = target.or_else(|| self.map.replicas(p).first().copied());
        // Follow at most two leader hints.
        for _ in 0..3 {
            let Some(node) = target else { break };
            if node == self.id {
                return self.scan_partition_local(scan).await;
            }
            match self.scan_remote(node, scan).await {
                Err(KvError::NotLeader { leader_id, .. })
                    if leader_id.is_some() && leader_id != Some(node) =>
                {
                    target = leader_id;
                }
                other => return other,
            }
        }
        Err(KvError::Unavailable(format!(
            "partition {p}: no leader found for the scan"
        )))
    }

    async fn scan_remote(
        &self,
        node: NodeId,
        scan: PartitionScan<'_>,
    ) -> Result<(Vec<KeyValue>, bool), KvError> {
        let PartitionScan {
            partition: p,
            start,
            end,
            limit,
            level,
        } = scan;
        let addr = self
            .map
            .addr_of(node)
            .ok_or_else(|| KvError::Internal(format!("node {node} is not in the partition map")))?;
        let mut client = KvClient::new(self.peers.channel(addr)).max_decoding_message_size(
            self.limits.message_bytes_max() + self.limits.scan_page_bytes_max,
        );
        let consistency = match level {
            ReadConsistency::Prefix => WireConsistency::Prefix,
            _ => WireConsistency::Linearizable,
        };
        let mut req = tonic::Request::new(ScanRequest {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec).unwrap_or_default(),
            prefix: vec![],
            limit,
            continuation: vec![],
            consistency: consistency as i32,
            partition_id: Some(p.0),
        });
        req.set_timeout(self.read_timeout + Duration::from_secs(1));
        let resp = client
            .scan(req)
            .await
            .map_err(|s| capkv_proto::status::from_status(&s))?
            .into_inner();
        let kvs = resp
            .kvs
            .into_iter()
            .map(|kv| KeyValue {
                key: kv.key,
                value: StoredValue {
                    mod_revision: kv.mod_revision,
                    create_revision: kv.create_revision,
                    hlc: kv.hlc,
                    value: kv.value,
                },
            })
            .collect();
        Ok((kvs, !resp.continuation.is_empty()))
    }

    /// Resolves prefix, range and continuation into `[start, end)`.
    fn scan_bounds(&self, params: &ScanParams) -> Result<(Vec<u8>, Option<Vec<u8>>), KvError> {
        let (mut start, end) = if !params.prefix.is_empty() {
            if !params.start.is_empty() || params.end.is_some() {
                return Err(KvError::InvalidArgument(
                    "give either a prefix or a start/end range, not both".into(),
                ));
            }
            (params.prefix.clone(), prefix_end(&params.prefix))
        } else {
            (params.start.clone(), params.end.clone())
        };
        for k in [Some(&start), end.as_ref()].into_iter().flatten() {
            if k.len() > self.limits.key_bytes_max {
                return Err(KvError::too_large(
                    "scan bound",
                    k.len(),
                    self.limits.key_bytes_max,
                ));
            }
        }
        if let Some(last) = decode_continuation(&params.continuation)? {
            let mut after = last;
            after.push(0);
            if after > start {
                start = after;
            }
        }
        Ok((start, end))
    }

    fn scan_limit(&self, limit: u32) -> Result<u32, KvError> {
        match limit {
            0 => Ok(SCAN_DEFAULT_LIMIT.min(self.limits.scan_limit_max)),
            l if l > self.limits.scan_limit_max => Err(KvError::InvalidArgument(format!(
                "scan limit {l} is over the maximum of {}",
                self.limits.scan_limit_max
            ))),
            l => Ok(l),
        }
    }

    /// One partition, for a peer's fan-out.
    pub async fn scan_one(&self, p: PartitionId, params: &ScanParams) -> Result<ScanPage, KvError> {
        let limit = self.scan_limit(params.limit)?;
        let (start, end) = self.scan_bounds(params)?;
        let (kvs, more) = self
            .scan_partition_local(PartitionScan {
                partition: p,
                start: &start,
                end: end.as_deref(),
                limit,
                level: params.consistency,
            })
            .await?;
        let continuation = match (more, kvs.last()) {
            (true, Some(last)) => encode_continuation(&last.key),
            _ => vec![],
        };
        Ok(ScanPage { kvs, continuation })
    }

    /// Keys in byte order across every partition, one page.
    ///
    /// Each partition is read at the requested level on its own; a page is not a
    /// snapshot across partitions.
    pub async fn scan(&self, params: &ScanParams) -> Result<ScanPage, KvError> {
        let limit = self.scan_limit(params.limit)?;
        let (start, end) = self.scan_bounds(params)?;
        if matches!(&end, Some(e) if *e <= start) {
            return Ok(ScanPage::default());
        }
        let futures = self.map.partitions().map(|p| {
            self.scan_partition_anywhere(PartitionScan {
                partition: p,
                start: &start,
                end: end.as_deref(),
                limit,
                level: params.consistency,
            })
        });
        let results = futures::future::join_all(futures).await;
        let mut all: Vec<KeyValue> = Vec::new();
        // No key past the last key of a partition that has more may be returned: that
        // partition could hold keys between.
        let mut cutoff: Option<Vec<u8>> = None;
        for r in results {
            let (kvs, more) = r?;
            if more {
                if let Some(last) = kvs.last() {
                    if cutoff.as_ref().is_none_or(|c| last.key < *c) {
                        cutoff = Some(last.key.clone());
                    }
                }
            }
            all.extend(kvs);
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        let total = all.len();
        let mut page = Vec::new();
        let mut bytes = 0usize;
        for kv in all {
            if page.len() >= limit as usize
                || (bytes >= self.limits.scan_page_bytes_max && !page.is_empty())
            {
                break;
            }
            if matches!(&cutoff, Some(c) if kv.key > *c) {
                break;
            }
            bytes += kv.key.len() + kv.value.value.len();
            page.push(kv);
        }
        let truncated = page.len() < total || cutoff.is_some();
        let continuation = match (truncated, page.last()) {
            (true, Some(last)) => encode_continuation(&last.key),
            _ => vec![],
        };
        Ok(ScanPage {
            kvs: page,
            continuation,
        })
    }

    /// This node's view of each partition.
    pub fn partition_status(&self) -> Vec<PartitionView> {
        self.map
            .partitions()
            .map(|p| {
                let mut v = PartitionView {
                    id: p,
                    replicas: self.map.replicas(p).to_vec(),
                    ..Default::default()
                };
                match self.replicas.get(&p).map(|r| &r.group) {
                    None => {}
                    Some(Group::Openraft(raft)) => {
                        let m = raft.metrics().borrow_watched().clone();
                        v.role = format!("{:?}", m.state);
                        v.leader = m.current_leader.map(NodeId);
                        v.term = m.current_term;
                        v.last_log_index = m.last_log_index.unwrap_or(0);
                        v.commit_index = m.local_committed.map(|l| l.index).unwrap_or(0);
                        v.applied_index = m.last_applied.map(|l| l.index).unwrap_or(0);
                        v.snapshot_index = m.snapshot.map(|l| l.index).unwrap_or(0);
                        v.purged_index = m.purged.map(|l| l.index).unwrap_or(0);
                    }
                    Some(Group::Engine(engine)) => {
                        let s = engine.status(p).unwrap_or_default();
                        v.role = format!("{:?}", s.role);
                        v.leader = (s.leader != 0).then_some(NodeId(s.leader));
                        v.term = s.term;
                        v.last_log_index = s.last_index;
                        v.commit_index = s.commit;
                        v.applied_index = s.applied;
                        // The state machine is the snapshot: the log is purged up to it.
                        v.snapshot_index = s.log_start;
                        v.purged_index = s.log_start;
                        v.asleep = s.quiet;
                    }
                }
                v
            })
            .collect()
    }
}

/// The error for a write the state machine refused (nothing was applied).
fn rejection_error(p: PartitionId, why: Rejection, id: Option<Idempotency>) -> KvError {
    let (client, seq) = id.map_or((0, 0), |i| (i.client_id, i.sequence));
    match why {
        Rejection::SessionExpired => KvError::SessionExpired(format!(
            "partition {p} does not know client session {client:#x}, which started over a \
             session TTL ago; the write was not applied. Send it again in a new session."
        )),
        Rejection::StaleSequence => KvError::InvalidArgument(format!(
            "partition {p}: client {client:#x} already had the answer to sequence {seq} \
             (a delayed duplicate); it was not applied again"
        )),
        Rejection::TooManyPending => KvError::Unavailable(format!(
            "partition {p}: client {client:#x} has too many unanswered writes here; not applied"
        )),
        Rejection::BadSequence => KvError::InvalidArgument(format!(
            "client {client:#x}: first_incomplete is above the write's own sequence {seq}"
        )),
        Rejection::BadSession => KvError::InvalidArgument(format!(
            "partition {p}: client session {client:#x} has a start time far ahead of this \
             partition's clock, or another than the one it started with; not applied"
        )),
    }
}

fn check_condition(c: Condition) -> Result<(), KvError> {
    if c == Condition::IfRevision(0) {
        return Err(KvError::InvalidArgument(
            "if_revision must be a revision (>= 1); use if_absent for 'not present'".into(),
        ));
    }
    Ok(())
}

/// This node's view of one partition.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PartitionView {
    pub id: PartitionId,
    pub replicas: Vec<NodeId>,
    /// Empty when this node holds no replica.
    pub role: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    /// Quiesced on this node (raftstore engine): no ticks or heartbeats until woken.
    pub asleep: bool,
}

/// How long a leader on this node trusts a quorum acknowledgement for lease reads, in ms:
/// half of the lease that followers grant (openraft's leader lease, the election timeout
/// maximum); the other half is margin for clocks that run at different rates. 0 when this
/// node serves no lease reads.
pub fn lease_read_ms(policy: ReadPolicyChoice, election_timeout_max_ms: u64) -> u64 {
    match policy {
        ReadPolicyChoice::Lease => election_timeout_max_ms / 2,
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
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"user:"), Some(b"user;".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }

    #[test]
    fn continuation_tokens_round_trip_and_reject_garbage() {
        assert_eq!(
            decode_continuation(&encode_continuation(b"k1")).unwrap(),
            Some(b"k1".to_vec())
        );
        assert_eq!(decode_continuation(b"").unwrap(), None);
        assert!(decode_continuation(b"\x07junk").is_err());
    }

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
