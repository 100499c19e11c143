//! The retry policy of one operation, without IO: what a failed attempt means (retry now
//! at a named leader, retry after backoff, or stop) and, for a write, whether any attempt
//! may have applied it. Shared by [`crate::Client`] and the server's request router.

use std::time::Duration;

use capkv_proto::status::from_status;
use capkv_types::{KvError, NodeId};

/// Where an attempt's failure leaves a write.
pub fn may_have_applied(status: &tonic::Status, err: &KvError) -> bool {
    match err {
        // Errors a capkv node raised on purpose say exactly whether anything happened.
        KvError::NotLeader { .. }
        | KvError::InvalidArgument(_)
        | KvError::TooLarge(_)
        | KvError::SessionExpired(_)
        | KvError::CrossPartition(_) => false,
        KvError::Unavailable(_) => status.details().is_empty(),
        _ => true,
    }
}

/// How one attempt ended.
#[derive(Debug)]
pub enum Attempt {
    /// The node answered with an error.
    Failed(tonic::Status),
    /// No answer within the attempt's time.
    TimedOut { addr: String, budget: Duration },
}

/// What the retry loop does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Try again; first back off unless `now`; forget the partition's cached leader unless
    /// a new one is named in `leader`.
    Retry { now: bool, leader: LeaderUpdate },
    /// Stop with this error.
    Fail(KvError),
}

#[derive(Debug, PartialEq, Eq)]
pub enum LeaderUpdate {
    Forget,
    Set {
        partition: u32,
        leader: Option<NodeId>,
        addr: Option<String>,
    },
}

/// The retry policy, without IO: what a failed attempt means for the operation.
///
/// Invariant 8 lives here: once any attempt of a write may have applied it
/// (`maybe_applied`), the operation's outcome can only be success (a later attempt's
/// answer, deduplicated by the idempotency pair) or `Ambiguous`, never a definite failure.
#[derive(Debug)]
pub struct RetryPolicy {
    is_write: bool,
    pub(crate) maybe_applied: bool,
    last_err: KvError,
}

impl RetryPolicy {
    pub fn new(is_write: bool) -> Self {
        RetryPolicy {
            is_write,
            maybe_applied: false,
            last_err: KvError::Unavailable("no attempt was made".into()),
        }
    }

    pub fn after(&mut self, attempt: Attempt) -> Next {
        let err = match attempt {
            Attempt::TimedOut { addr, budget } => {
                self.maybe_applied |= self.is_write;
                self.last_err = KvError::Unavailable(format!(
                    "{addr} did not answer within {} ms",
                    budget.as_millis()
                ));
                return Next::Retry {
                    now: false,
                    leader: LeaderUpdate::Forget,
                };
            }
            Attempt::Failed(status) => {
                let err = from_status(&status);
                self.maybe_applied |= self.is_write && may_have_applied(&status, &err);
                err
            }
        };
        let next = match &err {
            KvError::NotLeader {
                partition,
                leader_id,
                leader_addr,
            } => Next::Retry {
                now: leader_id.is_some(),
                leader: LeaderUpdate::Set {
                    partition: *partition,
                    leader: *leader_id,
                    addr: leader_addr.clone(),
                },
            },
            KvError::Unavailable(_) | KvError::Ambiguous(_) => Next::Retry {
                now: false,
                leader: LeaderUpdate::Forget,
            },
            _ => Next::Fail(self.outcome_with(err.clone())),
        };
        self.last_err = err;
        next
    }

    /// The error to report when retrying stops (deadline passed).
    pub fn give_up(self) -> KvError {
        let last = self.last_err.clone();
        self.outcome_with(last)
    }

    fn outcome_with(&self, err: KvError) -> KvError {
        if self.maybe_applied && !matches!(err, KvError::Ambiguous(_)) {
            KvError::Ambiguous(format!(
                "the write may or may not have been applied (an earlier attempt got no answer); \
                 the last attempt failed with: {err}"
            ))
        } else {
            err
        }
    }
}
