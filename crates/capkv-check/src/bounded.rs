//! Bounded-staleness checks over a recorded register history.
//!
//! - **By time** (`bounded:Tms`): a read may take effect at any moment from `T` before it
//!   was invoked until it returned. That is linearizability with each read's invocation
//!   moved `T` earlier ([`shift_reads`]), so the register checker decides it: a read that
//!   misses a write acknowledged more than `T` before it began, or returns a state older
//!   than one it could have seen, has no place in any order.
//! - **By log positions** (`bounded:K`): a read is served from a replica's state at some
//!   position `a` of its partition's log. `a` is at most the replica's applied index the
//!   read reported, and below the position of any write of the key newer (by revision)
//!   than the value it returned. Every write of the partition acknowledged before the read
//!   began is at or below the commit index when it began. So if one such write sits at
//!   position `m` and `a` is at most `u`, the read was at least `m - u` positions behind:
//!   more than `K` is a violation ([`check_positions`]). Writes whose outcome is unknown
//!   only make the true lag larger, never smaller, so leaving them out cannot make a
//!   correct history look invalid.

use std::collections::{BTreeMap, HashMap};

use capkv_types::partition_for_key;

use crate::history::{EventType, Func, Operation};
use crate::linearizability::{LinOp, RegOp};

/// Moves each read's invocation `by_ns` earlier (see the module's docs).
pub fn shift_reads(ops: &mut [LinOp], by_ns: u64) {
    for op in ops {
        if matches!(op.op, RegOp::Read(_)) {
            op.invoke = op.invoke.saturating_sub(by_ns);
        }
    }
}

/// A read more than `K` log positions behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LagViolation {
    pub key: String,
    /// The history index of the read.
    pub index: u64,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct LagReport {
    /// Completed reads checked.
    pub reads: usize,
    /// The largest lag proven for any read (a lower bound of its true lag).
    pub max_proven_lag: u64,
    pub violations: Vec<LagViolation>,
}

