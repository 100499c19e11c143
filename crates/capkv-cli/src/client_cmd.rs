//! Client commands: put, get, del, scan, status.

use std::io::Write;

use capkv_client::{Client, ClientConfig, Condition, ScanOptions};

/// `println!` that does not panic when stdout is gone (`capkv status | head -3`): output
/// to a closed pipe is dropped, as other command-line tools do.
macro_rules! outln {
    () => {{
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
use capkv_types::{KvError, ReadConsistency};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct Endpoints {
    /// Comma-separated gRPC addresses of any cluster nodes.
    #[arg(
        long,
        env = "CAPKV_ENDPOINTS",
        default_value = "127.0.0.1:7379",
        global = true
    )]
    pub endpoints: String,
    /// A file that carries a read session across commands: read before the command (so
    /// its `--consistency session` reads see what earlier commands wrote or read) and
    /// updated after it. Created if missing.
    #[arg(long, env = "CAPKV_SESSION", global = true)]
    pub session: Option<std::path::PathBuf>,
}

impl Endpoints {
    fn list(&self) -> Vec<String> {
        self.endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
}

#[derive(Args, Debug)]
pub struct PutArgs {
    pub key: String,
    pub value: String,
    /// Write only if the key's current revision is N.
    #[arg(long, conflicts_with = "if_absent")]
    pub if_revision: Option<u64>,
    /// Write only if the key does not exist.
    #[arg(long)]
    pub if_absent: bool,
    #[command(flatten)]
    pub endpoints: Endpoints,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    pub key: String,
    /// Read level: linearizable; linearizable-follower (any replica, after asking the
    /// leader for its commit index); bounded:K or bounded:100ms (any replica at most K
    /// log positions or 100 ms behind); session (any replica that has what this session wrote
    /// or read: see --session); prefix or eventual (any replica, possibly stale). Without
    /// it, the server's --default-consistency (linearizable unless set).
    #[arg(long, value_parser = parse_consistency)]
    pub consistency: Option<ReadConsistency>,
    /// Print revisions, HLC, the serving node and (bounded reads) the staleness bound too.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub endpoints: Endpoints,
}

#[derive(Args, Debug)]
pub struct DelArgs {
    pub key: String,
    /// Delete only if the key's current revision is N.
    #[arg(long)]
    pub if_revision: Option<u64>,
    #[command(flatten)]
    pub endpoints: Endpoints,
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    /// Only keys starting with P.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub prefix: Option<String>,
    /// First key (inclusive).
    #[arg(long)]
    pub from: Option<String>,
    /// Last key (exclusive).
    #[arg(long)]
    pub to: Option<String>,
    /// Most keys to print.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    #[arg(long, default_value = "linearizable", value_parser = parse_consistency)]
    pub consistency: ReadConsistency,
    #[command(flatten)]
    pub endpoints: Endpoints,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON (one object per node).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub endpoints: Endpoints,
}

fn parse_consistency(s: &str) -> Result<ReadConsistency, String> {
    s.parse()
}

async fn connect(e: &Endpoints) -> Result<Client, KvError> {
    let client = Client::connect(ClientConfig::new(e.list())).await?;
    if let Some(path) = &e.session {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let token = hex_decode(text.trim()).ok_or_else(|| {
                    KvError::InvalidArgument(format!(
                        "session file {} does not hold a session token",
                        path.display()
                    ))
                })?;
                client.join_session(&token)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(KvError::InvalidArgument(format!(
                    "read session file {}: {e}",
                    path.display()
                )))
            }
        }
    }
    Ok(client)
}

/// Writes the client's read session back to `--session`, if given: merged with what
/// the file holds now (another command may have saved meanwhile; a lock beside the file
/// keeps two saves apart), through a temporary file renamed over it (a crash leaves the
/// old token or the new one, never a torn one).
fn save_session(client: &Client, e: &Endpoints) {
    let Some(path) = &e.session else { return };
    if let Err(err) = merge_into_session_file(client, path) {
        eprintln!(
            "warning: could not save the session in {}: {err}",
            path.display()
        );
    }
}

fn merge_into_session_file(client: &Client, path: &std::path::Path) -> std::io::Result<()> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    lock.lock()?;
    let mut token = capkv_types::SessionToken::decode(&client.session_token())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if let Ok(text) = std::fs::read_to_string(path) {
        if let Some(saved) =
            hex_decode(text.trim()).and_then(|b| capkv_types::SessionToken::decode(&b).ok())
        {
            token.merge(&saved);
        }
    }
    let hex: String = token.encode().iter().map(|b| format!("{b:02x}")).collect();
    let mut tmp_path = path.as_os_str().to_owned();
    tmp_path.push(format!(".tmp.{}", std::process::id()));
    std::fs::write(&tmp_path, hex + "\n")?;
    std::fs::rename(&tmp_path, path)?;
    lock.unlock()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn fail(e: KvError) -> i32 {
    eprintln!("error: {e}");
    2
}

