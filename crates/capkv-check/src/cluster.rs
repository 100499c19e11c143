//! The cluster under test: `capkv server` processes this run starts (full control), or an
//! existing cluster given by endpoints (network faults only, through its debug endpoint).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use capkv_client::{fetch_node_status, leaders_of, Client, ClientConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

pub struct LocalNode {
    pub id: u64,
    pub addr: String,
    pub http: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    paused: bool,
}

pub struct Cluster {
    pub nodes: Vec<LocalNode>,
    pub partitions: u32,
    exe: Option<PathBuf>,
    spec: String,
    extra_args: Vec<String>,
}

/// A loopback port nothing listens on now, for a node this process is about to start.
///
/// Taken below the kernel's ephemeral range (32768 and up), so that no outgoing connection
/// (of this run or of another test running in parallel) can occupy it before the node
/// binds it; with port 0 that happened, and the node failed with "Address already in use".
/// Each port is handed out at most once per process.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Start somewhere else in each process: runs may overlap.
    static OFFSET: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let offset = *OFFSET.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (std::process::id() ^ nanos) % SPAN
    });
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (offset + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {FIRST}..{}", FIRST + SPAN)
}

/// Where one local node listens and keeps its files.
pub struct NodeFiles<'a> {
    pub id: u64,
    pub addr: &'a str,
    pub http: &'a str,
    pub data_dir: &'a Path,
    pub log: &'a Path,
}

