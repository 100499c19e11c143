//! A capkv node: one storage engine, one Raft group per hosted partition, and the front
//! ends (gRPC for clients and peers on one port, HTTP for metrics/health/admin).
//!
//! Layering: [`kv::KvCore`] holds the request logic in capkv's own types (routing,
//! leadership, consistency levels, validation); [`grpc`] and [`http`] only translate.

pub mod admin;
pub mod config;
pub mod engine;
pub mod frontend;
pub mod grpc;
pub mod http;
pub mod kv;
pub mod metrics;
pub mod node;
pub mod read_plan;
pub mod router;
pub mod transport;

pub use config::{NodeConfig, PlantedBug, ReadPolicyChoice};
pub use node::Node;
