//! Settings of one node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use capkv_placement::NodeSpec;
use capkv_types::{Limits, NodeId};

/// How the leader confirms it still leads before a linearizable read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadPolicyChoice {
    /// A quorum round-trip per read batch (safe under any clock behaviour).
    ReadIndex,
    /// The leader's lease: no round-trip while a quorum acknowledged the leader within half
    /// the lease (assumes monotonic clocks that keep running and drift by less than 2×).
    #[default]
    Lease,
}

impl ReadPolicyChoice {
    /// The name `--read-policy` takes, also shown by `capkv status`.
    pub fn name(self) -> &'static str {
        match self {
            ReadPolicyChoice::ReadIndex => "read-index",
            ReadPolicyChoice::Lease => "lease",
        }
    }
}

/// Raft settings shared by every partition of a node.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Compact a group's log after this many entries past its start (at most 1,024; see
    /// `engine::engine_config`).
    pub snapshot_every_entries: u64,
    /// A client session idle this long (in the log's HLC time) is forgotten; its later
    /// requests are refused with `SessionExpired` (see `capkv-replication`'s `sessions.rs`).
    /// Part of the state machine's rules: every node of a cluster must use the same value.
    pub session_ttl_ms: u64,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every_entries: 20_000,
            session_ttl_ms: 10 * 60 * 1000,
        }
    }
}

pub use capkv_types::PlantedBug;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    pub data_dir: PathBuf,
    /// gRPC address (clients and peers).
    pub listen: SocketAddr,
    /// HTTP address (/v1/kv, /metrics, /health, /status).
    pub http_listen: SocketAddr,
    /// Redis protocol (RESP) address; `None` = off.
    pub resp_listen: Option<SocketAddr>,
    /// The seed's JSON-over-TCP protocol address; `None` = off.
    pub json_listen: Option<SocketAddr>,
    pub initial_cluster: Vec<NodeSpec>,
    pub partitions: u32,
    pub replication_factor: u32,
    pub limits: Limits,
    pub raft: GroupSettings,
    /// A write not committed within this time is answered `Ambiguous`.
    pub write_timeout: Duration,
    /// A linearizable read that cannot confirm leadership within this time is `Unavailable`.
    pub read_timeout: Duration,
    pub read_policy: ReadPolicyChoice,
    /// The level of reads that name none.
    pub default_consistency: capkv_types::ReadConsistency,
    /// Test-only: the `Admin` gRPC service may inject faults into this node.
    pub unsafe_fault_injection: bool,
    /// Test-only (with fault injection): before opening storage, drop what no fsync
    /// covered, as a power cut would have (`capkv_storage::power_loss`).
    pub unsafe_lose_unsynced_writes: bool,
    /// Test-only: bugs planted on purpose for the checker. Never in production.
    pub planted_bugs: std::collections::BTreeSet<PlantedBug>,
    /// Client connections served at once; more wait in the accept queue.
    pub max_connections: usize,
}

impl NodeConfig {
    /// A single-node cluster's settings.
    pub fn single(id: NodeId, data_dir: PathBuf, listen: SocketAddr) -> Self {
        let http_listen = default_http_addr(listen);
        NodeConfig {
            id,
            data_dir,
            listen,
            http_listen,
            resp_listen: default_resp_addr(listen),
            json_listen: default_json_addr(listen),
            initial_cluster: vec![NodeSpec {
                id,
                addr: listen.to_string(),
            }],
            partitions: 8,
            replication_factor: 3,
            limits: Limits::default(),
            raft: GroupSettings::default(),
            write_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            read_policy: ReadPolicyChoice::Lease,
            default_consistency: capkv_types::ReadConsistency::Linearizable,
            unsafe_fault_injection: false,
            planted_bugs: Default::default(),
            unsafe_lose_unsynced_writes: false,
            max_connections: 4096,
        }
    }
}

/// The HTTP port defaults to the gRPC port + 1000 (7379 -> 8379). A gRPC port of 0 (any
/// free port) gives every front end any free port too.
pub fn default_http_addr(grpc: SocketAddr) -> SocketAddr {
    offset(grpc, 1000).unwrap_or_else(|| with_port(grpc, 0))
}

/// The RESP port defaults to the gRPC port - 1000 (7379 -> 6379, Redis's own port); none
/// when the gRPC port is 1 to 1000.
pub fn default_resp_addr(grpc: SocketAddr) -> Option<SocketAddr> {
    offset(grpc, -1000)
}

/// The JSON-over-TCP port defaults to the gRPC port + 2000 (7379 -> 9379); none when
/// that is past 65535.
pub fn default_json_addr(grpc: SocketAddr) -> Option<SocketAddr> {
    offset(grpc, 2000)
}

/// `grpc` with its port moved by `by` (port 0 stays 0: any free port); none when that
/// leaves 1..=65535.
fn offset(grpc: SocketAddr, by: i32) -> Option<SocketAddr> {
    if grpc.port() == 0 {
        return Some(grpc);
    }
    let port = u16::try_from(i32::from(grpc.port()) + by)
        .ok()
        .filter(|p| *p > 0)?;
    Some(with_port(grpc, port))
}

fn with_port(mut a: SocketAddr, port: u16) -> SocketAddr {
    a.set_port(port);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_end_ports_follow_the_grpc_port_and_any_port_stays_any() {
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        assert_eq!(default_http_addr(at(7379)), at(8379));
        assert_eq!(default_resp_addr(at(7379)), Some(at(6379)));
        assert_eq!(default_json_addr(at(7379)), Some(at(9379)));
        // Port 0 (any free port, as tests use): every front end on any free port, not on
        // 1000 / 2000 (they collided between nodes) or off.
        assert_eq!(default_http_addr(at(0)), at(0));
        assert_eq!(default_resp_addr(at(0)), Some(at(0)));
        assert_eq!(default_json_addr(at(0)), Some(at(0)));
        assert_eq!(default_resp_addr(at(1000)), None);
        assert_eq!(default_json_addr(at(64000)), None);
        assert_eq!(default_http_addr(at(65000)), at(0));
    }
}
