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
//!
//! capkv's sessions are per partition (a token holds a log position per partition), so
//! the checker also holds reads to everything the session saw in the key's partition:
//! once it read or wrote revision `F` of any key there, a read of key `k` returning
//! revision `r` is stale if some acknowledged write of `k` (by any client) has a revision
//! in `(r, F]`: revisions grow along the partition's log, so that write came before what
//! the session had already seen.

use std::collections::{BTreeMap, HashMap};

use capkv_types::partition_for_key;

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

/// Checks `ops` (in history order) of `clients` sessions over `partitions` partitions.
pub fn check_sessions(ops: &[Operation], clients: u64, partitions: u32) -> SessionReport {
    let clients = clients.max(1);
    let mut seen: HashMap<(u64, &str), Seen> = HashMap::new();
    // Every acknowledged write's revision, per key (sorted).
    let mut writes: HashMap<&str, Vec<u64>> = HashMap::new();
    for op in ops {
        if op.kind == EventType::Ok
            && matches!(op.f, Func::Write | Func::Cas)
            && op.succeeded != Some(false)
        {
            if let Some(r) = op.revision {
                writes.entry(op.key.as_str()).or_default().push(r);
            }
        }
    }
    for w in writes.values_mut() {
        w.sort_unstable();
    }
    // Per (session, partition): the highest revision seen there, and whether the session
    // wrote it.
    let mut floor: HashMap<(u64, u32), (u64, bool)> = HashMap::new();
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
        let partition = partition_for_key(op.key.as_bytes(), partitions.max(1)).0;
        let floor = floor.entry((session, partition)).or_default();
        let s = seen.entry((session, op.key.as_str())).or_default();
        // This operation's broken guarantees.
        let mut found: Vec<(&'static str, String)> = Vec::new();
        let mut violate = |guarantee: &'static str, detail: String| found.push((guarantee, detail));
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
                // Across the partition: a write of this key the session had already gone
                // past (only if the per-key rules above found nothing).
                let missed = writes.get(op.key.as_str()).and_then(|w| {
                    let i = w.partition_point(|x| *x <= revision);
                    w.get(i).copied().filter(|x| *x <= floor.0)
                });
                let per_key_clean = found.is_empty();
                if let (Some(w), true) = (missed, per_key_clean) {
                    let guarantee = if floor.1 {
                        "read-your-writes"
                    } else {
                        "monotonic reads"
                    };
                    found.push((
                        guarantee,
                        format!(
                            "read revision {revision}, but the session had seen revision {} \
                             of partition {partition}, after the write of revision {w}",
                            floor.0
                        ),
                    ));
                }
                if revision > floor.0 {
                    *floor = (revision, false);
                }
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
                if revision > floor.0 {
                    *floor = (revision, true);
                }
            }
            _ => {}
        }
        report.violations.extend(
            found
                .into_iter()
                .map(|(guarantee, detail)| SessionViolation {
                    session,
                    key: op.key.clone(),
                    guarantee,
                    index: op.index,
                    detail,
                }),
        );
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
            position: None,
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
        let r = check_sessions(&ops, 2, 1);
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
            let r = check_sessions(&ops, 2, 1);
            assert_eq!(
                r.violations.iter().map(|v| v.guarantee).collect::<Vec<_>>(),
                vec![guarantee]
            );
            assert_eq!(r.violations[0].index, 1);
        }
    }

    #[test]
    fn a_stale_read_of_another_key_of_the_partition_is_caught() {
        let on = |key: &str, mut o: Operation| {
            o.key = key.into();
            o
        };
        // Another client writes k2 at revision 8; the session reads k1 at revision 9 (so
        // its partition's state was past 8), then reads k2 at revision 3: stale.
        let ops = vec![
            on("k2", op(0, 1, Func::Write, 8)),
            on("k1", op(1, 0, Func::Read, 9)),
            on("k2", op(2, 0, Func::Read, 3)),
        ];
        let r = check_sessions(&ops, 2, 1);
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert_eq!(r.violations[0].guarantee, "monotonic reads");
        assert_eq!(r.violations[0].index, 2);
        // The same after the session's own write of k1 at 9: read-your-writes.
        let ops = vec![
            on("k2", op(0, 1, Func::Write, 8)),
            on("k1", op(1, 0, Func::Write, 9)),
            on("k2", op(2, 0, Func::Read, 3)),
        ];
        let r = check_sessions(&ops, 2, 1);
        assert_eq!(r.violations[0].guarantee, "read-your-writes");
        // Reading k2 at 8 (or a write of k2 after 9 that is not seen) is fine.
        let ops = vec![
            on("k2", op(0, 1, Func::Write, 8)),
            on("k1", op(1, 0, Func::Read, 9)),
            on("k2", op(2, 1, Func::Write, 12)),
            on("k2", op(3, 0, Func::Read, 8)),
        ];
        assert!(check_sessions(&ops, 2, 1).violations.is_empty());
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
        let r = check_sessions(&ops, 1, 1);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.checked, 1);
    }
}
