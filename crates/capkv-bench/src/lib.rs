//! `capkv bench`: a closed-loop load generator. Each client task sends one request at a
//! time and records its latency in an HDR histogram; the same code drives capkv (through
//! `capkv-client`) and etcd (through etcd's v3 gRPC KV API), so both are measured alike.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use capkv_client::{Client, ClientConfig};
use capkv_proto::etcd::{kv_client::KvClient as EtcdKvClient, PutRequest, RangeRequest};
use capkv_types::ReadConsistency;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Capkv,
    Etcd,
}

/// What each request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Put,
    Get,
    /// `read_percent`% gets, the rest puts.
    Mixed {
        read_percent: u8,
    },
}

impl std::str::FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "put" => Ok(Workload::Put),
            "get" => Ok(Workload::Get),
            _ => {
                let pct = s.strip_prefix("mixed:").ok_or_else(|| {
                    format!("unknown workload {s:?}; expected put, get or mixed:R (R% reads)")
                })?;
                match pct.parse::<u8>() {
                    Ok(p) if p <= 100 => Ok(Workload::Mixed { read_percent: p }),
                    _ => Err(format!("{pct:?} is not a read percentage 0..=100")),
                }
            }
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workload::Put => f.write_str("put"),
            Workload::Get => f.write_str("get"),
            Workload::Mixed { read_percent } => write!(f, "mixed:{read_percent}"),
        }
    }
}

/// Read level: any of capkv's (`linearizable`, `linearizable-follower`, `bounded:K`,
/// `bounded:100ms`, `session`, `prefix`, `eventual`). etcd takes `linearizable` and its
/// `serializable` (a member's local state), which `prefix` and `eventual` map to;
/// `serializable` and `local` name capkv's `prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLevel(pub ReadConsistency);

impl ReadLevel {
    pub const LINEARIZABLE: ReadLevel = ReadLevel(ReadConsistency::Linearizable);

    /// etcd's `serializable` flag for this level, if etcd has the level.
    fn etcd_serializable(self) -> Option<bool> {
        match self.0 {
            ReadConsistency::Linearizable => Some(false),
            ReadConsistency::Prefix | ReadConsistency::Eventual => Some(true),
            _ => None,
        }
    }
}

impl Serialize for ReadLevel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl std::str::FromStr for ReadLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "serializable" | "local" => Ok(ReadLevel(ReadConsistency::Prefix)),
            other => other.parse().map(ReadLevel),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub target: Target,
    pub endpoints: Vec<String>,
    pub workload: Workload,
    pub clients: usize,
    pub conns: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub key_size: usize,
    pub value_size: usize,
    pub keys: u64,
    /// Zipf exponent; `None` = uniform keys.
    pub zipf: Option<f64>,
    pub read_level: ReadLevel,
    /// Write every key once before measuring (for get and mixed workloads).
    pub preload: bool,
    pub seed: u64,
    pub progress: bool,
}

/// The key of index `i`: zero-padded decimal, exactly `key_size` bytes.
pub fn key_name(i: u64, key_size: usize) -> Vec<u8> {
    format!("{i:0key_size$}").into_bytes()
}

/// Checks that `keys` distinct keys fit in `key_size` bytes.
pub fn check_key_space(keys: u64, key_size: usize) -> Result<(), String> {
    let digits = keys.saturating_sub(1).max(1).to_string().len();
    if keys == 0 {
        return Err("--keys must be at least 1".into());
    }
    if key_size < digits {
        return Err(format!(
            "--key-size {key_size} cannot hold {keys} distinct keys (needs {digits} bytes)"
        ));
    }
    Ok(())
}

enum Driver {
    Capkv(Vec<Client>),
    Etcd(Vec<EtcdKvClient<Channel>>),
}

