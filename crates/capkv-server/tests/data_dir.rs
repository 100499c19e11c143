//! A data dir written by the openraft engine (which capkv ran before raftstore) is refused
//! with a message that names it, and nothing in it changes.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openraft_data_dir_is_refused_with_a_clear_error() {
    for recorded in [Some("openraft"), None] {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(config(dir.path())).await.unwrap();
        node.shutdown().await;
        record_engine(dir.path(), recorded);
        let err = match Node::start(config(dir.path())).await {
            Ok(node) => {
                node.shutdown().await;
                panic!("a data dir of the openraft engine ({recorded:?}) was opened");
            }
            Err(e) => format!("{e:#}"),
        };
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
