//! Running a check: cluster, clients, nemesis, final reads, checkers, report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use capkv_client::{Client, ClientConfig};
use capkv_types::{ReadConsistency, Staleness};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::bounded::{check_positions, shift_reads};
use crate::cluster::Cluster;
use crate::convergence::replicas_converge;
use crate::history::{pair, EventType, Func, HistoryWriter, Operation};
use crate::linearizability::{
    check, smallest_failing_window, to_lin_ops, Budget, LinOp, State, Verdict, NEVER,
};
use crate::nemesis::{self, FaultKind};
use crate::prefix::check_prefix;
use crate::session::check_sessions;
use crate::sets::{check_sets, SetReport};
use crate::workload::{final_reads, ClientTask, Recorder, WorkloadKind};

pub use capkv_types::PlantedBug;

#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub nodes: usize,
    pub partitions: u32,
    pub workload: WorkloadKind,
    pub keys: usize,
    pub clients: usize,
    pub duration: Duration,
    pub nemesis: Vec<FaultKind>,
    pub seed: u64,
    pub out: PathBuf,
    pub consistency: ReadConsistency,
    /// Check an existing cluster instead of starting one.
    pub endpoints: Option<Vec<String>>,
    pub planted_bug: Option<PlantedBug>,
    /// More arguments for the servers `check` starts (e.g. `--read-policy read-index`).
    pub server_args: Vec<String>,
    /// The `capkv` executable to start servers with.
    pub server_exe: Option<PathBuf>,
    pub progress: bool,
    /// Time the linearizability search may take per key.
    pub check_time_per_key: Duration,
    /// How the clients reach the cluster: gRPC through the Rust client (routing to
    /// leaders), or the Redis protocol to any node (the node forwards).
    pub protocol: Protocol,
}

/// The clients' protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Grpc,
    /// The register workload through RESP: GET, SET, and compare-and-set as WATCH, GET,
    /// MULTI, SET, EXEC; each client on one node's RESP port, in turn.
    Resp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    Valid,
    Invalid,
    Unknown { reason: String },
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Valid => 0,
            Outcome::Invalid => 1,
            Outcome::Unknown { .. } => 2,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct KeyVerdict {
    pub key: String,
    pub operations: usize,
    pub verdict: String,
    /// For an invalid key: a short window of operations that cannot be linearized.
    pub window: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub outcome: Outcome,
    pub workload: String,
    pub seed: u64,
    pub ops: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    pub faults: u64,
    pub linearizability: Vec<KeyVerdict>,
    pub sets: BTreeMap<String, SetReport>,
    pub history: PathBuf,
    pub lines: Vec<String>,
}

fn describe(o: &Operation, op: &LinOp) -> String {
    let t = |ns: u64| format!("{:.3}s", ns as f64 / 1e9);
    let end = match (o.complete_ns, o.kind) {
        (Some(ns), EventType::Ok | EventType::Fail) => t(ns),
        _ => "?".to_string(),
    };
    let _ = NEVER;
    let what = match o.f {
        Func::Read => format!(
            "read -> {}",
            o.value
                .map(|v| v.to_string())
                .unwrap_or_else(|| "nil".into())
        ),
        Func::Write => format!("write {}", o.value.unwrap_or(0)),
        Func::Cas => format!(
            "cas {} -> {}{}",
            o.from
                .map(|v| v.to_string())
                .unwrap_or_else(|| "nil".into()),
            o.value.unwrap_or(0),
            match o.succeeded {
                Some(true) => " (succeeded)",
                Some(false) => " (did not match)",
                None => "",
            }
        ),
        Func::Add | Func::ReadSet => format!("{:?}", o.f),
    };
    let kind = match o.kind {
        EventType::Ok => "ok",
        EventType::Fail => "fail",
        EventType::Info => "unknown outcome",
        EventType::Invoke => "running",
    };
    format!(
        "[{} .. {}] process {:>4}  {what}  ({kind})",
        t(op.invoke),
        end,
        o.process
    )
}

