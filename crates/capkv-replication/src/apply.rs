//! Executing replicated commands against a partition's data: conditions, MVCC revisions,
//! HLC stamps and the client-session table. The replication engine's state machine
//! (`capkv-server`'s `CapkvMachine`) decides the revision of each command and when a batch
//! of applied commands is written.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

use capkv_storage::{SmOp, SmWrite, StorageEngine, StoredValue};
use capkv_types::{Hlc, HlcTimestamp, PartitionId};

use crate::codec::{decode, encode};
use crate::sessions::{Admission, Session, SessionChange, Sessions};
use crate::types::{Command, CommandResponse, Condition, Op, Rejection, StepAnswer, Update};

/// One partition's command executor. Changes accumulate until [`Applier::flush`] writes
/// them, with the caller's applied state, as one atomic storage write; reads during the
/// batch see the batch's own changes.
pub struct Applier {
    engine: Arc<dyn StorageEngine>,
    partition: PartitionId,
    hlc: Arc<Hlc>,
    /// The highest HLC stamp applied; the next write is stamped above it.
    last_hlc: u64,
    sessions: Sessions,
    session_ttl_ms: u64,
    /// Session changes of the batch being applied, one per client (written at its flush).
    sessions_dirty: BTreeMap<u64, Option<Session>>,
    ops: Vec<SmOp>,
    overlay: HashMap<Vec<u8>, Option<StoredValue>>,
}

/// The partition's client sessions as stored.
fn load_sessions(
    engine: &dyn StorageEngine,
    partition: PartitionId,
    ttl_ms: u64,
) -> io::Result<Sessions> {
    let mut rows = Vec::new();
    for (client, bytes) in engine.sm_sessions_all(partition)? {
        rows.push((client, decode::<Session>(&bytes)?));
    }
    Ok(Sessions::load(ttl_ms, rows))
}

impl Applier {
    /// Opens partition `partition`'s executor over what storage holds; `last_hlc` is the
    /// highest stamp applied (from the caller's applied state).
    pub fn open(
        engine: Arc<dyn StorageEngine>,
        partition: PartitionId,
        hlc: Arc<Hlc>,
        session_ttl_ms: u64,
        last_hlc: u64,
    ) -> io::Result<Self> {
        let sessions = load_sessions(&*engine, partition, session_ttl_ms)?;
        hlc.observe(HlcTimestamp(last_hlc));
        Ok(Applier {
            engine,
            partition,
            hlc,
            last_hlc,
            sessions,
            session_ttl_ms,
            sessions_dirty: BTreeMap::new(),
            ops: Vec::new(),
            overlay: HashMap::new(),
        })
    }

    /// Reloads the sessions after storage was replaced (a snapshot was installed).
    pub fn reload(&mut self, last_hlc: u64) -> io::Result<()> {
        self.sessions = load_sessions(&*self.engine, self.partition, self.session_ttl_ms)?;
        self.sessions_dirty.clear();
        self.ops.clear();
        self.overlay.clear();
        self.last_hlc = last_hlc;
        self.hlc.observe(HlcTimestamp(last_hlc));
        Ok(())
    }

    pub fn last_hlc(&self) -> u64 {
        self.last_hlc
    }

    /// Storage changes waiting for the next flush.
    pub fn pending(&self) -> usize {
        self.ops.len()
    }

