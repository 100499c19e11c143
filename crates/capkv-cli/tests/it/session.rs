//! `session` reads (docs/consistency.md): a session reads its own writes and never goes
//! back, on any replica. A replica behind the session waits briefly, then forwards the
//! read to the leader; `prefix` and `eventual` reads on that
//! replica show it is stale. The token travels between clients and CLI commands. The
//! cluster runs with `--default-consistency session`: reads that name no level get it.

use std::time::{Duration, Instant};

use capkv_proto::kv::{kv_client::KvClient, Consistency, GetRequest};
use capkv_proto::status::from_status;
use capkv_types::{partition_for_key, ErrorCode, ReadConsistency};

use crate::fixture::{cli, metric, wait_until, Cluster, Opts};

fn get(key: &str, level: Consistency, token: &[u8]) -> GetRequest {
    GetRequest {
        key: key.as_bytes().to_vec(),
        consistency: level as i32,
        session_token: token.to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_its_writes_on_every_replica_even_one_left_behind() {
    let cluster = Cluster::start(Opts {
        extra_args: [
            "--unsafe-fault-injection",
            "--default-consistency",
            "session",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await;
    let key = "session-key";
    let p = partition_for_key(key.as_bytes(), cluster.partitions).0;
    let client = cluster.client().await;
    client.put(key, "v1").await.unwrap();

    // A follower of the key's partition falls behind: cut off from the other two.
    let leader = cluster.leader_of(p).await.unwrap();
    let behind = (1..=3u64).find(|n| *n != leader).unwrap();
    let others: Vec<u64> = (1..=3u64).filter(|n| *n != behind).collect();
    // It has v1 before the cut.
    let mut raw = KvClient::connect(format!("http://{}", cluster.node(behind).addr))
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the follower applied v1", || {
        let mut raw = raw.clone();
        async move {
            raw.get(get(key, Consistency::Prefix, &[]))
                .await
                .is_ok_and(|r| r.into_inner().kv.is_some_and(|kv| kv.value == b"v1"))
        }
    })
    .await;
    cluster.set_blocked(behind, &others).await;
    let majority = cluster.client_for(&others).await;
    client.put(key, "v2").await.unwrap();
    let token = client.session_token();
    assert!(!token.is_empty());

    // The follower cannot serve the session itself: it waits for it, then forwards the
    // read to the leader (the fault cuts Raft traffic only), which answers with v2.
    let asked = Instant::now();
    let r = raw
        .get(get(key, Consistency::Session, &token))
        .await
        .expect("forwarded to the leader")
        .into_inner();
    assert_eq!(r.kv.as_ref().unwrap().value, b"v2", "read-your-writes");
    assert_eq!(
        r.header.as_ref().unwrap().served_by,
        leader,
        "served by the leader"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(100),
        "it waited for the replica to catch up first"
    );
    // A read that names no level gets the node's default, session, and is forwarded alike.
    let r = raw
        .get(get(key, Consistency::Unspecified, &token))
        .await
        .expect("the default level is session here")
        .into_inner();
    assert_eq!(r.kv.unwrap().value, b"v2");
    let (_, metrics) = cluster.http_get(behind, "/metrics").await;
    assert!(
        metric(&metrics, "capkv_reads_forwarded_total", "") >= 2,
        "{metrics}"
    );
    // A forward is answered where it arrives: this replica, still behind, refuses it
    // rather than forwarding again.
    let err = raw
        .get(GetRequest {
            forwarded: true,
            ..get(key, Consistency::Session, &token)
        })
        .await
        .expect_err("a replica behind the session must not serve it");
    assert!(
        matches!(
            from_status(&err).code(),
            ErrorCode::NotLeader | ErrorCode::Unavailable
        ),
        "{err:?}"
    );
    // Without the session's token it is served, stale: that is what the token prevents.
    for level in [
        Consistency::Prefix,
        Consistency::Eventual,
        Consistency::Session,
        Consistency::Unspecified,
    ] {
        let r = raw.get(get(key, level, &[])).await.unwrap().into_inner();
        assert_eq!(
            r.kv.unwrap().value,
            b"v1",
            "{level:?} on the cut-off replica"
        );
    }

    // Through the client, every session read sees v2, whichever replica it tries first;
    // so does another client that joins the session.
    let joined = cluster.client().await;
    joined.join_session(&token).unwrap();
    for c in [&client, &joined] {
        for _ in 0..4 {
            let kv = c
                .get_with(key, ReadConsistency::Session)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(kv.value, b"v2");
        }
    }
    // A token this server did not issue is refused.
    let err = raw
        .get(get(key, Consistency::Session, &[9, 9]))
        .await
        .unwrap_err();
    assert_eq!(from_status(&err).code(), ErrorCode::InvalidArgument);

    // Healed, the follower catches up and serves the session itself.
    cluster.set_blocked(behind, &[]).await;
    wait_until(
        Duration::from_secs(30),
        "the healed follower serves the session's read itself",
        || {
            let mut raw = raw.clone();
            let token = token.clone();
            async move {
                raw.get(get(key, Consistency::Session, &token))
                    .await
                    .is_ok_and(|r| {
                        let r = r.into_inner();
                        r.header
                            .is_some_and(|h| h.served_by == behind && !h.session_token.is_empty())
                            && r.kv.is_some_and(|kv| kv.value == b"v2")
                    })
            }
        },
    )
    .await;
    drop(majority);

    // The CLI carries a session in a file across commands.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("session");
    let file = file.to_str().unwrap();
    let ep = cluster.endpoints().join(",");
    let (code, out, err) = cli(&["put", key, "v3", "--session", file], &ep);
    assert_eq!(code, 0, "{out}{err}");
    let saved = std::fs::read_to_string(file).unwrap();
    assert!(!saved.trim().is_empty(), "the session file holds a token");
    for _ in 0..3 {
        let (code, out, err) = cli(
            &["get", key, "--consistency", "session", "--session", file],
            &ep,
        );
        assert_eq!((code, out.as_str()), (0, "v3\n"), "{err}");
    }
    std::fs::write(file, "not hex\n").unwrap();
    let (code, _, err) = cli(&["get", key, "--session", file], &ep);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not hold a session token"), "{err}");
}
