//! Fault injection for tests: drop all Raft traffic to and from chosen peers.
//!
//! Off unless the node was started with `--unsafe-fault-injection`; then the node's
//! debug HTTP endpoint can cut it off from peers. Both directions are dropped at this
//! node: outgoing messages are not sent, incoming ones are refused, so isolating a node
//! needs only that node's cooperation.

use std::collections::BTreeSet;
use std::sync::RwLock;

use capkv_types::NodeId;

#[derive(Debug, Default)]
pub struct Faults {
    enabled: bool,
    blocked: RwLock<BTreeSet<NodeId>>,
}

impl Faults {
    pub fn new(enabled: bool) -> Self {
        Faults {
            enabled,
            blocked: RwLock::new(BTreeSet::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Replaces the set of blocked peers. Refused when fault injection is off.
    pub fn set_blocked(&self, peers: BTreeSet<NodeId>) -> Result<(), &'static str> {
        if !self.enabled {
            return Err(
                "fault injection is disabled (start the node with --unsafe-fault-injection)",
            );
        }
        *self.blocked.write().unwrap_or_else(|e| e.into_inner()) = peers;
        Ok(())
    }

    pub fn blocked(&self) -> BTreeSet<NodeId> {
        self.blocked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_blocked(&self, peer: NodeId) -> bool {
        self.enabled
            && self
                .blocked
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_injector_refuses_and_blocks_nothing() {
        let f = Faults::new(false);
        assert!(f.set_blocked([NodeId(2)].into()).is_err());
        assert!(!f.is_blocked(NodeId(2)));
        let f = Faults::new(true);
        f.set_blocked([NodeId(2)].into()).unwrap();
        assert!(f.is_blocked(NodeId(2)) && !f.is_blocked(NodeId(3)));
    }
}
