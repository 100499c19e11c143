//! Consistent prefix over the sequence workload: each generation of a sequence lives in
//! one partition, and its writer writes element `i` only after `i - 1` was acknowledged,
//! so `i` follows `i - 1` in the partition's log. A read of a replica's state at any point
//! of that log sees `1..=n` for some `n`; a read that sees an element without an earlier
//! one saw a state that never existed (writes out of order, a torn scan, a lost write).

use crate::history::{EventType, Func, Operation};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixViolation {
    pub key: String,
    /// The history index of the read.
    pub index: u64,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct PrefixReport {
    pub reads: usize,
    /// Reads that saw at least one element.
    pub nonempty: usize,
    pub elements_seen: usize,
    pub violations: Vec<PrefixViolation>,
}

pub fn check_prefix(ops: &[Operation]) -> PrefixReport {
    let mut report = PrefixReport::default();
    for o in ops {
        if o.f != Func::ReadSet || o.kind != EventType::Ok {
            continue;
        }
        let Some(elements) = &o.elements else {
            continue;
        };
        report.reads += 1;
        report.elements_seen += elements.len();
        if !elements.is_empty() {
            report.nonempty += 1;
        }
        let mut seen = elements.clone();
        seen.sort_unstable();
        let n = seen.len() as u64;
        if let Some(missing) = (1..=n).find(|i| seen.binary_search(i).is_err()) {
            let max = seen.last().copied().unwrap_or(0);
            report.violations.push(PrefixViolation {
                key: o.key.clone(),
                index: o.index,
                detail: format!(
                    "saw {n} elements up to {max} but not {missing}, written and acknowledged \
                     before {max} was written"
                ),
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(index: u64, elements: &[u64]) -> Operation {
        Operation {
            process: 1,
            f: Func::ReadSet,
            key: "seq-0.0".into(),
            invoke_ns: index,
            complete_ns: Some(index + 1),
            kind: EventType::Ok,
            value: None,
            from: None,
            succeeded: None,
            elements: Some(elements.to_vec()),
            index,
            revision: None,
            position: None,
        }
    }

    #[test]
    fn a_read_must_see_a_prefix_of_the_sequence() {
        let ops = vec![read(0, &[]), read(1, &[2, 1, 3]), read(2, &[1])];
        let r = check_prefix(&ops);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!((r.reads, r.nonempty, r.elements_seen), (3, 2, 4));
        let r = check_prefix(&[read(0, &[1, 3]), read(1, &[2])]);
        assert_eq!(r.violations.len(), 2, "{:?}", r.violations);
        assert!(
            r.violations[0].detail.contains("not 2"),
            "{:?}",
            r.violations
        );
    }
}
