//! A writer's session: what makes its writes idempotent (see the server's `sessions.rs`).
//! Each write takes the next sequence of the session and keeps it while in flight; every
//! attempt of that write carries the same pair, and says which answers the writer already
//! has (`first_incomplete`: everything below its lowest write in flight). A session a
//! partition no longer knows is renewed (a new id); writes still in flight under the old
//! one keep reporting it. Shared by [`crate::Client`] and the server's request router, which
//! writes for the clients of the protocols that carry no session of their own.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use capkv_proto::kv as pb;

#[derive(Debug)]
struct Session {
    client_id: u64,
    /// Cluster HLC time (ms) the session started at.
    started_ms: u64,
    next_sequence: u64,
    /// Sequences of this session still waiting for their outcome.
    in_flight: BTreeSet<u64>,
}

impl Session {
    fn new(client_id: u64, started_ms: u64) -> Self {
        Session {
            client_id,
            started_ms,
            next_sequence: 1,
            in_flight: BTreeSet::new(),
        }
    }
}

/// One write's place in a session.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    pub client_id: u64,
    pub sequence: u64,
    pub started_ms: u64,
    /// False for keys given by the caller (`put_idempotent`): the session does not track
    /// them, and they claim no answers (`first_incomplete` 0).
    pub tracked: bool,
}

#[derive(Debug)]
pub struct WriteSession {
    current: Mutex<Session>,
    /// Writes of sessions renewed since, still in flight (their retries keep reporting
    /// the lowest of them as `first_incomplete`).
    old: Mutex<HashMap<u64, BTreeSet<u64>>>,
}

impl WriteSession {
    /// A session `client_id` (never 0) started at cluster time `started_ms`.
    pub fn new(client_id: u64, started_ms: u64) -> Self {
        WriteSession {
            current: Mutex::new(Session::new(client_id, started_ms)),
            old: Mutex::new(HashMap::new()),
        }
    }

    fn current(&self) -> MutexGuard<'_, Session> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn old(&self) -> MutexGuard<'_, HashMap<u64, BTreeSet<u64>>> {
        self.old.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn client_id(&self) -> u64 {
        self.current().client_id
    }

    /// Sets the start time of a session no write used yet (the cluster's time, once known).
    pub fn set_started(&self, started_ms: u64) {
        let mut s = self.current();
        if s.next_sequence == 1 {
            s.started_ms = started_ms;
        }
    }

    /// Takes the next sequence for a write, which is in flight until [`WriteSession::end`].
    pub fn begin(&self) -> Ticket {
        let mut s = self.current();
        let sequence = s.next_sequence;
        s.next_sequence += 1;
        s.in_flight.insert(sequence);
        Ticket {
            client_id: s.client_id,
            sequence,
            started_ms: s.started_ms,
            tracked: true,
        }
    }

    /// The write of `t` has its outcome.
    pub fn end(&self, t: Ticket) {
        if !t.tracked {
            return;
        }
        {
            let mut s = self.current();
            if s.client_id == t.client_id {
                s.in_flight.remove(&t.sequence);
                return;
            }
        }
        let mut old = self.old();
        if let Some(set) = old.get_mut(&t.client_id) {
            set.remove(&t.sequence);
            if set.is_empty() {
                old.remove(&t.client_id);
            }
        }
    }

    /// The idempotency pair to send now for `t`, with the lowest sequence of its session
    /// still waiting for its answer (everything below has its answer).
    pub fn pair(&self, t: &Ticket) -> pb::Idempotency {
        let first_incomplete = if t.tracked {
            let current = {
                let s = self.current();
                (s.client_id == t.client_id).then(|| s.in_flight.first().copied())
            };
            let lowest = match current {
                Some(first) => first,
                None => self
                    .old()
                    .get(&t.client_id)
                    .and_then(|set| set.first().copied()),
            };
            lowest.map_or(t.sequence, |first| first.min(t.sequence))
        } else {
            0
        };
        pb::Idempotency {
            client_id: t.client_id,
            sequence: t.sequence,
            session_started_ms: t.started_ms,
            first_incomplete,
        }
    }

    /// Starts a new session at cluster time `started_ms` if `expired` is still the current
    /// one (a partition no longer knew it).
    pub fn renew(&self, expired: u64, started_ms: u64) {
        let mut s = self.current();
        if s.client_id == expired {
            let old =
                std::mem::replace(&mut *s, Session::new(rand::random::<u64>() | 1, started_ms));
            drop(s);
            if !old.in_flight.is_empty() {
                self.old().insert(old.client_id, old.in_flight);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_incomplete_is_the_lowest_write_in_flight_across_renewals() {
        let s = WriteSession::new(9, 100);
        let a = s.begin();
        let b = s.begin();
        assert_eq!((a.sequence, b.sequence), (1, 2));
        assert_eq!(s.pair(&b).first_incomplete, 1, "write 1 has no answer yet");
        s.end(a);
        assert_eq!(s.pair(&b).first_incomplete, 2);
        // Renewed while b is in flight: b keeps its session and its own floor.
        s.renew(9, 200);
        assert_ne!(s.client_id(), 9);
        let c = s.begin();
        assert_eq!((c.sequence, c.started_ms), (1, 200));
        assert_eq!(s.pair(&b).client_id, 9);
        assert_eq!(s.pair(&b).first_incomplete, 2);
        s.end(b);
        // Renewing an id that is no longer current changes nothing.
        let now = s.client_id();
        s.renew(9, 300);
        assert_eq!(s.client_id(), now);
        let untracked = Ticket {
            client_id: 5,
            sequence: 7,
            started_ms: 1,
            tracked: false,
        };
        assert_eq!(s.pair(&untracked).first_incomplete, 0);
    }
}
