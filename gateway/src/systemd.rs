//! What the gateway tells systemd (`Type=notify`, see `pigeon-sdnotify`).
//!
//! * `READY=1` once the outbox is open and the sources, the uplink and the HTTP endpoint
//!   are started ([`crate::run`]).
//! * `WATCHDOG=1` every half `WATCHDOG_USEC`, but only while the machinery is healthy
//!   ([`check`]): the outbox writer thread takes a ping from its queue in time (so it is
//!   neither dead nor stuck in a commit), the uplink and source tasks have not ended, and
//!   this task itself got to run (so the runtime is responsive). Otherwise the pings
//!   stop, the reason is logged and shown as the status, and systemd restarts the
//!   gateway once `WatchdogSec` has passed.
//! * `STATUS=…` with each ping (every 10 s without a watchdog): [`status_line`].
//! * `STOPPING=1` on SIGTERM/SIGINT ([`crate::run`]).

use std::sync::Arc;
use std::time::Duration;

use pigeon_sdnotify::{Notifier, State};
use tokio::task::AbortHandle;
use tracing::{debug, error, info};

use crate::outbox::OutboxWriter;
use crate::report::{Live, StatusReport, human_duration};

/// How often the status line is refreshed when there is no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Sends `states`, logging (not failing) if the service manager cannot be told.
pub(crate) fn notify(notifier: &Notifier, states: &[State<'_>]) {
    if let Err(e) = notifier.notify(states) {
        debug!(error = %e, "Could not notify the service manager.");
    }
}

/// The one-line summary `systemctl status` shows, e.g.
/// `12 waiting (oldest 5 s), relay reachable, last upload 3 s ago, MQTT connected`.
pub(crate) fn status_line(r: &StatusReport) -> String {
    let mut parts = Vec::new();
    match &r.outbox {
        Some(o) if o.waiting == 0 => parts.push("nothing waiting".to_owned()),
        Some(o) => parts.push(match o.oldest_age_seconds {
            Some(age) => format!(
                "{} waiting (oldest {})",
                o.waiting,
                human_duration(age as u64)
            ),
            None => format!("{} waiting", o.waiting),
        }),
        None => parts.push("outbox unreadable".to_owned()),
    }
    if let Some(l) = &r.live {
        parts.push(
            match l.relay_reachable {
                Some(true) => "relay reachable",
                Some(false) => "relay NOT reachable",
                None => "relay not contacted yet",
            }
            .to_owned(),
        );
        if let Some(t) = l.last_upload_unix {
            parts.push(format!(
                "last upload {} ago",
                human_duration(r.at_unix.saturating_sub(t).max(0) as u64)
            ));
        }
        match l.mqtt_connected {
            Some(true) => parts.push("MQTT connected".to_owned()),
            Some(false) => parts.push("MQTT NOT connected".to_owned()),
            None => {}
        }
        if let Some(why) = &l.not_ready_reason {
            parts.push(format!("not taking data: {why}"));
        }
    }
    parts.join(", ")
}

/// Whether the gateway's machinery works: the named tasks still run and the outbox
/// writer answers a ping within `within`.
pub(crate) async fn check(
    writer: &OutboxWriter,
    tasks: &[(&'static str, AbortHandle)],
    within: Duration,
) -> Result<(), String> {
    if let Some((name, _)) = tasks.iter().find(|(_, t)| t.is_finished()) {
        return Err(format!("the {name} task has ended"));
    }
    match tokio::time::timeout(within, writer.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the outbox writer is gone: {e}")),
        Err(_) => Err(format!(
            "the outbox writer did not answer within {within:?} (stuck in a commit?)"
        )),
    }
}

/// Pings the watchdog (when `watchdog` is set) and refreshes the status line, until
/// aborted. Only spawned when there is a service manager to tell.
pub(crate) async fn run(
    notifier: Arc<Notifier>,
    watchdog: Option<Duration>,
    writer: OutboxWriter,
    live: Arc<Live>,
    tasks: Vec<(&'static str, AbortHandle)>,
) {
    let every = watchdog.unwrap_or(STATUS_EVERY);
    if let Some(w) = watchdog {
        info!(every = ?w, "Pinging the systemd watchdog while healthy.");
    }
    let mut unhealthy = false;
    loop {
        tokio::time::sleep(every).await;
        // A ping that takes longer than a period is as bad as none.
        let health = check(&writer, &tasks, every).await;
        if let (Err(why), false) = (&health, unhealthy) {
            error!(reason = %why, "The gateway is unhealthy; no more watchdog pings, so systemd restarts it.");
        }
        unhealthy = health.is_err();
        let msg = pigeon_sdnotify::health_report(
            &health,
            watchdog.is_some(),
            &status_line(&live.report().await),
        );
        if let Err(e) = notifier.send(&msg) {
            debug!(error = %e, "Could not notify the service manager.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn status_lines() {
        let mut r = sample_report();
        assert_eq!(
            status_line(&r),
            "12 waiting (oldest 5 s), relay reachable, last upload 3 s ago, MQTT connected"
        );
        if let (Some(o), Some(l)) = (&mut r.outbox, &mut r.live) {
            o.waiting = 0;
            o.oldest_age_seconds = None;
            l.relay_reachable = Some(false);
            l.mqtt_connected = Some(false);
            l.not_ready_reason = Some("not connected to the MQTT broker".into());
        }
        assert_eq!(
            status_line(&r),
            "nothing waiting, relay NOT reachable, last upload 3 s ago, MQTT NOT connected, not taking data: not connected to the MQTT broker"
        );
    }

    #[tokio::test]
    async fn a_live_writer_and_running_tasks_are_healthy_and_a_finished_task_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::outbox::db::path_in(dir.path());
        let mut conn =
            crate::outbox::db::open(&path, crate::outbox::db::Synchronous::Normal).unwrap();
        crate::outbox::db::migrate(&mut conn).unwrap();
        let (writer, thread) = OutboxWriter::start(conn, 10).unwrap();
        let running = tokio::spawn(std::future::pending::<()>());
        let within = Duration::from_secs(30);
        check(&writer, &[("uplink", running.abort_handle())], within)
            .await
            .unwrap();
        let ended = tokio::spawn(async {});
        let handle = ended.abort_handle();
        ended.await.unwrap();
        let e = check(&writer, &[("MQTT source", handle)], within)
            .await
            .unwrap_err();
        assert_eq!(e, "the MQTT source task has ended");
        running.abort();
        drop(writer);
        thread.join().unwrap();
    }
}