    /// The key's value as of the commands executed so far, including those of the current
    /// batch not yet written.
    fn current(&self, key: &[u8]) -> io::Result<Option<StoredValue>> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.engine.sm_get(self.partition, key)?),
        }
    }

    /// Executes one command as revision `revision` (unique and increasing along the
    /// partition), adding its changes to the batch.
    pub fn execute(&mut self, revision: u64, cmd: Command) -> io::Result<CommandResponse> {
        let hlc = cmd.hlc.max(self.last_hlc.saturating_add(1));
        self.last_hlc = hlc;
        self.hlc.observe(HlcTimestamp(hlc));
        // Session decisions use the log's own clock (this entry's HLC stamp), so every
        // replica decides alike.
        let now_ms = HlcTimestamp(hlc).physical_ms();
        let mut changes = Vec::new();
        self.sessions.expire(now_ms, &mut changes);
        let idempotency = cmd.idempotency.filter(|i| i.client_id != 0);
        if let Some(id) = &idempotency {
            match self.sessions.admit(id, now_ms) {
                Admission::Apply => {}
                Admission::Answered(previous) => {
                    self.note_sessions(changes);
                    return Ok(previous);
                }
                Admission::Refused(why) => {
                    self.note_sessions(changes);
                    return Ok(CommandResponse {
                        revision,
                        hlc,
                        rejected: Some(why),
                        ..Default::default()
                    });
                }
            }
        }

        let mut steps = Vec::new();
        let outcome = match cmd.op {
            Op::Txn { guards, steps: ops } => {
                let mut held = true;
                for (key, revision) in &guards {
                    let current = self.current(key)?;
                    held &= current.map_or(0, |c| c.mod_revision) == *revision;
                }
                if held {
                    for op in ops {
                        let o = self.apply_op(op, revision, hlc)?;
                        steps.push(StepAnswer {
                            succeeded: o.succeeded,
                            current_revision: o.current_revision,
                            value: o.value,
                            rejected: o.rejected,
                        });
                    }
                }
                Outcome {
                    succeeded: held,
                    ..Outcome::default()
                }
            }
            op => self.apply_op(op, revision, hlc)?,
        };
        let Outcome {
            succeeded,
            current_revision,
            value,
            rejected,
        } = outcome;
        let response = CommandResponse {
            revision,
            hlc,
            succeeded,
            current_revision,
            log_index: 0,
            deduplicated: false,
            rejected,
            value,
            steps,
        };
        if let Some(id) = &idempotency {
            self.sessions
                .record(id, now_ms, response.clone(), &mut changes);
        }
        self.note_sessions(changes);
        Ok(response)
    }

    /// Executes one operation (not a `Txn`) at `revision`.
    fn apply_op(&mut self, op: Op, revision: u64, hlc: u64) -> io::Result<Outcome> {
        Ok(match op {
            Op::Put {
                key,
                value,
                condition,
            } => {
                let current = self.current(&key)?;
                let holds = condition_holds(condition, current.as_ref());
                if holds {
                    self.set(key, value, revision, hlc, current.as_ref());
                }
                Outcome::of(holds, current.as_ref())
            }
            Op::Delete { key, condition } => {
                let current = self.current(&key)?;
                let deleted = condition_holds(condition, current.as_ref()) && current.is_some();
                if deleted {
                    self.remove(key);
                }
                Outcome::of(deleted, current.as_ref())
            }
            Op::Update {
                key,
                update,
                value_bytes_max,
            } => {
                let current = self.current(&key)?;
                self.update(key, update, value_bytes_max, revision, hlc, current)?
            }
            Op::PutMany { kvs, if_all_absent } => {
                let mut currents = Vec::with_capacity(kvs.len());
                for (k, _) in &kvs {
                    currents.push(self.current(k)?);
                }
                let holds = !if_all_absent || currents.iter().all(Option::is_none);
                if holds {
                    for ((k, v), current) in kvs.into_iter().zip(&currents) {
                        self.set(k, v, revision, hlc, current.as_ref());
                    }
                }
                Outcome {
                    succeeded: holds,
                    ..Outcome::default()
                }
            }
            Op::Get { key } => {
                let current = self.current(&key)?;
                let mut o = Outcome::of(current.is_some(), current.as_ref());
                o.value = current.map(|c| c.value);
                o
            }
            // Transactions do not nest (the server refuses them before they are proposed).
            Op::Txn { .. } => Outcome::default(),
        })
    }

    /// Writes `value` as `key`'s new version (the batch sees it at once).
    fn set(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        revision: u64,
        hlc: u64,
        current: Option<&StoredValue>,
    ) {
        let stored = StoredValue {
            mod_revision: revision,
            create_revision: current.map_or(revision, |c| c.create_revision),
            hlc,
            value,
        };
        self.overlay.insert(key.clone(), Some(stored.clone()));
        self.ops.push(SmOp::Put { key, value: stored });
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.overlay.insert(key.clone(), None);
        self.ops.push(SmOp::Delete { key });
    }

    /// Executes a read-modify-write; a result it refuses changes nothing.
    fn update(
        &mut self,
        key: Vec<u8>,
        update: Update,
        value_bytes_max: u64,
        revision: u64,
        hlc: u64,
        current: Option<StoredValue>,
    ) -> io::Result<Outcome> {
        let mut out = Outcome::of(true, current.as_ref());
        let old = current.as_ref().map(|c| c.value.as_slice());
        // Swap answers the previous value; the others, the new one.
        let answers_new = !matches!(update, Update::Swap { .. });
        let new = match update {
            Update::Swap { value, condition } => {
                out.value = old.map(<[u8]>::to_vec);
                if !condition_holds(condition, current.as_ref()) {
                    out.succeeded = false;
                    return Ok(out);
                }
                value
            }
            Update::Take => {
                out.value = old.map(<[u8]>::to_vec);
                out.succeeded = current.is_some();
                if current.is_some() {
                    self.remove(key);
                }
                return Ok(out);
            }
            Update::IncrBy(by) => match incr_by(old, by) {
                Some(v) => v,
                None => return Ok(out.refused(Rejection::NotAnInteger)),
            },
            Update::IncrByFloat(by) => match incr_by_float(old, &by) {
                Some(v) => v,
                None => return Ok(out.refused(Rejection::NotAFloat)),
            },
            Update::Append(bytes) => {
                let mut v = old.map(<[u8]>::to_vec).unwrap_or_default();
                v.extend_from_slice(&bytes);
                v
            }
            Update::SetRange { offset, bytes } => {
                let mut v = old.map(<[u8]>::to_vec).unwrap_or_default();
                if bytes.is_empty() {
                    // Redis: nothing to write leaves the key as it is (absent stays absent).
                    out.value = Some(v);
                    return Ok(out);
                }
                let end = offset.saturating_add(bytes.len() as u64);
                if end > value_bytes_max {
                    return Ok(out.refused(Rejection::ValueTooLarge));
                }
                let (offset, end) = (offset as usize, end as usize);
                if v.len() < end {
                    v.resize(end, 0);
                }
                v[offset..end].copy_from_slice(&bytes);
                v
            }
        };
        if new.len() as u64 > value_bytes_max {
            return Ok(out.refused(Rejection::ValueTooLarge));
        }
        if answers_new {
            out.value = Some(new.clone());
        }
        self.set(key, new, revision, hlc, current.as_ref());
        Ok(out)
    }

    fn note_sessions(&mut self, changes: Vec<SessionChange>) {
        for c in changes {
            match c {
                SessionChange::Put(client, session) => {
                    self.sessions_dirty.insert(client, Some(session))
                }
                SessionChange::Delete(client) => self.sessions_dirty.insert(client, None),
            };
        }
    }

    /// Writes the batch's changes with `applied` (the caller's encoded applied state) as
    /// one atomic storage write (not synced: the log is the durable record).
    pub fn flush(&mut self, applied: Vec<u8>) -> io::Result<()> {
        let write = self.take_write(applied)?;
        self.engine.sm_write(self.partition, write)?;
        self.written();
        Ok(())
    }

    /// The batch's changes with `applied`, for the caller to write (with other
    /// partitions' in one batch); call [`Applier::written`] once it is written. Until
    /// then, commands executed later still see the batch's changes.
    pub fn take_write(&mut self, applied: Vec<u8>) -> io::Result<SmWrite> {
        let mut ops = std::mem::take(&mut self.ops);
        for (client_id, session) in std::mem::take(&mut self.sessions_dirty) {
            ops.push(match session {
                Some(s) => SmOp::SessionPut {
                    client_id,
                    session: encode(&s)?,
                },
                None => SmOp::SessionDelete { client_id },
            });
        }
        Ok(SmWrite {
            ops,
            applied: Some(applied),
        })
    }

    /// The write from [`Applier::take_write`] is in storage: reads go there again.
    pub fn written(&mut self) {
        self.overlay.clear();
    }
}

