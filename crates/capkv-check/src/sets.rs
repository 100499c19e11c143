//! The append-set checker: every acknowledged add must be in the final read of its set.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{EventType, Func, Operation};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SetReport {
    pub acked: usize,
    pub present: usize,
    /// Acknowledged adds missing from the final read.
    pub lost: Vec<u64>,
    /// Elements in the final read that no client ever tried to add.
    pub unexpected: Vec<u64>,
    /// Adds with unknown outcome that turned out to have happened.
    pub unknown_present: usize,
    /// False when the key had no successful final read.
    pub final_read: bool,
}

impl SetReport {
    pub fn valid(&self) -> bool {
        self.final_read && self.lost.is_empty() && self.unexpected.is_empty()
    }
}

/// Checks every set key. The final read of a key is its last successful `read_set`.
pub fn check_sets(ops: &[Operation]) -> BTreeMap<String, SetReport> {
    let mut attempted: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    let mut acked: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    let mut unknown: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    let mut finals: BTreeMap<&str, (u64, BTreeSet<u64>)> = BTreeMap::new();
    for o in ops {
        match (o.f, o.kind) {
            (Func::Add, kind) => {
                let Some(e) = o.value else { continue };
                attempted.entry(&o.key).or_default().insert(e);
                match kind {
                    EventType::Ok => {
                        acked.entry(&o.key).or_default().insert(e);
                    }
                    EventType::Info => {
                        unknown.entry(&o.key).or_default().insert(e);
                    }
                    _ => {}
                }
            }
            (Func::ReadSet, EventType::Ok) => {
                let at = o.complete_ns.unwrap_or(0);
                let elements: BTreeSet<u64> =
                    o.elements.clone().unwrap_or_default().into_iter().collect();
                let slot = finals.entry(&o.key).or_insert((0, BTreeSet::new()));
                if at >= slot.0 {
                    *slot = (at, elements);
                }
            }
            _ => {}
        }
    }
    let keys: BTreeSet<&str> = attempted.keys().chain(finals.keys()).copied().collect();
    keys.into_iter()
        .map(|k| {
            let empty = BTreeSet::new();
            let acked_k = acked.get(k).unwrap_or(&empty);
            let attempted_k = attempted.get(k).unwrap_or(&empty);
            let unknown_k = unknown.get(k).unwrap_or(&empty);
            let report = match finals.get(k) {
                None => SetReport {
                    acked: acked_k.len(),
                    final_read: false,
                    ..Default::default()
                },
                Some((_, fin)) => SetReport {
                    acked: acked_k.len(),
                    present: acked_k.intersection(fin).count(),
                    lost: acked_k.difference(fin).copied().collect(),
                    unexpected: fin.difference(attempted_k).copied().collect(),
                    unknown_present: unknown_k.intersection(fin).count(),
                    final_read: true,
                },
            };
            (k.to_string(), report)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(e: u64, kind: EventType) -> Operation {
        Operation {
            process: 1,
            f: Func::Add,
            key: "s".into(),
            invoke_ns: e,
            complete_ns: Some(e + 1),
            kind,
            value: Some(e),
            from: None,
            succeeded: None,
            elements: None,
            index: e,
            revision: None,
            position: None,
        }
    }

    fn read(at: u64, elements: Vec<u64>) -> Operation {
        Operation {
            f: Func::ReadSet,
            value: None,
            elements: Some(elements),
            complete_ns: Some(at),
            ..add(at, EventType::Ok)
        }
    }

    #[test]
    fn finds_lost_and_unexpected_elements() {
        let ops = vec![
            add(1, EventType::Ok),
            add(2, EventType::Ok),
            add(3, EventType::Info),
            add(4, EventType::Fail),
            read(100, vec![1, 3, 99]),
        ];
        let r = &check_sets(&ops)["s"];
        assert_eq!(r.lost, vec![2]);
        assert_eq!(r.unexpected, vec![99]);
        assert_eq!(r.unknown_present, 1);
        assert!(!r.valid());
        let good = vec![
            add(1, EventType::Ok),
            add(3, EventType::Info),
            read(5, vec![1]),
            read(100, vec![1, 3]),
        ];
        assert!(check_sets(&good)["s"].valid());
        let no_final = vec![add(1, EventType::Ok)];
        assert!(
            !check_sets(&no_final)["s"].valid(),
            "without a final read nothing is proven"
        );
    }
}
