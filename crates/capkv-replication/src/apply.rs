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
use crate::types::{
    Command, CommandResponse, Condition, ExpireWhen, Expiry, Op, Rejection, StepAnswer, Update,
    TXN_ANSWER_BYTES_MAX,
};

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
    /// Session changes of the batch being applied, one per client (written at its flush).
    sessions_dirty: BTreeMap<u64, Option<Session>>,
    ops: Vec<SmOp>,
    overlay: HashMap<Vec<u8>, Option<StoredValue>>,
    /// The time of the entry being executed (its HLC stamp's physical ms): keys that
    /// expired by then are absent to it.
    now_ms: u64,
    /// Keys stored in the partition, as of the commands executed so far.
    counts: KeyCounts,
    /// The last key `stored` read from storage: (key, absent / present with or without
    /// an expiry), so that the write that follows knows what it replaces without a second
    /// read.
    probe: std::cell::RefCell<Option<(Vec<u8>, Option<bool>)>>,
}

/// How many keys a partition stores, expired or not (until the reaper deletes them, as
/// Redis counts them), and how many of them have an expiry. Kept with the applied state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyCounts {
    pub keys: u64,
    pub expiring: u64,
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

/// Counts the keys `partition` stores (for applied state written before counts were kept).
fn count_keys(engine: &dyn StorageEngine, partition: PartitionId) -> io::Result<KeyCounts> {
    let mut counts = KeyCounts::default();
    let mut from = Vec::new();
    loop {
        let rows = engine.sm_scan(partition, &from, None, 1000, 4 << 20)?;
        for (_, v) in &rows {
            counts.keys += 1;
            counts.expiring += u64::from(v.expires_at_ms != 0);
        }
        match rows.last() {
            Some((k, _)) => from = [k.as_slice(), &[0]].concat(),
            None => return Ok(counts),
        }
    }
}

impl Applier {
    /// Opens partition `partition`'s executor over what storage holds; `last_hlc` is the
    /// highest stamp applied (from the caller's applied state).
    /// `counts`: the partition's key counts kept with the applied state; `None` (state
    /// written before they were kept) counts the stored keys.
    pub fn open(
        engine: Arc<dyn StorageEngine>,
        partition: PartitionId,
        hlc: Arc<Hlc>,
        session_ttl_ms: u64,
        last_hlc: u64,
        counts: Option<KeyCounts>,
    ) -> io::Result<Self> {
        let sessions = load_sessions(&*engine, partition, session_ttl_ms)?;
        hlc.observe(HlcTimestamp(last_hlc));
        let counts = match counts {
            Some(c) => c,
            None => count_keys(&*engine, partition)?,
        };
        Ok(Applier {
            engine,
            partition,
            hlc,
            last_hlc,
            sessions,
            sessions_dirty: BTreeMap::new(),
            ops: Vec::new(),
            overlay: HashMap::new(),
            now_ms: 0,
            counts,
            probe: Default::default(),
        })
    }

    /// The partition's key counts as of the commands executed so far.
    pub fn counts(&self) -> KeyCounts {
        self.counts
    }

    pub fn last_hlc(&self) -> u64 {
        self.last_hlc
    }

    /// Storage changes waiting for the next flush.
    pub fn pending(&self) -> usize {
        self.ops.len()
    }

