//! `capkv playground`: a local cluster of child `capkv server` processes.
//!
//! The playground is for trying capkv out, fault tolerance included: when a node dies
//! (e.g. `kill -9` of its pid), the others keep serving, the playground says which node
//! exited and how, prints the command that restarts it by hand, and restarts it itself
//! after `--restart-after`. Ctrl-C (or SIGTERM) stops every node.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use capkv_client::fetch_node_status;
use clap::Args;
use tokio::process::{Child, Command};

use crate::check_cmd::parse_duration;

#[derive(Args, Debug)]
pub struct PlaygroundArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
    /// gRPC port of node 1; node N listens on base + N - 1 (HTTP on those + 1000).
    #[arg(long, default_value_t = 7379)]
    pub base_port: u16,
    /// Keep data here (default: a temporary directory removed on exit).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Restart a node this long after it exited (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub restart_after: Duration,
    /// Leave a node that exited down (restart it by hand with the printed command).
    #[arg(long)]
    pub no_restart: bool,
}

/// One node of the playground: how to start it, and its process while it runs.
struct PlayNode {
    id: usize,
    addr: String,
    http: String,
    dir: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    /// `capkv server ...` arguments (the same at every start: same data dir and flags).
    args: Vec<String>,
    child: Option<Child>,
    started: Instant,
    /// When the playground restarts this node (it exited and is down).
    restart_at: Option<Instant>,
}

impl PlayNode {
    fn spawn(&mut self, exe: &Path) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let child = Command::new(exe)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            // Its own process group: a terminal's Ctrl-C reaches only the playground, which
            // then stops the nodes itself (instead of seeing them exit and restarting them).
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start node {}: {e}", self.id))?;
        if let Some(pid) = child.id() {
            // The pid file lets a person (or the README's tour) kill this very node.
            let _ = std::fs::write(&self.pid_file, format!("{pid}\n"));
        }
        self.child = Some(child);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The command that starts this node again, for a person to paste.
    fn command_line(&self, exe: &Path) -> String {
        let mut words = vec![shell_word(&exe.display().to_string())];
        words.extend(self.args.iter().map(|a| shell_word(a)));
        words.join(" ")
    }
}

/// `s` quoted for a POSIX shell where needed.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub async fn run(a: PlaygroundArgs) -> i32 {
    crate::init_logging("info");
    if a.nodes == 0 || a.nodes > 16 {
        eprintln!("error: --nodes must be between 1 and 16");
        return 2;
    }
    let (dir, _temp) = match &a.data_dir {
        Some(d) => (d.clone(), None),
        None => match tempfile::Builder::new()
            .prefix("capkv-playground-")
            .tempdir()
        {
            Ok(t) => (t.path().to_path_buf(), Some(t)),
            Err(e) => {
                eprintln!("error: cannot create a temporary directory: {e}");
                return 2;
            }
        },
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find the capkv executable: {e}");
            return 2;
        }
    };
    let port = |i: u32, offset: u32| -> Result<u16, String> {
        u16::try_from(u32::from(a.base_port) + i + offset).map_err(|_| {
            format!(
                "--base-port {} leaves no room for {} nodes",
                a.base_port, a.nodes
            )
        })
    };
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..a.nodes {
        let (grpc, http) = match (port(i, 0), port(i, 1000)) {
            (Ok(g), Ok(h)) => (g, h),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("error: {e}");
                return 2;
            }
        };
        addrs.push(format!("127.0.0.1:{grpc}"));
        nodes.push((i as usize + 1, format!("127.0.0.1:{http}")));
    }
    let cluster: String = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| format!("{}={addr}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<PlayNode> = nodes
        .into_iter()
        .zip(&addrs)
        .map(|((id, http), addr)| {
            let node_dir = dir.join(format!("node-{id}"));
            let args = vec![
                "server".to_string(),
                "--id".into(),
                id.to_string(),
                "--data-dir".into(),
                node_dir.display().to_string(),
                "--listen".into(),
                addr.clone(),
                "--http".into(),
                http.clone(),
                "--initial-cluster".into(),
                cluster.clone(),
                "--partitions".into(),
                a.partitions.to_string(),
            ];
            PlayNode {
                id,
                addr: addr.clone(),
                http,
                log: dir.join(format!("node-{id}.log")),
                pid_file: dir.join(format!("node-{id}.pid")),
                dir: node_dir,
                args,
                child: None,
                started: Instant::now(),
                restart_at: None,
            }
        })
        .collect();
    for n in &mut nodes {
        let made = std::fs::create_dir_all(&n.dir)
            .map_err(|e| format!("cannot create {}: {e}", n.dir.display()));
        if let Err(e) = made.and_then(|()| n.spawn(&exe)) {
            eprintln!("error: {e}");
            stop_all(&mut nodes).await;
            return 2;
        }
    }
    println!(
        "data: {}  (logs: node-N.log, pids: node-N.pid)",
        dir.display()
    );
    if let Err(e) = wait_for_leaders(&addrs, &mut nodes, Duration::from_secs(60)).await {
        eprintln!("error: {e}");
        stop_all(&mut nodes).await;
        return 2;
    }
    for n in &nodes {
        println!(
            "node {}: pid {}, gRPC {}, HTTP {}",
            n.id,
            n.pid().map_or("-".to_string(), |p| p.to_string()),
            n.addr,
            n.http
        );
    }
    println!("endpoints: {}", addrs.join(","));
    println!("try: capkv put user:1 alice && capkv get user:1 && capkv status   (Ctrl-C stops the cluster)");
    let restart_after = (!a.no_restart).then_some(a.restart_after);
    tokio::select! {
        _ = crate::server_cmd::wait_for_stop_signal() => {}
        _ = supervise(&mut nodes, &exe, restart_after) => {}
    }
    stop_all(&mut nodes).await;
    println!("stopped");
    0
}

