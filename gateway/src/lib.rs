//! pigeon-gateway: the edge half of Pigeon.
//!
//! Sources ([`sources`]) turn what arrives at the Pi into records; every record is
//! committed to the SQLite [`outbox`] before it is acknowledged to its producer; the
//! [`uplink`] drains the outbox to pigeon-relay as CloudEvents batches and deletes a
//! record only after the relay said it is durable. Camera files wait in the [`spool`]:
//! the files source puts them there, the uplink's file lane lets them go. [`run`] wires
//! them together; the binary (`main.rs` → [`cli`]) parses arguments, loads the
//! [`config`] and calls it.
//!
//! What it says about itself: [`stats`] counts (atomics), [`report`] turns the counts,
//! the outbox depth and the [`host`]'s disk into one snapshot, which [`http`] serves as
//! `/status` and (via [`metrics`]) `/metrics`, `pigeon-gateway status` prints, and
//! [`systemd`] sends to systemd as the status line with the watchdog pings.
//! [`dead_letter_cli`] is `pigeon-gateway dead-letter list | retry | purge`; [`exit`] holds
//! the exit codes the commands share.

pub mod cli;
pub mod config;
pub mod dead_letter_cli;
pub mod exit;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod report;
pub mod sources;
pub mod spool;
pub mod stats;
pub mod systemd;
pub mod uplink;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;
use pigeon_sdnotify::{Notifier, State};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::outbox::{DepthCache, OutboxReader, OutboxWriter, db};
use crate::report::Live;
use crate::stats::{LastErrorSlot, Stats};

/// How long after the shutdown deadline the outbox writer may take to commit what is
/// queued before the gateway exits without waiting for it (uncommitted = not
/// acknowledged, so nothing is lost: the broker re-sends it).
const WRITER_GRACE: Duration = Duration::from_secs(2);