    /// The key's stored version as of the commands executed so far, including those of
    /// the current batch not yet written, expired or not.
    fn stored(&self, key: &[u8]) -> io::Result<Option<StoredValue>> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => {
                let v = self.engine.sm_get(self.partition, key)?;
                let presence = v.as_ref().map(|v| v.expires_at_ms != 0);
                *self.probe.borrow_mut() = Some((key.to_vec(), presence));
                Ok(v)
            }
        }
    }

    /// Whether `key` is stored (expired or not) as of the commands executed so far, and
    /// if so whether it has an expiry.
    fn presence(&self, key: &[u8]) -> io::Result<Option<bool>> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.as_ref().map(|v| v.expires_at_ms != 0));
        }
        if let Some((k, presence)) = &*self.probe.borrow() {
            if k == key {
                return Ok(*presence);
            }
        }
        Ok(self
            .engine
            .sm_get(self.partition, key)?
            .map(|v| v.expires_at_ms != 0))
    }

    /// Counts a key going from `before` to `after` (absent / present with an expiry or not).
    fn count(&mut self, before: Option<bool>, after: Option<bool>) {
        let c = &mut self.counts;
        let n = |p: Option<bool>| u64::from(p.is_some());
        let e = |p: Option<bool>| u64::from(p == Some(true));
        c.keys = (c.keys + n(after)).saturating_sub(n(before));
        c.expiring = (c.expiring + e(after)).saturating_sub(e(before));
    }

    /// The key's value as the command being executed sees it: absent if it expired by the
    /// entry's time.
    fn current(&self, key: &[u8]) -> io::Result<Option<StoredValue>> {
        Ok(self.stored(key)?.filter(|v| !v.expired_at(self.now_ms)))
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
        self.now_ms = now_ms;
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
                    let mut answered = 0usize;
                    for op in ops {
                        // A step whose answer would take the total past the cap does not
                        // run (decided before it runs, from the state, alike everywhere).
                        let o = if answered + self.answer_bytes(&op)? > TXN_ANSWER_BYTES_MAX {
                            Outcome::default().refused(Rejection::AnswersTooLarge)
                        } else {
                            self.apply_op(op, revision, hlc)?
                        };
                        answered += o.value.as_ref().map_or(0, Vec::len);
                        steps.push(StepAnswer {
                            succeeded: o.succeeded,
                            current_revision: o.current_revision,
                            value: o.value,
                            rejected: o.rejected,
                            expires_at_ms: o.expires_at_ms,
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
            ..
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
                    self.set(key, value, revision, hlc, current.as_ref(), 0)?;
                }
                Outcome::of(holds, current.as_ref())
            }
            Op::Delete { key, condition } => {
                let current = self.current(&key)?;
                let deleted = condition_holds(condition, current.as_ref()) && current.is_some();
                if deleted {
                    self.remove(key)?;
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
                        self.set(k, v, revision, hlc, current.as_ref(), 0)?;
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
                o.expires_at_ms = current.as_ref().map_or(0, |c| c.expires_at_ms);
                o.value = current.map(|c| c.value);
                o
            }
            Op::Reap { keys } => {
                let mut reaped = 0;
                for (key, mod_revision) in keys {
                    let stored = self.stored(&key)?;
                    if stored.is_some_and(|v| {
                        v.mod_revision == mod_revision && v.expired_at(self.now_ms)
                    }) {
                        self.remove(key)?;
                        reaped += 1;
                    }
                }
                Outcome {
                    succeeded: reaped > 0,
                    current_revision: reaped,
                    ..Outcome::default()
                }
            }
            Op::Rename {
                from,
                to,
                if_absent,
            } => {
                let Some(src) = self.current(&from)? else {
                    return Ok(Outcome::default().refused(Rejection::NoSuchKey));
                };
                if from == to {
                    // Redis: RENAME k k is OK, RENAMENX k k changes nothing and answers 0.
                    return Ok(Outcome::of(!if_absent, Some(&src)));
                }
                let dst = self.current(&to)?;
                if if_absent && dst.is_some() {
                    return Ok(Outcome::of(false, dst.as_ref()));
                }
                let expires_at_ms = src.expires_at_ms;
                self.set(to, src.value, revision, hlc, None, expires_at_ms)?;
                self.remove(from)?;
                Outcome::of(true, dst.as_ref())
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
        expires_at_ms: u64,
    ) -> io::Result<()> {
        let stored = StoredValue {
            mod_revision: revision,
            create_revision: current.map_or(revision, |c| c.create_revision),
            hlc,
            value,
            expires_at_ms,
        };
        let before = self.presence(&key)?;
        self.count(before, Some(expires_at_ms != 0));
        self.overlay.insert(key.clone(), Some(stored.clone()));
        self.ops.push(SmOp::Put { key, value: stored });
        Ok(())
    }

    fn remove(&mut self, key: Vec<u8>) -> io::Result<()> {
        let before = self.presence(&key)?;
        self.count(before, None);
        self.overlay.insert(key.clone(), None);
        self.ops.push(SmOp::Delete { key });
        Ok(())
    }

    /// The most bytes of value `op` answers with, from the current state: what a
    /// transaction counts against its answer cap before running the step.
    fn answer_bytes(&self, op: &Op) -> io::Result<usize> {
        let len = |key: &[u8]| -> io::Result<usize> {
            Ok(self.current(key)?.map_or(0, |c| c.value.len()))
        };
        Ok(match op {
            Op::Get { key } => len(key)?,
            Op::Update { key, update, .. } => match update {
                Update::Swap { .. } | Update::Take | Update::GetEx { .. } => len(key)?,
                Update::Append(bytes) => len(key)?.saturating_add(bytes.len()),
                Update::SetRange { offset, bytes } => len(key)?.max(
                    usize::try_from(*offset)
                        .unwrap_or(usize::MAX)
                        .saturating_add(bytes.len()),
                ),
                // A number's decimal form: an i64 takes at most 20 bytes; an f64 in fixed
                // notation (`format_float`) at most 309 integer digits or 324 decimals.
                Update::IncrBy(_) => 20,
                Update::IncrByFloat(_) => 330,
                Update::Expire { .. } => 0,
            },
            _ => 0,
        })
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
        let now = self.now_ms;
        // What the key keeps unless the update says otherwise.
        let mut expires_at_ms = current.as_ref().map_or(0, |c| c.expires_at_ms);
        let new = match update {
            Update::Swap {
                value,
                condition,
                expiry,
            } => {
                out.value = old.map(<[u8]>::to_vec);
                if !condition_holds(condition, current.as_ref()) {
                    out.succeeded = false;
                    return Ok(out);
                }
                expires_at_ms = resolve(expiry, now, current.as_ref());
                value
            }
            Update::Expire { expiry, when } => {
                let Some(c) = current else {
                    out.succeeded = false;
                    return Ok(out);
                };
                let at = resolve(expiry, now, Some(&c));
                let had = c.expires_at_ms;
                // A key without an expiry counts as expiring infinitely late.
                let later = |t: u64| if t == 0 { u64::MAX } else { t };
                out.succeeded = match when {
                    ExpireWhen::Always => true,
                    ExpireWhen::Nx => had == 0,
                    ExpireWhen::Xx => had != 0,
                    ExpireWhen::Gt => later(at) > later(had),
                    ExpireWhen::Lt => later(at) < later(had),
                };
                if out.succeeded {
                    if at != 0 && at <= now {
                        self.remove(key)?;
                    } else {
                        self.set(key, c.value.clone(), revision, hlc, Some(&c), at)?;
                    }
                }
                return Ok(out);
            }
            Update::GetEx { expiry } => {
                let Some(c) = current else {
                    out.succeeded = false;
                    return Ok(out);
                };
                out.value = Some(c.value.clone());
                let at = resolve(expiry, now, Some(&c));
                if at != 0 && at <= now {
                    self.remove(key)?;
                } else if at != c.expires_at_ms {
                    self.set(key, c.value.clone(), revision, hlc, Some(&c), at)?;
                }
                return Ok(out);
            }
            Update::Take => {
                out.value = old.map(<[u8]>::to_vec);
                out.succeeded = current.is_some();
                if current.is_some() {
                    self.remove(key)?;
                }
                return Ok(out);
            }
            Update::IncrBy(by) => match incr_by(old, by) {
                Ok(v) => v,
                Err(r) => return Ok(out.refused(r)),
            },
            Update::IncrByFloat(by) => match incr_by_float(old, &by) {
                Ok(v) => v,
                Err(r) => return Ok(out.refused(r)),
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
        if expires_at_ms != 0 && expires_at_ms <= now {
            // Set with an expiry already past (EXAT in the past): gone at once.
            self.remove(key)?;
            return Ok(out);
        }
        self.set(key, new, revision, hlc, current.as_ref(), expires_at_ms)?;
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
        self.probe.take();
    }
}

/// What a command did, before it becomes the answer.
#[derive(Debug, Default)]
struct Outcome {
    succeeded: bool,
    current_revision: u64,
    value: Option<Vec<u8>>,
    rejected: Option<Rejection>,
    expires_at_ms: u64,
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

/// The absolute expiry (cluster ms; 0 = never) a command gives a key at entry time `now`.
fn resolve(expiry: Expiry, now: u64, current: Option<&StoredValue>) -> u64 {
    match expiry {
        Expiry::Never => 0,
        Expiry::Keep => current.map_or(0, |c| c.expires_at_ms),
        Expiry::In(ms) => now.saturating_add(ms).max(1),
        Expiry::At(t) => t.max(1),
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

/// `old` (absent = 0) plus `by` as a decimal; refused when `old` is not a signed 64-bit
/// decimal as Redis writes them, or the sum overflows.
fn incr_by(old: Option<&[u8]>, by: i64) -> Result<Vec<u8>, Rejection> {
    let n = match old {
        None => 0,
        Some(b) => parse_i64(b).ok_or(Rejection::NotAnInteger)?,
    };
    let sum = n.checked_add(by).ok_or(Rejection::Overflow)?;
    Ok(sum.to_string().into_bytes())
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

/// A float as INCRBYFLOAT reads it (Redis's `strtold` rules as far as f64 goes): no
/// surrounding space, "inf"/"infinity" in any case and sign, never "nan", and not a number
/// too large for the type (strtold's ERANGE). The front ends check an increment with it too.
pub fn parse_float(s: &str) -> Option<f64> {
    if s.is_empty() || s.trim() != s {
        return None;
    }
    let f = s.parse::<f64>().ok()?;
    let word = s.trim_start_matches(['+', '-']);
    let spelled_infinity =
        word.eq_ignore_ascii_case("inf") || word.eq_ignore_ascii_case("infinity");
    (f.is_finite() || spelled_infinity).then_some(f)
}

/// `old` (absent = 0) plus `by`, both decimal floats, formatted as Redis does (no
/// exponent, no trailing zeros); refused when either is not a float (`NotAFloat`, the
/// stored value checked first) or the sum is not finite (`NotFinite`). As in Redis, "inf"
/// is a float (the sum then is not finite), while "nan" and a number too large for the
/// float type are not.
fn incr_by_float(old: Option<&[u8]>, by: &str) -> Result<Vec<u8>, Rejection> {
    let n = match old {
        None => 0.0,
        Some(b) => std::str::from_utf8(b)
            .ok()
            .and_then(parse_float)
            .ok_or(Rejection::NotAFloat)?,
    };
    let sum = n + parse_float(by).ok_or(Rejection::NotAFloat)?;
    if !sum.is_finite() {
        return Err(Rejection::NotFinite);
    }
    Ok(format_float(sum).into_bytes())
}

/// A float as Redis's INCRBYFLOAT writes it: fixed notation, no exponent, no trailing
/// zeros (the shortest decimal that reads back as the same f64; Redis computes in long
/// double, so its last digits can differ: docs/protocols.md).
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
    /// The partition's [`KeyCounts`] as last written.
    keys: std::sync::atomic::AtomicU64,
    keys_expiring: std::sync::atomic::AtomicU64,
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

    /// Publishes the key counts of what was written.
    pub fn set_counts(&self, c: KeyCounts) {
        use std::sync::atomic::Ordering::Release;
        self.keys.store(c.keys, Release);
        self.keys_expiring.store(c.expiring, Release);
    }

    /// The partition's key counts as this replica last wrote them.
    pub fn counts(&self) -> KeyCounts {
        use std::sync::atomic::Ordering::Acquire;
        KeyCounts {
            keys: self.keys.load(Acquire),
            expiring: self.keys_expiring.load(Acquire),
        }
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
        pub applier: Applier,
        revision: u64,
    }

    impl Fixture {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let engine: Arc<dyn StorageEngine> =
                Arc::new(FjallEngine::open(dir.path(), FjallOptions::default()).unwrap());
            let applier = Applier::open(
                engine,
                PartitionId(0),
                Arc::new(Hlc::new()),
                60_000,
                0,
                None,
            )
            .unwrap();
            Fixture {
                _dir: dir,
                applier,
                revision: 0,
            }
        }

        pub fn run(&mut self, op: Op) -> CommandResponse {
            self.run_at(op, 0)
        }

        /// Runs `op` in an entry stamped at cluster time `ms` (later than any before).
        pub fn run_at(&mut self, op: Op, ms: u64) -> CommandResponse {
            self.revision += 1;
            let r = self
                .applier
                .execute(
                    self.revision,
                    Command {
                        hlc: HlcTimestamp::from_parts(ms, 0).0,
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
        // The answer sizes a transaction counts before running these steps are bounds.
        for f in [f64::MAX, f64::MIN, -5e-324, 5e-324] {
            assert!(format_float(f).len() <= 330, "{f}");
        }
        assert!(i64::MIN.to_string().len() <= 20);
        // 64-bit floats: Redis (long double) answers 0.3 here (docs/protocols.md).
        f.update("g", Update::IncrByFloat("0.1".into()));
        let r = f.update("g", Update::IncrByFloat("0.2".into()));
        assert_eq!(r.value.as_deref(), Some(&b"0.30000000000000004"[..]));
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
            assert_eq!(
                incr_by(Some(bad), 1),
                Err(Rejection::NotAnInteger),
                "{bad:?}"
            );
        }
        let r = f.update("s", Update::IncrBy(1));
        assert_eq!(r.rejected, Some(Rejection::NotAnInteger));
        assert_eq!(f.get("s").as_deref(), Some(&b"x1"[..]));
        f.update("max", Update::IncrBy(i64::MAX));
        let r = f.update("max", Update::IncrBy(1));
        assert_eq!(r.rejected, Some(Rejection::Overflow));
        let r = f.update("s", Update::IncrByFloat("1".into()));
        assert_eq!(r.rejected, Some(Rejection::NotAFloat), "not a float stored");
        let r = f.update("s", Update::IncrByFloat("inf".into()));
        assert_eq!(
            r.rejected,
            Some(Rejection::NotAFloat),
            "the stored value is checked first"
        );
        // Infinity is a float to Redis; a sum that is not finite is refused.
        let r = f.update("absent", Update::IncrByFloat("inf".into()));
        assert_eq!(r.rejected, Some(Rejection::NotFinite));
        assert_eq!(f.get("absent"), None);
        f.update(
            "inf",
            Update::Swap {
                value: b"inf".to_vec(),
                condition: Condition::Always,
                expiry: Expiry::Never,
            },
        );
        let r = f.update("inf", Update::IncrByFloat("1".into()));
        assert_eq!(r.rejected, Some(Rejection::NotFinite));
        let r = f.update("absent", Update::IncrByFloat("nan".into()));
        assert_eq!(r.rejected, Some(Rejection::NotAFloat));
        // Too large for the float type: not a float (Redis: strtold's ERANGE).
        let r = f.update("absent", Update::IncrByFloat("1e99999".into()));
        assert_eq!(r.rejected, Some(Rejection::NotAFloat));
        assert_eq!(
            incr_by_float(Some(b"1e99999"), "1"),
            Err(Rejection::NotAFloat)
        );
        assert_eq!(incr_by_float(None, "-Infinity"), Err(Rejection::NotFinite));
        let huge = || Op::Update {
            key: b"big".to_vec(),
            update: Update::IncrByFloat("1e308".into()),
            value_bytes_max: 1024,
        };
        assert_eq!(f.run(huge()).rejected, None);
        assert_eq!(f.run(huge()).rejected, Some(Rejection::NotFinite));
        assert_eq!(
            f.get("big").as_deref().map(|v| v.len()),
            Some(309),
            "unchanged"
        );
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
                expiry: Expiry::Never,
            },
        );
        assert!(!r.succeeded && r.value.is_none());
        assert_eq!(f.get("k"), None);
        let r = f.update(
            "k",
            Update::Swap {
                value: b"1".to_vec(),
                condition: Condition::Always,
                expiry: Expiry::Never,
            },
        );
        assert!(r.succeeded && r.value.is_none());
        let r = f.update(
            "k",
            Update::Swap {
                value: b"2".to_vec(),
                condition: Condition::Always,
                expiry: Expiry::Never,
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

#[cfg(test)]
mod expiry_tests {
    use super::update_tests_support::*;
    use super::*;

    fn swap(value: &str, expiry: Expiry) -> Op {
        Op::Update {
            key: b"k".to_vec(),
            update: Update::Swap {
                value: value.into(),
                condition: Condition::Always,
                expiry,
            },
            value_bytes_max: 64,
        }
    }

    /// The key as a transaction's read sees it at `at`: its value and expiry.
    fn get(f: &mut Fixture, at: u64) -> (Option<Vec<u8>>, u64) {
        let r = f.run_at(
            Op::Txn {
                guards: vec![],
                steps: vec![Op::Get { key: b"k".to_vec() }],
            },
            at,
        );
        let step = r.steps[0].clone();
        (step.value, step.expires_at_ms)
    }

    fn expire(expiry: Expiry, when: ExpireWhen) -> Op {
        Op::Update {
            key: b"k".to_vec(),
            update: Update::Expire { expiry, when },
            value_bytes_max: 64,
        }
    }

    #[test]
    fn key_counts_follow_every_write_and_count_expired_keys_until_reaped() {
        let mut f = Fixture::new();
        let put = |k: &str| Op::Put {
            key: k.into(),
            value: b"v".to_vec(),
            condition: Condition::Always,
        };
        let counts = |f: &Fixture| {
            let c = f.applier.counts();
            (c.keys, c.expiring)
        };
        f.run_at(put("a"), 1_000);
        f.run_at(put("a"), 1_001);
        f.run_at(swap("v", Expiry::In(100)), 1_002); // key "k"
        assert_eq!(counts(&f), (2, 1));
        // "k" expired at 1_102 but is still stored: counted, and a new SET replaces it.
        f.run_at(swap("w", Expiry::Never), 2_000);
        assert_eq!(counts(&f), (2, 0));
        f.run_at(expire(Expiry::In(50), ExpireWhen::Always), 2_001);
        assert_eq!(counts(&f), (2, 1));
        let revision = f.run_at(
            Op::Txn {
                guards: vec![],
                steps: vec![Op::Get { key: b"k".to_vec() }],
            },
            2_002,
        );
        let rev = revision.steps[0].current_revision;
        f.run_at(
            Op::Reap {
                keys: vec![(b"k".to_vec(), rev)],
            },
            3_000,
        );
        assert_eq!(counts(&f), (1, 0));
        f.run_at(
            Op::Delete {
                key: b"a".to_vec(),
                condition: Condition::Always,
            },
            3_001,
        );
        f.run_at(
            Op::Delete {
                key: b"a".to_vec(),
                condition: Condition::Always,
            },
            3_002,
        );
        assert_eq!(counts(&f), (0, 0));
        // Counted again from storage, as for state written before counts were kept.
        f.run_at(put("b"), 3_003);
        f.run_at(swap("v", Expiry::In(10)), 3_004);
        let recounted = count_keys(&*f.applier.engine, PartitionId(0)).unwrap();
        assert_eq!(recounted, f.applier.counts());
        assert_eq!((recounted.keys, recounted.expiring), (2, 1));
    }

    #[test]
    fn a_transactions_reads_answer_a_bounded_total() {
        let mut f = Fixture::new();
        let big = vec![7u8; 3 << 20];
        for k in ["b1", "b2", "b3"] {
            f.run(Op::Put {
                key: k.into(),
                value: big.clone(),
                condition: Condition::Always,
            });
        }
        let get = |k: &str| Op::Get { key: k.into() };
        let r = f.run(Op::Txn {
            guards: vec![],
            steps: vec![
                get("b1"),
                get("b2"),
                get("b3"),
                Op::Put {
                    key: b"after".to_vec(),
                    value: b"x".to_vec(),
                    condition: Condition::Always,
                },
                get("after"),
                Op::Update {
                    key: b"after".to_vec(),
                    update: Update::Append(vec![b'y'; 3 << 20]),
                    value_bytes_max: 8 << 20,
                },
                get("b1"),
            ],
        });
        let answered: Vec<_> = r
            .steps
            .iter()
            .map(|s| (s.value.as_ref().map(Vec::len), s.rejected))
            .collect();
        assert_eq!(
            answered,
            vec![
                (Some(3 << 20), None),
                (Some(3 << 20), None),
                (None, Some(Rejection::AnswersTooLarge)),
                (None, None),
                (Some(1), None),
                (None, Some(Rejection::AnswersTooLarge)),
                (None, Some(Rejection::AnswersTooLarge)),
            ],
            "steps whose answers would pass 8 MiB are refused, writes too (not run); \
             the others still run"
        );
        assert_eq!(
            f.get("after").as_deref(),
            Some(&b"x"[..]),
            "the APPEND did not run"
        );
    }

    #[test]
    fn a_key_expires_at_the_entry_time_plus_its_ttl_on_every_replica_alike() {
        let mut f = Fixture::new();
        f.run_at(swap("v", Expiry::In(100)), 1_000);
        assert_eq!(get(&mut f, 1_050), (Some(b"v".to_vec()), 1_100));
        assert_eq!(get(&mut f, 1_100).0, None, "expired at its time");
        // Absent to conditions too: SET NX succeeds, as a new key.
        let r = f.run_at(
            Op::Put {
                key: b"k".to_vec(),
                value: b"w".to_vec(),
                condition: Condition::IfAbsent,
            },
            1_200,
        );
        assert!(r.succeeded && r.current_revision == 0);
        assert_eq!(
            get(&mut f, 1_300),
            (Some(b"w".to_vec()), 0),
            "a plain put has no expiry"
        );
    }

    #[test]
    fn updates_keep_the_expiry_and_expire_follows_its_conditions() {
        let mut f = Fixture::new();
        f.run_at(swap("1", Expiry::At(5_000)), 1_000);
        f.run_at(
            Op::Update {
                key: b"k".to_vec(),
                update: Update::IncrBy(1),
                value_bytes_max: 64,
            },
            1_100,
        );
        assert_eq!(
            get(&mut f, 1_200),
            (Some(b"2".to_vec()), 5_000),
            "INCR keeps the TTL"
        );
        assert!(
            !f.run_at(expire(Expiry::At(9_000), ExpireWhen::Nx), 1_300)
                .succeeded
        );
        assert!(
            !f.run_at(expire(Expiry::At(4_000), ExpireWhen::Gt), 1_300)
                .succeeded
        );
        assert!(
            f.run_at(expire(Expiry::At(4_000), ExpireWhen::Lt), 1_300)
                .succeeded
        );
        assert_eq!(get(&mut f, 1_400).1, 4_000);
        // PERSIST: XX with no expiry.
        assert!(
            f.run_at(expire(Expiry::Never, ExpireWhen::Xx), 1_500)
                .succeeded
        );
        assert_eq!(get(&mut f, 1_600).1, 0);
        assert!(
            !f.run_at(expire(Expiry::Never, ExpireWhen::Xx), 1_700)
                .succeeded
        );
        // GT against no expiry (infinitely late) never holds; LT always does.
        assert!(
            !f.run_at(expire(Expiry::In(10), ExpireWhen::Gt), 1_800)
                .succeeded
        );
        // An expiry in the past deletes the key.
        assert!(
            f.run_at(expire(Expiry::At(1), ExpireWhen::Always), 1_900)
                .succeeded
        );
        assert!(f.applier.stored(b"k").unwrap().is_none());
        assert!(
            !f.run_at(expire(Expiry::In(10), ExpireWhen::Always), 2_000)
                .succeeded,
            "no key"
        );
    }

    #[test]
    fn rename_moves_the_value_and_its_expiry() {
        let mut f = Fixture::new();
        f.run_at(swap("v", Expiry::At(9_000)), 1_000);
        let rename = |to: &str, if_absent| Op::Rename {
            from: b"k".to_vec(),
            to: to.as_bytes().to_vec(),
            if_absent,
        };
        assert!(f.run_at(rename("k2", false), 1_100).succeeded);
        assert!(f.applier.stored(b"k").unwrap().is_none());
        let moved = f.applier.stored(b"k2").unwrap().unwrap();
        assert_eq!(
            (moved.value.as_slice(), moved.expires_at_ms),
            (&b"v"[..], 9_000)
        );
        let r = f.run_at(rename("k3", false), 1_200);
        assert_eq!(r.rejected, Some(Rejection::NoSuchKey), "k is gone");
        f.run_at(swap("x", Expiry::Never), 1_300);
        assert!(
            !f.run_at(rename("k2", true), 1_400).succeeded,
            "RENAMENX onto an existing key"
        );
        assert!(
            !f.run_at(rename("k", true), 1_500).succeeded,
            "RENAMENX k k"
        );
        assert!(f.run_at(rename("k", false), 1_600).succeeded, "RENAME k k");
    }

    #[test]
    fn reaping_deletes_only_the_expired_version_it_names() {
        let mut f = Fixture::new();
        f.run_at(swap("old", Expiry::In(10)), 1_000);
        let rev = f.applier.stored(b"k").unwrap().unwrap().mod_revision;
        // Not expired yet: left alone.
        let r = f.run_at(
            Op::Reap {
                keys: vec![(b"k".to_vec(), rev)],
            },
            1_005,
        );
        assert_eq!(r.current_revision, 0);
        let r = f.run_at(
            Op::Reap {
                keys: vec![(b"k".to_vec(), rev)],
            },
            1_020,
        );
        assert_eq!(r.current_revision, 1);
        assert!(f.applier.stored(b"k").unwrap().is_none());
        // Written again since the reaper looked: its new version stays.
        f.run_at(swap("old", Expiry::In(10)), 2_000);
        let rev = f.applier.stored(b"k").unwrap().unwrap().mod_revision;
        f.run_at(swap("new", Expiry::In(10)), 2_100);
        let r = f.run_at(
            Op::Reap {
                keys: vec![(b"k".to_vec(), rev)],
            },
            2_200,
        );
        assert_eq!(r.current_revision, 0);
        assert!(f.applier.stored(b"k").unwrap().is_some());
    }
}
