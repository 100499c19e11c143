//! The node's real disk for the driver: every group's Raft log and hard state in the
//! node's [`StorageEngine`] (fjall), one atomic [`RaftWrite`] per turn for all groups,
//! and one request to the node's group-commit fsync per turn.
//!
//! Layout (see capkv-storage's `keys`): entries under `raft_log [partition][index]` as
//! postcard-encoded [`WireEntry`] (capkv's own types, never protobuf), and under
//! `raft_meta [partition][tag]` the hard state, the membership and the log start.

use std::collections::BTreeMap;
use std::sync::Arc;

use capkv_storage::keys::raft_meta_tag;
use capkv_storage::{RaftLogWrite, RaftWrite, StorageEngine, StorageError};
use capkv_types::PartitionId;
use raft::eraftpb::{ConfState, HardState};
use serde::{Deserialize, Serialize};

use crate::codec::WireEntry;
use crate::storage::{Disk, GroupId, LogState, WriteBatch};

/// Called on the group-commit thread when sync `id` completed (or failed).
pub type SyncNotify = Arc<dyn Fn(u64, Result<(), StorageError>) + Send + Sync>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StoredHardState {
    term: u64,
    vote: u64,
    commit: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StoredConfState {
    voters: Vec<u64>,
    learners: Vec<u64>,
    voters_outgoing: Vec<u64>,
    learners_next: Vec<u64>,
    auto_leave: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct LogStart {
    index: u64,
    term: u64,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain data into a Vec: cannot fail.
    postcard::to_stdvec(v).unwrap_or_default()
}

fn decode<T: for<'a> Deserialize<'a>>(
    what: &str,
    p: PartitionId,
    bytes: &[u8],
) -> Result<T, StorageError> {
    postcard::from_bytes(bytes)
        .map_err(|e| StorageError::Corrupt(format!("{what} of partition {p}: {e}")))
}

pub struct EngineDisk {
    engine: Arc<dyn StorageEngine>,
    /// Per group, the last log index written (durable or not).
    last: BTreeMap<GroupId, u64>,
    /// Per group, the index the log starts after (its last compaction).
    start: BTreeMap<GroupId, u64>,
    loaded: BTreeMap<GroupId, LogState>,
    notify: SyncNotify,
}

impl EngineDisk {
    /// Loads every group in `groups` from `engine`. A group with no membership on disk is
    /// new: it starts with the given voters (written and synced before this returns).
    pub fn open(
        engine: Arc<dyn StorageEngine>,
        groups: &BTreeMap<GroupId, Vec<u64>>,
        notify: SyncNotify,
    ) -> Result<Self, StorageError> {
        let mut loaded = BTreeMap::new();
        let mut last = BTreeMap::new();
        let mut start_of = BTreeMap::new();
        let mut bootstrapped = false;
        for (&gid, voters) in groups {
            let p = PartitionId(gid);
            let conf = match engine.raft_meta_get(p, raft_meta_tag::CONF_STATE)? {
                Some(b) => decode::<StoredConfState>("membership", p, &b)?,
                None => {
                    let c = StoredConfState {
                        voters: voters.clone(),
                        ..Default::default()
                    };
                    engine.raft_meta_put(p, raft_meta_tag::CONF_STATE, &encode(&c))?;
                    bootstrapped = true;
                    c
                }
            };
            let hs = match engine.raft_meta_get(p, raft_meta_tag::HARD_STATE)? {
                Some(b) => decode::<StoredHardState>("hard state", p, &b)?,
                None => StoredHardState::default(),
            };
            let start = match engine.raft_meta_get(p, raft_meta_tag::LOG_START)? {
                Some(b) => decode::<LogStart>("log start", p, &b)?,
                None => LogStart::default(),
            };
            let mut st = LogState {
                hard_state: HardState {
                    term: hs.term,
                    vote: hs.vote,
                    commit: hs.commit,
                    ..Default::default()
                },
                conf_state: ConfState {
                    voters: conf.voters,
                    learners: conf.learners,
                    voters_outgoing: conf.voters_outgoing,
                    learners_next: conf.learners_next,
                    auto_leave: conf.auto_leave,
                    ..Default::default()
                },
                snapshot_index: start.index,
                snapshot_term: start.term,
                entries: Vec::new(),
                snapshot_data: Vec::new(),
            };
            let stored = engine.log_read(p, start.index + 1, u64::MAX, usize::MAX)?;
            for (expect, (index, bytes)) in (start.index + 1..).zip(stored) {
                let wire: WireEntry = decode("log entry", p, &bytes)?;
                let entry = wire.into_raft().map_err(|e| {
                    StorageError::Corrupt(format!("log entry {index} of partition {p}: {e}"))
                })?;
                if index != expect || entry.index != index {
                    return Err(StorageError::Corrupt(format!(
                        "log of partition {p}: expected entry {expect}, found key {index} holding entry {}",
                        entry.index
                    )));
                }
                st.entries.push(entry);
            }
            if st.hard_state.commit > st.last_index() {
                return Err(StorageError::Corrupt(format!(
                    "partition {p}: commit index {} past the last log entry {}",
                    st.hard_state.commit,
                    st.last_index()
                )));
            }
            last.insert(gid, st.last_index());
            start_of.insert(gid, st.snapshot_index);
            loaded.insert(gid, st);
        }
        if bootstrapped {
            engine.sync()?;
        }
        Ok(EngineDisk {
            engine,
            last,
            start: start_of,
            loaded,
            notify,
        })
    }
}

impl Disk for EngineDisk {
    fn write(&mut self, batch: WriteBatch) -> Result<(), String> {
        let mut w = RaftWrite::default();
        for (gid, g) in batch.groups {
            let p = PartitionId(gid);
            let mut lw = RaftLogWrite {
                partition: p,
                ..Default::default()
            };
            let mut old_last = self.last.get(&gid).copied().unwrap_or(0);
            if let Some(r) = &g.restore {
                // A snapshot from the leader: the log restarts after its index, and the
                // state machine becomes the image staged for it, in this same batch (the
                // write fails if none is staged at that index). Old entries up to the index
                // go; later ones are replaced by this turn's entries or go too.
                let start = self.start.get(&gid).copied().unwrap_or(0);
                let new_last = g.entries.last().map_or(r.index, |e| e.index.max(r.index));
                let conf = &r.conf_state;
                let mut install = RaftLogWrite {
                    partition: p,
                    meta: vec![
                        (
                            raft_meta_tag::LOG_START,
                            encode(&LogStart {
                                index: r.index,
                                term: r.term,
                            }),
                        ),
                        (
                            raft_meta_tag::CONF_STATE,
                            encode(&StoredConfState {
                                voters: conf.voters.clone(),
                                learners: conf.learners.clone(),
                                voters_outgoing: conf.voters_outgoing.clone(),
                                learners_next: conf.learners_next.clone(),
                                auto_leave: conf.auto_leave,
                            }),
                        ),
                    ],
                    install_staged: Some(r.index),
                    ..Default::default()
                };
                let upto = old_last.min(r.index);
                if upto > start {
                    install.remove = Some((start + 1, upto));
                }
                w.groups.push(install);
                if old_last > new_last {
                    w.groups.push(RaftLogWrite {
                        partition: p,
                        remove: Some((new_last + 1, old_last)),
                        ..Default::default()
                    });
                }
                self.start.insert(gid, r.index);
                self.last.insert(gid, r.index);
                old_last = r.index;
            }
            if let (Some(first), Some(last)) = (g.entries.first(), g.entries.last()) {
                // raft-rs hands a new suffix: whatever followed it before is gone.
                if last.index < old_last {
                    lw.remove = Some((last.index + 1, old_last));
                }
                if first.index > old_last + 1 {
                    return Err(format!(
                        "group {gid}: append at {} leaves a gap after {old_last}",
                        first.index
                    ));
                }
                self.last.insert(gid, last.index);
                lw.entries = g
                    .entries
                    .iter()
                    .map(|e| (e.index, encode(&WireEntry::from(e))))
                    .collect();
            }
            if let Some(hs) = &g.hard_state {
                let stored = StoredHardState {
                    term: hs.term,
                    vote: hs.vote,
                    commit: hs.commit,
                };
                lw.meta.push((raft_meta_tag::HARD_STATE, encode(&stored)));
            }
            w.groups.push(lw);
            if let Some(c) = &g.compact {
                // The log's new start. Its image is the state machine itself, whose writes
                // precede this one in the journal. (A second write of the partition in the
                // same atomic batch: the first may remove a conflicting suffix.)
                let start = self.start.get(&gid).copied().unwrap_or(0);
                if c.index > start {
                    w.groups.push(RaftLogWrite {
                        partition: p,
                        entries: Vec::new(),
                        remove: Some((start + 1, c.index)),
                        meta: vec![(
                            raft_meta_tag::LOG_START,
                            encode(&LogStart {
                                index: c.index,
                                term: c.term,
                            }),
                        )],
                        install_staged: None,
                    });
                    self.start.insert(gid, c.index);
                }
            }
        }
        self.engine.raft_write(&w).map_err(|e| e.to_string())
    }

    fn sync(&mut self, id: u64) {
        let notify = self.notify.clone();
        self.engine
            .group_commit()
            .request(Box::new(move |res| notify(id, res)));
    }

    fn load(&self) -> BTreeMap<GroupId, LogState> {
        self.loaded.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::GroupWrite;
    use capkv_storage::{FjallEngine, FjallOptions};
    use raft::eraftpb::Entry;
    use std::sync::mpsc;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}t{term}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn open(dir: &std::path::Path) -> (EngineDisk, mpsc::Receiver<(u64, bool)>) {
        let engine: Arc<dyn StorageEngine> =
            Arc::new(FjallEngine::open(dir, FjallOptions::default()).unwrap());
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let notify: SyncNotify = Arc::new(move |id, r: Result<(), StorageError>| {
            let _ = tx.lock().unwrap().send((id, r.is_ok()));
        });
        let groups = [(1, vec![1, 2, 3]), (2, vec![2, 3, 4])].into();
        (EngineDisk::open(engine, &groups, notify).unwrap(), rx)
    }

    #[test]
    fn turns_survive_a_reopen_and_a_conflicting_suffix_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut d, rx) = open(dir.path());
            let st = d.load();
            assert_eq!(st[&1].conf_state.voters, vec![1, 2, 3]);
            assert_eq!(st[&2].last_index(), 0);
            let mut b = WriteBatch::default();
            b.groups.insert(
                1,
                GroupWrite {
                    entries: (1..=5).map(|i| entry(i, 1)).collect(),
                    hard_state: Some(HardState {
                        term: 1,
                        vote: 1,
                        commit: 2,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
            b.groups.insert(
                2,
                GroupWrite {
                    entries: vec![entry(1, 3)],
                    ..Default::default()
                },
            );
            d.write(b).unwrap();
            // A new leader replaces 3..5 with a shorter suffix.
            let mut b = WriteBatch::default();
            b.groups.insert(
                1,
                GroupWrite {
                    entries: vec![entry(3, 2)],
                    hard_state: Some(HardState {
                        term: 2,
                        vote: 3,
                        commit: 3,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
            d.write(b).unwrap();
            d.sync(7);
            assert_eq!(
                rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(),
                (7, true)
            );
        }
        let (d, _rx) = open(dir.path());
        let st = d.load();
        let g1 = &st[&1];
        assert_eq!(g1.last_index(), 3, "entries 4 and 5 were replaced");
        assert_eq!(
            g1.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 1), (3, 2)]
        );
        assert_eq!(
            (g1.hard_state.term, g1.hard_state.vote, g1.hard_state.commit),
            (2, 3, 3)
        );
        assert_eq!(st[&2].entries[0].data.as_ref(), b"e1t3");
        assert_eq!(st[&2].conf_state.voters, vec![2, 3, 4]);
    }
}
