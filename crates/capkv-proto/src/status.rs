//! `KvError` <-> gRPC status. The stable code travels in the status details as an
//! encoded `ErrorDetail`, so clients never parse messages.

use capkv_types::{ErrorCode, KvError, NodeId};
use prost::Message;
use tonic::{Code, Status};

use crate::kv::ErrorDetail;

pub fn to_status(e: &KvError) -> Status {
    let code = match e.code() {
        ErrorCode::InvalidArgument | ErrorCode::TooLarge | ErrorCode::CrossPartition => {
            Code::InvalidArgument
        }
        ErrorCode::NotLeader => Code::FailedPrecondition,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Ambiguous => Code::Unknown,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::SessionExpired => Code::FailedPrecondition,
        _ => Code::Internal,
    };
    let mut detail = ErrorDetail {
        code: e.code().as_str().to_string(),
        message: e.message(),
        ..Default::default()
    };
    if let KvError::NotLeader {
        partition,
        leader_id,
        leader_addr,
    } = e
    {
        detail.partition_id = *partition;
        detail.leader_id = leader_id.map(|n| n.0).unwrap_or(0);
        detail.leader_addr = leader_addr.clone().unwrap_or_default();
    }
    Status::with_details(code, e.to_string(), detail.encode_to_vec().into())
}

/// The inverse of [`to_status`]. Statuses without capkv details (raised by the gRPC stack
/// itself) are mapped by their gRPC code; one whose outcome cannot be known is `Ambiguous`.
pub fn from_status(s: &Status) -> KvError {
    if !s.details().is_empty() {
        if let Ok(d) = ErrorDetail::decode(s.details()) {
            if let Some(code) = ErrorCode::parse(&d.code) {
                if code == ErrorCode::NotLeader {
                    return KvError::NotLeader {
                        partition: d.partition_id,
                        leader_id: (d.leader_id != 0).then_some(NodeId(d.leader_id)),
                        leader_addr: (!d.leader_addr.is_empty()).then_some(d.leader_addr),
                    };
                }
                return KvError::from_code(code, d.message);
            }
        }
    }
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => {
            KvError::InvalidArgument(s.message().to_string())
        }
        Code::ResourceExhausted => {
            KvError::Unavailable(format!("resource exhausted: {}", s.message()))
        }
        Code::Unavailable => KvError::Unavailable(s.message().to_string()),
        Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            KvError::Ambiguous(s.message().to_string())
        }
        _ => KvError::Internal(format!("{:?}: {}", s.code(), s.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        let cases = [
            KvError::InvalidArgument("key must not be empty".into()),
            KvError::too_large("value", 2_000_000, 1_048_576),
            KvError::NotLeader {
                partition: 3,
                leader_id: Some(NodeId(2)),
                leader_addr: Some("127.0.0.1:7380".into()),
            },
            KvError::NotLeader {
                partition: 1,
                leader_id: None,
                leader_addr: None,
            },
            KvError::Unavailable("no quorum".into()),
            KvError::Ambiguous("timed out".into()),
            KvError::Internal("bug".into()),
        ];
        for e in cases {
            assert_eq!(from_status(&to_status(&e)), e);
        }
    }

    #[test]
    fn plain_grpc_statuses_map_by_code() {
        assert_eq!(
            from_status(&Status::unavailable("conn refused")).code(),
            ErrorCode::Unavailable
        );
        assert_eq!(
            from_status(&Status::deadline_exceeded("slow")).code(),
            ErrorCode::Ambiguous
        );
        assert_eq!(
            from_status(&Status::invalid_argument("bad")).code(),
            ErrorCode::InvalidArgument
        );
    }
}
