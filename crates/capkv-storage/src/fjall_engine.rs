//! [`StorageEngine`] on fjall: one LSM database per node, one journal shared by all
//! keyspaces and partitions (so one fsync commits writes of every Raft group).

use std::fs;
use std::path::{Path, PathBuf};

use capkv_types::PartitionId;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};

use crate::engine::{
    PartitionImage, RaftWrite, SmOp, SmSnapshot, SmWrite, StorageEngine, StorageError,
};
use crate::group_commit::GroupCommit;
use crate::keys::{self, raft_meta_tag, staging_kind};
use crate::power_loss::SyncMarks;
use crate::value::StoredValue;

const SM_META_APPLIED: u8 = 1;

/// Tuning of the fjall engine.
#[derive(Debug, Clone)]
pub struct FjallOptions {
    /// Block cache size.
    pub cache_bytes: u64,
    /// Planted bug for the checker (TESTING ONLY): acknowledge durability requests before
    /// the fsync that covers them.
    pub planted_ack_before_sync: bool,
    /// Fault injection (TESTING ONLY): record how much of the journal each fsync covered,
    /// so that a later start can emulate a power cut (`power_loss`).
    pub record_sync_marks: bool,
    /// Planted bug for the checker (TESTING ONLY): scans iterate the live keyspace, not a
    /// snapshot, and pause every few rows (as a scan yielding to other work would), so
    /// writes landing meanwhile are seen ahead of the cursor and missed behind it.
    pub planted_scan_without_snapshot: bool,
}

impl Default for FjallOptions {
    fn default() -> Self {
        FjallOptions {
            cache_bytes: 64 * 1024 * 1024,
            planted_ack_before_sync: false,
            record_sync_marks: false,
            planted_scan_without_snapshot: false,
        }
    }
}

pub struct FjallEngine {
    db: Database,
    /// See [`FjallOptions::planted_scan_without_snapshot`].
    planted_scan_without_snapshot: bool,
    raft_log: Keyspace,
    raft_meta: Keyspace,
    sm_data: Keyspace,
    sm_meta: Keyspace,
    sm_session: Keyspace,
    /// Snapshots being received (see `keys`).
    sm_staging: Keyspace,
    node_meta: Keyspace,
    group_commit: GroupCommit,
}

/// Makes every write committed to `db` before the call durable, without holding fjall's
/// journal lock during the fsync.
///
/// `Database::persist(SyncAll)` fsyncs while holding the journal writer's mutex, so every
/// batch commit on any runtime thread (log appends, applies of every partition) stalls
/// for the whole fsync (measured: tokio workers blocked in `WriteBatch::commit` behind the
/// flusher). Instead, the journal's user-space buffer is flushed under the lock (a
/// `write`, fast) and the active journal file is then `fdatasync`ed through our own file
/// descriptor, with the lock released.
///
/// Why this is safe: `fdatasync` on any descriptor of a file syncs that file's data and
/// the metadata needed to read it. If fjall rotates the journal between our buffer
/// flush and our fsync, rotation itself `fsync`s the sealed journal (which holds our
/// writes) before switching, and writes made after the rotation are not ours to cover.
/// If the journal layout is not the one this relies on (`<db>/<id>.jnl`), it falls back
/// to `persist(SyncAll)`.
struct JournalSyncer {
    db: Database,
    dir: PathBuf,
    active: std::sync::Mutex<Option<(u64, fs::File)>>,
    /// Fault injection: how much of the journal each fsync covered (power-loss emulation).
    marks: Option<SyncMarks>,
}

/// Highest journal id in `dir`, if any.
fn scan_journals(dir: &Path) -> std::io::Result<Option<u64>> {
    let mut best = None;
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let id = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jnl"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id {
            best = best.max(Some(id));
        }
    }
    Ok(best)
}

/// The journal fjall writes to now, given the one a sync used last (`cached`): follows
/// rotations one `stat` at a time, and looks through the directory when `cached` is gone.
/// fjall deletes sealed journals oldest first, so after two or more rotations since the
/// last sync the next id may be deleted already, and the cached one with it: stepping
/// `id + 1` alone would stop on a deleted journal, and an `fdatasync` of its still open
/// descriptor succeeds while syncing nothing that is written now.
fn active_journal(dir: &Path, cached: Option<u64>) -> std::io::Result<Option<u64>> {
    let path = |id: u64| dir.join(format!("{id}.jnl"));
    let Some(mut id) = cached else {
        return scan_journals(dir);
    };
    while path(id + 1).exists() {
        id += 1;
    }
    if path(id).exists() {
        Ok(Some(id))
    } else {
        scan_journals(dir)
    }
}

