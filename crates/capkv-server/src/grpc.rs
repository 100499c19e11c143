//! gRPC front end: the client `Kv` service and the peer `RaftTransport` service. Both only
//! translate between protobuf and [`KvCore`]; no logic lives here.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use capkv_proto::consistency::{from_wire, WireLevel};
use capkv_proto::kv::{self as pb, kv_server::Kv};
use capkv_proto::raft::{
    raft_transport_server::RaftTransport as RaftTransportService, EngineClosed, EngineFrame,
    EngineSnapshotChunk, EngineSnapshotReceived, ForwardRequest, ForwardResponse,
};
use capkv_proto::status::to_status;
use capkv_replication::{CommandResponse, Condition, Idempotency};
use capkv_types::{KvError, NodeId, PartitionId, SessionToken};
use tonic::{Request, Response, Status};

use crate::kv::{check_peer_lease, KeyValue, KvCore, ScanParams, Served};

pub struct KvService {
    pub core: Arc<KvCore>,
}

fn condition(if_revision: Option<u64>, if_absent: bool) -> Result<Condition, KvError> {
    match (if_revision, if_absent) {
        (Some(_), true) => Err(KvError::InvalidArgument(
            "if_revision and if_absent cannot both be set".into(),
        )),
        (Some(r), false) => Ok(Condition::IfRevision(r)),
        (None, true) => Ok(Condition::IfAbsent),
        (None, false) => Ok(Condition::Always),
    }
}

fn idempotency(i: Option<pb::Idempotency>) -> Option<Idempotency> {
    i.filter(|i| i.client_id != 0).map(|i| Idempotency {
        client_id: i.client_id,
        sequence: i.sequence,
        session_started_ms: i.session_started_ms,
        first_incomplete: i.first_incomplete,
    })
}

/// The response header: where it was served, and the session token advanced past it.
fn header(s: Served, mut session: SessionToken) -> Option<pb::ResponseHeader> {
    session.observe(s.partition, s.applied_index);
    Some(pb::ResponseHeader {
        partition_id: s.partition.0,
        served_by: s.served_by.0,
        raft_term: s.term,
        applied_index: s.applied_index,
        session_token: session.encode(),
        stale_ms_at_most: s.bound.stale_ms_at_most,
        behind_positions_at_most: s.bound.behind_positions_at_most,
    })
}

fn kv_pb(kv: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key,
        value: kv.value.value,
        mod_revision: kv.value.mod_revision,
        create_revision: kv.value.create_revision,
        hlc: kv.value.hlc,
        expires_at_ms: kv.value.expires_at_ms,
    }
}

impl KvService {
    async fn observe<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, KvError>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let result = fut.await;
        let m = &self.core.metrics();
        m.latency
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        let code = match &result {
            Ok(_) => "ok",
            Err(e) => e.code().as_str(),
        };
        m.requests.with_label_values(&[op, code]).inc();
        result.map_err(|e| to_status(&e))
    }
}

