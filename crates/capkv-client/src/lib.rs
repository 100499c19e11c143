//! The Rust client of capkv.
//!
//! - Routes each key to its partition's leader using a cached partition map, learned from
//!   any node and refreshed when a node says `NotLeader`.
//! - Makes every write idempotent: it carries `(client_id, sequence)` of the client's
//!   session, and every retry of that write reuses the pair, so the cluster applies it at
//!   most once. Each write also says which answers the client already has
//!   (`first_incomplete`), so the servers keep only the answers still awaited. A session
//!   a partition no longer knows is renewed, and the write sent again, only when no
//!   attempt may have applied it.
//! - Retries `NotLeader` (at the hinted leader), `Unavailable` and transport failures with
//!   capped exponential backoff until the request deadline.
//! - Returns `Ambiguous` only when a write may have been applied and no retry could learn
//!   the outcome before the deadline.
//!
//! Depends only on capkv-types and capkv-proto.

pub mod retry;
pub mod write_session;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use capkv_proto::kv::{self as pb, kv_client::KvClient};
use capkv_proto::status::from_status;
use capkv_types::{partition_for_key, KvError, NodeId, PartitionId, ReadConsistency, SessionToken};
use tonic::transport::{Channel, Endpoint};

use retry::{Attempt, LeaderUpdate, Next, RetryPolicy};
use write_session::{Ticket, WriteSession};

