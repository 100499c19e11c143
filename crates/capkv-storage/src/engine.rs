//! The storage engine trait: the narrow edge between capkv and its disk.

use capkv_types::PartitionId;
use serde::{Deserialize, Serialize};

use crate::group_commit::GroupCommit;
use crate::value::StoredValue;

/// A storage failure. Any of these on the write path is fatal for the replica: the caller
/// must stop serving the partition rather than guess what reached the disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("corrupt data on disk: {0}")]
    Corrupt(String),
    /// A past fsync failed: nothing written since can be trusted to be durable, so the
    /// engine acknowledges nothing more until the node restarts.
    #[error("storage is poisoned by a failed fsync ({0}); restart the node")]
    Poisoned(String),
    /// Another process holds the data directory open.
    #[error("data dir {0} is in use by another capkv process")]
    InUse(String),
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}

impl From<fjall::Error> for StorageError {
    fn from(e: fjall::Error) -> Self {
        StorageError::Engine(e.to_string())
    }
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Corrupt(m) => std::io::Error::new(std::io::ErrorKind::InvalidData, m),
            other => std::io::Error::other(other.to_string()),
        }
    }
}

/// One change to a partition's state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmOp {
    Put {
        key: Vec<u8>,
        value: StoredValue,
    },
    Delete {
        key: Vec<u8>,
    },
    /// A client session (opaque to storage; see the replication layer's `sessions`).
    SessionPut {
        client_id: u64,
        session: Vec<u8>,
    },
    SessionDelete {
        client_id: u64,
    },
}

/// Changes applied atomically together with the new applied state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmWrite {
    pub ops: Vec<SmOp>,
    /// The new applied state (opaque; written by the replication layer), if it changed.
    pub applied: Option<Vec<u8>>,
}

/// One partition's part of a [`RaftWrite`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftLogWrite {
    pub partition: PartitionId,
    /// (index, entry) pairs to write; an existing entry at the same index is replaced.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// Log entries to delete, indexes in `[first, last]` (a suffix that conflicted, or a
    /// prefix a snapshot made unneeded). Must not overlap `entries`.
    pub remove: Option<(u64, u64)>,
    /// Raft metadata to set: (tag, value).
    pub meta: Vec<(u8, Vec<u8>)>,
    /// Replace the partition's state machine with its complete staged image (see
    /// [`StorageEngine::sm_stage_finish`]), which must be at this log index, in the same
    /// atomic batch: a snapshot's log and state machine become durable together.
    pub install_staged: Option<u64>,
}

/// Raft log and metadata changes of any number of partitions, written atomically as one
/// batch (the node-level engine writes every group's turn with one of these).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftWrite {
    pub groups: Vec<RaftLogWrite>,
}

/// Data pairs of a state machine: (user key, encoded `StoredValue`).
pub type DataPage = Vec<(Vec<u8>, Vec<u8>)>;

/// One partition's state machine as of one moment, read page by page: the source of a
/// snapshot streamed to a follower. Writes made after it was taken are not seen.
pub trait SmSnapshot: Send {
    /// The applied state at that moment (opaque).
    fn applied(&self) -> Result<Option<Vec<u8>>, StorageError>;
    /// Data pairs (user key, encoded `StoredValue`) after `after` (from the first if
    /// `None`), in key order, about `bytes_max` of them but at least one if any is left;
    /// empty when none is.
    fn data_page(&self, after: Option<&[u8]>, bytes_max: usize) -> Result<DataPage, StorageError>;
    /// Client sessions after client `after`, the same way.
    fn sessions_page(
        &self,
        after: Option<u64>,
        bytes_max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError>;
}

/// A whole partition's state machine: what a snapshot carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionImage {
    pub applied: Option<Vec<u8>>,
    /// (user key, encoded StoredValue), in key order.
    pub data: Vec<(Vec<u8>, Vec<u8>)>,
    /// (client id, encoded session).
    pub sessions: Vec<(u64, Vec<u8>)>,
}

impl PartitionImage {
    pub fn encode(&self) -> Result<Vec<u8>, StorageError> {
        postcard::to_stdvec(self)
            .map_err(|e| StorageError::Engine(format!("encode snapshot image: {e}")))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        postcard::from_bytes(bytes)
            .map_err(|e| StorageError::Corrupt(format!("decode snapshot image: {e}")))
    }
}

