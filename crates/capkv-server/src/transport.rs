//! Node-to-node connections: one gRPC channel (one HTTP/2 connection) per peer address,
//! shared by every partition's Raft traffic and by scan fan-out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use std::sync::Arc;

use capkv_proto::raft::{
    raft_transport_client::RaftTransportClient, RaftBatch, RaftBatchItem, RaftKind, RaftMessage,
    RaftReplyItem, RaftReplyStatus,
};
use capkv_replication::{RaftEnvelope, RaftRpc, RaftTransport, TransportError};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

/// Largest Raft message (snapshots travel whole).
pub const RAFT_MESSAGE_BYTES_MAX: usize = 512 * 1024 * 1024;

#[derive(Default)]
pub struct PeerChannels {
    channels: Mutex<HashMap<String, Channel>>,
    muxes: Mutex<HashMap<String, PeerMux>>,
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

    /// The multiplexed Raft stream to `addr`, started on first use. Must be called inside
    /// the runtime.
    fn mux(&self, addr: &str) -> PeerMux {
        let mut muxes = self.muxes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = muxes.get(addr).filter(|m| !m.tx.is_closed()) {
            return m.clone();
        }
        let m = PeerMux::start(self.channel(addr));
        muxes.insert(addr.to_string(), m.clone());
        m
    }
}

type Answer = oneshot::Sender<Result<Vec<u8>, TransportError>>;

/// Messages of every partition bound for one peer share one long-lived gRPC stream:
/// whatever is queued goes out as one batch, answers come back in batches, matched by id.
#[derive(Clone)]
struct PeerMux {
    tx: mpsc::Sender<(RaftMessage, Answer)>,
}

/// Messages per batch, and queued messages per peer before senders wait.
const BATCH_MAX: usize = 256;
const QUEUE_MAX: usize = 8192;

impl PeerMux {
    fn start(channel: Channel) -> PeerMux {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        tokio::spawn(run_mux(channel, rx));
        PeerMux { tx }
    }
}

fn answer_of(item: RaftReplyItem) -> Result<Vec<u8>, TransportError> {
    match RaftReplyStatus::try_from(item.status) {
        Ok(RaftReplyStatus::Ok) => Ok(item.payload),
        Ok(RaftReplyStatus::RemoteError) => Err(TransportError::Remote(item.error)),
        _ => Err(TransportError::Unreachable(item.error)),
    }
}

/// Fails every message waiting for an answer, and every message still queued: after a
/// failed connection they are stale (their callers time out within milliseconds), and
/// sending them later would only delay fresh ones.
fn fail_all(
    pending: &mut HashMap<u64, Answer>,
    rx: &mut mpsc::Receiver<(RaftMessage, Answer)>,
    why: &str,
) {
    for (_, a) in pending.drain() {
        let _ = a.send(Err(TransportError::Unreachable(why.to_string())));
    }
    while let Ok((_, a)) = rx.try_recv() {
        let _ = a.send(Err(TransportError::Unreachable(why.to_string())));
    }
}

/// Takes `first` and whatever else is queued (up to a batch) into one batch.
fn collect(
    first: (RaftMessage, Answer),
    rx: &mut mpsc::Receiver<(RaftMessage, Answer)>,
    pending: &mut HashMap<u64, Answer>,
    next_id: &mut u64,
) -> RaftBatch {
    let mut items = Vec::new();
    let mut push = |(m, a): (RaftMessage, Answer), items: &mut Vec<RaftBatchItem>| {
        *next_id += 1;
        pending.insert(*next_id, a);
        items.push(RaftBatchItem {
            id: *next_id,
            message: Some(m),
        });
    };
    push(first, &mut items);
    while items.len() < BATCH_MAX {
        match rx.try_recv() {
            Ok(more) => push(more, &mut items),
            Err(_) => break,
        }
    }
    RaftBatch { items }
}

async fn run_mux(channel: Channel, mut rx: mpsc::Receiver<(RaftMessage, Answer)>) {
    let mut next_id = 0u64;
    let mut pending: HashMap<u64, Answer> = HashMap::new();
    loop {
        // Connect when there is something to send.
        let Some(first) = rx.recv().await else { return };
        let mut client = RaftTransportClient::new(channel.clone())
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
        let (req_tx, req_rx) = mpsc::channel::<RaftBatch>(64);
        let first_batch = collect(first, &mut rx, &mut pending, &mut next_id);
        if req_tx.send(first_batch).await.is_err() {
            fail_all(&mut pending, &mut rx, "stream closed");
            continue;
        }
        let opened = tokio::time::timeout(
            Duration::from_secs(2),
            client.stream(tokio_stream::wrappers::ReceiverStream::new(req_rx)),
        )
        .await;
        let mut inbound = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => {
                fail_all(&mut pending, &mut rx, s.message());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => {
                fail_all(
                    &mut pending,
                    &mut rx,
                    "peer did not open the stream in time",
                );
                continue;
            }
        };
        // A batch collected but not yet handed to the stream. Answers are read while it
        // waits for room: a sender that stopped reading answers while the peer's queues
        // were full could stall both nodes' streams for good (each waiting on the other).
        let mut ready: Option<RaftBatch> = None;
        loop {
            tokio::select! {
                next = rx.recv(), if ready.is_none() => match next {
                    None => return,
                    Some(m) => ready = Some(collect(m, &mut rx, &mut pending, &mut next_id)),
                },
                room = req_tx.reserve(), if ready.is_some() => match (room, ready.take()) {
                    (Ok(slot), Some(batch)) => slot.send(batch),
                    _ => {
                        fail_all(&mut pending, &mut rx, "stream closed");
                        break;
                    }
                },
                reply = inbound.message() => match reply {
                    Ok(Some(batch)) => {
                        for item in batch.items {
                            if let Some(a) = pending.remove(&item.id) {
                                let _ = a.send(answer_of(item));
                            }
                        }
                        // Callers that gave up (timed out) leave their entries behind.
                        if pending.len() > QUEUE_MAX {
                            pending.retain(|_, a| !a.is_closed());
                        }
                    }
                    Ok(None) | Err(_) => {
                        fail_all(&mut pending, &mut rx, "stream to peer broke");
                        break;
                    }
                },
            }
        }
    }
}