/// What a command did, before it becomes the answer.
#[derive(Debug, Default)]
struct Outcome {
    succeeded: bool,
    current_revision: u64,
    value: Option<Vec<u8>>,
    rejected: Option<Rejection>,
}

impl Outcome {
    fn of(succeeded: bool, current: Option<&StoredValue>) -> Self {
        Outcome {
            succeeded,
            current_revision: current.map_or(0, |c| c.mod_revision),
            ..Outcome::default()
        }
    }

    fn refused(mut self, why: Rejection) -> Self {
        self.succeeded = false;
        self.value = None;
        self.rejected = Some(why);
        self
    }
}

fn condition_holds(condition: Condition, current: Option<&StoredValue>) -> bool {
    match condition {
        Condition::Always => true,
        Condition::IfRevision(r) => current.map_or(0, |c| c.mod_revision) == r,
        Condition::IfAbsent => current.is_none(),
        Condition::IfExists => current.is_some(),
    }
}

/// `old` (absent = 0) plus `by` as a decimal, or `None` when `old` is not a signed 64-bit
/// decimal as Redis writes them, or the sum overflows.
fn incr_by(old: Option<&[u8]>, by: i64) -> Option<Vec<u8>> {
    let n = match old {
        None => 0,
        Some(b) => parse_i64(b)?,
    };
    Some(n.checked_add(by)?.to_string().into_bytes())
}

