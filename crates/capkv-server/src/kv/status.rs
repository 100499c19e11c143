//! This node's view of its partitions, for `status`, `/status`, `/health` and metrics.

use super::*;

impl KvCore {
    /// This node's view of each partition.
    pub fn partition_status(&self) -> Vec<PartitionView> {
        self.map
            .partitions()
            .map(|p| {
                let mut v = PartitionView {
                    id: p,
                    replicas: self.map.replicas(p).to_vec(),
                    ..Default::default()
                };
                if self.replicas.contains_key(&p) {
                    let s = self.raft_engine.status(p).unwrap_or_default();
                    v.role = format!("{:?}", s.role);
                    v.leader = (s.leader != 0).then_some(NodeId(s.leader));
                    v.term = s.term;
                    v.last_log_index = s.last_index;
                    v.commit_index = s.commit;
                    v.applied_index = s.applied;
                    // The state machine is the snapshot: the log is purged up to it.
                    v.snapshot_index = s.log_start;
                    v.purged_index = s.log_start;
                    v.asleep = s.quiet;
                }
                v
            })
            .collect()
    }
}

/// This node's view of one partition.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PartitionView {
    pub id: PartitionId,
    pub replicas: Vec<NodeId>,
    /// Empty when this node holds no replica.
    pub role: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    /// Quiesced on this node: no ticks or heartbeats until woken.
    pub asleep: bool,
}
