//! The write path: validation, proposing a command to the partition's Raft group, and
//! the answer's errors.

use super::*;

impl KvCore {
    pub async fn put(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        condition: Condition,
        idempotency: Option<Idempotency>,
    ) -> Result<(Served, CommandResponse), KvError> {
        let op = Op::Put {
            key,
            value,
            condition,
        };
        self.execute(op, idempotency).await
    }

    pub async fn delete(
        &self,
        key: Vec<u8>,
        condition: Condition,
        idempotency: Option<Idempotency>,
    ) -> Result<(Served, CommandResponse), KvError> {
        self.execute(Op::Delete { key, condition }, idempotency)
            .await
    }

    /// Validates a write and the partition all its keys live in.
    pub fn check_op(&self, op: &Op) -> Result<PartitionId, KvError> {
        let keys = op.keys();
        let Some(first) = keys.first() else {
            return Err(KvError::InvalidArgument("a write names no key".into()));
        };
        for k in &keys {
            self.limits.check_key(k)?;
        }
        self.check_count("the keys of one command", keys.len())?;
        self.check_parts(op, true)?;
        // The whole command must fit a log entry (4 MiB) with room to spare.
        let bytes = op_bytes(op) + keys.iter().map(|k| k.len()).sum::<usize>();
        let max = self.limits.value_bytes_max.max(1 << 20) + (1 << 20);
        if bytes > max {
            return Err(KvError::too_large(
                "the keys and values of one command",
                bytes,
                max,
            ));
        }
        let p = self.map.partition_for_key(first);
        if keys[1..].iter().any(|k| self.map.partition_for_key(k) != p) {
            return Err(KvError::CrossPartition(
                "the keys of one command must share a partition: give them a common hash \
                 tag, e.g. {user:1}:name and {user:1}:mail"
                    .into(),
            ));
        }
        Ok(p)
    }

    /// Validates what an operation carries (`top`: not inside a transaction).
    fn check_parts(&self, op: &Op, top: bool) -> Result<(), KvError> {
        // The whole command must fit an entry (4 MiB) with room to spare.
        let total_max = self.limits.value_bytes_max.max(1 << 20);
        match op {
            Op::Put {
                value, condition, ..
            } => {
                self.limits.check_value(value)?;
                check_condition(*condition)?;
            }
            Op::Delete { condition, .. } => check_condition(*condition)?,
            Op::Update { update, .. } => match update {
                Update::Swap {
                    value, condition, ..
                } => {
                    self.limits.check_value(value)?;
                    check_condition(*condition)?;
                }
                Update::Expire { .. } | Update::GetEx { .. } => {}
                Update::Append(b) | Update::SetRange { bytes: b, .. } => {
                    self.limits.check_value(b)?
                }
                Update::IncrByFloat(s) if s.len() > 64 => {
                    return Err(KvError::InvalidArgument(
                        "value is not a valid float".into(),
                    ))
                }
                Update::Take | Update::IncrBy(_) | Update::IncrByFloat(_) => {}
            },
            Op::PutMany { kvs, .. } => {
                self.check_count("the number of keys", kvs.len())?;
                for (_, v) in kvs {
                    self.limits.check_value(v)?;
                }
            }
            Op::Get { .. } if top => {
                return Err(KvError::InvalidArgument(
                    "a read is not a write; it goes only inside a transaction".into(),
                ))
            }
            Op::Get { .. } => {}
            Op::Reap { .. } | Op::Rename { .. } => {}
            Op::Txn { .. } if !top => {
                return Err(KvError::InvalidArgument("transactions do not nest".into()))
            }
            Op::Txn { guards, steps } => {
                self.check_count("a transaction's steps", steps.len() + guards.len())?;
                for step in steps {
                    self.check_parts(step, false)?;
                }
            }
        }
        let total = op_bytes(op);
        if total > total_max {
            return Err(KvError::too_large(
                "the values of one command",
                total,
                total_max,
            ));
        }
        Ok(())
    }

