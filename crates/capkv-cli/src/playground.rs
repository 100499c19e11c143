//! `capkv playground`: a local cluster of child `capkv server` processes.
//!
//! The playground is for trying capkv out, fault tolerance included: when a node dies
//! (e.g. `kill -9` of its pid), the others keep serving, the playground says which node
//! exited and how, prints the command that restarts it by hand, and restarts it itself
//! after `--restart-after`. Ctrl-C (or SIGTERM) stops every node.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capkv_testkit::{ClusterOptions, LocalCluster, Ports};
use clap::Args;

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
    let mut options = ClusterOptions::new(a.nodes as usize, a.partitions);
    options.ports = Ports::Base(a.base_port);
    options.server_log = None;
    let mut cluster = match LocalCluster::new(&exe, &dir, options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 2;
        }
    };
    for id in cluster.ids() {
        if let Err(e) = cluster.spawn(id) {
            eprintln!("error: {e:#}");
            cluster.shutdown();
            return 2;
        }
        write_pid_file(&cluster, &dir, id);
    }
    println!(
        "data: {}  (logs: node-N.log, pids: node-N.pid)",
        dir.display()
    );
    if let Err(e) = cluster.wait_ready(Duration::from_secs(60)).await {
        eprintln!("error: {e:#}");
        cluster.shutdown();
        return 2;
    }
    for n in &cluster.nodes {
        println!(
            "node {}: pid {}, gRPC {}, RESP {}, HTTP {}, JSON {}",
            n.id,
            n.pid().map_or("-".to_string(), |p| p.to_string()),
            n.addr,
            n.resp,
            n.http,
            n.json
        );
    }
    println!("endpoints: {}", cluster.endpoints().join(","));
    println!("try: capkv put user:1 alice && capkv get user:1 && capkv status   (Ctrl-C stops the cluster)");
    if let Some(n) = cluster.nodes.first() {
        let port = n.resp.rsplit(':').next().unwrap_or("6379");
        println!("     redis-cli -p {port} set user:2 bob   (any node answers the Redis protocol)");
    }
    let restart_after = (!a.no_restart).then_some(a.restart_after);
    tokio::select! {
        _ = crate::server_cmd::wait_for_stop_signal() => {}
        _ = supervise(&mut cluster, &dir, restart_after) => {}
    }
    cluster.shutdown();
    for id in cluster.ids() {
        let _ = std::fs::remove_file(pid_file(&dir, id));
    }
    println!("stopped");
    0
}

fn pid_file(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node-{id}.pid"))
}

/// The pid file lets a person (or the README's tour) kill this very node.
fn write_pid_file(cluster: &LocalCluster, dir: &Path, id: u64) {
    if let Some(pid) = cluster.node(id).ok().and_then(|n| n.pid()) {
        let _ = std::fs::write(pid_file(dir, id), format!("{pid}\n"));
    }
}

/// A node that fails (exits with an error) this soon after a start is not restarted again
/// automatically: it would only fail the same way (a data dir in use, a port taken).
const START_GRACE: Duration = Duration::from_secs(3);

/// Watches the nodes for good: reports each exit, restarts nodes when their time comes.
async fn supervise(cluster: &mut LocalCluster, dir: &Path, restart_after: Option<Duration>) {
    let mut restart_at: HashMap<u64, Instant> = HashMap::new();
    loop {
        for (id, status) in cluster.reap_exited() {
            let _ = std::fs::remove_file(pid_file(dir, id));
            // Killed by a signal: restart. Failed by itself right after starting: don't.
            let quick = cluster
                .node(id)
                .ok()
                .and_then(|n| n.uptime())
                .is_some_and(|up| up < START_GRACE)
                && status.code().is_some_and(|c| c != 0);
            let by_hand = cluster.command_line(id).unwrap_or_default();
            let log = cluster
                .node(id)
                .map(|n| n.log.display().to_string())
                .unwrap_or_default();
            match restart_after {
                Some(after) if !quick => {
                    eprintln!(
                        "node {id} exited ({status}); the other nodes keep serving. Restarting it in {} \
                         (or now, by hand: {by_hand})",
                        human(after)
                    );
                    restart_at.insert(id, Instant::now() + after);
                }
                _ => {
                    let why = if quick {
                        format!(
                            "; it exited within {} s of starting, see {log}",
                            START_GRACE.as_secs()
                        )
                    } else {
                        String::new()
                    };
                    eprintln!(
                        "node {id} exited ({status}){why}; the other nodes keep serving. Restart it with: {by_hand}"
                    );
                }
            }
        }
        let due: Vec<u64> = restart_at
            .iter()
            .filter(|(_, t)| Instant::now() >= **t)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            restart_at.remove(&id);
            match cluster.spawn(id) {
                Ok(()) => {
                    write_pid_file(cluster, dir, id);
                    let pid = cluster.node(id).ok().and_then(|n| n.pid());
                    eprintln!(
                        "node {id} restarted (pid {})",
                        pid.map_or("-".to_string(), |p| p.to_string())
                    );
                }
                Err(e) => eprintln!("error: cannot restart node {id}: {e:#}"),
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
