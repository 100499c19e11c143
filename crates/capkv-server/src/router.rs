//! The request router: the one service API every front end without a routing client
//! (RESP, HTTP/JSON, JSON over TCP) translates its requests into.
//!
//! Any node answers. A write goes to its partition's leader: proposed here when this node
//! leads, else forwarded over the peer channel (`RaftTransport.Forward`), following
//! `NotLeader` hints across leader changes until the write deadline. The router writes in
//! its own client session (`capkv_client::write_session`), so every attempt of one write
//! carries the same idempotency pair and a retry after a lost answer is never applied
//! twice; the retry policy (`capkv_client::retry`) keeps the outcome honest: once an attempt
//! may have applied the write, it is success or `Ambiguous`, never a definite failure.
//! A read is served here when this node may serve it at its level, else forwarded to the
//! leader (`KvCore::get`).

use std::sync::Arc;
use std::time::Duration;

use capkv_client::retry::{Attempt, LeaderUpdate, Next, RetryPolicy};
use capkv_client::write_session::{Ticket, WriteSession};
use capkv_proto::raft::{raft_transport_client::RaftTransportClient, ForwardRequest};
use capkv_proto::status::to_status;
use capkv_replication::{codec, CommandResponse, Idempotency, Op};
use capkv_storage::StoredValue;
use capkv_types::{KvError, NodeId, PartitionId, ReadConsistency, SessionToken};
use tokio::time::Instant;

use crate::kv::{KvCore, ScanPage, ScanParams, Served};
use crate::transport::RAFT_MESSAGE_BYTES_MAX;

const BACKOFF_INITIAL: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Client sessions a router writes in, in turn: a write stuck in one partition's failover
/// holds back only its own session's `first_incomplete`.
const SESSIONS: usize = 16;

pub struct Router {
    core: Arc<KvCore>,
    sessions: Vec<WriteSession>,
    next: std::sync::atomic::AtomicUsize,
}

/// A write's place in its session, given back when the write ends, however it ends (a
/// future dropped by a client that went away included).
struct InFlight<'a> {
    session: &'a WriteSession,
    ticket: Ticket,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.session.end(self.ticket);
    }
}

/// A write's answer: where it was served and what the state machine said.
pub type Written = (Served, CommandResponse);

impl Router {
    pub fn new(core: Arc<KvCore>) -> Self {
        let started = core.hlc().now().physical_ms();
        Router {
            core,
            sessions: (0..SESSIONS)
                .map(|_| WriteSession::new(rand::random::<u64>() | 1, started))
                .collect(),
            next: Default::default(),
        }
    }

    pub fn core(&self) -> &Arc<KvCore> {
        &self.core
    }

    /// Runs a write on its partition's leader, wherever it is (see the module docs).
    pub async fn write(&self, op: Op) -> Result<Written, KvError> {
        let p = self.core.check_op(&op)?;
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let session = &self.sessions[turn % SESSIONS];
        let mut renewals = 0;
        loop {
            let flight = InFlight {
                session,
                ticket: session.begin(),
            };
            let result = self.write_attempts(p, &op, session, &flight.ticket).await;
            let client_id = flight.ticket.client_id;
            drop(flight);
            match result {
                // Only reported when no attempt may have applied the write.
                Err(KvError::SessionExpired(_)) if renewals < 2 => {
                    renewals += 1;
                    let now = self.core.hlc().now().physical_ms();
                    session.renew(client_id, now);
                }
                other => return other,
            }
        }
    }

