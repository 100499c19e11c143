//! The command table: names, arities, flags and key positions as Redis's `COMMAND`
//! reports them. It decides arity errors, which commands of a pipeline may run together
//! (`Kind`), and what `COMMAND COUNT/INFO` answer.

use super::codec::Reply;

/// How a command may run among the others of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Touches only its keys: runs beside other commands whose keys differ.
    Keyed,
    /// Touches no key and no connection state: runs beside anything.
    Free,
    /// Reads or changes the connection's state, or many keys: runs alone, in order.
    Barrier,
}

pub struct Spec {
    pub name: &'static str,
    /// Redis's arity: `n` exactly n arguments (name included), `-n` at least n.
    pub arity: i32,
    pub flags: &'static [&'static str],
    pub first_key: i32,
    pub last_key: i32,
    pub step: i32,
    pub kind: Kind,
}

const fn spec(
    name: &'static str,
    arity: i32,
    flags: &'static [&'static str],
    keys: (i32, i32, i32),
    kind: Kind,
) -> Spec {
    Spec {
        name,
        arity,
        flags,
        first_key: keys.0,
        last_key: keys.1,
        step: keys.2,
        kind,
    }
}

const W: &[&str] = &["write", "denyoom"];
const WF: &[&str] = &["write", "denyoom", "fast"];
const R: &[&str] = &["readonly", "fast"];
const RS: &[&str] = &["readonly"];
const F: &[&str] = &["fast"];
const NONE: (i32, i32, i32) = (0, 0, 0);
const ONE: (i32, i32, i32) = (1, 1, 1);
const ALL: (i32, i32, i32) = (1, -1, 1);
const PAIRS: (i32, i32, i32) = (1, -1, 2);

use Kind::{Barrier, Free, Keyed};

pub static COMMANDS: &[Spec] = &[
    spec("get", 2, R, ONE, Keyed),
    spec("set", -3, W, ONE, Keyed),
    spec("setnx", 3, WF, ONE, Keyed),
    spec("setex", 4, W, ONE, Keyed),
    spec("psetex", 4, W, ONE, Keyed),
    spec("getset", 3, WF, ONE, Keyed),
    spec("getdel", 2, WF, ONE, Keyed),
    spec("getex", -2, WF, ONE, Keyed),
    spec("mget", -2, R, ALL, Keyed),
    spec("mset", -3, W, PAIRS, Keyed),
    spec("msetnx", -3, W, PAIRS, Keyed),
    spec("append", 3, WF, ONE, Keyed),
    spec("strlen", 2, R, ONE, Keyed),
    spec("getrange", 4, RS, ONE, Keyed),
    spec("substr", 4, RS, ONE, Keyed),
    spec("setrange", 4, W, ONE, Keyed),
    spec("incr", 2, WF, ONE, Keyed),
    spec("incrby", 3, WF, ONE, Keyed),
    spec("incrbyfloat", 3, WF, ONE, Keyed),
    spec("decr", 2, WF, ONE, Keyed),
    spec("decrby", 3, WF, ONE, Keyed),
    spec("del", -2, &["write"], ALL, Keyed),
    spec("unlink", -2, &["write", "fast"], ALL, Keyed),
    spec("exists", -2, R, ALL, Keyed),
    spec("type", 2, R, ONE, Keyed),
    spec("ttl", 2, R, ONE, Keyed),
    spec("pttl", 2, R, ONE, Keyed),
    spec("persist", 2, &["write", "fast"], ONE, Keyed),
    spec("expiretime", 2, R, ONE, Keyed),
    spec("pexpiretime", 2, R, ONE, Keyed),
    spec("expire", -3, &["write", "fast"], ONE, Keyed),
    spec("pexpire", -3, &["write", "fast"], ONE, Keyed),
    spec("expireat", -3, &["write", "fast"], ONE, Keyed),
    spec("pexpireat", -3, &["write", "fast"], ONE, Keyed),
    spec("rename", 3, &["write"], (1, 2, 1), Keyed),
    spec("renamenx", 3, &["write", "fast"], (1, 2, 1), Keyed),
    spec("keys", 2, RS, NONE, Barrier),
    spec("scan", -2, RS, NONE, Barrier),
    spec("dbsize", 1, RS, NONE, Barrier),
    spec("randomkey", 1, RS, NONE, Barrier),
    spec("flushdb", -1, &["write"], NONE, Barrier),
    spec("flushall", -1, &["write"], NONE, Barrier),
    spec("ping", -1, F, NONE, Free),
    spec("echo", 2, F, NONE, Free),
    spec(
        "hello",
        -1,
        &["noscript", "loading", "stale", "fast"],
        NONE,
        Barrier,
    ),
    spec(
        "auth",
        -2,
        &["noscript", "loading", "stale", "fast"],
        NONE,
        Barrier,
    ),
    spec("select", 2, &["loading", "stale", "fast"], NONE, Barrier),
    spec("quit", -1, &["loading", "stale", "fast"], NONE, Barrier),
    spec("client", -2, &["loading", "stale"], NONE, Barrier),
    spec("info", -1, &["loading", "stale"], NONE, Barrier),
    spec("command", -1, &["loading", "stale"], NONE, Free),
    spec("config", -2, &["admin", "loading", "stale"], NONE, Free),
    spec("multi", 1, &["loading", "stale", "fast"], NONE, Barrier),
    spec("exec", 1, &["loading", "stale"], NONE, Barrier),
    spec("discard", 1, &["loading", "stale", "fast"], NONE, Barrier),
    spec("watch", -2, &["loading", "stale", "fast"], ALL, Barrier),
    spec("unwatch", 1, &["loading", "stale", "fast"], NONE, Barrier),
    spec("capkv.consistency", -1, &["fast"], NONE, Barrier),
];

