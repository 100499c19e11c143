//! HTTP front end: `/metrics` (Prometheus), `/health`, `/status` (JSON), and the
//! HTTP/JSON key-value API (`/v1/kv`, `frontend::http_kv`). (Fault injection
//! is the test-only `Admin` gRPC service.)

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use capkv_types::NodeId;
use serde::Serialize;

use crate::kv::KvCore;

pub fn router(core: Arc<KvCore>, kv: Arc<crate::router::Router>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/status", get(status))
        .with_state(core)
        .merge(crate::frontend::http_kv::routes(kv))
}

async fn metrics(State(core): State<Arc<KvCore>>) -> impl IntoResponse {
    let stats = core.storage().group_commit().stats();
    core.metrics()
        .storage_fsyncs
        .set(stats.syncs.load(Ordering::Relaxed) as i64);
    core.metrics()
        .storage_fsync_requests
        .set(stats.requests.load(Ordering::Relaxed) as i64);
    core.metrics()
        .storage_poisoned
        .set(i64::from(core.storage_error().is_some()));
    {
        let engine = &core.raft_engine();
        let s = engine.stats();
        for (event, value) in [
            ("turns", s.turns),
            ("proposals", s.proposals),
            ("entries_proposed", s.entries_proposed),
            ("entries_written", s.driver.entries_written),
            ("disk_writes", s.driver.writes),
            ("fsyncs", s.driver.syncs),
            ("peer_batches_sent", s.batches_sent),
            ("messages_sent", s.messages_sent),
            ("compactions", s.compactions),
            ("leader_transfers", s.leader_transfers),
            ("groups_quiesced", s.driver.quiesced),
            ("groups_woken", s.driver.woken),
            ("lease_reads", s.lease_reads + s.lease_reads_outside),
            ("read_index_reads", s.read_index_reads),
            ("read_index_asks", s.read_index_asks),
            ("lease_renewals", s.lease_renewals),
            ("votes_held", s.driver.votes_held),
            ("snapshots_sent", s.snapshots_sent),
            ("snapshots_failed", s.snapshots_failed),
            ("snapshots_installed", s.snapshots_installed),
            (
                "snapshot_bytes_sent",
                engine.snapshots.bytes_sent.load(Ordering::Relaxed),
            ),
            (
                "snapshot_bytes_received",
                engine.snapshots.bytes_received.load(Ordering::Relaxed),
            ),
            (
                "snapshots_sending",
                engine.snapshots.sending.load(Ordering::Relaxed),
            ),
            (
                "snapshots_receiving",
                engine.snapshots.receiving.load(Ordering::Relaxed),
            ),
        ] {
            core.metrics()
                .engine_events
                .with_label_values(&[event])
                .set(value as i64);
        }
    }
    let views = core.partition_status();
    core.metrics()
        .engine_groups_asleep
        .set(views.iter().filter(|v| v.asleep).count() as i64);
    for v in views {
        if v.role.is_empty() {
            continue;
        }
        let p = v.id.0.to_string();
        let l = [p.as_str()];
        core.metrics()
            .raft_term
            .with_label_values(&l)
            .set(v.term as i64);
        core.metrics()
            .raft_last_log_index
            .with_label_values(&l)
            .set(v.last_log_index as i64);
        core.metrics()
            .raft_commit_index
            .with_label_values(&l)
            .set(v.commit_index as i64);
        core.metrics()
            .raft_applied_index
            .with_label_values(&l)
            .set(v.applied_index as i64);
        core.metrics()
            .raft_is_leader
            .with_label_values(&l)
            .set(i64::from(v.leader == Some(core.id())));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        core.metrics().render(),
    )
}

#[derive(Serialize)]
struct Health {
    /// "ok", or "storage-poisoned" (with `storage_error`) once a failed fsync poisoned it.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    storage_error: Option<String>,
    node_id: NodeId,
    replicas: usize,
    replicas_with_leader: usize,
}

async fn health(State(core): State<Arc<KvCore>>) -> impl IntoResponse {
    let views = core.partition_status();
    let hosted: Vec<_> = views.iter().filter(|v| !v.role.is_empty()).collect();
    let with_leader = hosted.iter().filter(|v| v.leader.is_some()).count();
    let storage_error = core.storage_error();
    let code = if storage_error.is_some() {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        axum::http::StatusCode::OK
    };
    let health = Json(Health {
        status: if storage_error.is_some() {
            "storage-poisoned"
        } else {
            "ok"
        },
        storage_error,
        node_id: core.id(),
        replicas: hosted.len(),
        replicas_with_leader: with_leader,
    });
    (code, health)
}

async fn status(State(core): State<Arc<KvCore>>) -> impl IntoResponse {
    Json(serde_json::json!({
        "node_id": core.id(),
        "partition_count": core.map().partition_count,
        "replication_factor": core.map().replication_factor,
        "nodes": core.map().nodes,
        "partitions": core.partition_status(),
        "read_policy": core.read_policy().name(),
        "lease_read_ms": core.lease_read().as_millis() as u64,
        "vote_hold_remaining_ms": core.vote_hold_remaining_ms(),
        "storage_error": core.storage_error(),
    }))
}
