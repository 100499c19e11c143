//! openraft glue: one Raft group per partition over capkv-storage.
//!
//! - [`types`]: the type config and the replicated commands.
//! - [`log_store`]: `RaftLogStorage` over a [`StorageEngine`](capkv_storage::StorageEngine),
//!   with appends made durable by the node's shared group-commit flusher.
//! - [`apply`]: executes commands (conditions, MVCC revisions, HLC stamps, client
//!   sessions); shared with the raftstore engine.
//! - [`state_machine`]: applies commands (MVCC revisions, HLC stamps, idempotency table)
//!   and builds/installs snapshots.
//! - [`network`]: `RaftNetworkV2` over the narrow [`RaftTransport`] trait, and the
//!   receiving side's [`dispatch`]. Nothing here knows gRPC: the server supplies the
//!   transport.
//! - [`vote_hold`]: a restarted node refuses votes for one leader lease, so that lease
//!   reads stay linearizable across crashes.
//! - [`faults`]: the test-only fault injector (drop traffic to/from chosen peers).

pub mod apply;
pub mod codec;
pub mod faults;
pub mod group;
pub mod log_store;
pub mod network;
pub mod sessions;
pub mod state_machine;
pub mod types;
pub mod vote_hold;

pub use faults::Faults;
pub use group::{open_partition, GroupSettings, PartitionRaft};
pub use network::{dispatch, RaftEnvelope, RaftRpc, RaftTransport, TransportError};
pub use types::{Command, CommandResponse, Condition, Idempotency, Op, Rejection, TypeConfig};
pub use vote_hold::VoteHold;
