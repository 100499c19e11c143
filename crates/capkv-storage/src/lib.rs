//! capkv's storage: one engine per node holding the Raft log, Raft metadata and state
//! machine of every partition, with the partition id leading every key.
//!
//! This crate knows nothing of Raft, gRPC or the network: log entries and Raft
//! metadata are opaque bytes here; `capkv-replication` gives them meaning. See
//! docs/storage.md for the on-disk layout and what is assumed of the disk.
//!
//! Durability model: a write is durable only after a `sync` (or a [`GroupCommit`] request
//! answered after it). Batches wait in fjall's journal buffer until then; single-key
//! writes reach the OS page cache at once. A process crash loses what was not synced,
//! as power loss does. [`GroupCommit`] turns many concurrent "make this durable" requests,
//! from any number of partitions, into one fsync.

pub mod conformance;
mod engine;
mod fjall_engine;
mod group_commit;
pub mod keys;
pub mod power_loss;
mod value;

pub use engine::{
    PartitionImage, RaftLogWrite, RaftWrite, SmOp, SmSnapshot, SmWrite, StorageEngine, StorageError,
};
pub use fjall_engine::{FjallEngine, FjallOptions};
pub use group_commit::{FlushCallback, GroupCommit, GroupCommitStats, SyncFaults};
pub use value::StoredValue;
