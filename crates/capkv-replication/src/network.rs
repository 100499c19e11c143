//! Raft messages between nodes, over a transport the server provides.
//!
//! Every message names its partition, its sender and the node it is meant for, so that
//! one connection between two nodes carries the traffic of every Raft group, and a node
//! refuses a message meant for another id (a reused address).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use capkv_types::{NodeId, PartitionId};
use futures::future::BoxFuture;
use openraft::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::raft::{TransferLeaderRequest, TransferLeaderResponse};
use openraft::{BasicNode, RaftNetworkV2};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode, encode};
use crate::group::PartitionRaft;
use crate::types::TypeConfig;
use crate::vote_hold::VoteHold;

/// Snapshots travel in one message; give them time.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaftRpc {
    Append,
    Vote,
    PreVote,
    Snapshot,
    TransferLeader,
    /// Node-level leadership confirmation (see `capkv_server::kv::LeaderConfirmer`);
    /// answered by the node, not by a partition's Raft.
    ConfirmLeadership,
}

impl RaftRpc {
    pub fn name(self) -> &'static str {
        match self {
            RaftRpc::Append => "append",
            RaftRpc::Vote => "vote",
            RaftRpc::PreVote => "pre_vote",
            RaftRpc::Snapshot => "snapshot",
            RaftRpc::TransferLeader => "transfer_leader",
            RaftRpc::ConfirmLeadership => "confirm_leadership",
        }
    }
}

/// One Raft message and its routing.
#[derive(Debug, Clone)]
pub struct RaftEnvelope {
    pub partition: PartitionId,
    pub from: NodeId,
    pub to: NodeId,
    pub rpc: RaftRpc,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// Could not reach the node, or it did not answer in time.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The node answered with an error.
    #[error("remote error: {0}")]
    Remote(String),
}

/// Sends a Raft message to a node and returns its reply bytes.
pub trait RaftTransport: Send + Sync + 'static {
    fn call(
        &self,
        addr: &str,
        envelope: RaftEnvelope,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>>;
}

/// Creates the per-peer network clients of one partition's Raft group.
pub struct NetworkFactory {
    pub(crate) transport: Arc<dyn RaftTransport>,
    pub(crate) partition: PartitionId,
    pub(crate) local: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        PeerNetwork {
            transport: self.transport.clone(),
            partition: self.partition,
            local: self.local,
            target: NodeId(target),
            addr: node.addr.clone(),
        }
    }
}

pub struct PeerNetwork {
    transport: Arc<dyn RaftTransport>,
    partition: PartitionId,
    local: NodeId,
    target: NodeId,
    addr: String,
}

impl PeerNetwork {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: RaftRpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let envelope = RaftEnvelope {
            partition: self.partition,
            from: self.local,
            to: self.target,
            rpc,
            payload,
        };
        let reply = self
            .transport
            .call(&self.addr, envelope, timeout)
            .await
            .map_err(|e| match e {
                TransportError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
                TransportError::Remote(_) => RPCError::Network(NetworkError::new(&e)),
            })?;
        let result: Result<Resp, String> =
            decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|m| RPCError::Network(NetworkError::from_string(m)))
    }
}

fn streaming_error(e: RPCError<TypeConfig>) -> StreamingError<TypeConfig> {
    match e {
        RPCError::Unreachable(u) => StreamingError::Unreachable(u),
        RPCError::Timeout(t) => StreamingError::Timeout(t),
        RPCError::Network(n) => StreamingError::Network(n),
        RPCError::RemoteError(r) => {
            StreamingError::Network(NetworkError::from_string(r.to_string()))
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::Append, &rpc, option.soft_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::Vote, &rpc, option.soft_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::PreVote, &rpc, option.soft_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let req = (vote, snapshot.meta, snapshot.snapshot);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = self.call(RaftRpc::Snapshot, &req, SNAPSHOT_TIMEOUT) => r.map_err(streaming_error),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::TransferLeader, &req, option.soft_ttl())
            .await
    }
}

/// Why an incoming message was not handed to Raft.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("malformed raft message: {0}")]
    Malformed(String),
    /// A vote asked for while this node holds its vote after a restart.
    #[error("{0}")]
    VoteHeld(String),
}

fn reply<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Result<Vec<u8>, DispatchError> {
    encode(&r.map_err(|e| e.to_string())).map_err(|e| DispatchError::Malformed(e.to_string()))
}

fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DispatchError> {
    decode(payload).map_err(|e| DispatchError::Malformed(e.to_string()))
}

/// Hands a received message to the partition's Raft and encodes its answer. Vote
/// requests are refused while `hold` lasts (see [`VoteHold`]).
pub async fn dispatch(
    raft: &PartitionRaft,
    rpc: RaftRpc,
    payload: &[u8],
    hold: &VoteHold,
) -> Result<Vec<u8>, DispatchError> {
    let vote_request = |payload: &[u8]| -> Result<VoteRequest<TypeConfig>, DispatchError> {
        let req: VoteRequest<TypeConfig> = parse(payload)?;
        match hold.refusal(&req) {
            Some(left) => Err(DispatchError::VoteHeld(format!(
                "this node restarted and grants no vote for another {} ms",
                left.as_millis()
            ))),
            None => Ok(req),
        }
    };
    match rpc {
        RaftRpc::Append => reply(raft.append_entries(parse(payload)?).await),
        RaftRpc::Vote => reply(raft.vote(vote_request(payload)?).await),
        RaftRpc::PreVote => reply(raft.pre_vote(vote_request(payload)?).await),
        RaftRpc::Snapshot => {
            let (vote, meta, data): (VoteOf<TypeConfig>, SnapshotMetaOf<TypeConfig>, Vec<u8>) =
                parse(payload)?;
            reply(
                raft.install_full_snapshot(
                    vote,
                    SnapshotOf::<TypeConfig, Vec<u8>> {
                        meta,
                        snapshot: data,
                    },
                )
                .await,
            )
        }
        RaftRpc::TransferLeader => reply(raft.handle_transfer_leader(parse(payload)?).await),
        RaftRpc::ConfirmLeadership => Err(DispatchError::Malformed(
            "leadership confirmations are answered by the node, not a partition".into(),
        )),
    }
}
