//! An in-process transport between engines in one process (tests and the engine
//! benchmark): every batch goes through the wire encoding and back, as over the network.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, RwLock};

use crate::codec::PeerBatch;
use crate::node::{Input, Transport};

/// Where each node's inputs go, by node id.
pub struct Loopback<R> {
    nodes: Arc<RwLock<BTreeMap<u64, mpsc::Sender<Input<R>>>>>,
}

impl<R> Clone for Loopback<R> {
    fn clone(&self) -> Self {
        Loopback {
            nodes: self.nodes.clone(),
        }
    }
}

impl<R> Default for Loopback<R> {
    fn default() -> Self {
        Loopback {
            nodes: Arc::default(),
        }
    }
}

impl<R> Loopback<R> {
    pub fn register(&self, id: u64, inputs: mpsc::Sender<Input<R>>) {
        self.write().insert(id, inputs);
    }

    /// Takes every node off the network (their batches go nowhere).
    pub fn clear(&self) {
        self.write().clear();
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, mpsc::Sender<Input<R>>>> {
        self.nodes.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl<R: Send + 'static> Transport for Loopback<R> {
    fn send(&self, batch: PeerBatch) {
        let bytes = batch.encode();
        // Our own encoding of our own batch: it decodes, or the codec is broken and the
        // codec's tests say so; here the batch is dropped like a lost packet.
        let Ok((from, to, messages)) = PeerBatch::decode(&bytes, usize::MAX) else {
            return;
        };
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = nodes.get(&to) {
            let _ = tx.send(Input::Peer { from, messages });
        }
    }
}