impl JournalSyncer {
    fn new(db: Database, dir: PathBuf) -> Self {
        JournalSyncer {
            db,
            dir,
            active: std::sync::Mutex::new(None),
            marks: None,
        }
    }

    fn journal_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.jnl"))
    }

    /// Highest journal id in the directory (the active one), if any.
    #[cfg(test)]
    fn scan_active(&self) -> std::io::Result<Option<u64>> {
        scan_journals(&self.dir)
    }

    fn sync(&self) -> Result<(), StorageError> {
        // Under fjall's lock: user-space buffer to the OS. Everything committed before
        // this line is now in the active journal's page cache (or in a sealed journal
        // that rotation has already fsynced).
        self.db.persist(PersistMode::Buffer)?;
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let Some(id) = active_journal(&self.dir, active.as_ref().map(|(id, _)| *id))? else {
            drop(active);
            return self.db.persist(PersistMode::SyncAll).map_err(Into::into);
        };
        if active.as_ref().map(|(a, _)| *a) != Some(id) {
            let file = fs::File::open(self.journal_path(id))?;
            *active = Some((id, file));
        }
        let (_, file) = active.as_ref().expect("set above");
        let written = self
            .marks
            .as_ref()
            .and_then(|m| m.written(id, &self.journal_path(id), file));
        file.sync_data()?;
        if let (Some(marks), Some(bytes)) = (&self.marks, written) {
            marks.record(id, bytes);
        }
        Ok(())
    }
}

impl FjallEngine {
    /// Opens (or creates) the engine under `dir`.
    pub fn open(dir: &Path, options: FjallOptions) -> Result<Self, StorageError> {
        fs::create_dir_all(dir)?;
        let db = match Database::builder(dir.join("db"))
            .cache_size(options.cache_bytes)
            // A batch commit only appends to the journal's user-space buffer; the group
            // commit's `persist(Buffer)` hands it to the OS once per fsync (see
            // `JournalSyncer`). By default fjall writes the buffer out at every commit: two
            // `write` calls per engine turn, 16 % of the engine thread under SET. Nothing
            // is acknowledged before its fsync, and the journal stays one ordered stream,
            // so a crash still leaves a prefix of what was committed; a stopping node
            // syncs last (`Node::shutdown`). See ARCHITECTURE.md.
            .manual_journal_persist(true)
            .open()
        {
            Err(fjall::Error::Locked) => {
                return Err(StorageError::InUse(dir.display().to_string()))
            }
            other => other?,
        };
        let ks = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        let raft_log = ks("raft_log")?;
        let raft_meta = ks("raft_meta")?;
        let sm_data = ks("sm_data")?;
        let sm_meta = ks("sm_meta")?;
        let sm_session = ks("sm_session")?;
        let sm_staging = ks("sm_staging")?;
        let node_meta = ks("node_meta")?;
        let mut syncer = JournalSyncer::new(db.clone(), dir.join("db"));
        if options.record_sync_marks {
            syncer.marks = Some(SyncMarks::new(dir));
        }
        let group_commit =
            GroupCommit::start_with(move || syncer.sync(), options.planted_ack_before_sync)?;
        Ok(FjallEngine {
            db,
            raft_log,
            raft_meta,
            sm_data,
            sm_meta,
            sm_session,
            sm_staging,
            node_meta,
            group_commit,
            planted_scan_without_snapshot: options.planted_scan_without_snapshot,
        })
    }

