//! Node-to-node connections: one gRPC channel (one HTTP/2 connection) per peer address,
//! shared by every partition's Raft traffic and by scan fan-out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use capkv_proto::raft::{raft_transport_client::RaftTransportClient, RaftKind, RaftMessage};
use capkv_replication::{RaftEnvelope, RaftRpc, RaftTransport, TransportError};
use futures::future::BoxFuture;
use tonic::transport::{Channel, Endpoint};

/// Largest Raft message (snapshots travel whole).
pub const RAFT_MESSAGE_BYTES_MAX: usize = 512 * 1024 * 1024;

#[derive(Default)]
pub struct PeerChannels {
    channels: Mutex<HashMap<String, Channel>>,
}

impl PeerChannels {
    /// The channel to `addr`, created on first use; it reconnects by itself.
    pub fn channel(&self, addr: &str) -> Channel {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return c.clone();
        }
        let channel = match Endpoint::from_shared(format!("http://{addr}")) {
            Ok(e) => e
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(2))
                .keep_alive_while_idle(true)
                .connect_lazy(),
            // Addresses come from the validated cluster spec; an unparsable one still gets
            // a channel that fails every call rather than a panic.
            Err(_) => Endpoint::from_static("http://0.0.0.0:1").connect_lazy(),
        };
        channels.insert(addr.to_string(), channel.clone());
        channel
    }
}

/// [`RaftTransport`] over gRPC.
pub struct GrpcTransport {
    pub peers: std::sync::Arc<PeerChannels>,
}

fn kind(rpc: RaftRpc) -> RaftKind {
    match rpc {
        RaftRpc::Append => RaftKind::Append,
        RaftRpc::Vote => RaftKind::Vote,
        RaftRpc::PreVote => RaftKind::PreVote,
        RaftRpc::Snapshot => RaftKind::Snapshot,
        RaftRpc::TransferLeader => RaftKind::TransferLeader,
    }
}

pub fn rpc_of(kind: i32) -> Option<RaftRpc> {
    Some(match RaftKind::try_from(kind).ok()? {
        RaftKind::Append => RaftRpc::Append,
        RaftKind::Vote => RaftRpc::Vote,
        RaftKind::PreVote => RaftRpc::PreVote,
        RaftKind::Snapshot => RaftRpc::Snapshot,
        RaftKind::TransferLeader => RaftRpc::TransferLeader,
        RaftKind::Unspecified => return None,
    })
}

impl RaftTransport for GrpcTransport {
    fn call(&self, addr: &str, env: RaftEnvelope, timeout: Duration) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let channel = self.peers.channel(addr);
        Box::pin(async move {
            let mut client = RaftTransportClient::new(channel)
                .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
            let mut req = tonic::Request::new(RaftMessage {
                partition_id: env.partition.0,
                from_node: env.from.0,
                to_node: env.to.0,
                kind: kind(env.rpc) as i32,
                payload: env.payload,
            });
            req.set_timeout(timeout);
            match tokio::time::timeout(timeout, client.call(req)).await {
                Err(_) => Err(TransportError::Unreachable(format!("no answer within {} ms", timeout.as_millis()))),
                Ok(Ok(resp)) => Ok(resp.into_inner().payload),
                Ok(Err(s)) => match s.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                        Err(TransportError::Unreachable(s.message().to_string()))
                    }
                    _ => Err(TransportError::Remote(format!("{:?}: {}", s.code(), s.message()))),
                },
            }
        })
    }
}
