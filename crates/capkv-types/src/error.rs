//! Errors a caller can act on, each with a stable code that travels on the wire.

use crate::ids::NodeId;

/// Stable error codes. The string form is part of the wire contract: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    InvalidArgument,
    TooLarge,
    NotLeader,
    Unavailable,
    Ambiguous,
    NotFound,
    Internal,
    SessionExpired,
    CrossPartition,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "InvalidArgument",
            ErrorCode::TooLarge => "TooLarge",
            ErrorCode::NotLeader => "NotLeader",
            ErrorCode::Unavailable => "Unavailable",
            ErrorCode::Ambiguous => "Ambiguous",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::Internal => "Internal",
            ErrorCode::SessionExpired => "SessionExpired",
            ErrorCode::CrossPartition => "CrossPartition",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        Some(match s {
            "InvalidArgument" => ErrorCode::InvalidArgument,
            "TooLarge" => ErrorCode::TooLarge,
            "NotLeader" => ErrorCode::NotLeader,
            "Unavailable" => ErrorCode::Unavailable,
            "Ambiguous" => ErrorCode::Ambiguous,
            "NotFound" => ErrorCode::NotFound,
            "Internal" => ErrorCode::Internal,
            "SessionExpired" => ErrorCode::SessionExpired,
            "CrossPartition" => ErrorCode::CrossPartition,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from a capkv operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// The request is malformed; retrying it unchanged fails again.
    #[error("InvalidArgument: {0}")]
    InvalidArgument(String),
    /// A key, value or batch is over its configured limit.
    #[error("TooLarge: {0}")]
    TooLarge(String),
    /// This node does not lead the partition. `leader` is the node it believes leads, if any.
    #[error("NotLeader: partition {partition} is led by {}", leader_display(.leader_id, .leader_addr))]
    NotLeader {
        partition: u32,
        leader_id: Option<NodeId>,
        leader_addr: Option<String>,
    },
    /// The operation certainly did not take effect (no quorum, node unreachable, overloaded).
    #[error("Unavailable: {0}")]
    Unavailable(String),
    /// The write may or may not have taken effect. Retry with the same (client_id, sequence)
    /// to learn the outcome.
    #[error("Ambiguous: {0}")]
    Ambiguous(String),
    #[error("NotFound: {0}")]
    NotFound(String),
    /// A bug or a storage failure on the server.
    #[error("Internal: {0}")]
    Internal(String),
    /// The write's client session is unknown to the partition and older than the session
    /// TTL (it may have expired there): the write certainly did not take effect. Start a
    /// new session (a new client id) to send it again; the Rust client does that itself
    /// when no earlier attempt of the write may have applied.
    #[error("SessionExpired: {0}")]
    SessionExpired(String),
    /// One command named keys of several partitions (MSET, MULTI/EXEC, RENAME): it was not
    /// applied. Keys that share a hash tag (`{tag}`) share a partition.
    #[error("CrossPartition: {0}")]
    CrossPartition(String),
}

fn leader_display(id: &Option<NodeId>, addr: &Option<String>) -> String {
    match (id, addr) {
        (Some(id), Some(addr)) => format!("node {id} at {addr}"),
        (Some(id), None) => format!("node {id}"),
        _ => "an unknown node".to_string(),
    }
}

impl KvError {
    pub fn too_large(what: &str, size: usize, max: usize) -> Self {
        KvError::TooLarge(format!("{what} is {size} bytes, the limit is {max} bytes"))
    }

    /// Builds the error for `code` from its message (the inverse of `Display` minus the
    /// code prefix). `NotLeader` gets no leader hint this way.
    pub fn from_code(code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::InvalidArgument => KvError::InvalidArgument(message),
            ErrorCode::TooLarge => KvError::TooLarge(message),
            ErrorCode::NotLeader => KvError::NotLeader {
                partition: 0,
                leader_id: None,
                leader_addr: None,
            },
            ErrorCode::Unavailable => KvError::Unavailable(message),
            ErrorCode::Ambiguous => KvError::Ambiguous(message),
            ErrorCode::NotFound => KvError::NotFound(message),
            ErrorCode::Internal => KvError::Internal(message),
            ErrorCode::SessionExpired => KvError::SessionExpired(message),
            ErrorCode::CrossPartition => KvError::CrossPartition(message),
        }
    }

    /// The message without the leading code.
    pub fn message(&self) -> String {
        let s = self.to_string();
        let prefix = format!("{}: ", self.code().as_str());
        s.strip_prefix(&prefix).map(str::to_string).unwrap_or(s)
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            KvError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            KvError::TooLarge(_) => ErrorCode::TooLarge,
            KvError::NotLeader { .. } => ErrorCode::NotLeader,
            KvError::Unavailable(_) => ErrorCode::Unavailable,
            KvError::Ambiguous(_) => ErrorCode::Ambiguous,
            KvError::NotFound(_) => ErrorCode::NotFound,
            KvError::Internal(_) => ErrorCode::Internal,
            KvError::SessionExpired(_) => ErrorCode::SessionExpired,
            KvError::CrossPartition(_) => ErrorCode::CrossPartition,
        }
    }

    /// True when sending the same request again (same idempotency pair) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            KvError::NotLeader { .. } | KvError::Unavailable(_) | KvError::Ambiguous(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_their_names() {
        for code in [
            ErrorCode::InvalidArgument,
            ErrorCode::TooLarge,
            ErrorCode::NotLeader,
            ErrorCode::Unavailable,
            ErrorCode::Ambiguous,
            ErrorCode::NotFound,
            ErrorCode::Internal,
            ErrorCode::SessionExpired,
            ErrorCode::CrossPartition,
        ] {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("Nope"), None);
    }

    #[test]
    fn messages_start_with_the_code() {
        let e = KvError::too_large("key", 5000, 4096);
        assert!(e.to_string().starts_with("TooLarge:"));
        let e = KvError::NotLeader {
            partition: 3,
            leader_id: Some(NodeId(2)),
            leader_addr: None,
        };
        assert_eq!(e.to_string(), "NotLeader: partition 3 is led by node 2");
    }
}
