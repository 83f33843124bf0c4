//! The gateway's life in three steps: [`Running::start`] opens the outbox, binds the
//! HTTP endpoint and spawns every task; the [`Running`] handle holds them while they run
//! (the systemd watchdog task supervises them); [`Running::shutdown`] drains them in
//! order within a deadline.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;
use pigeon_sdnotify::{Notifier, State};
use pigeon_shared::shutdown::Trigger;
use rusqlite::Connection;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::outbox::rule_state::RulesSetup;
use crate::outbox::{self, DepthCache, OutboxReader, OutboxWriter, db};
use crate::report::Live;
use crate::stats::{LastErrorSlot, Stats};
use crate::{http, sources, spool, systemd, uplink};

/// How long after the shutdown deadline the outbox writer may take to commit what is
/// queued before the gateway exits without waiting for it (uncommitted = not
/// acknowledged, so nothing is lost: the broker re-sends it).
const WRITER_GRACE: Duration = Duration::from_secs(2);

/// A started gateway: its tasks, and what stopping them needs.
pub(crate) struct Running {
    notifier: Arc<Notifier>,
    live: Arc<Live>,
    depth: Arc<DepthCache>,
    /// Stops every task that takes or sends data.
    trigger: Trigger,
    tasks: Tasks,
    /// Pings the watchdog and refreshes the status line (only under systemd).
    watchdog: Option<JoinHandle<()>>,
    /// The outbox writer thread: ends once every writer handle is dropped.
    writer_thread: std::thread::JoinHandle<()>,
}

/// Every task [`Running::start`] spawns, by what it does.
struct Tasks {
    uplink: JoinHandle<()>,
    file_lane: JoinHandle<()>,
    files: Option<JoinHandle<()>>,
    mqtt: Option<JoinHandle<()>>,
    health: Option<JoinHandle<()>>,
    /// Drops records past their route's TTL (only if a route has one).
    expiry: Option<JoinHandle<()>>,
    /// The edge rules' clock (only if rules are configured).
    rules_clock: Option<JoinHandle<()>>,
    http: Option<JoinHandle<()>>,
}

/// What the tasks share: the outbox, the counts, the live report.
struct Parts {
    writer: OutboxWriter,
    reader: Arc<OutboxReader>,
    depth: Arc<DepthCache>,
    stats: Arc<Stats>,
    live: Arc<Live>,
    producer_id: String,
}

impl Running {
    /// Opens the outbox, binds the HTTP endpoint and starts every source, the uplink's
    /// two lanes and the systemd reporting; says `READY=1` when all are started.
    /// `token` is the relay token already read from the configuration; `last_error` is
    /// where the log keeps the last warning (see [`crate::stats::LastErrorLayer`]).
    pub(crate) async fn start(
        config: Config,
        token: Option<String>,
        last_error: Arc<LastErrorSlot>,
    ) -> anyhow::Result<Running> {
        // One TLS crypto provider for the whole process (ring: small, builds for the Pi).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let notifier = Arc::new(Notifier::from_env());
        let (conn, producer_id) = open_outbox(&config).await?;
        let stats = stats_for(&config, last_error);
        let (parts, writer_thread) = start_outbox(&config, conn, stats, producer_id).await?;
        let pending = parts.depth.get().await?.pending;
        // Bind before starting anything, so a taken port fails the start cleanly.
        let http_listener = bind_http(&config).await?;
        info!(
            gateway = %config.gateway.id,
            outbox = %db::path_in(&config.gateway.data_dir).display(),
            pending = pending.count,
            producer_id = %parts.producer_id,
            http = http_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()),
            "pigeon-gateway started."
        );
        let (trigger, _) = Trigger::new();
        let tasks = Tasks::spawn(&config, token, &parts, &trigger, http_listener)?;
        let ready_line = systemd::status_line(&parts.live.report().await);
        systemd::notify(&notifier, &[State::Ready, State::Status(&ready_line)]);
        let watchdog = notifier.is_enabled().then(|| {
            tokio::spawn(systemd::run(
                notifier.clone(),
                pigeon_sdnotify::watchdog_interval(),
                parts.writer.clone(),
                parts.live.clone(),
                tasks.watched(),
            ))
        });
        Ok(Running {
            notifier,
            live: parts.live,
            depth: parts.depth,
            trigger,
            tasks,
            watchdog,
            writer_thread,
        })
    }

    /// Stops taking new data, lets the in-flight upload finish within `timeout`, and
    /// leaves the outbox consistent. Says `STOPPING=1` to systemd. However stuck a part
    /// is, it returns within `timeout` plus a few seconds.
    pub(crate) async fn shutdown(self, timeout: Duration) {
        let Running {
            notifier,
            live,
            depth,
            trigger,
            tasks,
            watchdog,
            writer_thread,
        } = self;
        info!("Stopping: no new data is taken; finishing the upload in flight.");
        live.stopping.store(true, Relaxed);
        if let Some(t) = watchdog {
            t.abort();
        }
        for t in [&tasks.expiry, &tasks.rules_clock].into_iter().flatten() {
            t.abort();
        }
        systemd::notify(
            &notifier,
            &[
                State::Stopping,
                State::Status("Stopping: finishing the upload in flight."),
            ],
        );
        trigger.stop();
        let stop_began = Instant::now();
        let deadline = stop_began + timeout;
        let http = tasks.drain(deadline).await;
        join_writer(writer_thread, deadline).await;
        if let Some(t) = http {
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
    }
}

