//! A short `capkv bench` against a test cluster: it runs and reports (never a speed).

use crate::fixture::{Cluster, Opts, BIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_and_reports() {
    let cluster = Cluster::start(Opts::default()).await;
    let endpoints = cluster.endpoints().join(",");
    for workload in ["put", "mixed:50"] {
        let out = tokio::process::Command::new(BIN)
            .args([
                "bench",
                "--endpoints",
                &endpoints,
                "--workload",
                workload,
                "--clients",
                "4",
                "--conns",
                "2",
            ])
            .args([
                "--duration",
                "2s",
                "--warmup",
                "0s",
                "--keys",
                "200",
                "--json",
            ])
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "bench {workload} failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_str(stdout.trim()).expect("--json prints one JSON object");
        assert_eq!(v["workload"], workload);
        assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["errors"].as_u64(), Some(0), "{v}");
        assert!(v["p99_ms"].as_f64().unwrap() >= v["p50_ms"].as_f64().unwrap());
    }
    // Bad arguments are refused before any load is sent.
    let out = std::process::Command::new(BIN)
        .args([
            "bench",
            "--endpoints",
            &endpoints,
            "--keys",
            "100000",
            "--key-size",
            "3",
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key-size 3 cannot hold"));
}