    /// Adds to `batch` the replacement of `p`'s state machine by its complete staged image
    /// at `index`, and the removal of the staging.
    fn install_staged(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        p: PartitionId,
        index: u64,
    ) -> Result<(), StorageError> {
        let done = self
            .sm_staging
            .get(keys::staging_key(p, staging_kind::DONE, &[]))?
            .ok_or_else(|| {
                StorageError::Engine(format!("partition {p}: no snapshot staged to install"))
            })?;
        let (staged_index, applied) = split_done(&done)?;
        if staged_index != index {
            return Err(StorageError::Engine(format!(
                "partition {p}: the staged snapshot is at index {staged_index}, not {index}"
            )));
        }
        let prefix = keys::partition_prefix(p);
        Self::remove_prefix(batch, &self.sm_data, &prefix)?;
        Self::remove_prefix(batch, &self.sm_session, &prefix)?;
        let data = keys::staging_key(p, staging_kind::DATA, &[]);
        for guard in self.sm_staging.prefix(&data) {
            let (k, v) = guard.into_inner()?;
            batch.insert(&self.sm_data, keys::data_key(p, &k[data.len()..]), v);
        }
        let sessions = keys::staging_key(p, staging_kind::SESSION, &[]);
        for guard in self.sm_staging.prefix(&sessions) {
            let (k, v) = guard.into_inner()?;
            let c: [u8; 8] = k[sessions.len()..]
                .try_into()
                .map_err(|_| StorageError::Corrupt("malformed staged session key".into()))?;
            batch.insert(
                &self.sm_session,
                keys::session_key(p, u64::from_be_bytes(c)),
                v,
            );
        }
        batch.insert(
            &self.sm_meta,
            keys::tagged_key(p, SM_META_APPLIED),
            applied.to_vec(),
        );
        Self::remove_prefix(batch, &self.sm_staging, &prefix)?;
        Ok(())
    }

    /// Keys of `ks` in `[from, to]`.
    fn keys_in(ks: &Keyspace, from: &[u8], to: &[u8]) -> Result<Vec<Vec<u8>>, StorageError> {
        let mut out = Vec::new();
        for guard in ks.range(from..=to) {
            out.push(guard.key()?.to_vec());
        }
        Ok(out)
    }

    /// Deletes the log entries of `p` with index in `[first, last]`, in one batch.
    fn remove_log_range(&self, p: PartitionId, first: u64, last: u64) -> Result<(), StorageError> {
        let doomed = Self::keys_in(
            &self.raft_log,
            &keys::log_key(p, first),
            &keys::log_key(p, last),
        )?;
        if doomed.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch();
        for k in doomed {
            batch.remove(&self.raft_log, k);
        }
        batch.commit()?;
        Ok(())
    }

    fn keys_with_prefix(ks: &Keyspace, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StorageError> {
        let mut out = Vec::new();
        for guard in ks.prefix(prefix) {
            out.push(guard.key()?.to_vec());
        }
        Ok(out)
    }

    /// Adds to `batch` the removal of every key of `ks` starting with `prefix`.
    fn remove_prefix(
        batch: &mut fjall::OwnedWriteBatch,
        ks: &Keyspace,
        prefix: &[u8],
    ) -> Result<(), StorageError> {
        for k in Self::keys_with_prefix(ks, prefix)? {
            batch.remove(ks, k);
        }
        Ok(())
    }
}

/// The index and applied state of a staged image's completion record.
fn split_done(done: &[u8]) -> Result<(u64, &[u8]), StorageError> {
    let index: [u8; 8] = done
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| StorageError::Corrupt("malformed staged snapshot record".into()))?;
    Ok((u64::from_be_bytes(index), &done[8..]))
}

/// [`SmSnapshot`] on a fjall snapshot (a sequence number: reads see the state of then).
struct FjallSmSnapshot {
    snap: fjall::Snapshot,
    p: PartitionId,
    sm_data: Keyspace,
    sm_meta: Keyspace,
    sm_session: Keyspace,
}

