//! Test 6: a write retried with the same (client_id, sequence) is applied once and returns
//! the original revision.

use capkv_client::Condition;

use crate::fixture::{Cluster, Opts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_write_is_applied_once() {
    let mut cluster = Cluster::start(Opts::default()).await;
    let client = cluster.client().await;
    let client_id = 0xC0FFEE;

    let first = client
        .put_idempotent("counter", "v1", Condition::Always, client_id, 1)
        .await
        .unwrap();
    assert!(first.succeeded);
    // Something else changes the key in between.
    let other = client.put("counter", "v-other").await.unwrap();
    assert!(other.revision > first.revision);

    // The retry carries a different value on purpose: if it were applied, the value would show.
    let retry = client
        .put_idempotent("counter", "v1-retry", Condition::Always, client_id, 1)
        .await
        .unwrap();
    assert_eq!(retry, first, "the retry returns the original result");
    let kv = client.get("counter").await.unwrap().unwrap();
    assert_eq!(kv.value, b"v-other", "the retry was not applied again");
    assert_eq!(kv.mod_revision, other.revision);

    // Also after the leader that applied it dies: the table is replicated state.
    let leader = cluster.leader_of(first.partition.0).await.unwrap();
    cluster.kill(leader);
    let survivors = cluster.running();
    let client = cluster.client_for(&survivors).await;
    let retry2 = client
        .put_idempotent("counter", "v1-retry2", Condition::Always, client_id, 1)
        .await
        .unwrap();
    assert_eq!(retry2.revision, first.revision);
    assert_eq!(
        client.get("counter").await.unwrap().unwrap().value,
        b"v-other"
    );

    // A new sequence number is a new write.
    let next = client
        .put_idempotent("counter", "v2", Condition::Always, client_id, 2)
        .await
        .unwrap();
    assert!(next.revision > other.revision);
    assert_eq!(client.get("counter").await.unwrap().unwrap().value, b"v2");

    // Conditional writes keep their original answer too: a failed CAS retried stays failed.
    let cas = client
        .put_idempotent("counter", "v3", Condition::IfRevision(1), client_id, 3)
        .await
        .unwrap();
    assert!(!cas.succeeded);
    client.put("counter", "v4").await.unwrap();
    let cas_retry = client
        .put_idempotent("counter", "v3", Condition::IfRevision(1), client_id, 3)
        .await
        .unwrap();
    assert_eq!(cas_retry, cas);
}