/// Runs one check end to end.
pub async fn run(o: CheckOptions) -> anyhow::Result<Report> {
    if o.workload == WorkloadKind::Register && o.consistency == ReadConsistency::Prefix {
        bail!(
            "the register workload checks linearizable, bounded and session reads, and \
             eventual reads (replicas converge); prefix reads are checked by the sequence \
             workload: --workload sequence --consistency prefix"
        );
    }
    std::fs::create_dir_all(&o.out).with_context(|| format!("create {}", o.out.display()))?;
    let history_path = o.out.join("history.jsonl");
    let mut kinds = o.nemesis.clone();
    let cluster = match &o.endpoints {
        Some(endpoints) => {
            if !o.server_args.is_empty() {
                bail!("server arguments ({}) need a cluster that `check` starts itself (omit --endpoints)", o.server_args.join(" "));
            }
            if o.planted_bug.is_some() {
                bail!(
                    "--planted-bug needs a cluster that `check` starts itself (omit --endpoints)"
                );
            }
            let dropped: Vec<_> = kinds
                .iter()
                .filter(|k| k.needs_processes())
                .copied()
                .collect();
            if !dropped.is_empty() {
                eprintln!(
                    "note: {dropped:?} need process control; with --endpoints only partitions run"
                );
            }
            kinds.retain(|k| !k.needs_processes());
            Cluster::external(endpoints).await?
        }
        None => {
            let exe = o
                .server_exe
                .clone()
                .context("no capkv executable to start servers with")?;
            let dir = o.out.join("cluster");
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("clear {}", dir.display()))?;
            }
            let mut extra = o.server_args.clone();
            if let Some(bug) = o.planted_bug {
                extra.extend(["--planted-bug".to_string(), bug.name().to_string()]);
            }
            Cluster::start_local(&exe, &dir, o.nodes, o.partitions, extra).await?
        }
    };
    let endpoints = cluster.endpoints();
    let node_count = cluster.ids().len();
    if node_count < 2 {
        let (dropped, kept): (Vec<FaultKind>, Vec<FaultKind>) =
            kinds.iter().partition(|k| k.needs_peers());
        if !dropped.is_empty() {
            let names = |v: &[FaultKind]| v.iter().map(|k| k.name()).collect::<Vec<_>>().join(",");
            eprintln!(
                "note: {} need(s) two or more nodes; on one node the nemesis runs: {}",
                names(&dropped),
                if kept.is_empty() {
                    "none".to_string()
                } else {
                    names(&kept)
                }
            );
        }
        kinds = kept;
    }
    let partitions = cluster.partitions();

    let recorder = Arc::new(Recorder::new(HistoryWriter::create(&history_path)?));
    let values = Arc::new(AtomicU64::new(1));
    let mut client_cfg = ClientConfig::new(endpoints.clone());
    client_cfg.request_timeout = Duration::from_secs(2);
    client_cfg.attempt_timeout = Duration::from_secs(1);
    let mut clients = Vec::new();
    for _ in 0..o.clients {
        clients.push(Client::connect(client_cfg.clone()).await?);
    }

    let mut touched: Vec<u32> = (0..o.keys)
        .map(|i| capkv_types::partition_for_key(o.workload.key(i).as_bytes(), partitions).0)
        .collect();
    touched.sort_unstable();
    touched.dedup();
    let clock_rates = cluster.controls_processes() && nemesis::faketime_library().is_some();
    if kinds.contains(&FaultKind::Clock) && !clock_rates {
        eprintln!(
            "note: clock runs wall-clock jumps only; rate skew needs libfaketime \
             (Debian package faketime) and a cluster that `check` starts"
        );
    }
    let schedule = nemesis::plan(
        o.seed,
        &kinds,
        node_count,
        &touched,
        o.duration,
        clock_rates,
    );
    let start = Instant::now();
    let deadline = start + o.duration;
    let mut tasks = Vec::new();
    // Sequence workload: one sequence per writer (every other client).
    let generations: Arc<Vec<AtomicU64>> = Arc::new(
        (0..o.clients.div_ceil(2))
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    let mut resp_addrs = Vec::new();
    if o.protocol == Protocol::Resp {
        if o.workload != WorkloadKind::Register {
            bail!("--protocol resp runs the register workload only");
        }
        if matches!(
            o.consistency,
            ReadConsistency::Bounded(capkv_types::Staleness::Positions(_))
        ) {
            bail!("--protocol resp cannot check bounded:K (RESP answers carry no log positions)");
        }
        for addr in &endpoints {
            let status = capkv_client::fetch_node_status(addr, Duration::from_secs(5)).await?;
            if status.resp_addr.is_empty() {
                bail!("node {addr} serves no Redis protocol (started with --resp off?)");
            }
            resp_addrs.push(status.resp_addr);
        }
    }
    for (i, client) in clients.into_iter().enumerate() {
        let task = ClientTask {
            resp: (!resp_addrs.is_empty()).then(|| resp_addrs[i % resp_addrs.len()].clone()),
            kind: o.workload,
            client,
            index: i as u64,
            clients: o.clients as u64,
            keys: o.keys,
            generations: generations.clone(),
            partitions: o.partitions,
            consistency: o.consistency,
            seed: o.seed,
            recorder: recorder.clone(),
            values: values.clone(),
            deadline,
        };
        tasks.push(tokio::spawn(task.run()));
    }
    let shared = Arc::new(Mutex::new(cluster));
    let injected = Arc::new(AtomicU64::new(0));
    let nemesis_task = tokio::spawn(nemesis::execute(
        shared.clone(),
        schedule,
        start,
        injected.clone(),
    ));

    let bar = if o.progress {
        indicatif::ProgressBar::new(o.duration.as_secs().max(1))
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let c = &recorder.counters;
        bar.set_position(start.elapsed().as_secs());
        bar.set_message(format!(
            "ok={} fail={} unknown={} faults={}",
            c.ok.load(Ordering::Relaxed),
            c.fail.load(Ordering::Relaxed),
            c.info.load(Ordering::Relaxed),
            injected.load(Ordering::Relaxed)
        ));
    }
    bar.finish_and_clear();

    // Let operations in flight finish (bounded); anything left is recorded as unknown.
    let grace = Instant::now() + Duration::from_secs(30);
    for t in tasks {
        let left = grace.saturating_duration_since(Instant::now());
        let mut t = t;
        if tokio::time::timeout(left, &mut t).await.is_err() {
            t.abort();
        }
    }
    nemesis_task.abort();
    let _ = nemesis_task.await;
    let mut cluster = Arc::try_unwrap(shared)
        .map_err(|_| anyhow::anyhow!("nemesis still holds the cluster"))?
        .into_inner();
    let healed = async {
        cluster.heal_all().await?;
        cluster.wait_ready(Duration::from_secs(60)).await
    }
    .await;
    if let Err(e) = healed {
        cluster.shutdown();
        bail!("the cluster did not recover after the faults were healed: {e:#}");
    }
    let final_client = Client::connect(client_cfg.clone()).await?;
    final_reads(
        o.workload,
        &final_client,
        &recorder,
        o.keys,
        Duration::from_secs(60),
    )
    .await;
    // Writes have stopped and the faults are healed: every replica must converge.
    let converged = replicas_converge(
        &final_client,
        &cluster.endpoints(),
        cluster.partitions(),
        Duration::from_secs(60),
    )
    .await;
    cluster.shutdown();

    let recorder = Arc::try_unwrap(recorder)
        .map_err(|_| anyhow::anyhow!("a client still holds the recorder"))?;
    let events = recorder.finish()?;
    let ops = pair(&events);
    // The cluster's own partition count (an external cluster may differ from --partitions):
    // the session checker groups keys by partition.
    let o = CheckOptions { partitions, ..o };
    let mut report = analyse(&o, ops, injected.load(Ordering::Relaxed), history_path);
    let line = match converged {
        Ok(c) => format!(
            "replicas: converged ({} partitions, {} replicas equal, {} keys; {} ms after healing)",
            c.partitions,
            c.replicas,
            c.keys,
            c.waited.as_millis()
        ),
        Err(why) => {
            report.outcome = Outcome::Invalid;
            format!("replicas: DIVERGED: {why}")
        }
    };
    // Before the history path, which ends the report.
    let at = report.lines.len().saturating_sub(1);
    report.lines.insert(at, line);
    Ok(report)
}

