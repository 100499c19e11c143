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
//! Outgoing messages go through [`FaultyTransport`]; incoming ones are filtered by the
//! node's Raft service.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use capkv_types::NodeId;
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::network::{RaftEnvelope, RaftTransport, TransportError};

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

/// The node's transport under its injected network faults: a message to a peer this node
/// drops is lost before it leaves; the answer from a peer whose messages this node drops
/// is lost after the peer handled the message.
pub struct FaultyTransport {
    pub inner: Arc<dyn RaftTransport>,
    pub faults: Arc<Faults>,
}

impl RaftTransport for FaultyTransport {
    fn call(
        &self,
        addr: &str,
        envelope: RaftEnvelope,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let peer = envelope.to;
        if self.faults.drops_to(peer) {
            return futures::future::ready(Err(TransportError::Unreachable(
                "dropped by fault injection".into(),
            )))
            .boxed();
        }
        let reply = self.inner.call(addr, envelope, timeout);
        let faults = self.faults.clone();
        async move {
            let reply = reply.await;
            if faults.drops_from(peer) {
                return Err(TransportError::Unreachable(
                    "answer dropped by fault injection".into(),
                ));
            }
            reply
        }
        .boxed()
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

#[cfg(test)]
mod transport_tests {
    use super::*;
    use crate::network::RaftRpc;
    use capkv_types::PartitionId;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    impl RaftTransport for Counting {
        fn call(
            &self,
            _addr: &str,
            _envelope: RaftEnvelope,
            _timeout: Duration,
        ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            futures::future::ready(Ok(b"answer".to_vec())).boxed()
        }
    }

    fn to(peer: u64) -> RaftEnvelope {
        RaftEnvelope {
            partition: PartitionId(0),
            from: NodeId(1),
            to: NodeId(peer),
            rpc: RaftRpc::Append,
            payload: vec![],
        }
    }

    #[tokio::test]
    async fn one_way_drops_lose_the_message_or_only_its_answer() {
        let inner = Arc::new(Counting(AtomicUsize::new(0)));
        let faults = Arc::new(Faults::new(true));
        let t = FaultyTransport {
            inner: inner.clone(),
            faults: faults.clone(),
        };
        let d = Duration::from_secs(1);
        assert_eq!(t.call("a", to(2), d).await.unwrap(), b"answer");
        faults
            .set_network(NetworkFaults {
                drop_to: [NodeId(2)].into(),
                drop_from: [NodeId(3)].into(),
            })
            .unwrap();
        assert!(t.call("a", to(2), d).await.is_err());
        assert_eq!(
            inner.0.load(Ordering::SeqCst),
            1,
            "a message to 2 never leaves"
        );
        assert!(t.call("a", to(3), d).await.is_err());
        assert_eq!(
            inner.0.load(Ordering::SeqCst),
            2,
            "3 got the message; its answer is lost"
        );
    }
}