pub fn lookup(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
}

impl Spec {
    pub fn arity_ok(&self, args: usize) -> bool {
        let args = args as i32;
        if self.arity >= 0 {
            args == self.arity
        } else {
            args >= -self.arity
        }
    }

    /// The keys among `args` (the command name is `args[0]`).
    pub fn keys<'a>(&self, args: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
        if self.first_key <= 0 {
            return vec![];
        }
        let n = args.len() as i32;
        let last = if self.last_key < 0 {
            n + self.last_key
        } else {
            self.last_key.min(n - 1)
        };
        let mut keys = Vec::new();
        let mut i = self.first_key;
        while i <= last && i < n {
            keys.push(args[i as usize].as_slice());
            i += self.step.max(1);
        }
        keys
    }

    /// This command's entry in `COMMAND` / `COMMAND INFO`.
    pub fn info(&self) -> Reply {
        Reply::Array(vec![
            Reply::bulk(self.name),
            Reply::Int(self.arity.into()),
            Reply::Array(
                self.flags
                    .iter()
                    .map(|f| Reply::Simple((*f).into()))
                    .collect(),
            ),
            Reply::Int(self.first_key.into()),
            Reply::Int(self.last_key.into()),
            Reply::Int(self.step.into()),
            Reply::Array(vec![]),
            Reply::Array(vec![]),
            Reply::Array(vec![]),
            Reply::Array(vec![]),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arity_and_keys_follow_the_table() {
        let set = lookup(b"SeT").unwrap();
        assert!(set.arity_ok(3) && set.arity_ok(5) && !set.arity_ok(2));
        let get = lookup(b"get").unwrap();
        assert!(get.arity_ok(2) && !get.arity_ok(3));
        let a = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
        let mset = lookup(b"mset").unwrap();
        assert_eq!(
            mset.keys(&a(&["mset", "a", "1", "b", "2"])),
            vec![&b"a"[..], b"b"]
        );
        let del = lookup(b"del").unwrap();
        assert_eq!(del.keys(&a(&["del", "a", "b"])).len(), 2);
        assert!(lookup(b"nope").is_none());
        let names: std::collections::HashSet<_> = COMMANDS.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), COMMANDS.len(), "a command is listed twice");
    }
}
