//! Prometheus metrics of a node.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// Requests by operation and outcome code (`ok` or a stable error code).
    pub requests: IntCounterVec,
    /// Request latency by operation.
    pub latency: HistogramVec,
    pub raft_term: IntGaugeVec,
    pub raft_last_log_index: IntGaugeVec,
    pub raft_commit_index: IntGaugeVec,
    pub raft_applied_index: IntGaugeVec,
    pub raft_is_leader: IntGaugeVec,
    /// Raft messages received from peers, by kind.
    pub raft_messages: IntCounterVec,
    pub storage_fsyncs: IntGauge,
    pub storage_fsync_requests: IntGauge,
    /// 1 once a failed fsync poisoned the node's storage.
    pub storage_poisoned: IntGauge,
    /// The replication engine's counters since start, by event (see `engine_events`).
    pub engine_events: IntGaugeVec,
    /// Partitions asleep (quiesced) on this node's engine.
    pub engine_groups_asleep: IntGauge,
    /// Reads this node could not serve and forwarded to the leader.
    pub reads_forwarded: prometheus::IntCounter,
    /// Writes this node's router sent on to a partition's leader on another node.
    pub writes_forwarded: prometheus::IntCounter,
    /// Expired keys this node's leaders deleted through the log.
    pub keys_expired: prometheus::IntCounter,
    /// Requests of the RESP, HTTP/JSON and JSON-over-TCP front ends, by protocol, command
    /// and outcome code.
    pub frontend_requests: IntCounterVec,
    /// Open connections of each front end.
    pub frontend_connections: IntGaugeVec,
}

impl Metrics {
    pub fn new(node_id: u64) -> Result<Self, prometheus::Error> {
        let labels = std::collections::HashMap::from([("node".to_string(), node_id.to_string())]);
        let registry = Registry::new_custom(Some("capkv".into()), Some(labels))?;
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Client requests by op and result code"),
            &["op", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Client request latency by op").buckets(
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            &["op"],
        )?;
        let gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["partition"]);
        let raft_term = gauge("raft_term", "Current Raft term per partition")?;
        let raft_last_log_index = gauge("raft_last_log_index", "Last log index per partition")?;
        let raft_commit_index = gauge("raft_commit_index", "Committed log index per partition")?;
        let raft_applied_index = gauge("raft_applied_index", "Applied log index per partition")?;
        let raft_is_leader = gauge("raft_is_leader", "1 if this node leads the partition")?;
        let raft_messages = IntCounterVec::new(
            Opts::new(
                "raft_messages_received_total",
                "Raft messages received from peers by kind",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(raft_messages.clone()))?;
        let storage_fsyncs = IntGauge::new(
            "storage_fsyncs",
            "fsyncs performed by the group-commit flusher",
        )?;
        let storage_fsync_requests = IntGauge::new(
            "storage_fsync_requests",
            "durability requests served by the group-commit flusher",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        for g in [
            &raft_term,
            &raft_last_log_index,
            &raft_commit_index,
            &raft_applied_index,
            &raft_is_leader,
        ] {
            registry.register(Box::new(g.clone()))?;
        }
        registry.register(Box::new(storage_fsyncs.clone()))?;
        registry.register(Box::new(storage_fsync_requests.clone()))?;
        let storage_poisoned = IntGauge::new(
            "storage_poisoned",
            "1 once a failed fsync poisoned this node's storage (restart the node)",
        )?;
        registry.register(Box::new(storage_poisoned.clone()))?;
        let engine_events = IntGaugeVec::new(
            Opts::new(
                "engine_events",
                "replication engine counters since start: turns, proposals, entries_proposed, \
                 entries_written, disk_writes, fsyncs, peer_batches_sent, messages_sent, \
                 compactions, leader_transfers, groups_quiesced, groups_woken, lease_reads, \
                 read_index_reads, read_index_asks, lease_renewals, votes_held, snapshots_sent, \
                 snapshots_failed, snapshots_installed, snapshot_bytes_sent, \
                 snapshot_bytes_received, snapshots_sending, snapshots_receiving",
            ),
            &["event"],
        )?;
        registry.register(Box::new(engine_events.clone()))?;
        let engine_groups_asleep = IntGauge::new(
            "engine_groups_asleep",
            "Partitions asleep (quiesced) on this node's engine",
        )?;
        registry.register(Box::new(engine_groups_asleep.clone()))?;
        let reads_forwarded = prometheus::IntCounter::new(
            "reads_forwarded_total",
            "Session, bounded and follower reads this node could not serve and forwarded to \
             the leader",
        )?;
        registry.register(Box::new(reads_forwarded.clone()))?;
        let writes_forwarded = prometheus::IntCounter::new(
            "writes_forwarded_total",
            "Writes from RESP, HTTP/JSON and JSON-over-TCP clients sent on to the leader",
        )?;
        registry.register(Box::new(writes_forwarded.clone()))?;
        let keys_expired = prometheus::IntCounter::new(
            "keys_expired_total",
            "Expired keys this node's leaders deleted through the log",
        )?;
        registry.register(Box::new(keys_expired.clone()))?;
        let frontend_requests = IntCounterVec::new(
            Opts::new(
                "frontend_requests_total",
                "Requests of the RESP, HTTP/JSON and JSON-over-TCP front ends by protocol, \
                 command and result code",
            ),
            &["protocol", "command", "code"],
        )?;
        registry.register(Box::new(frontend_requests.clone()))?;
        let frontend_connections = IntGaugeVec::new(
            Opts::new("frontend_connections", "Open connections by protocol"),
            &["protocol"],
        )?;
        registry.register(Box::new(frontend_connections.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            latency,
            raft_term,
            raft_last_log_index,
            raft_commit_index,
            raft_applied_index,
            raft_is_leader,
            raft_messages,
            storage_fsyncs,
            storage_fsync_requests,
            storage_poisoned,
            engine_events,
            engine_groups_asleep,
            reads_forwarded,
            writes_forwarded,
            keys_expired,
            frontend_requests,
            frontend_connections,
        })
    }

    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encode error: {e}\n"))
    }
}