async fn wait_for_leaders(
    addrs: &[String],
    nodes: &mut [PlayNode],
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        for n in nodes.iter_mut() {
            if let Some(Ok(Some(status))) = n.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "node {} exited during start-up ({status}); see {}",
                    n.id,
                    n.log.display()
                ));
            }
        }
        let mut all = true;
        for addr in addrs {
            match fetch_node_status(addr, Duration::from_secs(1)).await {
                Ok(s) => {
                    all &= s
                        .partitions
                        .iter()
                        .all(|p| p.role.is_empty() || p.leader_id != 0)
                }
                Err(_) => all = false,
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not every partition had a leader after {} s",
                limit.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node that fails (exits with an error) this soon after a start is not restarted again
/// automatically: it would only fail the same way (a data dir in use, a port taken).
const START_GRACE: Duration = Duration::from_secs(3);

/// Watches the nodes for good: reports each exit, restarts nodes when their time comes.
async fn supervise(nodes: &mut [PlayNode], exe: &Path, restart_after: Option<Duration>) {
    loop {
        for n in nodes.iter_mut() {
            let exited = match n.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status),
                _ => None,
            };
            if let Some(status) = exited {
                n.child = None;
                let _ = std::fs::remove_file(&n.pid_file);
                // Killed by a signal: restart. Failed by itself right after starting: don't.
                let quick =
                    n.started.elapsed() < START_GRACE && status.code().is_some_and(|c| c != 0);
                let by_hand = n.command_line(exe);
                match restart_after {
                    Some(after) if !quick => {
                        eprintln!(
                            "node {} exited ({status}); the other nodes keep serving. Restarting it in {} \
                             (or now, by hand: {by_hand})",
                            n.id,
                            human(after)
                        );
                        n.restart_at = Some(Instant::now() + after);
                    }
                    _ => {
                        let why = if quick {
                            format!(
                                "; it exited within {} s of starting, see {}",
                                START_GRACE.as_secs(),
                                n.log.display()
                            )
                        } else {
                            String::new()
                        };
                        eprintln!(
                            "node {} exited ({status}){why}; the other nodes keep serving. Restart it with: {by_hand}",
                            n.id
                        );
                    }
                }
            }
            if n.restart_at.is_some_and(|t| Instant::now() >= t) {
                match n.spawn(exe) {
                    Ok(()) => eprintln!(
                        "node {} restarted (pid {})",
                        n.id,
                        n.pid().map_or("-".to_string(), |p| p.to_string())
                    ),
                    Err(e) => {
                        n.restart_at = None;
                        eprintln!("error: {e}");
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// SIGTERM every running node, wait up to 10 s, then SIGKILL what is left.
async fn stop_all(nodes: &mut [PlayNode]) {
    for n in nodes.iter() {
        if let Some(pid) = n.pid() {
            // SAFETY: kill(2) on a pid of our own child process.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for n in nodes.iter_mut() {
        if let Some(c) = n.child.as_mut() {
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
        let _ = std::fs::remove_file(&n.pid_file);
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
}