/// Checks that every completed read of `ops` was at most `k` log positions behind its
/// partition's latest write acknowledged before the read began, and that the revision
/// it returned is the one its value was written at.
pub fn check_positions(ops: &[Operation], k: u64, partitions: u32) -> LagReport {
    let written = |o: &Operation| {
        o.kind == EventType::Ok
            && match o.f {
                Func::Write => true,
                Func::Cas => o.succeeded == Some(true),
                _ => false,
            }
    };
    // Per partition: acknowledged writes as (ack time, position), in ack order, with the
    // highest position acknowledged up to each.
    let mut acked: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    // Per key: its acknowledged writes as (revision, position), and each value's revision.
    let mut writes: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    let mut value_at: HashMap<(&str, u64), u64> = HashMap::new();
    for o in ops.iter().filter(|o| written(o)) {
        let (Some(at), Some(rev)) = (o.complete_ns, o.revision) else {
            continue;
        };
        if let Some(v) = o.value {
            value_at.insert((o.key.as_str(), v), rev);
        }
        let Some(pos) = o.position else { continue };
        let p = partition_for_key(o.key.as_bytes(), partitions).0;
        acked.entry(p).or_default().push((at, pos));
        writes.entry(o.key.as_str()).or_default().push((rev, pos));
    }
    let acked: HashMap<u32, Vec<(u64, u64)>> = acked
        .into_iter()
        .map(|(p, mut w)| {
            w.sort_unstable();
            let mut top = 0;
            for e in &mut w {
                top = top.max(e.1);
                e.1 = top;
            }
            (p, w)
        })
        .collect();
    for w in writes.values_mut() {
        w.sort_unstable();
    }
    let mut report = LagReport::default();
    let mut reads: BTreeMap<u64, &Operation> = BTreeMap::new();
    for o in ops {
        if o.f == Func::Read && o.kind == EventType::Ok {
            reads.insert(o.index, o);
        }
    }
    for (index, o) in reads {
        let Some(r) = o.revision else { continue };
        report.reads += 1;
        let key = o.key.as_str();
        if let Some(v) = o.value {
            if let Some(&w) = value_at.get(&(key, v)) {
                if w != r {
                    report.violations.push(LagViolation {
                        key: key.to_string(),
                        index,
                        detail: format!(
                            "read value {v} at revision {r}, but it was written at {w}"
                        ),
                    });
                    continue;
                }
            }
        }
        // The highest position the state read can be at.
        let newer = writes
            .get(key)
            .and_then(|w| w.iter().find(|(rev, _)| *rev > r))
            .map(|(_, pos)| pos - 1);
        let Some(upper) = [o.position, newer].into_iter().flatten().min() else {
            continue;
        };
        let p = partition_for_key(key.as_bytes(), partitions).0;
        let Some(w) = acked.get(&p) else { continue };
        // The highest position acknowledged before the read began.
        let before = w.partition_point(|(at, _)| *at < o.invoke_ns);
        if before == 0 {
            continue;
        }
        let latest = w[before - 1].1;
        let lag = latest.saturating_sub(upper);
        report.max_proven_lag = report.max_proven_lag.max(lag);
        if lag > k {
            report.violations.push(LagViolation {
                key: key.to_string(),
                index,
                detail: format!(
                    "read a state at log position {upper} or earlier (revision {r} of the key) \
                     when position {latest} of its partition was already acknowledged: at \
                     least {lag} positions behind, more than {k}"
                ),
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        index: u64,
        f: Func,
        key: &str,
        value: u64,
        at: (u64, u64),
        revision: u64,
        position: u64,
    ) -> Operation {
        Operation {
            process: index,
            f,
            key: key.into(),
            invoke_ns: at.0,
            complete_ns: Some(at.1),
            kind: EventType::Ok,
            value: (value != 0).then_some(value),
            from: None,
            succeeded: None,
            elements: None,
            index,
            revision: Some(revision),
            position: Some(position),
        }
    }

    #[test]
    fn a_read_is_held_to_the_writes_acknowledged_before_it_began() {
        // Key a: revisions 1 (value 1, position 1) and 5 (value 2, position 4); key b
        // (same partition, one partition in all) reaches position 9 before the reads.
        let mut ops = vec![
            op(0, Func::Write, "a", 1, (0, 10), 1, 1),
            op(1, Func::Write, "a", 2, (20, 30), 5, 4),
            op(2, Func::Write, "b", 3, (40, 50), 9, 9),
        ];
        // Read value 1 at 60: its state is before position 4 (it lacks revision 5),
        // with position 9 acknowledged: at least 6 behind.
        ops.push(op(3, Func::Read, "a", 1, (60, 70), 1, 20));
        let r = check_positions(&ops, 6, 1);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.max_proven_lag, 6);
        assert_eq!(check_positions(&ops, 5, 1).violations.len(), 1);
        // The replica said it had applied only position 2: at least 7 behind.
        ops[3].position = Some(2);
        assert_eq!(check_positions(&ops, 0, 1).max_proven_lag, 7);
        // The same read begun before position 9 was acknowledged: 1 behind (of 4).
        ops[3].invoke_ns = 45;
        assert_eq!(check_positions(&ops, 1, 1).max_proven_lag, 2);
        // Reading the latest value at the latest position is never behind.
        ops[3] = op(3, Func::Read, "a", 2, (60, 70), 5, 9);
        assert!(check_positions(&ops, 0, 1).violations.is_empty());
        // A revision that does not match the value's write is reported.
        ops[3] = op(3, Func::Read, "a", 2, (60, 70), 6, 9);
        assert_eq!(check_positions(&ops, 100, 1).violations.len(), 1);
    }

    #[test]
    fn shifted_reads_start_earlier_and_nothing_else_moves() {
        let mut ops = vec![
            LinOp {
                invoke: 100,
                ret: 200,
                op: RegOp::Read(None),
                source: 0,
            },
            LinOp {
                invoke: 100,
                ret: 200,
                op: RegOp::Write(1),
                source: 1,
            },
            LinOp {
                invoke: 5,
                ret: 9,
                op: RegOp::Read(None),
                source: 2,
            },
        ];
        shift_reads(&mut ops, 10);
        assert_eq!(
            ops.iter().map(|o| o.invoke).collect::<Vec<_>>(),
            vec![90, 100, 0]
        );
    }
}
