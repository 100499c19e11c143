//! The Redis protocol (RESP2, and RESP3 after `HELLO 3`) on every node: redis-cli,
//! redis-benchmark and Redis client libraries work against any node of a cluster, with
//! capkv's replication and durability behind them. Only strings exist; Redis's command
//! reference is the specification of each command's replies and errors.
//!
//! A connection reads as many requests as have arrived (pipelining), runs commands whose
//! keys differ side by side, and answers in order. Each connection has its own read level
//! (`CAPKV.CONSISTENCY`, the node's default at first) and read session.
//! Read-modify-write commands (INCR*, APPEND, SETRANGE, GETSET, SET .. GET, GETDEL, MSETNX)
//! are one replicated command each (`Op::Update`, `Op::PutMany`), so they are atomic and,
//! with the router's idempotency pair, never applied twice by a retry.

pub mod codec;
pub mod commands;
pub mod plan;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use capkv_replication::{parse_i64, Condition, KeyCounts, Op, StepAnswer};
use capkv_types::{KvError, ReadConsistency, SessionToken};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::frontend::stop_signal;
use crate::kv::{rejection_error, ScanParams};
use crate::router::Router;
use codec::{decode, DecodeLimits, Reply};
use commands::{lookup, Kind, Spec, COMMANDS};
use plan::{answer_of, Plan, Step};

const PROTOCOL: &str = "resp";
/// Requests of one connection decoded before their answers are written.
pub const PIPELINE_MAX: usize = 1024;
/// FLUSHDB / FLUSHALL without ASYNC refuse a keyspace larger than this.
pub const FLUSH_SYNC_MAX: usize = 10_000;
/// SCAN cursors a connection keeps (the oldest is forgotten first).
const CURSORS_MAX: usize = 64;

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// One connection's state.
struct Conn {
    id: u64,
    version: u8,
    level: ReadConsistency,
    name: Option<Vec<u8>>,
    /// The connection's read session: a `session` read sees the connection's writes.
    session: Mutex<SessionToken>,
    cursors: Mutex<Cursors>,
    quit: bool,
    /// Inside MULTI: the commands queued for EXEC.
    multi: Option<Vec<Plan>>,
    /// A command could not be queued: EXEC discards the transaction.
    multi_failed: bool,
    /// WATCHed keys and their mod_revision when watched (0 = absent).
    watched: Vec<(Vec<u8>, u64)>,
}

#[derive(Default)]
struct Cursors {
    next: u64,
    /// SCAN cursor -> the continuation token of the scan it resumes.
    open: HashMap<u64, Vec<u8>>,
}

