//! Workloads: what each client does, and how each outcome is recorded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capkv_client::{Client, Condition};
use capkv_testkit::resp::{RespClient, Value as RespValue};
use capkv_types::{ErrorCode, KvError, ReadConsistency};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::history::{Event, EventType, Func, HistoryWriter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Read / write / compare-and-set on a few keys; every written value is unique.
    Register,
    /// Each client adds unique elements to sets (read-modify-write with compare-and-set).
    AppendSet,
    /// Half the clients each grow a sequence of keys in one partition (element `i` is
    /// written only after `i - 1` was acknowledged, at a key in no particular order); the
    /// others read whole sequences with one scan. A read must see `1..=n` for some `n`.
    Sequence,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Register => "register",
            WorkloadKind::AppendSet => "append-set",
            WorkloadKind::Sequence => "sequence",
        }
    }

    pub fn key(self, i: usize) -> String {
        match self {
            WorkloadKind::Register => format!("reg-{i}"),
            WorkloadKind::AppendSet => format!("set-{i}"),
            WorkloadKind::Sequence => format!("seq-{i}"),
        }
    }
}

/// Elements per generation of a sequence: then its writer starts a new one (so a read
/// scans at most this many keys).
pub const SEQUENCE_LENGTH: u64 = 100;

/// The key of element `i` of generation `g` of sequence `s`, in partition `p`: the
/// generation's prefix, then a hash of `i` (so elements are in no order of `i`), then
/// the first number that puts the key in `p`.
pub fn sequence_key(s: u64, g: u64, i: u64, p: u32, partitions: u32) -> String {
    let mut h = i ^ (s << 48) ^ (g << 24);
    h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    let mut n = 0u32;
    loop {
        let key = format!("{}{h:016x}.{n}", sequence_prefix(s, g));
        if capkv_types::partition_for_key(key.as_bytes(), partitions).0 == p {
            return key;
        }
        n += 1;
    }
}

/// The keys of generation `g` of sequence `s` all start with this.
pub fn sequence_prefix(s: u64, g: u64) -> String {
    format!("seq-{s}.{g}/")
}

/// Counts shown by the progress bar.
#[derive(Debug, Default)]
pub struct Counters {
    pub ok: AtomicU64,
    pub fail: AtomicU64,
    pub info: AtomicU64,
}

/// Records events in order, to the history file and in memory.
pub struct Recorder {
    start: Instant,
    inner: Mutex<(HistoryWriter, Vec<Event>)>,
    pub counters: Counters,
}

/// What a completion adds to its event.
#[derive(Debug, Default, Clone)]
pub struct Completion {
    pub value: Option<u64>,
    pub succeeded: Option<bool>,
    pub elements: Option<Vec<u64>>,
    pub error: Option<String>,
    /// The revision written or read (see `Event::revision`).
    pub revision: Option<u64>,
    /// The log position written or read at (see `Event::position`).
    pub position: Option<u64>,
}

impl Recorder {
    pub fn new(writer: HistoryWriter) -> Self {
        Recorder {
            start: Instant::now(),
            inner: Mutex::new((writer, Vec::new())),
            counters: Counters::default(),
        }
    }

    fn push(&self, mut e: Event) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        e.index = guard.1.len() as u64;
        e.time_ns = self.start.elapsed().as_nanos() as u64;
        e.wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Err(err) = guard.0.write(&e) {
            tracing::error!(error = %err, "cannot write the history file");
        }
        guard.1.push(e);
    }

    pub fn invoke(&self, process: u64, f: Func, key: &str, value: Option<u64>, from: Option<u64>) {
        self.push(Event {
            index: 0,
            kind: EventType::Invoke,
            process,
            f,
            key: key.to_string(),
            value,
            from,
            succeeded: None,
            elements: None,
            revision: None,
            position: None,
            time_ns: 0,
            wall_ms: 0,
            error: None,
        });
    }

    pub fn complete(&self, process: u64, f: Func, key: &str, kind: EventType, c: Completion) {
        match kind {
            EventType::Ok => self.counters.ok.fetch_add(1, Ordering::Relaxed),
            EventType::Fail => self.counters.fail.fetch_add(1, Ordering::Relaxed),
            _ => self.counters.info.fetch_add(1, Ordering::Relaxed),
        };
        self.push(Event {
            index: 0,
            kind,
            process,
            f,
            key: key.to_string(),
            value: c.value,
            from: None,
            succeeded: c.succeeded,
            elements: c.elements,
            revision: c.revision,
            position: c.position,
            time_ns: 0,
            wall_ms: 0,
            error: c.error,
        });
    }

    /// Flushes the file and returns the events.
    pub fn finish(self) -> std::io::Result<Vec<Event>> {
        let (writer, events) = self.inner.into_inner().unwrap_or_else(|p| p.into_inner());
        writer.finish()?;
        Ok(events)
    }
}

