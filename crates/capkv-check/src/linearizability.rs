//! Linearizability of single-key register histories.
//!
//! The search is Wing & Gong's, with Lowe's memoization of (linearized set, state) pairs,
//! as described by Horn & Kroening (arXiv:1504.00204). Additions for real test runs:
//!
//! - **Unknown outcomes**: a write or compare-and-set whose outcome is unknown never
//!   returns (its return is at +infinity), so it may take effect at any point after its
//!   invocation, or, being linearizable at the very end, effectively never.
//! - **Budgets**: the search stops with [`Verdict::TooLarge`] past a number of operations,
//!   a number of memoized configurations, or a deadline, instead of running unbounded.
//! - **Counterexamples**: [`smallest_failing_window`] shrinks a failing history to a short
//!   window that still fails, for the report.

use std::collections::HashSet;
use std::time::Instant;

use crate::history::{EventType, Func, Operation};

/// A register operation with its observed result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegOp {
    Read(Option<u64>),
    Write(u64),
    /// Compare-and-set that succeeded.
    CasOk {
        from: Option<u64>,
        to: u64,
    },
    /// Compare-and-set that ran and found another value.
    CasFailed {
        from: Option<u64>,
    },
    /// Compare-and-set whose outcome is unknown.
    CasUnknown {
        from: Option<u64>,
        to: u64,
    },
}

/// The register's value, or "unknown" (any value) at the start of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Unknown,
    Known(Option<u64>),
}

/// The sequential specification: the next state, or `None` if `op` cannot happen in `state`.
pub fn step(state: State, op: RegOp) -> Option<State> {
    match (state, op) {
        (_, RegOp::Write(v)) => Some(State::Known(Some(v))),
        (State::Unknown, RegOp::Read(x)) => Some(State::Known(x)),
        (State::Known(s), RegOp::Read(x)) => (s == x).then_some(state),
        (State::Unknown, RegOp::CasOk { to, .. }) => Some(State::Known(Some(to))),
        (State::Known(s), RegOp::CasOk { from, to }) => {
            (s == from).then_some(State::Known(Some(to)))
        }
        (State::Unknown, RegOp::CasFailed { .. }) => Some(State::Unknown),
        (State::Known(s), RegOp::CasFailed { from }) => (s != from).then_some(state),
        (State::Unknown, RegOp::CasUnknown { .. }) => Some(State::Unknown),
        (State::Known(s), RegOp::CasUnknown { from, to }) => Some(if s == from {
            State::Known(Some(to))
        } else {
            state
        }),
    }
}

/// An operation placed in time. `ret == u64::MAX` means it never returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinOp {
    pub invoke: u64,
    pub ret: u64,
    pub op: RegOp,
    /// Index of the source operation (for reports).
    pub source: usize,
}

pub const NEVER: u64 = u64::MAX;

/// Turns recorded operations on one key into checker input. Reads that failed or whose
/// result is unknown say nothing and are dropped; so are writes that certainly failed.
pub fn to_lin_ops(ops: &[Operation]) -> Vec<LinOp> {
    let mut out = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        let ret = o.complete_ns.unwrap_or(NEVER);
        let op = match (o.f, o.kind) {
            (Func::Read, EventType::Ok) => RegOp::Read(o.value),
            (Func::Write, EventType::Ok) => RegOp::Write(o.value.unwrap_or(0)),
            (Func::Write, EventType::Info) => RegOp::Write(o.value.unwrap_or(0)),
            (Func::Cas, EventType::Ok) => match o.succeeded {
                Some(true) => RegOp::CasOk {
                    from: o.from,
                    to: o.value.unwrap_or(0),
                },
                _ => RegOp::CasFailed { from: o.from },
            },
            (Func::Cas, EventType::Info) => RegOp::CasUnknown {
                from: o.from,
                to: o.value.unwrap_or(0),
            },
            _ => continue,
        };
        let ret = if o.kind == EventType::Info {
            NEVER
        } else {
            ret
        };
        out.push(LinOp {
            invoke: o.invoke_ns,
            ret,
            op,
            source: i,
        });
    }
    out
}

