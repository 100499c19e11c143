//! The commands replicated through each partition's log, and their answers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Makes a command idempotent: it belongs to client session `client_id` (never 0), which
/// started at cluster HLC time `session_started_ms`; `sequence` numbers the session's
/// writes, and every sequence below `first_incomplete` has had its answer (see
/// `sessions.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Idempotency {
    pub client_id: u64,
    pub sequence: u64,
    pub session_started_ms: u64,
    pub first_incomplete: u64,
}

/// Why the state machine refused a command without applying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// The client session is unknown here and started over a session TTL ago: it may
    /// have expired, so a retry cannot be told from a new write.
    SessionExpired,
    /// The client already had the answer to this sequence (a delayed duplicate).
    StaleSequence,
    /// The session has too many unanswered writes in this partition.
    TooManyPending,
    /// `first_incomplete` above the request's own sequence.
    BadSequence,
    /// The session's start time is more than a TTL ahead of the log's clock, or differs
    /// from the one the table holds for this client id.
    BadSession,
    /// An update found a value that is not a 64-bit integer.
    NotAnInteger,
    /// An update found a value that is not a finite float.
    NotAFloat,
    /// An update's result would be larger than the value limit.
    ValueTooLarge,
    /// The key a command needs does not exist (RENAME).
    NoSuchKey,
    /// A transaction's step whose answer could take the transaction's answers past
    /// [`TXN_ANSWER_BYTES_MAX`]: not run.
    AnswersTooLarge,
    /// An integer update's result is outside the signed 64-bit range (format 5).
    Overflow,
    /// A float update's result is NaN or infinite (format 5).
    NotFinite,
}

/// A transaction's steps answer values up to this many bytes in all; a step that could
/// answer past it (a GET, GETSET, APPEND, ... counted from the state before it runs) is
/// refused with [`Rejection::AnswersTooLarge`] and does not run. The answer is kept in the
/// session table until the client has it, and travels as one message.
pub const TXN_ANSWER_BYTES_MAX: usize = 8 << 20;

/// When a write applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    Always,
    /// Only if the key's mod_revision equals this.
    IfRevision(u64),
    /// Only if the key does not exist.
    IfAbsent,
    /// Only if the key exists.
    IfExists,
}

/// A key's expiry as a command gives it. Relative times count from the entry's own HLC
/// stamp, so every replica computes the same absolute time (cluster time, HLC physical ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expiry {
    /// No expiry (a plain SET, PERSIST).
    Never,
    /// The key's current expiry (KEEPTTL; what INCR and APPEND do).
    Keep,
    /// This many ms after the entry's time (EX, PX).
    In(u64),
    /// At this cluster time in ms (EXAT, PXAT).
    At(u64),
}

/// EXPIRE's conditions (Redis 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpireWhen {
    Always,
    /// Only if the key has no expiry.
    Nx,
    /// Only if the key has an expiry.
    Xx,
    /// Only if the new expiry is later (no expiry counts as infinitely late).
    Gt,
    /// Only if the new expiry is earlier.
    Lt,
}

/// A read-modify-write of one key, evaluated by the state machine as one command: atomic,
/// and applied at most once with the idempotency pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Update {
    /// Sets the value if `condition` holds, with `expiry`; answers the previous value
    /// (GETSET, SET with GET or an expiry option).
    Swap {
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        condition: Condition,
        expiry: Expiry,
    },
    /// Sets the key's expiry if it exists and `when` holds (EXPIRE and its kin); an expiry
    /// at or before the entry's time deletes the key. `succeeded` says whether it was set.
    Expire { expiry: Expiry, when: ExpireWhen },
    /// Answers the value and sets the expiry (GETEX; `Expiry::Never` is PERSIST).
    GetEx { expiry: Expiry },
    /// Deletes the key; answers its value (GETDEL).
    Take,
    /// Adds to the value read as a signed 64-bit decimal (absent = 0); answers the new value.
    IncrBy(i64),
    /// Adds to the value read as a decimal float (absent = 0); the increment as given
    /// (parsed by the state machine, so every replica computes the same); answers the new
    /// value.
    IncrByFloat(String),
    /// Appends bytes (absent = empty); answers the new value.
    Append(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Overwrites bytes from `offset`, padding with zero bytes; answers the new value.
    SetRange {
        offset: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        condition: Condition,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        condition: Condition,
    },
    /// A read-modify-write of `key`. `value_bytes_max` is the leader's value limit when it
    /// proposed it: a result above it is refused alike on every replica.
    Update {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        update: Update,
        value_bytes_max: u64,
    },
    /// Puts several keys of one partition together; with `if_all_absent` only if none of
    /// them exists (MSET, MSETNX). `succeeded` says whether they were written.
    PutMany {
        kvs: Vec<(Vec<u8>, Vec<u8>)>,
        if_all_absent: bool,
    },
    /// Reads `key` (inside a `Txn`, at its place among the steps).
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Deletes each key whose stored version has this mod_revision and has expired at the
    /// entry's time: the leader's background removal of expired keys (a key written again
    /// since is left alone). `current_revision` answers how many were deleted.
    Reap { keys: Vec<(Vec<u8>, u64)> },
    /// Moves `from`'s value (and expiry) to `to`, replacing it, or with `if_absent` only if
    /// `to` does not exist (RENAME, RENAMENX; both keys in one partition). Refused with
    /// `NoSuchKey` when `from` does not exist.
    Rename {
        #[serde(with = "serde_bytes")]
        from: Vec<u8>,
        #[serde(with = "serde_bytes")]
        to: Vec<u8>,
        if_absent: bool,
    },
    /// A transaction of one partition (MULTI/EXEC): if every guard holds (the key's
    /// mod_revision is as given, 0 = absent; WATCH), runs the steps in order as one command,
    /// each answered in `CommandResponse::steps`; a step's refusal does not stop the others
    /// (as in Redis). `succeeded` says whether the guards held. No step is a `Txn`.
    Txn {
        guards: Vec<(Vec<u8>, u64)>,
        steps: Vec<Op>,
    },
}

