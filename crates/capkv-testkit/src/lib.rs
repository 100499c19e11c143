//! Running capkv clusters from outside, for the cluster tests, `capkv check` and the
//! playground: one way to start, stop, kill, pause and restart `capkv server` processes,
//! to inject faults through the nodes' typed `Admin` gRPC service, and to wait for
//! conditions with deadlines.
//!
//! Every process a [`LocalCluster`] starts is its child; it signals only those, by pid, and
//! kills whatever still runs when it is dropped.

pub mod resp;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use capkv_client::{fetch_node_status, leaders_of, StatusResponse};
pub use capkv_proto::admin::Faults;
use capkv_proto::admin::{admin_client::AdminClient, GetFaultsRequest};

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

/// Polls `cond` every 50 ms until it is true; fails with `what` after `limit`.
/// The faults that cut `nodes` into `groups`: each node of a group drops Raft traffic
/// both ways with every node outside it.
pub fn partition_cuts(nodes: &[u64], groups: &[Vec<u64>]) -> Vec<(u64, Faults)> {
    let mut out = Vec::new();
    for g in groups {
        let others: Vec<u64> = nodes.iter().copied().filter(|id| !g.contains(id)).collect();
        for id in g {
            out.push((
                *id,
                Faults {
                    drop_to: others.clone(),
                    drop_from: others.clone(),
                    ..Faults::default()
                },
            ));
        }
    }
    out
}

pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {} ms waiting until {what}",
                limit.as_millis()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn admin(addr: &str) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(AdminClient::new(channel))
}

/// Replaces the injected faults of the node at `addr` (its gRPC address; the node needs
/// `--unsafe-fault-injection`). Returns the faults now in force.
pub async fn set_node_faults(addr: &str, faults: Faults) -> anyhow::Result<Faults> {
    Ok(admin(addr)?.set_faults(faults).await?.into_inner())
}

/// The faults in force on the node at `addr`.
pub async fn node_faults(addr: &str) -> anyhow::Result<Faults> {
    Ok(admin(addr)?
        .get_faults(GetFaultsRequest {})
        .await?
        .into_inner())
}

/// `GET http://{addr}{path}` (a node's HTTP port: /metrics, /health, /status); returns
/// the status code and body. Times out after 5 s.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<hyper::body::Bytes>>();
    let uri: hyper::Uri = format!("http://{addr}{path}").parse()?;
    let fetch = async {
        let resp = client.get(uri).await?;
        let code = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("GET {addr}{path} timed out"))?
}

