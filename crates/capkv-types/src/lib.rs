//! Types shared by every capkv crate and by clients: ids, errors with stable codes,
//! limits on input, the key-to-partition hash and the hybrid logical clock.
//!
//! This crate must stay free of IO, async runtimes, gRPC and storage: the client
//! library and the server both depend on it.

pub mod consistency;
pub mod error;
pub mod hash;
pub mod hlc;
pub mod ids;
pub mod limits;
pub mod planted;
pub mod session;

pub use consistency::{ReadConsistency, Staleness};
pub use error::{ErrorCode, KvError};
pub use hash::{hash_tag, key_hash, partition_for_key};
pub use hlc::{Hlc, HlcTimestamp};
pub use ids::{NodeId, PartitionId, Revision};
pub use limits::Limits;
pub use planted::PlantedBug;
pub use session::SessionToken;
