//! What must happen before a read is served on this node: a pure function of the level
//! asked for, the session's position and the local replica's state. No IO, no clock: the
//! read path (`kv.rs`) carries out the plan, and the tests below check every case.

use capkv_types::{NodeId, ReadConsistency};

/// The local replica of the partition, as this node sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaState {
    pub leader: bool,
    /// The leader this replica knows of (never itself).
    pub known_leader: Option<NodeId>,
    /// The last log index applied to the local state machine.
    pub applied: u64,
}

/// A read at some level, with what it must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAsk {
    pub level: ReadConsistency,
    /// `session`: the position in the partition's log the session has already seen.
    pub session_at: u64,
    /// Whether the read already waited for the local replica to catch up once.
    pub waited: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Read the local state machine now.
    Serve,
    /// This replica leads: prove it still does (the lease, else a ReadIndex round), wait
    /// for the read index to be applied, then serve.
    ConfirmLeadership,
    /// Wait (briefly) until the local replica has applied this index, then plan again.
    WaitApplied(u64),
    /// This replica cannot serve it: try the leader (if one is known).
    Elsewhere(Option<NodeId>),
    /// The leader itself has not applied the session's position after waiting: the token
    /// is ahead of the partition's log (from another cluster, or the leader is stuck).
    TokenAhead { at: u64, applied: u64 },
}

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
        ReadConsistency::Prefix | ReadConsistency::Eventual => Plan::Serve,
        ReadConsistency::Session => {
            if replica.applied >= ask.session_at {
                Plan::Serve
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOLLOWER: ReplicaState = ReplicaState {
        leader: false,
        known_leader: Some(NodeId(2)),
        applied: 10,
    };
    const LEADER: ReplicaState = ReplicaState {
        leader: true,
        known_leader: None,
        applied: 10,
    };

    fn ask(level: ReadConsistency, session_at: u64, waited: bool) -> ReadAsk {
        ReadAsk {
            level,
            session_at,
            waited,
        }
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
                assert_eq!(plan(ask(level, 1_000, false), replica), Plan::Serve);
            }
        }
    }

    #[test]
    fn session_reads_wait_for_the_token_then_go_to_the_leader() {
        let s = ReadConsistency::Session;
        // Caught up (or a new session): any replica serves.
        assert_eq!(plan(ask(s, 10, false), FOLLOWER), Plan::Serve);
        assert_eq!(plan(ask(s, 0, false), FOLLOWER), Plan::Serve);
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
        assert_eq!(plan(ask(s, 10, true), FOLLOWER), Plan::Serve);
    }
}
