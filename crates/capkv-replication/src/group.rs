//! Opening one partition's Raft group on this node.

use std::sync::Arc;

use capkv_storage::StorageEngine;
use capkv_types::{Hlc, NodeId, PartitionId};
use openraft::{Config, SnapshotPolicy};

use crate::log_store::LogStore;
use crate::network::{NetworkFactory, RaftTransport};
use crate::state_machine::{AppliedIndex, StateMachine};
use crate::types::TypeConfig;

pub type PartitionRaft = openraft::Raft<TypeConfig, StateMachine>;

/// Raft settings shared by every partition of a node.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind a snapshot, for followers that are a little behind.
    pub log_entries_kept_after_snapshot: u64,
    /// A client session idle this long (in the log's HLC time) is forgotten; its later
    /// requests are refused with `SessionExpired` (see `sessions.rs`). Part of the state
    /// machine's rules: every node of a cluster must use the same value.
    pub session_ttl_ms: u64,
    /// openraft's leader restore: a leader restarted before anyone else was elected takes
    /// its leadership back without an election. Unsafe here, so off; only the planted bug
    /// `leader-restore` turns it on. openraft documents it as safe only when the state
    /// machine is flushed on apply and the committed index is saved exactly; capkv does
    /// neither (applies without fsync, saves `committed` every 128 entries), so a restored
    /// leader can serve reads from a read index below writes it acknowledged.
    pub leader_restore: bool,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every_entries: 20_000,
            log_entries_kept_after_snapshot: 1000,
            session_ttl_ms: 10 * 60 * 1000,
            leader_restore: false,
        }
    }
}

impl GroupSettings {
    /// openraft's settings for `partition`'s group. The cluster name names the partition,
    /// so openraft's debug spans (`RaftCore{id=.. cluster=capkv-p3}`) say which group a
    /// line is about.
    pub fn raft_config(&self, partition: PartitionId) -> Result<Config, openraft::ConfigError> {
        Config {
            cluster_name: format!("capkv-p{}", partition.0),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            max_in_snapshot_log_to_keep: self.log_entries_kept_after_snapshot,
            enable_pre_vote: Some(true),
            enable_leader_restore: Some(self.leader_restore),
            ..Default::default()
        }
        .validate()
    }
}

/// Opens the Raft group of `partition` on node `local` and starts it.
pub async fn open_partition(
    local: NodeId,
    partition: PartitionId,
    settings: &GroupSettings,
    engine: Arc<dyn StorageEngine>,
    transport: Arc<dyn RaftTransport>,
    hlc: Arc<Hlc>,
) -> Result<(PartitionRaft, Arc<AppliedIndex>), anyhow_like::Error> {
    let config = Arc::new(
        settings
            .raft_config(partition)
            .map_err(|e| anyhow_like::Error(e.to_string()))?,
    );
    let log_store = LogStore::new(engine.clone(), partition);
    let sm = StateMachine::open(engine, partition, hlc, settings.session_ttl_ms).map_err(|e| {
        anyhow_like::Error(format!("open state machine of partition {partition}: {e}"))
    })?;
    let applied = sm.applied_index();
    let network = NetworkFactory {
        transport,
        partition,
        local,
    };
    let raft = openraft::Raft::new(local.0, config, network, log_store, sm)
        .await
        .map_err(|e| anyhow_like::Error(format!("start raft of partition {partition}: {e}")))?;
    Ok((raft, applied))
}

/// A plain error for the opening path (this crate does not use anyhow).
pub mod anyhow_like {
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub struct Error(pub String);
}
