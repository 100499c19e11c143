//! Test 1: put/get/del/scan through the client and through the CLI on a 3-node cluster.

use capkv_client::{Condition, ScanOptions};
use capkv_types::ReadConsistency;

use crate::fixture::{cli, Cluster, Opts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_put_get_delete_scan_and_conditions() {
    let cluster = Cluster::start(Opts::default()).await;
    let client = cluster.client().await;

    let w = client.put("user:1", "alice").await.unwrap();
    assert!(w.succeeded && w.revision > 0);
    let kv = client.get("user:1").await.unwrap().expect("user:1 present");
    assert_eq!(kv.value, b"alice");
    assert_eq!(kv.mod_revision, w.revision);
    assert_eq!(kv.create_revision, w.revision);

    // Overwrite: mod_revision moves, create_revision stays.
    let w2 = client.put("user:1", "alice2").await.unwrap();
    assert!(w2.revision > w.revision);
    let kv = client.get("user:1").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision, kv.create_revision),
        (&b"alice2"[..], w2.revision, w.revision)
    );

    // Compare-and-set.
    let stale = client
        .put_with("user:1", "x", Condition::IfRevision(w.revision))
        .await
        .unwrap();
    assert!(!stale.succeeded);
    assert_eq!(stale.current_revision, w2.revision);
    let fresh = client
        .put_with("user:1", "alice3", Condition::IfRevision(w2.revision))
        .await
        .unwrap();
    assert!(fresh.succeeded);
    assert!(
        !client
            .put_with("user:1", "y", Condition::IfAbsent)
            .await
            .unwrap()
            .succeeded
    );
    assert!(
        client
            .put_with("user:new", "y", Condition::IfAbsent)
            .await
            .unwrap()
            .succeeded
    );

    // Delete.
    let d = client.delete("user:1").await.unwrap();
    assert!(d.succeeded);
    assert_eq!(client.get("user:1").await.unwrap(), None);
    assert!(
        !client.delete("user:1").await.unwrap().succeeded,
        "deleting an absent key reports not deleted"
    );

    // Scan across all partitions, in key order, paginated.
    let mut expected: Vec<String> = (0..60).map(|i| format!("item:{i:03}")).collect();
    for k in &expected {
        client
            .put(k.as_bytes().to_vec(), format!("v-{k}"))
            .await
            .unwrap();
    }
    client.put("itex", "outside the prefix").await.unwrap();
    expected.sort();
    let partitions: std::collections::BTreeSet<_> = expected
        .iter()
        .map(|k| capkv_types::partition_for_key(k.as_bytes(), 8))
        .collect();
    assert!(
        partitions.len() > 4,
        "the keys must span partitions for this test to mean anything"
    );

    let mut opts = ScanOptions {
        prefix: b"item:".to_vec(),
        limit: 7,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = client.scan(&opts).await.unwrap();
        assert!(page.kvs.len() <= 7);
        seen.extend(
            page.kvs
                .iter()
                .map(|kv| String::from_utf8(kv.key.clone()).unwrap()),
        );
        pages += 1;
        if page.continuation.is_empty() {
            break;
        }
        opts.continuation = page.continuation;
        assert!(pages < 100, "scan does not terminate");
    }
    assert_eq!(
        seen, expected,
        "paginated scan returns every key once, in order"
    );

    // Range scan [item:010, item:020) and prefix consistency.
    let range = ScanOptions {
        start: b"item:010".to_vec(),
        end: b"item:020".to_vec(),
        ..Default::default()
    };
    let got: Vec<_> = client
        .scan_all(&range, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        got,
        expected[10..20]
            .iter()
            .map(|k| k.as_bytes().to_vec())
            .collect::<Vec<_>>()
    );
    let prefix_read = client
        .get_with("item:005", ReadConsistency::Prefix)
        .await
        .unwrap();
    // A prefix read may be stale but never invents data: the key was written, so either
    // value seen is one that was written.
    if let Some(kv) = prefix_read {
        assert_eq!(kv.value, b"v-item:005");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_put_get_del_scan_status() {
    let cluster = Cluster::start(Opts::default()).await;
    let ep = cluster.endpoints().join(",");

    let (code, out, err) = cli(&["put", "user:1", "alice"], &ep);
    assert_eq!(code, 0, "put: {out} {err}");
    assert!(out.starts_with("OK revision="), "{out}");
    let (code, out, _) = cli(&["get", "user:1"], &ep);
    assert_eq!((code, out.as_str()), (0, "alice\n"));
    let (code, out, _) = cli(&["put", "user:2", "bob"], &ep);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = cli(&["scan", "--prefix", "user:", "--limit", "100"], &ep);
    assert_eq!((code, out.as_str()), (0, "user:1\talice\nuser:2\tbob\n"));
    let (code, out, _) = cli(&["scan", "--prefix", "user:", "--limit", "1"], &ep);
    assert_eq!((code, out.as_str()), (0, "user:1\talice\n"));
    let (code, _, _) = cli(&["put", "user:2", "x", "--if-absent"], &ep);
    assert_eq!(code, 1, "a failed condition exits 1");
    let (code, out, _) = cli(&["del", "user:1"], &ep);
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = cli(&["get", "user:1"], &ep);
    assert_eq!((code, out.as_str()), (1, ""), "not found exits 1: {err}");
    let (code, _, _) = cli(&["del", "user:1"], &ep);
    assert_eq!(code, 1);

    let (code, out, _) = cli(&["status"], &ep);
    assert_eq!(code, 0);
    assert_eq!(out.matches(" up ").count(), 3, "three nodes up:\n{out}");
    // The fixture sets --election-timeout-ms 600: followers refuse votes for 11 of the
    // engine's 12 ticks of 50 ms (the first may come at once), 550 ms; leaders trust half.
    let (policy_text, policy, lease_ms) = ("lease reads (275 ms)", "lease", 275);
    assert_eq!(out.matches(policy_text).count(), 3, "read policy:\n{out}");
    assert!(
        !out.contains("holding its vote"),
        "a fresh cluster holds no votes:\n{out}"
    );
    let (code, out, _) = cli(&["status", "--json"], &ep);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert_eq!(n["read_policy"], policy, "{n}");
        assert_eq!(
            n["lease_read_ms"], lease_ms,
            "half of how long followers refuse votes: {n}"
        );
        assert_eq!(n["vote_hold_remaining_ms"], 0, "{n}");
        let parts = n["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 8);
        assert!(
            parts.iter().all(|p| p["leader"].as_u64().unwrap() != 0),
            "every partition has a leader"
        );
    }

    // An unreachable cluster is an error (exit 2), not "not found".
    let (code, _, err) = cli(&["get", "user:1"], "127.0.0.1:1");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("Unavailable"), "{err}");
}
