//! The state machine of one partition: applies committed commands to the storage engine.
//!
//! Each applied entry is one atomic storage write holding the data change, the
//! idempotency-table change and the new applied state, so after a crash the state machine
//! is exactly the effect of some prefix of the log.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capkv_storage::{PartitionImage, StorageEngine};
use capkv_types::{Hlc, PartitionId};
use futures::{Stream, TryStreamExt};
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::apply::Applier;
use crate::codec::{decode, encode};
use crate::sessions::Session;
use crate::types::{CommandResponse, TypeConfig};

/// What the state machine persists besides data: where it is in the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    /// The highest HLC stamp applied; the next write is stamped above it.
    last_hlc: u64,
}

/// Applied index of a partition, readable without going through openraft.
#[derive(Debug, Default)]
pub struct AppliedIndex(AtomicU64);

impl AppliedIndex {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Release)
    }
}

pub struct StateMachine {
    engine: Arc<dyn StorageEngine>,
    partition: PartitionId,
    applied: AppliedState,
    applied_index: Arc<AppliedIndex>,
    /// Executes commands and keeps the client sessions (shared with the raftstore engine).
    applier: Applier,
}

impl StateMachine {
    pub fn open(
        engine: Arc<dyn StorageEngine>,
        partition: PartitionId,
        hlc: Arc<Hlc>,
        session_ttl_ms: u64,
    ) -> io::Result<Self> {
        let applied: AppliedState = match engine.sm_applied(partition)? {
            Some(bytes) => decode(&bytes)?,
            None => AppliedState::default(),
        };
        let applier = Applier::open(
            engine.clone(),
            partition,
            hlc,
            session_ttl_ms,
            applied.last_hlc,
        )?;
        let applied_index = Arc::new(AppliedIndex::default());
        applied_index.set(applied.last_applied.as_ref().map(|l| l.index).unwrap_or(0));
        Ok(StateMachine {
            engine,
            partition,
            applied,
            applied_index,
            applier,
        })
    }

    pub fn applied_index(&self) -> Arc<AppliedIndex> {
        self.applied_index.clone()
    }
}

/// Entries applied per storage batch at most.
const APPLY_BATCH_MAX: usize = 512;

impl StateMachine {
    /// Writes the pending changes and applied state, then answers the waiting clients.
    fn flush_applied(
        &mut self,
        responses: &mut Vec<(
            openraft::storage::ApplyResponder<TypeConfig>,
            CommandResponse,
        )>,
        last_index: &mut Option<u64>,
    ) -> io::Result<()> {
        let Some(index) = last_index.take() else {
            return Ok(());
        };
        self.applied.last_hlc = self.applier.last_hlc();
        self.applier.flush(encode(&self.applied)?)?;
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
                EntryPayload::Normal(cmd) => self.applier.execute(index, cmd)?,
            };
            self.applied.last_applied = Some(entry.log_id);
            last_index = Some(index);
            if let Some(responder) = responder {
                responses.push((responder, response));
            }
            if responses.len() >= APPLY_BATCH_MAX || self.applier.pending() >= APPLY_BATCH_MAX {
                self.flush_applied(&mut responses, &mut last_index)?;
            }
        }
        self.flush_applied(&mut responses, &mut last_index)
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
            // Every session row must decode before the image replaces the partition: a
            // malformed one would otherwise fail this install and every later start.
            for (_, bytes) in &image.sessions {
                decode::<Session>(bytes)?;
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
        self.applier.reload(self.applied.last_hlc)?;
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
