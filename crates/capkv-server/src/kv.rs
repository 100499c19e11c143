//! The request logic of a node, in capkv's own types: validation at the edge, routing a
//! key to its partition, proposing writes to the partition's Raft group, serving reads at
//! the requested consistency level, and merging scans across partitions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capkv_placement::PartitionMap;
use capkv_proto::kv::{kv_client::KvClient, GetRequest, ScanRequest};
use capkv_replication::{
    AppliedIndex, Command, CommandResponse, Condition, Faults, Idempotency, Op, Rejection,
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
    /// The session's token (`session` reads wait for its position in each partition).
    pub session: SessionToken,
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
    /// The session's position in this partition (`session` reads).
    pub session_at: u64,
}

#[derive(Debug, Clone, Default)]
pub struct ScanPage {
    pub kvs: Vec<KeyValue>,
    /// Empty when the range is exhausted.
    pub continuation: Vec<u8>,
    /// The position of each partition read (its replica's applied index after the read).
    pub seen: SessionToken,
    /// Bounded reads: the loosest bound of the partitions read.
    pub bound: Bound,
}

/// One partition's share of a scan, as read: the rows, whether the partition has more,
/// and the replica's applied index after the read.
pub struct PartitionRows {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    pub position: u64,
    pub bound: Bound,
}

pub const SCAN_DEFAULT_LIMIT: u32 = 1000;
/// How long a `session` read waits for the local replica to apply the session's position
/// before it goes to the leader: about a heartbeat round, so a follower that is merely a
/// little behind serves it.
pub const SESSION_WAIT: Duration = Duration::from_millis(100);
const CONTINUATION_V1: u8 = 1;