pub use capkv_proto::kv::StatusResponse;
pub use capkv_types::{ErrorCode, KvError as Error};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` gRPC addresses of any nodes of the cluster.
    pub endpoints: Vec<String>,
    /// Total time one operation may take, retries included.
    pub request_timeout: Duration,
    /// Time one attempt may take before it is abandoned and retried.
    pub attempt_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Fixed client id (tests); random when `None`.
    pub client_id: Option<u64>,
}

impl ClientConfig {
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            request_timeout: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(7),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(1000),
            client_id: None,
        }
    }
}

/// The condition of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Condition {
    #[default]
    Always,
    /// Apply only if the key's current mod_revision equals this.
    IfRevision(u64),
    /// Apply only if the key does not exist.
    IfAbsent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResult {
    pub partition: PartitionId,
    /// False when the condition did not hold (put) or the key did not exist (delete).
    pub succeeded: bool,
    /// The revision of this write (the partition's write counter).
    pub revision: u64,
    pub hlc: u64,
    /// The key's mod_revision when the write was evaluated (0 = absent).
    pub current_revision: u64,
    /// The position in the partition's log of the entry that carried the write (0 when
    /// the answer was a retry's stored one).
    pub log_position: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: u64,
    pub create_revision: u64,
    pub hlc: u64,
}

/// A read's answer with where and how it was served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub kv: Option<KeyValue>,
    pub partition: PartitionId,
    /// The node that served it.
    pub served_by: u64,
    /// The serving replica's applied index after the read (no answer is newer).
    pub applied_index: u64,
    /// Bounded reads: the answer reflects every write acknowledged this long before the
    /// read began.
    pub stale_ms_at_most: Option<u64>,
    /// Bounded reads: log positions behind the commit index confirmed for the read, if one
    /// was.
    pub behind_positions_at_most: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub prefix: Vec<u8>,
    /// Page size (0 = server default, 1000).
    pub limit: u32,
    pub consistency: ReadConsistency,
    pub continuation: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
pub struct ScanPage {
    pub kvs: Vec<KeyValue>,
    /// Empty when the range is exhausted.
    pub continuation: Vec<u8>,
}

#[derive(Debug, Default)]
struct Routing {
    partition_count: u32,
    nodes: HashMap<NodeId, String>,
    replicas: Vec<Vec<NodeId>>,
    leaders: Vec<Option<NodeId>>,
}

/// An idempotency key the caller keeps and sends again to retry a write
/// ([`Client::put_idempotent`]): the client id, the cluster time its session started at,
/// and the sequence. Make one with [`Client::idempotency_key`] and keep all three: the
/// same key, however late, is applied at most once (a key older than the server's session
/// TTL is refused, never applied again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub client_id: u64,
    pub session_started_ms: u64,
    pub sequence: u64,
}

struct Inner {
    config: ClientConfig,
    session: WriteSession,
    /// The newest cluster HLC time (ms) a node reported.
    cluster_hlc_ms: AtomicU64,
    channels: Mutex<HashMap<String, Channel>>,
    routing: RwLock<Routing>,
    round_robin: AtomicU64,
    /// The read session: per partition the highest log position this client has written
    /// or read (`session` reads are served only by replicas at least that far).
    token: Mutex<SessionToken>,
}

/// A capkv client. Cheap to clone; clones share connections, the routing cache, the
/// idempotency sequence and the read session (`ReadConsistency::Session`).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

fn kv_pb_to(kv: pb::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        mod_revision: kv.mod_revision,
        create_revision: kv.create_revision,
        hlc: kv.hlc,
    }
}

fn put_request(key: Vec<u8>, value: Vec<u8>, condition: Condition) -> pb::PutRequest {
    let (if_revision, if_absent) = match condition {
        Condition::Always => (None, false),
        Condition::IfRevision(r) => (Some(r), false),
        Condition::IfAbsent => (None, true),
    };
    pb::PutRequest {
        key,
        value,
        if_revision,
        if_absent,
        idempotency: None,
        session_token: vec![],
    }
}

fn put_result(p: PartitionId, resp: pb::PutResponse) -> WriteResult {
    WriteResult {
        partition: p,
        succeeded: resp.succeeded,
        revision: resp.revision,
        hlc: resp.hlc,
        current_revision: resp.current_revision,
        log_position: resp.log_position,
    }
}

/// Asks one node for its status, with a deadline.
async fn status_call(
    mut kv: KvClient<Channel>,
    addr: &str,
    timeout: Duration,
) -> Result<StatusResponse, KvError> {
    let mut req = tonic::Request::new(pb::StatusRequest {});
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, kv.status(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(from_status(&s)),
        Err(_) => Err(KvError::Unavailable(format!(
            "{addr} did not answer in time"
        ))),
    }
}

/// The status of the node at `addr` over a connection of its own: one RPC, no partition
/// map needed (for tools that watch nodes rather than route keys).
pub async fn fetch_node_status(addr: &str, timeout: Duration) -> Result<StatusResponse, KvError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| KvError::InvalidArgument(format!("bad endpoint {addr:?}: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    status_call(KvClient::new(endpoint.connect_lazy()), addr, timeout).await
}

/// The leader of each partition according to `statuses` (a node that says it leads);
/// `None` where no node does.
pub fn leaders_of(partitions: u32, statuses: &[(u64, StatusResponse)]) -> Vec<Option<u64>> {
    (0..partitions)
        .map(|p| {
            statuses
                .iter()
                .find(|(_, s)| s.partitions.iter().any(|x| x.id == p && x.role == "Leader"))
                .map(|(id, _)| *id)
        })
        .collect()
}

impl Client {
    /// Connects to the cluster: asks the endpoints, in order, for the partition map.
    pub async fn connect(config: ClientConfig) -> Result<Client, KvError> {
        if config.endpoints.is_empty() {
            return Err(KvError::InvalidArgument("no endpoints given".into()));
        }
        let client_id = config
            .client_id
            .unwrap_or_else(|| rand::random::<u64>() | 1);
        let client = Client {
            inner: Arc::new(Inner {
                config,
                session: WriteSession::new(client_id, 0),
                cluster_hlc_ms: AtomicU64::new(0),
                channels: Mutex::new(HashMap::new()),
                routing: RwLock::new(Routing::default()),
                round_robin: AtomicU64::new(0),
                token: Mutex::new(SessionToken::default()),
            }),
        };
        client.refresh_routing().await?;
        client.inner.session.set_started(client.cluster_now_ms());
        Ok(client)
    }

    fn token(&self) -> std::sync::MutexGuard<'_, SessionToken> {
        self.inner.token.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Advances the read session past what a response saw.
    fn observe(&self, header: Option<&pb::ResponseHeader>) {
        if let Some(h) = header {
            self.token()
                .observe(PartitionId(h.partition_id), h.applied_index);
        }
    }

    /// The read session's token (opaque bytes; empty before any request), to carry the
    /// session over to another client or process (`join_session`).
    pub fn session_token(&self) -> Vec<u8> {
        self.token().encode()
    }

    /// Joins the read session of `token` (from `session_token`): `session` reads of this
    /// client then see everything that session wrote or read.
    pub fn join_session(&self, token: &[u8]) -> Result<(), KvError> {
        let other = SessionToken::decode(token)?;
        self.token().merge(&other);
        Ok(())
    }

    /// The id of this client's current session.
    pub fn client_id(&self) -> u64 {
        self.inner.session.client_id()
    }

    /// The cluster's HLC time as last reported by a node (this machine's clock if none did).
    fn cluster_now_ms(&self) -> u64 {
        match self.inner.cluster_hlc_ms.load(Ordering::Relaxed) {
            0 => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            ms => ms,
        }
    }

    /// Starts a new session (a partition no longer knew the old one).
    async fn renew_session(&self, expired: u64) {
        let _ = self.refresh_routing().await;
        self.inner.session.renew(expired, self.cluster_now_ms());
    }

    /// A new idempotency key for [`Client::put_idempotent`]: `client_id` and `sequence` of
    /// the caller's choosing, started now (cluster time). Keep the whole key to retry.
    pub fn idempotency_key(&self, client_id: u64, sequence: u64) -> IdempotencyKey {
        IdempotencyKey {
            client_id,
            session_started_ms: self.cluster_now_ms(),
            sequence,
        }
    }

    /// Runs one write of the session: retries with the same idempotency pair; if the
    /// partition no longer knows the session and no attempt may have applied the write
    /// (`SessionExpired` is only reported then), sends it once more in a new session.
    async fn session_write<T, F, Fut>(&self, p: PartitionId, send: F) -> Result<T, KvError>
    where
        F: Fn(KvClient<Channel>, pb::Idempotency) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut renewals = 0;
        loop {
            let ticket = self.inner.session.begin();
            let result = self
                .retry(Some(p), true, |kv| {
                    send(kv, self.inner.session.pair(&ticket))
                })
                .await;
            self.inner.session.end(ticket);
            match result {
                Err(KvError::SessionExpired(_)) if renewals < 2 => {
                    renewals += 1;
                    self.renew_session(ticket.client_id).await;
                }
                other => return other,
            }
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, KvError> {
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| KvError::InvalidArgument(format!("bad endpoint {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let c = endpoint.connect_lazy();
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn kv(&self, addr: &str) -> Result<KvClient<Channel>, KvError> {
        Ok(KvClient::new(self.channel(addr)?)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024))
    }

    /// Every key of partition `partition` as the replica on the node at `addr` holds it now
    /// (its local state, read at `eventual`; no retries, no other node asked), up to `max`
    /// keys. For tools that compare replicas, such as `capkv check`'s convergence check.
    pub async fn replica_data(
        &self,
        addr: &str,
        partition: PartitionId,
        max: usize,
    ) -> Result<Vec<KeyValue>, KvError> {
        let mut kv = self.kv(addr)?;
        let mut out = Vec::new();
        let mut continuation = Vec::new();
        loop {
            let mut req = tonic::Request::new(pb::ScanRequest {
                limit: capkv_types::Limits::default().scan_limit_max,
                continuation: std::mem::take(&mut continuation),
                consistency: pb::Consistency::Eventual as i32,
                partition_id: Some(partition.0),
                ..Default::default()
            });
            req.set_timeout(self.inner.config.attempt_timeout);
            let page = kv
                .scan(req)
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.extend(page.kvs.into_iter().map(kv_pb_to));
            if page.continuation.is_empty() || out.len() >= max {
                out.truncate(max);
                return Ok(out);
            }
            continuation = page.continuation;
        }
    }

    /// The status of the node at `addr` (its view of the cluster).
    pub async fn node_status(&self, addr: &str) -> Result<StatusResponse, KvError> {
        status_call(self.kv(addr)?, addr, self.inner.config.attempt_timeout).await
    }

    /// Reloads the partition map and leaders from the first endpoint that answers.
    pub async fn refresh_routing(&self) -> Result<(), KvError> {
        let mut addrs: Vec<String> = self.inner.config.endpoints.clone();
        {
            let r = self.inner.routing.read().unwrap_or_else(|e| e.into_inner());
            for a in r.nodes.values() {
                if !addrs.contains(a) {
                    addrs.push(a.clone());
                }
            }
        }
        let mut last_err = KvError::Unavailable("no endpoint answered".into());
        for addr in &addrs {
            match self.node_status(addr).await {
                Ok(s) => {
                    self.apply_status(&s);
                    return Ok(());
                }
                Err(e) => last_err = KvError::Unavailable(format!("{addr}: {e}")),
            }
        }
        Err(last_err)
    }

    fn apply_status(&self, s: &StatusResponse) {
        let mut r = self
            .inner
            .routing
            .write()
            .unwrap_or_else(|e| e.into_inner());
        self.inner
            .cluster_hlc_ms
            .fetch_max(s.hlc_now_ms, Ordering::Relaxed);
        r.partition_count = s.partition_count;
        r.nodes = s
            .nodes
            .iter()
            .map(|n| (NodeId(n.id), n.addr.clone()))
            .collect();
        r.replicas = vec![Vec::new(); s.partition_count as usize];
        r.leaders = vec![None; s.partition_count as usize];
        for p in &s.partitions {
            if let Some(slot) = r.replicas.get_mut(p.id as usize) {
                *slot = p.replicas.iter().map(|n| NodeId(*n)).collect();
            }
            if p.leader_id != 0 {
                if let Some(slot) = r.leaders.get_mut(p.id as usize) {
                    *slot = Some(NodeId(p.leader_id));
                }
            }
        }
    }

    fn partition_of(&self, key: &[u8]) -> PartitionId {
        let r = self.inner.routing.read().unwrap_or_else(|e| e.into_inner());
        partition_for_key(key, r.partition_count.max(1))
    }

    /// The node to try next for `partition` (its cached leader, else a replica in turn).
    fn target(&self, partition: Option<PartitionId>) -> Option<String> {
        let r = self.inner.routing.read().unwrap_or_else(|e| e.into_inner());
        let turn = self.inner.round_robin.fetch_add(1, Ordering::Relaxed) as usize;
        if let Some(p) = partition {
            if let Some(Some(leader)) = r.leaders.get(p.0 as usize) {
                if let Some(addr) = r.nodes.get(leader) {
                    return Some(addr.clone());
                }
            }
            if let Some(replicas) = r.replicas.get(p.0 as usize).filter(|v| !v.is_empty()) {
                return r.nodes.get(&replicas[turn % replicas.len()]).cloned();
            }
        }
        let mut all: Vec<&String> = r.nodes.values().collect();
        all.sort();
        if all.is_empty() {
            let e = &self.inner.config.endpoints;
            return e.get(turn % e.len().max(1)).cloned();
        }
        Some(all[turn % all.len()].clone())
    }

    /// One of `p`'s replicas, in turn.
    fn any_replica(&self, p: PartitionId) -> Option<String> {
        let r = self.inner.routing.read().unwrap_or_else(|e| e.into_inner());
        let replicas = r.replicas.get(p.0 as usize).filter(|v| !v.is_empty())?;
        let turn = self.inner.round_robin.fetch_add(1, Ordering::Relaxed) as usize;
        r.nodes.get(&replicas[turn % replicas.len()]).cloned()
    }

    fn set_leader(&self, p: PartitionId, leader: Option<NodeId>, leader_addr: Option<String>) {
        let mut r = self
            .inner
            .routing
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if let (Some(l), Some(addr)) = (leader, leader_addr) {
            r.nodes.entry(l).or_insert(addr);
        }
        if let Some(slot) = r.leaders.get_mut(p.0 as usize) {
            *slot = leader;
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the deadline passes.
    async fn retry<T, F, Fut>(
        &self,
        partition: Option<PartitionId>,
        is_write: bool,
        attempt: F,
    ) -> Result<T, KvError>
    where
        F: Fn(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        self.retry_at(partition, is_write, false, attempt).await
    }

    /// `retry`, where the first attempt of a read that any replica may serve (`spread`)
    /// goes to one of the partition's replicas in turn rather than to its leader, so
    /// followers carry their share; later attempts follow the leader.
    async fn retry_at<T, F, Fut>(
        &self,
        partition: Option<PartitionId>,
        is_write: bool,
        spread: bool,
        attempt: F,
    ) -> Result<T, KvError>
    where
        F: Fn(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let cfg = &self.inner.config;
        let deadline = Instant::now() + cfg.request_timeout;
        let mut backoff = cfg.backoff_initial;
        let mut policy = RetryPolicy::new(is_write);
        let mut first = true;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(policy.give_up());
            }
            let pick = match partition {
                Some(p) if spread && first => self.any_replica(p),
                _ => None,
            };
            first = false;
            let Some(addr) = pick.or_else(|| self.target(partition)) else {
                return Err(KvError::Unavailable("no nodes known".into()));
            };
            let kv = self.kv(&addr)?;
            let budget = cfg.attempt_timeout.min(deadline - now);
            let attempt = match tokio::time::timeout(budget, attempt(kv)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) => Attempt::Failed(status),
                Err(_elapsed) => Attempt::TimedOut { addr, budget },
            };
            match policy.after(attempt) {
                Next::Fail(e) => return Err(e),
                Next::Retry { now, leader } => {
                    match leader {
                        LeaderUpdate::Forget => {
                            if let Some(p) = partition {
                                self.set_leader(p, None, None);
                            }
                        }
                        LeaderUpdate::Set {
                            partition: p,
                            leader,
                            addr,
                        } => {
                            let p = partition.unwrap_or(PartitionId(p));
                            self.set_leader(p, leader, addr);
                        }
                    }
                    if !now {
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(backoff.min(left)).await;
                        backoff = (backoff * 2).min(cfg.backoff_max);
                    }
                }
            }
        }
    }

    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<WriteResult, KvError> {
        self.put_with(key, value, Condition::Always).await
    }

    pub async fn put_with(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        condition: Condition,
    ) -> Result<WriteResult, KvError> {
        let request = put_request(key.into(), value.into(), condition);
        let p = self.partition_of(&request.key);
        let resp = self
            .session_write(p, |mut kv, id| {
                let mut req = request.clone();
                req.idempotency = Some(id);
                async move { kv.put(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        self.observe(resp.header.as_ref());
        Ok(put_result(p, resp))
    }

    /// A put with an explicit idempotency key: sending the same key again returns the
    /// original result without applying the write twice. The key is outside this client's
    /// own sequence and reports no answers (`first_incomplete` 0), so the server keeps its
    /// answer until the key's session expires (then the key is refused, never applied).
    pub async fn put_idempotent(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        condition: Condition,
        idempotency: IdempotencyKey,
    ) -> Result<WriteResult, KvError> {
        let mut request = put_request(key.into(), value.into(), condition);
        let p = self.partition_of(&request.key);
        let ticket = Ticket {
            client_id: idempotency.client_id,
            sequence: idempotency.sequence,
            started_ms: idempotency.session_started_ms,
            tracked: false,
        };
        request.idempotency = Some(self.inner.session.pair(&ticket));
        let resp = self
            .retry(Some(p), true, |mut kv| {
                let req = request.clone();
                async move { kv.put(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        self.observe(resp.header.as_ref());
        Ok(put_result(p, resp))
    }

    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<WriteResult, KvError> {
        self.delete_with(key, None).await
    }

    pub async fn delete_with(
        &self,
        key: impl Into<Vec<u8>>,
        if_revision: Option<u64>,
    ) -> Result<WriteResult, KvError> {
        let request = pb::DeleteRequest {
            key: key.into(),
            if_revision,
            idempotency: None,
            session_token: vec![],
        };
        let p = self.partition_of(&request.key);
        let resp = self
            .session_write(p, |mut kv, id| {
                let mut req = request.clone();
                req.idempotency = Some(id);
                async move { kv.delete(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        self.observe(resp.header.as_ref());
        Ok(WriteResult {
            partition: p,
            succeeded: resp.deleted,
            revision: resp.revision,
            hlc: resp.hlc,
            current_revision: resp.current_revision,
            log_position: resp.log_position,
        })
    }

    /// A read at the cluster's default level (`capkv server --default-consistency`,
    /// linearizable unless set), sent to the partition's leader with this client's session.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>, KvError> {
        self.get_at(key.into(), None).await
    }

    pub async fn get_with(
        &self,
        key: impl Into<Vec<u8>>,
        consistency: ReadConsistency,
    ) -> Result<Option<KeyValue>, KvError> {
        self.get_at(key.into(), Some(consistency)).await
    }

    /// A read at `consistency`, with where and how it was served (see [`Read`]).
    pub async fn read(
        &self,
        key: impl Into<Vec<u8>>,
        consistency: ReadConsistency,
    ) -> Result<Read, KvError> {
        self.read_at(key.into(), Some(consistency)).await
    }

    /// A read at `consistency`, or the server's default level when `None`.
    async fn get_at(
        &self,
        key: Vec<u8>,
        consistency: Option<ReadConsistency>,
    ) -> Result<Option<KeyValue>, KvError> {
        Ok(self.read_at(key, consistency).await?.kv)
    }

    async fn read_at(
        &self,
        key: Vec<u8>,
        consistency: Option<ReadConsistency>,
    ) -> Result<Read, KvError> {
        let p = self.partition_of(&key);
        let w = consistency.map_or_else(
            capkv_proto::consistency::WireLevel::default,
            capkv_proto::consistency::to_wire,
        );
        let request = pb::GetRequest {
            key,
            consistency: w.consistency,
            session_token: match consistency {
                Some(ReadConsistency::Session) | None => self.session_token(),
                Some(_) => Vec::new(),
            },
            max_lag_positions: w.max_lag_positions,
            max_staleness_ms: w.max_staleness_ms,
            follower_read: w.follower_read,
            forwarded: false,
        };
        let spread = consistency.is_some_and(ReadConsistency::any_replica);
        let resp = self
            .retry_at(Some(p), false, spread, |mut kv| {
                let req = request.clone();
                async move { kv.get(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        self.observe(resp.header.as_ref());
        let h = resp.header.unwrap_or_default();
        Ok(Read {
            kv: if resp.found {
                resp.kv.map(kv_pb_to)
            } else {
                None
            },
            partition: p,
            served_by: h.served_by,
            applied_index: h.applied_index,
            stale_ms_at_most: h.stale_ms_at_most,
            behind_positions_at_most: h.behind_positions_at_most,
        })
    }

    /// One page of keys in byte order across all partitions.
    pub async fn scan(&self, options: &ScanOptions) -> Result<ScanPage, KvError> {
        let w = capkv_proto::consistency::to_wire(options.consistency);
        let request = pb::ScanRequest {
            start: options.start.clone(),
            end: options.end.clone(),
            prefix: options.prefix.clone(),
            limit: options.limit,
            continuation: options.continuation.clone(),
            consistency: w.consistency,
            partition_id: None,
            session_token: match options.consistency {
                ReadConsistency::Session => self.session_token(),
                _ => Vec::new(),
            },
            max_lag_positions: w.max_lag_positions,
            max_staleness_ms: w.max_staleness_ms,
            follower_read: w.follower_read,
        };
        let resp = self
            .retry(None, false, |mut kv| {
                let req = request.clone();
                async move { kv.scan(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        self.join_session(&resp.session_token)?;
        Ok(ScanPage {
            kvs: resp.kvs.into_iter().map(kv_pb_to).collect(),
            continuation: resp.continuation,
        })
    }

    /// Every key of the range, up to `max` keys, following continuations.
    pub async fn scan_all(
        &self,
        options: &ScanOptions,
        max: usize,
    ) -> Result<Vec<KeyValue>, KvError> {
        let mut opts = options.clone();
        let mut out = Vec::new();
        loop {
            let left = max - out.len();
            if left == 0 {
                break;
            }
            let page_limit = if opts.limit == 0 { 1000 } else { opts.limit };
            opts.limit = page_limit.min(left.min(u32::MAX as usize) as u32);
            let page = self.scan(&opts).await?;
            out.extend(page.kvs);
            if page.continuation.is_empty() {
                break;
            }
            opts.continuation = page.continuation;
        }
        Ok(out)
    }

    /// Addresses of every known node.
    pub fn node_addrs(&self) -> Vec<(NodeId, String)> {
        let r = self.inner.routing.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = r.nodes.iter().map(|(k, v)| (*k, v.clone())).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A client whose endpoint is never dialled: the attempts below ignore their channel.
    fn offline_client() -> Client {
        let mut config = ClientConfig::new(["127.0.0.1:1"]);
        config.request_timeout = Duration::from_millis(600);
        config.attempt_timeout = Duration::from_millis(100);
        config.backoff_initial = Duration::from_millis(1);
        Client {
            inner: Arc::new(Inner {
                config,
                session: WriteSession::new(7, 0),
                cluster_hlc_ms: AtomicU64::new(0),
                channels: Mutex::new(HashMap::new()),
                routing: RwLock::new(Routing::default()),
                round_robin: AtomicU64::new(0),
                token: Mutex::new(SessionToken::default()),
            }),
        }
    }

    /// Invariant 8: once an attempt may have applied a write, no later answer short of
    /// success can make the outcome a definite failure. Before the fix, the retry loop
    /// returned the second attempt's `Internal` as is.
    #[tokio::test]
    async fn a_write_that_may_have_applied_stays_ambiguous_whatever_fails_later() {
        for later in [
            tonic::Status::internal("boom"),
            tonic::Status::invalid_argument("no"),
            tonic::Status::not_found("gone"),
        ] {
            let client = offline_client();
            let calls = AtomicUsize::new(0);
            let result: Result<(), KvError> = client
                .retry(Some(PartitionId(0)), true, |_kv| {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    let later = later.clone();
                    async move {
                        if n == 0 {
                            // Outlives the attempt timeout: the write may have applied.
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        Err(later)
                    }
                })
                .await;
            assert!(
                matches!(result, Err(KvError::Ambiguous(_))),
                "after a timed-out attempt, {later:?} must give Ambiguous, got {result:?}"
            );
        }
    }

    #[test]
    fn the_retry_policy_follows_leaders_and_remembers_what_may_have_applied() {
        let hint = capkv_proto::status::to_status(&KvError::NotLeader {
            partition: 3,
            leader_id: Some(NodeId(2)),
            leader_addr: Some("127.0.0.1:7380".into()),
        });
        let mut p = RetryPolicy::new(true);
        assert_eq!(
            p.after(Attempt::Failed(hint)),
            Next::Retry {
                now: true,
                leader: LeaderUpdate::Set {
                    partition: 3,
                    leader: Some(NodeId(2)),
                    addr: Some("127.0.0.1:7380".into())
                }
            }
        );
        assert!(!p.maybe_applied, "NotLeader says nothing was applied");
        let unavailable = capkv_proto::status::to_status(&KvError::Unavailable("no quorum".into()));
        assert_eq!(
            p.after(Attempt::Failed(unavailable)),
            Next::Retry {
                now: false,
                leader: LeaderUpdate::Forget
            }
        );
        assert!(
            !p.maybe_applied,
            "a node's own Unavailable says nothing was applied"
        );
        assert!(matches!(p.give_up(), KvError::Unavailable(_)));

        let mut p = RetryPolicy::new(true);
        let timed_out = Attempt::TimedOut {
            addr: "a".into(),
            budget: Duration::from_millis(5),
        };
        assert!(matches!(p.after(timed_out), Next::Retry { .. }));
        assert!(matches!(p.give_up(), KvError::Ambiguous(_)));
        // A transport failure without capkv's error detail may have applied the write.
        let mut p = RetryPolicy::new(true);
        p.after(Attempt::Failed(tonic::Status::unavailable(
            "connection reset",
        )));
        assert!(p.maybe_applied);
        let mut r = RetryPolicy::new(false);
        r.after(Attempt::Failed(tonic::Status::unavailable(
            "connection reset",
        )));
        assert!(!r.maybe_applied, "reads never apply anything");
    }

    /// A read, or a write no attempt of which may have applied, keeps its definite error.
    #[tokio::test]
    async fn definite_errors_stay_definite_when_nothing_may_have_applied() {
        let client = offline_client();
        let result: Result<(), KvError> = client
            .retry(Some(PartitionId(0)), true, |_kv| async {
                Err(tonic::Status::invalid_argument("bad key"))
            })
            .await;
        assert!(
            matches!(result, Err(KvError::InvalidArgument(_))),
            "{result:?}"
        );
        let result: Result<(), KvError> = client
            .retry(Some(PartitionId(0)), false, |_kv| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Err(tonic::Status::internal("x"))
            })
            .await;
        assert!(
            matches!(result, Err(KvError::Unavailable(_))),
            "a read times out as Unavailable: {result:?}"
        );
    }
}
