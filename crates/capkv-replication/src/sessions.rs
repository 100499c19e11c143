//! Client sessions of one partition: the table that makes retried writes apply at most
//! once (Raft dissertation, section 6.3), kept in the replicated state machine.
//!
//! A client has a session: a random `client_id`, the cluster HLC time it started at, and
//! sequence numbers for its writes. With each write it sends `first_incomplete`, the lowest
//! sequence it has not yet had an answer for. Per partition, per client, the table keeps
//! the answer of every write at or above the highest `first_incomplete` seen
//! (`acked_below`); answers below are dropped, since the client already has them.
//!
//! A request is then one of:
//! - new: applied, its answer stored;
//! - a retry whose answer is stored: answered from the table, not applied again;
//! - below `acked_below`: a duplicate the client no longer waits for (delayed in the
//!   network): refused (`StaleSequence`), never applied again;
//! - from a session the table does not hold although it started more than a TTL ago: the
//!   session may have expired here, and the table cannot tell a retry from a new write:
//!   refused (`SessionExpired`), never applied. Sound because a session expires only after
//!   a TTL of idleness counted from no earlier than its start (`record` keeps
//!   `last_active_ms >= started_ms`), and a start more than a TTL ahead of the log's time
//!   is refused (`BadSession`), as is a request whose start differs from the stored one. A client renews its session and resends
//!   only if no earlier attempt may have applied the write; otherwise it reports
//!   `Ambiguous`.
//!
//! Sessions idle for a TTL expire. Every decision depends only on the log (the entries'
//! HLC stamps and the requests), so every replica keeps the same table.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::types::{CommandResponse, Idempotency, Rejection};

/// Unanswered writes a session may have in one partition; more are refused.
pub const SESSION_PENDING_MAX: usize = 1024;

/// One client's state in one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Cluster HLC time (ms) the client's session started at.
    pub started_ms: u64,
    /// HLC time (ms) of the last entry that wrote for this session.
    pub last_active_ms: u64,
    /// Every sequence below this has been answered to the client.
    pub acked_below: u64,
    /// Answers to writes at or above `acked_below`.
    pub responses: BTreeMap<u64, CommandResponse>,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Apply it, then `record` the answer.
    Apply,
    /// Answer with this stored response; do not apply.
    Answered(CommandResponse),
    /// Refuse it; nothing is applied.
    Refused(Rejection),
}

/// Changes to persist (the session of a client, or its removal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    Put(u64, Session),
    Delete(u64),
}

#[derive(Debug, Default)]
pub struct Sessions {
    ttl_ms: u64,
    by_client: HashMap<u64, Session>,
    /// (last_active_ms, client_id), for expiry in time order.
    by_activity: BTreeSet<(u64, u64)>,
}

impl Sessions {
    pub fn new(ttl_ms: u64) -> Self {
        Sessions {
            ttl_ms: ttl_ms.max(1),
            ..Default::default()
        }
    }

