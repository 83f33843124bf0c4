//! What the relay tells systemd (`Type=notify`, see `pigeon-sdnotify`): `READY=1` once
//! the deduplication index is recovered, the sink writer runs and the listener is bound;
//! `WATCHDOG=1` every half `WATCHDOG_USEC` while the sink writer thread takes a ping in
//! time (a sink that reports write errors is not a reason to restart: the relay answers
//! 503 and gateways keep their data, so that shows in the status line instead); a
//! one-line `STATUS=…`; and `STOPPING=1` on SIGTERM/SIGINT.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use pigeon_sdnotify::{Notifier, State};

use crate::metrics::Metrics;
use crate::sink::SinkHandle;

/// How often the status line is refreshed when there is no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Sends `states`, logging (not failing) if the service manager cannot be told.
pub fn notify(notifier: &Notifier, states: &[State<'_>]) {
    if let Err(e) = notifier.notify(states) {
        tracing::debug!(error = %e, "Could not notify the service manager.");
    }
}

/// The one-line summary `systemctl status` shows.
pub fn status_line(addr: &str, m: &Metrics) -> String {
    format!(
        "listening on {addr}; events accepted {}, duplicate {}, rejected {}; {} requests in flight; sink {}",
        m.events_accepted.load(Relaxed),
        m.events_duplicate.load(Relaxed),
        m.events_rejected.load(Relaxed),
        m.requests_in_flight.load(Relaxed),
        if m.sink_healthy.load(Relaxed) {
            "healthy"
        } else {
            "FAILING (answering 503)"
        }
    )
}

/// Pings the watchdog while the sink writer answers, and refreshes the status line,
/// until aborted.
pub async fn run(
    notifier: Arc<Notifier>,
    watchdog: Option<Duration>,
    sink: SinkHandle,
    metrics: Arc<Metrics>,
    addr: String,
) {
    let every = watchdog.unwrap_or(STATUS_EVERY);
    let mut unhealthy = false;
    loop {
        tokio::time::sleep(every).await;
        let health = match tokio::time::timeout(every, sink.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("the sink writer is gone: {e}")),
            Err(_) => Err(format!("the sink writer did not answer within {every:?}")),
        };
        if let (Err(why), false) = (&health, unhealthy) {
            tracing::error!(reason = %why, "The relay is unhealthy; no more watchdog pings, so systemd restarts it.");
        }
        unhealthy = health.is_err();
        let msg = pigeon_sdnotify::health_report(
            &health,
            watchdog.is_some(),
            &status_line(&addr, &metrics),
        );
        if let Err(e) = notifier.send(&msg) {
            tracing::debug!(error = %e, "Could not notify the service manager.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_counts_and_sink_state() {
        let m = Metrics::new();
        m.events_accepted.store(1234, Relaxed);
        m.events_duplicate.store(5, Relaxed);
        assert_eq!(
            status_line("127.0.0.1:8080", &m),
            "listening on 127.0.0.1:8080; events accepted 1234, duplicate 5, rejected 0; 0 requests in flight; sink healthy"
        );
        m.sink_healthy.store(false, Relaxed);
        assert!(status_line("x", &m).ends_with("sink FAILING (answering 503)"));
    }
}
