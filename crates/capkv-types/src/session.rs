//! Session tokens (docs/consistency.md, `session` reads): per partition, the highest log
//! position a session has written or read. A replica serves a session read of partition
//! `p` once it has applied up to the token's position for `p`, which gives the session
//! read-your-writes and monotonic reads on any replica. Positions are indexes in the
//! partition's Raft log, so a token stays valid across leader changes; two tokens merge
//! by taking the higher position of each partition.
//!
//! Clients treat tokens as opaque bytes: `0x01` then, per partition in increasing order,
//! LEB128 varints of the partition id and the position. Empty bytes are the empty token.

use std::collections::BTreeMap;

use crate::{KvError, PartitionId};

const TOKEN_V1: u8 = 1;

/// A token is at most this long (about 6,000 partitions at full positions); a longer one
/// is refused, never parsed.
pub const SESSION_TOKEN_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionToken {
    positions: BTreeMap<u32, u64>,
}

impl SessionToken {
    /// The position the session reached in partition `p` (0: none).
    pub fn at(&self, p: PartitionId) -> u64 {
        self.positions.get(&p.0).copied().unwrap_or(0)
    }

    /// Records that the session saw partition `p` at `index` (a read served at, or a write
    /// applied by, that position); positions never go back.
    pub fn observe(&mut self, p: PartitionId, index: u64) {
        if index == 0 {
            return;
        }
        let e = self.positions.entry(p.0).or_default();
        *e = (*e).max(index);
    }

    /// The higher position of each partition of both tokens.
    pub fn merge(&mut self, other: &SessionToken) {
        for (p, i) in &other.positions {
            self.observe(PartitionId(*p), *i);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        if self.positions.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(1 + self.positions.len() * 6);
        out.push(TOKEN_V1);
        for (p, i) in &self.positions {
            put_varint(&mut out, u64::from(*p));
            put_varint(&mut out, *i);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<SessionToken, KvError> {
        let bad = |why: &str| KvError::InvalidArgument(format!("session token: {why}"));
        if bytes.is_empty() {
            return Ok(SessionToken::default());
        }
        if bytes.len() > SESSION_TOKEN_BYTES_MAX {
            return Err(KvError::too_large(
                "session token",
                bytes.len(),
                SESSION_TOKEN_BYTES_MAX,
            ));
        }
        let (&version, mut rest) = bytes.split_first().ok_or_else(|| bad("empty"))?;
        if version != TOKEN_V1 {
            return Err(bad("not one this server issued (unknown version)"));
        }
        let mut positions = BTreeMap::new();
        let mut last: Option<u32> = None;
        while !rest.is_empty() {
            let p = take_varint(&mut rest).ok_or_else(|| bad("truncated"))?;
            let i = take_varint(&mut rest).ok_or_else(|| bad("truncated"))?;
            let p = u32::try_from(p).map_err(|_| bad("partition id out of range"))?;
            if last.is_some_and(|l| p <= l) {
                return Err(bad("partitions out of order"));
            }
            last = Some(p);
            positions.insert(p, i);
        }
        Ok(SessionToken { positions })
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        let bits = u64::from(b & 0x7f);
        if shift == 63 && bits > 1 {
            return None;
        }
        v |= bits << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_merge_by_the_higher_position() {
        let mut a = SessionToken::default();
        assert!(a.encode().is_empty());
        assert_eq!(SessionToken::decode(&[]).unwrap(), a);
        a.observe(PartitionId(3), 100);
        a.observe(PartitionId(3), 90); // never goes back
        a.observe(PartitionId(0), u64::MAX);
        a.observe(PartitionId(7), 0); // nothing seen
        assert_eq!(a.at(PartitionId(3)), 100);
        assert_eq!(a.at(PartitionId(7)), 0);
        assert_eq!(SessionToken::decode(&a.encode()).unwrap(), a);
        let mut b = SessionToken::default();
        b.observe(PartitionId(3), 150);
        b.observe(PartitionId(5), 1);
        a.merge(&b);
        assert_eq!(
            (
                a.at(PartitionId(0)),
                a.at(PartitionId(3)),
                a.at(PartitionId(5))
            ),
            (u64::MAX, 150, 1)
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let mut t = SessionToken::default();
        t.observe(PartitionId(1), 300);
        let good = t.encode();
        for bad in [
            vec![2, 1, 1],                            // unknown version
            good[..good.len() - 1].to_vec(),          // truncated
            vec![1, 5, 1, 4, 1],                      // partitions out of order
            vec![1, 0xff, 0xff, 0xff, 0xff, 0x7f, 1], // partition id over u32
            [vec![1, 0], vec![0xff; 10]].concat(),    // varint over 64 bits
        ] {
            let err = SessionToken::decode(&bad).unwrap_err();
            assert!(
                matches!(err, KvError::InvalidArgument(_)),
                "{bad:?}: {err:?}"
            );
        }
        let huge = vec![1; SESSION_TOKEN_BYTES_MAX + 1];
        assert!(matches!(
            SessionToken::decode(&huge),
            Err(KvError::TooLarge(_))
        ));
    }
}
