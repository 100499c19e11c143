//! What must happen before a read is served on this node: a pure function of the level
//! asked for, the session's position and the local replica's state. No IO, no clock: the
//! read path (`kv.rs`) carries out the plan, and the tests below check every case.

use capkv_types::{NodeId, ReadConsistency, Staleness};

/// Clocks of different nodes may run at rates this far apart from real time (the lease's
/// assumption, see `kv::LEASE_CLOCK_RATE_MARGIN`); a time bound is measured with it.
pub const CLOCK_RATE_MARGIN: u64 = 2;

/// The local replica of the partition, as this node sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaState {
    pub leader: bool,
    /// The leader this replica knows of (never itself).
    pub known_leader: Option<NodeId>,
    /// The last log index applied to the local state machine.
    pub applied: u64,
    /// The freshest commit index a leader confirmed to this node (a ReadIndex round):
    /// every write acknowledged before the round began is at or below `index`.
    pub proof: Option<Proof>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proof {
    /// Time since the round began, on this node's clock, in microseconds.
    pub age_us: u64,
    pub index: u64,
}

/// A read at some level, with what it must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAsk {
    pub level: ReadConsistency,
    /// `session`: the position in the partition's log the session has already seen.
    pub session_at: u64,
    /// Whether the read already waited for the local replica to catch up once.
    pub waited: bool,
    /// The commit index a leader confirmed for this read, after it began.
    pub confirmed: Option<u64>,
}

/// How stale a bounded read served now may be (both unset for other levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bound {
    /// Reflects every write acknowledged this long before the read began.
    pub stale_ms_at_most: Option<u64>,
    /// Log positions behind the commit index confirmed for the read.
    pub behind_positions_at_most: Option<u64>,
}