    /// One turn of the leader's removal of expired keys in `p`: looks at up to
    /// `REAP_SCAN_MAX` keys from `from`, and proposes one `Op::Reap` for the expired ones
    /// (at most `REAP_KEYS_MAX`). `None` unless this node leads `p` (nothing was looked at).
    pub async fn reap_expired(
        &self,
        p: PartitionId,
        from: &[u8],
    ) -> Result<Option<ReapTurn>, KvError> {
        if !self.role(p).leader {
            return Ok(None);
        }
        let rows = self
            .engine
            .sm_scan(p, from, None, REAP_SCAN_MAX, REAP_BYTES_MAX)
            .map_err(|e| KvError::Internal(e.to_string()))?;
        let bytes: usize = rows.iter().map(|(k, v)| k.len() + v.value.len()).sum();
        let next = (rows.len() == REAP_SCAN_MAX || bytes >= REAP_BYTES_MAX)
            .then(|| rows.last().map(|(k, _)| [k.as_slice(), &[0]].concat()))
            .flatten();
        let now = self.hlc.now().physical_ms();
        let keys: Vec<(Vec<u8>, u64)> = rows
            .into_iter()
            .filter(|(_, v)| v.expired_at(now))
            .take(REAP_KEYS_MAX)
            .map(|(k, v)| (k, v.mod_revision))
            .collect();
        let mut turn = ReapTurn { next, reaped: 0 };
        if keys.is_empty() {
            return Ok(Some(turn));
        }
        let (_, r) = self.propose(p, Op::Reap { keys }, None).await?;
        self.metrics.keys_expired.inc_by(r.current_revision);
        turn.reaped = r.current_revision;
        Ok(Some(turn))
    }

    /// The keys of `p` as this node's replica last wrote them (`None`: not hosted here).
    pub fn key_counts(&self, p: PartitionId) -> Option<capkv_replication::KeyCounts> {
        self.replica(p).ok().map(|r| r.applied.counts())
    }

    fn check_count(&self, what: &str, n: usize) -> Result<(), KvError> {
        if n > self.limits.batch_keys_max {
            return Err(KvError::too_large(what, n, self.limits.batch_keys_max));
        }
        Ok(())
    }

    /// Proposes a write to its partition's group here (this node must lead it) and waits
    /// for its answer. Every `Op::Update` is stamped with this node's value limit.
    pub async fn execute(
        &self,
        mut op: Op,
        idempotency: Option<Idempotency>,
    ) -> Result<(Served, CommandResponse), KvError> {
        let p = self.check_op(&op)?;
        stamp_value_limit(&mut op, self.limits.value_bytes_max as u64);
        self.propose(p, op, idempotency).await
    }

    async fn propose(
        &self,
        p: PartitionId,
        op: Op,
        idempotency: Option<Idempotency>,
    ) -> Result<(Served, CommandResponse), KvError> {
        let replica = self.replica(p)?;
        let cmd = Command {
            hlc: self.hlc.now().0,
            idempotency: idempotency.filter(|i| i.client_id != 0),
            op,
        };
        let ambiguous = || {
            KvError::Ambiguous(format!(
                "partition {p}: the write was proposed but not committed within {} ms; retry with the same \
                 (client_id, sequence) to learn its outcome",
                self.write_timeout.as_millis()
            ))
        };
        let result =
            tokio::time::timeout(self.write_timeout, self.raft_engine.write(p, &cmd)).await;
        match result {
            Err(_elapsed) => Err(ambiguous()),
            Ok(Ok(resp)) => match resp.rejected {
                None => Ok((self.served(replica, Bound::default()), resp)),
                Some(why) => Err(rejection_error(p, why, idempotency)),
            },
            Ok(Err(e)) => Err(self.engine_error(p, e)),
        }
    }
}

/// Keys one turn of the expired-key removal looks at, per partition.
pub const REAP_SCAN_MAX: usize = 1000;