/// An HTTP request to `http://{addr}{path}` with `headers` and `body`; returns the status
/// code, the response headers and the body. Times out after 10 s.
pub async fn http_request(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> anyhow::Result<(u16, hyper::HeaderMap, Vec<u8>)> {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<hyper::body::Bytes>>();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(hyper::body::Bytes::from(body)))?;
    let fetch = async {
        let resp = client.request(req).await?;
        let code = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((code, headers, body.to_vec()))
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .with_context(|| format!("{method} {addr}{path} timed out"))?
}

/// The leader of each of `partitions` partitions, from one status call to each of
/// `nodes` ((id, gRPC address)): the node that says it leads (`None` where none does).
pub async fn leaders_at(partitions: u32, nodes: &[(u64, String)]) -> Vec<Option<u64>> {
    let mut statuses = Vec::new();
    for (id, addr) in nodes {
        if let Ok(s) = fetch_node_status(addr, Duration::from_millis(1000)).await {
            statuses.push((*id, s));
        }
    }
    leaders_of(partitions, &statuses)
}

/// Where the nodes listen.
#[derive(Debug, Clone, Copy)]
pub enum Ports {
    /// Free loopback ports, gRPC, HTTP, RESP and JSON each from [`free_port`].
    Free,
    /// Node N on `base + N - 1`, its HTTP on that + 1000, RESP on that - 1000 and JSON on
    /// that + 2000 (the playground's layout).
    Base(u16),
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub partitions: u32,
    /// Added to every node's `capkv server` command line.
    pub extra_args: Vec<String>,
    pub ports: Ports,
    /// `RUST_LOG` for the servers (`None`: inherit this process's environment).
    pub server_log: Option<String>,
}

impl ClusterOptions {
    pub fn new(nodes: usize, partitions: u32) -> Self {
        ClusterOptions {
            nodes,
            partitions,
            extra_args: vec![],
            ports: Ports::Free,
            server_log: Some(std::env::var("CAPKV_SERVER_LOG").unwrap_or_else(|_| "info".into())),
        }
    }
}

/// One node: where it listens and keeps its files, and its process while it runs.
pub struct LocalNode {
    pub id: u64,
    /// gRPC address (clients, peers, admin).
    pub addr: String,
    pub http: String,
    /// Redis protocol (RESP) address.
    pub resp: String,
    /// JSON-over-TCP address.
    pub json: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    paused: bool,
    started: Option<Instant>,
    /// Environment for this node's process, at every start from now on (e.g. libfaketime).
    env: Vec<(String, String)>,
}

impl LocalNode {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Running (a process this cluster started and has not seen exit).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Time since its process started.
    pub fn uptime(&self) -> Option<Duration> {
        self.started.map(|s| s.elapsed())
    }
}

/// A cluster of `capkv server` child processes on loopback.
pub struct LocalCluster {
    exe: PathBuf,
    pub nodes: Vec<LocalNode>,
    pub partitions: u32,
    spec: String,
    options: ClusterOptions,
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child process this cluster started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

impl LocalCluster {
    /// Lays out `options.nodes` nodes under `dir` (node-N/ and node-N.log); starts none.
    pub fn new(exe: &Path, dir: &Path, options: ClusterOptions) -> anyhow::Result<LocalCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let mut nodes = Vec::new();
        for i in 1..=options.nodes as u64 {
            let (grpc, http, resp, json) = match options.ports {
                Ports::Free => (free_port()?, free_port()?, free_port()?, free_port()?),
                Ports::Base(base) => {
                    let grpc = u16::try_from(u64::from(base) + i - 1)
                        .ok()
                        .filter(|p| p.checked_add(2000).is_some() && *p > 1000)
                        .with_context(|| format!("base port {base} leaves no room for node {i}"))?;
                    (grpc, grpc + 1000, grpc - 1000, grpc + 2000)
                }
            };
            nodes.push(LocalNode {
                id: i,
                addr: format!("127.0.0.1:{grpc}"),
                http: format!("127.0.0.1:{http}"),
                resp: format!("127.0.0.1:{resp}"),
                json: format!("127.0.0.1:{json}"),
                data_dir: dir.join(format!("node-{i}")),
                log: dir.join(format!("node-{i}.log")),
                child: None,
                paused: false,
                started: None,
                env: vec![],
            });
        }
        let spec = nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        Ok(LocalCluster {
            exe: exe.to_path_buf(),
            nodes,
            partitions: options.partitions,
            spec,
            options,
        })
    }

    /// Lays out the nodes, starts all of them and waits until every partition has a leader.
    pub async fn start(
        exe: &Path,
        dir: &Path,
        options: ClusterOptions,
    ) -> anyhow::Result<LocalCluster> {
        let mut c = LocalCluster::new(exe, dir, options)?;
        for id in c.ids() {
            c.spawn(id)?;
        }
        c.wait_ready(Duration::from_secs(60)).await?;
        Ok(c)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    pub fn node(&self, id: u64) -> anyhow::Result<&LocalNode> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> anyhow::Result<&mut LocalNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))
    }

    /// Nodes with a running process.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.id)
            .collect()
    }

    /// Running and not paused: the nodes that can answer.
    pub fn is_up(&self, id: u64) -> bool {
        self.node(id).is_ok_and(|n| n.is_running() && !n.paused)
    }

    /// The arguments after the executable that start node `id` (plus `extra`).
    pub fn server_args(&self, id: u64, extra: &[String]) -> anyhow::Result<Vec<String>> {
        let n = self.node(id)?;
        let mut args: Vec<String> = vec![
            "server".into(),
            "--id".into(),
            id.to_string(),
            "--data-dir".into(),
            n.data_dir.display().to_string(),
            "--listen".into(),
            n.addr.clone(),
            "--http".into(),
            n.http.clone(),
            "--resp".into(),
            n.resp.clone(),
            "--json".into(),
            n.json.clone(),
            "--initial-cluster".into(),
            self.spec.clone(),
            "--partitions".into(),
            self.partitions.to_string(),
        ];
        args.extend(self.options.extra_args.iter().cloned());
        args.extend(extra.iter().cloned());
        Ok(args)
    }

    /// The command that starts node `id` again, for a person to paste into a shell.
    pub fn command_line(&self, id: u64) -> anyhow::Result<String> {
        let mut words = vec![shell_word(&self.exe.display().to_string())];
        words.extend(self.server_args(id, &[])?.iter().map(|a| shell_word(a)));
        Ok(words.join(" "))
    }

    /// Starts node `id`'s process (again, on its data dir).
    pub fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        self.spawn_with(id, &[])
    }

    /// Starts node `id`'s process with `extra` arguments for this start only.
    pub fn spawn_with(&mut self, id: u64, extra: &[String]) -> anyhow::Result<()> {
        let args = self.server_args(id, extra)?;
        let exe = self.exe.clone();
        let server_log = self.options.server_log.clone();
        let n = self.node_mut(id)?;
        if n.child.is_some() {
            bail!("node {id} is already running");
        }
        let env = n.env.clone();
        std::fs::create_dir_all(&n.data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .with_context(|| format!("open {}", n.log.display()))?;
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if let Some(filter) = server_log {
            cmd.env("RUST_LOG", filter);
        }
        cmd.envs(env);
        // Its own process group: a terminal's Ctrl-C reaches only the program that runs
        // the cluster, which then stops the nodes itself.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().with_context(|| format!("start node {id}"))?;
        n.child = Some(child);
        n.paused = false;
        n.started = Some(Instant::now());
        Ok(())
    }

    /// The extra environment node `id` gets at its starts.
    pub fn env(&self, id: u64) -> anyhow::Result<&[(String, String)]> {
        Ok(&self.node(id)?.env)
    }

    /// Sets the environment node `id` gets at its next starts (replacing what was set).
    pub fn set_env(&mut self, id: u64, env: Vec<(String, String)>) -> anyhow::Result<()> {
        self.node_mut(id)?.env = env;
        Ok(())
    }

    /// SIGKILL: no shutdown, no final sync. Waits for the process to be gone.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.node_mut(id)?;
        if let Some(mut c) = n.child.take() {
            signal(c.id(), libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
        n.paused = false;
        Ok(())
    }

    /// A power cut of node `id`: SIGKILL, then a start that first drops every write no
    /// fsync covered (the node must run with `--unsafe-fault-injection`, which records
    /// what each fsync covered).
    pub fn power_cut(&mut self, id: u64) -> anyhow::Result<()> {
        self.kill(id)?;
        self.spawn_with(id, &["--unsafe-lose-unsynced-writes".to_string()])
    }

    /// SIGTERM, and waits up to 20 s for a clean exit (then SIGKILL).
    pub fn stop(&mut self, id: u64) -> anyhow::Result<Option<ExitStatus>> {
        let n = self.node_mut(id)?;
        let Some(mut c) = n.child.take() else {
            return Ok(None);
        };
        n.paused = false;
        signal(c.id(), libc::SIGCONT);
        signal(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return Ok(c.wait().ok());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP.
    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.node_mut(id)?;
        if let Some(pid) = n.pid() {
            signal(pid, libc::SIGSTOP);
            n.paused = true;
        }
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.node_mut(id)?;
        if let Some(pid) = n.pid() {
            signal(pid, libc::SIGCONT);
        }
        n.paused = false;
        Ok(())
    }

    /// Nodes whose process exited since the last call, with how; they count as down.
    pub fn reap_exited(&mut self) -> Vec<(u64, ExitStatus)> {
        let mut out = Vec::new();
        for n in &mut self.nodes {
            if let Some(Ok(Some(status))) = n.child.as_mut().map(Child::try_wait) {
                n.child = None;
                n.paused = false;
                out.push((n.id, status));
            }
        }
        out
    }

    /// Replaces node `id`'s injected faults (the node needs `--unsafe-fault-injection`).
    pub async fn set_faults(&self, id: u64, faults: Faults) -> anyhow::Result<Faults> {
        set_node_faults(&self.node(id)?.addr, faults)
            .await
            .with_context(|| format!("set faults on node {id}"))
    }

    pub async fn faults(&self, id: u64) -> anyhow::Result<Faults> {
        node_faults(&self.node(id)?.addr)
            .await
            .with_context(|| format!("get faults of node {id}"))
    }

    /// Cuts the running nodes into `groups`: each node drops Raft traffic both ways with
    /// every node outside its group.
    pub async fn partition(&self, groups: &[Vec<u64>]) -> anyhow::Result<()> {
        for (id, cut) in partition_cuts(&self.ids(), groups) {
            if self.is_up(id) {
                self.set_faults(id, cut).await?;
            }
        }
        Ok(())
    }

    /// Clears every fault of every node that is up.
    pub async fn heal_faults(&self) -> anyhow::Result<()> {
        for id in self.ids() {
            if self.is_up(id) {
                self.set_faults(id, Faults::default()).await?;
            }
        }
        Ok(())
    }

    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        let n = self.node(id).ok()?;
        fetch_node_status(&n.addr, Duration::from_secs(2))
            .await
            .ok()
    }

    /// The leader of each partition, from one status call per node that is up.
    pub async fn leaders(&self) -> Vec<Option<u64>> {
        let up: Vec<(u64, String)> = self
            .nodes
            .iter()
            .filter(|n| self.is_up(n.id))
            .map(|n| (n.id, n.addr.clone()))
            .collect();
        leaders_at(self.partitions, &up).await
    }

    pub async fn leader_of(&self, p: u32) -> Option<u64> {
        self.leaders().await.get(p as usize).copied().flatten()
    }

    /// Waits until every partition has a leader; fails at once if a node exited.
    pub async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((id, status)) = self.reap_exited().into_iter().next() {
                let log = self
                    .node(id)
                    .ok()
                    .and_then(|n| std::fs::read_to_string(&n.log).ok())
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                bail!(
                    "node {id} exited ({status}); its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if self.leaders().await.iter().all(Option::is_some) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "not every partition had a leader after {} s (nodes up: {:?})",
                    limit.as_secs(),
                    self.ids()
                        .into_iter()
                        .filter(|id| self.is_up(*id))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every node (SIGTERM, then SIGKILL after 20 s).
    pub fn shutdown(&mut self) {
        let running = self.running();
        for id in &running {
            if let Ok(n) = self.node(*id) {
                if let Some(pid) = n.pid() {
                    signal(pid, libc::SIGCONT);
                    signal(pid, libc::SIGTERM);
                }
            }
        }
        for id in running {
            let _ = self.stop(id);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                signal(c.id(), libc::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// `s` quoted for a POSIX shell where needed.
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_quote_only_what_needs_it() {
        assert_eq!(shell_word("--id"), "--id");
        assert_eq!(
            shell_word("1=127.0.0.1:7379,2=127.0.0.1:7380"),
            "1=127.0.0.1:7379,2=127.0.0.1:7380"
        );
        assert_eq!(shell_word("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn ports_by_base_follow_the_playground_layout() {
        let dir = std::env::temp_dir().join(format!("capkv-testkit-{}", std::process::id()));
        let mut o = ClusterOptions::new(3, 8);
        o.ports = Ports::Base(7379);
        let c = LocalCluster::new(Path::new("/bin/false"), &dir, o).unwrap();
        assert_eq!(
            c.endpoints(),
            ["127.0.0.1:7379", "127.0.0.1:7380", "127.0.0.1:7381"]
        );
        assert_eq!(c.node(3).unwrap().http, "127.0.0.1:8381");
        assert_eq!(c.node(1).unwrap().resp, "127.0.0.1:6379");
        assert_eq!(c.node(2).unwrap().json, "127.0.0.1:9380");
        let args = c.server_args(2, &["--x".into()]).unwrap();
        assert_eq!(&args[..3], ["server", "--id", "2"]);
        assert!(args.windows(2).any(|w| w[0] == "--initial-cluster"
            && w[1] == "1=127.0.0.1:7379,2=127.0.0.1:7380,3=127.0.0.1:7381"));
        assert_eq!(args.last().unwrap(), "--x");
        let mut o = ClusterOptions::new(2, 8);
        o.ports = Ports::Base(63_535);
        assert!(LocalCluster::new(Path::new("/bin/false"), &dir, o).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_partition_cuts_each_group_from_the_rest_both_ways() {
        let cuts = partition_cuts(&[1, 2, 3], &[vec![1], vec![2, 3]]);
        let by_node: std::collections::BTreeMap<u64, (Vec<u64>, Vec<u64>)> = cuts
            .into_iter()
            .map(|(id, f)| (id, (f.drop_to, f.drop_from)))
            .collect();
        assert_eq!(by_node[&1], (vec![2, 3], vec![2, 3]));
        assert_eq!(by_node[&2], (vec![1], vec![1]));
        assert_eq!(by_node[&3], (vec![1], vec![1]));
    }
}
