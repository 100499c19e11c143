//! A cluster of `capkv server` child processes for tests, on `capkv-testkit`: the tests'
//! defaults (timings, slots, a temporary directory kept on failure) and `must`-style
//! helpers that panic with context.

#![allow(dead_code)]

use std::future::Future;
use std::process::Command;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use capkv_client::{Client, ClientConfig, StatusResponse};
use capkv_testkit::{ClusterOptions, Faults, LocalCluster, LocalNode};

pub const BIN: &str = env!("CARGO_BIN_EXE_capkv");

/// At most this many clusters run at once, so tests in parallel do not starve each
/// other's elections on a small machine.
const CLUSTER_SLOTS: usize = 2;
static SLOTS: Mutex<usize> = Mutex::new(0);
static SLOTS_FREED: Condvar = Condvar::new();

pub struct Slot(usize);

impl Slot {
    /// One of the shared slots.
    pub fn take() -> Slot {
        Self::take_n(1)
    }

    /// Every slot: for tests that load the machine on purpose.
    pub fn take_all() -> Slot {
        Self::take_n(CLUSTER_SLOTS)
    }

    fn take_n(n: usize) -> Slot {
        let mut used = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        while *used + n > CLUSTER_SLOTS {
            used = SLOTS_FREED.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
        Slot(n)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *SLOTS.lock().unwrap_or_else(|e| e.into_inner()) -= self.0;
        SLOTS_FREED.notify_all();
    }
}

pub struct Cluster {
    inner: LocalCluster,
    pub dir: Option<tempfile::TempDir>,
    pub partitions: u32,
    _slot: Slot,
}

#[derive(Clone, Debug)]
pub struct Opts {
    pub nodes: usize,
    pub partitions: u32,
    pub extra_args: Vec<String>,
    /// Nodes not started with the others (`spawn` them later).
    pub absent_at_start: Vec<u64>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            nodes: 3,
            partitions: 8,
            extra_args: vec![],
            absent_at_start: vec![],
        }
    }
}

impl Cluster {
    /// Starts the nodes and waits until every partition has a leader.
    pub async fn start(opts: Opts) -> Cluster {
        let slot = tokio::task::spawn_blocking(Slot::take).await.expect("slot");
        let dir = tempfile::Builder::new()
            .prefix("capkv-it-")
            .tempdir()
            .expect("tempdir");
        let mut options = ClusterOptions::new(opts.nodes, opts.partitions);
        options.extra_args = ["--heartbeat-ms", "100", "--election-timeout-ms", "600"]
            .map(String::from)
            .to_vec();
        options.extra_args.extend(opts.extra_args);
        let mut inner =
            LocalCluster::new(BIN.as_ref(), dir.path(), options).expect("lay out the cluster");
        for id in inner.ids() {
            if !opts.absent_at_start.contains(&id) {
                inner.spawn(id).expect("spawn capkv server");
            }
        }
        let mut c = Cluster {
            inner,
            dir: Some(dir),
            partitions: opts.partitions,
            _slot: slot,
        };
        // Fails at once, with the node's log, if a node exited at start.
        if let Err(e) = c.inner.wait_ready(Duration::from_secs(60)).await {
            panic!("the cluster did not start: {e:#}");
        }
        c
    }

    pub fn node(&self, id: u64) -> &LocalNode {
        self.inner.node(id).expect("node id")
    }

    /// The testkit cluster, for what this fixture does not wrap.
    pub fn kit(&mut self) -> &mut LocalCluster {
        &mut self.inner
    }

    /// Starts node `id`'s process (again) with its data dir.
    pub fn spawn(&mut self, id: u64) {
        self.inner.spawn(id).expect("spawn capkv server");
    }

    /// Starts node `id` with `extra` arguments for this start only.
    pub fn spawn_with(&mut self, id: u64, extra: &[&str]) {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        self.inner
            .spawn_with(id, &extra)
            .expect("spawn capkv server");
    }

