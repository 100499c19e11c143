//! Follower reads (`linearizable-follower`) and bounded staleness (`bounded:K`,
//! `bounded:Tms`), docs/consistency.md: a follower serves them itself after asking the
//! leader for its commit index; cut off from the leader, it serves a time-bounded read only
//! while a proof younger than the bound covers it, says how stale the answer may be, and
//! then refuses; `eventual` reads keep being served.

use std::time::{Duration, Instant};

use capkv_proto::kv::{kv_client::KvClient, Consistency, GetRequest, GetResponse};
use capkv_proto::status::from_status;
use capkv_types::{partition_for_key, ErrorCode};
use tonic::transport::Channel;

use crate::fixture::{metric, wait_until, Cluster, Opts};

fn follower_read(key: &str) -> GetRequest {
    GetRequest {
        key: key.as_bytes().to_vec(),
        consistency: Consistency::Linearizable as i32,
        follower_read: true,
        ..Default::default()
    }
}

fn bounded_ms(key: &str, ms: u64) -> GetRequest {
    GetRequest {
        key: key.as_bytes().to_vec(),
        consistency: Consistency::Bounded as i32,
        max_staleness_ms: Some(ms),
        ..Default::default()
    }
}

fn bounded_revisions(key: &str, k: u64) -> GetRequest {
    GetRequest {
        key: key.as_bytes().to_vec(),
        consistency: Consistency::Bounded as i32,
        max_lag_positions: Some(k),
        ..Default::default()
    }
}

fn value(r: &GetResponse) -> Vec<u8> {
    r.kv.as_ref().map(|kv| kv.value.clone()).unwrap_or_default()
}

fn served_by(r: &GetResponse) -> u64 {
    r.header.as_ref().map_or(0, |h| h.served_by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_serve_follower_and_bounded_reads_and_refuse_past_the_bound() {
    let cluster = Cluster::start(Opts {
        extra_args: ["--unsafe-fault-injection", "--read-timeout-ms", "1500"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await;
    let key = "bounded-key";
    let p = partition_for_key(key.as_bytes(), cluster.partitions).0;
    let client = cluster.client().await;
    client.put(key, "v1").await.unwrap();
    let leader = cluster.leader_of(p).await.unwrap();
    let follower = (1..=3u64).find(|n| *n != leader).unwrap();
    let others: Vec<u64> = (1..=3u64).filter(|n| *n != follower).collect();
    let mut raw: KvClient<Channel> =
        KvClient::connect(format!("http://{}", cluster.node(follower).addr))
            .await
            .unwrap();

    // Each write is seen at once by the follower's own follower and bounded reads: the
    // leader's confirmed commit index covers it, and the follower waits to apply it.
    for (i, request) in [
        follower_read(key),
        bounded_revisions(key, 0),
        bounded_ms(key, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let v = format!("w{i}");
        client.put(key, v.as_str()).await.unwrap();
        let r = raw.get(request.clone()).await.unwrap().into_inner();
        assert_eq!(value(&r), v.as_bytes(), "{request:?}");
        assert_eq!(served_by(&r), follower, "the follower served it itself");
        let h = r.header.unwrap();
        if request.consistency == Consistency::Bounded as i32 {
            assert_eq!(h.stale_ms_at_most, Some(0), "a round for this read: {h:?}");
            assert_eq!(h.behind_positions_at_most, Some(0), "{h:?}");
        } else {
            assert_eq!(h.stale_ms_at_most, None, "only bounded reads carry a bound");
        }
    }
    let (_, metrics) = cluster.http_get(follower, "/metrics").await;
    assert!(
        metric(&metrics, "capkv_engine_events", "read_index_asks") >= 3,
        "{metrics}"
    );

    // A time-bounded read right after serves from the proof those rounds left, and says
    // how old it is.
    let r = raw.get(bounded_ms(key, 60_000)).await.unwrap().into_inner();
    assert_eq!(value(&r), b"w2");
    let stale = r.header.unwrap().stale_ms_at_most.unwrap();
    assert!(stale < 60_000, "{stale}");

    // Cut off, the follower misses the next write.
    cluster.set_blocked(follower, &others).await;
    let majority = cluster.client_for(&others).await;
    majority.put(key, "after-cut").await.unwrap();
    let acked = Instant::now();

    // It answers time-bounded reads only while a proof covers them: every answer that
    // misses the write must say it may be stale by more than the time since the write was
    // acknowledged. Then it refuses.
    let bound_ms = 300;
    wait_until(
        Duration::from_secs(20),
        "the cut-off follower refuses a bounded read once its proof is too old",
        || {
            let mut raw = raw.clone();
            async move {
                let began = Instant::now();
                match raw.get(bounded_ms(key, bound_ms)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        if value(&r) != b"after-cut" {
                            let stale = r.header.as_ref().unwrap().stale_ms_at_most.unwrap();
                            let since = began.duration_since(acked).as_millis() as u64;
                            assert!(
                                stale >= since,
                                "served a stale value {} {since} ms after the write was \
                                 acknowledged, claiming at most {stale} ms",
                                String::from_utf8_lossy(&value(&r))
                            );
                            assert!(stale <= bound_ms, "{stale}");
                        }
                        false
                    }
                    Err(e) => {
                        let code = from_status(&e).code();
                        assert!(
                            matches!(code, ErrorCode::NotLeader | ErrorCode::Unavailable),
                            "{e:?}"
                        );
                        true
                    }
                }
            }
        },
    )
    .await;
    // Revision-bounded and follower reads need the leader: refused.
    for request in [follower_read(key), bounded_revisions(key, 1_000)] {
        let err = raw
            .get(request.clone())
            .await
            .expect_err("no leader to ask");
        let code = from_status(&err).code();
        assert!(
            matches!(code, ErrorCode::NotLeader | ErrorCode::Unavailable),
            "{request:?}: {err:?}"
        );
    }
    // An eventual read is served, stale.
    let r = raw
        .get(GetRequest {
            key: key.as_bytes().to_vec(),
            consistency: Consistency::Eventual as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(value(&r), b"w2");

    // Healed, the follower serves bounded reads itself again, with the new write.
    cluster.set_blocked(follower, &[]).await;
    wait_until(
        Duration::from_secs(30),
        "the healed follower serves a bounded read with the write it missed",
        || {
            let mut raw = raw.clone();
            async move {
                raw.get(bounded_revisions(key, 2)).await.is_ok_and(|r| {
                    let r = r.into_inner();
                    served_by(&r) == follower && value(&r) == b"after-cut"
                })
            }
        },
    )
    .await;
    // A bounded request without its bound is refused.
    let err = raw
        .get(GetRequest {
            key: key.as_bytes().to_vec(),
            consistency: Consistency::Bounded as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(from_status(&err).code(), ErrorCode::InvalidArgument);
}
