//! Generated gRPC code. `kv` is the public client API; `raft` is node-to-node traffic;
//! `admin` is test-only fault injection.

#![allow(clippy::all, missing_docs)]

pub mod kv {
    tonic::include_proto!("capkv.v1");
}

pub mod raft {
    tonic::include_proto!("capkv.raft.v1");
}

/// Test-only fault injection (refused unless the node runs with --unsafe-fault-injection).
pub mod admin {
    tonic::include_proto!("capkv.admin.v1");
}

/// Wire-compatible subset of etcd's v3 KV API (for benchmarking against etcd).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

pub mod consistency;
pub mod status;