impl Driver {
    async fn connect(o: &BenchOptions) -> anyhow::Result<Driver> {
        let conns = o.conns.max(1);
        match o.target {
            Target::Capkv => {
                let mut clients = Vec::new();
                for _ in 0..conns {
                    let mut cfg = ClientConfig::new(o.endpoints.clone());
                    cfg.request_timeout = Duration::from_secs(10);
                    clients.push(Client::connect(cfg).await.context("connect to capkv")?);
                }
                Ok(Driver::Capkv(clients))
            }
            Target::Etcd => {
                let mut clients = Vec::new();
                for i in 0..conns {
                    let addr = &o.endpoints[i % o.endpoints.len()];
                    let channel = Endpoint::from_shared(format!("http://{addr}"))?
                        .tcp_nodelay(true)
                        .connect_timeout(Duration::from_secs(2))
                        .connect()
                        .await
                        .with_context(|| format!("connect to etcd at {addr}"))?;
                    clients.push(EtcdKvClient::new(channel));
                }
                Ok(Driver::Etcd(clients))
            }
        }
    }

    fn conns(&self) -> usize {
        match self {
            Driver::Capkv(c) => c.len(),
            Driver::Etcd(c) => c.len(),
        }
    }

    async fn put(&self, conn: usize, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        match self {
            Driver::Capkv(c) => c[conn]
                .put(key, value)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Driver::Etcd(c) => {
                let mut kv = c[conn].clone();
                kv.put(PutRequest {
                    key,
                    value,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
            }
        }
    }

    /// A read; returns the capkv node that served it (0 for etcd).
    async fn get(&self, conn: usize, key: Vec<u8>, level: ReadLevel) -> Result<u64, String> {
        match self {
            Driver::Capkv(c) => c[conn]
                .read(key, level.0)
                .await
                .map(|r| r.served_by)
                .map_err(|e| e.to_string()),
            Driver::Etcd(c) => {
                let mut kv = c[conn].clone();
                let req = RangeRequest {
                    key,
                    serializable: level.etcd_serializable() == Some(true),
                    ..Default::default()
                };
                kv.range(req).await.map(|_| 0).map_err(|e| e.to_string())
            }
        }
    }
}

/// The result of a run. Latencies in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub target: Target,
    pub workload: String,
    pub clients: usize,
    pub conns: usize,
    pub duration_s: f64,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub errors: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub error_samples: Vec<String>,
    /// capkv reads: how many each node served (by node id).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub served_by: std::collections::BTreeMap<u64, u64>,
}

impl BenchResult {
    pub fn from_histogram(
        o: &BenchOptions,
        conns: usize,
        h: &Histogram<u64>,
        errors: u64,
        measured: Duration,
        error_samples: Vec<String>,
    ) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        let secs = measured.as_secs_f64().max(1e-9);
        BenchResult {
            target: o.target,
            workload: o.workload.to_string(),
            clients: o.clients,
            conns,
            duration_s: secs,
            ops: h.len(),
            ops_per_sec: h.len() as f64 / secs,
            errors,
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            error_samples,
            served_by: Default::default(),
        }
    }

    /// `ops=... ops/s=... p50=... p90=... p99=... max=... errors=...`, then the share of
    /// reads each node served (`served: n1=..% n2=..%`), for capkv reads.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "ops={} ops/s={:.1} p50={:.3}ms p90={:.3}ms p99={:.3}ms max={:.3}ms errors={}",
            self.ops,
            self.ops_per_sec,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.max_ms,
            self.errors
        );
        let reads: u64 = self.served_by.values().sum();
        if reads > 0 {
            s.push_str(" served:");
            for (node, n) in &self.served_by {
                s.push_str(&format!(
                    " n{node}={:.0}%",
                    *n as f64 * 100.0 / reads as f64
                ));
            }
        }
        s
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 min at 3 significant digits. The bounds are valid constants.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

struct KeyChooser {
    keys: u64,
    zipf: Option<rand_distr::Zipf<f64>>,
}

impl KeyChooser {
    fn new(keys: u64, zipf: Option<f64>) -> anyhow::Result<Self> {
        let zipf = match zipf {
            Some(theta) => Some(
                rand_distr::Zipf::new(keys as f64, theta)
                    .map_err(|e| anyhow::anyhow!("--zipf {theta}: {e}"))?,
            ),
            None => None,
        };
        Ok(KeyChooser { keys, zipf })
    }

    fn next(&self, rng: &mut ChaCha8Rng) -> u64 {
        match &self.zipf {
            // Zipf samples 1..=n, rank 1 the most frequent.
            Some(z) => (rng.sample(z) as u64).clamp(1, self.keys) - 1,
            None => rng.random_range(0..self.keys),
        }
    }
}