impl Tasks {
    /// Spawns the uplink's two lanes, the configured sources, the TTL expiry and the
    /// HTTP endpoint (on `http_listener`), each stopped by `trigger`.
    fn spawn(
        config: &Config,
        token: Option<String>,
        parts: &Parts,
        trigger: &Trigger,
        http_listener: Option<TcpListener>,
    ) -> anyhow::Result<Tasks> {
        let data_dir = &config.gateway.data_dir;
        let uplink = Arc::new(uplink::Uplink::new(
            config.relay.clone(),
            token,
            parts.reader.clone(),
            parts.writer.clone(),
            parts.stats.clone(),
            parts.producer_id.clone(),
        )?);
        let uplink_task = tokio::spawn(uplink.clone().run(trigger.subscribe()));
        // Files have a lane of their own (also with [files] removed: some may still wait).
        let spool = Arc::new(spool::Spool::at(&config.spool_dir()));
        let file_lane = tokio::spawn(uplink::run_files(uplink, spool, trigger.subscribe()));
        let files = match config.files.clone() {
            Some(f) => {
                let source = sources::files::FilesSource::new(
                    f,
                    &config.gateway.id,
                    data_dir,
                    parts.writer.clone(),
                    parts.reader.clone(),
                    parts.stats.clone(),
                )?;
                Some(tokio::spawn(source.run(trigger.subscribe())))
            }
            None => None,
        };
        let mqtt = config.mqtt.clone().map(|m| {
            let source = sources::mqtt::MqttSource::new(
                m,
                &config.gateway.id,
                parts.writer.clone(),
                parts.stats.clone(),
                data_dir,
                config.relay.max_event_bytes.get(),
                parts.producer_id.clone(),
            );
            tokio::spawn(source.run(trigger.subscribe()))
        });
        let health = config.health.enabled.then(|| {
            let source = sources::health::HealthSource::new(
                config.health.clone(),
                &config.gateway.id,
                data_dir.clone(),
                parts.writer.clone(),
                parts.stats.clone(),
                parts.depth.clone(),
                parts.live.started,
            );
            tokio::spawn(source.run(trigger.subscribe()))
        });
        // Records past their route's TTL are dropped unsent, checked every second.
        let has_ttl = config
            .mqtt
            .as_ref()
            .is_some_and(|m| m.subscriptions.iter().any(|s| s.ttl.is_some()));
        let expiry = has_ttl.then(|| {
            tokio::spawn(outbox::expire_loop(
                parts.writer.clone(),
                Duration::from_secs(1),
            ))
        });
        // The rules' clock closes windows, finds silent sensors and keeps the rules'
        // figures fresh.
        let rules_clock = (!config.rules.is_empty())
            .then(|| tokio::spawn(outbox::rule_state::clock_loop(parts.writer.clone())));
        let http = http_listener.map(|l| {
            let live = parts.live.clone();
            tokio::spawn(async move {
                if let Err(e) = http::serve(l, live).await {
                    error!(error = %e, "The HTTP endpoint failed; /status and /metrics are gone until a restart.");
                }
            })
        });
        Ok(Tasks {
            uplink: uplink_task,
            file_lane,
            files,
            mqtt,
            health,
            expiry,
            rules_clock,
            http,
        })
    }

