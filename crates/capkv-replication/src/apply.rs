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
use crate::types::{Command, CommandResponse, Condition, Op};

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

        let (key, condition) = match &cmd.op {
            Op::Put { key, condition, .. } | Op::Delete { key, condition } => (key, *condition),
        };
        let current = self.current(key)?;
        let current_revision = current.as_ref().map(|c| c.mod_revision).unwrap_or(0);
        let holds = match condition {
            Condition::Always => true,
            Condition::IfRevision(r) => current_revision == r,
            Condition::IfAbsent => current.is_none(),
        };
        let succeeded = match cmd.op {
            Op::Put { key, value, .. } => {
                if holds {
                    let create_revision = current
                        .as_ref()
                        .map(|c| c.create_revision)
                        .unwrap_or(revision);
                    let stored = StoredValue {
                        mod_revision: revision,
                        create_revision,
                        hlc,
                        value,
                    };
                    self.overlay.insert(key.clone(), Some(stored.clone()));
                    self.ops.push(SmOp::Put { key, value: stored });
                }
                holds
            }
            Op::Delete { key, .. } => {
                let deleted = holds && current.is_some();
                if deleted {
                    self.overlay.insert(key.clone(), None);
                    self.ops.push(SmOp::Delete { key });
                }
                deleted
            }
        };
        let response = CommandResponse {
            revision,
            hlc,
            succeeded,
            current_revision,
            log_index: 0,
            deduplicated: false,
            rejected: None,
        };
        if let Some(id) = &idempotency {
            self.sessions
                .record(id, now_ms, response.clone(), &mut changes);
        }
        self.note_sessions(changes);
        Ok(response)
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
