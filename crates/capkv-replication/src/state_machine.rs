//! The state machine of one partition: applies committed commands to the storage engine.
//!
//! Each applied entry is one atomic storage write holding the data change, the
//! idempotency-table change and the new applied state, so after a crash the state machine
//! is exactly the effect of some prefix of the log.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capkv_storage::{DedupRecord, PartitionImage, SmOp, SmWrite, StorageEngine, StoredValue};
use capkv_types::{Hlc, HlcTimestamp, PartitionId};
use futures::{Stream, TryStreamExt};
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode};
use crate::types::{Command, CommandResponse, Condition, Idempotency, Op, TypeConfig};

/// What the state machine persists besides data: where it is in the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    /// The highest HLC stamp applied; the next write is stamped above it.
    last_hlc: u64,
}

/// Bounded table of recent idempotent writes (Raft dissertation §6.3), evicting the
/// oldest first. Eviction depends only on the log, so every replica evicts alike.
#[derive(Debug)]
pub struct DedupTable {
    capacity: usize,
    entries: HashMap<Idempotency, CommandResponse>,
    order: VecDeque<Idempotency>,
}

impl DedupTable {
    pub fn new(capacity: usize) -> Self {
        DedupTable {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn get(&self, id: &Idempotency) -> Option<&CommandResponse> {
        self.entries.get(id)
    }

    /// Records a response; returns the entries evicted to stay within capacity.
    pub fn insert(&mut self, id: Idempotency, response: CommandResponse) -> Vec<Idempotency> {
        if self.entries.insert(id, response).is_none() {
            self.order.push_back(id);
        }
        let mut evicted = Vec::new();
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
                evicted.push(old);
            }
        }
        evicted
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn load(capacity: usize, mut rows: Vec<(u64, u64, DedupRecord)>) -> io::Result<Self> {
        rows.sort_by_key(|(_, _, r)| r.applied_index);
        let mut table = DedupTable::new(capacity);
        for (client_id, sequence, record) in rows {
            let response: CommandResponse = decode(&record.response)?;
            // Loading never evicts more than the persisted rows already reflect, unless
            // the capacity shrank; then the oldest go, as they would have.
            table.insert(
                Idempotency {
                    client_id,
                    sequence,
                },
                response,
            );
        }
        Ok(table)
    }
}

/// Applied index of a partition, readable without going through openraft.
#[derive(Debug, Default)]
pub struct AppliedIndex(AtomicU64);

impl AppliedIndex {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, v: u64) {
        self.0.store(v, Ordering::Release)
    }
}

pub struct StateMachine {
    engine: Arc<dyn StorageEngine>,
    partition: PartitionId,
    hlc: Arc<Hlc>,
    applied: AppliedState,
    applied_index: Arc<AppliedIndex>,
    dedup: DedupTable,
    dedup_capacity: usize,
}

impl StateMachine {
    pub fn open(
        engine: Arc<dyn StorageEngine>,
        partition: PartitionId,
        hlc: Arc<Hlc>,
        dedup_capacity: usize,
    ) -> io::Result<Self> {
        let applied: AppliedState = match engine.sm_applied(partition)? {
            Some(bytes) => decode(&bytes)?,
            None => AppliedState::default(),
        };
        let dedup = DedupTable::load(dedup_capacity, engine.sm_dedup_all(partition)?)?;
        hlc.observe(HlcTimestamp(applied.last_hlc));
        let applied_index = Arc::new(AppliedIndex::default());
        applied_index.set(applied.last_applied.as_ref().map(|l| l.index).unwrap_or(0));
        Ok(StateMachine {
            engine,
            partition,
            hlc,
            applied,
            applied_index,
            dedup,
            dedup_capacity,
        })
    }

    pub fn applied_index(&self) -> Arc<AppliedIndex> {
        self.applied_index.clone()
    }

