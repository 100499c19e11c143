//! Clusters smaller than a group of three: one node (RF 1), two nodes (RF 2) and RF 1 on
//! three nodes. A group whose only voter is its leader is a quorum by itself; every read
//! level, CAS, delete and scan must work on each shape, with both read policies, and the
//! data must survive a restart.

use std::time::Duration;

use capkv_client::{Client, Condition, ScanOptions};
use capkv_types::ReadConsistency;

use crate::fixture::{cli, Cluster, Opts};

const LEVELS: [ReadConsistency; 4] = [
    ReadConsistency::Linearizable,
    ReadConsistency::Session,
    ReadConsistency::Prefix,
    ReadConsistency::Eventual,
];

/// Writes, reads at every level, CAS, delete and scan; `tag` keeps keys of runs apart.
async fn exercise(client: &Client, tag: &str) {
    let key = format!("{tag}:k");
    let w = client.put(key.clone(), "v1").await.unwrap();
    assert!(w.succeeded && w.revision > 0, "{w:?}");
    for level in LEVELS {
        let kv = client
            .get_with(key.clone(), level)
            .await
            .unwrap_or_else(|e| panic!("{tag}: get at {level}: {e}"))
            .unwrap_or_else(|| panic!("{tag}: {key} missing at {level}"));
        assert_eq!(kv.value, b"v1", "{tag} at {level}");
    }
    let stale = client
        .put_with(key.clone(), "x", Condition::IfRevision(w.revision + 1000))
        .await
        .unwrap();
    assert!(!stale.succeeded && stale.current_revision == w.revision);
    let cas = client
        .put_with(key.clone(), "v2", Condition::IfRevision(w.revision))
        .await
        .unwrap();
    assert!(cas.succeeded);
    assert!(
        !client
            .put_with(key.clone(), "y", Condition::IfAbsent)
            .await
            .unwrap()
            .succeeded
    );
    for i in 0..20 {
        client
            .put(format!("{tag}:s:{i:02}"), format!("{i}"))
            .await
            .unwrap();
    }
    for level in LEVELS {
        let rows = client
            .scan_all(
                &ScanOptions {
                    prefix: format!("{tag}:s:").into_bytes(),
                    consistency: level,
                    limit: 7,
                    ..Default::default()
                },
                1000,
            )
            .await
            .unwrap_or_else(|e| panic!("{tag}: scan at {level}: {e}"));
        let keys: Vec<String> = rows
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect();
        let want: Vec<String> = (0..20).map(|i| format!("{tag}:s:{i:02}")).collect();
        assert_eq!(keys, want, "{tag}: scan at {level}");
    }
    let d = client.delete(key.clone()).await.unwrap();
    assert!(d.succeeded);
    for level in LEVELS {
        assert_eq!(client.get_with(key.clone(), level).await.unwrap(), None);
    }
    client.put(format!("{tag}:kept"), "survives").await.unwrap();
}

/// Runs `exercise` on a cluster of `nodes` with `args`, restarts every node, and checks
/// the data is still there at every level.
async fn shape(nodes: usize, args: &[&str], tag: &str) {
    let mut cluster = Cluster::start(Opts {
        nodes,
        extra_args: args.iter().map(|s| s.to_string()).collect(),
        ..Opts::default()
    })
    .await;
    let client = cluster.client().await;
    exercise(&client, tag).await;
    // A leader's quorum acknowledgement ages; one that is its group's only voter must not
    // count itself out once a lease has passed (the fixture's lease is 1.2 s). Waiting is
    // the point here: nothing observable marks the lease running out.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for level in LEVELS {
        let kv = client
            .get_with(format!("{tag}:kept"), level)
            .await
            .unwrap_or_else(|e| panic!("{tag}: get at {level} after a lease: {e}"));
        assert_eq!(
            kv.map(|kv| kv.value),
            Some(b"survives".to_vec()),
            "{tag} at {level}"
        );
    }
    // The CLI's default read (linearizable) answers too: this is what failed on one node.
    let endpoints = cluster.endpoints().join(",");
    let (code, out, err) = cli(&["get", &format!("{tag}:kept")], &endpoints);
    assert_eq!((code, out.as_str()), (0, "survives\n"), "{err}");

    for id in 1..=nodes as u64 {
        cluster.stop(id);
    }
    for id in 1..=nodes as u64 {
        cluster.spawn(id);
    }
    cluster.wait_ready(Duration::from_secs(60)).await;
    let client = cluster.client().await;
    for level in LEVELS {
        // A restarted node holds its vote for one lease; reads wait for a leader.
        let found = {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                match client.get_with(format!("{tag}:kept"), level).await {
                    Ok(Some(kv)) => break kv,
                    other if std::time::Instant::now() > deadline => {
                        panic!("{tag}: {tag}:kept unreadable at {level} after a restart: {other:?}")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        };
        assert_eq!(found.value, b"survives", "{tag} at {level}");
    }
    exercise(&client, &format!("{tag}-again")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_serves_every_read_level() {
    shape(1, &[], "n1-lease").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_serves_every_read_level_with_read_index() {
    shape(1, &["--read-policy", "read-index"], "n1-ri").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_two_replicas_serve_every_read_level() {
    shape(2, &["--replication-factor", "2"], "n2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_per_partition_on_three_nodes() {
    shape(3, &["--replication-factor", "1"], "rf1").await;
    shape(
        3,
        &["--replication-factor", "1", "--read-policy", "read-index"],
        "rf1-ri",
    )
    .await;
}

/// A second process on a data dir in use gets a plain error, and the first keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_in_use_is_refused_with_a_plain_error() {
    let cluster = Cluster::start(Opts {
        nodes: 1,
        ..Opts::default()
    })
    .await;
    let node = cluster.node(1);
    let out = std::process::Command::new(crate::fixture::BIN)
        .arg("server")
        .arg("--data-dir")
        .arg(&node.data_dir)
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .output()
        .expect("run capkv server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let want = format!(
        "error: data dir {} is in use by another capkv process",
        node.data_dir.display()
    );
    assert!(stderr.contains(&want), "{stderr}");
    assert!(!stderr.contains("Locked"), "{stderr}");
    let client = cluster.client().await;
    client.put("still", "serving").await.unwrap();
}

/// A node whose clocks run slow under libfaketime (the clock nemesis's rate skew) still
/// ticks: restarted on its data at 0.62x, with no peer whose messages would wake it, it
/// elects a leader of every partition. Before ticks came from a thread of their own, the
/// engine loop's timed wait (std's, for an absolute CLOCK_MONOTONIC deadline computed
/// from the faked clock) never woke, and `capkv check --nodes 1` failed to recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_slow_clock_still_elects_on_its_own() {
    let Some(lib) = capkv_check::nemesis::faketime_library() else {
        eprintln!(
            "libfaketime is not installed (scripts/install-test-deps.sh installs it): skipped"
        );
        return;
    };
    let mut cluster = Cluster::start(Opts {
        nodes: 1,
        ..Opts::default()
    })
    .await;
    cluster.client().await.put("slow:k", "v").await.unwrap();
    cluster.kill(1);
    cluster.set_env(
        1,
        vec![
            ("LD_PRELOAD".into(), lib.display().to_string()),
            ("FAKETIME".into(), "+0 x0.62".into()),
        ],
    );
    cluster.spawn(1);
    cluster.wait_ready(Duration::from_secs(30)).await;
    let kv = cluster.client().await.get("slow:k").await.unwrap().unwrap();
    assert_eq!(kv.value, b"v");
}
