//! What each keyed command does, as steps (reads and replicated operations) and a way to
//! make its reply from their answers. A command outside MULTI runs its steps at once (a
//! read at the connection's level, a write through the router); inside MULTI its steps
//! join the transaction's one `Op::Txn`, and EXEC makes each reply from its share of the
//! answers. One description serves both.

use capkv_replication::{
    parse_i64, CommandResponse, Condition, ExpireWhen, Expiry, Op, StepAnswer, Update,
};

use super::codec::Reply;
use super::commands::Spec;
use super::{int_arg, not_integer, range, syntax, upper, wrong_args};
use crate::router::Router;

#[derive(Debug, Clone)]
pub enum Step {
    /// A read of the key (at the connection's level; in order, inside a transaction).
    Read(Vec<u8>),
    Write(Op),
}

impl Step {
    /// The step as a transaction's operation.
    pub fn into_op(self) -> Op {
        match self {
            Step::Read(key) => Op::Get { key },
            Step::Write(op) => op,
        }
    }
}

/// How a command's reply is made from its steps' answers.
#[derive(Debug, Clone)]
pub enum Render {
    /// The reply is known without running anything (PING, ECHO, errors found by parsing).
    Fixed(Reply),
    /// `+OK` if the write happened, else null (SET with NX/XX).
    OkOrNull,
    Ok,
    /// The answer's value as a bulk string, or null.
    Value,
    /// 1 if the step succeeded, else 0.
    Flag,
    /// The length of the answer's value (0 when absent).
    Len,
    /// The answer's value as an integer.
    Integer,
    /// How many steps succeeded (DEL, EXISTS).
    Count,
    /// Every step's value (MGET).
    Values,
    /// `string` or `none`.
    Type,
    /// Time to live: -2 (no key), -1 (no expiry), else seconds or ms (`true`) left.
    Ttl(bool),
    /// The expiry time: -2, -1, else Unix seconds or ms (`true`).
    ExpireTime(bool),
    /// GETRANGE's part of the value.
    Range(i64, i64),
    /// Null if the key is absent, else this error (GETEX with an invalid expiry: Redis
    /// looks the key up before it reads the time).
    NullOrError(Reply),
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub render: Render,
}

impl Plan {
    pub fn fixed(reply: Reply) -> Plan {
        Plan {
            steps: vec![],
            render: Render::Fixed(reply),
        }
    }

    fn one(step: Step, render: Render) -> Plan {
        Plan {
            steps: vec![step],
            render,
        }
    }

    fn write(op: Op, render: Render) -> Plan {
        Plan::one(Step::Write(op), render)
    }

    fn read(key: &[u8], render: Render) -> Plan {
        Plan::one(Step::Read(key.to_vec()), render)
    }

