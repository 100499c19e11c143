//! openraft's storage test suite, run against capkv's log store and state machine over
//! the real fjall engine.

use std::sync::Arc;

use capkv_replication::log_store::LogStore;
use capkv_replication::state_machine::StateMachine;
use capkv_replication::TypeConfig;
use capkv_storage::{FjallEngine, FjallOptions, StorageEngine};
use capkv_types::{Hlc, PartitionId};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine: Arc<dyn StorageEngine> =
            Arc::new(FjallEngine::open(dir.path(), FjallOptions::default()).expect("open engine"));
        // A non-zero partition id, so a key encoding that ignored partitions would show.
        let p = PartitionId(3);
        let log = LogStore::new(engine.clone(), p);
        let sm = StateMachine::open(engine, p, Arc::new(Hlc::new()), 100).expect("open sm");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capkv_storage_passes_openraft_suite() {
    Suite::test_all(Builder)
        .await
        .expect("openraft storage suite");
}