/// [`RaftTransport`] over gRPC: snapshots as single calls, everything else over the
/// peer's multiplexed stream.
pub struct GrpcTransport {
    pub peers: Arc<PeerChannels>,
    /// Sent with every message (see `kv::check_peer_lease`).
    pub lease_read_ms: u64,
    /// Sent with every message: the client-session TTL (a state-machine rule).
    pub session_ttl_ms: u64,
}

fn kind(rpc: RaftRpc) -> RaftKind {
    match rpc {
        RaftRpc::Append => RaftKind::Append,
        RaftRpc::Vote => RaftKind::Vote,
        RaftRpc::PreVote => RaftKind::PreVote,
        RaftRpc::Snapshot => RaftKind::Snapshot,
        RaftRpc::TransferLeader => RaftKind::TransferLeader,
        RaftRpc::ConfirmLeadership => RaftKind::ConfirmLeadership,
    }
}

pub fn rpc_of(kind: i32) -> Option<RaftRpc> {
    Some(match RaftKind::try_from(kind).ok()? {
        RaftKind::Append => RaftRpc::Append,
        RaftKind::Vote => RaftRpc::Vote,
        RaftKind::PreVote => RaftRpc::PreVote,
        RaftKind::Snapshot => RaftRpc::Snapshot,
        RaftKind::TransferLeader => RaftRpc::TransferLeader,
        RaftKind::ConfirmLeadership => RaftRpc::ConfirmLeadership,
        RaftKind::Unspecified => return None,
    })
}

impl RaftTransport for GrpcTransport {
    fn call(
        &self,
        addr: &str,
        env: RaftEnvelope,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let message = RaftMessage {
            partition_id: env.partition.0,
            from_node: env.from.0,
            to_node: env.to.0,
            kind: kind(env.rpc) as i32,
            payload: env.payload,
            lease_read_ms: self.lease_read_ms,
            session_ttl_ms: self.session_ttl_ms,
        };
        let peers = self.peers.clone();
        let addr = addr.to_string();
        let unary = env.rpc == RaftRpc::Snapshot;
        Box::pin(async move {
            if unary {
                return call_unary(peers.channel(&addr), message, timeout).await;
            }
            let mux = peers.mux(&addr);
            let (tx, rx) = oneshot::channel();
            // Never wait for room in the queue: a caller must hear back within its timeout
            // (openraft keeps a replication request in flight, and so holds back log purges,
            // until it does), and a full queue means the peer is not keeping up anyway.
            match mux.tx.try_send((message, tx)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(TransportError::Unreachable(format!(
                        "{QUEUE_MAX} messages already queued for the peer"
                    )))
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err(TransportError::Unreachable("peer stream stopped".into()))
                }
            }
            match tokio::time::timeout(timeout, rx).await {
                Err(_) => Err(TransportError::Unreachable(format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                ))),
                Ok(Err(_)) => Err(TransportError::Unreachable(
                    "peer stream dropped the message".into(),
                )),
                Ok(Ok(answer)) => answer,
            }
        })
    }
}

async fn call_unary(
    channel: Channel,
    message: RaftMessage,
    timeout: Duration,
) -> Result<Vec<u8>, TransportError> {
    let mut client = RaftTransportClient::new(channel)
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    let mut req = tonic::Request::new(message);
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.call(req)).await {
        Err(_) => Err(TransportError::Unreachable(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
        Ok(Ok(resp)) => Ok(resp.into_inner().payload),
        Ok(Err(s)) => match s.code() {
            tonic::Code::InvalidArgument => Err(TransportError::Remote(s.message().to_string())),
            _ => Err(TransportError::Unreachable(s.message().to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capkv_types::{NodeId, PartitionId};
    use std::time::Instant;

    /// Every call answers within its timeout even when the peer is down and callers
    /// outnumber the queue: a caller that waited for room instead would keep openraft's
    /// replication request in flight, and that holds back log purges for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_to_a_dead_peer_return_in_time_even_when_the_queue_is_full() {
        // Bind and drop a listener: nothing listens on the port afterwards.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let transport = Arc::new(GrpcTransport {
            peers: Arc::new(PeerChannels::default()),
            lease_read_ms: 0,
            session_ttl_ms: 0,
        });
        let timeout = Duration::from_millis(50);
        let calls = 3 * QUEUE_MAX;
        let mut tasks = Vec::with_capacity(calls);
        for i in 0..calls {
            let envelope = RaftEnvelope {
                partition: PartitionId(i as u32 % 8),
                from: NodeId(1),
                to: NodeId(2),
                rpc: RaftRpc::Append,
                payload: vec![0; 16],
            };
            let call = transport.call(&addr, envelope, timeout);
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let result = call.await;
                (started.elapsed(), result.is_err())
            }));
        }
        let mut slowest = Duration::ZERO;
        for t in tasks {
            let (took, failed) = t.await.unwrap();
            assert!(failed, "a call to a dead peer cannot succeed");
            slowest = slowest.max(took);
        }
        // Generous: the point is that no call waits for the queue (which drains a batch
        // per failed connection attempt, seconds for this many callers).
        assert!(
            slowest < Duration::from_secs(2),
            "a call with a {timeout:?} timeout took {slowest:?}"
        );
    }
}