/// Search limits.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_ops: usize,
    pub max_configurations: usize,
    pub deadline: Option<Instant>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_ops: 50_000,
            max_configurations: 5_000_000,
            deadline: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    NotLinearizable,
    /// The search was stopped by its budget; nothing is known.
    TooLarge(String),
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Decides whether `ops`, starting from `init`, are linearizable.
pub fn check(ops: &[LinOp], init: State, budget: Budget) -> Verdict {
    let n = ops.len();
    if n > budget.max_ops {
        return Verdict::TooLarge(format!(
            "{n} operations on one key (limit {})",
            budget.max_ops
        ));
    }
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Entries: 0 = head sentinel, 1..=2n = calls and returns, 2n+1 = tail sentinel.
    // Entry 2i+1 is op i's call, 2i+2 its return.
    let mut order: Vec<usize> = (1..=2 * n).collect();
    let time = |e: usize| {
        let op = &ops[(e - 1) / 2];
        if e % 2 == 1 {
            (op.invoke, 0u8)
        } else {
            (op.ret, 1u8)
        }
    };
    // Calls sort before returns at equal times: equal stamps are treated as concurrent.
    order.sort_by_key(|e| time(*e));
    let tail = 2 * n + 1;
    let mut next = vec![0usize; 2 * n + 2];
    let mut prev = vec![0usize; 2 * n + 2];
    let mut last = 0;
    for &e in &order {
        next[last] = e;
        prev[e] = last;
        last = e;
    }
    next[last] = tail;
    prev[tail] = last;

    let is_call = |e: usize| e % 2 == 1;
    let op_of = |e: usize| (e - 1) / 2;
    let ret_of = |call: usize| call + 1;

    let mut state = init;
    let mut linearized = Bits::new(n);
    let mut cache: HashSet<(Bits, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut entry = next[0];
    let mut steps: u64 = 0;
    while next[0] != tail {
        steps += 1;
        if steps.is_multiple_of(4096) {
            if budget.deadline.is_some_and(|d| Instant::now() > d) {
                return Verdict::TooLarge("time budget exhausted".into());
            }
            if cache.len() > budget.max_configurations {
                return Verdict::TooLarge(format!(
                    "more than {} configurations explored",
                    budget.max_configurations
                ));
            }
        }
        if entry != tail && is_call(entry) {
            let i = op_of(entry);
            if let Some(new_state) = step(state, ops[i].op) {
                let mut lin = linearized.clone();
                lin.set(i);
                if cache.insert((lin.clone(), new_state)) {
                    stack.push((entry, state));
                    state = new_state;
                    linearized = lin;
                    // Lift the call and its return out of the list.
                    let r = ret_of(entry);
                    next[prev[entry]] = next[entry];
                    prev[next[entry]] = prev[entry];
                    next[prev[r]] = next[r];
                    prev[next[r]] = prev[r];
                    entry = next[0];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            // A return whose call is not linearized (or the end, every remaining entry
            // skipped): undo the last choice.
            match stack.pop() {
                None => return Verdict::NotLinearizable,
                Some((call, s)) => {
                    state = s;
                    linearized.clear(op_of(call));
                    let r = ret_of(call);
                    next[prev[r]] = r;
                    prev[next[r]] = r;
                    next[prev[call]] = call;
                    prev[next[call]] = call;
                    entry = next[call];
                }
            }
        }
    }
    Verdict::Linearizable
}

/// The ops of the prefix of the history before `end`: ops invoked later are dropped, and
/// ops still running at `end` become unknown (reads dropped, writes never return).
fn prefix(ops: &[LinOp], end: u64) -> Vec<LinOp> {
    ops.iter()
        .filter(|o| o.invoke < end)
        .filter_map(|o| {
            if o.ret <= end {
                return Some(*o);
            }
            let op = match o.op {
                RegOp::Read(_) | RegOp::CasFailed { .. } => return None,
                RegOp::CasOk { from, to } | RegOp::CasUnknown { from, to } => {
                    RegOp::CasUnknown { from, to }
                }
                w @ RegOp::Write(_) => w,
            };
            Some(LinOp {
                ret: NEVER,
                op,
                ..*o
            })
        })
        .collect()
}

/// The ops of `window` that can follow an unknown state: drops every op that returned
/// before every kept op was invoked (those linearize first; `State::Unknown` stands for
/// their effect).
fn suffix(ops: &[LinOp], start: u64) -> Vec<LinOp> {
    let mut from = start;
    loop {
        let kept: Vec<LinOp> = ops.iter().filter(|o| o.ret >= from).copied().collect();
        let earliest = kept.iter().map(|o| o.invoke).min().unwrap_or(from);
        if earliest >= from {
            return kept;
        }
        from = earliest;
    }
}

/// Shrinks a failing history (from state `init`) to a short window that still fails:
/// first the shortest failing prefix, then the latest start. Returns the window's ops, or
/// `None` if the history does not fail within the budget.
pub fn smallest_failing_window(ops: &[LinOp], init: State, budget: Budget) -> Option<Vec<LinOp>> {
    let fails =
        |candidate: &[LinOp], s: State| check(candidate, s, budget) == Verdict::NotLinearizable;
    if !fails(ops, init) {
        return None;
    }
    let mut ends: Vec<u64> = ops
        .iter()
        .filter(|o| o.ret != NEVER)
        .map(|o| o.ret)
        .collect();
    ends.push(NEVER);
    ends.sort_unstable();
    ends.dedup();
    // Smallest end whose prefix fails (failure is monotone in the prefix).
    let (mut lo, mut hi) = (0usize, ends.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fails(&prefix(ops, ends[mid].saturating_add(1)), init) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let head = prefix(ops, ends[lo].saturating_add(1));
    // Latest start whose suffix of that prefix still fails from an unknown state.
    let mut starts: Vec<u64> = head.iter().map(|o| o.invoke).collect();
    starts.sort_unstable();
    starts.dedup();
    let (mut lo, mut hi) = (0usize, starts.len().saturating_sub(1));
    if !fails(&suffix(&head, starts[0]), State::Unknown) {
        return Some(head);
    }
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fails(&suffix(&head, starts[mid]), State::Unknown) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let mut window = suffix(&head, starts[lo]);
    window.sort_by_key(|o| o.invoke);
    Some(window)
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegOp::*;

    fn op(invoke: u64, ret: u64, op: RegOp) -> LinOp {
        LinOp {
            invoke,
            ret,
            op,
            source: 0,
        }
    }

    fn verdict(ops: &[LinOp]) -> Verdict {
        check(ops, State::Known(None), Budget::default())
    }

    #[test]
    fn sequential_and_concurrent_histories_pass() {
        // w1 ; r1 ; w2 || r(1 or 2)
        let ops = [
            op(0, 10, Write(1)),
            op(11, 20, Read(Some(1))),
            op(21, 40, Write(2)),
            op(25, 30, Read(Some(1))), // concurrent with w2: may see the old value
            op(31, 35, Read(Some(2))), // or the new one
            op(41, 50, Read(Some(2))),
        ];
        assert_eq!(verdict(&ops), Verdict::Linearizable);
        assert_eq!(
            verdict(&[op(0, 5, Read(None))]),
            Verdict::Linearizable,
            "an absent key reads as None"
        );
    }

    #[test]
    fn a_stale_read_is_rejected() {
        // w1 completes, w2 completes, then a read returns 1: stale.
        let ops = [
            op(0, 10, Write(1)),
            op(11, 20, Write(2)),
            op(21, 30, Read(Some(1))),
        ];
        assert_eq!(verdict(&ops), Verdict::NotLinearizable);
        // Reads going backwards in time across two clients.
        let ops = [
            op(0, 100, Write(1)),
            op(10, 20, Read(Some(1))),
            op(30, 40, Read(None)),
        ];
        assert_eq!(verdict(&ops), Verdict::NotLinearizable);
    }

    #[test]
    fn an_unknown_write_may_have_happened() {
        // w1 ok; w2 unknown (never returns); a later read sees 2: fine (w2 happened).
        let ops = [
            op(0, 10, Write(1)),
            op(11, NEVER, Write(2)),
            op(50, 60, Read(Some(2))),
        ];
        assert_eq!(verdict(&ops), Verdict::Linearizable);
    }

    #[test]
    fn an_unknown_write_may_not_have_happened() {
        // w1 ok; w2 unknown; a later read sees 1: fine too (w2 never took effect or later).
        let ops = [
            op(0, 10, Write(1)),
            op(11, NEVER, Write(2)),
            op(50, 60, Read(Some(1))),
        ];
        assert_eq!(verdict(&ops), Verdict::Linearizable);
        // But once 2 was seen, 1 cannot come back.
        let ops = [
            op(0, 10, Write(1)),
            op(11, NEVER, Write(2)),
            op(50, 60, Read(Some(2))),
            op(70, 80, Read(Some(1))),
        ];
        assert_eq!(verdict(&ops), Verdict::NotLinearizable);
    }

    #[test]
    fn compare_and_set_is_checked_both_ways() {
        let ok = [
            op(0, 10, Write(1)),
            op(
                11,
                20,
                CasOk {
                    from: Some(1),
                    to: 2,
                },
            ),
            op(21, 30, Read(Some(2))),
        ];
        assert_eq!(verdict(&ok), Verdict::Linearizable);
        let bad = [
            op(0, 10, Write(1)),
            op(
                11,
                20,
                CasOk {
                    from: Some(3),
                    to: 2,
                },
            ),
        ];
        assert_eq!(
            verdict(&bad),
            Verdict::NotLinearizable,
            "cas cannot succeed from a value not held"
        );
        let failed_wrongly = [op(0, 10, Write(1)), op(11, 20, CasFailed { from: Some(1) })];
        assert_eq!(
            verdict(&failed_wrongly),
            Verdict::NotLinearizable,
            "cas cannot fail when the value matches"
        );
        let unknown = [
            op(0, 10, Write(1)),
            op(
                11,
                NEVER,
                CasUnknown {
                    from: Some(1),
                    to: 2,
                },
            ),
            op(30, 40, Read(Some(2))),
        ];
        assert_eq!(verdict(&unknown), Verdict::Linearizable);
    }

    #[test]
    fn budgets_stop_the_search() {
        let ops: Vec<LinOp> = (0..100).map(|i| op(i, i + 1, Write(i))).collect();
        let tight = Budget {
            max_ops: 10,
            ..Default::default()
        };
        assert!(matches!(
            check(&ops, State::Known(None), tight),
            Verdict::TooLarge(_)
        ));
        let past = Budget {
            deadline: Some(Instant::now()),
            ..Default::default()
        };
        // Many concurrent writes and a read that matches none: exhaustive, but the
        // deadline stops it.
        let mut hard: Vec<LinOp> = (0..18).map(|i| op(0, 1000, Write(i))).collect();
        hard.push(op(2000, 2001, Read(Some(99))));
        assert!(matches!(
            check(&hard, State::Known(None), past),
            Verdict::TooLarge(_)
        ));
    }

    #[test]
    fn shrinks_to_a_small_failing_window() {
        let mut ops = Vec::new();
        for i in 0..200u64 {
            ops.push(op(i * 100, i * 100 + 10, Write(i)));
            ops.push(op(i * 100 + 20, i * 100 + 30, Read(Some(i))));
        }
        // One stale read in the middle.
        ops.push(op(10_050, 10_060, Read(Some(50))));
        ops.sort_by_key(|o| o.invoke);
        assert_eq!(verdict(&ops), Verdict::NotLinearizable);
        let w = smallest_failing_window(&ops, State::Known(None), Budget::default()).unwrap();
        assert!(w.len() <= 4, "window of {} ops: {w:?}", w.len());
        assert!(w
            .iter()
            .any(|o| o.op == Read(Some(50)) && o.invoke == 10_050));
        assert_eq!(
            check(&w, State::Unknown, Budget::default()),
            Verdict::NotLinearizable
        );
    }
}