pub async fn put(a: PutArgs) -> i32 {
    crate::init_logging("warn");
    let client = match connect(&a.endpoints).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let condition = match (a.if_revision, a.if_absent) {
        (Some(r), _) => Condition::IfRevision(r),
        (None, true) => Condition::IfAbsent,
        (None, false) => Condition::Always,
    };
    let result = client
        .put_with(a.key.into_bytes(), a.value.into_bytes(), condition)
        .await;
    save_session(&client, &a.endpoints);
    match result {
        Ok(r) if r.succeeded => {
            outln!("OK revision={} partition={}", r.revision, r.partition);
            0
        }
        Ok(r) => {
            outln!("CONDITION FAILED current_revision={}", r.current_revision);
            1
        }
        Err(e) => fail(e),
    }
}

pub async fn get(a: GetArgs) -> i32 {
    crate::init_logging("warn");
    let client = match connect(&a.endpoints).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let result = match a.consistency {
        Some(level) => client.read(a.key.into_bytes(), level).await,
        None => client
            .get(a.key.into_bytes())
            .await
            .map(|kv| capkv_client::Read {
                kv,
                partition: capkv_types::PartitionId(0),
                served_by: 0,
                applied_index: 0,
                stale_ms_at_most: None,
                behind_positions_at_most: None,
            }),
    };
    save_session(&client, &a.endpoints);
    let read = match result {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if a.verbose && read.served_by != 0 {
        let mut how = format!(
            "served_by={} applied_index={}",
            read.served_by, read.applied_index
        );
        if let Some(ms) = read.stale_ms_at_most {
            how.push_str(&format!(" stale_ms_at_most={ms}"));
        }
        if let Some(k) = read.behind_positions_at_most {
            how.push_str(&format!(" behind_positions_at_most={k}"));
        }
        eprintln!("{how}");
    }
    match read.kv {
        Some(kv) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&kv.value);
            let _ = out.write_all(b"\n");
            if a.verbose {
                eprintln!(
                    "mod_revision={} create_revision={} hlc={}",
                    kv.mod_revision, kv.create_revision, kv.hlc
                );
            }
            0
        }
        None => {
            eprintln!("not found");
            1
        }
    }
}

pub async fn del(a: DelArgs) -> i32 {
    crate::init_logging("warn");
    let client = match connect(&a.endpoints).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let result = client.delete_with(a.key.into_bytes(), a.if_revision).await;
    save_session(&client, &a.endpoints);
    match result {
        Ok(r) if r.succeeded => {
            outln!("OK revision={} partition={}", r.revision, r.partition);
            0
        }
        Ok(r) if r.current_revision != 0 => {
            outln!("CONDITION FAILED current_revision={}", r.current_revision);
            1
        }
        Ok(_) => {
            eprintln!("not found");
            1
        }
        Err(e) => fail(e),
    }
}

pub async fn scan(a: ScanArgs) -> i32 {
    crate::init_logging("warn");
    let client = match connect(&a.endpoints).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut opts = ScanOptions {
        prefix: a.prefix.map(String::into_bytes).unwrap_or_default(),
        start: a.from.map(String::into_bytes).unwrap_or_default(),
        end: a.to.map(String::into_bytes).unwrap_or_default(),
        limit: a.limit.clamp(1, 1000) as u32,
        consistency: a.consistency,
        continuation: vec![],
    };
    let mut printed = 0usize;
    let mut out = std::io::stdout().lock();
    while printed < a.limit {
        opts.limit = opts.limit.min((a.limit - printed) as u32);
        let page = match client.scan(&opts).await {
            Ok(p) => p,
            Err(e) => {
                // The pages printed so far were seen by the session.
                save_session(&client, &a.endpoints);
                return fail(e);
            }
        };
        for kv in &page.kvs {
            let _ = out.write_all(&kv.key);
            let _ = out.write_all(b"\t");
            let _ = out.write_all(&kv.value);
            let _ = out.write_all(b"\n");
        }
        printed += page.kvs.len();
        if page.continuation.is_empty() {
            break;
        }
        opts.continuation = page.continuation;
    }
    save_session(&client, &a.endpoints);
    0
}

