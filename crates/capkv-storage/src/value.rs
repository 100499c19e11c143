//! The stored form of a user value: revisions, HLC stamp and bytes.

use crate::engine::StorageError;

const FORMAT_V1: u8 = 1;
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
}

impl StoredValue {
    /// Layout: `[format u8 = 1][mod_revision u64 BE][create_revision u64 BE][hlc u64 BE][value]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + self.value.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.mod_revision.to_be_bytes());
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(&self.hlc.to_be_bytes());
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
        if bytes[0] != FORMAT_V1 {
            return Err(StorageError::Corrupt(format!(
                "unknown stored value format {}",
                bytes[0]
            )));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        Ok(StoredValue {
            mod_revision: u64_at(1),
            create_revision: u64_at(9),
            hlc: u64_at(17),
            value: bytes[HEADER_BYTES..].to_vec(),
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
        };
        assert_eq!(StoredValue::decode(&v.encode()).unwrap(), v);
        assert!(StoredValue::decode(b"short").is_err());
        let mut bad = v.encode();
        bad[0] = 9;
        assert!(StoredValue::decode(&bad).is_err());
    }
}
