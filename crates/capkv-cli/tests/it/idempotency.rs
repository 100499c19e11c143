//! Test 6: a write retried with the same (client_id, sequence) is applied once and returns
//! the original revision.

use capkv_client::{Condition, WriteResult};

use crate::fixture::{wait_until, Cluster, Opts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_write_is_applied_once() {
    let mut cluster = Cluster::start(Opts::default()).await;
    let client = cluster.client().await;
    let client_id = 0xC0FFEE;
    let key = |seq| client.idempotency_key(client_id, seq);
    let (k1, k2, k3) = (key(1), key(2), key(3));

    let first = client
        .put_idempotent("counter", "v1", Condition::Always, k1)
        .await
        .unwrap();
    assert!(first.succeeded);
    // Something else changes the key in between.
    let other = client.put("counter", "v-other").await.unwrap();
    assert!(other.revision > first.revision);

    // The retry carries a different value on purpose: if it were applied, the value would show.
    let retry = client
        .put_idempotent("counter", "v1-retry", Condition::Always, k1)
        .await
        .unwrap();
    // The original result; only where it sits in the log is not stored with it.
    assert!(first.log_position > 0);
    assert_eq!(retry.log_position, 0, "{retry:?}");
    assert_eq!(
        WriteResult {
            log_position: first.log_position,
            ..retry
        },
        first,
        "the retry returns the original result"
    );
    let kv = client.get("counter").await.unwrap().unwrap();
    assert_eq!(kv.value, b"v-other", "the retry was not applied again");
    assert_eq!(kv.mod_revision, other.revision);

    // Also after the leader that applied it dies: the table is replicated state.
    let leader = cluster.leader_of(first.partition.0).await.unwrap();
    cluster.kill(leader);
    let survivors = cluster.running();
    let client = cluster.client_for(&survivors).await;
    let retry2 = client
        .put_idempotent("counter", "v1-retry2", Condition::Always, k1)
        .await
        .unwrap();
    assert_eq!(retry2.revision, first.revision);
    assert_eq!(
        client.get("counter").await.unwrap().unwrap().value,
        b"v-other"
    );

    // A new sequence number is a new write.
    let next = client
        .put_idempotent("counter", "v2", Condition::Always, k2)
        .await
        .unwrap();
    assert!(next.revision > other.revision);
    assert_eq!(client.get("counter").await.unwrap().unwrap().value, b"v2");

    // Conditional writes keep their original answer too: a failed CAS retried stays failed.
    let cas = client
        .put_idempotent("counter", "v3", Condition::IfRevision(1), k3)
        .await
        .unwrap();
    assert!(!cas.succeeded);
    client.put("counter", "v4").await.unwrap();
    let cas_retry = client
        .put_idempotent("counter", "v3", Condition::IfRevision(1), k3)
        .await
        .unwrap();
    assert_eq!(
        WriteResult {
            log_position: cas.log_position,
            ..cas_retry
        },
        cas
    );
}

/// `count` keys that hash to partition `p` (of `partitions`).
fn keys_in_partition(p: u32, partitions: u32, count: usize, tag: &str) -> Vec<String> {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .filter(|k| capkv_types::partition_for_key(k.as_bytes(), partitions).0 == p)
        .take(count)
        .collect()
}

/// The hole in the old table (a FIFO of 10,000 pairs per partition): a retry that arrived
/// after 10,000 other idempotent writes to its partition was applied again, so a put
/// resurrected an overwritten value and a CAS that had succeeded answered "failed". With
/// per-client sessions, other clients' writes never push an answer out. Failed on the old
/// table: the replay wrote "v1" back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_many_other_writes_is_still_not_applied_again() {
    let cluster = Cluster::start(Opts::default()).await;
    let client = cluster.client().await;
    let retrier = 0x5E55_1011;
    let (k1, k2) = (
        client.idempotency_key(retrier, 1),
        client.idempotency_key(retrier, 2),
    );
    let first = client
        .put_idempotent("resurrect", "v1", Condition::Always, k1)
        .await
        .unwrap();
    let cas = client
        .put_idempotent("cas-once", "a", Condition::IfAbsent, k2)
        .await
        .unwrap();
    assert!(first.succeeded && cas.succeeded);
    client.put("resurrect", "v2").await.unwrap();

    // 10,001 idempotent writes to both keys' partitions (more than the old table held).
    let mut keys = keys_in_partition(first.partition.0, cluster.partitions, 10_001, "flood");
    if cas.partition != first.partition {
        keys.extend(keys_in_partition(
            cas.partition.0,
            cluster.partitions,
            10_001,
            "flood-cas",
        ));
    }
    let keys = std::sync::Arc::new(keys);
    let mut tasks = Vec::new();
    for t in 0..32usize {
        let (client, keys) = (client.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            for k in keys.iter().skip(t).step_by(32) {
                client.put(k.clone(), "x").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let replay = client
        .put_idempotent("resurrect", "v1", Condition::Always, k1)
        .await
        .unwrap();
    assert_eq!(
        replay.revision, first.revision,
        "the replay gets the original answer"
    );
    assert_eq!(
        client.get("resurrect").await.unwrap().unwrap().value,
        b"v2",
        "the replay was not applied again"
    );
    let cas_replay = client
        .put_idempotent("cas-once", "a", Condition::IfAbsent, k2)
        .await
        .unwrap();
    assert!(
        cas_replay.succeeded,
        "a CAS that succeeded still says so: {cas_replay:?}"
    );
}

/// A session's duplicate that arrives after the client had its answer (a delayed packet)
/// is refused, and a write of a session that expired is refused too: neither is applied.
/// The Rust client, idle past the TTL, starts a new session by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_and_expired_session_writes_are_refused_not_applied() {
    use capkv_proto::kv::{kv_client::KvClient, Idempotency, PutRequest};
    use capkv_proto::status::from_status;
    use capkv_types::ErrorCode;
    use std::time::Duration;

    const TTL_MS: u64 = 1500;
    let cluster = Cluster::start(Opts {
        extra_args: vec!["--client-session-ttl-ms".into(), TTL_MS.to_string()],
        ..Opts::default()
    })
    .await;
    let client = cluster.client().await;
    let key = "session-key";
    client.put(key, "seed").await.unwrap();
    let p = capkv_types::partition_for_key(key.as_bytes(), cluster.partitions).0;
    let leader = cluster.leader_of(p).await.unwrap();
    let mut raw = KvClient::connect(format!("http://{}", cluster.node(leader).addr))
        .await
        .unwrap();
    let started = cluster.status(leader).await.unwrap().hlc_now_ms;
    let put = |value: &str, seq: u64, first_incomplete: u64| PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        if_revision: None,
        if_absent: false,
        idempotency: Some(Idempotency {
            client_id: 0xABC,
            sequence: seq,
            session_started_ms: started,
            first_incomplete,
        }),
        session_token: vec![],
    };
    raw.put(put("one", 1, 1)).await.unwrap();
    raw.put(put("two", 2, 2)).await.unwrap();
    let last_seen = cluster.status(leader).await.unwrap().hlc_now_ms;
    // Sequence 1 again, after the client said it had its answer.
    let stale = raw.put(put("one", 1, 1)).await.unwrap_err();
    let err = from_status(&stale);
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    assert!(err.to_string().contains("already had the answer"), "{err}");
    assert_eq!(client.get(key).await.unwrap().unwrap().value, b"two");

    // The session idles past its TTL while others write to the partition.
    let other = keys_in_partition(p, cluster.partitions, 1, "other").remove(0);
    // Expiry is judged by the log's HLC stamps: wait until the leader's clock is past the
    // session's last write by more than the TTL.
    let past_ttl = |since: u64| {
        let cluster = &cluster;
        async move {
            wait_until(
                Duration::from_secs(30),
                "the HLC passes the session TTL",
                || async {
                    cluster
                        .status(leader)
                        .await
                        .is_some_and(|s| s.hlc_now_ms > since + TTL_MS + 50)
                },
            )
            .await
        }
    };
    past_ttl(last_seen).await;
    client
        .put(other.clone(), "moves the log's clock")
        .await
        .unwrap();
    let expired = raw.put(put("three", 3, 3)).await.unwrap_err();
    let err = from_status(&expired);
    assert_eq!(err.code(), ErrorCode::SessionExpired, "{err}");
    assert_eq!(
        client.get(key).await.unwrap().unwrap().value,
        b"two",
        "not applied"
    );

    // The Rust client's own session expired meanwhile too: it renews it and the write goes
    // through, once.
    let id_before = client.client_id();
    let client_last_seen = cluster.status(leader).await.unwrap().hlc_now_ms;
    past_ttl(client_last_seen).await;
    client.put(other, "again").await.unwrap();
    let w = client.put(key, "renewed").await.unwrap();
    assert!(w.succeeded);
    assert_ne!(client.client_id(), id_before, "a new session");
    assert_eq!(client.get(key).await.unwrap().unwrap().value, b"renewed");
}
