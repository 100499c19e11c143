//! The conformance suite every [`StorageEngine`] implementation must pass.
//!
//! Call [`run_all`] with a function that opens the engine in a directory. Each check
//! panics with context on the first violated property.

use std::path::Path;

use capkv_types::PartitionId;

use crate::engine::{PartitionImage, RaftLogWrite, RaftWrite, SmOp, SmWrite, StorageEngine};
use crate::keys::raft_meta_tag;
use crate::value::StoredValue;

const P1: PartitionId = PartitionId(1);
const P2: PartitionId = PartitionId(2);

/// Runs every check, each in its own subdirectory of `dir`.
pub fn run_all<E: StorageEngine>(dir: &Path, open: &dyn Fn(&Path) -> E) {
    log_append_read_and_bounds(&open(&dir.join("log")));
    log_truncate_and_purge_leave_no_holes(&open(&dir.join("trunc")));
    raft_meta_is_per_partition(&open(&dir.join("meta")));
    raft_write_spans_partitions(&dir.join("raftw"), open);
    state_machine_put_get_delete_scan(&open(&dir.join("sm")));
    export_import_replaces_one_partition(&open(&dir.join("image")));
    snapshot_pages_and_staged_install(&open(&dir.join("staged")));
    synced_writes_survive_reopen(&dir.join("reopen"), open);
    group_commit_flushes(&open(&dir.join("gc")));
}

fn entries(range: std::ops::Range<u64>, tag: &str) -> Vec<(u64, Vec<u8>)> {
    range
        .map(|i| (i, format!("{tag}-{i}").into_bytes()))
        .collect()
}

fn sv(rev: u64, value: &str) -> StoredValue {
    StoredValue {
        mod_revision: rev,
        create_revision: rev,
        hlc: rev * 10,
        value: value.as_bytes().to_vec(),
        expires_at_ms: 0,
    }
}

pub fn log_append_read_and_bounds<E: StorageEngine>(e: &E) {
    assert_eq!(e.log_last(P1).unwrap(), None, "empty log has no last entry");
    e.log_append(P1, &entries(1..11, "a")).unwrap();
    e.log_append(P2, &entries(1..4, "b")).unwrap();
    assert_eq!(e.log_read(P1, 1, 11, 100).unwrap(), entries(1..11, "a"));
    assert_eq!(
        e.log_read(P1, 3, 6, 100).unwrap(),
        entries(3..6, "a"),
        "[start, end) is half-open"
    );
    assert_eq!(
        e.log_read(P1, 3, 11, 2).unwrap(),
        entries(3..5, "a"),
        "max_entries bounds the read"
    );
    assert_eq!(
        e.log_read(P1, 6, 6, 100).unwrap(),
        vec![],
        "an empty range reads nothing"
    );
    assert_eq!(e.log_last(P1).unwrap(), Some((10, b"a-10".to_vec())));
    assert_eq!(
        e.log_last(P2).unwrap(),
        Some((3, b"b-3".to_vec())),
        "partitions do not see each other's log"
    );
    assert_eq!(
        e.log_read(P2, 0, u64::MAX, 100).unwrap(),
        entries(1..4, "b")
    );
    // Appending at an existing index overwrites it.
    e.log_append(P1, &[(10, b"a-10-new".to_vec())]).unwrap();
    assert_eq!(e.log_last(P1).unwrap(), Some((10, b"a-10-new".to_vec())));
}

pub fn log_truncate_and_purge_leave_no_holes<E: StorageEngine>(e: &E) {
    e.log_append(P1, &entries(1..21, "a")).unwrap();
    e.log_append(P2, &entries(1..21, "b")).unwrap();
    e.log_truncate_from(P1, 15).unwrap();
    assert_eq!(e.log_last(P1).unwrap().map(|x| x.0), Some(14));
    e.log_purge_upto(P1, 5).unwrap();
    assert_eq!(
        e.log_read(P1, 0, u64::MAX, 100).unwrap(),
        entries(6..15, "a")
    );
    e.log_purge_upto(P1, 5).unwrap(); // idempotent
    e.log_truncate_from(P1, 100).unwrap(); // nothing to do
    assert_eq!(
        e.log_read(P1, 0, u64::MAX, 100).unwrap(),
        entries(6..15, "a")
    );
    assert_eq!(
        e.log_read(P2, 0, u64::MAX, 100).unwrap(),
        entries(1..21, "b"),
        "other partitions untouched"
    );
    e.log_purge_upto(P1, 14).unwrap();
    assert_eq!(
        e.log_last(P1).unwrap(),
        None,
        "purging everything empties the log"
    );
}