pub struct KvCore {
    pub id: NodeId,
    pub map: PartitionMap,
    pub replicas: BTreeMap<PartitionId, Replica>,
    /// The node's replication engine: every replica's Raft group.
    pub raft_engine: Arc<EngineNode>,
    pub engine: Arc<dyn StorageEngine>,
    pub hlc: Arc<Hlc>,
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
    pub peers: Arc<PeerChannels>,
    pub faults: Arc<Faults>,
    pub metrics: Arc<Metrics>,
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
        let result =
            tokio::time::timeout(self.write_timeout, self.raft_engine.write(p, &cmd)).await;
        match result {
            Err(_elapsed) => Err(ambiguous()),
            Ok(Ok(resp)) => match resp.rejected {
                None => Ok((self.served(replica, Bound::default()), resp)),
                Some(why) => Err(rejection_error(p, why, idempotency)),
            },
            Ok(Err(e)) => Err(self.engine_error(p, e)),
        }
    }

    /// Waits until the local replica may serve a read at `level` (`session_at`: the
    /// session's position in the partition), as the read planner says.
    async fn read_barrier(
        &self,
        p: PartitionId,
        level: ReadConsistency,
        session_at: u64,
    ) -> Result<(&Replica, Bound), KvError> {
        let replica = self.replica(p)?;
        if level == ReadConsistency::Linearizable {
            // The hot path: under the leader's lease, at once, with no role lookup.
            if self.unsafe_local_reads
                || (self.read_policy == ReadPolicyChoice::Lease
                    && self.raft_engine.lease_read_now(p))
            {
                return Ok((replica, Bound::default()));
            }
        }
        let bounded = matches!(level, ReadConsistency::Bounded(_));
        if bounded && self.unsafe_ignore_bound {
            return Ok((replica, Bound::default()));
        }
        let mut ask = ReadAsk {
            level,
            session_at: if self.unsafe_ignore_session {
                0
            } else {
                session_at
            },
            waited: false,
            confirmed: None,
        };
        loop {
            let applied = replica.applied.get();
            // The planner looks at the role only for the levels that need a leader or a
            // proof from one, and session reads the replica is behind on; the engine's
            // status is not read otherwise.
            let role = match level {
                ReadConsistency::Prefix | ReadConsistency::Eventual => None,
                ReadConsistency::Session if applied >= ask.session_at => None,
                _ => Some(self.role(p)),
            };
            let state = ReplicaState {
                leader: role.is_some_and(|r| r.leader),
                known_leader: role.and_then(|r| r.known_leader).filter(|l| *l != self.id),
                applied,
                proof: if bounded { replica.proof() } else { None },
            };
            match read_plan::plan(ask, state) {
                Plan::Serve(bound) => return Ok((replica, bound)),
                Plan::ConfirmLeadership => {
                    let began = Instant::now();
                    let index = self.confirm_leadership(p).await?;
                    replica.proven(began, index);
                    let bound = Bound {
                        stale_ms_at_most: bounded.then_some(0),
                        behind_positions_at_most: bounded.then_some(0),
                    };
                    return Ok((replica, bound));
                }
                Plan::AskCommitIndex => {
                    let began = Instant::now();
                    let index = self.commit_index_confirmed(p).await?;
                    replica.proven(began, index);
                    ask.confirmed = Some(index);
                }
                Plan::WaitApplied(index) => {
                    let deadline = tokio::time::Instant::now() + SESSION_WAIT;
                    while replica.applied.get() < index && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    ask.waited = true;
                }
                Plan::Elsewhere(leader) => {
                    return Err(self.leader_elsewhere(p, leader.map(|n| n.0)))
                }
                Plan::TokenAhead { at, applied } => {
                    return Err(KvError::Unavailable(format!(
                        "partition {p}: the read must see log position {at}, but its \
                         leader has applied only {applied} (still applying after a restart \
                         or election, or a session token from another cluster)"
                    )))
                }
            }
        }
    }

    /// This node leads `p` and has applied a read index it held as the only leader: after
    /// a ReadIndex round. Returns the read index.
    async fn confirm_leadership(&self, p: PartitionId) -> Result<u64, KvError> {
        // (The lease was tried first, in `read_barrier`.)
        let engine = &self.raft_engine;
        self.confirmed(p, engine.read_index(p)).await
    }

    /// `p`'s commit index, confirmed by its leader (wherever it is) after this call.
    async fn commit_index_confirmed(&self, p: PartitionId) -> Result<u64, KvError> {
        let engine = &self.raft_engine;
        self.confirmed(p, engine.commit_index_confirmed(p)).await
    }

    async fn confirmed(
        &self,
        p: PartitionId,
        round: impl std::future::Future<Output = Result<u64, ProposeError>>,
    ) -> Result<u64, KvError> {
        match tokio::time::timeout(self.read_timeout, round).await {
            Err(_elapsed) => Err(KvError::Unavailable(format!(
                "partition {p}: no leader confirmed its leadership with a quorum within {} ms",
                self.read_timeout.as_millis()
            ))),
            Ok(Ok(index)) => Ok(index),
            // A read has no outcome to be unsure of.
            Ok(Err(ProposeError::Stopped)) => Err(KvError::Unavailable(format!(
                "partition {p}: the replica stopped"
            ))),
            Ok(Err(e)) => Err(self.engine_error(p, e)),
        }
    }

    /// A read of `key` at `level`. A replica that cannot serve a read any replica may serve
    /// (it waited, and is still behind what the read must see) forwards it once to the
    /// leader it names, so clients without a routing cache need not follow the hint;
    /// `forwarded` marks a read that is itself such a forward (answered here, or refused).
    /// Linearizable reads are not forwarded: `NotLeader` tells a routing client where to
    /// go.
    pub async fn get(
        &self,
        key: &[u8],
        level: ReadConsistency,
        session: &SessionToken,
        forwarded: bool,
    ) -> Result<(Served, Option<StoredValue>), KvError> {
        self.limits.check_key(key)?;
        let p = self.map.partition_for_key(key);
        let (replica, bound) = match self.read_barrier(p, level, session.at(p)).await {
            Ok(r) => r,
            Err(KvError::NotLeader {
                leader_id: Some(leader),
                ..
            }) if !forwarded && level.any_replica() && leader != self.id => {
                return self.get_remote(leader, p, key, level, session.at(p)).await;
            }
            Err(e) => return Err(e),
        };
        let value = self
            .engine
            .sm_get(p, key)
            .map_err(|e| KvError::Internal(e.to_string()))?;
        Ok((self.served(replica, bound), value))
    }

    /// Forwards a read to `node` (see [`KvCore::get`]).
    async fn get_remote(
        &self,
        node: NodeId,
        p: PartitionId,
        key: &[u8],
        level: ReadConsistency,
        session_at: u64,
    ) -> Result<(Served, Option<StoredValue>), KvError> {
        let addr = self
            .map
            .addr_of(node)
            .ok_or_else(|| KvError::Internal(format!("node {node} is not in the partition map")))?;
        let mut client = KvClient::new(self.peers.channel(addr))
            .max_decoding_message_size(self.limits.message_bytes_max());
        let mut token = SessionToken::default();
        token.observe(p, session_at);
        let w = capkv_proto::consistency::to_wire(level);
        let mut req = tonic::Request::new(GetRequest {
            key: key.to_vec(),
            consistency: w.consistency,
            session_token: token.encode(),
            max_lag_positions: w.max_lag_positions,
            max_staleness_ms: w.max_staleness_ms,
            follower_read: w.follower_read,
            forwarded: true,
        });
        req.set_timeout(self.read_timeout + Duration::from_secs(1));
        self.metrics.reads_forwarded.inc();
        let resp = client
            .get(req)
            .await
            .map_err(|s| capkv_proto::status::from_status(&s))?
            .into_inner();
        let h = resp.header.unwrap_or_default();
        let served = Served {
            partition: p,
            served_by: NodeId(h.served_by),
            term: h.raft_term,
            applied_index: h.applied_index,
            bound: Bound {
                stale_ms_at_most: h.stale_ms_at_most,
                behind_positions_at_most: h.behind_positions_at_most,
            },
        };
        let value = resp.kv.filter(|_| resp.found).map(|kv| StoredValue {
            mod_revision: kv.mod_revision,
            create_revision: kv.create_revision,
            hlc: kv.hlc,
            value: kv.value,
        });
        Ok((served, value))
    }

    /// Scans one partition on this node. Returns the page and whether the partition has
    /// more keys after it.
    pub async fn scan_partition_local(
        &self,
        scan: PartitionScan<'_>,
    ) -> Result<PartitionRows, KvError> {
        let PartitionScan {
            partition: p,
            start,
            end,
            limit,
            level,
            session_at,
        } = scan;
        if p.0 >= self.map.partition_count {
            return Err(KvError::InvalidArgument(format!(
                "partition {p} does not exist (the cluster has {})",
                self.map.partition_count
            )));
        }
        let (replica, bound) = self.read_barrier(p, level, session_at).await?;
        let want = limit as usize;
        let bytes_max = self.limits.scan_page_bytes_max;
        let mut rows = self
            .engine
            .sm_scan(p, start, end, want + 1, bytes_max)
            .map_err(|e| KvError::Internal(e.to_string()))?;
        let bytes: usize = rows.iter().map(|(k, v)| k.len() + v.value.len()).sum();
        let more = rows.len() > want || bytes >= bytes_max;
        rows.truncate(want);
        Ok(PartitionRows {
            kvs: rows
                .into_iter()
                .map(|(key, value)| KeyValue { key, value })
                .collect(),
            more,
            // After the read: no row is newer than this.
            position: replica.applied.upper(),
            bound,
        })
    }

    async fn scan_partition_anywhere(
        &self,
        scan: PartitionScan<'_>,
    ) -> Result<PartitionRows, KvError> {
        let p = scan.partition;
        let mut target: Option<NodeId> = None;
        if self.replicas.contains_key(&p) {
            let role = self.role(p);
            if scan.level.any_replica() || role.leader {
                // A `session` read this replica cannot serve names the leader.
                match self.scan_partition_local(scan).await {
                    Err(KvError::NotLeader { leader_id, .. }) if leader_id.is_some() => {
                        target = leader_id;
                    }
                    other => return other,
                }
            } else {
                target = role.known_leader;
            }
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
    ) -> Result<PartitionRows, KvError> {
        let PartitionScan {
            partition: p,
            start,
            end,
            limit,
            level,
            session_at,
        } = scan;
        let addr = self
            .map
            .addr_of(node)
            .ok_or_else(|| KvError::Internal(format!("node {node} is not in the partition map")))?;
        let mut client = KvClient::new(self.peers.channel(addr)).max_decoding_message_size(
            self.limits.message_bytes_max() + self.limits.scan_page_bytes_max,
        );
        let mut token = SessionToken::default();
        token.observe(p, session_at);
        let w = capkv_proto::consistency::to_wire(level);
        let mut req = tonic::Request::new(ScanRequest {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec).unwrap_or_default(),
            prefix: vec![],
            limit,
            continuation: vec![],
            consistency: w.consistency,
            partition_id: Some(p.0),
            session_token: token.encode(),
            max_lag_positions: w.max_lag_positions,
            max_staleness_ms: w.max_staleness_ms,
            follower_read: w.follower_read,
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
        Ok(PartitionRows {
            kvs,
            more: !resp.continuation.is_empty(),
            position: SessionToken::decode(&resp.session_token)?.at(p),
            bound: Bound {
                stale_ms_at_most: resp.stale_ms_at_most,
                behind_positions_at_most: resp.behind_positions_at_most,
            },
        })
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
        let rows = self
            .scan_partition_local(PartitionScan {
                partition: p,
                start: &start,
                end: end.as_deref(),
                limit,
                level: params.consistency,
                session_at: params.session.at(p),
            })
            .await?;
        let continuation = match (rows.more, rows.kvs.last()) {
            (true, Some(last)) => encode_continuation(&last.key),
            _ => vec![],
        };
        let mut seen = SessionToken::default();
        seen.observe(p, rows.position);
        Ok(ScanPage {
            kvs: rows.kvs,
            continuation,
            seen,
            bound: rows.bound,
        })
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
                session_at: params.session.at(p),
            })
        });
        let results = futures::future::join_all(futures).await;
        let mut all: Vec<KeyValue> = Vec::new();
        // No key past the last key of a partition that has more may be returned: that
        // partition could hold keys between.
        let mut cutoff: Option<Vec<u8>> = None;
        let mut seen = SessionToken::default();
        let mut bound = Bound::default();
        for (p, r) in self.map.partitions().zip(results) {
            let PartitionRows {
                kvs,
                more,
                position,
                bound: b,
            } = r?;
            seen.observe(p, position);
            bound = bound.loosest(b);
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
            seen,
            bound,
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
                if self.replicas.contains_key(&p) {
                    let s = self.raft_engine.status(p).unwrap_or_default();
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
    /// Quiesced on this node: no ticks or heartbeats until woken.
    pub asleep: bool,
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