    async fn write_attempts(
        &self,
        p: PartitionId,
        op: &Op,
        session: &WriteSession,
        ticket: &Ticket,
    ) -> Result<Written, KvError> {
        let core = &self.core;
        let attempt_budget = core.write_timeout() + Duration::from_secs(1);
        let deadline = Instant::now() + attempt_budget * 2;
        let mut policy = RetryPolicy::new(true);
        let mut backoff = BACKOFF_INITIAL;
        let mut target: Option<NodeId> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(policy.give_up());
            }
            let node = target.take().unwrap_or_else(|| core.leader_guess(p));
            let pair = session.pair(ticket);
            let idempotency = Idempotency {
                client_id: pair.client_id,
                sequence: pair.sequence,
                session_started_ms: pair.session_started_ms,
                first_incomplete: pair.first_incomplete,
            };
            let attempt = if node == core.id() {
                match core.execute(op.clone(), Some(idempotency)).await {
                    Ok(w) => return Ok(w),
                    Err(e) => Attempt::Failed(to_status(&e)),
                }
            } else {
                let budget = attempt_budget.min(deadline - now);
                let sent = self.forward(node, p, op, idempotency);
                match tokio::time::timeout(budget, sent).await {
                    Ok(Ok(w)) => return Ok(w),
                    Ok(Err(status)) => Attempt::Failed(status),
                    Err(_elapsed) => Attempt::TimedOut {
                        addr: format!("node {node}"),
                        budget,
                    },
                }
            };
            match policy.after(attempt) {
                Next::Fail(e) => return Err(e),
                Next::Retry { now, leader } => {
                    if let LeaderUpdate::Set {
                        leader: Some(l), ..
                    } = leader
                    {
                        target = Some(l);
                    }
                    if !now {
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(backoff.min(left)).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
    }

    /// Sends a write to `node`, which proposes it only if it leads `p`.
    async fn forward(
        &self,
        node: NodeId,
        p: PartitionId,
        op: &Op,
        id: Idempotency,
    ) -> Result<Written, tonic::Status> {
        let core = &self.core;
        let addr = core.map().addr_of(node).ok_or_else(|| {
            to_status(&KvError::Internal(format!(
                "node {node} is not in the partition map"
            )))
        })?;
        if core.faults().drops_to(node) {
            // Not sent: certainly not applied.
            return Err(to_status(&KvError::Unavailable(format!(
                "node {node} is cut off from node {} (fault injection)",
                core.id()
            ))));
        }
        let encoded =
            codec::encode(op).map_err(|e| to_status(&KvError::Internal(e.to_string())))?;
        let mut client = RaftTransportClient::new(core.peers().channel(addr))
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
        core.metrics().writes_forwarded.inc();
        let resp = client
            .forward(ForwardRequest {
                from_node: core.id().0,
                partition: p.0,
                op: encoded,
                client_id: id.client_id,
                sequence: id.sequence,
                session_started_ms: id.session_started_ms,
                first_incomplete: id.first_incomplete,
            })
            .await?
            .into_inner();
        let mut response: CommandResponse = codec::decode(&resp.response).map_err(|e| {
            // The write happened; only its answer is unreadable.
            to_status(&KvError::Ambiguous(format!(
                "node {node} answered a forwarded write unreadably: {e}"
            )))
        })?;
        response.log_index = resp.log_position;
        let served = Served {
            partition: p,
            served_by: NodeId(resp.served_by),
            term: resp.raft_term,
            applied_index: resp.applied_index,
            bound: Default::default(),
        };
        Ok((served, response))
    }

    /// A read of `key` at `level`, served here or by the leader. `session` carries the
    /// connection's session position (`session` reads).
    pub async fn get(
        &self,
        key: &[u8],
        level: ReadConsistency,
        session: &SessionToken,
    ) -> Result<(Served, Option<StoredValue>), KvError> {
        let core = &self.core;
        let p = core.map().partition_for_key(key);
        let deadline = Instant::now() + core.write_timeout() * 2;
        let mut backoff = BACKOFF_INITIAL;
        let mut target: Option<NodeId> = None;
        loop {
            let result = match target.take() {
                Some(node) if node != core.id() => {
                    core.get_remote(node, p, key, level, session.at(p)).await
                }
                _ => core.get(key, level, session, false).await,
            };
            match result {
                Err(KvError::NotLeader {
                    leader_id: Some(l), ..
                }) if Instant::now() < deadline => target = Some(l),
                Err(KvError::Unavailable(_)) | Err(KvError::NotLeader { .. })
                    if Instant::now() + backoff < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                other => return other,
            }
        }
    }

    /// One page of keys in order across every partition (each partition read wherever it
    /// can be at the level asked).
    pub async fn scan(&self, params: &ScanParams) -> Result<ScanPage, KvError> {
        self.core.scan(params).await
    }
}
