//! A restarted node grants no vote and starts no election for one leader lease.
//!
//! A leader serving lease reads counts on every follower that acknowledged it to refuse
//! votes until the lease it granted runs out (openraft's followers do). That promise lives
//! in memory: a follower that crashes and restarts inside the lease has forgotten it and
//! could help elect a new leader while the old one still serves reads from its lease,
//! which would then be stale. openraft notes the gap itself (`storage/helper.rs`: "the
//! restarted node must sleep for a while, before serving").
//!
//! So a node that starts on existing data holds its vote for one lease (the election
//! timeout maximum, which is also openraft's leader lease): vote and pre-vote requests are
//! refused, and its own election timer is disabled. The lease it may have granted before
//! the crash began before the crash, so it has surely ended when the hold does. A vote for
//! a leadership transfer is still granted: the leader that asked for the transfer has
//! already stopped serving lease reads. A node on a fresh data directory has never
//! acknowledged a leader and holds nothing.

use std::time::{Duration, Instant};

use openraft::raft::VoteRequest;

use crate::group::PartitionRaft;
use crate::types::TypeConfig;

#[derive(Debug, Clone, Copy)]
pub struct VoteHold {
    until: Option<Instant>,
}

impl VoteHold {
    /// No hold: a node starting on an empty data directory.
    pub fn none() -> VoteHold {
        VoteHold { until: None }
    }

    /// A hold of `lease` from now.
    pub fn for_lease(lease: Duration) -> VoteHold {
        VoteHold {
            until: Some(Instant::now() + lease),
        }
    }

    /// Time left in the hold, if any.
    pub fn remaining(&self) -> Option<Duration> {
        self.until
            .map(|u| u.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// If `req` must be refused now, the time left in the hold.
    pub fn refusal(&self, req: &VoteRequest<TypeConfig>) -> Option<Duration> {
        if req.leadership_transfer {
            return None;
        }
        self.remaining()
    }

    /// Disables `raft`'s own elections for the rest of the hold, then enables them.
    /// Call right after the group starts, before its first election timeout.
    pub fn hold_elections(&self, raft: &PartitionRaft) {
        let Some(left) = self.remaining() else {
            return;
        };
        raft.runtime_config().elect(false);
        let raft = raft.clone();
        tokio::spawn(async move {
            tokio::time::sleep(left).await;
            raft.runtime_config().elect(true);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::Vote;

    fn request(transfer: bool) -> VoteRequest<TypeConfig> {
        VoteRequest {
            vote: Vote::new(3, 2),
            last_log_id: None,
            leadership_transfer: transfer,
        }
    }

    #[test]
    fn refuses_ordinary_votes_during_the_hold_only() {
        let hold = VoteHold::for_lease(Duration::from_secs(60));
        assert!(hold.refusal(&request(false)).is_some());
        assert!(
            hold.refusal(&request(true)).is_none(),
            "a transfer vote is granted"
        );
        let over = VoteHold::for_lease(Duration::ZERO);
        assert!(over.refusal(&request(false)).is_none());
        assert!(VoteHold::none().refusal(&request(false)).is_none());
        assert!(VoteHold::none().remaining().is_none());
    }
}
