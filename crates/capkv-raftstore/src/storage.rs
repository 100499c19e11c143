//! One group's Raft log as raft-rs reads it, and the disk it is made durable on.
//!
//! raft-rs reads the log through [`raft::Storage`] and requires that what the driver wrote
//! be readable at once, before it is durable ("advance_append_async"). So each group keeps
//! its log in memory ([`GroupStorage`]) and the driver writes the same changes to a
//! [`Disk`] in one batch per turn for all groups, then asks for one sync; raft-rs learns
//! that a ready is durable only when that sync completes (`on_persist_ready`).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

/// A group's id (a partition).
pub type GroupId = u32;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct LogState {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Index and term of the last entry compacted away (0, 0 for none).
    pub snapshot_index: u64,
    pub snapshot_term: u64,
    /// Entries from `snapshot_index + 1`, contiguous.
    pub entries: Vec<Entry>,
    /// The state machine's image at `snapshot_index`, when the disk keeps one with the
    /// log (the simulation's state machine); empty for a node whose state machine keeps
    /// its own state on disk.
    pub snapshot_data: Vec<u8>,
}

impl LogState {
    pub fn first_index(&self) -> u64 {
        self.snapshot_index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }

    /// Appends `entries`, first dropping everything from `entries[0].index` on (raft-rs
    /// sends the new suffix after a conflict).
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let keep = first.index.saturating_sub(self.first_index()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Drops the entries up to `index` (which must be in the log), whose effect `data`
    /// holds.
    pub fn compact(&mut self, record: &SnapshotRecord) {
        if record.index <= self.snapshot_index {
            return;
        }
        let drop = (record.index - self.snapshot_index).min(self.entries.len() as u64) as usize;
        self.entries.drain(..drop);
        self.snapshot_index = record.index;
        self.snapshot_term = record.term;
        self.snapshot_data = record.data.clone();
    }

    /// Replaces the whole log by a snapshot received from the leader.
    pub fn restore(&mut self, record: &SnapshotRecord) {
        self.entries.clear();
        self.snapshot_index = record.index;
        self.snapshot_term = record.term;
        self.snapshot_data = record.data.clone();
        self.conf_state = record.conf_state.clone();
        if self.hard_state.commit < record.index {
            self.hard_state.commit = record.index;
        }
    }

    pub fn entry(&self, index: u64) -> Option<&Entry> {
        if index < self.first_index() {
            return None;
        }
        self.entries.get((index - self.first_index()) as usize)
    }
}

/// [`raft::Storage`] over a group's in-memory log, shared with the driver that writes it.
#[derive(Clone, Default)]
pub struct GroupStorage {
    state: Arc<RwLock<LogState>>,
}

impl GroupStorage {
    pub fn new(state: LogState) -> Self {
        GroupStorage {
            state: Arc::new(RwLock::new(state)),
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, LogState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, LogState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let s = self.read();
        Ok(RaftState::new(s.hard_state.clone(), s.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let s = self.read();
        if low < s.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > s.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - s.first_index()) as usize;
        let hi = (high - s.first_index()) as usize;
        let mut out = Vec::with_capacity(hi - lo);
        let mut size = 0u64;
        let max = max_size.into().unwrap_or(u64::MAX);
        for e in &s.entries[lo..hi] {
            size += u64::from(protobuf::Message::compute_size(e));
            // raft-rs: at least one entry, even over the limit.
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let s = self.read();
        if idx == s.snapshot_index {
            return Ok(s.snapshot_term);
        }
        if idx < s.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match s.entry(idx) {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index())
    }

    /// The snapshot at the log's compaction point: a follower that needs entries before
    /// the log's start gets the state machine's image there.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let s = self.read();
        if request_index > s.snapshot_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut meta = SnapshotMetadata::default();
        meta.set_conf_state(s.conf_state.clone());
        meta.index = s.snapshot_index;
        meta.term = s.snapshot_term;
        let mut snap = Snapshot {
            data: s.snapshot_data.clone().into(),
            ..Default::default()
        };
        snap.set_metadata(meta);
        Ok(snap)
    }
}

/// One turn's changes for every group, written together.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    /// Per group: entries to append (replacing any from their first index on), and the
    /// new hard state.
    pub groups: BTreeMap<GroupId, GroupWrite>,
}

#[derive(Debug, Default, Clone)]
pub struct GroupWrite {
    /// A snapshot from the leader replacing the log (applied first).
    pub restore: Option<SnapshotRecord>,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    /// Entries up to this record's index are no longer needed (applied last).
    pub compact: Option<SnapshotRecord>,
}

/// A point of the log that a state-machine image stands for.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SnapshotRecord {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
    pub data: Vec<u8>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// Where a node's Raft state becomes durable. `write` hands a batch over (not yet
/// durable); `sync` asks for everything written before it to become durable, and the
/// node learns that it is through [`crate::driver::Driver::on_synced`] with the same id
/// (or, when it failed, [`crate::driver::Driver::poison`]). A crash loses whatever no
/// completed sync covered.
pub trait Disk {
    /// An error means nothing written since the last completed sync can be trusted: the
    /// driver stops acknowledging anything (it is poisoned).
    fn write(&mut self, batch: WriteBatch) -> Result<(), String>;
    fn sync(&mut self, id: u64);
    /// Everything durable, per group (at start).
    fn load(&self) -> BTreeMap<GroupId, LogState>;
}

/// A disk in memory, for the simulation: writes are pending until a sync completes; the
/// simulation decides when (`complete_sync`), and a crash drops what is pending.
#[derive(Debug, Default, Clone)]
pub struct MemDisk {
    durable: BTreeMap<GroupId, LogState>,
    pending: Vec<WriteBatch>,
    /// Requested syncs, each with the number of pending batches it covers.
    syncs: Vec<(u64, usize)>,
}

impl MemDisk {
    /// Groups that exist from the start, with their voters.
    pub fn bootstrap(groups: &BTreeMap<GroupId, Vec<u64>>) -> Self {
        let mut durable = BTreeMap::new();
        for (g, voters) in groups {
            let mut st = LogState::default();
            st.conf_state.voters = voters.clone();
            durable.insert(*g, st);
        }
        MemDisk {
            durable,
            ..Default::default()
        }
    }