/// A signed 64-bit decimal with no sign but `-`, no spaces and no leading zeros (Redis's
/// `string2ll`).
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || !digits.bytes().all(|c| c.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
        || s == "-0"
    {
        return None;
    }
    s.parse().ok()
}

/// `old` (absent = 0) plus `by`, both decimal floats, formatted as Redis does (no
/// exponent, no trailing zeros), or `None` when either is not a finite float or the
/// sum is not finite.
fn incr_by_float(old: Option<&[u8]>, by: &str) -> Option<Vec<u8>> {
    let parse = |s: &str| -> Option<f64> {
        if s.is_empty() || s.trim() != s {
            return None;
        }
        s.parse::<f64>().ok().filter(|f| f.is_finite())
    };
    let n = match old {
        None => 0.0,
        Some(b) => parse(std::str::from_utf8(b).ok()?)?,
    };
    let sum = n + parse(by)?;
    if !sum.is_finite() {
        return None;
    }
    Some(format_float(sum).into_bytes())
}

/// A float as Redis's INCRBYFLOAT writes it: fixed notation, no exponent, no trailing
/// zeros (the shortest decimal that reads back as the same f64).
pub fn format_float(f: f64) -> String {
    format!("{f}")
}

/// Where a partition's state machine is, readable without the engine, as two bounds
/// around what a reader may see: `get` (everything up to it is visible: published after
/// the write) and `upper` (nothing past it is visible: raised before the write). A read
/// waits on `get` and reports `upper` taken after it read, so a session token never names
/// less than a read saw (ARCHITECTURE.md, invariant 11).
#[derive(Debug, Default)]
pub struct AppliedIndex {
    applied: std::sync::atomic::AtomicU64,
    upper: std::sync::atomic::AtomicU64,
}

