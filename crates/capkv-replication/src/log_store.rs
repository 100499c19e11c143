//! `RaftLogStorage` for one partition over the node's shared storage engine.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use capkv_storage::keys::raft_meta_tag;
use capkv_storage::StorageEngine;
use capkv_types::PartitionId;
use openraft::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};

use crate::codec::{decode, encode};
use crate::types::TypeConfig;

/// The Raft log and vote of one partition.
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<dyn StorageEngine>,
    partition: PartitionId,
    /// Last committed index written to storage.
    committed_saved: u64,
}

/// The committed index is saved when it moved this far since the last save.
const COMMITTED_SAVE_EVERY: u64 = 128;

impl LogStore {
    pub fn new(engine: Arc<dyn StorageEngine>, partition: PartitionId) -> Self {
        LogStore {
            engine,
            partition,
            committed_saved: 0,
        }
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, tag: u8) -> io::Result<Option<T>> {
        match self.engine.raft_meta_get(self.partition, tag)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(decode(&bytes)?)),
        }
    }
}

/// Whether `partition`'s vote stored on this node is still `leader`'s at `term`, i.e. this
/// node has not moved to a later term (granted a vote or followed another leader there).
///
/// Reads storage, not metrics: openraft stores a vote before any grant or answer that
/// depends on it leaves the node, while metrics are published later and may lag.
pub fn stored_vote_is(
    engine: &dyn StorageEngine,
    partition: PartitionId,
    term: u64,
    leader: u64,
) -> io::Result<bool> {
    let Some(bytes) = engine.raft_meta_get(partition, raft_meta_tag::VOTE)? else {
        return Ok(false);
    };
    let vote: VoteOf<TypeConfig> = decode(&bytes)?;
    Ok(vote.leader_id.term == term && vote.leader_id.node_id == leader)
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(x) => x.saturating_add(1),
        Bound::Excluded(x) => *x,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let (start, end) = bounds(&range);
        let raw = self
            .engine
            .log_read(self.partition, start, end, usize::MAX)?;
        let mut out = Vec::with_capacity(raw.len());
        for (index, bytes) in raw {
            let entry: EntryOf<TypeConfig> = decode(&bytes)?;
            if entry.log_id.index != index {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "partition {}: log key {index} holds entry {}",
                        self.partition, entry.log_id.index
                    ),
                ));
            }
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.meta(raft_meta_tag::VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<TypeConfig>> =
            self.meta(raft_meta_tag::LAST_PURGED)?;
        let last_log_id = match self.engine.log_last(self.partition)? {
            Some((_, bytes)) => Some(decode::<EntryOf<TypeConfig>>(&bytes)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        self.engine
            .raft_meta_put(self.partition, raft_meta_tag::VOTE, &encode(vote)?)?;
        // A vote must be durable before it is acted on.
        self.engine.group_commit().flush().await?;
        Ok(())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        // Not synced, and written at most every COMMITTED_SAVE_EVERY entries: a stale value
        // after a crash only means re-applying less on restart (the state machine's own
        // applied id is exact); saving on every commit cost a journal write per commit.
        let index = committed.as_ref().map(|l| l.index).unwrap_or(0);
        if index < self.committed_saved.saturating_add(COMMITTED_SAVE_EVERY)
            && index >= self.committed_saved
        {
            return Ok(());
        }
        self.engine.raft_meta_put(
            self.partition,
            raft_meta_tag::COMMITTED,
            &encode(&committed)?,
        )?;
        self.committed_saved = index;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self
            .meta::<Option<LogIdOf<TypeConfig>>>(raft_meta_tag::COMMITTED)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut raw = Vec::new();
        for entry in entries {
            raw.push((entry.log_id.index, encode(&entry)?));
        }
        self.engine.log_append(self.partition, &raw)?;
        // Group commit: the callback fires after the node's next shared fsync.
        self.engine.group_commit().request(Box::new(move |result| {
            callback.io_completed(result.map_err(io::Error::from));
        }));
        Ok(())
    }

    async fn truncate_after(
        &mut self,
        last_log_id: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        self.engine.log_truncate_from(self.partition, from)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        // Record the purge point first: entries at or below it are ignored from then on,
        // so a crash between the two writes leaves no hole.
        self.engine.raft_meta_put(
            self.partition,
            raft_meta_tag::LAST_PURGED,
            &encode(&log_id)?,
        )?;
        // Thousands of deletions: off the runtime threads, so other partitions' Raft
        // tasks on this worker are not held up.
        let engine = self.engine.clone();
        let partition = self.partition;
        tokio::task::spawn_blocking(move || engine.log_purge_upto(partition, log_id.index))
            .await
            .map_err(io::Error::other)??;
        Ok(())
    }
}
