//! `capkv bench`.

use capkv_bench::{BenchOptions, ReadLevel, Target, Workload};
use clap::{Args, ValueEnum};

use crate::check_cmd::parse_duration;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TargetArg {
    Capkv,
    Etcd,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// System under test.
    #[arg(long, value_enum, default_value_t = TargetArg::Capkv)]
    pub target: TargetArg,
    /// Comma-separated gRPC addresses (capkv nodes, or etcd client URLs' host:port).
    #[arg(long, env = "CAPKV_ENDPOINTS", default_value = "127.0.0.1:7379")]
    pub endpoints: String,
    /// put, get, or mixed:R (R% reads).
    #[arg(long, default_value = "put")]
    pub workload: Workload,
    /// Concurrent closed-loop clients (each has one request in flight).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Connections the clients share (capkv: one per node per connection set).
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    /// Measured time, after the warm-up.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: std::time::Duration,
    /// Time run but not measured.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: std::time::Duration,
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Zipf exponent for key popularity (default: uniform).
    #[arg(long)]
    pub zipf: Option<f64>,
    /// Read level: any capkv level (linearizable, linearizable-follower, bounded:K,
    /// bounded:100ms, session, prefix, eventual); etcd takes linearizable and serializable
    /// (compared with capkv's prefix). For capkv the share of reads each node served is
    /// printed too.
    #[arg(long, default_value = "linearizable")]
    pub consistency: ReadLevel,
    /// Do not write every key before a get or mixed run.
    #[arg(long)]
    pub no_preload: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(a: BenchArgs) -> i32 {
    crate::init_logging("error");
    let options = BenchOptions {
        target: match a.target {
            TargetArg::Capkv => Target::Capkv,
            TargetArg::Etcd => Target::Etcd,
        },
        endpoints: a
            .endpoints
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        workload: a.workload,
        clients: a.clients.max(1),
        conns: a.conns.max(1),
        duration: a.duration,
        warmup: a.warmup,
        key_size: a.key_size,
        value_size: a.value_size,
        keys: a.keys,
        zipf: a.zipf,
        read_level: a.consistency,
        preload: !a.no_preload,
        seed: a.seed,
        progress: !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    match capkv_bench::run(options).await {
        Ok(r) => {
            if a.json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                println!("{}", r.summary());
                for e in &r.error_samples {
                    eprintln!("error sample: {e}");
                }
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}