/// One [`RaftWrite`] appends to, truncates and sets metadata of several partitions; after
/// a sync it all survives a reopen; a write that overlaps its own removal is refused.
pub fn raft_write_spans_partitions<E: StorageEngine>(dir: &Path, open: &dyn Fn(&Path) -> E) {
    {
        let e = open(dir);
        e.log_append(P1, &entries(1..11, "old")).unwrap();
        let w = RaftWrite {
            groups: vec![
                RaftLogWrite {
                    partition: P1,
                    entries: entries(4..6, "new"),
                    remove: Some((6, 10)),
                    meta: vec![(raft_meta_tag::HARD_STATE, b"hs1".to_vec())],
                    install_staged: None,
                },
                RaftLogWrite {
                    partition: P2,
                    entries: entries(1..3, "b"),
                    remove: None,
                    meta: vec![(raft_meta_tag::HARD_STATE, b"hs2".to_vec())],
                    install_staged: None,
                },
            ],
        };
        e.raft_write(&w).unwrap();
        e.sync().unwrap();
        let bad = RaftWrite {
            groups: vec![RaftLogWrite {
                partition: P2,
                entries: entries(2..4, "x"),
                remove: Some((3, 9)),
                meta: vec![],
                install_staged: None,
            }],
        };
        assert!(
            e.raft_write(&bad).is_err(),
            "a write may not remove what it writes"
        );
    }
    let e = open(dir);
    let mut want = entries(1..4, "old");
    want.extend(entries(4..6, "new"));
    assert_eq!(e.log_read(P1, 0, u64::MAX, 100).unwrap(), want);
    assert_eq!(
        e.log_read(P2, 0, u64::MAX, 100).unwrap(),
        entries(1..3, "b")
    );
    assert_eq!(
        e.raft_meta_get(P1, raft_meta_tag::HARD_STATE).unwrap(),
        Some(b"hs1".to_vec())
    );
    assert_eq!(
        e.raft_meta_get(P2, raft_meta_tag::HARD_STATE).unwrap(),
        Some(b"hs2".to_vec())
    );
}

pub fn raft_meta_is_per_partition<E: StorageEngine>(e: &E) {
    assert_eq!(e.raft_meta_get(P1, raft_meta_tag::VOTE).unwrap(), None);
    e.raft_meta_put(P1, raft_meta_tag::VOTE, b"v1").unwrap();
    e.raft_meta_put(P2, raft_meta_tag::VOTE, b"v2").unwrap();
    e.raft_meta_put(P1, raft_meta_tag::VOTE, b"v1b").unwrap();
    assert_eq!(
        e.raft_meta_get(P1, raft_meta_tag::VOTE).unwrap(),
        Some(b"v1b".to_vec())
    );
    assert_eq!(
        e.raft_meta_get(P2, raft_meta_tag::VOTE).unwrap(),
        Some(b"v2".to_vec())
    );
    assert_eq!(e.raft_meta_get(P1, raft_meta_tag::COMMITTED).unwrap(), None);
}