/// Outcome type of a failed write: unknown if it may have happened.
fn write_failure(e: &KvError) -> EventType {
    if e.code() == ErrorCode::Ambiguous {
        EventType::Info
    } else {
        EventType::Fail
    }
}

fn err(e: &KvError) -> Completion {
    Completion {
        error: Some(e.to_string()),
        ..Default::default()
    }
}

fn parse_u64(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn parse_set(bytes: &[u8]) -> Vec<u64> {
    std::str::from_utf8(bytes)
        .unwrap_or("")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect()
}

pub struct ClientTask {
    pub kind: WorkloadKind,
    /// The RESP address this client speaks to (`--protocol resp`), else gRPC.
    pub resp: Option<String>,
    /// Sequence workload: each sequence's generation now (its writer moves it on).
    pub generations: Arc<Vec<AtomicU64>>,
    pub partitions: u32,
    pub client: Client,
    pub index: u64,
    pub clients: u64,
    pub keys: usize,
    pub consistency: ReadConsistency,
    pub seed: u64,
    pub recorder: Arc<Recorder>,
    pub values: Arc<AtomicU64>,
    pub deadline: Instant,
}

impl ClientTask {
    /// Runs operations until the deadline. A process whose operation ended `info` may
    /// still have it in flight, so the task continues under a new process id.
    pub async fn run(self) {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ self.index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut process = self.index;
        let mut last_seen: HashMap<String, (Option<u64>, u64)> = HashMap::new();
        if self.kind == WorkloadKind::Sequence {
            return self.sequence(&mut rng, process).await;
        }
        if let Some(addr) = self.resp.clone() {
            return self.register_resp(&addr, &mut rng, process).await;
        }
        while Instant::now() < self.deadline {
            let key = self.kind.key(rng.random_range(0..self.keys));
            let roll = rng.random_range(0..100u32);
            let outcome = match self.kind {
                WorkloadKind::Register => {
                    self.register_op(process, &key, roll, &mut last_seen).await
                }
                WorkloadKind::AppendSet => {
                    if roll < 80 {
                        self.add(process, &key).await
                    } else {
                        self.read_set(process, &key).await
                    }
                }
                WorkloadKind::Sequence => unreachable!("run by `sequence`"),
            };
            if outcome == EventType::Info {
                process += self.clients;
            }
        }
    }

    /// The sequence workload: even clients write sequence `index / 2`, odd ones read.
    async fn sequence(&self, rng: &mut ChaCha8Rng, mut process: u64) {
        let sequences = self.generations.len() as u64;
        if self.index % 2 == 1 {
            while Instant::now() < self.deadline {
                let s = rng.random_range(0..sequences);
                let g = self.generations[s as usize].load(Ordering::Relaxed);
                if self.read_sequence(process, s, g).await == EventType::Info {
                    process += self.clients;
                }
            }
            return;
        }
        let s = self.index / 2;
        let Some(generation) = self.generations.get(s as usize) else {
            return;
        };
        let p = (s % self.partitions as u64) as u32;
        let mut i = 1;
        while Instant::now() < self.deadline {
            let g = generation.load(Ordering::Relaxed);
            let name = format!("seq-{s}.{g}");
            let key = sequence_key(s, g, i, p, self.partitions);
            let rec = &self.recorder;
            rec.invoke(process, Func::Add, &name, Some(i), None);
            let (kind, c) = match self.client.put(key, i.to_string()).await {
                Ok(_) => (EventType::Ok, Completion::default()),
                Err(e) => (write_failure(&e), err(&e)),
            };
            rec.complete(process, Func::Add, &name, kind, c);
            match kind {
                EventType::Ok => i += 1,
                // Certainly not written: write it again.
                EventType::Fail => tokio::time::sleep(Duration::from_millis(50)).await,
                // It may apply or not: a later element must not follow it in this
                // generation (a read could see it without this one, rightly).
                _ => {
                    process += self.clients;
                    i = SEQUENCE_LENGTH + 1;
                }
            }
            if i > SEQUENCE_LENGTH {
                generation.fetch_add(1, Ordering::Relaxed);
                i = 1;
            }
        }
    }

    /// Reads generation `g` of sequence `s` with one scan.
    async fn read_sequence(&self, process: u64, s: u64, g: u64) -> EventType {
        let rec = &self.recorder;
        let name = format!("seq-{s}.{g}");
        rec.invoke(process, Func::ReadSet, &name, None, None);
        let options = capkv_client::ScanOptions {
            prefix: sequence_prefix(s, g).into_bytes(),
            limit: (SEQUENCE_LENGTH + 1) as u32,
            consistency: self.consistency,
            ..Default::default()
        };
        let (kind, c) = match self.client.scan(&options).await {
            Ok(page) if page.continuation.is_empty() => (
                EventType::Ok,
                Completion {
                    elements: Some(
                        page.kvs
                            .iter()
                            .filter_map(|kv| parse_u64(&kv.value))
                            .collect(),
                    ),
                    ..Default::default()
                },
            ),
            Ok(_) => (
                EventType::Fail,
                Completion {
                    error: Some("the scan did not fit one page".into()),
                    ..Default::default()
                },
            ),
            Err(e) => (EventType::Fail, err(&e)),
        };
        rec.complete(process, Func::ReadSet, &name, kind, c);
        kind
    }

    fn next_value(&self) -> u64 {
        self.values.fetch_add(1, Ordering::Relaxed)
    }

    async fn register_op(
        &self,
        process: u64,
        key: &str,
        roll: u32,
        last_seen: &mut HashMap<String, (Option<u64>, u64)>,
    ) -> EventType {
        let rec = &self.recorder;
        if roll < 50 {
            rec.invoke(process, Func::Read, key, None, None);
            let (kind, c) = match self.client.read(key, self.consistency).await {
                Ok(capkv_client::Read {
                    kv: Some(kv),
                    applied_index,
                    ..
                }) => {
                    let v = parse_u64(&kv.value);
                    last_seen.insert(key.to_string(), (v, kv.mod_revision));
                    (
                        EventType::Ok,
                        Completion {
                            value: v,
                            revision: Some(kv.mod_revision),
                            position: Some(applied_index),
                            ..Default::default()
                        },
                    )
                }
                Ok(capkv_client::Read {
                    kv: None,
                    applied_index,
                    ..
                }) => {
                    last_seen.insert(key.to_string(), (None, 0));
                    (
                        EventType::Ok,
                        Completion {
                            revision: Some(0),
                            position: Some(applied_index),
                            ..Default::default()
                        },
                    )
                }
                // A read has no effect: whatever went wrong, it certainly did not happen.
                Err(e) => (EventType::Fail, err(&e)),
            };
            rec.complete(process, Func::Read, key, kind, c);
            return kind;
        }
        let v = self.next_value();
        match last_seen.get(key).copied().filter(|_| roll >= 80) {
            None => {
                rec.invoke(process, Func::Write, key, Some(v), None);
                let (kind, c) = match self.client.put(key, v.to_string()).await {
                    Ok(r) => (
                        EventType::Ok,
                        Completion {
                            revision: Some(r.revision),
                            position: (r.log_position > 0).then_some(r.log_position),
                            ..Default::default()
                        },
                    ),
                    Err(e) => (write_failure(&e), err(&e)),
                };
                rec.complete(process, Func::Write, key, kind, c);
                kind
            }
            Some((from, revision)) => {
                rec.invoke(process, Func::Cas, key, Some(v), from);
                let condition = if from.is_none() {
                    Condition::IfAbsent
                } else {
                    Condition::IfRevision(revision)
                };
                let (kind, c) = match self.client.put_with(key, v.to_string(), condition).await {
                    Ok(r) => (
                        EventType::Ok,
                        Completion {
                            succeeded: Some(r.succeeded),
                            revision: r.succeeded.then_some(r.revision),
                            position: (r.succeeded && r.log_position > 0).then_some(r.log_position),
                            ..Default::default()
                        },
                    ),
                    Err(e) => (write_failure(&e), err(&e)),
                };
                rec.complete(process, Func::Cas, key, kind, c);
                kind
            }
        }
    }

    /// The register workload through the Redis protocol, on one connection to `addr`
    /// (reopened after an operation whose outcome is unknown).
    async fn register_resp(&self, addr: &str, rng: &mut ChaCha8Rng, mut process: u64) {
        let mut conn: Option<RespClient> = None;
        let mut last_seen: HashMap<String, Option<u64>> = HashMap::new();
        while Instant::now() < self.deadline {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match self.resp_connect(addr).await {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let key = self.kind.key(rng.random_range(0..self.keys));
            let roll = rng.random_range(0..100u32);
            let (kind, broken) = self
                .resp_register_op(c, process, &key, roll, &mut last_seen)
                .await;
            if kind == EventType::Info {
                process += self.clients;
            }
            if broken {
                conn = None;
            }
        }
    }

    async fn resp_connect(&self, addr: &str) -> anyhow::Result<RespClient> {
        let mut c = RespClient::connect(addr).await?;
        c.set_timeout(Duration::from_secs(20));
        if self.consistency != ReadConsistency::Linearizable {
            let level = self.consistency.to_string();
            match c.call(&["CAPKV.CONSISTENCY", &level]).await? {
                RespValue::Simple(_) => {}
                other => anyhow::bail!("CAPKV.CONSISTENCY {level}: {other:?}"),
            }
        }
        Ok(c)
    }

    /// One register operation through RESP; whether the connection must be reopened.
    async fn resp_register_op(
        &self,
        c: &mut RespClient,
        process: u64,
        key: &str,
        roll: u32,
        last_seen: &mut HashMap<String, Option<u64>>,
    ) -> (EventType, bool) {
        let rec = &self.recorder;
        if roll < 50 {
            rec.invoke(process, Func::Read, key, None, None);
            let (kind, c, broken) = match c.call(&["GET", key]).await {
                Ok(RespValue::Bulk(b)) => {
                    let v = parse_u64(&b);
                    last_seen.insert(key.to_string(), v);
                    (
                        EventType::Ok,
                        Completion {
                            value: v,
                            ..Default::default()
                        },
                        false,
                    )
                }
                Ok(RespValue::Null) => {
                    last_seen.insert(key.to_string(), None);
                    (EventType::Ok, Completion::default(), false)
                }
                // A read has no effect: whatever went wrong, it certainly did not happen.
                Ok(other) => (EventType::Fail, resp_error(&other), false),
                Err(e) => (EventType::Fail, error_text(e.to_string()), true),
            };
            rec.complete(process, Func::Read, key, kind, c);
            return (kind, broken);
        }
        let v = self.next_value();
        let vs = v.to_string();
        let Some(from) = last_seen.get(key).copied().filter(|_| roll >= 80) else {
            rec.invoke(process, Func::Write, key, Some(v), None);
            let (kind, c, broken) = match c.call(&["SET", key, &vs]).await {
                Ok(RespValue::Simple(s)) if s == "OK" => {
                    (EventType::Ok, Completion::default(), false)
                }
                Ok(other) => (resp_failure(&other), resp_error(&other), false),
                Err(e) => (EventType::Info, error_text(e.to_string()), true),
            };
            rec.complete(process, Func::Write, key, kind, c);
            return (kind, broken);
        };
        // Compare-and-set: WATCH, read, and a transaction that runs only if the key did
        // not change since the WATCH.
        rec.invoke(process, Func::Cas, key, Some(v), from);
        let cas = async {
            c.call(&["WATCH", key]).await?;
            let current = match c.call(&["GET", key]).await? {
                RespValue::Bulk(b) => parse_u64(&b),
                RespValue::Null => None,
                other => return Ok(Err(other)),
            };
            if current != from {
                c.call(&["UNWATCH"]).await?;
                return Ok(Ok(false));
            }
            c.call(&["MULTI"]).await?;
            c.call(&["SET", key, &vs]).await?;
            anyhow::Ok(match c.call(&["EXEC"]).await? {
                RespValue::Array(_) => Ok(true),
                RespValue::Null => Ok(false),
                other => Err(other),
            })
        };
        let (kind, comp, broken) = match cas.await {
            Ok(Ok(succeeded)) => (
                EventType::Ok,
                Completion {
                    succeeded: Some(succeeded),
                    ..Default::default()
                },
                false,
            ),
            // An error before EXEC applied nothing; EXEC's own error says what it knows.
            Ok(Err(other)) => (resp_failure(&other), resp_error(&other), true),
            Err(e) => (EventType::Info, error_text(e.to_string()), true),
        };
        rec.complete(process, Func::Cas, key, kind, comp);
        (kind, broken)
    }

    /// Adds a unique element: read the set, compare-and-set it with the element appended,
    /// retry on conflict.
    async fn add(&self, process: u64, key: &str) -> EventType {
        let rec = &self.recorder;
        let e = self.next_value();
        rec.invoke(process, Func::Add, key, Some(e), None);
        let mut maybe_applied = false;
        let mut last_error = String::from("too many conflicting writers");
        let mut kind = None;
        let give_up = Instant::now() + Duration::from_secs(10);
        for _ in 0..30 {
            if Instant::now() > give_up {
                break;
            }
            let current = match self.client.get(key).await {
                Ok(c) => c,
                Err(err) => {
                    last_error = err.to_string();
                    break;
                }
            };
            let (mut elements, condition) = match &current {
                Some(kv) => (parse_set(&kv.value), Condition::IfRevision(kv.mod_revision)),
                None => (Vec::new(), Condition::IfAbsent),
            };
            if elements.contains(&e) {
                // An earlier attempt whose outcome was unknown did apply.
                kind = Some(EventType::Ok);
                break;
            }
            elements.push(e);
            let value = elements
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            match self.client.put_with(key, value, condition).await {
                Ok(r) if r.succeeded => {
                    kind = Some(EventType::Ok);
                    break;
                }
                Ok(_) => continue,
                Err(err) => {
                    last_error = err.to_string();
                    if err.code() == ErrorCode::Ambiguous {
                        maybe_applied = true;
                        continue;
                    }
                    break;
                }
            }
        }
        let kind = kind.unwrap_or(if maybe_applied {
            EventType::Info
        } else {
            EventType::Fail
        });
        let c = if kind == EventType::Ok {
            Completion::default()
        } else {
            Completion {
                error: Some(last_error),
                ..Default::default()
            }
        };
        rec.complete(process, Func::Add, key, kind, c);
        kind
    }

    async fn read_set(&self, process: u64, key: &str) -> EventType {
        read_set_once(&self.client, &self.recorder, process, key, self.consistency).await
    }
}

/// A RESP error's outcome: `AMBIGUOUS` may have applied; every other error did not.
fn resp_failure(v: &RespValue) -> EventType {
    match v {
        RespValue::Error(e) if e.starts_with("AMBIGUOUS") => EventType::Info,
        RespValue::Error(_) => EventType::Fail,
        // Not an answer a write gets: its outcome is unknown.
        _ => EventType::Info,
    }
}

fn resp_error(v: &RespValue) -> Completion {
    error_text(match v {
        RespValue::Error(e) => e.clone(),
        other => format!("unexpected reply {other:?}"),
    })
}

fn error_text(e: String) -> Completion {
    Completion {
        error: Some(e),
        ..Default::default()
    }
}

pub async fn read_set_once(
    client: &Client,
    rec: &Recorder,
    process: u64,
    key: &str,
    level: ReadConsistency,
) -> EventType {
    rec.invoke(process, Func::ReadSet, key, None, None);
    let (kind, c) = match client.get_with(key, level).await {
        Ok(Some(kv)) => (
            EventType::Ok,
            Completion {
                elements: Some(parse_set(&kv.value)),
                ..Default::default()
            },
        ),
        Ok(None) => (
            EventType::Ok,
            Completion {
                elements: Some(vec![]),
                ..Default::default()
            },
        ),
        Err(e) => (EventType::Fail, err(&e)),
    };
    rec.complete(process, Func::ReadSet, key, kind, c);
    kind
}

/// After the faults are healed: read every key until a read succeeds (or `limit` passes).
pub async fn final_reads(
    kind: WorkloadKind,
    client: &Client,
    rec: &Recorder,
    keys: usize,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    for i in 0..keys {
        let key = kind.key(i);
        let process = 1_000_000 + i as u64;
        loop {
            let outcome = match kind {
                WorkloadKind::AppendSet => {
                    read_set_once(client, rec, process, &key, ReadConsistency::Linearizable).await
                }
                WorkloadKind::Sequence => break,
                WorkloadKind::Register => {
                    rec.invoke(process, Func::Read, &key, None, None);
                    let (k, c) = match client.get(key.as_str()).await {
                        Ok(v) => (
                            EventType::Ok,
                            Completion {
                                value: v.and_then(|kv| parse_u64(&kv.value)),
                                ..Default::default()
                            },
                        ),
                        Err(e) => (EventType::Fail, err(&e)),
                    };
                    rec.complete(process, Func::Read, &key, k, c);
                    k
                }
            };
            if outcome == EventType::Ok || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