impl Conn {
    fn session(&self) -> SessionToken {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Merges a scan's positions into the session.
    fn observe_all(&self, seen: &SessionToken) {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .merge(seen);
    }

    fn observe(&self, p: capkv_types::PartitionId, at: u64) {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(p, at);
    }
}

pub fn decode_limits(router: &Router) -> DecodeLimits {
    let l = router.core().limits();
    DecodeLimits {
        args_max: 2 * l.batch_keys_max + 16,
        bulk_max: l.value_bytes_max.max(l.key_bytes_max),
        inline_max: 64 * 1024,
        request_max: l.message_bytes_max(),
    }
}

/// Serves one connection until the client closes it or sends `QUIT`, the stream is not
/// RESP (answered with an error, then closed), or the node stops.
pub async fn connection(router: Arc<Router>, mut tcp: TcpStream, shutdown: watch::Receiver<bool>) {
    let limits = decode_limits(&router);
    let mut conn = Conn {
        id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
        version: 2,
        level: router.core().default_consistency(),
        name: None,
        session: Mutex::new(SessionToken::default()),
        cursors: Mutex::new(Cursors::default()),
        quit: false,
        multi: None,
        multi_failed: false,
        watched: Vec::new(),
    };
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    // One waiter for the whole connection (a new one per read costs a registration).
    let stopping = stop_signal(shutdown);
    tokio::pin!(stopping);
    loop {
        // Every whole request that has arrived, up to the pipeline limit.
        let mut requests = Vec::new();
        let mut used = 0;
        let mut broken: Option<codec::ProtocolError> = None;
        while requests.len() < PIPELINE_MAX {
            match decode(&buf[used..], &limits) {
                Ok(Some((args, n))) => {
                    used += n;
                    if !args.is_empty() {
                        requests.push(args);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        buf.drain(..used);
        if !requests.is_empty() {
            for reply in run_pipeline(&router, &mut conn, requests).await {
                reply.encode(conn.version, &mut out);
            }
        }
        if let Some(e) = broken {
            crate::frontend::count(
                &router,
                PROTOCOL,
                "protocol-error",
                Err(&KvError::InvalidArgument(e.0.clone())),
            );
            Reply::err(format!("Protocol error: {}", e.0)).encode(conn.version, &mut out);
            let _ = tcp.write_all(&out).await;
            break;
        }
        if !out.is_empty() {
            if tcp.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        if conn.quit {
            break;
        }
        if !buf.is_empty() && decode(&buf, &limits).ok().flatten().is_some() {
            continue; // more whole requests than one pipeline's worth
        }
        let n = tokio::select! {
            r = tcp.read(&mut chunk) => match r { Ok(n) => n, Err(_) => break },
            _ = &mut stopping => break,
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let _ = tcp.shutdown().await;
}

/// Runs a pipeline's requests and returns their replies in order: a command that touches
/// only keys no earlier command of its run touches (or no key) runs beside them; any
/// other waits for the run before it.
async fn run_pipeline(
    router: &Arc<Router>,
    conn: &mut Conn,
    requests: Vec<Vec<Vec<u8>>>,
) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(requests.len());
    let mut run: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut run_keys: std::collections::HashSet<Vec<u8>> = Default::default();
    for args in requests {
        let spec = lookup(&args[0]);
        let control = spec.is_some_and(|s| TXN_CONTROL.contains(&s.name));
        if conn.multi.is_some() && !control {
            if !run.is_empty() {
                replies.extend(run_together(router, conn, std::mem::take(&mut run)).await);
                run_keys.clear();
            }
            replies.push(queue(router, conn, &args));
            continue;
        }
        let kind = spec.map_or(Kind::Free, |s| s.kind);
        let keys: Vec<Vec<u8>> = match spec {
            Some(s) if kind == Kind::Keyed => {
                s.keys(&args).into_iter().map(<[u8]>::to_vec).collect()
            }
            _ => vec![],
        };
        let clashes = kind == Kind::Barrier || keys.iter().any(|k| run_keys.contains(k));
        if clashes && !run.is_empty() {
            replies.extend(run_together(router, conn, std::mem::take(&mut run)).await);
            run_keys.clear();
        }
        if kind == Kind::Barrier {
            replies.push(barrier(router, conn, &args).await);
            if conn.quit {
                return replies;
            }
            continue;
        }
        run_keys.extend(keys);
        run.push(args);
    }
    if !run.is_empty() {
        replies.extend(run_together(router, conn, run).await);
    }
    replies
}

async fn run_together(router: &Router, conn: &Conn, run: Vec<Vec<Vec<u8>>>) -> Vec<Reply> {
    if run.len() == 1 {
        return vec![execute(router, conn, &run[0]).await];
    }
    let mut futures: FuturesOrdered<_> =
        run.iter().map(|args| execute(router, conn, args)).collect();
    let mut replies = Vec::with_capacity(run.len());
    while let Some(r) = futures.next().await {
        replies.push(r);
    }
    replies
}

/// The commands that act on a transaction rather than join it.
const TXN_CONTROL: &[&str] = &["exec", "discard", "multi", "watch", "quit"];

/// Queues a command inside MULTI.
fn queue(router: &Router, conn: &mut Conn, args: &[Vec<u8>]) -> Reply {
    let Some(spec) = checked(args) else {
        conn.multi_failed = true;
        return unknown_or_arity(args);
    };
    let queued = conn.multi.get_or_insert_with(Vec::new);
    if queued.len() >= router.core().limits().batch_keys_max {
        conn.multi_failed = true;
        return Reply::err("too many commands in one MULTI");
    }
    if spec.name == "unwatch" {
        // EXEC forgets the watched keys anyway; queued, it only answers OK.
        queued.push(Plan::fixed(Reply::ok()));
        return Reply::Simple("QUEUED".into());
    }
    if spec.kind == Kind::Barrier {
        conn.multi_failed = true;
        return Reply::err(format!(
            "'{}' is not supported inside MULTI by capkv",
            spec.name
        ));
    }
    let plan = plan::plan(router, spec, args);
    conn.multi.get_or_insert_with(Vec::new).push(plan);
    Reply::Simple("QUEUED".into())
}

/// EXEC: every queued command's steps, guarded by the WATCHed keys, as one replicated
/// transaction of one partition; each command's reply made from its share of the answers.
async fn exec(
    router: &Router,
    conn: &Conn,
    plans: Vec<Plan>,
    watched: Vec<(Vec<u8>, u64)>,
) -> Reply {
    let steps: Vec<Op> = plans
        .iter()
        .flat_map(|p| p.steps.iter().cloned().map(Step::into_op))
        .collect();
    if steps.is_empty() && watched.is_empty() {
        let now = router.core().hlc().now().physical_ms();
        return Reply::Array(plans.iter().map(|p| p.reply(vec![], now)).collect());
    }
    let (served, r) = match router
        .write(Op::Txn {
            guards: watched,
            steps,
        })
        .await
    {
        Ok(w) => w,
        Err(e) => return kv_error(&e),
    };
    if !r.succeeded {
        return Reply::NullArray;
    }
    conn.observe(served.partition, r.log_index.max(served.applied_index));
    let now = router.core().hlc().now().physical_ms();
    let mut answers = r.steps.into_iter();
    let replies = plans
        .iter()
        .map(|plan| {
            let mine = answers
                .by_ref()
                .take(plan.steps.len())
                .map(|a| match a.rejected {
                    Some(why) => Err(kv_error(&rejection_error(served.partition, why, None))),
                    None => Ok(a),
                });
            plan.reply(mine.collect(), now)
        })
        .collect();
    Reply::Array(replies)
}

/// A command's reply, counted in the metrics.
async fn execute(router: &Router, conn: &Conn, args: &[Vec<u8>]) -> Reply {
    let Some(spec) = checked(args) else {
        return unknown_or_arity(args);
    };
    let reply = run_plan(router, conn, &plan::plan(router, spec, args)).await;
    count(router, spec.name, &reply);
    reply
}

fn count(router: &Router, command: &str, reply: &Reply) {
    let err = match reply {
        Reply::Error(e) => Some(KvError::InvalidArgument(e.clone())),
        _ => None,
    };
    crate::frontend::count(router, PROTOCOL, command, err.as_ref().map_or(Ok(()), Err));
}

/// The command's spec when it exists and has a valid number of arguments.
fn checked(args: &[Vec<u8>]) -> Option<&'static Spec> {
    lookup(&args[0]).filter(|s| s.arity_ok(args.len()))
}

fn unknown_or_arity(args: &[Vec<u8>]) -> Reply {
    match lookup(&args[0]) {
        Some(s) => wrong_args(s.name),
        None => {
            let mut msg = format!(
                "unknown command '{}', with args beginning with: ",
                String::from_utf8_lossy(&args[0])
            );
            for a in args.iter().skip(1).take(16) {
                msg.push_str(&format!("'{}' ", String::from_utf8_lossy(a)));
            }
            Reply::err(msg)
        }
    }
}

pub(crate) fn wrong_args(name: &str) -> Reply {
    Reply::err(format!("wrong number of arguments for '{name}' command"))
}

pub(crate) fn syntax() -> Reply {
    Reply::err("syntax error")
}

pub(crate) fn not_integer() -> Reply {
    Reply::err("value is not an integer or out of range")
}

/// capkv's errors as RESP errors: `ERR` for bad requests (Redis's own words where Redis
/// has them), capkv's stable code in capitals otherwise (`CROSSPARTITION`, `UNAVAILABLE`,
/// `AMBIGUOUS`, ...).
pub fn kv_error(e: &KvError) -> Reply {
    match e {
        KvError::InvalidArgument(m) | KvError::TooLarge(m) => Reply::err(m.clone()),
        other => Reply::Error(format!(
            "{} {}",
            other.code().as_str().to_ascii_uppercase(),
            other.message()
        )),
    }
}

pub(crate) fn int_arg(a: &[u8]) -> Result<i64, Reply> {
    parse_i64(a).ok_or_else(not_integer)
}

pub(crate) fn upper(a: &[u8]) -> String {
    String::from_utf8_lossy(a).to_ascii_uppercase()
}

/// Runs a command's steps now: reads at the connection's level, writes through the
/// router, side by side.
async fn run_plan(router: &Router, conn: &Conn, plan: &Plan) -> Reply {
    let answers = plan.steps.iter().map(|step| async move {
        match step {
            Step::Read(key) => get_stored(router, conn, key).await.map(|v| StepAnswer {
                succeeded: v.is_some(),
                expires_at_ms: v.as_ref().map_or(0, |v| v.expires_at_ms),
                value: v.map(|v| v.value),
                ..StepAnswer::default()
            }),
            Step::Write(op) => router.write(op.clone()).await.map(|(served, r)| {
                // The connection's session covers its own writes (read-your-writes).
                conn.observe(served.partition, r.log_index.max(served.applied_index));
                answer_of(&r)
            }),
        }
    });
    let answers = futures::future::join_all(answers).await;
    let now = router.core().hlc().now().physical_ms();
    plan.reply(
        answers
            .into_iter()
            .map(|a| a.map_err(|e| kv_error(&e)))
            .collect(),
        now,
    )
}

async fn get_stored(
    router: &Router,
    conn: &Conn,
    key: &[u8],
) -> Result<Option<capkv_storage::StoredValue>, KvError> {
    let session = conn.session();
    let (served, value) = router.get(key, conn.level, &session).await?;
    conn.observe(served.partition, served.applied_index);
    Ok(value)
}

/// Redis's GETRANGE: inclusive `start..=end`, negative from the end, clamped.
pub(crate) fn range(v: &[u8], start: i64, end: i64) -> &[u8] {
    let len = v.len() as i64;
    if len == 0 {
        return &[];
    }
    // Both from the end and crossed: empty, before clamping (Redis 7's getrangeCommand;
    // clamped, `-1 -100` would be the first byte).
    if start < 0 && end < 0 && start > end {
        return &[];
    }
    let fix = |i: i64| if i < 0 { (len + i).max(0) } else { i };
    let (start, end) = (fix(start), fix(end).min(len - 1));
    if start > end || start >= len {
        return &[];
    }
    &v[start as usize..=end as usize]
}

pub(crate) fn command(args: &[Vec<u8>]) -> Reply {
    let Some(sub) = args.get(1) else {
        return Reply::Array(COMMANDS.iter().map(Spec::info).collect());
    };
    match upper(sub).as_str() {
        "COUNT" => Reply::Int(COMMANDS.len() as i64),
        "INFO" => Reply::Array(
            args[2..]
                .iter()
                .map(|n| lookup(n).map_or(Reply::Null, Spec::info))
                .collect(),
        ),
        // No documentation to give: an empty map (redis-cli then shows no hints).
        "DOCS" => Reply::Map(vec![]),
        "LIST" => Reply::Array(COMMANDS.iter().map(|c| Reply::bulk(c.name)).collect()),
        _ => unknown_subcommand("COMMAND", sub),
    }
}

/// `CONFIG GET pattern...`: a small read-only subset describing capkv honestly.
pub(crate) fn config(router: &Router, args: &[Vec<u8>]) -> Reply {
    match upper(&args[1]).as_str() {
        "GET" if args.len() >= 3 => {}
        "GET" => return Reply::err("wrong number of arguments for 'config|get' command"),
        "SET" | "RESETSTAT" | "REWRITE" | "HELP" => {
            return Reply::err("capkv supports only CONFIG GET <pattern>")
        }
        _ => return unknown_subcommand("CONFIG", &args[1]),
    }
    let limits = router.core().limits();
    let params: Vec<(&str, String)> = vec![
        ("databases", "1".into()),
        ("appendonly", "yes".into()),
        ("appendfsync", "always".into()),
        ("save", String::new()),
        ("maxmemory", "0".into()),
        ("proto-max-bulk-len", limits.value_bytes_max.to_string()),
        ("maxclients", "4096".into()),
        ("cluster-enabled", "no".into()),
    ];
    let mut out = Vec::new();
    for (name, value) in &params {
        if args[2..].iter().any(|p| glob_match(p, name.as_bytes())) {
            out.push((Reply::bulk(*name), Reply::bulk(value.as_str())));
        }
    }
    Reply::Map(out)
}

/// Redis's glob (`*`, `?`, `[abc]`, `[^a-z]`, `\x`) over bytes, in O(pattern x key):
/// a mismatch goes back only to the last `*`.
pub fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    // After the last `*` seen: where the pattern resumes, and where the key resumed.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if p.get(pi) == Some(&b'*') {
            while p.get(pi) == Some(&b'*') {
                pi += 1;
            }
            star = Some((pi, si));
            continue;
        }
        if let Some(next) = match_one(p, pi, s[si]) {
            pi = next;
            si += 1;
            continue;
        }
        match star {
            Some((sp, ss)) => {
                pi = sp;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    while p.get(pi) == Some(&b'*') {
        pi += 1;
    }
    pi == p.len()
}

/// Whether the pattern element at `p[pi..]` (not `*`) matches byte `c`: the index after
/// the element if so.
fn match_one(p: &[u8], pi: usize, c: u8) -> Option<usize> {
    match *p.get(pi)? {
        b'?' => Some(pi + 1),
        b'\\' if pi + 1 < p.len() => (p[pi + 1] == c).then_some(pi + 2),
        b'[' => {
            let mut j = pi + 1;
            let negate = p.get(j) == Some(&b'^');
            if negate {
                j += 1;
            }
            let mut matched = false;
            while j < p.len() && p[j] != b']' {
                if p[j] == b'\\' && j + 1 < p.len() {
                    j += 1;
                    matched |= p[j] == c;
                } else if j + 2 < p.len() && p[j + 1] == b'-' && p[j + 2] != b']' {
                    let (lo, hi) = (p[j].min(p[j + 2]), p[j].max(p[j + 2]));
                    matched |= (lo..=hi).contains(&c);
                    j += 2;
                } else {
                    matched |= p[j] == c;
                }
                j += 1;
            }
            (matched != negate).then_some((j + 1).min(p.len()))
        }
        other => (other == c).then_some(pi + 1),
    }
}

/// A command that reads or changes the connection's state, or many keys.
async fn barrier(router: &Arc<Router>, conn: &mut Conn, args: &[Vec<u8>]) -> Reply {
    let Some(spec) = checked(args) else {
        return unknown_or_arity(args);
    };
    let reply = match run_barrier(router, conn, spec, args).await {
        Ok(r) => r,
        Err(e) => kv_error(&e),
    };
    count(router, spec.name, &reply);
    reply
}

async fn run_barrier(
    router: &Arc<Router>,
    conn: &mut Conn,
    spec: &Spec,
    args: &[Vec<u8>],
) -> Result<Reply, KvError> {
    Ok(match spec.name {
        "hello" => hello(router, conn, args),
        "auth" => match args {
            [_, _password] => Reply::err(
                "AUTH <password> called without any password configured for the default user. \
                 Are you sure your configuration is correct?",
            ),
            [_, user, _password] => match auth(user) {
                Ok(()) => Reply::ok(),
                Err(e) => e,
            },
            _ => syntax(),
        },
        "select" => match parse_i64(&args[1]) {
            Some(0) => Reply::ok(),
            Some(_) => Reply::err("DB index is out of range"),
            None => not_integer(),
        },
        "quit" => {
            conn.quit = true;
            Reply::ok()
        }
        "client" => client(conn, args),
        "info" => info(router, conn, args).await?,
        "capkv.consistency" => match args.get(1) {
            None => Reply::bulk(conn.level.to_string()),
            Some(level) => match String::from_utf8_lossy(level).parse::<ReadConsistency>() {
                Ok(l) => {
                    conn.level = l;
                    Reply::ok()
                }
                Err(e) => Reply::err(e),
            },
        },
        "keys" => {
            let pattern = &args[1];
            let mut keys = Vec::new();
            for_each_key(router, conn, |k| {
                if glob_match(pattern, k) {
                    keys.push(Reply::Bulk(k.to_vec()));
                }
            })
            .await?;
            Reply::Array(keys)
        }
        "scan" => scan(router, conn, args).await?,
        "dbsize" => Reply::Int(key_counts(router, conn).await?.keys as i64),
        "randomkey" => random_key(router, conn).await?,
        "flushdb" | "flushall" => flush(router, conn, args).await?,
        "multi" if conn.multi.is_some() => Reply::err("MULTI calls can not be nested"),
        "multi" => {
            conn.multi = Some(Vec::new());
            conn.multi_failed = false;
            Reply::ok()
        }
        "exec" => match conn.multi.take() {
            None => Reply::err("EXEC without MULTI"),
            Some(plans) => {
                let watched = std::mem::take(&mut conn.watched);
                if std::mem::take(&mut conn.multi_failed) {
                    Reply::Error(
                        "EXECABORT Transaction discarded because of previous errors.".into(),
                    )
                } else {
                    exec(router, conn, plans, watched).await
                }
            }
        },
        "discard" => match conn.multi.take() {
            None => Reply::err("DISCARD without MULTI"),
            Some(_) => {
                conn.watched.clear();
                conn.multi_failed = false;
                Reply::ok()
            }
        },
        "watch" if conn.multi.is_some() => Reply::err("WATCH inside MULTI is not allowed"),
        "watch" => {
            for key in &args[1..] {
                let session = conn.session();
                let (_, v) = router
                    .get(key, ReadConsistency::Linearizable, &session)
                    .await?;
                conn.watched
                    .push((key.clone(), v.map_or(0, |v| v.mod_revision)));
            }
            Reply::ok()
        }
        "unwatch" => {
            conn.watched.clear();
            Reply::ok()
        }
        other => Reply::err(format!("'{other}' cannot run here")),
    })
}

/// AUTH's (and HELLO's) user check, as a Redis whose only user is `default` without a
/// password (`nopass`): that user with any password is accepted, any other user refused.
fn auth(user: &[u8]) -> Result<(), Reply> {
    if user == b"default" {
        Ok(())
    } else {
        Err(Reply::Error(
            "WRONGPASS invalid username-password pair or user is disabled.".into(),
        ))
    }
}

fn hello(router: &Router, conn: &mut Conn, args: &[Vec<u8>]) -> Reply {
    let mut i = 1;
    if let Some(v) = args.get(1) {
        match parse_i64(v) {
            Some(v @ 2..=3) => conn.version = v as u8,
            Some(_) => return Reply::Error("NOPROTO unsupported protocol version".into()),
            None => return Reply::err("Protocol version is not an integer or out of range"),
        }
        i = 2;
    }
    while i < args.len() {
        match upper(&args[i]).as_str() {
            "AUTH" if i + 2 < args.len() => {
                if let Err(e) = auth(&args[i + 1]) {
                    return e;
                }
                i += 3;
            }
            "SETNAME" if i + 1 < args.len() => {
                conn.name = Some(args[i + 1].clone());
                i += 2;
            }
            _ => return syntax(),
        }
    }
    Reply::Map(vec![
        (Reply::bulk("server"), Reply::bulk("capkv")),
        (
            Reply::bulk("version"),
            Reply::bulk(env!("CARGO_PKG_VERSION")),
        ),
        (Reply::bulk("proto"), Reply::Int(conn.version.into())),
        (Reply::bulk("id"), Reply::Int(conn.id as i64)),
        (Reply::bulk("mode"), Reply::bulk("standalone")),
        (Reply::bulk("role"), Reply::bulk("master")),
        (Reply::bulk("modules"), Reply::Array(vec![])),
        (Reply::bulk("node"), Reply::Int(router.core().id().0 as i64)),
    ])
}

fn client(conn: &mut Conn, args: &[Vec<u8>]) -> Reply {
    match upper(&args[1]).as_str() {
        "SETNAME" if args.len() == 3 => {
            if args[2].iter().any(|b| *b <= b' ' || *b > b'~') {
                return Reply::err(
                    "Client names cannot contain spaces, newlines or special characters.",
                );
            }
            conn.name = (!args[2].is_empty()).then(|| args[2].clone());
            Reply::ok()
        }
        "GETNAME" if args.len() == 2 => Reply::opt_bulk(conn.name.clone()),
        "ID" if args.len() == 2 => Reply::Int(conn.id as i64),
        // Client libraries announce themselves (redis-py 5 does on connect).
        "SETINFO" if args.len() == 4 => Reply::ok(),
        "INFO" if args.len() == 2 => Reply::Verbatim(client_line(conn)),
        "LIST" => Reply::Verbatim(client_line(conn)),
        sub @ ("SETNAME" | "GETNAME" | "ID" | "SETINFO" | "INFO") => Reply::err(format!(
            "wrong number of arguments for 'client|{}' command",
            sub.to_lowercase()
        )),
        _ => unknown_subcommand("CLIENT", &args[1]),
    }
}

/// Redis's answer to a subcommand it does not know.
fn unknown_subcommand(command: &str, sub: &[u8]) -> Reply {
    Reply::err(format!(
        "unknown subcommand '{}'. Try {command} HELP.",
        String::from_utf8_lossy(sub)
    ))
}

fn client_line(conn: &Conn) -> String {
    format!(
        "id={} name={} db=0 resp={} consistency={}\n",
        conn.id,
        String::from_utf8_lossy(conn.name.as_deref().unwrap_or_default()),
        conn.version,
        conn.level
    )
}

async fn info(router: &Router, conn: &Conn, args: &[Vec<u8>]) -> Result<Reply, KvError> {
    let core = router.core();
    let wanted: Vec<String> = args[1..].iter().map(|a| upper(a).to_lowercase()).collect();
    let all = wanted.is_empty()
        || wanted
            .iter()
            .any(|w| w == "all" || w == "everything" || w == "default");
    let want = |s: &str| all || wanted.iter().any(|w| w == s);
    let mut text = String::new();
    if want("server") {
        text.push_str(&format!(
            "# Server\r\nredis_version:7.2.0\r\ncapkv_version:{}\r\nredis_mode:standalone\r\n\
             process_id:{}\r\ntcp_port:{}\r\ncapkv_node_id:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            0,
            core.id()
        ));
    }
    if want("clients") {
        let open = core
            .metrics()
            .frontend_connections
            .with_label_values(&[PROTOCOL])
            .get();
        text.push_str(&format!("# Clients\r\nconnected_clients:{open}\r\n\r\n"));
    }
    if want("replication") {
        let views = core.partition_status();
        let hosted: Vec<_> = views.iter().filter(|v| !v.role.is_empty()).collect();
        let leading = hosted
            .iter()
            .filter(|v| v.leader == Some(core.id()))
            .count();
        text.push_str(&format!(
            "# Replication\r\nrole:master\r\ncapkv_partitions:{}\r\ncapkv_replication_factor:{}\r\n\
             capkv_replicas_here:{}\r\ncapkv_leaders_here:{leading}\r\n",
            core.map().partition_count,
            core.map().replication_factor,
            hosted.len()
        ));
        for v in &hosted {
            text.push_str(&format!(
                "capkv_partition_{}:role={},leader={},term={},commit={},applied={}\r\n",
                v.id,
                v.role.to_lowercase(),
                v.leader.map_or(0, |l| l.0),
                v.term,
                v.commit_index,
                v.applied_index
            ));
        }
        text.push_str("\r\n");
    }
    if want("keyspace") {
        let KeyCounts { keys, expiring } = key_counts(router, conn).await?;
        text.push_str("# Keyspace\r\n");
        if keys > 0 {
            text.push_str(&format!("db0:keys={keys},expires={expiring},avg_ttl=0\r\n"));
        }
        text.push_str("\r\n");
    }
    Ok(Reply::Verbatim(text))
}

/// Visits every key in order, page by page, at the connection's read level.
async fn for_each_key(
    router: &Router,
    conn: &Conn,
    mut visit: impl FnMut(&[u8]),
) -> Result<(), KvError> {
    for_each_kv(router, conn, |kv| visit(&kv.key)).await
}

/// The keyspace's size (DBSIZE, INFO keyspace): the sum of the counts each partition's
/// state machine keeps, from this node's replicas when it hosts every partition (no walk),
/// each once it has applied what this connection has written or read (its session, so
/// the connection's own writes count; other clients' latest writes may not yet, like a
/// Redis replica's DBSIZE). Otherwise by walking the keys at the connection's level. Keys
/// that expired but are not yet deleted count, as in Redis.
async fn key_counts(router: &Router, conn: &Conn) -> Result<KeyCounts, KvError> {
    let core = router.core();
    let session = conn.session();
    let mut total = KeyCounts::default();
    for p in 0..core.map().partition_count {
        let p = capkv_types::PartitionId(p);
        match core.key_counts_after(p, session.at(p)).await {
            Some(c) => {
                total.keys += c.keys;
                total.expiring += c.expiring;
            }
            None => {
                let mut walked = KeyCounts::default();
                for_each_kv(router, conn, |kv| {
                    walked.keys += 1;
                    walked.expiring += u64::from(kv.value.expires_at_ms != 0);
                })
                .await?;
                return Ok(walked);
            }
        }
    }
    Ok(total)
}

/// Visits every key and its value in order, page by page, at the connection's read level.
async fn for_each_kv(
    router: &Router,
    conn: &Conn,
    mut visit: impl FnMut(&crate::kv::KeyValue),
) -> Result<(), KvError> {
    let mut continuation = Vec::new();
    loop {
        let page = router
            .scan(&scan_params(conn, continuation, 1000, vec![]))
            .await?;
        conn.observe_all(&page.seen);
        for kv in &page.kvs {
            visit(kv);
        }
        if page.continuation.is_empty() {
            return Ok(());
        }
        continuation = page.continuation;
    }
}

fn scan_params(conn: &Conn, continuation: Vec<u8>, limit: u32, start: Vec<u8>) -> ScanParams {
    ScanParams {
        start,
        continuation,
        limit,
        consistency: conn.level,
        session: conn.session(),
        ..ScanParams::default()
    }
}

/// `SCAN cursor [MATCH pattern] [COUNT n] [TYPE t]`: cursors are numbers this connection
/// handed out (0 starts and ends a scan); COUNT keys are looked at per call.
async fn scan(router: &Router, conn: &Conn, args: &[Vec<u8>]) -> Result<Reply, KvError> {
    let Some(cursor) = std::str::from_utf8(&args[1])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return Ok(Reply::err("invalid cursor"));
    };
    let (mut pattern, mut count, mut only_strings) = (None, 10i64, true);
    let mut i = 2;
    while i < args.len() {
        let value = args.get(i + 1);
        match (upper(&args[i]).as_str(), value) {
            ("MATCH", Some(p)) => pattern = Some(p.clone()),
            ("COUNT", Some(c)) => match parse_i64(c) {
                Some(c) if c >= 1 => count = c,
                Some(_) => return Ok(syntax()),
                None => return Ok(not_integer()),
            },
            ("TYPE", Some(t)) => only_strings = upper(t) == "STRING",
            _ => return Ok(syntax()),
        }
        i += 2;
    }
    let continuation = if cursor == 0 {
        Vec::new()
    } else {
        let cursors = conn.cursors.lock().unwrap_or_else(|e| e.into_inner());
        match cursors.open.get(&cursor) {
            Some(c) => c.clone(),
            None => return Ok(Reply::err("invalid cursor")),
        }
    };
    let limit = count.min(i64::from(router.core().limits().scan_limit_max)) as u32;
    let page = router
        .scan(&scan_params(conn, continuation, limit, vec![]))
        .await?;
    conn.observe_all(&page.seen);
    let keys = page
        .kvs
        .iter()
        .filter(|kv| only_strings && pattern.as_ref().is_none_or(|p| glob_match(p, &kv.key)))
        .map(|kv| Reply::Bulk(kv.key.clone()))
        .collect();
    let next = if page.continuation.is_empty() {
        0
    } else {
        let mut cursors = conn.cursors.lock().unwrap_or_else(|e| e.into_inner());
        cursors.next += 1;
        let id = cursors.next;
        cursors.open.insert(id, page.continuation);
        if cursors.open.len() > CURSORS_MAX {
            let oldest = *cursors.open.keys().min().unwrap_or(&id);
            cursors.open.remove(&oldest);
        }
        id
    };
    Ok(Reply::Array(vec![
        Reply::bulk(next.to_string()),
        Reply::Array(keys),
    ]))
}

async fn random_key(router: &Router, conn: &Conn) -> Result<Reply, KvError> {
    let start: Vec<u8> = (0..8).map(|_| rand::random::<u8>()).collect();
    let page = router.scan(&scan_params(conn, vec![], 1, start)).await?;
    if let Some(kv) = page.kvs.first() {
        return Ok(Reply::Bulk(kv.key.clone()));
    }
    let page = router.scan(&scan_params(conn, vec![], 1, vec![])).await?;
    Ok(Reply::opt_bulk(page.kvs.first().map(|kv| kv.key.clone())))
}

/// `FLUSHDB` / `FLUSHALL [ASYNC|SYNC]`: every key deleted through the log (replicated
/// deletes). Without ASYNC, refused above `FLUSH_SYNC_MAX` keys; with it, answered at once
/// and carried out in the background.
async fn flush(router: &Arc<Router>, conn: &Conn, args: &[Vec<u8>]) -> Result<Reply, KvError> {
    let asynchronous = match args.get(1).map(|a| upper(a)) {
        None => false,
        Some(m) if m == "SYNC" && args.len() == 2 => false,
        Some(m) if m == "ASYNC" && args.len() == 2 => true,
        Some(_) => return Ok(syntax()),
    };
    let mut keys = Vec::new();
    for_each_key(router, conn, |k| keys.push(k.to_vec())).await?;
    if !asynchronous && keys.len() > FLUSH_SYNC_MAX {
        return Ok(Reply::err(format!(
            "{} keys: FLUSHDB deletes through the replicated log, and refuses more than {FLUSH_SYNC_MAX} \
             keys at once; use FLUSHDB ASYNC",
            keys.len()
        )));
    }
    let delete_all = delete_keys(router.clone(), keys);
    if asynchronous {
        tokio::spawn(async move {
            if let Err(e) = delete_all.await {
                tracing::warn!(error = %e, "FLUSHDB ASYNC stopped");
            }
        });
    } else {
        delete_all.await?;
    }
    Ok(Reply::ok())
}

async fn delete_keys(router: Arc<Router>, keys: Vec<Vec<u8>>) -> Result<(), KvError> {
    for chunk in keys.chunks(64) {
        let deletes = chunk.iter().map(|k| {
            router.write(Op::Delete {
                key: k.clone(),
                condition: Condition::Always,
            })
        });
        futures::future::try_join_all(deletes).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getrange_follows_redis() {
        let v = b"This is a string";
        assert_eq!(range(v, 0, 3), b"This");
        assert_eq!(range(v, -3, -1), b"ing");
        assert_eq!(range(v, 0, -1), v);
        assert_eq!(range(v, 10, 100), b"string");
        assert_eq!(range(v, 5, 3), b"");
        assert_eq!(range(b"", 0, -1), b"");
        // Found by bench/redis-diff.sh: Redis answers empty, not "v".
        assert_eq!(range(b"v", -1, i64::MIN), b"");
        assert_eq!(range(b"hello", -1, -100), b"");
        assert_eq!(range(b"hello", -100, -1), b"hello");
        assert_eq!(range(v, -100, 2), b"Thi");
    }

    #[test]
    fn glob_follows_redis() {
        for (p, s, m) in [
            ("*", "anything", true),
            ("user:*", "user:1", true),
            ("user:*", "usr:1", false),
            ("h?llo", "hello", true),
            ("h[ae]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            (
                "*a*a*a*a*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                false,
            ),
        ] {
            assert_eq!(glob_match(p.as_bytes(), s.as_bytes()), m, "{p} {s}");
        }
    }
}
