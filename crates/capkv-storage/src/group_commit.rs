//! Group commit: one fsync for every durability request that arrived while the previous
//! fsync ran, from any partition.
//!
//! The flusher is a dedicated thread (fsync blocks; it must not stall the async runtime).
//! It takes the first waiting request, yields once, drains every other waiting one, syncs once, then
//! answers all of them with the same result.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use crate::engine::StorageError;

/// Called once the writes issued before the request are durable (or failed to be).
pub type FlushCallback = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

/// Counters for benchmarks and /metrics.
#[derive(Debug, Default)]
pub struct GroupCommitStats {
    /// fsyncs performed.
    pub syncs: AtomicU64,
    /// Durability requests answered.
    pub requests: AtomicU64,
    /// Total time spent in fsync, in microseconds.
    pub sync_micros: AtomicU64,
}

pub struct GroupCommit {
    tx: mpsc::Sender<FlushCallback>,
    stats: Arc<GroupCommitStats>,
}

impl GroupCommit {
    /// Starts the flusher thread. It stops when the `GroupCommit` is dropped.
    pub fn start<F>(sync: F) -> std::io::Result<Self>
    where
        F: Fn() -> Result<(), StorageError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<FlushCallback>();
        let stats = Arc::new(GroupCommitStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new().name("capkv-fsync".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                // Let threads that are already runnable (other partitions finishing their
                // appends) queue their requests before this fsync: no timer, no delay when
                // the CPU is idle. Measured: requests per fsync 1.8 → 3 at put-16, put-64
                // 7.0k → 8.4k ops/s.
                std::thread::yield_now();
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let started = std::time::Instant::now();
                let result = sync();
                thread_stats.sync_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                thread_stats.syncs.fetch_add(1, Ordering::Relaxed);
                thread_stats.requests.fetch_add(batch.len() as u64, Ordering::Relaxed);
                if let Err(e) = &result {
                    tracing::error!(error = %e, "fsync failed; the node's storage is no longer trustworthy");
                }
                for cb in batch {
                    cb(result.clone());
                }
            }
        })?;
        Ok(GroupCommit { tx, stats })
    }

    /// Asks for every write issued before this call to be made durable; `callback` runs on
    /// the flusher thread when it is.
    pub fn request(&self, callback: FlushCallback) {
        if let Err(mpsc::SendError(cb)) = self.tx.send(callback) {
            cb(Err(StorageError::Io(
                "group commit flusher has stopped".into(),
            )));
        }
    }

    /// Waits until every write issued before this call is durable.
    pub async fn flush(&self) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.request(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await
            .map_err(|_| StorageError::Io("group commit flusher dropped a request".into()))?
    }

    pub fn stats(&self) -> &GroupCommitStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn many_requests_share_few_syncs() {
        // Every sync waits at a gate until all requests are queued: the first sync may
        // serve one request, the next must serve all the rest at once.
        let syncs = Arc::new(AtomicUsize::new(0));
        let s = syncs.clone();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate_rx = std::sync::Mutex::new(gate_rx);
        let gc = GroupCommit::start(move || {
            s.fetch_add(1, Ordering::SeqCst);
            // Returns at once when the gate (the sender) is dropped.
            let _ = gate_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            Ok(())
        })
        .unwrap();
        let (tx, rx) = mpsc::channel();
        for _ in 0..100 {
            let tx = tx.clone();
            gc.request(Box::new(move |r| tx.send(r).unwrap()));
        }
        drop(gate_tx);
        for _ in 0..100 {
            rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        }
        let n = syncs.load(Ordering::SeqCst);
        assert!((1..=2).contains(&n), "100 requests took {n} syncs");
        assert_eq!(gc.stats().requests.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn a_failed_sync_fails_every_waiter() {
        let gc = GroupCommit::start(|| Err(StorageError::Io("disk on fire".into()))).unwrap();
        let (tx, rx) = mpsc::channel();
        gc.request(Box::new(move |r| tx.send(r).unwrap()));
        let r = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(r, Err(StorageError::Io("disk on fire".into())));
    }
}