    /// The key's value as of the entries applied so far, including those of the current
    /// batch not yet written (`overlay`).
    fn current(
        &self,
        key: &[u8],
        overlay: &HashMap<Vec<u8>, Option<StoredValue>>,
    ) -> io::Result<Option<StoredValue>> {
        match overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.engine.sm_get(self.partition, key)?),
        }
    }

    /// Evaluates one command at log index `index`, adding its storage changes to `ops` and
    /// its effect on keys to `overlay`.
    fn execute(
        &mut self,
        index: u64,
        cmd: Command,
        ops: &mut Vec<SmOp>,
        overlay: &mut HashMap<Vec<u8>, Option<StoredValue>>,
    ) -> io::Result<CommandResponse> {
        let idempotency = cmd.idempotency.filter(|i| i.client_id != 0);
        if let Some(id) = idempotency {
            if let Some(previous) = self.dedup.get(&id) {
                return Ok(CommandResponse {
                    deduplicated: true,
                    ..previous.clone()
                });
            }
        }
        let hlc = cmd.hlc.max(self.applied.last_hlc.saturating_add(1));
        self.applied.last_hlc = hlc;
        self.hlc.observe(HlcTimestamp(hlc));

        let (key, condition) = match &cmd.op {
            Op::Put { key, condition, .. } | Op::Delete { key, condition } => (key, *condition),
        };
        let current = self.current(key, overlay)?;
        let current_revision = current.as_ref().map(|c| c.mod_revision).unwrap_or(0);
        let holds = match condition {
            Condition::Always => true,
            Condition::IfRevision(r) => current_revision == r,
            Condition::IfAbsent => current.is_none(),
        };
        let succeeded = match cmd.op {
            Op::Put { key, value, .. } => {
                if holds {
                    let create_revision =
                        current.as_ref().map(|c| c.create_revision).unwrap_or(index);
                    let stored = StoredValue {
                        mod_revision: index,
                        create_revision,
                        hlc,
                        value,
                    };
                    overlay.insert(key.clone(), Some(stored.clone()));
                    ops.push(SmOp::Put { key, value: stored });
                }
                holds
            }
            Op::Delete { key, .. } => {
                let deleted = holds && current.is_some();
                if deleted {
                    overlay.insert(key.clone(), None);
                    ops.push(SmOp::Delete { key });
                }
                deleted
            }
        };
        let response = CommandResponse {
            revision: index,
            hlc,
            succeeded,
            current_revision,
            deduplicated: false,
        };
        if let Some(id) = idempotency {
            ops.push(SmOp::DedupPut {
                client_id: id.client_id,
                sequence: id.sequence,
                record: DedupRecord {
                    applied_index: index,
                    response: encode(&response)?,
                },
            });
            for old in self.dedup.insert(id, response.clone()) {
                ops.push(SmOp::DedupDelete {
                    client_id: old.client_id,
                    sequence: old.sequence,
                });
            }
        }
        Ok(response)
    }
}

/// Entries applied per storage batch at most.
const APPLY_BATCH_MAX: usize = 512;

impl StateMachine {
    /// Writes the pending changes and applied state, then answers the waiting clients.
    fn flush_applied(
        &mut self,
        ops: &mut Vec<SmOp>,
        overlay: &mut HashMap<Vec<u8>, Option<StoredValue>>,
        responses: &mut Vec<(
            openraft::storage::ApplyResponder<TypeConfig>,
            CommandResponse,
        )>,
        last_index: &mut Option<u64>,
    ) -> io::Result<()> {
        let Some(index) = last_index.take() else {
            return Ok(());
        };
        self.engine.sm_write(
            self.partition,
            SmWrite {
                ops: std::mem::take(ops),
                applied: Some(encode(&self.applied)?),
            },
        )?;
        overlay.clear();
        self.applied_index.set(index);
        for (responder, response) in responses.drain(..) {
            responder.send(response);
        }
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        // The entries of one call are written as one atomic batch (with the applied state
        // of the last one); responses go out only after the batch is written, so a reader
        // who sees a response also sees its effect.
        let mut ops = Vec::new();
        let mut overlay: HashMap<Vec<u8>, Option<StoredValue>> = HashMap::new();
        let mut responses = Vec::new();
        let mut last_index = None;
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.log_id.index;
            let response = match entry.payload {
                EntryPayload::Blank => CommandResponse {
                    revision: index,
                    ..Default::default()
                },
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResponse {
                        revision: index,
                        ..Default::default()
                    }
                }
                EntryPayload::Normal(cmd) => self.execute(index, cmd, &mut ops, &mut overlay)?,
            };
            self.applied.last_applied = Some(entry.log_id);
            last_index = Some(index);
            if let Some(responder) = responder {
                responses.push((responder, response));
            }
            if responses.len() >= APPLY_BATCH_MAX || ops.len() >= APPLY_BATCH_MAX {
                self.flush_applied(&mut ops, &mut overlay, &mut responses, &mut last_index)?;
            }
        }
        self.flush_applied(&mut ops, &mut overlay, &mut responses, &mut last_index)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            engine: self.engine.clone(),
            partition: self.partition,
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let engine = self.engine.clone();
        let partition = self.partition;
        let expected = meta.last_log_id;
        let image = tokio::task::spawn_blocking(move || -> io::Result<PartitionImage> {
            let image = PartitionImage::decode(&snapshot)?;
            let applied: AppliedState = match &image.applied {
                Some(b) => decode(b)?,
                None => AppliedState::default(),
            };
            if applied.last_applied != expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "snapshot of partition {partition} claims {expected:?} but holds {:?}",
                        applied.last_applied
                    ),
                ));
            }
            // Durable on return (the import is one batch, then fsync).
            engine.sm_import(partition, &image)?;
            Ok(image)
        })
        .await
        .map_err(io::Error::other)??;
        self.applied = match &image.applied {
            Some(b) => decode(b)?,
            None => AppliedState::default(),
        };
        self.hlc.observe(HlcTimestamp(self.applied.last_hlc));
        self.dedup = DedupTable::load(
            self.dedup_capacity,
            self.engine.sm_dedup_all(self.partition)?,
        )?;
        self.applied_index.set(
            self.applied
                .last_applied
                .as_ref()
                .map(|l| l.index)
                .unwrap_or(0),
        );
        tracing::info!(partition = self.partition.0, last_log_id = ?self.applied.last_applied, "installed snapshot");
        Ok(())
    }

    /// The partition as it is now, exported from a consistent fjall snapshot. Snapshots
    /// are not kept as files: the state machine is already durable in fjall (see
    /// [`SnapshotBuilder`]), so a copy is made only when a follower needs one. Its
    /// `last_log_id` is the current applied id, at or after the last built snapshot's.
    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, Vec<u8>>>, io::Error> {
        if self.applied.last_applied.is_none() {
            return Ok(None);
        }
        let engine = self.engine.clone();
        let partition = self.partition;
        let snapshot = tokio::task::spawn_blocking(move || export(&*engine, partition))
            .await
            .map_err(io::Error::other)??;
        tracing::info!(
            partition = self.partition.0,
            last_log_id = ?snapshot.meta.last_log_id,
            bytes = snapshot.snapshot.len(),
            "exported snapshot"
        );
        Ok(Some(snapshot))
    }
}

