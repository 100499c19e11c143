//! Node-to-node connections: one gRPC channel (one HTTP/2 connection) per peer address,
//! shared by the engine's Raft stream, snapshot streams and scan fan-out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Largest peer frame: one engine turn's messages to a peer for every group (each holds
/// at most 1 MiB of entries, or one entry of up to 4 MiB). Snapshots stream in chunks.
pub const RAFT_MESSAGE_BYTES_MAX: usize = 512 * 1024 * 1024;

#[derive(Default)]
pub struct PeerChannels {
    channels: Mutex<HashMap<String, Channel>>,
}

impl PeerChannels {
    /// The channel to `addr`, created on first use; it reconnects by itself.
    pub fn channel(&self, addr: &str) -> Channel {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return c.clone();
        }
        let channel = match Endpoint::from_shared(format!("http://{addr}")) {
            Ok(e) => e
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(2))
                .keep_alive_while_idle(true)
                .connect_lazy(),
            // Addresses come from the validated cluster spec; an unparsable one still gets
            // a channel that fails every call rather than a panic.
            Err(_) => Endpoint::from_static("http://0.0.0.0:1").connect_lazy(),
        };
        channels.insert(addr.to_string(), channel.clone());
        channel
    }
}
