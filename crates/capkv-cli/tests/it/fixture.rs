//! A cluster of `capkv server` child processes for tests.

#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use capkv_check::cluster::{server_command, NodeFiles};
use capkv_client::{fetch_node_status, leaders_of, Client, ClientConfig, StatusResponse};

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

fn free_port() -> u16 {
    capkv_check::cluster::free_port().expect("a free loopback port")
}

pub struct NodeProc {
    pub id: u64,
    pub addr: String,
    pub http: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub dir: Option<tempfile::TempDir>,
    pub nodes: Vec<NodeProc>,
    pub partitions: u32,
    pub extra_args: Vec<String>,
    cluster_spec: String,
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
        let mut nodes = Vec::new();
        for i in 0..opts.nodes {
            let id = i as u64 + 1;
            nodes.push(NodeProc {
                id,
                addr: format!("127.0.0.1:{}", free_port()),
                http: format!("127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("node-{id}")),
                log: dir.path().join(format!("node-{id}.log")),
                child: None,
            });
        }
        let cluster_spec = nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir: Some(dir),
            nodes,
            partitions: opts.partitions,
            extra_args: opts.extra_args,
            cluster_spec,
            _slot: slot,
        };
        for id in 1..=opts.nodes as u64 {
            if !opts.absent_at_start.contains(&id) {
                c.spawn(id);
            }
        }
        c.wait_ready(Duration::from_secs(60)).await;
        // A node that failed to start leaves a cluster that looks ready with the others;
        // say so here rather than through a confusing failure later.
        for n in &mut c.nodes {
            if let Some(status) = n.child.as_mut().and_then(|ch| ch.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(&n.log).unwrap_or_default();
                panic!("node {} exited at start ({status}): {log}", n.id);
            }
        }
        c
    }

    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: u64) -> &mut NodeProc {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Starts node `id`'s process (again) with its data dir.
    pub fn spawn(&mut self, id: u64) {
        let spec = self.cluster_spec.clone();
        let partitions = self.partitions;
        let extra = self.extra_args.clone();
        let n = self.node_mut(id);
        assert!(n.child.is_none(), "node {id} is already running");
        let files = NodeFiles {
            id,
            addr: &n.addr,
            http: &n.http,
            data_dir: &n.data_dir,
            log: &n.log,
        };
        let child = server_command(BIN.as_ref(), &files, &spec, partitions)
            .expect("log file")
            .args(["--heartbeat-ms", "100", "--election-timeout-ms", "600"])
            .args(&extra)
            .spawn()
            .expect("spawn capkv server");
        n.child = Some(child);
    }

    /// SIGKILL: no shutdown, no final sync.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.node_mut(id).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, id: u64) {
        if let Some(mut c) = self.node_mut(id).child.take() {
            signal(&c, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn pause(&self, id: u64) {
        if let Some(c) = &self.node(id).child {
            signal(c, libc::SIGSTOP);
        }
    }

    pub fn resume(&self, id: u64) {
        if let Some(c) = &self.node(id).child {
            signal(c, libc::SIGCONT);
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    pub async fn client(&self) -> Client {
        self.client_for(&self.running()).await
    }

    /// A client that knows only these nodes as endpoints (it still learns the others).
    pub async fn client_for(&self, ids: &[u64]) -> Client {
        let endpoints: Vec<String> = ids.iter().map(|id| self.node(*id).addr.clone()).collect();
        let mut cfg = ClientConfig::new(endpoints);
        cfg.request_timeout = Duration::from_secs(20);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(cfg.clone()).await {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot connect to {ids:?}: {e}"),
            }
        }
    }

    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        fetch_node_status(&self.node(id).addr, Duration::from_secs(2))
            .await
            .ok()
    }

    /// The leader of each partition, from one status call per running node.
    pub async fn leaders(&self) -> Vec<Option<u64>> {
        let mut statuses = Vec::new();
        for id in self.running() {
            if let Some(s) = self.status(id).await {
                statuses.push((id, s));
            }
        }
        leaders_of(self.partitions, &statuses)
    }

    /// The leader of partition `p` according to the running nodes (a node that says it leads).
    pub async fn leader_of(&self, p: u32) -> Option<u64> {
        self.leaders().await.get(p as usize).copied().flatten()
    }

    /// Waits until every partition has a leader.
    pub async fn wait_ready(&self, limit: Duration) {
        let what = format!("every partition has a leader on nodes {:?}", self.running());
        wait_until(limit, &what, || async {
            self.leaders().await.iter().all(Option::is_some)
        })
        .await;
    }

    /// Sets the peers node `id` drops Raft traffic to and from (needs --unsafe-fault-injection).
    pub fn set_blocked(&self, id: u64, peers: &[u64]) {
        let body = format!("{{\"blocked\":{peers:?}}}");
        let (code, resp) = http_request(&self.node(id).http, "POST", "/debug/faults", &body);
        assert_eq!(code, 200, "set faults on node {id}: {resp}");
    }

    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.node(id).log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                signal(&c, libc::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("test failed; node logs and data kept in {}", kept.display());
                for n in &self.nodes {
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

fn signal(c: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child process this fixture started.
    unsafe {
        libc::kill(c.id() as libc::pid_t, sig);
    }
}

/// Polls `cond` until it is true; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {} s waiting until {what}", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A minimal HTTP/1.1 request; returns (status code, body).
pub fn http_request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let addr: SocketAddr = addr.parse().expect("http addr");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write http");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    capkv_check::cluster::parse_http_response(&resp)
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
