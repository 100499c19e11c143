//! Test 7: bad input gets a clear error, and the node keeps serving.

use std::io::{Read, Write};
use std::time::Duration;

use capkv_proto::kv::{kv_client::KvClient, GetRequest, PutRequest, ScanRequest};
use capkv_proto::status::from_status;
use capkv_types::ErrorCode;

use crate::fixture::{cli, seed, Cluster, Opts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_the_node_keeps_serving() {
    let cluster = Cluster::start(Opts::default()).await;
    let client = cluster.client().await;

    let code = |r: Result<capkv_client::WriteResult, capkv_types::KvError>| r.unwrap_err().code();
    assert_eq!(
        code(client.put("", "v").await),
        ErrorCode::InvalidArgument,
        "empty key"
    );
    assert_eq!(
        code(client.put(vec![b'k'; 5 * 1024], "v").await),
        ErrorCode::TooLarge,
        "5 KiB key"
    );
    assert_eq!(
        code(client.put("k", vec![0u8; 1024 * 1024 + 1]).await),
        ErrorCode::TooLarge,
        "value over 1 MiB"
    );
    assert!(
        client
            .put("k", vec![0u8; 1024 * 1024])
            .await
            .unwrap()
            .succeeded,
        "a value of exactly 1 MiB is fine"
    );
    assert_eq!(
        client.get("").await.unwrap_err().code(),
        ErrorCode::InvalidArgument
    );

    // Raw gRPC: values the typed client cannot send.
    let mut raw = KvClient::connect(format!("http://{}", cluster.node(1).addr))
        .await
        .unwrap();
    let err = raw
        .get(GetRequest {
            key: b"k".to_vec(),
            consistency: 99,
            session_token: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let e = from_status(&err);
    assert_eq!(e.code(), ErrorCode::InvalidArgument);
    assert!(
        e.to_string().contains("unknown consistency level 99"),
        "{e}"
    );
    let err = raw
        .put(PutRequest {
            key: b"k".to_vec(),
            value: vec![],
            if_revision: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        from_status(&err).code(),
        ErrorCode::InvalidArgument,
        "if_revision 0"
    );
    let err = raw
        .put(PutRequest {
            key: b"k".to_vec(),
            value: vec![],
            if_revision: Some(3),
            if_absent: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        from_status(&err).code(),
        ErrorCode::InvalidArgument,
        "if_revision with if_absent"
    );
    let err = raw
        .scan(ScanRequest {
            limit: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        from_status(&err).code(),
        ErrorCode::InvalidArgument,
        "scan limit"
    );
    let err = raw
        .scan(ScanRequest {
            prefix: b"a".to_vec(),
            start: b"b".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        from_status(&err).code(),
        ErrorCode::InvalidArgument,
        "prefix with range"
    );
    let err = raw
        .scan(ScanRequest {
            continuation: b"\x09bogus".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        from_status(&err).code(),
        ErrorCode::InvalidArgument,
        "forged continuation"
    );
    let err = raw
        .scan(ScanRequest {
            partition_id: Some(999),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        from_status(&err).code(),
        ErrorCode::InvalidArgument,
        "unknown partition"
    );

    // The CLI rejects an unknown level before sending anything.
    let (code, _, err) = cli(
        &["get", "k", "--consistency", "sometimes"],
        &cluster.endpoints().join(","),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("linearizable") && err.contains("prefix"),
        "{err}"
    );

    // Garbage bytes on the gRPC and HTTP ports: the connection is dropped, nothing else.
    let seed = seed("bad_input");
    let mut x = seed | 1;
    let garbage: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for addr in [
        &cluster.node(1).addr,
        &cluster.node(1).http,
        &cluster.node(2).addr,
    ] {
        for chunk in [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &garbage[..]] {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(chunk);
            let _ = s.write_all(&garbage);
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
    }
    // Fault injection is refused by a node started without --unsafe-fault-injection.
    let refused = capkv_testkit::set_node_faults(
        &cluster.node(1).addr,
        capkv_testkit::Faults {
            fsync_fail_next: true,
            ..Default::default()
        },
    )
    .await
    .expect_err("fault injection must be refused");
    assert!(
        format!("{refused:#}").contains("--unsafe-fault-injection"),
        "{refused:#}"
    );

    // Still serving, on every node.
    for id in 1..=3 {
        let c = cluster.client_for(&[id]).await;
        let key = format!("after-garbage-{id}");
        c.put(key.clone(), "ok").await.unwrap();
        assert_eq!(c.get(key).await.unwrap().unwrap().value, b"ok");
    }
    let (code, body) = cluster.http_get(1, "/health").await;
    assert_eq!(code, 200, "{body}");
}

/// A snapshot stream whose image does not check out (an applied state at another index
/// than the image's, a value that does not decode) is refused before anything is marked complete,
/// even when its Raft message is a `MsgSnapshot` the node would take: the node installs
/// nothing and keeps serving. Before the check, the node staged the image, took the
/// message, installed it with its log, and then stopped (poisoned) on reading the applied
/// state back; a restart would have failed the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_snapshot_stream_is_refused_and_the_node_keeps_serving() {
    use capkv_proto::raft::{
        raft_transport_client::RaftTransportClient, EngineSnapshotChunk, SnapshotPair,
    };
    use capkv_raftstore::codec::{PeerBatch, WireMessage};
    use capkv_raftstore::{RaftMessage, RaftMessageType};

    let cluster = Cluster::start(Opts { ..Opts::default() }).await;
    let client = cluster.client().await;
    client.put("before-bad-snapshot", "v").await.unwrap();
    // A partition node 1 follows: a MsgSnapshot from its leader, in its term, past its
    // commit, is one raft-rs takes.
    let status = cluster.status(1).await.unwrap();
    let p = status
        .partitions
        .iter()
        .find(|p| p.role.eq_ignore_ascii_case("follower") && p.leader_id != 0)
        .expect("node 1 follows some partition");
    let (partition, leader, term) = (p.id, p.leader_id, p.term);
    let index = p.last_log_index + 1000;
    let mut m = RaftMessage::default();
    m.set_msg_type(RaftMessageType::MsgSnapshot);
    m.from = leader;
    m.to = 1;
    m.term = term;
    let meta = m.mut_snapshot().mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.mut_conf_state().voters = p.replicas.clone();
    let message = PeerBatch {
        from: leader,
        to: 1,
        messages: vec![(partition, WireMessage::from(&m))],
    }
    .encode();
    let chunk = |data: Vec<SnapshotPair>, applied: &[u8]| EngineSnapshotChunk {
        from_node: leader,
        to_node: 1,
        partition,
        session_ttl_ms: 600_000,
        lease_read_ms: 0,
        data,
        last: true,
        index,
        applied: applied.to_vec(),
        message: message.clone(),
        ..Default::default()
    };
    let mut peer = RaftTransportClient::connect(format!("http://{}", cluster.node(1).addr))
        .await
        .unwrap();
    let bad_value = vec![SnapshotPair {
        key: b"k".to_vec(),
        value: b"not a stored value".to_vec(),
    }];
    for (what, c) in [
        (
            "an applied state not at the image's index",
            chunk(vec![], b"garbage"),
        ),
        ("a value that does not decode", chunk(bad_value, b"garbage")),
    ] {
        let refused = peer
            .engine_snapshot(futures::stream::iter(vec![c]))
            .await
            .expect_err(what);
        eprintln!("{what}: {}", refused.message());
    }
    // Nothing was installed, and the node is healthy and serving.
    let (code, body) = cluster.http_get(1, "/health").await;
    assert_eq!(code, 200, "node 1 healthy: {body}");
    let status = cluster.status(1).await.unwrap();
    assert_eq!(status.storage_error, "", "node 1 not stopped");
    let after = status
        .partitions
        .iter()
        .find(|q| q.id == partition)
        .unwrap();
    assert!(
        after.applied_index < index,
        "no image at {index} was installed: applied {}",
        after.applied_index
    );
    client.put("after-bad-snapshot", "w").await.unwrap();
    assert_eq!(
        client
            .get("before-bad-snapshot")
            .await
            .unwrap()
            .unwrap()
            .value,
        b"v"
    );
}