impl Bound {
    /// The weaker of two bounds (a scan over partitions read with different ones): a
    /// figure one of them cannot give is not given.
    pub fn loosest(self, other: Bound) -> Bound {
        let loose = |a: Option<u64>, b: Option<u64>| Some(a?.max(b?));
        Bound {
            stale_ms_at_most: loose(self.stale_ms_at_most, other.stale_ms_at_most),
            behind_positions_at_most: loose(
                self.behind_positions_at_most,
                other.behind_positions_at_most,
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Read the local state machine now.
    Serve(Bound),
    /// This replica leads: prove it still does (the lease, else a ReadIndex round), wait
    /// for the read index to be applied, then serve.
    ConfirmLeadership,
    /// Ask the leader for its commit index (a ReadIndex round through this follower),
    /// then plan again with it.
    AskCommitIndex,
    /// Wait (briefly) until the local replica has applied this index, then plan again.
    WaitApplied(u64),
    /// This replica cannot serve it: try the leader (if one is known).
    Elsewhere(Option<NodeId>),
    /// The leader itself has not applied the session's position after waiting: the token
    /// is ahead of the partition's log (from another cluster, or the leader is stuck).
    TokenAhead { at: u64, applied: u64 },
}

const SERVE: Plan = Plan::Serve(Bound {
    stale_ms_at_most: None,
    behind_positions_at_most: None,
});

pub fn plan(ask: ReadAsk, replica: ReplicaState) -> Plan {
    match ask.level {
        ReadConsistency::Linearizable => {
            if replica.leader {
                Plan::ConfirmLeadership
            } else {
                Plan::Elsewhere(replica.known_leader)
            }
        }
        // Every replica applies the log in order, each entry atomically: its state is a
        // prefix of the committed history, and it never needs the network.
        ReadConsistency::Prefix | ReadConsistency::Eventual => SERVE,
        ReadConsistency::Session => {
            if replica.applied >= ask.session_at {
                SERVE
            } else if !ask.waited {
                Plan::WaitApplied(ask.session_at)
            } else if replica.leader {
                Plan::TokenAhead {
                    at: ask.session_at,
                    applied: replica.applied,
                }
            } else {
                Plan::Elsewhere(replica.known_leader)
            }
        }
        ReadConsistency::LinearizableFollower => match ask.confirmed {
            Some(c) => serve_within(ask, replica, c, 0, Bound::default()),
            None => confirm(replica),
        },
        ReadConsistency::Bounded(Staleness::Positions(k)) => match ask.confirmed {
            Some(c) => {
                let behind = c.saturating_sub(replica.applied).min(k);
                let bound = Bound {
                    // Caught up with the confirmed commit index: it has every write
                    // acknowledged before the read began. Behind it: it may miss some.
                    stale_ms_at_most: (behind == 0).then_some(0),
                    behind_positions_at_most: Some(behind),
                };
                serve_within(ask, replica, c, k, bound)
            }
            None => confirm(replica),
        },
        ReadConsistency::Bounded(Staleness::Millis(t)) => {
            if let Some(c) = ask.confirmed {
                let bound = Bound {
                    stale_ms_at_most: Some(0),
                    behind_positions_at_most: Some(0),
                };
                return serve_within(ask, replica, c, 0, bound);
            }
            // A round that began at most t / margin ago (on this clock, so at most t ago
            // in real time) proves the state at its index is fresh enough.
            let fresh = replica
                .proof
                .filter(|p| p.age_us.saturating_mul(CLOCK_RATE_MARGIN) <= t.saturating_mul(1000));
            match fresh {
                Some(p) if replica.applied >= p.index => Plan::Serve(Bound {
                    stale_ms_at_most: Some(
                        (p.age_us.saturating_mul(CLOCK_RATE_MARGIN)).div_ceil(1000),
                    ),
                    behind_positions_at_most: None,
                }),
                Some(p) if !ask.waited => Plan::WaitApplied(p.index),
                _ => confirm(replica),
            }
        }
    }
}

/// No proof at hand: the leader confirms its own leadership; a follower asks its leader.
fn confirm(replica: ReplicaState) -> Plan {
    if replica.leader {
        Plan::ConfirmLeadership
    } else if replica.known_leader.is_some() {
        Plan::AskCommitIndex
    } else {
        Plan::Elsewhere(None)
    }
}

/// Serves once the replica is at most `lag` behind the confirmed commit index `c`: waits
/// for it once, then sends the read to the leader.
fn serve_within(ask: ReadAsk, replica: ReplicaState, c: u64, lag: u64, bound: Bound) -> Plan {
    let need = c.saturating_sub(lag);
    if replica.applied >= need {
        Plan::Serve(bound)
    } else if !ask.waited {
        Plan::WaitApplied(need)
    } else if replica.leader {
        // A leader applies what it commits; still behind after the wait, it is stuck.
        Plan::TokenAhead {
            at: need,
            applied: replica.applied,
        }
    } else {
        Plan::Elsewhere(replica.known_leader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOLLOWER: ReplicaState = ReplicaState {
        leader: false,
        known_leader: Some(NodeId(2)),
        applied: 10,
        proof: None,
    };
    const LEADER: ReplicaState = ReplicaState {
        leader: true,
        known_leader: None,
        applied: 10,
        proof: None,
    };
    const LOST: ReplicaState = ReplicaState {
        known_leader: None,
        ..FOLLOWER
    };

    fn ask(level: ReadConsistency, session_at: u64, waited: bool) -> ReadAsk {
        ReadAsk {
            level,
            session_at,
            waited,
            confirmed: None,
        }
    }

    fn confirmed(level: ReadConsistency, c: u64, waited: bool) -> ReadAsk {
        ReadAsk {
            confirmed: Some(c),
            ..ask(level, 0, waited)
        }
    }

    fn bound(stale_ms: Option<u64>, behind: Option<u64>) -> Plan {
        Plan::Serve(Bound {
            stale_ms_at_most: stale_ms,
            behind_positions_at_most: behind,
        })
    }

    #[test]
    fn linearizable_reads_need_the_leader_and_a_proof() {
        let a = ask(ReadConsistency::Linearizable, 0, false);
        assert_eq!(plan(a, LEADER), Plan::ConfirmLeadership);
        assert_eq!(plan(a, FOLLOWER), Plan::Elsewhere(Some(NodeId(2))));
        let lost = ReplicaState {
            known_leader: None,
            ..FOLLOWER
        };
        assert_eq!(plan(a, lost), Plan::Elsewhere(None));
    }

    #[test]
    fn prefix_and_eventual_reads_are_served_by_any_replica_at_once() {
        for level in [ReadConsistency::Prefix, ReadConsistency::Eventual] {
            // A session position does not hold them back.
            for replica in [LEADER, FOLLOWER] {
                assert_eq!(plan(ask(level, 1_000, false), replica), SERVE);
            }
        }
    }

    #[test]
    fn session_reads_wait_for_the_token_then_go_to_the_leader() {
        let s = ReadConsistency::Session;
        // Caught up (or a new session): any replica serves.
        assert_eq!(plan(ask(s, 10, false), FOLLOWER), SERVE);
        assert_eq!(plan(ask(s, 0, false), FOLLOWER), SERVE);
        // Behind: wait once for the replica to apply the session's position...
        assert_eq!(plan(ask(s, 11, false), FOLLOWER), Plan::WaitApplied(11));
        assert_eq!(plan(ask(s, 11, false), LEADER), Plan::WaitApplied(11));
        // ...then a follower sends it to the leader, and a leader says the token is ahead.
        assert_eq!(
            plan(ask(s, 11, true), FOLLOWER),
            Plan::Elsewhere(Some(NodeId(2)))
        );
        assert_eq!(
            plan(ask(s, 11, true), LEADER),
            Plan::TokenAhead {
                at: 11,
                applied: 10
            }
        );
        // Caught up while waiting: served.
        assert_eq!(plan(ask(s, 10, true), FOLLOWER), SERVE);
    }

    #[test]
    fn follower_linearizable_reads_ask_the_leader_then_wait_for_its_index() {
        let f = ReadConsistency::LinearizableFollower;
        assert_eq!(plan(ask(f, 0, false), LEADER), Plan::ConfirmLeadership);
        assert_eq!(plan(ask(f, 0, false), FOLLOWER), Plan::AskCommitIndex);
        assert_eq!(plan(ask(f, 0, false), LOST), Plan::Elsewhere(None));
        // With the leader's commit index: served once applied, after one wait.
        assert_eq!(plan(confirmed(f, 10, false), FOLLOWER), SERVE);
        assert_eq!(
            plan(confirmed(f, 12, false), FOLLOWER),
            Plan::WaitApplied(12)
        );
        assert_eq!(
            plan(confirmed(f, 12, true), FOLLOWER),
            Plan::Elsewhere(Some(NodeId(2)))
        );
        // An old proof does not count: every read takes its own round.
        let proven = ReplicaState {
            proof: Some(Proof {
                age_us: 0,
                index: 5,
            }),
            ..FOLLOWER
        };
        assert_eq!(plan(ask(f, 0, false), proven), Plan::AskCommitIndex);
    }

    #[test]
    fn bounded_by_positions_serves_up_to_k_behind_the_confirmed_commit() {
        let b = ReadConsistency::Bounded(Staleness::Positions(3));
        assert_eq!(plan(ask(b, 0, false), FOLLOWER), Plan::AskCommitIndex);
        assert_eq!(plan(ask(b, 0, false), LEADER), Plan::ConfirmLeadership);
        assert_eq!(plan(ask(b, 0, false), LOST), Plan::Elsewhere(None));
        // Applied 10: commit 13 is within 3, commit 14 is not.
        assert_eq!(
            plan(confirmed(b, 13, false), FOLLOWER),
            bound(None, Some(3))
        );
        assert_eq!(
            plan(confirmed(b, 10, false), FOLLOWER),
            bound(Some(0), Some(0))
        );
        assert_eq!(
            plan(confirmed(b, 11, false), FOLLOWER),
            bound(None, Some(1))
        );
        assert_eq!(
            plan(confirmed(b, 14, false), FOLLOWER),
            Plan::WaitApplied(11)
        );
        assert_eq!(
            plan(confirmed(b, 14, true), FOLLOWER),
            Plan::Elsewhere(Some(NodeId(2)))
        );
    }

    #[test]
    fn bounded_by_time_serves_from_a_proof_younger_than_half_the_bound() {
        let b = ReadConsistency::Bounded(Staleness::Millis(100));
        let with = |age_us, index| ReplicaState {
            proof: Some(Proof { age_us, index }),
            ..FOLLOWER
        };
        // 40 ms old: at most 80 ms stale with clocks 2x apart.
        assert_eq!(
            plan(ask(b, 0, false), with(40_000, 9)),
            bound(Some(80), None)
        );
        assert_eq!(
            plan(ask(b, 0, false), with(50_000, 10)),
            bound(Some(100), None)
        );
        // Too old: a new round (the leader confirms itself).
        assert_eq!(
            plan(ask(b, 0, false), with(50_001, 10)),
            Plan::AskCommitIndex
        );
        let old_leader = ReplicaState {
            proof: Some(Proof {
                age_us: 60_000,
                index: 1,
            }),
            ..LEADER
        };
        assert_eq!(plan(ask(b, 0, false), old_leader), Plan::ConfirmLeadership);
        // Fresh but not applied yet: wait once, then a new round.
        assert_eq!(
            plan(ask(b, 0, false), with(1_000, 12)),
            Plan::WaitApplied(12)
        );
        assert_eq!(plan(ask(b, 0, true), with(1_000, 12)), Plan::AskCommitIndex);
        // No proof and no leader: cannot prove anything.
        assert_eq!(plan(ask(b, 0, false), LOST), Plan::Elsewhere(None));
        // A round taken for this read: as fresh as the read itself.
        assert_eq!(
            plan(confirmed(b, 10, false), FOLLOWER),
            bound(Some(0), Some(0))
        );
        // A bound of 0 ms takes a round every time.
        let zero = ReadConsistency::Bounded(Staleness::Millis(0));
        assert_eq!(plan(ask(zero, 0, false), with(1, 1)), Plan::AskCommitIndex);
        assert_eq!(plan(ask(zero, 0, false), with(0, 1)), bound(Some(0), None));
    }

    #[test]
    fn the_loosest_bound_gives_only_what_both_can_say() {
        let a = Bound {
            stale_ms_at_most: Some(10),
            behind_positions_at_most: None,
        };
        let b = Bound {
            stale_ms_at_most: Some(0),
            behind_positions_at_most: Some(0),
        };
        let want = Bound {
            stale_ms_at_most: Some(10),
            behind_positions_at_most: None,
        };
        assert_eq!(a.loosest(b), want);
        assert_eq!(b.loosest(a), want);
        assert_eq!(b.loosest(b), b);
    }
}
