//! `capkv server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use capkv_server::config::{default_http_addr, default_json_addr, default_resp_addr};
use capkv_server::{Node, NodeConfig, PlantedBug, ReadPolicyChoice};
use capkv_types::NodeId;
use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReadPolicyArg {
    /// Confirm leadership with a quorum round-trip per read batch (makes no assumption
    /// about clocks).
    ReadIndex,
    /// Trust the leader lease (default): no round-trip while a quorum acknowledged the
    /// leader within half the lease. Assumes monotonic clocks that keep running.
    Lease,
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// This node's id (a positive integer, never reused with an empty data dir).
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    /// Where this node keeps its data.
    #[arg(long, default_value = "./capkv-data")]
    pub data_dir: PathBuf,
    /// gRPC address for clients and peers. Defaults to this node's address in
    /// --initial-cluster, else 127.0.0.1:7379.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The cluster's first members: ID=HOST:PORT,... Defaults to this node alone.
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Number of partitions (fixed when the cluster is created).
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Replicas per partition (capped at the number of nodes).
    #[arg(long, default_value_t = 3)]
    pub replication_factor: u32,
    /// HTTP address (/v1/kv, /metrics, /health, /status). Defaults to the gRPC port + 1000.
    /// Always on: operators and `capkv status` need it.
    #[arg(long, value_parser = parse_http)]
    pub http: Option<SocketAddr>,
    /// Redis protocol (RESP) address, or `off`. Defaults to the gRPC port - 1000 (6379).
    #[arg(long, value_parser = parse_listen)]
    pub resp: Option<Listen>,
    /// JSON-over-TCP address, or `off`. Defaults to the gRPC port + 2000 (9379).
    #[arg(long, value_parser = parse_listen)]
    pub json: Option<Listen>,
    /// Largest value accepted, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub value_max_bytes: usize,
    /// Take a partition snapshot (an fsync of its state; then its log is purged) every this
    /// many entries. Smaller values keep less log; a follower further behind than the
    /// kept log catches up by a full copy of the partition.
    #[arg(long, default_value_t = 20_000)]
    pub snapshot_every: u64,
    /// Forget a client session idle this long (its late retries are then refused with
    /// SessionExpired, never applied twice). Fixed when the cluster is created: every node
    /// must use the same value.
    #[arg(long, default_value_t = 600_000)]
    pub client_session_ttl_ms: u64,
    /// A write not committed within this time is answered Ambiguous.
    #[arg(long, default_value_t = 5000)]
    pub write_timeout_ms: u64,
    /// A linearizable read that cannot confirm leadership in this time is Unavailable.
    #[arg(long, default_value_t = 5000)]
    pub read_timeout_ms: u64,
    #[arg(long, value_enum, default_value_t = ReadPolicyArg::Lease)]
    pub read_policy: ReadPolicyArg,
    /// The level of reads that name none: linearizable, session, prefix or eventual
    /// (docs/consistency.md). A request's own level always wins.
    #[arg(long, default_value = "linearizable", value_parser = |s: &str| s.parse::<capkv_types::ReadConsistency>())]
    pub default_consistency: capkv_types::ReadConsistency,
    /// Raft heartbeat interval.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// Raft election timeout (randomised between this and twice this).
    #[arg(long, default_value_t = 500)]
    pub election_timeout_ms: u64,
    /// Client connections served at once.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Threads serving the network: client protocols and peer traffic. Default: the
    /// machine's cores less one (at least one), since the Raft engine thread keeps a core
    /// busy under load (docs/benchmarks.md).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
    /// TESTING ONLY: serve the Admin gRPC service, through which any client can cut this
    /// node off from its peers, fail or stall its fsyncs and move its clock.
    #[arg(long)]
    pub unsafe_fault_injection: bool,
    /// TESTING ONLY (needs --unsafe-fault-injection): before starting, drop every write no
    /// fsync covered, as a power cut would have (after the node was killed).
    #[arg(long)]
    pub unsafe_lose_unsynced_writes: bool,
    /// TESTING ONLY (needs --unsafe-fault-injection): start with a bug planted on purpose,
    /// for `capkv check` to catch (repeatable). The node may lose or misreport data.
    #[arg(long = "planted-bug", value_enum)]
    pub planted_bugs: Vec<PlantedBugArg>,
}

/// `--planted-bug` names (`capkv_types::PlantedBug`; `capkv check --planted-bug` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlantedBugArg {
    /// Linearizable reads from the local replica, without confirming leadership.
    StaleReads,
    /// A lease read trusts the whole lease instead of half (no margin for clock rates).
    FullLease,
    /// Acknowledge durability before the fsync.
    AckBeforeFsync,
    /// Session reads ignore the session token (served by any replica however far behind).
    IgnoreSessionToken,
    /// Bounded reads ignore the bound (served by the local replica however far behind).
    IgnoreStalenessBound,
    /// Scans read without a snapshot (they can see a later write and miss an earlier one).
    ScanWithoutSnapshot,
}

impl PlantedBugArg {
    pub fn bug(self) -> PlantedBug {
        match self {
            PlantedBugArg::StaleReads => PlantedBug::StaleReads,
            PlantedBugArg::FullLease => PlantedBug::FullLease,
            PlantedBugArg::AckBeforeFsync => PlantedBug::AckBeforeFsync,
            PlantedBugArg::IgnoreSessionToken => PlantedBug::IgnoreSessionToken,
            PlantedBugArg::IgnoreStalenessBound => PlantedBug::IgnoreStalenessBound,
            PlantedBugArg::ScanWithoutSnapshot => PlantedBug::ScanWithoutSnapshot,
        }
    }
}

