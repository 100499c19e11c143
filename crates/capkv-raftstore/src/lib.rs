//! capkv's node-level Raft engine (work in progress; the server still runs openraft).
//!
//! One [`driver::Driver`] per node drives every partition's raft-rs `RawNode`: each turn it
//! collects every group's `Ready`, writes all their entries and hard states in one batch
//! to the node's [`storage::Disk`], asks for one sync, sends the messages that may go
//! before persistence at once, and the rest when the sync completes. The clock (ticks),
//! the network (`Outbox`) and the disk are the caller's, so the seeded simulation ([`sim`])
//! runs many nodes in one thread, with crashes that lose unsynced writes.

pub mod codec;
pub mod driver;
pub mod engine_disk;
pub mod log;
pub mod loopback;
pub mod node;
pub mod sim;
pub mod storage;

/// The role of a replica in its group (raft-rs).
pub use raft::StateRole;

/// raft-rs's message type, as the engine's transport hands it over.
pub use raft::eraftpb::{Message as RaftMessage, MessageType as RaftMessageType};
