//! Generated gRPC code. `kv` is the public client API; `raft` is node-to-node traffic.

#![allow(clippy::all, missing_docs)]

pub mod kv {
    tonic::include_proto!("capkv.v1");
}

pub mod raft {
    tonic::include_proto!("capkv.raft.v1");
}

/// Wire-compatible subset of etcd's v3 KV API (for benchmarking against etcd).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

pub mod status;
