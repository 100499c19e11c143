//! Key encodings. Every key starts with the partition id (u32 big-endian) so that one
//! partition's keys are contiguous and ordered, and many partitions share one engine.
//!
//! ```text
//! raft_log   [partition u32][log index u64]            -> entry bytes (opaque)
//! raft_meta  [partition u32][tag u8]                   -> vote / committed / last purged
//! sm_data    [partition u32][user key ...]             -> StoredValue
//! sm_meta    [partition u32][tag u8]                   -> applied state (opaque)
//! sm_session [partition u32][client u64]                -> client session (opaque)
//! node_meta  [name ...]                                -> node-level settings
//! sm_staging [partition u32][0]                         -> staged image complete: index u64 + applied state
//!            [partition u32][1][user key ...]           -> staged StoredValue
//!            [partition u32][2][client u64]             -> staged client session
//! ```
//! All integers are big-endian so byte order equals numeric order.

use capkv_types::PartitionId;

pub const PARTITION_PREFIX_BYTES: usize = 4;

pub fn partition_prefix(p: PartitionId) -> [u8; 4] {
    p.0.to_be_bytes()
}

/// The first key of the partition after `p`, or `None` for the last possible partition.
pub fn next_partition_prefix(p: PartitionId) -> Option<[u8; 4]> {
    p.0.checked_add(1).map(u32::to_be_bytes)
}

pub fn log_key(p: PartitionId, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&p.0.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The log index in a `raft_log` key, or `None` if the key is malformed.
pub fn log_index_of(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(4..12)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

pub fn tagged_key(p: PartitionId, tag: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&p.0.to_be_bytes());
    k[4] = tag;
    k
}

pub fn data_key(p: PartitionId, user_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + user_key.len());
    k.extend_from_slice(&p.0.to_be_bytes());
    k.extend_from_slice(user_key);
    k
}

pub fn user_key_of(data_key: &[u8]) -> &[u8] {
    data_key.get(PARTITION_PREFIX_BYTES..).unwrap_or(&[])
}

pub fn session_key(p: PartitionId, client_id: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&p.0.to_be_bytes());
    k[4..12].copy_from_slice(&client_id.to_be_bytes());
    k
}

/// The client id of a `sm_session` key, or `None` if malformed.
pub fn session_client_of(key: &[u8]) -> Option<u64> {
    let c: [u8; 8] = key.get(4..12)?.try_into().ok()?;
    (key.len() == 12).then_some(u64::from_be_bytes(c))
}

/// Kinds of `sm_staging` keys (the byte after the partition id).
pub mod staging_kind {
    pub const DONE: u8 = 0;
    pub const DATA: u8 = 1;
    pub const SESSION: u8 = 2;
}

/// A `sm_staging` key: partition, kind, then the rest.
pub fn staging_key(p: PartitionId, kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + rest.len());
    k.extend_from_slice(&p.0.to_be_bytes());
    k.push(kind);
    k.extend_from_slice(rest);
    k
}

/// Tags of `raft_meta` keys.
pub mod raft_meta_tag {
    pub const VOTE: u8 = 1;
    pub const COMMITTED: u8 = 2;
    pub const LAST_PURGED: u8 = 3;
    /// The node-level engine's (raft-rs) hard state: term, vote, commit.
    pub const HARD_STATE: u8 = 4;
    /// The node-level engine's membership (raft-rs conf state).
    pub const CONF_STATE: u8 = 5;
    /// The node-level engine's log start: index and term of the last entry compacted away.
    pub const LOG_START: u8 = 6;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_partition_then_index() {
        let a = log_key(PartitionId(1), u64::MAX);
        let b = log_key(PartitionId(2), 0);
        let c = log_key(PartitionId(2), 1);
        let d = log_key(PartitionId(2), 256);
        assert!(a < b && b < c && c < d);
        assert_eq!(log_index_of(&d), Some(256));
        assert_eq!(log_index_of(&d[..5]), None);
    }

    #[test]
    fn data_and_session_keys_round_trip() {
        let k = data_key(PartitionId(7), b"user:1");
        assert_eq!(user_key_of(&k), b"user:1");
        assert!(data_key(PartitionId(7), b"\xff\xff") < data_key(PartitionId(8), b""));
        let d = session_key(PartitionId(7), 42);
        assert_eq!(session_client_of(&d), Some(42));
        assert_eq!(session_client_of(&d[..11]), None);
        assert_eq!(next_partition_prefix(PartitionId(u32::MAX)), None);
    }
}