/// A node's storage. Every method names the partition; implementations keep partitions
/// apart and must not lose a write that `sync` (or a [`GroupCommit`] flush) confirmed.
///
/// Ordering: writes from one thread reach the disk in call order, and a sync makes every
/// earlier write durable (a crash leaves a prefix of the writes).
pub trait StorageEngine: Send + Sync + 'static {
    // ---- Raft log ----
    /// Appends (index, entry) pairs atomically. Overwrites entries with the same index.
    fn log_append(&self, p: PartitionId, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError>;
    /// Entries with index in `[start, end)`, in order, at most `max_entries`.
    fn log_read(
        &self,
        p: PartitionId,
        start: u64,
        end: u64,
        max_entries: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError>;
    /// The entry with the highest index, if any.
    fn log_last(&self, p: PartitionId) -> Result<Option<(u64, Vec<u8>)>, StorageError>;
    /// Deletes entries with index >= `from`.
    fn log_truncate_from(&self, p: PartitionId, from: u64) -> Result<(), StorageError>;
    /// Deletes entries with index <= `upto`.
    fn log_purge_upto(&self, p: PartitionId, upto: u64) -> Result<(), StorageError>;
    /// Writes every partition's part of `write` in one atomic batch: after a crash either
    /// all of it is there or none (when no sync covered it).
    fn raft_write(&self, write: &RaftWrite) -> Result<(), StorageError>;
    fn raft_meta_get(&self, p: PartitionId, tag: u8) -> Result<Option<Vec<u8>>, StorageError>;
    fn raft_meta_put(&self, p: PartitionId, tag: u8, value: &[u8]) -> Result<(), StorageError>;

    // ---- State machine ----
    fn sm_write(&self, p: PartitionId, write: SmWrite) -> Result<(), StorageError>;
    /// Several partitions' state-machine writes as one atomic batch (the raftstore
    /// engine writes everything a turn applied with one of these).
    fn sm_write_many(&self, writes: Vec<(PartitionId, SmWrite)>) -> Result<(), StorageError>;
    fn sm_get(&self, p: PartitionId, key: &[u8]) -> Result<Option<StoredValue>, StorageError>;
    /// Keys in `[start, end)` (`end = None`: to the partition's end), in order, at most
    /// `limit` of them, stopping early once `bytes_max` bytes of keys and values are taken
    /// (always at least one pair when there is one).
    fn sm_scan(
        &self,
        p: PartitionId,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(Vec<u8>, StoredValue)>, StorageError>;
    fn sm_applied(&self, p: PartitionId) -> Result<Option<Vec<u8>>, StorageError>;
    /// Every client session of the partition: (client id, encoded session).
    fn sm_sessions_all(&self, p: PartitionId) -> Result<Vec<(u64, Vec<u8>)>, StorageError>;
    /// A consistent copy of the partition's state machine (one point in time).
    fn sm_export(&self, p: PartitionId) -> Result<PartitionImage, StorageError>;
    /// Replaces the partition's state machine with `image`, atomically, and syncs.
    fn sm_import(&self, p: PartitionId, image: &PartitionImage) -> Result<(), StorageError>;
    /// A consistent view of the partition's state machine now, to read page by page.
    fn sm_snapshot(&self, p: PartitionId) -> Result<Box<dyn SmSnapshot>, StorageError>;

    // ---- Receiving a snapshot: staged beside the live state machine, installed by a
    // [`RaftWrite`] with `install_staged` ----
    /// Drops whatever is staged for the partition (an image half received).
    fn sm_stage_clear(&self, p: PartitionId) -> Result<(), StorageError>;
    /// Adds a chunk to the partition's staged image. Values must decode.
    fn sm_stage_put(
        &self,
        p: PartitionId,
        data: &[(Vec<u8>, Vec<u8>)],
        sessions: &[(u64, Vec<u8>)],
    ) -> Result<(), StorageError>;
    /// Marks the staged image complete: the state machine at log index `index`, with
    /// this applied state.
    fn sm_stage_finish(
        &self,
        p: PartitionId,
        index: u64,
        applied: &[u8],
    ) -> Result<(), StorageError>;
    /// The log index of the partition's complete staged image, if there is one.
    fn sm_staged_index(&self, p: PartitionId) -> Result<Option<u64>, StorageError>;

    // ---- Node ----
    fn node_meta_get(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError>;
    fn node_meta_put(&self, name: &str, value: &[u8]) -> Result<(), StorageError>;

    /// Makes every write issued so far durable (blocking).
    fn sync(&self) -> Result<(), StorageError>;
    /// The node's shared group-commit flusher.
    fn group_commit(&self) -> &GroupCommit;
}