    /// The tasks the watchdog checks are still running, by name.
    fn watched(&self) -> Vec<(&'static str, AbortHandle)> {
        let mut watched = vec![
            ("uplink", self.uplink.abort_handle()),
            ("file uplink", self.file_lane.abort_handle()),
        ];
        for (name, task) in [
            ("files source", &self.files),
            ("MQTT source", &self.mqtt),
            ("health source", &self.health),
            ("HTTP endpoint", &self.http),
        ] {
            watched.extend(task.as_ref().map(|t| (name, t.abort_handle())));
        }
        watched
    }

    /// Waits, until `deadline`, for the stopped tasks in drain order; returns the HTTP
    /// endpoint, which keeps answering until the outbox writer is done.
    ///
    /// Sources first (they stop taking data and acknowledge what was committed), then
    /// the uplink's request in flight. Whatever is still running at the deadline is
    /// aborted: its uncommitted records were never acknowledged, so nothing is lost.
    async fn drain(self, deadline: Instant) -> Option<JoinHandle<()>> {
        for (name, task) in [
            ("MQTT source", self.mqtt),
            ("health source", self.health),
            ("files source", self.files),
        ] {
            if let Some(t) = task {
                finish_by(deadline, name, t).await;
            }
        }
        // A file upload in flight is abandoned where it is: the relay keeps what it got.
        finish_by(deadline, "file uplink", self.file_lane).await;
        if !finish_by(deadline, "uplink", self.uplink).await {
            warn!(
                "The relay did not answer before the shutdown deadline; the events in flight stay in the outbox and are sent after the next start."
            );
        }
        self.http
    }
}

/// Opens (or recovers) the outbox in `gateway.data_dir`; returns its connection and the
/// producer id it keeps.
async fn open_outbox(config: &Config) -> anyhow::Result<(Connection, String)> {
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
    Ok((conn, producer_id))
}

/// The counts, with one entry per source the configuration has.
fn stats_for(config: &Config, last_error: Arc<LastErrorSlot>) -> Arc<Stats> {
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
    let subscriptions: Vec<(&str, &str)> = config
        .mqtt
        .iter()
        .flat_map(|m| &m.subscriptions)
        .map(|s| (s.filter.as_str(), s.event_type.as_str()))
        .collect();
    let mut stats = Stats::new(&sources, &subscriptions);
    stats.last_error = last_error;
    Arc::new(stats)
}

/// Starts the outbox writer thread on `conn` (within the configured quota) and opens
/// the reader beside it; returns them with the writer thread's handle.
async fn start_outbox(
    config: &Config,
    conn: Connection,
    stats: Arc<Stats>,
    producer_id: String,
) -> anyhow::Result<(Parts, std::thread::JoinHandle<()>)> {
    let data_dir = &config.gateway.data_dir;
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
        Some(RulesSetup {
            rules: config.checked_rules().map_err(anyhow::Error::msg)?,
            gateway: config.gateway.id.clone(),
        }),
    )?;
    let reader = Arc::new(OutboxReader::open(&db::path_in(data_dir))?);
    let depth = Arc::new(DepthCache::new(reader.clone()));
    let live = Arc::new(Live::new(config, stats.clone(), depth.clone()));
    let parts = Parts {
        writer,
        reader,
        depth,
        stats,
        live,
        producer_id,
    };
    Ok((parts, writer_thread))
}

/// The HTTP endpoint's listener, if `http.enabled`.
async fn bind_http(config: &Config) -> anyhow::Result<Option<TcpListener>> {
    if !config.http.enabled {
        return Ok(None);
    }
    let addr = config.http.listen_addr().map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (http.listen)"))?;
    Ok(Some(listener))
}

/// Waits for the outbox writer thread to commit what is queued and end.
///
/// Every writer handle is gone by now (the aborted tasks dropped theirs). A writer stuck
/// in the disk is not waited for beyond a short grace: what it did not commit was not
/// acknowledged.
async fn join_writer(writer_thread: std::thread::JoinHandle<()>, deadline: Instant) {
    let joined = tokio::time::timeout(
        WRITER_GRACE.max(deadline - Instant::now()),
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
}

/// Waits for `task` until `deadline`, then aborts it (and waits for the abort to take
/// effect). Returns whether it finished by itself.
async fn finish_by(deadline: Instant, name: &str, mut task: JoinHandle<()>) -> bool {
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
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(!finish_by(deadline, "stuck source", stuck).await);
        assert!(Instant::now() >= deadline);
        assert!(
            dropped.await.is_err(),
            "the aborted task still holds its handle"
        );

        let quick = tokio::spawn(async {});
        assert!(finish_by(deadline + Duration::from_secs(10), "quick", quick).await);
    }
}
