//! `capkv playground`: a local cluster of child `capkv server` processes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use capkv_client::fetch_node_status;
use clap::Args;
use tokio::process::{Child, Command};

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
    let addrs: Vec<String> = (0..a.nodes)
        .map(|i| format!("127.0.0.1:{}", u32::from(a.base_port) + i))
        .collect();
    let cluster: String = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| format!("{}={addr}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut children: Vec<Child> = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i + 1;
        let node_dir = dir.join(format!("node-{id}"));
        let log_path = dir.join(format!("node-{id}.log"));
        if let Err(e) = std::fs::create_dir_all(&node_dir) {
            eprintln!("error: cannot create {}: {e}", node_dir.display());
            stop_all(&mut children).await;
            return 2;
        }
        let log = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: cannot open {}: {e}", log_path.display());
                stop_all(&mut children).await;
                return 2;
            }
        };
        let spawned = Command::new(&exe)
            .arg("server")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&node_dir)
            .args(["--listen", addr])
            .args(["--initial-cluster", &cluster])
            .args(["--partitions", &a.partitions.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(c) => children.push(c),
            Err(e) => {
                eprintln!("error: cannot start node {id}: {e}");
                stop_all(&mut children).await;
                return 2;
            }
        }
    }
    println!("data: {}  (logs: node-N.log)", dir.display());
    if let Err(e) = wait_for_leaders(&addrs, &mut children, Duration::from_secs(60)).await {
        eprintln!("error: {e}");
        stop_all(&mut children).await;
        return 2;
    }
    println!("endpoints: {}", addrs.join(","));
    println!("try: capkv put user:1 alice && capkv get user:1 && capkv status   (Ctrl-C stops the cluster)");
    let code = tokio::select! {
        _ = crate::server_cmd::wait_for_stop_signal() => 0,
        code = watch_children(&mut children) => code,
    };
    stop_all(&mut children).await;
    println!("stopped");
    code
}

async fn wait_for_leaders(
    addrs: &[String],
    children: &mut [Child],
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        for (i, c) in children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                return Err(format!(
                    "node {} exited during start-up ({status}); see its log",
                    i + 1
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

/// Resolves when any child exits; returns the exit code to use.
async fn watch_children(children: &mut [Child]) -> i32 {
    loop {
        for (i, c) in children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                eprintln!("node {} exited ({status}); stopping the playground", i + 1);
                return 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SIGTERM every child, wait up to 10 s, then SIGKILL what is left.
async fn stop_all(children: &mut [Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            // SAFETY: kill(2) on a pid of our own child process.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for c in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
}