fn values(count: usize, size: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED);
    (0..count)
        .map(|_| (0..size).map(|_| rng.random_range(b'a'..=b'z')).collect())
        .collect()
}

/// Runs a benchmark.
pub async fn run(o: BenchOptions) -> anyhow::Result<BenchResult> {
    check_key_space(o.keys, o.key_size).map_err(anyhow::Error::msg)?;
    if o.endpoints.is_empty() {
        bail!("no endpoints");
    }
    if o.target == Target::Etcd && o.read_level.etcd_serializable().is_none() {
        bail!(
            "etcd has no {} reads: use linearizable or serializable",
            o.read_level.0
        );
    }
    let driver = Arc::new(Driver::connect(&o).await?);
    let conns = driver.conns();
    let values = Arc::new(values(256, o.value_size, o.seed));
    let chooser = Arc::new(KeyChooser::new(o.keys, o.zipf)?);

    if o.preload && o.workload != Workload::Put {
        preload(&driver, &o, &values).await?;
    }

    let measured_ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let samples: Arc<Mutex<Vec<String>>> = Arc::default();
    let start = Instant::now();
    let measure_from = start + o.warmup;
    let end = measure_from + o.duration;
    let mut tasks = Vec::new();
    for c in 0..o.clients.max(1) {
        let driver = driver.clone();
        let values = values.clone();
        let chooser = chooser.clone();
        let measured_ops = measured_ops.clone();
        let errors = errors.clone();
        let samples = samples.clone();
        let o = o.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(o.seed.wrapping_add(c as u64 * 7919));
            let mut hist = new_histogram();
            let mut served: std::collections::BTreeMap<u64, u64> = Default::default();
            let conn = c % conns;
            let mut n = 0usize;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let key = key_name(chooser.next(&mut rng), o.key_size);
                let read = match o.workload {
                    Workload::Put => false,
                    Workload::Get => true,
                    Workload::Mixed { read_percent } => rng.random_range(0..100u8) < read_percent,
                };
                let result = if read {
                    driver.get(conn, key, o.read_level).await.map(Some)
                } else {
                    n += 1;
                    driver
                        .put(conn, key, values[n % values.len()].clone())
                        .await
                        .map(|()| None)
                };
                if began < measure_from {
                    continue;
                }
                match result {
                    Ok(by) => {
                        if let Some(node) = by.filter(|n| *n != 0) {
                            *served.entry(node).or_default() += 1;
                        }
                        let us = began.elapsed().as_micros().max(1) as u64;
                        let _ = hist.record(us.min(60_000_000));
                        measured_ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
                        if s.len() < 5 {
                            s.push(e);
                        }
                    }
                }
            }
            (hist, served)
        }));
    }

    let bar = if o.progress {
        indicatif::ProgressBar::new((o.warmup + o.duration).as_secs().max(1))
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        bar.set_position(start.elapsed().as_secs());
        let now = Instant::now();
        if now > measure_from {
            let secs = (now - measure_from).as_secs_f64();
            let ops = measured_ops.load(Ordering::Relaxed);
            bar.set_message(format!(
                "ops={ops} ops/s={:.0} errors={}",
                ops as f64 / secs,
                errors.load(Ordering::Relaxed)
            ));
        } else {
            bar.set_message("warming up");
        }
    }
    bar.finish_and_clear();
    let mut total = new_histogram();
    let mut served: std::collections::BTreeMap<u64, u64> = Default::default();
    for t in tasks {
        let (h, by) = t.await.context("bench client task panicked")?;
        total.add(&h).context("merge histograms")?;
        for (node, n) in by {
            *served.entry(node).or_default() += n;
        }
    }
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut result = BenchResult::from_histogram(
        &o,
        conns,
        &total,
        errors.load(Ordering::Relaxed),
        o.duration,
        samples,
    );
    result.served_by = served;
    Ok(result)
}