pub fn state_machine_put_get_delete_scan<E: StorageEngine>(e: &E) {
    let mut ops = Vec::new();
    for (i, k) in ["b", "a", "c", "ab", "d"].iter().enumerate() {
        ops.push(SmOp::Put {
            key: k.as_bytes().to_vec(),
            value: sv(i as u64 + 1, k),
        });
    }
    e.sm_write(
        P1,
        SmWrite {
            ops,
            applied: Some(b"applied-5".to_vec()),
        },
    )
    .unwrap();
    e.sm_write(
        P2,
        SmWrite {
            ops: vec![SmOp::Put {
                key: b"a".to_vec(),
                value: sv(1, "other"),
            }],
            applied: None,
        },
    )
    .unwrap();
    assert_eq!(e.sm_get(P1, b"a").unwrap(), Some(sv(2, "a")));
    assert_eq!(e.sm_get(P2, b"a").unwrap(), Some(sv(1, "other")));
    // Several partitions in one write, each with its own applied state.
    e.sm_write_many(vec![
        (
            P1,
            SmWrite {
                ops: vec![SmOp::Put {
                    key: b"many".to_vec(),
                    value: sv(6, "m1"),
                }],
                applied: Some(b"applied-6".to_vec()),
            },
        ),
        (
            P2,
            SmWrite {
                ops: vec![SmOp::Put {
                    key: b"many".to_vec(),
                    value: sv(2, "m2"),
                }],
                applied: Some(b"applied-p2".to_vec()),
            },
        ),
    ])
    .unwrap();
    assert_eq!(e.sm_get(P1, b"many").unwrap(), Some(sv(6, "m1")));
    assert_eq!(e.sm_get(P2, b"many").unwrap(), Some(sv(2, "m2")));
    assert_eq!(e.sm_applied(P2).unwrap(), Some(b"applied-p2".to_vec()));
    for p in [P1, P2] {
        e.sm_write(
            p,
            SmWrite {
                ops: vec![SmOp::Delete {
                    key: b"many".to_vec(),
                }],
                applied: None,
            },
        )
        .unwrap();
    }

    assert_eq!(e.sm_get(P1, b"zz").unwrap(), None);
    assert_eq!(e.sm_applied(P1).unwrap(), Some(b"applied-6".to_vec()));
    assert_eq!(e.sm_applied(P2).unwrap(), Some(b"applied-p2".to_vec()));

    let keys = |v: Vec<(Vec<u8>, StoredValue)>| {
        v.into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(e.sm_scan(P1, b"", None, 100, usize::MAX).unwrap()),
        ["a", "ab", "b", "c", "d"]
    );
    assert_eq!(
        keys(e.sm_scan(P1, b"ab", Some(b"c"), 100, usize::MAX).unwrap()),
        ["ab", "b"],
        "[start, end)"
    );
    assert_eq!(
        keys(e.sm_scan(P1, b"", None, 2, usize::MAX).unwrap()),
        ["a", "ab"],
        "limit"
    );
    assert_eq!(
        keys(e.sm_scan(P1, b"", None, 100, 1).unwrap()),
        ["a"],
        "byte bound keeps at least one"
    );
    assert_eq!(
        keys(e.sm_scan(P2, b"", None, 100, usize::MAX).unwrap()),
        ["a"],
        "scan stays in its partition"
    );

    e.sm_write(
        P1,
        SmWrite {
            ops: vec![SmOp::Delete {
                key: b"ab".to_vec(),
            }],
            applied: None,
        },
    )
    .unwrap();
    assert_eq!(e.sm_get(P1, b"ab").unwrap(), None);
    assert_eq!(
        keys(e.sm_scan(P1, b"a", None, 100, usize::MAX).unwrap()),
        ["a", "b", "c", "d"]
    );

    e.sm_write(
        P1,
        SmWrite {
            ops: vec![SmOp::SessionPut {
                client_id: 9,
                session: b"session-9".to_vec(),
            }],
            applied: None,
        },
    )
    .unwrap();
    assert_eq!(
        e.sm_sessions_all(P1).unwrap(),
        vec![(9, b"session-9".to_vec())]
    );
    assert_eq!(e.sm_sessions_all(P2).unwrap(), vec![]);
    e.sm_write(
        P1,
        SmWrite {
            ops: vec![SmOp::SessionDelete { client_id: 9 }],
            applied: None,
        },
    )
    .unwrap();
    assert_eq!(e.sm_sessions_all(P1).unwrap(), vec![]);
}

