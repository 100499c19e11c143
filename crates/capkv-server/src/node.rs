//! Starting and stopping a node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _};
use capkv_placement::{NodeSpec, PartitionMap};
use capkv_proto::kv::kv_server::KvServer;
use capkv_proto::raft::raft_transport_server::RaftTransportServer;
use capkv_replication::Faults;
use capkv_storage::{FjallEngine, FjallOptions, StorageEngine, StorageError};
use capkv_types::{Hlc, NodeId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::admin::AdminService;
use crate::config::{NodeConfig, PlantedBug};
use crate::engine::{engine_config, CapkvMachine, EngineNode, EngineTransport};
use crate::frontend;
use crate::grpc::{KvService, RaftService};
use crate::kv::{Endpoints, KvCore, KvParts, KvSettings, Replica};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::transport::{PeerChannels, RAFT_MESSAGE_BYTES_MAX};

/// What a data directory was created for. A node refuses to start on a data dir made for
/// another node id or another cluster shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ClusterIdentity {
    node_id: NodeId,
    partitions: u32,
    replication_factor: u32,
    initial_cluster: Vec<NodeSpec>,
    /// A rule of the state machine: every replica must expire client sessions alike.
    session_ttl_ms: u64,
    /// The replication engine whose log and state this dir holds (only `raftstore` now;
    /// dirs made before the field existed, or with `openraft`, are refused).
    #[serde(default = "openraft_name")]
    engine: String,
}

/// The engine every data dir of this build holds.
const ENGINE_NAME: &str = "raftstore";

/// Data dirs made before `--engine` existed are openraft's.
fn openraft_name() -> String {
    "openraft".to_string()
}

const IDENTITY_KEY: &str = "cluster_identity";
const FORMAT_KEY: &str = "format_version";

/// The on-disk format this build reads and writes. 2: client sessions replaced the dedup
/// table, and log entries carry the session fields. 3: keys with a hash tag hash only the
/// tag (another partition than before), and stored answers carry a value (read-modify-write
/// commands). 4: applied state carries the partition's key counts, and stored answers may
/// hold the `AnswersTooLarge` refusal. 5: stored answers may hold the `Overflow` and
/// `NotFinite` refusals. A node refuses a data dir of another format rather than misread
/// it, except those it upgrades in place ([`FORMAT_UPGRADES_FROM`]).
pub const FORMAT_VERSION: u32 = 5;

/// Formats this build opens and upgrades to [`FORMAT_VERSION`]: 3 and 4 differ only by
/// what later formats add (4's key counts are recounted when a partition opens; 5 adds
/// refusals a format-4 build could not read), and are marked 5 once open, so a build that
/// reads only 3 or 4 then refuses the dir.
pub const FORMAT_UPGRADES_FROM: &[u32] = &[3, 4];

