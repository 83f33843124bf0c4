//! The connection loop: the router served over HTTP/1.1 by hyper, with a deadline for a
//! request's headers, which `axum::serve` cannot set (it gives hyper no timer).
//!
//! Without it, a client that sends its headers a byte at a time holds a connection for as
//! long as it likes (issue 24). With it, hyper closes a connection whose request headers
//! are not complete `limits.header_timeout` (30 s) after it began waiting for them: so
//! also an idle kept-alive connection after that long without a new request (a gateway
//! opens a new one when it has something to send).
//!
//! On shutdown the loop stops accepting, tells every connection to finish the request it
//! is on and close, and returns once all have.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;
use tower_service::Service as _;

use crate::tls::Peer;

/// Serves `router` on the connections `listener` accepts until `shutdown` completes, then
/// lets the connections finish their requests.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    L: Listener<Addr = Peer>,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
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
                    if let Err(e) = result {
                        tracing::trace!(error = %e, "A connection ended with an error.");
                    }
                    false
                }
                r = stop.wait_for(|stopping| *stopping) => r.is_ok(),
            };
            if stopping {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            // Dropping `stop` tells the loop below this connection is done.
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
    Ok(())
}