impl AppliedIndex {
    /// Every entry up to this index is visible to readers.
    pub fn get(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    /// No entry past this index is visible to readers.
    pub fn upper(&self) -> u64 {
        self.upper.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Called before a write that makes entries up to `v` visible.
    pub fn begin(&self, v: u64) {
        self.upper.fetch_max(v, std::sync::atomic::Ordering::AcqRel);
    }

    /// Called after the write that made entries up to `v` visible.
    pub fn set(&self, v: u64) {
        self.begin(v);
        self.applied
            .fetch_max(v, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod applied_index_tests {
    use super::AppliedIndex;

    #[test]
    fn the_upper_bound_is_raised_before_a_write_and_never_falls() {
        let a = AppliedIndex::default();
        a.set(5);
        assert_eq!((a.get(), a.upper()), (5, 5));
        a.begin(9); // a write of entries up to 9 is under way
        assert_eq!((a.get(), a.upper()), (5, 9));
        a.set(9);
        assert_eq!((a.get(), a.upper()), (9, 9));
        a.begin(7); // a snapshot that was dropped later, say: upper stays
        assert_eq!(a.upper(), 9);
    }
}

#[cfg(test)]
mod update_tests_support {
    use super::*;
    use capkv_storage::{FjallEngine, FjallOptions};

    pub struct Fixture {
        _dir: tempfile::TempDir,
        applier: Applier,
        revision: u64,
    }

    impl Fixture {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let engine: Arc<dyn StorageEngine> =
                Arc::new(FjallEngine::open(dir.path(), FjallOptions::default()).unwrap());
            let applier =
                Applier::open(engine, PartitionId(0), Arc::new(Hlc::new()), 60_000, 0).unwrap();
            Fixture {
                _dir: dir,
                applier,
                revision: 0,
            }
        }

        pub fn run(&mut self, op: Op) -> CommandResponse {
            self.revision += 1;
            let r = self
                .applier
                .execute(
                    self.revision,
                    Command {
                        hlc: 0,
                        idempotency: None,
                        op,
                    },
                )
                .unwrap();
            self.applier.flush(vec![]).unwrap();
            r
        }

        pub fn update(&mut self, key: &str, update: Update) -> CommandResponse {
            self.run(Op::Update {
                key: key.into(),
                update,
                value_bytes_max: 32,
            })
        }

        pub fn get(&self, key: &str) -> Option<Vec<u8>> {
            self.applier
                .current(key.as_bytes())
                .unwrap()
                .map(|v| v.value)
        }
    }
}

#[cfg(test)]
mod update_tests {
    use super::update_tests_support::*;
    use super::*;

    #[test]
    fn increments_append_and_set_range_as_redis_does() {
        let mut f = Fixture::new();
        let r = f.update("n", Update::IncrBy(5));
        assert_eq!(r.value.as_deref(), Some(&b"5"[..]));
        let r = f.update("n", Update::IncrBy(-7));
        assert_eq!(r.value.as_deref(), Some(&b"-2"[..]));
        assert_eq!(f.get("n").as_deref(), Some(&b"-2"[..]));
        let r = f.update("f", Update::IncrByFloat("10.5".into()));
        assert_eq!(r.value.as_deref(), Some(&b"10.5"[..]));
        let r = f.update("f", Update::IncrByFloat("0.1".into()));
        assert_eq!(r.value.as_deref(), Some(&b"10.6"[..]));
        let r = f.update("s", Update::Append(b"ab".to_vec()));
        assert_eq!(r.value.as_deref(), Some(&b"ab"[..]));
        let r = f.update(
            "s",
            Update::SetRange {
                offset: 4,
                bytes: b"z".to_vec(),
            },
        );
        assert_eq!(r.value.as_deref(), Some(&b"ab\0\0z"[..]));
        // Absent with nothing to write stays absent.
        f.update(
            "none",
            Update::SetRange {
                offset: 3,
                bytes: vec![],
            },
        );
        assert_eq!(f.get("none"), None);
    }

    #[test]
    fn refused_updates_change_nothing() {
        let mut f = Fixture::new();
        f.update("s", Update::Append(b"x1".to_vec()));
        for bad in [b"x1".as_slice(), b" 1", b"01", b"-0", b"", b"1.0"] {
            assert_eq!(incr_by(Some(bad), 1), None, "{bad:?}");
        }
        let r = f.update("s", Update::IncrBy(1));
        assert_eq!(r.rejected, Some(Rejection::NotAnInteger));
        assert_eq!(f.get("s").as_deref(), Some(&b"x1"[..]));
        f.update("max", Update::IncrBy(i64::MAX));
        let r = f.update("max", Update::IncrBy(1));
        assert_eq!(r.rejected, Some(Rejection::NotAnInteger), "overflow");
        let r = f.update("s", Update::IncrByFloat("inf".into()));
        assert_eq!(r.rejected, Some(Rejection::NotAFloat));
        let r = f.update("s", Update::Append(vec![b'a'; 31]));
        assert_eq!(r.rejected, Some(Rejection::ValueTooLarge));
        let r = f.update(
            "s",
            Update::SetRange {
                offset: u64::MAX,
                bytes: b"a".to_vec(),
            },
        );
        assert_eq!(r.rejected, Some(Rejection::ValueTooLarge));
        assert_eq!(f.get("s").as_deref(), Some(&b"x1"[..]));
    }

    #[test]
    fn swap_take_and_put_many() {
        let mut f = Fixture::new();
        let r = f.update(
            "k",
            Update::Swap {
                value: b"1".to_vec(),
                condition: Condition::IfExists,
            },
        );
        assert!(!r.succeeded && r.value.is_none());
        assert_eq!(f.get("k"), None);
        let r = f.update(
            "k",
            Update::Swap {
                value: b"1".to_vec(),
                condition: Condition::Always,
            },
        );
        assert!(r.succeeded && r.value.is_none());
        let r = f.update(
            "k",
            Update::Swap {
                value: b"2".to_vec(),
                condition: Condition::Always,
            },
        );
        assert_eq!(r.value.as_deref(), Some(&b"1"[..]));
        let r = f.update("k", Update::Take);
        assert_eq!(r.value.as_deref(), Some(&b"2"[..]));
        assert_eq!(f.get("k"), None);
        let pairs = |kv: &[(&str, &str)]| -> Vec<(Vec<u8>, Vec<u8>)> {
            kv.iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        };
        let r = f.run(Op::PutMany {
            kvs: pairs(&[("a", "1"), ("b", "2")]),
            if_all_absent: true,
        });
        assert!(r.succeeded);
        let r = f.run(Op::PutMany {
            kvs: pairs(&[("c", "3"), ("b", "9")]),
            if_all_absent: true,
        });
        assert!(!r.succeeded, "b exists");
        assert_eq!(f.get("c"), None);
        assert_eq!(f.get("b").as_deref(), Some(&b"2"[..]));
    }
}

#[cfg(test)]
mod txn_tests {
    use super::update_tests_support::*;
    use super::*;

    #[test]
    fn a_transaction_runs_its_steps_in_order_unless_a_guard_fails() {
        let mut f = Fixture::new();
        let put = |k: &str, v: &str| Op::Put {
            key: k.into(),
            value: v.into(),
            condition: Condition::Always,
        };
        let incr = |k: &str| Op::Update {
            key: k.into(),
            update: Update::IncrBy(1),
            value_bytes_max: 32,
        };
        let r = f.run(Op::Txn {
            guards: vec![(b"w".to_vec(), 0)],
            steps: vec![
                put("a", "x"),
                incr("a"),
                incr("n"),
                Op::Get { key: "a".into() },
            ],
        });
        assert!(r.succeeded);
        assert_eq!(r.steps.len(), 4);
        assert!(r.steps[0].succeeded);
        assert_eq!(r.steps[1].rejected, Some(Rejection::NotAnInteger));
        assert_eq!(r.steps[2].value.as_deref(), Some(&b"1"[..]));
        assert_eq!(
            r.steps[3].value.as_deref(),
            Some(&b"x"[..]),
            "sees its own write"
        );
        // The watched key changed: nothing runs.
        f.run(put("w", "changed"));
        let r = f.run(Op::Txn {
            guards: vec![(b"w".to_vec(), 0)],
            steps: vec![put("a", "y")],
        });
        assert!(!r.succeeded && r.steps.is_empty());
        assert_eq!(f.get("a").as_deref(), Some(&b"x"[..]));
    }
}
