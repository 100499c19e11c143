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
        self.limits.check_key(&key)?;
        self.limits.check_value(&value)?;
        check_condition(condition)?;
        let p = self.map.partition_for_key(&key);
        self.propose(
            p,
            Op::Put {
                key,
                value,
                condition,
            },
            idempotency,
        )
        .await
    }

    pub async fn delete(
        &self,
        key: Vec<u8>,
        condition: Condition,
        idempotency: Option<Idempotency>,
    ) -> Result<(Served, CommandResponse), KvError> {
        self.limits.check_key(&key)?;
        check_condition(condition)?;
        let p = self.map.partition_for_key(&key);
        self.propose(p, Op::Delete { key, condition }, idempotency)
            .await
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

/// The error for a write the state machine refused (nothing was applied).
fn rejection_error(p: PartitionId, why: Rejection, id: Option<Idempotency>) -> KvError {
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
