//! Raft messages on the wire, in capkv's own encoding.
//!
//! raft-rs speaks `protobuf` 2.28 types, and that crate must not parse bytes from the
//! network (RUSTSEC-2024-0437: crafted input can crash it). So a turn's messages for one
//! peer travel as one [`PeerBatch`] of capkv's own serde types (postcard-encoded), and
//! are turned into raft-rs types after decoding, with every enum checked: a malformed
//! batch is an error, never a panic.

use protobuf::ProtobufEnum;
use raft::eraftpb::{
    ConfState, Entry, EntryType, Message, MessageType, Snapshot, SnapshotMetadata,
};
use serde::{Deserialize, Serialize};

use crate::storage::GroupId;

/// A decoded batch: sender, receiver, and each message with its group.
pub type Decoded = (u64, u64, Vec<(GroupId, Message)>);

/// Every message one node sends another in one turn, for any number of groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerBatch {
    pub from: u64,
    pub to: u64,
    pub messages: Vec<(GroupId, WireMessage)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireMessage {
    pub msg_type: i32,
    pub to: u64,
    pub from: u64,
    pub term: u64,
    pub log_term: u64,
    pub index: u64,
    pub entries: Vec<WireEntry>,
    pub commit: u64,
    pub commit_term: u64,
    pub snapshot: Option<WireSnapshot>,
    pub request_snapshot: u64,
    pub reject: bool,
    pub reject_hint: u64,
    #[serde(with = "serde_bytes")]
    pub context: Vec<u8>,
    pub priority: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireEntry {
    pub entry_type: i32,
    pub term: u64,
    pub index: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub context: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireSnapshot {
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub index: u64,
    pub term: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub voters_outgoing: Vec<u64>,
    pub learners_next: Vec<u64>,
    pub auto_leave: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed peer batch: {0}")]
    Malformed(String),
    #[error("unknown raft message type {0}")]
    MessageType(i32),
    #[error("unknown raft entry type {0}")]
    EntryType(i32),
    #[error("peer batch of {got} bytes; at most {max}")]
    TooLarge { got: usize, max: usize },
}

impl From<&Entry> for WireEntry {
    fn from(e: &Entry) -> Self {
        WireEntry {
            entry_type: e.entry_type.value(),
            term: e.term,
            index: e.index,
            data: e.data.to_vec(),
            context: e.context.to_vec(),
        }
    }
}

impl WireEntry {
    pub fn into_raft(self) -> Result<Entry, DecodeError> {
        Ok(Entry {
            entry_type: EntryType::from_i32(self.entry_type)
                .ok_or(DecodeError::EntryType(self.entry_type))?,
            term: self.term,
            index: self.index,
            data: self.data.into(),
            context: self.context.into(),
            ..Default::default()
        })
    }
}

impl From<&Message> for WireMessage {
    fn from(m: &Message) -> Self {
        let snapshot = m.snapshot.as_ref().map(|s| {
            let meta = s.get_metadata();
            let conf = meta.get_conf_state();
            WireSnapshot {
                data: s.data.to_vec(),
                index: meta.index,
                term: meta.term,
                voters: conf.voters.clone(),
                learners: conf.learners.clone(),
                voters_outgoing: conf.voters_outgoing.clone(),
                learners_next: conf.learners_next.clone(),
                auto_leave: conf.auto_leave,
            }
        });
        WireMessage {
            msg_type: m.msg_type.value(),
            to: m.to,
            from: m.from,
            term: m.term,
            log_term: m.log_term,
            index: m.index,
            entries: m.entries.iter().map(WireEntry::from).collect(),
            commit: m.commit,
            commit_term: m.commit_term,
            snapshot,
            request_snapshot: m.request_snapshot,
            reject: m.reject,
            reject_hint: m.reject_hint,
            context: m.context.to_vec(),
            priority: m.priority,
        }
    }
}

impl WireMessage {
    pub fn into_raft(self) -> Result<Message, DecodeError> {
        let mut m = Message {
            msg_type: MessageType::from_i32(self.msg_type)
                .ok_or(DecodeError::MessageType(self.msg_type))?,
            to: self.to,
            from: self.from,
            term: self.term,
            log_term: self.log_term,
            index: self.index,
            commit: self.commit,
            commit_term: self.commit_term,
            request_snapshot: self.request_snapshot,
            reject: self.reject,
            reject_hint: self.reject_hint,
            context: self.context.into(),
            priority: self.priority,
            ..Default::default()
        };
        let mut entries = Vec::with_capacity(self.entries.len());
        for e in self.entries {
            entries.push(e.into_raft()?);
        }
        m.set_entries(entries.into());
        if let Some(s) = self.snapshot {
            let conf = ConfState {
                voters: s.voters,
                learners: s.learners,
                voters_outgoing: s.voters_outgoing,
                learners_next: s.learners_next,
                auto_leave: s.auto_leave,
                ..Default::default()
            };
            let mut meta = SnapshotMetadata {
                index: s.index,
                term: s.term,
                ..Default::default()
            };
            meta.set_conf_state(conf);
            let mut snap = Snapshot {
                data: s.data.into(),
                ..Default::default()
            };
            snap.set_metadata(meta);
            m.set_snapshot(snap);
        }
        Ok(m)
    }
}

impl PeerBatch {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a batch of at most `max_bytes`, checking every enum.
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Decoded, DecodeError> {
        if bytes.len() > max_bytes {
            return Err(DecodeError::TooLarge {
                got: bytes.len(),
                max: max_bytes,
            });
        }
        let batch: PeerBatch =
            postcard::from_bytes(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        let mut out = Vec::with_capacity(batch.messages.len());
        for (g, m) in batch.messages {
            out.push((g, m.into_raft()?));
        }
        Ok((batch.from, batch.to, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_message(rng: &mut rand_chacha::ChaCha8Rng) -> Message {
        let types = MessageType::values();
        let mut m = Message {
            msg_type: types[rng.random_range(0..types.len())],
            to: rng.random(),
            from: rng.random(),
            term: rng.random(),
            log_term: rng.random(),
            index: rng.random(),
            commit: rng.random(),
            commit_term: rng.random(),
            request_snapshot: rng.random(),
            reject: rng.random(),
            reject_hint: rng.random(),
            context: vec![rng.random(); rng.random_range(0..4)].into(),
            priority: rng.random(),
            ..Default::default()
        };
        let entries: Vec<Entry> = (0..rng.random_range(0..4))
            .map(|i| Entry {
                entry_type: EntryType::values()[rng.random_range(0..EntryType::values().len())],
                term: rng.random(),
                index: i,
                data: vec![rng.random(); rng.random_range(0..16)].into(),
                context: vec![].into(),
                ..Default::default()
            })
            .collect();
        m.set_entries(entries.into());
        if rng.random_bool(0.3) {
            let mut meta = SnapshotMetadata {
                index: rng.random(),
                term: rng.random(),
                ..Default::default()
            };
            meta.set_conf_state(ConfState {
                voters: vec![1, 2, 3],
                learners: vec![4],
                ..Default::default()
            });
            let mut s = Snapshot {
                data: vec![7; 5].into(),
                ..Default::default()
            };
            s.set_metadata(meta);
            m.set_snapshot(s);
        }
        m
    }

    #[test]
    fn messages_round_trip() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..500 {
            let m = random_message(&mut rng);
            let batch = PeerBatch {
                from: 1,
                to: 2,
                messages: vec![(9, WireMessage::from(&m))],
            };
            let (from, to, got) = PeerBatch::decode(&batch.encode(), 1 << 20).unwrap();
            assert_eq!((from, to), (1, 2));
            assert_eq!(got, vec![(9, m)]);
        }
    }

    #[test]
    fn garbage_and_unknown_enums_are_errors_not_panics() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for len in 0..200 {
            let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = PeerBatch::decode(&junk, 1 << 20);
        }
        let mut wm = WireMessage::from(&Message::default());
        wm.msg_type = 999;
        let bytes = PeerBatch {
            from: 1,
            to: 2,
            messages: vec![(0, wm)],
        }
        .encode();
        assert_eq!(
            PeerBatch::decode(&bytes, 1 << 20),
            Err(DecodeError::MessageType(999))
        );
        assert!(matches!(
            PeerBatch::decode(&bytes, 3),
            Err(DecodeError::TooLarge { .. })
        ));
    }
}
