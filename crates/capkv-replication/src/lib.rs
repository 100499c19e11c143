//! The state machine every partition replica runs, shared by the replication engine
//! (`capkv-raftstore`, driven by `capkv-server`):
//!
//! - [`types`]: the replicated commands and their answers.
//! - [`apply`]: executes commands (conditions, MVCC revisions, HLC stamps, client
//!   sessions) into storage writes.
//! - [`sessions`]: the at-most-once table of client sessions.
//! - [`codec`]: postcard encoding of these values for the log and the wire.
//! - [`faults`]: the test-only fault injector (drop traffic to/from chosen peers).

pub mod apply;
pub mod codec;
pub mod faults;
pub mod sessions;
pub mod types;

pub use apply::{format_float, parse_float, parse_i64};
pub use apply::{AppliedIndex, KeyCounts};
pub use faults::Faults;
pub use types::{
    Command, CommandResponse, Condition, ExpireWhen, Expiry, Idempotency, Op, Rejection,
    StepAnswer, Update, TXN_ANSWER_BYTES_MAX,
};
