//! Network fault injection for tests: drop Raft traffic to or from chosen peers.
//!
//! Off unless the node was started with `--unsafe-fault-injection`; then the admin gRPC
//! service sets what this node drops. Everything is done at this node, so any partition
//! (symmetric or one-way) needs only the cooperation of the nodes on one side:
//! - `drop_to` peer P: this node's messages to P are lost, and so are its answers to P's
//!   messages (P's messages still arrive and take effect here; P never hears back). That
//!   is a one-way partition "this node -> P".
//! - `drop_from` peer P: P's messages are refused before they reach Raft, and P's answers
//!   to this node's messages are lost (P still gets and applies them): a one-way partition
//!   "P -> this node". Both sets holding P cut the pair apart in both directions.
//!
//! The engine's transport filters outgoing frames and snapshot streams; the node's Raft
//! service filters incoming ones.

use std::collections::BTreeSet;
use std::sync::RwLock;

use capkv_types::NodeId;

/// The network faults a node applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkFaults {
    pub drop_to: BTreeSet<NodeId>,
    pub drop_from: BTreeSet<NodeId>,
}

#[derive(Debug, Default)]
pub struct Faults {
    enabled: bool,
    network: RwLock<NetworkFaults>,
}

/// Why a fault-injection call was refused.
pub const FAULTS_DISABLED: &str =
    "fault injection is disabled (start the node with --unsafe-fault-injection)";

impl Faults {
    pub fn new(enabled: bool) -> Self {
        Faults {
            enabled,
            network: RwLock::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Replaces the network faults. Refused when fault injection is off.
    pub fn set_network(&self, faults: NetworkFaults) -> Result<(), &'static str> {
        if !self.enabled {
            return Err(FAULTS_DISABLED);
        }
        *self.network.write().unwrap_or_else(|e| e.into_inner()) = faults;
        Ok(())
    }

    pub fn network(&self) -> NetworkFaults {
        self.network
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether messages (and answers) from this node to `peer` are lost.
    pub fn drops_to(&self, peer: NodeId) -> bool {
        self.enabled
            && self
                .network
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .drop_to
                .contains(&peer)
    }

    /// Whether messages from `peer` to this node are refused.
    pub fn drops_from(&self, peer: NodeId) -> bool {
        self.enabled
            && self
                .network
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .drop_from
                .contains(&peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_injector_refuses_and_drops_nothing() {
        let cut = NetworkFaults {
            drop_to: [NodeId(2)].into(),
            drop_from: [NodeId(3)].into(),
        };
        let f = Faults::new(false);
        assert_eq!(f.set_network(cut.clone()), Err(FAULTS_DISABLED));
        assert!(!f.drops_to(NodeId(2)) && !f.drops_from(NodeId(3)));
        let f = Faults::new(true);
        f.set_network(cut.clone()).unwrap();
        assert_eq!(f.network(), cut);
        assert!(f.drops_to(NodeId(2)) && !f.drops_from(NodeId(2)));
        assert!(f.drops_from(NodeId(3)) && !f.drops_to(NodeId(3)));
    }
}