/// A front end's address, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen::Off);
    }
    s.parse()
        .map(Listen::At)
        .map_err(|_| format!("{s:?} is neither IP:PORT nor off"))
}

fn parse_http(s: &str) -> Result<SocketAddr, String> {
    if s == "off" {
        return Err(
            "the HTTP port cannot be turned off: it also serves /metrics, /health and \
                    /status (give it an address, such as 127.0.0.1:0)"
                .into(),
        );
    }
    s.parse().map_err(|_| format!("{s:?} is not IP:PORT"))
}

fn listen_or(arg: Option<Listen>, default: Option<SocketAddr>) -> Option<SocketAddr> {
    match arg {
        None => default,
        Some(Listen::Off) => None,
        Some(Listen::At(a)) => Some(a),
    }
}

pub fn config_from(args: &ServerArgs) -> anyhow::Result<NodeConfig> {
    let id = NodeId(args.id);
    let (listen, initial_cluster) = match &args.initial_cluster {
        Some(spec) => {
            let nodes = capkv_placement::parse_initial_cluster(spec)?;
            let own = nodes.iter().find(|n| n.id == id).ok_or_else(|| {
                anyhow::anyhow!(
                    "--id {} is not one of the --initial-cluster members",
                    args.id
                )
            })?;
            let listen = match args.listen {
                Some(l) => l,
                None => own.addr.parse().map_err(|_| {
                    anyhow::anyhow!("give --listen: {:?} is not an IP:PORT to bind", own.addr)
                })?,
            };
            (listen, nodes)
        }
        None => {
            let listen = args
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7379)));
            (
                listen,
                vec![capkv_placement::NodeSpec {
                    id,
                    addr: listen.to_string(),
                }],
            )
        }
    };
    let mut c = NodeConfig::single(id, args.data_dir.clone(), listen);
    c.initial_cluster = initial_cluster;
    c.http_listen = args.http.unwrap_or_else(|| default_http_addr(listen));
    c.resp_listen = listen_or(args.resp, default_resp_addr(listen));
    c.json_listen = listen_or(args.json, default_json_addr(listen));
    c.partitions = args.partitions;
    c.replication_factor = args.replication_factor;
    c.limits.value_bytes_max = args.value_max_bytes;
    c.raft.snapshot_every_entries = args.snapshot_every.max(1);
    c.raft.session_ttl_ms = args.client_session_ttl_ms.max(1);
    c.raft.heartbeat_interval_ms = args.heartbeat_ms.max(1);
    c.raft.election_timeout_min_ms = args
        .election_timeout_ms
        .max(c.raft.heartbeat_interval_ms * 2);
    c.raft.election_timeout_max_ms = c.raft.election_timeout_min_ms * 2;
    c.write_timeout = Duration::from_millis(args.write_timeout_ms);
    c.read_timeout = Duration::from_millis(args.read_timeout_ms);
    c.read_policy = match args.read_policy {
        ReadPolicyArg::ReadIndex => ReadPolicyChoice::ReadIndex,
        ReadPolicyArg::Lease => ReadPolicyChoice::Lease,
    };
    c.default_consistency = args.default_consistency;
    c.max_connections = args.max_connections;
    c.unsafe_fault_injection = args.unsafe_fault_injection;
    if !args.planted_bugs.is_empty() && !args.unsafe_fault_injection {
        anyhow::bail!("--planted-bug is for testing only and needs --unsafe-fault-injection");
    }
    c.planted_bugs = args.planted_bugs.iter().map(|b| b.bug()).collect();
    c.unsafe_lose_unsynced_writes = args.unsafe_lose_unsynced_writes;
    Ok(c)
}

pub async fn run(args: ServerArgs) -> i32 {
    crate::init_logging("info");
    let config = match config_from(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 2;
        }
    };
    let data_dir = config.data_dir.clone();
    let node = match Node::start(config).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 2;
        }
    };
    // One line on stdout once the node listens (logs go to stderr).
    let off = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
    println!(
        "node {} serving: gRPC {}, HTTP {}, RESP {}, JSON {}, data {}",
        node.core().id(),
        node.grpc_addr(),
        node.http_addr(),
        off(node.resp_addr()),
        off(node.json_addr()),
        data_dir.display()
    );
    wait_for_stop_signal().await;
    tracing::info!("stopping");
    node.shutdown().await;
    0
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The async runtime's worker threads for a node: `--worker-threads`, else the cores less
/// the one the engine thread takes (at least one). Measured on 2 cores (redis-benchmark,
/// one node): one worker instead of two serves GET-16 10 % faster at 10 % less CPU per
/// request, since a second worker mostly parks and is woken again across cores.
pub fn worker_threads(args: &ServerArgs) -> usize {
    match args.worker_threads {
        Some(n) => usize::from(n),
        None => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(1)
            .max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_bug_flags_are_the_servers_names() {
        for arg in PlantedBugArg::value_variants() {
            let name = arg.to_possible_value().unwrap();
            assert_eq!(PlantedBug::parse(name.get_name()), Some(arg.bug()));
        }
        assert_eq!(PlantedBugArg::value_variants().len(), PlantedBug::ALL.len());
    }

    #[test]
    fn front_end_addresses_parse_and_http_says_why_it_stays_on() {
        assert_eq!(parse_listen("off"), Ok(Listen::Off));
        assert_eq!(
            parse_listen("127.0.0.1:6379"),
            Ok(Listen::At("127.0.0.1:6379".parse().unwrap()))
        );
        assert!(parse_listen("6379")
            .unwrap_err()
            .contains("neither IP:PORT nor off"));
        assert!(parse_http("off").unwrap_err().contains("/metrics"));
        assert!(parse_http("127.0.0.1:0").is_ok());
    }
}
