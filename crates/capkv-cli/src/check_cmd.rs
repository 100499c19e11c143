//! `capkv check`.

use std::path::PathBuf;
use std::time::Duration;

use capkv_check::nemesis::FaultKind;
use capkv_check::workload::WorkloadKind;
use capkv_check::{CheckOptions, Protocol};
use capkv_types::ReadConsistency;
use clap::{Args, ValueEnum};

use crate::server_cmd::{PlantedBugArg, ReadPolicyArg};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WorkloadArg {
    /// Reads, writes and compare-and-sets of a few keys (linearizability, bounded
    /// staleness, sessions).
    Register,
    /// Adds to sets with compare-and-set (lost acknowledged writes).
    AppendSet,
    /// Sequences of keys grown in order and read with one scan (consistent prefix).
    Sequence,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Nodes of the cluster `check` starts.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    #[arg(long, value_enum, default_value_t = WorkloadArg::Register)]
    pub workload: WorkloadArg,
    #[arg(long, default_value_t = 8)]
    pub keys: usize,
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// How long the workload runs, e.g. 60s, 2m, 500ms.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Faults to inject: all (default), none, or a comma-separated list of partition,
    /// oneway, kill, restart, pause, clock, disk.
    #[arg(long, default_value = "all", value_parser = parse_nemesis)]
    pub nemesis: Nemeses,
    /// Seed of the fault schedule and the clients' choices (random when omitted).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value = "./check-out")]
    pub out: PathBuf,
    /// Read level the workload uses. The register workload checks `linearizable` reads
    /// for linearizability and `session` reads for the four session guarantees (each
    /// client is one session).
    #[arg(long, default_value = "linearizable", value_parser = parse_consistency)]
    pub consistency: ReadConsistency,
    /// Check an existing cluster instead (only faults through the nodes' Admin service
    /// run: partition, oneway, clock jumps; its nodes need --unsafe-fault-injection).
    #[arg(long)]
    pub endpoints: Option<String>,
    /// Start the cluster with a known bug, to see the checker catch it.
    #[arg(long, value_enum)]
    pub planted_bug: Option<PlantedBugArg>,
    /// How the started servers confirm leadership for linearizable reads (the server's
    /// default when omitted).
    #[arg(long, value_enum)]
    pub read_policy: Option<ReadPolicyArg>,
    /// Snapshot (compact) the started servers' logs every this many entries, so that
    /// nodes that were down or cut off catch up from snapshots under the faults (the
    /// server's default when omitted).
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Time the linearizability search may spend per key.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub check_time_per_key: Duration,
    /// How the clients reach the cluster: grpc (the Rust client, routing to leaders) or
    /// resp (the Redis protocol to every node in turn, which forward; register workload,
    /// compare-and-set as WATCH/MULTI/EXEC).
    #[arg(long, value_enum, default_value_t = ProtocolArg::Grpc)]
    pub protocol: ProtocolArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    Grpc,
    Resp,
}

fn parse_consistency(s: &str) -> Result<ReadConsistency, String> {
    s.parse()
}

/// A comma-separated list of faults (one clap value).
#[derive(Debug, Clone)]
pub struct Nemeses(pub Vec<FaultKind>);

fn parse_nemesis(s: &str) -> Result<Nemeses, String> {
    FaultKind::parse_list(s).map(Nemeses)
}

/// `90s`, `2m`, `1500ms`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 60s, 2m or 500ms"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub async fn run(a: CheckArgs) -> i32 {
    crate::init_logging("warn");
    let seed = a.seed.unwrap_or_else(rand::random);
    let options = CheckOptions {
        nodes: a.nodes,
        partitions: a.partitions,
        workload: match a.workload {
            WorkloadArg::Register => WorkloadKind::Register,
            WorkloadArg::AppendSet => WorkloadKind::AppendSet,
            WorkloadArg::Sequence => WorkloadKind::Sequence,
        },
        keys: a.keys.max(1),
        clients: a.clients.max(1),
        duration: a.duration,
        nemesis: a.nemesis.0.clone(),
        seed,
        out: a.out.clone(),
        consistency: a.consistency,
        endpoints: a
            .endpoints
            .as_ref()
            .map(|e| e.split(',').map(|s| s.trim().to_string()).collect()),
        planted_bug: a.planted_bug.map(PlantedBugArg::bug),
        server_args: {
            let mut args = Vec::new();
            if let Some(p) = a.read_policy {
                let name = p.to_possible_value().map(|v| v.get_name().to_string());
                args.extend(["--read-policy".to_string(), name.unwrap_or_default()]);
            }
            if let Some(n) = a.snapshot_every {
                args.extend(["--snapshot-every".to_string(), n.to_string()]);
            }
            args
        },
        server_exe: std::env::current_exe().ok(),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        check_time_per_key: a.check_time_per_key,
        protocol: match a.protocol {
            ProtocolArg::Grpc => Protocol::Grpc,
            ProtocolArg::Resp => Protocol::Resp,
        },
    };
    eprintln!(
        "check: workload={} protocol={:?} nodes={} clients={} duration={:?} nemesis={} seed={seed} out={}",
        options.workload.name(),
        options.protocol,
        options.nodes,
        options.clients,
        options.duration,
        options
            .nemesis
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(","),
        options.out.display()
    );
    match capkv_check::run(options).await {
        Ok(report) => {
            for line in &report.lines {
                println!("{line}");
            }
            let json = a.out.join("report.json");
            if let Ok(text) = serde_json::to_string_pretty(&report) {
                let _ = std::fs::write(&json, text);
            }
            report.outcome.exit_code()
        }
        Err(e) => {
            eprintln!("error: the check could not run: {e:#} (seed={seed})");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