    /// The reply from the steps' answers (one per step, in order; an error in place of
    /// an answer stands for the whole command).
    pub fn reply(&self, answers: Vec<Result<StepAnswer, Reply>>, now_ms: u64) -> Reply {
        let mut ok = Vec::with_capacity(answers.len());
        for a in answers {
            match a {
                Ok(a) => ok.push(a),
                Err(e) => return e,
            }
        }
        let first = ok.first().cloned().unwrap_or_default();
        match &self.render {
            Render::Fixed(r) => r.clone(),
            Render::OkOrNull if first.succeeded => Reply::ok(),
            Render::OkOrNull => Reply::Null,
            Render::Ok => Reply::ok(),
            Render::Value => Reply::opt_bulk(first.value),
            Render::NullOrError(_) if first.value.is_none() => Reply::Null,
            Render::NullOrError(e) => e.clone(),
            Render::Flag => Reply::Int(first.succeeded.into()),
            Render::Len => Reply::Int(first.value.map_or(0, |v| v.len()) as i64),
            Render::Integer => match first.value.as_deref().and_then(parse_i64) {
                Some(n) => Reply::Int(n),
                None => not_integer(),
            },
            Render::Count => Reply::Int(ok.iter().filter(|a| a.succeeded).count() as i64),
            Render::Values => {
                Reply::Array(ok.into_iter().map(|a| Reply::opt_bulk(a.value)).collect())
            }
            Render::Type => Reply::Simple(
                if first.value.is_some() {
                    "string"
                } else {
                    "none"
                }
                .into(),
            ),
            Render::Ttl(_) | Render::ExpireTime(_) if first.value.is_none() => Reply::Int(-2),
            Render::Ttl(_) | Render::ExpireTime(_) if first.expires_at_ms == 0 => Reply::Int(-1),
            Render::Ttl(ms) => {
                let left = first.expires_at_ms.saturating_sub(now_ms);
                // Redis rounds the seconds left to the nearest.
                Reply::Int(if *ms { left } else { (left + 500) / 1000 } as i64)
            }
            Render::ExpireTime(ms) => Reply::Int(if *ms {
                first.expires_at_ms
            } else {
                first.expires_at_ms / 1000
            } as i64),
            Render::Range(start, end) => Reply::Bulk(
                range(first.value.as_deref().unwrap_or_default(), *start, *end).to_vec(),
            ),
        }
    }
}

/// A write's answer as a step's.
pub fn answer_of(r: &CommandResponse) -> StepAnswer {
    StepAnswer {
        succeeded: r.succeeded,
        current_revision: r.current_revision,
        value: r.value.clone(),
        rejected: r.rejected,
        expires_at_ms: 0,
    }
}

/// An expiry argument: `seconds` (else ms) relative (else a Unix time), refused when not a
/// positive integer (or past i64 in ms), as Redis refuses it.
fn expiry_arg(arg: &[u8], seconds: bool, relative: bool, command: &str) -> Result<Expiry, Reply> {
    let invalid = || Reply::err(format!("invalid expire time in '{command}' command"));
    let n = int_arg(arg)?;
    if n <= 0 {
        return Err(invalid());
    }
    let ms = if seconds {
        n.checked_mul(1000).ok_or_else(invalid)?
    } else {
        n
    };
    if relative && ms > i64::MAX - unix_ms() {
        return Err(invalid()); // Redis refuses what overflows once the time is added
    }
    Ok(if relative {
        Expiry::In(ms as u64)
    } else {
        Expiry::At(ms as u64)
    })
}

/// This node's clock in Unix ms, to refuse relative expiry times that overflow once added
/// to it (the state machine adds them to the entry's own time).
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64)
}

/// EXPIRE's time, which may be zero or negative (the key is then deleted).
fn expire_arg(arg: &[u8], seconds: bool, relative: bool, command: &str) -> Result<Expiry, Reply> {
    let n = int_arg(arg)?;
    let ms = if seconds {
        n.checked_mul(1000)
    } else {
        Some(n)
    }
    .filter(|ms| !relative || *ms <= i64::MAX - unix_ms())
    .ok_or_else(|| Reply::err(format!("invalid expire time in '{command}' command")))?;
    Ok(match (ms <= 0, relative) {
        (true, _) => Expiry::At(1),
        (false, true) => Expiry::In(ms as u64),
        (false, false) => Expiry::At(ms as u64),
    })
}

/// Whether an expiry option word is EX, PX, EXAT or PXAT: (in seconds, relative).
fn expiry_kind(word: &str) -> Option<(bool, bool)> {
    match word {
        "EX" => Some((true, true)),
        "PX" => Some((false, true)),
        "EXAT" => Some((true, false)),
        "PXAT" => Some((false, false)),
        _ => None,
    }
}

