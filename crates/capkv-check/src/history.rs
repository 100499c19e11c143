//! Histories: every operation as an invoke event and a completion event.
//!
//! Completion types follow Jepsen: `ok` (it happened, with this result), `fail` (it
//! certainly did not happen), `info` (unknown: it may have happened, at any time after its
//! invocation).

use std::io::Write;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Invoke,
    Ok,
    Fail,
    Info,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Func {
    /// Register read; `value` is the value read (`None`: absent).
    Read,
    /// Register write of `value`.
    Write,
    /// Register compare-and-set from `from` to `value`; `succeeded` on completion.
    Cas,
    /// Set add of element `value`.
    Add,
    /// Set read; `elements` on completion.
    ReadSet,
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub index: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub process: u64,
    pub f: Func,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succeeded: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elements: Option<Vec<u64>>,
    /// On a completion: the revision of the key the operation wrote (write, cas) or read
    /// (read; 0 when absent), for the session checker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// On a completion: the log position of the entry that carried the write, or for a
    /// read the serving replica's applied index after it (the state read is no newer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Nanoseconds since the run started (monotonic clock).
    pub time_ns: u64,
    /// Wall-clock milliseconds since the Unix epoch.
    pub wall_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An invocation paired with its completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub process: u64,
    pub f: Func,
    pub key: String,
    pub invoke_ns: u64,
    /// `None` when the outcome is unknown (info) or the run ended first.
    pub complete_ns: Option<u64>,
    pub kind: EventType,
    /// Invoke value (write/cas/add) or read result (read).
    pub value: Option<u64>,
    pub from: Option<u64>,
    pub succeeded: Option<bool>,
    pub elements: Option<Vec<u64>>,
    /// Index of the invoke event in the history.
    pub index: u64,
    /// The completion's revision (see `Event::revision`).
    pub revision: Option<u64>,
    /// The completion's log position (see `Event::position`).
    pub position: Option<u64>,
}

/// Pairs each invoke with the next completion of the same process. An invoke without a
/// completion is treated as `info`.
pub fn pair(events: &[Event]) -> Vec<Operation> {
    let mut open: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut ops: Vec<Operation> = Vec::new();
    for e in events {
        match e.kind {
            EventType::Invoke => {
                open.insert(e.process, ops.len());
                ops.push(Operation {
                    process: e.process,
                    f: e.f,
                    key: e.key.clone(),
                    invoke_ns: e.time_ns,
                    complete_ns: None,
                    kind: EventType::Info,
                    value: e.value,
                    from: e.from,
                    succeeded: None,
                    elements: None,
                    index: e.index,
                    revision: None,
                    position: None,
                });
            }
            kind => {
                if let Some(i) = open.remove(&e.process) {
                    let op = &mut ops[i];
                    op.kind = kind;
                    if kind != EventType::Info {
                        op.complete_ns = Some(e.time_ns);
                    }
                    if matches!(op.f, Func::Read) && kind == EventType::Ok {
                        op.value = e.value;
                    }
                    op.succeeded = e.succeeded;
                    op.revision = e.revision;
                    op.position = e.position;
                    if e.elements.is_some() {
                        op.elements = e.elements.clone();
                    }
                }
            }
        }
    }
    ops
}

/// Appends events to a JSON-lines file.
pub struct HistoryWriter {
    out: std::io::BufWriter<std::fs::File>,
}

impl HistoryWriter {
    pub fn create(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(HistoryWriter {
            out: std::io::BufWriter::new(std::fs::File::create(path)?),
        })
    }

    pub fn write(&mut self, e: &Event) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, e)?;
        self.out.write_all(b"\n")
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

/// Reads a history file back.
pub fn load(path: &std::path::Path) -> anyhow::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        out.push(
            serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(index: u64, kind: EventType, process: u64, f: Func, value: Option<u64>, t: u64) -> Event {
        Event {
            revision: None,
            position: None,
            index,
            kind,
            process,
            f,
            key: "k".into(),
            value,
            from: None,
            succeeded: None,
            elements: None,
            time_ns: t,
            wall_ms: 0,
            error: None,
        }
    }

    #[test]
    fn pairs_invocations_with_completions() {
        let events = vec![
            ev(0, EventType::Invoke, 1, Func::Write, Some(5), 10),
            ev(1, EventType::Invoke, 2, Func::Read, None, 11),
            ev(2, EventType::Ok, 2, Func::Read, Some(5), 20),
            ev(3, EventType::Info, 1, Func::Write, Some(5), 30),
            ev(4, EventType::Invoke, 3, Func::Write, Some(6), 40),
        ];
        let ops = pair(&events);
        assert_eq!(ops.len(), 3);
        assert_eq!((ops[0].kind, ops[0].complete_ns), (EventType::Info, None));
        assert_eq!(
            (ops[1].kind, ops[1].value, ops[1].complete_ns),
            (EventType::Ok, Some(5), Some(20))
        );
        assert_eq!(
            (ops[2].kind, ops[2].complete_ns),
            (EventType::Info, None),
            "no completion = unknown"
        );
    }

    #[test]
    fn events_round_trip_through_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        let mut w = HistoryWriter::create(&path).unwrap();
        let e = ev(0, EventType::Invoke, 1, Func::Write, Some(5), 10);
        w.write(&e).unwrap();
        w.finish().unwrap();
        assert_eq!(load(&path).unwrap(), vec![e]);
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(line.contains("\"type\":\"invoke\""), "{line}");
    }
}
