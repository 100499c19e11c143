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
}

/// When a write applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    Always,
    /// Only if the key's mod_revision equals this.
    IfRevision(u64),
    /// Only if the key does not exist.
    IfAbsent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        condition: Condition,
    },
    Delete {
        key: Vec<u8>,
        condition: Condition,
    },
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
}