    /// Environment of node `id`'s process at its next starts (e.g. libfaketime).
    pub fn set_env(&mut self, id: u64, env: Vec<(String, String)>) {
        self.inner.set_env(id, env).expect("set env");
    }

    /// SIGKILL: no shutdown, no final sync.
    pub fn kill(&mut self, id: u64) {
        self.inner.kill(id).expect("kill");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, id: u64) {
        self.inner.stop(id).expect("stop");
    }

    pub fn pause(&mut self, id: u64) {
        self.inner.pause(id).expect("pause");
    }

    pub fn resume(&mut self, id: u64) {
        self.inner.resume(id).expect("resume");
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.inner.endpoints()
    }

    pub fn running(&self) -> Vec<u64> {
        self.inner.running()
    }

    pub async fn client(&self) -> Client {
        self.client_for(&self.running()).await
    }

    /// A client that knows only these nodes as endpoints (it still learns the others).
    pub async fn client_for(&self, ids: &[u64]) -> Client {
        let endpoints: Vec<String> = ids.iter().map(|id| self.node(*id).addr.clone()).collect();
        let mut cfg = ClientConfig::new(endpoints);
        cfg.request_timeout = Duration::from_secs(20);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(cfg.clone()).await {
                Ok(c) => return c,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("cannot connect to {ids:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        self.inner.status(id).await
    }

    /// The leader of each partition, from one status call per running node.
    pub async fn leaders(&self) -> Vec<Option<u64>> {
        self.inner.leaders().await
    }

    /// The leader of partition `p` according to the running nodes (a node that says it leads).
    pub async fn leader_of(&self, p: u32) -> Option<u64> {
        self.inner.leader_of(p).await
    }

    /// Waits until every partition has a leader.
    pub async fn wait_ready(&mut self, limit: Duration) {
        if let Err(e) = self.inner.wait_ready(limit).await {
            panic!("{e:#}");
        }
    }

    /// Sets the peers node `id` drops Raft traffic to and from (needs --unsafe-fault-injection).
    pub async fn set_blocked(&self, id: u64, peers: &[u64]) {
        let cut = Faults {
            drop_to: peers.to_vec(),
            drop_from: peers.to_vec(),
            ..Faults::default()
        };
        if let Err(e) = self.inner.set_faults(id, cut).await {
            panic!("set faults on node {id}: {e:#}");
        }
    }

    /// Sets every fault of node `id` (needs --unsafe-fault-injection).
    pub async fn set_faults(&self, id: u64, faults: Faults) -> Faults {
        match self.inner.set_faults(id, faults).await {
            Ok(f) => f,
            Err(e) => panic!("set faults on node {id}: {e:#}"),
        }
    }

    /// `GET` on node `id`'s HTTP port: (status code, body).
    pub async fn http_get(&self, id: u64, path: &str) -> (u16, String) {
        match capkv_testkit::http_get(&self.node(id).http, path).await {
            Ok(r) => r,
            Err(e) => panic!("GET {path} on node {id}: {e:#}"),
        }
    }

    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.node(id).log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The testkit kills every node when `inner` drops.
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("test failed; node logs and data kept in {}", kept.display());
                for n in &self.inner.nodes {
                    let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!("---- node {} log (last 30 lines) ----", n.id);
                    for l in &lines[lines.len().saturating_sub(30)..] {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// Polls `cond` until it is true; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if let Err(e) = capkv_testkit::wait_until(limit, what, cond).await {
        panic!("{e:#}");
    }
}

/// Runs the `capkv` binary; returns (exit code, stdout, stderr).
pub fn cli(args: &[&str], endpoints: &str) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("CAPKV_ENDPOINTS", endpoints)
        .env("RUST_LOG", "error")
        .output()
        .expect("run capkv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A seed from CAPKV_TEST_SEED or the clock, printed so a failure can be replayed.
/// The sum of the samples of metric `name` in Prometheus text whose line contains `label`
/// (`""`: any), as an integer (0 if none).
pub fn metric(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("CAPKV_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed={seed} (replay with CAPKV_TEST_SEED={seed})");
    seed
}
