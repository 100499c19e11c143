//! Keys to partitions.
//!
//! The hash is XXH3-64 with seed 0 over the raw key bytes. XXH3 is specified
//! byte-for-byte (github.com/Cyan4973/xxHash, doc/xxhash_spec.md), so the same key lands
//! in the same partition on every platform and every capkv version: this is an on-disk
//! and on-wire contract, pinned by the test vectors below.
//!
//! **Hash tags**, as in Redis Cluster: when a key holds a `{`, and a `}` after it with at
//! least one byte between, only the bytes between them are hashed (`{user:1}:name` and
//! `{user:1}:mail` share a partition, so one partition's atomic commands can cover both).
//! Keys without a tag hash whole. Added with on-disk format 3: a key with a tag lives in
//! another partition than format 2 put it in.
//!
//! The 64-bit hash space is a ring cut into `partition_count` equal arcs; partition `p`
//! owns hashes in `[p * 2^64 / n, (p + 1) * 2^64 / n)`. Computing the arc is a
//! multiply-shift, with no table and no bias.

use crate::ids::PartitionId;

/// The stable 64-bit hash of a key.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// The part of `key` that decides its partition: its hash tag if it has one, else all
/// of it.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(close) = rest.iter().position(|&b| b == b'}') {
            if close > 0 {
                return &rest[..close];
            }
        }
    }
    key
}

/// The partition that owns `key` when the ring has `partition_count` arcs.
///
/// `partition_count` must be at least 1; 0 is treated as 1 rather than panicking.
pub fn partition_for_key(key: &[u8], partition_count: u32) -> PartitionId {
    partition_for_hash(key_hash(hash_tag(key)), partition_count)
}

/// The arc of the ring that holds `hash`.
pub fn partition_for_hash(hash: u64, partition_count: u32) -> PartitionId {
    let n = u128::from(partition_count.max(1));
    PartitionId(((u128::from(hash) * n) >> 64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_across_versions() {
        // Test vectors fixed when the format was chosen. If these change, every existing
        // cluster would route keys to the wrong partition.
        assert_eq!(key_hash(b""), 0x2d06800538d394c2);
        assert_eq!(key_hash(b"user:1"), 0x3b577afd7fed9501);
        assert_eq!(partition_for_key(b"user:1", 8), PartitionId(1));
        assert_eq!(partition_for_key(b"", 8), PartitionId(1));
    }

    #[test]
    fn hash_tags_follow_redis_cluster() {
        assert_eq!(hash_tag(b"{user:1}:name"), b"user:1");
        assert_eq!(hash_tag(b"x{a}y{b}"), b"a", "the first tag counts");
        assert_eq!(
            hash_tag(b"{}user"),
            b"{}user",
            "an empty tag hashes the whole key"
        );
        assert_eq!(
            hash_tag(b"{{a}}"),
            b"{a",
            "the first closing brace after the first opening one"
        );
        assert_eq!(hash_tag(b"no{tag"), b"no{tag");
        assert_eq!(hash_tag(b"plain"), b"plain");
        assert_eq!(
            partition_for_key(b"{user:1}:name", 8),
            partition_for_key(b"user:1", 8)
        );
        for i in 0..100 {
            let a = format!("{{order:{i}}}:head");
            let b = format!("{{order:{i}}}:lines");
            assert_eq!(
                partition_for_key(a.as_bytes(), 8),
                partition_for_key(b.as_bytes(), 8)
            );
        }
    }

    #[test]
    fn arcs_cover_the_ring_in_order() {
        assert_eq!(partition_for_hash(0, 8), PartitionId(0));
        assert_eq!(partition_for_hash(u64::MAX, 8), PartitionId(7));
        assert_eq!(partition_for_hash(1 << 61, 8), PartitionId(1));
        assert_eq!(partition_for_hash((1 << 61) - 1, 8), PartitionId(0));
        assert_eq!(partition_for_hash(u64::MAX, 0), PartitionId(0));
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_for_key(format!("key-{i}").as_bytes(), 8).0 as usize] += 1;
        }
        for c in counts {
            assert!((700..1300).contains(&c), "uneven spread: {counts:?}");
        }
    }
}