/// The `capkv server` command of one node of a local cluster (`spec` is its
/// `--initial-cluster`), logging at info level (or `CAPKV_SERVER_LOG`, a `RUST_LOG` filter
/// for debugging) to the end of its log file. Callers add
/// their own settings after these arguments.
pub fn server_command(
    exe: &Path,
    node: &NodeFiles<'_>,
    spec: &str,
    partitions: u32,
) -> std::io::Result<std::process::Command> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.log)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("server")
        .args(["--id", &node.id.to_string()])
        .arg("--data-dir")
        .arg(node.data_dir)
        .args(["--listen", node.addr, "--http", node.http])
        .args(["--initial-cluster", spec])
        .args(["--partitions", &partitions.to_string()])
        .env(
            "RUST_LOG",
            std::env::var("CAPKV_SERVER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    Ok(cmd)
}

impl Cluster {
    /// Starts `n` nodes of `exe` under `dir` and waits until every partition has a leader.
    pub async fn start_local(
        exe: &Path,
        dir: &Path,
        n: usize,
        partitions: u32,
        extra_args: Vec<String>,
    ) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(dir)?;
        let mut nodes = Vec::new();
        for i in 1..=n as u64 {
            nodes.push(LocalNode {
                id: i,
                addr: format!("127.0.0.1:{}", free_port()?),
                http: format!("127.0.0.1:{}", free_port()?),
                data_dir: dir.join(format!("node-{i}")),
                log: dir.join(format!("node-{i}.log")),
                child: None,
                paused: false,
            });
        }
        let spec = nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            nodes,
            partitions,
            exe: Some(exe.to_path_buf()),
            spec,
            extra_args,
        };
        for id in 1..=n as u64 {
            c.spawn(id)?;
        }
        c.wait_ready(Duration::from_secs(60)).await?;
        Ok(c)
    }

    /// An existing cluster: learns its nodes (and their HTTP ports) from any endpoint.
    pub async fn external(endpoints: &[String]) -> anyhow::Result<Cluster> {
        let client = Client::connect(ClientConfig::new(endpoints.to_vec())).await?;
        let mut nodes = Vec::new();
        let mut partitions = 0;
        for (id, addr) in client.node_addrs() {
            let status = client.node_status(&addr).await.ok();
            let http = status
                .as_ref()
                .and_then(|s| {
                    s.nodes
                        .iter()
                        .find(|n| n.id == id.0)
                        .map(|n| n.http_addr.clone())
                })
                .unwrap_or_default();
            partitions = status.map(|s| s.partition_count).unwrap_or(partitions);
            nodes.push(LocalNode {
                id: id.0,
                addr,
                http,
                data_dir: PathBuf::new(),
                log: PathBuf::new(),
                child: None,
                paused: false,
            });
        }
        if nodes.is_empty() {
            bail!("the cluster at {endpoints:?} reported no nodes");
        }
        Ok(Cluster {
            nodes,
            partitions,
            exe: None,
            spec: String::new(),
            extra_args: vec![],
        })
    }

    pub fn controls_processes(&self) -> bool {
        self.exe.is_some()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    fn node_mut(&mut self, id: u64) -> anyhow::Result<&mut LocalNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let exe = self
            .exe
            .clone()
            .context("cannot start processes of an external cluster")?;
        let (spec, partitions, extra) =
            (self.spec.clone(), self.partitions, self.extra_args.clone());
        let n = self.node_mut(id)?;
        let files = NodeFiles {
            id,
            addr: &n.addr,
            http: &n.http,
            data_dir: &n.data_dir,
            log: &n.log,
        };
        let mut cmd = server_command(&exe, &files, &spec, partitions)?;
        cmd.args([
            "--unsafe-fault-injection",
            "--write-timeout-ms",
            "2000",
            "--read-timeout-ms",
            "2000",
        ])
        .args(&extra);
        let child = Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start node {id}"))?;
        n.child = Some(child);
        n.paused = false;
        Ok(())
    }

    fn signal(&self, id: u64, sig: libc::c_int) {
        if let Some(pid) = self
            .nodes
            .iter()
            .find(|n| n.id == id)
            .and_then(|n| n.child.as_ref())
            .and_then(|c| c.id())
        {
            // SAFETY: kill(2) on a child process this cluster started.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }

    pub async fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, libc::SIGCONT);
        if let Some(mut c) = self.node_mut(id)?.child.take() {
            let _ = c.kill().await;
        }
        Ok(())
    }

    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        if self.node_mut(id)?.child.is_none() {
            self.spawn(id)?;
        }
        Ok(())
    }

    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, libc::SIGSTOP);
        self.node_mut(id)?.paused = true;
        Ok(())
    }

    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, libc::SIGCONT);
        self.node_mut(id)?.paused = false;
        Ok(())
    }

    /// Makes each node drop Raft traffic with nodes outside its group.
    pub async fn partition(&self, groups: &[Vec<u64>]) -> anyhow::Result<()> {
        for g in groups {
            let others: Vec<u64> = self
                .ids()
                .into_iter()
                .filter(|id| !g.contains(id))
                .collect();
            for id in g {
                self.set_blocked(*id, &others).await?;
            }
        }
        Ok(())
    }

    pub async fn heal_network(&self) -> anyhow::Result<()> {
        for id in self.ids() {
            if self.is_up(id) {
                self.set_blocked(id, &[]).await?;
            }
        }
        Ok(())
    }

    fn is_up(&self, id: u64) -> bool {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .is_some_and(|n| (n.child.is_some() || self.exe.is_none()) && !n.paused)
    }

    async fn set_blocked(&self, id: u64, peers: &[u64]) -> anyhow::Result<()> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.id == id)
            .context("no such node")?;
        if !self.is_up(id) {
            return Ok(());
        }
        let body = format!("{{\"blocked\":{peers:?}}}");
        let (code, resp) = http_post(&node.http, "/debug/faults", &body).await?;
        if code != 200 {
            bail!("node {id} refused fault injection ({code}): {resp}");
        }
        Ok(())
    }

    /// Brings every node back: resumes, restarts and reconnects all of them.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        for id in self.ids() {
            let paused = self.nodes.iter().any(|n| n.id == id && n.paused);
            if paused {
                self.resume(id)?;
            }
            if self.controls_processes() {
                self.restart(id).await?;
            }
        }
        // A restarted node may need a moment before its HTTP port answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.heal_network().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "heal: retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The leader of each partition, from one status call per running node.
    pub async fn leaders(&self) -> Vec<Option<u64>> {
        let mut statuses = Vec::new();
        for n in self.nodes.iter().filter(|n| self.is_up(n.id)) {
            if let Ok(s) = fetch_node_status(&n.addr, Duration::from_millis(500)).await {
                statuses.push((n.id, s));
            }
        }
        leaders_of(self.partitions, &statuses)
    }

    /// The leader of partition `p`, asked of the running nodes.
    pub async fn leader_of(&self, p: u32) -> Option<u64> {
        self.leaders().await.get(p as usize).copied().flatten()
    }

    pub async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while !self.leaders().await.iter().all(Option::is_some) {
            if Instant::now() > deadline {
                bail!(
                    "not every partition had a leader after {} s",
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                if let Some(pid) = c.id() {
                    // SAFETY: our own child.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGCONT);
                        libc::kill(pid as libc::pid_t, libc::SIGTERM);
                    }
                }
                if tokio::time::timeout(Duration::from_secs(10), c.wait())
                    .await
                    .is_err()
                {
                    let _ = c.kill().await;
                }
            }
        }
    }
}

/// A minimal HTTP/1.1 POST; returns (status, body).
pub async fn http_post(addr: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).await?;
        Ok::<_, std::io::Error>(resp)
    };
    let resp = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .context("HTTP request timed out")??;
    Ok(parse_http_response(&resp))
}

/// The status code and body of a whole HTTP/1.1 response (0 and "" where unreadable).
pub fn parse_http_response(resp: &str) -> (u16, String) {
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}