impl Op {
    /// The keys the command writes (every one in the command's partition).
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } | Op::Update { key, .. } => {
                vec![key.as_slice()]
            }
            Op::PutMany { kvs, .. } => kvs.iter().map(|(k, _)| k.as_slice()).collect(),
            Op::Get { key } => vec![key.as_slice()],
            Op::Reap { keys } => keys.iter().map(|(k, _)| k.as_slice()).collect(),
            Op::Rename { from, to, .. } => vec![from.as_slice(), to.as_slice()],
            Op::Txn { guards, steps } => guards
                .iter()
                .map(|(k, _)| k.as_slice())
                .chain(steps.iter().flat_map(Op::keys))
                .collect(),
        }
    }
}

/// A write, as proposed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// HLC time at the leader when proposed; the state machine raises it if needed so that
    /// stamps increase along the log.
    pub hlc: u64,
    pub idempotency: Option<Idempotency>,
    pub op: Op,
}

impl fmt::Display for Command {
    // Never print user keys or values: logs must not leak data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.op {
            Op::Put { .. } => "put",
            Op::Delete { .. } => "delete",
            Op::Update { .. } => "update",
            Op::PutMany { .. } => "put-many",
            Op::Get { .. } => "get",
            Op::Reap { .. } => "reap",
            Op::Rename { .. } => "rename",
            Op::Txn { .. } => "txn",
        };
        match self.idempotency {
            Some(i) => write!(f, "{kind}(client={}, seq={})", i.client_id, i.sequence),
            None => write!(f, "{kind}"),
        }
    }
}

/// The result of applying a command (or the original result, for a retried one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// The command's revision: the next value of the partition's write counter.
    pub revision: u64,
    /// The log index of the entry that carried the command, set where it is applied. Not
    /// kept in the session table (a deduplicated answer has 0).
    #[serde(skip)]
    pub log_index: u64,
    pub hlc: u64,
    /// Put: the condition held and the value was written. Delete: the key existed, the
    /// condition held, and it was deleted.
    pub succeeded: bool,
    /// The key's mod_revision when the command was evaluated (0 = absent).
    pub current_revision: u64,
    /// True when this is the stored answer to an earlier, identical request.
    pub deduplicated: bool,
    /// Set when the command was refused and not applied.
    pub rejected: Option<Rejection>,
    /// An update's answer: the previous value (`Swap`, `Take`) or the new one; a `Get`'s
    /// value.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// A `Txn`'s answer to each step (empty when its guards did not hold).
    pub steps: Vec<StepAnswer>,
}

/// One step's answer in a transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepAnswer {
    pub succeeded: bool,
    pub current_revision: u64,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub rejected: Option<Rejection>,
    /// A `Get`'s key expiry (0 = never).
    pub expires_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes of `Op::Put` and `CommandResponse` as logs, session tables and peers of
    /// format 3 wrote them, before byte fields were encoded as byte strings.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum OldOp {
        Put {
            key: Vec<u8>,
            value: Vec<u8>,
            condition: Condition,
        },
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct OldResponse {
        revision: u64,
        hlc: u64,
        succeeded: bool,
        current_revision: u64,
        deduplicated: bool,
        rejected: Option<Rejection>,
        value: Option<Vec<u8>>,
        steps: Vec<StepAnswer>,
    }

    #[test]
    fn byte_fields_encode_as_they_did_as_sequences() {
        let key = b"user:1".to_vec();
        let value: Vec<u8> = (0..=255u8).chain(0..44).collect();
        let new = Op::Put {
            key: key.clone(),
            value: value.clone(),
            condition: Condition::IfRevision(300),
        };
        let old = OldOp::Put {
            key,
            value: value.clone(),
            condition: Condition::IfRevision(300),
        };
        let bytes = postcard::to_stdvec(&old).unwrap();
        assert_eq!(postcard::to_stdvec(&new).unwrap(), bytes);
        assert_eq!(postcard::from_bytes::<Op>(&bytes).unwrap(), new);

        let answer = CommandResponse {
            revision: 5,
            log_index: 0,
            hlc: 9,
            succeeded: true,
            current_revision: 7,
            deduplicated: false,
            rejected: None,
            value: Some(value.clone()),
            steps: vec![StepAnswer {
                value: Some(vec![1, 2, 3]),
                ..Default::default()
            }],
        };
        let old = OldResponse {
            revision: 5,
            hlc: 9,
            succeeded: true,
            current_revision: 7,
            deduplicated: false,
            rejected: None,
            value: Some(value),
            steps: answer.steps.clone(),
        };
        let bytes = postcard::to_stdvec(&old).unwrap();
        assert_eq!(postcard::to_stdvec(&answer).unwrap(), bytes);
        assert_eq!(
            postcard::from_bytes::<CommandResponse>(&bytes).unwrap(),
            answer
        );
    }
}