pub struct Node {
    core: Arc<KvCore>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    resp_addr: Option<SocketAddr>,
    json_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        if !config.initial_cluster.iter().any(|n| n.id == config.id) {
            bail!("node id {} is not in the initial cluster", config.id);
        }
        if config.unsafe_lose_unsynced_writes {
            if !config.unsafe_fault_injection {
                bail!("--unsafe-lose-unsynced-writes needs --unsafe-fault-injection");
            }
            let done = capkv_storage::power_loss::drop_unsynced_writes(&config.data_dir)
                .context("emulate a power cut")?;
            tracing::warn!("UNSAFE: emulating a power cut before start: {done}");
        }
        let engine: Arc<dyn StorageEngine> = Arc::new(
            match FjallEngine::open(
                &config.data_dir,
                FjallOptions {
                    planted_ack_before_sync: config
                        .planted_bugs
                        .contains(&PlantedBug::AckBeforeFsync),
                    record_sync_marks: config.unsafe_fault_injection,
                    planted_scan_without_snapshot: config
                        .planted_bugs
                        .contains(&PlantedBug::ScanWithoutSnapshot),
                    ..FjallOptions::default()
                },
            ) {
                Ok(e) => e,
                // The message says it all: "data dir … is in use by another capkv process".
                Err(e @ StorageError::InUse(_)) => bail!(e),
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("open storage in {}", config.data_dir.display())))
                }
            },
        );
        let identity = ClusterIdentity {
            node_id: config.id,
            partitions: config.partitions,
            replication_factor: config.replication_factor,
            initial_cluster: config.initial_cluster.clone(),
            session_ttl_ms: config.raft.session_ttl_ms,
            engine: ENGINE_NAME.to_string(),
        };
        let mut upgrade_from = None;
        let fresh = match engine.node_meta_get(IDENTITY_KEY)? {
            None => true,
            Some(bytes) => {
                let format = engine
                    .node_meta_get(FORMAT_KEY)?
                    .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
                    .map_or(1, u32::from_be_bytes);
                if format != FORMAT_VERSION && !FORMAT_UPGRADES_FROM.contains(&format) {
                    bail!(
                        "data dir {} holds on-disk format {format}; this capkv reads format \
                         {FORMAT_VERSION}. Use the capkv version that wrote it, or an empty data dir",
                        config.data_dir.display()
                    );
                }
                upgrade_from = (format != FORMAT_VERSION).then_some(format);
                let stored: ClusterIdentity = serde_json::from_slice(&bytes)
                    .context("the data dir's cluster identity is unreadable")?;
                if stored.engine != ENGINE_NAME {
                    bail!(
                        "data dir {} holds the {} engine's log and state, which this capkv no \
                         longer runs (it runs only {ENGINE_NAME}). Use the capkv version that \
                         wrote it, or an empty data dir",
                        config.data_dir.display(),
                        stored.engine
                    );
                }
                if stored != identity {
                    bail!(
                        "data dir {} belongs to {stored:?}, but this node was started as {identity:?}; \
                         start it with the original settings or use an empty data dir",
                        config.data_dir.display()
                    );
                }
                false
            }
        };
        let map = PartitionMap::initial(
            &config.initial_cluster,
            config.partitions,
            config.replication_factor,
        )?;

        // Bind first, so a port conflict is reported before anything else starts.
        let grpc_listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listen on {}", config.listen))?;
        let http_listener = TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("listen for HTTP on {}", config.http_listen))?;
        let resp_listener = match config.resp_listen {
            None => None,
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| {
                format!("listen for RESP (Redis protocol) on {a} (--resp ADDR, or --resp off)")
            })?),
        };
        let json_listener = match config.json_listen {
            None => None,
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| {
                format!("listen for JSON over TCP on {a} (--json ADDR, or --json off)")
            })?),
        };
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let resp_addr = resp_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let json_addr = json_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;

        let hlc = Arc::new(Hlc::new());
        let faults = Arc::new(Faults::new(config.unsafe_fault_injection));
        let peers = Arc::new(PeerChannels::default());
        let read_policy = config.read_policy;
        // How long a follower refuses votes after hearing from a leader: the engine's
        // election ticks. A restarted node holds its vote as long (`capkv_raftstore::driver`).
        let vote_refusal_ms = crate::engine::engine_vote_refusal_ms(&config.raft);
        let lease_read_ms = crate::kv::lease_read_ms(read_policy, vote_refusal_ms);
        // Planted bug `full-lease`: trust the whole lease, while telling peers half.
        let lease_trusted_ms = if config.planted_bugs.contains(&PlantedBug::FullLease) {
            lease_read_ms * 2
        } else {
            lease_read_ms
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut replicas = BTreeMap::new();
        let parts: Vec<_> = map.partitions_of(config.id);
        let snapshots = Arc::new(crate::engine::Snapshots::default());
        let (machine, applied, indexes) = CapkvMachine::open(
            &engine,
            &parts,
            &hlc,
            config.raft.session_ttl_ms,
            &snapshots,
        )
        .context("open the partitions' state machines")?;
        // Every group starts with its partition's replicas as voters (used when the
        // group is new on this disk).
        let groups: BTreeMap<u32, Vec<u64>> = parts
            .iter()
            .map(|p| (p.0, map.replicas(*p).iter().map(|n| n.0).collect()))
            .collect();
        let others: Vec<(NodeId, String)> = map
            .nodes
            .iter()
            .filter(|(id, _)| **id != config.id)
            .map(|(id, addr)| (*id, addr.clone()))
            .collect();
        let engine_transport = EngineTransport::start(
            config.id,
            (config.raft.session_ttl_ms, lease_read_ms),
            faults.clone(),
            &peers,
            &others,
            shutdown_rx.clone(),
            snapshots.clone(),
        );
        let node = capkv_raftstore::node::RaftNode::start_on_engine(
            engine_config(config.id, &config.raft, lease_trusted_ms),
            engine.clone(),
            &groups,
            &applied,
            engine_transport,
            machine,
        )
        .context("start the raftstore engine")?;
        let node = Arc::new(EngineNode::new(config.id, node, engine.clone(), snapshots));
        for p in parts {
            let applied = indexes
                .get(&p)
                .cloned()
                .with_context(|| format!("partition {p} has no state machine"))?;
            // A new cluster's first replica of each partition campaigns at once, so
            // leaders spread over the nodes as the partition map orders them.
            if fresh && map.replicas(p).first() == Some(&config.id) {
                node.campaign(p);
            }
            replicas.insert(p, Replica::new(p, applied));
        }
        if fresh {
            engine.node_meta_put(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())?;
            engine.node_meta_put(IDENTITY_KEY, &serde_json::to_vec(&identity)?)?;
            engine.sync()?;
        } else if let Some(old) = upgrade_from {
            // Every partition opened (a format-3 one counting its keys): from now on only
            // this build's format is in the dir.
            engine.node_meta_put(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())?;
            engine.sync()?;
            tracing::info!(
                from = old,
                to = FORMAT_VERSION,
                "upgraded the data dir's format"
            );
        }
        let metrics = Arc::new(Metrics::new(config.id.0)?);
        let core = Arc::new(KvCore::new(KvParts {
            id: config.id,
            map,
            replicas,
            raft_engine: node,
            storage: engine,
            hlc,
            peers,
            faults,
            metrics,
            settings: KvSettings {
                limits: config.limits,
                write_timeout: config.write_timeout,
                read_timeout: config.read_timeout,
                read_policy,
                default_consistency: config.default_consistency,
                unsafe_local_reads: config.planted_bugs.contains(&PlantedBug::StaleReads),
                unsafe_ignore_session: config
                    .planted_bugs
                    .contains(&PlantedBug::IgnoreSessionToken),
                unsafe_ignore_bound: config
                    .planted_bugs
                    .contains(&PlantedBug::IgnoreStalenessBound),
                vote_refusal_ms,
                lease_read: Duration::from_millis(lease_trusted_ms),
                session_ttl_ms: config.raft.session_ttl_ms,
            },
            endpoints: Endpoints {
                http: Some(http_addr),
                resp: resp_addr,
                json: json_addr,
            },
        }));
        for bug in &config.planted_bugs {
            tracing::warn!(bug = bug.name(), "UNSAFE: this node runs with a planted bug (--planted-bug); it may lose or misreport data");
        }
        if config.unsafe_fault_injection {
            tracing::warn!("UNSAFE: --unsafe-fault-injection lets any gRPC client cut this node off, fail its fsyncs and move its clock");
        }

        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(balance_leaders(
            core.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(reap_expired_keys(
            core.clone(),
            shutdown_rx.clone(),
        )));

        let message_max = config.limits.message_bytes_max() + config.limits.scan_page_bytes_max;
        let kv = KvServer::new(KvService { core: core.clone() })
            .max_decoding_message_size(message_max)
            .max_encoding_message_size(message_max);
        let raft = RaftTransportServer::new(RaftService {
            core: core.clone(),
            shutdown: shutdown_rx.clone(),
        })
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
        let admin =
            capkv_proto::admin::admin_server::AdminServer::new(AdminService { core: core.clone() });
        let incoming = limited_incoming(grpc_listener, config.max_connections);
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .concurrency_limit_per_connection(1024)
                .tcp_nodelay(true)
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
                .add_service(kv)
                .add_service(raft)
                .add_service(admin)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        }));
        let router = Arc::new(Router::new(core.clone()));
        if let Some(listener) = resp_listener {
            tasks.push(tokio::spawn(frontend::serve(
                "resp",
                listener,
                config.max_connections,
                router.clone(),
                shutdown_rx.clone(),
                frontend::resp::connection,
            )));
        }
        if let Some(listener) = json_listener {
            tasks.push(tokio::spawn(frontend::serve(
                "json",
                listener,
                config.max_connections,
                router.clone(),
                shutdown_rx.clone(),
                frontend::json::connection,
            )));
        }
        let app = crate::http::router(core.clone(), router.clone());
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let result = axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }));

        tracing::info!(
            node = config.id.0,
            grpc = %grpc_addr,
            http = %http_addr,
            resp = ?resp_addr,
            json = ?json_addr,
            partitions = core.hosted().count(),
            data_dir = %config.data_dir.display(),
            fresh,
            read_policy = ?core.read_policy(),
            default_consistency = %core.default_consistency(),
            vote_hold_ms = core.vote_hold_remaining_ms(),
            "node started"
        );
        Ok(Node {
            core,
            grpc_addr,
            http_addr,
            resp_addr,
            json_addr,
            shutdown,
            tasks,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The Redis protocol's address, if it is on.
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp_addr
    }

    /// The JSON-over-TCP protocol's address, if it is on.
    pub fn json_addr(&self) -> Option<SocketAddr> {
        self.json_addr
    }

    pub fn core(&self) -> &Arc<KvCore> {
        &self.core
    }

    /// Stops serving, stops every Raft group and syncs storage.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let engine = self.core.raft_engine().clone();
        let _ = tokio::task::spawn_blocking(move || engine.stop()).await;
        for t in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
        if let Err(e) = self.core.storage().sync() {
            tracing::error!(error = %e, "final sync failed");
        }
        tracing::info!(node = self.core.id().0, "node stopped");
    }
}

