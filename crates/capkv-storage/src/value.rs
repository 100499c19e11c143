//! The stored form of a user value: revisions, HLC stamp and bytes.

use crate::engine::StorageError;

const FORMAT_V1: u8 = 1;
/// V1 plus the expiry time, for values that expire (others keep the V1 layout).
const FORMAT_V2: u8 = 2;
const HEADER_BYTES: usize = 1 + 8 + 8 + 8;

/// A key's current version in a partition's state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    /// Revision (log index) of the write that set this value.
    pub mod_revision: u64,
    /// Revision of the write that created the key (since its last delete).
    pub create_revision: u64,
    /// HLC timestamp of the write that set this value.
    pub hlc: u64,
    pub value: Vec<u8>,
    /// When the key expires, in cluster time (HLC physical ms); 0 = never.
    pub expires_at_ms: u64,
}

impl StoredValue {
    /// Whether the key has expired at cluster time `now_ms`.
    pub fn expired_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms != 0 && self.expires_at_ms <= now_ms
    }

    /// Layout: `[format u8 = 1][mod_revision u64 BE][create_revision u64 BE][hlc u64 BE][value]`,
    /// or for a value that expires `[2][mod_revision][create_revision][hlc][expires_at_ms u64 BE][value]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + 8 + self.value.len());
        out.push(if self.expires_at_ms == 0 {
            FORMAT_V1
        } else {
            FORMAT_V2
        });
        out.extend_from_slice(&self.mod_revision.to_be_bytes());
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(&self.hlc.to_be_bytes());
        if self.expires_at_ms != 0 {
            out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        }
        out.extend_from_slice(&self.value);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        if bytes.len() < HEADER_BYTES {
            return Err(StorageError::Corrupt(format!(
                "stored value of {} bytes is too short",
                bytes.len()
            )));
        }
        let header = match bytes[0] {
            FORMAT_V1 => HEADER_BYTES,
            FORMAT_V2 if bytes.len() >= HEADER_BYTES + 8 => HEADER_BYTES + 8,
            FORMAT_V2 => {
                return Err(StorageError::Corrupt(format!(
                    "stored value of {} bytes is too short",
                    bytes.len()
                )))
            }
            other => {
                return Err(StorageError::Corrupt(format!(
                    "unknown stored value format {other}"
                )))
            }
        };
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        Ok(StoredValue {
            mod_revision: u64_at(1),
            create_revision: u64_at(9),
            hlc: u64_at(17),
            expires_at_ms: if header > HEADER_BYTES { u64_at(25) } else { 0 },
            value: bytes[header..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let v = StoredValue {
            mod_revision: 9,
            create_revision: 3,
            hlc: 77,
            value: b"abc".to_vec(),
            expires_at_ms: 0,
        };
        assert_eq!(StoredValue::decode(&v.encode()).unwrap(), v);
        assert_eq!(
            v.encode()[0],
            1,
            "values that never expire keep the first layout"
        );
        let expiring = StoredValue {
            expires_at_ms: 1_700_000_000_000,
            ..v.clone()
        };
        assert_eq!(StoredValue::decode(&expiring.encode()).unwrap(), expiring);
        assert!(expiring.expired_at(1_700_000_000_000) && !expiring.expired_at(1_699_999_999_999));
        assert!(!v.expired_at(u64::MAX));
        assert!(StoredValue::decode(&expiring.encode()[..30]).is_err());
        assert!(StoredValue::decode(b"short").is_err());
        let mut bad = v.encode();
        bad[0] = 9;
        assert!(StoredValue::decode(&bad).is_err());
    }
}