/// Writes every key once, with the run's client count as concurrency.
async fn preload(
    driver: &Arc<Driver>,
    o: &BenchOptions,
    values: &Arc<Vec<Vec<u8>>>,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..o.clients.max(1) {
        let (driver, values, next) = (driver.clone(), values.clone(), next.clone());
        let (keys, key_size) = (o.keys, o.key_size);
        tasks.push(tokio::spawn(async move {
            let conn = c % driver.conns();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return Ok::<(), String>(());
                }
                let mut attempt = 0;
                while let Err(e) = driver
                    .put(
                        conn,
                        key_name(i, key_size),
                        values[i as usize % values.len()].clone(),
                    )
                    .await
                {
                    attempt += 1;
                    if attempt >= 5 {
                        return Err(format!("preloading key {i}: {e}"));
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await
            .context("preload task")?
            .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workloads_and_levels() {
        assert_eq!("put".parse::<Workload>(), Ok(Workload::Put));
        assert_eq!("get".parse::<Workload>(), Ok(Workload::Get));
        assert_eq!(
            "mixed:90".parse::<Workload>(),
            Ok(Workload::Mixed { read_percent: 90 })
        );
        assert!("mixed:101".parse::<Workload>().is_err());
        assert!("scan".parse::<Workload>().is_err());
        assert_eq!(Workload::Mixed { read_percent: 5 }.to_string(), "mixed:5");
        let prefix = Ok(ReadLevel(ReadConsistency::Prefix));
        assert_eq!("serializable".parse::<ReadLevel>(), prefix);
        assert_eq!("prefix".parse::<ReadLevel>(), prefix);
        assert_eq!(
            "bounded:50ms".parse::<ReadLevel>().map(|l| l.0.to_string()),
            Ok("bounded:50ms".to_string())
        );
        assert!("sometimes".parse::<ReadLevel>().is_err());
        assert_eq!(
            ReadLevel(ReadConsistency::Eventual).etcd_serializable(),
            Some(true)
        );
        assert_eq!(
            ReadLevel(ReadConsistency::Session).etcd_serializable(),
            None
        );
    }

    #[test]
    fn keys_have_the_requested_size() {
        assert_eq!(key_name(42, 8), b"00000042".to_vec());
        assert!(check_key_space(100_000, 8).is_ok());
        assert!(check_key_space(100_000, 4).is_err());
        assert!(check_key_space(0, 8).is_err());
        assert!(check_key_space(10, 1).is_ok(), "keys 0..=9 fit in one byte");
    }

    #[test]
    fn zipf_keys_stay_in_range_and_skew() {
        let chooser = KeyChooser::new(1000, Some(0.99)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut hot = 0;
        for _ in 0..10_000 {
            let k = chooser.next(&mut rng);
            assert!(k < 1000);
            hot += usize::from(k < 10);
        }
        assert!(
            hot > 2_000,
            "the 1% hottest keys should take a large share, got {hot}/10000"
        );
        let uniform = KeyChooser::new(1000, None).unwrap();
        let hot_uniform = (0..10_000).filter(|_| uniform.next(&mut rng) < 10).count();
        assert!(hot_uniform < 300);
    }

    #[test]
    fn summary_reports_percentiles_from_the_histogram() {
        let o = BenchOptions {
            target: Target::Capkv,
            endpoints: vec![],
            workload: Workload::Put,
            clients: 1,
            conns: 1,
            duration: Duration::from_secs(2),
            warmup: Duration::ZERO,
            key_size: 8,
            value_size: 8,
            keys: 10,
            zipf: None,
            read_level: ReadLevel::LINEARIZABLE,
            preload: false,
            seed: 1,
            progress: false,
        };
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap(); // 10 µs .. 10 ms
        }
        let r = BenchResult::from_histogram(&o, 1, &h, 0, Duration::from_secs(2), vec![]);
        assert_eq!(r.ops, 1000);
        assert!((r.ops_per_sec - 500.0).abs() < 1e-6);
        assert!((r.p50_ms - 5.0).abs() < 0.01, "p50 {}", r.p50_ms);
        assert!((r.p99_ms - 9.9).abs() < 0.02, "p99 {}", r.p99_ms);
        assert!((r.max_ms - 10.0).abs() < 0.02);
        assert!(
            r.summary().starts_with("ops=1000 ops/s=500.0 p50=5.00"),
            "{}",
            r.summary()
        );
    }
}
