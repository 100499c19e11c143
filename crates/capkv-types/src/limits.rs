//! Limits on client input, checked at the edge before anything reaches Raft.

use crate::error::KvError;

/// Size limits. Every front end validates with the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    /// Largest `limit` a single scan request may ask for.
    pub scan_limit_max: u32,
    /// A scan page stops growing once its keys and values reach this many bytes.
    pub scan_page_bytes_max: usize,
    /// Most keys one command may name (MSET, MGET, DEL of many keys).
    pub batch_keys_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_bytes_max: 4 * 1024,
            value_bytes_max: 1024 * 1024,
            scan_limit_max: 10_000,
            scan_page_bytes_max: 4 * 1024 * 1024,
            batch_keys_max: 1000,
        }
    }
}

impl Limits {
    pub fn check_key(&self, key: &[u8]) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::InvalidArgument("key must not be empty".into()));
        }
        if key.len() > self.key_bytes_max {
            return Err(KvError::too_large("key", key.len(), self.key_bytes_max));
        }
        Ok(())
    }

    pub fn check_value(&self, value: &[u8]) -> Result<(), KvError> {
        if value.len() > self.value_bytes_max {
            return Err(KvError::too_large(
                "value",
                value.len(),
                self.value_bytes_max,
            ));
        }
        Ok(())
    }

    /// Bytes a gRPC message may have to carry a maximal key and value plus framing.
    pub fn message_bytes_max(&self) -> usize {
        (self.key_bytes_max + self.value_bytes_max + 64 * 1024).max(4 * 1024 * 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn rejects_empty_and_oversized_input() {
        let limits = Limits::default();
        assert_eq!(
            limits.check_key(b"").unwrap_err().code(),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            limits.check_key(&[b'k'; 5 * 1024]).unwrap_err().code(),
            ErrorCode::TooLarge
        );
        assert!(limits.check_key(&[b'k'; 4 * 1024]).is_ok());
        assert!(limits.check_value(&vec![0u8; 1024 * 1024]).is_ok());
        assert_eq!(
            limits
                .check_value(&vec![0u8; 1024 * 1024 + 1])
                .unwrap_err()
                .code(),
            ErrorCode::TooLarge
        );
    }
}