/// What one turn of [`KvCore::reap_expired`] did.
#[derive(Debug)]
pub struct ReapTurn {
    /// Where the next turn starts; `None`: the walk reached the partition's end.
    pub next: Option<Vec<u8>>,
    /// Keys deleted.
    pub reaped: u64,
}
/// Bytes of keys and values one turn reads at most, per partition.
pub const REAP_BYTES_MAX: usize = 4 << 20;
/// Keys one turn deletes at most, per partition (one replicated command).
pub const REAP_KEYS_MAX: usize = 256;

/// Stamps this node's value limit into every `Update` of `op`.
fn stamp_value_limit(op: &mut Op, limit: u64) {
    match op {
        Op::Update {
            value_bytes_max, ..
        } => *value_bytes_max = limit,
        Op::Txn { steps, .. } => steps.iter_mut().for_each(|s| stamp_value_limit(s, limit)),
        _ => {}
    }
}

/// The bytes of values an operation carries (its keys are checked one by one).
fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Put { value, .. } => value.len(),
        Op::Update { update, .. } => match update {
            Update::Swap { value, .. } => value.len(),
            Update::Append(b) | Update::SetRange { bytes: b, .. } => b.len(),
            _ => 0,
        },
        Op::PutMany { kvs, .. } => kvs.iter().map(|(_, v)| v.len()).sum(),
        Op::Txn { steps, .. } => steps.iter().map(op_bytes).sum(),
        Op::Delete { .. } | Op::Get { .. } | Op::Reap { .. } | Op::Rename { .. } => 0,
    }
}

/// The error for a write the state machine refused (nothing was applied).
pub fn rejection_error(p: PartitionId, why: Rejection, id: Option<Idempotency>) -> KvError {
    let (client, seq) = id.map_or((0, 0), |i| (i.client_id, i.sequence));
    match why {
        Rejection::SessionExpired => KvError::SessionExpired(format!(
            "partition {p} does not know client session {client:#x}, which started over a \
             session TTL ago; the write was not applied. Send it again in a new session."
        )),
        Rejection::StaleSequence => KvError::InvalidArgument(format!(
            "partition {p}: client {client:#x} already had the answer to sequence {seq} \
             (a delayed duplicate); it was not applied again"
        )),
        Rejection::TooManyPending => KvError::Unavailable(format!(
            "partition {p}: client {client:#x} has too many unanswered writes here; not applied"
        )),
        Rejection::BadSequence => KvError::InvalidArgument(format!(
            "client {client:#x}: first_incomplete is above the write's own sequence {seq}"
        )),
        Rejection::BadSession => KvError::InvalidArgument(format!(
            "partition {p}: client session {client:#x} has a start time far ahead of this \
             partition's clock, or another than the one it started with; not applied"
        )),
        // Redis's own words (the RESP front end passes them on).
        Rejection::NotAnInteger => {
            KvError::InvalidArgument("value is not an integer or out of range".into())
        }
        Rejection::NotAFloat => KvError::InvalidArgument("value is not a valid float".into()),
        Rejection::Overflow => {
            KvError::InvalidArgument("increment or decrement would overflow".into())
        }
        Rejection::NotFinite => {
            KvError::InvalidArgument("increment would produce NaN or Infinity".into())
        }
        Rejection::NoSuchKey => KvError::InvalidArgument("no such key".into()),
        Rejection::ValueTooLarge => {
            KvError::TooLarge("the result would be larger than the value limit".into())
        }
        Rejection::AnswersTooLarge => KvError::TooLarge(format!(
            "a transaction's commands answer at most {} MiB in all; this one would pass it \
             and did not run",
            capkv_replication::TXN_ANSWER_BYTES_MAX >> 20
        )),
    }
}

fn check_condition(c: Condition) -> Result<(), KvError> {
    if c == Condition::IfRevision(0) {
        return Err(KvError::InvalidArgument(
            "if_revision must be a revision (>= 1); use if_absent for 'not present'".into(),
        ));
    }
    Ok(())
}