    /// The oldest requested sync, if any (its id).
    pub fn next_sync(&self) -> Option<u64> {
        self.syncs.first().map(|(id, _)| *id)
    }

    /// Makes the oldest requested sync durable; returns its id.
    pub fn complete_sync(&mut self) -> Option<u64> {
        if self.syncs.is_empty() {
            return None;
        }
        let (id, covered) = self.syncs.remove(0);
        for batch in self.pending.drain(..covered) {
            for (g, w) in batch.groups {
                let st = self.durable.entry(g).or_default();
                if let Some(r) = &w.restore {
                    st.restore(r);
                }
                st.append(&w.entries);
                if let Some(hs) = w.hard_state {
                    st.hard_state = hs;
                }
                if let Some(c) = &w.compact {
                    st.compact(c);
                }
            }
        }
        for s in &mut self.syncs {
            s.1 -= covered;
        }
        Some(id)
    }

    /// A crash: what no completed sync covered is gone.
    pub fn crash(&mut self) {
        self.pending.clear();
        self.syncs.clear();
    }
}

impl Disk for MemDisk {
    fn write(&mut self, batch: WriteBatch) -> Result<(), String> {
        self.pending.push(batch);
        Ok(())
    }

    fn sync(&mut self, id: u64) {
        self.syncs.push((id, self.pending.len()));
    }

    fn load(&self) -> BTreeMap<GroupId, LogState> {
        self.durable.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn appending_replaces_the_conflicting_suffix() {
        let mut s = LogState::default();
        s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")]);
        s.append(&[entry(2, 2, b"x")]);
        assert_eq!(s.last_index(), 2);
        assert_eq!(s.entry(2).unwrap().term, 2);
        let st = GroupStorage::new(s);
        assert_eq!(st.term(0).unwrap(), 0);
        assert_eq!(st.term(2).unwrap(), 2);
        assert!(st.term(3).is_err());
        let got = st
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len(), 2);
        assert!(st
            .entries(1, 4, None, GetEntriesContext::empty(false))
            .is_err());
    }

    #[test]
    fn a_crash_loses_what_no_sync_covered() {
        let mut d = MemDisk::bootstrap(&[(7, vec![1, 2, 3])].into());
        let w = |i| {
            let mut b = WriteBatch::default();
            b.groups.insert(
                7,
                GroupWrite {
                    entries: vec![entry(i, 1, b"v")],
                    ..Default::default()
                },
            );
            b
        };
        d.write(w(1)).unwrap();
        d.sync(10);
        d.write(w(2)).unwrap();
        assert_eq!(d.complete_sync(), Some(10));
        d.sync(11);
        d.crash();
        assert_eq!(d.complete_sync(), None);
        let st = &d.load()[&7];
        assert_eq!(st.last_index(), 1, "entry 2 was never synced");
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
    }
}