pub fn export_import_replaces_one_partition<E: StorageEngine>(e: &E) {
    let put = |k: &str, rev| SmOp::Put {
        key: k.as_bytes().to_vec(),
        value: sv(rev, k),
    };
    let session = SmOp::SessionPut {
        client_id: 1,
        session: b"s1".to_vec(),
    };
    e.sm_write(
        P1,
        SmWrite {
            ops: vec![put("x", 1), put("y", 2), session],
            applied: Some(b"p1@2".to_vec()),
        },
    )
    .unwrap();
    e.sm_write(
        P2,
        SmWrite {
            ops: vec![put("keep", 1)],
            applied: Some(b"p2@1".to_vec()),
        },
    )
    .unwrap();
    let image = e.sm_export(P1).unwrap();
    assert_eq!(image.applied, Some(b"p1@2".to_vec()));
    assert_eq!(image.data.len(), 2);
    assert_eq!(image.sessions.len(), 1);
    let decoded = PartitionImage::decode(&image.encode().unwrap()).unwrap();
    assert_eq!(decoded, image);

    // Change P1 after the export, then import the old image: P1 is exactly the image again.
    e.sm_write(
        P1,
        SmWrite {
            ops: vec![put("z", 3), SmOp::Delete { key: b"x".to_vec() }],
            applied: Some(b"p1@3".to_vec()),
        },
    )
    .unwrap();
    e.sm_import(P1, &image).unwrap();
    assert_eq!(e.sm_export(P1).unwrap(), image);
    assert_eq!(e.sm_get(P1, b"z").unwrap(), None);
    assert_eq!(
        e.sm_get(P2, b"keep").unwrap(),
        Some(sv(1, "keep")),
        "import leaves other partitions alone"
    );
    assert_eq!(e.sm_applied(P2).unwrap(), Some(b"p2@1".to_vec()));

    // Importing an empty image empties the partition.
    e.sm_import(P1, &PartitionImage::default()).unwrap();
    assert_eq!(e.sm_scan(P1, b"", None, 10, usize::MAX).unwrap(), vec![]);
    assert_eq!(e.sm_applied(P1).unwrap(), None);
}

/// A snapshot reads the state of when it was taken, page by page; an image staged chunk by
/// chunk replaces exactly one partition's state machine when a raft write installs it, in
/// the same batch as its log change, and only at the index it was staged for.
pub fn snapshot_pages_and_staged_install<E: StorageEngine>(e: &E) {
    let put = |k: String, rev| SmOp::Put {
        key: k.into_bytes(),
        value: sv(rev, "v"),
    };
    let ops: Vec<SmOp> = (0..100)
        .map(|i| put(format!("k{i:03}"), i))
        .chain((1..=3).map(|c| SmOp::SessionPut {
            client_id: c,
            session: vec![c as u8; 10],
        }))
        .collect();
    e.sm_write(
        P1,
        SmWrite {
            ops,
            applied: Some(b"p1@100".to_vec()),
        },
    )
    .unwrap();
    e.sm_write(
        P2,
        SmWrite {
            ops: vec![put("other".into(), 1)],
            applied: Some(b"p2@1".to_vec()),
        },
    )
    .unwrap();
    let snap = e.sm_snapshot(P1).unwrap();
    // Later writes are not in the snapshot.
    e.sm_write(
        P1,
        SmWrite {
            ops: vec![
                put("k999".into(), 101),
                SmOp::Delete {
                    key: b"k000".to_vec(),
                },
            ],
            applied: Some(b"p1@101".to_vec()),
        },
    )
    .unwrap();
    assert_eq!(snap.applied().unwrap(), Some(b"p1@100".to_vec()));
    let mut data = Vec::new();
    let mut pages = 0;
    loop {
        let after = data.last().map(|(k, _): &(Vec<u8>, Vec<u8>)| k.clone());
        let page = snap.data_page(after.as_deref(), 200).unwrap();
        if page.is_empty() {
            break;
        }
        pages += 1;
        data.extend(page);
    }
    assert_eq!(data.len(), 100, "every key of the partition, none of P2's");
    assert!(pages > 5, "pages of about 200 bytes: {pages}");
    assert_eq!(data[0].0, b"k000".to_vec());
    assert!(data.windows(2).all(|w| w[0].0 < w[1].0), "in key order");
    let sessions = snap.sessions_page(None, 20).unwrap();
    assert_eq!(sessions.len(), 2, "past 20 bytes after two sessions of 18");
    let rest = snap.sessions_page(Some(sessions[1].0), 1000).unwrap();
    assert_eq!(rest, vec![(3, vec![3; 10])]);

    // Staged into the other partition, chunk by chunk; a bad value is refused.
    e.sm_stage_clear(P2).unwrap();
    assert!(e
        .sm_stage_put(P2, &[(b"bad".to_vec(), b"not a value".to_vec())], &[])
        .is_err());
    for chunk in data.chunks(30) {
        e.sm_stage_put(P2, chunk, &[]).unwrap();
    }
    e.sm_stage_put(P2, &[], &sessions).unwrap();
    e.sm_stage_put(P2, &[], &rest).unwrap();
    assert_eq!(e.sm_staged_index(P2).unwrap(), None, "not complete yet");
    e.sm_stage_finish(P2, 40, b"p2@40").unwrap();
    assert_eq!(e.sm_staged_index(P2).unwrap(), Some(40));
    // Staging changes nothing live.
    assert_eq!(e.sm_get(P2, b"k001").unwrap(), None);
    assert_eq!(e.sm_applied(P2).unwrap(), Some(b"p2@1".to_vec()));

    let install = |index| RaftWrite {
        groups: vec![RaftLogWrite {
            partition: P2,
            meta: vec![(
                raft_meta_tag::LOG_START,
                format!("start@{index}").into_bytes(),
            )],
            install_staged: Some(index),
            ..Default::default()
        }],
    };
    assert!(
        e.raft_write(&install(41)).is_err(),
        "only at the staged index"
    );
    assert_eq!(e.raft_meta_get(P2, raft_meta_tag::LOG_START).unwrap(), None);
    e.raft_write(&install(40)).unwrap();
    assert_eq!(
        e.raft_meta_get(P2, raft_meta_tag::LOG_START).unwrap(),
        Some(b"start@40".to_vec())
    );
    assert_eq!(e.sm_applied(P2).unwrap(), Some(b"p2@40".to_vec()));
    assert_eq!(
        e.sm_get(P2, b"other").unwrap(),
        None,
        "the old state is gone"
    );
    let scanned = e.sm_scan(P2, b"", None, 1000, usize::MAX).unwrap();
    assert_eq!(scanned.len(), 100);
    assert_eq!(e.sm_sessions_all(P2).unwrap().len(), 3);
    assert_eq!(
        e.sm_staged_index(P2).unwrap(),
        None,
        "the staging is consumed"
    );
    // P1 is untouched.
    assert_eq!(e.sm_applied(P1).unwrap(), Some(b"p1@101".to_vec()));
    assert_eq!(e.sm_get(P1, b"k000").unwrap(), None);
}