/// The options of SET (from `args[from]`, `set` true) or GETEX, as Redis 7 takes them:
/// NX, XX, GET, KEEPTTL (SET only), PERSIST (GETEX only), and one kind of EX, PX, EXAT or
/// PXAT. An option may be given again (the last value counts, and only it is checked);
/// NX with XX, or two kinds of expiry (KEEPTTL and PERSIST count as kinds) are a syntax
/// error.
fn string_options(args: &[Vec<u8>], from: usize, set: bool) -> Result<StringOptions, Reply> {
    let (mut nx, mut xx, mut get) = (false, false, false);
    // The expiry option given: its word and where its value is (`None`: KEEPTTL, PERSIST).
    let mut expiry: Option<(String, Option<usize>)> = None;
    let mut i = from;
    while i < args.len() {
        let word = upper(&args[i]);
        let same_kind_or_none = expiry.as_ref().is_none_or(|(w, _)| *w == word);
        match word.as_str() {
            "NX" if set && !xx => nx = true,
            "XX" if set && !nx => xx = true,
            "GET" if set => get = true,
            "KEEPTTL" if set && same_kind_or_none => expiry = Some((word, None)),
            "PERSIST" if !set && same_kind_or_none => expiry = Some((word, None)),
            w if expiry_kind(w).is_some() && same_kind_or_none && i + 1 < args.len() => {
                expiry = Some((word, Some(i + 1)));
                i += 1;
            }
            _ => return Err(syntax()),
        }
        i += 1;
    }
    let condition = match (nx, xx) {
        (true, _) => Condition::IfAbsent,
        (_, true) => Condition::IfExists,
        _ => Condition::Always,
    };
    let command = if set { "set" } else { "getex" };
    // The time is checked apart: GETEX answers null for an absent key before it reads it.
    let expiry = match expiry {
        None => None,
        Some((w, None)) if w == "KEEPTTL" => Some(Ok(Expiry::Keep)),
        Some((_, None)) => Some(Ok(Expiry::Never)),
        Some((w, Some(v))) => {
            let (seconds, relative) = expiry_kind(&w).unwrap_or((true, true));
            Some(expiry_arg(&args[v], seconds, relative, command))
        }
    };
    Ok(StringOptions {
        condition,
        get,
        expiry,
    })
}

/// SET's and GETEX's options as given.
struct StringOptions {
    condition: Condition,
    get: bool,
    /// `None`: not given; an error if its time is not valid.
    expiry: Option<Result<Expiry, Reply>>,
}

/// EXPIRE's options, with Redis 7's errors. XX with GT is GT (GT never sets an expiry on
/// a key without one); XX with LT has no single condition here and is refused.
fn expire_when(options: &[Vec<u8>]) -> Result<ExpireWhen, Reply> {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for o in options {
        match upper(o).as_str() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GT" => gt = true,
            "LT" => lt = true,
            _ => {
                return Err(Reply::err(format!(
                    "Unsupported option {}",
                    String::from_utf8_lossy(o)
                )))
            }
        }
    }
    if nx && (xx || gt || lt) {
        return Err(Reply::err(
            "NX and XX, GT or LT options at the same time are not compatible",
        ));
    }
    if gt && lt {
        return Err(Reply::err(
            "GT and LT options at the same time are not compatible",
        ));
    }
    Ok(match (nx, xx, gt, lt) {
        (true, ..) => ExpireWhen::Nx,
        (_, _, true, _) => ExpireWhen::Gt,
        (_, true, _, true) => return Err(Reply::err("capkv does not support XX and LT together")),
        (_, _, _, true) => ExpireWhen::Lt,
        (_, true, ..) => ExpireWhen::Xx,
        _ => ExpireWhen::Always,
    })
}

fn update(key: &[u8], update: Update) -> Op {
    Op::Update {
        key: key.to_vec(),
        update,
        value_bytes_max: 0, // stamped by the leader
    }
}