/// Runs the gateway until `shutdown` resolves, then stops taking new data, lets the
/// in-flight upload finish within `gateway.shutdown_timeout`, and leaves the outbox
/// consistent. `token` is the relay token already read from the configuration;
/// `last_error` is where the log keeps the last warning (see [`stats::LastErrorLayer`]).
///
/// Under systemd (`NOTIFY_SOCKET`) it reports `READY=1` once everything is started,
/// pings the watchdog while healthy, and says `STOPPING=1` when `shutdown` resolves.
/// However stuck a part is, it returns within `shutdown_timeout` plus a few seconds.
pub async fn run(
    config: Config,
    token: Option<String>,
    last_error: Arc<LastErrorSlot>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // One TLS crypto provider for the whole process (ring: small, builds for the Pi).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let notifier = Arc::new(Notifier::from_env());

    let data_dir = config.gateway.data_dir.clone();
    let path = db::path_in(&data_dir);
    let sync = config.outbox.synchronous;
    let (conn, producer_id, moved) = tokio::task::spawn_blocking(move || {
        let (conn, moved) = db::open_or_recover(&path, sync)?;
        let producer = db::producer_id(&conn)?;
        Ok::<_, outbox::OutboxError>((conn, producer, moved))
    })
    .await?
    .with_context(|| format!("cannot open the outbox in {}", data_dir.display()))?;
    if let Some((aside, why)) = moved {
        error!(
            damaged = %why,
            moved_to = %aside.display(),
            "The outbox was damaged (a power cut on a failing SD card?): it was moved aside and a fresh one started. Events in it that had not reached the relay are not sent automatically; the file is kept for inspection."
        );
    }

    let health_source = config.gateway.id.source("health");
    let mut sources = vec![("health".to_owned(), health_source)];
    if config.mqtt.is_some() {
        sources.push(("mqtt".to_owned(), config.gateway.id.source("mqtt")));
    }
    if let Some(f) = &config.files {
        sources.extend(sources::files::FilesSource::sources(f, &config.gateway.id));
    }
    let sources: Vec<(&str, String)> = sources
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    let mut stats = Stats::new(&sources, config.mqtt.as_ref());
    stats.last_error = last_error;
    let stats = Arc::new(stats);

    let quota = outbox::quota::QuotaSettings {
        max_bytes: config.outbox.max_bytes.map(|b| b.get()),
        min_free: config.outbox.min_free.map(|b| b.get()),
        data_dir: data_dir.clone(),
        spool_dir: config.spool_dir(),
    };
    let (writer, writer_thread) = OutboxWriter::start_with(
        conn,
        config.outbox.commit_max_records,
        stats.clone(),
        Some(quota),
    )?;
    let reader = Arc::new(OutboxReader::open(&db::path_in(&data_dir))?);
    let depth = Arc::new(DepthCache::new(reader.clone()));
    let pending = depth.get().await?.pending;
    let live = Arc::new(Live::new(&config, stats.clone(), depth.clone()));

    // Bind before starting anything, so a taken port fails the start cleanly.
    let http_listener = if config.http.enabled {
        let addr = config.http.listen_addr().map_err(anyhow::Error::msg)?;
        Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (http.listen)"))?,
        )
    } else {
        None
    };
    info!(
        gateway = %config.gateway.id,
        outbox = %db::path_in(&data_dir).display(),
        pending = pending.count,
        producer_id = %producer_id,
        http = http_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()),
        "pigeon-gateway started."
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let uplink = Arc::new(uplink::Uplink::new(
        config.relay.clone(),
        token,
        reader.clone(),
        writer.clone(),
        stats.clone(),
        producer_id.clone(),
    )?);
    let uplink_task = tokio::spawn(uplink.clone().run(stop_rx.clone()));
    // Files have a lane of their own (also with [files] removed: some may still wait).
    let spool = Arc::new(spool::Spool::at(&config.spool_dir()));
    let file_lane_task = tokio::spawn(uplink::run_files(uplink, spool, stop_rx.clone()));
    let files_task = match config.files.clone() {
        Some(f) => {
            let source = sources::files::FilesSource::new(
                f,
                &config.gateway.id,
                &data_dir,
                writer.clone(),
                reader.clone(),
                stats.clone(),
            )?;
            Some(tokio::spawn(source.run(stop_rx.clone())))
        }
        None => None,
    };
    let mqtt_task = config.mqtt.clone().map(|m| {
        let source = sources::mqtt::MqttSource::new(
            m,
            &config.gateway.id,
            writer.clone(),
            stats.clone(),
            &data_dir,
            config.relay.max_event_bytes.get(),
            producer_id.clone(),
        );
        tokio::spawn(source.run(stop_rx.clone()))
    });
    let health_task = config.health.enabled.then(|| {
        let source = sources::health::HealthSource::new(
            config.health.clone(),
            &config.gateway.id,
            data_dir.clone(),
            writer.clone(),
            stats.clone(),
            depth.clone(),
            live.started,
        );
        tokio::spawn(source.run(stop_rx.clone()))
    });
    // Records past their route's TTL are dropped unsent, checked every second.
    let has_ttl = config
        .mqtt
        .as_ref()
        .is_some_and(|m| m.subscriptions.iter().any(|s| s.ttl.is_some()));
    let expiry_task =
        has_ttl.then(|| tokio::spawn(outbox::expire_loop(writer.clone(), Duration::from_secs(1))));
    let http_task = http_listener.map(|l| {
        let live = live.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve(l, live).await {
                error!(error = %e, "The HTTP endpoint failed; /status and /metrics are gone until a restart.");
            }
        })
    });

    let mut watched = vec![
        ("uplink", uplink_task.abort_handle()),
        ("file uplink", file_lane_task.abort_handle()),
    ];
    watched.extend(
        files_task
            .as_ref()
            .map(|t| ("files source", t.abort_handle())),
    );
    watched.extend(
        mqtt_task
            .as_ref()
            .map(|t| ("MQTT source", t.abort_handle())),
    );
    watched.extend(
        health_task
            .as_ref()
            .map(|t| ("health source", t.abort_handle())),
    );
    watched.extend(
        http_task
            .as_ref()
            .map(|t| ("HTTP endpoint", t.abort_handle())),
    );
    let ready_line = systemd::status_line(&live.report().await);
    systemd::notify(&notifier, &[State::Ready, State::Status(&ready_line)]);
    let watchdog_task = notifier.is_enabled().then(|| {
        tokio::spawn(systemd::run(
            notifier.clone(),
            pigeon_sdnotify::watchdog_interval(),
            writer.clone(),
            live.clone(),
            watched,
        ))
    });
    drop(writer);

    shutdown.await;
    info!("Stopping: no new data is taken; finishing the upload in flight.");
    live.stopping.store(true, Relaxed);
    if let Some(t) = watchdog_task {
        t.abort();
    }
    if let Some(t) = expiry_task {
        t.abort();
    }
    systemd::notify(
        &notifier,
        &[
            State::Stopping,
            State::Status("Stopping: finishing the upload in flight."),
        ],
    );
    let _ = stop_tx.send(true);
    let stop_began = tokio::time::Instant::now();
    let deadline = stop_began + config.gateway.shutdown_timeout.get();
    // Sources first (they stop taking data and acknowledge what was committed), then the
    // uplink's request in flight. Whatever is still running at the deadline is aborted:
    // its uncommitted records were never acknowledged, so nothing is lost.
    for (name, task) in [
        ("MQTT source", mqtt_task),
        ("health source", health_task),
        ("files source", files_task),
    ] {
        if let Some(t) = task {
            finish_by(deadline, name, t).await;
        }
    }
    // A file upload in flight is abandoned where it is: the relay keeps what it got.
    finish_by(deadline, "file uplink", file_lane_task).await;
    if !finish_by(deadline, "uplink", uplink_task).await {
        warn!(
            "The relay did not answer before the shutdown deadline; the events in flight stay in the outbox and are sent after the next start."
        );
    }
    // Every writer handle is gone now (the aborted tasks dropped theirs): the writer
    // thread commits what is queued and ends. A writer stuck in the disk is not waited
    // for beyond a short grace: what it did not commit was not acknowledged.
    let joined = tokio::time::timeout(
        WRITER_GRACE.max(deadline - tokio::time::Instant::now()),
        tokio::task::spawn_blocking(move || writer_thread.join()),
    )
    .await;
    match joined {
        Ok(Ok(Ok(()))) => {}
        Ok(_) => error!("The outbox writer thread panicked."),
        Err(_) => error!(
            "The outbox writer did not finish in time; exiting without it. Records it did not commit were not acknowledged and will be re-sent by their producers."
        ),
    }
    if let Some(t) = http_task {
        t.abort();
    }
    let pending = match tokio::time::timeout(Duration::from_secs(1), depth.get()).await {
        Ok(Ok(d)) => Some(d.pending.count),
        _ => None,
    };
    info!(
        pending,
        took = ?stop_began.elapsed(),
        "pigeon-gateway stopped."
    );
    Ok(())
}

/// Waits for `task` until `deadline`, then aborts it (and waits for the abort to take
/// effect). Returns whether it finished by itself.
async fn finish_by(deadline: tokio::time::Instant, name: &str, mut task: JoinHandle<()>) -> bool {
    if tokio::time::timeout_at(deadline, &mut task).await.is_ok() {
        return true;
    }
    warn!(
        task = name,
        "Still busy at the shutdown deadline; stopping it where it is."
    );
    task.abort();
    let _ = task.await;
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_still_busy_at_the_deadline_is_aborted_and_drops_what_it_holds() {
        // Stands in for a source stuck while holding an outbox writer handle: until the
        // handle is dropped, the writer thread (and so the shutdown) cannot end.
        let (held, dropped) = tokio::sync::oneshot::channel::<()>();
        let stuck = tokio::spawn(async move {
            let _writer_handle = held;
            std::future::pending::<()>().await
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        assert!(!finish_by(deadline, "stuck source", stuck).await);
        assert!(tokio::time::Instant::now() >= deadline);
        assert!(
            dropped.await.is_err(),
            "the aborted task still holds its handle"
        );

        let quick = tokio::spawn(async {});
        assert!(finish_by(deadline + Duration::from_secs(10), "quick", quick).await);
    }
}