pub fn synced_writes_survive_reopen<E: StorageEngine>(dir: &Path, open: &dyn Fn(&Path) -> E) {
    {
        let e = open(dir);
        e.log_append(P1, &entries(1..101, "a")).unwrap();
        e.raft_meta_put(P1, raft_meta_tag::VOTE, b"vote").unwrap();
        e.sm_write(
            P1,
            SmWrite {
                ops: vec![SmOp::Put {
                    key: b"k".to_vec(),
                    value: sv(5, "v"),
                }],
                applied: Some(b"5".to_vec()),
            },
        )
        .unwrap();
        e.node_meta_put("cluster", b"c1").unwrap();
        e.sync().unwrap();
    }
    let e = open(dir);
    assert_eq!(
        e.log_read(P1, 0, u64::MAX, 1000).unwrap(),
        entries(1..101, "a")
    );
    assert_eq!(
        e.raft_meta_get(P1, raft_meta_tag::VOTE).unwrap(),
        Some(b"vote".to_vec())
    );
    assert_eq!(e.sm_get(P1, b"k").unwrap(), Some(sv(5, "v")));
    assert_eq!(e.sm_applied(P1).unwrap(), Some(b"5".to_vec()));
    assert_eq!(e.node_meta_get("cluster").unwrap(), Some(b"c1".to_vec()));
}

pub fn group_commit_flushes<E: StorageEngine>(e: &E) {
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..50u64 {
        e.log_append(P1, &[(i + 1, vec![1])]).unwrap();
        let tx = tx.clone();
        e.group_commit()
            .request(Box::new(move |r| tx.send(r).unwrap()));
    }
    for _ in 0..50 {
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .unwrap()
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fjall_engine::{FjallEngine, FjallOptions};

    #[test]
    fn fjall_engine_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        run_all(dir.path(), &|p: &Path| {
            FjallEngine::open(p, FjallOptions::default()).unwrap()
        });
    }
}
