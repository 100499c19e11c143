//! Jepsen-style checking of capkv: concurrent clients record every operation while a
//! nemesis injects real faults (partitions, SIGKILL, SIGSTOP); checkers then decide whether
//! what the clients saw is consistent.
//!
//! - [`history`]: the recorded events (JSON lines) and their pairing into operations.
//! - [`linearizability`]: a Wing–Gong–Lowe checker for registers with unknown outcomes,
//!   a time/size budget, and counterexample shrinking.
//! - [`sets`]: the lost-write checker of the append-set workload.
//! - [`workload`], [`nemesis`], [`cluster`], [`runner`]: running a check.

pub mod bounded;
pub mod cluster;
pub mod convergence;
pub mod history;
pub mod linearizability;
pub mod nemesis;
pub mod prefix;
pub mod runner;
pub mod session;
pub mod sets;
pub mod workload;

pub use runner::{run, CheckOptions, Outcome, Protocol};
