//! HTTP front end: `/metrics` (Prometheus), `/health`, `/status` (JSON) and, only with
//! `--unsafe-fault-injection`, `/debug/faults`.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use capkv_types::NodeId;
use serde::{Deserialize, Serialize};

use crate::kv::KvCore;

pub fn router(core: Arc<KvCore>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/debug/faults", get(get_faults).post(set_faults))
        .with_state(core)
}

async fn metrics(State(core): State<Arc<KvCore>>) -> impl IntoResponse {
    let stats = core.engine.group_commit().stats();
    core.metrics
        .storage_fsyncs
        .set(stats.syncs.load(Ordering::Relaxed) as i64);
    core.metrics
        .storage_fsync_requests
        .set(stats.requests.load(Ordering::Relaxed) as i64);
    for v in core.partition_status() {
        if v.role.is_empty() {
            continue;
        }
        let p = v.id.0.to_string();
        let l = [p.as_str()];
        core.metrics
            .raft_term
            .with_label_values(&l)
            .set(v.term as i64);
        core.metrics
            .raft_last_log_index
            .with_label_values(&l)
            .set(v.last_log_index as i64);
        core.metrics
            .raft_commit_index
            .with_label_values(&l)
            .set(v.commit_index as i64);
        core.metrics
            .raft_applied_index
            .with_label_values(&l)
            .set(v.applied_index as i64);
        core.metrics
            .raft_is_leader
            .with_label_values(&l)
            .set(i64::from(v.leader == Some(core.id)));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        core.metrics.render(),
    )
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    node_id: NodeId,
    replicas: usize,
    replicas_with_leader: usize,
}

async fn health(State(core): State<Arc<KvCore>>) -> impl IntoResponse {
    let views = core.partition_status();
    let hosted: Vec<_> = views.iter().filter(|v| !v.role.is_empty()).collect();
    let with_leader = hosted.iter().filter(|v| v.leader.is_some()).count();
    Json(Health {
        status: "ok",
        node_id: core.id,
        replicas: hosted.len(),
        replicas_with_leader: with_leader,
    })
}

async fn status(State(core): State<Arc<KvCore>>) -> impl IntoResponse {
    Json(serde_json::json!({
        "node_id": core.id,
        "partition_count": core.map.partition_count,
        "replication_factor": core.map.replication_factor,
        "nodes": core.map.nodes,
        "partitions": core.partition_status(),
        "read_policy": core.read_policy.name(),
        "lease_read_ms": core.lease_read.as_millis() as u64,
        "vote_hold_remaining_ms": core.vote_hold_remaining_ms(),
    }))
}

#[derive(Serialize, Deserialize)]
struct FaultsBody {
    blocked: BTreeSet<u64>,
}

async fn get_faults(State(core): State<Arc<KvCore>>) -> impl IntoResponse {
    Json(FaultsBody {
        blocked: core.faults.blocked().into_iter().map(|n| n.0).collect(),
    })
}

async fn set_faults(
    State(core): State<Arc<KvCore>>,
    Json(body): Json<FaultsBody>,
) -> impl IntoResponse {
    let peers = body.blocked.iter().map(|n| NodeId(*n)).collect();
    match core.faults.set_blocked(peers) {
        Ok(()) => {
            tracing::warn!(node = core.id.0, blocked = ?body.blocked, "fault injection: blocking raft traffic");
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(msg) => (StatusCode::FORBIDDEN, msg).into_response(),
    }
}