/// Runs the checkers over recorded operations and builds the report.
pub fn analyse(o: &CheckOptions, ops: Vec<Operation>, faults: u64, history: PathBuf) -> Report {
    let count = |k: EventType| ops.iter().filter(|x| x.kind == k).count();
    let (ok, fail, unknown) = (
        count(EventType::Ok),
        count(EventType::Fail),
        count(EventType::Info),
    );
    let mut lines = vec![format!(
        "workload={} ops={} ok={ok} fail={fail} unknown={unknown} faults={faults} seed={}",
        o.workload.name(),
        ops.len(),
        o.seed
    )];
    let mut outcome = Outcome::Valid;
    let mut lin = Vec::new();
    let mut sets = BTreeMap::new();
    match o.workload {
        // Eventual reads promise nothing per read; the convergence check is their proof.
        WorkloadKind::Register if o.consistency == ReadConsistency::Eventual => {
            lines.push("eventual reads: no per-read guarantee to check (see replicas)".into());
        }
        WorkloadKind::Register if o.consistency == ReadConsistency::Session => {
            let r = check_sessions(&ops, o.clients as u64, o.partitions);
            if r.violations.is_empty() {
                lines.push(format!(
                    "sessions: valid ({} sessions, {} operations checked)",
                    r.sessions, r.checked
                ));
            } else {
                outcome = Outcome::Invalid;
                let mut broken: Vec<&str> = r.violations.iter().map(|v| v.guarantee).collect();
                broken.sort();
                broken.dedup();
                lines.push(format!(
                    "sessions: INVALID, {} violations ({}) in {} sessions, {} operations checked",
                    r.violations.len(),
                    broken.join(", "),
                    r.sessions,
                    r.checked
                ));
                for v in r.violations.iter().take(10) {
                    lines.push(format!(
                        "  session {} key {} op #{}: {}: {}",
                        v.session, v.key, v.index, v.guarantee, v.detail
                    ));
                }
            }
        }
        WorkloadKind::Register
            if matches!(
                o.consistency,
                ReadConsistency::Bounded(Staleness::Positions(_))
            ) =>
        {
            let ReadConsistency::Bounded(Staleness::Positions(k)) = o.consistency else {
                unreachable!()
            };
            let r = check_positions(&ops, k, o.partitions);
            if r.violations.is_empty() {
                lines.push(format!(
                    "bounded:{k}: valid ({} reads checked, largest lag proven {})",
                    r.reads, r.max_proven_lag
                ));
            } else {
                outcome = Outcome::Invalid;
                lines.push(format!(
                    "bounded:{k}: INVALID, {} reads more than {k} log positions behind of {} \
                     checked (largest lag proven {})",
                    r.violations.len(),
                    r.reads,
                    r.max_proven_lag
                ));
                for v in r.violations.iter().take(10) {
                    lines.push(format!("  key {} op #{}: {}", v.key, v.index, v.detail));
                }
            }
        }
        WorkloadKind::Register => {
            // Bounded by time: linearizable with every read allowed to take effect up to
            // the bound before it began (see `bounded`).
            let read_shift_ns = match o.consistency {
                ReadConsistency::Bounded(Staleness::Millis(ms)) => ms * 1_000_000,
                _ => 0,
            };
            let label = if read_shift_ns > 0 {
                format!(
                    "{} (linearizable, reads moved back by the bound)",
                    o.consistency
                )
            } else {
                "linearizable".to_string()
            };
            let mut by_key: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
            for op in &ops {
                by_key.entry(op.key.as_str()).or_default().push(op.clone());
            }
            let mut invalid = Vec::new();
            let mut too_large = Vec::new();
            for (key, key_ops) in &by_key {
                let mut lin_ops = to_lin_ops(key_ops);
                shift_reads(&mut lin_ops, read_shift_ns);
                let budget = Budget {
                    deadline: Some(Instant::now() + o.check_time_per_key),
                    ..Default::default()
                };
                let verdict = check(&lin_ops, State::Known(None), budget);
                let mut window = Vec::new();
                match &verdict {
                    Verdict::Linearizable => {}
                    Verdict::NotLinearizable => {
                        invalid.push(key.to_string());
                        let shrink_budget = Budget {
                            deadline: Some(Instant::now() + o.check_time_per_key),
                            ..Default::default()
                        };
                        if let Some(w) =
                            smallest_failing_window(&lin_ops, State::Known(None), shrink_budget)
                        {
                            window = w.iter().map(|l| describe(&key_ops[l.source], l)).collect();
                        }
                    }
                    Verdict::TooLarge(why) => too_large.push(format!("{key}: {why}")),
                }
                lin.push(KeyVerdict {
                    key: key.to_string(),
                    operations: lin_ops.len(),
                    verdict: match &verdict {
                        Verdict::Linearizable => "valid".into(),
                        Verdict::NotLinearizable => "invalid".into(),
                        Verdict::TooLarge(w) => format!("too large to check: {w}"),
                    },
                    window,
                });
            }
            if !invalid.is_empty() {
                outcome = Outcome::Invalid;
                lines.push(format!(
                    "{label}: INVALID on {} of {} keys: {}",
                    invalid.len(),
                    by_key.len(),
                    invalid.join(", ")
                ));
                for kv in lin.iter().filter(|k| !k.window.is_empty()) {
                    lines.push(format!(
                        "smallest failing window on key {} ({} ops):",
                        kv.key,
                        kv.window.len()
                    ));
                    lines.extend(kv.window.iter().map(|l| format!("  {l}")));
                }
            } else if !too_large.is_empty() {
                outcome = Outcome::Unknown {
                    reason: format!("too large to check: {}", too_large.join("; ")),
                };
                lines.push(format!(
                    "{label}: UNKNOWN, too large to check ({})",
                    too_large.join("; ")
                ));
            } else {
                lines.push(format!("{label}: valid ({} keys checked)", by_key.len()));
            }
        }
        WorkloadKind::Sequence => {
            let r = check_prefix(&ops);
            let what = format!(
                "{} reads, {} not empty, {} elements seen",
                r.reads, r.nonempty, r.elements_seen
            );
            if r.violations.is_empty() {
                lines.push(format!("prefix: valid ({what})"));
            } else {
                outcome = Outcome::Invalid;
                lines.push(format!(
                    "prefix: INVALID, {} reads saw a gap ({what})",
                    r.violations.len()
                ));
                for v in r.violations.iter().take(10) {
                    lines.push(format!("  {} op #{}: {}", v.key, v.index, v.detail));
                }
            }
        }
        WorkloadKind::AppendSet => {
            sets = check_sets(&ops);
            let lost: usize = sets.values().map(|r| r.lost.len()).sum();
            let acked: usize = sets.values().map(|r| r.acked).sum();
            let unexpected: usize = sets.values().map(|r| r.unexpected.len()).sum();
            let unread: Vec<&String> = sets
                .iter()
                .filter(|(_, r)| !r.final_read)
                .map(|(k, _)| k)
                .collect();
            if lost > 0 || unexpected > 0 {
                outcome = Outcome::Invalid;
            } else if !unread.is_empty() {
                outcome = Outcome::Unknown {
                    reason: format!("no final read succeeded for {unread:?}"),
                };
            }
            let verdict = match &outcome {
                Outcome::Valid => "valid",
                Outcome::Invalid => "INVALID",
                Outcome::Unknown { .. } => "UNKNOWN",
            };
            lines.push(format!(
                "sets: {verdict} ({} keys, {acked} acknowledged adds)   lost acknowledged writes: {lost}   unexpected elements: {unexpected}",
                sets.len()
            ));
            for (k, r) in sets.iter().filter(|(_, r)| !r.lost.is_empty()) {
                lines.push(format!(
                    "  key {k}: lost {:?}",
                    &r.lost[..r.lost.len().min(20)]
                ));
            }
        }
    }
    lines.push(format!("history: {}", history.display()));
    Report {
        outcome,
        workload: o.workload.name().into(),
        seed: o.seed,
        ops: ops.len(),
        ok,
        fail,
        unknown,
        faults,
        linearizability: lin,
        sets,
        history,
        lines,
    }
}