/// A consistent copy of partition `p` with the metadata of the state it holds.
fn export(
    engine: &dyn StorageEngine,
    partition: PartitionId,
) -> io::Result<SnapshotOf<TypeConfig, Vec<u8>>> {
    let image = engine.sm_export(partition)?;
    let applied: AppliedState = match &image.applied {
        Some(b) => decode(b)?,
        None => AppliedState::default(),
    };
    Ok(SnapshotOf::<TypeConfig, Vec<u8>> {
        meta: SnapshotMetaOf::<TypeConfig> {
            last_log_id: applied.last_applied,
            last_membership: applied.membership,
        },
        snapshot: image.encode()?,
    })
}

/// "Builds" a snapshot without copying the partition: it makes the state machine durable
/// up to its applied id (one fsync) and reports that id, which is what openraft needs to
/// purge the log behind it. The state machine lives in fjall, so the log entries it covers
/// are no longer needed once its state is durable; a copy for a lagging follower is made
/// by `get_current_snapshot` when one is asked for. (Measured: copying every partition
/// each 20,000 entries cost 10–15 % of put throughput with 100k keys, plus latency spikes.)
pub struct SnapshotBuilder {
    engine: Arc<dyn StorageEngine>,
    partition: PartitionId,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, Vec<u8>>, io::Error> {
        let engine = self.engine.clone();
        let partition = self.partition;
        let meta =
            tokio::task::spawn_blocking(move || -> io::Result<SnapshotMetaOf<TypeConfig>> {
                // Read the applied state first, then fsync: every apply batch up to it was
                // written to the journal before it, so the fsync makes all of them durable.
                let applied: AppliedState = match engine.sm_applied(partition)? {
                    Some(b) => decode(&b)?,
                    None => AppliedState::default(),
                };
                engine.sync()?;
                Ok(SnapshotMetaOf::<TypeConfig> {
                    last_log_id: applied.last_applied,
                    last_membership: applied.membership,
                })
            })
            .await
            .map_err(io::Error::other)??;
        tracing::info!(
            partition = self.partition.0,
            last_log_id = ?meta.last_log_id,
            "state machine durable; snapshot point recorded"
        );
        Ok(SnapshotOf::<TypeConfig, Vec<u8>> {
            meta,
            snapshot: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(rev: u64) -> CommandResponse {
        CommandResponse {
            revision: rev,
            succeeded: true,
            ..Default::default()
        }
    }

    #[test]
    fn dedup_table_evicts_oldest_first() {
        let mut t = DedupTable::new(2);
        let id = |s| Idempotency {
            client_id: 1,
            sequence: s,
        };
        assert!(t.insert(id(1), resp(1)).is_empty());
        assert!(t.insert(id(2), resp(2)).is_empty());
        assert_eq!(t.insert(id(3), resp(3)), vec![id(1)]);
        assert_eq!(t.get(&id(1)), None);
        assert_eq!(t.get(&id(3)), Some(&resp(3)));
        assert_eq!(t.len(), 2);
    }
}