/// The plan of a command with valid arity (`spec.kind` is `Keyed` or `Free`).
pub fn plan(router: &Router, spec: &Spec, args: &[Vec<u8>]) -> Plan {
    let key = args.get(1).map(Vec::as_slice).unwrap_or_default();
    macro_rules! int {
        ($a:expr) => {
            match int_arg($a) {
                Ok(n) => n,
                Err(r) => return Plan::fixed(r),
            }
        };
    }
    match spec.name {
        "get" => Plan::read(key, Render::Value),
        "set" => set(args),
        "setnx" => Plan::write(
            Op::Put {
                key: key.to_vec(),
                value: args[2].clone(),
                condition: Condition::IfAbsent,
            },
            Render::Flag,
        ),
        "setex" | "psetex" => {
            let expiry = match expiry_arg(&args[2], spec.name == "setex", true, spec.name) {
                Ok(e) => e,
                Err(r) => return Plan::fixed(r),
            };
            let u = Update::Swap {
                value: args[3].clone(),
                condition: Condition::Always,
                expiry,
            };
            Plan::write(update(key, u), Render::Ok)
        }
        "expire" | "pexpire" | "expireat" | "pexpireat" => {
            let seconds = !spec.name.starts_with('p');
            let relative = !spec.name.ends_with("at");
            // Redis reads the options before the time.
            let when = match expire_when(&args[3..]) {
                Ok(w) => w,
                Err(r) => return Plan::fixed(r),
            };
            let expiry = match expire_arg(&args[2], seconds, relative, spec.name) {
                Ok(e) => e,
                Err(r) => return Plan::fixed(r),
            };
            Plan::write(update(key, Update::Expire { expiry, when }), Render::Flag)
        }
        "getset" => Plan::write(
            update(
                key,
                Update::Swap {
                    value: args[2].clone(),
                    condition: Condition::Always,
                    expiry: Expiry::Never,
                },
            ),
            Render::Value,
        ),
        "getdel" => Plan::write(update(key, Update::Take), Render::Value),
        "getex" => {
            if args.len() == 2 {
                return Plan::read(key, Render::Value);
            }
            getex(key, args)
        }
        "mget" => Plan {
            steps: args[1..].iter().map(|k| Step::Read(k.clone())).collect(),
            render: Render::Values,
        },
        "mset" | "msetnx" => {
            if args.len().is_multiple_of(2) {
                return Plan::fixed(wrong_args(spec.name));
            }
            let kvs = args[1..]
                .chunks(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect();
            let if_all_absent = spec.name == "msetnx";
            let render = if if_all_absent {
                Render::Flag
            } else {
                Render::Ok
            };
            Plan::write(Op::PutMany { kvs, if_all_absent }, render)
        }
        "append" => Plan::write(update(key, Update::Append(args[2].clone())), Render::Len),
        "strlen" => Plan::read(key, Render::Len),
        "getrange" | "substr" => Plan::read(key, Render::Range(int!(&args[2]), int!(&args[3]))),
        "setrange" => {
            let offset = int!(&args[2]);
            if offset < 0 {
                return Plan::fixed(Reply::err("offset is out of range"));
            }
            let u = Update::SetRange {
                offset: offset as u64,
                bytes: args[3].clone(),
            };
            Plan::write(update(key, u), Render::Len)
        }
        "incr" | "decr" | "incrby" | "decrby" => {
            let by = match spec.name {
                "incr" => 1,
                "decr" => -1,
                "incrby" => int!(&args[2]),
                _ => match int!(&args[2]).checked_neg() {
                    Some(n) => n,
                    None => return Plan::fixed(Reply::err("decrement would overflow")),
                },
            };
            Plan::write(update(key, Update::IncrBy(by)), Render::Integer)
        }
        "incrbyfloat" => {
            let by = String::from_utf8_lossy(&args[2]).into_owned();
            // "inf" is a float to Redis: the state machine refuses the sum (after it
            // refused a stored value that is not a float, as Redis checks that first).
            if capkv_replication::parse_float(&by).is_none() {
                return Plan::fixed(Reply::err("value is not a valid float"));
            }
            Plan::write(update(key, Update::IncrByFloat(by)), Render::Value)
        }
        "del" | "unlink" => Plan {
            steps: args[1..]
                .iter()
                .map(|k| {
                    Step::Write(Op::Delete {
                        key: k.clone(),
                        condition: Condition::Always,
                    })
                })
                .collect(),
            render: Render::Count,
        },
        "exists" => Plan {
            steps: args[1..].iter().map(|k| Step::Read(k.clone())).collect(),
            render: Render::Count,
        },
        "type" => Plan::read(key, Render::Type),
        "ttl" | "pttl" => Plan::read(key, Render::Ttl(spec.name == "pttl")),
        "expiretime" | "pexpiretime" => {
            Plan::read(key, Render::ExpireTime(spec.name == "pexpiretime"))
        }
        // Removing the expiry of a key that has one (XX).
        "persist" => Plan::write(
            update(
                key,
                Update::Expire {
                    expiry: Expiry::Never,
                    when: ExpireWhen::Xx,
                },
            ),
            Render::Flag,
        ),
        "rename" | "renamenx" => {
            let if_absent = spec.name == "renamenx";
            let op = Op::Rename {
                from: key.to_vec(),
                to: args[2].clone(),
                if_absent,
            };
            Plan::write(op, if if_absent { Render::Flag } else { Render::Ok })
        }
        "ping" => Plan::fixed(match args.get(1) {
            None => Reply::Simple("PONG".into()),
            Some(m) if args.len() == 2 => Reply::Bulk(m.clone()),
            Some(_) => wrong_args("ping"),
        }),
        "echo" => Plan::fixed(Reply::Bulk(args[1].clone())),
        "command" => Plan::fixed(super::command(args)),
        "config" => Plan::fixed(super::config(router, args)),
        other => Plan::fixed(Reply::err(format!("'{other}' cannot run here"))),
    }
}

/// `GETEX key [EX s|PX ms|EXAT s|PXAT ms|PERSIST]` with at least one option.
fn getex(key: &[u8], args: &[Vec<u8>]) -> Plan {
    // With an option the expiry is set: any other word is a syntax error.
    match string_options(args, 2, false).map(|o| o.expiry) {
        Ok(Some(Ok(expiry))) => Plan::write(update(key, Update::GetEx { expiry }), Render::Value),
        // An invalid time: null for an absent key, as Redis looks the key up first.
        Ok(Some(Err(e))) => Plan::read(key, Render::NullOrError(e)),
        Ok(None) => Plan::fixed(syntax()),
        Err(r) => Plan::fixed(r),
    }
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`.
fn set(args: &[Vec<u8>]) -> Plan {
    let (condition, get, expiry) = match string_options(args, 3, true) {
        Ok(o) => match o.expiry.transpose() {
            Ok(e) => (o.condition, o.get, e),
            Err(r) => return Plan::fixed(r),
        },
        Err(r) => return Plan::fixed(r),
    };
    let (key, value) = (args[1].clone(), args[2].clone());
    let render = if get {
        Render::Value
    } else if condition == Condition::Always {
        Render::Ok
    } else {
        Render::OkOrNull
    };
    match expiry {
        // A plain SET replaces the value and drops any expiry.
        None if !get => Plan::write(
            Op::Put {
                key,
                value,
                condition,
            },
            render,
        ),
        expiry => {
            let u = Update::Swap {
                value,
                condition,
                expiry: expiry.unwrap_or(Expiry::Never),
            };
            Plan::write(update(&key, u), render)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(words: &str, set: bool) -> Result<(Condition, bool, Option<Expiry>), Reply> {
        let o = string_options(&args(words), 0, set)?;
        Ok((o.condition, o.get, o.expiry.transpose()?))
    }

    fn args(words: &str) -> Vec<Vec<u8>> {
        words.split(' ').map(|w| w.as_bytes().to_vec()).collect()
    }

    fn read_answer(value: Option<&str>) -> Vec<Result<StepAnswer, Reply>> {
        vec![Ok(StepAnswer {
            succeeded: value.is_some(),
            value: value.map(|v| v.as_bytes().to_vec()),
            ..StepAnswer::default()
        })]
    }

    /// GETEX looks the key up before it reads the time (redis-server 7.0.15: `GETEX
    /// nokey EX 0` is null, `GETEX k EX 0` an error); a syntax error comes first.
    #[test]
    fn getex_with_an_invalid_time_is_null_for_an_absent_key() {
        for (words, error) in [
            ("GETEX k EX 0", "ERR invalid expire time in 'getex' command"),
            (
                "GETEX k PX abc",
                "ERR value is not an integer or out of range",
            ),
        ] {
            let plan = getex(b"k", &args(words));
            assert!(matches!(plan.steps.as_slice(), [Step::Read(k)] if k == b"k"));
            assert_eq!(plan.reply(read_answer(None), 0), Reply::Null, "{words}");
            assert_eq!(
                plan.reply(read_answer(Some("v")), 0),
                Reply::Error(error.into()),
                "{words}"
            );
        }
        let plan = getex(b"k", &args("GETEX k EX 0 PX 1"));
        assert!(plan.steps.is_empty());
        assert_eq!(
            plan.reply(vec![], 0),
            Reply::Error("ERR syntax error".into())
        );
        let plan = getex(b"k", &args("GETEX k EX 10"));
        assert!(matches!(plan.steps.as_slice(), [Step::Write(_)]));
    }

    /// Redis 7's rules (t_string.c, parseExtendedStringArgumentsOrReply), checked against
    /// redis-server 7.0.15: an option again is fine and its last value counts (only that
    /// one is parsed), two kinds of expiry or NX with XX are a syntax error.
    #[test]
    fn set_and_getex_options_as_redis_takes_them() {
        let syntax_error = Err(syntax());
        assert_eq!(
            opts("EX 10 EX 20", true),
            Ok((Condition::Always, false, Some(Expiry::In(20_000))))
        );
        assert_eq!(
            opts("ex notanumber PX 5 px 7", true),
            syntax_error,
            "EX then PX: two kinds"
        );
        assert_eq!(
            opts("EX notanumber EX 10", true),
            Ok((Condition::Always, false, Some(Expiry::In(10_000))))
        );
        assert_eq!(
            opts("PXAT 1 NX GET PXAT 5", true),
            Ok((Condition::IfAbsent, true, Some(Expiry::At(5))))
        );
        assert_eq!(
            opts("KEEPTTL XX KEEPTTL", true),
            Ok((Condition::IfExists, false, Some(Expiry::Keep)))
        );
        assert_eq!(opts("NX NX", true), Ok((Condition::IfAbsent, false, None)));
        assert_eq!(opts("NX XX", true), syntax_error);
        assert_eq!(opts("KEEPTTL EX 1", true), syntax_error);
        assert_eq!(opts("EX 1 KEEPTTL", true), syntax_error);
        assert_eq!(opts("EX", true), syntax_error);
        assert_eq!(opts("PERSIST", true), syntax_error, "PERSIST is GETEX's");
        assert_eq!(
            opts("EX 0", true),
            Err(Reply::err("invalid expire time in 'set' command"))
        );
        // GETEX: PERSIST or one kind of expiry; SET's other options are not its.
        assert_eq!(
            opts("PERSIST PERSIST", false),
            Ok((Condition::Always, false, Some(Expiry::Never)))
        );
        assert_eq!(
            opts("EX 1 EX 2", false),
            Ok((Condition::Always, false, Some(Expiry::In(2_000))))
        );
        assert_eq!(opts("PERSIST EX 1", false), syntax_error);
        assert_eq!(opts("EX 1 PERSIST", false), syntax_error);
        assert_eq!(opts("NX", false), syntax_error);
        assert_eq!(opts("KEEPTTL", false), syntax_error);
        assert_eq!(
            opts("EX -1", false),
            Err(Reply::err("invalid expire time in 'getex' command"))
        );
    }
}