    pub fn load(ttl_ms: u64, rows: impl IntoIterator<Item = (u64, Session)>) -> Self {
        let mut s = Sessions::new(ttl_ms);
        for (client, session) in rows {
            s.by_activity.insert((session.last_active_ms, client));
            s.by_client.insert(client, session);
        }
        s
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    pub fn get(&self, client: u64) -> Option<&Session> {
        self.by_client.get(&client)
    }

    /// Drops sessions idle for over a TTL at log time `now_ms`.
    pub fn expire(&mut self, now_ms: u64, changes: &mut Vec<SessionChange>) {
        while let Some(&(active, client)) = self.by_activity.first() {
            if active.saturating_add(self.ttl_ms) >= now_ms {
                break;
            }
            self.by_activity.pop_first();
            self.by_client.remove(&client);
            changes.push(SessionChange::Delete(client));
        }
    }

    /// Decides what to do with `id`'s request at log time `now_ms` (after `expire`).
    pub fn admit(&self, id: &Idempotency, now_ms: u64) -> Admission {
        if id.first_incomplete > id.sequence {
            return Admission::Refused(Rejection::BadSequence);
        }
        match self.by_client.get(&id.client_id) {
            None => {
                if id.session_started_ms.saturating_add(self.ttl_ms) < now_ms {
                    Admission::Refused(Rejection::SessionExpired)
                } else if id.session_started_ms > now_ms.saturating_add(self.ttl_ms) {
                    // A start stamped by a clock far ahead of this log's: such a session
                    // would look new for too long after it expired here.
                    Admission::Refused(Rejection::BadSession)
                } else {
                    Admission::Apply
                }
            }
            Some(s) => {
                if s.started_ms != id.session_started_ms {
                    return Admission::Refused(Rejection::BadSession);
                }
                if id.sequence < s.acked_below {
                    return Admission::Refused(Rejection::StaleSequence);
                }
                if let Some(r) = s.responses.get(&id.sequence) {
                    return Admission::Answered(CommandResponse {
                        deduplicated: true,
                        ..r.clone()
                    });
                }
                let pending = s
                    .responses
                    .range(id.first_incomplete.max(s.acked_below)..)
                    .count();
                if pending >= SESSION_PENDING_MAX {
                    return Admission::Refused(Rejection::TooManyPending);
                }
                Admission::Apply
            }
        }
    }

    /// Records the answer of an applied request (after `admit` said `Apply`).
    pub fn record(
        &mut self,
        id: &Idempotency,
        now_ms: u64,
        response: CommandResponse,
        changes: &mut Vec<SessionChange>,
    ) {
        let s = self
            .by_client
            .entry(id.client_id)
            .or_insert_with(|| Session {
                started_ms: id.session_started_ms,
                last_active_ms: now_ms,
                acked_below: 0,
                responses: BTreeMap::new(),
            });
        self.by_activity.remove(&(s.last_active_ms, id.client_id));
        // Never before the session's start: a session expires only once it has been idle
        // for a TTL after its start too, so an unknown session older than a TTL is
        // certainly not one that is merely new here (see `admit`).
        s.last_active_ms = s.last_active_ms.max(now_ms).max(id.session_started_ms);
        if id.first_incomplete > s.acked_below {
            s.acked_below = id.first_incomplete;
            s.responses = s.responses.split_off(&s.acked_below);
        }
        s.responses.insert(id.sequence, response);
        self.by_activity.insert((s.last_active_ms, id.client_id));
        changes.push(SessionChange::Put(id.client_id, s.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 60_000;

    fn id(client: u64, started: u64, seq: u64, first_incomplete: u64) -> Idempotency {
        Idempotency {
            client_id: client,
            sequence: seq,
            session_started_ms: started,
            first_incomplete,
        }
    }

    fn resp(rev: u64) -> CommandResponse {
        CommandResponse {
            revision: rev,
            succeeded: true,
            ..Default::default()
        }
    }

    /// Applies `i` at `now` if admitted; returns the admission.
    fn run(t: &mut Sessions, i: Idempotency, now: u64, rev: u64) -> Admission {
        let mut ch = Vec::new();
        t.expire(now, &mut ch);
        let a = t.admit(&i, now);
        if a == Admission::Apply {
            t.record(&i, now, resp(rev), &mut ch);
        }
        a
    }

    #[test]
    fn a_retry_is_answered_from_the_table_and_not_applied_again() {
        let mut t = Sessions::new(TTL);
        assert_eq!(run(&mut t, id(1, 1000, 1, 1), 1000, 10), Admission::Apply);
        let again = run(&mut t, id(1, 1000, 1, 1), 2000, 11);
        assert_eq!(
            again,
            Admission::Answered(CommandResponse {
                deduplicated: true,
                ..resp(10)
            })
        );
    }

    /// The hole in the FIFO table: a retry that arrived after 10,000 other writes was
    /// applied again. Now other clients' writes never push a session's answers out.
    #[test]
    fn other_clients_writes_never_evict_an_answer() {
        let mut t = Sessions::new(TTL);
        assert_eq!(run(&mut t, id(1, 1000, 1, 1), 1000, 1), Admission::Apply);
        for c in 2..20_000u64 {
            assert_eq!(
                run(&mut t, id(c, 1000, 1, 1), 1000 + c / 10, c),
                Admission::Apply
            );
        }
        assert!(
            matches!(run(&mut t, id(1, 1000, 1, 1), 3000, 0), Admission::Answered(r) if r.revision == 1)
        );
    }

    #[test]
    fn answers_the_client_has_are_dropped_and_their_duplicates_refused() {
        let mut t = Sessions::new(TTL);
        for seq in 1..=5 {
            assert_eq!(
                run(&mut t, id(1, 1000, seq, 1), 1000, seq),
                Admission::Apply
            );
        }
        assert_eq!(t.get(1).unwrap().responses.len(), 5);
        // The client had answers for 1..=4 when it sent 6.
        assert_eq!(run(&mut t, id(1, 1000, 6, 5), 1000, 6), Admission::Apply);
        let s = t.get(1).unwrap();
        assert_eq!((s.acked_below, s.responses.len()), (5, 2));
        // A delayed duplicate of 2 is refused, never applied again.
        assert_eq!(
            run(&mut t, id(1, 1000, 2, 1), 1000, 0),
            Admission::Refused(Rejection::StaleSequence)
        );
        // 5 is still unanswered as far as the table knows: its retry is answered.
        assert!(
            matches!(run(&mut t, id(1, 1000, 5, 5), 1000, 0), Admission::Answered(r) if r.revision == 5)
        );
    }

    #[test]
    fn idle_sessions_expire_and_their_requests_are_refused_not_applied() {
        let mut t = Sessions::new(TTL);
        assert_eq!(run(&mut t, id(1, 1000, 1, 1), 1000, 1), Admission::Apply);
        // Client 2 keeps the partition's log moving past client 1's TTL.
        assert_eq!(
            run(&mut t, id(2, 61_500, 1, 1), 61_500, 2),
            Admission::Apply
        );
        assert!(t.get(1).is_none(), "client 1 idle for over a TTL");
        // Its retry of 1 cannot be told from a new write: refused, not applied.
        assert_eq!(
            run(&mut t, id(1, 1000, 1, 1), 61_600, 3),
            Admission::Refused(Rejection::SessionExpired)
        );
        assert!(t.get(1).is_none(), "a refusal creates no session");
        // A new session (started now) is welcome.
        assert_eq!(
            run(&mut t, id(3, 61_600, 1, 1), 61_600, 4),
            Admission::Apply
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_session_new_to_this_partition_is_taken_while_young() {
        let t = Sessions::new(TTL);
        // A client whose sequence is at 500 writes here first: fine while it is young.
        assert_eq!(t.admit(&id(9, 10_000, 500, 480), 20_000), Admission::Apply);
        assert_eq!(
            t.admit(&id(9, 10_000, 500, 480), 70_001),
            Admission::Refused(Rejection::SessionExpired)
        );
    }

    /// A session started by a clock far ahead: its idleness counts from its start, so a
    /// retry after the log's clock caught up is still answered from the table, and a
    /// start more than a TTL ahead of the log is refused.
    #[test]
    fn a_session_started_by_a_fast_clock_cannot_expire_early() {
        let mut t = Sessions::new(TTL);
        let ahead = 1_000 + 3_600_000;
        assert_eq!(
            t.admit(&id(1, ahead, 1, 1), 1_000),
            Admission::Refused(Rejection::BadSession)
        );
        let near = 1_000 + TTL / 2;
        assert_eq!(run(&mut t, id(1, near, 1, 1), 1_000, 10), Admission::Apply);
        assert_eq!(t.get(1).unwrap().last_active_ms, near);
        // The log's clock jumps to just past the TTL after the write: not yet expired,
        // since idleness counts from the start.
        assert!(
            matches!(run(&mut t, id(1, near, 1, 1), 1_000 + TTL + 1, 0), Admission::Answered(r) if r.revision == 10)
        );
        // A different start for the same id is refused.
        assert_eq!(
            t.admit(&id(1, near + 1, 2, 1), 1_000 + TTL + 2),
            Admission::Refused(Rejection::BadSession)
        );
    }

    #[test]
    fn a_session_has_a_bounded_number_of_unanswered_writes() {
        let mut t = Sessions::new(TTL);
        for seq in 1..=SESSION_PENDING_MAX as u64 {
            assert_eq!(run(&mut t, id(1, 0, seq, 1), 0, seq), Admission::Apply);
        }
        let over = SESSION_PENDING_MAX as u64 + 1;
        assert_eq!(
            run(&mut t, id(1, 0, over, 1), 0, 0),
            Admission::Refused(Rejection::TooManyPending)
        );
        // Once the client reports answers, it may go on.
        assert_eq!(run(&mut t, id(1, 0, over, 500), 0, over), Admission::Apply);
        assert_eq!(
            t.admit(&id(1, 0, 7, 9), 0),
            Admission::Refused(Rejection::BadSequence),
            "first_incomplete above the request's own sequence is malformed"
        );
    }

    #[test]
    fn loading_rebuilds_the_same_table() {
        let mut t = Sessions::new(TTL);
        let mut changes = Vec::new();
        for c in 1..50u64 {
            t.expire(c * 10, &mut changes);
            t.record(&id(c, c * 10, 1, 1), c * 10, resp(c), &mut changes);
        }
        let rows: Vec<(u64, Session)> = t.by_client.iter().map(|(c, s)| (*c, s.clone())).collect();
        let loaded = Sessions::load(TTL, rows);
        assert_eq!(loaded.by_client, t.by_client);
        assert_eq!(loaded.by_activity, t.by_activity);
    }
}
