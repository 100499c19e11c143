//! Cluster tests: real `capkv server` processes on loopback, killed, paused, cut off and
//! restarted. Every wait is on a condition with a deadline.

mod fixture;

mod bad_input;
mod basic;
mod bench;
mod bounded;
mod check;
mod crash;
mod disk;
mod failover;
mod frontends;
mod idempotency;
mod isolation;
mod readme;
mod restart;
mod session;
mod small;
mod snapshot;
