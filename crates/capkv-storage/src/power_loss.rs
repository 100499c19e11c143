//! Power-loss emulation, for tests only (a node does this only with
//! `--unsafe-fault-injection`).
//!
//! SIGKILL loses nothing the process handed to the kernel: the page cache survives it
//! (it loses only what fjall still buffered in the process, which the next group commit
//! would have written out). A power cut also loses every write that no fsync covered. To emulate one, a node records
//! after each fsync of the active journal how many bytes of it that fsync covered
//! ([`SyncMarks`]); after the node is killed, a start with
//! `--unsafe-lose-unsynced-writes` first zeroes the journal beyond that mark
//! ([`drop_unsynced_writes`]), as if those pages had never reached the disk, then opens
//! the engine, which recovers the journal up to the first zeroed byte. A node that
//! acknowledges only what an fsync covered loses nothing it acknowledged this way; the
//! planted bug `ack-before-fsync` does.
//!
//! The mark is how far fjall's own descriptor of the journal had written before the
//! fsync (its file position, read from `/proc/self/fdinfo`, Linux only): every byte below
//! was written before the fsync began, so the fsync covered it. The journal file itself
//! is preallocated, so its length says nothing.

use std::collections::HashMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MARKS_FILE: &str = "fault-synced-journal";

/// Records, after each fsync, how much of the active journal is durable.
pub struct SyncMarks {
    marks: PathBuf,
    /// Journal id -> fjall's descriptor of it (the one opened for writing).
    writer_fds: Mutex<HashMap<u64, i32>>,
}

impl SyncMarks {
    /// `data_dir` is the engine's directory (the journals are in `data_dir/db`).
    pub fn new(data_dir: &Path) -> Self {
        SyncMarks {
            marks: data_dir.join(MARKS_FILE),
            writer_fds: Mutex::new(HashMap::new()),
        }
    }

    /// Bytes fjall has written to journal `id` (at `path`) so far; `None` if unknown.
    /// `own` is the syncer's own (read-only) descriptor of it, which is skipped.
    pub fn written(&self, id: u64, path: &Path, own: &fs::File) -> Option<u64> {
        let mut fds = self.writer_fds.lock().unwrap_or_else(|e| e.into_inner());
        let fd = match fds.get(&id) {
            Some(fd) => *fd,
            None => {
                // Not found is not remembered: the writer may open it a moment later.
                let fd = writer_fd(path, own.as_raw_fd())?;
                fds.insert(id, fd);
                fd
            }
        };
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("pos:"))
            .and_then(|p| p.trim().parse().ok())
    }

    /// Notes that journal `id` is durable up to `bytes`.
    pub fn record(&self, id: u64, bytes: u64) {
        // Written aside and renamed over: a kill mid-write leaves the previous mark, never
        // none.
        let tmp = self.marks.with_extension("tmp");
        if fs::write(&tmp, format!("{id} {bytes}\n")).is_ok() {
            let _ = fs::rename(&tmp, &self.marks);
        }
    }
}

/// The descriptor of this process open for writing on `path` (not `skip`).
fn writer_fd(path: &Path, skip: i32) -> Option<i32> {
    let target = fs::canonicalize(path).ok()?;
    for entry in fs::read_dir("/proc/self/fd").ok()? {
        let entry = entry.ok()?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if fd == skip || fs::read_link(entry.path()).ok().as_deref() != Some(target.as_path()) {
            continue;
        }
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())?;
        // O_ACCMODE: 0 = read only.
        if flags & 0o3 != 0 {
            return Some(fd);
        }
    }
    None
}

/// Zeroes what the last recorded fsync did not cover in the engine under `data_dir`, as a
/// power cut would have lost it. Returns what was done, for the log.
pub fn drop_unsynced_writes(data_dir: &Path) -> std::io::Result<String> {
    let marks = fs::read_to_string(data_dir.join(MARKS_FILE)).unwrap_or_default();
    let mut words = marks.split_whitespace().map(|w| w.parse::<u64>());
    let (Some(Ok(id)), Some(Ok(durable))) = (words.next(), words.next()) else {
        return Ok("no fsync recorded; nothing dropped".into());
    };
    let journals = data_dir.join("db");
    let path = journals.join(format!("{id}.jnl"));
    if journals.join(format!("{}.jnl", id + 1)).exists() {
        return Ok(format!(
            "journal {id} was sealed after the last recorded fsync (fjall fsyncs on rotation); \
             nothing dropped"
        ));
    }
    let mut file = fs::OpenOptions::new().write(true).open(&path)?;
    let len = file.metadata()?.len();
    if durable >= len {
        return Ok(format!("journal {id}: nothing beyond {durable} bytes"));
    }
    file.seek(SeekFrom::Start(durable))?;
    let zeros = vec![0u8; 1 << 16];
    let mut left = len - durable;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(format!(
        "journal {id}: zeroed bytes {durable}..{len}, which no fsync covered"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn marks_read_the_writers_position_and_dropping_zeroes_beyond_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("db")).unwrap();
        let path = dir.path().join("db").join("3.jnl");
        let mut writer = fs::File::create(&path).unwrap();
        writer.set_len(4096).unwrap();
        writer.write_all(b"0123456789").unwrap();
        let own = fs::File::open(&path).unwrap();
        let marks = SyncMarks::new(dir.path());
        let written = marks
            .written(3, &path, &own)
            .expect("position of the writer");
        assert_eq!(written, 10);
        marks.record(3, written);
        writer.write_all(b"lost").unwrap();
        let said = drop_unsynced_writes(dir.path()).unwrap();
        assert!(said.contains("zeroed bytes 10..4096"), "{said}");
        let mut bytes = Vec::new();
        fs::File::open(&path)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        assert_eq!(&bytes[..10], b"0123456789");
        assert!(bytes[10..].iter().all(|b| *b == 0));
        // A rotation since the mark: the sealed journal is durable, leave it.
        fs::File::create(dir.path().join("db").join("4.jnl")).unwrap();
        assert!(drop_unsynced_writes(dir.path()).unwrap().contains("sealed"));
    }
}
