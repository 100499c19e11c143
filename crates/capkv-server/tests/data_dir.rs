//! A data dir keeps the replication engine it was made with: a node started on it with the
//! other engine refuses to start, with a message naming both, and nothing in it changes.

use capkv_server::config::EngineChoice;
use capkv_server::{Node, NodeConfig};
use capkv_types::NodeId;

fn config(dir: &std::path::Path, engine: EngineChoice) -> NodeConfig {
    let any_port = "127.0.0.1:0".parse().unwrap();
    let mut c = NodeConfig::single(NodeId(1), dir.to_path_buf(), any_port);
    c.http_listen = any_port;
    c.partitions = 2;
    c.replication_factor = 1;
    c.engine = engine;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_is_refused_by_the_other_engine() {
    for (made_by, started_with) in [
        (EngineChoice::Openraft, EngineChoice::Raftstore),
        (EngineChoice::Raftstore, EngineChoice::Openraft),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(config(dir.path(), made_by)).await.unwrap();
        node.shutdown().await;
        let err = match Node::start(config(dir.path(), started_with)).await {
            Ok(node) => {
                node.shutdown().await;
                panic!(
                    "a {} data dir was opened by {}",
                    made_by.name(),
                    started_with.name()
                );
            }
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&format!("engine: \"{}\"", made_by.name()))
                && err.contains(&format!("engine: \"{}\"", started_with.name())),
            "{err}"
        );
        // The dir still opens with the engine that made it.
        let node = Node::start(config(dir.path(), made_by)).await.unwrap();
        node.shutdown().await;
    }
}
