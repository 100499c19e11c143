//! A data dir written by the openraft engine (which capkv ran before raftstore) is refused
//! with a message that names it, and nothing in it changes; a data dir of an older format
//! opens only if this build upgrades it.

use capkv_server::{Node, NodeConfig};
use capkv_storage::{FjallEngine, FjallOptions, StorageEngine};
use capkv_types::NodeId;

fn config(dir: &std::path::Path) -> NodeConfig {
    let any_port = "127.0.0.1:0".parse().unwrap();
    let mut c = NodeConfig::single(NodeId(1), dir.to_path_buf(), any_port);
    c.http_listen = any_port;
    c.partitions = 2;
    c.replication_factor = 1;
    c
}

/// Rewrites the dir's recorded engine the way the openraft build wrote it: with its name,
/// or (dirs made before the field existed) without the field.
fn record_engine(dir: &std::path::Path, engine: Option<&str>) {
    let store = FjallEngine::open(dir, FjallOptions::default()).unwrap();
    let bytes = store.node_meta_get("cluster_identity").unwrap().unwrap();
    let mut identity: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let fields = identity.as_object_mut().unwrap();
    assert_eq!(fields["engine"], "raftstore");
    match engine {
        Some(name) => fields.insert("engine".into(), name.into()),
        None => fields.remove("engine"),
    };
    store
        .node_meta_put("cluster_identity", &serde_json::to_vec(&identity).unwrap())
        .unwrap();
    store.sync().unwrap();
}

/// Why a node refuses to start on `dir` (a data dir of `what`).
async fn refusal(dir: &std::path::Path, what: &str) -> String {
    match Node::start(config(dir)).await {
        Ok(node) => {
            node.shutdown().await;
            panic!("a data dir of {what} was opened");
        }
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openraft_data_dir_is_refused_with_a_clear_error() {
    for recorded in [Some("openraft"), None] {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(config(dir.path())).await.unwrap();
        node.shutdown().await;
        record_engine(dir.path(), recorded);
        let err = refusal(dir.path(), &format!("the openraft engine ({recorded:?})")).await;
        assert!(
            err.contains("holds the openraft engine's log and state")
                && err.contains("runs only raftstore"),
            "{err}"
        );
        // Refused before anything was written: the record is as it was.
        let store = FjallEngine::open(dir.path(), FjallOptions::default()).unwrap();
        let identity: serde_json::Value =
            serde_json::from_slice(&store.node_meta_get("cluster_identity").unwrap().unwrap())
                .unwrap();
        assert_eq!(
            identity.get("engine").and_then(|e| e.as_str()),
            recorded,
            "{identity}"
        );
    }
}

fn format_of(dir: &std::path::Path) -> u32 {
    let store = FjallEngine::open(dir, FjallOptions::default()).unwrap();
    let b = store.node_meta_get("format_version").unwrap().unwrap();
    u32::from_be_bytes(b.as_slice().try_into().unwrap())
}

fn set_format(dir: &std::path::Path, format: u32) {
    let store = FjallEngine::open(dir, FjallOptions::default()).unwrap();
    store
        .node_meta_put("format_version", &format.to_be_bytes())
        .unwrap();
    store.sync().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_3_and_4_are_upgraded_in_place_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(config(dir.path())).await.unwrap();
    node.shutdown().await;
    assert_eq!(format_of(dir.path()), capkv_server::node::FORMAT_VERSION);
    for old in [3, 4] {
        set_format(dir.path(), old);
        let node = Node::start(config(dir.path())).await.unwrap();
        node.shutdown().await;
        assert_eq!(
            format_of(dir.path()),
            5,
            "format {old} is marked with this build's format once open"
        );
    }
    for other in [2, 6] {
        set_format(dir.path(), other);
        let err = refusal(dir.path(), &format!("format {other}")).await;
        assert!(
            err.contains(&format!("holds on-disk format {other}")),
            "{err}"
        );
        assert_eq!(
            format_of(dir.path()),
            other,
            "refused before anything was written"
        );
    }
}
