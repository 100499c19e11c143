//! The session guarantees (Terry et al., 1994) over a recorded register history: each
//! client task is one session (its process ids are `task + k * clients`), and every
//! completed operation carries the revision of the key it wrote or read. Within a
//! session, per key:
//! - **read-your-writes**: a read returns a revision at least that of the session's last
//!   acknowledged write of the key;
//! - **monotonic reads**: a read returns a revision at least that of the session's
//!   previous read of the key;
//! - **monotonic writes**: an acknowledged write gets a revision above the session's
//!   previous acknowledged write of the key;
//! - **writes-follow-reads**: an acknowledged write gets a revision above every revision
//!   of the key the session read before it.
//!
//! Revisions of one key increase with every write (they are a per-partition counter), so
//! these comparisons are the guarantees themselves. Operations whose outcome is unknown,
//! or that failed, say nothing and are skipped.

use std::collections::{BTreeMap, HashMap};

use crate::history::{EventType, Func, Operation};

/// What a session knows of a key: the highest revision it wrote and read.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    wrote: u64,
    read: u64,
}

/// One broken guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionViolation {
    pub session: u64,
    pub key: String,
    pub guarantee: &'static str,
    /// The history index of the operation that broke it.
    pub index: u64,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct SessionReport {
    pub sessions: usize,
    /// Operations compared (completed reads and acknowledged writes with a revision).
    pub checked: usize,
    pub violations: Vec<SessionViolation>,
}

/// Checks `ops` (in history order) of `clients` sessions.
pub fn check_sessions(ops: &[Operation], clients: u64) -> SessionReport {
    let clients = clients.max(1);
    let mut seen: HashMap<(u64, &str), Seen> = HashMap::new();
    let mut report = SessionReport::default();
    let mut sessions = BTreeMap::new();
    for op in ops {
        let session = op.process % clients;
        sessions.insert(session, ());
        let Some(revision) = op.revision else {
            continue;
        };
        if op.kind != EventType::Ok {
            continue;
        }
        let s = seen.entry((session, op.key.as_str())).or_default();
        let mut violate = |guarantee: &'static str, detail: String| {
            report.violations.push(SessionViolation {
                session,
                key: op.key.clone(),
                guarantee,
                index: op.index,
                detail,
            })
        };
        match op.f {
            Func::Read => {
                report.checked += 1;
                if revision < s.wrote {
                    violate(
                        "read-your-writes",
                        format!(
                            "read revision {revision} after writing revision {}",
                            s.wrote
                        ),
                    );
                }
                if revision < s.read {
                    violate(
                        "monotonic reads",
                        format!("read revision {revision} after reading revision {}", s.read),
                    );
                }
                s.read = s.read.max(revision);
            }
            Func::Write | Func::Cas if op.succeeded != Some(false) => {
                report.checked += 1;
                if revision <= s.wrote {
                    violate(
                        "monotonic writes",
                        format!(
                            "wrote revision {revision} after writing revision {}",
                            s.wrote
                        ),
                    );
                }
                if revision <= s.read {
                    violate(
                        "writes-follow-reads",
                        format!(
                            "wrote revision {revision} after reading revision {}",
                            s.read
                        ),
                    );
                }
                s.wrote = s.wrote.max(revision);
            }
            _ => {}
        }
    }
    report.sessions = sessions.len();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(index: u64, process: u64, f: Func, revision: u64) -> Operation {
        Operation {
            process,
            f,
            key: "k".into(),
            invoke_ns: index,
            complete_ns: Some(index + 1),
            kind: EventType::Ok,
            value: None,
            from: None,
            succeeded: None,
            elements: None,
            index,
            revision: Some(revision),
        }
    }

    #[test]
    fn a_history_that_keeps_the_guarantees_is_valid() {
        // Two sessions (processes 0 and 1, and 2 = session 0 after an unknown outcome).
        let ops = vec![
            op(0, 0, Func::Write, 5),
            op(1, 1, Func::Read, 3), // session 1 never wrote: an older revision is fine
            op(2, 0, Func::Read, 5),
            op(3, 2, Func::Read, 7),
            op(4, 1, Func::Write, 8),
            op(5, 1, Func::Read, 8),
        ];
        let r = check_sessions(&ops, 2);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!((r.sessions, r.checked), (2, 6));
    }

    #[test]
    fn each_guarantee_is_caught() {
        let cases = [
            (
                vec![op(0, 0, Func::Write, 5), op(1, 0, Func::Read, 4)],
                "read-your-writes",
            ),
            (
                vec![op(0, 0, Func::Read, 6), op(1, 2, Func::Read, 4)],
                "monotonic reads",
            ),
            (
                vec![op(0, 0, Func::Write, 6), op(1, 0, Func::Cas, 6)],
                "monotonic writes",
            ),
            (
                vec![op(0, 0, Func::Read, 9), op(1, 0, Func::Write, 7)],
                "writes-follow-reads",
            ),
        ];
        for (ops, guarantee) in cases {
            let r = check_sessions(&ops, 2);
            assert_eq!(
                r.violations.iter().map(|v| v.guarantee).collect::<Vec<_>>(),
                vec![guarantee]
            );
            assert_eq!(r.violations[0].index, 1);
        }
    }

    #[test]
    fn unknown_failed_and_conflicting_operations_say_nothing() {
        let mut unknown = op(0, 0, Func::Write, 50);
        unknown.kind = EventType::Info;
        let mut failed_cas = op(1, 0, Func::Cas, 40);
        failed_cas.succeeded = Some(false);
        let mut no_revision = op(2, 0, Func::Read, 0);
        no_revision.revision = None;
        let ops = vec![unknown, failed_cas, no_revision, op(3, 0, Func::Read, 1)];
        let r = check_sessions(&ops, 1);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.checked, 1);
    }
}