impl SmSnapshot for FjallSmSnapshot {
    fn applied(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .snap
            .get(&self.sm_meta, keys::tagged_key(self.p, SM_META_APPLIED))?
            .map(|v| v.to_vec()))
    }

    fn data_page(
        &self,
        after: Option<&[u8]>,
        bytes_max: usize,
    ) -> Result<crate::engine::DataPage, StorageError> {
        use std::ops::Bound;
        let from = match after {
            Some(k) => Bound::Excluded(keys::data_key(self.p, k)),
            None => Bound::Included(keys::partition_prefix(self.p).to_vec()),
        };
        let to = match keys::next_partition_prefix(self.p) {
            Some(n) => Bound::Excluded(n.to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for guard in self.snap.range(&self.sm_data, (from, to)) {
            if bytes >= bytes_max && !out.is_empty() {
                break;
            }
            let (k, v) = guard.into_inner()?;
            bytes += k.len() + v.len();
            out.push((keys::user_key_of(&k).to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn sessions_page(
        &self,
        after: Option<u64>,
        bytes_max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let first = match after {
            Some(c) => match c.checked_add(1) {
                Some(c) => c,
                None => return Ok(Vec::new()),
            },
            None => 0,
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        let range = keys::session_key(self.p, first)..=keys::session_key(self.p, u64::MAX);
        for guard in self.snap.range(&self.sm_session, range) {
            if bytes >= bytes_max && !out.is_empty() {
                break;
            }
            let (k, v) = guard.into_inner()?;
            let c = keys::session_client_of(&k)
                .ok_or_else(|| StorageError::Corrupt("malformed session key".into()))?;
            bytes += 8 + v.len();
            out.push((c, v.to_vec()));
        }
        Ok(out)
    }
}

impl StorageEngine for FjallEngine {
    fn log_append(&self, p: PartitionId, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        for (index, bytes) in entries {
            batch.insert(&self.raft_log, keys::log_key(p, *index), bytes.as_slice());
        }
        batch.commit()?;
        Ok(())
    }

    fn log_read(
        &self,
        p: PartitionId,
        start: u64,
        end: u64,
        max_entries: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        for guard in self
            .raft_log
            .range(keys::log_key(p, start)..keys::log_key(p, end))
        {
            if out.len() >= max_entries {
                break;
            }
            let (k, v) = guard.into_inner()?;
            let index = keys::log_index_of(&k)
                .ok_or_else(|| StorageError::Corrupt("malformed log key".into()))?;
            out.push((index, v.to_vec()));
        }
        Ok(out)
    }

    fn log_last(&self, p: PartitionId) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        match self.raft_log.prefix(keys::partition_prefix(p)).next_back() {
            None => Ok(None),
            Some(guard) => {
                let (k, v) = guard.into_inner()?;
                let index = keys::log_index_of(&k)
                    .ok_or_else(|| StorageError::Corrupt("malformed log key".into()))?;
                Ok(Some((index, v.to_vec())))
            }
        }
    }

    fn log_truncate_from(&self, p: PartitionId, from: u64) -> Result<(), StorageError> {
        self.remove_log_range(p, from, u64::MAX)
    }

    fn log_purge_upto(&self, p: PartitionId, upto: u64) -> Result<(), StorageError> {
        // Indexes are contiguous, so one seek finds the first live entry and the rest
        // are named, not read: a purge of ~20k entries used to read every entry (values
        // included) before deleting it.
        let first = match self
            .raft_log
            .range(keys::log_key(p, 0)..=keys::log_key(p, upto))
            .next()
        {
            None => return Ok(()),
            Some(guard) => {
                let key = guard.key()?;
                keys::log_index_of(&key)
                    .ok_or_else(|| StorageError::Corrupt("malformed raft log key".into()))?
            }
        };
        let mut batch = self.db.batch();
        for index in first..=upto {
            batch.remove(&self.raft_log, keys::log_key(p, index));
        }
        batch.commit()?;
        Ok(())
    }

    fn raft_write(&self, write: &RaftWrite) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        for g in &write.groups {
            let p = g.partition;
            if let (Some((first, last)), Some((lo, hi))) = (
                g.remove,
                g.entries
                    .first()
                    .map(|e| e.0)
                    .zip(g.entries.last().map(|e| e.0)),
            ) {
                if first <= hi && lo <= last {
                    return Err(StorageError::Engine(format!(
                        "raft write of partition {p}: removes [{first}, {last}] and writes [{lo}, {hi}]"
                    )));
                }
            }
            if let Some((first, last)) = g.remove {
                // Named, not read: the caller knows which indexes exist.
                for index in first..=last {
                    batch.remove(&self.raft_log, keys::log_key(p, index));
                }
            }
            for (index, bytes) in &g.entries {
                batch.insert(&self.raft_log, keys::log_key(p, *index), bytes.as_slice());
            }
            for (tag, value) in &g.meta {
                batch.insert(&self.raft_meta, keys::tagged_key(p, *tag), value.as_slice());
            }
            if let Some(index) = g.install_staged {
                self.install_staged(&mut batch, p, index)?;
            }
        }
        batch.commit()?;
        Ok(())
    }

    fn raft_meta_get(&self, p: PartitionId, tag: u8) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .raft_meta
            .get(keys::tagged_key(p, tag))?
            .map(|v| v.to_vec()))
    }

    fn raft_meta_put(&self, p: PartitionId, tag: u8, value: &[u8]) -> Result<(), StorageError> {
        debug_assert!((raft_meta_tag::VOTE..=raft_meta_tag::LOG_START).contains(&tag));
        self.raft_meta.insert(keys::tagged_key(p, tag), value)?;
        Ok(())
    }

    fn sm_write(&self, p: PartitionId, write: SmWrite) -> Result<(), StorageError> {
        self.sm_write_many(vec![(p, write)])
    }

    fn sm_write_many(&self, writes: Vec<(PartitionId, SmWrite)>) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        for (p, write) in writes {
            for op in write.ops {
                match op {
                    SmOp::Put { key, value } => {
                        batch.insert(&self.sm_data, keys::data_key(p, &key), value.encode())
                    }
                    SmOp::Delete { key } => batch.remove(&self.sm_data, keys::data_key(p, &key)),
                    SmOp::SessionPut { client_id, session } => {
                        batch.insert(&self.sm_session, keys::session_key(p, client_id), session)
                    }
                    SmOp::SessionDelete { client_id } => {
                        batch.remove(&self.sm_session, keys::session_key(p, client_id))
                    }
                }
            }
            if let Some(applied) = write.applied {
                batch.insert(&self.sm_meta, keys::tagged_key(p, SM_META_APPLIED), applied);
            }
        }
        batch.commit()?;
        Ok(())
    }

    fn sm_get(&self, p: PartitionId, key: &[u8]) -> Result<Option<StoredValue>, StorageError> {
        match self.sm_data.get(keys::data_key(p, key))? {
            None => Ok(None),
            Some(v) => Ok(Some(StoredValue::decode(&v)?)),
        }
    }

    fn sm_scan(
        &self,
        p: PartitionId,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(Vec<u8>, StoredValue)>, StorageError> {
        let from = keys::data_key(p, start);
        let to = match end {
            Some(end) => Some(keys::data_key(p, end)),
            None => keys::next_partition_prefix(p).map(|k| k.to_vec()),
        };
        // One snapshot: a plain range iterator would see writes that land during the scan
        // ahead of its cursor but not behind it, a state the partition never was in.
        let snapshot = self.db.snapshot();
        let iter = match (&to, self.planted_scan_without_snapshot) {
            (Some(to), false) => snapshot.range(&self.sm_data, from.as_slice()..to.as_slice()),
            (None, false) => snapshot.range(&self.sm_data, from.as_slice()..),
            (Some(to), true) => self.sm_data.range(from.as_slice()..to.as_slice()),
            (None, true) => self.sm_data.range(from.as_slice()..),
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for guard in iter {
            if self.planted_scan_without_snapshot && out.len() % 8 == 7 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if out.len() >= limit || (bytes >= bytes_max && !out.is_empty()) {
                break;
            }
            let (k, v) = guard.into_inner()?;
            let value = StoredValue::decode(&v)?;
            bytes += k.len() + value.value.len();
            out.push((keys::user_key_of(&k).to_vec(), value));
        }
        Ok(out)
    }

    fn sm_applied(&self, p: PartitionId) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .sm_meta
            .get(keys::tagged_key(p, SM_META_APPLIED))?
            .map(|v| v.to_vec()))
    }

    fn sm_sessions_all(&self, p: PartitionId) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        for guard in self.sm_session.prefix(keys::partition_prefix(p)) {
            let (k, v) = guard.into_inner()?;
            let c = keys::session_client_of(&k)
                .ok_or_else(|| StorageError::Corrupt("malformed session key".into()))?;
            out.push((c, v.to_vec()));
        }
        Ok(out)
    }

    fn sm_export(&self, p: PartitionId) -> Result<PartitionImage, StorageError> {
        let snap = self.db.snapshot();
        let prefix = keys::partition_prefix(p);
        let applied = snap
            .get(&self.sm_meta, keys::tagged_key(p, SM_META_APPLIED))?
            .map(|v| v.to_vec());
        let mut data = Vec::new();
        for guard in snap.prefix(&self.sm_data, prefix) {
            let (k, v) = guard.into_inner()?;
            data.push((keys::user_key_of(&k).to_vec(), v.to_vec()));
        }
        let mut sessions = Vec::new();
        for guard in snap.prefix(&self.sm_session, prefix) {
            let (k, v) = guard.into_inner()?;
            let c = keys::session_client_of(&k)
                .ok_or_else(|| StorageError::Corrupt("malformed session key".into()))?;
            sessions.push((c, v.to_vec()));
        }
        Ok(PartitionImage {
            applied,
            data,
            sessions,
        })
    }

    fn sm_snapshot(&self, p: PartitionId) -> Result<Box<dyn SmSnapshot>, StorageError> {
        Ok(Box::new(FjallSmSnapshot {
            snap: self.db.snapshot(),
            p,
            sm_data: self.sm_data.clone(),
            sm_meta: self.sm_meta.clone(),
            sm_session: self.sm_session.clone(),
        }))
    }

    fn sm_stage_clear(&self, p: PartitionId) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        Self::remove_prefix(&mut batch, &self.sm_staging, &keys::partition_prefix(p))?;
        if !batch.is_empty() {
            batch.commit()?;
        }
        Ok(())
    }

    fn sm_stage_put(
        &self,
        p: PartitionId,
        data: &[(Vec<u8>, Vec<u8>)],
        sessions: &[(u64, Vec<u8>)],
    ) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        for (k, v) in data {
            StoredValue::decode(v)?;
            batch.insert(
                &self.sm_staging,
                keys::staging_key(p, staging_kind::DATA, k),
                v.as_slice(),
            );
        }
        for (c, session) in sessions {
            batch.insert(
                &self.sm_staging,
                keys::staging_key(p, staging_kind::SESSION, &c.to_be_bytes()),
                session.as_slice(),
            );
        }
        batch.commit()?;
        Ok(())
    }

    fn sm_stage_finish(
        &self,
        p: PartitionId,
        index: u64,
        applied: &[u8],
    ) -> Result<(), StorageError> {
        let mut done = index.to_be_bytes().to_vec();
        done.extend_from_slice(applied);
        self.sm_staging
            .insert(keys::staging_key(p, staging_kind::DONE, &[]), done)?;
        Ok(())
    }

    fn sm_staged_index(&self, p: PartitionId) -> Result<Option<u64>, StorageError> {
        match self
            .sm_staging
            .get(keys::staging_key(p, staging_kind::DONE, &[]))?
        {
            None => Ok(None),
            Some(done) => Ok(Some(split_done(&done)?.0)),
        }
    }

    fn sm_import(&self, p: PartitionId, image: &PartitionImage) -> Result<(), StorageError> {
        let prefix = keys::partition_prefix(p);
        let mut batch = self.db.batch();
        Self::remove_prefix(&mut batch, &self.sm_data, &prefix)?;
        Self::remove_prefix(&mut batch, &self.sm_session, &prefix)?;
        for (k, v) in &image.data {
            StoredValue::decode(v)?;
            batch.insert(&self.sm_data, keys::data_key(p, k), v.as_slice());
        }
        for (c, session) in &image.sessions {
            batch.insert(
                &self.sm_session,
                keys::session_key(p, *c),
                session.as_slice(),
            );
        }
        match &image.applied {
            Some(a) => batch.insert(
                &self.sm_meta,
                keys::tagged_key(p, SM_META_APPLIED),
                a.as_slice(),
            ),
            None => batch.remove(&self.sm_meta, keys::tagged_key(p, SM_META_APPLIED)),
        }
        batch.commit()?;
        self.sync()
    }

    fn node_meta_get(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.node_meta.get(name.as_bytes())?.map(|v| v.to_vec()))
    }

    fn node_meta_put(&self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        self.node_meta.insert(name.as_bytes(), value)?;
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.group_commit.sync_now()
    }

    fn group_commit(&self) -> &GroupCommit {
        &self.group_commit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scan is one snapshot of the partition: while writes land one at a time, each a
    /// key at a pseudo-random place holding the next number of a sequence, every scan
    /// sees the numbers 1..=n for some n, never a later one without an earlier one.
    #[test]
    fn a_scan_sees_one_state_of_the_partition() {
        let dir = tempfile::tempdir().unwrap();
        let engine =
            std::sync::Arc::new(FjallEngine::open(dir.path(), FjallOptions::default()).unwrap());
        let p = PartitionId(3);
        let writes = 3000u64;
        let writer = {
            let engine = engine.clone();
            std::thread::spawn(move || {
                for i in 1..=writes {
                    // Keys in an order unrelated to the numbers.
                    let key = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16).to_be_bytes();
                    let value = StoredValue {
                        mod_revision: i,
                        create_revision: i,
                        hlc: 0,
                        value: i.to_be_bytes().to_vec(),
                        expires_at_ms: 0,
                    };
                    let ops = vec![SmOp::Put {
                        key: key.to_vec(),
                        value,
                    }];
                    engine
                        .sm_write_many(vec![(p, SmWrite { ops, applied: None })])
                        .unwrap();
                }
            })
        };
        let mut scans = 0;
        loop {
            let done = writer.is_finished();
            let rows = engine
                .sm_scan(p, b"", None, usize::MAX, usize::MAX)
                .unwrap();
            let mut seen: Vec<u64> = rows
                .iter()
                .map(|(_, v)| u64::from_be_bytes(v.value.as_slice().try_into().unwrap()))
                .collect();
            seen.sort_unstable();
            let n = seen.len() as u64;
            assert!(
                seen.iter().copied().eq(1..=n),
                "scan {scans} saw {n} numbers with a gap: the first missing is {:?}",
                (1..=n).find(|i| seen.binary_search(i).is_err())
            );
            scans += 1;
            if done {
                assert_eq!(n, writes);
                break;
            }
        }
        writer.join().unwrap();
    }

    fn active_id(s: &JournalSyncer) -> Option<u64> {
        s.active.lock().unwrap().as_ref().map(|(id, _)| *id)
    }

    /// The syncer must fsync the journal fjall is writing to now, also after fjall
    /// rotated it (at a memtable flush once the journal passed 64 MB).
    #[test]
    fn journal_syncer_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::builder(dir.path().join("db")).open().unwrap();
        let ks = db.keyspace("k", KeyspaceCreateOptions::default).unwrap();
        let syncer = JournalSyncer::new(db.clone(), dir.path().join("db"));
        ks.insert(b"first", b"1").unwrap();
        syncer.sync().unwrap();
        let first = active_id(&syncer).expect("found the journal");

        // Incompressible values (the journal may compress).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut value = vec![0u8; 1024 * 1024];
        let mut i = 0u32;
        while syncer.scan_active().unwrap() == Some(first) {
            for b in value.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            assert!(
                i < 400,
                "fjall did not rotate its journal after {i} MiB: {:?}",
                fs::read_dir(dir.path().join("db"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect::<Vec<_>>()
            );
            ks.insert(i.to_be_bytes(), &value).unwrap();
            i += 1;
            if i.is_multiple_of(16) {
                // fjall rotates its journal during a memtable flush once the journal
                // is past 64 MB.
                ks.rotate_memtable_and_wait().unwrap();
            }
        }
        ks.insert(b"last", b"2").unwrap();
        syncer.sync().unwrap();
        let now = active_id(&syncer).unwrap();
        assert!(
            now > first,
            "syncer still syncs journal {now}, fjall rotated past {first}"
        );
        assert_eq!(Some(now), syncer.scan_active().unwrap());
    }

    /// Two rotations between syncs, the journal in between already deleted (fjall
    /// deletes sealed journals oldest first, once their data is in tables): the sync must
    /// find the active journal, not stay on the deleted one it synced last.
    #[test]
    fn the_active_journal_is_found_when_the_last_one_synced_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let touch = |id: u64| fs::write(d.join(format!("{id}.jnl")), b"").unwrap();
        assert_eq!(active_journal(d, None).unwrap(), None);
        touch(3);
        assert_eq!(active_journal(d, None).unwrap(), Some(3));
        assert_eq!(active_journal(d, Some(3)).unwrap(), Some(3));
        touch(4);
        touch(5);
        assert_eq!(
            active_journal(d, Some(3)).unwrap(),
            Some(5),
            "rotations in order"
        );
        fs::remove_file(d.join("3.jnl")).unwrap();
        fs::remove_file(d.join("4.jnl")).unwrap();
        touch(6);
        assert_eq!(
            active_journal(d, Some(3)).unwrap(),
            Some(6),
            "3 and 4 deleted since the last sync"
        );
        fs::write(d.join("7.jnl.tmp"), b"").unwrap();
        fs::write(d.join("version"), b"").unwrap();
        assert_eq!(active_journal(d, Some(4)).unwrap(), Some(6));
    }
}