pub async fn status(a: StatusArgs) -> i32 {
    crate::init_logging("warn");
    let client = match connect(&a.endpoints).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut views = Vec::new();
    for (id, addr) in client.node_addrs() {
        views.push((id, addr.clone(), client.node_status(&addr).await));
    }
    if a.json {
        let nodes: Vec<serde_json::Value> = views
            .iter()
            .map(|(id, addr, r)| match r {
                Ok(s) => serde_json::json!({
                    "node_id": id.0, "addr": addr, "up": true, "version": s.version,
                    "partition_count": s.partition_count, "replication_factor": s.replication_factor,
                    "read_policy": s.read_policy, "lease_read_ms": s.lease_read_ms,
                    "vote_hold_remaining_ms": s.vote_hold_remaining_ms,
                    "snapshots_sending": s.snapshots_sending,
                    "snapshots_receiving": s.snapshots_receiving,
                    "snapshot_bytes_sent": s.snapshot_bytes_sent,
                    "snapshot_bytes_received": s.snapshot_bytes_received,
                    "http": s.http_addr, "resp": s.resp_addr, "json": s.json_addr,
                    "partitions": s.partitions.iter().map(|p| serde_json::json!({
                        "id": p.id, "replicas": p.replicas, "role": p.role, "leader": p.leader_id,
                        "term": p.term, "last_log_index": p.last_log_index, "commit_index": p.commit_index,
                        "applied_index": p.applied_index, "snapshot_index": p.snapshot_index,
                        "purged_index": p.purged_index,
                    })).collect::<Vec<_>>(),
                }),
                Err(e) => serde_json::json!({"node_id": id.0, "addr": addr, "up": false, "error": e.to_string()}),
            })
            .collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "nodes": nodes }))
                .unwrap_or_default()
        );
        return 0;
    }
    outln!("NODE  ADDR                   STATE");
    for (id, addr, r) in &views {
        let state = match r {
            Ok(s) => {
                let reads = match (s.read_policy.as_str(), s.lease_read_ms) {
                    ("lease", ms) => format!("lease reads ({ms} ms)"),
                    ("", _) => "reads: unknown".to_string(),
                    (other, _) => format!("{other} reads"),
                };
                let hold = match s.vote_hold_remaining_ms {
                    0 => String::new(),
                    ms => format!(", holding its vote for {ms} ms more"),
                };
                let snapshots = if s.snapshots_sending + s.snapshots_receiving > 0 {
                    format!(
                        ", snapshots: sending {} ({} KiB sent), receiving {} ({} KiB received)",
                        s.snapshots_sending,
                        s.snapshot_bytes_sent / 1024,
                        s.snapshots_receiving,
                        s.snapshot_bytes_received / 1024
                    )
                } else {
                    String::new()
                };
                format!(
                    "up (v{}, {} partitions, rf {}, {reads}{hold}{snapshots})",
                    s.version, s.partition_count, s.replication_factor
                )
            }
            Err(e) => format!("DOWN: {e}"),
        };
        outln!("{:<5} {:<22} {}", id.0, addr, state);
    }
    outln!();
    outln!("NODE  gRPC                   RESP                   HTTP                   JSON");
    for (id, addr, r) in &views {
        if let Ok(s) = r {
            let or_off = |a: &str| {
                if a.is_empty() {
                    "off".to_string()
                } else {
                    a.to_string()
                }
            };
            outln!(
                "{:<5} {:<22} {:<22} {:<22} {}",
                id.0,
                addr,
                or_off(&s.resp_addr),
                or_off(&s.http_addr),
                or_off(&s.json_addr)
            );
        }
    }
    outln!();
    outln!("PARTITION  LEADER  TERM  REPLICAS      APPLIED (per node)");
    let Some(count) = views
        .iter()
        .find_map(|(_, _, r)| r.as_ref().ok().map(|s| s.partition_count))
    else {
        return 2;
    };
    for p in 0..count {
        let mut leader = 0;
        let mut term = 0;
        let mut replicas = String::new();
        let mut applied = Vec::new();
        for (id, _, r) in &views {
            if let Ok(s) = r {
                if let Some(ps) = s.partitions.iter().find(|x| x.id == p) {
                    if replicas.is_empty() {
                        replicas = ps
                            .replicas
                            .iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(",");
                    }
                    if ps.term >= term && ps.leader_id != 0 {
                        term = ps.term;
                        leader = ps.leader_id;
                    }
                    if !ps.role.is_empty() {
                        applied.push(format!("n{}={}", id.0, ps.applied_index));
                    }
                }
            }
        }
        let leader = if leader == 0 {
            "-".to_string()
        } else {
            leader.to_string()
        };
        outln!(
            "{:<10} {:<7} {:<5} {:<13} {}",
            p,
            leader,
            term,
            replicas,
            applied.join(" ")
        );
    }
    0
}