/// A raftstore leader tries to hand a partition to its preferred replica at most this often.
const ENGINE_TRANSFER_RETRY: Duration = Duration::from_secs(30);

/// Moves leadership of each partition to its preferred replica (the first in the
/// partition map), so leaders, and with them the write load, spread over the nodes.
///
/// Only a leader acts, and only when the preferred replica has replicated its whole log;
/// a replica that is down or behind is left alone. One attempt per partition per interval.
async fn balance_leaders(core: Arc<KvCore>, mut shutdown: watch::Receiver<bool>) {
    let interval = std::time::Duration::from_secs(3);
    let mut engine_attempts: std::collections::HashMap<
        capkv_types::PartitionId,
        std::time::Instant,
    > = Default::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        for p in core.hosted() {
            let Some(preferred) = core.map().replicas(p).first().copied() else {
                continue;
            };
            if preferred == core.id() {
                continue;
            }
            // The engine checks leadership, the replica's log and its liveness itself. A
            // leader refuses writes while it transfers (up to an election timeout), so a
            // transfer that did not happen (the replica is cut off one way) is retried only
            // after a while.
            let engine = core.raft_engine();
            let leading = engine
                .status(p)
                .is_some_and(|s| s.role == capkv_raftstore::StateRole::Leader);
            let now = std::time::Instant::now();
            let recent = engine_attempts
                .get(&p)
                .is_some_and(|t| now.duration_since(*t) < ENGINE_TRANSFER_RETRY);
            if leading && !recent {
                engine_attempts.insert(p, now);
                engine.transfer_leader(p, preferred);
            }
        }
    }
}