fn write_parts(r: &CommandResponse) -> (bool, u64, u64, u64) {
    (r.succeeded, r.revision, r.hlc, r.current_revision)
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        let core = &self.core;
        let resp = self
            .observe("get", async {
                let level = from_wire(WireLevel::of_get(&req), core.default_consistency())?;
                let session = SessionToken::decode(&req.session_token)?;
                let (served, value) = core.get(&req.key, level, &session, req.forwarded).await?;
                Ok(pb::GetResponse {
                    header: header(served, session),
                    found: value.is_some(),
                    kv: value.map(|value| {
                        kv_pb(KeyValue {
                            key: req.key.clone(),
                            value,
                        })
                    }),
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let req = request.into_inner();
        let core = &self.core;
        let resp = self
            .observe("put", async {
                let cond = condition(req.if_revision, req.if_absent)?;
                let session = SessionToken::decode(&req.session_token)?;
                let (served, r) = core
                    .put(req.key, req.value, cond, idempotency(req.idempotency))
                    .await?;
                let (succeeded, revision, hlc, current_revision) = write_parts(&r);
                Ok(pb::PutResponse {
                    header: header(served, session),
                    succeeded,
                    revision,
                    hlc,
                    current_revision,
                    log_position: r.log_index,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = request.into_inner();
        let core = &self.core;
        let resp = self
            .observe("delete", async {
                let cond = condition(req.if_revision, false)?;
                let session = SessionToken::decode(&req.session_token)?;
                let (served, r) = core
                    .delete(req.key, cond, idempotency(req.idempotency))
                    .await?;
                let (deleted, revision, hlc, current_revision) = write_parts(&r);
                Ok(pb::DeleteResponse {
                    header: header(served, session),
                    deleted,
                    revision,
                    hlc,
                    current_revision,
                    log_position: r.log_index,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn scan(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        let req = request.into_inner();
        let core = &self.core;
        let resp = self
            .observe("scan", async {
                let level = from_wire(WireLevel::of_scan(&req), core.default_consistency())?;
                let params = ScanParams {
                    start: req.start,
                    end: (!req.end.is_empty()).then_some(req.end),
                    prefix: req.prefix,
                    limit: req.limit,
                    continuation: req.continuation,
                    consistency: level,
                    session: SessionToken::decode(&req.session_token)?,
                };
                let page = match req.partition_id {
                    Some(p) => core.scan_one(PartitionId(p), &params).await?,
                    None => core.scan(&params).await?,
                };
                let mut session = params.session;
                session.merge(&page.seen);
                Ok(pb::ScanResponse {
                    kvs: page.kvs.into_iter().map(kv_pb).collect(),
                    continuation: page.continuation,
                    session_token: session.encode(),
                    stale_ms_at_most: page.bound.stale_ms_at_most,
                    behind_positions_at_most: page.bound.behind_positions_at_most,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let core = &self.core;
        let partitions = core
            .partition_status()
            .into_iter()
            .map(|v| pb::PartitionStatus {
                id: v.id.0,
                replicas: v.replicas.iter().map(|n| n.0).collect(),
                role: v.role,
                leader_id: v.leader.map(|n| n.0).unwrap_or(0),
                term: v.term,
                last_log_index: v.last_log_index,
                commit_index: v.commit_index,
                applied_index: v.applied_index,
                snapshot_index: v.snapshot_index,
                purged_index: v.purged_index,
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            node_id: core.id().0,
            version: env!("CARGO_PKG_VERSION").to_string(),
            partition_count: core.map().partition_count,
            replication_factor: core.map().replication_factor,
            nodes: core
                .map()
                .nodes
                .iter()
                .map(|(id, addr)| pb::NodeInfo {
                    id: id.0,
                    addr: addr.clone(),
                    http_addr: addr
                        .parse::<std::net::SocketAddr>()
                        .map(|a| crate::config::default_http_addr(a).to_string())
                        .unwrap_or_default(),
                })
                .collect(),
            partitions,
            read_policy: core.read_policy().name().to_string(),
            lease_read_ms: core.lease_read().as_millis() as u64,
            vote_hold_remaining_ms: core.vote_hold_remaining_ms(),
            storage_error: core.storage_error().unwrap_or_default(),
            hlc_now_ms: core.hlc().now().physical_ms(),
            snapshots_sending: snapshot_count(core, |s| &s.sending) as u32,
            snapshots_receiving: snapshot_count(core, |s| &s.receiving) as u32,
            snapshot_bytes_sent: snapshot_count(core, |s| &s.bytes_sent),
            snapshot_bytes_received: snapshot_count(core, |s| &s.bytes_received),
            http_addr: addr_or_empty(core.endpoints().http),
            resp_addr: addr_or_empty(core.endpoints().resp),
            json_addr: addr_or_empty(core.endpoints().json),
        }))
    }
}

/// Whether this node takes the raftstore engine's traffic (a frame, or a snapshot stream)
/// from peer `from`: addressed to this node, with this node's session TTL, and a lease
/// this node's vote refusal covers.
fn check_engine_peer(
    core: &KvCore,
    from: NodeId,
    to_node: u64,
    session_ttl_ms: u64,
    lease_read_ms: u64,
) -> Result<(), Status> {
    if to_node != core.id().0 {
        return Err(Status::failed_precondition(format!(
            "engine traffic for node {to_node} reached node {}",
            core.id()
        )));
    }
    if let Some(why) = session_ttl_mismatch(core, from.0, session_ttl_ms) {
        return Err(Status::failed_precondition(why));
    }
    if let Err(why) = check_peer_lease(from, lease_read_ms, core.id(), core.vote_refusal_ms()) {
        core.log_refused_peer(from, &why);
        return Err(Status::failed_precondition(why));
    }
    Ok(())
}

/// The next chunk of a snapshot stream: a sender that stops sending must not hold the
/// partition's staging for good.
async fn next_chunk(
    inbound: &mut tonic::Streaming<EngineSnapshotChunk>,
) -> Result<Option<EngineSnapshotChunk>, Status> {
    match tokio::time::timeout(crate::engine::SNAPSHOT_CHUNK_WAIT, inbound.message()).await {
        Err(_) => Err(Status::deadline_exceeded("no snapshot chunk for 60 s")),
        Ok(m) => m,
    }
}

fn addr_or_empty(a: Option<std::net::SocketAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_default()
}

/// One of the engine's snapshot counters.
fn snapshot_count(
    core: &KvCore,
    field: impl Fn(&crate::engine::Snapshots) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    field(&core.raft_engine().snapshots).load(std::sync::atomic::Ordering::Relaxed)
}

/// Receives Raft messages from peers.
pub struct RaftService {
    pub core: Arc<KvCore>,
    /// Set when the node stops: peer streams end, so the gRPC server's graceful shutdown
    /// does not wait for connections that peers keep open for good.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Why this node refuses a peer whose client-session TTL differs (a rule of every
/// partition's state machine: replicas would decide differently), logged once a minute.
fn session_ttl_mismatch(core: &KvCore, from: u64, ttl_ms: u64) -> Option<String> {
    if ttl_ms == core.session_ttl_ms() {
        return None;
    }
    let why = format!(
        "node {from} expires client sessions after {ttl_ms} ms, node {} after {} ms: their state \
         machines would decide differently. Give every node the same --client-session-ttl-ms.",
        core.id(),
        core.session_ttl_ms()
    );
    core.log_refused_peer(NodeId(from), &why);
    Some(why)
}

/// Peer batches the raftstore engine may have waiting before receivers stop reading.
const ENGINE_BACKLOG_MAX: usize = 1024;

#[tonic::async_trait]
impl RaftTransportService for RaftService {
    /// A peer's raftstore engine traffic: frames in, nothing back until the stream ends.
    /// A malformed or misaddressed frame ends the stream (the peer reconnects); frames
    /// from a peer this node drops by fault injection are ignored.
    async fn engine(
        &self,
        request: Request<tonic::Streaming<EngineFrame>>,
    ) -> Result<Response<EngineClosed>, Status> {
        let core = self.core.clone();
        let engine = core.raft_engine().clone();
        let mut inbound = request.into_inner();
        let mut shutdown = self.shutdown.clone();
        loop {
            let frame = tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(f)) => f,
                    Ok(None) => return Ok(Response::new(EngineClosed { reason: "end of stream".into() })),
                    Err(e) => return Err(e),
                },
                _ = shutdown.wait_for(|stop| *stop) => {
                    return Ok(Response::new(EngineClosed { reason: "node stopping".into() }));
                }
            };
            let from = NodeId(frame.from_node);
            check_engine_peer(
                &core,
                from,
                frame.to_node,
                frame.session_ttl_ms,
                frame.lease_read_ms,
            )?;
            if core.faults().drops_from(from) {
                continue;
            }
            // Backpressure: while the engine has many batches to take, stop reading; HTTP/2
            // flow control then stops the peer, so no peer can make this node buffer
            // without bound.
            while engine.peer_backlog() >= ENGINE_BACKLOG_MAX {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            core.metrics()
                .raft_messages
                .with_label_values(&["engine_batch"])
                .inc();
            if let Err(why) = engine.deliver(frame.from_node, &frame.batch) {
                tracing::warn!(peer = frame.from_node, "{why}; closing the stream");
                return Err(Status::invalid_argument(why));
            }
        }
    }

    /// A write another node's router sent on: proposed here if this node leads its
    /// partition, else refused with `NotLeader` (never forwarded again).
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let req = request.into_inner();
        let core = &self.core;
        if core.faults().drops_from(NodeId(req.from_node)) {
            return Err(Status::unavailable("dropped by fault injection"));
        }
        let op: capkv_replication::Op = capkv_replication::codec::decode(&req.op)
            .map_err(|e| Status::invalid_argument(format!("a forwarded write: {e}")))?;
        let p = core.check_op(&op).map_err(|e| to_status(&e))?;
        if p.0 != req.partition {
            return Err(to_status(&KvError::InvalidArgument(format!(
                "node {} placed a forwarded write in partition {}, this node in {p}: the \
                 nodes hash keys differently (mixed versions?)",
                req.from_node, req.partition
            ))));
        }
        let idempotency = idempotency(Some(pb::Idempotency {
            client_id: req.client_id,
            sequence: req.sequence,
            session_started_ms: req.session_started_ms,
            first_incomplete: req.first_incomplete,
        }));
        let (served, resp) = core
            .execute(op, idempotency)
            .await
            .map_err(|e| to_status(&e))?;
        let log_position = resp.log_index;
        let response =
            capkv_replication::codec::encode(&resp).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ForwardResponse {
            response,
            log_position,
            served_by: served.served_by.0,
            raft_term: served.term,
            applied_index: served.applied_index,
        }))
    }

    /// Stages a partition's image chunk by chunk (at most one stream per partition), then
    /// hands the engine its `MsgSnapshot`, which installs it with the snapshot's log.
    async fn engine_snapshot(
        &self,
        request: Request<tonic::Streaming<EngineSnapshotChunk>>,
    ) -> Result<Response<EngineSnapshotReceived>, Status> {
        let core = self.core.clone();
        let engine = core.raft_engine().clone();
        let mut inbound = request.into_inner();
        let Some(mut chunk) = next_chunk(&mut inbound).await? else {
            return Err(Status::invalid_argument("an empty snapshot stream"));
        };
        let (from, partition) = (NodeId(chunk.from_node), chunk.partition);
        check_engine_peer(
            &core,
            from,
            chunk.to_node,
            chunk.session_ttl_ms,
            chunk.lease_read_ms,
        )?;
        let mut receiver = engine
            .receive_snapshot(PartitionId(partition))
            .await
            .map_err(Status::unavailable)?;
        let mut bytes = 0;
        loop {
            if core.faults().drops_from(from) {
                return Err(Status::unavailable("dropped by fault injection"));
            }
            if chunk.from_node != from.0 || chunk.partition != partition {
                return Err(Status::invalid_argument(
                    "a snapshot stream changed its sender or partition",
                ));
            }
            bytes += receiver
                .put(
                    std::mem::take(&mut chunk.data),
                    std::mem::take(&mut chunk.sessions),
                )
                .await
                .map_err(Status::internal)?;
            if chunk.last {
                receiver
                    .finish(from.0, chunk.index, chunk.applied, &chunk.message)
                    .await
                    .map_err(Status::invalid_argument)?;
                return Ok(Response::new(EngineSnapshotReceived { bytes }));
            }
            chunk = next_chunk(&mut inbound).await?.ok_or_else(|| {
                Status::invalid_argument("the snapshot stream ended before its last chunk")
            })?;
        }
    }
}
