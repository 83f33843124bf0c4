//! The connection loop: the router served over HTTP/1.1 by hyper, with a deadline for a
//! request's headers, which `axum::serve` cannot set (it gives hyper no timer).
//!
//! Without it, a client that sends its headers a byte at a time holds a connection for as
//! long as it likes (issue 24). With it, hyper closes a connection whose request headers
//! are not complete `limits.header_timeout` (30 s) after it began waiting for them: so
//! also an idle kept-alive connection after that long without a new request (a gateway
//! opens a new one when it has something to send).
//!
//! At most `limits.max_connections` connections are open at once: with every slot taken
//! the loop stops accepting and new connections wait in the kernel's listen queue, so a
//! flood of connections costs a bounded number of file descriptors and buffers, and the
//! relay never runs into its descriptor limit (where every accept would fail).
//!
//! On shutdown the loop stops accepting, tells every connection to finish the request it
//! is on and close, and returns once all have.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use pigeon_shared::shutdown::Trigger;
use tokio::sync::Semaphore;
use tower_service::Service as _;

use crate::metrics::Metrics;
use crate::tls::Peer;

/// What bounds the connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// `limits.header_timeout`.
    pub header_timeout: Duration,
    /// `limits.max_connections`.
    pub max_connections: usize,
}

/// Serves `router` on the connections `listener` accepts until `shutdown` completes, then
/// lets the connections finish their requests.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    L: Listener<Addr = Peer>,
{
    let (stop_connections, connections_stop) = Trigger::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut shutdown = pin!(shutdown);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                metrics.connection_limit_reached.fetch_add(1, Relaxed);
                tracing::debug!(
                    max_connections = limits.max_connections,
                    "Every connection slot is taken; new connections wait (limits.max_connections)."
                );
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let mut stop = connections_stop.clone();
        // Moved into the task: the slot and the count are held until the connection ends.
        let open = OpenConnection::new(slot, metrics.clone());
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let addr = peer.addr;
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer.clone()));
                let mut router = router.clone();
                async move { router.call(req.map(Body::new)).await }
            });
            let mut conn = pin!(
                http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(io), service)
            );
            let stopping = tokio::select! {
                result = conn.as_mut() => {
                    match result {
                        // Not HTTP/1.1 (a malformed request line or header, headers
                        // over hyper's 400 KB): hyper answered 400 or 431 with no body
                        // and closed; the log and a counter say what was wrong.
                        Err(e) if e.is_parse() || e.is_parse_too_large() => {
                            open.metrics.malformed_requests.fetch_add(1, Relaxed);
                            tracing::debug!(peer = %addr, error = %e, "Refused a request that is not valid HTTP/1.1.");
                        }
                        Err(e) => tracing::trace!(peer = %addr, error = %e, "A connection ended with an error."),
                        Ok(()) => {}
                    }
                    false
                }
                () = stop.stopped() => true,
            };
            if stopping {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            // Dropping `open` gives the slot back: the wait below counts them.
        });
    }
    drop(listener);
    stop_connections.stop();
    // Every connection holds a slot until it ends: with all of them back, all are done.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    Ok(())
}

/// Descriptors the relay keeps besides its connections: files of the stream, uploads,
/// the listener, Kafka's and S3's sockets.
const RESERVED_DESCRIPTORS: u64 = 1024;

/// Raises the soft limit on open files to the hard one (as the systemd unit's
/// `LimitNOFILE` sets both), and warns when `max_connections` would not fit under it:
/// accepts would then fail with "too many open files" before the connection cap applies.
pub fn raise_descriptor_limit(max_connections: usize) {
    let Some(open_files) = pigeon_shared::sys::raise_open_files_limit() else {
        return;
    };
    let needed = (max_connections as u64).saturating_add(RESERVED_DESCRIPTORS);
    if open_files < needed {
        tracing::warn!(
            open_files,
            max_connections,
            "The limit on open files is below limits.max_connections plus {RESERVED_DESCRIPTORS}: \
             a flood of connections would make accepts fail before the connection cap applies. \
             Raise it (LimitNOFILE= in the systemd unit, ulimit -n) or lower limits.max_connections."
        );
    }
}

/// A connection slot, counted in `pigeon_relay_open_connections` while held.
struct OpenConnection {
    _slot: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl OpenConnection {
    fn new(slot: tokio::sync::OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.open_connections.fetch_add(1, Relaxed);
        Self {
            _slot: slot,
            metrics,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.open_connections.fetch_sub(1, Relaxed);
    }
}