/// How often a leader looks for expired keys in each partition it leads.
const REAP_INTERVAL: Duration = Duration::from_millis(500);

/// Deletes expired keys through the log, in the partitions this node leads: every
/// `REAP_INTERVAL`, one bounded turn per partition (`KvCore::reap_expired`), walking
/// each partition's keys in turns. Reads treat an expired key as absent before then; this
/// frees its space and makes every replica agree. A partition whose replica here stores
/// no key with an expiry (its kept `KeyCounts`) is not walked: a keyspace without TTLs
/// costs nothing.
async fn reap_expired_keys(core: Arc<KvCore>, mut shutdown: watch::Receiver<bool>) {
    let mut cursors: std::collections::HashMap<capkv_types::PartitionId, Vec<u8>> =
        Default::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REAP_INTERVAL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        for p in core.hosted().collect::<Vec<_>>() {
            if core.key_counts(p).is_none_or(|c| c.expiring == 0) {
                cursors.remove(&p);
                continue;
            }
            let from = cursors.remove(&p).unwrap_or_default();
            match core.reap_expired(p, &from).await {
                Ok(Some(turn)) => {
                    if let Some(next) = turn.next {
                        cursors.insert(p, next);
                    }
                }
                // Not the leader here: nothing was looked at.
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(partition = p.0, error = %e, "expired keys not removed this turn")
                }
            }
        }
    }
}

/// A TCP connection that holds one of the node's connection permits while open.
pub struct LimitedStream {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections while fewer than `max` are open; the rest wait in the backlog.
fn limited_incoming(
    listener: TcpListener,
    max: usize,
) -> impl futures::Stream<Item = Result<LimitedStream, std::io::Error>> {
    let permits = Arc::new(Semaphore::new(max.max(1)));
    futures::stream::unfold((listener, permits), |(listener, permits)| async move {
        let permit = permits.clone().acquire_owned().await.ok()?;
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((
                        Ok(LimitedStream {
                            inner: tcp,
                            _permit: permit,
                        }),
                        (listener, permits),
                    ));
                }
                Err(e) => {
                    // Usually EMFILE or a reset during accept: wait briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}
