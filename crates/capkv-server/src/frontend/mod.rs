//! The front ends for clients without a routing client of their own: the Redis protocol
//! (`resp`), the seed's JSON over TCP (`json`) and HTTP/JSON (`http_kv`, mounted on the
//! HTTP port beside `/metrics`). Each translates requests into [`Router`] calls and answers back; none
//! holds KV logic. This module has what they share: the accept loop with its connection
//! limit and graceful shutdown, request metrics by protocol, and error codes.

pub mod http_kv;
pub mod json;
pub mod resp;

use std::future::Future;
use std::sync::Arc;

use capkv_types::KvError;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::router::Router;

/// Accepts connections while fewer than `max_connections` are open (the rest wait in the
/// listen backlog) and runs `handle` on each, until `shutdown`. Connections are told of
/// the shutdown through the receiver they get, finish the request at hand, and close.
pub async fn serve<F, Fut>(
    protocol: &'static str,
    listener: TcpListener,
    max_connections: usize,
    router: Arc<Router>,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(Arc<Router>, TcpStream, watch::Receiver<bool>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let gauge = router
        .core()
        .metrics()
        .frontend_connections
        .with_label_values(&[protocol]);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Usually EMFILE or a reset during accept: wait briefly, keep serving.
                tracing::warn!(protocol, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let conn = handle(router.clone(), tcp, shutdown.clone());
        let gauge = gauge.clone();
        gauge.inc();
        tokio::spawn(async move {
            conn.await;
            gauge.dec();
            drop(permit);
        });
    }
}

/// Counts one front-end request by protocol, command and outcome.
pub fn count(router: &Router, protocol: &str, command: &str, outcome: Result<(), &KvError>) {
    let code = match outcome {
        Ok(()) => "ok",
        Err(e) => e.code().as_str(),
    };
    router
        .core()
        .metrics()
        .frontend_requests
        .with_label_values(&[protocol, command, code])
        .inc();
}

/// Completes once the node is shutting down (or the signal is gone).
pub(crate) async fn stop_signal(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
